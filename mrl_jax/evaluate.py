"""Evaluation at every dimension.

Builds the evaluators named in `config.evals` (`mrl_jax.evaluators.REGISTRY`;
each checks its own options), embeds the splits they read once (each process
its slice, padded batches masked), and runs them. Each returns `{metric:
{dim: value}}` and maybe a section of its own; the merged result is written
as `results.json`, `report.md` and `accuracy_vs_dim.png` (schema:
docs/ARCHITECTURE.md) by `mrl_jax.report`.
"""
from __future__ import annotations

import functools

import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from mrl_jax import sharding
from mrl_jax.data import input_pipeline
from mrl_jax import evaluators
from mrl_jax import prefix
from mrl_jax.evaluators import base
from mrl_jax.report import json_safe
from mrl_jax.report import write_outputs


# ----------------------------------------------------------------------------
# Embedding the splits.
# ----------------------------------------------------------------------------
def _local_rows(x: jax.Array, axis: int = 0) -> np.ndarray:
  """This process's rows of a global batch array (its own examples, in order)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  parts = {}  # shards replicated over non-batch axes appear once
  for shard in x.addressable_shards:
    parts.setdefault(shard.index[axis].start or 0, shard.data)
  return np.concatenate([np.asarray(parts[k]) for k in sorted(parts)], axis=axis)


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
                with_text: bool = False) -> base.Split:
  """Embeds this process's slice of `split`: a `base.Split` whose local rows are
  {'embedding': [n, d] f32, 'label': [n] int, 'logits': [M, n, C]?,
  'text_embedding': [n, K, d]?, 'text_mask': [n, K]?} (text: the first K
  captions of each example, for image-text data). No host holds other
  processes' rows until an evaluator reads the whole split."""
  batch_size = config.get("eval_batch_size", config.batch_size)
  batch_sharding = sharding.batch_sharding(mesh)
  with_logits = with_logits and task.has_logits
  forward = make_embed_step(task, with_logits=with_logits)
  forward_text = make_embed_text_step(task)
  outs = {"embedding": [], "label": [], "logits": [], "text_embedding": [], "text_mask": []}
  for batch in input_pipeline.create_eval_iterator(config, split, batch_size,
                                                   with_text=with_text):
    keep = np.asarray(batch["mask"]).astype(bool)  # this process's rows, padding masked
    g = input_pipeline.make_global_batch(batch, batch_sharding)
    logits, emb = forward(state["params"], state["rest"], g["image"])
    outs["embedding"].append(_local_rows(emb)[keep])
    outs["label"].append(np.asarray(batch["label"])[keep])
    if with_logits:
      outs["logits"].append(_local_rows(logits, axis=1)[:, keep])
    if with_text:
      text_emb = forward_text(state["params"], state["rest"], g["text"])
      outs["text_embedding"].append(_local_rows(text_emb)[keep])
      outs["text_mask"].append(np.asarray(batch["text_mask"])[keep])
  local = {"embedding": np.concatenate(outs["embedding"]).astype(np.float32),
           "label": np.concatenate(outs["label"])}
  if with_logits:
    local["logits"] = np.concatenate(outs["logits"], axis=1)
  if with_text:
    local["text_embedding"] = np.concatenate(outs["text_embedding"]).astype(np.float32)
    local["text_mask"] = np.concatenate(outs["text_mask"]).astype(bool)
  counts = [len(local["label"])]
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.process_allgather(np.int64(counts[0]))).reshape(-1)
  return base.Split(local, counts)


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
# Evaluators: config.evals.<name> = dict(type=<a key of evaluators.REGISTRY>, ...).
# ----------------------------------------------------------------------------
def context(config, facts) -> base.Context:
  """What the evaluators check their options against, from the config and dataset."""
  dataset = config.get("dataset", {})
  info = facts.get("dataset")
  num_examples = getattr(info, "num_examples", None) or {}
  names = None
  if info is not None:  # known: () when the label feature has no names
    names = tuple(getattr(info, "class_names", None) or ())
  return base.Context(
      nesting_dims=tuple(int(m) for m in facts["nesting_dims"]),
      head_dims=tuple(int(m) for m in (facts.get("head_dims") or facts["nesting_dims"])),
      num_train=num_examples.get(dataset.get("train_split")),
      num_eval=num_examples.get(dataset.get("eval_split")),
      eval_split=dataset.get("eval_split") or "eval",
      mode=config.get("mrl", {}).get("mode"),
      class_names=names,
      num_classes=dataset.get("num_classes") or getattr(info, "num_classes", None))


