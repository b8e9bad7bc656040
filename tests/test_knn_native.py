"""The native CPU kNN search: its top-k buffers, threads, tiles and backend choice.

The shared contract (brute force, ties, padding, dims) is tested on both
backends in test_evaluators.py and test_retrieval.py; these tests aim at
what only the C kernel has: candidate buffers cut many times (by a sampled
threshold, and exactly when scores tie), query tiles of 4 and thread slices.
"""
import contextlib

import jax
import numpy as np
import pytest

from mrl_jax.evaluators import adaptive
from mrl_jax.evaluators import knn
from mrl_jax.evaluators import knn_native
from tests import knn_reference

pytestmark = pytest.mark.skipif(not knn_native.available(),
                                reason="the native kNN search was not built")


def _brute_force(queries, database, dims, k):
  return knn_reference.brute_force(queries, database, dims, k)[1]


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("k", [1, 2, 5, 40])
def test_many_buffer_cuts_match_brute_force(k, generic):
  # 6000 rows against a buffer of 2k: the buffer fills and is cut back
  # dozens of times per (dim, query). generic: the baseline-ISA build of
  # the kernel, which CPUs without AVX2 + FMA run.
  rng = np.random.default_rng(0)
  database = rng.normal(size=(6000, 20)).astype(np.float32)
  queries = rng.normal(size=(9, 20)).astype(np.float32)
  dims = [3, 5, 10, 20]
  with knn_native.generic_code() if generic else contextlib.nullcontext():
    if generic:
      assert not knn_native.uses_avx2()
    scores, indices = knn.knn_search(queries, database, dims, k, backend="native")
  np.testing.assert_array_equal(indices, _brute_force(queries, database, dims, k))
  assert (np.diff(scores, axis=-1) <= 0).all()  # best first


@pytest.mark.parametrize("k", [1, 3, 50])
def test_all_scores_equal_goes_to_the_lowest_rows(k):
  # Every row is the same vector: every cut is the exact one (the sampled
  # threshold keeps everything), and the lowest rows must win at every dim.
  database = np.tile(np.arange(1, 9, dtype=np.float32), (500, 1))
  queries = np.ones((6, 8), np.float32)
  scores, indices = knn.knn_search(queries, database, [2, 4, 8], k, backend="native")
  np.testing.assert_array_equal(indices, np.broadcast_to(np.arange(k), (3, 6, k)))
  assert np.isfinite(scores).all()


def test_repeated_scores_across_cuts_keep_the_lowest_rows():
  # 12 directions, each repeated ~100 times in a shuffled order: long runs
  # of equal scores straddle the threshold at every cut.
  rng = np.random.default_rng(1)
  directions = rng.normal(size=(12, 16)).astype(np.float32)
  database = directions[rng.integers(0, 12, size=1200)]
  database *= rng.choice([1.0, 2.0, 4.0], size=(1200, 1)).astype(np.float32)  # same cosine
  queries = rng.normal(size=(5, 16)).astype(np.float32)
  for k in (7, 150, 333):
    _, indices = knn.knn_search(queries, database, [4, 16], k, backend="native")
    np.testing.assert_array_equal(indices, _brute_force(queries, database, [4, 16], k))


@pytest.mark.parametrize("num_queries", [1, 3, 4, 5, 13])
@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_tiles_and_threads_do_not_change_results(num_queries, num_threads):
  rng = np.random.default_rng(2)
  database = rng.normal(size=(333, 12)).astype(np.float32)
  queries = rng.normal(size=(num_queries, 12)).astype(np.float32)
  dims = [1, 6, 7, 12]  # uneven chunks, one of a single feature
  ref = _brute_force(queries, database, dims[1:], 9)
  for k in (1, 9):
    _, indices = knn.knn_search(queries, database, dims, k, backend="native",
                                num_threads=num_threads)
    np.testing.assert_array_equal(indices[1:], ref[..., :k])


def _record_searches(monkeypatch):
  """Wraps the library; returns the list of each mrl_knn_search call's arguments."""
  real = knn_native._library()
  searches = []

  class Lib:
    def __getattr__(self, name):
      return getattr(real, name)

    def mrl_knn_search(self, *args):
      searches.append(args)
      return real.mrl_knn_search(*args)

  monkeypatch.setattr(knn_native, "_library", lambda: Lib())
  return searches


def test_many_pieces_of_whole_passes_do_not_change_results(monkeypatch):
  # 8-query passes: 100 queries on 2 threads run as 13 pieces of one pass
  # (the last one short), taken by whichever thread is free.
  monkeypatch.setattr(knn_native, "_QUERY_BLOCK", 8)
  monkeypatch.setattr(knn_native, "_BUFFER_BYTES", 8 * 16 * 9 * 3)
  searches = _record_searches(monkeypatch)
  rng = np.random.default_rng(9)
  database = rng.normal(size=(300, 12)).astype(np.float32)
  queries = rng.normal(size=(100, 12)).astype(np.float32)
  for k in (1, 9):
    searches.clear()
    _, indices = knn_native.search(queries, database, [6, 12], k, np.ones(300, bool),
                                   num_threads=2)
    assert sorted(args[1] for args in searches) == [4] + [8] * 12  # query counts
    np.testing.assert_array_equal(indices, _brute_force(queries, database, [6, 12], k))


