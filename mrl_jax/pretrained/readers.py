"""Readers: another library's checkpoint -> our parameter names and layouts.

Each reader returns a `Checkpoint`: float arrays keyed by the names our
towers' parameters have in the *unscanned* layout ('blocks/0/attn/query/
kernel', see `checkpoint.path_name`), the `config.model` fields that rebuild
the architecture, and the source tensors that have no place in a tower (a
classifier head, BERT's pooler) by their own names.

Layouts, theirs -> ours (flax kernels are [in, out]):
* big_vision: the same flax modules under other names (`encoderblock_i/
  MlpBlock_0/Dense_0` = `blocks/i/mlp/fc1`); old files renamed as big_vision's
  `fix_old_checkpoints` does (pre-Linen numbering, posemb inside
  `Transformer`, the [cls] slot inside the posemb).
* timm: torch `Linear.weight` is [out, in]; the fused qkv rows are [q; k; v],
  head-major; the conv is OIHW; posemb row 0 is the [cls] slot, folded into
  `cls` (cls + pos[0] then concat is the same function as timm's concat then
  + pos).
* Hugging Face BERT: torch layouts as timm; `bert.` prefixes and the old
  LayerNorm `gamma`/`beta` names of the hub's oldest files accepted.
"""
from __future__ import annotations

import collections
from collections.abc import Mapping
import io
import json
import os
import re
from typing import Any, NamedTuple

from etils import epath
import numpy as np


class Checkpoint(NamedTuple):
  arrays: dict[str, np.ndarray]  # our names (unscanned layout) -> array
  model: dict[str, Any]  # config.model fields of the tower ('name': 'vit' | 'text' | 'resnet')
  unused: tuple[str, ...]  # source tensors no tower has (heads, poolers), their own names
  image_size: int | None = None  # images the checkpoint was trained at (ViTs)


class FormatError(ValueError):
  """`path` is not a checkpoint of the `format` asked for."""


def _describe(path: epath.Path) -> str:
  """What is at `path`, for errors about the wrong format."""
  if not path.exists():
    return "nothing (no such file or directory)"
  if path.is_dir():
    names = sorted(p.name for p in path.iterdir())
    hint = ""
    if "config.json" in names:
      try:
        cfg = json.loads((path / "config.json").read_text())
        if "architecture" in cfg:
          hint = f"; config.json names timm architecture {cfg['architecture']!r} (format='timm')"
        elif "model_type" in cfg:
          hint = f"; config.json has model_type={cfg['model_type']!r} (format='hf_bert')"
        elif "model" in cfg and "mrl" in cfg:
          hint = "; config.json is an mrl_jax run's config (format='mrl_jax')"
      except (ValueError, OSError):
        pass
    return f"a directory holding {names[:8]}{'...' if len(names) > 8 else ''}{hint}"
  head = path.open("rb").read(16)
  if head.startswith(b"PK"):
    return "a zip / .npz file (format='big_vision')"
  if len(head) >= 9 and head[8:9] == b"{":
    return "a safetensors file (format='timm' or 'hf_bert' take the directory holding it)"
  return f"a file starting with {head!r}"


def _wrong(path, fmt: str, wanted: str) -> FormatError:
  return FormatError(f"format={fmt!r} reads {wanted}; {path} is {_describe(epath.Path(path))}.")


