"""Input pipelines: Grain over TFDS `array_record` data sources.

Every process reads only its own slice of a split and produces *host-local*
numpy batches of `global_batch // process_count` rows; `make_global_batch`
turns them into global `jax.Array`s sharded over the batch axes of the mesh.

Train (`create_train_loader`): a Grain `MapDataset` of record indices, seeded
shuffle, infinite epochs (each epoch reshuffled), batched, then read and
augmented a batch at a time with a generator seeded by the batch's position.
Its iterator's state is a few bytes of JSON, so resuming from a checkpoint
replays exactly the batches that an uninterrupted run would have seen. Checkpoint it with Orbax via

    ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(train_iter))
    ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(train_iter))

Eval (`create_eval_iterator`): deterministic order, no augmentation, every
example of the split exactly once across processes. Every process yields the
same number of equally sized batches (collectives in the eval step must line
up), so the tail is padded with zeros and `mask` says which rows are real.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator

from absl import flags
from absl import logging
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from mrl_jax.data import preprocess
from mrl_jax.data import randaugment

Batch = dict[str, np.ndarray]


def _process_index_and_count(
    process_index: int | None, process_count: int | None
) -> tuple[int, int]:
  """Defaults to this JAX process; explicit values let tests emulate a pod."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(
        f'process_index={index} not in [0, process_count={count}).'
    )
  return index, count


def _data_source(config, split: str):
  # download=False: preparing a dataset is `mrl_jax.data.prepare`'s job, and
  # `prepare.check_config` has already said how to do it if it is missing.
  # Otherwise TFDS would silently start a (possibly hours long) download here.
  source = tfds.data_source(
      config.dataset.name,
      data_dir=config.dataset.get('data_dir'),
      split=split,
      download=False,
  )
  if config.input.get('cache', False):
    key = (config.dataset.name, config.dataset.get('data_dir'), split)
    if key not in _CACHE:
      _CACHE[key] = InMemorySource(source)
    return _CACHE[key]
  return source


# Decoded splits of this process, shared by the train loader and the evals.
_CACHE: dict[tuple[Any, ...], 'InMemorySource'] = {}


def _concatenate(chunks: list[np.ndarray]) -> np.ndarray:
  try:
    return np.concatenate(chunks)
  except ValueError:  # ragged across chunks (e.g. images of varying size)
    out = np.empty(sum(len(c) for c in chunks), dtype=object)
    out[:] = [x for c in chunks for x in c]
    return out


class InMemorySource:
  """A TFDS data source decoded once into host memory (`config.input.cache`).

  For small datasets (MNIST-size, CIFAR) the per-example record read and PNG
  decode cost more than the model step on a CPU; decoding once removes them.
  The records, their order and indices are those of the wrapped source, so
  shuffles, shards and checkpointed iterator states are unchanged.
  """

  def __init__(self, source, read_batch: int = 4096):
    self.dataset_info = source.dataset_info
    n = len(source)
    columns: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, read_batch):
      records = source.__getitems__(list(range(start, min(start + read_batch, n))))
      for key in records[0] if records else ():
        values = [r[key] for r in records]
        try:
          columns.setdefault(key, []).append(np.stack(values))
        except ValueError:  # ragged within the chunk
          ragged = np.empty(len(values), dtype=object)
          ragged[:] = values
          columns.setdefault(key, []).append(ragged)
    self._columns = {k: _concatenate(v) for k, v in columns.items()}
    self._len = n

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self._columns.items()}

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    return [self[i] for i in indices]

  def gather(self, indices, keys) -> dict[str, np.ndarray]:
    """Columns `keys` at `indices`, each one array (one fancy-index each)."""
    return {k: self._columns[k][np.asarray(indices, np.int64)] for k in keys}

  def __repr__(self) -> str:
    return f'InMemorySource({self.dataset_info.name}, {self._len} records)'


def local_batch_size(
    batch_size: int, process_count: int, field: str = 'config.batch_size'
) -> int:
  """Rows per process of a global batch."""
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
        f'{field}={batch_size} must be a positive multiple of the number of'
        f' processes ({process_count}); e.g. use'
        f' {max(1, round(batch_size / process_count)) * process_count}.'
    )
  return batch_size // process_count


