"""Adaptive classification (cascade) and adaptive retrieval (funnel), MRL paper §4.2 / §5.

Both spend few dimensions on easy inputs and more only where needed; the
nested prefixes make the extra dimensions incremental (z[:16] contains z[:8]).

Cascade. A model with heads at dims m_1 < ... < m_M (logits [M, N, C]) tries
the smallest head first: an example is classified at the first dim m_i whose
confidence (max softmax probability) is >= t_i, else at m_M. Its cost is the
dim it is classified at; `expected_dims` is the mean cost over examples (the
paper's "expected representation size").

The thresholds t_1 .. t_{M-1} are chosen on a random holdout part of the eval
split and then applied to the rest (repeated over seeds). The search is a
greedy descent over a per-dim grid of candidate thresholds: start with every
t_i above 1 (all examples at m_M: the most accurate and most expensive point),
then repeatedly lower the one threshold whose next grid value saves dims at
the smallest loss of holdout accuracy per dim saved (a move that changes no
example is taken for free), until every threshold is at its lowest value. The
visited points trace accuracy against expected dims; for each budget B the
point with the best holdout accuracy among those with holdout expected dims
<= B is applied to the test part. A full grid over M-1 thresholds would be
G^(M-1) points; the greedy path has at most G (M-1). The grid is per-dim
quantiles of the holdout confidences (plus 0), or fixed values.

Funnel. `funnel_search` runs an exact search at a small dim d_0 for a
shortlist of K_0 rows, then re-ranks the previous shortlist at each later dim
d_i keeping K_i rows, and returns the first k of the last ranking. Scores are
cosines with each prefix L2-normalised on its own, as in `knn.py`; ties go to
the lower database row. Cost per query in multiply-adds (MACs):

    N_db * d_0 + sum_{i >= 1} K_{i-1} * d_i      vs exact:  N_db * d,

reported in MFLOPs with the convention 1 MAC = 2 FLOPs (normalisation, which
is O(K) per stage, and the top-k selection are not counted).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
import math
import time

import numpy as np

from mrl_jax import prefix
from mrl_jax.evaluators import ann
from mrl_jax.evaluators import knn
from mrl_jax.evaluators import retrieval

DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_GRID = 40          # per-dim quantiles of the holdout confidences
DEFAULT_TOLERANCE = 0.005  # "within 0.5 pt of the full-dim accuracy"
# Float32 bytes of gathered rows re-ranked at once (bounds the funnel's memory).
_RERANK_BYTES = 64 << 20


# ----------------------------------------------------------------------------
# Cascade.
# ----------------------------------------------------------------------------
def confidences(logits, *, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Logits [M, N, C] -> (confidence [M, N] float64 = max softmax prob, argmax [M, N])."""
  logits = np.asarray(logits)
  if logits.ndim != 3:
    raise ValueError(f"logits must be [M, N, C] (one slice per head dim), got {logits.shape}.")
  conf = np.empty(logits.shape[:2], np.float64)
  pred = np.empty(logits.shape[:2], np.int64)
  for start in range(0, logits.shape[1], chunk):  # float64 copies one chunk at a time
    sl = slice(start, start + chunk)
    x = logits[:, sl].astype(np.float64)
    top = x.max(-1, keepdims=True)
    conf[:, sl] = 1.0 / np.exp(x - top).sum(-1)  # exp(top - top) / sum
    pred[:, sl] = x.argmax(-1)  # the first max, as classification.py's top_k
  return conf, pred


def _check_thresholds(thresholds, num_dims: int) -> np.ndarray:
  t = np.asarray(thresholds, np.float64)
  if t.ndim == 0:
    t = np.full(num_dims - 1, float(t))
  if t.shape != (num_dims - 1,):
    raise ValueError(f"thresholds must be a scalar or one per dim except the last "
                     f"({num_dims - 1} values), got shape {t.shape}.")
  return t


def _exit_stage(conf, thresholds) -> np.ndarray:  # [M, N], [M-1] -> [N] in [0, M)
  passed = conf[:-1] >= thresholds[:, None]
  passed = np.concatenate([passed, np.ones((1, conf.shape[1]), bool)])
  return passed.argmax(0)  # the first dim confident enough; the last one always is


def cascade_predict(logits, thresholds, dims: Sequence[int] | None = None):
  """Classifies each example at the first dim whose confidence >= its threshold.

  Args:
    logits: [M, N, C], one slice per head dim, smallest dim first.
    thresholds: [M-1] (t_i for dims 1 .. M-1; the last dim takes the rest) or
      one scalar for all. 0 sends everything to the smallest dim, > 1 to the last.
    dims: the M head dims; None returns stage indices 0 .. M-1 instead.

  Returns:
    pred [N] class predictions and dims_used [N] (dims[stage], or the stage).
  """
  conf, pred = confidences(logits)
  stage = _exit_stage(conf, _check_thresholds(thresholds, conf.shape[0]))
  used = stage if dims is None else np.asarray(_check_head_dims(dims, conf.shape[0]))[stage]
  return pred[stage, np.arange(conf.shape[1])], used


