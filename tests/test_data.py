"""Tests of the data layer: prepare, preprocess, input_pipeline.

The fake datasets store 8x8x1 images whose pixels all equal the example's id
(< 256), so every output row can be traced back to the example it came from.
"""

import gzip
import io
import struct

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from mrl_jax.data import input_pipeline
from mrl_jax.data import prepare
from mrl_jax.data import preprocess

NUM_TRAIN = 203
NUM_TEST = 50
NUM_CLASSES = 5
SIDE = 8


def _store(name, data_dir, file_format):
  """A fake dataset: train ids 0..202, test ids 0..49, label = id % 5."""

  def examples(n):
    for i in range(n):
      image = np.full((SIDE, SIDE), i, np.uint8)
      yield i, {'image': prepare._encode_png(image), 'label': i % NUM_CLASSES}

  tfds.dataset_builders.store_as_tfds_dataset(
      name=name,
      version='1.0.0',
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(SIDE, SIDE, 1)),
          'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
      }),
      split_datasets={
          'train': list(examples(NUM_TRAIN)),
          'test': list(examples(NUM_TEST)),
      },
      data_dir=data_dir,
      file_format=file_format,
  )


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  _store('fake_ids', path, 'array_record')
  return str(path)


def _config(data_dir, **input_overrides):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 8
  config.dataset = dict(
      name='fake_ids',
      data_dir=data_dir,
      train_split='train',
      eval_split='test',
      image_key='image',
      label_key='label',
      num_classes=NUM_CLASSES,
  )
  # Batches are uint8 (normalised on the device), so ids are the pixels.
  config.input = dict(
      image_size=SIDE, augment='none', crop_padding=2, worker_count=0,
  )
  config.input.update(input_overrides)
  return config


def _ids(images):
  """Example id of each row; asserts each row is one constant image."""
  pixels = np.asarray(images).astype(np.int64)  # uint8 batches: the pixels themselves
  flat = pixels.reshape(len(pixels), -1)
  assert (flat == flat[:, :1]).all()
  return flat[:, 0]


# ---------------------------------------------------------------- prepare --


def _write_idx(path, array, gz=True):
  codes = {np.dtype('u1'): 0x08, np.dtype('>i4'): 0x0C}
  header = bytes([0, 0, codes[array.dtype], array.ndim])
  header += struct.pack(f'>{array.ndim}I', *array.shape)
  data = header + array.tobytes()
  path.write_bytes(gzip.compress(data) if gz else data)


def test_read_idx_roundtrip(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (3, 4, 5), np.uint8)
  _write_idx(tmp_path / 'a.gz', images)
  _write_idx(tmp_path / 'a', images, gz=False)
  ints = np.arange(-3, 3, dtype='>i4')
  _write_idx(tmp_path / 'b.gz', ints)
  np.testing.assert_array_equal(prepare.read_idx(tmp_path / 'a.gz'), images)
  np.testing.assert_array_equal(prepare.read_idx(tmp_path / 'a'), images)
  np.testing.assert_array_equal(
      prepare.read_idx(tmp_path / 'b.gz'), np.arange(-3, 3))


def test_read_idx_rejects_bad_files(tmp_path):
  (tmp_path / 'bad').write_bytes(b'\x01\x02\x03\x04rest')
  with pytest.raises(ValueError, match='not an IDX'):
    prepare.read_idx(tmp_path / 'bad')
  images = np.zeros((3, 4, 5), np.uint8)
  _write_idx(tmp_path / 'short', images, gz=False)
  (tmp_path / 'short').write_bytes((tmp_path / 'short').read_bytes()[:-1])
  with pytest.raises(ValueError, match='header says shape'):
    prepare.read_idx(tmp_path / 'short')


def test_encode_png_decodes_to_same_pixels():
  image = np.random.default_rng(0).integers(0, 256, (5, 7), np.uint8)
  decoded = np.asarray(Image.open(io.BytesIO(prepare._encode_png(image))))
  np.testing.assert_array_equal(decoded, image)


def _fake_fashion_mnist_files(folder):
  folder.mkdir()
  rng = np.random.default_rng(0)
  for prefix, n in {'train': 6, 't10k': 3}.items():
    _write_idx(folder / f'{prefix}-images-idx3-ubyte.gz',
               rng.integers(0, 256, (n, 28, 28), np.uint8))
    _write_idx(folder / f'{prefix}-labels-idx1-ubyte.gz',
               rng.integers(0, 10, (n,), np.uint8))
  return folder


