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
alone reaches 81.8 % top-1 with DeiT's recipe (`,deit` below: 300 epochs
with RandAugment, Mixup/CutMix, random erasing and stochastic depth).

Fits a v5e:4x4 slice (16 chips) or a v4:2x2x4 data parallel at batch 1024,
without remat: `--mode=compile --topology=v5e:4x4` (figures:
docs/results/tpu_compile.md).

Variants: `:mrl_e`, `:ff` (the fixed-feature baseline), `,light` as in
`imagenet_vit_s16.py`; `,deit` (e.g. `:mrl,deit`): DeiT-B's recipe, the
one of the 81.8 % above (RandAugment(2, 9), random erasing 0.25, Mixup 0.8 /
CutMix 1.0, stochastic depth 0.1, label smoothing 0.1, AdamW 5e-4 per 512
with weight decay 0.05, 5 warmup epochs).
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
  if "deit" in (arg or "").split(","):
    # DeiT-B's recipe (Touvron et al. 2021, Table 9): the 81.8 % reference.
    config.input.randaugment.update(num_layers=2, magnitude=9)
    config.input.random_erasing = 0.25
    config.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    config.model.drop_path = 0.1
    config.mrl.label_smoothing = 0.1
    config.optimizer.learning_rate = 5e-4 * config.batch_size / 512
    config.optimizer.weight_decay = 0.05  # PyTorch AdamW, like optax: times the lr
    config.optimizer.warmup_steps = 5 * 1_281_167 // config.batch_size
  return config
