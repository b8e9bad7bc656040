"""Mixup / CutMix on device, and the nested cross-entropy of soft labels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrl_jax import matryoshka
from mrl_jax import mixup
from mrl_jax import sharding
from tests.test_train import small_config

X = np.random.default_rng(0).normal(size=(6, 8, 10, 3)).astype(np.float32)
Y = np.array([0, 1, 2, 3, 1, 0])


def _onehot(y, c=4):
  return np.eye(c, dtype=np.float32)[y]


def test_mixup_mixes_images_and_labels_with_the_neighbour():
  images, soft, lam, cut = mixup.mix_batch(jax.random.key(1), X, Y, 4, mixup_alpha=0.2)
  lam = float(lam)
  assert 0 < lam < 1 and not bool(cut)
  np.testing.assert_allclose(images, lam * X + (1 - lam) * np.roll(X, 1, axis=0), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(soft, lam * _onehot(Y) + (1 - lam) * _onehot(np.roll(Y, 1)),
                             rtol=1e-6)
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
  # Deterministic for a key, different for another.
  again = mixup.mix_batch(jax.random.key(1), X, Y, 4, mixup_alpha=0.2)[0]
  np.testing.assert_array_equal(again, images)
  assert not np.allclose(mixup.mix_batch(jax.random.key(2), X, Y, 4, mixup_alpha=0.2)[0],
                         images)


def test_cutmix_pastes_a_box_and_labels_by_its_area():
  for seed in range(5):
    images, soft, lam, cut = mixup.mix_batch(jax.random.key(seed), X, Y, 4,
                                             cutmix_alpha=1.0)
    assert bool(cut)
    images = np.asarray(images)
    pasted = np.all(images == np.roll(X, 1, axis=0), axis=(0, 3))  # [H, W]
    kept = np.all(images == X, axis=(0, 3))
    assert np.all(pasted | kept)
    ys, xs = np.nonzero(pasted)
    if len(ys):  # a rectangle
      assert pasted[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
    np.testing.assert_allclose(float(lam), 1 - pasted.sum() / pasted.size, rtol=1e-6)
    np.testing.assert_allclose(
        soft, float(lam) * _onehot(Y) + (1 - float(lam)) * _onehot(np.roll(Y, 1)), rtol=1e-6)


def test_switch_and_prob():
  used = [bool(mixup.mix_batch(jax.random.key(s), X, Y, 4, mixup_alpha=0.2, cutmix_alpha=1.0,
                               switch_prob=0.5)[3]) for s in range(40)]
  assert 5 < sum(used) < 35  # both kinds occur
  images, soft, lam, _ = mixup.mix_batch(jax.random.key(0), X, Y, 4, mixup_alpha=0.2, prob=0.0)
  np.testing.assert_array_equal(images, X)
  assert float(lam) == 1.0
  np.testing.assert_array_equal(soft, _onehot(Y))


def test_nested_ce_of_soft_labels_equals_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6, 4)).astype(np.float32)  # [M, B, C]
  soft = rng.dirichlet(np.ones(4), size=6).astype(np.float32)
  eps = 0.1
  target = soft * (1 - eps) + eps / 4
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -(target * logp).sum(-1).mean(-1)  # [M]
  got = matryoshka.softmax_ce_per_dim(jnp.asarray(logits), jnp.asarray(soft),
                                      label_smoothing=eps)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # One-hot soft labels give the int-label loss.
  np.testing.assert_allclose(
      matryoshka.softmax_ce_per_dim(logits, _onehot(Y), label_smoothing=eps),
      matryoshka.softmax_ce_per_dim(logits, Y, label_smoothing=eps), rtol=1e-6)


def test_mixup_on_a_sharded_batch_equals_one_device():
  mesh = sharding.create_mesh({"data": 2, "fsdp": 4})
  f = jax.jit(lambda k, x, y: mixup.mix_batch(k, x, y, 4, mixup_alpha=0.4, cutmix_alpha=1.0))
  x = np.concatenate([X, X[::-1]])[:8]
  y = np.concatenate([Y, Y[::-1]])[:8]
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, sharding.batch_sharding(mesh))
    ys = jax.device_put(y, sharding.batch_sharding(mesh))
    got = f(jax.random.key(3), xs, ys)
  want = jax.jit(f)(jax.random.key(3), x, y)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("mix, message", [
    (dict(mixup_alpha=-0.1), "mixup_alpha=-0.1 must be a number >= 0"),
    (dict(cutmix_alpha=-1), "cutmix_alpha=-1 must be a number >= 0"),
    (dict(mixup_alpha=0.2, prob=1.5), "prob=1.5 must be a probability"),
    (dict(mixup_alpha=0.2, alpha=1), "unknown fields \\['alpha'\\]"),
])
def test_bad_mixup_configs(fake_dataset_dir, mix, message):
  config = small_config(fake_dataset_dir)
  config.mixup = mix
  with pytest.raises(ValueError, match=message):
    mixup.check_config(config, contrastive=False)


def test_mixup_with_a_dual_encoder_is_refused(fake_dataset_dir):
  config = small_config(fake_dataset_dir)
  config.mixup = dict(mixup_alpha=0.2)
  with pytest.raises(ValueError, match="applies to classification"):
    mixup.check_config(config, contrastive=True)
