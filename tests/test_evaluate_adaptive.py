"""evaluate.py's adaptive, funnel, quantized and baseline evaluators: wiring,
results.json sections, report, config checks and label errors.

The model is replaced by fixed synthetic splits (`evaluate.embed_split` is
patched), so the whole `evaluate.evaluate` path runs in about a second.
"""
import json
import types

import ml_collections
import numpy as np
import pytest

from mrl_jax import evaluate
from mrl_jax import report as report_lib
from mrl_jax import train
from mrl_jax.evaluators import adaptive
from mrl_jax.evaluators import baselines
from mrl_jax.evaluators import funnel
from mrl_jax.evaluators import retrieval
from tests import tiny_config

NESTING = [4, 8, 16]


def _synthetic_splits(num_train=192, num_eval=64, num_classes=4, seed=0):
  """Class-centred 16-d embeddings; logits of each head = prefix . class-centre prefix.

  The sizes are those of the fake dataset, so the searches compile to the
  same programs as in the end-to-end tests (test_reproduce.py).
  """
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_classes, 16)) * 2

  def split(n):
    labels = np.arange(n) % num_classes
    emb = (centers[labels] + rng.normal(size=(n, 16)) * 2.5).astype(np.float32)
    logits = np.stack([emb[:, :m] @ centers[:, :m].T for m in NESTING]).astype(np.float32)
    return {"embedding": emb, "label": labels.astype(np.int32), "logits": logits}

  return {"train": split(num_train), "test": split(num_eval)}


def _config(evals, mode="mrl", model="vit"):
  config = ml_collections.ConfigDict()
  config.name = "synthetic"
  config.dataset = ml_collections.ConfigDict(
      {"name": "synthetic", "train_split": "train", "eval_split": "test", "num_classes": 4})
  config.model = ml_collections.ConfigDict({"name": model})
  config.mrl = ml_collections.ConfigDict({"mode": mode, "nesting_dims": NESTING})
  config.evals = ml_collections.ConfigDict(evals)
  return config


def _facts(head_dims=NESTING, num_train=192, num_eval=64):
  return {"nesting_dims": NESTING, "head_dims": list(head_dims),
          "dataset": types.SimpleNamespace(num_examples={"train": num_train, "test": num_eval})}


def _evaluate(monkeypatch, config, splits, facts=None, outdir=None):
  def fake_embed_split(config, task, state, mesh, split, *, with_logits, with_text=False):
    del config, task, state, mesh, with_text
    out = dict(splits[split])
    if not with_logits:
      out.pop("logits")
    return out

  monkeypatch.setattr(evaluate, "embed_split", fake_embed_split)
  return evaluate.evaluate(config, facts or _facts(), None, None, None, step=7, outdir=outdir)


def test_sections_metrics_report_and_plot(monkeypatch, tmp_path):
  config = _config({
      "linear": dict(type="linear"),
      "retrieval": dict(type="retrieval", ks=[10]),
      "adaptive": dict(type="adaptive", holdout=0.5, seeds=3),
      "funnel": dict(type="funnel"),
      "quantized": dict(type="quantized"),
      "baseline": dict(type="baseline", probes=["knn"]),
  })
  results = _evaluate(monkeypatch, config, _synthetic_splits(), outdir=tmp_path)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  json.dumps(on_disk, allow_nan=False)  # strict JSON: no inf / NaN anywhere
  metrics = on_disk["metrics"]
  eval_dims = ["4", "6", "8", "12", "16"]
  for name in ("knn_top1_int8", "knn_top1_binary"):
    assert sorted(metrics[name], key=int) == eval_dims
  for name in ("svd_knn_top1", "random_knn_top1"):
    assert sorted(metrics[name], key=int) == ["4", "8", "16"]
  assert all(0 <= v <= 1 for per in metrics.values() for v in per.values())

  ada = on_disk["adaptive"]
  assert ada["dims"] == NESTING and ada["seeds"] == [0, 1, 2] and ada["num_examples"] == 64
  assert set(ada["per_dim_accuracy"]) == {"4", "8", "16"}
  assert ada["points"] and all(p["expected_dims"] <= p["budget"] + 16 for p in ada["points"])
  assert 4 <= ada["best"]["expected_dims"] <= 16
  # Thresholds are null where the cascade sends nobody out (inf in Python).
  assert all(t is None or 0 <= t <= 1 for p in ada["points"] for ts in p["thresholds"] for t in ts)

  fun = on_disk["funnel"]
  assert list(fun) == ["exact", "single", "multi"]
  assert fun["single"]["stages"] == [[4, 192], [16, 10]]  # 200 capped at the 192 train rows
  assert fun["multi"]["stages"] == [[4, 192], [8, 100], [16, 10]]
  assert fun["exact"]["stages"] == [[16, 10]]
  # The exact search is the retrieval evaluator's search at the full dim.
  assert fun["exact"]["map@10"] == pytest.approx(metrics["map@10"]["16"])
  for row in fun.values():
    assert {"map@10", "knn_top1", "mflops_per_query", "flops_reduction_vs_exact",
            "seconds", "speedup_vs_exact"} <= set(row)
  assert on_disk["quantized"]["bytes_per_vector"]["binary"] == {
      "4": 1, "6": 1, "8": 1, "12": 2, "16": 2}
  assert on_disk["quantized"]["bytes_per_vector"]["float32"]["16"] == 64

  report = (tmp_path / "report.md").read_text()
  for heading in ("## Adaptive classification (cascade)", "## Adaptive retrieval (funnel)",
                  "## Quantised embeddings", "| binary | 1 | 1 | 1 | 2 | 2 |",
                  "| single | 4:192 → 16:10 |", "svd_* / random_*"):
    assert heading in report
  assert (tmp_path / "adaptive.png").stat().st_size > 1000
  assert (tmp_path / "accuracy_vs_dim.png").exists()


