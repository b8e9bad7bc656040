"""`--mode=embed`: write a split's embeddings and labels to array files.

  python -m mrl_jax.main --config=configs/NAME.py --workdir=DIR --mode=embed \
      [--split=test] [--embed_dim=64] [--normalize] [--shard_size=1000000]

restores the latest checkpoint in DIR (as `--mode=eval` does), embeds the
split (default config.dataset.eval_split) and writes

  DIR/embeddings/SPLIT/embeddings.npy   float32 [N, dim]: the first `dim` features
                                        (default: all d), L2-normalised if --normalize
  DIR/embeddings/SPLIT/labels.npy       [N], the dataset label feature's integer dtype
                                        (int64 for a TFDS ClassLabel)
  DIR/embeddings/SPLIT/meta.json        dim, normalised or not, nesting dims, model,
                                        config name, step, num_examples, file list

Splits with more than `shard_size` examples are written as numbered shards
`embeddings-00000-of-00003.npy`, `labels-00000-of-00003.npy`, ... in order
(meta.json lists them); `load_embeddings` reads either layout. Rows are in
split order. Files are plain `.npy` (no pickle): `np.load(path)` reads them.
Only process 0 writes; every process takes part in the embedding.
"""
from __future__ import annotations

import json
import re
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np

from mrl_jax import evaluate
from mrl_jax import prefix
from mrl_jax import report

DEFAULT_SHARD_SIZE = 1_000_000
_FILE_PATTERNS = (r"embeddings(-\d{5}-of-\d{5})?\.npy", r"labels(-\d{5}-of-\d{5})?\.npy",
                  r"meta\.json")


def split_dirname(split: str) -> str:
  """A directory name for a TFDS split string ('train[:10%]' -> 'train_10pct')."""
  name = re.sub(r"[^\w.-]+", "_", split.replace("%", "pct")).strip("_")
  return name or "split"


def check_embed_options(config, facts, *, split: str, dim: int | None,
                        shard_size: int) -> int:
  """Validates the flags before any compute; returns the dim to export."""
  d = int(facts["nesting_dims"][-1])
  dim = d if dim is None else dim
  if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= d:
    raise ValueError(f"--embed_dim={dim!r} must be an int in [1, {d}] (the embedding size, "
                     f"nesting dims {list(facts['nesting_dims'])}); leave it out for all "
                     f"{d} features.")
  if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
    raise ValueError(f"--shard_size={shard_size!r} must be a positive number of rows per "
                     f"file, e.g. {DEFAULT_SHARD_SIZE}.")
  from mrl_jax.data import prepare  # pylint: disable=g-import-not-at-top
  ds = config.dataset
  prepare.check_dataset(ds.name, ds.get("data_dir"), {"--split": split},
                        image_key=ds.get("image_key", "image"),
                        label_key=ds.get("label_key", "label"))
  return dim


def label_dtype(config) -> np.dtype | None:
  """The dataset label feature's numpy dtype (None: no label feature)."""
  key = config.dataset.get("label_key", "label")
  if not key:
    return None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  feature = tfds.builder(config.dataset.name,
                         data_dir=config.dataset.get("data_dir")).info.features[key]
  dtype = np.dtype(getattr(feature, "np_dtype", None) or np.int64)
  return dtype if np.issubdtype(dtype, np.integer) else np.dtype(np.int64)


def prepare_rows(embedding: np.ndarray, dim: int, normalize: bool) -> np.ndarray:
  """[N, d] -> float32 [N, dim]: the prefix, L2-normalised per row if asked."""
  x = np.asarray(embedding, np.float32)[:, :dim]
  if normalize:
    norms = np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=1, keepdims=True))
    x = (x / np.maximum(norms, prefix.NORM_EPS)).astype(np.float32)
  return np.ascontiguousarray(x)


def _save(path: epath.Path, array: np.ndarray):
  with path.open("wb") as f:
    np.save(f, array, allow_pickle=False)


