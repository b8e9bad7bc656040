r"""Builds TFDS datasets in array_record format, from local files when offline.

The input pipeline reads datasets with `tfds.data_source`, which needs random
access, i.e. TFDS's `array_record` file format. This module builds them:

  python -m mrl_jax.data.prepare --dataset=fashion_mnist --data_dir=/data

It first uses the dataset's own TFDS builder (download + prepare). For the
IDX-format datasets (MNIST, Fashion-MNIST, KMNIST) it can instead build the
very same dataset -- same name, version, splits, features and class names, so
`tfds.data_source(name, data_dir=...)` cannot tell the difference -- from
local IDX files, e.g. Debian's `dataset-fashion-mnist` package. That path is
taken when `--source_dir` is given, when the download host is unreachable, or
when the download fails. Local files are not handed to TFDS as a "manual
download" because redistributed copies are often recompressed, and TFDS's
checksums of the .gz files then reject them although the contents are the same.

A dataset already prepared in another format (tfrecord) gets array_record
copies of its shards, in place.

`check_dataset` / `check_config` validate a config's dataset fields before the
trainer spends any compute, with errors that say which field to fix and how.
"""

from __future__ import annotations

import dataclasses
import gzip
import socket
import struct
import time
from typing import Any, Iterator, Mapping, Sequence
import urllib.parse
import zlib

from absl import app
from absl import flags
from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
# The registered MNIST-family builders, subclassed below. Importing the module
# directly avoids loading the whole `tfds.image_classification` catalogue.
from tensorflow_datasets.image_classification import mnist

# Registers the image-caption datasets built from labelled ones.
from mrl_jax.data import captions  # pylint: disable=unused-import

ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD

# Where Debian's `dataset-fashion-mnist` package installs the original files.
DEFAULT_SOURCE_DIRS = {'fashion_mnist': '/usr/share/datasets/fashion-mnist'}

# How long to wait for the download host before falling back to local files.
# TFDS itself retries a dead host for minutes before giving up.
_PROBE_TIMEOUT_S = 3.0


def prepare_command(name: str, data_dir: str | None) -> str:
  """The shell command that builds `name` under `data_dir`."""
  command = f'python -m mrl_jax.data.prepare --dataset={name}'
  if data_dir is not None:
    command += f' --data_dir={data_dir}'
  return command


# ------------------------------------------------------------- IDX files --

# Element type codes of the IDX format (http://yann.lecun.com/exdb/mnist/).
# Multi-byte values are big-endian.
_IDX_DTYPES = {
    0x08: np.dtype('u1'),
    0x09: np.dtype('i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}


def read_idx(path: epath.PathLike) -> np.ndarray:
  """Reads an IDX file (gzip-compressed or not) into a numpy array.

  The header is parsed rather than skipped, so a truncated or mislabelled
  file fails loudly instead of yielding shifted pixels.
  """
  raw = epath.Path(path).read_bytes()
  if raw[:2] == b'\x1f\x8b':
    raw = gzip.decompress(raw)
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f'{path} is not an IDX file (bad magic number).')
  dtype = _IDX_DTYPES[raw[2]]
  ndim = raw[3]
  header_size = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(raw, '>u4', ndim, offset=4))
  expected = header_size + int(np.prod(shape)) * dtype.itemsize
  if len(raw) != expected:
    raise ValueError(
        f'{path}: header says shape {shape} ({expected} bytes with header),'
        f' file has {len(raw)} bytes.'
    )
  data = np.frombuffer(raw, dtype, offset=header_size).reshape(shape)
  return data.astype(dtype.newbyteorder('='))


class _IdxFilesMixin:
  """Makes an MNIST-family builder read its IDX files from a local folder.

  Only where the examples come from changes; `_info` (features, class names,
  description, citation) and the version are inherited from the registered
  builder, and the examples get the same keys (their index), hence the same
  on-disk shuffled order as a TFDS-built copy. Only the PNG bytes may differ
  (another encoder), never the decoded pixels.
  """

  _SPLIT_FILES = {'train': 'train', 'test': 't10k'}

  def __init__(self, *, source_dir: epath.PathLike, **kwargs):
    self._source_dir = epath.Path(source_dir)
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {
        split: self._generate_idx_examples(prefix)
        for split, prefix in self._SPLIT_FILES.items()
    }

  def _generate_idx_examples(self, prefix: str) -> Iterator[tuple[int, Any]]:
    images = read_idx(self._source_dir / f'{prefix}-images-idx3-ubyte.gz')
    labels = read_idx(self._source_dir / f'{prefix}-labels-idx1-ubyte.gz')
    expected_hw = tuple(self.info.features['image'].shape[:2])
    if images.shape[1:] != expected_hw or labels.shape != images.shape[:1]:
      raise ValueError(
          f'{self._source_dir}/{prefix}-*: expected [N, {expected_hw[0]},'
          f' {expected_hw[1]}] images and [N] labels, got {images.shape} and'
          f' {labels.shape}.'
      )
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': _encode_png(image), 'label': int(label)}


