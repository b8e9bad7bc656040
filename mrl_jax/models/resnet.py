"""ResNet (He et al., 2016) whose pooled feature is the Matryoshka representation.

torchvision's layout ("v1.5": the stride of a bottleneck block is in its 3x3
conv): a 7x7/2 conv stem with max pooling (or, for small images, a 3x3/1
conv without pooling), four stages of basic (18, 34) or bottleneck (50, 101,
152) blocks, global average pooling. The pooled feature (2048-d for
ResNet-50) is the embedding z that the nesting applies to, as in the MRL
paper; `representation_size` adds a linear layer instead.

BatchNorm: in training, each batch's mean and variance over (N, H, W),
computed in float32. Under `jax.jit` with the batch split over devices these
are statistics of the *global* batch (XLA sums the per-device partial sums),
so a step on 8 devices equals a step on one. `ghost_groups = G` instead
normalises each of G equal slices of the batch by its own statistics (with
G = the number of batch shards, each device's own rows, no communication).
Running averages (`nnx.BatchStat`, saved with the model) are what
evaluation uses.

Parameters carry logical axis names: convolution kernels
(None, None, 'conv_in', 'conv_out'), BatchNorm vectors ('conv_out',), which
`mrl_jax.sharding` leaves unsplit by default (FSDP still splits a divisible
dim).
"""
from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from mrl_jax import sharding

# depth: (block kind, blocks per stage)
VARIANTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STEMS = ("imagenet", "small")


def _axes(*names):
  return {"out_sharding": names, "eager_sharding": False}


def feature_size(depth: int, width: int = 64) -> int:
  """The pooled feature's size: 8 x width x 4 (bottleneck) or 8 x width (basic)."""
  check_variant(depth)
  return width * 8 * (4 if VARIANTS[depth][0] == "bottleneck" else 1)


def check_variant(depth) -> None:
  if depth not in VARIANTS:
    raise ValueError(f"config.model.depth={depth!r} is not a ResNet variant; use one of "
                     f"{sorted(VARIANTS)}.")


