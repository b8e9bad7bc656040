"""Orbax checkpoints: the train state and the Grain iterator, saved together.

Both items of a step are committed atomically by Orbax (written to a temporary
directory, renamed when complete), so a run killed mid-save resumes from the
previous complete step. The Grain iterator state is a few bytes per process,
which is what makes the resume exact: the restarted run sees the same examples
the uninterrupted run would have seen.

What is never lost:
* Nothing non-finite is saved: `save` checks the whole state on device first
  (one reduction) and raises `NonFiniteState` instead.
* Every saved array carries a fingerprint (two wrapping uint32 sums of its
  bits, the second weighted by position: exact on any mesh), written with
  the step. A restore recomputes them and checks finiteness, so bytes that
  changed on disk are caught even when the storage layer reads them
  without complaint.
* A step is set aside (renamed `STEP.corrupt`) only when its bytes are
  positively bad: a fingerprint mismatch, non-finite values, garbled or
  missing files (`is_corruption`). Anything else (permissions, I/O, memory,
  a changed input pipeline) is raised with the checkpoint untouched. All
  processes agree before anything is renamed, the last remaining step is
  never set aside, and a read-only checkpointer (eval, embed) renames
  nothing.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class NonFiniteState(FloatingPointError):
  """The state to save has NaN or Inf values; nothing was written."""


class CorruptCheckpoint(Exception):
  """A checkpoint's bytes are bad: restored values differ from what was saved."""


class RestoreError(RuntimeError):
  """A checkpoint could not be restored for a reason other than its bytes."""


class ConfigMismatch(ValueError):
  """A checkpoint reads fine but holds another model (or nesting) than the config's."""


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each leaf's sharding: the restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path) -> str:
  """A tree path as 'blocks/0/mlp/fc1/kernel' (an nnx Variable's trailing
  'value' dropped): the names regex-keyed policies and importers match."""
  names = [_key_name(k) for k in path]
  if names and names[-1] == "value":
    names = names[:-1]
  return "/".join(names)


def flatten(tree: Any) -> dict[str, Any]:
  """{'params/blocks/0/mlp/fc1/kernel': leaf} for arrays and metadata alike.

  nnx Variables contribute a trailing 'value' key that the saved tree spells
  the same way, so live states and checkpoint metadata compare directly.
  """
  return {path_name(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {p: tuple(getattr(leaf, "shape", ())) for p, leaf in flatten(tree).items()}


# ----------------------------------------------------------------------------
# Fingerprints and finiteness, computed on device.
# ----------------------------------------------------------------------------
def _bits(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (8-byte types: two per element, last axis)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 8:
    return lax.bitcast_convert_type(x, jnp.uint32)
  uint = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[size]
  return lax.bitcast_convert_type(x, uint).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
  """[2] uint32: sum of the words and their position-weighted sum, mod 2**32.

  Integer sums wrap exactly, so the result does not depend on the sharding or
  the reduction order; the weights (an odd multiplier of the row-major
  position, plus one) make moved or swapped bytes count too.
  """
  w = _bits(x)
  pos = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):  # row-major position, no reshape of a sharded array
    pos = pos + lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= w.shape[axis]
  weight = pos * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * weight, dtype=jnp.uint32)])


@jax.jit
def _summary(tree):
  """(fingerprints {path: [2] uint32}, all values finite) in one program."""
  flat = flatten(tree)
  finite = jnp.array(True)
  for x in flat.values():
    if jnp.issubdtype(x.dtype, jnp.inexact):
      finite = finite & jnp.all(jnp.isfinite(x))
  return {p: _fingerprint(x) for p, x in flat.items()}, finite


def summary(tree) -> tuple[dict[str, list[int]], bool]:
  """({path: [sum, weighted sum]} as ints, whether every float value is finite)."""
  prints, finite = jax.device_get(_summary(tree))
  return {p: [int(v) for v in np.asarray(fp)] for p, fp in prints.items()}, bool(finite)


