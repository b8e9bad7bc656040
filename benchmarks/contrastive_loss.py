r"""Nested contrastive loss vs the single full-dim loss: loss + gradient time.

  JAX_PLATFORMS=cpu python benchmarks/contrastive_loss.py
  JAX_PLATFORMS=cpu python benchmarks/contrastive_loss.py --batch_sizes=1024 --reps=9

For each kind ('softmax', 'sigmoid') and batch size B, with d = 768 and the 7
prefixes [12, 24, 48, 96, 192, 384, 768], times jax.value_and_grad (wrt both
towers) of the jitted losses on the same inputs:

  full    the single full-dim loss, `contrastive(x, y, [768])`: the baseline
  chunked all 7 prefixes in the chunked cumulative form, `contrastive(x, y,
          dims)`: one B x B x d matmul plus O(7 B^2) elementwise work
  native  the same loss, `impl='native'` (softmax only, when the package was
          built with its C extension): the chunked form fused in one CPU
          kernel, the prefix dots kept in registers (`contrastive_native`)
  naive   7 independent losses, one per truncated prefix: sum_m B^2 m FLOPs

and prints each time and its ratio to `full`; `nesting` is native's time
over the native kernel's own single full-dim loss (`impl='native'` with
dims [768], timed too), the cost of the 7 prefixes within one
implementation. Times are medians over --reps runs after one warm-up run.
The variants run in turn within each rep (full, native, native1, chunked,
naive), and each ratio is the median over the reps of the two variants'
ratio within the rep: on a shared machine whose speed drifts over seconds,
a paired ratio cancels the drift that a ratio of two medians keeps.

Measured on a shared 2-core AMD EPYC VM (Zen 3, AVX2; CPU, float32), where
single figures move by 10-25 % from run to run. Three runs of
`--reps=5 --kinds=softmax` with the final code, native / full (chunked /
full; native's nesting column):

  B = 1024:  1.58, 1.28, 1.46   (chunked 2.11, 1.98, 1.94; nesting 1.32, 1.38, 1.58)
  B = 4096:  1.25, 1.10, 1.18   (chunked 2.06, 1.90, 2.05; nesting 1.55, 1.37, 1.43)

naive / full 2.5-3.6 in the same runs. Eight earlier runs of the same
kernel before its threads moved onto XLA's pool gave 1.05-1.58 at B = 1024
and 1.11-1.31 at B = 4096. Earlier runs of the whole benchmark (before the
native kernel) gave chunked / full 1.5-2.2 for softmax and 1.5-2.1 for
sigmoid, naive 2.5-3.5. So on this CPU the native loss meets <= 1.3 at B =
4096 and not reliably at B = 1024, where XLA's single full-dim loss runs at
~145 GFLOP/s effective (~75 % of the two cores' FMA peak) and the native
kernel's own single-prefix loss takes about as long: what is left is the
cost of the prefixes themselves (below).

Smaller batches (one run each, --reps=9): at d = 768, B = 128 / 256 / 512,
native 3.5 / 7.9 / 13.4 ms against XLA's chunked 2.7 / 6.8 / 12.7 (the
native call's fixed costs); at d = 64 with the Fashion-MNIST demo's 6
prefixes (--dim=64 --start=2), B = 256: 2.6 against 2.8 ms, B = 1024: 20.4
against 39.7.

Why XLA's chunked form costs ~2x on a CPU: its seven chunk matmuls (K = 12,
12, 24, ... features) each write and re-read a B x B partial sum and do not
reach the one full matmul's FLOP rate (measured pieces at B = 4096: their
forward 551 ms against 198 ms for the full matmul, their backward 605
against 381), and every prefix adds B x B elementwise passes (exp, the
log-sum-exp sums, the cotangent of the dots, the norms' row and column
sums), ~0.07-0.15 of the full loss each. A prototype that tiled the XLA
forward over 256-row blocks of x still took 1.6x the full forward.

What the native kernel does instead (mrl_jax/_contrastive_native.c): a 4 x
24 register tile accumulates the dots chunk by chunk, so after chunk m the
accumulators are the prefix-m dots and only that prefix's exps and sums are
added on top of one full-dim pass; the forward stores every prefix's dots
(B^2 M floats, in one buffer reused from call to call) so the backward does
the two gradient products the full-dim loss does, over panels of the
cumulative cotangent of each chunk, and no recompute of the dots; the
norms, diagonal and label-smoothing terms are in C too, so the jitted step
is two custom calls. On its own (2 threads, best of 30) the kernel takes
~13 ms forward and ~26-29 ms backward at B = 1024, its matrix products at
~75 % of the FMA peak; XLA's whole full-dim loss takes 33-43 ms there.
What did not pay: recomputing the dots in the backward instead of storing
them (4 B x B x d passes instead of 3: 1.7-2.3x); a fresh XLA output buffer
for the stored dots per call (its page faults cost ~400 ms a step at B =
4096: 1.5-2.0x); a host callback instead of the FFI custom calls (copies
and padding per call: 1.9-2.8x); 6 x 16 tiles, which pad the batch to 48s
(no faster than 4 x 24); other backward panel shapes (48-144 x rows by
96-192 y rows: the same or slower); regular instead of streaming stores for
the dots at B = 1024 (no change); a backward loop with fewer live vectors
(no change).

Where the prefixes' cost goes: per logit and prefix, the forward scales,
exponentiates, adds to two sums and stores the dot (~20 vector ops per 8
logits) and the backward loads the dot, exponentiates again, forms G, the
norm cotangents' sums and the cumulative cotangent (~27); for 7 prefixes
that is ~330 ops per 8 logits, about as many instructions as the three
d = 768 matrix products' ~290 FMAs. The products run at 2 FMAs a cycle and
the elementwise work shares the FP ports, so in A/B runs of the kernel
alone 7 prefixes cost 1.25-1.35x one (B = 1024), 1.3-1.6x inside the
jitted step. Storing the exps instead of the dots would save the
backward's exp but not the dots the norm gradients need.
"""
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax import contrastive_native
from mrl_jax import matryoshka as mrl

