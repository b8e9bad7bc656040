"""Prefixes of a Matryoshka embedding: nesting lists, chunk boundaries, the
norm floor, truncation.

The one home of these; the heads, losses, searches and exports import them.

* `nesting_dims(d)` builds a nesting list and `validate_nesting` checks one
  (with the config field in every message).
* `chunks(nesting_dims)`: the disjoint feature ranges between consecutive
  nesting dims, (0, m_1], (m_1, m_2], ..., (m_{K-1}, d]. A prefix's dot
  products and squared norms are running sums over them, so all prefixes
  cost one full-width product.
* `NORM_EPS` (and `SQ_NORM_EPS`, its square, for floors on squared norms):
  norms below it count as zero, so a zero prefix stays zero (cosine 0,
  gradient 0) instead of NaN.
* `truncate(z, m)`: the embedding at budget m, renormalised; `inv_norms`
  the inverse norms and `prefix_dots` the dot products of every prefix at
  once.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

NORM_EPS = 1e-12
SQ_NORM_EPS = NORM_EPS**2


def nesting_dims(d: int, start: int = 8) -> list[int]:
  """Doubling nesting list [start, 2*start, 4*start, ..., d], ending at d.

  If d is not start * 2^k the last doubling below d is followed by d itself,
  e.g. nesting_dims(100) == [8, 16, 32, 64, 100]. If d <= start: [d].
  Doubling rather than uniform spacing: the paper found uniform lists starve
  the smallest dims.
  """
  for name, v in (('d', d), ('start', start)):
    if not is_int(v) or v <= 0:
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
    *,
    caller: str | None = None,
) -> tuple[list[int], list[float]]:
  """Checks the nesting config; returns (dims, weights) as plain lists.

  Raises ValueError naming the field, the value and the fix, so a bad config
  fails before any compute is spent: the config's fields by default, or, for
  a library function `caller`, its own arguments (`caller: weights=...`).
  Lists, tuples and NumPy / JAX arrays are accepted. `weights` defaults to
  all 1.0; all zero is refused (the loss would be 0 whatever the model).
  """
  d = representation_size
  if caller is None:
    size_field, dims_name, weights_name = (
        'config.model.representation_size', 'config.mrl.nesting_dims', 'config.mrl.weights')
  else:
    size_field, dims_name, weights_name = (
        f'{caller}: the feature size', f'{caller}: nesting_dims', 'weights')
  if not is_int(d) or d <= 0:
    raise ValueError(f'{size_field}={d!r} must be a positive int.')
  example = _nesting_example(d)
  # Arrays are fine too; judge them by their elements.
  if hasattr(nesting_dims, '__array__') and not isinstance(nesting_dims, Sequence):
    nesting_dims = np.asarray(nesting_dims).tolist()
  if hasattr(weights, '__array__') and not isinstance(weights, Sequence):
    weights = np.asarray(weights).tolist()

  dims_field = f'{dims_name}={show(nesting_dims)}'
  if (nesting_dims is None or isinstance(nesting_dims, (str, bytes))
      or not isinstance(nesting_dims, Sequence) or not nesting_dims):
    raise ValueError(
        f'{dims_field} must be a non-empty list of ints ending at '
        f'config.model.representation_size={d}; e.g. {example}.')
  for m in nesting_dims:
    if not is_int(m):
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
        f'{dims_field} must end at {size_field}={d} '
        f'(the full embedding), but ends at {dims[-1]}; set the last dim to '
        f'{d} or change the representation size, e.g. {example}.')

  if weights is None:
    return dims, [1.0] * len(dims)
  weights_field = f'{weights_name}={show(weights)}'
  if caller is not None and not weights_field.startswith(caller):
    weights_field = f'{caller}: {weights_field}'
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
  if not any(weights):
    raise ValueError(
        f'{weights_field} are all zero: the loss would be 0 whatever the '
        'model does; give a positive weight to at least one dim (e.g. all 1.0).')
  return dims, [float(c) for c in weights]


def is_int(v) -> bool:
  # bool is an int subclass, but True is never a meant dimension.
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def show(v) -> str:
  return repr(list(v)) if isinstance(v, tuple) else repr(v)


def _nesting_example(d: int) -> str:
  return f'nesting_dims({d}) = {nesting_dims(d, start=min(8, d))}'


def checked_dims(nesting_dims) -> tuple[int, ...]:
  # Unsorted dims would make the chunk slices empty and the logits silently
  # wrong, so heads check too, not only the config loader.
  dims = [] if nesting_dims is None else list(nesting_dims)
  last = dims[-1] if dims and is_int(dims[-1]) and dims[-1] > 0 else 1
  return tuple(validate_nesting(dims, None, last)[0])


def check_features(z, d: int, head: str):
  if z.ndim != 2 or z.shape[-1] < d:
    raise ValueError(
        f'{head}: expected embeddings z of shape [B, >= {d}], got '
        f'{tuple(z.shape)}; check config.model.representation_size against '
        'config.mrl.nesting_dims.')


def eval_dims(nesting_dims: Sequence[int]) -> list[int]:
  """Trained dims plus the midpoints between neighbours: [8, 16, 32] -> [8, 12, 16, 24, 32]."""
  dims = sorted(int(m) for m in nesting_dims)
  mids = [(a + b) // 2 for a, b in zip(dims, dims[1:])]
  return sorted(set(dims) | set(mids))


def chunks(nesting_dims: Sequence[int]) -> list[tuple[int, int]]:
  """[(0, m_1), (m_1, m_2), ...]: the features each nesting dim adds."""
  bounds = (0, *(int(m) for m in nesting_dims))
  return list(zip(bounds[:-1], bounds[1:]))


def row_sums(v, nesting_dims) -> jax.Array:
  """v [n, d] -> [M, n]: each row's sum over its first m features, every m
  (running sums over the chunks; jax)."""
  run, out = 0.0, []
  for lo, hi in chunks(nesting_dims):
    run = run + jnp.sum(v[:, lo:hi], axis=-1)
    out.append(run)
  return jnp.stack(out)


def prefix_dots(a, b, nesting_dims, precision=None):
  """Yields a[:, :m] @ b[:, :m].T [n_a, n_b] (float32) for every m, as running
  sums of the chunks' products: all prefixes for one full-width product."""
  run = 0.0
  for lo, hi in chunks(nesting_dims):
    run = run + jax.lax.dot_general(a[:, lo:hi], b[:, lo:hi], (((1,), (1,)), ((), ())),
                                    precision=precision,
                                    preferred_element_type=jnp.float32)
    yield run


