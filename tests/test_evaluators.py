"""kNN at many prefix dims and linear top-1/top-5, against hand-made and brute-force references."""
import numpy as np
import pytest

from mrl_jax.evaluators import classification
from mrl_jax.evaluators import knn
from tests import knn_reference


_brute_force = knn_reference.brute_force


# ----------------------------------------------------------------------------
# kNN search.
# ----------------------------------------------------------------------------
def test_hand_made_nearest_neighbour_changes_with_dim():
  database = np.array([[1.0, -3.0],   # dim 1: cos +1 with q0; dim 2: negative
                       [-1.0, 1.0],   # nearest to q1 at both dims
                       [0.5, 1.0]],   # dim 1: ties row 0 (lower index wins); dim 2: nearest to q0
                      np.float32)
  queries = np.array([[1.0, 1.0], [-1.0, 0.1]], np.float32)
  for k in (1, 2):  # the k = 1 fast path and the top-k path
    scores, indices = knn.knn_search(queries, database, [1, 2], k)
    np.testing.assert_array_equal(indices[:, :, 0], [[0, 1], [2, 1]])
    np.testing.assert_allclose(scores[:, :, 0], [[1.0, 1.0],
                                                 [1.5 / np.sqrt(2 * 1.25), 1.1 / np.sqrt(2 * 1.01)]],
                               rtol=1e-6)
  _, indices = knn.knn_search(queries, database, [1, 2], 2)
  np.testing.assert_array_equal(indices[0, 0], [0, 2])  # both score 1 at dim 1
  labels = np.array([0, 1, 2])
  assert knn.knn_top1(queries, np.array([2, 1]), database, labels,
                      [1, 2]) == {1: 0.5, 2: 1.0}


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("db_chunk, query_chunk", [(None, None), (64, 16), (37, 7), (1, 50), (1000, 1000)])
def test_matches_brute_force(k, db_chunk, query_chunk):
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(50, 24)).astype(np.float32)
  database = rng.normal(size=(203, 24)).astype(np.float32)
  dims = [4, 6, 8, 12, 16, 24]
  scores, indices = knn.knn_search(queries, database, dims, k,
                                   db_chunk=db_chunk, query_chunk=query_chunk)
  ref_scores, ref_indices = _brute_force(queries, database, dims, k)
  assert scores.shape == indices.shape == (len(dims), 50, k)
  np.testing.assert_array_equal(indices, ref_indices)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("db_chunk", [1, 4, 5, 100])
def test_exact_duplicates_go_to_the_lowest_index(k, db_chunk):
  rng = np.random.default_rng(1)
  database = rng.normal(size=(20, 8)).astype(np.float32)
  query = rng.normal(size=(1, 8)).astype(np.float32)
  # Three copies of the query's direction, in different chunks and (for
  # db_chunk=100) the same chunk; one scaled by 2 (an exact, equal cosine).
  for row, scale in ((3, 1.0), (7, 1.0), (11, 2.0)):
    database[row] = scale * query[0]
  scores, indices = knn.knn_search(query, database, [2, 4, 8], k, db_chunk=db_chunk)
  np.testing.assert_array_equal(indices[:, 0], [[3, 7, 11][:k]] * 3)
  np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_padding_rows_are_never_returned(k):
  rng = np.random.default_rng(2)
  queries = rng.normal(size=(6, 8)).astype(np.float32)
  # Padding rows are exact copies of the queries: the best matches if unmasked.
  database = np.concatenate([rng.normal(size=(4, 8)), queries, np.zeros((3, 8))]).astype(np.float32)
  db_mask = np.array([1] * 4 + [0] * 9)
  scores, indices = knn.knn_search(queries, database, [4, 8], k, db_chunk=3, db_mask=db_mask)
  assert (np.asarray(indices) < 4).all()
  _, ref = _brute_force(queries, database[:4], [4, 8], k)
  np.testing.assert_array_equal(indices, ref)
  # Fewer valid rows than k: the extra slots are empty (-inf, -1).
  scores, indices = knn.knn_search(queries, database, [8], 6, db_mask=db_mask)
  assert (np.asarray(indices)[..., 4:] == -1).all() and np.isneginf(scores[..., 4:]).all()
  assert (np.asarray(indices)[..., :4] >= 0).all()


def test_bad_dims():
  x = np.ones((4, 8), np.float32)
  for dims in ([], [4, 2], [4, 4], [0, 8], [4, 9]):
    with pytest.raises(ValueError, match="strictly increasing"):
      knn.knn_search(x, x, dims, 1)


# ----------------------------------------------------------------------------
# Accuracy from neighbours.
# ----------------------------------------------------------------------------
def test_majority_vote_ties_go_to_the_nearest():
  votes = knn.majority_vote(np.array([
      [1, 2, 2, 0],    # 2 has most votes
      [1, 2, 1, 2],    # tie 1-2: 1 is nearest
      [3, 1, 2, 0],    # four-way tie: nearest
      [2, 1, 1, 2],    # tie: 2 is nearest
      [5, -1, -1, -1],  # missing neighbours do not vote
      [4, 7, 7, 7],    # majority beats the nearest
      [-1, -1, -1, -1],  # no neighbour at all: no prediction
  ]))
  np.testing.assert_array_equal(votes, [2, 1, 3, 2, 5, 7, -1])


