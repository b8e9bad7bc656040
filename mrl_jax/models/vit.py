"""Vision Transformer (ViT) whose embedding is the Matryoshka representation.

Follows big_vision's ViT (Dosovitskiy et al., 2021): patchify with a conv,
add position embeddings, pre-LN encoder blocks, final LayerNorm, pool. Then a
*linear* representation layer maps the pooled features to the embedding z
[B, d] that the nesting applies to; the MRL head (see `mrl_jax.matryoshka`)
turns z into logits [M, B, C]. The layer is linear (big_vision's pre-logits
use tanh) because prefixes of z are sliced and renormalised: a saturating
non-linearity would waste the first features' range.

Parameters carry logical axis names ('embed', 'mlp', 'heads', 'kv'; None =
never split) that `nnx.get_partition_spec` maps to mesh axes under
`nnx.logical_axis_rules`. They are not placed when created, so the model
builds the same way on one CPU and inside a mesh; but `nnx.eval_shape` under
a mesh resolves the names, so there the rules must cover all four.
"""
from __future__ import annotations

import re
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from mrl_jax import sharding

#                 width  depth  mlp_dim  num_heads
_VARIANTS = {
    "Mu": (32, 2, 64, 2),  # CPU tests and smoke runs.
    # "Nano", for CPU demos. Two heads of 32: on 2 CPU cores N/4 at 28x28
    # trains 17% faster than with four heads of 16 (519 vs 443 images/s).
    "N": (64, 4, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}
POOL_TYPES = ("gap", "cls")
POSEMB_TYPES = ("learn", "sincos2d")
# 'gelu_tanh': the tanh approximation (big_vision, flax); 'gelu_exact': the
# erf GELU (timm's and BERT's `nn.GELU`). They differ by up to ~1e-3.
MLP_ACTIVATIONS = {"gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
                   "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False)}
# Where the final LayerNorm goes: on every token before pooling (big_vision,
# timm's 'token' pool), or on the pooled vector (timm's `fc_norm` for 'avg').
FINAL_NORMS = ("tokens", "pooled")


def decode_variant(variant: str) -> dict[str, int]:
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  match = re.fullmatch(r"([A-Za-z0-9]+)/([1-9][0-9]*)", str(variant))
  if not match or match.group(1) not in _VARIANTS:
    raise ValueError(
        f"config.model.variant={variant!r} is not a known ViT variant; use "
        f"NAME/PATCH with NAME one of {list(_VARIANTS)} and PATCH the patch "
        "size in pixels, e.g. 'B/16' or 'N/4'.")
  width, depth, mlp_dim, num_heads = _VARIANTS[match.group(1)]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=int(match.group(2)))


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0):
  """Fixed 2D sin-cos position embeddings (MoCo v3 / big_vision): [1, h*w, width]."""
  y, x = jnp.mgrid[:h, :w]
  omega = jnp.arange(width // 4) / max(width // 4 - 1, 1)
  omega = 1.0 / temperature**omega  # [width/4]
  y = jnp.einsum("m,d->md", y.flatten(), omega)
  x = jnp.einsum("m,d->md", x.flatten(), omega)
  pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return pe[None]


def _axes(*names):
  """Variable metadata: logical axis names, no placement at creation."""
  return {"out_sharding": names, "eager_sharding": False}


class MlpBlock(nnx.Module):
  """Dense -> GELU -> Dense, as in the original ViT."""

  def __init__(self, width: int, mlp_dim: int, *, dropout: float, dtype,
               param_dtype, activation: str = "gelu_tanh", rngs: nnx.Rngs):
    self.activation = activation
    dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                 kernel_init=nnx.initializers.xavier_uniform(),
                 bias_init=nnx.initializers.normal(stddev=1e-6))
    self.fc1 = nnx.Linear(width, mlp_dim, kernel_metadata=_axes("embed", "mlp"),
                          bias_metadata=_axes("mlp"), **dense)
    self.fc2 = nnx.Linear(mlp_dim, width, kernel_metadata=_axes("mlp", "embed"),
                          bias_metadata=_axes("embed"), **dense)
    self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout else None)

  def __call__(self, x, *, train: bool, key=None):  # [B, N, width] -> same
    x = MLP_ACTIVATIONS[self.activation](self.fc1(x))
    x = self.dropout(x, deterministic=not train, rngs=key)
    return self.fc2(x)


