"""Start from the checkpoints users already have.

  from mrl_jax import pretrained
  encoder = pretrained.load_encoder("B_16-i21k-300ep.npz", "big_vision")
  features = encoder(images)  # [N, 768]: big_vision's pre_logits of [N, 224, 224, 3] in [-1, 1]
  encoder.config              # the config.model fields it inferred, to copy into a config

`format` is one of `FORMATS`:
* 'big_vision': a big_vision / AugReg / vision_transformer ViT `.npz` (current
  and old names; `params/`, `opt/target/` prefixes; `FILE.npz:img` for a
  two-tower file's image tower);
* 'timm': the directory timm's `save_for_hf` (the hub layout) writes:
  model.safetensors + config.json of a VisionTransformer;
* 'hf_bert': the directory `save_pretrained` writes for a Hugging Face BERT
  (`BertModel` or a task model with its `bert.` prefix);
* 'mrl_jax': another run's workdir (its newest checkpoint's params and
  BatchNorm statistics; `tower='text'` for a dual encoder's text tower).
Paths may be local or `gs://`.

The encoder is the module class the trainer builds for that tower (a
`vit.ViT`, `text.TextEncoder` or `resnet.ResNet` subclass whose call returns
the pooled features): ViTs take float32 images [N, H, W, C] in the range the
checkpoint was trained with ([-1, 1] for big_vision and timm's 0.5-mean
models), BERT a dict of int arrays `input_ids`, `attention_mask`,
`token_type_ids` [N, L] and returns the [CLS] hidden state.

In a training config, `config.model.init = dict(path=..., format=...,
dont_load=(regex, ...))` (per tower for a dual encoder:
`config.model.image.init`, `config.model.text.init`) loads a checkpoint into
the tower at a fresh start, never over a checkpoint being resumed
(`init_train_state`). Names are ours (`blocks/0/attn/query/kernel`); the
heads and the representation layer are initialised unless `dont_load` is
changed (its default `DONT_LOAD`); position embeddings are resampled to the
config's grid (bilinear, as big_vision).
"""
from __future__ import annotations

from collections.abc import Mapping
import io
import re
from typing import Any, Sequence

from absl import logging
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from mrl_jax import checkpoint as checkpoint_lib
from mrl_jax.models import resnet
from mrl_jax.models import text
from mrl_jax.models import vit
from mrl_jax.pretrained import readers
from mrl_jax.pretrained.readers import Checkpoint, FormatError  # pylint: disable=unused-import

FORMATS = tuple(readers.READERS)
# Re-initialised by default: a run's own classifier and representation layer.
DONT_LOAD = (r"^head(/|$)", r"^representation(/|$)")


def read(path: str, format: str, *, tower: str = "image") -> Checkpoint:  # pylint: disable=redefined-builtin
  """The checkpoint at `path` in our names and layouts (`readers.Checkpoint`)."""
  if format not in readers.READERS:
    raise ValueError(f"format={format!r} is not one of {FORMATS}.")
  if format == "mrl_jax":
    return readers.read_mrl_jax(str(path), tower)
  return readers.READERS[format](str(path))


# ----------------------------------------------------------------------------
# Encoders: the trainer's tower classes, called for their pooled features.
# ----------------------------------------------------------------------------
class ViTEncoder(vit.ViT):
  """A loaded ViT: `encoder(images [N, H, W, C])` -> pooled features [N, width]."""

  def __call__(self, images, *, train: bool = False, rng=None):
    return self.features(jnp.asarray(images), train=train, rng=rng)


class ResNetEncoder(resnet.ResNet):
  """A loaded ResNet: `encoder(images)` -> pooled features [N, num_features]."""

  def __call__(self, images, *, train: bool = False, rng=None):
    del rng
    return self.features(jnp.asarray(images), train=train)


class TextEncoder(text.TextEncoder):
  """A loaded text tower: `encoder(dict(input_ids, attention_mask, token_type_ids))`
  (or ids [N, L]) -> pooled features [N, width] (BERT: the [CLS] hidden state)."""

  def __call__(self, inputs, *, train: bool = False):
    if isinstance(inputs, Mapping):
      get = lambda k: None if inputs.get(k) is None else jnp.asarray(inputs[k])
      return self.features(get("input_ids"), mask=get("attention_mask"),
                           token_types=get("token_type_ids"), train=train)
    return self.features(jnp.asarray(inputs), train=train)


def _build(ckpt: Checkpoint, image_size: int | None, rngs: nnx.Rngs) -> nnx.Module:
  m = {k: v for k, v in ckpt.model.items() if k != "name"}
  if ckpt.model["name"] == "text":
    return TextEncoder(representation_size=None, rngs=rngs, **m)
  channels = int(ckpt.arrays["embedding/kernel" if ckpt.model["name"] == "vit"
                             else "stem/conv/kernel"].shape[2])
  if ckpt.model["name"] == "resnet":
    return ResNetEncoder(channels=channels, rngs=rngs, **m)
  if m.get("pool_type") == "map":
    raise ValueError("The checkpoint pools with a MAP head (MAPHead_0), which mrl_jax's ViT "
                     "does not have; as config.model.init it loads with the config's own "
                     "pool_type.")
  return ViTEncoder(image_size=image_size or ckpt.image_size, channels=channels,
                    representation_size=None, rngs=rngs, **m)


