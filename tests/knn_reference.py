"""The brute-force kNN reference the search tests compare against."""
import numpy as np


def brute_force(queries, database, dims, k):
  """Per-dim NumPy reference in float64: normalise each prefix, stable full sort.

  Returns scores and indices [D, Q, k]; ties go to the lower index.
  """
  scores, indices = [], []
  for m in dims:
    q = queries[:, :m].astype(np.float64)
    x = database[:, :m].astype(np.float64)
    s = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        x / np.linalg.norm(x, axis=1, keepdims=True)).T
    i = np.argsort(-s, axis=1, kind="stable")[:, :k]  # stable: lower index first on ties
    scores.append(np.take_along_axis(s, i, axis=1))
    indices.append(i)
  return np.stack(scores), np.stack(indices)