_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1024', '4096'],
                                 'Global batch sizes B to time.')
_KINDS = flags.DEFINE_list('kinds', list(mrl.CONTRASTIVE_KINDS),
                           'Loss kinds to time.')
_DIM = flags.DEFINE_integer('dim', 768, 'Embedding size d.')
_START = flags.DEFINE_integer('start', 12, 'Smallest nesting dim (doubling).')
_REPS = flags.DEFINE_integer('reps', 9, 'Timed runs per variant (median).')

# CLIP's initial temperature; SigLIP's t = 10 and b = -10.
_LOSS_KWARGS = {'softmax': dict(temperature=0.07),
                'sigmoid': dict(temperature=0.1, bias=-10.0)}


def _variants(kind, dims):
  """name -> loss(x, y), jitted as value_and_grad wrt x and y."""
  kw = dict(kind=kind, **_LOSS_KWARGS[kind])
  d = dims[-1]

  def naive(x, y):
    return sum(mrl.contrastive(x[:, :m], y[:, :m], [m], **kw) for m in dims)

  # In the order they run within each rep: each ratio's two variants next
  # to each other where they can be.
  fns = {'full': lambda x, y: mrl.contrastive(x, y, [d], **kw)}
  if kind == 'softmax' and contrastive_native.available():
    fns['native'] = lambda x, y: mrl.contrastive(x, y, dims, **kw, impl='native')
    fns['native1'] = lambda x, y: mrl.contrastive(x, y, [d], **kw, impl='native')
  fns['chunked'] = lambda x, y: mrl.contrastive(x, y, dims, **kw)
  fns['naive'] = naive
  return {name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
          for name, fn in fns.items()}


def _time(fns, x, y, reps):
  """Seconds per call of each fn, per rep; the variants run in turn each rep."""
  for fn in fns.values():  # Compile and warm up.
    jax.block_until_ready(fn(x, y))
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(x, y))
      times[name].append(time.perf_counter() - start)
  return times


def _ratio(times, a, b):
  """Median over reps of a's time / b's in the same rep (paired ratios)."""
  return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))


def main(argv):
  del argv
  d = _DIM.value
  dims = mrl.nesting_dims(d, start=_START.value)
  device = jax.devices()[0]
  print(f'device: {device.platform} ({device.device_kind}), '
        f'{len(jax.devices())} device(s); d={d}, nesting_dims={dims}; '
        f'value_and_grad wrt x and y; ms: median of {_REPS.value} reps, '
        f'ratios: median of the reps\' paired ratios')
  print(f'{"kind":8s} {"B":>5s} {"full ms":>9s} {"chunked ms":>11s} '
        f'{"ratio":>6s} {"native ms":>10s} {"ratio":>6s} {"nesting":>8s} '
        f'{"naive ms":>9s} {"ratio":>6s}')
  rng = np.random.default_rng(0)
  for kind in _KINDS.value:
    fns = _variants(kind, dims)
    for b in (int(v) for v in _BATCH_SIZES.value):
      x = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
      y = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
      times = _time(fns, x, y, _REPS.value)
      t = {name: statistics.median(v) for name, v in times.items()}
      native = (f'{1e3 * t["native"]:10.1f} {_ratio(times, "native", "full"):6.2f} '
                f'{_ratio(times, "native", "native1"):8.2f}'
                if 'native' in t else f'{"-":>10s} {"-":>6s} {"-":>8s}')
      print(f'{kind:8s} {b:5d} {1e3 * t["full"]:9.1f} '
            f'{1e3 * t["chunked"]:11.1f} {_ratio(times, "chunked", "full"):6.2f} {native} '
            f'{1e3 * t["naive"]:9.1f} {_ratio(times, "naive", "full"):6.2f}',
            flush=True)


if __name__ == '__main__':
  app.run(main)
