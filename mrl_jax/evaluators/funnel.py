"""Adaptive retrieval (the funnel), MRL paper §5.

The nested prefixes make the extra dimensions incremental (z[:16] contains
z[:8]), so a shortlist found cheaply at a small dim can be re-ranked at
larger ones.

`funnel_search` runs an exact search at a small dim d_0 for a shortlist of
K_0 rows, then re-ranks the previous shortlist at each later dim d_i keeping
K_i rows, and returns the first k of the last ranking. Scores are
cosines with each prefix L2-normalised on its own, as in `knn.py`; ties go to
the lower database row. Cost per query in multiply-adds (MACs):

    N_db * d_0 + sum_{i >= 1} K_{i-1} * d_i      vs exact:  N_db * d,

reported in MFLOPs with the convention 1 MAC = 2 FLOPs (normalisation, which
is O(K) per stage, and the top-k selection are not counted). With a FAISS index (`ann.py`) as the
first stage, it is timed against FAISS's exact search.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
import time

import numpy as np

from mrl_jax import prefix
from mrl_jax.evaluators import ann
from mrl_jax.evaluators import base
from mrl_jax.evaluators import knn
from mrl_jax.evaluators import retrieval

# Float32 bytes of gathered rows re-ranked at once (bounds the funnel's memory).
_RERANK_BYTES = 64 << 20


def _check_stages(stages, d: int, num_db: int, field: str = "stages") -> list[tuple[int, int]]:
  """[(dim, shortlist)] as ints, shortlists capped at the database size."""
  try:
    out = [(int(m), int(size)) for m, size in stages]
  except (TypeError, ValueError):
    out = None
  if not out or any(not 1 <= m <= d or size < 1 for m, size in out):
    raise ValueError(f"{field}={stages!r} must be a non-empty list of (dim, shortlist size) "
                     f"pairs with 1 <= dim <= {d} (the embedding size) and size >= 1, "
                     "e.g. [(8, 200), (16, 100), (32, 50), (64, 25)].")
  out = [(m, min(size, num_db)) for m, size in out]
  for (_, before), (m, size) in zip(out, out[1:]):
    if size > before:
      raise ValueError(f"{field}={stages!r}: the stage at dim {m} keeps {size} rows but "
                       f"re-ranks a shortlist of only {before}. Fix: make the shortlist "
                       "sizes non-increasing.")
  return out


def _rerank(queries, database, shortlist, m: int, size: int) -> np.ndarray:
  """Top `size` of each query's shortlist [Q, K] by cosine at prefix dim m -> [Q, size]."""
  num_q, k_prev = shortlist.shape
  out = np.empty((num_q, size), np.int32)
  step = max(1, _RERANK_BYTES // (4 * k_prev * m))
  for start in range(0, num_q, step):
    sl = slice(start, start + step)
    rows = np.sort(shortlist[sl], axis=1)  # index order: the stable sort keeps ties low
    x = database[rows, :m]  # [q, K, m]
    # Dividing by the query's norm would not change its ranking.
    dots = np.matmul(x, queries[sl, :m, None])[..., 0]
    s = dots / np.sqrt(np.maximum(np.einsum("qkm,qkm->qk", x, x), prefix.SQ_NORM_EPS))
    order = np.argsort(-s, axis=1, kind="stable")[:, :size]
    out[sl] = np.take_along_axis(rows, order, axis=1)
  return out


def funnel_search(queries, database, stages, k: int, *, field: str = "stages",
                  **search_kwargs) -> np.ndarray:
  """Indices [Q, k] of the funnel's k nearest rows per query (module docstring).

  Args:
    queries: [Q, d]; database: [N, d] (unnormalised; every prefix is
      normalised on its own).
    stages: [(d_0, K_0), (d_1, K_1), ...]: exact search at d_0 for K_0 rows,
      then each stage re-ranks the previous shortlist at d_i and keeps K_i.
      Sizes above N mean the whole database; they must not increase.
    k: rows returned, <= the last shortlist.
    field: name used in error messages (e.g. config.evals.<name>.funnels).
    search_kwargs: passed to the first stage's `knn.knn_search` (db_chunk, mesh, ...).
  """
  queries = np.asarray(queries, np.float32)
  database = np.asarray(database, np.float32)
  if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
    raise ValueError(f"funnel needs queries [Q, d] and database [N, d], got "
                     f"{queries.shape} and {database.shape}.")
  stages = _check_stages(stages, database.shape[1], database.shape[0], field)
  if not 1 <= int(k) <= stages[-1][1]:
    raise ValueError(f"funnel k={k} must be in [1, {stages[-1][1]}], the last shortlist "
                     f"of {field}={stages}.")
  (d0, k0), rest = stages[0], stages[1:]
  _, shortlist = knn.knn_search(queries, database, [d0], k0, **search_kwargs)
  return _rerank_stages(queries, database, shortlist[0], rest)[:, :int(k)]


def _rerank_stages(queries, database, shortlist, stages) -> np.ndarray:
  """The funnel after its first stage: re-rank at each (dim, size) in turn."""
  for m, size in stages:
    shortlist = _rerank(queries, database, shortlist, m, size)
  return shortlist


def single_shortlist_search(queries, database, shortlist_dim: int, shortlist_size: int,
                            rerank_dim: int, k: int, **kwargs) -> np.ndarray:
  """The paper's two-stage funnel: K rows at shortlist_dim, re-ranked at rerank_dim."""
  return funnel_search(queries, database, [(shortlist_dim, shortlist_size), (rerank_dim, k)],
                       k, **kwargs)


def funnel_mflops(num_db: int, stages, final_dim: int | None = None) -> tuple[float, float]:
  """(funnel, exact) MFLOPs per query, 1 multiply-add = 2 FLOPs.

  funnel = 2 (N_db d_0 + sum_{i>=1} K_{i-1} d_i) / 1e6 and exact =
  2 N_db final_dim / 1e6 (final_dim: the exact search's dim, default the
  last stage's). Shortlists above N_db count as N_db, as in `funnel_search`.
  """
  dims = [int(m) for m, _ in stages]
  final_dim = max(dims) if final_dim is None else int(final_dim)
  stages = _check_stages(stages, max(final_dim, *dims), int(num_db))
  macs = num_db * stages[0][0] + sum(before * m for (_, before), (m, _) in zip(stages, stages[1:]))
  return 2 * macs / 1e6, 2 * num_db * final_dim / 1e6


def _timed(fn, warmup: bool):
  if warmup:
    fn()  # compiles the exact search for these shapes
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def funnel_metrics(query_emb, query_labels, db_emb, db_labels,
                   funnels: Mapping[str, Sequence[tuple[int, int]]],
                   ks: Sequence[int] = (10,), *, warmup: bool = True,
                   field: str = "funnels", index: str | None = None,
                   index_options=None, **search_kwargs) -> dict[str, dict[str, float]]:
  """Retrieval quality, cost and time of each funnel against exact full-dim search.

  Returns {name: {'map@k', 'precision@k', 'recall@k' (for k in ks),
  'knn_top1', 'mflops_per_query', 'flops_reduction_vs_exact', 'seconds',
  'speedup_vs_exact'}} for every funnel and for 'exact' (`knn.knn_search`
  at the full dim d). Metrics are those of `retrieval.retrieval_metrics` and
  `knn.knn_accuracy` on the funnel's top max(ks). 'seconds' is the wall time
  of one search over all queries, after an untimed warm-up run that compiles
  it (warmup=False times the first run).

  With `index` ('hnsw' or 'ivf', options `index_options`: `ann.INDEXES`)
  each funnel's first stage is a FAISS index at its dim, and 'exact' is
  FAISS's exact `IndexFlatIP` at the full dim (`ann_metrics`).
  """
  if index is not None:
    return ann_metrics(query_emb, query_labels, db_emb, db_labels, funnels, ks,
                       index=index, options=index_options, field=field)
  db_emb = np.asarray(db_emb, np.float32)
  query_emb = np.asarray(query_emb, np.float32)
  num_db, d = db_emb.shape
  ks = retrieval.check_ks(ks, num_db, field="ks")
  runs = {"exact": [(d, ks[-1])], **_checked_funnels(funnels, d, num_db, ks[-1], field)}
  out = {}
  for name, stages in runs.items():
    seconds, idx = _timed(lambda s=stages: funnel_search(query_emb, db_emb, s, ks[-1],
                                                         **search_kwargs), warmup)
    row = _quality(idx, stages[-1][0], db_labels, query_labels, ks)
    row["mflops_per_query"], exact_mflops = funnel_mflops(num_db, stages, final_dim=d)
    row["flops_reduction_vs_exact"] = exact_mflops / row["mflops_per_query"]
    row["seconds"] = seconds
    row["speedup_vs_exact"] = out["exact"]["seconds"] / seconds if out else 1.0
    out[name] = row
  return out


def _checked_funnels(funnels, d: int, num_db: int, kmax: int, field: str):
  """{name: stages} checked, each keeping at least kmax rows at its end."""
  runs = {}
  for name, stages in funnels.items():
    if name == "exact":
      raise ValueError(f"{field}: 'exact' is the name of the reference search; rename it.")
    runs[name] = _check_stages(stages, d, num_db, f"{field}.{name}")
    if runs[name][-1][1] < kmax:
      raise ValueError(f"{field}.{name}={list(stages)} keeps {runs[name][-1][1]} rows at its "
                       f"last stage, fewer than max(ks)={kmax}. Fix: a last shortlist >= {kmax}.")
  return runs


def _quality(found, m: int, db_labels, query_labels, ks) -> dict[str, float]:
  """Retrieval metrics and 1-NN accuracy of neighbours found [Q, >= max(ks)] at dim m."""
  metrics = retrieval.retrieval_metrics(found[None], db_labels, query_labels, [m], ks)
  row = {metric: per_dim[m] for metric, per_dim in metrics.items()}
  row["knn_top1"] = knn.knn_accuracy(found[None], db_labels, query_labels, [m], k=1)[m]
  return row


def ann_metrics(query_emb, query_labels, db_emb, db_labels, funnels, ks=(10,), *,
                index: str, options=None, field: str = "funnels") -> dict[str, dict[str, Any]]:
  """`funnel_metrics` with each funnel's shortlist from a FAISS index.

  Rows as `funnel_metrics`' plus 'first_stage' (the index), 'recall_of_exact'
  (the share of the exact top max(ks) found), 'distances_per_query'
  (vectors scored: the index's count at the first dim, then each re-ranked
  shortlist), 'build_seconds' (the index, not in 'seconds') and
  'first_stage_seconds' (the index search, in 'seconds'). MFLOPs
  count 2 per multiply-add of those distances.
  """
  options = ann.check_index(index, options, field)
  db_emb = np.asarray(db_emb, np.float32)
  query_emb = np.asarray(query_emb, np.float32)
  num_db, d = db_emb.shape
  ks = retrieval.check_ks(ks, num_db, field="ks")
  kmax = ks[-1]
  runs = _checked_funnels(funnels, d, num_db, kmax, field)
  reference = ann.exact(query_emb, db_emb, kmax)
  indexes = {}  # one index per first-stage dim, shared by the funnels starting there
  out = {}
  for name, stages in {"exact": [(d, kmax)], **runs}.items():
    if name == "exact":
      found, seconds, build = reference.indices, reference.seconds, reference.build_seconds
      distances, mflops = float(num_db), 2 * num_db * d / 1e6
      first, first_seconds = "flat (exact)", seconds
    else:
      (d0, k0), rest = stages[0], stages[1:]
      if d0 not in indexes:
        indexes[d0] = ann.build(db_emb, d0, index, options)
      shortlist = ann.search(indexes[d0], query_emb, k0)
      start = time.perf_counter()
      found = _rerank_stages(query_emb, db_emb, shortlist.indices.astype(np.int32), rest)
      seconds = shortlist.seconds + time.perf_counter() - start
      build, first, first_seconds = shortlist.build_seconds, index, shortlist.seconds
      later = [before for (_, before), _ in zip(stages, stages[1:])]
      distances = shortlist.distances_per_query + sum(later)
      mflops = 2 * (shortlist.distances_per_query * d0
                    + sum(b * m for b, (m, _) in zip(later, rest))) / 1e6
    found = np.asarray(found)[:, :kmax]
    row = _quality(found, stages[-1][0], db_labels, query_labels, ks)
    row["recall_of_exact"] = float(np.mean([
        len(np.intersect1d(a, b)) / kmax for a, b in zip(found, reference.indices)]))
    row["first_stage"] = first
    row["distances_per_query"] = distances
    row["mflops_per_query"] = mflops
    row["flops_reduction_vs_exact"] = 2 * num_db * d / 1e6 / mflops
    row["seconds"], row["build_seconds"] = seconds, build
    row["first_stage_seconds"] = first_seconds  # the rest is the exact re-ranking
    row["speedup_vs_exact"] = reference.seconds / seconds
    out[name] = row
  return out


def default_funnels(nesting_dims, k: int = 10, first: int = 200) -> dict[str, list[list[int]]]:
  """The paper's two funnels on these nesting dims.

  'single': shortlist `first` rows at the smallest dim, re-rank at the full
  dim. 'multi': shortlist `first` at the smallest dim, then re-rank at every
  larger nesting dim keeping half as many rows each time (never fewer than
  k), the full dim keeping k. The paper's funnel keeps 200 -> 100 -> 50 ->
  25 -> 10 rows at 16 -> 32 -> 64 -> 128 -> 256 -> 2048 dims; on those dims
  this rule gives the same except 12 rows (not 10) at 256. Sizes above the
  database size mean the whole database.
  """
  dims = sorted(int(m) for m in nesting_dims)
  funnels = {"single": [[dims[0], max(first, k)], [dims[-1], k]]}
  if len(dims) > 2:
    funnels["multi"] = ([[m, max(first >> i, k)] for i, m in enumerate(dims[:-1])]
                        + [[dims[-1], k]])
  return funnels


_INDEX_OPTIONS = tuple(sorted({o for opts in ann.INDEXES.values() for o in opts}))


class Funnel(base.Evaluator):
  """Funnel retrieval vs exact full-dim search (`funnel_metrics`).

  Options: funnels {name: [(dim, shortlist), ...]} (default
  `default_funnels`), ks=[10]; index='hnsw' | 'ivf' with its options
  (`ann.INDEXES`) for a FAISS first stage timed against FAISS's exact
  search; db_chunk for the brute-force one. Queries = eval split, database
  = train split. Section 'funnel': {name: {map@k, precision@k, recall@k,
  knn_top1, mflops_per_query, flops_reduction_vs_exact, seconds,
  speedup_vs_exact, stages}} with the reference search as 'exact'.
  """
  splits = ("eval", "train")
  section = "funnel"
  option_names = ("funnels", "ks", "index", "db_chunk", *_INDEX_OPTIONS)

  def __init__(self, options, context, field):
    super().__init__(options, context, field)
    num_db = context.num_train
    ks = options.get("ks", [10])
    self.ks = retrieval.check_ks(ks if isinstance(ks, (list, tuple)) else [ks], num_db,
                                 field=f"{field}.ks")
    self.funnels = self._funnels(options.get("funnels"), num_db or 2**62)
    self.index = options.get("index")
    self.index_options = {}
    if self.index is not None:
      self.index_options = ann.check_index(
          self.index, {k: v for k, v in options.items() if k in _INDEX_OPTIONS}, field)
    self.db_chunk = options.get("db_chunk")

  def _funnels(self, funnels, num_db: int) -> dict[str, list[tuple[int, int]]]:
    """{name: [(dim, size)]}, checked against the embedding and the database."""
    field, nesting = self.field, self.context.nesting_dims
    if funnels is None:
      if len(nesting) < 2:
        raise ValueError(f"{field}.type='funnel' re-ranks a shortlist from a small dim at "
                         f"larger ones, but there is one nesting dim only ({list(nesting)}). "
                         f"Set {field}.funnels explicitly or use nesting dims like "
                         "[8, 16, 32, 64].")
      funnels = default_funnels(nesting, self.ks[-1])
    if not hasattr(funnels, "items") or not funnels:
      raise ValueError(f"{field}.funnels={funnels!r} must be a dict name -> stages, e.g. "
                       "{'single': [(8, 200), (64, 10)]}.")
    out = {}
    for name, stages in funnels.items():
      if name == "exact":
        raise ValueError(f"{field}.funnels.exact: 'exact' names the reference full-dim "
                         "search; rename this funnel.")
      # Dims within [1, d], sizes >= 1 and non-increasing.
      checked = _check_stages(stages, self.context.embedding_size, num_db,
                              f"{field}.funnels.{name}")
      if checked[-1][1] < self.ks[-1]:
        raise ValueError(f"{field}.funnels.{name}={base.plain(stages)} keeps "
                         f"{checked[-1][1]} rows at its last stage, fewer than "
                         f"max({field}.ks)={self.ks[-1]}. Fix: a last shortlist >= "
                         f"{self.ks[-1]}.")
      out[str(name)] = checked
    return out

  def run(self, data):
    db, q = data.train, data.eval
    num_db = len(db["label"])
    # Shortlists capped at the database size (known now if it was not before).
    funnels = {name: [(m, min(size, num_db)) for m, size in stages]
               for name, stages in self.funnels.items()}
    kw = (dict(index=self.index, index_options=self.index_options) if self.index
          else dict(db_chunk=self.db_chunk))
    rows = funnel_metrics(q["embedding"], q["label"], db["embedding"], db["label"], funnels,
                          self.ks, field=f"{self.field}.funnels", **kw)
    d = db["embedding"].shape[1]
    for name, row in rows.items():
      row["stages"] = ([[d, self.ks[-1]]] if name == "exact"
                       else [list(s) for s in funnels[name]])
    return {}, {"funnel": rows}
