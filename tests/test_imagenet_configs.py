"""Paper-scale ImageNet configs: a 2-step smoke run each, on mock data.

The data are `tfds.testing.mock_data` examples with the real `imagenet2012`
feature spec (JPEG images of random sizes, 1000-class labels), stored under
the catalogue name (see conftest), so the dataset checks and the real input
pipeline (Inception crop, resize, eval resize + central crop) run end to end.
"""
import pytest

from configs import imagenet_vit_b16
from configs import imagenet_vit_s16
from mrl_jax import train


@pytest.mark.parametrize("module, nesting", [
    (imagenet_vit_s16, [6, 12, 24, 48, 96, 192, 384]),
    (imagenet_vit_b16, [12, 24, 48, 96, 192, 384, 768]),
])
def test_imagenet_config_smoke_on_mock_data(module, nesting, mock_imagenet_dir, tmp_path):
  config = module.get_config()
  config.dataset.data_dir = mock_imagenet_dir
  assert list(config.mrl.nesting_dims) == nesting
  assert config.dataset.name == "imagenet2012" and config.dataset.num_classes == 1000
  # Tiny overrides: a 2-layer, 32-wide ViT at 32 px, 2 steps. The embedding
  # size, nesting, heads, data spec and recipe are the config's own.
  config.model.update(width=32, depth=2, mlp_dim=64, num_heads=2)
  config.input.image_size = 32
  config.input.worker_count = 0
  config.input.read_threads = 0
  config.batch_size = config.eval_batch_size = 16
  config.num_epochs = -1
  config.num_train_steps = 2
  config.optimizer.warmup_steps = 1
  config.log_every_steps = 1
  results = train.run(config, str(tmp_path))
  log = train.MetricsLog.read(tmp_path / "metrics.jsonl")
  assert [m["step"] for m in log] == [1, 2]
  assert set(results["metrics"]["linear_top1"]) == set(map(str, nesting))
  assert (tmp_path / "checkpoints" / "2").exists()
