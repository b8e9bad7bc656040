"""The fused native CPU contrastive losses (impl='native'), softmax and sigmoid.

It must equal impl='xla' (itself tested against the naive per-prefix loss
in test_contrastive.py) in value and gradient, wherever the kernel has a
path of its own: batch and feature padding, the exact log-sum-exps of
prefixes whose one-shift sums underflow, label smoothing, per-prefix and
learned temperatures, the baseline-ISA build, thread splits, and the stored
dots' cache (kept, overwritten by another forward call, or over the limit).
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrl_jax import contrastive_native
from mrl_jax import matryoshka as mrl

pytestmark = pytest.mark.skipif(not contrastive_native.available(),
                                reason="the native contrastive loss was not built")


def _pair(b, d, seed, noise=1.0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, d)).astype(np.float32)
  y = x + noise * rng.normal(size=(b, d)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


def _value_and_grads(impl, x, y, dims, temperature, **kw):
  def loss(x, y, t):
    return mrl.contrastive(x, y, dims, temperature=t, impl=impl, **kw)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, y, temperature)


def _assert_close(native, xla, rtol):
  """Gradients within rtol of their largest entry; the temperature's
  gradient (a sum of the softmax-weighted and the diagonal logits, which
  nearly cancel) within 5 rtol: against a float64 loss, both impls' are
  off by 0.2-3e-6 relative."""
  (v1, g1), (v0, g0) = native, xla
  # The loss is a log-sum-exp (~1/tau) minus a diagonal logit: absolute error
  # ~1e-7 / tau, however small the difference.
  np.testing.assert_allclose(v1, v0, rtol=rtol, atol=rtol)
  for k, (a, b) in enumerate(zip(g1, g0)):
    scale = float(jnp.max(jnp.abs(b)))
    tol = 5 * rtol if k == 2 else rtol
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale)


@contextlib.contextmanager
def _settings(threads=None, generic=False, limit=None):
  try:
    contrastive_native.set_threads(threads)
    contrastive_native.force_generic(generic)
    if limit is not None:
      contrastive_native.set_workspace_limit(limit)
    yield
  finally:
    contrastive_native.set_threads(None)
    contrastive_native.force_generic(False)
    contrastive_native.set_workspace_limit(2 << 30)


@pytest.mark.parametrize("b,d,dims,eps", [
    (100, 64, [8, 16, 32, 64], 0.0),   # batch padded 100 -> 120
    (24, 48, [12, 24, 48], 0.1),       # no batch padding; label smoothing
    (37, 60, [4, 12, 40, 60], 0.0),    # chunks of 4, 8, 28 and 20 features, padded to 8s
    (200, 768, [12, 24, 48, 96, 192, 384, 768], 0.05),  # several panels and blocks
    (5, 33, [33], 0.0),                # one prefix, one tile
])
def test_matches_xla(b, d, dims, eps):
  x, y = _pair(b, d, seed=b)
  t = jnp.float32(0.07)
  _assert_close(_value_and_grads("native", x, y, dims, t, label_smoothing=eps),
                _value_and_grads("xla", x, y, dims, t, label_smoothing=eps), rtol=1e-5)


def test_per_prefix_temperatures_and_their_gradient():
  x, y = _pair(60, 32, seed=1)
  dims = [4, 8, 16, 32]
  t = jnp.asarray([0.05, 0.1, 0.5, 1.0], jnp.float32)
  native = _value_and_grads("native", x, y, dims, t)
  xla = _value_and_grads("xla", x, y, dims, t)
  _assert_close(native, xla, rtol=1e-5)
  assert float(jnp.min(jnp.abs(native[1][2]))) > 0  # every temperature is learnt


def test_underflowing_prefixes_take_exact_log_sum_exps():
  # tau = 0.002: logits up to 500, and most rows' sums shifted by the best
  # diagonal logit underflow, so every prefix goes the exact way (two exps
  # per logit in the backward).
  x, y = _pair(64, 32, seed=2)
  dims = [8, 32]
  t = jnp.float32(0.002)
  b, m = x.shape[0], len(dims)
  _, _, _, two, _ = jax.ffi.ffi_call(  # pylint: disable=protected-access
      contrastive_native._FORWARD,
      (jax.ShapeDtypeStruct((m,), jnp.float32), jax.ShapeDtypeStruct((m, b), jnp.float32),
       jax.ShapeDtypeStruct((m, b), jnp.float32), jax.ShapeDtypeStruct((m,), jnp.int32),
       jax.ShapeDtypeStruct((1,), jnp.int32)))(
           x, y, jnp.asarray(dims, jnp.int32), jnp.full((m,), 1 / t), jnp.zeros((1,)))
  assert np.all(np.asarray(two) == 1)
  _assert_close(_value_and_grads("native", x, y, dims, t),
                _value_and_grads("xla", x, y, dims, t), rtol=1e-4)


def test_zero_rows_have_zero_gradient_not_nan():
  x, y = _pair(30, 16, seed=3)
  x = x.at[3].set(0.0)
  y = y.at[[5, 7], :8].set(0.0)  # zero on the first prefix only
  dims = [8, 16]
  t = jnp.float32(0.1)
  native = _value_and_grads("native", x, y, dims, t)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in native[1])
  _assert_close(native, _value_and_grads("xla", x, y, dims, t), rtol=1e-5)


@pytest.mark.parametrize("threads,generic", [(1, False), (2, False), (3, True)])
def test_threads_and_baseline_isa_give_the_same_result(threads, generic):
  x, y = _pair(150, 40, seed=4)
  dims = [5, 10, 20, 40]
  t = jnp.float32(0.07)
  reference = _value_and_grads("xla", x, y, dims, t)
  with _settings(threads=threads, generic=generic):
    if generic:
      assert not contrastive_native.uses_avx2()
    _assert_close(_value_and_grads("native", x, y, dims, t), reference, rtol=1e-5)


def test_dots_recomputed_when_not_kept_or_overwritten():
  x, y = _pair(48, 24, seed=5)
  x2, y2 = _pair(48, 24, seed=6)
  dims = [6, 12, 24]
  t = jnp.float32(0.1)

  def two_losses(x, y, x2, y2):  # both forward calls run before both backward calls
    return (mrl.contrastive(x, y, dims, temperature=t, impl="native")
            + 2.0 * mrl.contrastive(x2, y2, dims, temperature=t, impl="native"))

  def reference(x, y, x2, y2):
    return (mrl.contrastive(x, y, dims, temperature=t)
            + 2.0 * mrl.contrastive(x2, y2, dims, temperature=t))

  args = (x, y, x2, y2)
  want = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2, 3)))(*args)
  got = jax.jit(jax.value_and_grad(two_losses, argnums=(0, 1, 2, 3)))(*args)
  _assert_close(got, want, rtol=1e-5)
  with _settings(limit=0):  # nothing kept: every backward recomputes
    _assert_close(_value_and_grads("native", x, y, dims, t),
                  _value_and_grads("xla", x, y, dims, t), rtol=1e-5)
    assert contrastive_native.workspace_bytes() == 0
  _value_and_grads("native", x, y, dims, t)
  assert contrastive_native.workspace_bytes() >= 48 * 48 * 3 * 4


def test_scratch_kept_between_calls_and_reused_across_shapes():
  """The passes' scratch comes from blocks cached across calls: a block left
  by a larger call holds stale values that no result may depend on."""
  dims = [8, 24, 48]
  t = jnp.float32(0.1)
  with _settings(limit=0):  # nothing kept between calls
    _value_and_grads("native", *_pair(30, 48, seed=11), dims, t)
    assert contrastive_native.workspace_bytes() == 0
  for b, seed in [(150, 12), (30, 13), (150, 14), (61, 15)]:
    x, y = _pair(b, 48, seed=seed)
    _assert_close(_value_and_grads("native", x, y, dims, t),
                  _value_and_grads("xla", x, y, dims, t), rtol=1e-5)
  held = contrastive_native.workspace_bytes()
  assert held > 168 * 168 * 3 * 4  # more than the stored dots alone
  with _settings(limit=1):  # a lower limit frees what is above it now
    assert contrastive_native.workspace_bytes() == 0


def _sigmoid_value_and_grads(impl, x, y, dims, temperature, bias):
  def loss(x, y, t, b):
    return mrl.contrastive(x, y, dims, kind="sigmoid", temperature=t, bias=b, impl=impl)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, y, temperature, bias)


def _assert_sigmoid_close(native, xla, rtol):
  (v1, g1), (v0, g0) = native, xla
  np.testing.assert_allclose(v1, v0, rtol=rtol, atol=rtol)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("b,d,dims,temperature,bias", [
    (100, 64, [8, 16, 32, 64], 0.1, -10.0),  # batch padded 100 -> 120; SigLIP's start
    (37, 60, [4, 12, 40, 60], [0.1, 0.2, 0.05, 0.1], [-10.0, -5.0, 0.0, 2.0]),  # per prefix
    (200, 768, [12, 24, 48, 96, 192, 384, 768], 0.05, -3.0),  # several panels and blocks
])
@pytest.mark.parametrize("threads", [None, 3])
def test_sigmoid_matches_xla(b, d, dims, temperature, bias, threads):
  """kind='sigmoid': softplus of the signed logits, the diagonal's sign
  flipped in the kernel's tiles, and the gradients of x, y, the temperature
  and the bias, against impl='xla' (itself against the naive loss)."""
  x, y = _pair(b, d, seed=b + d)
  t, bb = jnp.asarray(temperature, jnp.float32), jnp.asarray(bias, jnp.float32)
  with _settings(threads=threads):
    got = _sigmoid_value_and_grads("native", x, y, dims, t, bb)
  _assert_sigmoid_close(got, _sigmoid_value_and_grads("xla", x, y, dims, t, bb), rtol=1e-5)


def test_sigmoid_baseline_isa_and_recomputed_dots():
  x, y = _pair(50, 40, seed=21)
  dims = [8, 20, 40]
  t, bb = jnp.float32(0.1), jnp.float32(-10.0)
  want = _sigmoid_value_and_grads("xla", x, y, dims, t, bb)
  with _settings(generic=True):
    _assert_sigmoid_close(_sigmoid_value_and_grads("native", x, y, dims, t, bb), want, 1e-5)
  with _settings(limit=0):  # nothing kept: the backward recomputes the dots
    _assert_sigmoid_close(_sigmoid_value_and_grads("native", x, y, dims, t, bb), want, 1e-5)


def test_bfloat16_inputs_and_per_dim_losses():
  x, y = _pair(40, 16, seed=7)
  xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
  dims = [4, 16]
  got = mrl.contrastive_per_dim(xb, yb, dims, temperature=0.1, impl="native")
  want = mrl.contrastive_per_dim(xb, yb, dims, temperature=0.1)
  assert got.shape == (2,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bad_options():
  x, y = _pair(8, 8, seed=8)
  with pytest.raises(ValueError, match="impl='gpu' is unknown"):
    mrl.contrastive(x, y, [8], temperature=0.1, impl="gpu")
  with pytest.raises(ValueError, match="at most 64 prefixes"):
    mrl.contrastive(jnp.ones((4, 80)), jnp.ones((4, 80)), list(range(1, 81)),
                    temperature=0.1, impl="native")


def test_custom_calls_check_their_operands():
  contrastive_native._registered()  # pylint: disable=protected-access
  f32 = jnp.float32
  results = (jax.ShapeDtypeStruct((1,), f32), jax.ShapeDtypeStruct((1, 4), f32),
             jax.ShapeDtypeStruct((1, 4), f32), jax.ShapeDtypeStruct((1,), jnp.int32),
             jax.ShapeDtypeStruct((1,), jnp.int32))
  call = jax.ffi.ffi_call(contrastive_native._FORWARD, results)  # pylint: disable=protected-access
  good = (jnp.ones((4, 8), f32), jnp.ones((4, 8), f32), jnp.asarray([8], jnp.int32),
          jnp.ones((1,), f32), jnp.zeros((1,), f32))
  jax.block_until_ready(call(*good))
  with pytest.raises(Exception, match="operand 2 is not an int32 buffer of rank 1"):
    jax.block_until_ready(call(*good[:2], jnp.asarray([8.0]), *good[3:]))
  with pytest.raises(Exception, match="inconsistent shapes"):
    jax.block_until_ready(call(good[0], jnp.ones((5, 8), f32), *good[2:]))