def validate_batch_size(
    config,
    num_data_shards: int,
    process_count: int,
    *,
    field: str = 'batch_size',
) -> None:
  """Raises if the global batch can't be split evenly over shards and hosts.

  Args:
    config: the experiment config.
    num_data_shards: devices the batch is split over (mesh 'data' x 'fsdp').
    process_count: number of JAX processes (each loads its rows).
    field: the config field holding the batch size ('batch_size',
      'eval_batch_size', ...).
  """
  batch_size = config[field]
  multiple = math.lcm(num_data_shards, process_count)
  if batch_size <= 0 or batch_size % multiple:
    suggestion = max(1, round(batch_size / multiple)) * multiple
    raise ValueError(
        f'config.{field}={batch_size} must be a positive multiple of the'
        f' {num_data_shards} data shards (mesh data x fsdp) and of the'
        f' {process_count} processes, i.e. of {multiple}. Set e.g.'
        f' --config.{field}={suggestion}.'
    )


def _preprocess_options(config, source) -> dict[str, Any]:
  """Transform fields shared by train and eval, from config + dataset info."""
  image_key = config.dataset.get('image_key', 'image')
  image_shape = source.dataset_info.features[image_key].shape
  # Applied on the device (tasks._Task.model_images); checked here, at setup.
  preprocess.check_mean_std(config.input.get('mean'), config.input.get('std'),
                            image_shape[-1] if len(image_shape) == 3 else 1)
  return dict(
      image_key=image_key,
      label_key=config.dataset.get('label_key', 'label'),
      image_size=config.input.image_size,
      small=preprocess.is_small_image(image_shape),
  )


def text_transform(config, source) -> preprocess.TextTransform | None:
  """The tokenizer step for image-text data (config.dataset.text_key set)."""
  text_key = config.dataset.get('text_key')
  if not text_key:
    return None
  features = source.dataset_info.features
  try:
    top_key = preprocess.top_level_key(text_key, features.keys())
  except KeyError:
    raise ValueError(
        f'config.dataset.text_key={text_key!r} is not a feature of'
        f' {config.dataset.name}; available keys: {sorted(features.keys())}.'
    ) from None
  return preprocess.TextTransform(
      text_key=text_key, top_key=top_key, tokenizer=load_tokenizer(config))


def load_tokenizer(config):
  """config.text.{vocab_path, max_len, lowercase} -> a WordPieceTokenizer."""
  from mrl_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  text = config.get('text') or {}
  vocab_path = text.get('vocab_path')
  if not vocab_path:
    raise ValueError(
        f'config.dataset.text_key={config.dataset.get("text_key")!r} needs'
        ' config.text.vocab_path (a WordPiece vocab.txt) and'
        ' config.text.max_len; see configs/fashion_mnist_align.py.'
    )
  max_len = text.get('max_len')
  if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
    raise ValueError(
        f'config.text.max_len={max_len!r} must be an int >= 2 (tokens per'
        ' text, [CLS] and [SEP] included), e.g. --config.text.max_len=64.'
    )
  key = (vocab_path, max_len, text.get('lowercase', True))
  if key not in _TOKENIZERS:
    try:
      _TOKENIZERS[key] = tokenizer_lib.WordPieceTokenizer(
          vocab_path, lowercase=key[2], max_len=max_len)
    except (FileNotFoundError, ValueError) as e:
      # The tokenizer names the file; say which config field holds it.
      raise type(e)(f'config.text.vocab_path={vocab_path!r}: {e}') from None
  return _TOKENIZERS[key]


_TOKENIZERS: dict[tuple[Any, ...], Any] = {}


def _grain_seed(seed: int) -> int:
  """Config seed -> 32-bit Grain seed, decorrelated across nearby seeds.

  Grain derives the epoch-e shuffle from `seed + e` and the record-i
  augmentation stream from `seed + i`, so seeds 0 and 1 would see the same
  shuffles one epoch apart. Hashing the seed first avoids that.
  """
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(
        f'config.seed={seed!r} must be a non-negative integer; set e.g.'
        ' --config.seed=0.'
    )
  return int(np.random.SeedSequence(int(seed)).generate_state(1)[0])


