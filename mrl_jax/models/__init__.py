"""Model registry: `get_model(config, ...)` builds `config.model.name`.

Every model maps images (or text) to `(logits [M, B, C] | None, aux)` with
aux['embedding'] the float32 embedding z [B, d] that the nesting applies to.

'dual_encoder' (ALIGN-style) takes its image tower from `config.model.image`
(a ViT config: variant, pool_type, posemb, ...) and its text tower from
`config.model.text` (variant, pool_type); both project to
`config.model.representation_size`.
"""
from __future__ import annotations

from typing import Callable

from flax import nnx
import jax.numpy as jnp

from mrl_jax.models import dual_encoder
from mrl_jax.models import resnet
from mrl_jax.models import text
from mrl_jax.models import vit

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _vit(config, *, num_classes, head, channels, dtype, rngs, m=None,
         representation_size=None) -> nnx.Module:
  m = config.model if m is None else m
  return vit.ViT(
      num_classes=num_classes, variant=m.get("variant"),
      width=m.get("width"), depth=m.get("depth"), mlp_dim=m.get("mlp_dim"),
      num_heads=m.get("num_heads"), image_size=config.input.image_size,
      channels=channels, pool_type=m.get("pool_type", "gap"),
      posemb=m.get("posemb", "learn"),
      representation_size=representation_size or m.get("representation_size"),
      head=head, dropout=m.get("dropout", 0.0), drop_path=m.get("drop_path", 0.0),
      mlp_activation=m.get("mlp_activation", "gelu_tanh"),
      layernorm_eps=m.get("layernorm_eps", 1e-6), final_norm=m.get("final_norm", "tokens"),
      dtype=dtype,
      remat=m.get("remat", False), scan_layers=m.get("scan_layers", False),
      rngs=rngs)


def _check_vit(config, m=None, where="config.model"):
  m = config.model if m is None else m
  rate = m.get("drop_path", 0.0)
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
    raise ValueError(f"{where}.drop_path={rate!r} must be in [0, 1) (stochastic depth "
                     "of the last block; DeiT-B: 0.1).")
  if rate and where != "config.model":
    raise ValueError(f"{where}.drop_path={rate!r}: stochastic depth is implemented for "
                     "classification ViTs only so far.")
  if m.get("variant") is not None:
    vit.decode_variant(m.variant)
  for field, allowed in (("pool_type", vit.POOL_TYPES), ("posemb", vit.POSEMB_TYPES),
                         ("mlp_activation", tuple(vit.MLP_ACTIVATIONS)),
                         ("final_norm", vit.FINAL_NORMS)):
    if field in m and m[field] not in allowed:
      raise ValueError(f"{where}.{field}={m[field]!r} is not one of {allowed}.")


def _dual_encoder(config, *, num_classes, head, channels, dtype, rngs,
                  vocab_size: int, nesting_dims, **unused) -> nnx.Module:
  del num_classes, head, unused
  m, d = config.model, config.model.representation_size
  image_tower = _vit(config, num_classes=None, head=None, channels=channels,
                     dtype=dtype, rngs=rngs, m=m.image, representation_size=d)
  t = m.text
  text_tower = text.TextEncoder(
      vocab_size=vocab_size, max_len=config.text.max_len,
      variant=t.get("variant"), width=t.get("width"), depth=t.get("depth"),
      mlp_dim=t.get("mlp_dim"), num_heads=t.get("num_heads"),
      pool_type=t.get("pool_type", "cls"), representation_size=d,
      dropout=t.get("dropout", 0.0), post_ln=t.get("post_ln", False),
      type_vocab_size=t.get("type_vocab_size", 0),
      mlp_activation=t.get("mlp_activation", "gelu_tanh"),
      layernorm_eps=t.get("layernorm_eps", 1e-6), dtype=dtype,
      remat=t.get("remat", False), scan_layers=t.get("scan_layers", False),
      rngs=rngs)
  c = config.get("contrastive", {})
  return dual_encoder.DualEncoder(
      image_tower, text_tower, nesting_dims=nesting_dims,
      kind=c.get("kind", "softmax"), temperature=c.get("temperature"),
      learn_temperature=c.get("learn_temperature", True), bias=c.get("bias"),
      per_prefix=c.get("per_prefix", False), max_scale=c.get("max_scale"))