def _encode_png(image: np.ndarray) -> bytes:
  """Lossless PNG bytes for a [H, W] uint8 (grayscale) image.

  TFDS's `Image` feature stores already-encoded bytes as they are. Building
  the few PNG chunks directly is ~3x faster than PIL and far faster than the
  per-image TensorFlow call TFDS makes for a numpy array; encoding dominates
  the build time of MNIST-sized datasets.
  """
  height, width = image.shape
  # Each scanline is prefixed with its filter type; 0 = no filter.
  scanlines = np.zeros((height, width + 1), np.uint8)
  scanlines[:, 1:] = image

  def chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', crc)

  # IHDR: size, bit depth 8, colour type 0 (grayscale), default methods.
  header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  return b''.join((
      b'\x89PNG\r\n\x1a\n',
      chunk(b'IHDR', header),
      chunk(b'IDAT', zlib.compress(scanlines.tobytes())),
      chunk(b'IEND', b''),
  ))


# `name` and `__module__` are recorded in dataset_info.json; they are set to
# the registered builder's so the metadata matches a TFDS-built copy.
class _LocalMNIST(_IdxFilesMixin, mnist.MNIST, skip_registration=True):
  name = 'mnist'
  __module__ = mnist.__name__


class _LocalFashionMNIST(
    _IdxFilesMixin, mnist.FashionMNIST, skip_registration=True
):
  name = 'fashion_mnist'
  __module__ = mnist.__name__


class _LocalKMNIST(_IdxFilesMixin, mnist.KMNIST, skip_registration=True):
  name = 'kmnist'
  __module__ = mnist.__name__


_LOCAL_BUILDERS = {
    cls.name: cls for cls in (_LocalMNIST, _LocalFashionMNIST, _LocalKMNIST)
}


def _host_reachable(url: str | None) -> bool:
  """Cheap connectivity probe, so that offline runs fail over in seconds."""
  if not url:
    return True  # Unknown source: let TFDS try.
  parsed = urllib.parse.urlparse(url)
  port = parsed.port or (443 if parsed.scheme == 'https' else 80)
  try:
    with socket.create_connection((parsed.hostname, port), _PROBE_TIMEOUT_S):
      return True
  except OSError:
    return False


# --------------------------------------------------------------- prepare --


def prepare(
    name: str,
    data_dir: epath.PathLike | None,
    *,
    source_dir: epath.PathLike | None = None,
) -> epath.Path:
  """Makes sure `name` exists in array_record format under `data_dir`.

  Args:
    name: TFDS name, optionally with config/version ('fashion_mnist',
      'imagenet2012:5.1.0').
    data_dir: TFDS data dir; None means TFDS's default (~/tensorflow_datasets).
    source_dir: folder with the original IDX files, for the datasets in
      `_LOCAL_BUILDERS`. Given explicitly, it is used without trying to
      download.

  Returns:
    The dataset's version folder.
  """
  data_dir = None if data_dir is None else str(data_dir)
  # Without a file format first: asking for array_record from a dataset that
  # exists only as tfrecord is an error rather than a "not prepared".
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    formats = builder.info.available_file_formats()
    if ARRAY_RECORD in formats:
      print(f'{name} is already prepared in array_record at {builder.data_dir}')
      return epath.Path(builder.data_dir)
    return _convert_to_array_record(builder, formats)
  builder = tfds.builder(name, data_dir=data_dir, file_format=ARRAY_RECORD)

  local_builder = _LOCAL_BUILDERS.get(builder.name)
  if local_builder is not None and local_builder.VERSION != builder.version:
    local_builder = None  # Only the registered version's layout is known.
  if local_builder is not None:
    if source_dir is not None:  # The user said where the files are.
      return _build_local(local_builder, data_dir, source_dir)
    source_dir = DEFAULT_SOURCE_DIRS.get(builder.name)
    if source_dir is not None and not epath.Path(source_dir).exists():
      source_dir = None
    if source_dir is not None and not _host_reachable(builder.URL):
      print(f'{builder.URL} is unreachable; building from {source_dir}.')
      return _build_local(local_builder, data_dir, source_dir)

  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-exception-caught
    # Any failure of the online path (no network, checksum mismatch, ...) is
    # recoverable when the same data exists locally.
    if local_builder is None or source_dir is None:
      raise RuntimeError(
          f'Could not build {name} with TFDS ({type(e).__name__}: {e}). Check'
          ' network access, or follow the manual-download instructions of the'
          f' TFDS catalogue page for {builder.name}.'
      ) from e
    logging.warning(
        'TFDS could not build %s (%s); using %s.', name, e, source_dir
    )
    return _build_local(local_builder, data_dir, source_dir)
  print(f'{name} prepared in array_record at {builder.data_dir}')
  return epath.Path(builder.data_dir)