# ------------------------------------------------------------------ train --


def create_train_loader(
    config,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    seed: int | None = None,
) -> grain.IterDataset:
  """Infinite, shuffled, augmented training batches for this process.

  The pipeline is a Grain `MapDataset` over record *indices*: this process's
  contiguous slice of the split, shuffled (differently every epoch), repeated
  forever and batched; each batch of indices is then read with one batched
  source access and augmented. Everything is a pure function of (seed, batch
  position), so the iterator state is a position and a restart replays exactly
  the batches an uninterrupted run would have seen.

  Args:
    config: uses config.dataset.{name, data_dir, train_split, image_key,
      label_key}, config.input.{image_size, augment, crop_padding, mean, std,
      worker_count, read_threads, shuffle_seed, cache}, config.batch_size,
      config.seed.
    process_index: defaults to `jax.process_index()`.
    process_count: defaults to `jax.process_count()`.
    seed: overrides config.input.shuffle_seed / config.seed.

  Returns:
    A `grain.IterDataset`; `iter()` of it yields {'image': uint8
    [b, H, W, C], 'label': int32 [b]} with b = config.batch_size //
    process_count, and has `get_state()` / `set_state()`.
  """
  index, count = _process_index_and_count(process_index, process_count)
  batch = local_batch_size(config.batch_size, count)
  if seed is None:
    seed = config.input.get('shuffle_seed')
  if seed is None:
    seed = config.seed
  source = _data_source(config, config.dataset.train_split)
  options = _preprocess_options(config, source)
  image_shape = source.dataset_info.features[options['image_key']].shape
  transform = preprocess.TrainTransform(
      **options,
      augment=preprocess.resolve_augment(
          config.input.get('augment', 'auto'), image_shape
      ),
      crop_padding=config.input.get('crop_padding', 4),
      randaugment=randaugment_args(config),
      random_erasing=random_erasing_prob(config),
  )
  # One global stream for all processes: the split shuffled (a new permutation
  # every epoch: repeat reseeds), cut into global batches; process i reads and
  # augments only rows [i*b, (i+1)*b) of each. So the data a run sees does not
  # depend on how many processes it runs on, and no example is dropped.
  if len(source) < config.batch_size:
    raise ValueError(
        f'The {config.dataset.train_split!r} split has {len(source)} examples,'
        f' fewer than one batch (config.batch_size={config.batch_size}).'
        ' Lower config.batch_size.'
    )
  resizing = config.input.get('progressive_resizing')
  size_at = None
  if resizing:
    # The crop size of the batch at each position: epoch = examples seen // split size.
    size_at = functools.partial(_size_at_batch, resizing, config.batch_size, len(source))
  dataset = (
      grain.MapDataset.range(len(source))
      .seed(_grain_seed(seed))
      .shuffle()
      .repeat(None)
      .batch(config.batch_size, drop_remainder=True)
  )
  if size_at is not None:
    dataset = dataset.map_with_index(lambda position, indices: (position, indices))
  dataset = dataset.random_map(
      _ReadAndAugment(
          source,
          transform,
          batched=transform.batchable(image_shape) and size_at is None,
          rows=slice(index * batch, (index + 1) * batch),
          text=text_transform(config, source),
          size_at=size_at,
      )
  )
  return TrainBatches(
      dataset,
      worker_count=config.input.get('worker_count', 0),
      read_threads=config.input.get('read_threads', 0),
  )


