r"""Exact kNN at every eval dim vs FAISS `IndexFlatIP` at the full dim alone.

  pip install faiss-cpu   # or: pip install -e '.[bench]'
  JAX_PLATFORMS=cpu python benchmarks/knn.py
  JAX_PLATFORMS=cpu python benchmarks/knn.py --dims=64 --backends=native,xla --nofunnel
  JAX_PLATFORMS=cpu python benchmarks/knn.py --num_db=6000 --num_queries=1000 --reps=1

For each embedding size d and each k, on the same L2-normalised random
vectors (--num_db database rows, --num_queries queries), times

  ours   `knn.knn_search` at all eval dims, eval_dims(nesting_dims(d)):
         7 dims for d = 64, 13 for d = 512 (one pass, exact top-k), with
         each backend of --backends: 'native' (the C search, what
         backend='auto' runs on a CPU) and/or 'xla' (the XLA program that
         accelerators run)
  faiss  `faiss.IndexFlatIP(d).search` at the full dim only (exact)

and prints both times and ours / faiss. With --funnel (default on), for each d
it also times `adaptive.funnel_search` with the funnel
[(d/8, 200), (d/4, 100), (d/2, 50), (d, k)] (k = 10) against ours exact at
the full dim alone (`knn.knn_search` at [d], k = 10), and prints funnel /
exact time, the MFLOPs ratio (`adaptive.funnel_mflops`) and the fraction of
the exact top-10 the funnel returns. Timings are medians over --reps runs
after one warm-up run (which also compiles ours); the variants are run in
turn within each rep, so load from other processes hits them alike. All use
every core: the native search's threads, XLA's CPU thread pool and FAISS's
OpenMP threads. The fraction of FAISS's top-k that ours returns at the full
dim is printed as a check (exact ties and last-bit float differences may
reorder a few).

Measured on a shared 2-core AMD EPYC VM (AVX2, CPU, float32, faiss-cpu
1.15.1), defaults (--reps=5), native backend:

  d=  64 k=  1: ours (native)  7 dims    0.66 s | faiss 1 dim    0.80 s | ours / faiss  0.83
  d=  64 k=100: ours (native)  7 dims    1.44 s | faiss 1 dim    1.28 s | ours / faiss  1.13
  d= 512 k=  1: ours (native) 13 dims    4.70 s | faiss 1 dim    4.35 s | ours / faiss  1.08
  d= 512 k=100: ours (native) 13 dims    6.29 s | faiss 1 dim    4.54 s | ours / faiss  1.39

The machine is shared and single runs move by up to 20 %: five runs of
the current search (seeded thresholds for k = 100, the database prepared
on threads) gave d = 512, k = 100 ratios of 1.36, 1.49, 1.44, 1.39 and 1.35
(median 1.39; d = 64, k = 100: 1.06-1.32), against 1.43-1.62 (median 1.51)
for the previous version, whose lists took every candidate from -inf. The
native search and the XLA program side by side, measured with an earlier
version of the native search whose k = 100 lists cost ~2x what they cost
now (`--dims=64 --backends=native,xla --nofunnel`):

  d=  64 k=  1: ours (native)  7 dims    0.86 s | faiss 1 dim    0.90 s | ours / faiss  0.95
  d=  64 k=  1: ours (xla   )  7 dims    3.49 s | faiss 1 dim    0.90 s | ours / faiss  3.88
  d=  64 k=100: ours (native)  7 dims    2.11 s | faiss 1 dim    0.98 s | ours / faiss  2.16
  d=  64 k=100: ours (xla   )  7 dims   17.13 s | faiss 1 dim    0.98 s | ours / faiss 17.54

Where the native search's time goes (one thread, 1,000 queries, d = 512,
CPU time): the tiled multiply-adds at one dim run at the FMA units' peak
(~78 GFLOP/s per core here, as OpenBLAS's sgemm), and scoring 13 dims
instead of one adds ~15 % for k = 1: per (dim, query) and 16 rows a
multiply and a compare per 8 scores against the best score so far, a new
best (~ln N times per list) being handled off the hot path. For k > 1 each
of the D x Q top-k lists streamed from a threshold of -inf would take about
k ln(N / k) candidates (~1,100 at k = 100), and appending them and cutting
their buffers back cost ~22 us of CPU per list, about what FAISS pays per
query for its one heap, D times over. So for k >= 32 the search first
scores every 32nd database block alone, and each list's threshold starts at
the j-th best of its sample scores, j chosen so that the sample holds j of
the exact top-k with probability <= 1e-4 (j = 13 for k = 100): a list with
fewer than k candidates above its seed is searched again from -inf (never
seen on random vectors), every other list has its exact top-k. Lists then
take ~420 candidates, few enough that they park only on a hit, like k = 1.
In an instrumented build (cycle counters, one thread, 1,000 queries), k =
100 took 37 % more than k = 1 instead of 71 %: the sample 0.06 s (3 % of
the multiply-adds, and its own small top-k lists), the full pass 0.95 s
instead of 1.26 s, the final sorts 0.04 s, against 0.76 s for k = 1. Measured and not kept (no gain beyond the noise): a branch
per (dim, query) on its hits for unseeded lists (slower at d = 64), AVX2
compaction in the buffer cuts, exact cuts to k entries (fewer candidates,
costlier cuts), one FMA instead of a multiply and a compare per threshold
test, query passes of 1-16 MB of candidate buffers instead of 4 MB, a
sample of every 16th or 64th block instead of every 32nd. Where the time
goes in the XLA program: the module docstring of mrl_jax/evaluators/knn.py.

Funnel, same machine, the defaults run above (the re-ranking stages run
natively too, `knn_native.rerank`):

  d=  64: funnel 0.60 s | ours exact 1 dim 0.66 s | time 0.92, MFLOPs 0.979 / 7.68 = 0.1275
  d= 512: funnel 1.59 s | ours exact 1 dim 4.38 s | time 0.36, MFLOPs 7.83 / 61.4 = 0.1275

(Another run of the same code: 0.76 and 0.36. With the re-ranking stages
in NumPy, in an earlier run, the same funnels measured 1.71 and 0.48.) The
time saved is well short of the FLOPs saved: the first stage is a top-200
search, whose candidate lists cost as above, and at d = 64 the
exact search is itself only 64 multiply-adds per score. Random vectors have
no Matryoshka structure, so the funnel recovers only ~5 % of their exact
top-10: the recall figure is meaningful on trained embeddings.
"""
import functools
import statistics
import time

