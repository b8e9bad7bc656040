r"""MRL ResNet on Fashion-MNIST: the ImageNet ResNet-50 recipe, CPU-sized.

  python -m mrl_jax.main --config=configs/fashion_mnist_resnet.py --workdir=workdir/fmnist_resnet

The architecture is torchvision's basic-block ResNet-18 at width 8 with the
small-image stem (3x3 stride 1, no max pooling: 28 px inputs), whose pooled
feature is the 64-d embedding, nested {2, 4, ..., 64} (the
reproduction in docs/results/ starts at 2 dims, where truncation hurts).
The recipe is `imagenet_resnet50.py`'s: SGD with momentum 0.9 (not
Nesterov), 0.425 per 256 images, linear warmup then linear decay, weight
decay 1e-4 on kernels only, label smoothing 0.1, BatchNorm over the global
batch; 20 epochs here, flip augmentation as the ViT demo. Results:
docs/results/README.md.

Variants: `:mrl_e`, `:ff` (`--config.mrl.ff_dim=m` for FF-m); `:smoke`.
"""
import ml_collections

from configs import fashion_mnist_vit


def get_config(arg: str = "mrl") -> ml_collections.ConfigDict:
  config = fashion_mnist_vit.get_config(arg)
  config.name = config.name.replace("fashion_mnist_vit", "fashion_mnist_resnet")
  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet"
  config.model.depth = 18
  config.model.width = 8
  config.model.stem = "small"
  config.model.representation_size = ml_collections.config_dict.placeholder(int)
  config.model.zero_init_last_bn = False
  config.model.bn_momentum = 0.9
  config.model.bn_ghost_groups = ml_collections.config_dict.placeholder(int)
  config.model.dtype = "float32"
  config.mrl.nesting_dims = (2, 4, 8, 16, 32, 64)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.learning_rate = 0.425 * config.batch_size / 256
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "linear"
  config.optimizer.warmup_steps = 200
  config.optimizer.grad_clip_norm = ml_collections.config_dict.placeholder(float)
  if "smoke" in arg:
    config.model.width = 4  # a 32-d feature
    config.mrl.nesting_dims = (2, 8, 32)
  return config
