"""Tests for mrl_jax.matryoshka: nesting lists, heads and the nested loss."""

import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mrl_jax import matryoshka as mrl

B, C = 6, 5
LECUN = nnx.initializers.lecun_normal()  # Zero-init heads would hide bugs.


def _rand(seed, shape, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# ---------------------------------------------------------------------------
# Nesting lists and their validation.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('d, start, want', [
    (64, 8, [8, 16, 32, 64]),
    (2048, 8, [8, 16, 32, 64, 128, 256, 512, 1024, 2048]),
    (768, 12, [12, 24, 48, 96, 192, 384, 768]),
    (100, 8, [8, 16, 32, 64, 100]),
    (8, 8, [8]),
    (5, 8, [5]),
])
def test_nesting_dims(d, start, want):
  assert mrl.nesting_dims(d, start=start) == want


@pytest.mark.parametrize('d, start', [(0, 8), (64, 0), (64.0, 8), (-4, 8)])
def test_nesting_dims_bad_args(d, start):
  with pytest.raises(ValueError):
    mrl.nesting_dims(d, start=start)


def test_validate_nesting_good():
  dims, weights = mrl.validate_nesting((8, 16, 32), None, 32)
  assert dims == [8, 16, 32] and weights == [1.0, 1.0, 1.0]
  dims, weights = mrl.validate_nesting(
      np.array([8, 16]), [2, np.float32(0.5)], 16)
  assert dims == [8, 16] and weights == [2.0, 0.5]
  assert all(type(m) is int for m in dims)
  assert all(type(c) is float for c in weights)


@pytest.mark.parametrize('dims, weights, d, field, value', [
    ([], None, 32, 'config.mrl.nesting_dims', '[]'),
    (None, None, 32, 'config.mrl.nesting_dims', 'None'),
    ([8, 16.5, 32], None, 32, 'config.mrl.nesting_dims', '16.5'),
    ([8, True, 32], None, 32, 'config.mrl.nesting_dims', 'True'),
    ([0, 16, 32], None, 32, 'config.mrl.nesting_dims', '[0, 16, 32]'),
    ([-8, 16, 32], None, 32, 'config.mrl.nesting_dims', '-8'),
    ([8, 32, 16], None, 16, 'config.mrl.nesting_dims', '[8, 32, 16]'),
    ([8, 16, 16, 32], None, 32, 'config.mrl.nesting_dims', '[8, 16, 16, 32]'),
    ([8, 16], None, 32, 'config.model.representation_size', '32'),
    ([8, 16, 64], None, 32, 'config.mrl.nesting_dims', '[8, 16, 64]'),
    ([8, 16], [1.0], 16, 'config.mrl.weights', '[1.0]'),
    ([8, 16], [1.0, 1.0, 1.0], 16, 'config.mrl.weights', '[1.0, 1.0, 1.0]'),
    ([8, 16], [1.0, -0.5], 16, 'config.mrl.weights', '-0.5'),
    ([8, 16], [1.0, math.inf], 16, 'config.mrl.weights', 'inf'),
    ([8, 16], [math.nan, 1.0], 16, 'config.mrl.weights', 'nan'),
    ([8, 16], ['1', 1.0], 16, 'config.mrl.weights', "'1'"),
    ([8, 16], [0.0, 0.0], 16, 'config.mrl.weights', 'are all zero'),
    ([8, 16], None, 0, 'config.model.representation_size', '0'),
])
def test_validate_nesting_bad(dims, weights, d, field, value):
  with pytest.raises(ValueError) as e:
    mrl.validate_nesting(dims, weights, d)
  assert field in str(e.value)
  assert value in str(e.value)


# ---------------------------------------------------------------------------
# truncate.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('xp', [np, jnp])
def test_truncate(xp):
  z = xp.asarray(_rand(0, (4, 3, 16)))
  zm = mrl.truncate(z, 5)
  assert zm.shape == (4, 3, 5)
  assert isinstance(zm, np.ndarray) == (xp is np)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(zm), axis=-1), 1.0,
                             rtol=1e-6)
  # Same direction as the raw prefix.
  raw = np.asarray(z)[..., :5]
  np.testing.assert_allclose(
      np.asarray(zm), raw / np.linalg.norm(raw, axis=-1, keepdims=True),
      rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(mrl.truncate(z, 5, False)), raw)


