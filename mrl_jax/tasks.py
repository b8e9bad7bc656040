"""Tasks: what a model is trained to do, as pure functions of the state.

A task is a model plus a loss. The trainer, checkpoints, data and mesh are
the same for all: `train.make_train_step` calls `task.loss`, and
`evaluate` calls `task.embed_images` (and `task.embed_texts`).

* `ClassificationTask` (every image model): the nested softmax
  cross-entropy of the MRL / MRL-E / FF head, one term per head dim.
* `ContrastiveTask` (`config.model.name='dual_encoder'`): the nested
  contrastive loss between the image and text embeddings of a batch, one
  term per nesting dim (mrl) or the full dim only (ff), computed over the
  global batch.
"""
from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from mrl_jax import contrastive
from mrl_jax import matryoshka
from mrl_jax import models
from mrl_jax.data import preprocess


def get_task(config, facts) -> "ClassificationTask | ContrastiveTask":
  if is_contrastive(config):
    return ContrastiveTask(config, facts)
  return ClassificationTask(config, facts)


def is_contrastive(config) -> bool:
  return config.model.name == "dual_encoder"


def check_contrastive_config(config) -> None:
  """Rejects contrastive options that don't apply, before any compute."""
  if not config.dataset.get("text_key"):
    raise ValueError(
        "config.model.name='dual_encoder' trains on image-text pairs, but "
        f"config.dataset.text_key={config.dataset.get('text_key')!r}: set it to the "
        "dataset's text feature (e.g. 'captions', or 'captions/text' for "
        "coco_captions).")
  if config.mrl.mode == "mrl_e":
    raise ValueError(
        "config.mrl.mode='mrl_e' ties classifier weights across dims; a dual "
        "encoder has no classifier. Use 'mrl' (a loss on every prefix) or 'ff'.")
  c = config.get("contrastive", {})
  if "impl" in c:
    raise ValueError(
        f"config.contrastive.impl={c['impl']!r}: this field was removed. The native "
        "CPU contrastive kernel is gone and XLA computes the loss on every backend; "
        "delete contrastive.impl from the config (and do not pass "
        "--config.contrastive.impl).")
  kind = c.get("kind", "softmax")
  if kind not in contrastive.CONTRASTIVE_KINDS:
    raise ValueError(f"config.contrastive.kind={kind!r} is not one of "
                     f"{contrastive.CONTRASTIVE_KINDS}.")
  if kind == "softmax" and c.get("bias") is not None:
    raise ValueError(
        f"config.contrastive.bias={c.bias!r} applies only to kind='sigmoid'; "
        "unset it (--config.contrastive.bias=None) or use the sigmoid loss.")
  if kind == "sigmoid" and c.get("label_smoothing", 0.0):
    raise ValueError(
        f"config.contrastive.label_smoothing={c.label_smoothing!r} applies only "
        "to kind='softmax'; set it to 0.0 for the sigmoid loss.")
  block = c.get("block_size")
  if block is not None and (not isinstance(block, int) or isinstance(block, bool)
                            or block <= 0):
    raise ValueError(
        f"config.contrastive.block_size={block!r} must be a positive int (columns per "
        "block of the loss; more than the per-device batch is clamped to it) or None "
        "for the default.")
  if kind == "sigmoid" and c.get("max_scale") is not None:
    raise ValueError("config.contrastive.max_scale (CLIP's clip of the logit scale) "
                     "applies only to kind='softmax'.")


