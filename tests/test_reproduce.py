"""`python -m mrl_jax.reproduce`: runs, resume, tables, claims, report and plots.

One real MRL run (3 steps of the tiny config) covers the whole path; the
other methods use a stand-in for `train.run` that writes chosen numbers, so
the tables and the claims can be checked against hand-made values.
"""
import json
import os
import re

from absl import flags
import pytest

from mrl_jax import reproduce
from tests import tiny_config

_TRAINED = {}
TINY_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_config.py")


def tiny(data_dir):
  config = tiny_config.get_config(data_dir)
  config.num_train_steps = 3
  config.checkpoint_every_steps = 3
  return config


def trained_mrl(tmp_path_factory, data_dir):
  """(workdir, summary) of one real `reproduce(methods=['mrl'])`; shared with test_export."""
  if "mrl" not in _TRAINED:
    workdir = tmp_path_factory.mktemp("reproduce")
    summary = reproduce.reproduce(tiny(data_dir), str(workdir), methods=["mrl"])
    _TRAINED["mrl"] = workdir, summary
  return _TRAINED["mrl"]


@pytest.fixture
def trained(tmp_path_factory, fake_dataset_dir):
  return trained_mrl(tmp_path_factory, fake_dataset_dir)


def test_mrl_run_end_to_end(trained):
  workdir, summary = trained
  assert json.loads((workdir / "results.json").read_text()) == summary
  assert summary["runs"]["mrl"]["step"] == 3 and not summary["runs"]["mrl"]["skipped"]
  assert summary["runs"]["mrl"]["wall_seconds"] > 0
  assert summary["hardware"]["cpu_count"] >= 1 and summary["hardware"]["device_count"] == 8
  assert set(summary["tables"]) == {"linear_top1", "knn_top1", "map@10"}
  assert set(summary["tables"]["linear_top1"]) == {"MRL"}
  run = json.loads((workdir / "mrl" / "eval" / "results.json").read_text())
  assert {"adaptive", "funnel", "quantized"} <= set(run)
  assert {"knn_top1_int8", "knn_top1_binary", "map@10"} <= set(run["metrics"])

  report = (workdir / "report.md").read_text()
  for section in ("## Top-1 classification", "## 1-NN top-1", "## mAP@10",
                  "## Quantised MRL embeddings", "## Adaptive classification (cascade)",
                  "## Adaptive retrieval (funnel)", "## Paper claims", "## Runs", "Hardware: 8 x cpu"):
    assert section in report, section
  claims = [line for line in report.splitlines() if line.startswith("- **")]
  assert len(claims) == 4
  # Without FF runs the first two are not measured; adaptive and funnel are, with numbers.
  assert all("NOT MEASURED" in c for c in claims[:2])
  for c in claims[2:]:
    assert re.match(r"- \*\*(HOLDS|DOES NOT HOLD)\*\*", c) and re.search(r"\d+\.\d\d", c), c
  assert "bounds the FLOPs reduction by 16/4 = 4x" in claims[3]
  assert [c["holds"] for c in summary["claims"]][:2] == [None, None]
  for name in ("top1_vs_dim", "knn_vs_dim", "map10_vs_dim", "adaptive", "funnel"):
    assert (workdir / f"{name}.png").stat().st_size > 1000, name


def test_finished_runs_are_skipped(trained, fake_dataset_dir):
  workdir, first = trained

  def must_not_train(config, workdir):
    raise AssertionError(f"trained {config.name} in {workdir}")

  again = reproduce.reproduce(tiny(fake_dataset_dir), str(workdir), methods=["mrl"],
                              train_fn=must_not_train)
  assert again["runs"]["mrl"]["skipped"] is True
  assert again["runs"]["mrl"]["wall_seconds"] == first["runs"]["mrl"]["wall_seconds"]
  assert again["tables"] == first["tables"] and again["claims"] == first["claims"]
  assert "finished earlier, skipped" in (workdir / "report.md").read_text()


def test_cli_reuses_finished_runs(trained, fake_dataset_dir):
  """The command line (flags parsed as `python -m mrl_jax.reproduce` does, in-process)."""
  workdir, first = trained
  argv = ["reproduce", f"--config={TINY_CONFIG}:{fake_dataset_dir}", f"--workdir={workdir}",
          "--methods=mrl", "--config.num_train_steps=3"]
  fv = flags.FlagValues()
  reproduce.define_flags(fv, argv)
  fv(argv)
  summary = reproduce.main([], fv)
  assert summary["runs"]["mrl"]["skipped"] is True
  assert summary["tables"] == first["tables"]
  assert json.loads((workdir / "results.json").read_text()) == summary
  argv = ["reproduce", f"--config={TINY_CONFIG}:{fake_dataset_dir}", f"--workdir={workdir}",
          "--ff_dims=8,x"]
  fv = flags.FlagValues()
  reproduce.define_flags(fv, argv)
  fv(argv)
  assert fv.config.num_train_steps == 12  # no override this time
  with pytest.raises(ValueError, match=r"--ff_dims=8,x must be comma-separated ints"):
    reproduce.main([], fv)


