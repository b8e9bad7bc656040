r"""Nested contrastive loss vs the single full-dim loss: loss + gradient time.

  JAX_PLATFORMS=cpu python benchmarks/contrastive_loss.py
  JAX_PLATFORMS=cpu python benchmarks/contrastive_loss.py --batch_sizes=1024 --reps=9

For each kind ('softmax', 'sigmoid') and batch size B, with d = 768 and the 7
prefixes [12, 24, 48, 96, 192, 384, 768], times jax.value_and_grad (wrt both
towers) of three jitted losses on the same inputs:

  full    the single full-dim loss, `contrastive(x, y, [768])`: the baseline
  chunked all 7 prefixes in the chunked cumulative form, `contrastive(x, y,
          dims)`: one B x B x d matmul plus O(7 B^2) elementwise work
  naive   7 independent losses, one per truncated prefix: sum_m B^2 m FLOPs

and prints each time and its ratio to `full`. Timings are medians over
--reps runs after one warm-up run; the three variants are run in turn within
each rep, so load from other processes hits them alike.

Measured on a shared 2-core AMD EPYC VM (CPU, float32) while another long
job loaded it, so single figures move by ~10%: chunked / full about 1.5 at
B = 1024 (softmax 1.50, sigmoid 1.54) and 1.4-1.5 at B = 4096 (softmax 1.41,
sigmoid 1.48); naive / full about 2.7. Before the hand-written loss
gradients (custom_vjp, one exp per logit), the same runs gave chunked / full
1.76 / 1.66 at B = 1024 and 1.69 / 1.68 at B = 4096. The chunked matmuls
cost about what the full one does; the excess is the per-prefix B x B
elementwise work (exp, log-sum-exp sums or softplus, the cotangent of the
dots and the row / column sums for the norm gradients), roughly 0.07 of
the full loss per prefix.

A later run on the same VM with little other load (the full loss faster:
44.7 ms at B = 1024 instead of ~80) gave larger ratios, since the excess
does not shrink with the matmul: chunked / full 2.20 (softmax) and 1.54
(sigmoid) at B = 1024, 1.98 and 1.77 at B = 4096; naive 2.7-3.5. Measured
pieces at B = 4096 (one process, medians of 5): the seven chunk matmuls'
forward alone, each writing its own B x B partial sum, 551 ms against 198 ms
for the one full matmul; their backward 605 ms against 381 ms. A prototype
that tiles the forward over 256-row blocks of x (chunk matmuls, exps and row
/ column sums per tile, nothing B x B stored) still took 317 ms, 1.6 times
the full forward, before any backward: on XLA:CPU the small-K chunk matmuls
do not reach the full matmul's FLOP rate, so <= 1.3 needs a fused kernel
(or an accelerator, where it is yet to be measured).

A later run (--reps=3): softmax 1.64 (B = 1024) and 1.84 (B = 4096),
sigmoid 2.07 and 1.58; naive 2.5-3.3. A fused C kernel for the softmax
loss of all prefixes was built and measured but is not in the package: its
forward keeps a 4 x 16 tile of running dots in registers and exponentiates
each prefix as its chunk completes; its backward recomputes the dots per
panel of 32 x 256 rows, stores that panel's cumulative cotangent of every
chunk and runs both gradient products as register-tiled GEMMs over it. Its
values and gradients matched the XLA loss (relative 6e-8 and 5e-6 at B =
4096), and called directly on 2 threads at B = 4096 it took ~210-260 ms
forward and ~660-700 ms backward, about 1.2-1.4x the XLA full-dim loss +
gradient; but through jax.pure_callback (host copies of the inputs and
outputs, padding and transposes of x and y per call) the jitted loss +
gradient took 1.89x the full-dim loss at B = 4096 and 2.76x at B = 1024,
no better than XLA's chunked form. Storing the prefix dots for the
backward instead of recomputing them (7 x B^2 floats, 470 MB at B = 4096)
was slower on this VM. As an XLA FFI custom call on XLA's own buffers
instead of a host callback, the same kernels gave 1.71-1.78x at B = 4096
(XLA chunked 1.92-2.00 in the same runs) and 2.27x at B = 1024 (XLA 2.68):
inside the call they took ~210-350 ms forward and ~690-800 ms backward at
B = 4096 and ~80 ms padding and transposing x and y, so the kernels alone
are ~1.4x the full-dim loss and the backward (recompute, cotangents, two
products: 3 of the 4 B x B x d passes) is what has to get faster.

A second design (not in the package either): 6 x 16 register tiles (gcc
kept the earlier arrays of accumulators on the stack: 32 against 78
GFLOP/s per core in a microbenchmark), the batch padded to a multiple of 48
and masked, every prefix's dots stored with streaming stores so that the
backward does the two gradient products and no recompute, and the handlers
written in C against XLA's FFI C API header, so the package could build
them without jaxlib. Same values and gradients (relative 2e-7 to 2.5e-6).
Jitted loss + gradient / full-dim loss: 1.49-1.98 at B = 4096 (XLA chunked
1.76-1.99 in the same runs) and 1.92-2.58 at B = 1024 (XLA 1.70-2.01). At
B = 4096 the forward swings between 320 and 995 ms with the fresh 477 MB
output buffer XLA allocates per call for the dots (page faults); reusing
one buffer across calls gave 1.30 and 1.46. At B = 1024 the kernels run at
~80-94 GFLOP/s on 2 threads while XLA's whole full-dim loss runs at ~112
effective, so <= 1.3 there needs faster products, not less overhead.
"""
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax import matryoshka as mrl

