"""Paper-scale ImageNet configs: a 2-step smoke run each, on mock data.

The data are `tfds.testing.mock_data` examples with the real `imagenet2012`
feature spec (JPEG images of random sizes, 1000-class labels), stored under
the catalogue name (see conftest), so the dataset checks and the real input
pipeline (Inception crop, resize, eval resize + central crop) run end to end.
"""
import pytest

from configs import imagenet_resnet50
from configs import imagenet_vit_b16
from configs import imagenet_vit_s16
from mrl_jax import train
from mrl_jax.data import input_pipeline


@pytest.mark.parametrize("module, arg, nesting", [
    (imagenet_vit_s16, "mrl", [6, 12, 24, 48, 96, 192, 384]),
    (imagenet_vit_b16, "mrl,deit", [12, 24, 48, 96, 192, 384, 768]),
])
def test_imagenet_config_smoke_on_mock_data(module, arg, nesting, mock_imagenet_dir,
                                            tmp_path):
  config = module.get_config(arg)
  config.dataset.data_dir = mock_imagenet_dir
  assert list(config.mrl.nesting_dims) == nesting
  assert config.dataset.name == "imagenet2012" and config.dataset.num_classes == 1000
  # big_vision's recipe: RandAugment(2, 10) on the host, Mixup 0.2 on device.
  base = module.get_config()
  assert dict(base.input.randaugment) == {"num_layers": 2, "magnitude": 10}
  assert base.mixup.mixup_alpha == 0.2
  light = module.get_config("ff,light")
  assert light.input.randaugment.num_layers == 0 and light.mixup.mixup_alpha == 0
  assert light.name.endswith("_ff") and light.mrl.mode == "ff"
  if module is imagenet_vit_b16:
    deit = module.get_config("mrl,deit")
    assert (deit.model.drop_path, deit.input.random_erasing, deit.mixup.cutmix_alpha) == (
        0.1, 0.25, 1.0)
    train.check_optimizer(deit)
    # Its run would be vit_s16's (the tiny overrides below replace the width and
    # depth); only ViT-S/16's trains here, to keep the suite's time. Stochastic
    # depth, random erasing and CutMix are tested in test_models, test_randaugment
    # and test_train's resume test.
    return
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


def test_resnet50_config_smoke_with_progressive_resizing(mock_imagenet_dir, tmp_path):
  """ResNet-50's recipe: its crops grow from 32 to 64 px after epoch 1 (3 batches); a 2-step run."""
  config = imagenet_resnet50.get_config()
  assert list(config.mrl.nesting_dims) == [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
  assert (config.optimizer.name, config.optimizer.nesterov) == ("sgd", False)
  config.dataset.data_dir = mock_imagenet_dir
  # Tiny overrides: ResNet-50's blocks at width 4 (a 128-d pooled feature,
  # nested 8 ... 128), 16 images a step (3 steps an epoch of the mock split).
  config.model.width = 4
  config.mrl.nesting_dims = (8, 16, 32, 64, 128)
  config.input.image_size = 32
  config.input.progressive_resizing.update(min_size=32, max_size=64, start_epoch=0,
                                           end_epoch=1)
  config.input.worker_count = config.input.read_threads = 0
  config.batch_size = config.eval_batch_size = 16
  config.num_epochs = -1
  config.num_train_steps = 4  # the schedule ends within the run; train.run stops at 2 below
  config.optimizer.warmup_steps = 1
  config.log_every_steps = 1
  config.evals = dict(linear=dict(type="linear"))
  batches = iter(input_pipeline.create_train_loader(config))
  sizes = [next(batches)["image"].shape[1] for _ in range(4)]
  assert sizes == [32, 32, 32, 64]  # epoch 0, then epoch 1
  config.num_train_steps = 2  # 2/3 of an epoch: the schedule must end inside it
  config.input.progressive_resizing.update(max_size=32, end_epoch=0)
  results = train.run(config, str(tmp_path))
  assert [m["step"] for m in train.MetricsLog.read(tmp_path / "metrics.jsonl")] == [1, 2]
  assert set(results["metrics"]["linear_top1"]) == set(map(str, config.mrl.nesting_dims))


def test_progressive_resizing_schedule_and_bad_schedules(mock_imagenet_dir):
  ffcv = dict(min_size=160, max_size=192, start_epoch=29, end_epoch=34, multiple=32)
  sizes = [input_pipeline.train_image_size(ffcv, e) for e in range(40)]
  assert sizes[:30] == [160] * 30 and sizes[34:] == [192] * 6
  assert sizes[30:34] == [160, 160, 192, 192]  # 166.4, 172.8, 179.2, 185.6 -> x32
  config = imagenet_resnet50.get_config()
  config.dataset.data_dir = mock_imagenet_dir
  for change, message in [
      (dict(max_size=200), "must be multiples of multiple=32"),
      (dict(min_size=224), "needs 0 < min_size <= max_size"),
      (dict(start_epoch=35), "start_epoch=35 is after end_epoch=34"),
      (dict(end_epoch=41, start_epoch=1), "end_epoch=41 is beyond the run \\(40 epochs\\)"),
  ]:
    c = config.copy_and_resolve_references()
    c.input.progressive_resizing.update(change)
    with pytest.raises(ValueError, match=message):
      input_pipeline.check_progressive_resizing(c, 40)
