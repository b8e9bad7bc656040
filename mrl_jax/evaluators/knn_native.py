"""The exact all-dims kNN search as native CPU code (`_knn_native.c`).

`knn.knn_search` runs here when its devices are CPUs (backend='auto'). The
XLA program of `knn._search` cannot fuse the chunk matmuls with the per-dim
top-k, so on a CPU it writes and re-reads a score block per dim; the C
kernel keeps a 4-query x 16-row tile of running dot products in registers,
and after each chunk between consecutive dims scores that dim and updates
its top-k before moving on. Every dim then costs a multiply and a compare
per score on top of one full-dim pass: the same arithmetic as a single-dim
search plus O(D) per score (module docstring of the C file).

The library is compiled with the package (setup.py, an optional extension:
without a C compiler the install still succeeds and the XLA search is used
everywhere). Queries are split over threads (`num_threads`, default: the
CPUs this process may run on); ctypes releases the GIL for each call.
"""
from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import contextlib
import ctypes
import functools
import math
import os
import pathlib

import numpy as np

from mrl_jax import native_library

# Squared prefix norms are floored here, as in knn._prefix_inv_norms.
_SQ_NORM_EPS = 1e-24
# Queries per pass over the database, and database bytes per cache-sized
# run of blocks (each run is swept by every query tile of the pass).
_QUERY_BLOCK = 512
_DB_RUN_BYTES = 128 << 10
_BUFFER_BYTES = 4 << 20


@functools.lru_cache(maxsize=1)
def _library():
  """The compiled library, or None (no compiler at install time)."""
  lib = native_library.load(pathlib.Path(__file__).parent, "_knn_native")
  if lib is None:
    return None
  ptr, i64 = ctypes.c_void_p, ctypes.c_int64
  lib.mrl_knn_search.restype = ctypes.c_int
  lib.mrl_knn_search.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64,
                                 ptr, ptr, i64, i64, i64]
  lib.mrl_knn_rows_per_block.restype = i64
  lib.mrl_knn_uses_avx2.restype = ctypes.c_int
  lib.mrl_knn_force_generic.argtypes = [ctypes.c_int]
  lib.mrl_knn_queries_per_tile.restype = i64
  lib.mrl_knn_prepare_database.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_double,
                                           i64, i64, ptr, ptr]
  lib.mrl_knn_rerank.restype = ctypes.c_int
  lib.mrl_knn_rerank.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr]
  return lib


def available() -> bool:
  """Whether the native search was built with this installation."""
  return _library() is not None


def uses_avx2() -> bool:
  """Whether the native search runs its AVX2 + FMA version on this CPU."""
  lib = _library()
  return bool(lib is not None and lib.mrl_knn_uses_avx2())


@contextlib.contextmanager
def generic_code():
  """Within: the baseline-ISA version runs even where AVX2 + FMA exist (tests)."""
  lib = _library()
  lib.mrl_knn_force_generic(1)
  try:
    yield
  finally:
    lib.mrl_knn_force_generic(0)


def prefix_inv_norms(x: np.ndarray, dims: Sequence[int]) -> np.ndarray:
  """[n, d] -> [D, n] float32 1 / |x[:m]| per dim (floored like knn.py)."""
  # Squared norms of the chunks between consecutive dims, then running sums.
  starts = [0, *dims[:-1]]
  sq = np.add.reduceat(np.square(x[:, :dims[-1]], dtype=np.float32), starts, axis=1)  # [n, D]
  sq = np.cumsum(sq.T, axis=0, dtype=np.float64)
  return (1.0 / np.sqrt(np.maximum(sq, _SQ_NORM_EPS))).astype(np.float32)


