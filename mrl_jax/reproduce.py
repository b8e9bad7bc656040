r"""Reproduce the MRL paper's comparisons on one config: train, evaluate, tabulate.

  python -m mrl_jax.reproduce --config=configs/fashion_mnist_vit.py --workdir=DIR \
      [--config.key=value ...] [--methods=mrl,mrl_e,ff] [--ff_dims=8,16,32,64]

Trains, each in its own workdir under DIR (with `train.run`, so each one
resumes from its checkpoint when re-run):

  DIR/mrl       config.mrl.mode='mrl'    + adaptive, funnel and quantised evaluators
  DIR/mrl_e     config.mrl.mode='mrl_e'
  DIR/ff_<m>    config.mrl.mode='ff', config.mrl.ff_dim=m, for every m in --ff_dims
                (default: the nesting dims); the full-dim one, ff_<d>, also gets
                the SVD (PCA) and random-feature baselines cut out of its embedding

Every run evaluates linear top-1 (its trained heads), 1-NN and mAP@10 (train
split = database, eval split = queries); config.evals of the config file is
replaced by this set. A run whose DIR/<run>/eval/results.json already holds
every expected number is skipped; delete that file to evaluate again (the
checkpoint is reused). Then DIR/report.md, DIR/results.json and the plots
(top1_vs_dim.png, knn_vs_dim.png, map10_vs_dim.png, adaptive.png, funnel.png)
compare the methods at every dim and check the paper's claims on these
numbers (see `CLAIMS`). Wall time per run and the hardware are recorded.
"""
from __future__ import annotations

import copy
import json
import logging as std_logging
import os
import platform
import time
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import ml_collections

from mrl_jax import report
from mrl_jax import sharding
from mrl_jax import train

METHODS = ("mrl", "mrl_e", "ff")
LABELS = {"mrl": "MRL", "mrl_e": "MRL-E", "ff": "FF", "svd": "SVD", "random": "Rand. FS"}
# Thresholds of the claims checked in the report (fractions: 0.005 = 0.5 pt).
FF_TOLERANCE = 0.005      # MRL top-1 >= FF-m top-1 - 0.5 pt at every m
FAR_MARGIN = 0.05         # "far above" SVD / random features: >= 5 pt at the two smallest dims
ADAPTIVE_TOLERANCE = 0.005
ADAPTIVE_FRACTION = 0.25  # ... at <= d/4 expected dims
FUNNEL_TOLERANCE = 0.001  # funnel mAP@10 >= exact - 0.1 pt ...
FUNNEL_REDUCTION = 8.0    # ... at >= 8x fewer FLOPs
CLAIMS = (
    f"MRL top-1 >= FF-m top-1 - {100 * FF_TOLERANCE:g} pt at every dim m",
    f"MRL top-1 far above (>= {100 * FAR_MARGIN:g} pt) SVD and random feature selection "
    "at the two smallest dims",
    f"Adaptive classification within {100 * ADAPTIVE_TOLERANCE:g} pt of the full-dim top-1 "
    f"at <= {ADAPTIVE_FRACTION:g} of the full dim in expectation",
    f"A funnel within {100 * FUNNEL_TOLERANCE:g} pt of exact full-dim mAP@10 at >= "
    f"{FUNNEL_REDUCTION:g}x fewer FLOPs",
)


# ----------------------------------------------------------------------------
# The runs.
# ----------------------------------------------------------------------------
def _base_name(config) -> str:
  name = config.get("name") or config.dataset.name
  for suffix in ("_mrl_e", "_mrl", "_ff"):
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def run_evals(method: str, *, full_ff: bool = False) -> dict[str, dict[str, Any]]:
  """config.evals of one run (see the module docstring)."""
  evals = {"linear": dict(type="linear"), "knn": dict(type="knn", k=[1]),
           "retrieval": dict(type="retrieval", ks=[10])}
  if method == "mrl":
    evals.update(adaptive=dict(type="adaptive", holdout=0.5, seeds=5),
                 funnel=dict(type="funnel", ks=[10]),
                 quantized=dict(type="quantized", kinds=["int8", "binary"]))
  if full_ff:
    evals["baseline"] = dict(type="baseline", methods=["svd", "random"],
                             probes=["linear", "knn"])
  return evals