def _attention(query, key, value, mask=None, **unused):
  # jax.nn.dot_product_attention picks a fused kernel (cuDNN flash attention
  # on GPU) where one exists and the plain XLA softmax(QK^T)V otherwise.
  # Attention-weight dropout is not used (big_vision's ViT has none either).
  # mask [B, 1, 1, L] (True = attend) lets a text encoder skip padded keys.
  del unused
  return jax.nn.dot_product_attention(query, key, value, mask=mask)


class Encoder1DBlock(nnx.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x)); or, with
  `post_ln` (BERT), LN(x + MHA(x)), then LN(x + MLP(x)).

  `mask` [B, N] (bool, True = a real token) keeps attention off padded
  positions; None (images) attends everywhere.
  """

  def __init__(self, width: int, mlp_dim: int, num_heads: int, *,
               dropout: float, dtype, param_dtype, activation: str = "gelu_tanh",
               epsilon: float = 1e-6, post_ln: bool = False, rngs: nnx.Rngs):
    self.post_ln = post_ln
    norm = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, epsilon=epsilon,
                scale_metadata=_axes("embed"), bias_metadata=_axes("embed"))
    self.norm1 = nnx.LayerNorm(width, **norm)
    self.attn = nnx.MultiHeadAttention(
        num_heads=num_heads, in_features=width, dtype=dtype,
        param_dtype=param_dtype, kernel_init=nnx.initializers.xavier_uniform(),
        attention_fn=_attention, decode=False, rngs=rngs,
        kernel_metadata=_axes("embed", "heads", "kv"),
        bias_metadata=_axes("heads", "kv"),
        out_kernel_metadata=_axes("heads", "kv", "embed"),
        out_bias_metadata=_axes("embed"))
    self.norm2 = nnx.LayerNorm(width, **norm)
    self.mlp = MlpBlock(width, mlp_dim, dropout=dropout, dtype=dtype,
                        param_dtype=param_dtype, activation=activation, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout else None)

  def __call__(self, x, mask=None, *, train: bool, drop=None):  # [B, N, width] -> same
    """`drop` = (rate, key): this step's key for dropout, and stochastic depth
    of both residual branches at `rate`."""
    keys = [None] * 5 if drop is None else list(jax.random.split(drop[1], 5))

    def branch(y, key_drop, key_path):
      y = self.dropout(y, deterministic=not train, rngs=key_drop)
      return y if drop is None else drop_path(y, drop[0], key_path)

    mask = None if mask is None else mask[:, None, None, :]
    if self.post_ln:
      x = self.norm1(x + branch(self.attn(x, mask=mask), keys[0], keys[1]))
      return self.norm2(x + branch(self.mlp(x, train=train, key=keys[2]), keys[3], keys[4]))
    x = x + branch(self.attn(self.norm1(x), mask=mask), keys[0], keys[1])
    return x + branch(self.mlp(self.norm2(x), train=train, key=keys[2]), keys[3], keys[4])


def stack_blocks(make_block, depth: int, *, scan_layers: bool, rngs: nnx.Rngs):
  """`depth` blocks from `make_block(rngs)`: a list, or (scan_layers) one
  block whose params have a leading 'layers' axis of size depth, compiled
  once and run with a scan (compile time independent of depth)."""
  if scan_layers:
    return nnx.split_rngs(splits=depth)(nnx.vmap(
        make_block, in_axes=(0,), out_axes=0,
        transform_metadata={nnx.PARTITION_NAME: "layers"}))(rngs)
  return nnx.List([make_block(rngs) for _ in range(depth)])


def run_blocks(x, blocks, apply_block, *, remat: bool, scan_layers: bool,
               broadcast: tuple = (), per_layer: tuple = ()):
  """x <- apply_block(x, block, *broadcast, *per_layer[:, i]) for each block i
  of `stack_blocks`; `per_layer` arrays have a leading axis of size depth.

  remat recomputes each block's activations in the backward pass.
  """
  if remat:
    apply_block = nnx.remat(apply_block)
  if scan_layers:
    return nnx.scan(apply_block,
                    in_axes=(nnx.Carry, 0) + (None,) * len(broadcast) + (0,) * len(per_layer),
                    out_axes=nnx.Carry,
                    transform_metadata={nnx.PARTITION_NAME: "layers"}
                    )(x, blocks, *broadcast, *per_layer)
  for i, block in enumerate(blocks):
    x = apply_block(x, block, *broadcast, *(a[i] for a in per_layer))
  return x


def drop_path(y, rate, key):
  """Stochastic depth: each example's residual branch `y` [B, ...] is dropped
  with probability `rate` and scaled by 1 / (1 - rate) otherwise."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
  return jnp.where(mask, y / jnp.maximum(keep, 1e-6).astype(y.dtype), jnp.zeros_like(y))