def _read_safetensors(directory: epath.Path, fmt: str) -> tuple[dict[str, np.ndarray], dict]:
  """(tensors, config.json) of a `save_pretrained` directory."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  what = "the directory save_pretrained writes (model.safetensors + config.json)"
  if not directory.is_dir():
    raise _wrong(directory, fmt, what)
  if not (directory / "model.safetensors").exists():
    if (directory / "pytorch_model.bin").exists():
      raise FormatError(f"{directory} has only pytorch_model.bin; mrl_jax reads "
                        "model.safetensors (re-save with save_pretrained(..., "
                        "safe_serialization=True)).")
    raise _wrong(directory, fmt, what)
  if not (directory / "config.json").exists():
    raise _wrong(directory, fmt, what)
  tensors = st_numpy.load((directory / "model.safetensors").read_bytes())
  return tensors, json.loads((directory / "config.json").read_text())


def _square_grid(n: int, where: str) -> int:
  side = int(round(np.sqrt(n)))
  if side * side != n:
    raise ValueError(f"{where}: a position embedding of {n} patches is not a square grid; "
                     "mrl_jax's ViT has square grids (image_size x image_size).")
  return side


def _rename_pre_linen(tree: dict) -> dict:
  """flax's `convert_pre_linen`: pre-Linen numbered submodules across classes
  (`LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3`);
  Linen numbers each class apart (`LayerNorm_0, ..._0, LayerNorm_1, MlpBlock_0`)."""
  if not isinstance(tree, dict):
    return tree
  out, counts = {}, collections.Counter()

  def order(name):
    m = re.fullmatch(r"(.+)_(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, -1)

  for name in sorted(tree, key=order):
    m = re.fullmatch(r"(.+)_(\d+)", name)
    new = name
    if m and m.group(1)[0].isupper():
      new = f"{m.group(1)}_{counts[m.group(1)]}"
      counts[m.group(1)] += 1
    out[new] = _rename_pre_linen(tree[name])
  return out


def _nest(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


# ----------------------------------------------------------------------------
# big_vision / AugReg / vision_transformer .npz
# ----------------------------------------------------------------------------
_BV_BLOCK = {"LayerNorm_0": "norm1", "LayerNorm_1": "norm2",
             "MultiHeadDotProductAttention_0": "attn",
             "MlpBlock_0/Dense_0": "mlp/fc1", "MlpBlock_0/Dense_1": "mlp/fc2"}


def read_big_vision(path: str) -> Checkpoint:
  """A big_vision ViT `.npz` (np.savez of '/'-joined param names). `PATH:img`
  takes the `img/` subtree of a two-tower file (SigLIP), as big_vision does."""
  subtree = None
  if re.search(r"\.npz:[\w/]+$", path):
    path, subtree = path.rsplit(":", 1)
  file = epath.Path(path)
  if not file.exists() or file.is_dir() or not file.open("rb").read(2) == b"PK":
    raise _wrong(path, "big_vision", "a big_vision .npz file")
  with np.load(io.BytesIO(file.read_bytes()), allow_pickle=False) as npz:
    flat = {k: npz[k] for k in npz.files}
  for prefix in ("opt/target/", "params/"):
    if flat and all(k.startswith(prefix) for k in flat):
      flat = {k[len(prefix):]: v for k, v in flat.items()}
  if subtree:
    flat = {k[len(subtree) + 1:]: v for k, v in flat.items() if k.startswith(subtree + "/")}
  tree = _rename_pre_linen(_nest(flat))
  if "Transformer" not in tree or "embedding" not in tree:
    raise FormatError(f"{path} is a .npz without a ViT's 'Transformer' and 'embedding' "
                      f"(top-level names: {sorted(tree)[:10]}); for a two-tower file add "
                      "':img' to the path.")
  t = tree["Transformer"]
  # Old layouts (big_vision's fix_old_checkpoints).
  if "posembed_input" in t:
    tree["pos_embedding"] = t.pop("posembed_input")["pos_embedding"]
  if "pos_embedding" in t:
    tree["pos_embedding"] = t.pop("pos_embedding")
  if "pos_embedding" in tree:
    pe = tree["pos_embedding"]
    n = pe.shape[1]
    if int(np.sqrt(n - 1)) ** 2 == n - 1 and int(np.sqrt(n)) ** 2 != n:
      tree["pos_embedding"] = pe[:, 1:]
      if "cls" in tree:
        tree["cls"] = tree["cls"] + pe[:, :1]
  if "encoderblock" in t:  # scanned: one block with a leading depth axis
    stacked = _flatten(t.pop("encoderblock"))
    depth = len(next(iter(stacked.values())))
    for i in range(depth):
      t[f"encoderblock_{i}"] = _nest({k: v[i] for k, v in stacked.items()})

  arrays, unused = {}, []
  kernel = tree["embedding"]["kernel"]  # [p, p, C, width]
  if kernel.shape[0] != kernel.shape[1]:
    raise ValueError(f"{path}: patch {kernel.shape[:2]} is not square; mrl_jax's ViT "
                     "has square patches.")
  arrays["embedding/kernel"] = kernel
  arrays["embedding/bias"] = tree["embedding"]["bias"]
  depth = 0
  for name, sub in _flatten(t).items():
    m = re.fullmatch(r"encoderblock_(\d+)/(.+)/(kernel|bias|scale)", name)
    if name.startswith("encoder_norm/"):
      arrays[name] = sub
    elif m and m.group(2).split("/")[0] in ("LayerNorm_0", "LayerNorm_1"):
      arrays[f"blocks/{m.group(1)}/{_BV_BLOCK[m.group(2)]}/{m.group(3)}"] = sub
    elif m and m.group(2).startswith("MultiHeadDotProductAttention_0/"):
      proj = m.group(2).split("/")[1]
      arrays[f"blocks/{m.group(1)}/attn/{proj}/{m.group(3)}"] = sub
    elif m and m.group(2) in _BV_BLOCK:
      arrays[f"blocks/{m.group(1)}/{_BV_BLOCK[m.group(2)]}/{m.group(3)}"] = sub
    else:
      unused.append(f"Transformer/{name}")
      continue
    if m:
      depth = max(depth, int(m.group(1)) + 1)
  for name, sub in _flatten({k: v for k, v in tree.items()
                             if k not in ("Transformer", "embedding")}).items():
    if name in ("pos_embedding", "cls"):
      arrays[name] = sub
    else:
      unused.append(name)  # head, pre_logits (tanh), MAPHead_0
  width = kernel.shape[-1]
  model = dict(name="vit", width=width, depth=depth, patch_size=int(kernel.shape[0]),
               mlp_dim=int(arrays["blocks/0/mlp/fc1/kernel"].shape[1]),
               num_heads=int(arrays["blocks/0/attn/query/kernel"].shape[1]),
               pool_type="cls" if "cls" in arrays else "gap",
               posemb="learn" if "pos_embedding" in arrays else "sincos2d",
               mlp_activation="gelu_tanh", layernorm_eps=1e-6, final_norm="tokens")
  if any(u.startswith("MAPHead") for u in unused):
    model["pool_type"] = "map"  # no mrl_jax equivalent: load_encoder refuses it
  image_size = None
  if "pos_embedding" in arrays:
    image_size = _square_grid(arrays["pos_embedding"].shape[1], path) * model["patch_size"]
  return Checkpoint(arrays, model, tuple(unused), image_size)


def big_vision_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our ViT's flat names (`blocks/0/attn/query/kernel`; the loop layout)
  -> big_vision's (`Transformer/encoderblock_0/MultiHeadDotProductAttention_0/
  query/kernel`): what `read_big_vision` reads back. Heads and the
  representation layer have no big_vision counterpart and are left out."""
  to_bv = {v: k for k, v in _BV_BLOCK.items()}
  out = {}
  for name, value in arrays.items():
    m = re.fullmatch(r"blocks/(\d+)/(norm1|norm2|mlp/fc1|mlp/fc2|attn/\w+)/(\w+)", name)
    if m:
      part = m.group(2)
      part = (f"MultiHeadDotProductAttention_0/{part[5:]}" if part.startswith("attn/")
              else to_bv[part])
      out[f"Transformer/encoderblock_{m.group(1)}/{part}/{m.group(3)}"] = value
    elif name.startswith("encoder_norm/"):
      out[f"Transformer/{name}"] = value
    elif name in ("embedding/kernel", "embedding/bias", "pos_embedding", "cls"):
      out[name] = value
    elif name.startswith("blocks/"):
      raise ValueError(f"{name}: a block tensor big_vision's ViT has no place for.")
  return {k: np.asarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------
# timm VisionTransformer (model.safetensors + config.json)
# ----------------------------------------------------------------------------
# timm's ViTs keep head_dim 64 except ViT-H (80): heads by width, for hub
# config.json files whose model_args leave the architecture's defaults out.
_TIMM_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
_TIMM_BLOCK = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp/fc1",
               "mlp.fc2": "mlp/fc2"}