def _expected(method: str, full_ff: bool) -> tuple[set[str], set[str]]:
  """(metrics, sections) a finished run's results.json must hold."""
  metrics = {"linear_top1", "knn_top1", "map@10"}
  sections = set()
  if method == "mrl":
    metrics |= {"knn_top1_int8", "knn_top1_binary"}
    sections |= {"adaptive", "funnel", "quantized"}
  if full_ff:
    metrics |= {f"{b}_{p}_top1" for b in ("svd", "random") for p in ("linear", "knn")}
  return metrics, sections


def check_ff_dims(ff_dims, nesting_dims) -> list[int]:
  d = int(nesting_dims[-1])
  try:
    dims = sorted({int(m) for m in ff_dims})
  except (TypeError, ValueError):
    dims = []
  if not dims or dims[0] < 1 or dims[-1] > d:
    raise ValueError(f"--ff_dims={ff_dims!r} must be dims in [1, {d}] (the embedding size), "
                     f"e.g. the nesting dims {list(nesting_dims)} (the default).")
  if d not in dims:  # the SVD / random baselines come from the full-dim FF model
    logging.info("Adding the full-dim FF run ff_%d (the SVD / random baselines need it).", d)
    dims.append(d)
  return dims


def run_configs(config, methods=METHODS, ff_dims=None) -> dict[str, dict[str, Any]]:
  """{run name: {'config', 'method', 'ff_dim', 'full_ff'}} in training order."""
  methods = [methods] if isinstance(methods, str) else list(methods)
  bad = [m for m in methods if m not in METHODS]
  if not methods or bad:
    raise ValueError(f"--methods={','.join(map(str, methods))} must be a non-empty list of "
                     f"{list(METHODS)}, e.g. --methods=mrl,mrl_e,ff.")
  if config.model.name == "dual_encoder":
    raise ValueError("mrl_jax.reproduce compares image classifiers (linear heads, MRL-E, FF "
                     "at each dim); config.model.name='dual_encoder' has no classifier. Train "
                     "its mrl and ff variants with mrl_jax.main instead.")
  nesting = list(config.mrl.nesting_dims)
  d = int(nesting[-1])
  base = _base_name(config)
  runs = {}
  for method in METHODS:  # a fixed order, whatever the flag's
    if method not in methods:
      continue
    variants = ([(f"ff_{m}", m) for m in check_ff_dims(ff_dims or nesting, nesting)]
                if method == "ff" else [(method, None)])
    for name, ff_dim in variants:
      cfg = copy.deepcopy(config)
      full_ff = method == "ff" and ff_dim == d
      with cfg.unlocked():
        cfg.name = f"{base}_{name}"
        cfg.mrl.mode = method
        cfg.mrl.ff_dim = ff_dim
        cfg.evals = ml_collections.ConfigDict(run_evals(method, full_ff=full_ff))
      runs[name] = {"config": cfg, "method": method, "ff_dim": ff_dim, "full_ff": full_ff}
  return runs


def _finished(run_dir: epath.Path, method: str, full_ff: bool) -> dict[str, Any] | None:
  path = run_dir / "eval" / "results.json"
  if not path.exists():
    return None
  results = json.loads(path.read_text())
  metrics, sections = _expected(method, full_ff)
  if metrics - set(results.get("metrics", {})) or sections - set(results):
    return None  # an older evaluation without some numbers: evaluate again
  return results


