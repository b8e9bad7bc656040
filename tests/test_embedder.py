"""`mrl_jax.load(workdir)` (mrl_jax/embedder.py): the rows `--mode=embed` writes,
from raw pixels or model input, at any prefix and batch size; texts of a dual
encoder as its evaluation embeds captions; bad inputs.

Images: the checkpoint of the MRL run that tests/test_reproduce.py trains (one
tiny run per pytest run). Texts: a tiny dual encoder with random weights, saved
as a checkpoint.
"""
import jax
import numpy as np
import pytest

import mrl_jax
from mrl_jax import checkpoint
from mrl_jax import evaluate
from mrl_jax import export
from mrl_jax import train
from mrl_jax import workdir as workdir_lib
from mrl_jax.data import prepare
from mrl_jax.data import preprocess
from tests import test_align
from tests import test_export
from tests.test_align import caption_data  # noqa: F401  (a fixture)

mrl = test_export.mrl  # the fixture: (config, workdir) of the trained tiny run


def _test_images(config):
  """The eval split's raw uint8 images [N, 8, 8, 1], in split order."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source(config.dataset.name, data_dir=config.dataset.data_dir,
                            split=config.dataset.eval_split, download=False)
  return np.stack([np.asarray(source[i]["image"]) for i in range(len(source))])


_LOADED = {}  # the embedder of the trained run, loaded once


@pytest.fixture
def loaded(mrl):
  """(embedder, config, workdir, raw test images) of the trained run."""
  config, workdir = mrl
  if "encoder" not in _LOADED:
    _LOADED["encoder"] = mrl_jax.load(workdir)
  return _LOADED["encoder"], config, workdir, _test_images(config)



def test_images_equal_the_exported_embeddings(loaded):
  encoder, config, workdir, images = loaded
  assert (workdir / "config.json").exists()
  assert encoder.step == 3 and encoder.embedding_size == 16
  assert encoder.nesting_dims == (4, 8, 16)
  assert images.dtype == np.uint8 and images.shape == (64, 8, 8, 1)
  raw = encoder.embed_images(images, dim=16, normalize=False)
  exported = np.load(export.run_embed(config, str(workdir), dim=16) / "embeddings.npy")
  assert raw.dtype == np.float32 and raw.shape == (64, 16)
  np.testing.assert_allclose(raw, exported, atol=1e-6)
  unit = np.load(export.run_embed(config, str(workdir), dim=16, normalize=True)
                 / "embeddings.npy")
  np.testing.assert_allclose(encoder.embed_images(images, dim=16), unit, atol=1e-6)

  # A prefix is the first columns, re-normalised.
  short = encoder.embed_images(images, dim=4)
  np.testing.assert_allclose(short, raw[:, :4] / np.linalg.norm(raw[:, :4], axis=1,
                                                                keepdims=True), atol=1e-6)
  # Any batch size (24: batches 24, 24, 16), grayscale [N, H, W], a list of
  # images and the preprocessed float input give the same rows.
  np.testing.assert_allclose(encoder.embed_images(images, normalize=False, batch_size=24),
                             raw, atol=1e-6)
  np.testing.assert_allclose(encoder.embed_images(images[..., 0], normalize=False), raw,
                             atol=1e-6)
  views = encoder.preprocess_images(list(images))
  assert views.dtype == np.uint8 and views.shape == (64, 8, 8, 1)
  np.testing.assert_array_equal(views, np.stack([preprocess.eval_image(x, 8, True)
                                                 for x in images]))
  floats = preprocess.normalize(views)  # what the embed step computes on the device
  np.testing.assert_allclose(encoder.embed_images(floats, normalize=False), raw, atol=1e-6)
  assert encoder.embed_images(images[:0]).shape == (0, 16)


def test_without_the_training_data(loaded, tmp_path):
  """The dataset's facts from the config where it is not prepared; step chosen."""
  encoder, config, workdir, images = loaded
  cfg = encoder.config.copy_and_resolve_references()
  cfg.dataset.data_dir = str(tmp_path)  # nothing prepared there
  with cfg.unlocked():
    cfg.input.channels = 1
  with pytest.raises(ValueError, match="neither in the TFDS catalogue nor under"):
    prepare.check_config(cfg)  # what setup would read
  other = mrl_jax.load(workdir, config=cfg, step=3)
  assert other.step == 3
  np.testing.assert_allclose(other.embed_images(images, dim=8),
                             encoder.embed_images(images, dim=8), atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"dim": 0}, r"dim=0 must be an int in \[1, 16\] .*nesting dims \[4, 8, 16\]"),
    ({"dim": 17}, r"dim=17 must be an int in \[1, 16\]"),
    ({"dim": 4.0}, r"dim=4.0 must be an int"),
    ({"batch_size": 0}, r"batch_size=0 must be a positive int"),
])
def test_bad_options(loaded, kwargs, match):
  encoder, _, _, images = loaded
  with pytest.raises(ValueError, match=match):
    encoder.embed_images(images, **kwargs)