def check_evals(config, facts) -> dict[str, base.Evaluator]:
  """Builds every config.evals.<name>, checking it, before anything is embedded or trained."""
  dataset = config.get("dataset", {})
  dual = config.get("model", {}).get("name") == "dual_encoder"
  ctx = context(config, facts)
  built, sections = {}, {}
  for name, cfg in (config.get("evals", {}) or {}).items():
    field = f"config.evals.{name}"
    kind = cfg.get("type")
    cls = evaluators.get(kind, field)
    if cls.section:
      if cls.section in sections:
        raise ValueError(f"config.evals.{sections[cls.section]} and {field} both have type "
                         f"{kind!r}, whose results go to one results[{cls.section!r}] "
                         "section. Fix: keep one of them.")
      sections[cls.section] = name
    if cls.needs_text_tower and not dual:
      raise ValueError(f"{field}.type={kind!r} needs a text tower "
                       "(config.model.name='dual_encoder').")
    if cls.needs_heads and dual:
      raise ValueError(
          f"{field}.type={kind!r} reads the trained classifier heads; a dual encoder has "
          "none. Use 'zeroshot' (and 'knn') instead.")
    if cls.needs_labels and "label_key" in dataset and not dataset.get("label_key"):
      raise ValueError(
          f"{field}.type={kind!r} scores predictions against class labels, but "
          "config.dataset.label_key is None (unlabelled data). Fix: set "
          f"config.dataset.label_key, or remove {field} (image-text data without "
          "labels: use type='image_text').")
    if cls.needs_captions and not dataset.get("text_key"):
      raise ValueError(f"{field}.type={kind!r} needs captions: set config.dataset.text_key.")
    built[name] = cls(base.plain(cfg), ctx, field)
  return built


def num_neighbours(built: dict[str, base.Evaluator]) -> int:
  """The nearest neighbours the kNN-based evaluators read from the shared search."""
  return max([e.neighbours for e in built.values()], default=0)


def evaluate(config, facts, task, state, mesh, *, step: int,
             outdir: epath.PathLike | None = None) -> dict[str, Any]:
  built = check_evals(config, facts)
  needed = {split for e in built.values() for split in e.splits}
  k = num_neighbours(built)
  data = base.Data(num_neighbours=k)
  if "eval" in needed:
    data.eval = embed_split(config, task, state, mesh, config.dataset.eval_split,
                            with_logits=any(e.needs_heads for e in built.values()),
                            with_text=embeds_captions(config))
    for e in built.values():  # e.g. labels the heads cannot predict: before other work
      e.check_eval(data)
  if any(e.needs_text_tower for e in built.values()):
    data.embed_texts = lambda texts: embed_texts(config, task, state, mesh, texts)
  if "train" in needed:
    data.train = embed_split(config, task, state, mesh, config.dataset.train_split,
                             with_logits=False)
  if k and k > data.train.num_rows:  # only when the dataset facts had no split size
    num_db = data.train.num_rows
    raise ValueError(
        f"config.evals asks for the {k} nearest neighbours, but the "
        f"{config.dataset.train_split!r} split has only {num_db} examples. Fix: "
        f"lower config.evals.<name>.k / .ks to at most {num_db}.")
  metrics: dict[str, dict[str, float]] = {}
  sections: dict[str, Any] = {}
  for name, evaluator in built.items():
    t0 = time.perf_counter()
    out = evaluator.run(data)
    logging.info("config.evals.%s (%s): %.1f s", name, config.evals[name]["type"],
                 time.perf_counter() - t0)
    out, extra = out if isinstance(out, tuple) else (out, {})
    for metric, per_dim in out.items():
      metrics[metric] = {str(d): float(v) for d, v in sorted(per_dim.items())}
    sections.update(extra)
  results = {
      "step": int(step),
      "mode": config.mrl.mode,
      "nesting_dims": list(facts["nesting_dims"]),
      "eval_dims": prefix.eval_dims(facts["nesting_dims"]),
      "metrics": metrics,
      **json_safe(sections),
  }
  for metric, per_dim in metrics.items():
    logging.info("step %d %s: %s", step, metric,
                 "  ".join(f"{d}:{100 * v:.2f}" for d, v in per_dim.items()))
  if outdir is not None and jax.process_index() == 0:
    write_outputs(results, epath.Path(outdir), title=config.get("name", ""))
  return results
