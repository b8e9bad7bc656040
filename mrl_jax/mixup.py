"""Mixup and CutMix on the global batch, on device, inside the train step.

Mixup follows big_vision (`get_mixup` in big_vision/utils.py): one ratio
lam ~ Beta(alpha, alpha) per batch, every image mixed with its neighbour in
the batch (`jnp.roll` by one), `lam * x + (1 - lam) * x_neighbour`. CutMix
follows timm (`timm/data/mixup.py`, `rand_bbox` + `correct_lam`): a box of
area ~(1 - lam) of the image, centred uniformly and clipped to it, is
pasted from the neighbour, and lam becomes the share of the image left
unchanged. With both alphas > 0, a batch uses CutMix with probability
`switch_prob`, else Mixup (timm's switch); `prob` is the chance that a batch
is mixed at all. The labels become the same mix of one-hot rows, soft
targets [B, C] that the nested cross-entropy takes for every prefix (label
smoothing then applies on top).

The random draws come from `key` alone (the train step folds in its step
number), so a run is deterministic for its seed and resumes exactly. On a
sharded batch the neighbour of a device's first row lives on the previous
device: XLA moves one row per device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FIELDS = ("mixup_alpha", "cutmix_alpha", "switch_prob", "prob")


def enabled(config) -> bool:
  m = config.get("mixup") or {}
  return bool(m.get("mixup_alpha", 0.0) or m.get("cutmix_alpha", 0.0))


def check_config(config, *, contrastive: bool) -> None:
  """config.mixup: known fields, alphas >= 0, probabilities in [0, 1]."""
  m = config.get("mixup") or {}
  unknown = set(m) - set(FIELDS)
  if unknown:
    raise ValueError(f"config.mixup has unknown fields {sorted(unknown)}; its fields are "
                     f"{FIELDS}.")
  for field in ("mixup_alpha", "cutmix_alpha"):
    v = m.get(field, 0.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
      raise ValueError(f"config.mixup.{field}={v!r} must be a number >= 0 (the Beta "
                       "distribution's alpha; 0 turns it off).")
  for field in ("switch_prob", "prob"):
    v = m.get(field, 0.5 if field == "switch_prob" else 1.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
      raise ValueError(f"config.mixup.{field}={v!r} must be a probability in [0, 1].")
  if contrastive and enabled(config):
    raise ValueError(
        "config.mixup applies to classification (it mixes images and their class "
        "labels); a dual encoder's targets are its pairs. Set "
        "--config.mixup.mixup_alpha=0 --config.mixup.cutmix_alpha=0.")


def cutmix_box(key, height: int, width: int, lam):
  """timm's `rand_bbox`: (y0, y1, x0, x1) of a box of ~(1 - lam) of the image."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  ky, kx = jax.random.split(key)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  return y0, y1, x0, x1


def mix_batch(key, images, labels, num_classes: int, *, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0, switch_prob: float = 0.5, prob: float = 1.0):
  """(images [B, H, W, C], int labels [B]) -> (mixed images, soft labels [B, classes],
  lam, whether CutMix was used)."""
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  other_images = jnp.roll(images, 1, axis=0)
  other_labels = jnp.roll(onehot, 1, axis=0)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1)
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1)

  height, width = images.shape[1:3]
  y0, y1, x0, x1 = cutmix_box(k_box, height, width, lam_cut)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [H, W]
  cut_images = jnp.where(box[None, :, :, None], other_images, images)
  lam_box = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
  mixed = (lam_mix * images + (1 - lam_mix) * other_images).astype(images.dtype)

  apply = jax.random.uniform(k_apply) < prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0).astype(jnp.float32)
  out = jnp.where(apply, jnp.where(use_cutmix, cut_images, mixed), images)
  soft = lam * onehot + (1 - lam) * other_labels
  return out, soft, lam, apply & use_cutmix


def mix_train_batch(config, key, batch, num_classes: int):
  """The train step's batch with config.mixup applied (image and label replaced)."""
  m = config.mixup
  images, soft, _, _ = mix_batch(
      key, batch["image"], batch["label"], num_classes,
      mixup_alpha=float(m.get("mixup_alpha", 0.0)),
      cutmix_alpha=float(m.get("cutmix_alpha", 0.0)),
      switch_prob=float(m.get("switch_prob", 0.5)), prob=float(m.get("prob", 1.0)))
  return dict(batch, image=images, label=soft)
