"""The dual encoder (ALIGN-style MRL) end to end: image-text data, training,
zero-shot and image-text retrieval evaluation, config checks, the configs.

Fixtures build two small image-caption TFDS datasets: `fake_captions`
(8x8 brightness-band images of 4 classes with 0-3 templated captions each,
learnable in seconds) and a `coco_captions` with the real catalogue feature
spec (nested `captions/text`, images of random sizes) for a smoke run of the
paper-scale config.
"""
import functools
import json

from flax import nnx
import jax
import numpy as np
import pytest

from configs import align_vit_b16_bert_base
from configs import fashion_mnist_align
from mrl_jax import sharding
from mrl_jax import tasks
from mrl_jax import train
from mrl_jax.data import captions
from mrl_jax.data import input_pipeline
from mrl_jax.data import tokenizer
from mrl_jax.evaluators import zeroshot
from mrl_jax.models import dual_encoder
from tests import tiny_config

NAMES = ("cat", "dog", "car", "ship")
TEMPLATES = ("a photo of a {}.", "a picture of the {}.", "this is a {}.")
LONG = "a photo of a {} on a plain grey background."  # 11 pieces > max_len 8
NUM_TRAIN, NUM_TEST = 128, 40
MAX_LEN = 8
# Train examples with special captions.
EMPTY_LIST, EMPTY_STRING, LONG_CAPTION = 0, 1, 2


def _captions(split: str, i: int) -> list[str]:
  name = NAMES[i % len(NAMES)]
  if i == EMPTY_LIST:
    return []
  if split == "train" and i == EMPTY_STRING:
    return [""]
  if split == "train" and i == LONG_CAPTION:
    return [LONG.format(name)]
  n = 1 + (i * 7) % 3  # 1 to 3 captions
  return [TEMPLATES[(i + j) % len(TEMPLATES)].format(name) for j in range(n)]


