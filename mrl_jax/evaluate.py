"""Evaluation at every dimension.

Embeds the splits once (each process its slice, padded batches masked), then
runs the evaluators named in `config.evals` on the gathered embeddings. Each
evaluator returns `{metric: {dim: value}}`; the merged result is written as
`results.json`, `report.md` and `accuracy_vs_dim.png` (schema: DESIGN.md).
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from mrl_jax import sharding
from mrl_jax.data import input_pipeline
from mrl_jax.evaluators import classification
from mrl_jax.evaluators import knn
from mrl_jax.evaluators import retrieval
from mrl_jax.evaluators import zeroshot


# ----------------------------------------------------------------------------
# Embedding the splits.
# ----------------------------------------------------------------------------
def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def embed_split(config, task, state, mesh, split: str, *, with_logits: bool,
                with_text: bool = False) -> dict[str, np.ndarray]:
  """Returns {'embedding': [N, d] f32, 'label': [N] int, 'logits': [M, N, C]?,
  'text_embedding': [N, K, d]?, 'text_mask': [N, K]?} (text: the first K
  captions of each example, for image-text data)."""
  batch_size = config.get("eval_batch_size", config.batch_size)
  batch_sharding = sharding.batch_sharding(mesh)
  with_logits = with_logits and task.has_logits

  @jax.jit
  def forward(params, rest, images):
    logits, emb = task.embed_images(params, rest, images)
    return (logits if with_logits else None), emb

  @jax.jit
  def forward_text(params, rest, ids):  # [B, K, L] -> [B, K, d]
    b, k, length = ids.shape
    return task.embed_texts(params, rest, ids.reshape(b * k, length)).reshape(b, k, -1)

  outs = {"embedding": [], "label": [], "logits": [], "text_embedding": [], "text_mask": []}
  for batch in input_pipeline.create_eval_iterator(config, split, batch_size):
    if not with_text:
      batch = {k: v for k, v in batch.items() if k not in ("text", "text_mask")}
    # The mask travels with the batch: gathered rows stay aligned with it.
    g = input_pipeline.make_global_batch(batch, batch_sharding)
    logits, emb = forward(state["params"], state["rest"], g["image"])
    keep = _to_host(g["mask"]).astype(bool)
    outs["embedding"].append(_to_host(emb)[keep])
    outs["label"].append(_to_host(g["label"])[keep])
    if with_logits:
      outs["logits"].append(_to_host(logits)[:, keep])
    if with_text:
      text_emb = forward_text(state["params"], state["rest"], g["text"])
      outs["text_embedding"].append(_to_host(text_emb)[keep])
      outs["text_mask"].append(_to_host(g["text_mask"])[keep])
  result = {"embedding": np.concatenate(outs["embedding"]).astype(np.float32),
            "label": np.concatenate(outs["label"])}
  if with_logits:
    result["logits"] = np.concatenate(outs["logits"], axis=1)
  if with_text:
    result["text_embedding"] = np.concatenate(outs["text_embedding"]).astype(np.float32)
    result["text_mask"] = np.concatenate(outs["text_mask"]).astype(bool)
  return result


def embed_texts(config, task, state, mesh, texts: list[str]) -> np.ndarray:
  """[len(texts), d] text-tower embeddings of `texts` (e.g. zero-shot prompts)."""
  tokenizer = input_pipeline.load_tokenizer(config)
  ids = tokenizer.encode_batch(texts)["ids"]
  # Padded to a multiple of the batch shards; rows split over devices.
  shards = sharding.num_batch_shards(mesh)
  padded = np.zeros((-(-len(ids) // shards) * shards, ids.shape[1]), np.int32)
  padded[:len(ids)] = ids
  g = jax.make_array_from_process_local_data(
      sharding.replicated(mesh), padded)
  emb = jax.jit(task.embed_texts, out_shardings=sharding.replicated(mesh))(
      state["params"], state["rest"], g)
  return np.asarray(emb.addressable_data(0))[:len(texts)].astype(np.float32)


# ----------------------------------------------------------------------------
# Evaluators: config.evals.<name> = dict(type=<one of EVALUATORS>, ...).
# ----------------------------------------------------------------------------
def _linear(cfg, facts, splits) -> dict[str, dict[int, float]]:
  del cfg
  ev = splits["eval"]
  acc = classification.LinearAccuracy(facts["head_dims"])
  acc.update(ev["logits"], ev["label"])
  return acc.result()


def _neighbours(splits, dims, k: int, db_chunk: int | None = None) -> np.ndarray:
  """[D, Q, k] nearest train rows of each eval example at `dims`.

  One exact search, at the largest k any evaluator asks for
  (splits["neighbours"]["k"], set by `evaluate`), serves them all: the first
  k of the top-K are the top-k, ties included.
  """
  cache = splits.setdefault("neighbours", {})
  if cache.get("indices") is None or cache["indices"].shape[-1] < k:
    db, q = splits["train"], splits["eval"]
    _, cache["indices"] = knn.knn_search(q["embedding"], db["embedding"], dims,
                                         max(k, cache.get("k", 0)), db_chunk=db_chunk)
  return cache["indices"][..., :k]


def _knn_ks(cfg, num_db: int | None = None, name: str = "<name>") -> list[int]:
  k = cfg.get("k", [1])
  ks = retrieval.check_ks(k if isinstance(k, (list, tuple)) else [k], num_db,
                          field=f"config.evals.{name}.k")
  return sorted(set(ks) | {1})


def _knn(cfg, facts, splits) -> dict[str, dict[int, float]]:
  """knn_top1 (1-NN) and knn{k}_top1 (majority vote of the k nearest; a tie
  goes to the tied label with the nearest neighbour) for config k=[1, 5, ...]."""
  dims = knn.eval_dims(facts["nesting_dims"])
  ks = _knn_ks(cfg)
  db, q = splits["train"], splits["eval"]
  indices = _neighbours(splits, dims, max(ks), cfg.get("db_chunk"))
  out = {}
  for k in ks:
    name = "knn_top1" if k == 1 else f"knn{k}_top1"
    out[name] = knn.knn_accuracy(indices, db["label"], q["label"], dims, k=k)
  return out


def _retrieval(cfg, facts, splits) -> dict[str, dict[int, float]]:
  """map@k (AP normalised by k), precision@k, recall@k for config ks=[10, ...]."""
  dims = knn.eval_dims(facts["nesting_dims"])
  ks = retrieval.check_ks(cfg.get("ks", retrieval.DEFAULT_KS))
  db, q = splits["train"], splits["eval"]
  return retrieval.retrieval_metrics(_neighbours(splits, dims, ks[-1], cfg.get("db_chunk")),
                                     db["label"], q["label"], dims, ks)


def _class_names(cfg, facts) -> list[str]:
  names = cfg.get("class_names") or getattr(facts.get("dataset"), "class_names", None)
  if not names:
    raise ValueError(
        "Zero-shot needs class names: the dataset's label feature has none; set "
        "config.evals.<name>.class_names=[...] (one per label, in label order).")
  return list(names)


def _zeroshot(cfg, facts, splits) -> dict[str, dict[int, float]]:
  """zeroshot_top1: class prompts embedded by the text tower (see zeroshot.py)."""
  dims = knn.eval_dims(facts["nesting_dims"])
  names = _class_names(cfg, facts)
  emb = splits["embed_texts"](zeroshot.prompts(names, _templates(cfg)))
  ev = splits["eval"]
  return {"zeroshot_top1": zeroshot.zeroshot_accuracy(
      ev["embedding"], ev["label"], emb, len(names), dims)}


def _templates(cfg):
  return list(cfg.get("templates") or zeroshot.DEFAULT_TEMPLATES)


def _image_text(cfg, facts, splits) -> dict[str, dict[int, float]]:
  """i2t_recall@k, t2i_recall@k on the first num_images eval images."""
  dims = knn.eval_dims(facts["nesting_dims"])
  ev = splits["eval"]
  n = cfg.get("num_images") or len(ev["embedding"])
  return zeroshot.image_text_recall(
      ev["embedding"][:n], ev["text_embedding"][:n], ev["text_mask"][:n], dims,
      cfg.get("ks", zeroshot.DEFAULT_RECALL_KS))


EVALUATORS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    # type: (function, splits it needs)
    "linear": (_linear, ("eval",)),
    "knn": (_knn, ("eval", "train")),              # k=[1, 5]: 1-NN and 5-NN vote
    "retrieval": (_retrieval, ("eval", "train")),  # ks=[10, 25, 50, 100]
    # Image-text models (dual encoders):
    "zeroshot": (_zeroshot, ("eval",)),            # class_names, templates
    "image_text": (_image_text, ("eval",)),        # num_images, ks=[1, 5, 10]
}
_NEEDS_TEXT_TOWER = ("zeroshot", "image_text")


def check_evals(config, facts) -> int:
  """Checks every config.evals.<name> before anything is embedded.

  Returns the number of neighbours the kNN-based evaluators need (0: none).
  """
  train_split = config.dataset.get("train_split")
  num_db = getattr(facts.get("dataset"), "num_examples", {}).get(train_split)
  need = 0
  dual = config.model.name == "dual_encoder"
  for name, cfg in (config.get("evals", {}) or {}).items():
    if cfg.get("type") not in EVALUATORS:
      raise ValueError(f"config.evals.{name}.type={cfg.get('type')!r} is not one of "
                       f"{sorted(EVALUATORS)}.")
    if cfg["type"] in _NEEDS_TEXT_TOWER and not dual:
      raise ValueError(f"config.evals.{name}.type={cfg['type']!r} needs a text tower "
                       "(config.model.name='dual_encoder').")
    if cfg["type"] == "linear" and dual:
      raise ValueError(
          f"config.evals.{name}.type='linear' reads the trained classifier heads; a "
          "dual encoder has none. Use 'zeroshot' (and 'knn') instead.")
    if cfg["type"] == "zeroshot":
      zeroshot.prompts(["x"], _templates(cfg))  # bad templates fail now
      if facts.get("dataset") is not None:
        names = _class_names(cfg, facts)
        num = config.dataset.get("num_classes")
        if num and len(names) != num:
          raise ValueError(
              f"config.evals.{name}.class_names has {len(names)} names but "
              f"config.dataset.num_classes={num}.")
    if cfg["type"] == "image_text" and not config.dataset.get("text_key"):
      raise ValueError(f"config.evals.{name}.type='image_text' needs captions: set "
                       "config.dataset.text_key.")
    if cfg["type"] == "knn":
      need = max(need, _knn_ks(cfg, num_db, name)[-1])
    elif cfg["type"] == "retrieval":
      need = max(need, retrieval.check_ks(cfg.get("ks", retrieval.DEFAULT_KS), num_db,
                                          field=f"config.evals.{name}.ks")[-1])
  return need


def evaluate(config, facts, task, state, mesh, *, step: int,
             outdir: epath.PathLike | None = None) -> dict[str, Any]:
  evals = config.get("evals", {}) or {}
  num_neighbours = check_evals(config, facts)
  needed = set()
  for cfg in evals.values():
    needed |= set(EVALUATORS[cfg["type"]][1])
  types = {cfg["type"] for cfg in evals.values()}
  splits: dict[str, Any] = {}
  if "eval" in needed:
    splits["eval"] = embed_split(config, task, state, mesh, config.dataset.eval_split,
                                 with_logits=True, with_text="image_text" in types)
  if "zeroshot" in types:
    splits["embed_texts"] = lambda texts: embed_texts(config, task, state, mesh, texts)
  if "train" in needed:
    splits["train"] = embed_split(config, task, state, mesh, config.dataset.train_split,
                                  with_logits=False)
  if num_neighbours:
    num_db = len(splits["train"]["label"])
    if num_neighbours > num_db:  # only when the dataset facts had no split size
      raise ValueError(
          f"config.evals asks for the {num_neighbours} nearest neighbours, but the "
          f"{config.dataset.train_split!r} split has only {num_db} examples. Fix: "
          f"lower config.evals.<name>.k / .ks to at most {num_db}.")
    splits["neighbours"] = {"k": num_neighbours}  # the search _neighbours shares
  metrics: dict[str, dict[str, float]] = {}
  for name, cfg in evals.items():
    fn = EVALUATORS[cfg["type"]][0]
    for metric, per_dim in fn(cfg, facts, splits).items():
      metrics[metric] = {str(d): float(v) for d, v in sorted(per_dim.items())}
  results = {
      "step": int(step),
      "mode": config.mrl.mode,
      "nesting_dims": list(facts["nesting_dims"]),
      "eval_dims": knn.eval_dims(facts["nesting_dims"]),
      "metrics": metrics,
  }
  for metric, per_dim in metrics.items():
    logging.info("step %d %s: %s", step, metric,
                 "  ".join(f"{d}:{100 * v:.2f}" for d, v in per_dim.items()))
  if outdir is not None and jax.process_index() == 0:
    write_outputs(results, epath.Path(outdir), title=config.get("name", ""))
  return results


# ----------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------
def write_outputs(results: dict[str, Any], outdir: epath.Path, title: str = ""):
  outdir.mkdir(parents=True, exist_ok=True)
  (outdir / "results.json").write_text(json.dumps(results, indent=2))
  (outdir / "report.md").write_text(report_markdown(results, title))
  plot_accuracy_vs_dim(results, outdir / "accuracy_vs_dim.png", title)
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
  return "\n".join(lines + [""])


def plot_accuracy_vs_dim(results: dict[str, Any], path: epath.Path, title: str = ""):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for metric, per_dim in results["metrics"].items():
    dims = sorted(int(d) for d in per_dim)
    ax.plot(dims, [100 * per_dim[str(d)] for d in dims], marker="o", label=metric)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("embedding dimension")
  ax.set_ylabel("accuracy (%)")
  ax.set_title(f"{title} step {results['step']}".strip())
  ax.grid(True, alpha=0.3)
  if results["metrics"]:  # (no evaluators configured: an empty plot, no legend)
    ax.legend()
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)