class BatchNorm(nnx.Module):
  """BatchNorm over all but the channel axis, float32 statistics.

  momentum: running = momentum * running + (1 - momentum) * batch (0.9 =
  torchvision's 0.1). The running variance is the unbiased one, as
  torchvision keeps it.
  """

  def __init__(self, features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
               scale_init=nnx.initializers.ones_init(), ghost_groups: int | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    del rngs
    self.momentum, self.epsilon, self.dtype = momentum, epsilon, dtype
    self.ghost_groups = ghost_groups
    self.scale = nnx.Param(scale_init(jax.random.key(0), (features,), param_dtype),
                           **_axes("conv_out"))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype), **_axes("conv_out"))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32), **_axes("conv_out"))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32), **_axes("conv_out"))

  def __call__(self, x, *, train: bool):  # [B, H, W, C] -> same
    if not train:
      mean, var = self.mean[...], self.var[...]
      y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
    else:
      g = self.ghost_groups or 1  # divides the batch: checked with the config
      xf = x.astype(jnp.float32).reshape(g, x.shape[0] // g, *x.shape[1:])
      axes = tuple(range(1, xf.ndim - 1))
      mean = xf.mean(axis=axes, keepdims=True)  # [G, 1, 1, 1, C]
      var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
      y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      n = xf[0].size // xf.shape[-1]  # elements per channel in one group
      m = self.momentum
      batch_mean = mean.reshape(g, -1).mean(axis=0)
      batch_var = var.reshape(g, -1).mean(axis=0) * (n / max(n - 1, 1))
      self.mean[...] = m * self.mean[...] + (1 - m) * batch_mean
      self.var[...] = m * self.var[...] + (1 - m) * batch_var
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class _ConvBN(nnx.Module):
  """conv (no bias) -> BatchNorm."""

  def __init__(self, cin: int, cout: int, kernel: int, stride: int, *, bn: dict,
               zero_scale: bool = False, dtype, param_dtype, rngs: nnx.Rngs):
    pad = (kernel - 1) // 2
    self.conv = nnx.Conv(
        cin, cout, kernel_size=(kernel, kernel), strides=(stride, stride),
        padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs,
        # He init (fan_out, normal), as torchvision's ResNet.
        kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
        kernel_metadata=_axes(None, None, "conv_in", "conv_out"))
    init = nnx.initializers.zeros_init() if zero_scale else nnx.initializers.ones_init()
    self.bn = BatchNorm(cout, scale_init=init, dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs, **bn)

  def __call__(self, x, *, train: bool):
    return self.bn(self.conv(x), train=train)


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, cin: int, width: int, stride: int, *, bn, zero_init_last_bn,
               dtype, param_dtype, rngs):
    kw = dict(bn=bn, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = _ConvBN(cin, width, 3, stride, **kw)
    self.conv2 = _ConvBN(width, width, 3, 1, zero_scale=zero_init_last_bn, **kw)
    self.shortcut = nnx.data(None)
    if stride != 1 or cin != width:
      self.shortcut = _ConvBN(cin, width, 1, stride, **kw)

  def __call__(self, x, *, train: bool):
    y = jax.nn.relu(self.conv1(x, train=train))
    y = self.conv2(y, train=train)
    skip = x if self.shortcut is None else self.shortcut(x, train=train)
    return jax.nn.relu(y + skip)


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (stride here: torchvision v1.5) -> 1x1 x4, plus the shortcut."""

  expansion = 4

  def __init__(self, cin: int, width: int, stride: int, *, bn, zero_init_last_bn,
               dtype, param_dtype, rngs):
    kw = dict(bn=bn, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    cout = width * self.expansion
    self.conv1 = _ConvBN(cin, width, 1, 1, **kw)
    self.conv2 = _ConvBN(width, width, 3, stride, **kw)
    self.conv3 = _ConvBN(width, cout, 1, 1, zero_scale=zero_init_last_bn, **kw)
    self.shortcut = nnx.data(None)
    if stride != 1 or cin != cout:
      self.shortcut = _ConvBN(cin, cout, 1, stride, **kw)

  def __call__(self, x, *, train: bool):
    y = jax.nn.relu(self.conv1(x, train=train))
    y = jax.nn.relu(self.conv2(y, train=train))
    y = self.conv3(y, train=train)
    skip = x if self.shortcut is None else self.shortcut(x, train=train)
    return jax.nn.relu(y + skip)


class ResNet(nnx.Module):
  """ResNet-{18,34,50,101,152} + optional representation layer + MRL head.

  `__call__(images [B, H, W, channels], *, train=False)` returns
  `(logits [M, B, C] | None, aux)` with aux = {'embedding': z [B, d] float32,
  'pre_logits': pooled [B, width * 8 * expansion]}. `width` is the first
  stage's width (64 in the paper's ResNets; smaller for CPU runs).
  """

  def __init__(self, *, depth: int = 50, width: int = 64, channels: int,
               num_classes: int | None = None, stem: str = "imagenet",
               representation_size: int | None = None, head: nnx.Module | None = None,
               zero_init_last_bn: bool = False, bn_momentum: float = 0.9,
               bn_epsilon: float = 1e-5, bn_ghost_groups: int | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    check_variant(depth)
    if stem not in STEMS:
      raise ValueError(f"config.model.stem={stem!r} is not one of {STEMS}.")
    kind, stages = VARIANTS[depth]
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    bn = dict(momentum=bn_momentum, epsilon=bn_epsilon, ghost_groups=bn_ghost_groups)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_classes, self.dtype, self.stem_kind = num_classes, dtype, stem
    self.stem = _ConvBN(channels, width, 7 if stem == "imagenet" else 3,
                        2 if stem == "imagenet" else 1, bn=bn, **kw)
    blocks, cin = [], width
    for i, n in enumerate(stages):
      w = width * 2**i
      for j in range(n):
        stride = 2 if (j == 0 and i > 0) else 1
        blocks.append(block_cls(cin, w, stride, bn=bn, zero_init_last_bn=zero_init_last_bn,
                                **kw))
        cin = w * block_cls.expansion
    self.blocks = nnx.List(blocks)
    self.num_features = cin
    self.representation = nnx.data(None)
    if representation_size is not None:
      self.representation = nnx.Linear(cin, representation_size,
                                       kernel_metadata=_axes("embed", None),
                                       bias_metadata=_axes(None), **kw)
    self.head = nnx.data(head)

  def __call__(self, images, *, train: bool = False, rng=None):
    del rng  # no stochastic layers (the classification task passes a key to every model)
    pre_logits = self.features(images, train=train)
    z = pre_logits
    if self.representation is not None:
      z = self.representation(pre_logits.astype(self.dtype)).astype(jnp.float32)
    logits = self.head(z) if self.head is not None else None  # [M, B, C]
    return logits, {"embedding": z, "pre_logits": pre_logits}

  def features(self, images, *, train: bool = False):
    """The pooled features [B, num_features] (float32), before the
    representation layer and the head."""
    x = sharding.constrain_batch(images.astype(self.dtype))
    x = jax.nn.relu(self.stem(x, train=train))
    if self.stem_kind == "imagenet":
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = sharding.constrain_batch(block(x, train=train))
    return x.astype(jnp.float32).mean(axis=(1, 2))  # [B, num_features]
