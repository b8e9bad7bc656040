"""Evaluation at every dimension.

Embeds the splits once (each process its slice, padded batches masked), then
runs the evaluators named in `config.evals` on the gathered embeddings. Each
evaluator returns `{metric: {dim: value}}`; the merged result is written as
`results.json`, `report.md` and `accuracy_vs_dim.png` (schema:
docs/ARCHITECTURE.md) by `mrl_jax.report`.
"""
from __future__ import annotations

import functools

import time
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from mrl_jax import sharding
from mrl_jax.data import input_pipeline
from mrl_jax.evaluators import adaptive
from mrl_jax.evaluators import ann
from mrl_jax.evaluators import baselines
from mrl_jax.evaluators import classification
from mrl_jax.evaluators import knn
from mrl_jax.evaluators import quantize
from mrl_jax.evaluators import retrieval
from mrl_jax.evaluators import zeroshot
from mrl_jax.report import json_safe
from mrl_jax.report import write_outputs


# ----------------------------------------------------------------------------
# Embedding the splits.
# ----------------------------------------------------------------------------
def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# The jitted steps are cached per task (and mesh): every evaluation of a run
# reuses them, so a periodic evaluation compiles once, not at every eval.
@functools.lru_cache(maxsize=None)
def make_embed_step(task, *, with_logits: bool):
  """Jitted `(params, rest, images [B, H, W, C]) -> (logits [M, B, C] | None, emb [B, d])`."""
  with_logits = with_logits and task.has_logits

  @jax.jit
  def embed_step(params, rest, images):
    logits, emb = task.embed_images(params, rest, images)
    return (logits if with_logits else None), emb
  return embed_step


@functools.lru_cache(maxsize=None)
def make_embed_text_step(task):
  """Jitted `(params, rest, ids [B, K, L]) -> [B, K, d]`: K captions per example."""
  @jax.jit
  def embed_text_step(params, rest, ids):
    b, k, length = ids.shape
    return task.embed_texts(params, rest, ids.reshape(b * k, length)).reshape(b, k, -1)
  return embed_text_step


def embeds_captions(config) -> bool:
  """Whether evaluation embeds the eval split's captions (image-text retrieval)."""
  return any(cfg.get("type") == "image_text" for cfg in (config.get("evals") or {}).values())


def embed_split(config, task, state, mesh, split: str, *, with_logits: bool,
                with_text: bool = False) -> dict[str, np.ndarray]:
  """Returns {'embedding': [N, d] f32, 'label': [N] int, 'logits': [M, N, C]?,
  'text_embedding': [N, K, d]?, 'text_mask': [N, K]?} (text: the first K
  captions of each example, for image-text data)."""
  batch_size = config.get("eval_batch_size", config.batch_size)
  batch_sharding = sharding.batch_sharding(mesh)
  with_logits = with_logits and task.has_logits
  forward = make_embed_step(task, with_logits=with_logits)
  forward_text = make_embed_text_step(task)
  outs = {"embedding": [], "label": [], "logits": [], "text_embedding": [], "text_mask": []}
  for batch in input_pipeline.create_eval_iterator(config, split, batch_size,
                                                   with_text=with_text):
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


@functools.lru_cache(maxsize=None)
def _embed_texts_step(task, mesh):
  return jax.jit(task.embed_texts, out_shardings=sharding.replicated(mesh))


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
  emb = _embed_texts_step(task, mesh)(state["params"], state["rest"], g)
  return np.asarray(emb.addressable_data(0))[:len(texts)].astype(np.float32)


