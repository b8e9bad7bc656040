"""Evaluators: `config.evals.<name> = dict(type=<type>, **options)`.

Each type is an `base.Evaluator` subclass in its own module; adding one is
a new module and a line here. `mrl_jax.evaluate` looks the type up, builds
it (checking its options) before training, and runs it on the embeddings.
"""
from __future__ import annotations

import importlib

REGISTRY = {  # type: "module.Class" under mrl_jax.evaluators
    "linear": "classification.Linear",    # trained heads' top-1 / top-5
    "knn": "knn.Knn",                     # k=[1, 5]: 1-NN and k-NN vote
    "retrieval": "retrieval.Retrieval",   # ks=[10, 25, 50, 100]: mAP@k, precision, recall
    "zeroshot": "zeroshot.ZeroShot",      # dual encoders: class_names, templates
    "image_text": "zeroshot.ImageText",   # dual encoders: num_images, ks=[1, 5, 10]
    "adaptive": "adaptive.Adaptive",      # confidence cascade -> results['adaptive']
    "funnel": "funnel.Funnel",            # funnel retrieval (FAISS optional) -> results['funnel']
    "quantized": "quantize.Quantized",    # int8 / 1-bit kNN -> results['quantized']
    "baseline": "baselines.Baseline",     # SVD / random projections of the full embedding
}


def get(kind, field: str = "config.evals.<name>"):
  """The evaluator class of `kind`; an unknown type lists the known ones."""
  if kind not in REGISTRY:
    raise ValueError(f"{field}.type={kind!r} is not one of {sorted(REGISTRY)}.")
  module, cls = REGISTRY[kind].rsplit(".", 1)
  return getattr(importlib.import_module(f"mrl_jax.evaluators.{module}"), cls)
