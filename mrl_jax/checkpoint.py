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


def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/blocks/0/mlp/fc1/kernel': shape} for arrays and metadata alike.

  nnx Variables contribute a trailing 'value' key that the saved tree spells
  the same way, so live states and checkpoint metadata compare directly.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  for path, leaf in leaves:
    names = [_key_name(k) for k in path]
    if names and names[-1] == "value":
      names = names[:-1]
    out["/".join(names)] = tuple(getattr(leaf, "shape", ()))
  return out


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
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
        },
    )
    self._partial_reader = None

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

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None, *,
              partial: bool = False) -> Any:
    """Restores the state (shaped and sharded like `abstract_state`).

    The data iterator, when given, is restored in place. With `partial`,
    `abstract_state` holds some of the saved state's top-level entries (e.g.
    params and model state, no optimizer state) and only those are read.
    """
    if partial:
      restored = self._reader().restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=abstract_state, partial_restore=True,
              restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))))
      logging.info("Restored %s of step %d from %s", "/".join(abstract_state), step,
                   self.directory)
      return restored["state"]
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored checkpoint of step %d from %s", step, self.directory)
    return restored["state"]

  def restore_latest(self, abstract_state: Any, data_iterator: Any = None, *,
                     partial: bool = False) -> tuple[int | None, Any]:
    """(step, state) of the newest restorable checkpoint, or (None, None).

    A checkpoint that cannot be read (a partial copy, a truncated file) is
    renamed `STEP.corrupt` with a warning and the previous one is tried; good
    checkpoints are never removed. A checkpoint that reads fine but does not
    match `abstract_state` (another model or nesting config) is an error.
    `partial` as in `restore`.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        metadata = self._manager.item_metadata(step)["state"]
        saved = _flat_shapes(metadata.tree)
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      if partial:  # compare the entries asked for only
        saved = {p: v for p, v in saved.items() if p.split("/")[0] in abstract_state}
      self._check_compatible(step, saved, abstract_state)
      try:
        return step, self.restore(step, abstract_state, data_iterator, partial=partial)
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
    return None, None

  def _check_compatible(self, step: int, saved: dict[str, tuple[int, ...]],
                        abstract_state: Any) -> None:
    wanted = _flat_shapes(abstract_state)
    # Parameters first: the most telling mismatch to report.
    order = sorted(wanted, key=lambda p: (not p.startswith("params/"),))
    fix = (f"Fix: train with the config saved next to it "
           f"({self.directory.parent / 'config.json'}), or use a new --workdir.")
    for path in order:
      if path not in saved:
        raise ValueError(
            f"The checkpoint of step {step} in {self.directory} does not match the "
            f"config: it has no {path} (shape {wanted[path]} under this config). {fix}")
      if tuple(saved[path]) != tuple(wanted[path]):
        raise ValueError(
            f"The checkpoint of step {step} in {self.directory} does not match the "
            f"config: {path} has shape {tuple(saved[path])} in the checkpoint but "
            f"{tuple(wanted[path])} under this config. {fix}")
    extra = sorted(set(saved) - set(wanted))
    if extra:
      raise ValueError(
          f"The checkpoint of step {step} in {self.directory} does not match the "
          f"config: it has {extra[0]} (shape {tuple(saved[extra[0]])}), which this "
          f"config's model does not. {fix}")

  def _set_aside(self, step: int, error: Exception) -> None:
    logging.warning("Checkpoint of step %d in %s is unreadable (%s: %s); set aside "
                    "as %d.corrupt, trying the previous one.", step, self.directory,
                    type(error).__name__, str(error).splitlines()[0][:200], step)
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst = self.directory / f"{step}.corrupt"
      n = 1
      while dst.exists():
        n += 1
        dst = self.directory / f"{step}.corrupt{n}"
      src.rename(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self._manager.reload()
    if self._partial_reader is not None:
      self._partial_reader.reload()

  def _reader(self) -> ocp.CheckpointManager:
    # Partial restores need the PyTree handler's `partial_restore`; it reads
    # what the standard handler wrote.
    if self._partial_reader is None:
      self._partial_reader = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(read_only=True),
          item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    return self._partial_reader

  def wait_until_finished(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
    if self._partial_reader is not None:
      self._partial_reader.close()
