"""End-to-end: training, evaluation outputs, exact resume, config errors."""
import json
import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mrl_jax import tasks
from mrl_jax import train
from tests import tiny_config


def small_config(data_dir, **overrides):
  config = tiny_config.get_config(data_dir)
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.checkpoint_every_steps = 3
  config.evals = dict(linear=dict(type="linear"), knn=dict(type="knn", k=[1]))
  for k, v in overrides.items():
    node = config
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return config


def _final_params(workdir):
  """Params of the latest checkpoint as numpy, whatever mesh saved them."""
  ckpt = train.checkpoint_lib.Checkpointer(workdir / "checkpoints")
  step = ckpt.latest_step()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree = ckpt._manager.item_metadata(step)["state"].tree
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  state = ckpt._manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))["state"]
  ckpt.close()
  return step, [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def test_train_writes_results_at_every_dim(fake_dataset_dir, tmp_path):
  config = small_config(fake_dataset_dir)
  results = train.run(config, str(tmp_path))
  on_disk = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  assert on_disk["step"] == 6
  assert on_disk["nesting_dims"] == [4, 8, 16]
  assert on_disk["eval_dims"] == [4, 6, 8, 12, 16]
  assert set(on_disk["metrics"]["linear_top1"]) == {"4", "8", "16"}
  assert set(on_disk["metrics"]["knn_top1"]) == {"4", "6", "8", "12", "16"}
  for per_dim in on_disk["metrics"].values():
    assert all(0.0 <= v <= 1.0 for v in per_dim.values())
  assert (tmp_path / "eval" / "report.md").read_text().count("|") > 10
  assert (tmp_path / "eval" / "accuracy_vs_dim.png").stat().st_size > 1000
  assert (tmp_path / "config.json").exists()
  # Re-running a finished run resumes at the end: no training, same results.
  again = train.run(config, str(tmp_path))
  assert again["step"] == 6
  assert again["metrics"] == results["metrics"]
  # --mode=eval runs the same evaluators (kNN included) inside the trainer's
  # mesh context and gives the same numbers.
  evaluated = train.run_eval(config, str(tmp_path))
  assert evaluated["step"] == 6
  assert evaluated["metrics"] == results["metrics"]
  # It restores the model (params and model state) only, not the optimizer
  # state: a config with another optimizer evaluates the same checkpoint.
  other = config.copy_and_resolve_references()
  other.optimizer.name = "sgd"
  assert train.run_eval(other, str(tmp_path))["metrics"] == results["metrics"]


def test_periodic_eval_inside_the_loop(fake_dataset_dir, tmp_path, caplog):
  # Evaluations during training run under the trainer's mesh (kNN has its own).
  config = small_config(fake_dataset_dir, eval_every_steps=3, num_train_steps=4)
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    results = train.run(config, str(tmp_path))
  assert results["step"] == 4 and {"linear_top1", "knn_top1"} <= set(results["metrics"])
  # Two evaluations (steps 3 and 4), each embedding two splits: the embedding
  # steps and the search compile once for the whole run.
  compiles = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("Compiling ")]
  # (One embedding step with the heads' logits, for the eval split, one
  # without, for the train split.)
  assert sum("jit(embed_step)" in m for m in compiles) == 2, compiles
  for name in ("jit(_search)", "jit(_ring_search)"):
    assert sum(name in m for m in compiles) <= 1, (name, compiles)



def test_a_second_evaluation_compiles_nothing(fake_dataset_dir, tmp_path, caplog):
  """Every evaluator a ViT can run, twice in one process: the second run
  reuses every compiled program (embedding steps, search, probes) and gives
  the same results."""
  config = small_config(fake_dataset_dir, num_train_steps=1, checkpoint_every_steps=1)
  config.evals = dict(
      linear=dict(type="linear"), knn=dict(type="knn", k=[1, 5]),
      retrieval=dict(type="retrieval", ks=[10]), adaptive=dict(type="adaptive", seeds=2),
      funnel=dict(type="funnel"), quantized=dict(type="quantized"),
      baseline=dict(type="baseline", steps=5))
  train.run(config, str(tmp_path))
  s = train.setup(config)
  step, state = train.restore_model(s, tmp_path, mode="eval")
  runs = []
  for _ in range(2):
    caplog.clear()
    with jax.set_mesh(s.mesh), jax.log_compiles(), caplog.at_level(logging.WARNING):
      runs.append(train.evaluate.evaluate(config, s.facts, s.task, state, s.mesh, step=step))
    compiles = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("Compiling ")]
  assert compiles == [], compiles
  for run in runs:  # results.json's sections hold timings; the metrics must agree
    run.pop("funnel")
  assert runs[0] == runs[1]
  assert {"linear_top1", "knn5_top1", "map@10", "knn_top1_int8",
          "svd_knn_top1"} <= set(runs[1]["metrics"])


