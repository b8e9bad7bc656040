"""The nested contrastive losses (softmax and sigmoid) as fused native CPU code.

`matryoshka.contrastive(..., impl='native')` runs here (`softmax_loss`,
`sigmoid_loss`). On
a CPU, XLA computes the chunked cumulative form as one matmul per chunk
(12, 12, 24, ... features for d = 768), each writing and re-reading a B x B
partial sum, and then several elementwise B x B passes per prefix: at d =
768 its 7 prefixes cost ~1.7-2.3x the one full-dim loss on 2 cores. The C
kernel (`_contrastive_native.c`) keeps a 4 x 24 tile of running dot
products in registers and, after each chunk, exponentiates that prefix's
logits and adds them to its row and column sums (softmax) or sums the
softplus of its signed logits (sigmoid); it stores every prefix's dots, so
its backward pass does the two gradient products the full-dim loss does and
no third. benchmarks/contrastive_loss.py times both.

Each loss is two XLA FFI custom calls on the CPU, built against XLA's
FFI C header (vendored in third_party/): they compute the whole per-prefix
loss (norms, diagonal and label-smoothing terms too) on XLA's buffers
inside the jitted program, in shares of rows (one per CPU this process
may run on; `set_threads`) that run on XLA's own CPU thread pool. Values
and gradients equal `impl='xla'`'s to float32 rounding.

The stored dots (B^2 M floats: 470 MB at B = 4096 with 7 prefixes) live in
one process-wide buffer that is reused from call to call (a fresh buffer
per call costs its page faults every step), capped by
`set_workspace_limit` (default 2 GiB). Each forward call fills it under a
new generation number that its backward call checks: a backward whose dots
were overwritten in between (two native losses in one step, several
devices) or never kept (above the cap) recomputes them, which costs one
more B x B x d pass and changes no result. The passes' scratch (the padded
inputs and gradient partials, ~25 MB at B = 1024) is kept between calls
too, under the same cap.

For training on one CPU device: a batch sharded over several devices is
gathered to each of them for the call. The library is compiled with the
package (setup.py, an optional extension: without a C compiler the install
still succeeds and impl='native' says so).
"""
from __future__ import annotations

import ctypes
import functools
import pathlib

import jax
import jax.numpy as jnp

from mrl_jax import native_library

_FORWARD = 'mrl_contrastive_forward'
_BACKWARD = 'mrl_contrastive_backward'
_SIGMOID_FORWARD = 'mrl_sigmoid_forward'
_SIGMOID_BACKWARD = 'mrl_sigmoid_backward'


@functools.lru_cache(maxsize=1)
def _library():
  """The compiled library, or None (no compiler at install time)."""
  lib = native_library.load(pathlib.Path(__file__).parent, '_contrastive_native')
  if lib is None:
    return None
  lib.mrl_contrastive_dots_size.restype = ctypes.c_int64
  lib.mrl_contrastive_dots_size.argtypes = [ctypes.c_int64, ctypes.c_int64]
  lib.mrl_contrastive_uses_avx2.restype = ctypes.c_int
  lib.mrl_contrastive_force_generic.argtypes = [ctypes.c_int]
  lib.mrl_contrastive_set_threads.argtypes = [ctypes.c_int]
  lib.mrl_contrastive_set_workspace_limit.argtypes = [ctypes.c_int64]
  lib.mrl_contrastive_workspace_bytes.restype = ctypes.c_int64
  if not hasattr(lib, 'mrl_contrastive_ffi_forward') or not hasattr(lib, 'mrl_sigmoid_ffi_forward'):
    return None
  return lib


@functools.lru_cache(maxsize=1)
def _registered() -> bool:
  lib = check_available()
  for name, fn in ((_FORWARD, lib.mrl_contrastive_ffi_forward),
                   (_BACKWARD, lib.mrl_contrastive_ffi_backward),
                   (_SIGMOID_FORWARD, lib.mrl_sigmoid_ffi_forward),
                   (_SIGMOID_BACKWARD, lib.mrl_sigmoid_ffi_backward)):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(fn), platform='cpu')
  return True


def available() -> bool:
  """Whether the native loss was built with this installation."""
  return _library() is not None


def uses_avx2() -> bool:
  lib = _library()
  return bool(lib is not None and lib.mrl_contrastive_uses_avx2())


def force_generic(on: bool) -> None:
  """Run the baseline-ISA build even where AVX2 + FMA exist (tests)."""
  check_available().mrl_contrastive_force_generic(int(bool(on)))


def set_threads(n: int | None) -> None:
  """Threads of every later call: n, or None for the CPUs this process may use."""
  check_available().mrl_contrastive_set_threads(int(n or 0))


def set_workspace_limit(num_bytes: int) -> None:
  """The most memory kept for the dots between a forward call and its backward.

  Default 2 GiB (B^2 M floats: 470 MB at B = 4096 and M = 7). 0 keeps none:
  every backward pass then recomputes the dots (one more B x B x d pass).
  The same limit caps, separately, the scratch kept between calls (0: none,
  each call maps its own). A smaller limit than what is held frees it now.
  """
  check_available().mrl_contrastive_set_workspace_limit(int(num_bytes))


