"""Evaluation outputs: results.json, report.md and plots.

`write_outputs` writes what `mrl_jax.evaluate.evaluate` computed (schema:
docs/ARCHITECTURE.md) as `results.json`, a readable `report.md` (one table of every
per-dim metric, plus the adaptive / funnel / quantized sections) and
`accuracy_vs_dim.png` (+ `adaptive.png`). `mrl_jax.reproduce` reuses the
section tables and plots for its cross-method report.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from absl import logging
from etils import epath
import numpy as np


def json_safe(x):
  """Plain JSON types: numpy scalars/arrays -> Python, dict keys -> str,
  non-finite floats -> None (e.g. a cascade threshold of inf: no example stops there)."""
  if hasattr(x, "items"):
    return {str(k): json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, np.ndarray)):
    return [json_safe(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  return x


# ----------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------
def write_outputs(results: dict[str, Any], outdir: epath.Path, title: str = ""):
  outdir.mkdir(parents=True, exist_ok=True)
  (outdir / "results.json").write_text(json.dumps(results, indent=2))
  (outdir / "report.md").write_text(report_markdown(results, title))
  plot_accuracy_vs_dim(results, outdir / "accuracy_vs_dim.png", title)
  if results.get("adaptive"):
    plot_adaptive(results["adaptive"], outdir / "adaptive.png",
                  f"{title} adaptive classification".strip())
  logging.info("Wrote %s", outdir / "results.json")


def report_markdown(results: dict[str, Any], title: str = "") -> str:
  metrics = results["metrics"]
  dims = sorted({int(d) for per_dim in metrics.values() for d in per_dim})
  trained = set(results["nesting_dims"])
  lines = [f"# {title or 'Evaluation'} at step {results['step']} ({results.get('mode', '')})", "",
           "Values (%) per embedding dimension; * = a trained nesting dim, "
           "others are interpolated (kNN and retrieval only).", "",
           "| metric | " + " | ".join(f"{d}{'*' if d in trained else ''}" for d in dims) + " |",
           "|---|" + "---|" * len(dims)]
  for metric, per_dim in metrics.items():
    cells = [f"{100 * per_dim[str(d)]:.2f}" if str(d) in per_dim else "–" for d in dims]
    lines.append(f"| {metric} | " + " | ".join(cells) + " |")
  lines += ["", "Linear: the trained head of each dim on the eval split. kNN: "
            "database = train split, queries = eval split, cosine on each "
            "prefix L2-normalised separately."]
  if any(re.fullmatch(r"knn\d+_top1", m) for m in metrics):
    lines += ["", "knn{k}_top1: majority vote of the k nearest train examples; a tie "
              "goes to the tied label with the nearest neighbour."]
  if any(m.startswith(("map@", "precision@", "recall@")) for m in metrics):
    lines += ["", "Retrieval (same search; relevant = same label): map@k is the mean "
              "AP@k = (1/k) sum_{i<=k} P@i rel_i, normalised by k rather than by the "
              "relevant items retrieved (the MRL paper's \"corrected\" mAP@k); "
              "precision@k = relevant among the k nearest / k; recall@k = relevant "
              "among the k nearest / train examples with the query's label."]
  if any(re.fullmatch(r"(svd|random)_(linear|knn)_top1", m) for m in metrics):
    lines += ["", "svd_* / random_*: post-hoc baselines cut out of this model's full "
              "embedding: PCA (top principal directions of the train embeddings) or a "
              "random subset of coordinates, then a logistic-regression probe (linear) or "
              "1-NN (knn). The MRL paper applies them to the full-dim FF model's "
              "embedding (`python -m mrl_jax.reproduce` does)."]
  if results.get("quantized"):
    lines += [""] + quantized_markdown(results["quantized"])
  if results.get("adaptive"):
    lines += [""] + adaptive_markdown(results["adaptive"])
  if results.get("funnel"):
    lines += [""] + funnel_markdown(results["funnel"])
  return "\n".join(lines + [""])


def _pm(mean, std, scale=100.0, digits=2) -> str:
  if mean is None:
    return "–"
  return f"{scale * mean:.{digits}f} ± {scale * (std or 0.0):.{digits}f}"


def adaptive_markdown(section: dict[str, Any], heading: str = "##") -> list[str]:
  """The cascade's operating points as markdown lines (results['adaptive'])."""
  dims = section["dims"]
  per_dim = section["per_dim_accuracy"]
  best = section["best"]
  lines = [f"{heading} Adaptive classification (cascade)", "",
           f"Each example is classified at the first head dim whose max softmax "
           f"probability reaches that dim's threshold (else at {dims[-1]}). Thresholds are "
           f"searched on a random {100 * section['holdout']:.0f}% of the eval split and "
           f"measured on the rest; mean ± std over {len(section['seeds'])} random splits "
           f"(seeds {section['seeds']}).", "",
           "Each head alone on the same test parts:", "",
           "| dim | " + " | ".join(str(m) for m in dims) + " |",
           "|---|" + "---|" * len(dims),
           "| top-1 (%) | " + " | ".join(f"{100 * per_dim[str(m)]:.2f}" for m in dims) + " |",
           "", "| budget (dims) | expected dims | top-1 (%) |", "|---|---|---|"]
  for p in section["points"]:
    lines.append(f"| {p['budget']:g} | {p['expected_dims']:.1f} ± {p['expected_dims_std']:.1f}"
                 f" | {_pm(p['accuracy'], p['accuracy_std'])} |")
  lines += ["", f"Best (fewest expected dims whose holdout top-1 is within "
            f"{100 * best['tolerance']:.1f} pt of the {dims[-1]}-dim head's): "
            f"{best['expected_dims']:.1f} ± {best['expected_dims_std']:.1f} expected dims "
            f"({best['expected_dims'] / dims[-1]:.1%} of {dims[-1]}), top-1 "
            f"{_pm(best['accuracy'], best['accuracy_std'])} % vs "
            f"{_pm(best['full_dim_accuracy'], best['full_dim_accuracy_std'])} % at "
            f"{dims[-1]} dims. Thresholds per seed are in results.json (null = no example "
            "stops at that dim)."]
  return lines