def test_prepare_fashion_mnist_from_idx_files(tmp_path, capsys):
  """A few fake IDX examples go through the real Fashion-MNIST builder path."""
  source = _fake_fashion_mnist_files(tmp_path / 'idx')
  data_dir = str(tmp_path / 'tfds')
  prepare.prepare('fashion_mnist', data_dir, source_dir=source)

  # Indistinguishable from the registered builder's output.
  registered = tfds.builder('fashion_mnist')
  ds = tfds.data_source('fashion_mnist', data_dir=data_dir, split='test',
                        download=False)
  assert len(ds) == 3
  info = ds.dataset_info
  assert info.version == registered.info.version
  assert info.features['label'].names == registered.info.features['label'].names
  assert info.features['image'].shape == (28, 28, 1)
  images = prepare.read_idx(source / 't10k-images-idx3-ubyte.gz')
  labels = prepare.read_idx(source / 't10k-labels-idx1-ubyte.gz')
  got = sorted((ex['image'][..., 0].tobytes(), int(ex['label'])) for ex in ds)
  assert got == sorted((im.tobytes(), int(l)) for im, l in zip(images, labels))

  summary = prepare.check_dataset('fashion_mnist', data_dir, ['train', 'test'],
                                  num_classes=10)
  assert summary.num_examples == {'train': 6, 'test': 3}
  assert summary.class_names[0] == 'T-shirt/top'

  capsys.readouterr()
  prepare.prepare('fashion_mnist', data_dir)  # Second call: nothing to do.
  assert 'already prepared' in capsys.readouterr().out


@pytest.mark.parametrize('online', [True, False])
def test_prepare_falls_back_to_local_files(tmp_path, monkeypatch, online):
  """Offline: no download attempt. Online but failing: local files after."""
  source = _fake_fashion_mnist_files(tmp_path / 'idx')
  monkeypatch.setitem(prepare.DEFAULT_SOURCE_DIRS, 'fashion_mnist', str(source))
  monkeypatch.setattr(prepare, '_host_reachable', lambda url: online)
  attempts = []

  def failing_download(self, dl_manager):
    attempts.append(self.name)
    raise OSError('no network')

  # The registered builder's download step; the local builder overrides it.
  monkeypatch.setattr(tfds.image_classification.FashionMNIST,
                      '_split_generators', failing_download)
  prepare.prepare('fashion_mnist', str(tmp_path / 'tfds'))
  assert attempts == (['fashion_mnist'] if online else [])
  summary = prepare.check_dataset('fashion_mnist', str(tmp_path / 'tfds'),
                                  'train')
  assert summary.num_examples == {'train': 6}


# ---------------------------------------------------------- check_dataset --


def test_check_dataset_ok(data_dir):
  summary = prepare.check_dataset('fake_ids', data_dir, ['train', 'test'],
                                  'image', 'label', NUM_CLASSES)
  assert summary.num_examples == {'train': NUM_TRAIN, 'test': NUM_TEST}
  assert summary.image_shape == (SIDE, SIDE, 1)
  assert summary.num_classes == NUM_CLASSES
  # Sub-splits are accepted as TFDS understands them.
  summary = prepare.check_dataset('fake_ids', data_dir, 'train[:10]')
  assert summary.num_examples == {'train[:10]': 10}
  assert prepare.check_config(_config(data_dir)).num_classes == NUM_CLASSES


@pytest.mark.parametrize('name', ['fashion_mnist', 'not_a_dataset'])
def test_check_dataset_missing_says_how_to_build(tmp_path, name):
  with pytest.raises(ValueError) as e:
    prepare.check_dataset(name, str(tmp_path), 'train')
  message = str(e.value)
  assert 'config.dataset.name' in message
  command = (
      f'python -m mrl_jax.data.prepare --dataset={name} --data_dir={tmp_path}')
  assert command in message


