"""Matryoshka Representation Learning: prefix heads and the nested losses.

MRL (Kusupati et al., 2022) trains one embedding z in R^d so that every prefix
z[:m], for m in a nesting list M = [m_1 < m_2 < ... < m_K = d], is a good
representation on its own. The task loss is applied to every prefix and the
per-prefix losses are summed with weights c_m:

    L = sum_m c_m * CE(logits_m, y).

Three classification heads share one output layout, logits stacked as
[M, B, C] (M = number of dims the head produces):

* MRL:   one linear classifier per prefix, logits_m = z[:, :m] @ W_m + b_m.
* MRL-E: ("efficient") one tied classifier W [d, C], b [C], evaluated on every
         prefix: logits_m = z[:, :m] @ W[:m] + b.
* FF:    the fixed-feature baseline: one classifier on z[:, :k] only, trained
         for that single size k. It returns [1, B, C].

MRL-E does not need K separate matmuls. Split z and W into the disjoint chunks
between consecutive nesting dims, (0, m_1], (m_1, m_2], ..., (m_{K-1}, d]:

    z[:, :m_j] @ W[:m_j] = sum_{i <= j} z[:, chunk_i] @ W[chunk_i],

so each chunk's partial product is computed once and a cumulative sum over
chunks yields every prefix's logits: all K dims for the FLOPs of one full head.

Nesting lists, chunks and truncation live in `mrl_jax.prefix`; the nested
contrastive losses (CLIP-style softmax, SigLIP-style sigmoid), which use the
same chunks for the dot products and norms of every prefix, in
`mrl_jax.contrastive`. Both are importable from here as well
(`nesting_dims`, `validate_nesting`, `truncate`, `contrastive`, ...).

Nothing here imports model or data code.
"""

from collections.abc import Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from mrl_jax import prefix
# The nesting lists and prefixes (mrl_jax/prefix.py) and the nested
# contrastive losses (mrl_jax/contrastive.py), importable from here too.
from mrl_jax.contrastive import CONTRASTIVE_KINDS  # noqa: F401
from mrl_jax.contrastive import contrastive  # noqa: F401
from mrl_jax.contrastive import contrastive_per_dim  # noqa: F401
from mrl_jax.contrastive import prefix_cosines  # noqa: F401
from mrl_jax.prefix import nesting_dims  # noqa: F401
from mrl_jax.prefix import truncate  # noqa: F401
from mrl_jax.prefix import validate_nesting  # noqa: F401

MODES = ('mrl', 'mrl_e', 'ff')

# Heads start at zero (uniform predictions, loss exactly log C for every dim),
# as big_vision does for its classifier heads: no prefix head dominates the
# early gradient into the shared trunk, and the heads move from the first step.
_DEFAULT_KERNEL_INIT = nnx.initializers.zeros_init()


# ---------------------------------------------------------------------------
# Heads. All map z [B, d] -> logits [M, B, C].
# ---------------------------------------------------------------------------


class MRLHead(nnx.Module):
  """One linear classifier per prefix: logits_m = z[:, :m] @ W_m + b_m.

  Kernels have shape [m, C] (the reference's Linear(m, C) per dim, each with
  its own bias). The K matmuls cost sum_m m*C*B FLOPs, about twice one full
  head for a doubling list and negligible next to the backbone, so separate
  kernels beat any padding or masking scheme on clarity at no real cost.
  """

  def __init__(self, nesting_dims: Sequence[int], num_classes: int, *,
               rngs: nnx.Rngs, param_dtype=jnp.float32,
               kernel_init=_DEFAULT_KERNEL_INIT):
    self.nesting_dims = prefix.checked_dims(nesting_dims)
    self.linears = nnx.List([
        nnx.Linear(m, num_classes, kernel_init=kernel_init,
                   bias_init=nnx.initializers.zeros_init(),
                   param_dtype=param_dtype, rngs=rngs)
        for m in self.nesting_dims
    ])

  def __call__(self, z: jax.Array) -> jax.Array:  # [B, d] -> [M, B, C]
    prefix.check_features(z, self.nesting_dims[-1], 'MRLHead')
    return jnp.stack(
        [lin(z[:, :m]) for m, lin in zip(self.nesting_dims, self.linears)])


class MRLEHead(nnx.Module):
  """One tied classifier on every prefix: logits_m = z[:, :m] @ W[:m] + b.

  Computed in chunked cumulative form (module docstring): all M dims for the
  cost of one [B, d] @ [d, C] matmul.
  """

  def __init__(self, nesting_dims: Sequence[int], num_classes: int, *,
               rngs: nnx.Rngs, param_dtype=jnp.float32,
               kernel_init=_DEFAULT_KERNEL_INIT):
    self.nesting_dims = prefix.checked_dims(nesting_dims)
    d = self.nesting_dims[-1]
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (d, num_classes), param_dtype))  # [d, C]
    self.bias = nnx.Param(jnp.zeros((num_classes,), param_dtype))  # [C]

  def __call__(self, z: jax.Array) -> jax.Array:  # [B, d] -> [M, B, C]
    prefix.check_features(z, self.nesting_dims[-1], 'MRLEHead')
    return mrl_e_logits(z, self.kernel[...], self.bias[...], self.nesting_dims)


def mrl_e_logits(z, w, b, nesting_dims):
  """Chunked MRL-E logits: z [B, d], w [d, C], b [C] -> [M, B, C]."""
  partials = jnp.stack([  # [M, B, C]: chunk j covers features (m_{j-1}, m_j].
      z[:, lo:hi] @ w[lo:hi] for lo, hi in prefix.chunks(nesting_dims)])
  return jnp.cumsum(partials, axis=0) + b