# ----------------------------------------------------------------------------
# Evaluators: config.evals.<name> = dict(type=<one of EVALUATORS>, ...).
# ----------------------------------------------------------------------------
def check_head_labels(labels, num_classes: int, *, split: str = "eval",
                      evaluator: str = "config.evals.<name>") -> None:
  """Raises if eval labels fall outside [0, num_classes), the classes the heads predict.

  The trained heads can never predict such a label, so linear / adaptive
  top-1 would silently count those examples as errors. kNN-style evaluators
  compare labels directly and work with any labels.
  """
  labels = np.asarray(labels)
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    values = np.unique(labels[bad])
    shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
    raise ValueError(
        f"The {split!r} split has {int(bad.sum())} examples with labels outside [0, "
        f"{num_classes}) (labels {shown}), the classes the trained heads predict; "
        f"{evaluator} would count them as errors. Fix: set --config.dataset.num_classes="
        f"{int(labels.max()) + 1} (or more) and retrain, or remove {evaluator} and re-run "
        "with --mode=eval: the knn, retrieval, funnel, quantized and baseline evaluators "
        "compare labels directly and work with any labels.")


def _linear(cfg, facts, splits) -> dict[str, dict[int, float]]:
  ev = splits["eval"]
  check_head_labels(ev["label"], ev["logits"].shape[-1], split=splits.get("eval_split", "eval"),
                    evaluator=cfg.get("_field", "config.evals.<name>") + " (type 'linear')")
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


# ----------------------------------------------------------------------------
# Adaptive classification, funnel retrieval, quantised kNN, post-hoc baselines.
# These may return (metrics, sections): each section is a top-level entry of
# results.json (e.g. results['adaptive']) for numbers not keyed by dim.
# ----------------------------------------------------------------------------
def _adaptive_seeds(cfg, name: str = "<name>") -> list[int]:
  seeds = cfg.get("seeds", len(adaptive.DEFAULT_SEEDS))
  field = f"config.evals.{name}.seeds"
  if isinstance(seeds, bool):
    seeds = None
  elif isinstance(seeds, (int, np.integer)):
    seeds = list(range(int(seeds))) if seeds >= 1 else None
  else:
    try:
      seeds = [int(x) for x in seeds] or None
    except (TypeError, ValueError):
      seeds = None
  if seeds is None:
    raise ValueError(f"{field}={cfg.get('seeds')!r} must be a number of random holdout "
                     "splits >= 1 (seeds 0..n-1) or a non-empty list of integer seeds, "
                     "e.g. 5.")
  return seeds


def _adaptive_grid(cfg, name: str = "<name>"):
  grid = cfg.get("grid", adaptive.DEFAULT_GRID)
  field = f"config.evals.{name}.grid"
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


def _adaptive(cfg, facts, splits):
  """Confidence cascade over the head dims (`adaptive.adaptive_classification`).

  Config: holdout=0.5 (fraction of the eval split the thresholds are searched
  on), seeds=5 (or a list), grid=40, budgets (expected-dims budgets, default
  the eval dims), tolerance=0.005. Section 'adaptive': the operating points
  (accuracy vs expected dims), each head's own accuracy on the same test
  parts, and the 'best' point (fewest dims within tolerance of the full dim).
  """
  ev = splits["eval"]
  field = cfg.get("_field", "config.evals.<name>")
  check_head_labels(ev["label"], ev["logits"].shape[-1], split=splits.get("eval_split", "eval"),
                    evaluator=f"{field} (type 'adaptive')")
  budgets = cfg.get("budgets")
  out = adaptive.adaptive_classification(
      ev["logits"], ev["label"], facts["head_dims"], holdout=cfg.get("holdout", 0.5),
      seeds=_adaptive_seeds(cfg), grid=_adaptive_grid(cfg),
      budgets=None if budgets is None else list(budgets),
      tolerance=cfg.get("tolerance", adaptive.DEFAULT_TOLERANCE), field=f"{field}.holdout")
  out["num_examples"] = int(len(ev["label"]))
  return {}, {"adaptive": out}


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


def _funnel_ks(cfg) -> list[int]:
  ks = cfg.get("ks", [10])
  return list(ks) if isinstance(ks, (list, tuple)) else [ks]


