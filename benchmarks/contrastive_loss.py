r"""Nested contrastive loss vs the single full-dim loss: loss + gradient time.

  JAX_PLATFORMS=cpu python benchmarks/contrastive_loss.py
  JAX_PLATFORMS=cpu python benchmarks/contrastive_loss.py --batch_sizes=1024 --reps=9

For each kind ('softmax', 'sigmoid') and batch size B, with d = 768 and the 7
prefixes [12, 24, 48, 96, 192, 384, 768], times jax.value_and_grad (wrt both
towers) of the jitted losses on the same inputs:

  full    the single full-dim loss, `contrastive(x, y, [768])`: the baseline
  chunked all 7 prefixes in the chunked cumulative form, `contrastive(x, y,
          dims)`: one B x B x d matmul plus O(7 B^2) elementwise work
  native  the same loss, `impl='native'` (when the package was built with
          its C extension): the chunked form fused in one CPU
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
single timings move by 10-25 % from run to run and more in slow phases
(XLA's full-dim loss took 30-58 ms at B = 1024 within one hour). Five runs
of `--kinds=softmax` (9 reps) with the final softmax kernel, native / full
(chunked / full; native's nesting column):

  B = 1024:  1.14, 1.16, 1.13, 1.16, 1.18   (chunked 1.86-2.12; nesting 1.17-1.31)
  B = 4096:  0.93, 0.92, 0.90, 0.94, 0.90   (chunked 1.72-1.85; nesting 1.20-1.28)

naive / full 2.4-3.1 in the same runs. Three runs of the whole benchmark
(both kinds, 9 reps) with the final code, native / full (chunked / full;
nesting):

  softmax B = 1024:  1.04, 1.13, 1.08   (chunked 1.91, 2.25, 1.88; nesting 1.20, 1.20, 1.25)
  softmax B = 4096:  0.89, 0.90, 0.88   (chunked 1.82, 1.88, 1.88; nesting 1.30, 1.29, 1.25)
  sigmoid B = 1024:  1.15, 1.12, 1.20   (chunked 1.96, 1.92, 2.08; nesting 1.35, 1.26, 1.45)
  sigmoid B = 4096:  0.91, 0.89, 0.89   (chunked 1.59, 1.67, 1.61; nesting 1.44, 1.33, 1.45)

naive / full 2.4-3.4. The sigmoid loss's forward takes a softplus (an exp
and a log1p polynomial) per logit and prefix, its backward a sigmoid (an
exp and a division), hence its larger nesting cost. At B = 4096 XLA's
single full-dim loss maps ~270 MB of fresh temporaries per call (67k page
faults) and takes its B x B passes through memory; the native kernel's own
single full-dim loss takes ~0.75x its time there, so all 7 prefixes come
in under it. The previous version of the softmax kernel (ratio of medians,
5 reps) gave 1.24-1.58 at B = 1024 and 1.10-1.25 at B = 4096; the changes
since are listed below. Before the native sigmoid kernel, XLA's chunked
form was the only sigmoid one: 1.55-1.57.

Smaller batches (one run each, d = 768), native against XLA's chunked form:
B = 128: 2.6 / 4.3 ms against 4.0 / 3.4 (two runs), B = 256: 5.0 / 6.2
against 5.9 / 6.4, B = 512: 18.1 / 12.7 against 22.2 / 16.5; at d = 64 with
the Fashion-MNIST demo's 6 prefixes (--dim=64 --start=2), B = 256: 1.0
against 1.7 ms, B = 1024: 11.0 against 35.1.

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
the two gradient products the full-dim loss does and no recompute of the
dots: per panel of 96 x 192 logits, prefix by prefix from the last, it
builds the chunk's cumulative cotangent in place and runs that chunk's two
products on it at once (one L2-sized panel). The norms, diagonal and
label-smoothing terms are in C too (their gradients row by row inside the
backward's last pass), so the jitted step is two custom calls. On its own
at B = 1024 (2 threads, lower quartile of 12 calls, measured before the
last four changes below) the kernel took 0.7 + 11.9 ms forward (packing,
tiles) and 1.2 + 21.6 + 1.3 ms backward (packing, panels, unpacking); with
the one full-dim prefix, 9.0 and 18.6 ms for the tiles and panels, for the
1.65 + 3.3 GFLOP of their products: ~180 GFLOP/s, ~90 % of the two cores'
FMA peak (~190-197 GFLOP/s, a register-only FMA loop on both).

Where the prefixes' cost goes: per 8 logits and prefix the forward scales
(2 ops), takes a base-2 exp (11: log2(e) is folded into the scales; a
clamp at 2^-126 stands in for a mask) and adds to two sums; the backward
loads the dot and exponentiates again, then forms G, the chunk's
cotangent in place and the norm cotangents' sums (~20 ops). Measured, the
6 smaller prefixes add 2.9 ms to the forward and 3.0 ms to the backward at
B = 1024; a microbenchmark puts one tile's 12-vector epilogue at ~100
cycles forward and ~150 backward, ~6 cycles per exp. Storing the exps
instead of the dots would save the backward's exp but not the dots the
norm gradients need.

What paid, in this version (in-JAX interleaved A/B at B = 1024, the
whole loss over XLA's full-dim one, three or four runs each): base-2 exps
(11 vector ops, was 17) with the cumulative cotangent built in place
(1.22-1.31 against 1.33-1.35 for the earlier kernel); the backward's
prefixes on one panel, the scratch kept between calls (allocated per call
it was page-faulted in every call: the backward's packing took 1.5-7.5 ms,
then 1.3-1.6) and packing and unpacking 8 features at a time (1.20-1.33
against 1.34-1.51, all together); products that set their outputs instead
of zeroing them first (9.6 MB of memset: packing 1.5 -> 1.0 ms); the tail
fused into the backward's last pass and the norms summed in float lanes
(1.18-1.27 against 1.20-1.27); threads sharing rows in units of 12, so
that B = 1024 splits evenly (1.18-1.27 against 1.20-1.30). What did not:
recomputing the dots in the backward instead of storing them (4 B x B x d
passes instead of 3: 1.7-2.3x); a fresh XLA output buffer for the stored
dots per call (its page faults cost ~400 ms a step at B = 4096: 1.5-2.0x);
a host callback instead of the FFI custom calls (copies and padding per
call: 1.9-2.8x); 6 x 16 tiles, which pad the batch to 48s (no faster than
4 x 24); other backward panel shapes (the same or slower); regular instead
of streaming stores for the dots at B = 1024; 256-bit streaming stores and
vmaxps in inline assembly; the 12 exps of a tile interleaved stage by stage
(register spills: slower) or Estrin's scheme for the polynomial; deferring
a block's exps until after its products (+1.2 ms: interleaved with the next
chunk's products they overlap); software prefetch of the backward's dots
(no change for any of the last five).
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
  if contrastive_native.available():
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
