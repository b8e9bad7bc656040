"""Per-example image preprocessing in numpy, run inside Grain workers.

Everything here works on one decoded example at a time: a uint8 image of shape
[H, W, C] as TFDS returns it. There is deliberately no TensorFlow and no JAX in
this module: Grain runs these functions in (possibly forked) host worker
processes, where importing an accelerator runtime would be slow at best and
would grab the device at worst. Randomness comes from the per-record
`np.random.Generator` that Grain derives from the sampler seed and the record's
position in the stream, which is what makes augmentation reproducible and
resumable from a checkpointed iterator state.

Pixel conventions: augmentation ops keep the input dtype (uint8 in, uint8 out),
and batches stay uint8 through the workers and the host-to-device copy (a
quarter of float32's bytes). `normalize` is the single place where images
become float32: the jitted train and embed steps call it on the device
(`tasks._Task.model_images`); it is written with array methods only, so the
same function serves numpy and JAX arrays without importing JAX here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image

from mrl_jax.data import randaugment as randaugment_lib

# Images whose longer side is at most this are "small" (MNIST, CIFAR, SVHN...):
# they are trained with pad-and-crop + flip and evaluated at full view. Larger
# images (ImageNet-like) get Inception crops and a resize + central crop eval.
SMALL_IMAGE_MAX_SIDE = 64
# Standard ImageNet eval: resize so that the central crop covers 87.5% of the
# shorter side.
EVAL_CROP_FRACTION = 0.875

AUGMENTATIONS = ('auto', 'crop_flip', 'inception_crop', 'flip', 'none')

Size = int | Sequence[int]


def image_hw(size: Size) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  height, width = size
  return int(height), int(width)


def _as_hwc(image: np.ndarray) -> np.ndarray:
  """Grayscale datasets sometimes store [H, W]; give every image channels."""
  image = np.asarray(image)
  if image.ndim == 2:
    return image[..., None]
  if image.ndim != 3:
    raise ValueError(f'Expected an image [H, W, C], got shape {image.shape}.')
  return image


# ------------------------------------------------------------------ geometry --


def pad_and_random_crop(
    image: np.ndarray, pad: int, rng: np.random.Generator
) -> np.ndarray:
  """Zero-pads `pad` pixels on each side, then crops back to the input size.

  The CIFAR-style augmentation: the content is translated by up to `pad` pixels
  in each direction, and the border it reveals is black (zero before
  normalisation).
  """
  if pad <= 0:
    return image
  height, width = image.shape[:2]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  top = int(rng.integers(0, 2 * pad + 1))
  left = int(rng.integers(0, 2 * pad + 1))
  return padded[top : top + height, left : left + width]


def random_erasing(image: np.ndarray, rng: np.random.Generator, prob: float,
                   min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3) -> np.ndarray:
  """timm's RandomErasing (mode 'pixel', one box), on uint8.

  With probability `prob`, a box of a uniform share in [min_area, max_area]
  of the image and a log-uniform aspect ratio in [min_aspect, 1 / min_aspect]
  is filled with uniform random pixels (timm draws normal values in
  normalised space; uniform uint8 is the same idea before normalisation).
  Up to 10 tries to fit the box, as timm.
  """
  if rng.random() >= prob:
    return image
  h, w = image.shape[:2]
  for _ in range(10):
    area = rng.uniform(min_area, max_area) * h * w
    aspect = math.exp(rng.uniform(math.log(min_aspect), -math.log(min_aspect)))
    eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    if 0 < eh < h and 0 < ew < w:
      top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
      out = image.copy()
      out[top:top + eh, left:left + ew] = rng.integers(0, 256, (eh, ew, image.shape[-1]),
                                                       dtype=np.uint8)
      return out
  return image


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors the image left-right with probability 1/2."""
  if rng.random() < 0.5:
    return image[:, ::-1]
  return image


def crop_batch(
    images: np.ndarray, pad: int, tops: np.ndarray, lefts: np.ndarray
) -> np.ndarray:
  """Zero-pads a batch [B, H, W, C] by `pad`, crops row i at (tops[i], lefts[i]).

  The batched `pad_and_random_crop`: one fancy-index gathers every crop, no
  Python loop over examples. Offsets are in [0, 2 * pad].
  """
  if pad <= 0:
    return images
  n, height, width = images.shape[:3]
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = tops[:, None, None] + np.arange(height)[None, :, None]  # [B, H, 1]
  cols = lefts[:, None, None] + np.arange(width)[None, None, :]  # [B, 1, W]
  return padded[np.arange(n)[:, None, None], rows, cols]


