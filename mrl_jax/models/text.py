"""BERT-style text encoder whose embedding is the Matryoshka representation.

The text tower of an ALIGN-style dual encoder (Jia et al., 2021, use
BERT-Base): token + learned position embeddings, embedding LayerNorm,
transformer blocks, final LayerNorm, pool, then a *linear* representation
layer to the embedding z [B, d] whose prefixes the nesting slices (linear
for the same reason as in `vit`).

Input is WordPiece ids [B, L] from `mrl_jax.data.tokenizer`: [CLS] text
[SEP] then [PAD] = 0, so the padding mask is `ids != 0`. Padded keys are
never attended to and never pooled, so appending padding does not change z.
Pooling: 'cls' takes the first token (BERT's [CLS]); 'last' the last real
token (position sum(mask) - 1, the [SEP]); 'mean' averages the real tokens.

Differences from BERT by default: the blocks are pre-LN (x + MHA(LN(x)))
like `vit`'s, where BERT's are post-LN: pre-LN trains stably from scratch
without a long warmup; there is no token-type (segment) embedding (one
segment only); GELU is the tanh approximation and LayerNorm eps 1e-6. BERT's
own numerics are options, for its checkpoints (`mrl_jax.pretrained`):
`post_ln=True` (no final LayerNorm then: BERT's last block ends in one),
`type_vocab_size=2`, `mlp_activation='gelu_exact'`, `layernorm_eps=1e-12`.
There is no attention-weight dropout.

Parameters carry the same logical axis names as ViT ('embed', 'mlp',
'heads', 'kv'; None = never split) plus 'vocab' for the token embedding.
"""
from __future__ import annotations

from typing import Any

from flax import nnx
import jax.numpy as jnp

from mrl_jax import sharding
from mrl_jax.models import vit

#                 width  depth  mlp_dim  num_heads
_VARIANTS = {
    "Mu": (32, 2, 64, 2),  # CPU tests and smoke runs.
    "tiny": (128, 2, 512, 2),  # BERT-tiny and -mini (Turc et al., 2019).
    "mini": (256, 4, 1024, 4),
    "S": (512, 4, 2048, 8),  # BERT-small.
    "B": (768, 12, 3072, 12),  # BERT-Base, ALIGN's text tower.
    "L": (1024, 24, 4096, 16),
}
POOL_TYPES = ("cls", "last", "mean")
# BERT's initializer_range, for the token and position embeddings.
_EMBED_INIT = nnx.initializers.normal(stddev=0.02)
_axes = vit._axes  # pylint: disable=protected-access


def decode_variant(variant: str) -> dict[str, int]:
  """'B' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12)."""
  if variant not in _VARIANTS:
    raise ValueError(
        f"config.model.text.variant={variant!r} is not a known text encoder "
        f"variant; use one of {list(_VARIANTS)} or explicit width/depth/mlp_dim/num_heads.")
  width, depth, mlp_dim, num_heads = _VARIANTS[variant]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)