def _image(rng, label):
  base = 30 + 200 * label / (len(NAMES) - 1)
  return np.clip(base + rng.normal(0, 20, (8, 8, 1)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def caption_data(tmp_path_factory):
  """(data_dir, vocab_path) of the TFDS dataset 'fake_captions'."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("tfds_captions")
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(8, 8, 1)),
      "label": tfds.features.ClassLabel(names=list(NAMES)),
      "captions": tfds.features.Sequence(tfds.features.Text()),
  })

  def examples(split, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      label = i % len(NAMES)
      yield i, {"image": _image(rng, label), "label": label,
                "captions": _captions(split, i)}

  tfds.dataset_builders.store_as_tfds_dataset(
      name="fake_captions", version="1.0.0", features=features,
      split_datasets={"train": examples("train", NUM_TRAIN, 0),
                      "test": examples("test", NUM_TEST, 1)},
      config=None, data_dir=str(root), file_format="array_record",
      disable_shuffling=True)
  texts = [c for s, n in (("train", NUM_TRAIN), ("test", NUM_TEST))
           for i in range(n) for c in _captions(s, i)]
  vocab = tokenizer.write_vocab(tokenizer.build_vocab(texts), root / "vocab.txt")
  return str(root), str(vocab)


def align_config(caption_data, arg="smoke", **overrides):
  """The demo config shrunk to the fake dataset: seconds on a CPU."""
  data_dir, vocab_path = caption_data
  config = fashion_mnist_align.get_config(arg)
  config.dataset.name = "fake_captions"
  config.dataset.data_dir = data_dir
  config.dataset.num_classes = len(NAMES)
  config.input.image_size = 8
  config.input.augment = "crop_flip"
  config.input.crop_padding = 1
  config.text.vocab_path = vocab_path
  config.text.max_len = MAX_LEN
  config.text.eval_captions = 3
  config.model.image.variant = "Mu/4"
  config.model.image.depth = 1
  config.model.text.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  config.model.representation_size = 16
  config.mrl.nesting_dims = [4, 8, 16]
  config.batch_size = 32
  config.eval_batch_size = 32
  config.num_epochs = -1
  config.num_train_steps = 40
  config.optimizer.warmup_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1000
  config.evals.zeroshot.class_names = list(NAMES)
  config.evals.zeroshot.templates = list(TEMPLATES)
  config.evals.image_text.ks = [1, 5]
  for k, v in overrides.items():
    node = config
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return config


def _source(caption_data, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.data_source("fake_captions", data_dir=caption_data[0], split=split,
                          download=False)


def _index_of_image(caption_data, split):
  """uint8 image bytes -> example index (the noise makes every image unique)."""
  source = _source(caption_data, split)
  return {np.asarray(source[i]["image"]).tobytes(): i for i in range(len(source))}


def _rows_to_indices(images, index_of):
  """Unaugmented uint8 images [b, 8, 8, 1] (as batches reach the device) -> example indices."""
  return np.asarray([index_of[np.asarray(x, np.uint8).tobytes()] for x in images])


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# ------------------------------------------------------------------ train data --


def test_train_loader_text(caption_data):
  config = align_config(caption_data, **{"input.augment": "none"})
  tok = input_pipeline.load_tokenizer(config)
  index_of = _index_of_image(caption_data, "train")
  epochs = 4
  steps = epochs * NUM_TRAIN // config.batch_size
  batches = _take(iter(input_pipeline.create_train_loader(config)), steps)

  b = batches[0]
  assert b["text"].shape == (32, MAX_LEN) and b["text"].dtype == np.int32
  for key in ("text_truncated", "text_empty"):
    assert b[key].shape == (32,) and b[key].dtype == np.int32
  drawn = {}  # index -> captions drawn, epoch by epoch
  for b in batches:
    assert (b["text"][:, 0] == tok.cls_id).all()
    indices = _rows_to_indices(b["image"], index_of)
    np.testing.assert_array_equal(b["label"], indices % len(NAMES))
    np.testing.assert_array_equal(
        b["text_empty"], np.isin(indices, [EMPTY_LIST, EMPTY_STRING]))
    np.testing.assert_array_equal(b["text_truncated"], indices == LONG_CAPTION)
    for row, i in enumerate(indices):
      options = _captions("train", i) or [""]
      encoded = tok.encode_batch(options)["ids"]
      (match,) = np.flatnonzero((encoded == b["text"][row]).all(axis=1))
      drawn.setdefault(int(i), []).append(options[match])
  # Every example once per epoch; the empty ones encode as [CLS] [SEP].
  assert sorted(drawn) == list(range(NUM_TRAIN))
  assert all(len(v) == epochs for v in drawn.values())
  empty_ids = tok.encode_batch([""])["ids"][0]
  assert empty_ids[:2].tolist() == [tok.cls_id, tok.sep_id] and not empty_ids[2:].any()
  # A new caption each epoch for examples that have several.
  several = [i for i in drawn if len(_captions("train", i)) == 3]
  assert several
  assert sum(len(set(drawn[i])) > 1 for i in several) > 0.5 * len(several)


def test_train_loader_text_deterministic_and_process_count_invariant(caption_data):
  config = align_config(caption_data)  # crop_flip, in-memory cache
  keys = ("image", "label", "text", "text_truncated", "text_empty")
  whole = _take(iter(input_pipeline.create_train_loader(config)), 5)
  again = _take(iter(input_pipeline.create_train_loader(config)), 5)
  other_seed = _take(iter(input_pipeline.create_train_loader(config, seed=7)), 5)
  uncached = config.copy_and_resolve_references()
  uncached.input.cache = False
  direct = _take(iter(input_pipeline.create_train_loader(uncached)), 5)
  parts = [_take(iter(input_pipeline.create_train_loader(
      config, process_index=i, process_count=2)), 5) for i in range(2)]
  for step, batch in enumerate(whole):
    for k in keys:
      np.testing.assert_array_equal(again[step][k], batch[k], err_msg=k)
      np.testing.assert_array_equal(direct[step][k], batch[k], err_msg=k)
      np.testing.assert_array_equal(
          np.concatenate([p[step][k] for p in parts]), batch[k], err_msg=k)
      assert parts[0][step][k].shape[0] == 16
  assert any(not np.array_equal(x["text"], y["text"]) for x, y in zip(whole, other_seed))


# ------------------------------------------------------------------- eval data --


@pytest.mark.parametrize("k", [3, 2])
def test_eval_iterator_text(caption_data, k):
  config = align_config(caption_data, **{"text.eval_captions": k})
  tok = input_pipeline.load_tokenizer(config)
  source = _source(caption_data, "test")
  batches = list(input_pipeline.create_eval_iterator(config, "test", 32))
  assert len(batches) == 2
  text = np.concatenate([b["text"] for b in batches])
  text_mask = np.concatenate([b["text_mask"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert batches[0]["text"].shape == (32, k, MAX_LEN) and text.dtype == np.int32
  assert batches[0]["text_mask"].shape == (32, k)
  assert mask.sum() == NUM_TEST and not mask[NUM_TEST:].any()
  for i in range(NUM_TEST):
    caps = [c.decode() for c in source[i]["captions"]][:k]
    assert caps == _captions("test", i)[:k]
    assert text_mask[i].tolist() == [1] * len(caps) + [0] * (k - len(caps))
    if caps:
      np.testing.assert_array_equal(text[i, :len(caps)], tok.encode_batch(caps)["ids"])
    assert not text[i, len(caps):].any()
  assert not text_mask[NUM_TEST:].any() and not text[NUM_TEST:].any()
  assert text_mask[EMPTY_LIST].sum() == 0


# ------------------------------------------------- coco_captions, paper config --

COCO_WORDS = ("a", "man", "woman", "dog", "riding", "sitting", "on", "the",
              "street", "with", "red", "bus", "table", "near", "of", "two")


def _coco_examples(n, seed):
  rng = np.random.default_rng(seed)
  for i in range(n):
    h, w = (int(x) for x in rng.integers(20, 64, 2))
    k = int(rng.integers(1, 7))  # COCO has 5 to 7; 1 to 6 here
    texts = [" ".join(rng.choice(COCO_WORDS, int(rng.integers(3, 12)))) + "."
             for _ in range(k)]
    yield i, {
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "image/filename": f"COCO_{i:012d}.jpg",
        "image/id": i,
        "captions": {"id": np.arange(k, dtype=np.int64), "text": texts},
        "objects": {"area": np.zeros(0, np.int64), "bbox": np.zeros((0, 4), np.float32),
                    "id": np.zeros(0, np.int64), "is_crowd": np.zeros(0, bool),
                    "label": np.zeros(0, np.int64)},
    }


@pytest.fixture(scope="session")
def mock_coco_dir(tmp_path_factory):
  """'coco_captions' with the real feature spec (train 32, val 16) + a vocab.

  `tfds.testing.mock_data` writes captions whose 'id' and 'text' sequences
  differ in length, which TFDS then refuses to encode, so the examples are
  written here: JPEGs of random sizes, 1-6 captions of random words.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("tfds_coco")
  builder = tfds.builder("coco_captions")
  tfds.dataset_builders.store_as_tfds_dataset(
      name="coco_captions", version=str(builder.version),
      features=builder.info.features,
      split_datasets={"train": _coco_examples(32, 0), "val": _coco_examples(16, 1)},
      config=builder.builder_config.name, data_dir=str(root),
      file_format="array_record", disable_shuffling=True)
  texts = [t for s in (0, 1) for _, e in _coco_examples(32, s)
           for t in e["captions"]["text"]]
  vocab = tokenizer.write_vocab(tokenizer.build_vocab(texts), root / "vocab.txt")
  return str(root), str(vocab)


def test_paper_config_smoke_run_on_mock_coco(mock_coco_dir, tmp_path):
  data_dir, vocab_path = mock_coco_dir
  config = align_vit_b16_bert_base.get_config()
  assert config.dataset.text_key == "captions/text" and config.dataset.label_key is None
  config.dataset.data_dir = data_dir
  config.text.vocab_path = vocab_path
  config.input.image_size = 32
  config.input.worker_count = 0
  config.input.read_threads = 0
  config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2)
  config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 2
  config.optimizer.warmup_steps = 1
  config.log_every_steps = 1
  config.evals.image_text.num_images = 12
  # One device: the config's data=-1 mesh is then 1 device (meshes of 8 are
  # checked with the small dual encoder); compiling for 8 takes twice as long.
  results = train.run(config, str(tmp_path), devices=jax.devices()[:1])

  log = train.MetricsLog.read(tmp_path / "metrics.jsonl")
  assert [m["step"] for m in log] == [1, 2]
  assert all(np.isfinite(m["loss"]) for m in log)
  assert all(m["text_empty"] == 0 for m in log)
  nesting = [12, 24, 48, 96, 192, 384, 768]
  assert results["nesting_dims"] == nesting
  assert sorted(m for m in log[0] if m.startswith("loss_dim")) == sorted(
      f"loss_dim{m}" for m in nesting)
  dims = {str(d) for d in results["eval_dims"]}
  assert set(results["metrics"]) == {f"{d}_recall@{k}" for d in ("i2t", "t2i")
                                     for k in (1, 5, 10)}
  for per_dim in results["metrics"].values():
    assert set(per_dim) == dims
    assert all(0.0 <= v <= 1.0 for v in per_dim.values())
  on_disk = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert on_disk["metrics"] == results["metrics"]


# ------------------------------------------------------------------ training --


def test_dual_encoder_trains_and_classifies_zero_shot(caption_data, tmp_path):
  config = align_config(caption_data)
  results = train.run(config, str(tmp_path))
  log = train.MetricsLog.read(tmp_path / "metrics.jsonl")
  assert [m["step"] for m in log] == list(range(1, 41))
  losses = [m["loss"] for m in log]
  assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
  assert log[0]["temperature"] == pytest.approx(1.0, abs=1e-2)
  assert abs(log[-1]["temperature"] - 1.0) > 1e-3
  # The first epoch (steps 1-4) holds the 2 empty texts and the 1 long one.
  per_epoch = config.batch_size * np.sum([[m["text_empty"], m["text_truncated"]]
                                          for m in log[:4]], axis=0)
  np.testing.assert_allclose(per_epoch, [2, 1])
  assert {k for k in log[0] if k.startswith("loss_dim")} == {"loss_dim4", "loss_dim8",
                                                             "loss_dim16"}
  dims = {"4", "6", "8", "12", "16"}
  metrics = results["metrics"]
  for name in ("zeroshot_top1", "knn_top1", "i2t_recall@1", "t2i_recall@5"):
    assert set(metrics[name]) == dims, name
  # Chance is 0.25; this run reaches 1.0 at every dim.
  assert metrics["zeroshot_top1"]["16"] >= 0.8, metrics["zeroshot_top1"]
  assert min(metrics["zeroshot_top1"].values()) >= 0.5, metrics["zeroshot_top1"]
  assert metrics["knn_top1"]["16"] >= 0.7, metrics["knn_top1"]


def _train_steps(config, devices=None, *, steps=2, init=None):
  """Metrics of `steps` train steps on `devices` (default: all 8) and the
  initial state on the host: the trainer's own init, step and input pipeline,
  without train.run's checkpoints and evaluation. `init` (a host state)
  replaces the initialisation, so that two meshes start from equal params."""
  mesh = sharding.create_mesh(config.mesh, devices)
  facts = train.check_config(config, mesh)
  task = tasks.get_task(config, facts)
  tx = train.build_optimizer(config, config.num_train_steps)
  init_fn = functools.partial(task.init_state, tx)  # as train.run: same program
  _, shardings = train.abstract_train_state(init_fn, mesh)
  step = train.make_train_step(config, facts, task, tx, mesh, shardings)
  batches = iter(input_pipeline.create_train_loader(config))
  out = []
  with jax.set_mesh(mesh):
    if init is None:
      state = jax.jit(init_fn, out_shardings=shardings)()
      init = jax.device_get(state)
    else:
      state = jax.device_put(init, shardings)
    for _ in range(steps):
      batch = input_pipeline.make_global_batch(next(batches),
                                               sharding.batch_sharding(mesh))
      state, metrics = step(state, batch)
      out.append({k: float(v) for k, v in metrics.items()})
  return out, init


def test_contrastive_step_on_8_devices_equals_one_device(caption_data):
  """The loss is over the global batch: data=8 gives the 1-device values."""
  config = align_config(caption_data)  # = the training test's: compiled once
  many, init = _train_steps(config)
  one, _ = _train_steps(config, jax.devices()[:1], init=init)
  assert len(jax.devices()) == 8
  assert many[1]["loss"] != many[0]["loss"]
  for a, b in zip(many, one):
    for k in ("loss", "loss_dim4", "loss_dim8", "loss_dim16", "temperature"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)


def test_ff_sigmoid_trains_the_full_dim_with_a_learned_bias(caption_data):
  """:ff and :sigmoid in one run (one compile): the fixed-feature baseline's
  loss is the full dim's only; SigLIP's bias and temperature are learned."""
  config = align_config(caption_data, "ff,sigmoid,smoke", **{"optimizer.warmup_steps": 1})
  assert config.contrastive.kind == "sigmoid" and config.mrl.mode == "ff"
  log, init = _train_steps(config, steps=3)
  assert {k for k in log[0] if k.startswith("loss_dim")} == {"loss_dim16"}
  assert all(np.isfinite(m["loss"]) for m in log)
  assert log[0]["loss"] == pytest.approx(log[0]["loss_dim16"])
  # SigLIP's start: t = 10 (tau = 0.1), b = -10; both move (lr > 0 from step 2).
  np.testing.assert_allclose(init["params"]["log_scale"], [np.log(10.0)], rtol=1e-6)
  np.testing.assert_allclose(init["params"]["bias"], [-10.0])
  assert log[0]["temperature"] == pytest.approx(0.1, rel=1e-5)
  assert log[0]["bias"] == pytest.approx(-10.0)
  assert log[-1]["bias"] != log[0]["bias"]
  assert log[-1]["temperature"] != log[0]["temperature"]


@pytest.mark.parametrize("arg", ["sigmoid,per_prefix,smoke", "per_prefix,smoke"])
def test_per_prefix_temperatures(caption_data, arg):
  """One log scale (and bias) per nesting dim, through the loss (traced)."""
  config = align_config(caption_data, arg)
  task = tasks.get_task(config, _check(config))
  state = jax.eval_shape(functools.partial(task.init_state, train.build_optimizer(config, 4)))
  assert state["params"]["log_scale"].shape == (3,)
  sigmoid = config.contrastive.kind == "sigmoid"
  assert ("bias" in state["params"]) == sigmoid
  batch = next(iter(input_pipeline.create_train_loader(config)))
  loss, (per_dim, extra, _) = jax.eval_shape(task.loss, state["params"], state["rest"],
                                             batch)
  assert loss.shape == () and per_dim.shape == (3,)
  assert extra["temperature"].shape == () and ("bias" in extra) == sigmoid


def test_fixed_temperature_is_state_not_a_parameter(caption_data):
  config = align_config(caption_data, **{"contrastive.learn_temperature": False,
                                         "contrastive.temperature": 0.05})
  task = tasks.get_task(config, _check(config))
  state = jax.eval_shape(functools.partial(task.init_state, train.build_optimizer(config, 4)))
  assert "log_scale" not in state["params"]
  assert state["rest"]["log_scale"].shape == (1,)


class _Tower(nnx.Module):
  def __call__(self, x, *, train=False):
    return None, {"embedding": x}


def test_temperature_clip_and_bad_arguments():
  model = dual_encoder.DualEncoder(_Tower(), _Tower(), nesting_dims=[2, 4],
                                   temperature=0.001, max_scale=100.0)
  np.testing.assert_allclose(model.temperature(), [0.01], rtol=1e-5)  # CLIP's clip
  assert model.loss_params()["temperature"].shape == ()
  model = dual_encoder.DualEncoder(_Tower(), _Tower(), nesting_dims=[2, 4],
                                   kind="sigmoid", per_prefix=True)
  params = model.loss_params()
  np.testing.assert_allclose(params["temperature"], [0.1, 0.1], rtol=1e-5)
  np.testing.assert_allclose(params["bias"], [-10.0, -10.0])
  x = np.ones((3, 4), np.float32)
  _, aux = model(x, 2 * x)
  np.testing.assert_array_equal(aux["text_embedding"], 2 * x)
  for kwargs, match in [
      (dict(temperature=0.0), r"config\.contrastive\.temperature=0\.0 must be > 0"),
      (dict(bias=1.0), r"config\.contrastive\.bias=1\.0 applies only to kind='sigmoid'"),
      (dict(kind="hinge"), r"config\.contrastive\.kind='hinge'"),
  ]:
    with pytest.raises(ValueError, match=match):
      dual_encoder.DualEncoder(_Tower(), _Tower(), nesting_dims=[2, 4], **kwargs)


# ------------------------------------------------------------------ evaluators --


def test_zeroshot_accuracy_truncates_per_dim():
  # Class 0: both prompts along +x. Class 1: up and to the left.
  prompts = np.array([[1, 0], [1, 0], [-1, 3], [-1, 5]], np.float32)
  images = np.array([[1, 4], [1, -1]], np.float32)
  # dim 1: every prefix is +-1: [1] and [1] both pick class 0 (x > 0).
  # dim 2: [1, 4] is nearer class 1's (-0.25, 0.97) than (1, 0).
  acc = zeroshot.zeroshot_accuracy(images, np.array([1, 0]), prompts, 2, [1, 2])
  assert acc == {1: 0.5, 2: 1.0}


def test_zeroshot_averages_normalised_prompts():
  # Class 0's prompts (10, -1) and (0, 1) average, once normalised, to the
  # direction (0.742, 0.671); their raw mean (5, 0) would point along x.
  # Class 1: (0.981, 0.196). The image (1, 0.6) has cosine 0.982 with class
  # 0 and 0.942 with class 1 (0.858 with the raw-mean class 0 vector).
  prompts = np.array([[10, -1], [0, 1], [1, 0.2], [1, 0.2]], np.float32)
  vectors = zeroshot.class_vectors(prompts, 2, 2)
  np.testing.assert_allclose(vectors[0], [0.7422, 0.6702], atol=1e-3)
  acc = zeroshot.zeroshot_accuracy(np.array([[1, 0.6]], np.float32), np.array([0]),
                                   prompts, 2, [2])
  assert acc == {2: 1.0}
  with pytest.raises(ValueError, match=r"labels in \[0, 2\)"):
    zeroshot.zeroshot_accuracy(np.ones((1, 2), np.float32), np.array([2]), prompts, 2, [2])


def test_prompts_class_major_and_template_errors():
  assert zeroshot.prompts(["cat", "dog"], ["a {}.", "the {}!"]) == [
      "a cat.", "the cat!", "a dog.", "the dog!"]
  for bad in ("a photo of a cat.", "{} and {}"):
    with pytest.raises(ValueError, match=r"exactly one '\{\}'"):
      zeroshot.prompts(["cat"], [bad])


def test_image_text_recall_hand_example():
  v = 1.0
  images = np.array([[1, 0], [0, 1], [v, v], [1, 0], [-1, 0]], np.float32)
  texts = np.zeros((5, 2, 2), np.float32)
  mask = np.zeros((5, 2), bool)
  texts[0] = [[1, 0], [0, 1]]  # image 0: two captions
  texts[1, 0] = [0, 1]         # = image 0's second caption (a tie)
  texts[2, 0] = [v, v]
  texts[3, 0] = [1, 0]         # = image 0's first caption; image 3 = image 0
  mask[0] = True
  mask[1:4, 0] = True          # images 1-3: second caption missing
  texts[1, 1] = texts[4] = 7.0  # masked captions' values are never read
  # A third feature of noise: the dim-2 prefixes ignore it.
  noise = np.random.default_rng(0).normal(size=(5, 1)).astype(np.float32)
  images3 = np.concatenate([images, noise], axis=1)
  texts3 = np.concatenate([texts, 5 * np.ones((5, 2, 1), np.float32)], axis=2)
  out = zeroshot.image_text_recall(images3, texts3, mask, [2], ks=[1, 2, 3])
  # i2t (image 4 has no caption and is left out): images 0 and 2 rank their
  # own caption first; image 1's caption ties with image 0's identical one,
  # which has the lower index, and so does image 3's: rank 2.
  assert out["i2t_recall@1"] == {2: 0.5}
  assert out["i2t_recall@2"] == {2: 1.0}
  # t2i over the 5 captions: image 0's second caption (0, 1) has images 1
  # and 2 nearer (rank 3); image 3's caption ties with image 0 (rank 2).
  assert out["t2i_recall@1"] == {2: 0.6}
  assert out["t2i_recall@2"] == {2: 0.8}
  assert out["t2i_recall@3"] == {2: 1.0}
  with pytest.raises(ValueError, match="needs captions"):
    zeroshot.image_text_recall(images, texts, np.zeros((5, 2), bool), [2])


# ------------------------------------------------------------------ bad input --


def _check(config):
  return train.check_config(config, sharding.create_mesh(config.mesh))


@pytest.mark.parametrize("overrides, error, match", [
    ({"text.vocab_path": "/nonexistent/vocab.txt"}, FileNotFoundError,
     r"config\.text\.vocab_path='/nonexistent/vocab\.txt'"),
    ({"text.max_len": 1}, ValueError, r"config\.text\.max_len=1"),
    ({"dataset.text_key": "caption"}, ValueError, r"config\.dataset\.text_key='caption'"),
    ({"dataset.text_key": None}, ValueError, r"dual_encoder.*config\.dataset\.text_key=None"),
    ({"mrl.mode": "mrl_e"}, ValueError, r"config\.mrl\.mode='mrl_e'"),
    ({"contrastive.bias": -5.0}, ValueError, r"config\.contrastive\.bias=-5\.0"),
    ({"contrastive.kind": "sigmoid", "contrastive.max_scale": None,
      "contrastive.label_smoothing": 0.1}, ValueError,
     r"config\.contrastive\.label_smoothing=0\.1"),
    ({"contrastive.kind": "sigmoid"}, ValueError, r"config\.contrastive\.max_scale"),
    ({"contrastive.kind": "hinge"}, ValueError, r"config\.contrastive\.kind='hinge'"),
    ({"contrastive.block_size": 0}, ValueError, r"config\.contrastive\.block_size=0 must be"),
    ({"evals.linear": {"type": "linear"}}, ValueError, r"config\.evals\.linear\.type='linear'"),
    ({"evals.zeroshot.class_names": ["cat", "dog", "car"]}, ValueError,
     r"config\.evals\.zeroshot\.class_names has 3 names but the dataset has 4 classes"),
    ({"evals.zeroshot.templates": ["a photo"]}, ValueError, r"Zero-shot template 'a photo'"),
    ({"model.text.variant": "XXL"}, ValueError, r"config\.model\.text\.variant='XXL'"),
    ({"model.text.pool_type": "max"}, ValueError, r"config\.model\.text\.pool_type='max'"),
])
def test_bad_config_is_rejected_before_compute(caption_data, overrides, error, match):
  config = align_config(caption_data, **overrides)
  with pytest.raises(error, match=match):
    _check(config)


@pytest.mark.parametrize("impl", ["native", "xla"])
def test_removed_contrastive_impl_is_rejected(caption_data, impl):
  """contrastive.impl is gone (XLA computes the loss everywhere): any value is refused."""
  config = align_config(caption_data, **{"contrastive.impl": impl})
  with pytest.raises(ValueError, match=rf"config\.contrastive\.impl='{impl}': this field was "
                     r"removed.*delete contrastive\.impl from the config"):
    _check(config)


def test_bad_vocab_file_names_the_field(caption_data, tmp_path):
  path = tokenizer.write_vocab(["[PAD]", "[UNK]", "[CLS]", "cat"], tmp_path / "v.txt")
  config = align_config(caption_data, **{"text.vocab_path": str(path)})
  with pytest.raises(ValueError, match=r"config\.text\.vocab_path='.*v\.txt'.*lacks the "
                     r"special tokens \['\[SEP\]'\]"):
    _check(config)


def test_text_evals_on_a_classifier_are_rejected(fake_dataset_dir):
  config = tiny_config.get_config(fake_dataset_dir)
  config.evals = dict(zeroshot=dict(type="zeroshot", class_names=list(NAMES)))
  with pytest.raises(ValueError, match=r"config\.evals\.zeroshot\.type='zeroshot' needs a "
                     "text tower"):
    _check(config)
  config.evals = dict(it=dict(type="image_text"))
  with pytest.raises(ValueError, match=r"config\.evals\.it\.type='image_text'"):
    _check(config)


def test_good_config_facts(caption_data):
  facts = _check(align_config(caption_data))
  assert facts["vocab_size"] == len(
      open(caption_data[1], encoding="utf-8").read().splitlines())
  assert facts["head_dims"] == [4, 8, 16]


# ------------------------------------------------------------- demo vocabulary --


def test_demo_vocab_file_is_current_and_covers_every_demo_text():
  with open(captions.DEMO_VOCAB_PATH, encoding="utf-8") as f:
    assert f.read() == "".join(t + "\n" for t in captions.demo_vocab())
  config = fashion_mnist_align.get_config()
  tok = tokenizer.WordPieceTokenizer(config.text.vocab_path,
                                     lowercase=config.text.lowercase,
                                     max_len=config.text.max_len)
  texts = captions.demo_texts()
  prompts = zeroshot.prompts(config.evals.zeroshot.class_names,
                             config.evals.zeroshot.templates)
  assert set(prompts) <= set(texts)
  out = tok.encode_batch(texts)
  assert not (out["ids"] == tok.unk_id).any()
  assert not out["truncated"].any() and not out["empty"].any()
  # Captions of every class, as the builder writes them, are demo texts.
  for label in range(10):
    assert set(captions.class_captions(label, f"train/{label}")) <= set(texts)