def flip_batch(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """Mirrors left-right the images [B, H, W, C] where `flips` [B] is True."""
  return np.where(flips[:, None, None, None], images[:, :, ::-1], images)


def pad_and_random_crop_batch(
    images: np.ndarray, pad: int, rng: np.random.Generator
) -> np.ndarray:
  """`pad_and_random_crop` of every image of a batch, independently."""
  tops, lefts = rng.integers(0, 2 * pad + 1, size=(2, len(images)))
  return crop_batch(images, pad, tops, lefts)


def random_flip_batch(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors each image of a batch [B, H, W, C] left-right with p = 1/2."""
  return flip_batch(images, rng.random(len(images)) < 0.5)


def inception_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    area_range: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """Random crop covering a random area fraction and aspect ratio.

  Same sampling as torchvision's `RandomResizedCrop` / the Inception paper:
  area uniform in `area_range` (as a fraction of the image), aspect ratio
  log-uniform in `ratio`; up to 10 attempts to find a crop that fits, else a
  central crop with the aspect ratio clamped to `ratio`. The crop is returned
  unresized; follow it with `resize`.
  """
  height, width = image.shape[:2]
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*area_range)
    aspect = math.exp(rng.uniform(*log_ratio))
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return image[top : top + crop_h, left : left + crop_w]
  # Fallback: the whole image, trimmed to the nearest allowed aspect ratio.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    crop_w, crop_h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    crop_h, crop_w = height, int(round(height * ratio[1]))
  else:
    crop_w, crop_h = width, height
  return central_crop(image, (crop_h, crop_w))


def central_crop(image: np.ndarray, size: Size) -> np.ndarray:
  crop_h, crop_w = image_hw(size)
  height, width = image.shape[:2]
  if crop_h > height or crop_w > width:
    raise ValueError(f'Cannot crop {(crop_h, crop_w)} out of {image.shape}.')
  top = (height - crop_h) // 2
  left = (width - crop_w) // 2
  return image[top : top + crop_h, left : left + crop_w]


def resize(image: np.ndarray, size: Size) -> np.ndarray:
  """Bilinear resize to `size` (int = square), keeping dtype and channels.

  PIL's bilinear filter widens its support when downscaling, so large
  reductions are antialiased (unlike a plain 4-tap bilinear lookup).
  """
  out_h, out_w = image_hw(size)
  if image.shape[:2] == (out_h, out_w):
    return image
  channels = image.shape[2]
  if image.dtype == np.uint8 and channels in (1, 3):
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((out_w, out_h), Image.Resampling.BILINEAR))
    return out.reshape(out_h, out_w, channels)
  # Any other dtype / channel count: resize each channel as a float image.
  planes = [
      np.asarray(
          Image.fromarray(image[..., c].astype(np.float32)).resize(
              (out_w, out_h), Image.Resampling.BILINEAR
          )
      )
      for c in range(channels)
  ]
  return np.stack(planes, axis=-1).astype(image.dtype)


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  height, width = image.shape[:2]
  scale = size / min(height, width)
  return resize(
      image, (max(size, round(height * scale)), max(size, round(width * scale)))
  )


def normalize(
    image: np.ndarray,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
  """uint8 [0, 255] -> float32 `(x / 255 - mean) / std`, per channel.

  `mean` and `std` are in [0, 1] units (e.g. ImageNet's (0.485, 0.456, 0.406)).
  None means 0.5 for both, i.e. pixels scaled to [-1, 1]. `image` may be a
  numpy or a JAX array (inside `jit`); the result is of the same kind.
  """
  mean, std = check_mean_std(mean, std, image.shape[-1])
  x = image.astype(np.float32) * np.float32(1 / 255)
  return (x - mean) / std


def check_mean_std(mean, std, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """config.input.mean / std as float32 arrays of 1 or `channels` values."""
  mean = np.asarray(0.5 if mean is None else mean, np.float32)
  std = np.asarray(0.5 if std is None else std, np.float32)
  for field, value in (('mean', mean), ('std', std)):
    # Broadcasting would silently turn a grayscale image into 3 channels.
    if value.size not in (1, channels):
      raise ValueError(
          f'config.input.{field}={value.tolist()} has {value.size} values but'
          f' the images have {channels} channel(s); give 1 or {channels}.'
      )
  return mean, std


# ------------------------------------------------------------ policy choice --


def is_small_image(image_shape: Sequence[int | None] | None) -> bool:
  """True when the dataset's (static) image side is <= SMALL_IMAGE_MAX_SIDE.

  Datasets with variable image sizes (shape entries None) count as large.
  """
  if image_shape is None or len(image_shape) < 2:
    return False
  height, width = image_shape[:2]
  if height is None or width is None:
    return False
  return max(height, width) <= SMALL_IMAGE_MAX_SIDE


def resolve_augment(
    augment: str, image_shape: Sequence[int | None] | None
) -> str:
  """Maps 'auto' to 'crop_flip' (small images) or 'inception_crop' (large)."""
  if augment not in AUGMENTATIONS:
    raise ValueError(
        f'config.input.augment={augment!r} is not one of {AUGMENTATIONS}; set'
        " e.g. --config.input.augment=auto."
    )
  if augment != 'auto':
    return augment
  return 'crop_flip' if is_small_image(image_shape) else 'inception_crop'


def eval_image(image: np.ndarray, image_size: Size, small: bool) -> np.ndarray:
  """Deterministic view of `image` at `image_size` (uint8 in, uint8 out).

  Small images are resized whole (a no-op at native size). Large ones follow
  the ImageNet protocol: shorter side to image_size / 0.875, central crop.
  """
  if small:
    return resize(image, image_size)
  out_h, out_w = image_hw(image_size)
  image = resize_shorter_side(
      image, int(math.ceil(max(out_h, out_w) / EVAL_CROP_FRACTION))
  )
  return central_crop(image, (out_h, out_w))


# ------------------------------------------------------- Grain transforms --


@dataclasses.dataclass(frozen=True)
class _Options:
  """What both transforms need.

  Frozen: Grain may call a transform from several threads at once, so it must
  not hold mutable state.
  """

  image_key: str = 'image'
  label_key: str | None = 'label'  # None: unlabelled (image-text data)
  image_size: Size = 224
  small: bool = False

  def output(self, image: np.ndarray, record: dict[str, Any]) -> dict[str, Any]:
    return {
        'image': np.asarray(image, np.uint8),
        'label': np.int32(record[self.label_key] if self.label_key else -1),
    }


@dataclasses.dataclass(frozen=True)
class TrainTransform(_Options, grain.transforms.RandomMap):
  """Dataset record -> {'image': uint8 [H, W, C], 'label': int32}, augmented.

  `augment` must already be resolved (not 'auto'); see `resolve_augment`.
  """

  augment: str = 'crop_flip'
  crop_padding: int = 4
  # (num_layers, magnitude[, ops]): RandAugment after the crop and flip, on uint8.
  randaugment: tuple | None = None
  random_erasing: float = 0.0  # probability (timm's RandomErasing, after RandAugment)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator):
    image = _as_hwc(element[self.image_key])
    if self.augment == 'crop_flip':
      # Translate + mirror at native resolution, then bring to model size.
      image = pad_and_random_crop(image, self.crop_padding, rng)
      image = random_flip(image, rng)
      image = resize(image, self.image_size)
    elif self.augment == 'inception_crop':
      image = inception_crop(image, rng)
      image = resize(image, self.image_size)
      image = random_flip(image, rng)
    elif self.augment == 'flip':
      # Mirror only: on short schedules translation costs more accuracy
      # than it buys (measured on Fashion-MNIST).
      image = random_flip(eval_image(image, self.image_size, self.small), rng)
    elif self.augment == 'none':
      image = eval_image(image, self.image_size, self.small)
    else:
      raise ValueError(f'Unresolved augmentation {self.augment!r}.')
    if self.randaugment:
      image = randaugment_lib.randaugment(image, rng, *self.randaugment)
    if self.random_erasing:
      image = random_erasing(image, rng, self.random_erasing)
    return self.output(image, element)

  def batchable(self, image_shape: Sequence[int | None] | None) -> bool:
    """Whether `random_map_batch` applies to images of this dataset shape.

    True for small images of one static size that the model sees at native
    resolution with a translate/mirror augmentation: then a whole batch is
    augmented with a handful of vectorised numpy ops instead of one Python
    call per example (which capped the CPU demo's input at ~4k img/s).
    """
    if (not self.small or self.augment not in ('crop_flip', 'flip', 'none')
        or self.randaugment or self.random_erasing):
      return False
    if image_shape is None or None in tuple(image_shape):
      return False
    return tuple(image_shape[:2]) == image_hw(self.image_size)

  def random_map_batch(
      self,
      images: np.ndarray,
      labels: np.ndarray,
      rng: np.random.Generator,
      rows: slice = slice(None),
      batch_size: int | None = None,
  ) -> dict[str, np.ndarray]:
    """Batched `random_map` for `batchable` datasets.

    Args:
      images: uint8 [b, H, W(, C)], the rows `rows` of a batch.
      labels: [b], or None for unlabelled data (labels -1).
      rng: the generator of the whole batch.
      rows: which rows of the batch these are (a process's share).
      batch_size: rows in the whole batch (default: b).

    The random parameters are drawn for the whole batch and then sliced, so a
    row is augmented the same way whichever process reads it.
    """
    if images.ndim == 3:
      images = images[..., None]
    total = len(images) if batch_size is None else batch_size
    tops, lefts = rng.integers(0, 2 * self.crop_padding + 1, size=(2, total))
    flips = rng.random(total) < 0.5
    if self.augment == 'crop_flip':
      images = crop_batch(images, self.crop_padding, tops[rows], lefts[rows])
    if self.augment in ('crop_flip', 'flip'):
      images = flip_batch(images, flips[rows])
    return {
        'image': np.asarray(images, np.uint8),
        'label': (np.full(len(images), -1, np.int32) if labels is None
                  else np.asarray(labels, np.int32)),
    }


@dataclasses.dataclass(frozen=True)
class EvalTransform(_Options, grain.transforms.Map):
  """Dataset record -> {'image': uint8 [H, W, C], 'label': int32}, fixed."""

  def map(self, element: dict[str, Any]):
    image = _as_hwc(element[self.image_key])
    image = eval_image(image, self.image_size, self.small)
    return self.output(image, element)


# ------------------------------------------------------------------- text --


def lookup(record: dict[str, Any], key: str) -> Any:
  """`record[key]`, where KEY may be a path into nested features.

  'captions/text' reads coco_captions' `captions` -> `text`; a key that is
  itself a feature name containing '/' ('image/filename') is found first.
  """
  if key in record:
    return record[key]
  parts = key.split('/')
  for i in range(len(parts) - 1, 0, -1):
    head = '/'.join(parts[:i])
    if head in record:
      return lookup(record[head], '/'.join(parts[i:]))
  raise KeyError(key)


def top_level_key(key: str, feature_keys) -> str:
  """The top-level feature that `lookup(record, key)` starts from."""
  parts = key.split('/')
  for i in range(len(parts), 0, -1):
    if '/'.join(parts[:i]) in feature_keys:
      return '/'.join(parts[:i])
  raise KeyError(key)


def as_texts(value: Any) -> list[str]:
  """A text feature's value (one string or a sequence of them) -> [str]."""
  if isinstance(value, (str, bytes)) or (
      isinstance(value, np.ndarray) and value.ndim == 0):
    value = [value.item() if isinstance(value, np.ndarray) else value]
  return [v.decode('utf-8') if isinstance(v, bytes) else str(v) for v in value]


@dataclasses.dataclass(frozen=True)
class TextTransform:
  """The text feature of records -> token ids.

  Train (`sample`): one caption per example, picked by a uniform draw, so an
  example with several captions shows a different one each epoch. Eval
  (`all_captions`): the first `k` captions of each example with a mask.
  Texts longer than the tokenizer's max_len are truncated and flagged
  (`text_truncated`); empty texts encode as [CLS] [SEP] and are flagged
  (`text_empty`), as is an example without any caption.
  """

  text_key: str
  top_key: str  # the record's top-level feature holding it (`top_level_key`)
  tokenizer: Any  # mrl_jax.data.tokenizer.WordPieceTokenizer

  def value(self, top_value: Any) -> Any:
    """The text feature inside the value of the record's `top_key` feature."""
    if self.text_key == self.top_key:
      return top_value
    return lookup({self.top_key: top_value}, self.text_key)

  def texts(self, record_value: Any) -> list[str]:
    return as_texts(record_value) or ['']

  def sample(self, values: list[Any], draws: np.ndarray) -> dict[str, np.ndarray]:
    """values: the text feature of b examples; draws: uniform [b] in [0, 1)."""
    chosen = []
    for value, u in zip(values, draws):
      texts = self.texts(value)
      chosen.append(texts[min(int(u * len(texts)), len(texts) - 1)])
    out = self.tokenizer.encode_batch(chosen)
    return {'text': out['ids'], 'text_truncated': out['truncated'],
            'text_empty': out['empty']}

  def all_captions(self, values: list[Any], k: int) -> dict[str, np.ndarray]:
    """ids [b, k, L] of each example's first k captions; text_mask [b, k]."""
    b, length = len(values), self.tokenizer.max_len
    ids = np.zeros((b, k, length), np.int32)
    mask = np.zeros((b, k), np.int32)
    flat, where = [], []
    for i, value in enumerate(values):
      for j, text in enumerate(as_texts(value)[:k]):
        flat.append(text)
        where.append((i, j))
    if flat:
      encoded = self.tokenizer.encode_batch(flat)['ids']
      rows, cols = np.asarray(where).T
      ids[rows, cols] = encoded
      mask[rows, cols] = 1
    return {'text': ids, 'text_mask': mask}