def workspace_bytes() -> int:
  """Bytes held between calls now: the stored dots and the cached scratch."""
  return int(check_available().mrl_contrastive_workspace_bytes())


def check_available():
  """The library; raises RuntimeError with the fix where it was not built."""
  lib = _library()
  if lib is None:
    raise RuntimeError(
        "contrastive(..., impl='native') needs the compiled loss, which this installation "
        'lacks (it is built by `pip install -e .` when a C compiler is present). Fix: '
        "install a C compiler and reinstall mrl_jax, or pass impl='xla'.")
  return lib


MAX_PREFIXES = 64


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 4))
def softmax_loss(x, y, dims, inv_tau, eps):
  """The softmax contrastive loss of every prefix: [M] float32.

  x, y [B, d] float32; dims the M increasing prefix lengths (<= d, M <= 64);
  inv_tau [M] the inverse temperatures; eps the label smoothing (a float).
  Per prefix, as `matryoshka._softmax_fwd`: 0.5 (mean_i lse_i + mean_j
  lse_j) - (1 - eps) mean_i l_ii - eps mean_ij l_ij, l_ij = <x_i[:m],
  y_j[:m]> inv_tau / (|x_i[:m]| |y_j[:m]|). Differentiable in x, y and
  inv_tau.
  """
  return _loss_fwd(x, y, dims, inv_tau, eps)[0]


def _eps(eps):
  return jnp.full((1,), eps, jnp.float32)


def _loss_fwd(x, y, dims, inv_tau, eps):
  _registered()
  b, m = x.shape[0], len(dims)
  f32 = jnp.float32
  shapes = (jax.ShapeDtypeStruct((m,), f32), jax.ShapeDtypeStruct((m, b), f32),
            jax.ShapeDtypeStruct((m, b), f32), jax.ShapeDtypeStruct((m,), jnp.int32),
            jax.ShapeDtypeStruct((1,), jnp.int32))
  loss, lse_r, lse_c, two, token = jax.ffi.ffi_call(_FORWARD, shapes)(
      x, y, jnp.asarray(dims, jnp.int32), inv_tau, _eps(eps))
  return loss, (x, y, inv_tau, lse_r, lse_c, two, token)


def _loss_bwd(dims, eps, res, g):
  x, y, inv_tau, lse_r, lse_c, two, token = res
  f32 = jnp.float32
  shapes = (jax.ShapeDtypeStruct(x.shape, f32), jax.ShapeDtypeStruct(y.shape, f32),
            jax.ShapeDtypeStruct(inv_tau.shape, f32))
  dx, dy, d_inv_tau = jax.ffi.ffi_call(_BACKWARD, shapes)(
      x, y, jnp.asarray(dims, jnp.int32), inv_tau, _eps(eps), lse_r, lse_c, two,
      jnp.asarray(g, f32), token)
  return dx, dy, d_inv_tau


softmax_loss.defvjp(_loss_fwd, _loss_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def sigmoid_loss(x, y, dims, scale, bias):
  """The sigmoid contrastive loss of every prefix: [M] float32.

  x, y [B, d] float32; dims the M increasing prefix lengths (<= d, M <= 64);
  scale [M] the inverse temperatures, bias [M]. Per prefix, as
  `matryoshka._sigmoid_fwd`: sum_ij softplus(-z_ij (l_ij + bias)) / B, l_ij
  = <x_i[:m], y_j[:m]> scale / (|x_i[:m]| |y_j[:m]|), z = +1 on the diagonal
  and -1 off it. Differentiable in x, y, scale and bias.
  """
  return _sigmoid_fwd(x, y, dims, scale, bias)[0]


def _sigmoid_fwd(x, y, dims, scale, bias):
  _registered()
  m = len(dims)
  shapes = (jax.ShapeDtypeStruct((m,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))
  loss, token = jax.ffi.ffi_call(_SIGMOID_FORWARD, shapes)(
      x, y, jnp.asarray(dims, jnp.int32), scale, bias)
  return loss, (x, y, scale, bias, token)


def _sigmoid_bwd(dims, res, g):
  x, y, scale, bias, token = res
  f32 = jnp.float32
  shapes = (jax.ShapeDtypeStruct(x.shape, f32), jax.ShapeDtypeStruct(y.shape, f32),
            jax.ShapeDtypeStruct(scale.shape, f32), jax.ShapeDtypeStruct(bias.shape, f32))
  return jax.ffi.ffi_call(_SIGMOID_BACKWARD, shapes)(
      x, y, jnp.asarray(dims, jnp.int32), scale, bias, jnp.asarray(g, f32), token)


sigmoid_loss.defvjp(_sigmoid_fwd, _sigmoid_bwd)