def test_seeded_thresholds_are_used_for_large_k_and_give_the_exact_top_k(monkeypatch):
  # 6000 rows, k = 40: every 32nd block of 16 rows seeds the thresholds.
  searches = _record_searches(monkeypatch)
  rng = np.random.default_rng(12)
  database = rng.normal(size=(6000, 24)).astype(np.float32)
  queries = rng.normal(size=(11, 24)).astype(np.float32)
  dims = [3, 6, 12, 24]
  _, indices = knn_native.search(queries, database, dims, 40, np.ones(6000, bool),
                                 num_threads=1)
  assert [args[-2:] for args in searches] == [(32, knn_native._seed_rank(40, 1 / 32))]
  np.testing.assert_array_equal(indices, _brute_force(queries, database, dims, 40))
  # Small k, or too few rows per neighbour: no seeds.
  searches.clear()
  knn_native.search(queries, database, dims, 20, np.ones(6000, bool), num_threads=1)
  knn_native.search(queries, database[:5000], dims, 40, np.ones(5000, bool), num_threads=1)
  assert [args[-2:] for args in searches] == [(0, 0), (0, 0)]


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("sample_step,sample_k", [(4, 1), (1, 40), (32, 3)])
def test_seeds_above_the_kth_best_are_searched_again(monkeypatch, sample_step, sample_k,
                                                     generic):
  # Seeds from the best score of every 4th block (fewer than k rows beat it
  # for most lists), from the k-th best of all rows (exactly k - 1 beat it:
  # every list), or from too small a rank: those lists are searched again
  # from -inf, and the others must be untouched by that. With masked rows
  # and rows repeated so that scores tie across the seed.
  monkeypatch.setattr(knn_native, "_seeding", lambda k, n: (sample_step, sample_k))
  rng = np.random.default_rng(13)
  directions = rng.normal(size=(300, 16)).astype(np.float32)
  database = directions[rng.integers(0, 300, size=2000)]
  queries = rng.normal(size=(9, 16)).astype(np.float32)
  db_mask = rng.random(2000) > 0.1
  valid = np.flatnonzero(db_mask)
  dims = [4, 8, 16]
  with knn_native.generic_code() if generic else contextlib.nullcontext():
    for threads in (1, 2):
      _, indices = knn_native.search(queries, database, dims, 40, db_mask,
                                     num_threads=threads)
      np.testing.assert_array_equal(
          indices, valid[_brute_force(queries, database[valid], dims, 40)])


def test_seed_rank_bounds_the_chance_of_a_second_search():
  # The rank j with P(Poisson(k f) >= j) <= 1e-4, checked against the
  # binomial tail it stands for (the sample holds each top-k row with
  # probability f).
  from math import comb  # pylint: disable=g-import-not-at-top
  for k, step in [(100, 32), (40, 32), (1000, 32), (100, 16)]:
    f = 1 / step
    j = knn_native._seed_rank(k, f)
    tail = lambda j: sum(comb(k, x) * f**x * (1 - f)**(k - x) for x in range(j, k + 1))
    assert tail(j) <= 1e-4 < tail(j - 2), (k, step, j)
  assert knn_native._seed_rank(100, 1 / 32) == 13
  assert knn_native._seed_rank(5, 0.9, miss=1e-4) == 5  # never above k


def test_more_than_sixteen_dims():
  # 20 dims x 4 queries per tile: 80 (dim, query) pairs per block.
  rng = np.random.default_rng(11)
  database = rng.normal(size=(300, 40)).astype(np.float32)
  queries = rng.normal(size=(9, 40)).astype(np.float32)
  dims = list(range(2, 42, 2))
  for k in (1, 5):
    _, indices = knn.knn_search(queries, database, dims, k, backend="native")
    np.testing.assert_array_equal(indices, _brute_force(queries, database, dims, k))


def test_k_beyond_the_database_and_masked_rows():
  rng = np.random.default_rng(3)
  database = rng.normal(size=(10, 8)).astype(np.float32)
  queries = rng.normal(size=(3, 8)).astype(np.float32)
  db_mask = np.arange(10) % 3 != 0  # 6 valid rows
  scores, indices = knn.knn_search(queries, database, [4, 8], 9, db_mask=db_mask,
                                   backend="native")
  assert (indices[..., 6:] == -1).all() and np.isneginf(scores[..., 6:]).all()
  valid = np.flatnonzero(db_mask)
  np.testing.assert_array_equal(
      indices[..., :6], valid[_brute_force(queries, database[valid], [4, 8], 6)])