def test_baseline_options_reach_the_probes(monkeypatch):
  calls = []

  def fake_linear(train, eval_, dims, method, **kwargs):
    calls.append((len(train["label"]), len(eval_["label"]), list(dims), method, kwargs))
    return {m: 0.5 for m in dims}

  monkeypatch.setattr(baselines, "baseline_linear", fake_linear)
  config = _config({"baseline": dict(type="baseline", methods=["svd"], probes=["linear"],
                                     dims=[16, 4], steps=30, seed=2, center=False)})
  metrics = _evaluate(monkeypatch, config, _synthetic_splits())["metrics"]
  assert metrics == {"svd_linear_top1": {"4": 0.5, "16": 0.5}}
  assert calls == [(192, 64, [4, 16], "svd", dict(seed=2, center=False, steps=30, l2=1e-4))]


def test_default_funnels_follow_the_paper():
  assert funnel.default_funnels([8, 16, 32, 64]) == {
      "single": [[8, 200], [64, 10]],
      "multi": [[8, 200], [16, 100], [32, 50], [64, 10]]}
  paper = funnel.default_funnels([16, 32, 64, 128, 256, 2048])
  assert paper["multi"] == [[16, 200], [32, 100], [64, 50], [128, 25], [256, 12], [2048, 10]]
  assert list(funnel.default_funnels([8, 64])) == ["single"]


def test_labels_outside_the_heads_fail_linear_but_knn_works(monkeypatch):
  splits = _synthetic_splits()
  splits["test"]["label"] = splits["test"]["label"].copy()
  splits["test"]["label"][:3] = 5  # the heads predict 4 classes
  for evals in ({"linear": dict(type="linear")},
                {"adaptive": dict(type="adaptive", seeds=1)}):
    name = next(iter(evals))
    with pytest.raises(ValueError, match=(
        rf"'test' split has 3 examples with labels outside \[0, 4\) \(labels 5\).*"
        rf"config\.evals\.{name} .*num_classes=6.*knn")):
      _evaluate(monkeypatch, _config(evals), splits)
  metrics = _evaluate(monkeypatch, _config({"knn": dict(type="knn")}), splits)["metrics"]
  assert metrics["knn_top1"]["16"] <= 61 / 64  # the 3 unknown labels are never right