class _Task:
  """Shared plumbing: build, split, init, merge."""

  def __init__(self, config, facts):
    self.config, self.facts = config, facts
    abstract_model = nnx.eval_shape(lambda: self.build_model(rngs=nnx.Rngs(0)))
    self.graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]

  def build_model(self, *, rngs: nnx.Rngs) -> nnx.Module:
    raise NotImplementedError

  def init_state(self, tx):
    model = self.build_model(rngs=nnx.Rngs(self.config.seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest,
            "opt_state": tx.init(params)}

  def model_images(self, images):
    """The model's input: uint8 pixels (what the input pipeline sends) become
    float32 `(x / 255 - mean) / std` here, on the device (config.input.mean /
    std; [-1, 1] by default); float images are taken as already normalised."""
    if images.dtype != jnp.uint8:
      return images
    return preprocess.normalize(images, self.config.input.get("mean"),
                                self.config.input.get("std"))

  def model(self, params, rest) -> nnx.Module:
    # Fresh variables (copy): a training call may update running statistics
    # inside a transformation, which NNX refuses on variables made outside it.
    return nnx.merge(self.graphdef, params, rest, copy=True)

  def updated_rest(self, params, rest, updates):
    """`rest` with the running statistics (BatchNorm's) a training call changed."""
    if not jax.tree.leaves(updates):
      return rest
    model = self.model(params, rest)
    nnx.update(model, updates)
    return nnx.split(model, nnx.Param, ...)[2]


class ClassificationTask(_Task):
  """Image model + MRL head; loss = sum_m c_m CE(logits_m, label)."""

  has_logits = True
  has_text = False

  def build_model(self, *, rngs):
    config, facts = self.config, self.facts
    head = matryoshka.make_head(
        config.mrl.mode, facts["nesting_dims"], config.dataset.num_classes,
        ff_dim=facts["ff_dim"], rngs=rngs)
    return models.get_model(
        config, num_classes=config.dataset.num_classes, head=head,
        channels=facts["dataset"].image_shape[-1], rngs=rngs)

  def apply(self, params, rest, images, *, train: bool):
    # (logits [M, B, C], aux)
    return self.model(params, rest)(self.model_images(images), train=train)


  def embed_images(self, params, rest, images):
    """(logits [M, B, C], embedding [B, d]) of eval images."""
    logits, aux = self.apply(params, rest, images, train=False)
    return logits, aux["embedding"]

  def loss(self, params, rest, batch, rng=None
           ) -> tuple[jax.Array, tuple[jax.Array, dict, Any]]:
    """(loss, (per-dim loss [M], extra metrics, running-statistics updates)).

    `rng`: this (micro)batch's key for the model's stochastic layers (dropout,
    stochastic depth); models without any ignore it."""
    weights = jnp.asarray(self.facts["weights"], jnp.float32)
    model = self.model(params, rest)
    logits, _ = model(self.model_images(batch["image"]), train=True, rng=rng)
    per_dim = matryoshka.softmax_ce_per_dim(
        logits, batch["label"], label_smoothing=self.config.mrl.get("label_smoothing", 0.0))
    return jnp.sum(weights * per_dim), (per_dim, {}, nnx.state(model, nnx.BatchStat))


class ContrastiveTask(_Task):
  """Dual encoder; loss = sum_m c_m contrastive(image[:, :m], text[:, :m])."""

  has_logits = False
  has_text = True

  def build_model(self, *, rngs):
    config, facts = self.config, self.facts
    return models.get_model(
        config, num_classes=None, head=None,
        channels=facts["dataset"].image_shape[-1], rngs=rngs,
        vocab_size=facts["vocab_size"], nesting_dims=facts["head_dims"])

  def apply(self, params, rest, images, text=None, *, train: bool):
    return self.model(params, rest)(self.model_images(images), text, train=train)

  def embed_images(self, params, rest, images):
    return None, self.model(params, rest).embed_images(self.model_images(images),
                                                       train=False)

  def embed_texts(self, params, rest, ids):
    return self.model(params, rest).embed_texts(ids, train=False)

  def loss(self, params, rest, batch, rng=None
           ) -> tuple[jax.Array, tuple[jax.Array, dict[str, Any], Any]]:
    del rng  # no stochastic layers in the dual encoder's towers
    weights = jnp.asarray(self.facts["weights"], jnp.float32)
    model = self.model(params, rest)
    _, aux = model(self.model_images(batch["image"]), batch["text"], train=True)
    loss_params = model.loss_params()
    c = self.config.get("contrastive", {})
    if loss_params["kind"] == "softmax":
      loss_params["label_smoothing"] = c.get("label_smoothing", 0.0)
    per_dim = contrastive.contrastive_per_dim(
        aux["embedding"], aux["text_embedding"], self.facts["head_dims"],
        block_size=c.get("block_size"), **loss_params)
    extra = {"temperature": jnp.mean(loss_params["temperature"]),
             "text_truncated": jnp.mean(batch["text_truncated"].astype(jnp.float32)),
             "text_empty": jnp.mean(batch["text_empty"].astype(jnp.float32))}
    if "bias" in loss_params:
      extra["bias"] = jnp.mean(loss_params["bias"])
    return jnp.sum(weights * per_dim), (per_dim, extra, nnx.state(model, nnx.BatchStat))