def expected_dims(logits, thresholds, dims: Sequence[int]) -> float:
  """Mean over examples of the dim the cascade classifies each one at."""
  _, used = cascade_predict(logits, thresholds, dims)
  return float(np.mean(used))


def _check_head_dims(dims, num_dims: int) -> list[int]:
  dims = [int(m) for m in dims]
  if len(dims) != num_dims or any(b <= a for a, b in zip(dims, dims[1:])):
    raise ValueError(f"dims={dims} must be the {num_dims} head dims of the logits, "
                     "strictly increasing (e.g. facts['head_dims']).")
  return dims


def _candidates(conf, grid) -> list[np.ndarray]:
  """Per dim (except the last): candidate thresholds, highest first, starting at +inf."""
  out = []
  for c in conf[:-1]:
    if isinstance(grid, (int, np.integer)):
      values = np.quantile(c, np.arange(1, grid) / grid)
      values = np.append(values, 0.0)  # the last step sends every example here
    else:
      values = np.asarray(grid, np.float64)
    out.append(np.concatenate([[np.inf], np.unique(values)[::-1]]))
  return out


def threshold_path(conf, correct, dims: Sequence[int], grid=DEFAULT_GRID) -> list[dict]:
  """The greedy descent of the module docstring on one (holdout) set.

  Args:
    conf: [M, n] confidences; correct: [M, n] bool, head i right on example j.
    dims: the M head dims. grid: int G (G-1 quantiles of each dim's
      confidences, plus 0) or a sequence of threshold values.

  Returns:
    Points {'thresholds' [M-1], 'expected_dims', 'accuracy'} from all at the
    last dim to all thresholds at their lowest candidate.
  """
  num_dims, n = conf.shape
  dims_arr = np.asarray(dims, np.float64)
  cands = _candidates(conf, grid)
  pos = np.zeros(num_dims - 1, np.int64)
  stage = np.full(n, num_dims - 1)
  n_correct, cost = int(correct[-1].sum()), float(dims_arr[-1] * n)

  def point():
    t = np.array([c[p] for c, p in zip(cands, pos)])
    return {"thresholds": t, "expected_dims": cost / n, "accuracy": n_correct / n}

  path = [point()]
  while True:
    best = None  # (gain per dim saved, i, move, d_correct, d_cost)
    for i in range(num_dims - 1):
      if pos[i] + 1 == len(cands[i]):
        continue
      # Examples still past dim i all have conf[i] < t_i (else they would exit
      # at i), so lowering t_i moves exactly those now reaching the new value.
      move = np.flatnonzero((stage > i) & (conf[i] >= cands[i][pos[i] + 1]))
      d_correct = int(correct[i, move].sum() - correct[stage[move], move].sum())
      d_cost = float(dims_arr[i] * len(move) - dims_arr[stage[move]].sum())
      gain = np.inf if d_cost == 0 else d_correct / -d_cost
      if best is None or gain > best[0]:
        best = (gain, i, move, d_correct, d_cost)
    if best is None:
      return path
    _, i, move, d_correct, d_cost = best
    stage[move] = i
    pos[i] += 1
    n_correct += d_correct
    cost += d_cost
    if d_cost:  # a free move changes no example: no new point
      path.append(point())


def _pick(path, budget=None, tolerance=None):
  """Best holdout accuracy within the budget, or the fewest dims within tolerance
  of the last dim's accuracy."""
  if budget is not None:
    ok = [p for p in path if p["expected_dims"] <= budget + 1e-9]
    return max(ok, key=lambda p: (p["accuracy"], -p["expected_dims"])) if ok else None
  target = path[0]["accuracy"] - tolerance  # path[0]: everything at the last dim
  ok = [p for p in path if p["accuracy"] >= target - 1e-12]
  return min(ok, key=lambda p: (p["expected_dims"], -p["accuracy"]))


def check_holdout(n: int | None, holdout, field: str = "holdout") -> int:
  """Examples of n the threshold search gets; both parts must be non-empty.

  n=None (split size unknown) checks only that holdout is a fraction in (0, 1).
  """
  try:
    frac = float(holdout)
  except (TypeError, ValueError):
    frac = math.nan
  if not 0 < frac < 1:  # NaN fails too
    raise ValueError(f"{field}={holdout!r} must be a fraction in (0, 1): the part of the "
                     "eval split the thresholds are searched on (the rest measures "
                     "them). Fix: e.g. 0.5.")
  if n is None:
    return 0
  n_hold = int(round(frac * n))
  if n_hold < 1 or n_hold > n - 1:
    raise ValueError(
        f"{field}={holdout!r} leaves {n_hold} of the {n} eval examples for the "
        f"threshold search and {n - n_hold} to test on; both parts must be non-empty. "
        f"Fix: set {field} to a fraction in (0, 1) with 1 <= round(holdout * {n}) "
        f"<= {n - 1}, e.g. 0.5.")
  return n_hold


