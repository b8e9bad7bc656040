"""Nested contrastive losses (CLIP/ALIGN softmax, SigLIP sigmoid), blocked.

For every prefix m of the nesting list, image x[:, :m] and text y[:, :m] are
L2-normalised on their own and compared by cosine, s_m[i, j]; the loss of
prefix m is over the logits l_m = s_m / tau_m of the whole (global) batch:

    softmax  0.5 * (CE_i2t + CE_t2i), positives on the diagonal
             = mean_i 0.5 (lse_j l_ij + lse_j l_ji) - l_ii   (+ smoothing)
    sigmoid  (1/B) sum_ij softplus(-z_ij (l_ij + b_m)), z = +1 on the diagonal

How it is computed, so that all M prefixes cost about what one CLIP loss does:

* Chunked dots. Dot products and squared norms of every prefix are running
  sums over the disjoint chunks between nesting dims, so one [B, d] x [B, d]
  product (in M slices of the features) gives every prefix's dots.
* Blocks of columns. The [M, B, B] logits are never held: the columns are
  visited one block of `block_size` at a time, and each block updates the
  log-sum-exps of its rows and columns (softmax) or the sum of softpluses
  (sigmoid). Memory is O(B_local x block x M). The gradient recomputes each
  block from x, y and the saved log-sum-exps, as flash attention does.
* A ring over the batch shards. Under a mesh whose batch axes
  (`sharding.BATCH_AXES`) split x and y, each device keeps its rows and the
  column blocks travel from device to device (`ppermute`), with the column
  results (log-sum-exps; in the gradient, the columns' cotangents) travelling
  along and arriving home after the last hop: no device holds the global y,
  and every collective is explicit. Without such a mesh (or when the batch
  does not split evenly) the same code runs as one ring of one.

Math is float32 whatever the input dtype (bf16 products accumulate in f32).
The definitions are in docs/ARCHITECTURE.md; `matryoshka` re-exports the
public functions.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from mrl_jax import contrastive_kernels
from mrl_jax import prefix
from mrl_jax import sharding

CONTRASTIVE_KINDS = ('softmax', 'sigmoid')

# Elements of one [M, B_local, block] float32 tile the default block size
# aims for (16 MiB): small next to a chip's HBM, large enough that the
# matmuls of a block keep the MXU busy.
_TILE_ELEMENTS = 2**22
_MIN_BLOCK = 128

# Where the Pallas kernels of `contrastive_kernels` run (the `kernels`
# argument): 'tpu' (on TPU, when a kernel tile divides the local batch; XLA's
# blocked form elsewhere), 'interpret' (everywhere, interpreted: for tests)
# or 'never' (XLA's form everywhere).
KERNELS = ('tpu', 'interpret', 'never')


def contrastive_per_dim(x, y, nesting_dims, *, kind: str = 'softmax',
                        temperature, bias=None, label_smoothing: float = 0.0,
                        block_size: int | None = None,
                        kernels: str = 'tpu') -> jax.Array:
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
    block_size: columns per block (a positive int; larger than the local
      batch is clamped to it). None picks the largest power of two (>= 128)
      whose [M, B_local, block] tile stays within 16 MiB. It changes memory
      and speed only, not the result beyond float32 rounding.
    kernels: where the Pallas kernels run, one of `KERNELS`: 'tpu' (default),
      'interpret' or 'never'.

  The batch is the global one: under `jax.set_mesh` with the batch split over
  the mesh's batch axes, the loss runs as a ring over them (module docstring)
  and every prefix's loss is over the global B x B similarities.
  """
  dims = _check(x, y, nesting_dims, None, kind, temperature, bias,
                label_smoothing, block_size, kernels)[0]
  return _per_dim(x, y, dims, kind, temperature, bias, label_smoothing,
                  block_size, kernels)


def contrastive(x, y, nesting_dims, weights=None, *, kind: str = 'softmax',
                temperature, bias=None, label_smoothing: float = 0.0,
                block_size: int | None = None, kernels: str = 'tpu') -> jax.Array:
  """Nested contrastive loss sum_m c_m * L_m(x[:, :m], y[:, :m]): a SUM.

  `weights` are the c_m (default all 1); everything else as
  `contrastive_per_dim`, which gives the [M] per-prefix losses to log.
  """
  dims, weights = _check(x, y, nesting_dims, weights, kind, temperature, bias,
                         label_smoothing, block_size, kernels)
  per_dim = _per_dim(x, y, dims, kind, temperature, bias, label_smoothing,
                     block_size, kernels)
  return jnp.sum(jnp.asarray(weights, jnp.float32) * per_dim)