class ViT(nnx.Module):
  """ViT encoder + linear representation layer + (optional) MRL head.

  `__call__(images [B, H, W, channels], *, train=False)` returns
  `(logits, aux)`: logits [M, B, C] from `head(z)` (None without a head) and
  aux = {'embedding': z [B, d] float32, 'pre_logits': pooled [B, width]}.

  Architecture comes from `variant` ('B/16'); explicit width / depth /
  mlp_dim / num_heads / patch_size override it. `dtype` is the compute dtype
  (e.g. bfloat16 for matmuls and activations); params are `param_dtype`.
  `representation_size=None` skips the representation layer: z = pre_logits.
  `num_classes` is recorded for evaluators; the classifier weights live in
  `head`. Numerics other libraries use, for their checkpoints
  (`mrl_jax.pretrained`): `mlp_activation` (`MLP_ACTIVATIONS`), `layernorm_eps`,
  `final_norm` (`FINAL_NORMS`).
  """

  def __init__(self, *, num_classes: int | None = None,
               variant: str | None = None, patch_size: int | None = None,
               width: int | None = None, depth: int | None = None,
               mlp_dim: int | None = None, num_heads: int | None = None,
               image_size: int | tuple[int, int], channels: int,
               pool_type: str = "gap", posemb: str = "learn",
               representation_size: int | None,
               head: nnx.Module | None = None, dropout: float = 0.0,
               drop_path: float = 0.0, mlp_activation: str = "gelu_tanh",
               layernorm_eps: float = 1e-6, final_norm: str = "tokens",
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               remat: bool = False, scan_layers: bool = False,
               rngs: nnx.Rngs):
    arch = decode_variant(variant) if variant is not None else {}
    given = dict(width=width, depth=depth, mlp_dim=mlp_dim,
                 num_heads=num_heads, patch_size=patch_size)
    arch.update({k: v for k, v in given.items() if v is not None})
    arch.setdefault("patch_size", 16)
    missing = [k for k in given if k not in arch]
    if missing:
      raise ValueError(
          f"ViT needs config.model.variant (e.g. 'B/16') or explicit "
          f"{missing}; got variant={variant!r}.")
    if pool_type not in POOL_TYPES:
      raise ValueError(f"config.model.pool_type={pool_type!r} is not one of {POOL_TYPES}.")
    if posemb not in POSEMB_TYPES:
      raise ValueError(f"config.model.posemb={posemb!r} is not one of {POSEMB_TYPES}.")
    if mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(f"config.model.mlp_activation={mlp_activation!r} is not one of "
                       f"{tuple(MLP_ACTIVATIONS)}.")
    if final_norm not in FINAL_NORMS:
      raise ValueError(f"config.model.final_norm={final_norm!r} is not one of {FINAL_NORMS}.")
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    p = arch["patch_size"]
    if h % p or w % p:
      raise ValueError(
          f"config.input.image_size={image_size} is not divisible by the patch "
          f"size {p} of config.model.variant={variant!r}; pick a patch size "
          "that divides the image size.")
    width = arch["width"]
    if posemb == "sincos2d" and width % 4:
      raise ValueError(
          f"config.model.posemb='sincos2d' needs a width divisible by 4, got "
          f"{width}; use posemb='learn' or another width.")

    self.num_classes = num_classes
    self.width, self.depth, self.patch_size = width, arch["depth"], p
    self.grid = (h // p, w // p)
    self.pool_type, self.posemb_type, self.dtype = pool_type, posemb, dtype
    self.final_norm = final_norm
    self.representation_size = representation_size

    self.embedding = nnx.Conv(
        channels, width, kernel_size=(p, p), strides=(p, p), padding="VALID",
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_metadata=_axes(None, None, None, "embed"),
        bias_metadata=_axes("embed"))
    if posemb == "learn":
      init = nnx.initializers.normal(stddev=width**-0.5)
      self.pos_embedding = nnx.Param(
          init(rngs.params(), (1, self.grid[0] * self.grid[1], width), param_dtype),
          **_axes(None, None, "embed"))
    if pool_type == "cls":
      self.cls = nnx.Param(jnp.zeros((1, 1, width), param_dtype),
                           **_axes(None, None, "embed"))
    self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout else None)
    self.remat, self.scan_layers = remat, scan_layers
    self.drop_path, self.dropout_rate = drop_path, dropout
    make_block = lambda rngs: Encoder1DBlock(
        width, arch["mlp_dim"], arch["num_heads"], dropout=dropout,
        dtype=dtype, param_dtype=param_dtype, activation=mlp_activation,
        epsilon=layernorm_eps, rngs=rngs)
    self.blocks = stack_blocks(make_block, arch["depth"], scan_layers=scan_layers,
                               rngs=rngs)
    self.encoder_norm = nnx.LayerNorm(
        width, dtype=dtype, param_dtype=param_dtype, rngs=rngs, epsilon=layernorm_eps,
        scale_metadata=_axes("embed"), bias_metadata=_axes("embed"))
    self.representation = nnx.data(None)
    if representation_size is not None:
      # The embedding axis stays unsharded: heads slice prefixes of it.
      self.representation = nnx.Linear(
          width, representation_size, dtype=dtype, param_dtype=param_dtype,
          rngs=rngs, kernel_metadata=_axes("embed", None),
          bias_metadata=_axes(None))
    self.head = nnx.data(head)

  def __call__(self, images, *, train: bool = False, rng=None):
    """`rng`: this step's key for dropout and stochastic depth in training
    (without one, dropout draws from the model's own RNG state)."""
    pre_logits = self.features(images, train=train, rng=rng)
    z = pre_logits
    if self.representation is not None:
      z = self.representation(pre_logits)  # [B, d]
    # Prefix norms and similarities are computed from z: keep it float32.
    z = z.astype(jnp.float32)
    logits = self.head(z) if self.head is not None else None  # [M, B, C]
    return logits, {"embedding": z, "pre_logits": pre_logits}

  def features(self, images, *, train: bool = False, rng=None):
    """The pooled encoder output [B, width] (big_vision's `pre_logits`),
    before the representation layer and the head."""
    x = self.embedding(images.astype(self.dtype))  # [B, h, w, width]
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.posemb_type == "learn":
      pe = self.pos_embedding[...]
    else:
      pe = posemb_sincos_2d(h, w, c)
    x = x + pe.astype(x.dtype)  # Cast, or a float32 param promotes bf16 compute.
    if self.pool_type == "cls":
      # The class token gets no position embedding, as in big_vision.
      cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (b, 1, c))
      x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + h*w, width]
    stochastic = train and rng is not None and (self.drop_path or self.dropout_rate)
    x = self.dropout(x, deterministic=not train,
                     rngs=jax.random.fold_in(rng, self.depth) if stochastic else None)
    # Activations stay split along the batch (FSDP all-gathers weights, never
    # activations); a no-op outside a mesh.
    x = sharding.constrain_batch(x)

    if stochastic:
      # A key per block and step; DeiT's stochastic-depth rates rising
      # linearly from 0 at the first block.
      rates = jnp.linspace(0.0, self.drop_path, self.depth)
      keys = jax.random.split(rng, self.depth)

      def apply_block(x, block, rate, key):
        return sharding.constrain_batch(block(x, train=train, drop=(rate, key)))

      per_layer = (rates, keys)
    else:
      def apply_block(x, block):
        return sharding.constrain_batch(block(x, train=train))

      per_layer = ()
    x = run_blocks(x, self.blocks, apply_block, remat=self.remat,
                   scan_layers=self.scan_layers, per_layer=per_layer)
    if self.final_norm == "tokens":
      x = self.encoder_norm(x)
    pooled = x.mean(axis=1) if self.pool_type == "gap" else x[:, 0]  # [B, width]
    return self.encoder_norm(pooled) if self.final_norm == "pooled" else pooled
