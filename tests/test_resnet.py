"""ResNet: torchvision's architecture, BatchNorm over the global batch, the trainer's BN state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mrl_jax import matryoshka
from mrl_jax import models
from mrl_jax import train
from mrl_jax.models import resnet
from tests.test_sharding import run_steps
from tests.test_train import small_config

# torchvision.models.resnetN(num_classes=1000): total parameters, and the
# fc layer's (features x 1000 + 1000).
TORCHVISION = {18: (11_689_512, 513_000), 34: (21_797_672, 513_000),
               50: (25_557_032, 2_049_000), 101: (44_549_160, 2_049_000),
               152: (60_192_808, 2_049_000)}


def _count(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("depth", sorted(TORCHVISION))
def test_parameter_counts_equal_torchvision(depth):
  total, fc = TORCHVISION[depth]
  model = nnx.eval_shape(lambda: resnet.ResNet(depth=depth, channels=3, rngs=nnx.Rngs(0)))
  assert _count(model) == total - fc
  if depth == 50:  # with a fixed-feature head on the 2048-d feature: torchvision's model
    assert model.num_features == 2048
    head = nnx.eval_shape(lambda: matryoshka.make_head("ff", [2048], 1000,
                                                       rngs=nnx.Rngs(0)))
    assert _count(model) + _count(head) == 25_557_032


def test_batchnorm_matches_numpy_and_updates_only_in_training():
  x = np.random.default_rng(0).normal(2.0, 3.0, (8, 4, 4, 3)).astype(np.float32)
  bn = resnet.BatchNorm(3, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
  bn.scale[...] = jnp.array([1.0, 2.0, 0.5])
  bn.bias[...] = jnp.array([0.0, 1.0, -1.0])
  y = bn(jnp.asarray(x), train=True)
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  want = (x - mean) / np.sqrt(var + 1e-5) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  n = 8 * 4 * 4
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
  # Evaluation: the running averages normalise, and nothing changes.
  stats = (np.array(bn.mean[...]), np.array(bn.var[...]))
  y = bn(jnp.asarray(x), train=False)
  want = (x - stats[0]) / np.sqrt(stats[1] + 1e-5) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(bn.mean[...], stats[0])
  np.testing.assert_array_equal(bn.var[...], stats[1])
  # Ghost BatchNorm: each half of the batch by its own statistics.
  ghost = resnet.BatchNorm(3, ghost_groups=2, rngs=nnx.Rngs(0))
  y = ghost(jnp.asarray(x), train=True)
  for rows in (slice(0, 4), slice(4, 8)):
    half, got = x[rows], y[rows]
    want = (half - half.mean(axis=(0, 1, 2))) / np.sqrt(half.var(axis=(0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _resnet_config(data_dir):
  config = small_config(data_dir)
  config.model = dict(name="resnet", depth=18, width=4, stem="small", dtype="float32")
  config.mrl.nesting_dims = [8, 16, 32]  # ResNet-18 of width 4: 32-d pooled feature
  return config


def test_sharded_batchnorm_equals_one_device_and_eval_uses_running_averages(fake_dataset_dir):
  """8 devices (2 data x 4 FSDP) follow one device: BN sees the global batch."""
  one, state, task = run_steps(_resnet_config(fake_dataset_dir), (1, 1, 1),
                               jax.devices()[:1], steps=4)
  eight, state8, _ = run_steps(_resnet_config(fake_dataset_dir), (2, 4, 1), steps=4)
  np.testing.assert_allclose(eight, one, rtol=2e-5)
  stats = jax.tree.leaves(nnx.to_pure_dict(state["rest"]))
  stats8 = jax.tree.leaves(nnx.to_pure_dict(state8["rest"]))
  assert stats and len(stats) == len(stats8)
  for a, b in zip(stats, stats8):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The running means moved away from their init (0) in training...
  stem = state["rest"]["stem"]["bn"]
  assert np.abs(np.asarray(stem["mean"][...])).max() > 0
  # ...and evaluation normalises with them: the same images give the same
  # embedding alone or in a batch (no batch statistics at eval).
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (6, 8, 8, 1)), jnp.float32)
  _, z = task.embed_images(state["params"], state["rest"], images)
  _, z1 = task.embed_images(state["params"], state["rest"], images[:1])
  np.testing.assert_allclose(z1[0], z[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model, message", [
    (dict(name="resnet", depth=42), "config.model.depth=42 is not a ResNet variant"),
    (dict(name="resnet", depth=50, stem="tiny"), "config.model.stem='tiny' is not one of"),
    (dict(name="resnet", depth=50, bn_ghost_groups=0), "must be a positive int"),
    (dict(name="resnet", depth=50, bn_ghost_groups=5), "must divide the microbatch"),
])
def test_bad_resnet_configs(fake_dataset_dir, model, message):
  config = small_config(fake_dataset_dir)
  config.model = model
  with pytest.raises(ValueError, match=message):
    models.check_variant(config)


def test_fashion_mnist_resnet_config_is_consistent():
  from configs import fashion_mnist_resnet  # pylint: disable=g-import-not-at-top
  for arg in ("mrl", "ff", "mrl,smoke"):
    config = fashion_mnist_resnet.get_config(arg)
    models.check_variant(config)
    train.check_optimizer(config)
    d = models.embedding_size(config)
    assert d == config.mrl.nesting_dims[-1] == (32 if "smoke" in arg else 64)
    matryoshka.validate_nesting(config.mrl.nesting_dims, None, d)


def test_zero_init_last_bn_makes_each_residual_branch_start_at_zero():
  model = resnet.ResNet(depth=18, width=4, channels=1, stem="small", zero_init_last_bn=True,
                        rngs=nnx.Rngs(0))
  for block in model.blocks:
    last = block.conv2 if isinstance(block, resnet.BasicBlock) else block.conv3
    assert np.all(np.asarray(last.bn.scale[...]) == 0)
    assert np.all(np.asarray(block.conv1.bn.scale[...]) == 1)
  block = resnet.Bottleneck(16, 4, 2, bn={}, zero_init_last_bn=True, dtype=jnp.float32,
                            param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert np.all(np.asarray(block.conv3.bn.scale[...]) == 0)
  assert block.conv2.conv.strides == (2, 2)  # v1.5: the stride is in the 3x3 conv
