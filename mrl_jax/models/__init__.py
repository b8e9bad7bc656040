"""Model registry: `get_model(config, ...)` builds `config.model.name`.

Every model maps images (or text) to `(logits [M, B, C] | None, aux)` with
aux['embedding'] the float32 embedding z [B, d] that the nesting applies to.
"""
from __future__ import annotations

from typing import Callable

from flax import nnx
import jax.numpy as jnp

from mrl_jax.models import vit

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _vit(config, *, num_classes, head, channels, dtype, rngs) -> nnx.Module:
  m = config.model
  return vit.ViT(
      num_classes=num_classes, variant=m.get("variant"),
      width=m.get("width"), depth=m.get("depth"), mlp_dim=m.get("mlp_dim"),
      num_heads=m.get("num_heads"), image_size=config.input.image_size,
      channels=channels, pool_type=m.get("pool_type", "gap"),
      posemb=m.get("posemb", "learn"),
      representation_size=m.get("representation_size"), head=head,
      dropout=m.get("dropout", 0.0), dtype=dtype,
      remat=m.get("remat", False), scan_layers=m.get("scan_layers", False),
      rngs=rngs)


def _check_vit(config):
  m = config.model
  if m.get("variant") is not None:
    vit.decode_variant(m.variant)
  for field, allowed in (("pool_type", vit.POOL_TYPES), ("posemb", vit.POSEMB_TYPES)):
    if field in m and m[field] not in allowed:
      raise ValueError(f"config.model.{field}={m[field]!r} is not one of {allowed}.")


# name: (builder, cheap config check run before any compute).
MODELS: dict[str, tuple[Callable[..., nnx.Module], Callable]] = {
    "vit": (_vit, _check_vit),
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


def check_variant(config) -> None:
  """Raises ValueError for a bad model name/variant/dtype without building."""
  (_, check), _ = _lookup(config)
  check(config)


def get_model(config, *, num_classes: int, head: nnx.Module | None,
              channels: int, rngs: nnx.Rngs) -> nnx.Module:
  """Builds config.model for images of config.input.image_size x `channels`."""
  (build, check), dtype = _lookup(config)
  check(config)
  return build(config, num_classes=num_classes, head=head, channels=channels,
               dtype=dtype, rngs=rngs)