def _funnel_config(cfg, facts, num_db: int | None, name: str = "<name>"):
  """(funnels {name: [(dim, size)]}, ks), checked against the embedding and database."""
  field = f"config.evals.{name}"
  d = int(facts["nesting_dims"][-1])
  ks = retrieval.check_ks(_funnel_ks(cfg), num_db, field=f"{field}.ks")
  funnels = cfg.get("funnels")
  if funnels is None:
    if len(facts["nesting_dims"]) < 2:
      raise ValueError(f"{field}.type='funnel' re-ranks a shortlist from a small dim at "
                       f"larger ones, but there is one nesting dim only "
                       f"({list(facts['nesting_dims'])}). Set {field}.funnels explicitly "
                       "or use nesting dims like [8, 16, 32, 64].")
    funnels = default_funnels(facts["nesting_dims"], ks[-1])
  if not hasattr(funnels, "items") or not funnels:
    raise ValueError(f"{field}.funnels={funnels!r} must be a dict name -> stages, e.g. "
                     "{'single': [(8, 200), (64, 10)]}.")
  out = {}
  for fname, stages in funnels.items():
    if fname == "exact":
      raise ValueError(f"{field}.funnels.exact: 'exact' names the reference full-dim "
                       "search; rename this funnel.")
    # Checks dims within [1, d], sizes >= 1 and non-increasing.
    checked = adaptive._check_stages(  # pylint: disable=protected-access
        stages, d, num_db or 2**62, f"{field}.funnels.{fname}")
    if checked[-1][1] < ks[-1]:
      raise ValueError(f"{field}.funnels.{fname}={_plain(stages)} keeps {checked[-1][1]} "
                       f"rows at its last stage, fewer than max({field}.ks)={ks[-1]}. "
                       f"Fix: a last shortlist >= {ks[-1]}.")
    out[str(fname)] = checked  # shortlists capped at the database size
  return out, ks


def _funnel_index(cfg, name: str = "<name>"):
  """(index, options) of a funnel evaluator: a FAISS first stage, or (None, {})."""
  index = cfg.get("index")
  if index is None:
    return None, {}
  options = {k: cfg[k] for k in cfg if k in {o for opts in ann.INDEXES.values() for o in opts}}
  return index, ann.check_index(index, options, f"config.evals.{name}")


def _funnel(cfg, facts, splits):
  """Funnel retrieval vs exact full-dim search (`adaptive.funnel_metrics`).

  Config: funnels {name: [(dim, shortlist), ...]} (default `default_funnels`),
  ks=[10]. Queries = eval split, database = train split. Section 'funnel':
  {name: {map@k, precision@k, recall@k, knn_top1, mflops_per_query,
  flops_reduction_vs_exact, seconds, speedup_vs_exact, stages}} with the
  reference search as 'exact'.
  """
  db, q = splits["train"], splits["eval"]
  funnels, ks = _funnel_config(cfg, facts, len(db["label"]))
  index, options = _funnel_index(cfg)
  kw = (dict(index=index, index_options=options) if index
        else dict(db_chunk=cfg.get("db_chunk")))
  rows = adaptive.funnel_metrics(q["embedding"], q["label"], db["embedding"], db["label"],
                                 funnels, ks, field=cfg.get("_field", "funnels") + ".funnels",
                                 **kw)
  d = db["embedding"].shape[1]
  for fname, row in rows.items():
    row["stages"] = [[d, ks[-1]]] if fname == "exact" else [list(s) for s in funnels[fname]]
  return {}, {"funnel": rows}


def _quantized_kinds(cfg, name: str = "<name>") -> list[str]:
  kinds = cfg.get("kinds", ["int8", "binary"])
  kinds = [kinds] if isinstance(kinds, str) else list(kinds)
  bad = [k for k in kinds if k not in quantize.KINDS]
  if not kinds or bad:
    raise ValueError(f"config.evals.{name}.kinds={kinds!r} must be a non-empty list of "
                     f"{list(quantize.KINDS)}, e.g. ['int8', 'binary'].")
  return kinds


