"""Pallas TPU kernels for one ring step of the nested contrastive losses.

`mrl_jax.contrastive` visits the tiles (local rows x one device's columns)
of every prefix's logits. In plain XLA each prefix's [rows, block] logits
go through HBM several times (written by the chunk matmul, read by each
reduction, again in the gradient): HBM traffic is ~M times that of a
one-prefix CLIP loss. These kernels keep a [TILE, TILE] tile of every prefix
in VMEM from the chunk matmuls to the reductions, and write to HBM only
what leaves the tile: per-prefix log-sum-exps or sums ([M, TILE]) and, for
the gradient, the tile's share of dx and dy.

Same math and layout as the XLA form in `mrl_jax.contrastive`: a, c are the
row and column scales [M, b] (logits l = dots * a_i * c_j), and the
functions return what one ring step adds. Values per row are passed as
[b, M] (rows on sublanes) and per column as [M, b] (columns on lanes), so
that a prefix's scale broadcasts over the tile without a relayout.

Used on TPU only (`contrastive` picks them with `lax.platform_dependent`);
`interpret=True` runs them on any backend for tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mrl_jax import prefix
from mrl_jax import sharding

# Rows and columns of a tile. 8 [TILE, TILE] float32 tiles (the chunk dots
# running sum and the prefixes' cotangents) plus double-buffered x, y, dx and
# dy blocks stay under 16 MiB of VMEM for d <= 2048.
TILE = 256


def tile_for(b: int) -> int | None:
  """The tile size for a local batch b, or None when no tile divides it."""
  for t in (TILE, 128):
    if b % t == 0:
      return t
  return None


def _tn(u, v):  # u [r, c], v [r, f] -> u.T @ v [c, f]
  return jax.lax.dot_general(u, v, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def lse(l, axis):
  """Log-sum-exp along `axis`, kept as a size-1 axis (logits are finite).

  The tile math here (`lse`, `flip_diagonal`) is shared with the XLA form in
  `mrl_jax.contrastive`.
  """
  top = jnp.max(l, axis=axis, keepdims=True)
  return top + jnp.log(jnp.sum(jnp.exp(l - top), axis=axis, keepdims=True))


def _logaddexp(p, q):  # p may be -inf (a first tile), q is finite
  top = jnp.maximum(p, q)
  return top + jnp.log(jnp.exp(p - top) + jnp.exp(q - top))


def flip_diagonal(step, row0, col0, t):
  """t [..., r, c] with the entries on the global diagonal negated: rows
  row0 + i, columns col0 + j of this device's own block (ring step 0). For
  the sigmoid loss: v = -z u from u = l + b, and -z sigmoid(v) from sigmoid(v)."""
  rows = jax.lax.broadcasted_iota(jnp.int32, t.shape[-2:], 0) + row0
  cols = jax.lax.broadcasted_iota(jnp.int32, t.shape[-2:], 1) + col0
  return jnp.where((rows == cols) & (step == 0), -t, t)


# ---------------------------------------------------------------------------
# Forward: per-prefix log-sum-exps (softmax) or softplus sums (sigmoid).
# ---------------------------------------------------------------------------


def _forward_kernel(dims, kind, step_ref, x_ref, y_ref, a_ref, c_ref, bias_ref,
                    row_ref, col_ref):
  i, j = pl.program_id(0), pl.program_id(1)
  r0, c0 = i * x_ref.shape[0], j * y_ref.shape[0]  # this tile's first row, column

  @pl.when(j == 0)
  def _():
    fill = -jnp.inf if kind == 'softmax' else 0.0
    row_ref[...] = jnp.full(row_ref.shape, fill, jnp.float32)

  x, y = x_ref[...], y_ref[...]
  for m, dots in enumerate(prefix.prefix_dots(x, y, dims)):
    l = dots * a_ref[:, m:m + 1] * c_ref[m:m + 1, :]  # [T, T]
    if kind == 'softmax':
      row_ref[:, m:m + 1] = _logaddexp(row_ref[:, m:m + 1], lse(l, 1))
      col_ref[0, m:m + 1, :] = lse(l, 0)
    else:
      v = flip_diagonal(step_ref[0], r0, c0, l + bias_ref[:, m:m + 1])
      row_ref[:, m:m + 1] += jnp.sum(jax.nn.softplus(v), 1, keepdims=True)


def forward(dims, kind, step, x, y, a, c, bias, *, interpret=False):
  """One ring step's (rows [M, b], columns [M, b]) results.

  softmax: log-sum-exps over this step's columns (rows) and over the local
  rows (columns). sigmoid: softplus sums of the local rows over this step's
  columns; the second result is zeros.
  """
  b, d = x.shape
  m, t = len(dims), tile_for(b)
  nr, nc = b // t, b // t
  biasT = jnp.broadcast_to(bias, (b, m))
  rows, cols = pl.pallas_call(
      functools.partial(_forward_kernel, tuple(dims), kind),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(nr, nc),
          in_specs=[pl.BlockSpec((t, d), lambda i, j, s: (i, 0)),
                    pl.BlockSpec((t, d), lambda i, j, s: (j, 0)),
                    pl.BlockSpec((t, m), lambda i, j, s: (i, 0)),
                    pl.BlockSpec((m, t), lambda i, j, s: (0, j)),
                    pl.BlockSpec((t, m), lambda i, j, s: (i, 0))],
          out_specs=[pl.BlockSpec((t, m), lambda i, j, s: (i, 0)),
                     pl.BlockSpec((1, m, t), lambda i, j, s: (i, 0, j))]),
      out_shape=[_out((b, m), x), _out((nr, m, b), x)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'arbitrary')),
      cost_estimate=_cost(dims, b, d, x.dtype, passes=1),
      interpret=interpret,
  )(*_varying_as(x, jnp.reshape(step, (1,)).astype(jnp.int32), x, y, a.T, c,
                 biasT))
  if kind == 'softmax':
    return rows.T, jax.nn.logsumexp(cols, axis=0)
  return rows.T, jnp.zeros((m, b), jnp.float32)


# ---------------------------------------------------------------------------
# Gradient: one ring step's share of dx, da (rows) and dy, dc (columns).
# ---------------------------------------------------------------------------


def _backward_kernel(dims, kind, step_ref, x_ref, y_ref, a_ref, c_ref,
                     r1_ref, r2_ref, c1_ref, c2_ref,
                     gx_ref, ga_ref, gr_ref, gy_ref, gc_ref):
  # softmax: r1, r2 = lse_r, g_r [T, M]; c1, c2 = lse_c, g_c [M, T].
  # sigmoid: r1 = bias, r2 = g [T, M] (broadcast); c1, c2 unused.
  # gr: the rows' sum of d loss / d l (the sigmoid's bias cotangent).
  i, j = pl.program_id(0), pl.program_id(1)
  r0, c0 = i * x_ref.shape[0], j * y_ref.shape[0]  # this tile's first row, column

  @pl.when(j == 0)
  def _():
    for ref in (gx_ref, ga_ref, gr_ref):
      ref[...] = jnp.zeros(ref.shape, jnp.float32)

  x, y = x_ref[...], y_ref[...]
  hs = []
  for m, dots in enumerate(prefix.prefix_dots(x, y, dims)):
    a, c = a_ref[:, m:m + 1], c_ref[m:m + 1, :]
    l = dots * a * c
    if kind == 'softmax':
      g = (r2_ref[:, m:m + 1] * jnp.exp(l - r1_ref[:, m:m + 1])
           + c2_ref[m:m + 1, :] * jnp.exp(l - c1_ref[m:m + 1, :]))
    else:
      v = flip_diagonal(step_ref[0], r0, c0, l + r1_ref[:, m:m + 1])
      g = flip_diagonal(step_ref[0], r0, c0, jax.nn.sigmoid(v)) * r2_ref[:, m:m + 1]
      gr_ref[:, m:m + 1] += jnp.sum(g, 1, keepdims=True)
    gd = g * dots
    ga_ref[:, m:m + 1] += jnp.sum(gd * c, 1, keepdims=True)
    gc_ref[0, m:m + 1, :] = jnp.sum(gd * a, 0, keepdims=True)
    hs.append(g * a * c)  # d loss / d dots of prefix m
  # Chunk (lo, hi] feeds every prefix from its own on: its cotangent is the
  # running sum of the prefixes' from the largest down.
  run = 0.0
  for m, (lo, hi) in reversed(list(enumerate(prefix.chunks(dims)))):
    run = run + hs[m]
    gx_ref[:, lo:hi] += jnp.dot(run, y[:, lo:hi],
                                preferred_element_type=jnp.float32)
    gy_ref[0, :, lo:hi] = _tn(run, x[:, lo:hi])


def backward(dims, kind, step, x, y, a, c, rows, cols, *, interpret=False):
  """One ring step's (dx [b, d], da [M, b], dr [M], dy [b, d], dc [M, b]).

  rows = (lse_r, g_r) and cols = (lse_c, g_c), each [M, b], for softmax;
  rows = (bias [M], g [M]) and cols unused for sigmoid, whose dr is the bias
  cotangent (zeros for softmax).
  """
  b, d = x.shape
  m, t = len(dims), tile_for(b)
  nr, nc = b // t, b // t
  r1, r2 = (jnp.broadcast_to(v.T if v.ndim == 2 else v, (b, m)) for v in rows)
  c1, c2 = cols if kind == 'softmax' else (jnp.zeros((m, b), jnp.float32),) * 2
  row_spec = pl.BlockSpec((t, m), lambda i, j, s: (i, 0))
  col_spec = pl.BlockSpec((m, t), lambda i, j, s: (0, j))
  gx, ga, gr, gy, gc = pl.pallas_call(
      functools.partial(_backward_kernel, tuple(dims), kind),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(nr, nc),
          in_specs=[pl.BlockSpec((t, d), lambda i, j, s: (i, 0)),
                    pl.BlockSpec((t, d), lambda i, j, s: (j, 0)),
                    row_spec, col_spec, row_spec, row_spec, col_spec, col_spec],
          out_specs=[pl.BlockSpec((t, d), lambda i, j, s: (i, 0)),
                     row_spec, row_spec,
                     pl.BlockSpec((1, t, d), lambda i, j, s: (i, j, 0)),
                     pl.BlockSpec((1, m, t), lambda i, j, s: (i, 0, j))]),
      out_shape=[_out((b, d), x), _out((b, m), x), _out((b, m), x),
                 _out((nr, b, d), x), _out((nr, m, b), x)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'arbitrary')),
      cost_estimate=_cost(dims, b, d, x.dtype, passes=3),
      interpret=interpret,
  )(*_varying_as(x, jnp.reshape(step, (1,)).astype(jnp.int32), x, y, a.T, c,
                 r1, r2, c1, c2))
  return gx, ga.T, jnp.sum(gr, 0), jnp.sum(gy, 0), jnp.sum(gc, 0)


def _varying_as(like, *args):
  # Inside `shard_map` a kernel's operands must all vary over the same mesh
  # axes (the loop's step and a shared bias do not).
  return sharding.vary(list(args), tuple(jax.typeof(like).mat.varying))


def _out(shape, like):
  # Inside `shard_map` the outputs vary over the mesh axes as x does.
  return jax.ShapeDtypeStruct(shape, jnp.float32,
                              manual_axis_type=jax.typeof(like).mat)


def _cost(dims, b, d, dtype, *, passes):
  """What XLA's cost analysis counts for a kernel (it cannot look inside).

  FLOPs: `passes` [b, d] x [d, b] products (the forward's chunk dots; in the
  gradient, their recompute and the two cotangent products) plus ~12
  elementwise operations per logit of every prefix. Transcendentals: 2 per
  logit. Bytes: what the block specs move between HBM and VMEM: x once, y
  once per row tile, the [b, M] / [M, b] vectors, the outputs (the gradient's
  dx, and dy once per row tile, in float32).
  """
  m, t = len(dims), tile_for(b)
  tiles, logits = b // t, m * b * b
  nbytes = jnp.dtype(dtype).itemsize * b * d * (1 + tiles)
  if passes == 1:  # a, bias; c per row tile; rows; columns per row tile
    nbytes += 4 * m * b * (3 + 2 * tiles)
  else:  # 3 row and 3 column vectors in, dx, dy and 3 vectors out
    nbytes += 4 * (m * b * (3 + 3 * tiles + 2 + tiles) + b * d * (1 + tiles))
  return pl.CostEstimate(flops=2 * passes * b * b * d + 12 * logits,
                         transcendentals=2 * logits, bytes_accessed=int(nbytes))
