"""Approximate nearest neighbours with FAISS: the funnel's first stage.

The funnel (`funnel.funnel_search`) shortlists at a small dim and re-ranks
exactly at larger ones. The MRL paper's wall-clock gain came from building
that shortlist with HNSW on a CPU, and deployed MRL embeddings live in such
ANN engines, so this is where adaptive retrieval is timed: a FAISS index over
the L2-normalised prefixes (inner product = cosine), `'hnsw'`
(`IndexHNSWFlat`) or `'ivf'` (`IndexIVFFlat` over a flat quantizer), against
FAISS's exact `IndexFlatIP` at the full dim on the same queries.

FAISS is optional: `pip install -c constraints.txt '.[faiss]'`.
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np

from mrl_jax import prefix

# Index types and their options, with defaults.
INDEXES = {
    "hnsw": {"hnsw_m": 32, "ef_construction": 40, "ef_search": 64},
    "ivf": {"nlist": None, "nprobe": 16},  # nlist None: 4 sqrt(N) lists
}


class Search(NamedTuple):
  indices: np.ndarray  # [Q, k] int64 database rows, best first
  seconds: float  # the search over all queries (index built beforehand)
  build_seconds: float
  distances_per_query: float  # vectors scored per query


def require_faiss(field: str = "index"):
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"{field} needs FAISS, which is not installed. Fix: pip install -c constraints.txt "
        "'.[faiss]' (or pip install faiss-cpu), or drop the option to search exactly "
        "(brute force).") from e
  return faiss


def check_index(index: str, options: dict[str, Any] | None, field: str) -> dict[str, Any]:
  """The index's options with defaults filled in; raises naming the field."""
  if index not in INDEXES:
    raise ValueError(f"{field}.index={index!r} is not a supported FAISS index; use one of "
                     f"{sorted(INDEXES)}, or None for the exact search.")
  options = dict(options or {})
  unknown = sorted(set(options) - set(INDEXES[index]))
  if unknown:
    raise ValueError(f"{field}: {unknown} are not options of index={index!r}; its options "
                     f"are {sorted(INDEXES[index])}.")
  out = {**INDEXES[index], **options}
  for key, value in out.items():
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
      raise ValueError(f"{field}.{key}={value!r} must be a positive int.")
  require_faiss(f"{field}.index={index!r}")
  return out


def _unit(x: np.ndarray, m: int) -> np.ndarray:
  return np.ascontiguousarray(prefix.normalize_rows(np.asarray(x, np.float32)[:, :m]),
                              np.float32)


class Index(NamedTuple):
  faiss_index: Any
  kind: str  # 'hnsw' | 'ivf'
  dim: int  # the prefix it indexes
  build_seconds: float
  options: dict[str, Any]


def build(database, m: int, index: str, options: dict[str, Any]) -> Index:
  """A FAISS index over the L2-normalised m-dim prefixes of `database`."""
  faiss = require_faiss()
  x = _unit(database, m)
  t0 = time.perf_counter()
  if index == "hnsw":
    ann = faiss.IndexHNSWFlat(m, options["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
    ann.hnsw.efConstruction = options["ef_construction"]
  else:
    nlist = options["nlist"] or max(1, int(4 * np.sqrt(len(x))))
    ann = faiss.IndexIVFFlat(faiss.IndexFlatIP(m), m, nlist, faiss.METRIC_INNER_PRODUCT)
    ann.train(x)
    ann.nprobe = min(options["nprobe"], nlist)
  ann.add(x)
  return Index(ann, index, m, time.perf_counter() - t0, options)


def search(ann: Index, queries, k: int) -> Search:
  """Approximate top-k rows of `ann.dim`-prefix cosine for each query."""
  faiss = require_faiss()
  q = _unit(queries, ann.dim)
  if ann.kind == "hnsw":
    ann.faiss_index.hnsw.efSearch = max(ann.options["ef_search"], k)  # k results need ef >= k
    stats = faiss.cvar.hnsw_stats
  else:
    stats = faiss.cvar.indexIVF_stats
  stats.reset()
  t0 = time.perf_counter()
  _, idx = ann.faiss_index.search(q, k)
  seconds = time.perf_counter() - t0
  ndis = stats.ndis
  if ann.kind == "ivf":  # + the coarse quantizer's distances to every list
    ndis += len(q) * ann.faiss_index.nlist
  return Search(idx, seconds, ann.build_seconds, ndis / max(len(q), 1))


def exact(queries, database, k: int) -> Search:
  """FAISS's exact search (`IndexFlatIP`) at the full dim: the reference."""
  faiss = require_faiss()
  d = np.shape(database)[1]
  x, q = _unit(database, d), _unit(queries, d)
  t0 = time.perf_counter()
  flat = faiss.IndexFlatIP(d)
  flat.add(x)
  build = time.perf_counter() - t0
  t0 = time.perf_counter()
  _, idx = flat.search(q, k)
  return Search(idx, time.perf_counter() - t0, build, float(len(x)))
