"""Retrieval metrics (mAP@k, precision@k, recall@k) and kNN votes at every dim,
against hand-computed cases and brute force; sharded == single device."""
import types

import jax
import ml_collections
import numpy as np
import pytest

from mrl_jax import evaluate
from mrl_jax import report as report_lib
from mrl_jax.evaluators import base
from mrl_jax.evaluators import knn
from mrl_jax.evaluators import retrieval
from tests import knn_reference


def _brute_force_indices(queries, database, dims, k):
  return knn_reference.brute_force(queries, database, dims, k)[1]


def _metrics_reference(indices, db_labels, query_labels, dims, ks):
  """Straight from the definitions, one query at a time."""
  out = {}
  for metric in ("map", "precision", "recall"):
    for k in ks:
      out[f"{metric}@{k}"] = {}
  for j, m in enumerate(dims):
    per_query = {name: [] for name in out}
    for q, y in enumerate(query_labels):
      rel = [i >= 0 and db_labels[i] == y for i in indices[j, q, :max(ks)]]
      num_relevant = int(np.sum(db_labels == y))
      for k in ks:
        hits = sum(rel[:k])
        ap = sum(sum(rel[:i]) / i for i in range(1, k + 1) if rel[i - 1]) / k
        per_query[f"map@{k}"].append(ap)
        per_query[f"precision@{k}"].append(hits / k)
        per_query[f"recall@{k}"].append(hits / num_relevant if num_relevant else 0.0)
    for name, values in per_query.items():
      out[name][m] = float(np.mean(values))
  return out


def _assert_metrics_close(got, want):
  assert got.keys() == want.keys()
  for name in want:
    assert got[name].keys() == want[name].keys(), name
    for m in want[name]:
      assert got[name][m] == pytest.approx(want[name][m], abs=1e-12), (name, m)


# ----------------------------------------------------------------------------
# Metrics from neighbour indices, by hand.
# ----------------------------------------------------------------------------
DB_LABELS = np.array([1, 0, 1, 0, 0, 2, 1])
DB_MASK = np.array([1, 1, 1, 1, 1, 1, 0])  # row 6 (label 1) is padding
QUERY_LABELS = np.array([1, 0, 7, 1])      # label 7 is in no database row
QUERY_MASK = np.array([1, 1, 1, 0])        # query 3 is padding
# [D=2, Q=4, 5] nearest rows; -1 = no row.
INDICES = np.array([
    [[0, 1, 2, 3, 4], [5, 1, 3, -1, -1], [0, 1, 2, 3, 4], [0, 2, 6, 1, 3]],
    [[0, 2, 1, 3, 4], [5, 1, 3, -1, -1], [0, 1, 2, 3, 4], [1, 3, 4, 5, 0]],
])


def test_hand_computed_map_precision_recall():
  """Relevance per query (dim 8):
    q0 (label 1): 1 0 1 0 0 -> P@1 = 1, P@3 = 2/3; 2 of its 2 relevant rows
    q1 (label 0): 0 1 1 . . -> P@2 = 1/2, P@3 = 2/3; 2 of 3 (fewer than k=5 retrieved)
    q2 (label 7): nothing relevant, no relevant row exists: all 0 (recall too)
  At dim 16 q0 is 1 1 0 0 0 -> AP@5 = (1 + 1)/5, AP@3 = 2/3.
  """
  got = retrieval.retrieval_metrics(INDICES, DB_LABELS, QUERY_LABELS, [8, 16], ks=[5, 1, 3],
                                    query_mask=QUERY_MASK, db_mask=DB_MASK)
  ap5 = {8: (1 + 2 / 3) / 5, 16: 2 / 5}   # q0's AP@5 per dim
  ap3 = {8: (1 + 2 / 3) / 3, 16: 2 / 3}
  want = {
      "map@1": {8: 1 / 3, 16: 1 / 3},
      "map@3": {m: (ap3[m] + (1 / 2 + 2 / 3) / 3) / 3 for m in (8, 16)},
      "map@5": {m: (ap5[m] + (1 / 2 + 2 / 3) / 5) / 3 for m in (8, 16)},
      "precision@1": {8: 1 / 3, 16: 1 / 3},
      "precision@3": {8: (2 / 3 + 2 / 3) / 3, 16: (2 / 3 + 2 / 3) / 3},
      "precision@5": {8: (2 / 5 + 2 / 5) / 3, 16: (2 / 5 + 2 / 5) / 3},
      "recall@1": {8: (1 / 2) / 3, 16: (1 / 2) / 3},
      "recall@3": {8: (2 / 2 + 2 / 3) / 3, 16: (2 / 2 + 2 / 3) / 3},
      "recall@5": {8: (2 / 2 + 2 / 3) / 3, 16: (2 / 2 + 2 / 3) / 3},
  }
  _assert_metrics_close(got, want)
  assert list(got) == list(want)  # grouped by metric, then k ascending
  # Chunking over queries only changes the order of summation.
  chunked = retrieval.retrieval_metrics(INDICES, DB_LABELS, QUERY_LABELS, [8, 16], ks=[1, 3, 5],
                                        query_mask=QUERY_MASK, db_mask=DB_MASK, query_chunk=1)
  _assert_metrics_close(chunked, want)


