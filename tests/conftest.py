"""Test setup: 8 host CPU devices so sharding is really exercised."""
import os
import tempfile

# Must happen before JAX is imported anywhere.
# Tests check results, not speed: XLA's backend optimisation level 0 halves
# compile times (most of a test's time with these tiny models), and a
# persistent compilation cache shared with the subprocess tests reuses the
# programs that several tests compile identically.
TEST_XLA_FLAGS = "--xla_force_host_platform_device_count={} --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS.format(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# This process and the ones tests spawn may all compile for TPU topologies
# (tests/test_compile.py); libtpu's lockfile would refuse the second.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mrl_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def build_fake_image_dataset(data_dir, name="fake_images", *, num_train=192,
                             num_test=64, shape=(8, 8, 1), num_classes=4,
                             file_format="array_record"):
  """A small learnable TFDS image dataset: each class is a brightness band."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=shape),
      "label": tfds.features.ClassLabel(num_classes=num_classes),
  })

  def examples(n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      label = i % num_classes
      base = 30 + 200 * label / max(num_classes - 1, 1)
      img = np.clip(base + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
      yield i, {"image": img, "label": label}

  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version="1.0.0", features=features,
      split_datasets={"train": examples(num_train, 0), "test": examples(num_test, 1)},
      config=None, data_dir=str(data_dir), file_format=file_format,
      disable_shuffling=True)
  return str(data_dir)


@pytest.fixture(scope="session")
def fake_dataset_dir(tmp_path_factory):
  """Directory holding the TFDS dataset 'fake_images' (array_record)."""
  return build_fake_image_dataset(tmp_path_factory.mktemp("tfds"))


def build_mock_catalogue_dataset(data_dir, name, splits, num_examples=48):
  """`name` stored under `data_dir` with its real TFDS feature spec and version.

  Examples come from `tfds.testing.mock_data` (random values of the right
  types and shapes, e.g. JPEGs of random sizes for imagenet2012); storing them
  as array_record under the catalogue name makes `tfds.builder(name,
  data_dir=...)` find a prepared dataset, so every check and the real input
  pipeline run unchanged.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name)
  examples = {}
  with tfds.testing.mock_data(num_examples=num_examples):
    for split in splits:
      source = tfds.data_source(name, split=split, download=False)
      examples[split] = [(i, source[i]) for i in range(len(source))]
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=str(builder.version), features=builder.info.features,
      split_datasets={s: iter(e) for s, e in examples.items()}, config=None,
      data_dir=str(data_dir), file_format="array_record", disable_shuffling=True)
  return str(data_dir)


@pytest.fixture(scope="session")
def mock_imagenet_dir(tmp_path_factory):
  """'imagenet2012' with the real feature spec: 48 train + 48 validation."""
  return build_mock_catalogue_dataset(tmp_path_factory.mktemp("tfds_imagenet"),
                                      "imagenet2012", ("train", "validation"))