def _quantized(cfg, facts, splits):
  """knn_top1_<kind> (knn{k}_top1_<kind> for k > 1) with int8 / 1-bit prefixes.

  Config: kinds=['int8', 'binary'], k=1. Section 'quantized':
  {'bytes_per_vector': {kind: {dim: bytes}}} (float32 included for reference).
  """
  dims = knn.eval_dims(facts["nesting_dims"])
  db, q = splits["train"], splits["eval"]
  k = int(cfg.get("k", 1))
  kinds = _quantized_kinds(cfg)
  metrics = {}
  for kind in kinds:
    name = f"knn_top1_{kind}" if k == 1 else f"knn{k}_top1_{kind}"
    metrics[name] = quantize.quantized_knn(q["embedding"], q["label"], db["embedding"],
                                           db["label"], dims, kind, k=k)
  sizes = {kind: quantize.bytes_per_vector(dims, kind)
           for kind in ["float32"] + [k_ for k_ in kinds if k_ != "float32"]}
  return metrics, {"quantized": {"bytes_per_vector": sizes}}


_PROBES = ("linear", "knn")


def _baseline_options(cfg, facts, name: str = "<name>"):
  field = f"config.evals.{name}"
  methods = cfg.get("methods", list(baselines.METHODS))
  methods = [methods] if isinstance(methods, str) else list(methods)
  if not methods or any(m not in baselines.METHODS for m in methods):
    raise ValueError(f"{field}.methods={methods!r} must be a non-empty list of "
                     f"{list(baselines.METHODS)}.")
  probes = cfg.get("probes", list(_PROBES))
  probes = [probes] if isinstance(probes, str) else list(probes)
  if not probes or any(p not in _PROBES for p in probes):
    raise ValueError(f"{field}.probes={probes!r} must be a non-empty list of {list(_PROBES)}.")
  dims = cfg.get("dims") or list(facts["nesting_dims"])
  d = int(facts["nesting_dims"][-1])
  try:
    dims = sorted({int(m) for m in dims})
  except (TypeError, ValueError):
    dims = []
  if not dims or dims[0] < 1 or dims[-1] > d:
    raise ValueError(f"{field}.dims={cfg.get('dims')!r} must be dims in [1, {d}] (the "
                     "embedding size), e.g. the nesting dims (the default).")
  return methods, probes, dims


def _baseline(cfg, facts, splits):
  """svd_/random_ x linear_/knn_top1: SVD (PCA) and random-feature projections
  of *this* model's full embedding (`baselines.py`).

  Config: methods=['svd', 'random'], probes=['linear', 'knn'], dims (default
  the nesting dims), seed=0, center=True, steps=100, l2=1e-4. The MRL paper
  applies them to the embedding of the full-dim FF model (`mrl.mode='ff'`);
  `python -m mrl_jax.reproduce` runs this evaluator on that model.
  """
  methods, probes, dims = _baseline_options(cfg, facts)
  train, ev = splits["train"], splits["eval"]
  seed, center = int(cfg.get("seed", 0)), bool(cfg.get("center", True))
  out = {}
  for method in methods:
    if "linear" in probes:
      out[f"{method}_linear_top1"] = baselines.baseline_linear(
          train, ev, dims, method, seed=seed, center=center,
          steps=int(cfg.get("steps", 100)), l2=float(cfg.get("l2", 1e-4)))
    if "knn" in probes:
      out[f"{method}_knn_top1"] = baselines.baseline_knn(train, ev, dims, method, seed=seed,
                                                         center=center)
  return out


def _plain(x):
  """ConfigDict / tuple trees -> plain lists and dicts (for messages and JSON)."""
  if hasattr(x, "items"):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


