"""The CLI: its backend choice (the CPU where nothing else can be found), and
user mistakes as one line each, with no traceback."""
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from mrl_jax import main

REPO = pathlib.Path(__file__).resolve().parents[1]


def _calls(monkeypatch, tmp_path, *, vendor=None, gpu_plugin=False, env=None):
  calls = []
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.delenv("JAX_FORCE_TPU_INIT", raising=False)
  for k, v in (env or {}).items():
    monkeypatch.setenv(k, v)
  files = []
  if vendor:
    (tmp_path / "vendor").write_text(vendor + "\n")
    files = [str(tmp_path / "vendor")]
  monkeypatch.setattr(main.glob, "glob", lambda pattern: files)
  monkeypatch.setattr(main.importlib.util, "find_spec", lambda name: gpu_plugin or None)
  monkeypatch.setattr(jax.config, "update", lambda *a: calls.append(a))
  main._skip_absent_accelerators()  # pylint: disable=protected-access
  return calls


def test_cpu_only_host_skips_the_tpu_plugin(monkeypatch, tmp_path):
  assert _calls(monkeypatch, tmp_path) == [("jax_platforms", "cpu")]
  assert _calls(monkeypatch, tmp_path, vendor="0x8086") == [("jax_platforms", "cpu")]


def test_accelerators_and_explicit_platforms_are_left_alone(monkeypatch, tmp_path):
  assert _calls(monkeypatch, tmp_path, vendor="0x1ae0") == []  # a TPU is attached
  assert _calls(monkeypatch, tmp_path, gpu_plugin=True) == []
  assert _calls(monkeypatch, tmp_path, env={"JAX_PLATFORMS": "tpu"}) == []


@pytest.mark.parametrize("args, message", [
    (["--config.modle.variant=Ti/16"], "error: bad config override (--config.modle.variant="
     "Ti/16): the config has no field 'modle'. Did you mean \"model\" instead of \"modle\"?"),
    (["--config.keep_checkpoints=5"], "error: bad config override "
     "(--config.keep_checkpoints=5): the config has no field 'keep_checkpoints'"),
    (["--config=configs/no_such.py"],
     f"error: could not load --config=configs/no_such.py (no such file: "
     f"{REPO / 'configs' / 'no_such.py'})"),
    (["--config={tmp}/broken.py"], "error: could not load --config={tmp}/broken.py (No "
     "module named 'no_such_module')"),
], ids=["unknown_field", "unknown_top_level_field", "missing_config_file", "broken_config"])
def test_config_mistakes_are_one_line(fake_dataset_dir, tmp_path, args, message):
  (tmp_path / "broken.py").write_text("import no_such_module\n")
  argv = [f"--config={REPO / 'tests' / 'tiny_config.py'}:{fake_dataset_dir}",
          f"--workdir={tmp_path / 'run'}"] + [a.format(tmp=tmp_path) for a in args]
  out = _main(argv)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-4000:]
  assert out.stderr.strip() == message.format(tmp=tmp_path)


def _main(argv):
  return subprocess.run([sys.executable, "-m", "mrl_jax.main"] + argv, cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=300, check=False)


def test_a_bad_workdir_is_one_line_without_a_traceback(fake_dataset_dir, tmp_path):
  (tmp_path / "a_file").write_text("")
  out = _main([f"--config={REPO / 'tests' / 'tiny_config.py'}:{fake_dataset_dir}",
               f"--workdir={tmp_path / 'a_file'}"])
  assert out.returncode == 1, out.stderr[-2000:]
  assert "Traceback" not in out.stderr, out.stderr[-4000:]
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: --workdir={tmp_path / 'a_file'} is a file, not a directory. Fix: pass a "
      "directory (it is created if missing).")


@pytest.mark.parametrize("env, tpu, expected", [
    ({}, False, None),  # one process
    ({}, True, {}),  # a Cloud TPU VM: JAX finds its workers
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-16"}, False, {}),
    # srun, one task per node: every GPU of the node
    ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "2"},
     False, {"local_device_ids": []}),
    # srun, one task per GPU with all GPUs visible: JAX takes GPU SLURM_LOCALID
    ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_NODES": "2",
      "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, False, {}),
    # srun with --gpus-per-task=1: SLURM already gave each task its GPU
    ({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_NODES": "1",
      "CUDA_VISIBLE_DEVICES": "3"}, False, {"local_device_ids": []}),
    # a batch script (no step) or a one-task step: one process
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, False, None),
    ({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, False, None),
])
def test_distributed_init_is_detected_on_tpu_vms_and_in_slurm_steps(env, tpu, expected):
  assert main.distributed_init_args(env, tpu) == expected
