"""The funnel with a FAISS first stage (mrl_jax/evaluators/ann.py)."""
import builtins

import numpy as np
import pytest

from mrl_jax.evaluators import ann
from mrl_jax.evaluators import base
from mrl_jax.evaluators import funnel
from mrl_jax.evaluators import knn


def _clusters(seed=0, n=3000, q=200, d=32, classes=10):
  """Labelled clusters whose first coordinates carry most of the signal (as MRL's)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(classes, d)) * np.linspace(3.0, 0.3, d)
  def draw(size):
    labels = rng.integers(0, classes, size)
    return (centres[labels] + rng.normal(size=(size, d))).astype(np.float32), labels
  (x, y), (qx, qy) = draw(n), draw(q)
  return qx, qy, x, y


def test_flat_exact_equals_our_exact_search():
  pytest.importorskip("faiss")
  qx, _, x, _ = _clusters()
  got = ann.exact(qx, x, 10)
  _, want = knn.knn_search(qx, x, [32], 10)
  # Equal up to float32 near-ties between the two summation orders.
  agree = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(got.indices, want[0])])
  assert agree > 0.99 and got.distances_per_query == len(x)


@pytest.mark.parametrize("index, options", [("hnsw", {"ef_search": 128}),
                                            ("ivf", {"nlist": 32, "nprobe": 8})])
def test_funnel_on_an_index_is_close_to_exact(index, options):
  pytest.importorskip("faiss")
  qx, qy, x, y = _clusters()
  funnels = {"single": [(8, 200), (32, 10)], "multi": [(8, 200), (16, 50), (32, 10)]}
  rows = funnel.funnel_metrics(qx, qy, x, y, funnels, [10], index=index,
                               index_options=options)
  exact = rows["exact"]
  assert exact["first_stage"] == "flat (exact)" and exact["recall_of_exact"] == 1.0
  for name in funnels:
    row = rows[name]
    assert row["first_stage"] == index
    assert abs(row["map@10"] - exact["map@10"]) < 0.01, (name, row, exact)
    # The funnel itself misses some of the full-dim top-10 (its 8-d shortlist);
    # the index finds what the exact first stage does.
    assert row["recall_of_exact"] > 0.7
    brute = funnel.funnel_search(qx, x, funnels[name], 10)
    shortlist = ann.search(ann.build(x, 8, index, ann.check_index(index, options, "t")),
                           qx, 200)
    exact_shortlist = knn.knn_search(qx, x, [8], 200)[1][0]
    assert np.mean([len(np.intersect1d(a, b)) / 200
                    for a, b in zip(shortlist.indices, exact_shortlist)]) > 0.95
    assert brute.shape == (len(qx), 10)
    # Far fewer vectors scored than the exact search's N per query.
    assert row["distances_per_query"] < 0.5 * exact["distances_per_query"]
    assert row["seconds"] > 0 and row["build_seconds"] > 0
    assert row["flops_reduction_vs_exact"] > 2


def test_bad_index_options():
  with pytest.raises(ValueError, match=r"index='annoy' is not a supported FAISS index; "
                     r"use one of \['hnsw', 'ivf'\]"):
    ann.check_index("annoy", {}, "config.evals.funnel")
  with pytest.raises(ValueError, match=r"\['nprobe'\] are not options of index='hnsw'"):
    ann.check_index("hnsw", {"nprobe": 4}, "config.evals.funnel")
  with pytest.raises(ValueError, match=r"config.evals.funnel.ef_search=0 must be a positive"):
    ann.check_index("hnsw", {"ef_search": 0}, "config.evals.funnel")


def test_missing_faiss_says_how_to_install(monkeypatch):
  real_import = builtins.__import__

  def no_faiss(name, *args, **kwargs):
    if name == "faiss":
      raise ImportError("No module named 'faiss'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_faiss)
  with pytest.raises(ImportError, match=r"config.evals.funnel.index='hnsw' needs FAISS.*"
                     r"pip install -c constraints.txt '.\[faiss\]'"):
    ann.check_index("hnsw", {}, "config.evals.funnel")


def test_funnel_evaluator_with_an_index():
  """config.evals.<name> = dict(type='funnel', index='hnsw', ef_search=...) end to end."""
  pytest.importorskip("faiss")
  from mrl_jax import report  # pylint: disable=g-import-not-at-top
  qx, qy, x, y = _clusters(1)
  context = base.Context(nesting_dims=(8, 16, 32))
  evaluator = funnel.Funnel({"type": "funnel", "index": "hnsw", "ef_search": 100}, context,
                            "config.evals.funnel")
  _, out = evaluator.run(base.Data(train={"embedding": x, "label": y},
                                   eval={"embedding": qx, "label": qy}))
  rows = out["funnel"]
  assert set(rows) == {"exact", "single", "multi"}
  assert rows["single"]["first_stage"] == "hnsw" and rows["single"]["stages"][0] == [8, 200]
  text = "\n".join(report.funnel_markdown(rows))
  assert "recall of exact" in text and "| single | hnsw |" in text
  with pytest.raises(ValueError, match=r"index='lsh' is not a supported FAISS index"):
    funnel.Funnel({"type": "funnel", "index": "lsh"}, context, "config.evals.funnel")