@pytest.mark.parametrize("evals, kwargs, match", [
    ({"a": dict(type="adaptive", holdout=0.995)}, {}, r"config\.evals\.a\.holdout=0\.995 leaves 64 "
     r"of the 64 .* 0 to test on"),
    ({"a": dict(type="adaptive", holdout=0.005)}, {}, r"config\.evals\.a\.holdout=0\.005 leaves 0"),
    ({"a": dict(type="adaptive", holdout=1.5)}, {}, r"holdout=1\.5 must be a fraction in \(0, 1\)"),
    ({"a": dict(type="adaptive", seeds=0)}, {}, r"config\.evals\.a\.seeds=0 must be"),
    ({"a": dict(type="adaptive", grid=1)}, {}, r"config\.evals\.a\.grid=1 must be"),
    ({"a": dict(type="adaptive")}, {"head_dims": [16]},
     r"config\.evals\.a\.type='adaptive' .* head at \[16\] only.*'mrl' or 'mrl_e'"),
    ({"a": dict(type="adaptive")}, {"model": "dual_encoder"}, r"reads the trained classifier"),
    ({"a": dict(type="adaptive"), "b": dict(type="adaptive", seeds=2)}, {},
     r"config\.evals\.a and config\.evals\.b both have type 'adaptive'"),
    ({"f": dict(type="funnel", funnels={"x": [[4, 50], [32, 10]]})}, {},
     r"config\.evals\.f\.funnels\.x=.* 1 <= dim <= 16"),
    ({"f": dict(type="funnel", funnels={"x": [[4, 10], [16, 20]]})}, {},
     r"config\.evals\.f\.funnels\.x=.*keeps 20 rows .* only 10.*non-increasing"),
    ({"f": dict(type="funnel", funnels={"x": [[4, 50], [16, 5]]})}, {},
     r"config\.evals\.f\.funnels\.x=\[\[4, 50\], \[16, 5\]\] keeps 5 rows .* max\(config\.evals"
     r"\.f\.ks\)=10"),
    ({"f": dict(type="funnel", funnels={"exact": [[4, 50], [16, 10]]})}, {}, r"rename"),
    ({"f": dict(type="funnel", ks=[200])}, {}, r"config\.evals\.f\.ks=\[200\] .* only 192 rows"),
    ({"q": dict(type="quantized", kinds=["int4"])}, {},
     r"config\.evals\.q\.kinds=\['int4'\] must be .*'int8', 'binary'"),
    ({"q": dict(type="quantized", k=0)}, {}, r"config\.evals\.q\.k=0 must be"),
    ({"b": dict(type="baseline", methods=["pca"])}, {},
     r"config\.evals\.b\.methods=\['pca'\] must be .*'svd', 'random'"),
    ({"b": dict(type="baseline", probes=["svm"])}, {}, r"config\.evals\.b\.probes=\['svm'\]"),
    ({"b": dict(type="baseline", dims=[4, 32])}, {}, r"config\.evals\.b\.dims=\[4, 32\]"),
])
def test_check_evals_rejects_bad_options(evals, kwargs, match):
  config = _config(evals, model=kwargs.get("model", "vit"))
  facts = _facts(head_dims=kwargs.get("head_dims", NESTING))
  with pytest.raises(ValueError, match=match):
    evaluate.check_evals(config, facts)


def test_check_evals_accepts_good_options():
  config = _config({"a": dict(type="adaptive", holdout=0.25, seeds=[3, 7], grid=[0.5, 0.9]),
                    "f": dict(type="funnel", funnels={"two": [(4, 30), (16, 10)]}),
                    "q": dict(type="quantized", kinds=["binary"]),
                    "b": dict(type="baseline", methods="svd")})
  assert evaluate.num_neighbours(evaluate.check_evals(config, _facts())) == 0
  # Split sizes unknown: only the fraction itself is checked.
  assert adaptive.check_holdout(None, 0.5) == 0
  assert adaptive.check_holdout(64, 0.5) == 32


def test_bad_adaptive_holdout_fails_before_training(fake_dataset_dir, tmp_path):
  config = tiny_config.get_config(fake_dataset_dir)
  config.evals = dict(adaptive=dict(type="adaptive", holdout=0.999))  # 64 eval examples
  with pytest.raises(ValueError, match=r"config\.evals\.adaptive\.holdout=0\.999 leaves 64 of "
                     r"the 64 eval examples"):
    train.run(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
  config.evals = dict(adaptive=dict(type="adaptive"))
  config.mrl.mode = "ff"
  with pytest.raises(ValueError, match=r"config\.mrl\.mode='ff' has a head at \[16\] only"):
    train.run(config, str(tmp_path))


def test_json_safe():
  out = report_lib.json_safe({1: np.float32(0.5), "t": [np.inf, -np.inf, np.nan, 0.25],
                            "a": np.arange(2), "b": np.bool_(True), "s": (np.int64(3), "x")})
  assert out == {"1": 0.5, "t": [None, None, None, 0.25], "a": [0, 1], "b": True,
                 "s": [3, "x"]}
  json.dumps(out, allow_nan=False)
  assert retrieval.check_ks([10]) == (10,)