def test_check_dataset_not_array_record_then_prepare_converts(tmp_path):
  data_dir = str(tmp_path)
  _store('fake_tfrecord', data_dir, 'tfrecord')
  with pytest.raises(ValueError) as e:
    prepare.check_dataset('fake_tfrecord', data_dir, 'train')
  message = str(e.value)
  assert 'tfrecord' in message and 'array_record' in message
  assert f'--dataset=fake_tfrecord --data_dir={data_dir}' in message

  # The suggested fix works.
  prepare.prepare('fake_tfrecord', data_dir)
  summary = prepare.check_dataset('fake_tfrecord', data_dir, 'train')
  assert summary.num_examples == {'train': NUM_TRAIN}
  ds = tfds.data_source('fake_tfrecord', data_dir=data_dir, split='train',
                        download=False)
  assert sorted(int(x['label']) for x in ds) == sorted(
      i % NUM_CLASSES for i in range(NUM_TRAIN))


def test_check_dataset_missing_split(data_dir):
  config = _config(data_dir)
  config.dataset.eval_split = 'validation'
  with pytest.raises(ValueError) as e:
    prepare.check_config(config)
  message = str(e.value)
  assert "config.dataset.eval_split='validation'" in message
  assert "['test', 'train']" in message


@pytest.mark.parametrize('field', ['image_key', 'label_key'])
def test_check_dataset_bad_key(data_dir, field):
  config = _config(data_dir)
  config.dataset[field] = 'pixels'
  with pytest.raises(ValueError) as e:
    prepare.check_config(config)
  message = str(e.value)
  assert f"config.dataset.{field}='pixels'" in message
  assert "['image', 'label']" in message


def test_check_dataset_too_few_classes(data_dir):
  config = _config(data_dir)
  config.dataset.num_classes = NUM_CLASSES - 1
  with pytest.raises(ValueError) as e:
    prepare.check_config(config)
  message = str(e.value)
  assert f'config.dataset.num_classes={NUM_CLASSES - 1}' in message
  assert f'--config.dataset.num_classes={NUM_CLASSES}' in message


def test_validate_batch_size():
  config = ml_collections.ConfigDict({'batch_size': 24})
  input_pipeline.validate_batch_size(config, num_data_shards=8, process_count=2)
  input_pipeline.validate_batch_size(config, num_data_shards=4, process_count=3)
  with pytest.raises(ValueError) as e:
    input_pipeline.validate_batch_size(config, num_data_shards=16,
                                       process_count=2)
  assert 'config.batch_size=24' in str(e.value)
  assert '16 data shards' in str(e.value)
  assert '--config.batch_size=32' in str(e.value)
  with pytest.raises(ValueError, match='5 processes'):
    input_pipeline.validate_batch_size(config, num_data_shards=1,
                                       process_count=5)
  with pytest.raises(ValueError, match='config.batch_size=0'):
    input_pipeline.validate_batch_size(
        ml_collections.ConfigDict({'batch_size': 0}), 1, 1)


# ------------------------------------------------------------- train data --


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_batches_shapes(data_dir):
  config = _config(data_dir, augment='auto')
  config.batch_size = 12
  batch = next(iter(input_pipeline.create_train_loader(config, process_count=3,
                                                       process_index=1)))
  assert batch['image'].shape == (4, SIDE, SIDE, 1)
  assert batch['image'].dtype == np.uint8  # normalised on the device
  assert batch['label'].shape == (4,) and batch['label'].dtype == np.int32


