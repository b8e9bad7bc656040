"""Checkpoint safety: corruption is identified, never assumed; nothing non-finite is saved."""
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

  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr(ckpt, "restore", fail)
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


def test_a_non_finite_state_is_never_saved(fake_dataset_dir, tmp_path):
  config = small_config(fake_dataset_dir, checkpoint_every_steps=1, num_train_steps=12)
  config.optimizer.learning_rate = 1e6
  config.evals = {}
  with pytest.raises(FloatingPointError, match=r"last good checkpoint is step"):
    train.run(config, str(tmp_path))
  step, params = _final_params(tmp_path)  # the newest checkpoint left
  assert step >= 1 and all(np.isfinite(p).all() for p in params)
