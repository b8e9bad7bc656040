"""ALIGN-style dual encoder: an image tower and a text tower into one space.

Each tower ends in a linear projection to the same d (the image model's and
the text encoder's `representation` layers), and the Matryoshka nesting
applies to both embeddings: the contrastive loss of every prefix m pairs
image[:, :m] with text[:, :m], each prefix L2-normalised separately
(`mrl_jax.contrastive`).

The logit scale is learnable and stored as a log, `log_scale` = log(1/τ):
ALIGN's softmax loss starts at τ = 1 (scale 1); SigLIP's sigmoid loss at
scale t = 10 (t' = log 10) with bias b = -10. One scale (and bias) shared by
all prefixes by default, or one per prefix (`per_prefix=True`). With
`learn_temperature=False` τ stays at its initial value.
"""
from __future__ import annotations

import math
from typing import Sequence

from flax import nnx
import jax.numpy as jnp

from mrl_jax import contrastive


class DualEncoder(nnx.Module):
  """`__call__(images, text_ids, *, train)` -> (None, aux).

  aux = {'embedding': image z [B, d] f32, 'text_embedding': text z [B, d] f32}.
  `embed_images` / `embed_texts` run one tower (evaluation, zero-shot).
  """

  def __init__(self, image_tower: nnx.Module, text_tower: nnx.Module, *,
               nesting_dims: Sequence[int], kind: str = "softmax",
               temperature: float | None = None, learn_temperature: bool = True,
               bias: float | None = None, per_prefix: bool = False,
               max_scale: float | None = None):
    if kind not in contrastive.CONTRASTIVE_KINDS:
      raise ValueError(f"config.contrastive.kind={kind!r} is not one of "
                       f"{contrastive.CONTRASTIVE_KINDS}.")
    if temperature is None:
      temperature = 1.0 if kind == "softmax" else 0.1  # ALIGN; SigLIP t = 10
    if not temperature > 0:
      raise ValueError(f"config.contrastive.temperature={temperature!r} must be > 0.")
    if kind == "sigmoid" and bias is None:
      bias = -10.0  # SigLIP
    if kind == "softmax" and bias is not None:
      raise ValueError(
          f"config.contrastive.bias={bias!r} applies only to kind='sigmoid' "
          "(the softmax loss is invariant to a shared bias); unset it.")
    self.image = image_tower
    self.text = text_tower
    self.kind = kind
    self.nesting_dims = tuple(nesting_dims)
    self.max_scale = max_scale
    n = len(self.nesting_dims) if per_prefix else 1
    init = jnp.full((n,), -math.log(temperature), jnp.float32)
    meta = {"out_sharding": (None,), "eager_sharding": False}
    if learn_temperature:
      self.log_scale = nnx.Param(init, **meta)
    else:
      self.log_scale = nnx.Variable(init, **meta)  # state, not trained
    self.bias = nnx.data(None)
    if bias is not None:
      self.bias = nnx.Param(jnp.full((n,), bias, jnp.float32), **meta)

  def temperature(self):
    """τ per prefix ([1] when shared): 1 / exp(log_scale), scale clipped."""
    log_scale = self.log_scale[...]
    if self.max_scale is not None:
      log_scale = jnp.minimum(log_scale, math.log(self.max_scale))
    return jnp.exp(-log_scale)

  def loss_params(self) -> dict:
    """Keyword arguments of `contrastive.contrastive` for the current state."""
    tau = self.temperature()
    out = {"kind": self.kind, "temperature": tau[0] if tau.shape[0] == 1 else tau}
    if self.bias is not None:
      b = self.bias[...]
      out["bias"] = b[0] if b.shape[0] == 1 else b
    return out

  def embed_images(self, images, *, train: bool = False):
    _, aux = self.image(images, train=train)
    return aux["embedding"]

  def embed_texts(self, ids, *, train: bool = False):
    _, aux = self.text(ids, train=train)
    return aux["embedding"]

  def __call__(self, images, text_ids=None, *, train: bool = False):
    aux = {"embedding": self.embed_images(images, train=train)}
    if text_ids is not None:
      aux["text_embedding"] = self.embed_texts(text_ids, train=train)
    return None, aux