@pytest.mark.parametrize('process_count', [2, 3])
def test_train_processes_read_disjoint_slices(data_dir, process_count):
  """Processes split every global batch; together they are the 1-process one."""
  config = _config(data_dir, augment='crop_flip', crop_padding=0)
  config.batch_size = 6
  steps = -(-2 * NUM_TRAIN // config.batch_size)  # Two epochs or more.
  whole = _take(iter(input_pipeline.create_train_loader(config)), steps)
  parts = [
      _take(iter(input_pipeline.create_train_loader(
          config, process_index=i, process_count=process_count)), steps)
      for i in range(process_count)
  ]
  for step, batch in enumerate(whole):
    pieces = [p[step] for p in parts]
    ids = [_ids(p['image']).tolist() for p in pieces]
    assert all(len(x) == config.batch_size // process_count for x in ids)
    assert len(set().union(*map(set, ids))) == config.batch_size  # Disjoint.
    # Same rows, same augmentation, whichever process reads them.
    np.testing.assert_array_equal(
        np.concatenate([p['image'] for p in pieces]), batch['image'])
  # Each epoch visits every example exactly once, in a new order each time.
  ids = np.concatenate([_ids(b['image']) for b in whole])
  first, second = ids[:NUM_TRAIN], ids[NUM_TRAIN:2 * NUM_TRAIN]
  assert sorted(first) == sorted(second) == list(range(NUM_TRAIN))
  assert first.tolist() != second.tolist()


def test_train_labels_match_examples(data_dir):
  batch = next(iter(input_pipeline.create_train_loader(_config(data_dir))))
  np.testing.assert_array_equal(batch['label'],
                                _ids(batch['image']) % NUM_CLASSES)


def test_train_deterministic_for_seed(data_dir):
  config = _config(data_dir, augment='crop_flip')

  def batches(seed):
    loader = input_pipeline.create_train_loader(config, seed=seed)
    return _take(iter(loader), 3)

  a, b, c = batches(1), batches(1), batches(2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert any(not np.array_equal(x['image'], z['image']) for x, z in zip(a, c))
  # Without a seed argument, config.seed decides.
  config.seed = 1
  np.testing.assert_array_equal(
      next(iter(input_pipeline.create_train_loader(config)))['image'],
      a[0]['image'])


def test_train_bad_seed(data_dir):
  config = _config(data_dir)
  config.seed = -1
  with pytest.raises(ValueError, match='config.seed=-1'):
    input_pipeline.create_train_loader(config)


def test_train_iterator_state_restores_exactly(data_dir):
  config = _config(data_dir, augment='crop_flip')
  loader = input_pipeline.create_train_loader(config)
  it = iter(loader)
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 3)
  it.set_state(state)
  again = _take(it, 3)
  # A fresh pipeline (as after a restart) resumes at the same place too.
  fresh = iter(input_pipeline.create_train_loader(config))
  fresh.set_state(state)
  resumed = _take(fresh, 3)
  for e, a, r in zip(expected, again, resumed):
    np.testing.assert_array_equal(e['image'], a['image'])
    np.testing.assert_array_equal(e['image'], r['image'])
    np.testing.assert_array_equal(e['label'], r['label'])


def test_train_iterator_orbax_checkpoint(data_dir, tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  config = _config(data_dir, augment='crop_flip')
  it = iter(input_pipeline.create_train_loader(config))
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(2, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = _take(it, 2)

  restored_it = iter(input_pipeline.create_train_loader(config))
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    restored = manager.restore(2, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(restored_it)))
  for e, r in zip(expected, _take(restored['data'], 2)):
    np.testing.assert_array_equal(e['image'], r['image'])


# -------------------------------------------------------------- eval data --


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_eval_covers_split_exactly_with_padding(data_dir, process_count):
  config = _config(data_dir)
  batch_size = 16 * process_count
  local = 16
  num_batches = input_pipeline.num_eval_batches(NUM_TRAIN, batch_size,
                                                process_count)
  seen = []
  for index in range(process_count):
    batches = input_pipeline.create_eval_iterator(
        config, 'train', batch_size,
        process_index=index, process_count=process_count)
    assert len(batches) == num_batches
    listed = list(batches)
    assert len(listed) == num_batches  # Same count on every process.
    for b in listed:
      assert b['image'].shape == (local, SIDE, SIDE, 1)
      assert b['label'].shape == b['mask'].shape == (local,)
      assert b['image'].dtype == np.uint8 and b['label'].dtype == np.int32
      real = b['mask'] == 1
      # Real rows come first; padding rows are all zeros.
      assert not real[np.argmin(real):].any() or real.all()
      assert (b['image'][~real] == 0).all() and (b['label'][~real] == 0).all()
      ids = _ids(b['image'][real])
      np.testing.assert_array_equal(b['label'][real], ids % NUM_CLASSES)
      seen.extend(ids.tolist())
    # Deterministic: a second pass gives the same batches.
    for x, y in zip(listed, batches):
      np.testing.assert_array_equal(x['image'], y['image'])
  assert sorted(seen) == list(range(NUM_TRAIN))  # Each example exactly once.


def test_eval_batch_not_divisible_by_processes(data_dir):
  with pytest.raises(ValueError, match='eval batch_size=10'):
    input_pipeline.create_eval_iterator(_config(data_dir), 'test', 10,
                                        process_index=0, process_count=3)


def test_eval_resizes_to_image_size(data_dir):
  config = _config(data_dir, image_size=12)
  batch = next(iter(input_pipeline.create_eval_iterator(config, 'test', 4)))
  assert batch['image'].shape == (4, 12, 12, 1)
  assert batch['mask'].tolist() == [1, 1, 1, 1]


def test_worker_processes_give_the_same_batches(data_dir):
  """worker_count > 0 moves decoding to processes without changing the data."""
  config = _config(data_dir, augment='crop_flip')
  expected_train = _take(iter(input_pipeline.create_train_loader(config)), 2)
  expected_eval = list(input_pipeline.create_eval_iterator(config, 'test', 16))
  config.input.worker_count = 1
  it = iter(input_pipeline.create_train_loader(config))
  for e, a in zip(expected_train, _take(it, 2)):
    np.testing.assert_array_equal(e['image'], a['image'])
  batches = list(input_pipeline.create_eval_iterator(config, 'test', 16))
  assert len(batches) == len(expected_eval)
  for e, a in zip(expected_eval, batches):
    np.testing.assert_array_equal(e['image'], a['image'])
    np.testing.assert_array_equal(e['mask'], a['mask'])


# ---------------------------------------------------------- global arrays --


def test_make_global_batch(data_dir):
  mesh = jax.make_mesh((4, 2, 1), ('data', 'fsdp', 'tensor'))
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  batch = next(iter(
      input_pipeline.create_eval_iterator(_config(data_dir), 'test', 16)))
  global_batch = input_pipeline.make_global_batch(batch, sharding)
  assert set(global_batch) == {'image', 'label', 'mask'}
  for key, value in global_batch.items():
    assert isinstance(value, jax.Array)
    assert value.sharding == sharding
    assert len(value.addressable_shards) == 8
    assert value.addressable_shards[0].data.shape[0] == 2
    np.testing.assert_array_equal(np.asarray(value), batch[key])


# ------------------------------------------------------------- preprocess --


def _shifted(image, dy, dx):
  """`image` translated by (dy, dx), zero fill."""
  out = np.zeros_like(image)
  h, w = image.shape[:2]
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
      image[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)])
  return out


def _is_shift(out, image, pad):
  return any(
      np.array_equal(out, _shifted(image, dy, dx))
      for dy in range(-pad, pad + 1)
      for dx in range(-pad, pad + 1))


def test_pad_and_random_crop_only_shifts():
  rng = np.random.default_rng(0)
  image = rng.integers(1, 256, (8, 8, 3), np.uint8)
  offsets = set()
  for seed in range(30):
    out = preprocess.pad_and_random_crop(image, 2, np.random.default_rng(seed))
    assert out.shape == image.shape and out.dtype == image.dtype
    matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
               if np.array_equal(out, _shifted(image, dy, dx))]
    assert len(matches) == 1
    offsets.add(matches[0])
  assert len(offsets) > 5  # The offset really is random.


