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

The contrastive losses (CLIP-style softmax, SigLIP-style sigmoid) use the same
chunks: the raw dot products and squared norms of every prefix are running
sums over them, so the per-prefix cosine similarities of a batch cost one
B x B x d matmul plus O(K * B^2) elementwise work.

Nothing here imports model or data code.
"""

from collections.abc import Sequence
import functools
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
# Nested contrastive losses (image-text dual encoder).
# ---------------------------------------------------------------------------

CONTRASTIVE_KINDS = ('softmax', 'sigmoid')


def _prefix_dots(x, y, nesting_dims):
  """Yields, per prefix m: raw dots [B, B'], 1/|x[:m]| [B], 1/|y[:m]| [B'].

  The cosine of prefix m is <x[:m], y[:m]> / (|x[:m]| |y[:m]|), and both dot
  products and squared norms are sums over features, so each is a running
  sum over the disjoint chunks between consecutive nesting dims: all prefixes
  for one [B, d] x [B', d] matmul plus one [B, B'] add per dim. float32
  throughout; bf16 inputs keep a bf16 matmul with a float32 accumulator.
  """
  x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
  sq_x = sq_y = 0.0
  all_dots = _chunked_dots(x, y, tuple(nesting_dims))
  for (lo, hi), dots in zip(_chunks(nesting_dims), all_dots):
    sq_x = sq_x + jnp.sum(jnp.square(x32[:, lo:hi]), axis=-1)
    sq_y = sq_y + jnp.sum(jnp.square(y32[:, lo:hi]), axis=-1)
    yield dots, _inv_norm(sq_x), _inv_norm(sq_y)


def _chunks(nesting_dims):
  bounds = (0, *nesting_dims)
  return list(zip(bounds[:-1], bounds[1:]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _chunked_dots(x, y, nesting_dims):
  """[x[:, :m] @ y[:, :m].T for m in nesting_dims] as running chunk sums."""
  out, dots = [], 0.0
  for lo, hi in _chunks(nesting_dims):
    dots = dots + jnp.einsum('if,jf->ij', x[:, lo:hi], y[:, lo:hi],
                             preferred_element_type=jnp.float32)
    out.append(dots)  # [B, B']
  return out


def _chunked_dots_fwd(x, y, nesting_dims):
  return _chunked_dots(x, y, nesting_dims), (x, y)


def _chunked_dots_bwd(nesting_dims, residuals, cotangents):
  # Chunk (lo, hi] feeds every prefix m >= hi, so its cotangent h is a
  # running sum from the largest prefix down; then one matmul per chunk and
  # tower, as in the forward pass. h stays float32, as in JAX's own rule.
  x, y = residuals
  gx, gy_t, h = [], [], 0.0
  for (lo, hi), ct in zip(_chunks(nesting_dims)[::-1], cotangents[::-1]):
    h = h + ct  # [B, B']
    gx.append(jnp.einsum('ij,jf->if', h, y[:, lo:hi],
                         preferred_element_type=jnp.float32))
    # x_c.T @ h, not h.T @ x_c (the default transpose rule): XLA:CPU copies
    # the transpose of the whole [B, B'] h for the latter, once per chunk.
    # Transposing the small [d, B'] result once instead cut the nested loss
    # + gradient time by ~20% (benchmarks/contrastive_loss.py, B = 1024).
    gy_t.append(jnp.einsum('if,ij->fj', x[:, lo:hi], h,
                           preferred_element_type=jnp.float32))
  gx = jnp.concatenate(gx[::-1], axis=1)  # [B, d]
  gy = jnp.concatenate(gy_t[::-1], axis=0).T  # [B', d]
  return gx.astype(x.dtype), gy.astype(y.dtype)


_chunked_dots.defvjp(_chunked_dots_fwd, _chunked_dots_bwd)


def _inv_norm(sq):
  # As in `truncate`: the eps floor goes on the squared norm, so a zero
  # prefix has gradient 0, not NaN.
  return jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS**2))


def prefix_cosines(x, y, nesting_dims) -> jax.Array:
  """Cosine similarities of every prefix: x [B, d], y [B', d] -> [M, B, B'].

  s_m[i, j] = <x_i[:m], y_j[:m]> / (|x_i[:m]| |y_j[:m]|), each prefix
  normalised on its own, computed in the chunked form (see `_prefix_dots`).
  float32.
  """
  dims = _checked_dims(nesting_dims)
  for name, z in (('x', x), ('y', y)):
    _check_features(z, dims[-1], f'prefix_cosines: {name}')
  return jnp.stack([dots * inv_x[:, None] * inv_y[None, :]
                    for dots, inv_x, inv_y in _prefix_dots(x, y, dims)])


def contrastive_per_dim(x, y, nesting_dims, *, kind: str = 'softmax',
                        temperature, bias=None,
                        label_smoothing: float = 0.0) -> jax.Array:
  """Unweighted contrastive loss of every prefix: -> [M] float32.

  Args:
    x: [B, d] image embeddings, unnormalised; row i pairs with y[i].
    y: [B, d] text embeddings, unnormalised.
    nesting_dims: strictly increasing, ending at d. Each prefix x[:, :m],
      y[:, :m] is L2-normalised on its own; s_m is their cosine similarity.
    kind: 'softmax' (CLIP/ALIGN): 0.5 * (CE_i2t + CE_t2i), each the batch
      mean of the cross-entropy over logits s_m / tau with the positives on
      the diagonal. 'sigmoid' (SigLIP):
      -(1/B) sum_ij log sigmoid(z_ij * (s_m[i, j] / tau + b)), z_ij = +1 on
      the diagonal and -1 elsewhere.
    temperature: tau itself, not its log (a model that learns log tau passes
      exp of it): a positive scalar, or one per prefix [M]. SigLIP's t = 10
      is tau = 0.1.
    bias: b, required for kind='sigmoid' and rejected for 'softmax': a
      scalar or one per prefix [M]. SigLIP starts at -10.
    label_smoothing: eps, for kind='softmax' only: the target of row i is
      (1 - eps) * onehot(i) + eps / B, in both directions.

  The batch is whatever x and y hold: under jit with x and y sharded along
  the batch, XLA inserts the collectives and every prefix's loss is over the
  global B x B similarities. Math is float32 whatever the input dtype.
  """
  dims = _check_contrastive(x, y, nesting_dims, None, kind, temperature, bias,
                            label_smoothing)[0]
  return _contrastive_per_dim(x, y, dims, kind, temperature, bias,
                              label_smoothing)


def contrastive(x, y, nesting_dims, weights=None, *, kind: str = 'softmax',
                temperature, bias=None,
                label_smoothing: float = 0.0) -> jax.Array:
  """Nested contrastive loss sum_m c_m * L_m(x[:, :m], y[:, :m]): a SUM.

  `weights` are the c_m (default all 1); everything else as
  `contrastive_per_dim`, which gives the [M] per-prefix losses to log.
  """
  dims, weights = _check_contrastive(x, y, nesting_dims, weights, kind,
                                     temperature, bias, label_smoothing)
  per_dim = _contrastive_per_dim(x, y, dims, kind, temperature, bias,
                                 label_smoothing)
  return jnp.sum(jnp.asarray(weights, jnp.float32) * per_dim)


def _contrastive_per_dim(x, y, dims, kind, temperature, bias, eps):
  n = len(dims)
  inv_tau = 1.0 / _per_prefix(temperature, n)  # [M]
  if kind == 'sigmoid':
    bias = _per_prefix(bias, n)  # [M]
  losses = []
  # One prefix at a time: each [B, B] dots array is consumed by its own loss
  # right away. The losses below scale dots to logits dots * a_i * c_j inside
  # their own passes, and their hand-written gradients (fewer B x B passes
  # and exps than autodiff's) hand the chunk matmuls the cotangent of dots.
  for k, (dots, inv_x, inv_y) in enumerate(_prefix_dots(x, y, dims)):
    a = inv_x * inv_tau[k]  # [B]: row scale, 1 / (|x_i[:m]| tau)
    if kind == 'softmax':
      # Cosines are <= 1, so logits are <= 1 / tau: a floor for the shift.
      floor = jax.lax.stop_gradient(inv_tau[k]) - _EXP_HEADROOM
      losses.append(_softmax_contrastive(dots, a, inv_y, floor, eps))
    else:
      losses.append(_sigmoid_contrastive(dots, a, inv_y, bias[k]))
  return jnp.stack(losses)


def _scaled(dots, a, c):  # logits l_ij = dots_ij * a_i * c_j
  return dots * a[:, None] * c[None, :]


def _eye_like(dots):  # [B, B] bool, True on the diagonal (fused as iota ==)
  return (jax.lax.broadcasted_iota(jnp.int32, dots.shape, 0)
          == jax.lax.broadcasted_iota(jnp.int32, dots.shape, 1))


def _lse(logits, axis):
  # Logits are finite (cosines / tau), so no -inf handling is needed.
  m = jnp.max(logits, axis=axis, keepdims=True)
  return jnp.squeeze(m, axis) + jnp.log(
      jnp.sum(jnp.exp(logits - m), axis=axis))


# The softmax loss takes one exp per logit for both directions when it can:
# e = exp(l - s) for one shift s, whose row and column sums give both
# log-sum-exps and whose row and column normalisations both softmaxes. s is
# the largest diagonal logit, floored at 1/tau - _EXP_HEADROOM, so that no e
# exceeds e^_EXP_HEADROOM and no sum of them overflows. The one-exp path is
# exact to float32 when every row and column sum is >= e^-_LSE_RANGE: terms
# lost to underflow (< e^-87 each) then add < B e^-27 relative. Logits span
# up to 2/tau, so that holds for every batch while tau >= 1/30; below, any
# row or column out of range (a check on the sums, O(B)) sends the prefix to
# the two-exp path, one max-shifted log-sum-exp per direction.
_EXP_HEADROOM = 70.0
_LSE_RANGE = 60.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_contrastive(dots, a, c, floor, eps):  # -> scalar
  # Row i's cross-entropy against (1 - eps) onehot(i) + eps / B is
  # lse_i - (1 - eps) l_ii - eps * mean_j l_ij; averaged over rows and both
  # directions, the eps part is the mean of all logits.
  return _softmax_fwd(dots, a, c, floor, eps)[0]


def _softmax_fwd(dots, a, c, floor, eps):
  b = dots.shape[0]
  diag = jnp.diagonal(dots) * a * c  # [B]
  shift = jnp.maximum(jnp.max(diag), floor)
  e = jnp.exp(_scaled(dots, a, c) - shift)
  sum_r, sum_c = jnp.sum(e, axis=1), jnp.sum(e, axis=0)
  fast = jnp.minimum(jnp.min(sum_r), jnp.min(sum_c)) >= math.exp(-_LSE_RANGE)
  lse_r, lse_c = jax.lax.cond(
      fast, lambda: (shift + jnp.log(sum_r), shift + jnp.log(sum_c)),
      lambda: (_lse(_scaled(dots, a, c), 1), _lse(_scaled(dots, a, c), 0)))
  loss = (0.5 * (jnp.mean(lse_r) + jnp.mean(lse_c))
          - (1.0 - eps) * jnp.mean(diag))
  if eps:
    loss = loss - eps * (a @ (dots @ c)) / b**2
  return loss, (dots, a, c, e, shift, lse_r, lse_c, fast)


def _softmax_bwd(eps, res, g):
  # d loss / d l_ij = (0.5 (P_ij + Q_ij) - (1 - eps) [i = j] - eps / B) / B,
  # P and Q the row and column softmaxes.
  dots, a, c, e, shift, lse_r, lse_c, fast = res
  b = dots.shape[0]

  def grads(p):  # p = 0.5 (P + Q) -> cotangents of dots, a, c
    gl = (jnp.where(_eye_like(dots), p - (1.0 - eps), p) - eps / b) * (g / b)
    gw = gl * dots
    return gl * a[:, None] * c[None, :], gw @ c, a @ gw

  def one_exp():  # P = e / sum_r, Q = e / sum_c
    return grads(0.5 * e * (jnp.exp(shift - lse_r)[:, None]
                            + jnp.exp(shift - lse_c)[None, :]))

  def two_exps():
    logits = _scaled(dots, a, c)
    return grads(0.5 * (jnp.exp(logits - lse_r[:, None])
                        + jnp.exp(logits - lse_c[None, :])))

  return jax.lax.cond(fast, one_exp, two_exps) + (jnp.zeros_like(shift),)


_softmax_contrastive.defvjp(_softmax_fwd, _softmax_bwd)


@jax.custom_vjp
def _sigmoid_contrastive(dots, a, c, bias):  # -> scalar
  return _sigmoid_fwd(dots, a, c, bias)[0]


def _signed(dots, a, c, bias):
  # v = -z u, u = l + bias, z = +1 on the diagonal and -1 elsewhere.
  u = _scaled(dots, a, c) + bias
  return jnp.where(_eye_like(dots), -u, u)


def _sigmoid_fwd(dots, a, c, bias):
  # -log sigmoid(z u) = softplus(v). The sign is flipped before the
  # softplus, not as softplus(u) - u on the diagonal, which cancels
  # catastrophically once the positives are confident.
  # softplus(v) = max(v, 0) + log1p(exp(-|v|)): the same values as
  # jax.nn.softplus in about half the time on CPU. exp(-|v|) is kept for the
  # gradient, so each logit takes one exp in all.
  v = _signed(dots, a, c, bias)
  e = jnp.exp(-jnp.abs(v))
  loss = jnp.sum(jnp.maximum(v, 0.0) + jnp.log1p(e)) / dots.shape[0]
  return loss, (dots, a, c, bias, e)


def _sigmoid_bwd(res, g):
  # d loss / d u_ij = -z_ij sigmoid(v_ij) / B.
  dots, a, c, bias, e = res
  v = _signed(dots, a, c, bias)
  sig = jnp.where(v >= 0, 1.0, e) / (1.0 + e)  # sigmoid(v)
  gu = jnp.where(_eye_like(dots), -sig, sig) * (g / dots.shape[0])
  gw = gu * dots
  return (gu * a[:, None] * c[None, :], gw @ c, a @ gw,
          jnp.sum(gu).astype(jnp.result_type(bias)))


_sigmoid_contrastive.defvjp(_sigmoid_fwd, _sigmoid_bwd)


def _per_prefix(value, n):  # scalar or [M] -> [M] float32
  return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (n,))


def _check_contrastive(x, y, nesting_dims, weights, kind, temperature, bias,
                       label_smoothing):
  """Validates `contrastive` arguments; returns (dims, weights)."""
  if kind not in CONTRASTIVE_KINDS:
    raise ValueError(
        f'contrastive: kind={kind!r} is unknown; use one of '
        f"{list(CONTRASTIVE_KINDS)} ('softmax': CLIP/ALIGN cross-entropy, "
        "'sigmoid': SigLIP).")
  x_shape, y_shape = tuple(jnp.shape(x)), tuple(jnp.shape(y))
  if len(x_shape) != 2 or x_shape != y_shape or not x_shape[0]:
    raise ValueError(
        f'contrastive: x {x_shape} and y {y_shape} must both be [B, d] with '
        'the same shape and B >= 1 (row i of x pairs with row i of y); '
        'project both towers to the same representation size.')
  dims, weights = validate_nesting(nesting_dims, weights, x_shape[1])
  n = len(dims)
  _check_per_prefix('temperature', temperature, n, positive=True,
                    hint='e.g. 0.07 (CLIP init) or 0.1 (SigLIP, t = 10)')
  if kind == 'softmax' and bias is not None:
    raise ValueError(
        f"contrastive: bias={_show_value(bias)} applies to kind='sigmoid' "
        "only; drop it for kind='softmax', or use kind='sigmoid'.")
  if kind == 'sigmoid':
    if bias is None:
      raise ValueError(
          "contrastive: kind='sigmoid' needs bias=b, a scalar or one per "
          f'nesting dim ({n} here); SigLIP starts at bias=-10.0.')
    _check_per_prefix('bias', bias, n, positive=False, hint='e.g. -10.0')
  if (not isinstance(label_smoothing, numbers.Real)
      or isinstance(label_smoothing, bool)
      or not 0.0 <= label_smoothing < 1.0):
    raise ValueError(
        f'contrastive: label_smoothing={label_smoothing!r} must be a number '
        'in [0, 1), e.g. 0.0 (off) or 0.1.')
  if kind == 'sigmoid' and label_smoothing:
    raise ValueError(
        f'contrastive: label_smoothing={label_smoothing!r} applies to '
        "kind='softmax' only; set it to 0.0 for kind='sigmoid'.")
  return dims, weights


def _check_per_prefix(name, value, n, *, positive, hint):
  shape = tuple(jnp.shape(value))
  if shape not in ((), (n,)):
    raise ValueError(
        f'contrastive: {name} has shape {shape}; give a scalar or one value '
        f'per nesting dim, shape ({n},) ({hint}).')
  # Values known on the host are checked; traced (learned) ones cannot be.
  if isinstance(value, (numbers.Real, np.ndarray, list, tuple)):
    v = np.asarray(value, np.float64)
    if not np.all(np.isfinite(v)) or (positive and np.any(v <= 0)):
      need = 'positive and finite' if positive else 'finite'
      raise ValueError(
          f'contrastive: {name}={_show_value(value)} must be {need} '
          f'({hint}).')


def _show_value(v):
  if isinstance(v, (numbers.Real, list, tuple, np.ndarray)):
    return _show(v)
  return f'<array of shape {tuple(jnp.shape(v))}>'
