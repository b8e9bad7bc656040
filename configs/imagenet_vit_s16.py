r"""MRL ViT-S/16 on ImageNet-1k (`imagenet2012`), big_vision's plain-ViT recipe.

Data (manual download; TFDS cannot fetch ImageNet): put
ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
`DATA_DIR/downloads/manual/`, then build the array_record dataset once:

  python -m mrl_jax.data.prepare --dataset=imagenet2012 --data_dir=DATA_DIR

Train (a Cloud TPU slice, GKE, a GPU host or SLURM: README, "Launch"), e.g.
on a v5e-16 created with `launch/tpu_vm.py create`:

  python launch/tpu_vm.py run --name=$TPU --workdir=gs://$BUCKET/vit_s16_mrl \
    --auto_resume -- --config=configs/imagenet_vit_s16.py \
    --config.dataset.data_dir=gs://$BUCKET/tfds

Recipe (Beyer et al. 2022, "Better plain ViT baselines for ImageNet-1k"):
global-average pooling, 2-D sin-cos position embeddings, batch 1024, AdamW
lr 1e-3 with 10k warmup steps and cosine decay, decoupled weight decay 1e-4
(optax's `weight_decay` multiplies by the learning rate, hence 0.1 here), 90
epochs, bfloat16 compute, Inception crop + flip + RandAugment(2, 10) on the
host, Mixup 0.2 on device (big_vision's `vit_s16_i1k` pipeline). With this
recipe a fixed-feature ViT-S/16 reaches 76.5 % top-1 after 90 epochs (78.5 %
after 150, 79.8 % after 300). Nesting: the ViT-B/16 list of the MRL paper
halved, {6, 12, 24, 48, 96, 192, 384}, d = 384.

Fits a v5e:2x2 slice (4 chips) data parallel at batch 1024; check a slice
before renting it with `--mode=compile --topology=v5e:2x2` (figures:
docs/results/tpu_compile.md).

Variants: `:mrl_e`, `:ff` (the fixed-feature baseline); `,light` (e.g.
`:ff,light`) drops RandAugment and Mixup (Inception crop + flip only: a few
points less, a cheaper host pipeline).

`,finetune` (e.g. `:mrl,finetune`) fine-tunes a pretrained ViT into MRL at
384 px with big_vision's transfer recipe for AugReg checkpoints
(`configs/transfer.py`: SGD with momentum 0.9, lr 0.03, no weight decay,
gradient clipping at 1, batch 512, 20k steps with 500 warmup and cosine
decay, Inception crop + flip, no Mixup; [cls] token, learned position
embeddings). The checkpoint's position embeddings are resampled to the 24 x
24 grid; the MRL heads and the representation layer start from scratch.
Eval crops 384 of the shorter side resized to 384 / 0.875 (big_vision: 448).

  python launch/tpu_vm.py run --name=$TPU --workdir=gs://$BUCKET/vit_b16_ft \
    --auto_resume -- --config=configs/imagenet_vit_b16.py:mrl,finetune \
    --config.dataset.data_dir=gs://$BUCKET/tfds \
    --config.model.init.path=gs://$BUCKET/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz

(any ViT of the same variant in `format` 'big_vision' or 'timm', or another
run's workdir with `--config.model.init.format=mrl_jax`).
"""
import ml_collections


def get_config(arg: str = "mrl") -> ml_collections.ConfigDict:
  mode, *options = (arg or "mrl").split(",")
  light = "light" in options or "finetune" in options
  config = ml_collections.ConfigDict()
  config.name = f"imagenet_vit_s16_{mode}"
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "imagenet2012"
  config.dataset.data_dir = ml_collections.config_dict.placeholder(str)
  config.dataset.train_split = "train"
  config.dataset.eval_split = "validation"
  config.dataset.image_key = "image"
  config.dataset.label_key = "label"
  config.dataset.num_classes = 1000
  # Split sizes, for --mode=compile where the dataset is not prepared on the host.
  config.dataset.num_examples = {"train": 1_281_167, "validation": 50_000}

  config.input = ml_collections.ConfigDict()
  config.input.image_size = 224
  config.input.augment = "inception_crop"  # + flip; eval: resize 256, crop 224
  config.input.worker_count = 16  # JPEG decoding processes per host
  config.input.read_threads = 8
  config.input.cache = False
  config.input.randaugment = ml_collections.ConfigDict(
      dict(num_layers=0 if light else 2, magnitude=10))
  # Mixup in the train step, on the global batch (mrl_jax/mixup.py).
  config.mixup = ml_collections.ConfigDict(
      dict(mixup_alpha=0.0 if light else 0.2, cutmix_alpha=0.0, switch_prob=0.5, prob=1.0))

  config.model = ml_collections.ConfigDict()
  config.model.name = "vit"
  config.model.variant = "S/16"
  config.model.pool_type = "gap"
  config.model.posemb = "sincos2d"
  config.model.representation_size = 384
  config.model.dtype = "bfloat16"  # params, optimizer state and loss stay fp32
  config.model.remat = False
  config.model.scan_layers = False
  # A pretrained start (README, "Pretrained checkpoints"): applied once, at a
  # fresh start; heads and the representation layer initialised.
  config.model.init = ml_collections.ConfigDict(dict(
      path=ml_collections.config_dict.placeholder(str), format="big_vision",
      dont_load=ml_collections.config_dict.placeholder(tuple)))

  config.mrl = ml_collections.ConfigDict()
  config.mrl.mode = mode
  config.mrl.nesting_dims = (6, 12, 24, 48, 96, 192, 384)
  config.mrl.weights = ml_collections.config_dict.placeholder(tuple)
  config.mrl.ff_dim = ml_collections.config_dict.placeholder(int)
  config.mrl.label_smoothing = 0.0

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.1
  config.optimizer.b2 = 0.999
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 10_000
  config.optimizer.grad_clip_norm = 1.0
  # ((regex over parameter names, LR multiplier), ...): first match wins, 0 freezes.
  config.optimizer.lr_mults = ml_collections.config_dict.placeholder(tuple)

  config.batch_size = 1024
  config.eval_batch_size = 1024
  config.grad_accum_steps = 1
  config.num_epochs = 90
  config.num_train_steps = -1
  # Data parallel by default; for FSDP set e.g. --config.mesh.data=1
  # --config.mesh.fsdp=-1 (params and optimizer state split over all chips).
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Multislice: how many slices each axis spans (data-center network between
  # them); the rest of each axis lies inside a slice. -1: all the slices.
  config.mesh_dcn = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Logical axis -> mesh axis, on top of mrl_jax.sharding.DEFAULT_RULES, e.g.
  # --config.sharding_rules='[("embed", "tensor")]'.
  config.sharding_rules = []

  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.eval_every_steps = 10_000

  config.evals = ml_collections.ConfigDict()
  config.evals.linear = dict(type="linear")
  config.evals.knn = dict(type="knn", k=[1])

  if "finetune" in options:
    config.name += "_finetune"
    config.input.image_size = 384
    config.model.pool_type = "cls"
    config.model.posemb = "learn"
    config.optimizer.update(name="sgd", momentum=0.9, nesterov=False, learning_rate=0.03,
                            weight_decay=0.0,
                            warmup_steps=500, grad_clip_norm=1.0)
    config.batch_size = 512
    config.eval_batch_size = 512
    config.num_epochs = -1
    config.num_train_steps = 20_000
    config.eval_every_steps = 5_000
  return config