# ----------------------------------------------------------------------------
# All methods, with stand-in training.
# ----------------------------------------------------------------------------
def _fake_results(config, *, mrl_top1, ff_top1, svd, rand, adaptive_acc, funnel_map):
  """results.json of one run with the numbers a test chooses (dims 4, 8, 16)."""
  mode, ff_dim = config.mrl.mode, config.mrl.get("ff_dim")
  head = [ff_dim] if mode == "ff" else [4, 8, 16]
  top1 = ({ff_dim: ff_top1[ff_dim]} if mode == "ff" else
          {m: mrl_top1[m] - (0.01 if mode == "mrl_e" else 0) for m in head})
  metrics = {"linear_top1": {str(m): v for m, v in top1.items()},
             "knn_top1": {str(m): 0.9 for m in (4, 6, 8, 12, 16)},
             "map@10": {str(m): 0.8 for m in (4, 6, 8, 12, 16)}}
  out = {"step": 3, "mode": mode, "nesting_dims": [4, 8, 16], "eval_dims": [4, 6, 8, 12, 16],
         "metrics": metrics}
  if "baseline" in config.evals:
    for method, values in (("svd", svd), ("random", rand)):
      for probe in ("linear", "knn"):
        metrics[f"{method}_{probe}_top1"] = {str(m): v for m, v in values.items()}
  if mode == "mrl":
    metrics["knn_top1_int8"] = metrics["knn_top1_binary"] = metrics["knn_top1"]
    point = {"budget": 4.0, "expected_dims": 3.9, "expected_dims_std": 0.1,
             "accuracy": adaptive_acc, "accuracy_std": 0.0, "thresholds": [[0.5, None]]}
    out["adaptive"] = {"dims": [4, 8, 16], "holdout": 0.5, "seeds": [0, 1],
                       "per_dim_accuracy": {"4": 0.8, "8": 0.85, "16": 0.9},
                       "points": [point],
                       "best": dict(point, tolerance=0.005, full_dim_accuracy=0.9,
                                    full_dim_accuracy_std=0.0)}
    row = {"knn_top1": 0.9, "seconds": 0.01, "speedup_vs_exact": 2.0}
    out["funnel"] = {
        "exact": dict(row, **{"map@10": 0.8, "mflops_per_query": 8.0,
                              "flops_reduction_vs_exact": 1.0, "stages": [[16, 10]],
                              "speedup_vs_exact": 1.0}),
        "single": dict(row, **{"map@10": funnel_map, "mflops_per_query": 0.9,
                               "flops_reduction_vs_exact": 8.9, "stages": [[4, 200], [16, 10]]})}
    out["quantized"] = {"bytes_per_vector": {"float32": {"4": 16}, "binary": {"4": 1}}}
  return out


def _fake_train(calls, **numbers):
  def train_fn(config, workdir):
    calls.append(os.path.basename(workdir))
    results = _fake_results(config, **numbers)
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", "results.json"), "w") as f:
      json.dump(results, f)
    return results
  return train_fn


GOOD = dict(mrl_top1={4: 0.80, 8: 0.85, 16: 0.90}, ff_top1={4: 0.802, 8: 0.84, 16: 0.90},
            svd={4: 0.30, 8: 0.50, 16: 0.88}, rand={4: 0.20, 8: 0.40, 16: 0.90},
            adaptive_acc=0.897, funnel_map=0.7995)
BAD = dict(mrl_top1={4: 0.80, 8: 0.85, 16: 0.90}, ff_top1={4: 0.82, 8: 0.84, 16: 0.90},
           svd={4: 0.78, 8: 0.50, 16: 0.88}, rand={4: 0.20, 8: 0.40, 16: 0.90},
           adaptive_acc=0.88, funnel_map=0.79)


@pytest.fixture
def no_plots(monkeypatch):
  """The stand-in runs check numbers and text; PNGs are checked in the real run above."""
  for module, name in ((reproduce, "_plot_table"), (reproduce, "_plot_funnel"),
                       (reproduce.report, "plot_adaptive")):
    monkeypatch.setattr(module, name, lambda *a, **k: None)


