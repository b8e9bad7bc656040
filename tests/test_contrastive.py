"""Tests for the nested contrastive losses (mrl_jax.contrastive, re-exported by
mrl_jax.matryoshka)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mrl_jax import matryoshka as mrl
from mrl_jax import sharding

B, D = 8, 32
DIMS = [3, 8, 32]  # Irregular chunks: 3, 5 and 24 features.
WEIGHTS = [2.0, 1.0, 0.5]


def _rand(seed, shape, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _pair(seed=0, b=B, d=D):
  """Correlated image/text embeddings, so positives stand out a little."""
  x = _rand(seed, (b, d))
  return x, (x + 1.5 * _rand(seed + 1, (b, d))).astype(np.float32)


def _naive_per_dim(x, y, dims, kind, temperature, bias, eps):
  """One independent loss per prefix: truncate, full matrix, optax CE."""
  n = len(dims)
  tau = jnp.broadcast_to(temperature, (n,))
  b = jnp.broadcast_to(0.0 if bias is None else bias, (n,))
  out = []
  for k, m in enumerate(dims):
    logits = mrl.truncate(x, m) @ mrl.truncate(y, m).T / tau[k]  # [B, B]
    if kind == 'softmax':
      targets = optax.smooth_labels(jnp.eye(x.shape[0]), eps)
      out.append(0.5 * (
          optax.softmax_cross_entropy(logits, targets).mean()
          + optax.softmax_cross_entropy(logits.T, targets).mean()))
    else:
      z = 2.0 * jnp.eye(x.shape[0]) - 1.0
      out.append(-jnp.sum(jax.nn.log_sigmoid(z * (logits + b[k])))
                 / x.shape[0])
  return jnp.stack(out)


def _numpy_per_dim(x, y, dims, kind, tau, bias, eps=0.0):
  """The docs/ARCHITECTURE.md formulas transcribed into float64 NumPy."""
  x, y = x.astype(np.float64), y.astype(np.float64)
  tau, bias = np.broadcast_to(tau, len(dims)), np.broadcast_to(bias, len(dims))

  def unit(z):  # A zero prefix stays zero (cosine 0), as in `truncate`.
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

  out = []
  for k, m in enumerate(dims):
    s = unit(x[:, :m]) @ unit(y[:, :m]).T  # [B, B] cosines
    n = len(s)
    if kind == 'softmax':
      t = (1 - eps) * np.eye(n) + eps / n

      def ce(logits):  # mean_i -sum_j t_ij log softmax(logits)_ij
        shift = logits.max(1, keepdims=True)
        logp = logits - shift - np.log(np.exp(logits - shift).sum(1))[:, None]
        return -(t * logp).sum(1).mean()

      out.append(0.5 * (ce(s / tau[k]) + ce(s.T / tau[k])))
    else:
      z = 2 * np.eye(n) - 1
      # -log sigmoid(v) = log(1 + exp(-v)), stable for either sign of v.
      v = z * (s / tau[k] + bias[k])
      out.append(np.sum(np.logaddexp(0.0, -v)) / n)
  return np.array(out)


# Two settings per kind, checked in one compiled program: scalar temperature
# and bias (softmax: with label smoothing), and one of each per prefix.
TAU = np.float32(0.07)
TAU_PER_DIM = np.asarray([0.05, 0.1, 0.2], np.float32)
BIAS = np.float32(-10.0)
BIAS_PER_DIM = np.asarray([-2.0, -5.0, 0.5], np.float32)
EPS = 0.1
KINDS = ('softmax', 'sigmoid')


def _settings(kind, tau, tau_per_dim, bias, bias_per_dim):
  """[(temperature, bias, label_smoothing)] for the two settings."""
  if kind == 'softmax':
    return [(tau, None, EPS), (tau_per_dim, None, 0.0)]
  return [(tau, bias, 0.0), (tau_per_dim, bias_per_dim, 0.0)]


# One compile per kind (and input sharding), shared by the tests below: XLA's
# CPU compile dominates this file's run time, not the math. Low LLVM
# optimisation halves the compile and does not change what is computed.
@functools.partial(jax.jit, static_argnames=('kind', 'block_size'),
                   compiler_options={'xla_backend_optimization_level': 0})
def _chunked_and_naive(x, y, tau, tau_per_dim, bias, bias_per_dim, *, kind,
                       block_size=None):
  out = []
  for temperature, b, eps in _settings(kind, tau, tau_per_dim, bias,
                                       bias_per_dim):
    params = (x, y, temperature) + (() if b is None else (b,))
    argnums = tuple(range(len(params)))

    def chunked(x, y, t, b=None, eps=eps):
      return mrl.contrastive(x, y, DIMS, WEIGHTS, kind=kind, temperature=t,
                             bias=b, label_smoothing=eps,
                             block_size=block_size)

    def naive(x, y, t, b=None, eps=eps):
      return jnp.sum(jnp.asarray(WEIGHTS)
                     * _naive_per_dim(x, y, DIMS, kind, t, b, eps))

    out.append(dict(
        per_dim=mrl.contrastive_per_dim(x, y, DIMS, kind=kind,
                                        temperature=temperature, bias=b,
                                        label_smoothing=eps,
                                        block_size=block_size),
        unweighted=mrl.contrastive(x, y, DIMS, kind=kind,
                                   temperature=temperature, bias=b,
                                   label_smoothing=eps),
        chunked=jax.value_and_grad(chunked, argnums)(*params),
        naive=jax.value_and_grad(naive, argnums)(*params)))
  return out


def _run(kind, x, y, tau=TAU, tau_per_dim=TAU_PER_DIM, bias=BIAS,
         bias_per_dim=BIAS_PER_DIM, block_size=None):
  return _chunked_and_naive(x, y, tau, tau_per_dim, bias, bias_per_dim,
                            kind=kind, block_size=block_size)


def _numpy_for(kind, x, y, tau=TAU, tau_per_dim=TAU_PER_DIM, bias=BIAS,
               bias_per_dim=BIAS_PER_DIM):
  return [_numpy_per_dim(x, y, DIMS, kind, t, 0.0 if b is None else b, eps)
          for t, b, eps in _settings(kind, tau, tau_per_dim, bias,
                                     bias_per_dim)]


def _assert_grads_close(grads, want_grads, rtol=1e-5):
  for name, g, wg in zip(('x', 'y', 'temperature', 'bias'), grads,
                         want_grads):
    assert g.shape == wg.shape, name
    # rtol relative to the largest entry: single entries near 0 carry
    # float32 cancellation from either summation order.
    np.testing.assert_allclose(g, wg, rtol=rtol,
                               atol=rtol * float(jnp.max(jnp.abs(wg))),
                               err_msg=name)


# Block sizes: the default (one block of all 8 columns) and 3, which does not
# divide the batch (two blocks in the loop and a last one of 2).
@pytest.mark.parametrize('block_size', [None, 3])
@pytest.mark.parametrize('kind', KINDS)
def test_matches_naive_per_prefix_loss_and_grads(kind, block_size):
  x, y = _pair(0)
  for got, want_per_dim in zip(_run(kind, x, y, block_size=block_size),
                               _numpy_for(kind, x, y)):
    (loss, grads), (want, want_grads) = got['chunked'], got['naive']
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    _assert_grads_close(grads, want_grads)
    assert all(np.all(g != 0) for g in grads[2:])  # temperature, bias
    # The formulas of docs/ARCHITECTURE.md, transcribed into float64 NumPy.
    per_dim = got['per_dim']
    assert per_dim.shape == (len(DIMS),) and per_dim.dtype == jnp.float32
    np.testing.assert_allclose(per_dim, want_per_dim, rtol=1e-5)
    # A weighted SUM over dims; weights default to all 1.
    np.testing.assert_allclose(loss, np.dot(WEIGHTS, per_dim), rtol=1e-6)
    np.testing.assert_allclose(got['unweighted'], np.sum(per_dim), rtol=1e-6)


@pytest.mark.parametrize('kind', KINDS)
def test_confident_pairs_stay_accurate(kind):
  # Orthonormal pairs (x = y = rows of the identity): from prefix 8 on every
  # positive has u = 1/tau + b = +10 and every negative u = -10, so the loss
  # is a sum of e^-10-sized terms, where computing the positives as
  # softplus(u) - u would lose most digits.
  x = y = np.eye(B, D, dtype=np.float32)
  params = dict(tau=np.float32(0.05), tau_per_dim=np.full(3, 0.05, np.float32),
                bias=np.float32(-10.0),
                bias_per_dim=np.asarray([-8.0, -10.0, -12.0], np.float32))
  for got, want in zip(_run(kind, x, y, block_size=3, **params),
                       _numpy_for(kind, x, y, **params)):
    # Softmax CE is lse_i - l_ii, which float32 resolves to ~ulp(1/tau)
    # (optax's CE the same); the sigmoid loss keeps its relative precision.
    atol = 1e-5 if kind == 'softmax' else 0.0
    np.testing.assert_allclose(got['per_dim'], want, rtol=1e-5, atol=atol)
    assert np.all(np.asarray(got['per_dim']) >= 0)


@pytest.mark.parametrize('kind', KINDS)
def test_zero_embedding_is_finite(kind):
  x, y = _pair(11)
  x[0] = 0.0  # e.g. a padded example
  y[1, :8] = 0.0  # a zero prefix only
  for got in _run(kind, x, y):
    loss, grads = got['chunked']
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_each_prefix_loss_ignores_later_features():
  x, y = _pair(8)
  base = _run('softmax', x, y)[1]['per_dim']
  for k, m in enumerate(DIMS[:-1]):
    x2, y2 = x.copy(), y.copy()
    x2[:, m:] = _rand(9, (B, D - m))
    y2[:, m:] = _rand(10, (B, D - m))
    moved = _run('softmax', x2, y2)[1]['per_dim']
    np.testing.assert_allclose(moved[:k + 1], base[:k + 1], rtol=1e-6)
    assert not np.allclose(moved[k + 1], base[k + 1])


def _train_step_both_kinds(x, y, tau, bias, eps=0.0, block_size=None,
                           kernels='tpu'):
  """(loss, grads wrt x, y, tau[, bias]) per kind, as a train step sees it."""
  out = {}
  for kind in KINDS:
    def loss_fn(x, y, tau, *b, kind=kind):
      return mrl.contrastive(x, y, DIMS, WEIGHTS, kind=kind, temperature=tau,
                             bias=b[0] if b else None,
                             label_smoothing=eps if kind == 'softmax' else 0.0,
                             block_size=block_size, kernels=kernels)
    params = (x, y, tau) + ((bias,) if kind == 'sigmoid' else ())
    out[kind] = jax.value_and_grad(loss_fn, tuple(range(len(params))))(*params)
  return out


_train_step = jax.jit(_train_step_both_kinds,
                      static_argnames=('eps', 'block_size', 'kernels'),
                      compiler_options={'xla_backend_optimization_level': 0})


@pytest.mark.parametrize('mesh_axes, block_size', [
    ({'data': -1}, None),  # 8 devices, 5 rows each, one block
    ({'data': 2, 'fsdp': 4}, 2),  # the ring over both batch axes, 2 + 2 + 1
    ({'data': 4, 'tensor': 2}, 3),  # 4 batch shards of 10, replicated twice
])
def test_ring_over_the_mesh_matches_one_device(mesh_axes, block_size):
  n = len(jax.devices())
  assert n == 8, 'tests/conftest.py forces 8 host devices'
  x, y = _pair(13, b=40)
  want = _train_step(x, y, TAU_PER_DIM, BIAS_PER_DIM, EPS)  # 1 device
  mesh = sharding.create_mesh(mesh_axes)
  batch = sharding.batch_sharding(mesh)
  xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
  with jax.set_mesh(mesh):
    hlo = _train_step.lower(xs, ys, TAU_PER_DIM, BIAS_PER_DIM, EPS,
                            block_size).as_text()
    got = _train_step(xs, ys, TAU_PER_DIM, BIAS_PER_DIM, EPS, block_size)
  # The column blocks travel device to device: no all-gather of y.
  assert 'collective_permute' in hlo and 'all_gather' not in hlo
  for kind in KINDS:
    (loss, grads), (want_loss, want_grads) = got[kind], want[kind]
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    _assert_grads_close(grads, want_grads)
    # The loss is over the global batch, not a mean of per-shard losses.
    eps = EPS if kind == 'softmax' else 0.0
    per_dim = _numpy_per_dim(x, y, DIMS, kind, TAU_PER_DIM, BIAS_PER_DIM, eps)
    np.testing.assert_allclose(loss, np.dot(WEIGHTS, per_dim), rtol=1e-5)


def test_sharded_batch_without_a_mesh_context_matches_one_device():
  # Arrays sharded but no `jax.set_mesh`: XLA partitions the one-device form.
  x, y = _pair(13)
  want = _train_step(x, y, TAU_PER_DIM, BIAS_PER_DIM)
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  got = _train_step(jax.device_put(x, batch), jax.device_put(y, batch),
                    TAU_PER_DIM, BIAS_PER_DIM)
  for kind in KINDS:
    np.testing.assert_allclose(got[kind][0], want[kind][0], rtol=1e-5)
    _assert_grads_close(got[kind][1], want[kind][1])


@pytest.mark.parametrize('b', [1, 2])
def test_batches_of_one_and_two(b):
  x, y = _pair(15, b=b)
  for kind in KINDS:
    # With one pair the softmax loss is lse - l_11 = 0, resolved to
    # ~ulp(1/tau) as in test_confident_pairs_stay_accurate.
    atol = 1e-5 if kind == 'softmax' else 1e-6
    for got, want in zip(_run(kind, x, y), _numpy_for(kind, x, y)):
      np.testing.assert_allclose(got['per_dim'], want, rtol=1e-5, atol=atol)
      (loss, grads), (want_loss, want_grads) = got['chunked'], got['naive']
      np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=atol)
      assert all(np.all(np.isfinite(g)) for g in grads)


def test_block_size_beyond_the_batch_is_clamped():
  x, y = _pair(16)
  kw = dict(temperature=TAU, label_smoothing=EPS)
  np.testing.assert_array_equal(
      mrl.contrastive_per_dim(x, y, DIMS, block_size=1000, **kw),
      mrl.contrastive_per_dim(x, y, DIMS, block_size=B, **kw))


# 384 rows: kernel tiles of 128 (a 3 x 3 grid); 512: tiles of 256 (2 x 2).
@pytest.mark.parametrize('b', [384, 512])
def test_tpu_kernels_interpreted_match_the_xla_form(b):
  # On a CPU the loss runs XLA's blocked form; interpreted, the Pallas
  # kernels (what a TPU runs) must give the same values and gradients.
  x, y = _pair(17, b=b)
  want = _train_step(x, y, TAU_PER_DIM, BIAS_PER_DIM, EPS, 100)
  got = _train_step(x, y, TAU_PER_DIM, BIAS_PER_DIM, EPS, kernels='interpret')
  for kind in KINDS:
    np.testing.assert_allclose(got[kind][0], want[kind][0], rtol=1e-5)
    _assert_grads_close(got[kind][1], want[kind][1])


def test_prefix_cosines():
  x, y = _rand(6, (B, D)), _rand(7, (B + 3, D))  # B' != B is fine here.
  cos = jax.jit(mrl.prefix_cosines, static_argnums=2)(x, y, tuple(DIMS))
  assert cos.shape == (len(DIMS), B, B + 3) and cos.dtype == jnp.float32
  for k, m in enumerate(DIMS):
    np.testing.assert_allclose(
        cos[k], mrl.truncate(x, m) @ mrl.truncate(y, m).T, rtol=1e-5,
        atol=1e-6)


def test_bf16_inputs_use_float32_math():
  x, y = (jnp.asarray(a, jnp.bfloat16) for a in _pair(12))
  fn = jax.jit(jax.value_and_grad(
      lambda x, y: mrl.contrastive(x, y, DIMS, WEIGHTS, temperature=TAU,
                                   label_smoothing=EPS), argnums=(0, 1)),
               compiler_options={'xla_backend_optimization_level': 0})
  loss, grads = fn(x, y)
  assert loss.dtype == jnp.float32
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  # bf16 products are exact in float32, so this is the float32 loss of the
  # same (rounded) values; the gradients are those, rounded to bf16.
  want, want_grads = _run('softmax', np.asarray(x, np.float32),
                          np.asarray(y, np.float32))[0]['chunked']
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  _assert_grads_close([np.asarray(g, np.float32) for g in grads],
                      want_grads[:2], rtol=1e-2)


# ---------------------------------------------------------------------------
# Bad input: one clear error, before any compute.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('overrides, match', [
    (dict(kind='clip'), "kind='clip'"),
    (dict(y=np.ones((B, D + 1), np.float32)), r'\(8, 33\)'),
    (dict(x=np.ones((B, D, 1), np.float32)), r'\(8, 32, 1\)'),
    (dict(nesting_dims=[8, 16]), 'contrastive: nesting_dims=\\[8, 16\\]'),
    (dict(nesting_dims=[16, 8, 32]), 'strictly increasing'),
    (dict(weights=[1.0, 1.0]), r'contrastive: weights=\[1.0, 1.0\] \(length 2\)'),
    (dict(weights=np.zeros(3)), r'contrastive: weights=\[0.0, 0.0, 0.0\] are all zero'),
    (dict(temperature=0.0), 'temperature=0.0'),
    (dict(temperature=-0.07), 'temperature=-0.07'),
    (dict(temperature=[0.07, 0.07]), r'temperature has shape \(2,\)'),
    (dict(bias=-10.0), "bias=-10.0 applies to kind='sigmoid'"),
    (dict(kind='sigmoid'), "kind='sigmoid' needs bias"),
    (dict(kind='sigmoid', bias=[1.0, 2.0]), r'bias has shape \(2,\)'),
    (dict(kind='sigmoid', bias=float('nan')), 'bias=nan'),
    (dict(kind='sigmoid', bias=-10.0, label_smoothing=0.1),
     "label_smoothing=0.1 applies to kind='softmax'"),
    (dict(label_smoothing=1.0), 'label_smoothing=1.0'),
    (dict(label_smoothing=-0.1), 'label_smoothing=-0.1'),
    (dict(block_size=0), 'block_size=0 must be a positive int'),
    (dict(block_size=-4), 'block_size=-4'),
    (dict(block_size=2.5), 'block_size=2.5'),
    (dict(block_size=True), 'block_size=True'),
    (dict(kernels='gpu'), "kernels='gpu' is not one of"),
    (dict(y=np.ones((B + 1, D), np.float32)), r'\(9, 32\)'),
])
def test_bad_input(overrides, match):
  x, y = _pair(14)
  args = dict(x=x, y=y, nesting_dims=DIMS, weights=None, kind='softmax',
              temperature=0.07, bias=None, label_smoothing=0.0,
              block_size=None, kernels='tpu')
  args.update(overrides)
  with pytest.raises(ValueError, match=match):
    mrl.contrastive(**args)
  if 'weights' not in overrides:
    args.pop('weights')
    with pytest.raises(ValueError, match=match):
      mrl.contrastive_per_dim(**args)


@pytest.mark.parametrize('weights', [[1.0, 2.0, 0.5], (1.0, 2.0, 0.5),
                                     np.array([1.0, 2.0, 0.5]), jnp.array([1.0, 2.0, 0.5])])
def test_weights_as_lists_tuples_and_arrays(weights):
  x, y = _pair(3)
  want = np.dot([1.0, 2.0, 0.5], mrl.contrastive_per_dim(x, y, DIMS, temperature=0.07))
  got = mrl.contrastive(x, y, DIMS, weights, temperature=0.07)
  np.testing.assert_allclose(got, want, rtol=1e-6)