class TrainBatches(grain.IterDataset):
  """The train batches (a random-access Grain `MapDataset`), read in order.

  Its iterator's state is a position in the batch sequence, not Grain's own
  per-worker state, so a run resumes exactly under any `worker_count` /
  `read_threads`: the sequence is a pure function of (seed, position).
  """

  def __init__(self, batches: grain.MapDataset, *, worker_count: int,
               read_threads: int):
    super().__init__()
    self.batches = batches
    self.worker_count, self.read_threads = worker_count, read_threads

  def __iter__(self) -> 'TrainIterator':
    return TrainIterator(self)

  def pipeline(self, start: int) -> grain.IterDataset:
    """Batches from position `start` on, decoded by the configured workers."""
    # Decoding and augmentation are mostly GIL-bound Python, so threads mostly
    # contend; scale with worker_count (processes) instead, and raise
    # read_threads only for high-latency storage.
    batches = self.batches[start:].to_iter_dataset(
        grain.ReadOptions(
            num_threads=self.read_threads,
            prefetch_buffer_size=2 * self.read_threads,
        )
    )
    if self.worker_count:
      _allow_grain_workers()
      batches = batches.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self.worker_count)
      )
    return batches


class TrainIterator(grain.DatasetIterator):
  """Iterates `TrainBatches`; the state is {'position', 'worker_count', 'read_threads'}."""

  def __init__(self, dataset: TrainBatches):
    super().__init__()
    self._dataset = dataset
    self._position = 0
    self._it = iter(dataset.pipeline(0))

  def __next__(self) -> Batch:
    batch = next(self._it)
    self._position += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return dict(
        position=self._position,
        worker_count=self._dataset.worker_count,
        read_threads=self._dataset.read_threads,
    )

  def set_state(self, state: dict[str, Any]) -> None:
    position = _grain_position(state)
    layout = (state.get('worker_count'), state.get('read_threads'))
    if layout != (None, None) and layout != (
        self._dataset.worker_count,
        self._dataset.read_threads,
    ):
      logging.info(
          'The input pipeline was saved with worker_count=%s, read_threads=%s and'
          ' now has worker_count=%d, read_threads=%d: it restarts at batch %d,'
          ' the batch an uninterrupted run would read next.',
          *layout,
          self._dataset.worker_count,
          self._dataset.read_threads,
          position,
      )
    self._position = position
    self._it = iter(self._dataset.pipeline(position))

  def start_prefetch(self) -> None:
    start = getattr(self._it, 'start_prefetch', None)
    if start is not None:
      start()


def _grain_position(state: dict[str, Any]) -> int:
  """The batch position in a saved iterator state, ours or (older checkpoints) Grain's.

  Grain's in-process iterator counts `next_index`; its worker pool
  (`mp_prefetch`) interleaves workers round-robin, each reading every W-th
  batch, so the batches read are the sum of the workers' counts.
  """
  if 'position' in state:
    return int(state['position'])
  if 'next_index' in state:
    return int(state['next_index'])
  if 'iterators_in_use_states' in state:
    return sum(int(s['next_index']) for s in state['iterators_in_use_states'])
  raise ValueError(
      f'Unrecognised input pipeline state (keys {sorted(state)}); it was not'
      ' written by this trainer.'
  )


class _ReadAndAugment(grain.transforms.RandomMap):
  """A global batch of record indices -> this process's rows, augmented.

  Batchable datasets (small same-size images, see
  `TrainTransform.batchable`) are augmented with vectorised ops on the whole
  batch; others example by example. Either way a row's random augmentation
  depends only on the batch's generator and the row's position in the global
  batch, not on which process reads it.
  """

  def __init__(self, source, transform: preprocess.TrainTransform, *,
               batched: bool, rows: slice,
               text: preprocess.TextTransform | None = None, size_at=None):
    self.source = source
    self.transform = transform
    self.batched = batched
    self.rows = rows
    self.text = text
    self.size_at = size_at  # batch position -> crop size (progressive resizing)

  def random_map(self, indices, rng: np.random.Generator) -> Batch:
    transform = self.transform
    if self.size_at is not None:
      position, indices = indices
      transform = dataclasses.replace(transform, image_size=self.size_at(position))
    return self._read(indices, transform, rng)

  def _read(self, indices: np.ndarray, transform, rng: np.random.Generator) -> Batch:
    total = len(indices)
    mine = [int(i) for i in indices[self.rows]]
    image_key, label_key = transform.image_key, transform.label_key
    text_key = self.text.top_key if self.text else None
    keys = tuple(k for k in (image_key, label_key, text_key) if k)
    if self.batched:
      columns = _read_columns(self.source, mine, keys)
      out = transform.random_map_batch(
          columns[image_key], columns.get(label_key) if label_key else None,
          rng, rows=self.rows, batch_size=total)
    else:
      seeds = rng.integers(0, 2**63 - 1, size=total)[self.rows]
      records = self.source.__getitems__(mine)
      examples = [
          transform.random_map(r, np.random.default_rng(s))
          for r, s in zip(records, seeds)
      ]
      out = {
          'image': np.stack([e['image'] for e in examples]),
          'label': np.asarray([e['label'] for e in examples], np.int32),
      }
      columns = {text_key: [r[text_key] for r in records]} if self.text else {}
    if self.text is not None:
      # Drawn after the image parameters, for the whole global batch.
      draws = rng.random(total)[self.rows]
      values = [self.text.value(v) for v in columns[text_key]]
      out.update(self.text.sample(values, draws))
    return out