def load_encoder(path: str, format: str, *, image_size: int | None = None,  # pylint: disable=redefined-builtin
                 tower: str = "image") -> nnx.Module:
  """The tower in the checkpoint at `path`, architecture inferred from it.

  `image_size` (ViTs): build for this image size, the position embeddings
  resampled; default the checkpoint's own. `.config` holds the inferred
  `config.model` fields (plus `image_size` for a ViT).
  """
  ckpt = read(path, format, tower=tower)
  encoder = _build(ckpt, image_size, nnx.Rngs(0))
  state = nnx.state(encoder, (nnx.Param, nnx.BatchStat))
  values, _ = merge(_flat_shapes(state), ckpt, dont_load=(), where=f"{path} ({format})",
                    strict=True)
  nnx.update(encoder, jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(values[checkpoint_lib.path_name(p)], x.dtype), state))
  config = {k: v for k, v in ckpt.model.items() if k not in ("vocab_size", "max_len")}
  if ckpt.model["name"] == "vit":
    config["image_size"] = image_size or ckpt.image_size
  encoder.config = config
  return encoder


def save_big_vision(source, path: str) -> None:
  """Writes a ViT as a big_vision `.npz` (what `big_vision.utils.load_params`
  and `format='big_vision'` read): `source` is a ViT module (one that
  `load_encoder` returns, or a trained run's `model`) or a flat dict of our
  names (`read(workdir, 'mrl_jax').arrays`). Heads and the representation
  layer are not written."""
  if isinstance(source, nnx.Module):
    source = checkpoint_lib.flatten(nnx.state(source, nnx.Param))
  arrays = readers.big_vision_arrays(source)
  if "embedding/kernel" not in arrays:
    raise ValueError(f"{sorted(source)[:5]}...: not a ViT (no embedding/kernel).")
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  epath.Path(path).write_bytes(buffer.getvalue())


def _flat_shapes(tree) -> dict[str, Any]:
  """{name: leaf} of the floating-point leaves (not RNG keys and counts)."""
  return {checkpoint_lib.path_name(p): x
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if jnp.issubdtype(x.dtype, jnp.floating)}


# ----------------------------------------------------------------------------
# Merging a checkpoint into a model's variables.
# ----------------------------------------------------------------------------
def resample_posemb(posemb: np.ndarray, grid: int) -> np.ndarray:
  """[1, g*g, W] -> [1, grid*grid, W], bilinear (big_vision's `resample_posemb`)."""
  old = readers._square_grid(posemb.shape[1], "pos_embedding")  # pylint: disable=protected-access
  if old == grid:
    return posemb
  logging.info("Resampling the position embeddings from a %dx%d grid to %dx%d.",
               old, old, grid, grid)
  zoomed = scipy.ndimage.zoom(posemb.reshape(old, old, -1), (grid / old, grid / old, 1), order=1)
  return zoomed.reshape(1, grid * grid, -1)


def _fit(name: str, src: np.ndarray, want: tuple[int, ...], ckpt: Checkpoint, where: str
         ) -> np.ndarray:
  """`src` shaped for the model's `name` [want], or an error naming both."""
  if tuple(src.shape) == tuple(want):
    return src
  if name == "pos_embedding" and ckpt.model["name"] == "vit":
    grid = readers._square_grid(want[1], "the model's pos_embedding")  # pylint: disable=protected-access
    if src.shape[2] == want[2]:
      return resample_posemb(src, grid)
  if name == "pos_embedding" and ckpt.model["name"] == "text" and src.shape[1] >= want[1]:
    return src[:, :want[1]]  # positions 0..max_len-1 of a longer table
  if name == "embedding/kernel" and ckpt.model["name"] == "vit":
    raise ValueError(
        f"{where}: the checkpoint's ViT has patch size {src.shape[0]} and width "
        f"{src.shape[3]} (embedding/kernel {tuple(src.shape)}) but the model has patch size "
        f"{want[0]} and width {want[3]} ({tuple(want)}); set config.model.variant / "
        "patch_size / width to the checkpoint's.")
  if name == "token_embedding/embedding":
    raise ValueError(
        f"{where}: the checkpoint's vocabulary has {src.shape[0]} tokens but the model's "
        f"(the tokenizer's, config.text.vocab_path) has {want[0]}; use the checkpoint's "
        "own vocab.txt.")
  raise ValueError(f"{where}: {name} is {tuple(src.shape)} in the checkpoint but "
                   f"{tuple(want)} in the model (architecture in the checkpoint: "
                   f"{ckpt.model}).")


