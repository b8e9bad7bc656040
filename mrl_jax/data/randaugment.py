"""RandAugment (Cubuk et al., 2020) on uint8 images, with numpy and PIL.

The operations, their magnitude ranges and the sampling follow big_vision's
`randaug(num_layers, magnitude)` (`distort_image_with_randaugment` in
big_vision/pp/autoaugment.py, itself the TPU EfficientNet code): each of
`num_layers` layers picks one of the 16 ops below uniformly and applies it
with the shared magnitude M in [0, 10] (there the drawn "probability" is
never used, so the chosen op always applies); geometric ops fill with gray
128; signed ops flip their sign with probability 1/2. Where the TF code
documents an op as "equivalent of PIL X", PIL's own X is used here, with one
deliberate difference: TF's Contrast blends towards H*W/256 (the sum of a
256-bin histogram over 256) instead of the mean gray level, a known bug;
PIL's Contrast, used here, blends towards the mean.

`OPS` is the one table: name -> (function(image, arg, rng), level -> arg).
Images are uint8 [H, W, C] with C = 1 or 3 and keep dtype, shape and range.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

MAX_LEVEL = 10
FILL = 128
TRANSLATE_CONST = 100  # pixels at magnitude 10 (for 224 px crops)
CUTOUT_CONST = 40


def _pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _np(image: Image.Image, channels: int) -> np.ndarray:
  out = np.asarray(image, np.uint8)
  return out[..., None] if channels == 1 else out


def _fill(image):
  return FILL if image.shape[-1] == 1 else (FILL,) * image.shape[-1]


def _affine(image, coeffs):
  """PIL's AFFINE: output (x, y) reads input (a x + b y + c, d x + e y + f)."""
  h, w = image.shape[:2]
  out = _pil(image).transform((w, h), Image.Transform.AFFINE, coeffs,
                              resample=Image.Resampling.NEAREST,
                              fillcolor=_fill(image))
  return _np(out, image.shape[-1])


def _signed(value, rng):
  return value if rng.random() < 0.5 else -value


def autocontrast(image, _, rng):
  return _np(ImageOps.autocontrast(_pil(image)), image.shape[-1])


def equalize(image, _, rng):
  return _np(ImageOps.equalize(_pil(image)), image.shape[-1])


def invert(image, _, rng):
  return 255 - image


def rotate(image, degrees, rng):
  out = _pil(image).rotate(_signed(degrees, rng), resample=Image.Resampling.NEAREST,
                           fillcolor=_fill(image))
  return _np(out, image.shape[-1])


def posterize(image, bits, rng):
  shift = 8 - bits
  return ((image >> shift) << shift).astype(np.uint8)


def solarize(image, threshold, rng):
  return np.where(image < threshold, image, 255 - image).astype(np.uint8)


def solarize_add(image, addition, rng):
  added = np.clip(image.astype(np.int32) + addition, 0, 255).astype(np.uint8)
  return np.where(image < 128, added, image)


def _enhance(cls):
  def op(image, factor, rng):
    if image.shape[-1] == 1 and cls is ImageEnhance.Color:
      return image  # no colour to change
    return _np(cls(_pil(image)).enhance(factor), image.shape[-1])
  return op


def shear_x(image, level, rng):
  return _affine(image, (1, _signed(level, rng), 0, 0, 1, 0))


def shear_y(image, level, rng):
  return _affine(image, (1, 0, 0, _signed(level, rng), 1, 0))


def translate_x(image, pixels, rng):
  return _affine(image, (1, 0, _signed(pixels, rng), 0, 1, 0))


def translate_y(image, pixels, rng):
  return _affine(image, (1, 0, 0, 0, 1, _signed(pixels, rng)))


def cutout(image, pad, rng):
  """A gray square of side 2 * pad centred uniformly, clipped to the image."""
  h, w = image.shape[:2]
  cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
  out = image.copy()
  out[max(0, cy - pad):cy + pad, max(0, cx - pad):cx + pad] = FILL
  return out


def _enhance_arg(level):
  return level / MAX_LEVEL * 1.8 + 0.1


# name: (op, level -> argument), big_vision's `level_to_arg` with its RandAugment
# constants (cutout 40, translate 100).
OPS = {
    "AutoContrast": (autocontrast, lambda level: None),
    "Equalize": (equalize, lambda level: None),
    "Invert": (invert, lambda level: None),
    "Rotate": (rotate, lambda level: level / MAX_LEVEL * 30.0),
    "Posterize": (posterize, lambda level: int(level / MAX_LEVEL * 4)),
    "Solarize": (solarize, lambda level: int(level / MAX_LEVEL * 256)),
    "Color": (_enhance(ImageEnhance.Color), _enhance_arg),
    "Contrast": (_enhance(ImageEnhance.Contrast), _enhance_arg),
    "Brightness": (_enhance(ImageEnhance.Brightness), _enhance_arg),
    "Sharpness": (_enhance(ImageEnhance.Sharpness), _enhance_arg),
    "ShearX": (shear_x, lambda level: level / MAX_LEVEL * 0.3),
    "ShearY": (shear_y, lambda level: level / MAX_LEVEL * 0.3),
    "TranslateX": (translate_x, lambda level: level / MAX_LEVEL * TRANSLATE_CONST),
    "TranslateY": (translate_y, lambda level: level / MAX_LEVEL * TRANSLATE_CONST),
    "Cutout": (cutout, lambda level: int(level / MAX_LEVEL * CUTOUT_CONST)),
    "SolarizeAdd": (solarize_add, lambda level: int(level / MAX_LEVEL * 110)),
}


def check(num_layers, magnitude, ops=None) -> None:
  """config.input.randaugment = dict(num_layers, magnitude[, ops])."""
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
    raise ValueError(f"config.input.randaugment.num_layers={num_layers!r} must be an int "
                     ">= 0 (ops applied one after another).")
  if (isinstance(magnitude, bool) or not isinstance(magnitude, (int, float))
      or not 0 <= magnitude <= MAX_LEVEL):
    raise ValueError(f"config.input.randaugment.magnitude={magnitude!r} must be in "
                     f"[0, {MAX_LEVEL}] (big_vision's scale; the paper's recipe uses 10).")
  unknown = [o for o in (ops or ()) if o not in OPS]
  if unknown:
    raise ValueError(f"config.input.randaugment.ops has unknown ops {unknown}; the ops are "
                     f"{list(OPS)}.")


def randaugment(image: np.ndarray, rng: np.random.Generator, num_layers: int,
                magnitude: float, ops=None) -> np.ndarray:
  """`num_layers` ops drawn uniformly from `ops` (default: all 16), each at `magnitude`."""
  names = list(ops or OPS)
  for _ in range(num_layers):
    op, level_to_arg = OPS[names[int(rng.integers(len(names)))]]
    image = op(image, level_to_arg(magnitude), rng)
  return image
