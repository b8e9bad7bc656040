"""Matryoshka Representation Learning: nesting lists, prefix heads and losses.

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

The nested contrastive losses (CLIP-style softmax, SigLIP-style sigmoid) use
the same chunks for the dot products and norms of every prefix; they live in
`mrl_jax.contrastive` (blocked over columns and sharded over the batch) and
are re-exported here as `contrastive`, `contrastive_per_dim`.

Nothing here imports model or data code.
"""

from collections.abc import Sequence
import math
import numbers

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

MODES = ('mrl', 'mrl_e', 'ff')

# Norms below this are treated as zero by `truncate` (no division by zero).
_NORM_EPS = 1e-12

# Heads start at zero (uniform predictions, loss exactly log C for every dim),
# as big_vision does for its classifier heads: no prefix head dominates the
# early gradient into the shared trunk, and the heads move from the first step.
_DEFAULT_KERNEL_INIT = nnx.initializers.zeros_init()


# ---------------------------------------------------------------------------
# Nesting lists.
# ---------------------------------------------------------------------------


def nesting_dims(d: int, start: int = 8) -> list[int]:
  """Doubling nesting list [start, 2*start, 4*start, ..., d], ending at d.

  If d is not start * 2^k the last doubling below d is followed by d itself,
  e.g. nesting_dims(100) == [8, 16, 32, 64, 100]. If d <= start: [d].
  Doubling rather than uniform spacing: the paper found uniform lists starve
  the smallest dims.
  """
  for name, v in (('d', d), ('start', start)):
    if not _is_int(v) or v <= 0:
      raise ValueError(f'nesting_dims: {name}={v!r} must be a positive int.')
  dims = []
  m = start
  while m < d:
    dims.append(m)
    m *= 2
  return dims + [d]


def validate_nesting(
    nesting_dims: Sequence[int],
    weights: Sequence[float] | None,
    representation_size: int,
) -> tuple[list[int], list[float]]:
  """Checks the nesting config; returns (dims, weights) as plain lists.

  Raises ValueError naming the config field, the value and the fix, so a bad
  config fails before any compute is spent. `weights` defaults to all 1.0.
  """
  d = representation_size
  if not _is_int(d) or d <= 0:
    raise ValueError(
        f'config.model.representation_size={d!r} must be a positive int.')
  example = _nesting_example(d)
  # Arrays are fine too; judge them by their elements.
  if isinstance(nesting_dims, np.ndarray):
    nesting_dims = nesting_dims.tolist()
  if isinstance(weights, np.ndarray):
    weights = weights.tolist()

  dims_field = f'config.mrl.nesting_dims={_show(nesting_dims)}'
  if (nesting_dims is None or isinstance(nesting_dims, (str, bytes))
      or not isinstance(nesting_dims, Sequence) or not nesting_dims):
    raise ValueError(
        f'{dims_field} must be a non-empty list of ints ending at '
        f'config.model.representation_size={d}; e.g. {example}.')
  for m in nesting_dims:
    if not _is_int(m):
      raise ValueError(
          f'{dims_field} contains {m!r}, which is not an int; '
          f'use whole feature counts, e.g. {example}.')
    if m <= 0:
      raise ValueError(
          f'{dims_field} contains {m}, which is not positive; every dim must '
          f'be >= 1, e.g. {example}.')
  dims = [int(m) for m in nesting_dims]
  for prev, m in zip(dims, dims[1:]):
    if m <= prev:
      raise ValueError(
          f'{dims_field} must be strictly increasing ({m} follows {prev}); '
          f'list each dim once in ascending order, e.g. {example}.')
  if dims[-1] != d:
    raise ValueError(
        f'{dims_field} must end at config.model.representation_size={d} '
        f'(the full embedding), but ends at {dims[-1]}; set the last dim to '
        f'{d} or change the representation size, e.g. {example}.')

  if weights is None:
    return dims, [1.0] * len(dims)
  weights_field = f'config.mrl.weights={_show(weights)}'
  if (isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence)
      or len(weights) != len(dims)):
    n = len(weights) if isinstance(weights, Sequence) else 'not a list'
    raise ValueError(
        f'{weights_field} (length {n}) must have one weight per nesting dim '
        f'({len(dims)} for {dims_field}); give {len(dims)} weights, or None '
        'for all 1.0.')
  for c in weights:
    if (not isinstance(c, numbers.Real) or isinstance(c, bool)
        or not math.isfinite(c) or c < 0):
      raise ValueError(
          f'{weights_field} contains {c!r}; every weight must be a finite '
          'number >= 0 (e.g. 1.0 for all, or 2.0 first to favour the '
          'smallest dim).')
  return dims, [float(c) for c in weights]


def _is_int(v) -> bool:
  # bool is an int subclass, but True is never a meant dimension.
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _show(v) -> str:
  return repr(list(v)) if isinstance(v, tuple) else repr(v)


