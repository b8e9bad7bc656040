"""kNN with quantised prefixes: int8 and 1-bit (binary) codes at every dim.

For each dim m the prefix x[:m] is L2-normalised first (as everywhere in the
evaluators), then quantised:

* 'int8': symmetric per-coordinate scale from the database,
  s_j = max_i |x_ij| / 127 over the database's normalised prefixes, codes
  c = clip(round(x / s), -127, 127). Queries use the database's scales (a
  query coordinate beyond the range is clipped). A query-row pair scores the
  dot product of the dequantised vectors, sum_j s_j^2 c^q_j c^x_j, with no
  renormalisation: it is what an int8 index computes (an integer dot product
  once s_j^2 is folded into the query), and it differs from the cosine of the
  dequantised vectors only through the small norm errors quantisation adds.
  Scales depend on the prefix, so each dim is quantised and searched on its own.
* 'binary': sign bits, +1 for x >= 0 else -1 (normalisation cannot change a
  sign, so the codes of every prefix nest). For ±1 vectors the dot product is
  m - 2 * Hamming distance and every row has norm sqrt(m), so ranking by
  cosine, by dot and by Hamming similarity agree: one `knn.knn_search` over
  the ±1 vectors serves all dims.
* 'float32': no quantisation (the reference).

Storage per vector at dim m: float32 4m bytes, int8 m bytes (+ 4m bytes of
scales for the whole database), binary ceil(m / 8) bytes.
"""
from __future__ import annotations

from collections.abc import Sequence
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from mrl_jax import prefix
from mrl_jax.evaluators import base
from mrl_jax.evaluators import knn

KINDS = ("float32", "int8", "binary")
_INT8_MAX = 127
_SCORE_BYTES = 256 << 20  # float32 [queries, database] scores held at once (int8 search)


def _check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"quantisation kind={kind!r} must be one of {list(KINDS)}.")
  return kind


def int8_scale(database) -> np.ndarray:
  """[N, m] -> [m] symmetric per-coordinate scales max_i |x_ij| / 127."""
  return np.maximum(np.abs(np.asarray(database, np.float32)).max(0), prefix.NORM_EPS) / _INT8_MAX


def quantize(x, kind: str, *, scale=None) -> np.ndarray:
  """Codes of x [n, m]: int8 in [-127, 127] ('int8', scale [m] default int8_scale(x)),
  int8 ±1 ('binary'), or float32 x itself ('float32')."""
  x = np.asarray(x, np.float32)
  if _check_kind(kind) == "binary":
    return np.where(x >= 0, 1, -1).astype(np.int8)
  if kind == "int8":
    scale = int8_scale(x) if scale is None else np.asarray(scale, np.float32)
    return np.clip(np.rint(x / scale), -_INT8_MAX, _INT8_MAX).astype(np.int8)
  return x


def dequantize(codes, kind: str, *, scale=None) -> np.ndarray:
  """Float32 vectors of `quantize`'s codes ('int8' needs its scale)."""
  codes = np.asarray(codes)
  if _check_kind(kind) == "int8":
    if scale is None:
      raise ValueError("dequantize(kind='int8') needs the scale the codes were made with.")
    return codes.astype(np.float32) * np.asarray(scale, np.float32)
  return codes.astype(np.float32)


