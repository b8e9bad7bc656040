r"""Nested contrastive loss vs the single full-dim loss: loss + gradient time.

  JAX_PLATFORMS=cpu python benchmarks/contrastive_loss.py
  JAX_PLATFORMS=cpu python benchmarks/contrastive_loss.py --batch_sizes=1024 --reps=9

For each kind ('softmax', 'sigmoid') and batch size B, with d = 768 and the 7
prefixes [12, 24, 48, 96, 192, 384, 768], times jax.value_and_grad (wrt both
towers) of the jitted losses on the same inputs, on the default device (on a
CPU or GPU: the XLA blocked form of `mrl_jax.contrastive`):

  full    the single full-dim loss, `contrastive(x, y, [768])`: the baseline
  chunked all 7 prefixes, `contrastive(x, y, dims)`: the chunk dots of one
          B x B x d product, blocks of columns, the gradient recomputed
  naive   7 independent losses, one per truncated prefix: sum_m B^2 m FLOPs

and prints each time and its ratio to `full`. Times are medians over --reps
runs after one warm-up run. The variants run in turn within each rep (full,
chunked, naive), and each ratio is the median over the reps of the two
variants' ratio within the rep: on a shared machine whose speed drifts over
seconds, a paired ratio cancels the drift that a ratio of two medians keeps.

CPU timings guard against regressions; what the loss costs on a TPU (memory,
HBM bytes, FLOPs) is `benchmarks/tpu_compile.py --only=loss`.
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
  fns = {'full': lambda x, y: mrl.contrastive(x, y, [d], **kw),
         'chunked': lambda x, y: mrl.contrastive(x, y, dims, **kw),
         'naive': naive}
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
        f'{"ratio":>6s} {"naive ms":>9s} {"ratio":>6s}')
  rng = np.random.default_rng(0)
  for kind in _KINDS.value:
    fns = _variants(kind, dims)
    for b in (int(v) for v in _BATCH_SIZES.value):
      x = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
      y = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
      times = _time(fns, x, y, _REPS.value)
      t = {name: statistics.median(v) for name, v in times.items()}
      print(f'{kind:8s} {b:5d} {1e3 * t["full"]:9.1f} '
            f'{1e3 * t["chunked"]:11.1f} {_ratio(times, "chunked", "full"):6.2f} '
            f'{1e3 * t["naive"]:9.1f} {_ratio(times, "naive", "full"):6.2f}',
            flush=True)


if __name__ == '__main__':
  app.run(main)