def _nesting_example(d: int) -> str:
  return f'nesting_dims({d}) = {nesting_dims(d, start=min(8, d))}'


# ---------------------------------------------------------------------------
# Prefixes.
# ---------------------------------------------------------------------------


def truncate(z, m: int, normalize: bool = True):
  """First m features of z [..., d], L2-normalised along the last axis.

  This is what inference users call: the embedding at budget m. Truncated
  prefixes must be renormalised before dot-product scoring, since the norm of
  z[:m] varies across examples. Accepts jax and numpy arrays and returns the
  same kind. Zero vectors stay zero (the norm is floored at a tiny eps).
  """
  d = z.shape[-1]
  if not _is_int(m) or not 1 <= m <= d:
    raise ValueError(
        f'truncate: m={m!r} must be an int in [1, {d}] (the embedding has '
        f'{d} features).')
  xp = np if isinstance(z, np.ndarray) else jnp
  z = z[..., :m]
  if not normalize:
    return z
  # The norm is taken in >= float32: squares of bf16 lose too many bits. The
  # eps floor goes on the squared norm, so the gradient at 0 is 0, not NaN.
  z32 = z.astype(xp.promote_types(z.dtype, xp.float32))
  sq = xp.sum(xp.square(z32), axis=-1, keepdims=True)
  out = z32 / xp.sqrt(xp.maximum(sq, _NORM_EPS**2))
  return out.astype(z.dtype) if xp.issubdtype(z.dtype, xp.floating) else out


# ---------------------------------------------------------------------------
# Heads. All map z [B, d] -> logits [M, B, C].
# ---------------------------------------------------------------------------


def _checked_dims(nesting_dims) -> tuple[int, ...]:
  # Unsorted dims would make the chunk slices empty and the logits silently
  # wrong, so heads check too, not only the config loader.
  dims = [] if nesting_dims is None else list(nesting_dims)
  last = dims[-1] if dims and _is_int(dims[-1]) and dims[-1] > 0 else 1
  return tuple(validate_nesting(dims, None, last)[0])


def _check_features(z, d: int, head: str):
  if z.ndim != 2 or z.shape[-1] < d:
    raise ValueError(
        f'{head}: expected embeddings z of shape [B, >= {d}], got '
        f'{tuple(z.shape)}; check config.model.representation_size against '
        'config.mrl.nesting_dims.')


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
    self.nesting_dims = _checked_dims(nesting_dims)
    self.linears = nnx.List([
        nnx.Linear(m, num_classes, kernel_init=kernel_init,
                   bias_init=nnx.initializers.zeros_init(),
                   param_dtype=param_dtype, rngs=rngs)
        for m in self.nesting_dims
    ])

  def __call__(self, z: jax.Array) -> jax.Array:  # [B, d] -> [M, B, C]
    _check_features(z, self.nesting_dims[-1], 'MRLHead')
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
    self.nesting_dims = _checked_dims(nesting_dims)
    d = self.nesting_dims[-1]
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (d, num_classes), param_dtype))  # [d, C]
    self.bias = nnx.Param(jnp.zeros((num_classes,), param_dtype))  # [C]

  def __call__(self, z: jax.Array) -> jax.Array:  # [B, d] -> [M, B, C]
    _check_features(z, self.nesting_dims[-1], 'MRLEHead')
    return mrl_e_logits(z, self.kernel[...], self.bias[...], self.nesting_dims)


def mrl_e_logits(z, w, b, nesting_dims):
  """Chunked MRL-E logits: z [B, d], w [d, C], b [C] -> [M, B, C]."""
  bounds = (0, *nesting_dims)
  partials = jnp.stack([  # [M, B, C]: chunk j covers features (m_{j-1}, m_j].
      z[:, lo:hi] @ w[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])])
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
    _check_features(z, self.ff_dim, 'FFHead')
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
  if not _is_int(ff_dim) or not 1 <= ff_dim <= d:
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
    labels: int [B].
    label_smoothing: eps; the target is (1 - eps) * onehot + eps / C.
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
  targets = (jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
             * (1.0 - label_smoothing) + label_smoothing / num_classes)
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
        f'softmax_ce: {weights.shape[0] if weights.ndim else "scalar"} '
        f'weights for {per_dim.shape[0]} dims of logits; give one weight per '
        'dim (config.mrl.weights).')
  return jnp.sum(weights * per_dim)


# ---------------------------------------------------------------------------
# Nested contrastive losses: in mrl_jax/contrastive.py (blocked, sharded),
# re-exported here. Imported on first use, since that module builds on this
# one's nesting checks.
# ---------------------------------------------------------------------------

_CONTRASTIVE = ('CONTRASTIVE_KINDS', 'contrastive', 'contrastive_per_dim',
                'prefix_cosines')


def __getattr__(name):
  if name in _CONTRASTIVE:
    from mrl_jax import contrastive  # pylint: disable=g-import-not-at-top
    return getattr(contrastive, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