def test_truncate_zero_vector_and_grad():
  z = jnp.zeros((2, 8)).at[1].set(jnp.arange(8.0))
  out = mrl.truncate(z, 4)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[0], 0.0)
  g = jax.grad(lambda z: mrl.truncate(z, 4).sum())(z)
  assert np.all(np.isfinite(g))


def test_truncate_keeps_dtype():
  z = jnp.asarray(_rand(1, (3, 8)), jnp.bfloat16)
  assert mrl.truncate(z, 4).dtype == jnp.bfloat16


@pytest.mark.parametrize('m', [0, 9, 2.0])
def test_truncate_bad_m(m):
  with pytest.raises(ValueError, match='truncate'):
    mrl.truncate(np.ones((2, 8)), m)


# ---------------------------------------------------------------------------
# Nested softmax cross-entropy.
# ---------------------------------------------------------------------------


def _numpy_nested_ce(logits, labels, weights, eps, mask=None):
  """The paper's formula in float64 NumPy, and its analytic gradient.

  L = sum_m c_m * (1/B) sum_i -sum_k t_ik log softmax(logits_m)_ik, with
  t = (1-eps) onehot + eps/C; dL/dlogits_m = c_m * (softmax - t) / B. A mask
  replaces 1/B by mask_i / sum(mask).
  """
  logits = logits.astype(np.float64)
  _, b, c = logits.shape
  mask = np.ones(b) if mask is None else mask.astype(np.float64)
  t = (1 - eps) * np.eye(c)[labels] + eps / c  # [B, C]
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # [M, B, C]
  per_example = -(t * logp).sum(-1)  # [M, B]
  per_dim = (per_example * mask).sum(-1) / mask.sum()  # [M]
  w = np.asarray(weights, np.float64)
  loss = (w * per_dim).sum()
  grad = (w[:, None, None] * (np.exp(logp) - t)
          * (mask / mask.sum())[None, :, None])
  return loss, grad


def _optax_nested_ce(logits, labels, weights, eps):
  """Per-dim Python loop over optax.softmax_cross_entropy, smoothed labels."""
  c = logits.shape[-1]
  t = optax.smooth_labels(jax.nn.one_hot(labels, c), eps)
  return sum(w * optax.softmax_cross_entropy(l, t).mean()
             for w, l in zip(weights, logits))


@pytest.fixture(name='ce_inputs')
def _ce_inputs():
  logits = 3.0 * _rand(2, (4, B, C))  # [M, B, C]
  labels = np.random.default_rng(3).integers(0, C, size=B)
  weights = [2.0, 1.0, 0.5, 0.25]  # Non-uniform, as the paper's c = [2,1,...].
  return logits, labels, weights


def test_softmax_ce_matches_optax_and_numpy(ce_inputs):
  logits, labels, weights = ce_inputs
  loss_fn = lambda l: mrl.softmax_ce(l, labels, weights, label_smoothing=0.1)
  loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logits))

  optax_loss, optax_grad = jax.value_and_grad(
      lambda l: _optax_nested_ce(l, labels, weights, 0.1))(jnp.asarray(logits))
  np_loss, np_grad = _numpy_nested_ce(logits, labels, weights, 0.1)

  np.testing.assert_allclose(loss, optax_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, optax_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss, np_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, np_grad, rtol=1e-5, atol=1e-7)
  # A sum over dims, not a mean: all-ones weights give sum of per-dim CEs.
  per_dim = mrl.softmax_ce_per_dim(logits, labels, label_smoothing=0.1)
  assert per_dim.shape == (4,)
  np.testing.assert_allclose(mrl.softmax_ce(logits, labels, None, 0.1),
                             per_dim.sum(), rtol=1e-6)


def test_softmax_ce_mask(ce_inputs):
  logits, labels, weights = ce_inputs
  mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
  loss, grad = jax.value_and_grad(
      lambda l: mrl.softmax_ce(l, labels, weights, 0.1, mask=mask))(
          jnp.asarray(logits))
  np_loss, np_grad = _numpy_nested_ce(logits, labels, weights, 0.1, mask)
  np.testing.assert_allclose(loss, np_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, np_grad, rtol=1e-5, atol=1e-7)
  # Masked examples are really dropped: same as slicing out the valid ones.
  valid = mask.astype(bool)
  np.testing.assert_allclose(
      loss, mrl.softmax_ce(logits[:, valid], labels[valid], weights, 0.1),
      rtol=1e-6)
  np.testing.assert_array_equal(grad[:, ~valid], 0.0)
  # No valid examples: zero loss, not NaN.
  assert mrl.softmax_ce(logits, labels, mask=np.zeros(B)) == 0.0


