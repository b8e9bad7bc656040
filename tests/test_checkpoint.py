"""Checkpoint safety: corruption is identified, never assumed; nothing non-finite is saved."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrl_jax import checkpoint
from mrl_jax import train
from tests.test_train import _final_params
from tests.test_train import small_config


def _state(scale=1.0):
  return {"params": {"w": jnp.arange(64 * 1024, dtype=jnp.float32).reshape(64, 1024) * scale,
                     "b": jnp.ones(64)}, "step": jnp.int32(1)}


def _saved(tmp_path, steps=(1, 2)):
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  for s in steps:
    ckpt.save(s, _state(s))
  ckpt.close()
  return checkpoint.abstract_like(_state())


def test_flipped_bytes_that_read_fine_are_caught_and_the_previous_step_restored(tmp_path):
  abstract = _saved(tmp_path)
  # Overwrite values inside the largest array file with other valid data:
  # the storage layer reads it without complaint, the fingerprint does not.
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  ckpt._manager.delete(2)  # pylint: disable=protected-access
  ckpt._manager.save(2, args=checkpoint.ocp.args.Composite(  # pylint: disable=protected-access
      state=checkpoint.ocp.args.StandardSave(_state(5.0)),
      fingerprint=checkpoint.ocp.args.JsonSave(checkpoint.summary(_state(2.0))[0])))
  ckpt.wait_until_finished()
  step, state = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 1
  np.testing.assert_array_equal(state["params"]["w"], _state(1.0)["params"]["w"])
  assert (tmp_path / "2.corrupt").exists()


def test_fingerprints_do_not_depend_on_the_sharding():
  x = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16)
  mesh = jax.make_mesh((8,), ("d",))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
  assert checkpoint.summary({"x": x}) == checkpoint.summary({"x": sharded})
  swapped = x.at[0, :2].set(x[0, 1::-1])  # two values swapped: same plain sum
  assert checkpoint.summary({"x": swapped})[0] != checkpoint.summary({"x": x})[0]


@pytest.mark.parametrize("error", [RuntimeError("can't start new thread"),
                                   PermissionError(13, "Permission denied"),
                                   KeyError("exhausted")])
def test_errors_that_are_not_corruption_leave_the_checkpoint_alone(tmp_path, monkeypatch, error):
  abstract = _saved(tmp_path)
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)

  def fail(*args, **kwargs):  # at the Orbax read boundary
    raise error
  monkeypatch.setattr(checkpoint.ocp.StandardCheckpointHandler, "restore", fail)
  with pytest.raises(checkpoint.RestoreError, match=r"step 2 .* left untouched"):
    ckpt.restore_latest(abstract)
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_the_last_remaining_checkpoint_is_never_set_aside(tmp_path):
  abstract = _saved(tmp_path, steps=(1,))
  for f in (tmp_path / "1" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  with pytest.raises(checkpoint.CorruptCheckpoint, match=r"no earlier one is left; not "
                     r"starting over"):
    ckpt.restore_latest(abstract)
  ckpt.close()
  assert (tmp_path / "1").exists()


def test_read_only_restores_rename_nothing(tmp_path):
  abstract = _saved(tmp_path)
  for f in (tmp_path / "2" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  ckpt = checkpoint.Checkpointer(tmp_path, read_only=True)
  step, _ = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_a_non_finite_state_is_never_saved(fake_dataset_dir, tmp_path, monkeypatch):
  """The update of step 4 overflows while its loss (computed before the update)
  is finite: step 4 must not be saved, and the error names step 3."""
  make_train_step = train.make_train_step

  def overflowing_at_step_4(*args, **kwargs):
    step_fn = make_train_step(*args, **kwargs)

    def run(state, batch):
      state, metrics = step_fn(state, batch)
      if int(state["step"]) == 4:
        state = dict(state, params=jax.tree.map(lambda p: p * jnp.inf, state["params"]))
      return state, metrics
    return run
  monkeypatch.setattr(train, "make_train_step", overflowing_at_step_4)
  config = small_config(fake_dataset_dir, checkpoint_every_steps=1, num_train_steps=8)
  config.evals = {}
  with pytest.raises(FloatingPointError, match=r"at step 4 .* last good checkpoint is step 3"):
    train.run(config, str(tmp_path))
  step, params = _final_params(tmp_path)  # the newest checkpoint left
  assert step == 3 and all(np.isfinite(p).all() for p in params)


_RESTORE_SCRIPT = """
import json, sys
from mrl_jax import checkpoint
from tests.test_checkpoint import _state
results = {}
for directory in sys.argv[1:]:
  ckpt = checkpoint.Checkpointer(directory, read_only=directory.endswith("read_only"))
  try:
    step, _ = ckpt.restore_latest(checkpoint.abstract_like(_state()))
    results[directory] = f"restored step {step}"
  except checkpoint.RestoreError as e:
    results[directory] = f"RestoreError: {e}"
  ckpt.close()