def test_all_methods_tables_and_claims(fake_dataset_dir, tmp_path, no_plots):
  calls = []
  summary = reproduce.reproduce(tiny(fake_dataset_dir), str(tmp_path), ff_dims=[4, 8],
                                train_fn=_fake_train(calls, **GOOD))
  assert calls == ["mrl", "mrl_e", "ff_4", "ff_8", "ff_16"]  # ff_16: the full dim is added
  top1 = summary["tables"]["linear_top1"]
  assert top1["MRL"] == {"4": 0.80, "8": 0.85, "16": 0.90}
  assert top1["MRL-E"] == {"4": 0.79, "8": 0.84, "16": 0.89}
  assert top1["FF"] == {"4": 0.802, "8": 0.84, "16": 0.90}  # each from its own run
  assert top1["SVD"] == {"4": 0.30, "8": 0.50, "16": 0.88}
  assert top1["Rand. FS"]["4"] == 0.20
  assert set(summary["tables"]["knn_top1"]) == {"MRL", "MRL-E", "FF", "SVD", "Rand. FS"}
  assert set(summary["tables"]["map@10"]) == {"MRL", "MRL-E", "FF"}
  assert [c["holds"] for c in summary["claims"]] == [True, True, True, True]
  details = [c["detail"] for c in summary["claims"]]
  assert "4: MRL 80.00 vs FF 80.20 (-0.20 pt)" in details[0]
  assert "4: MRL 80.00 vs SVD 30.00 (+50.00 pt)" in details[1]
  assert "3.9 dims, top-1 89.70 vs 90.00 at 16 dims (-0.30 pt" in details[2]
  assert "mAP@10 79.95 vs exact 80.00 (-0.05 pt) at 8.9x fewer FLOPs" in details[3]
  report = (tmp_path / "report.md").read_text()
  assert report.count("- **HOLDS**") == 4
  assert "| FF | 80.20 | 84.00 | 90.00 |" in report
  assert "| SVD | 30.00 | 50.00 | 88.00 |" in report

  # Re-run: everything finished is skipped; an incomplete results.json is redone.
  mrl_results = tmp_path / "mrl" / "eval" / "results.json"
  partial = json.loads(mrl_results.read_text())
  del partial["funnel"]
  mrl_results.write_text(json.dumps(partial))
  calls.clear()
  summary = reproduce.reproduce(tiny(fake_dataset_dir), str(tmp_path), ff_dims=[4, 8],
                                train_fn=_fake_train(calls, **BAD))
  assert calls == ["mrl"]
  assert summary["runs"]["ff_4"]["skipped"] and not summary["runs"]["mrl"]["skipped"]


def test_claims_that_do_not_hold_say_by_how_much(fake_dataset_dir, tmp_path, no_plots):
  summary = reproduce.reproduce(tiny(fake_dataset_dir), str(tmp_path), ff_dims=[4],
                                train_fn=_fake_train([], **BAD))
  assert [c["holds"] for c in summary["claims"]] == [False, False, False, False]
  details = [c["detail"] for c in summary["claims"]]
  assert "4: MRL 80.00 vs FF 82.00 (-2.00 pt)" in details[0]
  assert "4: MRL 80.00 vs SVD 78.00 (+2.00 pt)" in details[1]
  assert "-2.00 pt" in details[2]
  assert "mAP@10 79.00 vs exact 80.00 (-1.00 pt)" in details[3]
  assert (tmp_path / "report.md").read_text().count("- **DOES NOT HOLD**") == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"methods": ["mrl", "slimmable"]}, r"--methods=mrl,slimmable must be .*'mrl', 'mrl_e', 'ff'"),
    ({"methods": []}, r"--methods= must be a non-empty list"),
    ({"ff_dims": [4, 32]}, r"--ff_dims=\[4, 32\] must be dims in \[1, 16\]"),
])
def test_bad_flags_fail_before_training(fake_dataset_dir, tmp_path, kwargs, match):
  calls = []
  with pytest.raises(ValueError, match=match):
    reproduce.reproduce(tiny(fake_dataset_dir), str(tmp_path), train_fn=_fake_train(calls, **GOOD),
                        **kwargs)
  assert not calls


def test_a_bad_variant_config_fails_before_the_first_run(fake_dataset_dir, tmp_path):
  config = tiny(fake_dataset_dir)
  config.evals = {}
  calls = []
  # mrl.weights of the wrong length fails every variant's check, before any training.
  config.mrl.weights = [1.0, 1.0]
  with pytest.raises(ValueError, match=r"config\.mrl\.weights"):
    reproduce.reproduce(config, str(tmp_path), train_fn=_fake_train(calls, **GOOD))
  assert not calls