def mrl_e_logits_naive(z, w, b, nesting_dims):
  """Per-dim reference for `mrl_e_logits`: one full matmul per prefix."""
  return jnp.stack([z[:, :m] @ w[:m] + b for m in nesting_dims])


class FFHead(nnx.Module):
  """Fixed-feature baseline: one classifier on z[:, :ff_dim]; -> [1, B, C]."""

  def __init__(self, ff_dim: int, num_classes: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, kernel_init=_DEFAULT_KERNEL_INIT):
    self.ff_dim = int(ff_dim)
    self.linear = nnx.Linear(
        self.ff_dim, num_classes, kernel_init=kernel_init,
        bias_init=nnx.initializers.zeros_init(), param_dtype=param_dtype,
        rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:  # [B, d] -> [1, B, C]
    prefix.check_features(z, self.ff_dim, 'FFHead')
    return self.linear(z[:, :self.ff_dim])[None]


def head_dims(mode: str, nesting_dims: Sequence[int],
              ff_dim: int | None = None) -> list[int]:
  """The dims a head of this mode produces logits for, in output order."""
  _check_mode(mode)
  if mode == 'ff':
    return [_ff_dim(nesting_dims, ff_dim)]
  return [int(m) for m in nesting_dims]


def make_head(mode: str, nesting_dims: Sequence[int], num_classes: int, *,
              ff_dim: int | None = None, rngs: nnx.Rngs,
              param_dtype=jnp.float32,
              kernel_init=_DEFAULT_KERNEL_INIT) -> nnx.Module:
  """Head for config.mrl.mode; its output is [len(head_dims(...)), B, C]."""
  _check_mode(mode)
  kw = dict(rngs=rngs, param_dtype=param_dtype, kernel_init=kernel_init)
  if mode == 'mrl':
    return MRLHead(nesting_dims, num_classes, **kw)
  if mode == 'mrl_e':
    return MRLEHead(nesting_dims, num_classes, **kw)
  return FFHead(_ff_dim(nesting_dims, ff_dim), num_classes, **kw)


def _check_mode(mode):
  if mode not in MODES:
    raise ValueError(
        f'config.mrl.mode={mode!r} is unknown; use one of {list(MODES)} '
        "('mrl': one head per dim, 'mrl_e': one tied head, 'ff': "
        'fixed-feature baseline).')


def _ff_dim(nesting_dims, ff_dim):
  d = int(nesting_dims[-1])
  if ff_dim is None:
    return d
  if not prefix.is_int(ff_dim) or not 1 <= ff_dim <= d:
    raise ValueError(
        f'ff_dim={ff_dim!r} must be an int in [1, {d}] (the embedding size); '
        'omit it to use the full embedding.')
  return int(ff_dim)


# ---------------------------------------------------------------------------
# Nested softmax cross-entropy.
# ---------------------------------------------------------------------------


def softmax_ce_per_dim(logits_per_dim, labels, label_smoothing: float = 0.0,
                       mask=None) -> jax.Array:
  """Unweighted mean cross-entropy of each dim's logits: -> [M] float32.

  Args:
    logits_per_dim: [M, B, C] array, or a sequence of M [B, C] arrays.
    labels: int [B], or soft targets float [B, C] (rows summing to 1, e.g.
      Mixup / CutMix's), the same for every dim.
    label_smoothing: eps; the target is (1 - eps) * onehot + eps / C (soft
      targets: (1 - eps) * target + eps / C).
    mask: optional [B] 0/1 weights (0 = padding); the mean is over valid
      examples, and 0 if there are none.
  """
  if not hasattr(logits_per_dim, 'ndim'):
    logits_per_dim = jnp.stack(list(logits_per_dim))
  if logits_per_dim.ndim != 3:
    raise ValueError(
        'softmax_ce: logits_per_dim must be [M, B, C] (or a list of [B, C]), '
        f'got shape {tuple(logits_per_dim.shape)}.')
  num_classes = logits_per_dim.shape[-1]
  # float32 even for bf16 logits: log-sum-exp over many classes needs it.
  logp = jax.nn.log_softmax(jnp.asarray(logits_per_dim, jnp.float32))
  labels = jnp.asarray(labels)
  if labels.ndim == 2:  # soft targets [B, C]
    targets = labels.astype(jnp.float32)
  else:
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  ce = -jnp.sum(targets * logp, axis=-1)  # [M, B]
  if mask is None:
    return jnp.mean(ce, axis=-1)
  mask = jnp.asarray(mask, jnp.float32)  # [B]
  return (ce @ mask) / jnp.maximum(jnp.sum(mask), jnp.finfo(jnp.float32).tiny)


def softmax_ce(logits_per_dim, labels, weights=None,
               label_smoothing: float = 0.0, mask=None) -> jax.Array:
  """Nested loss sum_m c_m * mean_b CE(logits_m, y): a SUM over dims.

  Summing (not averaging) matches the reference implementation, so learning
  rates transfer; zero-init heads start at sum_m c_m * log C.
  `weights` are the c_m (default all 1); other args as `softmax_ce_per_dim`.
  """
  per_dim = softmax_ce_per_dim(logits_per_dim, labels, label_smoothing, mask)
  if weights is None:
    return jnp.sum(per_dim)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != per_dim.shape:
    raise ValueError(
        f'softmax_ce: weights has shape {weights.shape} for '
        f'{per_dim.shape[0]} dims of logits; give one weight per dim (a list '
        'or a 1-d array).')
  return jnp.sum(weights * per_dim)