def test_map_is_normalised_by_k():
  # One relevant row, retrieved first: AP@k = 1/k (the "corrected" mAP@k),
  # where normalising by the relevant rows retrieved would give 1.
  indices = np.array([[[0, 1, 2, 3]]])
  got = retrieval.retrieval_metrics(indices, np.array([5, 0, 0, 0]), np.array([5]), [4],
                                    ks=[1, 2, 4])
  assert got["map@1"] == {4: 1.0} and got["map@2"] == {4: 0.5} and got["map@4"] == {4: 0.25}
  assert got["recall@1"] == {4: 1.0} and got["precision@4"] == {4: 0.25}


def test_metrics_bad_input():
  with pytest.raises(ValueError, match="database .* has only 5 rows"):
    retrieval.retrieval_metrics(INDICES, DB_LABELS, QUERY_LABELS, [8, 16], ks=[10])
  with pytest.raises(ValueError, match=r"D = len\(dims\) = 3"):
    retrieval.retrieval_metrics(INDICES, DB_LABELS, QUERY_LABELS, [8, 16, 32], ks=[5])
  for ks in ([], [0], [2.5], ["10"], [True]):
    with pytest.raises(ValueError, match="positive ints"):
      retrieval.check_ks(ks)


# ----------------------------------------------------------------------------
# Search + metrics against brute force; ties; sharding.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("k, db_chunk, query_chunk", [
    (25, None, None),   # default blocking: one chunk, groups of 16
    (25, 64, 8),        # several chunks of 4 groups: fewer groups than k
    (10, 100, 16),      # groups of 4 (gcd(100, 16))
    (7, 37, 5),         # groups of 1: plain top-k per chunk
    (3, 2048, 50),      # a chunk larger than the database
])
def test_search_and_metrics_match_brute_force(k, db_chunk, query_chunk):
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(50, 24)).astype(np.float32)
  database = rng.normal(size=(203, 24)).astype(np.float32)
  db_labels = rng.integers(0, 4, size=203)
  query_labels = rng.integers(0, 5, size=50)  # label 4: no relevant rows
  dims = [4, 6, 8, 12, 16, 24]
  _, indices = knn.knn_search(queries, database, dims, k, db_chunk=db_chunk,
                              query_chunk=query_chunk)
  ref = _brute_force_indices(queries, database, dims, k)
  np.testing.assert_array_equal(indices, ref)
  ks = sorted({1, k // 2 + 1, k})
  got = retrieval.retrieval_metrics(indices, db_labels, query_labels, dims, ks)
  _assert_metrics_close(got, _metrics_reference(ref, db_labels, query_labels, dims, ks))


@pytest.mark.parametrize("db_chunk", [None, 32, 48])
def test_exact_duplicates_across_groups_go_to_the_lowest_indices(db_chunk):
  rng = np.random.default_rng(1)
  database = rng.normal(size=(160, 8)).astype(np.float32)
  query = rng.normal(size=(1, 8)).astype(np.float32)
  # 30 exact copies of the query's direction (some scaled by 2: the same
  # cosine, bit for bit) spread over groups, sub-blocks and chunks.
  copies = np.sort(rng.choice(160, size=30, replace=False))
  for n, row in enumerate(copies):
    database[row] = (2.0 if n % 3 == 0 else 1.0) * query[0]
  scores, indices = knn.knn_search(query, database, [2, 8], 12, db_chunk=db_chunk)
  np.testing.assert_array_equal(indices[:, 0], [copies[:12]] * 2)
  np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-6)


def test_sharded_equals_single_device():
  assert jax.device_count() == 8
  rng = np.random.default_rng(2)
  queries = rng.normal(size=(37, 16)).astype(np.float32)  # not a multiple of 8
  database = rng.normal(size=(150, 16)).astype(np.float32)
  db_mask = rng.random(150) > 0.1
  one = jax.make_mesh((1,), ("queries",), devices=jax.devices()[:1],
                      axis_types=(jax.sharding.AxisType.Auto,))
  grid = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  for k in (1, 10):
    single = knn.knn_search(queries, database, [4, 8, 16], k, db_mask=db_mask, mesh=one)
    for mesh in (None, grid):  # all 8 devices, as a 1-D and a 2-D mesh
      sharded = knn.knn_search(queries, database, [4, 8, 16], k, db_mask=db_mask, mesh=mesh)
      np.testing.assert_array_equal(sharded[1], single[1])
      np.testing.assert_array_equal(sharded[0], single[0])
    assert (db_mask[single[1]]).all()


def _brute_force(queries, database, db_mask, m, k):
  """Top-k rows by cosine at prefix m, ties to the lower row (float64)."""
  def unit(z):
    z = z[:, :m].astype(np.float64)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  s = np.where(db_mask[None, :], unit(queries) @ unit(database).T, -np.inf)
  order = np.lexsort((np.broadcast_to(np.arange(len(database)), s.shape), -s), axis=1)
  return order[:, :k]


@pytest.mark.parametrize("n, k", [(150, 1), (150, 100), (5, 1), (5, 7)])
def test_database_sharded_over_the_ring_equals_brute_force(n, k):
  """The database is split over the 8 devices and travels around them: the
  same neighbours as one device and as brute force, ties across shards to the
  lower row, padding and masked rows never returned, a database smaller than
  the device count, k larger than a shard (and than the database)."""
  rng = np.random.default_rng(3)
  database = rng.normal(size=(n, 8)).astype(np.float32)
  if n > 100:
    database[130] = database[3]  # exact ties: shard 0 and shard 6 of 8
    database[77] = 2.0 * database[20]
  queries = np.concatenate([database[[3, min(20, n - 1)]], rng.normal(size=(9, 8))]).astype(np.float32)
  db_mask = np.ones(n, bool)
  db_mask[1] = False
  one = jax.make_mesh((1,), ("queries",), devices=jax.devices()[:1],
                      axis_types=(jax.sharding.AxisType.Auto,))
  dims = [2, 8]
  single = knn.knn_search(queries, database, dims, k, db_mask=db_mask, mesh=one)
  sharded = knn.knn_search(queries, database, dims, k, db_mask=db_mask)
  np.testing.assert_array_equal(sharded[1], single[1])
  np.testing.assert_array_equal(sharded[0], single[0])
  valid = min(k, db_mask.sum())
  for j, m in enumerate(dims):
    np.testing.assert_array_equal(sharded[1][j, :, :valid],
                                  _brute_force(queries, database, db_mask, m, valid))
  assert (sharded[1][:, :, valid:] == -1).all()  # fewer valid rows than k
  assert not np.isin(sharded[1], [1]).any()  # the masked row
  if n > 100:  # the ties: the lower row first
    assert (sharded[1][:, 0, :2] == [3, 130][:k]).all()
    assert (sharded[1][1, 1, :2] == [20, 77][:k]).all()  # same cosine at the full dim


# ----------------------------------------------------------------------------
# kNN votes and ties, end to end.
# ----------------------------------------------------------------------------
def _ray(degrees):
  return [np.cos(np.radians(degrees)), np.sin(np.radians(degrees))]


def test_one_nn_tie_goes_to_the_lowest_index():
  # Rows 1 and 3 are the query's direction (row 3 twice as long: the same
  # cosine); their labels differ, so the 1-NN label shows which one won.
  database = np.array([_ray(50), _ray(0), _ray(30), [2.0, 0.0]], np.float32)
  db_labels = np.array([0, 1, 0, 2])
  queries = np.array([_ray(0)], np.float32)
  assert knn.knn_top1(queries, np.array([1]), database, db_labels, [2]) == {2: 1.0}
  _, indices = knn.knn_search(queries, database, [2], 3)
  np.testing.assert_array_equal(indices[0, 0], [1, 3, 2])


def test_majority_vote_ties_go_to_the_nearest_label():
  # Neighbours of the query by angle: 10 (A), 20 (B), 30 (B), 40 (A), 50 (C).
  database = np.array([_ray(a) for a in (40, 20, 10, 50, 30)], np.float32)
  db_labels = np.array([0, 1, 0, 2, 1])  # A = 0, B = 1, C = 2
  queries = np.array([_ray(0)], np.float32)
  data = base.Data(train={"embedding": database, "label": db_labels},
                   eval={"embedding": queries, "label": np.array([0])})
  evaluator = knn.Knn({"type": "knn", "k": [3, 4, 5]}, base.Context(nesting_dims=(2,)),
                      "config.evals.knn")
  out = evaluator.run(data)
  # k=1: A. k=3: A B B -> B. k=4: A B B A -> a 2-2 tie, A is nearest. k=5: A.
  assert out == {"knn_top1": {2: 1.0}, "knn3_top1": {2: 0.0},
                 "knn4_top1": {2: 1.0}, "knn5_top1": {2: 1.0}}


# ----------------------------------------------------------------------------
# The evaluators: config, shared search, errors, report.
# ----------------------------------------------------------------------------
def _config(**evals):
  config = ml_collections.ConfigDict()
  config.dataset = ml_collections.ConfigDict({"train_split": "train"})
  config.evals = ml_collections.ConfigDict(evals)
  return config


def test_knn_and_retrieval_share_one_search(monkeypatch):
  rng = np.random.default_rng(3)
  database = rng.normal(size=(120, 16)).astype(np.float32)
  queries = rng.normal(size=(20, 16)).astype(np.float32)
  db_labels, query_labels = rng.integers(0, 3, 120), rng.integers(0, 3, 20)
  config = _config(knn=dict(type="knn", k=[1, 5]), ret=dict(type="retrieval", ks=[10, 25]))
  facts = {"nesting_dims": [8, 16],
           "dataset": types.SimpleNamespace(num_examples={"train": 120})}
  built = evaluate.check_evals(config, facts)
  assert evaluate.num_neighbours(built) == 25
  data = base.Data(train={"embedding": database, "label": db_labels},
                   eval={"embedding": queries, "label": query_labels},
                   num_neighbours=evaluate.num_neighbours(built))
  calls = []
  search = knn.knn_search
  monkeypatch.setattr(knn, "knn_search", lambda *a, **kw: calls.append(a[3]) or search(*a, **kw))
  metrics = {}
  for evaluator in built.values():
    metrics.update(evaluator.run(data))
  assert calls == [25]
  dims = [8, 12, 16]
  ref = _brute_force_indices(queries, database, dims, 25)
  assert set(metrics) == {"knn_top1", "knn5_top1", "map@10", "map@25", "precision@10",
                          "precision@25", "recall@10", "recall@25"}
  _assert_metrics_close({m: v for m, v in metrics.items() if "@" in m},
                        _metrics_reference(ref, db_labels, query_labels, dims, [10, 25]))
  assert metrics["knn_top1"] == knn.knn_accuracy(ref, db_labels, query_labels, dims, k=1)
  assert all(set(per_dim) == set(dims) for per_dim in metrics.values())


def test_config_errors_name_the_field():
  facts = {"nesting_dims": [8], "dataset": types.SimpleNamespace(num_examples={"train": 50})}
  def neighbours(config, facts):
    return evaluate.num_neighbours(evaluate.check_evals(config, facts))
  assert neighbours(_config(knn=dict(type="knn", k=[1])), facts) == 1
  assert neighbours(_config(knn=dict(type="knn", k=5)), facts) == 5
  big = {"nesting_dims": [8], "dataset": types.SimpleNamespace(num_examples={"train": 200})}
  assert neighbours(_config(ret=dict(type="retrieval")), big) == 100  # default ks
  assert neighbours(_config(lin=dict(type="linear")), facts) == 0
  with pytest.raises(ValueError, match=r"config\.evals\.knn\.k=\[60\] .* only 50 rows"):
    evaluate.check_evals(_config(knn=dict(type="knn", k=[60])), facts)
  with pytest.raises(ValueError, match=r"config\.evals\.ret\.ks=\[10, 25, 50, 100\] .* only 50"):
    evaluate.check_evals(_config(ret=dict(type="retrieval")), facts)  # default ks
  with pytest.raises(ValueError, match=r"config\.evals\.ret\.ks=\[0\] must be"):
    evaluate.check_evals(_config(ret=dict(type="retrieval", ks=[0])), facts)
  with pytest.raises(ValueError, match=r"config\.evals\.x\.type='nope' is not one of"):
    evaluate.check_evals(_config(x=dict(type="nope")), facts)
  with pytest.raises(ValueError, match=r"config\.evals\.knn: unknown option\(s\) \['kk'\] .* "
                     r"options are \['k'\]"):
    evaluate.check_evals(_config(knn=dict(type="knn", kk=5)), facts)
  # Dims beyond the embedding: the search says which dims and the size.
  x = np.ones((4, 8), np.float32)
  with pytest.raises(ValueError, match=r"dims=\[8, 16\] .* \[1, 8\] \(8 = the embedding size\)"):
    knn.knn_search(x, x, [8, 16], 2)


def test_report_explains_corrected_map():
  results = {"step": 3, "mode": "mrl", "nesting_dims": [8, 16],
             "metrics": {"knn_top1": {"8": 0.5, "12": 0.6, "16": 0.7}}}
  plain = report_lib.report_markdown(results)
  assert "corrected" not in plain and "majority" not in plain
  results["metrics"].update({"knn5_top1": {"8": 0.5}, "map@10": {"8": 0.25, "16": 0.5},
                             "recall@10": {"8": 0.01}})
  report = report_lib.report_markdown(results)
  assert "normalised by k" in report and '"corrected" mAP@k' in report
  assert "majority vote" in report
  assert "| map@10 | 25.00 | – | 50.00 |" in report