def merge(target: dict[str, Any], ckpt: Checkpoint, *, dont_load: Sequence[str] = DONT_LOAD,
          where: str = "", strict: bool = False
          ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
  """({name: array} for the `target` variables the checkpoint fills, report).

  `target`: {name: array or ShapeDtypeStruct}. Scanned targets ('blocks/...'
  with a leading depth axis) get the layers stacked. `report` lists
  'loaded', 'initialised' (in the model, not loaded) and 'unused' (in the
  checkpoint, not in the model). `strict`: every target must be loaded.
  """
  patterns = [re.compile(p) for p in dont_load]
  values, report = {}, {"loaded": [], "initialised": [], "unused": list(ckpt.unused)}
  used = set()
  for name, x in target.items():
    if any(p.search(name) for p in patterns):
      report["initialised"].append(name)
      continue
    src = ckpt.arrays.get(name)
    if src is not None:
      used.add(name)
    elif name.startswith("blocks/") and f"blocks/0/{name[7:]}" in ckpt.arrays:
      layers = [f"blocks/{i}/{name[7:]}" for i in range(x.shape[0])]
      if any(l not in ckpt.arrays for l in layers):
        raise ValueError(f"{where}: the model has {x.shape[0]} blocks, the checkpoint "
                         f"{ckpt.model.get('depth')}; set config.model.depth to the checkpoint's.")
      src = np.stack([ckpt.arrays[l] for l in layers])
      used.update(layers)
    if src is None:
      report["initialised"].append(name)
      continue
    values[name] = np.asarray(_fit(name, src, tuple(x.shape), ckpt, where), x.dtype)
    report["loaded"].append(name)
  report["unused"] += sorted(k for k in ckpt.arrays if k not in used)
  if strict and report["initialised"]:
    raise ValueError(f"{where}: the checkpoint has no {report['initialised'][:8]}.")
  return values, report


# ----------------------------------------------------------------------------
# config.model.init: a pretrained start for training.
# ----------------------------------------------------------------------------
def init_specs(config) -> list[tuple[str, Any]]:
  """[(prefix of the tower's names in the train state, its init config)]."""
  m = config.model
  if m.name == "dual_encoder":
    towers = [("image/", m.image.get("init")), ("text/", m.text.get("init"))]
  else:
    towers = [("", m.get("init"))]
  return [(p, i) for p, i in towers if i is not None and i.get("path")]


def _dont_load(init) -> tuple[str, ...]:
  """init.dont_load, or DONT_LOAD where it is unset (None); () loads everything."""
  patterns = init.get("dont_load")
  return DONT_LOAD if patterns is None else tuple(patterns)


def check_config(config) -> None:
  """Fails fast on a bad `init` (format, regexes, tower), before any compute."""
  for prefix, init in init_specs(config):
    field = f"config.model.{prefix.strip('/') + '.' if prefix else ''}init"
    if init.get("format") not in FORMATS:
      raise ValueError(f"{field}.format={init.get('format')!r} is not one of {FORMATS}.")
    for p in _dont_load(init):
      try:
        re.compile(p)
      except re.error as e:
        raise ValueError(f"{field}.dont_load has a bad regex {p!r}: {e}.") from e
    if init.get("tower", "image") not in ("image", "text"):
      raise ValueError(f"{field}.tower={init.tower!r} must be 'image' or 'text'.")


def init_train_state(config, state: dict[str, Any], tx) -> dict[str, Any]:
  """The freshly initialised train `state` with `config.model.init`'s
  checkpoints loaded into its towers (and the optimizer state re-made)."""
  specs = init_specs(config)
  if not specs:
    return state
  params, rest = state["params"], state["rest"]
  flat = {**{f"params/{k}": v for k, v in _flat_shapes(params).items()},
          **{f"rest/{k}": v for k, v in _flat_shapes(rest).items()}}
  new = {}
  for prefix, init in specs:
    ckpt = read(init.path, init.format, tower=init.get("tower", "image"))
    target = {k.split("/", 1)[1][len(prefix):]: v for k, v in flat.items()
              if k.split("/", 1)[1].startswith(prefix)}
    where = f"config.model.init ({init.path}, {init.format})"
    values, report = merge(target, ckpt, dont_load=_dont_load(init),
                           where=where)
    new.update({prefix + k: v for k, v in values.items()})
    logging.info("%s: loaded %d of %d tensors into %s; initialised: %s; in the checkpoint "
                 "but not loaded: %s", where, len(report["loaded"]), len(target),
                 f"the {prefix.strip('/')} tower" if prefix else "the model",
                 _summary(report["initialised"]), _summary(report["unused"]))

  def place(path, x):
    value = new.get(checkpoint_lib.path_name(path))
    if value is None:
      return x
    return jax.make_array_from_callback(x.shape, x.sharding, lambda idx: value[idx])

  params = jax.tree_util.tree_map_with_path(place, params)
  rest = jax.tree_util.tree_map_with_path(place, rest)
  opt_sharding = jax.tree.map(lambda x: x.sharding, state["opt_state"])
  opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
  return dict(state, params=params, rest=rest, opt_state=opt_state)


def _summary(names: list[str], limit: int = 12) -> str:
  if not names:
    return "none"
  return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