def _build_local(builder_cls, data_dir, source_dir) -> epath.Path:
  source_dir = epath.Path(source_dir)
  if not source_dir.exists():
    raise FileNotFoundError(
        f'--source_dir={source_dir} does not exist; it should hold the'
        f' {builder_cls.name} IDX files (train-images-idx3-ubyte.gz, ...).'
    )
  builder = builder_cls(
      source_dir=source_dir, data_dir=data_dir, file_format=ARRAY_RECORD
  )
  builder.download_and_prepare()
  print(
      f'{builder.name} {builder.version} built from {source_dir} in'
      f' array_record at {builder.data_dir}'
  )
  return epath.Path(builder.data_dir)


def _convert_to_array_record(builder, formats) -> epath.Path:
  """Writes array_record copies of the existing (e.g. tfrecord) shards.

  What `tfds convert_format` does in place, without its Apache Beam
  dependency: same records and shard layout, and dataset_info.json lists
  array_record as an alternative format, so both readers keep working.
  """
  info = builder.info
  print(
      f'{builder.name} exists at {builder.data_dir} as'
      f' {sorted(f.value for f in formats)}; adding array_record shards.'
  )
  reader = tfds.core.file_adapters.ADAPTER_FOR_FORMAT[info.file_format]
  writer = tfds.core.file_adapters.ADAPTER_FOR_FORMAT[ARRAY_RECORD]
  for split_info in info.splits.values():
    source = split_info.filename_template
    target = source.replace(filetype_suffix=ARRAY_RECORD.file_suffix)
    num_shards = split_info.num_shards
    for shard in range(num_shards):
      records = reader.make_tf_data(
          source.sharded_filepath(shard_index=shard, num_shards=num_shards)
      )
      path = target.sharded_filepath(shard_index=shard, num_shards=num_shards)
      # Written under a temporary name: an interrupted run leaves no shard
      # that looks complete.
      with tfds.core.utils.incomplete_file(path) as tmp_path:
        writer.write_examples(
            tmp_path, ((i, r.numpy()) for i, r in enumerate(records))
        )
  info.add_alternative_file_format(ARRAY_RECORD)
  info.write_dataset_info_json(builder.data_dir)
  return epath.Path(builder.data_dir)


# -------------------------------------------------------- config checks --


@dataclasses.dataclass(frozen=True)
class DatasetSummary:
  """What the trainer needs to know about a prepared dataset."""

  name: str
  path: str
  num_examples: dict[str, int]  # split as requested -> number of examples
  image_shape: tuple[int | None, ...]
  num_classes: int | None  # From a ClassLabel feature; None if not one.
  class_names: tuple[str, ...] | None


