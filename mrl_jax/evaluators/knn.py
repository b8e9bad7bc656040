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
broken by the lower database index everywhere.

k = 1 streams 512-row blocks that stay in cache and keeps, per (dim, query),
the best group of 16 consecutive rows (a max over group maxima); the row is
found at the end by rescoring that group. k > 1 spends its time in
`lax.top_k`, whose CPU kernel is single-threaded and costs ~4 ns per input
element plus 15-25 us per row at k = 100, so it is fed as little as possible:
each database chunk is scored in cache-sized sub-blocks (scores kept,
[D, Qc, Nc]) and the max of every group of 16 consecutive rows is taken on
the fly. The chunk's top-k rows lie in its top-k groups (ranked by group max,
ties to the lower group): a row outside them would have k groups ahead of it,
each holding a row that ranks above it. So one `top_k` over the Nc/16 group
maxima, a gather of the k*16 rows of those groups and one `top_k` over them
(merged with the running top-k) give the exact top-k. With the default chunk
(as many rows as a 256 MiB score buffer holds) a 60k database is one chunk.

This is one XLA program on every backend. On a CPU, XLA cannot fuse the
chunk matmuls with the per-dim reductions, so it writes and re-reads a score
block per dim; `benchmarks/knn.py` times it against FAISS's exact search at
the full dim.

Queries and database are both split over the devices (`mesh`, default: all
of them). Each device searches its queries against its own database shard,
then against the next device's, the shards travelling around the ring of
devices (`_ring_search`) and the running top-k merged at every step (ties to
the lower row): a device holds two database shards at a time, so the
database can be as large as the devices' memory together.
"""
from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import NamedTuple

import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from mrl_jax import prefix
from mrl_jax import sharding
from mrl_jax.evaluators import base

# k = 1: (db_chunk, query_chunk) that keep one block in cache.
_TOP1_CHUNKS = (512, 256)
# k > 1: rows per group of the top-k prefilter, rows scored at once (all dims)
# and queries per block. The database chunk is as many rows as a score buffer
# of _TOPK_BUFFER_BYTES per device holds (see knn_search).
_GROUP = 16
_SUB_BLOCK = 1024
_TOPK_QUERY_CHUNK = 64
_TOPK_BUFFER_BYTES = 256 << 20


eval_dims = prefix.eval_dims  # the dims every evaluator reports


def _check_dims(dims, d: int) -> tuple[int, ...]:
  dims = tuple(int(m) for m in dims)
  if not dims or any(b <= a for a, b in zip(dims, dims[1:])) or dims[0] < 1 or dims[-1] > d:
    raise ValueError(
        f"kNN dims={list(dims)} must be strictly increasing ints in [1, {d}] "
        f"({d} = the embedding size); e.g. eval_dims(config.mrl.nesting_dims), "
        "whose last dim is the embedding size.")
  return dims


def _prefix_dots(a, b, dims):
  """Yields a[:, :m] @ b[:, :m].T [n_a, n_b] for m in dims (`prefix.prefix_dots`)."""
  # HIGHEST: TPUs would otherwise multiply float32 in bf16 passes, and an
  # exact search must rank the same on every backend.
  return prefix.prefix_dots(a, b, dims, precision=lax.Precision.HIGHEST)


def _top1_step(q, dims, group):
  """Scan step keeping the best group of rows per (dim, query): carry [D, Qc] x 2.

  Only the group (of `group` consecutive rows) holding the best row is
  tracked; `_best_in_group` finds the row. Finding the lowest row at the max
  directly costs a second pass over every score; this one is over the group
  maxima only.
  """
  def step(carry, chunk):
    best_s, best_g = carry
    x, x_inv, valid, start = chunk
    num_groups = x.shape[0] // group
    groups = start // group + jnp.arange(num_groups, dtype=jnp.int32)[:, None]  # [G, 1]
    chunk_s, chunk_g = [], []
    # Scores are laid out [Nc, Qc] so that the reductions run over the major
    # axes and vectorise along queries; on CPU this is several times faster
    # than argmax or top_k along the last axis.
    for j, dot in enumerate(_prefix_dots(x, q, dims)):
      s = jnp.where(valid[:, None], dot * x_inv[j][:, None], -jnp.inf)  # [Nc, Qc]
      group_max = jnp.max(s.reshape(num_groups, group, -1), axis=1)  # [G, Qc]
      m = jnp.max(group_max, axis=0)
      # The lowest group reaching the max holds the lowest row reaching it.
      chunk_g.append(jnp.min(jnp.where(group_max == m, groups, jnp.iinfo(jnp.int32).max),
                             axis=0))
      chunk_s.append(m)
    chunk_s, chunk_g = jnp.stack(chunk_s), jnp.stack(chunk_g)  # [D, Qc]
    better = chunk_s > best_s  # strict: on ties the earlier chunk wins
    return (jnp.where(better, chunk_s, best_s), jnp.where(better, chunk_g, best_g)), None
  return step


def _best_in_group(q, database, inv, db_mask, best_g, dims, group):
  """Rescores the rows of each (dim, query)'s best group: scores, rows [D, Qc]."""
  out_s, out_i = [], []
  for j, m in enumerate(dims):
    rows = jnp.maximum(best_g[j], 0)[:, None] * group + jnp.arange(group)  # [Qc, g]
    x = database[rows, :m]  # [Qc, g, m]
    acc = 0.0
    for lo, hi in prefix.chunks(dims[:j + 1]):  # chunk by chunk, as _prefix_dots
      acc = acc + jnp.einsum("qgc,qc->qg", x[..., lo:hi], q[:, lo:hi],
                             precision=lax.Precision.HIGHEST)
    s = jnp.where(db_mask[rows], acc * inv[j][rows], -jnp.inf)
    pos = jnp.argmax(s, axis=-1)  # the first max: the lowest row
    out_s.append(jnp.take_along_axis(s, pos[:, None], axis=-1)[:, 0])
    out_i.append(jnp.take_along_axis(rows, pos[:, None], axis=-1)[:, 0].astype(jnp.int32))
  return jnp.stack(out_s), jnp.stack(out_i)


