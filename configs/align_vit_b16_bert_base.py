r"""MRL ALIGN: ViT-B/16 image tower + BERT-Base text tower, paper scale.

The MRL paper's ALIGN experiment: a dual encoder with d = 768 and the
nesting {12, 24, 48, 96, 192, 384, 768} on both towers, trained with the
softmax contrastive loss of every prefix over the whole pod's batch.

Data: any TFDS image-text dataset with an image and a text feature (a string
or a sequence of captions; one caption is drawn per example each epoch).
The default is `coco_captions` (`captions/text`, 5 captions per image; place
the COCO 2014 zips in DATA_DIR/downloads/manual/ or let TFDS download them):

  python -m mrl_jax.data.prepare --dataset=coco_captions --data_dir=DATA_DIR

For web-scale alt-text data (ALIGN's 1.8B pairs, LAION, CC12M) build a TFDS
array_record dataset with `image` and `text` features and pass
--config.dataset.name=NAME --config.dataset.text_key=text.

Text: BERT's uncased WordPiece vocabulary (`vocab.txt` of Google's BERT-Base
uncased checkpoint, e.g. gs://cloud-tpu-checkpoints/bert/v3/uncased_L-12_H-768_A-12/vocab.txt,
or HuggingFace bert-base-uncased), max 64 tokens.

Train (a Cloud TPU slice, GKE, a GPU host or SLURM: README, "Launch"), e.g.
on a v5e-256 created with `launch/tpu_vm.py create`:

  python launch/tpu_vm.py run --name=$TPU --workdir=gs://$BUCKET/align_b16_mrl \
    --auto_resume -- --config=configs/align_vit_b16_bert_base.py \
    --config.dataset.data_dir=gs://$BUCKET/tfds \
    --config.text.vocab_path=gs://$BUCKET/bert/vocab.txt

Recipe (ALIGN, Jia et al. 2021, scaled to ViT-B/16 + BERT-Base as in the
MRL paper): LAMB, lr 1e-3 with 10k warmup steps and linear decay, weight
decay 1e-5, learnable temperature from τ = 1, batch 16384 split over the
pod's chips (the contrastive loss sees the whole global batch), bfloat16
compute, 224 px Inception crop. The paper trains on ALIGN's 1.8B pairs; on
COCO alone (~83k train images) expect far weaker numbers.

Evaluation at every dim: image->text and text->image recall@1/5/10 on the
first 5k images of `val` and their 5 captions each. (The usual COCO 5k test
set is Karpathy's split of val2014, which TFDS does not provide; for it,
prepare a dataset of those images and set --config.dataset.eval_split.)

Slice: a v5e:16x16 (256 chips, 64 pairs per chip) fits it data parallel
without remat, and so does a v5e:8x16 with less headroom; check yours with
`--mode=compile --topology=v5e:16x16` (figures: docs/results/tpu_compile.md).

Variants: `:ff` (fixed-feature baseline: loss on the full 768 dims only),
`:sigmoid` (SigLIP loss, t' = log 10, b = -10), `,pretrained` (e.g.
`:mrl,pretrained`): both towers start from public checkpoints, as ALIGN-style
fine-tuning usually does. The image tower takes an AugReg ViT-B/16 `.npz`
([cls] token, learned position embeddings, big_vision's numerics), the text
tower a Hugging Face `bert-base-uncased` directory (post-LN blocks,
token-type embeddings, erf GELU, LayerNorm eps 1e-12; its 512 position
embeddings cut to `max_len`); the projections to d = 768 start from scratch.
The tokenizer's vocabulary must be the checkpoint's (`vocab.txt` of that
directory):

  ... --config=configs/align_vit_b16_bert_base.py:mrl,pretrained \
    --config.model.image.init.path=gs://$BUCKET/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz \
    --config.model.text.init.path=gs://$BUCKET/bert-base-uncased \
    --config.text.vocab_path=gs://$BUCKET/bert-base-uncased/vocab.txt
"""
import ml_collections


