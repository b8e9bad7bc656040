"""Image-text evaluation at every dimension: zero-shot and cross-modal retrieval.

Zero-shot classification (CLIP): every class name is written into each prompt
template ("a photo of a {}."), the prompts are embedded once by the text
tower, and at each dim m a class's vector is the mean of its prompts'
m-prefixes, each L2-normalised first, then renormalised. An image is assigned
the class whose vector has the largest cosine with the image's m-prefix.

Retrieval (image->text and text->image recall@k, the COCO / Flickr30k
protocol): the first N images of the eval split with their first K captions.
i2t recall@k: fraction of images for which one of *its* captions is among the
k captions most similar to it. t2i recall@k: fraction of captions whose image
is among the k images most similar to it. Ties rank the lower index first,
so identical captions of different images (templated datasets) cannot all
count as hits. Scores are streamed over query chunks: memory is
O(chunk x candidates), never N x NK per dim at once.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mrl_jax import prefix
from mrl_jax.evaluators import base

DEFAULT_TEMPLATES = ("a photo of a {}.",)
DEFAULT_RECALL_KS = (1, 5, 10)
_CHUNK = 1024


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
  """Class-major prompt list: prompts[c * T + t] = templates[t] with name c."""
  for t in templates:
    if t.count("{}") != 1:
      raise ValueError(
          f"Zero-shot template {t!r} must contain exactly one '{{}}' where the "
          "class name goes, e.g. 'a photo of a {}.'.")
  return [t.format(name) for name in class_names for t in templates]


def class_vectors(prompt_embeddings: np.ndarray, num_classes: int, dim: int) -> np.ndarray:
  """[C * T, d] prompt embeddings -> [C, dim] unit class vectors at `dim`."""
  per_class = prompt_embeddings.reshape(num_classes, -1, prompt_embeddings.shape[-1])
  return prefix.normalize_rows(prefix.normalize_rows(per_class[..., :dim]).mean(axis=1))


def zeroshot_accuracy(image_embeddings: np.ndarray, labels: np.ndarray,
                      prompt_embeddings: np.ndarray, num_classes: int,
                      dims: Sequence[int]) -> dict[int, float]:
  """Zero-shot top-1 at each dim; labels in [0, num_classes)."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"Zero-shot needs labels in [0, {num_classes}) to match the class names; "
        f"the eval split has labels in [{labels.min()}, {labels.max()}].")
  out = {}
  for m in dims:
    classes = class_vectors(prompt_embeddings, num_classes, m)  # [C, m]
    queries = prefix.normalize_rows(image_embeddings[:, :m])
    pred = np.concatenate([np.argmax(queries[i:i + _CHUNK] @ classes.T, axis=1)
                           for i in range(0, len(queries), _CHUNK)]) if len(queries) else []
    out[m] = float(np.mean(np.asarray(pred) == labels)) if len(labels) else 0.0
  return out


def _ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
  """0-based rank of column positive[i] in row i (ties: lower index first)."""
  rows = np.arange(len(scores))
  s = scores[rows, positive][:, None]
  cols = np.arange(scores.shape[1])[None, :]
  return np.sum((scores > s) | ((scores == s) & (cols < positive[:, None])), axis=1)


