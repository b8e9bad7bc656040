r"""MRL dual encoder (ALIGN-style) on Fashion-MNIST image-caption pairs: CPU demo.

Commands (`make demo_align` runs both data steps and the MRL model):

  python -m mrl_jax.data.prepare --dataset=fashion_mnist_captions
  python -m mrl_jax.main --config=configs/fashion_mnist_align.py \
      --workdir=workdir/fashion_mnist_align
  # the fixed-feature baseline of the same recipe (loss on the full 64 dims only):
  python -m mrl_jax.main --config=configs/fashion_mnist_align.py:ff \
      --workdir=workdir/fashion_mnist_align_ff

Each image comes with 5 captions written from its class with several names
per class ("a photo of a trainer.", "product shot: running shoe", ...; see
`mrl_jax.data.captions`); one is drawn per example each epoch. A ViT-N/7
image tower and a 2-layer text tower are trained with the softmax
contrastive loss on every prefix {2, 4, 8, 16, 32, 64} over the batch, with a
learnable temperature starting at ALIGN's τ = 1. Zero-shot classification
embeds "a photo of a {class}." and two more prompts per class.

Result: zero-shot top-1 and image 1-NN at every dim, for this config and
its `:ff` model truncated to each dim, are in the README's table ("Image-text
dual encoders"), with the time `make demo_align` takes on 2 CPU cores.

Variants: `:ff` (fixed-feature baseline), `:sigmoid` (SigLIP loss),
`:per_prefix` (one temperature per prefix), `:smoke` (seconds).
"""
import ml_collections

from configs import fashion_mnist_vit
from mrl_jax.data import captions


def get_config(arg: str = "mrl") -> ml_collections.ConfigDict:
  args = set(filter(None, arg.split(",")))
  mode = "ff" if "ff" in args else "mrl"
  # The classifier demo's recipe (and its :smoke shrinking), then the towers.
  config = fashion_mnist_vit.get_config(",".join([mode] + sorted(args & {"smoke"})))
  config.name = f"fashion_mnist_align_{mode}"

  config.dataset.name = "fashion_mnist_captions"
  # Prefixes down to d/32. With ten classes, any 8 coordinates of a trained
  # 64-d contrastive embedding still separate them (the fixed-feature model
  # truncated to 8 dims keeps ~86 % zero-shot), so the nesting goes lower,
  # where truncation breaks down: the paper's smallest ALIGN prefix is d/64.
  config.mrl.nesting_dims = (2, 4, 8, 16, 32, 64)
  config.dataset.text_key = "captions"

  config.text = ml_collections.ConfigDict()
  config.text.vocab_path = captions.DEMO_VOCAB_PATH
  config.text.max_len = 16
  config.text.lowercase = True
  config.text.eval_captions = 5

  # The image tower: the classifier demo's ViT (its fields, same meaning).
  image = ml_collections.ConfigDict(dict(
      name="vit", variant=config.model.variant, pool_type=config.model.pool_type,
      posemb=config.model.posemb, remat=False, scan_layers=False))
  for field in ("width", "depth", "mlp_dim", "num_heads"):
    image[field] = ml_collections.config_dict.placeholder(int)
  dtype, d = config.model.dtype, config.model.representation_size
  config.model = ml_collections.ConfigDict()
  config.model.name = "dual_encoder"
  config.model.image = image
  config.model.text = ml_collections.ConfigDict(dict(
      variant="Mu", width=64, depth=2, mlp_dim=128, num_heads=2, pool_type="cls",
      remat=False, scan_layers=False))
  config.model.representation_size = d
  config.model.dtype = dtype

  config.contrastive = ml_collections.ConfigDict()
  config.contrastive.kind = "sigmoid" if "sigmoid" in args else "softmax"
  # None = the kind's standard start: τ = 1 (ALIGN softmax), τ = 0.1 with
  # bias -10 (SigLIP sigmoid).
  config.contrastive.temperature = ml_collections.config_dict.placeholder(float)
  config.contrastive.learn_temperature = True
  config.contrastive.bias = ml_collections.config_dict.placeholder(float)
  config.contrastive.per_prefix = "per_prefix" in args
  config.contrastive.max_scale = (
      100.0 if config.contrastive.kind == "softmax" else None)  # CLIP's clip
  config.contrastive.label_smoothing = 0.0
  # Columns per block of the blocked loss (memory and speed only; None = the
  # largest power of two whose [prefixes, local batch, block] tile fits 16 MiB).
  config.contrastive.block_size = ml_collections.config_dict.placeholder(int)
  config.mrl.label_smoothing = 0.0

  if "smoke" not in args:
    config.batch_size = 256
    config.num_epochs = 12

  config.evals = ml_collections.ConfigDict()
  config.evals.zeroshot = dict(type="zeroshot",
                               class_names=list(captions.ZERO_SHOT_CLASS_NAMES),
                               templates=list(captions.ZERO_SHOT_TEMPLATES))
  config.evals.knn = dict(type="knn", k=[1])
  config.evals.image_text = dict(type="image_text", num_images=1000, ks=[1, 5, 10])
  return config