def get_config(arg: str = "mrl") -> ml_collections.ConfigDict:
  args = set(filter(None, arg.split(",")))
  mode = "ff" if "ff" in args else "mrl"
  kind = "sigmoid" if "sigmoid" in args else "softmax"

  config = ml_collections.ConfigDict()
  config.name = f"align_vit_b16_bert_base_{mode}_{kind}"
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "coco_captions"
  config.dataset.data_dir = ml_collections.config_dict.placeholder(str)
  config.dataset.train_split = "train"
  config.dataset.eval_split = "val"
  config.dataset.image_key = "image"
  config.dataset.label_key = None  # image-text pairs, no class labels
  config.dataset.text_key = "captions/text"
  config.dataset.num_classes = ml_collections.config_dict.placeholder(int)
  # Split sizes (Karpathy's splits), for --mode=compile where the dataset is not prepared on the host.
  config.dataset.num_examples = {"train": 82_783, "val": 5_000}

  config.text = ml_collections.ConfigDict()
  config.text.vocab_path = ml_collections.config_dict.placeholder(str)  # BERT vocab.txt
  # BERT uncased's; only --mode=compile reads it, when vocab_path can't be read.
  config.text.vocab_size = 30_522
  config.text.max_len = 64
  config.text.lowercase = True
  config.text.eval_captions = 5

  config.input = ml_collections.ConfigDict()
  config.input.image_size = 224
  config.input.augment = "inception_crop"
  config.input.worker_count = 16
  config.input.read_threads = 8
  config.input.cache = False

  config.model = ml_collections.ConfigDict()
  config.model.name = "dual_encoder"
  config.model.image = ml_collections.ConfigDict(dict(
      name="vit", variant="B/16", pool_type="gap", posemb="sincos2d",
      remat=False, scan_layers=False))
  config.model.text = ml_collections.ConfigDict(dict(
      variant="B", pool_type="cls", remat=False, scan_layers=False))
  config.model.representation_size = 768
  config.model.dtype = "bfloat16"
  # Pretrained starts per tower (README, "Pretrained checkpoints"), applied
  # once at a fresh start; the projections are initialised.
  for tower, fmt in (("image", "big_vision"), ("text", "hf_bert")):
    config.model[tower].init = ml_collections.ConfigDict(dict(
        path=ml_collections.config_dict.placeholder(str), format=fmt,
        dont_load=ml_collections.config_dict.placeholder(tuple)))
  if "pretrained" in args:
    config.model.image.update(pool_type="cls", posemb="learn")
    config.model.text.update(post_ln=True, type_vocab_size=2, mlp_activation="gelu_exact",
                             layernorm_eps=1e-12)

  config.mrl = ml_collections.ConfigDict()
  config.mrl.mode = mode
  config.mrl.nesting_dims = (12, 24, 48, 96, 192, 384, 768)
  config.mrl.weights = ml_collections.config_dict.placeholder(tuple)
  config.mrl.ff_dim = ml_collections.config_dict.placeholder(int)

  config.contrastive = ml_collections.ConfigDict()
  config.contrastive.kind = kind
  config.contrastive.temperature = ml_collections.config_dict.placeholder(float)
  config.contrastive.learn_temperature = True
  config.contrastive.bias = ml_collections.config_dict.placeholder(float)
  config.contrastive.per_prefix = False
  config.contrastive.max_scale = 100.0 if kind == "softmax" else None
  config.contrastive.label_smoothing = 0.0
  # Columns per block of the blocked loss (memory and speed only; None = the
  # largest power of two whose [prefixes, local batch, block] tile fits 16 MiB).
  config.contrastive.block_size = ml_collections.config_dict.placeholder(int)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "lamb"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-5
  config.optimizer.schedule = "linear"
  config.optimizer.warmup_steps = 10_000
  config.optimizer.grad_clip_norm = ml_collections.config_dict.placeholder(float)
  # ((regex over parameter names, LR multiplier), ...): first match wins, 0 freezes.
  config.optimizer.lr_mults = ml_collections.config_dict.placeholder(tuple)

  config.batch_size = 16384
  config.eval_batch_size = 1024
  config.grad_accum_steps = 1
  config.num_epochs = -1
  config.num_train_steps = 200_000
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Multislice: how many slices each axis spans (data-center network between
  # them); the rest of each axis lies inside a slice. -1: all the slices.
  config.mesh_dcn = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  config.sharding_rules = []

  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.eval_every_steps = 10_000

  config.evals = ml_collections.ConfigDict()
  config.evals.image_text = dict(type="image_text", num_images=5000, ks=[1, 5, 10])
  return config