def image_text_recall(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                      text_mask: np.ndarray, dims: Sequence[int],
                      ks: Sequence[int] = DEFAULT_RECALL_KS) -> dict[str, dict[int, float]]:
  """i2t_recall@k and t2i_recall@k at every dim.

  Args:
    image_embeddings: [N, d].
    text_embeddings: [N, K, d], the captions of each image.
    text_mask: [N, K] bool, which captions exist.
    dims: prefix lengths.
    ks: recall cut-offs.
  """
  n, k_max, _ = text_embeddings.shape
  mask = np.asarray(text_mask, bool).reshape(-1)
  owner = np.repeat(np.arange(n), k_max)[mask]  # image of each caption
  texts_all = text_embeddings.reshape(n * k_max, -1)[mask]
  if not len(texts_all):
    raise ValueError("Image-text retrieval needs captions; the eval split has none.")
  position = np.cumsum(mask) - 1  # caption (i, j) -> column among kept ones
  out = {f"{d}_recall@{k}": {} for d in ("i2t", "t2i") for k in ks}
  for m in dims:
    images = prefix.normalize_rows(image_embeddings[:, :m])
    texts = prefix.normalize_rows(texts_all[:, :m])
    # i2t: best rank over the image's own captions.
    best = np.full(n, np.iinfo(np.int64).max)
    for i in range(0, n, _CHUNK):
      scores = images[i:i + _CHUNK] @ texts.T  # [c, NK']
      rows = np.arange(i, min(i + _CHUNK, n))
      for j in range(k_max):
        flat = rows * k_max + j
        col = np.where(mask[flat], position[flat], -1)
        has = col >= 0
        if has.any():
          r = _ranks(scores[has], col[has])
          best[rows[has]] = np.minimum(best[rows[has]], r)
    t_rank = []
    for i in range(0, len(texts), _CHUNK):
      scores = texts[i:i + _CHUNK] @ images.T  # [c, N]
      t_rank.append(_ranks(scores, owner[i:i + _CHUNK]))
    t_rank = np.concatenate(t_rank)
    has_caption = best < np.iinfo(np.int64).max
    for k in ks:
      out[f"i2t_recall@{k}"][m] = float(np.mean(best[has_caption] < k))
      out[f"t2i_recall@{k}"][m] = float(np.mean(t_rank < k))
  return out


class ZeroShot(base.Evaluator):
  """zeroshot_top1: class prompts embedded by the text tower (options
  class_names, default the dataset's label names; templates)."""
  needs_text_tower = True
  option_names = ("class_names", "templates")

  def __init__(self, options, context, field):
    super().__init__(options, context, field)
    self.templates = list(options.get("templates") or DEFAULT_TEMPLATES)
    prompts(["x"], self.templates)  # bad templates fail now
    self.class_names = options.get("class_names")
    if context.class_names is not None:  # the dataset is known: check the names now
      names = self.names()
      if context.num_classes and len(names) != context.num_classes:
        raise ValueError(
            f"{field}.class_names has {len(names)} names but the dataset has "
            f"{context.num_classes} classes (config.dataset.num_classes / its label "
            "feature); give one name per class, in label order.")

  def names(self) -> list[str]:
    names = self.class_names or self.context.class_names
    if not names:
      raise ValueError(
          "Zero-shot needs class names: the dataset's label feature has none; set "
          f"{self.field}.class_names=[...] (one per label, in label order).")
    return list(names)

  def run(self, data):
    names = self.names()
    emb = data.embed_texts(prompts(names, self.templates))
    return {"zeroshot_top1": zeroshot_accuracy(
        data.eval["embedding"], data.eval["label"], emb, len(names), self.context.eval_dims)}


class ImageText(base.Evaluator):
  """i2t_recall@k, t2i_recall@k on the first num_images eval images (options
  num_images, default all; ks=[1, 5, 10])."""
  needs_text_tower = True
  needs_captions = True
  needs_labels = False
  option_names = ("num_images", "ks")

  def __init__(self, options, context, field):
    super().__init__(options, context, field)
    self.ks = base.check_ks(options.get("ks", DEFAULT_RECALL_KS), field=f"{field}.ks")
    self.num_images = options.get("num_images")
    if self.num_images is not None and (not prefix.is_int(self.num_images)
                                        or self.num_images < 1):
      raise ValueError(f"{field}.num_images={self.num_images!r} must be a positive int "
                       "(the first eval images) or None (all of them).")

  def run(self, data):
    ev = data.eval
    n = self.num_images or len(ev["embedding"])
    return image_text_recall(ev["embedding"][:n], ev["text_embedding"][:n],
                             ev["text_mask"][:n], self.context.eval_dims, self.ks)
