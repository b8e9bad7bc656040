"""The evaluator interface: what one `config.evals.<name>` entry builds.

An evaluator is a subclass of `Evaluator` in its own module, named by one
line of `mrl_jax.evaluators.REGISTRY`. It owns its options: the constructor
reads them, fills in defaults and raises a `ValueError` naming the field for
a bad one, before anything is trained or embedded. Its class attributes say
what it reads, and `mrl_jax.evaluate` embeds and checks only that: the
splits, class labels, the classifier heads' logits, the text tower. `run`
returns `{metric: {dim: value}}` and, for numbers not keyed by dim, the
top-level results.json section named by `section`.

Jitted helpers live at module level (or are cached), so an evaluation run
twice in one process compiles nothing the second time.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import numpy as np

from mrl_jax import prefix

Metrics = dict[str, dict[int, float]]
DEFAULT_KS = (10, 25, 50, 100)  # retrieval cut-offs


def plain(x):
  """ConfigDict / tuple trees -> plain lists and dicts (for messages and JSON)."""
  if hasattr(x, "items"):
    return {str(k): plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [plain(v) for v in x]
  return x


@dataclasses.dataclass(frozen=True)
class Context:
  """What options are checked against: known before anything is embedded."""
  nesting_dims: tuple[int, ...]
  head_dims: tuple[int, ...] = ()  # dims of the classifier heads (MRL-E / FF: fewer)
  num_train: int | None = None     # rows of the train split (the kNN database)
  num_eval: int | None = None      # rows of the eval split (the queries)
  eval_split: str = "eval"
  mode: str | None = None          # config.mrl.mode
  # The dataset's label names; () when it has none, None when the dataset is not known.
  class_names: tuple[str, ...] | None = None
  num_classes: int | None = None

  @property
  def embedding_size(self) -> int:
    return int(self.nesting_dims[-1])

  @property
  def eval_dims(self) -> list[int]:
    return prefix.eval_dims(self.nesting_dims)


class Evaluator:
  """One evaluator: options checked in `__init__`, results from `run`."""
  splits: tuple[str, ...] = ("eval",)  # 'eval' (queries) and/or 'train' (database)
  needs_labels: bool = True       # scores predictions or neighbours against labels
  needs_heads: bool = False       # reads the classifier heads' logits
  needs_text_tower: bool = False  # embeds text (dual encoders only)
  needs_captions: bool = False    # the eval split's captions (config.dataset.text_key)
  section: str | None = None      # its own results.json entry (one evaluator per section)
  option_names: tuple[str, ...] = ()  # the options it reads, besides 'type'

  def __init__(self, options: Mapping[str, Any], context: Context, field: str):
    self.field = field  # e.g. 'config.evals.knn', for messages
    self.type = options.get("type")
    self.context = context
    unknown = sorted(set(options) - set(self.option_names) - {"type"})
    if unknown:
      raise ValueError(f"{field}: unknown option(s) {unknown} for type "
                       f"{options.get('type')!r}; its options are {sorted(self.option_names)}.")

  @property
  def neighbours(self) -> int:
    """Nearest train rows it reads from the shared exact search (0: none)."""
    return 0

  def check_eval(self, data: "Data") -> None:
    """Checks on the embedded eval split, run before the train split is embedded.

    By default: labels the heads cannot predict fail an evaluator that reads them.
    """
    if self.needs_heads:
      ev = data.eval
      check_head_labels(ev["label"], ev.local["logits"].shape[-1],
                        split=self.context.eval_split,
                        evaluator=f"{self.field} (type {self.type!r})")

  def run(self, data: "Data") -> Metrics | tuple[Metrics, dict[str, Any]]:
    raise NotImplementedError


def check_ks(ks: Sequence[int], num_neighbours: int | None = None, *,
             field: str = "ks") -> tuple[int, ...]:
  """Sorted, de-duplicated ks; each an int in [1, num_neighbours] (None: no upper bound)."""
  values = list(ks) if isinstance(ks, (Sequence, np.ndarray)) else [ks]
  if (not values or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                        for k in values)):
    raise ValueError(f"{field}={ks!r} must be a non-empty list of positive ints, "
                     f"e.g. {list(DEFAULT_KS)}.")
  out = tuple(sorted({int(k) for k in values}))
  if num_neighbours is not None and out[-1] > num_neighbours:
    raise ValueError(
        f"{field}={list(out)} asks for the {out[-1]} nearest neighbours, but the "
        f"database (train split) has only {num_neighbours} rows. Fix: use values "
        f"<= {num_neighbours}.")
  return out


def check_head_labels(labels, num_classes: int, *, split: str = "eval",
                      evaluator: str = "config.evals.<name>") -> None:
  """Raises if eval labels fall outside [0, num_classes), the classes the heads predict.

  The trained heads can never predict such a label, so linear / adaptive
  top-1 would silently count those examples as errors. kNN-style evaluators
  compare labels directly and work with any labels.
  """
  labels = np.asarray(labels)
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    values = np.unique(labels[bad])
    shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
    raise ValueError(
        f"The {split!r} split has {int(bad.sum())} examples with labels outside [0, "
        f"{num_classes}) (labels {shown}), the classes the trained heads predict; "
        f"{evaluator} would count them as errors. Fix: set --config.dataset.num_classes="
        f"{int(labels.max()) + 1} (or more) and retrain, or remove {evaluator} and re-run "
        "with --mode=eval: the knn, retrieval, funnel, quantized and baseline evaluators "
        "compare labels directly and work with any labels.")


# Row axis of each array a split holds (logits are [M, N, C]).
_ROW_AXIS = {"logits": 1}


def _gather_rows(local: np.ndarray, counts: np.ndarray, axis: int) -> np.ndarray:
  """Every process's `local` rows, in process order (each holds counts[p] rows)."""
  pad = [(0, 0)] * local.ndim
  pad[axis] = (0, int(counts.max()) - local.shape[axis])
  stacked = np.asarray(multihost_utils.process_allgather(np.pad(local, pad)))  # [P, ...]
  return np.concatenate([np.take(part, np.arange(c), axis=axis)
                         for part, c in zip(stacked, counts)], axis=axis)