def _check_dual_encoder(config):
  m = config.model
  for tower in ("image", "text"):
    if tower not in m:
      raise ValueError(
          f"config.model.name='dual_encoder' needs config.model.{tower} (the "
          f"{tower} tower's config); see configs/fashion_mnist_align.py.")
  if m.image.get("name", "vit") != "vit":
    raise ValueError(f"config.model.image.name={m.image.name!r}: only 'vit' "
                     "image towers exist so far.")
  _check_vit(config, m.image, "config.model.image")
  if m.text.get("variant") is not None:
    text.decode_variant(m.text.variant)
  pool = m.text.get("pool_type", "cls")
  if pool not in text.POOL_TYPES:
    raise ValueError(f"config.model.text.pool_type={pool!r} is not one of "
                     f"{text.POOL_TYPES}.")
  act = m.text.get("mlp_activation", "gelu_tanh")
  if act not in vit.MLP_ACTIVATIONS:
    raise ValueError(f"config.model.text.mlp_activation={act!r} is not one of "
                     f"{tuple(vit.MLP_ACTIVATIONS)}.")
  # The vocabulary itself is read (or, by --mode=compile, only sized) with the
  # dataset's facts.
  if "text" not in config or not config.text.get("max_len"):
    raise ValueError("config.model.name='dual_encoder' needs config.text.vocab_path "
                     "(a WordPiece vocab.txt) and config.text.max_len.")


def _resnet(config, *, num_classes, head, channels, dtype, rngs, **unused) -> nnx.Module:
  del unused
  m = config.model
  return resnet.ResNet(
      depth=m.get("depth", 50), width=m.get("width", 64), channels=channels,
      num_classes=num_classes, stem=m.get("stem", "imagenet"),
      representation_size=m.get("representation_size"), head=head,
      zero_init_last_bn=m.get("zero_init_last_bn", False),
      bn_momentum=m.get("bn_momentum", 0.9), bn_epsilon=m.get("bn_epsilon", 1e-5),
      bn_ghost_groups=m.get("bn_ghost_groups"), dtype=dtype, rngs=rngs)


def _check_resnet(config):
  m = config.model
  resnet.check_variant(m.get("depth", 50))
  if m.get("stem", "imagenet") not in resnet.STEMS:
    raise ValueError(f"config.model.stem={m.stem!r} is not one of {resnet.STEMS} "
                     "('small': a 3x3 stride-1 stem without pooling, for 32 px images).")
  g = m.get("bn_ghost_groups")
  if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
    raise ValueError(f"config.model.bn_ghost_groups={g!r} must be a positive int "
                     "(slices of the batch normalised apart) or None (the global batch).")
  if g is not None and config.batch_size % (g * config.get("grad_accum_steps", 1)):
    raise ValueError(f"config.model.bn_ghost_groups={g} must divide the microbatch "
                     f"(config.batch_size={config.batch_size} / grad_accum_steps).")


# name: (builder, cheap config check run before any compute).
MODELS: dict[str, tuple[Callable[..., nnx.Module], Callable]] = {
    "vit": (_vit, _check_vit),
    "resnet": (_resnet, _check_resnet),
    "dual_encoder": (_dual_encoder, _check_dual_encoder),
}


def _lookup(config):
  name = config.model.name
  if name not in MODELS:
    raise ValueError(
        f"config.model.name={name!r} is not a known model; use one of "
        f"{sorted(MODELS)}.")
  dtype = config.model.get("dtype", "float32")
  if dtype not in _DTYPES:
    raise ValueError(
        f"config.model.dtype={dtype!r} is not one of {sorted(_DTYPES)}.")
  return MODELS[name], _DTYPES[dtype]


def embedding_size(config) -> int:
  """d, the size of the embedding z the nesting applies to.

  `config.model.representation_size` (a linear layer's output); a ResNet
  without one embeds with its pooled feature (2048-d for ResNet-50, as the
  MRL paper).
  """
  m = config.model
  if m.name == "resnet" and m.get("representation_size") is None:
    return resnet.feature_size(m.get("depth", 50), m.get("width", 64))
  return m.representation_size


def check_variant(config) -> None:
  """Raises ValueError for a bad model name/variant/dtype without building."""
  (_, check), _ = _lookup(config)
  check(config)


def get_model(config, *, num_classes: int | None, head: nnx.Module | None,
              channels: int, rngs: nnx.Rngs, **extra) -> nnx.Module:
  """Builds config.model for images of config.input.image_size x `channels`.

  `extra`: what a model needs beyond the image shape (the dual encoder:
  vocab_size and the nesting_dims its per-prefix temperatures follow).
  """
  (build, check), dtype = _lookup(config)
  check(config)
  return build(config, num_classes=num_classes, head=head, channels=channels,
               dtype=dtype, rngs=rngs, **extra)