def reproduce(config, workdir, *, methods=METHODS, ff_dims=None,
              train_fn: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
  """Runs (or skips, when finished) every run, then writes the report; returns results.json."""
  train_fn = train_fn or train.run
  workdir = train.workdir_path(workdir)
  runs = run_configs(config, methods, ff_dims)
  # Every variant's config is checked before the first one trains.
  mesh = sharding.create_mesh(config.mesh, dcn_config=config.get("mesh_dcn"))
  for name, run in runs.items():
    logging.info("Checking the config of run %s", name)
    train.check_config(run["config"], mesh)
  is_main = jax.process_index() == 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  for name, run in runs.items():
    run_dir = workdir / name
    results = _finished(run_dir, run["method"], run["full_ff"])
    timing_path = run_dir / "reproduce_run.json"
    if results is not None:
      logging.info("Run %s is finished (%s): skipped.", name, run_dir / "eval" / "results.json")
      timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
      run.update(results=results, skipped=True, wall_seconds=timing.get("wall_seconds"))
      continue
    logging.info("Run %s: training / evaluating in %s", name, run_dir)
    t0 = time.perf_counter()
    results = train_fn(run["config"], str(run_dir))
    if "preempted_at_step" in results:
      raise SystemExit(f"Run {name} was preempted at step {results['preempted_at_step']}; "
                       "re-run the same command to continue.")
    wall = time.perf_counter() - t0
    if is_main:
      timing_path.write_text(json.dumps({"wall_seconds": wall, "step": results["step"]}))
    run.update(results=json.loads(json.dumps(results)), skipped=False, wall_seconds=wall)
  summary = summarize(config, runs, hardware=hardware_info(),
                      total_seconds=time.perf_counter() - start)
  if is_main:
    write_outputs(summary, workdir)
  return summary


def hardware_info() -> dict[str, Any]:
  devices = jax.devices()
  return {
      "platform": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "device_count": jax.device_count(),
      "process_count": jax.process_count(),
      "devices": [str(d) for d in devices[:16]] + (["..."] if len(devices) > 16 else []),
      "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "python": platform.python_version(),
      "jax": jax.__version__,
  }


# ----------------------------------------------------------------------------
# Tables and claims.
# ----------------------------------------------------------------------------
def _at(results, metric, dim):
  v = (results or {}).get("metrics", {}).get(metric, {}).get(str(dim))
  return None if v is None else float(v)


def summarize(config, runs, *, hardware=None, total_seconds=None) -> dict[str, Any]:
  """The cross-method tables, sections and claims (DIR/results.json)."""
  nesting = [int(m) for m in config.mrl.nesting_dims]
  d = nesting[-1]
  by_method = {r["method"]: r for r in runs.values() if r["method"] != "ff"}
  ff = {r["ff_dim"]: r for r in runs.values() if r["method"] == "ff"}
  full_ff = ff.get(d, {}).get("results")
  dims = sorted(set(nesting) | set(ff))

  def row(results, metric):
    return {str(m): _at(results, metric, m) for m in dims}

  tables = {}
  for metric in ("linear_top1", "knn_top1", "map@10"):
    table = {}
    for method in ("mrl", "mrl_e"):
      if method in by_method:
        table[LABELS[method]] = row(by_method[method]["results"], metric)
    if ff:
      table[LABELS["ff"]] = {str(m): (_at(ff[m]["results"], metric, m) if m in ff else None)
                             for m in dims}
    if metric != "map@10" and full_ff is not None:
      probe = "linear" if metric == "linear_top1" else "knn"
      for b in ("svd", "random"):
        table[LABELS[b]] = row(full_ff, f"{b}_{probe}_top1")
    tables[metric] = {k: v for k, v in table.items() if any(x is not None for x in v.values())}
  mrl = by_method.get("mrl", {}).get("results") or {}
  quantized = {k: v for k, v in mrl.get("metrics", {}).items()
               if k in ("knn_top1", "knn_top1_int8", "knn_top1_binary")}
  summary = {
      "config": _base_name(config),
      "dataset": config.dataset.name,
      "model": {"name": config.model.name,
                "variant": config.model.get("variant") or (
                    f"{config.model.depth}, width {config.model.get('width', 64)}"
                    if config.model.name == "resnet" else None),
                "representation_size": config.model.get("representation_size")},
      "nesting_dims": nesting,
      "dims": dims,
      "runs": {name: {"method": r["method"], "ff_dim": r["ff_dim"],
                      "step": (r.get("results") or {}).get("step"),
                      "wall_seconds": r.get("wall_seconds"), "skipped": r.get("skipped")}
               for name, r in runs.items()},
      "tables": tables,
      "adaptive": mrl.get("adaptive"),
      "funnel": mrl.get("funnel"),
      "quantized": ({"metrics": quantized, **mrl["quantized"]}
                    if mrl.get("quantized") else None),
      "hardware": hardware,
      "total_wall_seconds": total_seconds,
  }
  summary["claims"] = check_claims(summary)
  return report.json_safe(summary)


def _pt(x) -> str:
  return f"{100 * x:+.2f} pt"


def check_claims(summary) -> list[dict[str, Any]]:
  """[{'claim', 'holds' (True/False/None = not measured), 'detail'}] from the numbers."""
  nesting = summary["nesting_dims"]
  d = nesting[-1]
  top1 = summary["tables"].get("linear_top1", {})
  mrl, ff = top1.get(LABELS["mrl"], {}), top1.get(LABELS["ff"], {})
  out = []

  # 1. MRL vs FF at every dim.
  pairs = [(m, mrl.get(str(m)), ff.get(str(m))) for m in summary["dims"]]
  pairs = [(m, a, b) for m, a, b in pairs if a is not None and b is not None]
  if pairs:
    holds = all(a - b >= -FF_TOLERANCE - 1e-12 for _, a, b in pairs)
    detail = "; ".join(f"{m}: MRL {100 * a:.2f} vs FF {100 * b:.2f} ({_pt(a - b)})"
                       for m, a, b in pairs)
  else:
    holds, detail = None, "not measured (needs the mrl and ff runs)."
  out.append({"claim": CLAIMS[0], "holds": holds, "detail": detail})

  # 2. MRL vs SVD and random features at the two smallest dims.
  parts, oks = [], []
  for m in nesting[:2]:
    a = mrl.get(str(m))
    for b in ("svd", "random"):
      v = top1.get(LABELS[b], {}).get(str(m))
      if a is None or v is None:
        continue
      oks.append(a - v >= FAR_MARGIN - 1e-12)
      parts.append(f"{m}: MRL {100 * a:.2f} vs {LABELS[b]} {100 * v:.2f} ({_pt(a - v)})")
  out.append({"claim": CLAIMS[1], "holds": all(oks) if oks else None,
              "detail": "; ".join(parts) if parts else
              "not measured (needs the mrl run and the full-dim ff run's baselines)."})

  # 3. Adaptive classification.
  ada = summary.get("adaptive")
  if ada:
    full = ada["best"]["full_dim_accuracy"]
    budget = ADAPTIVE_FRACTION * d
    cands = [p for p in ada["points"] + [ada["best"]] if p["expected_dims"] <= budget + 1e-9]
    if cands:
      p = max(cands, key=lambda p: (p["accuracy"], -p["expected_dims"]))
      holds = p["accuracy"] >= full - ADAPTIVE_TOLERANCE - 1e-12
      detail = (f"best cascade point at <= {budget:g} expected dims: "
                f"{p['expected_dims']:.1f} dims, top-1 {100 * p['accuracy']:.2f} vs "
                f"{100 * full:.2f} at {d} dims ({_pt(p['accuracy'] - full)}, same test "
                f"parts, mean over {len(ada['seeds'])} splits)")
    else:
      holds, detail = False, f"no cascade point at <= {budget:g} expected dims."
    best = ada["best"]
    detail += (f". Fewest dims within {100 * best['tolerance']:g} pt on the holdout: "
               f"{best['expected_dims']:.1f} dims, top-1 {100 * best['accuracy']:.2f} "
               f"({_pt(best['accuracy'] - full)}).")
  else:
    holds, detail = None, "not measured (needs the mrl run)."
  out.append({"claim": CLAIMS[2], "holds": holds, "detail": detail})

  # 4. Funnel.
  fun = summary.get("funnel")
  if fun and "exact" in fun:
    exact = fun["exact"]["map@10"]
    rows = [(n, r) for n, r in fun.items() if n != "exact"]
    holds = any(r["map@10"] >= exact - FUNNEL_TOLERANCE - 1e-12
                and r["flops_reduction_vs_exact"] >= FUNNEL_REDUCTION for _, r in rows)
    detail = "; ".join(
        f"{n} ({' → '.join(f'{m}:{k}' for m, k in r['stages'])}): mAP@10 "
        f"{100 * r['map@10']:.2f} vs exact {100 * exact:.2f} ({_pt(r['map@10'] - exact)}) at "
        f"{r['flops_reduction_vs_exact']:.1f}x fewer FLOPs, {r['speedup_vs_exact']:.1f}x "
        "measured speedup" for n, r in rows)
    d0 = min(r["stages"][0][0] for _, r in rows) if rows else d
    detail += (f". (A first stage at {d0} dims bounds the FLOPs reduction by "
               f"{d}/{d0} = {d / d0:g}x.)")
  else:
    holds, detail = None, "not measured (needs the mrl run)."
  out.append({"claim": CLAIMS[3], "holds": holds, "detail": detail})
  return out


# ----------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------
def _table_md(table: dict[str, dict[str, float | None]], dims, trained) -> list[str]:
  lines = ["| method | " + " | ".join(f"{m}{'*' if m in trained else ''}" for m in dims) + " |",
           "|---|" + "---|" * len(dims)]
  for name, per_dim in table.items():
    cells = ["–" if per_dim.get(str(m)) is None else f"{100 * per_dim[str(m)]:.2f}"
             for m in dims]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def report_markdown(summary: dict[str, Any]) -> str:
  dims, nesting = summary["dims"], summary["nesting_dims"]
  model = summary["model"]
  lines = [f"# MRL reproduction: {summary['config']}", "",
           f"{summary['dataset']}, {model['name']} {model.get('variant') or ''} with a "
           f"{nesting[-1]}-d embedding, nesting dims {nesting}. Values in %; * = a "
           "nesting dim. MRL / MRL-E: one model each, every dim; FF: a separate model "
           "trained for each dim m (its head on the first m features); SVD / Rand. FS: "
           f"PCA / a random subset of coordinates of the {nesting[-1]}-d FF model's "
           "embedding, with a logistic-regression probe (top-1) or 1-NN.", ""]
  titles = {"linear_top1": "Top-1 classification (linear heads; probes for SVD / Rand. FS)",
            "knn_top1": "1-NN top-1 (database = train split, queries = eval split)",
            "map@10": "mAP@10 (AP normalised by k: the paper's \"corrected\" mAP@10)"}
  for metric, title in titles.items():
    lines += [f"## {title}", ""] + (_table_md(summary["tables"][metric], dims, set(nesting))
                                    if summary["tables"].get(metric) else ["(no runs)"]) + [""]
  if summary.get("quantized"):
    q = summary["quantized"]
    qd = sorted({int(m) for per in q["metrics"].values() for m in per})
    names = {"knn_top1": "float32", "knn_top1_int8": "int8", "knn_top1_binary": "1-bit"}
    lines += ["## Quantised MRL embeddings: 1-NN top-1", "",
              "| kind | " + " | ".join(str(m) for m in qd) + " |", "|---|" + "---|" * len(qd)]
    for metric, per_dim in q["metrics"].items():
      lines.append(f"| {names.get(metric, metric)} | " + " | ".join(
          f"{100 * per_dim[str(m)]:.2f}" if str(m) in per_dim else "–" for m in qd) + " |")
    lines += [""] + report.quantized_markdown(q, heading="###")[2:] + [""]
  if summary.get("adaptive"):
    lines += report.adaptive_markdown(summary["adaptive"]) + [""]
  if summary.get("funnel"):
    lines += report.funnel_markdown(summary["funnel"]) + [""]
  lines += ["## Paper claims, checked on these numbers", ""]
  for c in summary["claims"]:
    verdict = {True: "HOLDS", False: "DOES NOT HOLD", None: "NOT MEASURED"}[c["holds"]]
    lines.append(f"- **{verdict}**: {c['claim']}. {c['detail']}")
  hw = summary.get("hardware") or {}
  lines += ["", "## Runs", "", "| run | step | wall time (s) | |", "|---|---|---|---|"]
  for name, r in summary["runs"].items():
    wall = "–" if r["wall_seconds"] is None else f"{r['wall_seconds']:.1f}"
    lines.append(f"| {name} | {r['step']} | {wall} | "
                 f"{'finished earlier, skipped' if r['skipped'] else ''} |")
  if hw:
    lines += ["", f"Hardware: {hw['device_count']} x {hw['platform']} ({hw['device_kind']}), "
              f"{hw['process_count']} process(es), {hw['cpu_count']} CPU cores "
              f"({hw['machine']}), JAX {hw['jax']}, Python {hw['python']}."]
  if summary.get("total_wall_seconds") is not None:
    lines.append(f"Total wall time of this invocation: {summary['total_wall_seconds']:.1f} s.")
  return "\n".join(lines + [""])


def _plot_table(table, path: epath.Path, ylabel: str, title: str):
  fig, ax = report.new_axes()
  for name, per_dim in table.items():
    pts = sorted((int(m), v) for m, v in per_dim.items() if v is not None)
    ax.plot([m for m, _ in pts], [100 * v for _, v in pts], marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("representation size")
  ax.set_ylabel(ylabel)
  report.save_plot(fig, ax, path, title, legend=bool(table))


def _plot_funnel(funnel, path: epath.Path, title: str):
  fig, ax = report.new_axes()
  for i, (name, r) in enumerate(funnel.items()):
    ax.plot([r["mflops_per_query"]], [100 * r["map@10"]], marker="o" if name != "exact" else "s",
            linestyle="none", color=f"C{i}",
            label=f"{name} ({r['flops_reduction_vs_exact']:.1f}x fewer FLOPs)")
  ax.set_xscale("log")
  ax.set_xlabel("MFLOPs per query")
  ax.set_ylabel("mAP@10 (%)")
  report.save_plot(fig, ax, path, title)


def write_outputs(summary: dict[str, Any], workdir: epath.Path):
  workdir = epath.Path(workdir)
  (workdir / "results.json").write_text(json.dumps(summary, indent=2))
  (workdir / "report.md").write_text(report_markdown(summary))
  name = summary["config"]
  plots = {"linear_top1": ("top1_vs_dim.png", "top-1 (%)"),
           "knn_top1": ("knn_vs_dim.png", "1-NN top-1 (%)"),
           "map@10": ("map10_vs_dim.png", "mAP@10 (%)")}
  for metric, (fname, ylabel) in plots.items():
    _plot_table(summary["tables"].get(metric, {}), workdir / fname, ylabel, f"{name}: {ylabel}")
  if summary.get("adaptive"):
    report.plot_adaptive(summary["adaptive"], workdir / "adaptive.png",
                           f"{name}: adaptive classification (MRL)")
  if summary.get("funnel"):
    _plot_funnel(summary["funnel"], workdir / "funnel.png", f"{name}: funnel retrieval (MRL)")
  logging.info("Wrote %s and %s", workdir / "report.md", workdir / "results.json")


# ----------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------
def define_flags(flag_values=None, argv=None):
  """The CLI's flags (on absl's global FLAGS by default; `argv`, default sys.argv,
  is where config_flags finds the --config.key=value overrides)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True,
                                  flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Root of the runs (local path or gs://).", flag_values=fv)
  flags.DEFINE_list("methods", list(METHODS), "Which of mrl, mrl_e, ff to run.", flag_values=fv)
  flags.DEFINE_list("ff_dims", None, "FF models' dims (default: the nesting dims; the full dim "
                    "is always added).", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None,
                      "HOST:PORT of process 0, for multi-host CPU/GPU runs.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index.", flag_values=fv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


class _QuietLibraries(std_logging.Filter):
  """As in mrl_jax.main: library INFO chatter (every checkpoint write) off the console."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        p in record.pathname for p in ("/orbax/", "/tensorflow_datasets/", "/grain/", "/absl/"))


def main(argv, flag_values=None):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS if flag_values is None else flag_values
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if fv.coordinator_address or fv.num_processes:
    jax.distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
  elif "TPU_ACCELERATOR_TYPE" in os.environ or "CLOUD_TPU_TASK_ID" in os.environ:
    jax.distributed.initialize()
  try:
    ff_dims = [int(m) for m in fv.ff_dims] if fv.ff_dims else None
  except ValueError:
    raise ValueError(f"--ff_dims={','.join(fv.ff_dims)} must be comma-separated ints, e.g. "
                     "8,16,32,64.") from None
  summary = reproduce(fv.config, fv.workdir, methods=fv.methods, ff_dims=ff_dims)
  for c in summary["claims"]:
    logging.info("%s: %s", {True: "HOLDS", False: "DOES NOT HOLD", None: "NOT MEASURED"}[
        c["holds"]], c["claim"])
  return summary


def _cli(argv) -> None:
  # main returns the summary for callers; absl would pass it to sys.exit
  # (printing it and exiting 1), so the command line drops it.
  main(argv)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(_cli)