def test_random_flip():
  image = np.arange(12, dtype=np.uint8).reshape(2, 6, 1)
  outs = {preprocess.random_flip(image, np.random.default_rng(s)).tobytes()
          for s in range(20)}
  assert outs == {image.tobytes(), image[:, ::-1].tobytes()}


def test_crop_flip_transform_only_shifts_and_flips():
  rng = np.random.default_rng(1)
  image = rng.integers(1, 256, (8, 8, 1), np.uint8)
  transform = preprocess.TrainTransform(
      image_size=8, small=True, augment='crop_flip', crop_padding=2)
  flipped = 0
  for seed in range(20):
    out = transform.random_map({'image': image, 'label': 3},
                               np.random.default_rng(seed))
    assert out['image'].dtype == np.uint8 and out['image'].shape == (8, 8, 1)
    assert out['label'].dtype == np.int32 and out['label'] == 3
    pixels = out['image']
    is_flipped = _is_shift(pixels, image[:, ::-1], 2)
    assert is_flipped or _is_shift(pixels, image, 2)
    flipped += is_flipped
  assert 0 < flipped < 20
  # Same rng seed, same output.
  record = {'image': image, 'label': 0}
  a = transform.random_map(record, np.random.default_rng(7))
  b = transform.random_map(record, np.random.default_rng(7))
  np.testing.assert_array_equal(a['image'], b['image'])


