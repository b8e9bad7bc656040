"""Exact k-nearest-neighbour search and kNN accuracy at many prefix dims.

Each prefix z[:m] is L2-normalised on its own before any distance, so the
score of query q and database vector x at dim m is the cosine

    s_m(q, x) = <q[:m], x[:m]> / (|q[:m]| |x[:m]|).

All dims come from one pass over the database, for about the cost of the full
dim: split the features into the disjoint chunks between consecutive dims,
(0, m_1], (m_1, m_2], ..., compute each chunk's partial dot products once
(together one [Q, d] x [d, N] product) and a cumulative sum over chunks gives
every prefix's raw dot product. Prefix squared norms are cumulative sums too.

The [Q, N] score matrix is never materialised: database chunks are streamed
in order and a running top-k per (dim, query) is kept on device. Ties are
broken by the lower database index: within a chunk `lax.top_k` puts equal
elements in index order (k = 1 takes the lowest row reaching the max), and
the running top-k of earlier chunks wins over the new chunk on equal scores.

On 2 CPU cores, Q = 10,000 queries against N = 60,000 rows at d = 64 and the
7 dims eval_dims([8, 16, 32, 64]) take about 6 s for k = 1 and 20 s for
k = 10 (compile included: +2 s). The D score passes, not the FLOPs, set the
time there.
"""
from __future__ import annotations

from collections.abc import Sequence
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Squared prefix norms are floored here, so zero prefixes score 0, not NaN
# (the same floor as mrl_jax.matryoshka.truncate).
_SQ_NORM_EPS = 1e-24
# (db_chunk, query_chunk) by k == 1; see knn_search.
_DEFAULT_CHUNKS = {True: (512, 256), False: (8192, 1024)}


