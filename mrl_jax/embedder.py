"""`mrl_jax.load(workdir)`: a trained run as an encoder of images (and texts).

  import mrl_jax
  encoder = mrl_jax.load("runs/fashion_mnist_vit_mrl")  # the newest checkpoint
  z = encoder.embed_images(images, dim=16)     # uint8 [N, H, W, C] -> float32 [N, 16], unit rows
  full = encoder.embed_images(images, normalize=False)  # all d features, as trained
  t = encoder.embed_texts(["a photo of a dog."], dim=16)  # dual encoders only
  scores = z @ t.T                             # cosine similarities [N, 1]

The model is built by the one setup of every mode (`train.setup`) from the
run's own config (WORKDIR/config.json) and restored as `--mode=embed` does;
raw images get the run's evaluation preprocessing, and the rows are those
`--mode=embed [--embed_dim=16] [--normalize]` writes. The training data need
not be on this machine: its facts then come from the config, as for
`--mode=compile`. On several processes each passes its own inputs, the same
number on every process, and gets its own rows back.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from mrl_jax import checkpoint as checkpoint_lib
from mrl_jax import compile as compile_lib
from mrl_jax import evaluate
from mrl_jax import export
from mrl_jax import prefix
from mrl_jax import sharding
from mrl_jax import train
from mrl_jax import workdir as workdir_lib
from mrl_jax.data import input_pipeline
from mrl_jax.data import preprocess


def load(workdir, *, step: int | None = None, config: ml_collections.ConfigDict | None = None,
         devices=None) -> Embedder:
  """The `Embedder` of the checkpoint of `step` (default: the newest) in `workdir`.

  `config` (default: the run's saved one) is for runs without config.json;
  `devices` (default: all) are those the mesh is laid over.
  """
  path = train.workdir_path(workdir)
  config = saved_config(path, step) if config is None else config
  steps = sorted(int(p.name) for p in (path / "checkpoints").glob("*") if p.name.isdigit())
  if not steps:
    raise FileNotFoundError(
        f"No checkpoint in {path / 'checkpoints'}: mrl_jax.load needs a trained run. Fix: "
        f"train first (python -m mrl_jax.main --config=... --workdir={workdir}).")
  if step is not None and step not in steps:
    raise FileNotFoundError(
        f"No checkpoint of step={step!r} in {path / 'checkpoints'}, which has steps {steps}. "
        f"Fix: pass one of them, or leave step out for the newest ({steps[-1]}).")
  # The dataset's facts from this host's copy, else from the config and TFDS's catalogue.
  s = train.setup(config, devices=devices, dataset=compile_lib.dataset_facts(config))
  if step is None:
    step, state = train.restore_model(s, path, mode="embed")
  else:
    ckpt = checkpoint_lib.Checkpointer(path / "checkpoints", read_only=True)
    try:
      state = ckpt.restore(step, {k: s.abstract_state[k] for k in train.MODEL_KEYS},
                           partial=True)
    finally:
      ckpt.close()
  return Embedder(config, s, step, state)


def saved_config(workdir, step: int | None = None) -> ml_collections.ConfigDict:
  """The config the run trained `step` (default: the newest) with: config.json,
  or the config.S.json of its last resume with other values at S <= step."""
  workdir = train.workdir_path(workdir)
  resumes = sorted(int(m.group(1)) for p in workdir.glob("config.*.json")
                   if (m := re.fullmatch(r"config\.(\d+)\.json", p.name)))
  resumes = [r for r in resumes if step is None or r <= step]
  if resumes:
    saved = json.loads((workdir / f"config.{resumes[-1]}.json").read_text())
  else:
    saved = workdir_lib.saved_config(workdir)
  if saved is None:
    raise FileNotFoundError(
        f"{workdir / 'config.json'} does not exist: it is the run's config, written when "
        "training starts. Fix: pass the config the run trained with, "
        "mrl_jax.load(workdir, config=get_config(...)).")
  return ml_collections.ConfigDict(_tuples(saved))


def _tuples(x: Any) -> Any:
  """JSON's lists back to the tuples configs are written with (nesting dims, rules, ...)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


class Embedder:
  """A restored model: `embed_images`, and `embed_texts` for dual encoders.

  Attributes: config, step, embedding_size (d), nesting_dims, mesh, task, state.
  """

  def __init__(self, config, s: train.Setup, step: int, state: dict[str, Any]):
    self.config, self.step, self.state = config, int(step), state
    self.mesh, self.task = s.mesh, s.task
    self.nesting_dims = tuple(int(m) for m in s.facts["nesting_dims"])
    self.embedding_size = self.nesting_dims[-1]
    shape = tuple(s.facts["dataset"].image_shape)
    self.channels = int(shape[-1])
    # As the eval pipeline: small or large protocol by the dataset's image size
    # (by each image's own when the dataset's is unknown here).
    self._small = None if None in shape[:2] else preprocess.is_small_image(shape)
    self._transforms = {small: preprocess.EvalTransform(
        label_key=None, image_size=config.input.image_size, small=small)
        for small in (False, True)}

  def embed_images(self, images, *, dim: int | None = None, normalize: bool = True,
                   batch_size: int | None = None) -> np.ndarray:
    """float32 [N, dim]: the first `dim` features (default: all d), unit rows if `normalize`.

    `images`: uint8 [N, H, W, C] or [N, H, W] (or a list of such images of any
    sizes), preprocessed as the run's evaluation does; or float [N, h, w, C],
    the model's input, passed as is (`preprocess_images` makes it).
    """
    dim = self._check_dim(dim)
    x = self.preprocess_images(images)
    forward = evaluate.make_embed_step(self.task, with_logits=False)
    emb = self._batched(x, batch_size, lambda g: forward(self.state["params"],
                                                         self.state["rest"], g)[1])
    return export.prepare_rows(emb, dim, normalize)

  def embed_texts(self, texts: Sequence[str], *, dim: int | None = None,
                  normalize: bool = True, batch_size: int | None = None) -> np.ndarray:
    """float32 [N, dim] text-tower embeddings, tokenized as the eval captions."""
    name = self.config.model.name
    if name != "dual_encoder":
      raise ValueError(f"embed_texts needs a text tower, but this run is an image model "
                       f"(config.model.name={name!r}, not 'dual_encoder'); use embed_images.")
    if isinstance(texts, (str, bytes)):
      raise ValueError(f"texts must be a list of strings, got one string {texts!r}; "
                       "pass [text].")
    dim = self._check_dim(dim)
    tokenizer = input_pipeline.load_tokenizer(self.config)
    ids = tokenizer.encode_batch(preprocess.as_texts(list(texts)))["ids"]  # [N, L]
    forward = evaluate.make_embed_text_step(self.task)  # [B, K, L] -> [B, K, d]
    emb = self._batched(ids[:, None], batch_size, lambda g: forward(self.state["params"],
                                                                    self.state["rest"], g))
    return export.prepare_rows(emb.reshape(-1, emb.shape[-1]), dim, normalize)

  def preprocess_images(self, images) -> np.ndarray:
    """Raw uint8 images -> the eval pipeline's view of them, uint8 [N, h, w, C]
    (normalised in the embed step, on the device); float input (the model's
    normalised input) checked and passed on."""
    h, w = preprocess.image_hw(self.config.input.image_size)
    c = self.channels
    if not isinstance(images, (list, tuple)):
      images = np.asarray(images)
      if np.issubdtype(images.dtype, np.floating):
        if images.shape[1:] != (h, w, c) or images.ndim != 4:
          raise ValueError(
              f"Float images are taken as the model's preprocessed input, [N, {h}, {w}, {c}] "
              f"(config.input.image_size={self.config.input.image_size}, {c} channel(s)); "
              f"got shape {images.shape}. Pass raw pixels as uint8 to have them preprocessed.")
        return images.astype(np.float32)
      if images.ndim != 4 and not (images.ndim == 3 and c == 1):
        raise ValueError(f"images of shape {images.shape}: expected uint8 [N, H, W, {c}]"
                         f"{' or [N, H, W]' if c == 1 else ''} (the run's {c} channel(s)); "
                         "one image: pass images[None].")
    out = np.zeros((len(images), h, w, c), np.uint8)
    for i, image in enumerate(images):
      image = np.asarray(image)
      if image.dtype != np.uint8 or not (image.ndim == 3 and image.shape[-1] == c
                                         or image.ndim == 2 and c == 1):
        raise ValueError(
            f"Image {i} has dtype {image.dtype} and shape {image.shape}; expected uint8 pixels "
            f"[H, W, {c}]{' or [H, W]' if c == 1 else ''} (the run's {c} channel(s)), or "
            f"float model input [N, {h}, {w}, {c}].")
      small = preprocess.is_small_image(image.shape) if self._small is None else self._small
      out[i] = self._transforms[small].map({"image": image})["image"]
    return out

  def _check_dim(self, dim) -> int:
    d = self.embedding_size
    if dim is None:
      return d
    if not prefix.is_int(dim) or not 1 <= dim <= d:
      raise ValueError(f"dim={dim!r} must be an int in [1, {d}] (the embedding size d; "
                       f"nesting dims {list(self.nesting_dims)}); leave it out for all {d}.")
    return int(dim)

  def _batched(self, rows: np.ndarray, batch_size: int | None,
               step: Callable[[jax.Array], jax.Array]) -> np.ndarray:
    """`step` over `rows` in batches of `batch_size` (default config.eval_batch_size)
    rows, rounded up to a multiple of the batch shards; the last one zero-padded."""
    size = batch_size
    if size is None:
      size = self.config.get("eval_batch_size", self.config.batch_size)
    if not prefix.is_int(size) or size < 1:
      raise ValueError(f"batch_size={batch_size!r} must be a positive int, e.g. 256.")
    shards = sharding.num_batch_shards(self.mesh)
    size = -(-size // shards) * shards
    placement = sharding.batch_sharding(self.mesh)
    out = []
    with jax.set_mesh(self.mesh):
      for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        padded = np.zeros((-(-len(chunk) // shards) * shards, *chunk.shape[1:]), chunk.dtype)
        padded[:len(chunk)] = chunk
        g = input_pipeline.make_global_batch({"x": padded}, placement)["x"]
        out.append(evaluate._local_rows(step(g))[:len(chunk)])  # pylint: disable=protected-access
    return np.concatenate(out) if out else np.zeros((0, self.embedding_size), np.float32)
