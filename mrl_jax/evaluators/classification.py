"""Linear (trained-head) top-1 / top-5 accuracy at every head dim.

The model's head gives logits [M, B, C], one slice per head dim; this
accumulates correct counts over eval batches. Padding examples (mask 0) are
not counted, so every host can run the same number of padded batches. Counts
are integers, so the accuracies are exact fractions.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from mrl_jax.evaluators import base


@jax.jit
def _batch_counts(logits, labels, mask):  # [M, B, C], [B], [B] -> [2, M] int32
  # top_k puts equal logits in class-index order, so top-1 is argmax's choice.
  _, top = lax.top_k(logits, min(5, logits.shape[-1]))  # [M, B, 5]
  hits = top == labels[None, :, None]
  top1 = hits[..., 0] & mask
  top5 = hits.any(-1) & mask
  return jnp.stack([top1.sum(-1), top5.sum(-1)]).astype(jnp.int32)


class LinearAccuracy:
  """Streaming top-1/top-5 per head dim.

    acc = LinearAccuracy(head_dims)
    for batch: acc.update(logits [M, B, C], labels [B], mask [B])
    acc.result() -> {'linear_top1': {dim: acc}, 'linear_top5': {dim: acc}}
  """

  def __init__(self, head_dims: Sequence[int] | None = None):
    self.head_dims = None if head_dims is None else [int(m) for m in head_dims]
    self.correct = None  # [2, M] int64: top-1 and top-5 hits
    self.count = 0

  def update(self, logits, labels, mask=None):
    logits = jnp.asarray(logits)
    if logits.ndim != 3:
      raise ValueError(f"logits must be [M, B, C], got shape {logits.shape}.")
    labels = jnp.asarray(labels, jnp.int32)
    mask = (jnp.ones(labels.shape, bool) if mask is None
            else jnp.asarray(mask).astype(bool))
    counts = np.asarray(_batch_counts(logits, labels, mask), np.int64)
    self.correct = counts if self.correct is None else self.correct + counts
    self.count += int(np.asarray(mask).sum())

  def result(self, head_dims: Sequence[int] | None = None) -> dict[str, dict[int, float]]:
    dims = [int(m) for m in head_dims] if head_dims is not None else self.head_dims
    if dims is None:
      raise ValueError("LinearAccuracy.result needs the head dims (one per logits slice).")
    if self.correct is None:
      raise ValueError("LinearAccuracy.result called before any update.")
    if len(dims) != self.correct.shape[1]:
      raise ValueError(f"{len(dims)} head dims {dims} for logits with "
                       f"{self.correct.shape[1]} slices.")
    total = max(self.count, 1)
    top1, top5 = self.correct
    return {"linear_top1": {m: int(c) / total for m, c in zip(dims, top1)},
            "linear_top5": {m: int(c) / total for m, c in zip(dims, top5)}}


class Linear(base.Evaluator):
  """linear_top1 / linear_top5: the trained heads' accuracy at every head dim."""
  needs_heads = True

  def run(self, data):
    self.check_eval(data)
    acc = LinearAccuracy(self.context.head_dims)
    acc.update(data.eval.local["logits"], data.eval.local["label"])  # this process's rows
    acc.correct, acc.count = base.process_sum(acc.correct), int(base.process_sum(acc.count))
    return acc.result()