def bytes_per_vector(dims: Sequence[int], kind: str) -> dict[int, int]:
  """{dim: bytes one database vector takes} (int8's shared scales not included)."""
  per = {"float32": lambda m: 4 * m, "int8": lambda m: m, "binary": lambda m: -(-m // 8)}
  return {int(m): per[_check_kind(kind)](int(m)) for m in dims}


def _normalised(x, m):
  return prefix.normalize_rows(x[:, :m])


@functools.partial(jax.jit, static_argnames="k")
def _dot_top_k(q, x, k):  # [Qc, m], [N, m] -> [Qc, k] rows; lax.top_k ties go to the lower row
  s = jnp.dot(q, x.T, precision=lax.Precision.HIGHEST)
  return lax.top_k(s, k)[1]


def _int8_search(queries, database, dims, k) -> np.ndarray:
  """[D, Q, k] nearest rows by the int8 dot product at each dim (module docstring)."""
  num_q, n = queries.shape[0], database.shape[0]
  chunk = int(max(1, min(num_q, _SCORE_BYTES // (4 * n))))
  num_pad = -(-num_q // chunk) * chunk  # whole chunks: one compile per dim
  out = []
  for m in dims:
    xn = _normalised(database, m)
    scale = int8_scale(xn)
    db = jnp.asarray(quantize(xn, "int8", scale=scale).astype(np.float32))
    q = quantize(_normalised(queries, m), "int8", scale=scale) * np.square(scale)
    q = np.pad(q, ((0, num_pad - num_q), (0, 0)))
    out.append(np.concatenate([np.asarray(_dot_top_k(jnp.asarray(q[s:s + chunk]), db, k))
                               for s in range(0, num_pad, chunk)])[:num_q])
  return np.stack(out)


def quantized_knn(queries, query_labels, database, db_labels, dims: Sequence[int],
                  kind: str, k: int = 1, **search_kwargs) -> dict[int, float]:
  """{dim: kNN accuracy (1-NN for k = 1, else majority vote)} with quantised prefixes.

  Exact search over the quantised vectors (module docstring). `search_kwargs`
  go to `knn.knn_search` ('float32' and 'binary').
  """
  queries = np.asarray(queries, np.float32)
  database = np.asarray(database, np.float32)
  if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
    raise ValueError(f"quantized_knn needs queries [Q, d] and database [N, d], got "
                     f"{queries.shape} and {database.shape}.")
  dims = knn._check_dims(dims, database.shape[1])  # pylint: disable=protected-access
  k = int(k)
  if not 1 <= k <= database.shape[0]:
    raise ValueError(f"quantized_knn k={k} must be in [1, {database.shape[0]}] (database rows).")
  if _check_kind(kind) == "int8":
    indices = _int8_search(queries, database, dims, k)
  else:
    if kind == "binary":  # ±1 codes, as float32 for the search
      queries, database = (quantize(a, "binary").astype(np.float32) for a in (queries, database))
    _, indices = knn.knn_search(queries, database, dims, k, **search_kwargs)
  return knn.knn_accuracy(indices, db_labels, query_labels, dims, k)


class Quantized(base.Evaluator):
  """knn_top1_<kind> (knn{k}_top1_<kind> for k > 1) with int8 / 1-bit prefixes.

  Options: kinds=['int8', 'binary'], k=1. Section 'quantized':
  {'bytes_per_vector': {kind: {dim: bytes}}} (float32 included for reference).
  """
  splits = ("eval", "train")
  section = "quantized"
  option_names = ("kinds", "k")

  def __init__(self, options, context, field):
    super().__init__(options, context, field)
    kinds = options.get("kinds", ["int8", "binary"])
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
      raise ValueError(f"{field}.kinds={kinds!r} must be a non-empty list of "
                       f"{list(KINDS)}, e.g. ['int8', 'binary'].")
    self.kinds = kinds
    k, num_db = options.get("k", 1), context.num_train
    if not prefix.is_int(k) or k < 1 or (num_db is not None and k > num_db):
      raise ValueError(f"{field}.k={k!r} must be an int in [1, "
                       f"{num_db or 'the train split size'}], e.g. 1.")
    self.k = int(k)

  def run(self, data):
    dims = self.context.eval_dims
    db, q = data.train, data.eval
    metrics = {}
    for kind in self.kinds:
      name = f"knn_top1_{kind}" if self.k == 1 else f"knn{self.k}_top1_{kind}"
      metrics[name] = quantized_knn(q["embedding"], q["label"], db["embedding"],
                                    db["label"], dims, kind, k=self.k)
    sizes = {kind: bytes_per_vector(dims, kind)
             for kind in ["float32"] + [k for k in self.kinds if k != "float32"]}
    return metrics, {"quantized": {"bytes_per_vector": sizes}}