def funnel_markdown(section: dict[str, Any], heading: str = "##") -> list[str]:
  """Funnel retrieval vs exact search as markdown lines (results['funnel'])."""
  maps = sorted({k for row in section.values() for k in row if k.startswith("map@")},
                key=lambda k: int(k.split("@")[1]))
  lines = [f"{heading} Adaptive retrieval (funnel)", "",
           "Queries = eval split, database = train split. A funnel searches the whole "
           "database at its first dim for a shortlist, then re-ranks the shortlist at each "
           "later dim (dim:rows kept). Cost = multiply-adds x 2 per query; time = one "
           "search over all queries on this machine (after a warm-up run); 'exact' is the "
           "full-dim search.", "",
           "| search | stages | " + " | ".join(maps) + " | 1-NN | MFLOPs/query | FLOPs vs "
           "exact | time (s) | speedup |",
           "|---|---|" + "---|" * len(maps) + "---|---|---|---|---|"]
  for name, row in section.items():
    stages = " → ".join(f"{m}:{k}" for m, k in row["stages"])
    cells = [f"{100 * row[m]:.2f}" for m in maps]
    lines.append(f"| {name} | {stages} | " + " | ".join(cells)
                 + f" | {100 * row['knn_top1']:.2f} | {row['mflops_per_query']:.3f} | "
                 f"{row['flops_reduction_vs_exact']:.1f}x | {row['seconds']:.3f} | "
                 f"{row['speedup_vs_exact']:.1f}x |")
  ann = {name: row for name, row in section.items() if "first_stage" in row}
  if not ann:
    return lines + ["", "First stages are exact (brute force) searches; a FAISS index "
                    "(`index='hnsw'` or `'ivf'`, with `pip install '.[faiss]'`) times the "
                    "funnel as an ANN engine runs it."]
  lines += ["", "First stage, share of the exact top-k found, vectors scored per query and "
            "index build time:", "",
            "| search | first stage | recall of exact | distances/query | build (s) |",
            "|---|---|---|---|---|"]
  for name, row in ann.items():
    lines.append(f"| {name} | {row['first_stage']} | {100 * row['recall_of_exact']:.2f} % | "
                 f"{row['distances_per_query']:.0f} | {row['build_seconds']:.2f} |")
  return lines


def quantized_markdown(section: dict[str, Any], heading: str = "##") -> list[str]:
  """Bytes per database vector of each quantisation kind (results['quantized'])."""
  sizes = section["bytes_per_vector"]
  dims = sorted({int(m) for per in sizes.values() for m in per})
  return [f"{heading} Quantised embeddings", "",
          "knn_top1_<kind>: 1-NN with each prefix L2-normalised and then quantised: int8 = "
          "symmetric per-coordinate scales from the database, 1-bit (binary) = signs "
          "(Hamming ranking). Bytes per database vector:", "",
          "| kind | " + " | ".join(str(m) for m in dims) + " |",
          "|---|" + "---|" * len(dims)] + [
              f"| {kind} | " + " | ".join(str(per.get(str(m), "–")) for m in dims) + " |"
              for kind, per in sizes.items()] + [
              "", "(int8 also stores one float32 scale per coordinate for the whole "
              "database.)"]


def plot_adaptive(section: dict[str, Any], path: epath.Path, title: str = ""):
  """Cascade top-1 vs expected dims, with each head's fixed-dim top-1 for comparison."""
  fig, ax = new_axes()
  dims = section["dims"]
  ax.plot(dims, [100 * section["per_dim_accuracy"][str(m)] for m in dims], marker="s",
          linestyle="--", color="gray", label="fixed dim (one head)")
  pts = sorted(section["points"], key=lambda p: p["expected_dims"])
  if pts:
    ax.errorbar([p["expected_dims"] for p in pts], [100 * p["accuracy"] for p in pts],
                xerr=[p["expected_dims_std"] for p in pts],
                yerr=[100 * p["accuracy_std"] for p in pts], marker="o", capsize=2,
                label="adaptive (cascade)")
  best = section["best"]
  ax.plot([best["expected_dims"]], [100 * best["accuracy"]], marker="*", markersize=12,
          linestyle="none", color="C3",
          label=f"best: {best['expected_dims']:.1f} dims")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("expected dimensions per example")
  ax.set_ylabel("top-1 (%)")
  save_plot(fig, ax, path, title)


def plot_accuracy_vs_dim(results: dict[str, Any], path: epath.Path, title: str = ""):
  fig, ax = new_axes()
  for metric, per_dim in results["metrics"].items():
    dims = sorted(int(d) for d in per_dim)
    ax.plot(dims, [100 * per_dim[str(d)] for d in dims], marker="o", label=metric)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("embedding dimension")
  ax.set_ylabel("accuracy (%)")
  # (No evaluators configured: an empty plot, no legend.)
  save_plot(fig, ax, path, f"{title} step {results['step']}".strip(),
            legend=bool(results["metrics"]))


def new_axes():
  """(fig, ax) of one plot, on the Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt.subplots(figsize=(6, 4), dpi=120)


def save_plot(fig, ax, path: epath.PathLike, title: str, *, legend: bool = True):
  """Title, grid and legend, then writes `path` as PNG (local or gs://)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  if legend:
    ax.legend()
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)