def test_flip_transform_only_flips():
  image = np.random.default_rng(1).integers(1, 256, (8, 8, 1), np.uint8)
  transform = preprocess.TrainTransform(
      image_size=8, small=True, augment='flip')
  outs = set()
  for seed in range(20):
    out = transform.random_map({'image': image, 'label': 3},
                               np.random.default_rng(seed))
    outs.add(out['image'].tobytes())
  assert outs == {image.tobytes(), image[:, ::-1].tobytes()}


def test_in_memory_cache_gives_the_same_batches(data_dir):
  plain = _config(data_dir, augment='crop_flip')
  cached = _config(data_dir, augment='crop_flip', cache=True)
  a = _take(iter(input_pipeline.create_train_loader(plain)), 3)
  b = _take(iter(input_pipeline.create_train_loader(cached)), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  for split in ('train', 'test'):
    e1 = list(input_pipeline.create_eval_iterator(plain, split, 32))
    e2 = list(input_pipeline.create_eval_iterator(cached, split, 32))
    for x, y in zip(e1, e2):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
  assert isinstance(input_pipeline._data_source(cached, 'train'),
                    input_pipeline.InMemorySource)


def test_inception_crop():
  image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8)
  for seed in range(20):
    crop = preprocess.inception_crop(image, np.random.default_rng(seed))
    h, w = crop.shape[:2]
    assert 0 < h <= 60 and 0 < w <= 80 and crop.shape[2] == 3
    assert h * w >= 0.08 * 60 * 80 * 0.9
  # Impossible constraints fall back to a central crop with a valid ratio.
  crop = preprocess.inception_crop(image, np.random.default_rng(0),
                                   area_range=(2.0, 3.0), ratio=(1.0, 1.0))
  assert crop.shape == (60, 60, 3)
  transform = preprocess.TrainTransform(image_size=32, augment='inception_crop')
  out = transform.random_map({'image': image, 'label': 1},
                             np.random.default_rng(0))
  assert out['image'].shape == (32, 32, 3) and out['image'].dtype == np.uint8


def test_resize_and_eval_image():
  image = np.full((30, 40, 3), 77, np.uint8)
  assert preprocess.resize(image, 10).shape == (10, 10, 3)
  np.testing.assert_array_equal(preprocess.resize(image, (15, 20)), 77)
  two_channels = np.full((30, 40, 2), 9, np.uint8)
  out = preprocess.resize(two_channels, (5, 6))
  assert out.shape == (5, 6, 2) and out.dtype == np.uint8 and (out == 9).all()
  # Large image: shorter side to 16 / 0.875 = 19, then a central 16x16 crop.
  big = np.zeros((100, 200, 3), np.uint8)
  big[:, 90:110] = 255  # A bright central band survives the central crop.
  out = preprocess.eval_image(big, 16, small=False)
  assert out.shape == (16, 16, 3) and out[:, 8].min() == 255
  assert preprocess.eval_image(image[:8, :8], 8, small=True) is not None


def test_normalize():
  image = np.array([[[0], [255]]], np.uint8)
  np.testing.assert_allclose(preprocess.normalize(image)[..., 0], [[-1.0, 1.0]])
  out = preprocess.normalize(np.full((1, 1, 3), 255, np.uint8),
                             mean=(0.5, 0.5, 0.0), std=(0.5, 0.25, 1.0))
  np.testing.assert_allclose(out.ravel(), [1.0, 2.0, 1.0])
  assert out.dtype == np.float32
  with pytest.raises(ValueError, match=r'config.input.mean=\[0.5, 0.5, 0.5\]'):
    preprocess.normalize(image, mean=(0.5, 0.5, 0.5), std=(0.5,))
  # The same function on the device, inside jit (the train and embed steps).
  on_device = jax.jit(lambda x: preprocess.normalize(x, (0.5, 0.5, 0.0), (0.5, 0.25, 1.0)))
  np.testing.assert_array_equal(on_device(np.full((1, 1, 3), 255, np.uint8)), out)


