"""`--mode=embed` (mrl_jax/export.py): files, dtypes, prefixes, normalisation, shards, errors.

Uses the checkpoint of the MRL run that tests/test_reproduce.py trains (one
tiny run per session, whichever test file asks first).
"""
import json

from absl import flags
import numpy as np
import pytest

from mrl_jax import export
from mrl_jax import reproduce
from mrl_jax.evaluators import knn
from tests import test_reproduce


@pytest.fixture
def mrl(tmp_path_factory, fake_dataset_dir):
  """(config, workdir) of the trained tiny MRL run."""
  workdir, _ = test_reproduce.trained_mrl(tmp_path_factory, fake_dataset_dir)
  config = reproduce.run_configs(test_reproduce.tiny(fake_dataset_dir), ["mrl"])["mrl"]["config"]
  return config, workdir / "mrl"


def test_exports_match_the_evaluation(mrl):
  config, workdir = mrl
  out = export.run_embed(config, str(workdir))
  assert out == workdir / "embeddings" / "test"
  assert sorted(p.name for p in out.iterdir()) == ["embeddings.npy", "labels.npy", "meta.json"]
  emb = np.load(out / "embeddings.npy")
  labels = np.load(out / "labels.npy")
  assert emb.dtype == np.float32 and emb.shape == (64, 16)
  assert labels.dtype == np.int64  # the TFDS ClassLabel's dtype, kept
  np.testing.assert_array_equal(labels, np.arange(64) % 4)  # split order (fake data: i % 4)
  meta = json.loads((out / "meta.json").read_text())
  assert meta["split"] == "test" and meta["dim"] == 16 and meta["dims"] == [4, 8, 16]
  assert meta["normalized"] is False and meta["label_dtype"] == "int64"
  assert meta["num_examples"] == 64 and meta["num_shards"] == 1 and meta["step"] == 3
  assert meta["config_name"] == "fashion_mnist_vit_mrl" and meta["mode"] == "mrl"
  assert not np.allclose(np.linalg.norm(emb, axis=1), 1.0)  # raw, not normalised

  # The exported train and test embeddings give exactly the evaluation's 1-NN numbers.
  train_dir = export.run_embed(config, str(workdir), split="train")
  train_emb, train_labels, _ = export.load_embeddings(train_dir)
  assert train_emb.shape == (192, 16)
  results = json.loads((workdir / "eval" / "results.json").read_text())
  top1 = knn.knn_top1(emb, labels, train_emb, train_labels, [4, 8, 16])
  assert {str(m): v for m, v in top1.items()} == {
      m: v for m, v in results["metrics"]["knn_top1"].items() if m in ("4", "8", "16")}


  # A prefix, normalised, in shards of 20 rows.
  out = export.run_embed(config, str(workdir), dim=8, normalize=True, shard_size=20)
  names = sorted(p.name for p in out.iterdir())
  assert names == ([f"embeddings-{i:05d}-of-00004.npy" for i in range(4)]
                   + [f"labels-{i:05d}-of-00004.npy" for i in range(4)] + ["meta.json"])
  assert [len(np.load(out / f"embeddings-{i:05d}-of-00004.npy")) for i in range(4)] == [20, 20, 20, 4]
  short, short_labels, meta = export.load_embeddings(out)
  assert meta["dim"] == 8 and meta["dims"] == [4, 8] and meta["normalized"] is True
  assert meta["num_shards"] == 4 and short.shape == (64, 8) and short_labels.dtype == np.int64
  np.testing.assert_array_equal(short_labels, labels)
  prefix = emb[:, :8]
  np.testing.assert_allclose(short, prefix / np.linalg.norm(prefix, axis=1, keepdims=True),
                             rtol=1e-5, atol=1e-6)


def test_write_embeddings_replaces_an_earlier_layout(tmp_path):
  emb = np.arange(30, dtype=np.float32).reshape(10, 3)
  labels = np.arange(10, dtype=np.int16)
  meta = export.write_embeddings(tmp_path, emb, labels, {"dim": 3}, shard_size=4)
  assert meta["num_shards"] == 3 and [f["num_examples"] for f in meta["files"]] == [4, 4, 2]
  (tmp_path / "other.txt").write_text("kept")
  export.write_embeddings(tmp_path, emb, None, {"dim": 3})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.npy", "meta.json", "other.txt"]
  out, out_labels, meta = export.load_embeddings(tmp_path)
  np.testing.assert_array_equal(out, emb)
  assert out_labels is None and meta["files"] == [{"embeddings": "embeddings.npy",
                                                   "num_examples": 10}]
  export.write_embeddings(tmp_path, emb, labels, {"dim": 3})
  assert export.load_embeddings(tmp_path)[1].dtype == np.int16  # integer dtype kept


def test_command_line(mrl, fake_dataset_dir):
  _, workdir = mrl
  from mrl_jax import main  # pylint: disable=g-import-not-at-top  (defines the global flags)
  argv = ["main", f"--config={test_reproduce.TINY_CONFIG}:{fake_dataset_dir}",
          f"--workdir={workdir}", "--mode=embed", "--split=train[:50]", "--embed_dim=4",
          "--normalize"]
  try:
    flags.FLAGS(argv)
    main.main([])
  finally:
    flags.FLAGS.unparse_flags()
  out = workdir / "embeddings" / "train_50"
  emb, labels, meta = export.load_embeddings(out)
  assert emb.shape == (50, 4) and labels.shape == (50,) and meta["split"] == "train[:50]"
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"dim": 32}, ValueError, r"--embed_dim=32 must be an int in \[1, 16\]"),
    ({"dim": 0}, ValueError, r"--embed_dim=0 must be"),
    ({"shard_size": 0}, ValueError, r"--shard_size=0 must be a positive"),
    ({"split": "validation"}, ValueError, r"--split='validation' is not a split of fake_images.*"
     r"Available splits: \['test', 'train'\]"),
])
def test_bad_options_fail_before_restoring(mrl, kwargs, error, match):
  config, workdir = mrl
  with pytest.raises(error, match=match):
    export.run_embed(config, str(workdir), **kwargs)


def test_no_checkpoint(mrl, tmp_path):
  config, _ = mrl
  with pytest.raises(FileNotFoundError, match=r"No checkpoint in .*train first"):
    export.run_embed(config, str(tmp_path))


def test_split_dirname():
  assert export.split_dirname("test") == "test"
  assert export.split_dirname("train[:10%]") == "train_10pct"
  assert export.split_dirname("train[10:20]+test") == "train_10_20_test"
