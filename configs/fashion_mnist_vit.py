r"""MRL ViT on Fashion-MNIST: the CPU demo (`make demo`).

Command (after `make data`, or let `make demo` do everything):

  python -m mrl_jax.main --config=configs/fashion_mnist_vit.py --workdir=workdir/fashion_mnist_vit

Result (2 CPU cores, 20 epochs, ~5-9 min of training): Fashion-MNIST test
top-1 through the trained heads ~89.3 % at every dim of 8 / 16 / 32 / 64,
1-NN ~87 %; the exact figures a fresh clone prints, and its time, are in the
README (`make demo`).

Variants: `--config=configs/fashion_mnist_vit.py:mrl_e` or `:ff` select the
head; `:nest2` nests from 2 dims, (2, 4, 8, 16, 32, 64), where truncation
hurts; `:smoke` shrinks everything for a seconds-long check.

`:finetune` turns a trained fixed-feature run into an MRL one (nested from 2
dims): it loads that run's encoder *and* its 64-d representation layer
(`dont_load` re-initialises only the head), trains everything with the new
MRL heads for 2 epochs, and adds a linear probe on every prefix
(`type='baseline'`, `methods=['prefix']`, which `:nest2` adds too).
`,slow_backbone` keeps the head at the full learning rate and the rest at
0.1x (`config.optimizer.lr_mults`); here that fits the 2-dim prefix worse
(docs/results). The FF run is given on the command line:

  python -m mrl_jax.main --config=configs/fashion_mnist_vit.py:ff,nest2 \
      --workdir=workdir/ft/ff --config.num_epochs=5
  python -m mrl_jax.main --config=configs/fashion_mnist_vit.py:finetune \
      --workdir=workdir/ft/ff_to_mrl --config.model.init.path=workdir/ft/ff

Results: docs/results/README.md ("Fine-tuning a fixed-feature model into MRL").
"""
import ml_collections


def get_config(arg: str = "mrl") -> ml_collections.ConfigDict:
  args = set(filter(None, arg.split(",")))
  mode = ({"mrl", "mrl_e", "ff"} & args or {"mrl"}).pop()
  finetune = "finetune" in args

  config = ml_collections.ConfigDict()
  config.name = f"fashion_mnist_vit_{mode}"
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "fashion_mnist"
  config.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS default
  config.dataset.train_split = "train"
  config.dataset.eval_split = "test"
  config.dataset.image_key = "image"
  config.dataset.label_key = "label"
  config.dataset.num_classes = 10
  # Split sizes, for --mode=compile where the dataset is not prepared on the host.
  config.dataset.num_examples = {"train": 60_000, "test": 10_000}

  config.input = ml_collections.ConfigDict()
  config.input.image_size = 28
  # Mirror only: on this short schedule random crops cost more than they
  # give (15 epochs: 88.4 % with crop_flip vs 89.0 % with flip).
  config.input.augment = "flip"
  config.input.crop_padding = 2
  config.input.worker_count = 0
  config.input.cache = True  # decode the 70k images once, keep them in memory

  config.model = ml_collections.ConfigDict()
  config.model.name = "vit"
  config.model.variant = "N/7"
  # Optional overrides of the variant's architecture (None = the variant's).
  for field in ("width", "depth", "mlp_dim", "num_heads"):
    config.model[field] = ml_collections.config_dict.placeholder(int)
  config.model.pool_type = "gap"
  config.model.posemb = "sincos2d"
  config.model.representation_size = 64
  config.model.dtype = "float32"
  # A pretrained start (applied once, at a fresh start; see the README's
  # "Pretrained checkpoints"): path, format ('big_vision' | 'timm' |
  # 'hf_bert' | 'mrl_jax'), dont_load (regexes; default: head, representation).
  config.model.init = ml_collections.ConfigDict(dict(
      path=ml_collections.config_dict.placeholder(str),
      format="mrl_jax",
      dont_load=ml_collections.config_dict.placeholder(tuple)))

  config.mrl = ml_collections.ConfigDict()
  config.mrl.mode = mode
  config.mrl.nesting_dims = (2, 4, 8, 16, 32, 64) if {"nest2", "finetune"} & args else (
      8, 16, 32, 64)
  config.mrl.weights = ml_collections.config_dict.placeholder(tuple)  # all 1
  config.mrl.ff_dim = ml_collections.config_dict.placeholder(int)  # ff: = last dim
  config.mrl.label_smoothing = 0.1

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.weight_decay = 0.05
  config.optimizer.b2 = 0.99
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 200
  # The loss is a sum over nesting dims, so gradients are larger than for one
  # head; clipping at 1.0 measurably slowed training here.
  config.optimizer.grad_clip_norm = ml_collections.config_dict.placeholder(float)
  # ((regex over parameter names, LR multiplier), ...): first match wins, 0 freezes.
  config.optimizer.lr_mults = ml_collections.config_dict.placeholder(tuple)

  config.batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = 20
  config.num_train_steps = -1
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Multislice: how many slices each axis spans (data-center network between
  # them); the rest of each axis lies inside a slice. -1: all the slices.
  config.mesh_dcn = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.eval_every_steps = -1  # only at the end

  config.evals = ml_collections.ConfigDict()
  config.evals.linear = dict(type="linear")
  config.evals.knn = dict(type="knn", k=[1])

  if finetune:
    config.name = "fashion_mnist_vit_ff_to_mrl"
    config.model.init.dont_load = (r"^head(/|$)",)  # keep the representation layer
    if "slow_backbone" in args:
      config.optimizer.lr_mults = ((r"^head/", 1.0), (r".", 0.1))
    config.optimizer.warmup_steps = 100
    config.num_epochs = 2

  if {"nest2", "finetune"} & args:  # a linear probe on each prefix (for FF: "FF truncated")
    config.evals.prefix = dict(type="baseline", methods=["prefix"], probes=["linear"])

  if "smoke" in args:
    config.model.variant = "Mu/7"
    config.num_epochs = -1
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.batch_size = 64
  return config