EVALUATORS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    # type: (function, splits it needs)
    "linear": (_linear, ("eval",)),
    "knn": (_knn, ("eval", "train")),              # k=[1, 5]: 1-NN and 5-NN vote
    "retrieval": (_retrieval, ("eval", "train")),  # ks=[10, 25, 50, 100]
    # Image-text models (dual encoders):
    "zeroshot": (_zeroshot, ("eval",)),            # class_names, templates
    "image_text": (_image_text, ("eval",)),        # num_images, ks=[1, 5, 10]
    # Adaptive inference and baselines (MRL paper sections 4.2, 5, 4.1):
    "adaptive": (_adaptive, ("eval",)),            # holdout=0.5, seeds=5 -> results['adaptive']
    "funnel": (_funnel, ("eval", "train")),        # funnels={name: [(dim, K)]}, ks=[10] -> results['funnel']
    "quantized": (_quantized, ("eval", "train")),  # kinds=['int8', 'binary'] -> knn_top1_<kind>
    "baseline": (_baseline, ("eval", "train")),    # methods=['svd', 'random'] -> svd_linear_top1, ...
}
_NEEDS_TEXT_TOWER = ("zeroshot", "image_text")
# Evaluators that compare predictions or neighbours with class labels.
_NEEDS_LABELS = ("linear", "knn", "retrieval", "zeroshot", "adaptive", "quantized", "baseline")
_NEEDS_HEADS = ("linear", "adaptive")  # read the trained classifier heads' logits
_SECTIONS = ("adaptive", "funnel", "quantized")  # top-level results.json entries


def check_evals(config, facts) -> int:
  """Checks every config.evals.<name> before anything is embedded or trained.

  Returns the number of neighbours the kNN-based evaluators need (0: none).
  """
  dataset = config.get("dataset", {})
  train_split, eval_split = dataset.get("train_split"), dataset.get("eval_split")
  num_examples = getattr(facts.get("dataset"), "num_examples", None) or {}
  num_db, num_eval = num_examples.get(train_split), num_examples.get(eval_split)
  need = 0
  dual = config.get("model", {}).get("name") == "dual_encoder"
  mode = config.get("mrl", {}).get("mode")
  head_dims = list(facts.get("head_dims") or facts["nesting_dims"])
  sections = {}
  for name, cfg in (config.get("evals", {}) or {}).items():
    kind = cfg.get("type")
    if kind not in EVALUATORS:
      raise ValueError(f"config.evals.{name}.type={kind!r} is not one of "
                       f"{sorted(EVALUATORS)}.")
    if kind in _SECTIONS:
      if kind in sections:
        raise ValueError(f"config.evals.{sections[kind]} and config.evals.{name} both have "
                         f"type {kind!r}, whose results go to one results[{kind!r}] "
                         "section. Fix: keep one of them.")
      sections[kind] = name
    if kind in _NEEDS_TEXT_TOWER and not dual:
      raise ValueError(f"config.evals.{name}.type={kind!r} needs a text tower "
                       "(config.model.name='dual_encoder').")
    if kind in _NEEDS_HEADS and dual:
      raise ValueError(
          f"config.evals.{name}.type={kind!r} reads the trained classifier heads; a "
          "dual encoder has none. Use 'zeroshot' (and 'knn') instead.")
    if kind in _NEEDS_LABELS and "label_key" in dataset and not dataset.get("label_key"):
      raise ValueError(
          f"config.evals.{name}.type={kind!r} scores predictions against class labels, "
          "but config.dataset.label_key is None (unlabelled data). Fix: set "
          f"config.dataset.label_key, or remove config.evals.{name} (image-text data "
          "without labels: use type='image_text').")
    if kind == "zeroshot":
      zeroshot.prompts(["x"], _templates(cfg))  # bad templates fail now
      if facts.get("dataset") is not None:
        names = _class_names(cfg, facts)
        num = dataset.get("num_classes") or getattr(facts["dataset"], "num_classes", None)
        if num and len(names) != num:
          raise ValueError(
              f"config.evals.{name}.class_names has {len(names)} names but the "
              f"dataset has {num} classes (config.dataset.num_classes / its label "
              "feature); give one name per class, in label order.")
    if kind == "image_text" and not dataset.get("text_key"):
      raise ValueError(f"config.evals.{name}.type='image_text' needs captions: set "
                       "config.dataset.text_key.")
    if kind == "knn":
      need = max(need, _knn_ks(cfg, num_db, name)[-1])
    elif kind == "retrieval":
      need = max(need, retrieval.check_ks(cfg.get("ks", retrieval.DEFAULT_KS), num_db,
                                          field=f"config.evals.{name}.ks")[-1])
    elif kind == "adaptive":
      if len(head_dims) < 2:
        raise ValueError(
            f"config.evals.{name}.type='adaptive' cascades over classifier heads at "
            f"several dims, but config.mrl.mode={mode!r} has a head at {head_dims} only. "
            f"Fix: use config.mrl.mode='mrl' or 'mrl_e', or remove config.evals.{name}.")
      adaptive.check_holdout(num_eval, cfg.get("holdout", 0.5),
                             f"config.evals.{name}.holdout")
      _adaptive_seeds(cfg, name)
      _adaptive_grid(cfg, name)
      tolerance = cfg.get("tolerance", adaptive.DEFAULT_TOLERANCE)
      if not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ValueError(f"config.evals.{name}.tolerance={tolerance!r} must be an accuracy "
                         "difference in [0, 1), e.g. 0.005 (half a point).")
      budgets = cfg.get("budgets")
      if budgets is not None and (not isinstance(budgets, (list, tuple)) or not budgets or any(
          not isinstance(b, (int, float)) or b <= 0 for b in budgets)):
        raise ValueError(f"config.evals.{name}.budgets={budgets!r} must be a non-empty list "
                         "of positive expected-dims budgets, or None (the eval dims).")
    elif kind == "funnel":
      _funnel_config(cfg, facts, num_db, name)
      _funnel_index(cfg, name)
    elif kind == "quantized":
      _quantized_kinds(cfg, name)
      k = cfg.get("k", 1)
      if (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
          or (num_db is not None and k > num_db)):
        raise ValueError(f"config.evals.{name}.k={k!r} must be an int in [1, "
                         f"{num_db or 'the train split size'}], e.g. 1.")
    elif kind == "baseline":
      _baseline_options(cfg, facts, name)
  return need


