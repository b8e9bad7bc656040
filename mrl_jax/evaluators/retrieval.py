"""Retrieval metrics at every prefix dim: mAP@k, precision@k and recall@k.

Queries (eval split) retrieve their nearest database rows (train split) with
`knn.knn_search`; a retrieved row is relevant when its label equals the
query's. With rel_i = 1 when the i-th nearest row is relevant and
P@i = (1/i) sum_{j<=i} rel_j, per query:

    AP@k        = (1/k) sum_{i<=k} P@i rel_i
    precision@k = (1/k) sum_{i<=k} rel_i
    recall@k    = sum_{i<=k} rel_i / (database rows with the query's label)

AP@k is normalised by k, not by the number of relevant rows retrieved: the
MRL paper's "corrected" mAP@k, which does not reward retrieving few relevant
rows early and then nothing. A query whose label no database row has scores 0
recall. Each metric is the mean over queries.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mrl_jax.evaluators import base
from mrl_jax.evaluators import knn

DEFAULT_KS = base.DEFAULT_KS
check_ks = base.check_ks


def retrieval_metrics(indices, db_labels, query_labels, dims: Sequence[int],
                      ks: Sequence[int] = DEFAULT_KS, *, query_mask=None,
                      db_mask=None, query_chunk: int = 4096) -> dict[str, dict[int, float]]:
  """{'map@k' | 'precision@k' | 'recall@k': {dim: value}} for every k in ks.

  Args:
    indices: [D, Q, >= max(ks)] database rows from `knn.knn_search`, nearest
      first; -1 (no row) is never relevant.
    db_labels: [N] labels of the database rows.
    query_labels: [Q] labels of the queries.
    dims: the D prefix dims, in the order of `indices`.
    ks: cut-offs; each <= indices.shape[-1].
    query_mask: optional [Q]; queries with 0 (padding) are not averaged.
    db_mask: optional [N]; rows with 0 (padding) do not count as relevant
      rows in recall's denominator.
    query_chunk: queries per NumPy step (bounds memory at D x chunk x k).
  """
  indices = np.asarray(indices)
  db_labels, query_labels = np.asarray(db_labels), np.asarray(query_labels)
  dims = [int(m) for m in dims]
  if indices.ndim != 3 or indices.shape[0] != len(dims):
    raise ValueError(f"indices must be [D, Q, k] with D = len(dims) = {len(dims)} "
                     f"(dims={dims}), got shape {indices.shape}.")
  if query_labels.shape != (indices.shape[1],):
    raise ValueError(f"query_labels has shape {query_labels.shape}, indices has "
                     f"{indices.shape[1]} queries.")
  ks = check_ks(ks, indices.shape[-1])
  kmax = ks[-1]
  valid_q = (np.ones(indices.shape[1], bool) if query_mask is None
             else np.asarray(query_mask).astype(bool))
  valid_db = (np.ones(db_labels.shape, bool) if db_mask is None
              else np.asarray(db_mask).astype(bool))
  # Database rows with each query's label (0 when no row has it).
  count_of = dict(zip(*(a.tolist() for a in np.unique(db_labels[valid_db], return_counts=True))))
  num_relevant = np.array([count_of.get(y, 0) for y in query_labels.tolist()], np.int64)
  ranks = np.arange(1, kmax + 1)
  sums = {f"{metric}@{k}": np.zeros(len(dims))
          for metric in ("map", "precision", "recall") for k in ks}
  for start in range(0, indices.shape[1], query_chunk):
    sl = slice(start, start + query_chunk)
    idx = indices[:, sl, :kmax]
    rel = (idx >= 0) & (db_labels[np.maximum(idx, 0)] == query_labels[sl, None])  # [D, q, k]
    hits = np.cumsum(rel, axis=-1)  # relevant rows among the first i
    ap_terms = np.cumsum(np.where(rel, hits / ranks, 0.0), axis=-1)
    weight = valid_q[sl].astype(np.float64)  # [q]
    recall_den = np.maximum(num_relevant[sl], 1)
    for k in ks:
      sums[f"map@{k}"] += (ap_terms[..., k - 1] / k) @ weight
      sums[f"precision@{k}"] += (hits[..., k - 1] / k) @ weight
      sums[f"recall@{k}"] += (hits[..., k - 1] / recall_den) @ weight
  total = max(int(valid_q.sum()), 1)
  return {name: {m: float(v) / total for m, v in zip(dims, s)} for name, s in sums.items()}


def knn_retrieval(queries, query_labels, database, db_labels, dims: Sequence[int],
                  ks: Sequence[int] = DEFAULT_KS, *, query_mask=None, db_mask=None,
                  **search_kwargs) -> dict[str, dict[int, float]]:
  """Exact search for the max(ks) nearest rows, then `retrieval_metrics`."""
  ks = check_ks(ks, int(np.asarray(db_labels).shape[0]))
  _, indices = knn.knn_search(queries, database, dims, ks[-1], db_mask=db_mask,
                              **search_kwargs)
  return retrieval_metrics(indices, db_labels, query_labels, dims, ks,
                           query_mask=query_mask, db_mask=db_mask)


class Retrieval(base.Evaluator):
  """map@k (AP normalised by k), precision@k, recall@k for option ks=[10, ...]:
  eval-split queries against the train split, relevant = same label."""
  splits = ("eval", "train")
  option_names = ("ks",)

  def __init__(self, options, context, field):
    super().__init__(options, context, field)
    self.ks = check_ks(options.get("ks", DEFAULT_KS), context.num_train, field=f"{field}.ks")

  @property
  def neighbours(self):
    return self.ks[-1]

  def run(self, data):
    dims = self.context.eval_dims
    return retrieval_metrics(data.neighbours(dims, self.ks[-1]), data.train["label"],
                             data.eval["label"], dims, self.ks)