def _linear(weight):
  return np.ascontiguousarray(weight.T)


def read_timm(path: str) -> Checkpoint:
  """A timm VisionTransformer directory (`save_for_hf` / the hub's layout)."""
  directory = epath.Path(path)
  tensors, cfg = _read_safetensors(directory, "timm")
  if "architecture" not in cfg:
    raise _wrong(path, "timm", "a timm model directory (config.json with 'architecture')")
  args = dict(cfg.get("model_args") or {})
  arch = cfg["architecture"]
  if "patch_embed.proj.weight" not in tensors or "blocks.0.attn.qkv.weight" not in tensors:
    raise FormatError(f"{path}: timm architecture {arch!r} is not a plain VisionTransformer "
                      "(no patch_embed.proj / blocks.N.attn.qkv tensors).")
  pool = args.get("global_pool", cfg.get("global_pool", "token"))
  class_token = args.get("class_token", "cls_token" in tensors)
  if pool not in ("token", "avg") or (pool == "avg" and class_token):
    raise ValueError(
        f"{path}: timm global_pool={pool!r} with class_token={class_token} has no "
        "mrl_jax equivalent; supported: 'token' with a class token (pool_type='cls') and "
        "'avg' without one (pool_type='gap').")
  act = args.get("act_layer", "gelu")
  if act not in ("gelu", "gelu_tanh"):
    raise ValueError(f"{path}: timm act_layer={act!r}; mrl_jax's ViT has 'gelu' (exact) "
                     "and 'gelu_tanh'.")
  w = tensors["patch_embed.proj.weight"]  # [width, C, p, p]
  width, p = int(w.shape[0]), int(w.shape[2])
  heads = args.get("num_heads", _TIMM_HEADS.get(width))
  if heads is None:
    raise ValueError(f"{path}: config.json does not say num_heads for width {width}; add "
                     "model_args.num_heads to it.")
  hd = width // heads
  arrays = {"embedding/kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
            "embedding/bias": tensors.get("patch_embed.proj.bias", np.zeros(width, w.dtype))}
  used = {"patch_embed.proj.weight", "patch_embed.proj.bias"}
  pe = tensors["pos_embed"]
  used.add("pos_embed")
  no_embed_class = args.get("no_embed_class", False)
  if class_token:
    cls = tensors["cls_token"]
    used.add("cls_token")
    if not no_embed_class:
      cls, pe = cls + pe[:, :1], pe[:, 1:]
    arrays["cls"] = cls
  arrays["pos_embedding"] = pe
  depth = 0
  while f"blocks.{depth}.attn.qkv.weight" in tensors:
    b, o = f"blocks.{depth}.", f"blocks/{depth}/"
    qkv_w = tensors[b + "attn.qkv.weight"]  # [3 width, width]: rows q; k; v
    qkv_b = tensors.get(b + "attn.qkv.bias", np.zeros(3 * width, qkv_w.dtype))
    for j, proj in enumerate(("query", "key", "value")):
      arrays[o + f"attn/{proj}/kernel"] = np.ascontiguousarray(
          qkv_w[j * width:(j + 1) * width].T.reshape(width, heads, hd))
      arrays[o + f"attn/{proj}/bias"] = qkv_b[j * width:(j + 1) * width].reshape(heads, hd)
    arrays[o + "attn/out/kernel"] = np.ascontiguousarray(
        tensors[b + "attn.proj.weight"].T.reshape(heads, hd, width))
    arrays[o + "attn/out/bias"] = tensors[b + "attn.proj.bias"]
    used |= {b + "attn.qkv.weight", b + "attn.qkv.bias", b + "attn.proj.weight",
             b + "attn.proj.bias"}
    for theirs, ours in _TIMM_BLOCK.items():
      is_norm = theirs.startswith("norm")
      arrays[o + ours + ("/scale" if is_norm else "/kernel")] = (
          tensors[b + theirs + ".weight"] if is_norm else _linear(tensors[b + theirs + ".weight"]))
      arrays[o + ours + "/bias"] = tensors[b + theirs + ".bias"]
      used |= {b + theirs + ".weight", b + theirs + ".bias"}
    depth += 1
  final_norm = "pooled" if "fc_norm.weight" in tensors else "tokens"
  norm = "fc_norm" if final_norm == "pooled" else "norm"
  if f"{norm}.weight" not in tensors:
    raise ValueError(f"{path}: no final LayerNorm (norm / fc_norm); mrl_jax's ViT has one.")
  arrays["encoder_norm/scale"] = tensors[f"{norm}.weight"]
  arrays["encoder_norm/bias"] = tensors[f"{norm}.bias"]
  used |= {f"{norm}.weight", f"{norm}.bias"}
  heads_etc = sorted(k for k in tensors if k not in used and k.split(".")[0] in ("head", "head_drop"))
  unexpected = sorted(k for k in tensors if k not in used and k not in heads_etc)
  if unexpected:
    raise ValueError(
        f"{path}: timm tensors that mrl_jax's ViT has no place for: {unexpected[:8]}"
        f"{'...' if len(unexpected) > 8 else ''} (layer scale, register tokens, pre-norm, "
        "qk-norm and attention pooling change the function and are not supported).")
  model = dict(name="vit", width=width, depth=depth, patch_size=p,
               mlp_dim=int(arrays["blocks/0/mlp/fc1/kernel"].shape[1]), num_heads=int(heads),
               pool_type="cls" if class_token else "gap", posemb="learn",
               mlp_activation="gelu_tanh" if act == "gelu_tanh" else "gelu_exact",
               layernorm_eps=1e-6, final_norm=final_norm)
  image_size = _square_grid(arrays["pos_embedding"].shape[1], path) * p
  return Checkpoint(arrays, model, tuple(heads_etc), image_size)