class TextEncoder(nnx.Module):
  """Transformer text encoder + linear representation layer.

  `__call__(ids [B, L] int, *, train=False)` returns `(None, aux)` with
  aux = {'embedding': z [B, d] float32, 'pre_logits': pooled [B, width]}.
  L may be anything up to `max_len`.

  Architecture comes from `variant` ('B'); explicit width / depth / mlp_dim
  / num_heads override it. `dtype` is the compute dtype, params are
  `param_dtype`. `representation_size=None` skips the representation layer:
  z = pre_logits.
  """

  def __init__(self, *, vocab_size: int, max_len: int,
               variant: str | None = None, width: int | None = None,
               depth: int | None = None, mlp_dim: int | None = None,
               num_heads: int | None = None, pool_type: str = "cls",
               representation_size: int | None, dropout: float = 0.0,
               post_ln: bool = False, type_vocab_size: int = 0,
               mlp_activation: str = "gelu_tanh", layernorm_eps: float = 1e-6,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               remat: bool = False, scan_layers: bool = False,
               rngs: nnx.Rngs):
    arch = decode_variant(variant) if variant is not None else {}
    given = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
    arch.update({k: v for k, v in given.items() if v is not None})
    missing = [k for k in given if k not in arch]
    if missing:
      raise ValueError(
          f"TextEncoder needs a variant (one of {list(_VARIANTS)}) or "
          f"explicit {missing}; got variant={variant!r}.")
    if pool_type not in POOL_TYPES:
      raise ValueError(
          f"config.model.text.pool_type={pool_type!r} is not one of {POOL_TYPES}.")
    if mlp_activation not in vit.MLP_ACTIVATIONS:
      raise ValueError(f"config.model.text.mlp_activation={mlp_activation!r} is not one "
                       f"of {tuple(vit.MLP_ACTIVATIONS)}.")
    width = arch["width"]
    self.vocab_size, self.max_len, self.width = vocab_size, max_len, width
    self.depth, self.pool_type, self.dtype = arch["depth"], pool_type, dtype
    self.representation_size = representation_size
    self.post_ln = post_ln
    norm = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, epsilon=layernorm_eps,
                scale_metadata=_axes("embed"), bias_metadata=_axes("embed"))

    self.token_embedding = nnx.Embed(
        vocab_size, width, dtype=dtype, param_dtype=param_dtype,
        embedding_init=_EMBED_INIT, rngs=rngs,
        embedding_metadata=_axes("vocab", "embed"))
    self.pos_embedding = nnx.Param(
        _EMBED_INIT(rngs.params(), (1, max_len, width), param_dtype),
        **_axes(None, None, "embed"))
    self.type_embedding = nnx.data(None)
    if type_vocab_size:
      self.type_embedding = nnx.Embed(
          type_vocab_size, width, dtype=dtype, param_dtype=param_dtype,
          embedding_init=_EMBED_INIT, rngs=rngs,
          embedding_metadata=_axes(None, "embed"))
    self.embedding_norm = nnx.LayerNorm(width, **norm)
    self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout else None)
    self.remat, self.scan_layers = remat, scan_layers
    make_block = lambda rngs: vit.Encoder1DBlock(
        width, arch["mlp_dim"], arch["num_heads"], dropout=dropout,
        dtype=dtype, param_dtype=param_dtype, activation=mlp_activation,
        epsilon=layernorm_eps, post_ln=post_ln, rngs=rngs)
    self.blocks = vit.stack_blocks(make_block, arch["depth"],
                                   scan_layers=scan_layers, rngs=rngs)
    self.encoder_norm = nnx.data(None) if post_ln else nnx.LayerNorm(width, **norm)
    self.representation = nnx.data(None)
    if representation_size is not None:
      # The embedding axis stays unsharded: heads slice prefixes of it.
      self.representation = nnx.Linear(
          width, representation_size, dtype=dtype, param_dtype=param_dtype,
          rngs=rngs, kernel_metadata=_axes("embed", None),
          bias_metadata=_axes(None))

  def __call__(self, ids, *, mask=None, token_types=None, train: bool = False):
    """(None, aux) of ids [B, L]. `mask` [B, L] (True/1 = a real token;
    default ids != 0, [PAD] being id 0) and `token_types` [B, L] (segment
    ids; default all 0) are BERT's attention_mask and token_type_ids."""
    pre_logits = self.features(ids, mask=mask, token_types=token_types, train=train)
    z = pre_logits
    if self.representation is not None:
      z = self.representation(pre_logits)  # [B, d]
    z = z.astype(jnp.float32)
    return None, {"embedding": z, "pre_logits": pre_logits}

  def features(self, ids, *, mask=None, token_types=None, train: bool = False):
    """The pooled encoder output [B, width], before the representation layer."""
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(
          f"TextEncoder takes integer token ids [batch, length]; got "
          f"{ids.dtype} {tuple(ids.shape)}.")
    b, length = ids.shape
    if length > self.max_len:
      raise ValueError(
          f"token ids of length {length} are longer than the text encoder's "
          f"max_len={self.max_len}; tokenize with max_len <= {self.max_len} "
          "or build the model with a larger max_len.")
    mask = ids != 0 if mask is None else mask.astype(bool)  # [B, L]; [PAD] is id 0.
    x = self.token_embedding(ids)  # [B, L, width]
    x = x + self.pos_embedding[:, :length].astype(x.dtype)
    if self.type_embedding is not None:
      x = x + self.type_embedding(jnp.zeros_like(ids) if token_types is None else token_types)
    x = self.embedding_norm(x)
    x = self.dropout(x, deterministic=not train)
    x = sharding.constrain_batch(x)

    def apply_block(x, block, mask):
      return sharding.constrain_batch(block(x, mask, train=train))

    x = vit.run_blocks(x, self.blocks, apply_block, remat=self.remat,
                       scan_layers=self.scan_layers, broadcast=(mask,))
    if self.encoder_norm is not None:
      x = self.encoder_norm(x)

    if self.pool_type == "cls":
      pre_logits = x[:, 0]  # [B, width]
    elif self.pool_type == "last":
      last = jnp.maximum(mask.sum(axis=1) - 1, 0)  # [B]
      pre_logits = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    else:  # mean
      weights = mask.astype(x.dtype)[..., None]  # [B, L, 1]
      count = jnp.maximum(weights.sum(axis=1, dtype=jnp.float32), 1)
      # Sum in float32: up to max_len bfloat16 terms would lose precision.
      pre_logits = ((x * weights).sum(axis=1, dtype=jnp.float32) / count).astype(x.dtype)
    return pre_logits