def eval_dims(nesting_dims: Sequence[int]) -> list[int]:
  """Trained dims plus the midpoints between neighbours: [8, 16, 32] -> [8, 12, 16, 24, 32]."""
  dims = sorted(int(m) for m in nesting_dims)
  mids = [(a + b) // 2 for a, b in zip(dims, dims[1:])]
  return sorted(set(dims) | set(mids))


def _check_dims(dims, d: int) -> tuple[int, ...]:
  dims = tuple(int(m) for m in dims)
  if not dims or any(b <= a for a, b in zip(dims, dims[1:])) or dims[0] < 1 or dims[-1] > d:
    raise ValueError(
        f"kNN dims={list(dims)} must be strictly increasing ints in [1, {d}] "
        f"(the embedding size); e.g. eval_dims(config.mrl.nesting_dims).")
  return dims


def _chunk_bounds(dims):
  bounds = (0, *dims)
  return list(zip(bounds[:-1], bounds[1:]))


def _prefix_inv_norms(x, dims):  # [n, d] -> [D, n]
  sq = jnp.stack([jnp.sum(jnp.square(x[:, lo:hi]), axis=-1)
                  for lo, hi in _chunk_bounds(dims)])
  return lax.rsqrt(jnp.maximum(jnp.cumsum(sq, axis=0), _SQ_NORM_EPS))


def _prefix_dots(a, b, dims):
  """Yields a[:, :m] @ b[:, :m].T [n_a, n_b] for m in dims, from chunk products."""
  acc = 0.0
  for lo, hi in _chunk_bounds(dims):
    # HIGHEST: TPUs would otherwise multiply float32 in bf16 passes, and an
    # exact search must rank the same on every backend.
    acc = acc + jnp.dot(a[:, lo:hi], b[:, lo:hi].T, precision=lax.Precision.HIGHEST)
    yield acc


def _top1_step(q, dims):
  """Scan step keeping the best row per (dim, query): carry [D, Qc] x 2."""
  def step(carry, chunk):
    best_s, best_i = carry
    x, x_inv, valid, start = chunk
    rows = start + jnp.arange(x.shape[0], dtype=jnp.int32)[:, None]  # [Nc, 1]
    chunk_s, chunk_i = [], []
    # Scores are laid out [Nc, Qc] so that both reductions run over the major
    # axis and vectorise along queries; on CPU this is several times faster
    # than argmax or top_k along the last axis.
    for j, dot in enumerate(_prefix_dots(x, q, dims)):
      s = jnp.where(valid[:, None], dot * x_inv[j][:, None], -jnp.inf)  # [Nc, Qc]
      m = jnp.max(s, axis=0)
      # The lowest row reaching the max: ties go to the lower index.
      chunk_i.append(jnp.min(jnp.where(s == m, rows, jnp.iinfo(jnp.int32).max), axis=0))
      chunk_s.append(m)
    chunk_s, chunk_i = jnp.stack(chunk_s), jnp.stack(chunk_i)  # [D, Qc]
    better = chunk_s > best_s  # strict: on ties the earlier chunk wins
    return (jnp.where(better, chunk_s, best_s), jnp.where(better, chunk_i, best_i)), None
  return step


def _topk_step(q, dims, k):
  """Scan step keeping a running top-k per (dim, query): carry [D, Qc, k] x 2."""
  def step(carry, chunk):
    top_s, top_i = carry
    x, x_inv, valid, start = chunk
    chunk_s, chunk_i = [], []
    for j, dot in enumerate(_prefix_dots(q, x, dims)):
      s = jnp.where(valid[None, :], dot * x_inv[j][None, :], -jnp.inf)  # [Qc, Nc]
      s, i = lax.top_k(s, min(k, x.shape[0]))  # equal scores: lower index first
      chunk_s.append(s)
      chunk_i.append(start + i)
    # Running top-k (earlier rows) first, so on equal scores it wins.
    cand_s = jnp.concatenate([top_s, jnp.stack(chunk_s)], axis=-1)
    cand_i = jnp.concatenate([top_i, jnp.stack(chunk_i)], axis=-1)
    top_s, pos = lax.top_k(cand_s, k)
    return (top_s, jnp.take_along_axis(cand_i, pos, axis=-1)), None
  return step


@functools.partial(jax.jit, static_argnames=("dims", "k", "db_chunk", "query_chunk"))
def _search(queries, database, db_mask, *, dims, k, db_chunk, query_chunk):
  """Padded inputs: queries [nq*Qc, d], database [nc*Nc, d], db_mask [nc*Nc]."""
  num_dims, d = len(dims), database.shape[1]
  nc = database.shape[0] // db_chunk
  db_chunks = (
      database.reshape(nc, db_chunk, d),
      _prefix_inv_norms(database, dims).reshape(num_dims, nc, db_chunk).transpose(1, 0, 2),
      db_mask.reshape(nc, db_chunk),
      jnp.arange(nc, dtype=jnp.int32) * db_chunk)  # index of each chunk's first row

  def search(q):  # [Qc, d] -> scores, indices [D, Qc, k]
    shape = (num_dims, q.shape[0]) + (() if k == 1 else (k,))
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.full(shape, -1, jnp.int32))
    step = _top1_step(q, dims) if k == 1 else _topk_step(q, dims, k)
    (top_s, top_i), _ = lax.scan(step, init, db_chunks)
    top_s, top_i = top_s.reshape(num_dims, -1, k), top_i.reshape(num_dims, -1, k)
    top_i = jnp.where(top_s == -jnp.inf, -1, top_i)  # padding / fewer than k rows
    # Dividing by |q[:m]| does not change a query's ranking, so it is done
    # once here instead of on every score.
    return top_s * _prefix_inv_norms(q, dims)[:, :, None], top_i

  nq = queries.shape[0] // query_chunk
  scores, indices = lax.map(search, queries.reshape(nq, query_chunk, d))  # [nq, D, Qc, k]
  def merge(a):
    return a.transpose(1, 0, 2, 3).reshape(num_dims, nq * query_chunk, k)
  return merge(scores), merge(indices)