def prefix_cosines(x, y, nesting_dims) -> jax.Array:
  """Cosine similarities of every prefix: x [B, d], y [B', d] -> [M, B, B'].

  s_m[i, j] = <x_i[:m], y_j[:m]> / (|x_i[:m]| |y_j[:m]|), each prefix
  normalised on its own, in the chunked form. float32; all of it at once,
  so for small batches (the losses above never hold it).
  """
  dims = prefix.checked_dims(nesting_dims)
  for name, z in (('x', x), ('y', y)):
    prefix.check_features(z, dims[-1], f'prefix_cosines: {name}')
  inv_x, inv_y = prefix.inv_norms(x, dims), prefix.inv_norms(y, dims)
  return _dots(dims, x, y) * inv_x[:, :, None] * inv_y[:, None, :]


# ---------------------------------------------------------------------------
# The loss on one device's rows: norms, then the ring.
# ---------------------------------------------------------------------------


class _Plan(NamedTuple):
  """What the blocked passes need to know, all static."""
  dims: tuple[int, ...]
  block: int  # columns per block
  axes: tuple[str, ...]  # the mesh axes the batch is split over; () = none
  n: int  # devices in the ring
  kernels: str  # one of KERNELS


def _per_dim(x, y, dims, kind, temperature, bias, eps, block_size, kernels):
  m = len(dims)
  inv_tau = 1.0 / jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (m,))
  bias = jnp.broadcast_to(jnp.asarray(0.0 if bias is None else bias,
                                      jnp.float32), (m,))
  axes, n = _batch_axes(x.shape[0])
  b = x.shape[0] // n
  block = min(block_size or _default_block(b, m), b)
  plan = _Plan(tuple(dims), block, axes, n, kernels)
  local = functools.partial(_local_per_dim, plan, kind, eps)
  if not axes:
    return local(x, y, inv_tau, bias)
  rows = P(axes)
  return jax.shard_map(local, in_specs=(rows, rows, P(), P()),
                       out_specs=P())(x, y, inv_tau, bias)


def _batch_axes(batch: int) -> tuple[tuple[str, ...], int]:
  """The context mesh's batch axes (size > 1) if they split `batch` evenly."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return (), 1
  axes = tuple(a for a in sharding.BATCH_AXES
               if a in mesh.axis_names and mesh.shape[a] > 1)
  n = math.prod(mesh.shape[a] for a in axes)
  if n == 1 or batch % n:
    return (), 1
  return axes, n


def _default_block(b: int, m: int) -> int:
  fit = max(1, _TILE_ELEMENTS // (m * b))
  return max(_MIN_BLOCK, 2 ** int(math.log2(fit)))


def _local_per_dim(plan, kind, eps, x, y, inv_tau, bias):
  """[M] losses from this device's rows x, y [b, d] (the global batch is n b)."""
  dims, total = plan.dims, x.shape[0] * plan.n
  a = prefix.inv_norms(x, dims) * inv_tau[:, None]  # [M, b]: l_ij = dots_ij a_i c_j
  c = prefix.inv_norms(y, dims)
  if kind == 'sigmoid':
    # Each device's bias cotangent is its rows' share: with bias cast to
    # varying, autodiff sums the shares over the ring (pcast's transpose).
    sums = _softplus_sums(plan, x, y, a, c, sharding.vary(bias, plan.axes))
    return _psum(plan, sums) / total
  lse_r, lse_c = _softmax_lses(plan, x, y, a, c)  # [M, b] each
  diag = prefix.row_sums(x.astype(jnp.float32) * y.astype(jnp.float32), dims) * a * c
  loss = (0.5 * (jnp.sum(lse_r, 1) + jnp.sum(lse_c, 1))
          - (1.0 - eps) * jnp.sum(diag, 1))
  loss = _psum(plan, loss) / total
  if eps:
    # Row i's target (1 - eps) onehot(i) + eps / B adds -eps * mean_j l_ij in
    # both directions: -eps * sum_ij l_ij / B^2, and sum_ij l_ij is the dot
    # of the scaled column sums of x[:, :m] and y[:, :m].
    mask = np.arange(x.shape[1]) < np.asarray(dims)[:, None]  # [M, d]
    u = _psum(plan, jnp.einsum('mi,if->mf', a, x.astype(jnp.float32)))
    v = _psum(plan, jnp.einsum('mi,if->mf', c, y.astype(jnp.float32)))
    loss = loss - eps * jnp.sum(u * v * mask, 1) / total**2
  return loss


