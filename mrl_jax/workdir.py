"""The workdir: one writer at a time, checked before anything is written, and a
config history that keeps the original.

* `prepare` turns a bad --workdir (a regular file, a read-only directory) into
  one clear error before any compute.
* `Lease` is the lock: WORKDIR/LOCK names the run that trains there (host,
  pid, start time) and carries a heartbeat that process 0 refreshes every
  `heartbeat_s`. Every write is conditional on the object's storage
  generation (TensorStore's kvstore: a lock file on local disks, generation
  preconditions on `gs://`), so two runs that start together cannot both
  win, and a run whose lease was taken over finds out at its next heartbeat
  and stops before it saves again. A lease is stale when its heartbeat is
  older than `stale_s`, or at once when its holder was a process on this
  host (same boot) that no longer exists; `force=True` (`--force`) takes it
  regardless, for when the other run is known to be dead.
* `save_config` writes `config.json` once, when training actually starts, and
  never overwrites it: a resume with different (compatible) values adds
  `config.STEP.json` beside it, STEP being the step it resumed from.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
import tensorstore as ts

from mrl_jax import checkpoint


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir's lease."""


def prepare(workdir: epath.Path) -> None:
  """Creates `workdir` if needed; a file or an unwritable directory is a ValueError."""
  if "://" in str(workdir):
    workdir.mkdir(parents=True, exist_ok=True)  # object stores: the lease write checks access
    return
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir={workdir} is a file, not a directory. Fix: pass a "
                     "directory (it is created if missing).")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--workdir={workdir} cannot be created ({e.strerror or e}). Fix: "
                     "pass a directory you can write to.") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f"--workdir={workdir} is not writable. Fix: pass a directory you "
                     "can write to.")


# ----------------------------------------------------------------------------
# The lease.
# ----------------------------------------------------------------------------
def _boot_id() -> str:
  try:
    return epath.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
  except OSError:
    return ""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _kvstore(directory: epath.Path) -> ts.KvStore:
  url = str(directory).rstrip("/") + "/"
  return ts.KvStore.open(url if "://" in url else {"driver": "file", "path": url}).result()


class Lease:
  """WORKDIR/LOCK, held by process 0 for as long as a run trains in WORKDIR.

  Use as a context manager on every process: all of them agree (one
  broadcast) on whether process 0 got it, so a refused run stops everywhere.
  """

  NAME = "LOCK"

  def __init__(self, workdir: epath.Path, *, force: bool = False,
               heartbeat_s: float = 30.0, stale_s: float = 300.0):
    if stale_s <= heartbeat_s:
      raise ValueError(f"stale_s={stale_s} must exceed heartbeat_s={heartbeat_s}.")
    self.path = workdir / self.NAME
    self.force, self.heartbeat_s, self.stale_s = force, heartbeat_s, stale_s
    self._store = None
    self._generation = None
    self._record: dict[str, Any] = {}
    self._stop = threading.Event()
    self._thread = None
    self.lost: str | None = None  # why the lease was lost, once it is

  # -- process 0 ------------------------------------------------------------
  def _read(self):
    result = self._store.read(self.NAME).result()
    if result.state != "value":
      return None, result.stamp.generation
    try:
      holder = json.loads(result.value)
    except (json.JSONDecodeError, UnicodeDecodeError):
      holder = {}  # a torn or foreign file: treated as stale below
    return holder, result.stamp.generation

  def _stale(self, holder: dict[str, Any]) -> str | None:
    """Why `holder`'s lease no longer counts, or None while it does."""
    if not holder.get("heartbeat"):
      return "it is unreadable"
    age = time.time() - float(holder["heartbeat"])
    if age > self.stale_s:
      return f"its last heartbeat is {age:.0f} s old (stale after {self.stale_s:.0f} s)"
    if (holder.get("host") == socket.gethostname() and holder.get("boot_id") == _boot_id()
        and not _alive(int(holder.get("pid", -1)))):
      return f"its process {holder.get('pid')} on this host has exited"
    return None

  def _write(self, record: dict[str, Any], if_equal: bytes) -> bytes | None:
    """Writes `record` if LOCK's generation is `if_equal`; the new generation or None."""
    stamp = self._store.write(self.NAME, json.dumps(record, indent=1).encode(),
                              if_equal=if_equal).result()
    return stamp.generation or None

  def _acquire(self) -> None:
    self._store = _kvstore(self.path.parent)
    now = time.time()
    self._record = dict(host=socket.gethostname(), pid=os.getpid(), boot_id=_boot_id(),
                        run_id=uuid.uuid4().hex, started=now, heartbeat=now,
                        started_utc=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)))
    for _ in range(3):  # a lost race re-reads once; a third loss is a live competitor
      holder, generation = self._read()
      if holder is not None:
        why = "--force" if self.force else self._stale(holder)
        if why is None:
          raise WorkdirLocked(self._refusal(holder))
        logging.warning("Taking over the lease on %s from %s (%s).", self.path,
                        _describe(holder), why)
      self._generation = self._write(self._record, generation)
      if self._generation:
        break
    else:
      raise WorkdirLocked(f"Another run keeps rewriting {self.path}; not starting a "
                          "second writer in this workdir.")
    self._thread = threading.Thread(target=self._beat, name="workdir-lease", daemon=True)
    self._thread.start()

  def _refusal(self, holder: dict[str, Any]) -> str:
    age = time.time() - float(holder["heartbeat"])
    return (f"{self.path.parent} is in use by another run: {_describe(holder)}, last "
            f"heartbeat {age:.0f} s ago. Two runs in one workdir overwrite each other's "
            "checkpoints. Fix: wait for it to finish, or use another --workdir; if that run "
            f"is dead (e.g. its host went away), re-run with --force, or wait "
            f"{self.stale_s:.0f} s after its last heartbeat.")

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      record = dict(self._record, heartbeat=time.time())
      try:
        generation = self._write(record, self._generation)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not refresh the lease on %s (%s); retrying.", self.path, e)
        continue
      if generation is None:
        holder, _ = self._read()
        self.lost = (f"the lease on {self.path.parent} was taken over by "
                     f"{_describe(holder or {})}")
        logging.error("Workdir lease lost: %s. This run stops before its next save.",
                      self.lost)
        return
      self._generation = generation

  def _release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._generation and self.lost is None:
      try:  # only our own lease: conditional on the generation we wrote
        self._store.write(self.NAME, None, if_equal=self._generation).result()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not release the lease on %s (%s); it goes stale in %.0f s.",
                        self.path, e, self.stale_s)

  # -- every process --------------------------------------------------------
  def __enter__(self) -> Lease:
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except WorkdirLocked as e:
        error = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      refused = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
      if refused and error is None:
        error = WorkdirLocked(f"{self.path.parent} is in use by another run (see process "
                              "0's log for which one).")
    if error is not None:
      raise error
    return self

  def __exit__(self, *exc) -> None:
    if jax.process_index() == 0:
      self._release()

  def check(self) -> None:
    """Raises `WorkdirLocked` once another run has taken the lease over."""
    if self.lost is not None:
      raise WorkdirLocked(f"Stopping without saving: {self.lost}.")