class _Interrupt(Exception):
  pass


MIX = {"mixup": {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "switch_prob": 0.5}}


@pytest.mark.parametrize("base, resume_overrides", [(MIX, {}), ({}, {"input.worker_count": 2})],
                         ids=["same_config_mixup_cutmix", "other_worker_count"])
def test_resume_is_exact(fake_dataset_dir, tmp_path, monkeypatch, base, resume_overrides):
  """6 steps straight == 3 steps, a crash, and a restart that does the rest,
  also when the restart decodes with another number of worker processes, and
  with Mixup / CutMix drawn on device (a function of the seed and the step)."""
  straight = tmp_path / "straight"
  monkeypatch.chdir(tmp_path)  # a relative workdir, as `make demo` passes
  train.run(small_config(fake_dataset_dir, **base), "straight")

  resumed = tmp_path / "resumed"
  make_global_batch = train.input_pipeline.make_global_batch
  calls = {"n": 0}

  def crash_after_three(batch, batch_sharding):
    calls["n"] += 1
    if calls["n"] > 3:
      raise _Interrupt()  # like a kill between step 3's checkpoint and step 4
    return make_global_batch(batch, batch_sharding)

  monkeypatch.setattr(train.input_pipeline, "make_global_batch", crash_after_three)
  with pytest.raises(_Interrupt):
    train.run(small_config(fake_dataset_dir, **base), str(resumed))
  monkeypatch.setattr(train.input_pipeline, "make_global_batch", make_global_batch)
  train.run(small_config(fake_dataset_dir, **base, **resume_overrides), str(resumed))
  # config.json keeps the values training started with; a changed resume is
  # recorded beside it, named after the step it resumed from.
  assert json.loads((resumed / "config.json").read_text())["input"]["worker_count"] == 0
  assert (resumed / "config.3.json").exists() == bool(resume_overrides)

  step_a, params_a = _final_params(straight)
  step_b, params_b = _final_params(resumed)
  assert step_a == step_b == 6
  for a, b in zip(params_a, params_b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(fake_dataset_dir, tmp_path):
  config = small_config(fake_dataset_dir)
  config.optimizer.learning_rate = 1e30  # diverges immediately
  config.optimizer.grad_clip_norm = None
  config.optimizer.warmup_steps = 0
  config.checkpoint_every_steps = 1
  with pytest.raises(FloatingPointError, match="Non-finite loss"):
    train.run(config, str(tmp_path))
  mngr = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state", "data"))
  steps = mngr.all_steps()
  mngr.close()
  # Nothing non-finite was ever saved: any checkpoint present has finite params.
  for step in steps:
    _, leaves = _final_params(tmp_path)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


@pytest.mark.parametrize("override, field", [
    ({"mrl.nesting_dims": [8, 4, 16]}, "config.mrl.nesting_dims"),
    ({"mrl.nesting_dims": [0, 8, 16]}, "config.mrl.nesting_dims"),
    ({"mrl.nesting_dims": [4, 8, 12]}, "config.mrl.nesting_dims"),
    ({"mrl.weights": [1.0, 1.0]}, "config.mrl.weights"),
    ({"batch_size": 36}, "config.batch_size"),
    ({"model.variant": "Q/16"}, "config.model.variant"),
    ({"dataset.name": "no_such_dataset"}, "prepare"),
    ({"dataset.image_key": "picture"}, "config.dataset.image_key"),
    ({"dataset.label_key": "class"}, "config.dataset.label_key"),
    ({"dataset.num_classes": 3}, "config.dataset.num_classes"),
    ({"mesh.fsdp": 3}, "config.mesh"),
    ({"evals.knn.k": [500]}, "config.evals.knn.k"),  # > the 192 database rows
    ({"evals.knn.type": "nope"}, "config.evals.knn.type"),
    ({"mrl.weights": [0.0, 0.0, 0.0]}, "config.mrl.weights"),
    ({"optimizer.name": "adam"}, "config.optimizer.name"),
    ({"optimizer.learning_rate": -1e-3}, "config.optimizer.learning_rate"),
    ({"optimizer.learning_rate": 0.0}, "config.optimizer.learning_rate"),
    ({"optimizer.schedule": "step"}, "config.optimizer.schedule"),
    ({"optimizer.grad_clip_norm": -1.0}, "config.optimizer.grad_clip_norm"),
    ({"optimizer.b2": 1.5}, "config.optimizer.b2"),
])
def test_bad_config_fails_before_compute(fake_dataset_dir, tmp_path, override, field):
  config = small_config(fake_dataset_dir, **override)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    train.run(config, str(workdir))
  assert not workdir.exists()  # nothing written: no config.json, no lock, no checkpoint


def test_gradient_accumulation_equals_one_big_batch(fake_dataset_dir, tmp_path):
  """k microbatches accumulated == the same batch in one step."""
  runs = {}
  for accum in (1, 4):
    config = small_config(fake_dataset_dir, num_train_steps=4, log_every_steps=1,
                          checkpoint_every_steps=4, grad_accum_steps=accum)
    config.evals = {}
    workdir = tmp_path / f"accum{accum}"
    train.run(config, str(workdir))
    losses = [m["loss"] for m in train.MetricsLog.read(workdir / "metrics.jsonl")]
    runs[accum] = losses, _final_params(workdir)[1]
  np.testing.assert_allclose(runs[4][0], runs[1][0], rtol=1e-5)
  # Adam divides by the gradient's RMS, so near-zero weights move by O(lr)
  # on float noise alone: compare on the scale of lr (3e-3), not of 0.
  for a, b in zip(runs[4][1], runs[1][1]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5)


def test_bad_grad_accum_steps(fake_dataset_dir, tmp_path):
  config = small_config(fake_dataset_dir, grad_accum_steps=3)
  with pytest.raises(ValueError, match="config.grad_accum_steps=3"):
    train.run(config, str(tmp_path))


def test_corrupt_latest_checkpoint_falls_back_to_previous(fake_dataset_dir, tmp_path):
  """4 KiB of random bytes in the middle of step 6's array files: the run sets
  step 6 aside and resumes from step 3 instead of training on garbage."""
  config = small_config(fake_dataset_dir)
  config.evals = {}
  train.run(config, str(tmp_path))  # checkpoints at steps 3 and 6
  # The data files of the merged database and of the per-process one it was
  # merged from (a restore reads the first only).
  files = [f for f in (tmp_path / "checkpoints" / "6" / "state").glob("**/d/*")
           if f.stat().st_size > 3 * 4096]
  assert files
  for i, f in enumerate(files):
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = np.random.default_rng(i).bytes(4096)
    f.write_bytes(bytes(data))
  config.num_train_steps = 9
  train.run(config, str(tmp_path))
  names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  assert "6.corrupt" in names and "3" in names and "9" in names
  log = train.MetricsLog.read(tmp_path / "metrics.jsonl")
  assert [m["step"] for m in log] == [2, 4, 6, 8, 9]  # steps 4.. trained again


def test_checkpoint_of_another_config_names_the_mismatch(fake_dataset_dir, tmp_path):
  config = small_config(fake_dataset_dir, num_train_steps=3)
  config.evals = {}
  train.run(config, str(tmp_path))
  saved_config = (tmp_path / "config.json").read_text()
  config.model.representation_size = 32
  config.mrl.nesting_dims = [4, 8, 32]
  with pytest.raises(ValueError, match=r"params/head/linears/2/kernel has shape \(16, 4\) "
                     r"in the checkpoint but \(32, 4\)"):
    train.run(config, str(tmp_path))
  assert (tmp_path / "checkpoints" / "3").exists()  # never removed
  # The config the error points to is still the one the checkpoint was trained with.
  assert (tmp_path / "config.json").read_text() == saved_config
  assert sorted(p.name for p in tmp_path.glob("config*.json")) == ["config.json"]


def test_restore_onto_another_mesh_is_exact(fake_dataset_dir, tmp_path):
  """Saved 8-way data parallel, restored 2x4 data x fsdp: same values."""
  config = small_config(fake_dataset_dir, num_train_steps=3)
  config.evals = {}
  train.run(config, str(tmp_path))
  _, saved = _final_params(tmp_path)
  config.mesh = dict(data=2, fsdp=4, tensor=1)
  mesh = train.sharding.create_mesh(config.mesh)
  facts = train.check_config(config, mesh)
  task = tasks.get_task(config, facts)
  init_fn = lambda: task.init_state(train.build_optimizer(config, 3))
  abstract, _ = train.abstract_train_state(init_fn, mesh)
  ckpt = train.checkpoint_lib.Checkpointer(tmp_path / "checkpoints")
  step, state = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 3
  restored = jax.tree.leaves(state["params"])
  assert any(x.sharding.spec and "fsdp" in str(x.sharding.spec) for x in restored)
  for a, b in zip(restored, saved):
    np.testing.assert_array_equal(np.asarray(a), b)