_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1024', '4096'],
                                 'Global batch sizes B to time.')
_KINDS = flags.DEFINE_list('kinds', list(mrl.CONTRASTIVE_KINDS),
                           'Loss kinds to time.')
_DIM = flags.DEFINE_integer('dim', 768, 'Embedding size d.')
_START = flags.DEFINE_integer('start', 12, 'Smallest nesting dim (doubling).')
_REPS = flags.DEFINE_integer('reps', 5, 'Timed runs per variant (median).')

# CLIP's initial temperature; SigLIP's t = 10 and b = -10.
_LOSS_KWARGS = {'softmax': dict(temperature=0.07),
                'sigmoid': dict(temperature=0.1, bias=-10.0)}


def _variants(kind, dims):
  """name -> loss(x, y), jitted as value_and_grad wrt x and y."""
  kw = dict(kind=kind, **_LOSS_KWARGS[kind])
  d = dims[-1]

  def naive(x, y):
    return sum(mrl.contrastive(x[:, :m], y[:, :m], [m], **kw) for m in dims)

  fns = {'full': lambda x, y: mrl.contrastive(x, y, [d], **kw),
         'chunked': lambda x, y: mrl.contrastive(x, y, dims, **kw),
         'naive': naive}
  return {name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
          for name, fn in fns.items()}


def _time(fns, x, y, reps):
  """Median seconds per call of each fn; variants interleaved per rep."""
  for fn in fns.values():  # Compile and warm up.
    jax.block_until_ready(fn(x, y))
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(x, y))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def main(argv):
  del argv
  d = _DIM.value
  dims = mrl.nesting_dims(d, start=_START.value)
  device = jax.devices()[0]
  print(f'device: {device.platform} ({device.device_kind}), '
        f'{len(jax.devices())} device(s); d={d}, nesting_dims={dims}; '
        f'value_and_grad wrt x and y, median of {_REPS.value} reps')
  print(f'{"kind":8s} {"B":>5s} {"full ms":>9s} {"chunked ms":>11s} '
        f'{"ratio":>6s} {"naive ms":>9s} {"ratio":>6s}')
  rng = np.random.default_rng(0)
  for kind in _KINDS.value:
    fns = _variants(kind, dims)
    for b in (int(v) for v in _BATCH_SIZES.value):
      x = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
      y = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
      t = _time(fns, x, y, _REPS.value)
      print(f'{kind:8s} {b:5d} {1e3 * t["full"]:9.1f} '
            f'{1e3 * t["chunked"]:11.1f} {t["chunked"] / t["full"]:6.2f} '
            f'{1e3 * t["naive"]:9.1f} {t["naive"] / t["full"]:6.2f}',
            flush=True)


if __name__ == '__main__':
  app.run(main)