def test_resolve_augment():
  assert preprocess.resolve_augment('auto', (28, 28, 1)) == 'crop_flip'
  assert preprocess.resolve_augment('auto', (224, 224, 3)) == 'inception_crop'
  assert preprocess.resolve_augment('auto', (None, None, 3)) == 'inception_crop'
  assert preprocess.resolve_augment('none', (28, 28, 1)) == 'none'
  assert preprocess.resolve_augment('flip', (28, 28, 1)) == 'flip'
  with pytest.raises(ValueError, match="config.input.augment='mirror'"):
    preprocess.resolve_augment('mirror', (28, 28, 1))


def _translations(image, pad):
  """All pad-and-crop translations of `image` [H, W, C], as bytes."""
  height, width = image.shape[:2]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  return {padded[t:t + height, l:l + width].tobytes()
          for t in range(2 * pad + 1) for l in range(2 * pad + 1)}


def test_batched_crop_flip_gives_per_example_views():
  """Each row is a translation of its own input, mirrored or not."""
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (64, 6, 5, 2), np.uint8)
  out = preprocess.random_flip_batch(
      preprocess.pad_and_random_crop_batch(images, 2, rng), rng)
  assert out.shape == images.shape and out.dtype == np.uint8
  flipped = 0
  for image, row in zip(images, out):
    if row.tobytes() in _translations(image, 2):
      continue
    assert row[:, ::-1].tobytes() in _translations(image, 2)
    flipped += 1
  assert 0 < flipped < len(images)  # Independent coin per row.
  # Offsets vary per row: not one translation for the whole batch.
  unchanged = sum(np.array_equal(a, b) for a, b in zip(images, out))
  assert unchanged < len(images) // 2


def test_batchable_only_for_native_size_small_images():
  flip = preprocess.TrainTransform(image_size=8, small=True, augment='flip')
  assert flip.batchable((8, 8, 1)) and flip.batchable((8, 8))
  assert not flip.batchable((12, 12, 1))  # Needs a per-example resize.
  assert not flip.batchable((None, None, 3))
  inception = preprocess.TrainTransform(image_size=8, augment='inception_crop')
  assert not inception.batchable((8, 8, 1))


@pytest.mark.parametrize('augment,image_size', [('crop_flip', SIDE),
                                                ('crop_flip', 12)])
def test_train_batches_batched_and_per_example_paths(data_dir, augment,
                                                     image_size):
  """Both read paths give images traced to the labels they come with."""
  config = _config(data_dir, augment=augment, image_size=image_size,
                   crop_padding=0)
  batch = next(iter(input_pipeline.create_train_loader(config)))
  assert batch['image'].shape == (8, image_size, image_size, 1)
  if image_size == SIDE:  # Constant images survive a 0-pixel crop + flip.
    np.testing.assert_array_equal(batch['label'],
                                  _ids(batch['image']) % NUM_CLASSES)


def test_train_iterator_state_does_not_depend_on_the_worker_layout(data_dir):
  """Saved in-process, resumed with 2 workers (and back): the same batches."""
  config = _config(data_dir, augment='crop_flip')
  it = iter(input_pipeline.create_train_loader(config))
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 3)
  config.input.worker_count = 2
  workers = iter(input_pipeline.create_train_loader(config))
  workers.set_state(state)
  with_workers = _take(workers, 3)
  state = workers.get_state()
  assert state['position'] == 6 and state['worker_count'] == 2
  config.input.worker_count = 0
  back = iter(input_pipeline.create_train_loader(config))
  back.set_state(state)
  after = _take(back, 1)
  it.set_state(state)
  for e, w in zip(expected + _take(it, 1), with_workers + after):
    np.testing.assert_array_equal(e['image'], w['image'])
    np.testing.assert_array_equal(e['label'], w['label'])


@pytest.mark.parametrize('state, position', [
    ({'next_index': 5}, 5),
    ({'next_index_in_cycle': 1, 'next_index_in_datasets': 2, 'iterators_in_use_indices':
      [0, 1], 'iterators_in_use_states': [{'next_index': 3}, {'next_index': 2}],
      'exhausted': [0, 0], 'future_states': {}}, 5),
])
def test_grain_states_of_older_checkpoints_are_read_as_positions(state, position):
  assert input_pipeline._grain_position(state) == position