def inv_norms(z, nesting_dims) -> jax.Array:
  """1 / |z[:, :m]| for every prefix: z [n, d] -> [M, n] float32 (jax)."""
  sq = row_sums(jnp.square(z.astype(jnp.float32)), nesting_dims)
  # The floor is on the squared norm, so the gradient at 0 is 0, not NaN.
  return jax.lax.rsqrt(jnp.maximum(sq, SQ_NORM_EPS))


def truncate(z, m: int, normalize: bool = True):
  """First m features of z [..., d], L2-normalised along the last axis.

  This is what inference users call: the embedding at budget m. Truncated
  prefixes must be renormalised before dot-product scoring, since the norm of
  z[:m] varies across examples. Accepts jax and numpy arrays and returns the
  same kind. Zero vectors stay zero (the norm is floored at NORM_EPS).
  """
  d = z.shape[-1]
  if not is_int(m) or not 1 <= m <= d:
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
  out = z32 / xp.sqrt(xp.maximum(sq, SQ_NORM_EPS))
  return out.astype(z.dtype) if xp.issubdtype(z.dtype, xp.floating) else out


def normalize_rows(x: np.ndarray) -> np.ndarray:
  """x [..., m] / |x| along the last axis (NumPy; zero rows stay zero)."""
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS)
