"""RandAugment: big_vision's op table on uint8 images (numpy / PIL)."""
import numpy as np
import pytest

from mrl_jax.data import randaugment as ra

RGB = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
GRAY = RGB[..., :1].copy()


@pytest.mark.parametrize("name", list(ra.OPS))
@pytest.mark.parametrize("image", [RGB, GRAY], ids=["rgb", "gray"])
def test_every_op_keeps_dtype_shape_and_range(name, image):
  op, level_to_arg = ra.OPS[name]
  for magnitude in (0, 5, 10):
    out = op(image, level_to_arg(magnitude), np.random.default_rng(1))
    assert out.dtype == np.uint8 and out.shape == image.shape, (name, magnitude)
  # Deterministic for a generator's seed.
  a = op(image, level_to_arg(7), np.random.default_rng(3))
  b = op(image, level_to_arg(7), np.random.default_rng(3))
  np.testing.assert_array_equal(a, b)


def test_ops_do_what_their_names_say():
  rng = np.random.default_rng(0)
  arg = lambda name, m: ra.OPS[name][1](m)  # noqa: E731
  np.testing.assert_array_equal(ra.invert(RGB, None, rng), 255 - RGB)
  assert arg("Posterize", 10) == 4
  assert np.all(ra.posterize(RGB, 4, rng) % 16 == 0)
  out = ra.solarize(RGB, 128, rng)
  np.testing.assert_array_equal(out, np.where(RGB < 128, RGB, 255 - RGB))
  np.testing.assert_array_equal(ra.solarize(RGB, arg("Solarize", 10), rng), RGB)  # 256: none
  assert arg("SolarizeAdd", 10) == 110 and arg("Cutout", 10) == 40
  for name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
    # Magnitude 0 moves nothing.
    np.testing.assert_array_equal(ra.OPS[name][0](RGB, arg(name, 0), rng), RGB, err_msg=name)
  moved = ra.translate_x(RGB, 5, np.random.default_rng(0))
  shifted = (np.array_equal(moved[:, :-5], RGB[:, 5:]) or np.array_equal(moved[:, 5:], RGB[:, :-5]))
  assert shifted and np.all((moved[:, :5] == 128) | (moved[:, -5:] == 128))
  cut = ra.cutout(RGB, 4, np.random.default_rng(0))
  changed = np.any(cut != RGB, axis=-1)
  assert 0 < changed.sum() <= 64 and np.all(cut[changed] == 128)
  np.testing.assert_allclose(arg("Color", 10), 1.9)
  np.testing.assert_allclose(arg("Rotate", 10), 30.0)


def test_randaugment_layers_and_determinism():
  out = ra.randaugment(RGB, np.random.default_rng(5), 2, 10)
  again = ra.randaugment(RGB, np.random.default_rng(5), 2, 10)
  np.testing.assert_array_equal(out, again)
  assert out.dtype == np.uint8 and out.shape == RGB.shape
  # On an image of ImageNet-like size (translations of up to 100 px leave some of it).
  big = np.random.default_rng(1).integers(0, 256, (160, 192, 3), dtype=np.uint8)
  outs = [ra.randaugment(big, np.random.default_rng(s), 2, 10) for s in range(10)]
  assert len({o.tobytes() for o in outs}) >= 8
  np.testing.assert_array_equal(ra.randaugment(RGB, np.random.default_rng(5), 0, 10), RGB)
  only = ra.randaugment(RGB, np.random.default_rng(5), 3, 10, ops=("Invert",))
  np.testing.assert_array_equal(only, 255 - RGB)  # three inversions


@pytest.mark.parametrize("args, message", [
    ((2, 11), "magnitude=11 must be in \\[0, 10\\]"),
    ((2, -1), "magnitude=-1"),
    ((-1, 10), "num_layers=-1 must be an int >= 0"),
    ((2, 10, ("Blur",)), "unknown ops \\['Blur'\\]"),
])
def test_bad_randaugment_configs(args, message):
  with pytest.raises(ValueError, match=message):
    ra.check(*args)


def test_random_erasing_fills_one_box_with_the_given_probability():
  from mrl_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  image = np.full((40, 50, 3), 7, np.uint8)
  erased = [preprocess.random_erasing(image, np.random.default_rng(s), 0.5) for s in range(200)]
  changed = [np.any(e != 7, axis=-1) for e in erased]
  share = np.mean([c.any() for c in changed])
  assert 0.4 < share < 0.6
  for c, e in zip(changed, erased):
    assert e.dtype == np.uint8 and e.shape == image.shape
    if c.any():
      ys, xs = np.nonzero(c)
      box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
      assert 0.01 * c.size < box <= c.size / 3 + 60  # within timm's area range (rounding)
  np.testing.assert_array_equal(preprocess.random_erasing(image, np.random.default_rng(0), 0.0),
                                image)
