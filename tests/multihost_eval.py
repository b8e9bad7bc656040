"""Run by tests/test_multihost.py in two processes: the evaluation's
process-local pieces (kNN search on each process's own rows, `Split`
gathers, summed counts) against what one process computes.

    python -m tests.multihost_eval COORDINATOR PROCESS_ID OUT.npz
"""
import sys

import jax
import numpy as np

from mrl_jax.evaluators import base
from mrl_jax.evaluators import knn


def data():
  """Queries and database with exact duplicates that fall in both processes' rows."""
  rng = np.random.default_rng(0)
  database = rng.normal(size=(300, 16)).astype(np.float32)
  database[250:260] = database[10:20]  # process 1 holds copies of process 0's rows
  database[280] = database[5] * 3.0     # the same direction: an exact cosine tie
  queries = rng.normal(size=(45, 16)).astype(np.float32)
  queries[:10] = database[10:20]  # their nearest rows are tied across the processes
  return queries, database


# Uneven contiguous slices: process 0 holds fewer rows than process 1.
DB_SPLIT, Q_SPLIT = 137, 19


def main(coordinator: str, process_id: int, out: str):
  jax.distributed.initialize(coordinator, 2, process_id)
  queries, database = data()
  mine = slice(0, DB_SPLIT) if process_id == 0 else slice(DB_SPLIT, None)
  my_q = slice(0, Q_SPLIT) if process_id == 0 else slice(Q_SPLIT, None)
  results = {}
  for k in (1, 100):
    scores, indices = knn.knn_search(queries[my_q], database[mine], [4, 8, 16], k,
                                     process_local=True)
    results[f"scores_{k}"], results[f"indices_{k}"] = scores, indices
  counts = [DB_SPLIT, 300 - DB_SPLIT]
  split = base.Split({"embedding": database[mine], "label": np.arange(300)[mine],
                      "logits": np.arange(300 * 6).reshape(2, 300, 3)[:, mine]}, counts)
  results["gathered_embedding"] = split["embedding"]
  results["gathered_logits"] = split["logits"]
  results["summed"] = base.process_sum(np.array([1, process_id]))
  if process_id == 0:
    np.savez(out, **results)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