def write_embeddings(outdir: epath.PathLike, embeddings: np.ndarray, labels: np.ndarray | None,
                     meta: dict[str, Any], *, shard_size: int = DEFAULT_SHARD_SIZE
                     ) -> dict[str, Any]:
  """Writes the files of the module docstring to `outdir`; returns meta.json's content.

  Files of an earlier export in `outdir` (embeddings*.npy, labels*.npy,
  meta.json) are removed first, so a re-export never mixes layouts.
  """
  outdir = epath.Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  for f in outdir.iterdir():
    if any(re.fullmatch(p, f.name) for p in _FILE_PATTERNS):
      f.unlink()
  n = len(embeddings)
  num_shards = max(1, -(-n // shard_size))
  files = []
  for i in range(num_shards):
    suffix = "" if num_shards == 1 else f"-{i:05d}-of-{num_shards:05d}"
    rows = slice(i * shard_size, min(n, (i + 1) * shard_size))
    entry = {"embeddings": f"embeddings{suffix}.npy", "num_examples": rows.stop - rows.start}
    _save(outdir / entry["embeddings"], embeddings[rows])
    if labels is not None:
      entry["labels"] = f"labels{suffix}.npy"
      _save(outdir / entry["labels"], labels[rows])
    files.append(entry)
  meta = dict(meta, num_examples=n, num_shards=num_shards, files=files)
  (outdir / "meta.json").write_text(json.dumps(report.json_safe(meta), indent=2))
  return meta


def load_embeddings(outdir: epath.PathLike) -> tuple[np.ndarray, np.ndarray | None, dict]:
  """(embeddings [N, dim], labels [N] or None, meta) of a `write_embeddings` directory."""
  outdir = epath.Path(outdir)
  meta = json.loads((outdir / "meta.json").read_text())

  def load(name):
    with (outdir / name).open("rb") as f:
      return np.load(f, allow_pickle=False)

  emb = np.concatenate([load(f["embeddings"]) for f in meta["files"]])
  labels = None
  if all("labels" in f for f in meta["files"]):
    labels = np.concatenate([load(f["labels"]) for f in meta["files"]])
  return emb, labels, meta


def run_embed(config, workdir: str, *, split: str | None = None, dim: int | None = None,
              normalize: bool = False, shard_size: int = DEFAULT_SHARD_SIZE) -> epath.Path:
  """Embeds `split` with the latest checkpoint in `workdir`; returns the output directory."""
  from mrl_jax import train  # pylint: disable=g-import-not-at-top

  split = split or config.dataset.eval_split
  s = train.setup(config)
  dim = check_embed_options(config, s.facts, split=split, dim=dim, shard_size=shard_size)
  step, state = train.restore_model(s, workdir, mode="embed")
  with jax.set_mesh(s.mesh):
    out = evaluate.embed_split(config, s.task, state, s.mesh, split, with_logits=False)
  facts = s.facts
  workdir = train.workdir_path(workdir)
  outdir = workdir / "embeddings" / split_dirname(split)
  if jax.process_index() != 0:
    return outdir
  dtype = label_dtype(config)
  labels = None if dtype is None else out["label"].astype(dtype)
  meta = {
      "split": split,
      "dim": dim,
      "embedding_size": int(facts["nesting_dims"][-1]),
      "dims": [m for m in facts["nesting_dims"] if m <= dim],  # nesting prefixes inside
      "nesting_dims": list(facts["nesting_dims"]),
      "normalized": bool(normalize),
      "dtype": "float32",
      "label_dtype": None if dtype is None else dtype.name,
      "mode": config.mrl.mode,
      "model": {"name": config.model.name, "variant": config.model.get("variant")},
      "config_name": config.get("name", ""),
      "dataset": config.dataset.name,
      "step": int(step),
  }
  meta = write_embeddings(outdir, prepare_rows(out["embedding"], dim, normalize), labels, meta,
                          shard_size=shard_size)
  logging.info("Wrote %d %s embeddings (dim %d%s) in %d file(s) to %s", meta["num_examples"],
               split, dim, ", normalised" if normalize else "", meta["num_shards"], outdir)
  return outdir
