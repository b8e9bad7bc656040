"""Adaptive classification (the cascade), MRL paper §4.2.

It spends few dimensions on easy inputs and more only where needed; the
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

Adaptive retrieval (the funnel) is in `funnel.py`.
"""
from __future__ import annotations

from collections.abc import Sequence
import math

import numpy as np

from mrl_jax import prefix
from mrl_jax.evaluators import base

DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_GRID = 40          # per-dim quantiles of the holdout confidences
DEFAULT_TOLERANCE = 0.005  # "within 0.5 pt of the full-dim accuracy"


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
  budgets = [float(b) for b in (prefix.eval_dims(dims) if budgets is None else budgets)]
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


class Adaptive(base.Evaluator):
  """The confidence cascade over the head dims (`adaptive_classification`).

  Options: holdout=0.5 (the part of the eval split the thresholds are
  searched on), seeds=5 (or a list), grid=40, budgets (expected-dims budgets,
  default the eval dims), tolerance=0.005. Section 'adaptive': the operating
  points (accuracy vs expected dims), each head's own accuracy on the same
  test parts, and the 'best' point (fewest dims within tolerance of the full
  dim).
  """
  needs_heads = True
  section = "adaptive"
  option_names = ("holdout", "seeds", "grid", "budgets", "tolerance")

  def __init__(self, options, context, field):
    super().__init__(options, context, field)
    if len(context.head_dims) < 2:
      raise ValueError(
          f"{field}.type='adaptive' cascades over classifier heads at several dims, but "
          f"config.mrl.mode={context.mode!r} has a head at {list(context.head_dims)} only. "
          f"Fix: use config.mrl.mode='mrl' or 'mrl_e', or remove {field}.")
    self.holdout = options.get("holdout", 0.5)
    check_holdout(context.num_eval, self.holdout, f"{field}.holdout")
    self.seeds = _seeds(options.get("seeds", len(DEFAULT_SEEDS)), f"{field}.seeds")
    self.grid = _grid(options.get("grid", DEFAULT_GRID), f"{field}.grid")
    self.tolerance = options.get("tolerance", DEFAULT_TOLERANCE)
    if (isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float))
        or not 0 <= self.tolerance < 1):
      raise ValueError(f"{field}.tolerance={self.tolerance!r} must be an accuracy "
                       "difference in [0, 1), e.g. 0.005 (half a point).")
    budgets = options.get("budgets")
    if budgets is not None and (not isinstance(budgets, (list, tuple)) or not budgets or any(
        not isinstance(b, (int, float)) or b <= 0 for b in budgets)):
      raise ValueError(f"{field}.budgets={budgets!r} must be a non-empty list of positive "
                       "expected-dims budgets, or None (the eval dims).")
    self.budgets = None if budgets is None else list(budgets)

  def run(self, data):
    self.check_eval(data)
    ev = data.eval
    out = adaptive_classification(
        ev["logits"], ev["label"], self.context.head_dims, holdout=self.holdout,
        seeds=self.seeds, grid=self.grid, budgets=self.budgets, tolerance=self.tolerance,
        field=f"{self.field}.holdout")
    out["num_examples"] = int(len(ev["label"]))
    return {}, {"adaptive": out}


def _seeds(seeds, field: str) -> list[int]:
  """A number of random holdout splits (seeds 0..n-1) or a list of seeds."""
  if isinstance(seeds, bool):
    out = None
  elif isinstance(seeds, (int, np.integer)):
    out = list(range(int(seeds))) if seeds >= 1 else None
  else:
    try:
      out = [int(x) for x in seeds] or None
    except (TypeError, ValueError):
      out = None
  if out is None:
    raise ValueError(f"{field}={seeds!r} must be a number of random holdout splits >= 1 "
                     "(seeds 0..n-1) or a non-empty list of integer seeds, e.g. 5.")
  return out


def _grid(grid, field: str):
  """An integer >= 2 (quantiles) or a list of thresholds in [0, 1]."""
  if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
    if grid >= 2:
      return int(grid)
  else:
    try:
      values = [float(v) for v in grid]
    except (TypeError, ValueError):
      values = []
    if values and all(0 <= v <= 1 for v in values):
      return values
  raise ValueError(f"{field}={grid!r} must be an integer >= 2 (quantiles of the holdout "
                   "confidences) or a non-empty list of thresholds in [0, 1].")