def test_one_nn_with_every_row_masked_and_ties_across_blocks():
  rng = np.random.default_rng(10)
  database = rng.normal(size=(40, 8)).astype(np.float32)
  queries = rng.normal(size=(6, 8)).astype(np.float32)
  scores, indices = knn.knn_search(queries, database, [4, 8], 1,
                                   db_mask=np.zeros(40, bool), backend="native")
  assert (indices == -1).all() and np.isneginf(scores).all()
  # The best row repeated in later blocks (rows 16 and 33, blocks of 16)
  # and scaled (same cosine): 1-NN keeps the first.
  database[16] = database[3] * 2.0
  database[33] = database[3] * 0.5
  queries[:] = database[3]
  _, indices = knn.knn_search(queries, database, [4, 8], 1, backend="native")
  assert (indices == 3).all()


def test_scores_are_cosines_like_the_xla_search():
  rng = np.random.default_rng(4)
  database = rng.normal(size=(500, 32)).astype(np.float32) * 3.0
  queries = rng.normal(size=(20, 32)).astype(np.float32) * 0.1
  dims = [8, 16, 32]
  native = knn.knn_search(queries, database, dims, 5, backend="native")
  xla = knn.knn_search(queries, database, dims, 5, backend="xla")
  np.testing.assert_array_equal(native[1], xla[1])
  np.testing.assert_allclose(native[0], xla[0], atol=1e-6)


def test_auto_picks_native_on_cpu_and_xla_without_the_library(monkeypatch):
  assert all(d.platform == "cpu" for d in jax.devices())
  assert knn.uses_native("auto", None)
  assert not knn.uses_native("xla", None)
  x = np.eye(4, dtype=np.float32)
  with pytest.raises(ValueError, match="backend='gpu' must be one of"):
    knn.knn_search(x, x, [4], 1, backend="gpu")
  monkeypatch.setattr(knn_native, "_library", lambda: None)
  assert not knn.uses_native("auto", None)
  _, indices = knn.knn_search(x, x, [4], 1)  # falls back to the XLA search
  np.testing.assert_array_equal(indices[0, :, 0], np.arange(4))
  with pytest.raises(RuntimeError, match="backend='xla'"):
    knn.knn_search(x, x, [4], 1, backend="native")


def test_scores_packed_near_every_threshold():
  # Every row at nearly the same angle to the query (a band of ~1e-4 in
  # cosine, ~1,000 float32 levels), in random order: each cut's threshold
  # lands inside the band, so a threshold set a hair too high, or a kept
  # entry dropped, loses true neighbours. Near-equal scores may swap rows
  # within float32 rounding, so the check is on the scores of the rows found.
  rng = np.random.default_rng(5)
  d, n = 8, 5000
  u = np.eye(d, dtype=np.float64)[0]
  w = np.eye(d, dtype=np.float64)[1]
  angle = np.radians(60.0) + rng.uniform(0.0, 1e-4, size=n)
  database = (np.cos(angle)[:, None] * u + np.sin(angle)[:, None] * w).astype(np.float32)
  queries = np.stack([u, u + 1e-3 * w]).astype(np.float32)
  for k in (1, 10, 300):
    scores, indices = knn.knn_search(queries, database, [d], k, backend="native")
    ref_scores, _ = knn_reference.brute_force(queries, database, [d], k)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=3e-7)
    # The rows returned really have those scores, best first, all distinct.
    exact = np.take_along_axis(
        (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
            database / np.linalg.norm(database, axis=1, keepdims=True)).T,
        indices[0], axis=1)
    np.testing.assert_allclose(exact, scores[0], rtol=0, atol=3e-7)
    assert all(len(set(row)) == k for row in indices[0])


def test_funnel_rerank_matches_the_numpy_rerank():
  rng = np.random.default_rng(6)
  database = rng.normal(size=(500, 32)).astype(np.float32)
  database[40] = 4.0 * database[7]  # an exact tie (scaled by a power of 2) with a lower row
  queries = rng.normal(size=(13, 32)).astype(np.float32)
  shortlist = np.stack([rng.permutation(500)[:60] for _ in range(13)]).astype(np.int32)
  shortlist[:, :2] = [40, 7]
  for m, size in ((8, 10), (32, 60)):
    ours = knn_native.rerank(queries, database, shortlist, m, size, num_threads=3)
    np.testing.assert_array_equal(ours, adaptive._rerank(  # pylint: disable=protected-access
        queries, database, shortlist, m, size))
  # Empty shortlist slots (-1) are skipped; slots past the valid rows are -1.
  short = np.full((2, 5), -1, np.int32)
  short[:, :2] = [[3, 9], [9, 3]]
  out = knn_native.rerank(queries[:2], database, short, 32, 4)
  assert (out[:, 2:] == -1).all() and set(out[0, :2]) == {3, 9}


def test_funnel_is_the_same_on_both_backends():
  rng = np.random.default_rng(7)
  database = rng.normal(size=(800, 16)).astype(np.float32)
  queries = rng.normal(size=(21, 16)).astype(np.float32)
  stages = [(4, 100), (8, 30), (16, 5)]
  np.testing.assert_array_equal(
      adaptive.funnel_search(queries, database, stages, 5, backend="native"),
      adaptive.funnel_search(queries, database, stages, 5, backend="xla"))