def evaluate(config, facts, task, state, mesh, *, step: int,
             outdir: epath.PathLike | None = None) -> dict[str, Any]:
  evals = config.get("evals", {}) or {}
  num_neighbours = check_evals(config, facts)
  needed = set()
  for cfg in evals.values():
    needed |= set(EVALUATORS[cfg["type"]][1])
  types = {cfg["type"] for cfg in evals.values()}
  splits: dict[str, Any] = {"eval_split": config.dataset.eval_split}
  if "eval" in needed:
    splits["eval"] = embed_split(config, task, state, mesh, config.dataset.eval_split,
                                 with_logits=True, with_text=embeds_captions(config))
    # Labels the heads cannot predict fail here, before any other work.
    for name, cfg in evals.items():
      if cfg["type"] in _NEEDS_HEADS and "logits" in splits["eval"]:
        check_head_labels(splits["eval"]["label"], splits["eval"]["logits"].shape[-1],
                          split=config.dataset.eval_split,
                          evaluator=f"config.evals.{name} (type {cfg['type']!r})")
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
  sections: dict[str, Any] = {}
  for name, cfg in evals.items():
    fn = EVALUATORS[cfg["type"]][0]
    t0 = time.perf_counter()
    out = fn(dict(_plain(cfg), _field=f"config.evals.{name}"), facts, splits)
    logging.info("config.evals.%s (%s): %.1f s", name, cfg["type"], time.perf_counter() - t0)
    out, extra = out if isinstance(out, tuple) else (out, {})
    for metric, per_dim in out.items():
      metrics[metric] = {str(d): float(v) for d, v in sorted(per_dim.items())}
    sections.update(extra)
  results = {
      "step": int(step),
      "mode": config.mrl.mode,
      "nesting_dims": list(facts["nesting_dims"]),
      "eval_dims": knn.eval_dims(facts["nesting_dims"]),
      "metrics": metrics,
      **json_safe(sections),
  }
  for metric, per_dim in metrics.items():
    logging.info("step %d %s: %s", step, metric,
                 "  ".join(f"{d}:{100 * v:.2f}" for d, v in per_dim.items()))
  if outdir is not None and jax.process_index() == 0:
    write_outputs(results, epath.Path(outdir), title=config.get("name", ""))
  return results