from absl import app
from absl import flags
import numpy as np

from mrl_jax import matryoshka
from mrl_jax.evaluators import adaptive
from mrl_jax.evaluators import knn

_NUM_DB = flags.DEFINE_integer('num_db', 60_000, 'Database rows.')
_NUM_QUERIES = flags.DEFINE_integer('num_queries', 10_000, 'Queries.')
_DIMS = flags.DEFINE_list('dims', ['64', '512'], 'Embedding sizes d to time.')
_KS = flags.DEFINE_list('ks', ['1', '100'], 'Neighbours per query.')
_START = flags.DEFINE_integer('start', 8, 'Smallest nesting dim (doubling up to d).')
_REPS = flags.DEFINE_integer('reps', 5, 'Timed runs of each (median).')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')
_FUNNEL = flags.DEFINE_bool('funnel', True, 'Also time the funnel vs exact full-dim search.')
_BACKENDS = flags.DEFINE_list(
    'backends', ['native'], "knn_search backends to time: 'native' (the C search, what "
    "backend='auto' runs on CPU) and/or 'xla' (the XLA program accelerators run).")
_THREADS = flags.DEFINE_integer('threads', None, 'Threads of the native search (None: all CPUs).')


def _import_faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(
        "benchmarks/knn.py compares with FAISS, which is not installed. Fix: "
        "pip install faiss-cpu (or pip install -e '.[bench]').") from e
  return faiss


def _unit_rows(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main(argv):
  del argv
  faiss = _import_faiss()
  rng = np.random.default_rng(_SEED.value)
  print(f'database {_NUM_DB.value} x queries {_NUM_QUERIES.value}, median of '
        f'{_REPS.value} runs, FAISS {faiss.__version__} with '
        f'{faiss.omp_get_max_threads()} threads')
  for d in (int(s) for s in _DIMS.value):
    database = _unit_rows(rng, _NUM_DB.value, d)
    queries = _unit_rows(rng, _NUM_QUERIES.value, d)
    dims = knn.eval_dims(matryoshka.nesting_dims(d, start=_START.value))
    index = faiss.IndexFlatIP(d)
    index.add(database)
    for k in (int(s) for s in _KS.value):
      theirs = functools.partial(index.search, queries, k)
      ours = {b: functools.partial(knn.knn_search, queries, database, dims, k, backend=b,
                                   num_threads=_THREADS.value)
              for b in _BACKENDS.value}
      our_idx = {b: _timed(fn)[1][1] for b, fn in ours.items()}  # warm-up: compiles
      _, (_, faiss_idx) = _timed(theirs)
      times = {name: [] for name in ['faiss', *ours]}
      for _ in range(_REPS.value):
        times['faiss'].append(_timed(theirs)[0])
        for b, fn in ours.items():
          times[b].append(_timed(fn)[0])
      t_faiss = statistics.median(times['faiss'])
      for b in ours:
        t_ours = statistics.median(times[b])
        agree = np.mean([len(np.intersect1d(a, f)) / k
                         for a, f in zip(our_idx[b][-1], faiss_idx)])
        print(f'd={d:4d} k={k:3d}: ours ({b:6s}) {len(dims):2d} dims {t_ours:7.2f} s | '
              f'faiss 1 dim {t_faiss:7.2f} s | ours / faiss {t_ours / t_faiss:5.2f} '
              f'| top-k agreement at d {100 * agree:.2f}%', flush=True)
    if _FUNNEL.value:
      _time_funnel(queries, database, d)


def _time_funnel(queries, database, d, k=10):
  """Funnel [(d/8, 200), (d/4, 100), (d/2, 50), (d, k)] vs ours exact at d alone."""
  stages = [(max(1, d // 8), 200), (max(1, d // 4), 100), (max(1, d // 2), 50), (d, k)]
  funnel = functools.partial(adaptive.funnel_search, queries, database, stages, k)
  exact = functools.partial(knn.knn_search, queries, database, [d], k)
  _, funnel_idx = _timed(funnel)  # warm-up: compiles
  _, (_, exact_idx) = _timed(exact)
  times = {'funnel': [], 'exact': []}
  for _ in range(_REPS.value):
    times['exact'].append(_timed(exact)[0])
    times['funnel'].append(_timed(funnel)[0])
  t_funnel, t_exact = (statistics.median(times[n]) for n in ('funnel', 'exact'))
  mflops, exact_mflops = adaptive.funnel_mflops(database.shape[0], stages, final_dim=d)
  agree = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(funnel_idx, exact_idx[0])])
  print(f'd={d:4d} k={k:3d}: funnel {stages} {t_funnel:7.2f} s | ours exact 1 dim '
        f'{t_exact:7.2f} s | funnel / exact time {t_funnel / t_exact:5.2f}, MFLOPs '
        f'{mflops:.3g} / {exact_mflops:.3g} = {mflops / exact_mflops:.4f} | exact top-k '
        f'recovered {100 * agree:.2f}%', flush=True)


if __name__ == '__main__':
  app.run(main)