# ----------------------------------------------------------------------------
# What counts as corruption.
# ----------------------------------------------------------------------------
# TensorStore status codes of bytes that are bad or missing ...
_CORRUPT_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND")
# ... and of failures that say nothing about the bytes (may pass, or need a fix elsewhere).
_OTHER_CODES = ("PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                "ABORTED", "CANCELLED", "UNAUTHENTICATED", "UNIMPLEMENTED")
_CODE = re.compile(r"\b(" + "|".join(_CORRUPT_CODES + _OTHER_CODES) + r")\b")
# ... and what TensorStore and its codecs say about bad bytes without a code.
_CORRUPT_MESSAGE = re.compile(
    r"data corruption|corrupt|error decoding|checksum|decompress\w* failed|"
    r"unexpected end of (data|file|input|stream)|truncated|invalid (magic|header)", re.I)


def error_chain(error: BaseException):
  """`error` and the errors it was raised from or during, innermost last."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def is_corruption(error: BaseException) -> bool:
  """Whether `error` (raised reading a checkpoint) positively means its bytes are bad.

  Yes: a fingerprint mismatch or non-finite values (`CorruptCheckpoint`),
  unparsable metadata, a missing file, or a storage error saying so
  (TensorStore's DATA_LOSS, OUT_OF_RANGE, FAILED_PRECONDITION, NOT_FOUND, or a
  codec's "data corruption", "error decoding", "checksum" ...).
  No: everything else, e.g. permissions, I/O, memory, threads, or an input
  pipeline whose state does not fit the saved one.
  """
  errors = list(error_chain(error))
  if any(isinstance(e, (PermissionError, MemoryError)) for e in errors):
    return False
  codes = {c for e in errors for c in _CODE.findall(str(e))}
  if codes & set(_OTHER_CODES):
    return False
  if any(isinstance(e, (CorruptCheckpoint, json.JSONDecodeError, UnicodeDecodeError,
                        FileNotFoundError)) for e in errors):
    return True
  return bool(codes & set(_CORRUPT_CODES)) or any(
      _CORRUPT_MESSAGE.search(str(e)) for e in errors)


_OK, _CORRUPT, _ERROR, _MISMATCH = 0, 1, 2, 3  # the most severe code wins


def _agree(code: int) -> int:
  """The largest code over all processes (one collective)."""
  if jax.process_count() == 1:
    return code
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.int32(code))))


def _attempt(fn) -> tuple[int, Any, BaseException | None]:
  """(code, fn's value, the error) with this process's verdict on `fn()`'s failure."""
  try:
    return _OK, fn(), None
  except ConfigMismatch as e:
    return _MISMATCH, None, e
  except Exception as e:  # pylint: disable=broad-except
    return (_CORRUPT if is_corruption(e) else _ERROR), None, e


def _guarded(handler):
  """`handler`, whose restore keeps its exception (`handler.failure`) instead of raising.

  Orbax ends every restore with a barrier across processes. A handler that
  raised on one process only would skip it and leave the others waiting (or
  pair their next collective with the wrong one), so the error is raised by
  `Checkpointer._read` after the barrier, and all processes decide together.
  """
  def restore(*args, **kwargs):
    try:
      return type(handler).restore(handler, *args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      handler.failure = e
      return None
  handler.failure = None
  handler.restore = restore
  return handler


class Checkpointer:
  """A CheckpointManager holding items 'state' (pytree), 'data' (Grain) and
  'fingerprint' (JSON: every array's fingerprint)."""

  def __init__(self, directory: epath.PathLike, *, max_to_keep: int = 3,
               async_save: bool = True, read_only: bool = False):
    self.directory = epath.Path(directory)
    self.read_only = read_only
    self._handlers = {
        "state": _guarded(ocp.StandardCheckpointHandler()),
        "data": _guarded(grain.checkpoint.CheckpointHandler()),
        "fingerprint": _guarded(ocp.JsonCheckpointHandler()),
    }
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            # Keep more than one so a bad last save never leaves us with none.
            max_to_keep=max(2, max_to_keep),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        ),
        item_handlers=self._handlers,
    )
    self._partial_reader = None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any = None, *,
           force: bool = False) -> bool:
    """Saves `state` (and the iterator) as `step`; raises `NonFiniteState` instead
    of writing a state with NaN or Inf values."""
    prints, finite = summary(state)
    if not finite:
      raise NonFiniteState(f"the train state of step {step} has NaN or Inf values")
    self._check_space(step, state)
    items = {"state": ocp.args.StandardSave(state), "fingerprint": ocp.args.JsonSave(prints)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("Saving checkpoint for step %d in %s", step, self.directory)
    return saved

  def _check_space(self, step: int, state: Any) -> None:
    """Raises ENOSPC before a save that cannot fit on a local disk.

    A save that runs out of space midway fails in Orbax's writer threads, one
    logged traceback per array, before the error reaches the loop; checking
    first stops cleanly with one message. All processes decide together.
    """
    # The arrays, plus metadata, iterator states and file-system blocks.
    needed = int(1.1 * sum(int(x.nbytes) for x in jax.tree.leaves(state))) + 2**20
    free = None
    if "://" not in str(self.directory):
      self._manager.wait_until_finished()  # the previous save's files count (Orbax waits too)
      path = pathlib.Path(self.directory)
      while not path.exists():
        path = path.parent
      free = shutil.disk_usage(path).free
    if _agree(int(free is not None and free < needed)):
      raise OSError(errno.ENOSPC, f"No space left on device for the checkpoint of step "
                    f"{step}: it needs {needed / 2**20:.1f} MiB, {self.directory} has "
                    f"{(free or 0) / 2**20:.1f} MiB free")

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None, *,
              partial: bool = False) -> Any:
    """Restores the state (shaped and sharded like `abstract_state`) and verifies it.

    The data iterator, when given, is restored in place. With `partial`,
    `abstract_state` holds some of the saved state's top-level entries (e.g.
    params and model state, no optimizer state) and only those are read.
    Raises `CorruptCheckpoint` when the restored values are not those saved.
    """
    state = self._read(step, abstract_state, data_iterator, partial=partial)
    self._verify(step, state)
    return state

  def _read(self, step: int, abstract_state: Any, data_iterator: Any = None, *,
            partial: bool = False) -> Any:
    if partial:
      manager, handlers = self._reader()
      items = {"state": ocp.args.PyTreeRestore(
          item=abstract_state, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    else:
      manager, handlers = self._manager, self._handlers
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    for name in items:
      handlers[name].failure = None
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    for name in items:  # raised now: past Orbax's barrier on every process
      if handlers[name].failure is not None:
        raise handlers[name].failure
    return restored["state"]

  def _verify(self, step: int, state: Any) -> None:
    prints, finite = summary(state)  # a collective: every process gets here
    saved = None
    if (self.directory / str(step) / "fingerprint").exists():
      saved = self._read_fingerprints(step)
    if not finite:
      raise CorruptCheckpoint(f"step {step} restored NaN or Inf values, which are never saved")
    if saved is None:  # written by a version without fingerprints
      logging.warning("Checkpoint of step %d has no fingerprints; not verified.", step)
      return
    bad = sorted(p for p, fp in prints.items() if p in saved and saved[p] != fp)
    if bad:
      raise CorruptCheckpoint(
          f"step {step}: {len(bad)} restored array(s) differ from what was saved "
          f"(fingerprint mismatch; first: {bad[0]})")

  def _read_fingerprints(self, step: int) -> dict[str, list[int]]:
    handler = self._handlers["fingerprint"]
    handler.failure = None
    saved = self._manager.restore(step, args=ocp.args.Composite(
        fingerprint=ocp.args.JsonRestore()))["fingerprint"]
    if handler.failure is not None:
      raise handler.failure
    return saved

  def restore_latest(self, abstract_state: Any, data_iterator: Any = None, *,
                     partial: bool = False) -> tuple[int | None, Any]:
    """(step, state) of the newest good checkpoint, or (None, None) if there is none.

    A step whose bytes are bad (`is_corruption`) is set aside as
    `STEP.corrupt` with a warning (a read-only checkpointer only skips it)
    and the previous one is tried. Any other failure raises `RestoreError`
    with the step untouched. A checkpoint that reads fine but does not
    match `abstract_state` (another model or nesting config) is a
    `ConfigMismatch`. When every remaining step is corrupt, this refuses
    (`CorruptCheckpoint`) instead of starting over. Each stage (metadata,
    read, verification) ends with one collective in which all processes
    agree on the outcome, so every host resumes from the same step even
    when only one of them reads a step wrong. `partial` as in `restore`.
    """
    self._warn_dangling()
    steps = sorted(self.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      state = None
      stages = (
          lambda: self._check_metadata(step, abstract_state, partial),
          lambda: self._read(step, abstract_state, data_iterator, partial=partial),
          lambda: self._verify(step, state),
      )
      for stage in stages:
        code, value, error = _attempt(stage)
        agreed = _agree(code)
        if agreed != _OK:
          break
        state = state if value is None else value
      else:
        logging.info("Restored %s of step %d from %s",
                     "/".join(abstract_state) if partial else "the checkpoint", step,
                     self.directory)
        return step, state
      if agreed == _MISMATCH:
        raise error if code == _MISMATCH else ConfigMismatch(
            f"Another process found that the checkpoint of step {step} in "
            f"{self.directory} does not match the config (see its log).")
      if agreed == _ERROR:
        raise RestoreError(self._error_message(step, error if code == _ERROR else None)
                           ) from error
      reason = _first_line(error) if error is not None else "another process found it corrupt"
      if i == len(steps) - 1:
        raise CorruptCheckpoint(
            f"The checkpoint of step {step} in {self.directory} is corrupt ({reason}) and "
            "no earlier one is left; not starting over from step 0 while checkpoints "
            f"exist. Fix: if it cannot be recovered, move {self.directory} aside (or use "
            "a new --workdir) to train from scratch.") from error
      self._set_aside(step, reason)
    return None, None

  def _warn_dangling(self) -> None:
    if "://" in str(self.directory) or not self.directory.exists():
      return
    for entry in pathlib.Path(self.directory).iterdir():
      if entry.is_symlink() and not entry.exists():
        logging.warning("%s is a symlink to %s, which does not exist; it is not a "
                        "checkpoint and is ignored.", entry, os.readlink(entry))

  def saved_tree(self, step: int) -> Any:
    """The tree of the state saved at `step`, with array metadata (shape, dtype) as leaves."""
    return self._manager.item_metadata(step)["state"].tree

  def _check_metadata(self, step: int, abstract_state: Any, partial: bool) -> None:
    saved = _flat_shapes(self.saved_tree(step))
    if partial:  # compare the entries asked for only
      saved = {p: v for p, v in saved.items() if p.split("/")[0] in abstract_state}
    self._check_compatible(step, saved, abstract_state)

  def _error_message(self, step: int, error: BaseException | None) -> str:
    what = ("another process failed to read it" if error is None
            else f"{type(error).__name__}: {_first_line(error)}")
    return (
        f"Could not restore the checkpoint of step {step} in {self.directory} ({what}). "
        "It is left untouched: this is not a sign that its bytes are bad. Check "
        "permissions, storage access and memory and re-run; if the config's input "
        "pipeline changed (e.g. config.input.worker_count), resume with the saved "
        f"values ({self.directory.parent / 'config.json'}).")

  def _check_compatible(self, step: int, saved: dict[str, tuple[int, ...]],
                        abstract_state: Any) -> None:
    wanted = _flat_shapes(abstract_state)
    # Parameters first: the most telling mismatch to report.
    order = sorted(wanted, key=lambda p: (not p.startswith("params/"),))
    fix = (f"Fix: train with the config saved next to it "
           f"({self.directory.parent / 'config.json'}), or use a new --workdir.")
    for path in order:
      if path not in saved:
        raise ConfigMismatch(
            f"The checkpoint of step {step} in {self.directory} does not match the "
            f"config: it has no {path} (shape {wanted[path]} under this config). {fix}")
      if tuple(saved[path]) != tuple(wanted[path]):
        raise ConfigMismatch(
            f"The checkpoint of step {step} in {self.directory} does not match the "
            f"config: {path} has shape {tuple(saved[path])} in the checkpoint but "
            f"{tuple(wanted[path])} under this config. {fix}")
    extra = sorted(set(saved) - set(wanted))
    if extra:
      raise ConfigMismatch(
          f"The checkpoint of step {step} in {self.directory} does not match the "
          f"config: it has {extra[0]} (shape {tuple(saved[extra[0]])}), which this "
          f"config's model does not. {fix}")

  def _set_aside(self, step: int, reason: str) -> None:
    if self.read_only:
      logging.warning("Checkpoint of step %d in %s is corrupt (%s); skipped (left in "
                      "place), trying the previous one.", step, self.directory, reason)
      return
    logging.warning("Checkpoint of step %d in %s is corrupt (%s); set aside as "
                    "%d.corrupt, trying the previous one.", step, self.directory, reason, step)
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
      self._partial_reader[0].reload()

  def _reader(self) -> tuple[ocp.CheckpointManager, dict[str, Any]]:
    # Partial restores need the PyTree handler's `partial_restore`; it reads
    # what the standard handler wrote.
    if self._partial_reader is None:
      handlers = {"state": _guarded(ocp.PyTreeCheckpointHandler())}
      self._partial_reader = (ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(read_only=True),
          item_handlers=handlers), handlers)
    return self._partial_reader

  def wait_until_finished(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
    if self._partial_reader is not None:
      self._partial_reader[0].close()


def _first_line(error: BaseException) -> str:
  return (str(error).splitlines() or [""])[0][:300]