def test_knn_accuracy_majority_and_mask():
  db_labels = np.array([0, 0, 1, 1, 2])
  # [D=2, Q=3, k=3] neighbour rows, nearest first.
  indices = np.array([[[0, 2, 3], [4, 0, 1], [2, 4, 0]],
                      [[2, 3, 0], [4, 2, 0], [1, 2, 3]]])
  query_labels = np.array([1, 2, 0])
  # k=1: labels [0, 2, 1] and [1, 2, 0]; k=3: votes [1, 0, 1] and [1, 2, 1]
  # (the second query of the second dim is a 3-way tie -> nearest label 2).
  assert knn.knn_accuracy(indices, db_labels, query_labels, [8, 16], k=1) == {8: 1 / 3, 16: 1.0}
  assert knn.knn_accuracy(indices, db_labels, query_labels, [8, 16], k=3) == {8: 1 / 3, 16: 2 / 3}
  mask = np.array([1, 1, 0])
  assert knn.knn_accuracy(indices, db_labels, query_labels, [8, 16], k=3,
                          query_mask=mask, query_chunk=2) == {8: 0.5, 16: 1.0}


def test_knn_classify_end_to_end():
  rng = np.random.default_rng(3)
  centers = rng.normal(size=(3, 16)) * 5
  db_labels = np.repeat(np.arange(3), 20)
  database = (centers[db_labels] + rng.normal(size=(60, 16))).astype(np.float32)
  query_labels = np.array([0, 1, 2] * 5)
  queries = (centers[query_labels] + rng.normal(size=(15, 16))).astype(np.float32)
  acc = knn.knn_classify(queries, query_labels, database, db_labels, [8, 16], k=5, db_chunk=16)
  assert acc == {8: 1.0, 16: 1.0}


@pytest.mark.parametrize("nesting, expected", [
    ([8, 16, 32, 64], [8, 12, 16, 24, 32, 48, 64]),
    ([8], [8]),
    ([3, 4], [3, 4]),
    ([10, 15, 100], [10, 12, 15, 57, 100]),
])
def test_eval_dims(nesting, expected):
  assert knn.eval_dims(nesting) == expected


# ----------------------------------------------------------------------------
# Linear top-1 / top-5.
# ----------------------------------------------------------------------------
def test_linear_top1_top5_with_mask_and_streaming():
  # M=2 head dims, B=4, C=7 classes. Per row, the class order by logit is
  # written out so top-1/top-5 can be read off.
  order = np.array([[0, 1, 2, 3, 4, 5, 6],    # label 0: top-1
                    [6, 5, 4, 3, 2, 1, 0],    # label 2: rank 5 -> top-5 only
                    [3, 4, 5, 6, 0, 1, 2],    # label 2: rank 7 -> miss
                    [1, 0, 2, 3, 4, 5, 6]])   # padding, label 1 would be top-1
  logits = np.zeros((2, 4, 7), np.float32)
  for b, row in enumerate(order):
    logits[0, b, row] = np.arange(7, 0, -1)
  logits[1] = logits[0, [0, 0, 0, 0]]  # dim 2's head always predicts class 0 first
  labels = np.array([0, 2, 2, 1])
  mask = np.array([1, 1, 1, 0])

  acc = classification.LinearAccuracy()
  acc.update(logits, labels, mask)
  assert acc.result([8, 16]) == {"linear_top1": {8: 1 / 3, 16: 1 / 3},
                                 "linear_top5": {8: 2 / 3, 16: 1.0}}
  # Streaming over two batches gives the same exact counts.
  streamed = classification.LinearAccuracy([8, 16])
  streamed.update(logits[:, :2], labels[:2], mask[:2])
  streamed.update(logits[:, 2:], labels[2:], mask[2:])
  assert streamed.result() == acc.result([8, 16])
  # Without a mask every example counts (the 4th is a top-1 hit at dim 8).
  full = classification.LinearAccuracy([8, 16])
  full.update(logits, labels)
  assert full.result() == {"linear_top1": {8: 2 / 4, 16: 1 / 4},
                           "linear_top5": {8: 3 / 4, 16: 4 / 4}}


def test_linear_ties_and_few_classes():
  # Equal logits: the lower class index is the prediction; with C < 5 top-5
  # is always right.
  logits = np.zeros((1, 2, 3), np.float32)
  acc = classification.LinearAccuracy([4])
  acc.update(logits, np.array([0, 2]))
  assert acc.result() == {"linear_top1": {4: 0.5}, "linear_top5": {4: 1.0}}
  with pytest.raises(ValueError, match="head dims"):
    acc.result([4, 8])
