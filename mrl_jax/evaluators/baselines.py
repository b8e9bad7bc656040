"""Post-hoc low-dim baselines from one full (FF) embedding: SVD/PCA and random features.

The MRL paper compares its prefixes with m-dim representations cut out of a
model trained only at the full size d:

* 'svd': the top-m right singular vectors of the train embeddings, centred on
  their mean (PCA) by default; `center=False` is the plain SVD low-rank
  approximation. The top-m subspace contains the top-(m-1) one, so a single
  decomposition (an eigendecomposition of the d x d Gram matrix, accumulated
  in float64) serves every m: dim m is the first m coordinates in that basis.
* 'random': a random subset of m coordinates; the subsets are the prefixes of
  one fixed permutation, so they nest like MRL's.
* 'prefix': the first m coordinates as they are, i.e. the embedding truncated
  the way an MRL embedding is used. For an FF model this is "FF truncated";
  for an MRL model it probes its own prefixes (1-NN on them is `knn_top1`).

Both are `Projection`s: `proj(x, m)` maps [n, d] embeddings to [n, m] and
`proj(x, m)` is a prefix of `proj(x, m')` for m < m'. The evaluators take the
split dicts of `evaluate.py` ({'embedding' [N, d], 'label' [N]}):
`baseline_knn` (1-NN top-1, the cosine search of `knn.py`) and
`baseline_linear` (top-1 of a multinomial logistic regression trained on the
projected train split: the paper's SVD / random-features numbers are linear
classification top-1).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mrl_jax.evaluators import base
from mrl_jax.evaluators import knn

METHODS = ("svd", "random", "prefix")
DEFAULT_METHODS = ("svd", "random")  # the paper's two


@dataclasses.dataclass(frozen=True)
class Projection:
  """x -> ((x - mean) @ basis)[:, :m] (SVD), or x[:, columns[:m]] (random features)."""
  mean: np.ndarray | None = None     # [d]; None: no centring
  basis: np.ndarray | None = None    # [d, r] orthonormal columns, most variance first
  columns: np.ndarray | None = None  # [r] coordinate order

  @property
  def max_dim(self) -> int:
    return (self.basis.shape[1] if self.basis is not None else len(self.columns))

  def __call__(self, x, m: int) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if not 1 <= int(m) <= self.max_dim:
      raise ValueError(f"projection dim m={m} must be in [1, {self.max_dim}].")
    if self.columns is not None:
      return x[:, self.columns[:m]]
    if self.mean is not None:
      x = x - self.mean
    return x @ self.basis[:, :m]


def svd_project(train_emb, dims: Sequence[int], *, center: bool = True,
                chunk: int = 8192) -> Projection:
  """PCA (center=True) or uncentred SVD basis of the train embeddings, up to max(dims)."""
  x = np.asarray(train_emb, np.float32)
  dims = knn._check_dims(dims, x.shape[1])  # pylint: disable=protected-access
  mean = x.mean(0, dtype=np.float64) if center else np.zeros(x.shape[1])
  gram = np.zeros((x.shape[1],) * 2)
  for start in range(0, len(x), chunk):  # float64 copies one chunk at a time
    c = x[start:start + chunk].astype(np.float64) - mean
    gram += c.T @ c
  # Right singular vectors of X = eigenvectors of X^T X, largest first.
  _, vecs = np.linalg.eigh(gram)
  vecs = vecs[:, ::-1][:, :dims[-1]]
  vecs *= np.where(vecs[np.abs(vecs).argmax(0), np.arange(vecs.shape[1])] < 0, -1, 1)
  return Projection(mean=mean.astype(np.float32) if center else None,
                    basis=vecs.astype(np.float32))


def random_features(d: int, dims: Sequence[int], seed: int = 0) -> Projection:
  """Random coordinate subsets; dim m keeps columns perm[:m] of one permutation of range(d)."""
  dims = knn._check_dims(dims, int(d))  # pylint: disable=protected-access
  perm = np.random.default_rng(seed).permutation(int(d))
  return Projection(columns=perm[:dims[-1]])


def make_projection(train_emb, dims: Sequence[int], method: str, *, seed: int = 0,
                    center: bool = True) -> Projection:
  if method == "svd":
    return svd_project(train_emb, dims, center=center)
  if method == "random":
    return random_features(np.shape(train_emb)[1], dims, seed)
  if method == "prefix":
    d = np.shape(train_emb)[1]
    return Projection(columns=np.arange(knn._check_dims(dims, d)[-1]))  # pylint: disable=protected-access
  raise ValueError(f"baseline method={method!r} must be one of {list(METHODS)}.")


def baseline_knn(train: Mapping, eval_: Mapping, dims: Sequence[int], method: str, *,
                 seed: int = 0, center: bool = True, **search_kwargs) -> dict[int, float]:
  """{dim: 1-NN top-1} of the projected eval split against the projected train split.

  The projections nest, so one exact search over the max(dims) projection
  gives every dim (each prefix L2-normalised, as `knn.knn_top1` does).
  """
  proj = make_projection(train["embedding"], dims, method, seed=seed, center=center)
  top = max(int(m) for m in dims)
  return knn.knn_top1(proj(eval_["embedding"], top), eval_["label"],
                      proj(train["embedding"], top), train["label"], dims, **search_kwargs)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_logreg(x, labels, num_classes: int, steps: int, l2: float):
  """Full-batch L-BFGS on mean softmax CE + l2 |W|^2: (W [m, C], b [C])."""
  def loss(params):
    w, b = params
    logits = x @ w + b
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + l2 * jnp.sum(w * w))

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(_, carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
  params, _ = jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))
  return params


def linear_probe(train_x, train_y, eval_x, eval_y, *, num_classes: int | None = None,
                 steps: int = 100, l2: float = 1e-4) -> float:
  """Top-1 on eval of a multinomial logistic regression fitted on train (standardised features)."""
  train_x, eval_x = (np.asarray(a, np.float32) for a in (train_x, eval_x))
  train_y, eval_y = np.asarray(train_y), np.asarray(eval_y)
  if num_classes is None:
    num_classes = int(max(train_y.max(), eval_y.max())) + 1
  mu, sd = train_x.mean(0), train_x.std(0)
  sd = np.where(sd > 0, sd, 1.0)  # a constant feature stays 0
  w, b = _fit_logreg(jnp.asarray((train_x - mu) / sd), jnp.asarray(train_y, jnp.int32),
                     num_classes, steps, l2)
  pred = np.asarray(jnp.argmax(jnp.asarray((eval_x - mu) / sd) @ w + b, axis=-1))
  return float(np.mean(pred == eval_y))


def baseline_linear(train: Mapping, eval_: Mapping, dims: Sequence[int], method: str, *,
                    seed: int = 0, center: bool = True, steps: int = 100,
                    l2: float = 1e-4) -> dict[int, float]:
  """{dim: linear-probe top-1} on the projected embeddings (`linear_probe` per dim).

  Every dim is fitted on the max(dims) projection with the coordinates past m
  set to 0: their gradient stays 0, so the fit equals one on the first m
  coordinates alone, and one compiled program serves every dim. Full batch
  on one device: 60k x 64 features and 10 classes take about 1.5 s per dim
  (plus ~3 s compiling) on a 2-core CPU; ImageNet-sized splits would need a
  minibatch probe.
  """
  proj = make_projection(train["embedding"], dims, method, seed=seed, center=center)
  top = max(int(m) for m in dims)
  tx, ex = proj(train["embedding"], top), proj(eval_["embedding"], top)
  num_classes = int(max(np.max(train["label"]), np.max(eval_["label"]))) + 1
  out = {}
  for m in sorted(int(m) for m in dims):
    keep = (np.arange(top) < m).astype(np.float32)
    out[m] = linear_probe(tx * keep, train["label"], ex * keep, eval_["label"],
                          num_classes=num_classes, steps=steps, l2=l2)
  return out


PROBES = ("linear", "knn")


class Baseline(base.Evaluator):
  """svd_/random_ x linear_/knn_top1: SVD (PCA) and random-feature projections
  of *this* model's full embedding.

  Options: methods=['svd', 'random'] (or 'prefix' too), probes=['linear', 'knn'], dims (default
  the nesting dims), seed=0, center=True, steps=100, l2=1e-4. The MRL paper
  applies them to the embedding of the full-dim FF model (`mrl.mode='ff'`);
  `python -m mrl_jax.reproduce` runs this evaluator on that model.
  """
  splits = ("eval", "train")
  option_names = ("methods", "probes", "dims", "seed", "center", "steps", "l2")

  def __init__(self, options, context, field):
    super().__init__(options, context, field)
    methods = options.get("methods", list(DEFAULT_METHODS))
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods or any(m not in METHODS for m in methods):
      raise ValueError(f"{field}.methods={methods!r} must be a non-empty list of "
                       f"{list(METHODS)}.")
    probes = options.get("probes", list(PROBES))
    probes = [probes] if isinstance(probes, str) else list(probes)
    if not probes or any(p not in PROBES for p in probes):
      raise ValueError(f"{field}.probes={probes!r} must be a non-empty list of {list(PROBES)}.")
    d = context.embedding_size
    try:
      dims = sorted({int(m) for m in options.get("dims") or context.nesting_dims})
    except (TypeError, ValueError):
      dims = []
    if not dims or dims[0] < 1 or dims[-1] > d:
      raise ValueError(f"{field}.dims={options.get('dims')!r} must be dims in [1, {d}] (the "
                       "embedding size), e.g. the nesting dims (the default).")
    self.methods, self.probes, self.dims = methods, probes, dims
    self.seed, self.center = int(options.get("seed", 0)), bool(options.get("center", True))
    self.steps, self.l2 = int(options.get("steps", 100)), float(options.get("l2", 1e-4))

  def run(self, data):
    train, ev = data.train, data.eval
    out = {}
    for method in self.methods:
      if "linear" in self.probes:
        out[f"{method}_linear_top1"] = baseline_linear(
            train, ev, self.dims, method, seed=self.seed, center=self.center,
            steps=self.steps, l2=self.l2)
      if "knn" in self.probes:
        out[f"{method}_knn_top1"] = baseline_knn(train, ev, self.dims, method,
                                                 seed=self.seed, center=self.center)
    return out