def _describe(holder: dict[str, Any]) -> str:
  if not holder:
    return "an unknown run"
  return (f"pid {holder.get('pid')} on {holder.get('host')}, started "
          f"{holder.get('started_utc', '?')}")


# ----------------------------------------------------------------------------
# The config history.
# ----------------------------------------------------------------------------
def saved_config(workdir: epath.Path) -> dict[str, Any] | None:
  """The run's original config (WORKDIR/config.json), or None if there is none."""
  path = workdir / "config.json"
  return json.loads(path.read_text()) if path.exists() else None


def save_config(workdir: epath.Path, config, step: int) -> epath.Path | None:
  """Records the config training starts (or resumes at `step`) with; the file written.

  `config.json` is written once and kept; a resume whose values differ writes
  `config.STEP.json` and logs the changed fields. Nothing is written when the
  config is the saved one.
  """
  text = config.to_json_best_effort(indent=2)
  original = saved_config(workdir)
  if original is None:
    path = workdir / "config.json"
  else:
    changed = _changed(original, json.loads(text))
    if not changed:
      return None
    path = workdir / f"config.{step}.json"
    logging.warning("Resuming at step %d with a config that differs from %s in %s; "
                    "written to %s.", step, workdir / "config.json", ", ".join(changed), path)
  path.write_text(text)
  return path


def _changed(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for key in sorted(set(a) | set(b)):
      out += _changed(a.get(key), b.get(key), f"{prefix}{key}.")
    return out
  return [] if a == b else [prefix.rstrip(".")]


# ----------------------------------------------------------------------------
# A full disk.
# ----------------------------------------------------------------------------
class DiskFull(RuntimeError):
  """The workdir's storage ran out of space; the message names the last checkpoint."""


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or one it was raised from) is "No space left on device"."""
  return any((isinstance(e, OSError) and e.errno == errno.ENOSPC)
             or "No space left on device" in str(e)
             for e in checkpoint.error_chain(error))


def disk_full(workdir: epath.Path, checkpoints: epath.Path, error: BaseException) -> DiskFull:
  """The one error a run stops with when its storage is full: what survived, what to do."""
  steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if (
      checkpoints.exists()) else []
  state = (f"the last complete checkpoint is step {steps[-1]} in {checkpoints}" if steps
           else "no checkpoint was completed")
  detail = next((str(e.strerror or e) for e in checkpoint.error_chain(error)
                 if isinstance(e, OSError) and e.errno == errno.ENOSPC), None)
  return DiskFull(f"No space left on device writing to {workdir}"
                  + (f" ({detail})" if detail and detail != "No space left on device" else "")
                  + f"; stopped. {state[0].upper()}{state[1:]}. Fix: free space (or move "
                  "the workdir to a larger disk) and re-run the same command to resume.")

