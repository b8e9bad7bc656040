"""Orbax checkpoints: the train state and the Grain iterator, saved together.

Both items of a step are committed atomically by Orbax (written to a temporary
directory, renamed when complete), so a run killed mid-save resumes from the
previous complete step. The Grain iterator state is a few bytes per process,
which is what makes the resume exact: the restarted run sees the same examples
the uninterrupted run would have seen.
"""
from __future__ import annotations

from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import orbax.checkpoint as ocp


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each leaf's sharding: the restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
  """A CheckpointManager holding items 'state' (pytree) and 'data' (Grain)."""

  def __init__(self, directory: epath.PathLike, *, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = epath.Path(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            # Keep more than one so a bad last save never leaves us with none.
            max_to_keep=max(2, max_to_keep),
            enable_async_checkpointing=async_save,
            create=True,
        ),
        item_names=("state", "data"),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any = None, *,
           force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Saving checkpoint for step %d in %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
    """Restores the state (shaped and sharded like `abstract_state`).

    The data iterator, when given, is restored in place.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored checkpoint of step %d from %s", step, self.directory)
    return restored["state"]

  def wait_until_finished(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