def _read_columns(source, indices: list[int], keys) -> dict[str, np.ndarray]:
  """`keys` of the records at `indices`, each stacked into one array."""
  if isinstance(source, InMemorySource):
    return source.gather(indices, keys)
  records = source.__getitems__(indices)
  out = {}
  for k in keys:
    try:
      out[k] = np.stack([np.asarray(r[k]) for r in records])
    except ValueError:  # ragged (e.g. a variable number of captions)
      out[k] = np.empty(len(records), dtype=object)
      out[k][:] = [r[k] for r in records]
  return out


def _allow_grain_workers() -> None:
  """Grain worker processes read absl flags; parse them if nobody did.

  Under `absl.app.run` (our `main`) this is a no-op; in notebooks and tests the
  workers would otherwise fail with UnparsedFlagAccessError.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ------------------------------------------------------------------- eval --


def num_eval_batches(
    num_examples: int, batch_size: int, process_count: int
) -> int:
  """Batches each process yields for a split of `num_examples`.

  The largest per-process slice (ceil(N / P)) decides; smaller slices pad.
  """
  local = local_batch_size(batch_size, process_count, 'eval batch_size')
  largest_slice = _ceil_div(num_examples, process_count)
  return _ceil_div(largest_slice, local)


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


@dataclasses.dataclass(frozen=True)
class EvalBatches:
  """This process's padded eval batches of one split; iterable many times.

  Attributes:
    image_shape: [H, W, C] of the output images.
    num_examples: examples in the whole split (sum of `mask` over processes).
    num_batches: batches every process yields (also `len(self)`).
    batch_size: rows per batch on this process.
    start, stop: this process's slice [start, stop) of the split.
    worker_count: Grain worker processes decoding batches (0 = in-process).
  """

  source: Any
  transform: preprocess.EvalTransform
  image_shape: tuple[int, int, int]
  num_examples: int
  num_batches: int
  batch_size: int
  start: int
  stop: int
  worker_count: int = 0
  text: preprocess.TextTransform | None = None
  captions_per_example: int = 5

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[Batch]:
    if not self.worker_count:
      return map(self.read_batch, range(self.num_batches))
    # Batch `step` is a pure function of `step`, so Grain can farm batches out
    # to worker processes and still return them in order.
    _allow_grain_workers()
    batches = grain.MapDataset.range(self.num_batches).map(self.read_batch)
    return iter(
        batches.to_iter_dataset(grain.ReadOptions(num_threads=0)).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=self.worker_count)
        )
    )

  def read_batch(self, step: int) -> Batch:
    """The `step`-th padded batch of this process's slice."""
    first = self.start + step * self.batch_size
    indices = list(range(first, min(first + self.batch_size, self.stop)))
    # One batched read: array_record fetches the records together.
    records = self.source.__getitems__(indices) if indices else []
    examples = [self.transform.map(r) for r in records]
    batch = self._pad(
        [e['image'] for e in examples], [e['label'] for e in examples]
    )
    if self.text is not None:
      values = [self.text.value(r[self.text.top_key]) for r in records]
      values += [[]] * (self.batch_size - len(values))  # padding rows: no text
      batch.update(self.text.all_captions(values, self.captions_per_example))
    return batch

  def _pad(self, images: list[np.ndarray], labels: list[np.int32]) -> Batch:
    n = len(images)
    image = np.zeros((self.batch_size, *self.image_shape), np.uint8)
    label = np.zeros((self.batch_size,), np.int32)
    mask = np.zeros((self.batch_size,), np.int32)
    if n:
      image[:n] = np.stack(images)
      label[:n] = labels
      mask[:n] = 1
    return {'image': image, 'label': label, 'mask': mask}


