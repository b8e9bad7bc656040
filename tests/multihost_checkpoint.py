"""Run by tests/test_multihost.py in two processes: a checkpoint that only one
process finds bad (process 1 reads step 2 wrong) must be decided the same way
on both, and an error on one process must stop both with nothing renamed.

    python -m tests.multihost_checkpoint COORDINATOR PROCESS_ID DIR {corrupt|error} OUT.json
"""
import json
import sys

import jax
import numpy as np

from mrl_jax import checkpoint


def state():
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  w = np.arange(8 * 64, dtype=np.float32).reshape(8, 64)
  return {"params": {"w": jax.make_array_from_callback(w.shape, sharding, lambda i: w[i])}}


def main(coordinator: str, process_id: int, directory: str, failure: str, out: str):
  jax.distributed.initialize(coordinator, 2, process_id)
  ckpt = checkpoint.Checkpointer(directory, async_save=False)
  for step in (1, 2):
    ckpt.save(step, state())
  ckpt.wait_until_finished()
  if process_id == 1:  # only this process reads step 2 wrong (at the Orbax read boundary)
    restore = checkpoint.ocp.StandardCheckpointHandler.restore

    def misread(self, directory, *args, **kwargs):
      if directory.parent.name == "2":
        if failure == "corrupt":
          raise ValueError("DATA_LOSS: Error reading chunk: checksum mismatch")
        raise PermissionError(13, "Permission denied")
      return restore(self, directory, *args, **kwargs)
    checkpoint.ocp.StandardCheckpointHandler.restore = misread
  try:
    step, restored = ckpt.restore_latest(checkpoint.abstract_like(state()))
    result = {"step": step, "equal": bool(np.array_equal(
        np.asarray(restored["params"]["w"].addressable_shards[0].data),
        np.asarray(state()["params"]["w"].addressable_shards[0].data)))}
  except checkpoint.RestoreError as e:
    result = {"error": str(e)}
  ckpt.close()
  with open(f"{out}.{process_id}", "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
