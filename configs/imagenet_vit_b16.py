r"""MRL ViT-B/16 on ImageNet-1k: the MRL paper's ViT nesting, d = 768.

Prepare `imagenet2012` as described in `imagenet_vit_s16.py`, then train
(a Cloud TPU slice, GKE, a GPU host or SLURM: README, "Launch"), e.g. on a
v5e-16 created with `launch/tpu_vm.py create`:

  python launch/tpu_vm.py run --name=$TPU --workdir=gs://$BUCKET/vit_b16_mrl \
    --auto_resume -- --config=configs/imagenet_vit_b16.py \
    --config.dataset.data_dir=gs://$BUCKET/tfds

Recipe: the same plain-ViT recipe as `imagenet_vit_s16.py` (gap, sin-cos
position embeddings, batch 1024, AdamW lr 1e-3, 10k warmup steps, cosine,
decoupled weight decay 1e-4, bfloat16, RandAugment(2, 10), Mixup 0.2), 300
epochs, with the MRL paper's ViT-B/16 nesting {12, 24, 48, 96, 192, 384, 768}
and d = 768. For reference, a fixed-feature ViT-B/16 trained on ImageNet-1k
alone reaches 81.8 % top-1 with DeiT's recipe (300 epochs with RandAugment,
Mixup/CutMix, random erasing and stochastic depth; the last two this
codebase does not have yet), so treat 81.8 % as the upper reference.

Fits a v5e:4x4 slice (16 chips) or a v4:2x2x4 data parallel at batch 1024,
without remat: `--mode=compile --topology=v5e:4x4` (figures:
docs/results/tpu_compile.md).

Variants: `:mrl_e`, `:ff` (the fixed-feature baseline), `,light` as in `imagenet_vit_s16.py`.
"""
import ml_collections

from configs import imagenet_vit_s16


def get_config(arg: str = "mrl") -> ml_collections.ConfigDict:
  config = imagenet_vit_s16.get_config(arg)
  config.name = config.name.replace("vit_s16", "vit_b16")
  config.model.variant = "B/16"
  config.model.representation_size = 768
  config.model.remat = False  # True frees activation memory on small chips
  config.mrl.nesting_dims = (12, 24, 48, 96, 192, 384, 768)
  config.num_epochs = 300
  return config