# ----------------------------------------------------------------------------
# Hugging Face BERT (model.safetensors + config.json)
# ----------------------------------------------------------------------------
_BERT_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu_tanh",
                     "gelu_pytorch_tanh": "gelu_tanh"}
_BERT_LAYER = {"attention.output.LayerNorm": "norm1", "intermediate.dense": "mlp/fc1",
               "output.dense": "mlp/fc2", "output.LayerNorm": "norm2"}


def read_hf_bert(path: str) -> Checkpoint:
  """A Hugging Face BERT directory: `BertModel` or a task model (`bert.` prefix)."""
  tensors, cfg = _read_safetensors(epath.Path(path), "hf_bert")
  if cfg.get("model_type") != "bert":
    raise _wrong(path, "hf_bert", f"a BERT directory (config.json model_type 'bert', "
                 f"found {cfg.get('model_type')!r})")
  if cfg.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"{path}: position_embedding_type="
                     f"{cfg['position_embedding_type']!r}; only 'absolute' is supported.")
  act = cfg.get("hidden_act", "gelu")
  if act not in _BERT_ACTIVATIONS:
    raise ValueError(f"{path}: hidden_act={act!r} is not one of {sorted(_BERT_ACTIVATIONS)}.")
  if any(k.startswith("bert.") for k in tensors):
    tensors = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in tensors.items()}
  tensors = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
                    re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
             for k, v in tensors.items()}
  if "embeddings.word_embeddings.weight" not in tensors:
    raise FormatError(f"{path}: no embeddings.word_embeddings.weight; tensors start "
                      f"{sorted(tensors)[:5]}.")
  width, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
  hd = width // heads
  e = "embeddings."
  arrays = {"token_embedding/embedding": tensors[e + "word_embeddings.weight"],
            "pos_embedding": tensors[e + "position_embeddings.weight"][None],
            "embedding_norm/scale": tensors[e + "LayerNorm.weight"],
            "embedding_norm/bias": tensors[e + "LayerNorm.bias"]}
  used = {e + "word_embeddings.weight", e + "position_embeddings.weight",
          e + "LayerNorm.weight", e + "LayerNorm.bias", e + "position_ids", e + "token_type_ids"}
  type_vocab = 0
  if e + "token_type_embeddings.weight" in tensors:
    arrays["type_embedding/embedding"] = tensors[e + "token_type_embeddings.weight"]
    type_vocab = int(arrays["type_embedding/embedding"].shape[0])
    used.add(e + "token_type_embeddings.weight")
  depth = 0
  while f"encoder.layer.{depth}.attention.self.query.weight" in tensors:
    b, o = f"encoder.layer.{depth}.", f"blocks/{depth}/"
    for proj in ("query", "key", "value"):
      arrays[o + f"attn/{proj}/kernel"] = np.ascontiguousarray(
          tensors[b + f"attention.self.{proj}.weight"].T.reshape(width, heads, hd))
      arrays[o + f"attn/{proj}/bias"] = tensors[b + f"attention.self.{proj}.bias"].reshape(heads, hd)
      used |= {b + f"attention.self.{proj}.weight", b + f"attention.self.{proj}.bias"}
    arrays[o + "attn/out/kernel"] = np.ascontiguousarray(
        tensors[b + "attention.output.dense.weight"].T.reshape(heads, hd, width))
    arrays[o + "attn/out/bias"] = tensors[b + "attention.output.dense.bias"]
    used |= {b + "attention.output.dense.weight", b + "attention.output.dense.bias"}
    for theirs, ours in _BERT_LAYER.items():
      is_norm = theirs.endswith("LayerNorm")
      weight = tensors[b + theirs + ".weight"]
      arrays[o + ours + ("/scale" if is_norm else "/kernel")] = weight if is_norm else _linear(weight)
      arrays[o + ours + "/bias"] = tensors[b + theirs + ".bias"]
      used |= {b + theirs + ".weight", b + theirs + ".bias"}
    depth += 1
  heads_etc = sorted(k for k in tensors if k not in used and k.split(".")[0] in ("pooler", "cls"))
  unexpected = sorted(k for k in tensors if k not in used and k not in heads_etc)
  if unexpected:
    raise ValueError(f"{path}: BERT tensors mrl_jax's text tower has no place for: "
                     f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}.")
  model = dict(name="text", width=width, depth=depth, num_heads=heads,
               mlp_dim=int(arrays["blocks/0/mlp/fc1/kernel"].shape[1]), pool_type="cls",
               post_ln=True, type_vocab_size=type_vocab,
               mlp_activation=_BERT_ACTIVATIONS[act],
               layernorm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
               vocab_size=int(arrays["token_embedding/embedding"].shape[0]),
               max_len=int(arrays["pos_embedding"].shape[1]))
  return Checkpoint(arrays, model, tuple(heads_etc))