def _split(n: int, holdout: float, seed: int, field: str):
  n_hold = check_holdout(n, holdout, field)
  perm = np.random.default_rng(seed).permutation(n)
  return perm[:n_hold], perm[n_hold:]


def _mean_std(values) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def adaptive_classification(logits, labels, dims: Sequence[int], *, holdout: float = 0.5,
                            seeds: Sequence[int] = DEFAULT_SEEDS, grid=DEFAULT_GRID,
                            budgets: Sequence[float] | None = None,
                            tolerance: float = DEFAULT_TOLERANCE,
                            field: str = "config.evals.<name>.holdout") -> dict:
  """Accuracy vs expected dims of the confidence cascade (module docstring).

  Args:
    logits: [M, N, C] eval logits at the head dims; labels: [N].
    dims: the M head dims, increasing.
    holdout: fraction of the eval examples (a fresh random split per seed)
      the thresholds are searched on; the rest is where they are measured.
    seeds: one split per seed; results are mean and std (ddof=1) over seeds.
    grid: candidate thresholds per dim: int G = G-1 quantiles of the holdout
      confidences plus 0, or explicit values (e.g. np.linspace(0, 1, 21)).
    budgets: expected-dims budgets; None = eval_dims(dims) (trained dims and
      their midpoints).
    tolerance: the 'best' point is the fewest expected dims whose holdout
      accuracy is within `tolerance` of the largest dim's.
    field: config field named by the holdout error.

  Returns:
    {'dims', 'holdout', 'seeds',
     'per_dim_accuracy': {dim: mean test accuracy of that head alone},
     'points': [{'budget', 'expected_dims', 'expected_dims_std', 'accuracy',
                 'accuracy_std', 'thresholds': [per seed]}, ...],
     'best': {'tolerance', 'expected_dims', 'expected_dims_std', 'accuracy',
              'accuracy_std', 'full_dim_accuracy', 'full_dim_accuracy_std',
              'thresholds'}}
    Accuracies and expected dims are measured on each seed's test part.
    A threshold of inf means no example stops at that dim.
  """
  conf, pred = confidences(logits)
  labels = np.asarray(labels)
  num_dims, n = conf.shape
  dims = _check_head_dims(dims, num_dims)
  if labels.shape != (n,):
    raise ValueError(f"labels has shape {labels.shape}, logits has {n} examples.")
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise ValueError("adaptive_classification needs at least one seed.")
  budgets = [float(b) for b in (knn.eval_dims(dims) if budgets is None else budgets)]
  correct = pred == labels[None]  # [M, N]
  dims_arr = np.asarray(dims, np.float64)

  def measure(point, idx):
    stage = _exit_stage(conf[:, idx], point["thresholds"])
    return float(dims_arr[stage].mean()), float(correct[stage, idx].mean())

  per_budget = [[] for _ in budgets]
  best, per_dim = [], []
  for seed in seeds:
    hold, test = _split(n, float(holdout), seed, field)
    path = threshold_path(conf[:, hold], correct[:, hold], dims, grid)
    per_dim.append(correct[:, test].mean(1))
    for j, budget in enumerate(budgets):
      point = _pick(path, budget=budget)
      if point is not None:  # None: budget below the smallest dim
        per_budget[j].append((*measure(point, test), point["thresholds"]))
    point = _pick(path, tolerance=tolerance)
    best.append((*measure(point, test), point["thresholds"], correct[-1, test].mean()))

  def summary(runs):
    e, e_std = _mean_std([r[0] for r in runs])
    a, a_std = _mean_std([r[1] for r in runs])
    return {"expected_dims": e, "expected_dims_std": e_std, "accuracy": a,
            "accuracy_std": a_std, "thresholds": [r[2].tolist() for r in runs]}

  points = [{"budget": b, **summary(runs)} for b, runs in zip(budgets, per_budget) if runs]
  full, full_std = _mean_std([r[3] for r in best])
  return {
      "dims": dims, "holdout": float(holdout), "seeds": seeds,
      "per_dim_accuracy": dict(zip(dims, np.mean(per_dim, 0).tolist())),
      "points": points,
      "best": {"tolerance": tolerance, **summary(best), "full_dim_accuracy": full,
               "full_dim_accuracy_std": full_std},
  }


# ----------------------------------------------------------------------------
# Funnel.
# ----------------------------------------------------------------------------
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