class Split(Mapping):
  """One embedded split: this process's rows (`local`), the whole split on demand.

  Each process embeds a contiguous slice of the split, so the whole split is
  the processes' rows in process order (split order). `split[key]` gathers
  it onto this host the first time it is read (with one process it is
  `local[key]` itself); evaluators that can work from `local` (the kNN
  search, head accuracy) never make every host hold every row.
  """

  def __init__(self, local: Mapping[str, np.ndarray], counts=None):
    self.local = dict(local)
    rows = len(self.local["embedding" if "embedding" in self.local else "label"])
    self.counts = np.asarray([rows] if counts is None else counts, np.int64)
    self._whole = {}

  @property
  def num_rows(self) -> int:
    return int(self.counts.sum())

  def __getitem__(self, key):
    if len(self.counts) == 1:
      return self.local[key]
    if key not in self._whole:
      self._whole[key] = _gather_rows(self.local[key], self.counts, _ROW_AXIS.get(key, 0))
    return self._whole[key]

  def __iter__(self):
    return iter(self.local)

  def __len__(self):
    return len(self.local)


def process_sum(x) -> np.ndarray:
  """The sum over processes of a small array (e.g. correct counts)."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x)).sum(0)


def _as_split(x):
  return x if x is None or isinstance(x, Split) else Split(x)


class Data:
  """The embedded splits an evaluation runs on, and what evaluators share.

  `data.eval` / `data.train`: `Split`s with 'embedding' [N, d], 'label' [N],
  'logits' [M, N, C] (eval, with heads), 'text_embedding' / 'text_mask'
  (eval, with captions), in split order (plain mappings are wrapped as
  one-process splits). `data.neighbours` runs one exact search for all
  kNN-based evaluators, on each process's own rows; `data.embed_texts`
  embeds strings with the text tower.
  """

  def __init__(self, eval=None, train=None, *, num_neighbours: int = 0,  # pylint: disable=redefined-builtin
               embed_texts: Callable[[list[str]], np.ndarray] | None = None):
    self.eval, self.train = _as_split(eval), _as_split(train)
    self.num_neighbours = num_neighbours
    self.embed_texts = embed_texts
    self._indices = None

  def __setattr__(self, name, value):
    if name in ("eval", "train"):
      value = _as_split(value)
    super().__setattr__(name, value)

  def neighbours(self, dims, k: int) -> np.ndarray:
    """[D, Q, k] nearest train rows of each eval example at `dims` (split order).

    One exact search at the largest k any evaluator asks for serves them
    all: the first k of the top-K are the top-k, ties included.
    """
    if self._indices is None or self._indices.shape[-1] < k:
      from mrl_jax.evaluators import knn  # pylint: disable=g-import-not-at-top
      _, self._indices = knn.knn_search(
          self.eval.local["embedding"], self.train.local["embedding"], dims,
          max(k, self.num_neighbours), process_local=True)
    return self._indices[..., :k]