def check_dataset(
    name: str,
    data_dir: str | None,
    split: str | Sequence[str] | Mapping[str, str],
    image_key: str = 'image',
    label_key: str | None = 'label',
    num_classes: int | None = None,
    text_key: str | None = None,
) -> DatasetSummary:
  """Checks that the input pipeline can read a dataset; reads metadata only.

  Args:
    name: config.dataset.name.
    data_dir: config.dataset.data_dir.
    split: a split ('train', 'train[:90%]'), several, or a mapping from the
      config field that holds each split to the split, so that errors name the
      field (`{'config.dataset.eval_split': 'test'}`).
    image_key: config.dataset.image_key.
    label_key: config.dataset.label_key; None for unlabelled (image-text) data.
    num_classes: config.dataset.num_classes; None skips the label range check.
    text_key: config.dataset.text_key of image-text data (a string or a
      sequence of strings; 'captions/text' for a nested feature), or None.

  Returns:
    A DatasetSummary.

  Raises:
    ValueError: naming the config field, its value and the fix.
  """
  if isinstance(split, str):
    split = [split]
  if isinstance(split, Mapping):
    field_splits = list(split.items())
  else:
    field_splits = [('split', s) for s in split]
  fix = f'Build it with:\n  {prepare_command(name, data_dir)}'
  where = f'config.dataset.data_dir={data_dir!r}'

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f'config.dataset.name={name!r} is neither in the TFDS catalogue nor'
        f' under {where}. Check the spelling; if it is a dataset still to be'
        f' built: {fix}'
    ) from None
  if not builder.is_prepared():
    raise ValueError(
        f'config.dataset.name={name!r} is not prepared under {where} (looked'
        f' for {builder.data_dir}). {fix}'
    )
  info = builder.info
  formats = info.available_file_formats()
  if ARRAY_RECORD not in formats:
    raise ValueError(
        f'config.dataset.name={name!r} under {where} is stored as'
        f' {sorted(f.value for f in formats)}, but the input pipeline needs'
        f' random access (array_record). Convert it with:\n'
        f'  {prepare_command(name, data_dir)}'
    )

  num_examples = {}
  available = sorted(info.splits.keys())
  for field, split_name in field_splits:
    try:
      num_examples[split_name] = info.splits[split_name].num_examples
    except (KeyError, ValueError, AssertionError) as e:
      hint = f' Set --{field}=SPLIT.' if field.startswith('config.') else ''
      # Name TFDS's reason only for a bad slice ('train[:200%]'); for an
      # unknown split the list of splits says it all.
      base = split_name.split('[')[0]
      reason = f' ({e})' if base in info.splits else ''
      raise ValueError(
          f'{field}={split_name!r} is not a split of {name}{reason}. Available'
          f' splits: {available}.{hint}'
      ) from None

  features = info.features
  keys = sorted(features.keys())
  if image_key not in features:
    raise ValueError(
        f'config.dataset.image_key={image_key!r} is not a feature of {name};'
        f' available keys: {keys}. Set --config.dataset.image_key=KEY.'
    )
  image_shape = tuple(features[image_key].shape)
  if len(image_shape) not in (2, 3):
    raise ValueError(
        f'config.dataset.image_key={image_key!r} has shape {image_shape}, not'
        f' an image [H, W, C]; available keys: {keys}.'
    )
  if text_key is not None:
    from mrl_jax.data import preprocess  # pylint: disable=g-import-not-at-top
    try:
      top = preprocess.top_level_key(text_key, keys)
      feature = features[top]
      for part in filter(None, text_key[len(top):].split('/')):
        feature = getattr(feature, 'feature', feature)[part]  # into Sequence
    except (KeyError, TypeError):
      raise ValueError(
          f'config.dataset.text_key={text_key!r} is not a feature of {name};'
          f' available keys: {keys}. Image-text data needs a text feature:'
          ' set --config.dataset.text_key=KEY (e.g. captions/text for'
          ' coco_captions).'
      ) from None
  if label_key is None:
    return DatasetSummary(
        name=name, path=str(builder.data_dir), num_examples=num_examples,
        image_shape=image_shape, num_classes=None, class_names=None)
  if label_key not in features:
    raise ValueError(
        f'config.dataset.label_key={label_key!r} is not a feature of {name};'
        f' available keys: {keys}. Set --config.dataset.label_key=KEY.'
    )
  label = features[label_key]
  dataset_classes = None
  class_names = None
  if isinstance(label, tfds.features.ClassLabel):
    dataset_classes = label.num_classes
    class_names = tuple(label.names)
  if (
      num_classes is not None
      and dataset_classes is not None
      and dataset_classes > num_classes
  ):
    raise ValueError(
        f'config.dataset.num_classes={num_classes} but {name}:{label_key} has'
        f' {dataset_classes} classes, so labels >= num_classes would occur.'
        f' Set --config.dataset.num_classes={dataset_classes}.'
    )
  return DatasetSummary(
      name=name,
      path=str(builder.data_dir),
      num_examples=num_examples,
      image_shape=image_shape,
      num_classes=dataset_classes,
      class_names=class_names,
  )


def check_config(config) -> DatasetSummary:
  """`check_dataset` for a config's train and eval splits."""
  ds = config.dataset
  splits = {'config.dataset.train_split': ds.train_split}
  if ds.get('eval_split'):
    splits['config.dataset.eval_split'] = ds.eval_split
  return check_dataset(
      ds.name,
      ds.get('data_dir'),
      splits,
      image_key=ds.get('image_key', 'image'),
      label_key=ds.get('label_key', 'label'),
      num_classes=ds.get('num_classes'),
      text_key=ds.get('text_key'),
  )


# ------------------------------------------------------------------- CLI --


def _define_flags() -> None:
  # Defined only when run as a script: the trainer imports this module for
  # `check_config`, and must not inherit --dataset / --data_dir flags.
  flags.DEFINE_string('dataset', None, 'TFDS dataset name.', required=True)
  flags.DEFINE_string(
      'data_dir', None, 'TFDS data dir (default: the TFDS default data dir).'
  )
  flags.DEFINE_string(
      'source_dir',
      None,
      'Folder with the original IDX files of mnist / fashion_mnist / kmnist;'
      ' used instead of downloading. For fashion_mnist, when offline, the'
      f' default is {DEFAULT_SOURCE_DIRS["fashion_mnist"]}.',
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  start = time.perf_counter()
  prepare(
      flags.FLAGS.dataset,
      flags.FLAGS.data_dir,
      source_dir=flags.FLAGS.source_dir,
  )
  print(f'done in {time.perf_counter() - start:.1f}s')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