# ----------------------------------------------------------------------------
# mrl_jax: another run's workdir
# ----------------------------------------------------------------------------
_VIT_FIELDS = ("variant", "width", "depth", "mlp_dim", "num_heads", "patch_size", "pool_type",
               "posemb", "mlp_activation", "layernorm_eps", "final_norm")
_TEXT_FIELDS = ("variant", "width", "depth", "mlp_dim", "num_heads", "pool_type", "post_ln",
                "type_vocab_size", "mlp_activation", "layernorm_eps")
_RESNET_FIELDS = ("depth", "width", "stem", "bn_momentum", "bn_epsilon")


def read_mrl_jax(path: str, tower: str = "image") -> Checkpoint:
  """The newest checkpoint of an mrl_jax run: params and BatchNorm statistics
  (not the optimizer state). `tower` picks a dual encoder's 'image' or 'text'
  tower; names keep the run's own heads ('head/...', 'representation/...')."""
  import jax  # pylint: disable=g-import-not-at-top
  from mrl_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from mrl_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  # Orbax needs absolute paths; remote ones (gs://...) already are.
  workdir = epath.Path(path if "://" in path else os.path.abspath(path))
  config = workdir_lib.saved_config(workdir) if workdir.is_dir() else None
  if config is None or not (workdir / "checkpoints").exists():
    raise _wrong(path, "mrl_jax", "an mrl_jax run's workdir (config.json + checkpoints/)")
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"{workdir / 'checkpoints'} has no checkpoint yet.")
    meta = ckpt.saved_tree(step)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                meta[k]) for k in ("params", "rest") if k in meta}
    _, state = ckpt.restore_latest(abstract, partial=True)
  finally:
    ckpt.close()
  flat = {k: np.asarray(v) for k, v in checkpoint_lib.flatten(state).items()
          if jax.numpy.issubdtype(v.dtype, jax.numpy.floating)}  # not RNG keys and counts
  flat = {k.split("/", 1)[1]: v for k, v in flat.items()}  # drop 'params/', 'rest/'
  m = config["model"]
  if m["name"] == "dual_encoder":
    if tower not in ("image", "text"):
      raise ValueError(f"tower={tower!r}: a dual encoder has towers 'image' and 'text'.")
    flat = {k[len(tower) + 1:]: v for k, v in flat.items() if k.startswith(tower + "/")}
    m = dict(m[tower], name="vit" if tower == "image" else "text")
  fields = {"vit": _VIT_FIELDS, "text": _TEXT_FIELDS, "resnet": _RESNET_FIELDS}[m["name"]]
  model = {"name": m["name"], **{k: m[k] for k in fields if m.get(k) is not None}}
  if m["name"] == "text":
    model.update(vocab_size=int(flat["token_embedding/embedding"].shape[0]),
                 max_len=int(config["text"]["max_len"]))
  if m.get("scan_layers"):  # -> the unscanned layout every reader returns
    for k in [k for k in flat if k.startswith("blocks/")]:
      stacked = flat.pop(k)
      for i, layer in enumerate(stacked):
        flat[f"blocks/{i}/{k[len('blocks/'):]}"] = layer
  image_size = config.get("input", {}).get("image_size") if m["name"] != "text" else None
  if isinstance(image_size, (list, tuple)):
    image_size = image_size[0]
  return Checkpoint(flat, model, (), image_size)


READERS = {"big_vision": read_big_vision, "timm": read_timm, "hf_bert": read_hf_bert,
           "mrl_jax": read_mrl_jax}