def _dots(dims, x, y):
  """[b, d] x [k, d] -> [M, b, k]: x[:, :m] @ y[:, :m].T for every prefix m."""
  return jnp.stack(list(prefix.prefix_dots(x, y, dims)))


def _dots_vjp(dims, x, y, h):
  """Cotangents of x [b, d], y [k, d] from h [M, b, k], that of `_dots`."""
  # Chunk (lo, hi] feeds every prefix from its own on, so its cotangent is a
  # running sum of h from the largest prefix down; then one matmul per chunk
  # and tower, as in the forward pass.
  gx, gy, run = [], [], 0.0
  for k, (lo, hi) in reversed(list(enumerate(prefix.chunks(dims)))):
    run = run + h[k]  # [b, k]
    gx.append(jnp.einsum('ij,jf->if', run, y[:, lo:hi],
                         preferred_element_type=jnp.float32))
    gy.append(jnp.einsum('ij,if->jf', run, x[:, lo:hi],
                         preferred_element_type=jnp.float32))
  return jnp.concatenate(gx[::-1], 1), jnp.concatenate(gy[::-1], 1)


def _psum(plan, v):
  return jax.lax.psum(v, plan.axes) if plan.axes else v


# ---------------------------------------------------------------------------
# Traversal: every (local rows, block of columns) tile once.
# ---------------------------------------------------------------------------


def _ring(plan, step, acc, data, res):
  """`sharding.ring` over the batch shards (the module docstring)."""
  return sharding.ring(step, acc, data, res, plan.axes, plan.n)


def _over_blocks(plan, width, fn, carry):
  """carry = fn(carry, start, size) over column blocks covering [0, width).

  Full blocks run in a loop; a last, smaller block (when `plan.block` does
  not divide `width`) runs once after it, at its own static size.
  """
  k = plan.block
  full, rest = divmod(width, k)
  if full == 1:
    carry = fn(carry, 0, k)
  elif full > 1:
    carry = jax.lax.fori_loop(0, full, lambda j, c: fn(c, j * k, k), carry)
  if rest:
    carry = fn(carry, full * k, rest)
  return carry


def _pick(plan, b, xla_step, kernel_step):
  """The ring step to run: `kernel_step` (Pallas) on TPU, else `xla_step`."""
  if plan.kernels == 'never' or contrastive_kernels.tile_for(b) is None:
    return xla_step
  if plan.kernels == 'interpret':
    return functools.partial(kernel_step, interpret=True)

  def step(s, acc, data, res):
    return jax.lax.platform_dependent(s, acc, data, res, tpu=kernel_step,
                                      default=xla_step)
  return step


def _cols(v, start, size, axis):
  return jax.lax.dynamic_slice_in_dim(v, start, size, axis)


def _set_cols(v, update, start, axis):
  return jax.lax.dynamic_update_slice_in_dim(v, update, start, axis)


def _recomputed(y_s):
  # The gradient recomputes the forward's dots. In one program with the
  # loops unrolled (as `mrl_jax.compile` counts FLOPs) XLA would merge the
  # two and the recompute would look free; the barrier keeps them apart, as
  # the loops do.
  return jax.lax.optimization_barrier(y_s)


def _tile_grads(plan, x, y_s, a, c_s, dots, g, start, grads):
  """Adds one tile's share, from g = d loss / d logits [M, b, k], to
  grads = (gx [b, d], ga [M, b]) of the rows and (gy [b, d], gc [M, b]) of
  the travelling columns."""
  (gx, ga), (gy, gc) = grads
  gd = g * dots  # l = dots a c, so d/da_i = sum_j g dots c_j, and so on
  ga = ga + jnp.sum(gd * c_s[:, None, :], 2)
  gc_s = jnp.sum(gd * a[:, :, None], 1)
  dx, dy = _dots_vjp(plan.dims, x, y_s, g * a[:, :, None] * c_s[:, None, :])
  size = y_s.shape[0]
  gy = _set_cols(gy, _cols(gy, start, size, 0) + dy, start, 0)
  gc = _set_cols(gc, _cols(gc, start, size, 1) + gc_s, start, 1)
  return (gx + dx, ga), (gy, gc)


