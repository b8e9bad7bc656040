"""A seconds-long config on the fake test dataset, for subprocess tests.

  --config=tests/tiny_config.py:DATA_DIR
"""
from configs import fashion_mnist_vit


def get_config(data_dir: str):
  config = fashion_mnist_vit.get_config("mrl")
  config.dataset.name = "fake_images"
  config.dataset.data_dir = data_dir
  config.dataset.num_classes = 4
  config.input.image_size = 8
  config.input.augment = "crop_flip"
  config.input.crop_padding = 1
  config.model.variant = "Mu/4"
  config.model.representation_size = 16
  config.mrl.nesting_dims = [4, 8, 16]
  config.batch_size = 32
  config.eval_batch_size = 32
  config.num_epochs = -1
  config.num_train_steps = 12
  config.optimizer.warmup_steps = 2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 4
  config.evals = dict(linear=dict(type="linear"))
  return config