def test_softmax_ce_list_input_and_bf16(ce_inputs):
  logits, labels, weights = ce_inputs
  from_list = mrl.softmax_ce(list(jnp.asarray(logits)), labels, weights, 0.1)
  np.testing.assert_allclose(
      from_list, mrl.softmax_ce(logits, labels, weights, 0.1), rtol=1e-6)
  # bf16 logits are upcast: the result is float32 and equals the float32 loss
  # of the same (bf16-rounded) values.
  lo = jnp.asarray(logits, jnp.bfloat16)
  loss = mrl.softmax_ce(lo, labels, weights, 0.1)
  assert loss.dtype == jnp.float32
  np_loss, _ = _numpy_nested_ce(
      np.asarray(lo.astype(jnp.float32)), labels, weights, 0.1)
  np.testing.assert_allclose(loss, np_loss, rtol=1e-6)


def test_softmax_ce_wrong_weight_count(ce_inputs):
  logits, labels, _ = ce_inputs
  with pytest.raises(ValueError, match=r'softmax_ce: weights has shape \(2,\) for 4 dims'):
    mrl.softmax_ce(logits, labels, [1.0, 1.0])


# ---------------------------------------------------------------------------
# Heads.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('dims', [[8, 16, 32], [3, 8, 20, 32], [32]])
def test_mrl_e_chunked_matches_naive(dims):
  d = dims[-1]
  z, w, b = _rand(4, (B, d)), _rand(5, (d, C)), _rand(6, (C,))
  ct = _rand(7, (len(dims), B, C))  # Random cotangent for the gradient check.

  @jax.jit  # One compile instead of one per eager op: keeps the file fast.
  def vjp(z, w, b, ct):
    def one(fn):
      out, pullback = jax.vjp(functools.partial(fn, nesting_dims=dims), z, w, b)
      return out, pullback(ct)
    return one(mrl.mrl_e_logits), one(mrl.mrl_e_logits_naive)

  (out, grads), (want, want_grads) = vjp(z, w, b, ct)
  assert out.shape == (len(dims), B, C)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  for g, wg in zip(grads, want_grads):
    np.testing.assert_allclose(g, wg, rtol=1e-5, atol=1e-5)


def test_mrl_e_head_uses_its_params():
  dims = [3, 8, 20, 32]
  head = mrl.MRLEHead(dims, C, rngs=nnx.Rngs(0), kernel_init=LECUN)
  head.bias[...] = jnp.asarray(_rand(8, (C,)))
  z = _rand(9, (B, 32))
  np.testing.assert_allclose(
      head(z), mrl.mrl_e_logits_naive(z, head.kernel[...], head.bias[...],
                                      dims), rtol=1e-5, atol=1e-5)


def test_mrl_head_prefix_only():
  dims = [3, 8, 20, 32]
  head = mrl.MRLHead(dims, C, rngs=nnx.Rngs(0), kernel_init=LECUN)
  for m, lin in zip(dims, head.linears):
    assert lin.kernel.shape == (m, C) and lin.bias.shape == (C,)
  fwd = jax.jit(head.__call__)
  z = _rand(10, (B, 32))
  out = fwd(z)
  assert out.shape == (len(dims), B, C)
  for i, m in enumerate(dims):
    lin = head.linears[i]
    np.testing.assert_allclose(
        out[i], z[:, :m] @ lin.kernel[...] + lin.bias[...], rtol=1e-5,
        atol=1e-5)
    # Perturbing features past m leaves logits_m alone but moves later dims.
    z2 = z.copy()
    z2[:, m:] += 1.0
    out2 = fwd(z2)
    np.testing.assert_array_equal(out2[i], out[i])
    if i + 1 < len(dims):
      assert not np.allclose(out2[i + 1], out[i + 1])