def create_eval_iterator(
    config,
    split: str,
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    with_text: bool = True,
) -> EvalBatches:
  """Deterministic, unaugmented, padded batches of this process's slice.

  Args:
    config: as for `create_train_loader` (augmentation fields unused).
    split: TFDS split, e.g. config.dataset.eval_split or 'train[:10%]'.
    batch_size: global eval batch size; each batch has batch_size //
      process_count rows.
    process_index: defaults to `jax.process_index()`.
    process_count: defaults to `jax.process_count()`.
    with_text: for image-text data (config.dataset.text_key), also tokenize
      the first config.text.eval_captions captions of each example.

  Returns:
    An iterable of {'image': uint8 [b, H, W, C], 'label': int32 [b],
    'mask': int32 [b]} (mask 1 = real example, 0 = padding), plus 'text'
    int32 [b, K, L] and 'text_mask' int32 [b, K] with text; `len()` is the
    number of batches, the same on every process.
  """
  index, count = _process_index_and_count(process_index, process_count)
  local = local_batch_size(batch_size, count, 'eval batch_size')
  source = _data_source(config, split)
  num_examples = len(source)
  # Contiguous slices whose sizes differ by at most one, covering the split.
  start, stop = _even_slice(num_examples, index, count)
  options = _preprocess_options(config, source)
  height, width = preprocess.image_hw(options['image_size'])
  feature_shape = source.dataset_info.features[options['image_key']].shape
  channels = feature_shape[-1] if len(feature_shape) == 3 else 1
  return EvalBatches(
      source=source,
      transform=preprocess.EvalTransform(**options),
      image_shape=(height, width, channels),
      num_examples=num_examples,
      num_batches=num_eval_batches(num_examples, batch_size, count),
      batch_size=local,
      start=start,
      stop=stop,
      worker_count=config.input.get('worker_count', 0),
      text=text_transform(config, source) if with_text else None,
      captions_per_example=config.get('text', {}).get('eval_captions', 5),
  )


def _even_slice(num_examples: int, index: int, count: int) -> tuple[int, int]:
  base, remainder = divmod(num_examples, count)
  start = index * base + min(index, remainder)
  return start, start + base + (index < remainder)


# ------------------------------------------------------ batch shapes only --


def randaugment_args(config) -> tuple | None:
  """(num_layers, magnitude, ops) of config.input.randaugment, checked; None if off."""
  r = config.input.get('randaugment')
  if not r or not r.get('num_layers', 0):
    return None
  ops = tuple(r['ops']) if r.get('ops') else None
  randaugment.check(r['num_layers'], r.get('magnitude', 10), ops)
  return (int(r['num_layers']), float(r.get('magnitude', 10)), ops)


def random_erasing_prob(config) -> float:
  p = config.input.get('random_erasing', 0.0) or 0.0
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
    raise ValueError(f'config.input.random_erasing={p!r} must be a probability in [0, 1] '
                     '(DeiT: 0.25).')
  return float(p)


def _image_shape(config, channels: int, *, train: bool = False) -> tuple[int, int, int]:
  """The batches' image shape; in training the largest crop of progressive resizing."""
  size = config.input.image_size
  resizing = config.input.get('progressive_resizing')
  if train and resizing:
    size = resizing['max_size']
  return (*preprocess.image_hw(size), int(channels))


# ------------------------------------------------------- progressive resizing --