print(json.dumps(results))
"""


def test_unreadable_files_are_not_corruption(tmp_path):
  """Real permission errors (files chmod 000, read without root's override) on one
  array file or on every step's metadata, by a training and a read-only restore."""
  if os.geteuid() == 0 and not shutil.which("setpriv"):
    pytest.skip("running as root and setpriv (util-linux) is absent: chmod is not enforced")
  directories, unreadable = [], []
  for what in ("one_array_file", "all_metadata"):
    for mode in ("train", "read_only"):
      directory = tmp_path / f"{what}-{mode}"
      _saved(directory)
      if what == "one_array_file":
        unreadable.append(max((f for f in (directory / "2" / "state").rglob("*")
                               if f.is_file()), key=lambda f: f.stat().st_size))
      else:
        unreadable += directory.glob("*/state/_METADATA")
      directories.append(directory)
  for f in unreadable:
    f.chmod(0)
  drop = (["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
          if os.geteuid() == 0 else [])
  out = subprocess.run(drop + [sys.executable, "-c", _RESTORE_SCRIPT, *map(str, directories)],
                       capture_output=True, text=True, timeout=300,
                       cwd=pathlib.Path(__file__).parent.parent, check=False)
  for f in unreadable:
    f.chmod(0o644)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  for directory in directories:
    result = results[str(directory)]
    assert result.startswith("RestoreError: Could not restore the checkpoint of step 2"), result
    assert "left untouched" in result
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


def test_a_dangling_symlink_among_checkpoints_is_warned_about(tmp_path, caplog):
  abstract = _saved(tmp_path)
  (tmp_path / "3").symlink_to(tmp_path / "elsewhere" / "3")
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  step, _ = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 2
  assert f"{tmp_path / '3'} is a symlink to {tmp_path / 'elsewhere' / '3'}, which does " \
         "not exist" in caplog.text


def test_a_save_that_cannot_fit_stops_with_one_error(fake_dataset_dir, tmp_path, monkeypatch):
  config = small_config(fake_dataset_dir)
  config.evals = {}
  usage = shutil.disk_usage(tmp_path)
  calls = {"n": 0}

  def little_space_after_the_first_save(path):
    calls["n"] += 1
    return usage._replace(free=usage.free if calls["n"] == 1 else 1000)
  monkeypatch.setattr(checkpoint.shutil, "disk_usage", little_space_after_the_first_save)
  with pytest.raises(train.workdir_lib.DiskFull,
                     match=r"^No space left on device writing to .* \(No space left on "
                     r"device for the checkpoint of step 6: it needs .* MiB, .* has 0.0 MiB "
                     r"free\); stopped. The last complete checkpoint is step 3 in "):
    train.run(config, str(tmp_path))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]


def test_disk_full_is_recognised_through_orbax_errors():
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": '
                           '[OS error 28: No space left on device]')
  try:
    try:
      raise tensorstore
    except ValueError as e:
      raise RuntimeError("Save Finalize thread (save_finalize) failed.") from e
  except RuntimeError as e:
    assert train.workdir_lib.is_disk_full(e)
  assert not train.workdir_lib.is_disk_full(RuntimeError("RESOURCE_EXHAUSTED: out of memory"))