def _blocking(db_chunk: int) -> tuple[int, int]:
  """(group, sub_block) for a chunk: group | sub_block | db_chunk, sub_block <= _SUB_BLOCK."""
  group = int(np.gcd(db_chunk, _GROUP))
  per_chunk = db_chunk // group
  sub = max(n for n in range(1, max(1, _SUB_BLOCK // group) + 1) if per_chunk % n == 0)
  return group, sub * group


def _topk_step(q, dims, k, group, sub_block):
  """Scan step keeping a running top-k per (dim, query): carry [D, Qc, k] x 2."""
  num_dims, qc = len(dims), q.shape[0]
  per_sub = sub_block // group  # groups per sub-block

  def score(_, block):  # one cache-sized sub-block, every dim
    x, x_inv, valid = block  # [Ns, d], [D, Ns], [Ns]
    s = jnp.stack([jnp.where(valid[None, :], dot * x_inv[j][None, :], -jnp.inf)
                   for j, dot in enumerate(_prefix_dots(q, x, dims))])  # [D, Qc, Ns]
    s = s.reshape(num_dims, qc, per_sub, group)
    return None, (s, jnp.max(s, axis=-1))

  def step(carry, chunk):
    top_s, top_i = carry
    x, x_inv, valid, start = chunk  # [Nc, d], [D, Nc], [Nc], []
    nsub = x.shape[0] // sub_block
    _, (s, group_max) = lax.scan(score, None, (
        x.reshape(nsub, sub_block, -1),
        x_inv.reshape(num_dims, nsub, sub_block).transpose(1, 0, 2),
        valid.reshape(nsub, sub_block)))  # s [nsub, D, Qc, per_sub, group]
    group_max = group_max.transpose(1, 2, 0, 3).reshape(num_dims, qc, nsub * per_sub)
    # The chunk's top-k rows lie in its top-k groups (module docstring).
    _, gid = lax.top_k(group_max, min(k, nsub * per_sub))  # [D, Qc, kg]
    gid = jnp.sort(gid, axis=-1)  # row order: equal scores stay in index order
    cand_s = s[gid // per_sub, jnp.arange(num_dims)[:, None, None],
               jnp.arange(qc)[None, :, None], gid % per_sub]  # [D, Qc, kg, group]
    cand_i = start + gid[..., None] * group + jnp.arange(group, dtype=jnp.int32)
    # Running top-k (earlier rows) first, so on equal scores it wins.
    cand_s = jnp.concatenate([top_s, cand_s.reshape(num_dims, qc, -1)], axis=-1)
    cand_i = jnp.concatenate([top_i, cand_i.reshape(num_dims, qc, -1)], axis=-1)
    top_s, pos = lax.top_k(cand_s, k)
    return (top_s, jnp.take_along_axis(cand_i, pos, axis=-1)), None
  return step


def _search(queries, database, db_mask, *, dims, k, db_chunk, query_chunk):
  """Padded inputs: queries [nq*Qc, d], database [nc*Nc, d], db_mask [nc*Nc]."""
  num_dims, d = len(dims), database.shape[1]
  nc = database.shape[0] // db_chunk
  inv = prefix.inv_norms(database, dims)  # [D, N]
  db_chunks = (
      database.reshape(nc, db_chunk, d),
      inv.reshape(num_dims, nc, db_chunk).transpose(1, 0, 2),
      db_mask.reshape(nc, db_chunk),
      jnp.arange(nc, dtype=jnp.int32) * db_chunk)  # index of each chunk's first row
  group, sub_block = _blocking(db_chunk)

  def search(q):  # [Qc, d] -> scores, indices [D, Qc, k]
    shape = (num_dims, q.shape[0]) + (() if k == 1 else (k,))
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.full(shape, -1, jnp.int32))
    step = (_top1_step(q, dims, group) if k == 1
            else _topk_step(q, dims, k, group, sub_block))
    (top_s, top_i), _ = lax.scan(step, init, db_chunks)
    if k == 1:
      top_s, top_i = _best_in_group(q, database, inv, db_mask, top_i, dims, group)
    top_s, top_i = top_s.reshape(num_dims, -1, k), top_i.reshape(num_dims, -1, k)
    top_i = jnp.where(top_s == -jnp.inf, -1, top_i)  # padding / fewer than k rows
    # Dividing by |q[:m]| does not change a query's ranking, so it is done
    # once here instead of on every score.
    return top_s * prefix.inv_norms(q, dims)[:, :, None], top_i

  nq = queries.shape[0] // query_chunk
  scores, indices = lax.map(search, queries.reshape(nq, query_chunk, d))  # [nq, D, Qc, k]
  def merge(a):
    return a.transpose(1, 0, 2, 3).reshape(num_dims, nq * query_chunk, k)
  return merge(scores), merge(indices)


def _merge(a_s, a_i, b_s, b_i, k):
  """The top k of two [D, Q, k] lists: higher score first, then lower row."""
  s = jnp.concatenate([a_s, b_s], axis=-1)
  i = jnp.concatenate([a_i, b_i], axis=-1)
  # 0 - s: -s would give -0.0 for a score of 0, which sorts before +0.0.
  key = jnp.where(i < 0, jnp.iinfo(jnp.int32).max, i)  # empty slots last
  neg, _, i = lax.sort((0.0 - s, key, i), dimension=-1, num_keys=2)
  return 0.0 - neg[..., :k], i[..., :k]


def _ring_search(queries, database, db_mask, *, axes, n, k, **static):
  """`_search` of this device's queries against every device's database shard.

  The shards travel around the devices (`sharding.ring`); each step's top-k
  (rows made global by the shard's offset) is merged into the running one,
  ties to the lower row. A device holds two shards at a time, never the
  whole database.
  """
  rows = database.shape[0]
  me = lax.axis_index(axes)

  def visit(s, best, shard, res):
    scores, idx = _search(queries, *shard, k=k, **static)
    owner = (me - s) % n  # at step s this device holds device (me - s)'s shard
    return _merge(*best, scores, jnp.where(idx >= 0, idx + owner * rows, -1), k), res

  shape = (len(static["dims"]), queries.shape[0], k)
  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.full(shape, -1, jnp.int32))
  return sharding.ring(visit, init, (database, db_mask), (), axes, n)[0]


@functools.lru_cache(maxsize=32)
def _sharded_search(mesh, **static):
  """The search with queries and database split over every axis of `mesh`,
  jitted once per setting: one device searches directly, more in a ring."""
  axes = mesh.axis_names
  n = mesh.devices.size
  search = (functools.partial(_search, **static) if n == 1 else
            functools.partial(_ring_search, axes=axes, n=n, **static))
  return jax.jit(jax.shard_map(
      search, mesh=mesh, in_specs=(P(axes),) * 3, out_specs=(P(None, axes),) * 2,
      check_vma=False))


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def knn_search(queries, database, dims: Sequence[int], k: int, *,
               db_chunk: int | None = None, query_chunk: int | None = None,
               db_mask=None, mesh: jax.sharding.Mesh | None = None,
               process_local: bool = False):
  """Exact top-k cosine neighbours of each query at every prefix dim.

  Args:
    queries: [Q, d] embeddings (unnormalised; each prefix is normalised here).
      Host arrays, the same on every process; with `process_local`, this
      process's rows only.
    database: [N, d] embeddings (the same, or this process's rows).
    dims: strictly increasing prefix sizes, e.g. `eval_dims(nesting_dims)`.
    k: neighbours per query.
    db_chunk, query_chunk: rows per streamed block. None picks what measured
      fastest on CPU: 512 x 256 for k = 1 (the block stays in cache); for
      k > 1, 64 queries and as many database rows as a 256 MiB score buffer
      [D, 64, db_chunk] holds (one chunk for 60k rows at 13 dims), rounded to
      whole 1024-row sub-blocks.
    db_mask: optional [N] bool/0-1; rows with 0 (padding) are never returned.
    mesh: devices to split the queries and the database over (all its
      axes); None = every device. Results do not depend on it.
    process_local: each process passes its own rows (a contiguous slice of
      the split, in process order, as `evaluate.embed_split` makes them): they
      go to its own devices, and no host ever holds the whole database.

  Returns:
    NumPy scores [D, Q, k] float32 cosines, best first, and indices [D, Q, k]
    int32 database rows; ties go to the lower index. Slots with no valid row
    left (k > number of valid rows) have score -inf and index -1. With
    `process_local`, Q, N and the indices are those of every process's rows
    concatenated in process order.
  """
  queries = np.asarray(queries, np.float32)
  database = np.asarray(database, np.float32)
  if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
    raise ValueError(f"kNN needs queries [Q, d] and database [N, d], got "
                     f"{queries.shape} and {database.shape}.")
  dims = _check_dims(dims, database.shape[1])
  k = int(k)
  if k < 1:
    raise ValueError(f"kNN k={k} must be >= 1.")
  n = database.shape[0]
  db_mask = (np.ones((n,), bool) if db_mask is None
             else np.asarray(db_mask).astype(bool).reshape(n))
  mesh = default_mesh() if mesh is None else mesh
  # Rows [queries, database] of each process: one block unless process-local.
  counts = np.array([[queries.shape[0], n]])
  if process_local and jax.process_count() > 1:
    _check_process_blocks(mesh)
    counts = np.asarray(multihost_utils.process_allgather(counts[0])).reshape(-1, 2)
  procs = len(counts)
  plan = search_plan(int(counts[:, 0].max()) * procs, int(counts[:, 1].max()) * procs,
                     len(dims), k, mesh.devices.size, platform=mesh.devices.flat[0].platform,
                     db_chunk=db_chunk, query_chunk=query_chunk)
  per_q, per_db = plan.num_queries // procs, plan.num_database // procs

  def place(x, rows):
    """x padded to `rows` per process, split over the mesh (rows in process order)."""
    x = np.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    sharded = NamedSharding(mesh, P(mesh.axis_names))
    if procs == 1:
      return jax.make_array_from_callback(x.shape, sharded, lambda idx: x[idx])
    return jax.make_array_from_process_local_data(sharded, x, (rows * procs,) + x.shape[1:])

  search = _sharded_search(mesh, dims=dims, k=k, db_chunk=plan.db_chunk,
                           query_chunk=plan.query_chunk)
  # Under our own mesh: a caller's context mesh (the trainer's, during a
  # periodic or --mode=eval evaluation) would clash with the shard_map's.
  with jax.set_mesh(mesh):
    scores, indices = search(place(queries, per_q), place(database, per_db),
                             place(db_mask, per_db))
  scores, indices = _to_host(scores), _to_host(indices)
  # Padded positions -> rows of the processes' rows concatenated.
  offsets = np.concatenate([[0], np.cumsum(counts[:, 1])[:-1]])
  indices = np.where(indices >= 0, offsets[indices // per_db] + indices % per_db, -1)
  keep = np.concatenate([p * per_q + np.arange(c) for p, c in enumerate(counts[:, 0])])
  return scores[:, keep], indices[:, keep].astype(np.int32)


def _check_process_blocks(mesh) -> None:
  """Process-local rows need each process's devices to be one run of the mesh."""
  owners = [d.process_index for d in mesh.devices.flat]
  if owners != sorted(owners):
    raise ValueError("knn_search(process_local=True) needs a mesh whose devices are "
                     "grouped by process (e.g. knn.default_mesh()); got processes "
                     f"{owners} in mesh order.")


def default_mesh(devices=None) -> jax.sharding.Mesh:
  """The 1-D mesh over `devices` (default: all) that queries are split over."""
  # Grouped by process, so that each process's rows go to its own devices
  # (`process_local`); otherwise the order does not matter.
  devices = sorted(jax.devices() if devices is None else list(devices),
                   key=lambda d: (d.process_index, d.id))
  return jax.sharding.Mesh(np.asarray(devices), ("queries",),
                           axis_types=(jax.sharding.AxisType.Auto,))


class SearchPlan(NamedTuple):
  """Blocking of one XLA search: rows per streamed block and padded sizes."""
  db_chunk: int
  query_chunk: int
  num_queries: int  # queries padded to whole query chunks on every shard
  num_database: int  # database rows padded to whole chunks on every shard


def search_plan(num_queries: int, num_database: int, num_dims: int, k: int,
                shards: int, *, db_chunk: int | None = None,
                query_chunk: int | None = None, platform: str = "cpu") -> SearchPlan:
  """The blocking `knn_search` uses (see its docstring for the defaults).

  Queries and database are both split over the `shards` devices; the chunk
  sizes are per device. On a TPU the score buffer's last axis (groups of
  16 rows) is padded to 128 lanes, so it gets 1/8 of the rows.
  """
  n = -(-max(num_database, 1) // shards)  # database rows per shard
  per_shard = -(-max(num_queries, 1) // shards)
  if k == 1:
    db_chunk = db_chunk or _TOP1_CHUNKS[0]
    query_chunk = query_chunk or _TOP1_CHUNKS[1]
  else:
    query_chunk = query_chunk or _TOPK_QUERY_CHUNK
    if not db_chunk:
      lanes = 128 // _GROUP if platform == "tpu" else 1
      rows = _TOPK_BUFFER_BYTES // (4 * num_dims * min(query_chunk, per_shard) * lanes)
      # As many rows as the buffer holds, in equal chunks (little padding).
      chunks = -(-n // max(_SUB_BLOCK, rows // _SUB_BLOCK * _SUB_BLOCK))
      db_chunk = -(-n // (chunks * _SUB_BLOCK)) * _SUB_BLOCK
  db_chunk = max(1, int(db_chunk))
  if db_chunk >= n:  # one chunk: pad the database to whole groups (sub-blocks) only
    unit = _SUB_BLOCK if k > 1 and n > _SUB_BLOCK else _GROUP
    db_chunk = -(-max(n, 1) // unit) * unit
  query_chunk = max(1, min(int(query_chunk), per_shard))
  per_shard = -(-per_shard // query_chunk) * query_chunk
  return SearchPlan(db_chunk, query_chunk, per_shard * shards,
                    max(1, -(-n // db_chunk)) * db_chunk * shards)


def search_program(mesh, d: int, dims, k: int, plan: SearchPlan):
  """(jitted search, abstract inputs) of `plan`'s padded sizes, for `--mode=compile`."""
  def spec(shape, dtype, partition):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, partition))
  search = _sharded_search(mesh, dims=tuple(dims), k=k, db_chunk=plan.db_chunk,
                           query_chunk=plan.query_chunk)
  axes = P(mesh.axis_names)
  return search, (spec((plan.num_queries, d), jnp.float32, axes),
                  spec((plan.num_database, d), jnp.float32, axes),
                  spec((plan.num_database,), jnp.bool_, axes))


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


class Knn(base.Evaluator):
  """knn_top1 (1-NN) and knn{k}_top1 (majority vote of the k nearest; a tie
  goes to the tied label with the nearest neighbour) for option k=[1, 5, ...]."""
  splits = ("eval", "train")
  option_names = ("k",)

  def __init__(self, options, context, field):
    super().__init__(options, context, field)
    k = options.get("k", [1])
    ks = base.check_ks(k if isinstance(k, (list, tuple)) else [k], context.num_train,
                            field=f"{field}.k")
    self.ks = sorted(set(ks) | {1})

  @property
  def neighbours(self):
    return self.ks[-1]

  def run(self, data):
    dims = self.context.eval_dims
    indices = data.neighbours(dims, self.ks[-1])
    return {("knn_top1" if k == 1 else f"knn{k}_top1"):
            knn_accuracy(indices, data.train["label"], data.eval["label"], dims, k=k)
            for k in self.ks}
