r"""MRL ResNet-50 on ImageNet-1k: the MRL paper's headline experiment.

Data: `imagenet2012`, prepared as described in `imagenet_vit_s16.py`. Train
(a Cloud TPU slice, GKE, a GPU host or SLURM: README, "Launch"), e.g. on a
v5e-16 created with `launch/tpu_vm.py create`:

  python launch/tpu_vm.py run --name=$TPU --workdir=gs://$BUCKET/rn50_mrl \
    --auto_resume -- --config=configs/imagenet_resnet50.py \
    --config.dataset.data_dir=gs://$BUCKET/tfds

Recipe (the MRL paper's, from its FFCV-based training code): torchvision's
ResNet-50 (v1.5), the MRL nesting {8, 16, ..., 2048} on the 2048-d pooled
feature, one linear head per dim (`:mrl`), a sum of the per-dim
cross-entropies with label smoothing 0.1; SGD with momentum 0.9 (not
Nesterov), batch 1024, peak learning rate 1.7 (0.425 per 256 images: scale it
with the batch), linear warmup over 2 epochs then linear decay to 0, weight
decay 1e-4 on the convolution and linear kernels only (not on BatchNorm or
biases), 40 epochs; BatchNorm statistics over the global batch; progressive
resizing of the training crops from 160 px (until epoch 29) to 192 px (from
epoch 34, in steps of 32 px: FFCV's schedule); evaluation at 224 px (resize
the shorter side to 256, central crop). Inception crop + flip; bfloat16
compute.

Expected top-1 on ImageNet-1k validation (the paper's Table 1, linear
classification by representation size):

  dim    8      16     64     128    2048
  FF     65.29  72.85  -      75.29  76.87
  MRL    66.63  73.53  ~75.9  76.30  76.80
  MRL-E  56.66  71.94  -      75.80  76.51

Variants: `:mrl_e` (one tied head), `:ff` (fixed-feature: one head on the
full 2048 dims; `--config.mrl.ff_dim=m` trains the FF-m baseline of size m).

Fits a v5e:4x4 slice (16 chips, 64 images per chip) data parallel; check a
slice with `--mode=compile --topology=v5e:4x4` (figures:
docs/results/tpu_compile.md).
"""
import ml_collections

_TRAIN_EXAMPLES = 1_281_167


def get_config(arg: str = "mrl") -> ml_collections.ConfigDict:
  mode = arg or "mrl"
  config = ml_collections.ConfigDict()
  config.name = f"imagenet_resnet50_{mode}"
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "imagenet2012"
  config.dataset.data_dir = ml_collections.config_dict.placeholder(str)
  config.dataset.train_split = "train"
  config.dataset.eval_split = "validation"
  config.dataset.image_key = "image"
  config.dataset.label_key = "label"
  config.dataset.num_classes = 1000
  config.dataset.num_examples = {"train": _TRAIN_EXAMPLES, "validation": 50_000}

  config.input = ml_collections.ConfigDict()
  config.input.image_size = 224  # evaluation; training crops follow the schedule below
  config.input.augment = "inception_crop"  # + flip; eval: resize 256, crop 224
  # FFCV's schedule: 160 px until start_epoch, 192 px from end_epoch, linear
  # in between, rounded to multiples of `multiple` (the network's stride).
  config.input.progressive_resizing = ml_collections.ConfigDict(dict(
      min_size=160, max_size=192, start_epoch=29, end_epoch=34, multiple=32))
  config.input.worker_count = 16
  config.input.read_threads = 8
  config.input.cache = False

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet"
  config.model.depth = 50
  config.model.width = 64
  config.model.stem = "imagenet"
  config.model.representation_size = ml_collections.config_dict.placeholder(int)
  config.model.zero_init_last_bn = False
  config.model.bn_momentum = 0.9  # torchvision's 0.1
  config.model.bn_ghost_groups = ml_collections.config_dict.placeholder(int)
  config.model.dtype = "bfloat16"

  config.mrl = ml_collections.ConfigDict()
  config.mrl.mode = mode
  config.mrl.nesting_dims = tuple(2**i for i in range(3, 12))  # 8 ... 2048
  config.mrl.weights = ml_collections.config_dict.placeholder(tuple)
  config.mrl.ff_dim = ml_collections.config_dict.placeholder(int)
  config.mrl.label_smoothing = 0.1

  config.batch_size = 1024
  config.eval_batch_size = 1024
  config.grad_accum_steps = 1
  config.num_epochs = 40
  config.num_train_steps = -1

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.learning_rate = 1.7 * config.batch_size / 1024
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "linear"
  config.optimizer.warmup_steps = 2 * _TRAIN_EXAMPLES // config.batch_size  # 2 epochs
  config.optimizer.grad_clip_norm = ml_collections.config_dict.placeholder(float)

  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  config.mesh_dcn = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  config.sharding_rules = []

  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.eval_every_steps = 10_000

  config.evals = ml_collections.ConfigDict()
  config.evals.linear = dict(type="linear")
  config.evals.knn = dict(type="knn", k=[1])
  return config