def test_zero_init_heads_start_uniform():
  z, labels = _rand(11, (B, 16)), np.arange(B) % C
  for mode in mrl.MODES:
    head = mrl.make_head(mode, [8, 16], C, rngs=nnx.Rngs(0))
    logits = head(z)
    np.testing.assert_array_equal(logits, 0.0)
    np.testing.assert_allclose(mrl.softmax_ce_per_dim(logits, labels),
                               math.log(C), rtol=1e-6)


def test_ff_head_uses_only_its_prefix():
  ff_dim = 12
  head = mrl.FFHead(ff_dim, C, rngs=nnx.Rngs(0), kernel_init=LECUN)
  z = _rand(12, (B, 32))
  out = head(z)
  assert out.shape == (1, B, C)
  z2 = z.copy()
  z2[:, ff_dim:] = _rand(13, (B, 32 - ff_dim))
  np.testing.assert_array_equal(head(z2), out)
  g = jax.grad(lambda z: head(z).sum())(z)
  np.testing.assert_array_equal(g[:, ff_dim:], 0.0)
  assert np.all(np.abs(g[:, :ff_dim]) > 0)


def test_make_head_and_head_dims():
  dims = [8, 16, 32]
  rngs = nnx.Rngs(0)
  assert isinstance(mrl.make_head('mrl', dims, C, rngs=rngs), mrl.MRLHead)
  assert isinstance(mrl.make_head('mrl_e', dims, C, rngs=rngs), mrl.MRLEHead)
  ff = mrl.make_head('ff', dims, C, rngs=rngs)
  assert isinstance(ff, mrl.FFHead) and ff.ff_dim == 32
  assert mrl.make_head('ff', dims, C, ff_dim=16, rngs=rngs).ff_dim == 16
  assert mrl.head_dims('mrl', dims) == dims
  assert mrl.head_dims('mrl_e', dims) == dims
  assert mrl.head_dims('ff', dims) == [32]
  assert mrl.head_dims('ff', dims, ff_dim=16) == [16]
  z = _rand(14, (B, 32))
  for mode in mrl.MODES:
    out = mrl.make_head(mode, dims, C, rngs=rngs)(z)
    assert out.shape == (len(mrl.head_dims(mode, dims)), B, C)


def test_make_head_bad_input():
  with pytest.raises(ValueError, match="config.mrl.mode='MRL'"):
    mrl.make_head('MRL', [8, 16], C, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='config.mrl.mode'):
    mrl.head_dims('slimmable', [8, 16])
  with pytest.raises(ValueError, match='ff_dim=64'):
    mrl.make_head('ff', [8, 16], C, ff_dim=64, rngs=nnx.Rngs(0))
  for mode in ('mrl', 'mrl_e'):
    for dims in ([16, 8], [8, 8, 16], []):
      with pytest.raises(ValueError, match='config.mrl.nesting_dims'):
        mrl.make_head(mode, dims, C, rngs=nnx.Rngs(0))
  head = mrl.MRLHead([8, 16], C, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='representation_size'):
    head(np.ones((B, 12), np.float32))


# ---------------------------------------------------------------------------
# The train-step pattern: split state, merge inside jit, grad, sharded batch.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('mode', mrl.MODES)
def test_jit_grad_with_split_state(mode):
  dims, weights = [4, 8, 16], [2.0, 1.0, 1.0]
  head = mrl.make_head(mode, dims, C, rngs=nnx.Rngs(0), kernel_init=LECUN)
  graphdef, state = nnx.split(head)
  w = weights if mode != 'ff' else None
  n = len(jax.devices())
  z = _rand(15, (2 * n, 16))
  labels = np.arange(2 * n) % C

  def loss_fn(state, z, labels):
    logits = nnx.merge(graphdef, state)(z)
    return mrl.softmax_ce(logits, labels, w, label_smoothing=0.1)

  step = jax.jit(jax.value_and_grad(loss_fn))
  want_loss, want_grads = step(state, z, labels)  # Unsharded, one device.
  # Batch sharded over all host devices, as the train step will see it.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  loss, grads = step(state, jax.device_put(z, batch),
                     jax.device_put(labels, batch))

  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(
      loss, mrl.softmax_ce(head(z), labels, w, label_smoothing=0.1), rtol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(state)
  for g, eg in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, eg, rtol=1e-4, atol=1e-6)
  assert all(np.any(g != 0) for g in jax.tree.leaves(grads))
  # The merged module computes the same logits as the original.
  np.testing.assert_array_equal(nnx.merge(graphdef, state)(z), head(z))
