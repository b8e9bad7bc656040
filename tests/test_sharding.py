"""Meshes, parameter shardings and sharded training (8 host CPU devices)."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mrl_jax import sharding
from mrl_jax import tasks
from mrl_jax import train
from tests.test_train import small_config


def _mesh(data, fsdp, tensor):
  return sharding.create_mesh(dict(data=data, fsdp=fsdp, tensor=tensor))


def test_logical_spec_rules_and_fsdp():
  mesh = _mesh(2, 2, 2)
  # 'mlp' -> tensor by default; FSDP takes the largest remaining dim.
  assert sharding.logical_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  # A mesh axis is never used twice, and only where it divides the dim.
  assert sharding.logical_spec(("mlp", "mlp"), (3, 8), mesh) == P(None, "tensor")
  assert sharding.logical_spec(("mlp", "mlp"), (6, 8), mesh) == P("tensor", "fsdp")
  assert sharding.logical_spec(("embed", "heads"), (8, 3), mesh) == P("fsdp")
  # Unnamed arrays are only FSDP-split; scalars stay replicated.
  assert sharding.logical_spec(None, (3, 10), mesh) == P(None, "fsdp")
  assert sharding.logical_spec(None, (), mesh) == P()
  # Custom rules override the defaults.
  rules = [("embed", "tensor")]
  assert sharding.logical_spec(("embed", "mlp"), (64, 128), mesh, rules) == P("tensor", "fsdp")
  assert sharding.logical_spec(("embed",), (64,), mesh, fsdp=False) == P()


def test_fsdp_splits_the_dim_whose_shards_fill_tpu_tiles():
  mesh = _mesh(2, 4, 1)
  # [192, 768] split 4 ways: [48, 768] rows stay 128-lane aligned; [192, 192]
  # would be padded to [192, 256] on a TPU. The largest dim wins a tie.
  assert sharding.logical_spec(("embed", "mlp"), (192, 768), mesh) == P("fsdp")
  assert sharding.logical_spec(("mlp", "embed"), (768, 192), mesh) == P("fsdp")
  assert sharding.logical_spec(None, (1024, 2048), mesh) == P(None, "fsdp")
  assert sharding._tiled_size([192, 192]) == 192 * 256
  assert sharding._tiled_size([3, 2, 64]) == 3 * 8 * 128


def test_logical_spec_bad_rules():
  mesh = _mesh(2, 2, 2)
  with pytest.raises(ValueError, match=r"maps 'embed' to 'model'"):
    sharding.logical_spec(("embed",), (8,), mesh, [("embed", "model")])
  with pytest.raises(ValueError, match="no sharding rule"):
    sharding.logical_spec(("nonsense",), (8,), mesh)


def test_constrain_batch_is_noop_without_mesh():
  x = np.ones((4, 3), np.float32)
  assert sharding.constrain_batch(x) is x


MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1)]


def run_steps(config, mesh_shape, devices=None, steps=20):
  """`steps` train steps of `config` on `mesh_shape`: the trainer's own init, step
  and input pipeline (checkpointing and logging, tested elsewhere, left out).
  Returns (losses, final state on the host, task)."""
  config.mesh = dict(zip(("data", "fsdp", "tensor"), mesh_shape))
  mesh = sharding.create_mesh(config.mesh, devices)
  facts = train.check_config(config, mesh)
  task = tasks.get_task(config, facts)
  tx = train.build_optimizer(config, steps)
  init_fn = lambda: task.init_state(tx)
  _, shardings = train.abstract_train_state(init_fn, mesh)
  step = train.make_train_step(config, facts, task, tx, mesh, shardings)
  batches = iter(train.input_pipeline.create_train_loader(config))
  losses = []
  with jax.set_mesh(mesh):
    state = jax.jit(init_fn, out_shardings=shardings)()
    for _ in range(steps):
      batch = train.input_pipeline.make_global_batch(
          next(batches), sharding.batch_sharding(mesh))
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(state), task


def _losses(data_dir, mesh, devices=None, steps=20):
  return run_steps(small_config(data_dir), mesh, devices, steps)[0]


def test_meshes_give_the_single_device_trajectory(fake_dataset_dir):
  """20 steps on every mesh layout follow the 1-device losses (fp32)."""
  expected = _losses(fake_dataset_dir, (1, 1, 1), devices=jax.devices()[:1])
  assert expected[-1] < expected[0]  # It trains.
  for mesh in MESHES:
    got = _losses(fake_dataset_dir, mesh)
    np.testing.assert_allclose(got, expected, rtol=2e-5, err_msg=str(mesh))


def test_fsdp_stores_each_parameter_once_across_devices(fake_dataset_dir):
  """Under 8-way FSDP every splittable parameter (and its Adam moments) has
  an addressable shard of 1/8 of its elements on each device."""
  config = small_config(fake_dataset_dir)
  config.mesh = dict(data=1, fsdp=8, tensor=1)
  mesh = sharding.create_mesh(config.mesh)
  facts = train.check_config(config, mesh)
  task = tasks.get_task(config, facts)
  init_fn = lambda: task.init_state(train.build_optimizer(config, 10))
  _, shardings = train.abstract_train_state(init_fn, mesh)
  state = jax.jit(init_fn, out_shardings=shardings)()
  split = whole = 0
  for name in ("params", "opt_state"):
    for path, x in jax.tree_util.tree_leaves_with_path(state[name]):
      if x.ndim == 0:
        continue
      shard = x.addressable_shards[0].data
      assert len(x.addressable_shards) == 8
      if any(d % 8 == 0 for d in x.shape):
        assert shard.size * 8 == x.size, jax.tree_util.keystr(path)
        split += x.size
      else:  # Nothing to split evenly (e.g. a 4-class bias): replicated.
        assert shard.size == x.size
        whole += x.size
  assert whole < 0.05 * split