def _prepared_database(lib, database: np.ndarray, dims, db_mask: np.ndarray,
                       num_threads: int | None = None):
  """Blocks of rows, transposed within each block: xb [nblk, d, RB], xinv [nblk, D, RB].

  Padding rows and masked rows get inverse norm NaN, so they never score.
  Blocks are prepared on threads.
  """
  n, d = database.shape
  rows_per_block = int(lib.mrl_knn_rows_per_block())
  nblk = max(1, -(-n // rows_per_block))
  xb = np.empty((nblk, d, rows_per_block), np.float32)
  xinv = np.empty((nblk, len(dims), rows_per_block), np.float32)
  bounds = np.asarray((0, *dims), np.int32)
  mask = np.ascontiguousarray(db_mask, np.uint8)

  def run(start, count):
    lib.mrl_knn_prepare_database(database.ctypes.data, n, d, bounds.ctypes.data, len(dims),
                                 mask.ctypes.data, _SQ_NORM_EPS, start, start + count,
                                 xb.ctypes.data, xinv.ctypes.data)

  _on_threads(run, nblk, num_threads)
  return xb, xinv


# Work pieces per thread: threads take the next piece when done with one, so a
# thread slowed by other load on its core ends at most one piece (~1 /
# _PIECES_PER_THREAD of its share) behind the others; with one piece per
# thread the whole call waits for the slowest thread.
_PIECES_PER_THREAD = 8


def _resolve_threads(num_threads: int | None) -> int:
  """num_threads, or None: the CPUs this process may run on."""
  if num_threads is None:
    num_threads = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
  return max(1, int(num_threads))


def _on_threads(fn, num_q: int, num_threads: int | None, unit: int = 1):
  """fn(start, count) over pieces of [0, num_q) (whole `unit`s), on threads.

  ctypes releases the GIL for each library call, so pieces run in parallel;
  each thread takes the next piece when it is done with one.
  """
  num_threads = _resolve_threads(num_threads)
  pieces = num_threads * _PIECES_PER_THREAD if num_threads > 1 else 1
  per_piece = -(-num_q // pieces)
  per_piece = max(1, -(-per_piece // unit)) * unit
  slices = [(start, min(num_q, start + per_piece) - start)
            for start in range(0, num_q, per_piece)]
  if len(slices) <= 1:
    for start, count in slices:
      fn(start, count)
    return
  with concurrent.futures.ThreadPoolExecutor(min(num_threads, len(slices))) as pool:
    list(pool.map(lambda sl: fn(*sl), slices))


def rerank(queries: np.ndarray, database: np.ndarray, shortlist: np.ndarray, m: int,
           size: int, *, num_threads: int | None = None) -> np.ndarray:
  """The best `size` rows of each query's shortlist [Q, K] by cosine at dim m: [Q, size].

  Ties go to the lower row; shortlist entries -1 (no row) are skipped and
  slots past the valid rows are -1. The funnel's re-ranking stages
  (`adaptive.funnel_search`).
  """
  lib = _library()
  queries = np.ascontiguousarray(queries, np.float32)
  database = np.ascontiguousarray(database, np.float32)
  shortlist = np.ascontiguousarray(shortlist, np.int32)
  num_q, d = queries.shape
  out = np.empty((num_q, int(size)), np.int32)

  def run(start, count):
    status = lib.mrl_knn_rerank(
        queries[start:].ctypes.data, count, d, database.ctypes.data,
        shortlist[start:].ctypes.data, shortlist.shape[1], int(m), int(size),
        out[start:].ctypes.data)
    if status != 0:
      raise MemoryError("native funnel re-ranking: out of memory.")

  _on_threads(run, num_q, num_threads)
  return out


# Seeded thresholds for large k (the C file, search_body): every
# _SAMPLE_STEP-th database block is searched first, and each list's
# threshold starts at the sample_k-th best sample score, sample_k chosen so
# that P(at least sample_k of the exact top-k fall in the sample) <=
# _SEED_MISS (such a list is searched again). Used where it saves
# candidates: k >= _SEED_MIN_K and a database of at least _SEED_MIN_ROWS_PER_K
# valid rows per neighbour.
_SAMPLE_STEP = 32
_SEED_MISS = 1e-4
_SEED_MIN_K = 32
_SEED_MIN_ROWS_PER_K = 128


def _seed_rank(k: int, rate: float, miss: float = _SEED_MISS) -> int:
  """Smallest j with P(Poisson(k rate) >= j) <= miss (j <= k)."""
  lam = k * rate
  term = cdf = math.exp(-lam)  # P(X = 0), P(X <= 0)
  j = 1
  while 1.0 - cdf > miss and j < k:
    term *= lam / j
    cdf += term
    j += 1
  return j


def _seeding(k: int, num_valid: int) -> tuple[int, int]:
  """(sample_step, sample_k) for the C search; (0, 0): no seeded thresholds."""
  if k < _SEED_MIN_K or num_valid < _SEED_MIN_ROWS_PER_K * k:
    return 0, 0
  return _SAMPLE_STEP, _seed_rank(k, 1.0 / _SAMPLE_STEP)


def search(queries: np.ndarray, database: np.ndarray, dims: Sequence[int], k: int,
           db_mask: np.ndarray, *, num_threads: int | None = None):
  """Exact top-k at every dim; the contract of `knn.knn_search` (checked there).

  Returns scores [D, Q, k] float32 (cosines, best first) and indices
  [D, Q, k] int32 (ties to the lower row; -inf / -1 past the valid rows).
  """
  lib = _library()
  if lib is None:
    raise RuntimeError(
        "kNN backend='native' needs the compiled search, which this installation lacks "
        "(it is built by `pip install -e .` when a C compiler is present). Fix: install a "
        "C compiler and reinstall mrl_jax, or pass backend='xla'.")
  queries = np.ascontiguousarray(queries, np.float32)
  database = np.ascontiguousarray(database, np.float32)
  num_q, d = queries.shape
  num_dims = len(dims)
  xb, xinv = _prepared_database(lib, database, dims, db_mask, num_threads)
  bounds = np.asarray((0, *dims), np.int32)
  rows_per_block = xb.shape[2]
  db_run = max(1, _DB_RUN_BYTES // (4 * d * rows_per_block))
  scores = np.empty((num_dims, num_q, k), np.float32)
  indices = np.empty((num_dims, num_q, k), np.int32)
  if num_q == 0:
    return scores, indices

  tile = int(lib.mrl_knn_queries_per_tile())

  # Candidate buffers (2k entries of 8 bytes per dim and query) of one pass
  # stay under _BUFFER_BYTES per thread, so that they stay in cache while
  # the pass streams the database: 13 dims at k = 100 take 1/8 less time
  # in passes of 128-256 queries than of 512 (benchmarks/knn.py, d = 512).
  # Whole tiles: a pass's last tile would otherwise be partly padding.
  query_block = _QUERY_BLOCK if k == 1 else int(np.clip(
      _BUFFER_BYTES // (16 * k * num_dims) // tile * tile, tile, _QUERY_BLOCK))

  sample_step, sample_k = _seeding(k, int(np.count_nonzero(db_mask)))

  def run(start, count):
    status = lib.mrl_knn_search(
        queries[start:].ctypes.data, count, d, xb.ctypes.data, xinv.ctypes.data,
        xb.shape[0], bounds.ctypes.data, num_dims, k, query_block, db_run,
        scores[:, start:].ctypes.data, indices[:, start:].ctypes.data, num_q,
        sample_step, sample_k)
    if status != 0:
      raise MemoryError(f"native kNN search: out of memory ({count} queries, k={k}).")

  # Pieces of whole passes where there are enough queries for every thread.
  threads = _resolve_threads(num_threads)
  unit = query_block if num_q >= 2 * threads * query_block else tile
  _on_threads(run, num_q, threads, unit)
  # The kernel ranks by <q, x> / |x|; dividing by |q[:m]| makes cosines.
  scores *= prefix_inv_norms(queries, dims)[:, :, None]
  return scores, indices