def _add(tree, other):
  return jax.tree.map(jnp.add, tree, other)


def _grad_zeros(x, a):
  rows = (jnp.zeros(x.shape, jnp.float32), jnp.zeros_like(a))
  return rows, jax.tree.map(jnp.zeros_like, rows)


# ---------------------------------------------------------------------------
# Softmax: log-sum-exps of every row and column, online over the blocks.
# ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _softmax_lses(plan, x, y, a, c):
  """-> (lse_r, lse_c) [M, b]: lse_j l_ij of this device's rows i and
  lse_i l_ij of its columns j, each over the global batch."""
  return _softmax_fwd(plan, x, y, a, c)[0]


def _softmax_fwd(plan, x, y, a, c):
  def step(s, lse_r, data, lse_c):
    y_blk, c_blk = data

    def block(carry, start, size):
      lse_r, lse_c = carry
      c_s = _cols(c_blk, start, size, 1)
      l = _dots(plan.dims, x, _cols(y_blk, start, size, 0)) * (
          a[:, :, None] * c_s[:, None, :])  # [M, b, k]
      lse_r = jnp.logaddexp(lse_r, contrastive_kernels.lse(l, 2)[..., 0])
      col = jnp.logaddexp(_cols(lse_c, start, size, 1),
                          contrastive_kernels.lse(l, 1)[:, 0])
      return lse_r, _set_cols(lse_c, col, start, 1)

    return _over_blocks(plan, y_blk.shape[0], block, (lse_r, lse_c))

  def kernel_step(s, lse_r, data, lse_c, interpret=False):
    y_blk, c_blk = data
    rows, cols = contrastive_kernels.forward(
        plan.dims, 'softmax', s, x, y_blk, a, c_blk, jnp.zeros(a.shape[0]),
        interpret=interpret)
    return jnp.logaddexp(lse_r, rows), jnp.logaddexp(lse_c, cols)

  init = jnp.full(a.shape, -jnp.inf, jnp.float32)
  lse_r, lse_c = _ring(plan, _pick(plan, x.shape[0], step, kernel_step), init,
                       (y, c), init)
  return (lse_r, lse_c), (x, y, a, c, lse_r, lse_c)


def _softmax_bwd(plan, res, cotangents):
  # d lse_r[i] / d l_ij = P_ij = exp(l_ij - lse_r[i]) (row softmax), and
  # d lse_c[j] / d l_ij = Q_ij = exp(l_ij - lse_c[j]) (column softmax).
  x, y, a, c, lse_r, lse_c = res
  g_r, g_c = cotangents

  def step(s, rows, data, cols):
    y_blk, c_blk, lse_c_blk, g_c_blk = data

    def block(grads, start, size):
      y_s = _recomputed(_cols(y_blk, start, size, 0))
      c_s, lc_s, gc_s = (_cols(v, start, size, 1)
                         for v in (c_blk, lse_c_blk, g_c_blk))
      dots = _dots(plan.dims, x, y_s)
      l = dots * (a[:, :, None] * c_s[:, None, :])
      g = (g_r[:, :, None] * jnp.exp(l - lse_r[:, :, None])
           + gc_s[:, None, :] * jnp.exp(l - lc_s[:, None, :]))
      return _tile_grads(plan, x, y_s, a, c_s, dots, g, start, grads)

    return _over_blocks(plan, y_blk.shape[0], block, (rows, cols))

  def kernel_step(s, rows, data, cols, interpret=False):
    y_blk, c_blk, lse_c_blk, g_c_blk = data
    dx, da, _, dy, dc = contrastive_kernels.backward(
        plan.dims, 'softmax', s, x, y_blk, a, c_blk, (lse_r, g_r),
        (lse_c_blk, g_c_blk), interpret=interpret)
    return _add(rows, (dx, da)), _add(cols, (dy, dc))

  rows, cols = _grad_zeros(x, a)
  (gx, ga), (gy, gc) = _ring(plan, _pick(plan, x.shape[0], step, kernel_step), rows,
                             (y, c, lse_c, g_c), cols)
  return gx.astype(x.dtype), gy.astype(y.dtype), ga, gc


_softmax_lses.defvjp(_softmax_fwd, _softmax_bwd)