@pytest.mark.parametrize("shape, dtype, match", [
    ((2, 8, 8, 3), np.uint8, r"Image 0 has dtype uint8 and shape \(8, 8, 3\); expected uint8 "
                             r"pixels \[H, W, 1\]"),
    ((8, 8), np.uint8, r"images of shape \(8, 8\): expected uint8 \[N, H, W, 1\].*images\[None\]"),
    ((2, 8, 8, 1), np.int64, r"Image 0 has dtype int64"),
    ((2, 4, 4, 1), np.float32, r"Float images are taken as the model's preprocessed input, "
                               r"\[N, 8, 8, 1\].*got shape \(2, 4, 4, 1\)"),
])
def test_bad_images(loaded, shape, dtype, match):
  encoder = loaded[0]
  with pytest.raises(ValueError, match=match):
    encoder.embed_images(np.zeros(shape, dtype))


def test_image_run_has_no_texts_and_missing_files(loaded, tmp_path):
  encoder, config, workdir, _ = loaded
  with pytest.raises(ValueError, match=r"this run is an image model \(config.model.name='vit'"):
    encoder.embed_texts(["a photo of a cat."])
  with pytest.raises(FileNotFoundError, match=r"config.json does not exist.*config=get_config"):
    mrl_jax.load(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"No checkpoint in .*train first"):
    mrl_jax.load(tmp_path, config=config)
  with pytest.raises(FileNotFoundError,
                     match=r"No checkpoint of step=2 .*has steps \[3\].*newest \(3\)"):
    mrl_jax.load(workdir, config=config, step=2)


def test_texts_equal_the_evaluation_captions(caption_data, tmp_path):  # noqa: F811
  """A tiny dual encoder with random weights: its eval pipeline's caption and
  image embeddings are what embed_texts / embed_images give."""
  config = test_align.align_config(caption_data)
  # One device: on 8 the checkpoint's fingerprint program alone compiles for
  # seconds (the image tests above cover the 8-device batches).
  devices = jax.devices()[:1]
  s = train.setup(config, devices=devices)
  # The model part of a train state (all that restore_model reads), random
  # normal weights: no init program to compile.
  rng = np.random.default_rng(0)
  model = jax.tree.map(lambda a: jax.device_put(rng.normal(0, 0.3, a.shape).astype(a.dtype),
                                                a.sharding),
                       {k: s.abstract_state[k] for k in train.MODEL_KEYS})
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
  ckpt.save(1, model, force=True)
  ckpt.close()
  workdir_lib.save_config(tmp_path, config, 0)

  encoder = mrl_jax.load(tmp_path, devices=devices)  # its config read back from JSON
  assert encoder.step == 1 and encoder.nesting_dims == (4, 8, 16)
  assert encoder.config.mrl.nesting_dims == (4, 8, 16)  # JSON's list, a tuple again
  with jax.set_mesh(encoder.mesh):
    split = evaluate.embed_split(encoder.config, encoder.task, encoder.state, encoder.mesh,
                                 "test", with_logits=False, with_text=True)
  source = test_align._source(caption_data, "test")  # pylint: disable=protected-access
  texts, rows = [], []
  for i in range(len(source)):
    for j, text in enumerate(preprocess.as_texts(source[i]["captions"])[:3]):
      texts.append(text)
      rows.append(split["text_embedding"][i, j])
  assert split["text_mask"].sum() == len(texts) > 40
  np.testing.assert_allclose(encoder.embed_texts(texts, normalize=False, batch_size=16),
                             np.stack(rows), atol=1e-6)
  short = encoder.embed_texts(texts[:16], dim=8, batch_size=16)
  np.testing.assert_allclose(short, export.prepare_rows(np.stack(rows[:16]), 8, True),
                             atol=1e-6)
  images = np.stack([np.asarray(source[i]["image"]) for i in range(len(source))])
  np.testing.assert_allclose(encoder.embed_images(images, normalize=False),
                             split["embedding"], atol=1e-6)
  with pytest.raises(ValueError, match=r"texts must be a list of strings"):
    encoder.embed_texts("a photo of a cat.")