def knn_search(queries, database, dims: Sequence[int], k: int, *,
               db_chunk: int | None = None, query_chunk: int | None = None,
               db_mask=None):
  """Exact top-k cosine neighbours of each query at every prefix dim.

  Args:
    queries: [Q, d] embeddings (unnormalised; each prefix is normalised here).
    database: [N, d] embeddings.
    dims: strictly increasing prefix sizes, e.g. `eval_dims(nesting_dims)`.
    k: neighbours per query.
    db_chunk, query_chunk: rows per streamed block. None picks what measured
      fastest on CPU: 512 x 256 for k = 1 (the block stays in cache), 8192 x
      1024 for k > 1 (fewer merges of the running top-k).
    db_mask: optional [N] bool/0-1; rows with 0 (padding) are never returned.

  Returns:
    scores [D, Q, k] float32 cosines, best first, and indices [D, Q, k] int32
    database rows; ties go to the lower index. Slots with no valid row left
    (k > number of valid rows) have score -inf and index -1.
  """
  queries = jnp.asarray(queries, jnp.float32)
  database = jnp.asarray(database, jnp.float32)
  if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
    raise ValueError(f"kNN needs queries [Q, d] and database [N, d], got "
                     f"{queries.shape} and {database.shape}.")
  dims = _check_dims(dims, database.shape[1])
  k = int(k)
  if k < 1:
    raise ValueError(f"kNN k={k} must be >= 1.")
  num_q, n = queries.shape[0], database.shape[0]
  db_mask = (jnp.ones((n,), bool) if db_mask is None
             else jnp.asarray(db_mask).astype(bool).reshape(n))
  default_db_chunk, default_query_chunk = _DEFAULT_CHUNKS[k == 1]
  db_chunk = max(1, min(db_chunk or default_db_chunk, n))
  query_chunk = max(1, min(query_chunk or default_query_chunk, num_q))

  def pad_to(x, multiple):
    return jnp.pad(x, [(0, -x.shape[0] % multiple)] + [(0, 0)] * (x.ndim - 1))

  scores, indices = _search(
      pad_to(queries, query_chunk), pad_to(database, db_chunk),
      pad_to(db_mask, db_chunk), dims=dims, k=k, db_chunk=db_chunk,
      query_chunk=query_chunk)
  return scores[:, :num_q], indices[:, :num_q]


# ----------------------------------------------------------------------------
# Accuracy from neighbours.
# ----------------------------------------------------------------------------
def majority_vote(neighbor_labels: np.ndarray) -> np.ndarray:
  """[..., k] labels, nearest first (-1 = no neighbour) -> [...] predictions.

  The most frequent label wins; a tie goes to the tied label whose nearest
  neighbour is closest. Counting each neighbour's label among the k needs no
  class count and argmax returns the first (nearest) maximum.
  """
  labels = np.asarray(neighbor_labels)
  votes = (labels[..., :, None] == labels[..., None, :]).sum(-1)  # [..., k]
  votes = np.where(labels < 0, -1, votes)
  return np.take_along_axis(labels, votes.argmax(-1)[..., None], axis=-1)[..., 0]


def knn_accuracy(indices, db_labels, query_labels, dims: Sequence[int], k: int = 1,
                 *, query_mask=None, query_chunk: int = 4096) -> dict[int, float]:
  """{dim: accuracy} of the majority vote of the first k neighbours.

  `indices` [D, Q, >= k] from `knn_search` (nearest first); k = 1 is 1-NN.
  `query_mask` [Q] excludes padding queries. Correct counts are integers, so
  the fractions are exact.
  """
  indices = np.asarray(indices)[..., :k]
  db_labels, query_labels = np.asarray(db_labels), np.asarray(query_labels)
  if indices.shape[0] != len(dims):
    raise ValueError(f"indices has {indices.shape[0]} dims, dims={list(dims)}.")
  valid = np.ones(indices.shape[1], bool) if query_mask is None else np.asarray(query_mask, bool)
  correct = np.zeros(len(dims), np.int64)
  # Chunked over queries: the vote compares all k x k neighbour pairs.
  for start in range(0, indices.shape[1], query_chunk):
    sl = slice(start, start + query_chunk)
    idx = indices[:, sl]
    neighbor_labels = np.where(idx >= 0, db_labels[np.maximum(idx, 0)], -1)
    pred = neighbor_labels[..., 0] if k == 1 else majority_vote(neighbor_labels)
    correct += ((pred == query_labels[sl]) & valid[sl]).sum(-1)
  total = max(int(valid.sum()), 1)
  return {int(m): int(c) / total for m, c in zip(dims, correct)}


def knn_classify(queries, query_labels, database, db_labels, dims: Sequence[int],
                 k: int = 1, *, query_mask=None, db_mask=None,
                 **search_kwargs) -> dict[int, float]:
  """kNN (majority vote of k) accuracy per dim: search + `knn_accuracy`."""
  _, indices = knn_search(queries, database, dims, k, db_mask=db_mask, **search_kwargs)
  return knn_accuracy(indices, db_labels, query_labels, dims, k, query_mask=query_mask)


def knn_top1(queries, query_labels, database, db_labels, dims: Sequence[int],
             **kwargs) -> dict[int, float]:
  """1-NN accuracy per dim (the paper's kNN top-1)."""
  return knn_classify(queries, query_labels, database, db_labels, dims, 1, **kwargs)