def train_image_size(resizing, epoch: int) -> int:
  """FFCV's progressive resizing: `min_size` until `start_epoch`, `max_size`
  from `end_epoch`, linear in between rounded to a multiple of `multiple`."""
  lo, hi = resizing['min_size'], resizing['max_size']
  start, end = resizing['start_epoch'], resizing['end_epoch']
  if epoch <= start:
    return lo
  if epoch >= end:
    return hi
  size = lo + (hi - lo) * (epoch - start) / (end - start)
  multiple = resizing.get('multiple', 32)
  return int(round(size / multiple)) * multiple


def _size_at_batch(resizing, batch_size: int, num_examples: int, position: int) -> int:
  return train_image_size(resizing, position * batch_size // num_examples)


def check_progressive_resizing(config, num_epochs: float) -> None:
  """config.input.progressive_resizing: sizes the network's stride divides, in
  order, and epochs inside the run (`num_epochs` of training)."""
  r = config.input.get('progressive_resizing')
  if not r:
    return
  field = 'config.input.progressive_resizing'
  keys = ('min_size', 'max_size', 'start_epoch', 'end_epoch')
  missing = [k for k in keys if k not in r]
  if missing:
    raise ValueError(f'{field} needs {missing} (e.g. dict(min_size=160, max_size=192, '
                     'start_epoch=29, end_epoch=34, multiple=32)).')
  ints = [r[k] for k in (*keys, 'multiple') if k in r]
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
    raise ValueError(f'{field}={dict(r)}: sizes, epochs and the multiple must be ints >= 0.')
  multiple = r.get('multiple', 32)
  if multiple < 1 or r['min_size'] % multiple or r['max_size'] % multiple:
    raise ValueError(
        f'{field}: min_size={r["min_size"]} and max_size={r["max_size"]} must be '
        f'multiples of multiple={multiple} (the network\'s total stride, 32 for a '
        'ResNet), so every crop size is.')
  if not 0 < r['min_size'] <= r['max_size']:
    raise ValueError(f'{field}: needs 0 < min_size <= max_size, got {r["min_size"]} and '
                     f'{r["max_size"]}.')
  if r['start_epoch'] > r['end_epoch']:
    raise ValueError(f'{field}: start_epoch={r["start_epoch"]} is after '
                     f'end_epoch={r["end_epoch"]}.')
  if r['end_epoch'] > num_epochs:
    raise ValueError(
        f'{field}: end_epoch={r["end_epoch"]} is beyond the run ({num_epochs:g} epochs): '
        'the largest size would never be reached. Lower the epochs of the schedule.')


def train_batch_spec(config, channels: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{key: (global shape, dtype)} of the batches `create_train_loader` yields.

  For programs built without reading data (`--mode=compile`); a test checks
  it against a real batch.
  """
  b = config.batch_size
  spec = {'image': ((b, *_image_shape(config, channels, train=True)), np.uint8),
          'label': ((b,), np.int32)}
  if config.dataset.get('text_key'):
    spec['text'] = ((b, config.text.max_len), np.int32)
    spec['text_truncated'] = ((b,), np.int32)
    spec['text_empty'] = ((b,), np.int32)
  return spec


def eval_batch_spec(config, channels: int, batch_size: int, *,
                    with_text: bool = False) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{key: (global shape, dtype)} of the batches `create_eval_iterator` yields."""
  spec = {'image': ((batch_size, *_image_shape(config, channels)), np.uint8),
          'label': ((batch_size,), np.int32), 'mask': ((batch_size,), np.int32)}
  if with_text and config.dataset.get('text_key'):
    k = config.get('text', {}).get('eval_captions', 5)
    spec['text'] = ((batch_size, k, config.text.max_len), np.int32)
    spec['text_mask'] = ((batch_size, k), np.int32)
  return spec


# ---------------------------------------------------------- global arrays --


def make_global_batch(
    batch: Batch, sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global `jax.Array`s with the batch dim sharded.

  Args:
    batch: this process's rows, e.g. from `create_train_loader`.
    sharding: typically `NamedSharding(mesh, P(('data', 'fsdp')))`; the one
      sharding is used for every leaf (trailing dims replicated).

  Returns:
    The same structure with global arrays of process_count x the local rows.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch
  )