# ---------------------------------------------------------------------------
# Sigmoid: the sum of softplus(v), v = -z (l + b), over every pair.
# ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _softplus_sums(plan, x, y, a, c, bias):
  """-> [M]: sum of softplus(v_ij) over this device's rows i, all columns j."""
  return _sigmoid_fwd(plan, x, y, a, c, bias)[0]


def _sigmoid_fwd(plan, x, y, a, c, bias):
  def step(s, total, data, res):
    y_blk, c_blk = data

    def block(total, start, size):
      l = _dots(plan.dims, x, _cols(y_blk, start, size, 0)) * (
          a[:, :, None] * _cols(c_blk, start, size, 1)[:, None, :])
      # The sign is flipped before the softplus, not as softplus(u) - u on
      # the diagonal, which cancels catastrophically once the positives are
      # confident.
      v = contrastive_kernels.flip_diagonal(s, 0, start, l + bias[:, None, None])
      return total + jnp.sum(jax.nn.softplus(v), (1, 2))

    return _over_blocks(plan, y_blk.shape[0], block, total), res

  def kernel_step(s, total, data, res, interpret=False):
    y_blk, c_blk = data
    rows, _ = contrastive_kernels.forward(plan.dims, 'sigmoid', s, x, y_blk, a,
                                          c_blk, bias, interpret=interpret)
    return total + jnp.sum(rows, 1), res

  total, _ = _ring(plan, _pick(plan, x.shape[0], step, kernel_step),
                   jnp.zeros(bias.shape, jnp.float32), (y, c), ())
  return total, (x, y, a, c, bias)


def _sigmoid_bwd(plan, res, g_total):
  # d softplus(v) / d u = sigmoid(v) * dv/du, and dv/du = -z.
  x, y, a, c, bias = res

  def step(s, acc, data, cols):
    rows, g_bias = acc
    y_blk, c_blk = data

    def block(carry, start, size):
      grads, g_bias = carry
      y_s = _recomputed(_cols(y_blk, start, size, 0))
      c_s = _cols(c_blk, start, size, 1)
      dots = _dots(plan.dims, x, y_s)
      l = dots * (a[:, :, None] * c_s[:, None, :])
      v = contrastive_kernels.flip_diagonal(s, 0, start, l + bias[:, None, None])
      g = (contrastive_kernels.flip_diagonal(s, 0, start, jax.nn.sigmoid(v))
           * g_total[:, None, None])
      grads = _tile_grads(plan, x, y_s, a, c_s, dots, g, start, grads)
      return grads, g_bias + jnp.sum(g, (1, 2))

    (rows, cols), g_bias = _over_blocks(plan, y_blk.shape[0], block,
                                        ((rows, cols), g_bias))
    return (rows, g_bias), cols

  def kernel_step(s, acc, data, cols, interpret=False):
    rows, g_bias = acc
    y_blk, c_blk = data
    dx, da, db, dy, dc = contrastive_kernels.backward(
        plan.dims, 'sigmoid', s, x, y_blk, a, c_blk, (bias, g_total), None,
        interpret=interpret)
    return (_add(rows, (dx, da)), g_bias + db), _add(cols, (dy, dc))

  rows, cols = _grad_zeros(x, a)
  ((gx, ga), g_bias), (gy, gc) = _ring(
      plan, _pick(plan, x.shape[0], step, kernel_step),
      (rows, jnp.zeros_like(bias)), (y, c), cols)
  return gx.astype(x.dtype), gy.astype(y.dtype), ga, gc, g_bias


_softplus_sums.defvjp(_sigmoid_fwd, _sigmoid_bwd)


# ---------------------------------------------------------------------------
# Arguments.
# ---------------------------------------------------------------------------


def _check(x, y, nesting_dims, weights, kind, temperature, bias,
           label_smoothing, block_size, kernels):
  """Validates the losses' arguments; returns (dims, weights)."""
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
  dims, weights = prefix.validate_nesting(nesting_dims, weights,
                                              x_shape[1], caller='contrastive')
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
  if block_size is not None and (not prefix.is_int(block_size)
                                 or block_size <= 0):
    raise ValueError(
        f'contrastive: block_size={block_size!r} must be a positive int '
        '(columns per block; larger than the batch is clamped to it), or '
        'None for the default.')
  if kernels not in KERNELS:
    raise ValueError(f'contrastive: kernels={kernels!r} is not one of {list(KERNELS)}.')
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
    return prefix.show(v)
  return f'<array of shape {tuple(jnp.shape(v))}>'
