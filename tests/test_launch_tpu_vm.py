"""launch/tpu_vm.py against a fake gcloud whose TPU workers are local folders.

The fake (tests/launch_fakes.py) records every argv; with "exec" on it also
runs each ssh command with bash in a worker's folder, so the scripts the
launcher sends are executed, not only read.
"""
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import pytest

from tests import launch_fakes

REPO = pathlib.Path(__file__).resolve().parent.parent
TPU_VM = REPO / "launch" / "tpu_vm.py"
WEIRD_WORKDIR = """gs://bucket/it's a "run" $HOME"""
WEIRD_OVERRIDE = """--config.name=a 'b' "c" $d `e`"""


def launch(env, *args, check=True):
  done = subprocess.run([sys.executable, str(TPU_VM), *args], env=env, text=True,
                        capture_output=True, timeout=120)
  if check and done.returncode:
    raise AssertionError(f"tpu_vm.py {' '.join(args)} exited {done.returncode}:\n"
                         f"{done.stdout}\n{done.stderr}")
  return done


def make_repo(path: pathlib.Path) -> pathlib.Path:
  """A small git checkout standing in for this project."""
  path.mkdir()
  (path / "constraints.txt").write_text("jax==0.10.2\n")
  (path / "setup.py").write_text("# the package\n")
  (path / "mrl_jax").mkdir()
  (path / "mrl_jax" / "main.py").write_text("# trainer\n")
  git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run(["git", "init", "-q", str(path)], check=True)
  subprocess.run([*git, "add", "."], check=True)
  subprocess.run([*git, "commit", "-qm", "code"], check=True)
  return path


def printed_commands(out: str) -> list[list[str]]:
  """The commands a dry run printed (a quoted ssh command spans several lines)."""
  commands, pending = [], None
  for line in out.splitlines():
    if pending is None and not line.startswith(("gcloud ", "git ")):
      continue
    pending = line if pending is None else pending + "\n" + line
    try:
      commands.append(shlex.split(pending))
      pending = None
    except ValueError:  # inside a quoted argument: read on
      pass
  assert pending is None, pending
  return commands


def worker_homes(tmp, node="mrl"):
  return sorted((tmp / "vms" / node).glob("worker-*"))


def wait_for_exit(homes, timeout=30):
  t0 = time.monotonic()
  while not all((h / "mrl_jax_run" / "exit_code").exists() for h in homes):
    assert time.monotonic() - t0 < timeout, "the detached run did not finish"
    time.sleep(0.1)
  return [int((h / "mrl_jax_run" / "exit_code").read_text()) for h in homes]


def qr_verbs(tmp):
  return [a[3] for a in launch_fakes.calls(tmp, "gcloud") if a[:3] == ["compute", "tpus",
                                                                       "queued-resources"]]


def create(env, *extra):
  return launch(env, "create", "--name=mrl", "--zone=us-west4-a",
                "--accelerator_type=v5litepod-16", *extra)


@pytest.fixture
def cloud(tmp_path):
  env = launch_fakes.install(tmp_path, exec=True)
  return tmp_path, env


# ------------------------------------------------------------------ create --

def test_create_builds_the_queued_resource_request(cloud):
  tmp, env = cloud
  create(env, "--spot", "--project=p")
  launch(env, "create", "--name=big", "--zone=us-east5-a", "--accelerator_type=v5p-128",
         "--num_slices=2", "--reserved")
  launch(env, "create", "--name=v6", "--zone=z", "--accelerator_type=v6e-8")
  launch(env, "create", "--name=v4", "--zone=z", "--accelerator_type=v4-32")
  creates = [a[4:] for a in launch_fakes.calls(tmp, "gcloud") if a[3] == "create"]
  assert creates == [
      ["mrl", "--zone=us-west4-a", "--project=p", "--accelerator-type=v5litepod-16",
       "--runtime-version=v2-alpha-tpuv5-lite", "--node-id=mrl", "--spot"],
      ["big", "--zone=us-east5-a", "--accelerator-type=v5p-128",
       "--runtime-version=v2-alpha-tpuv5", "--node-count=2", "--node-prefix=big",
       "--reserved"],
      ["v6", "--zone=z", "--accelerator-type=v6e-8", "--runtime-version=v2-alpha-tpuv6e",
       "--node-id=v6"],
      ["v4", "--zone=z", "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
       "--node-id=v4"]]
  rec = json.loads((tmp / "records" / "big.json").read_text())
  assert rec["num_slices"] == 2 and rec["provisioning"] == "reserved"


def test_accelerator_table_matches_the_compile_topologies():
  spec = importlib.util.spec_from_file_location("tpu_vm", TPU_VM)
  tpu_vm = sys.modules["tpu_vm"] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tpu_vm)
  table = tpu_vm.ACCELERATORS
  assert (table["v5litepod-16"].chips, table["v5litepod-16"].hosts) == (16, 4)
  assert (table["v5litepod-8"].chips, table["v5litepod-8"].hosts) == (8, 1)
  assert (table["v4-8"].chips, table["v4-8"].topology) == (4, "v4:2x2x1")
  assert (table["v5p-128"].chips, table["v5p-128"].hosts) == (64, 16)
  assert table["v6e-256"].topology == "v6e:16x16"
  for a in table.values():  # what --mode=compile is told for the same slice
    shape = a.topology.split(":")[1]
    assert eval(shape.replace("x", "*")) == a.chips  # pylint: disable=eval-used


def test_unknown_accelerator_lists_the_known_ones(cloud):
  _, env = cloud
  done = launch(env, "create", "--name=x", "--zone=z", "--accelerator_type=v5e-16",
                check=False)
  assert done.returncode == 2
  assert done.stderr.startswith("error: unknown accelerator type 'v5e-16'. Known: v4-8,")
  assert "v5litepod-16" in done.stderr and "v6e-256" in done.stderr


def test_missing_gcloud_is_one_line_naming_what_to_install(tmp_path):
  env = launch_fakes.install(tmp_path, tools=("xpk",))
  done = launch(env, "create", "--name=x", "--zone=z", "--accelerator_type=v4-8",
                check=False)
  assert done.returncode == 2 and done.stdout == ""
  assert done.stderr.count("\n") == 1
  assert done.stderr.startswith("error: gcloud not found on PATH: install the Google Cloud CLI")


# ------------------------------------------------------------------- setup --

def test_setup_installs_the_commit_on_every_worker_and_checks_its_chips(cloud, tmp_path):
  tmp, env = cloud
  repo = make_repo(tmp_path / "repo")
  create(env, "--spot")
  launch(env, "setup", "--name=mrl", f"--repo={repo}")
  homes = worker_homes(tmp)
  assert len(homes) == 4
  for home in homes:
    assert (home / "mrl_jax" / "mrl_jax" / "main.py").read_text() == "# trainer\n"
  pips = launch_fakes.records(tmp, "pip")
  assert [p["argv"] for p in pips] == [["install", "-q", "-c", "constraints.txt", ".[tpu]"]] * 4
  assert sorted(p["cwd"] for p in pips) == sorted(str(h / "mrl_jax") for h in homes)
  rec = json.loads((tmp / "records" / "mrl.json").read_text())
  sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                       text=True).stdout.strip()
  assert rec["code"]["commit"] == sha
  # A worker that sees the wrong number of chips fails the setup.
  (tmp / "cloud.json").write_text(json.dumps({**json.loads((tmp / "cloud.json").read_text()),
                                              "devices": 8}))
  done = launch(env, "setup", "--name=mrl", f"--repo={repo}", check=False)
  assert done.returncode == 2 and "this worker sees 8 TPU devices, not 16" in done.stderr


def test_setup_refuses_a_dirty_tree_unless_allowed(cloud, tmp_path):
  tmp, env = cloud
  repo = make_repo(tmp_path / "repo")
  (repo / "mrl_jax" / "main.py").write_text("# edited\n")
  create(env)
  done = launch(env, "setup", "--name=mrl", f"--repo={repo}", check=False)
  assert done.returncode == 2
  assert "has uncommitted changes (1 files, e.g. mrl_jax/main.py)" in done.stderr
  assert "--allow_dirty" in done.stderr and not launch_fakes.calls(tmp, "pip")
  launch(env, "setup", "--name=mrl", f"--repo={repo}", "--allow_dirty")
  for home in worker_homes(tmp):
    assert (home / "mrl_jax" / "mrl_jax" / "main.py").read_text() == "# edited\n"
  assert json.loads((tmp / "records" / "mrl.json").read_text())["code"]["commit"].endswith(
      "+dirty")


# --------------------------------------------------------------------- run --

def test_run_refuses_a_local_workdir_on_several_hosts(cloud):
  tmp, env = cloud
  create(env)
  done = launch(env, "run", "--name=mrl", "--workdir=/tmp/run", "--", "--config=c.py",
                check=False)
  assert done.returncode == 2
  assert "is not gs://: a 1 x v5litepod-16 run has 4 hosts" in done.stderr
  assert "every worker must see the same workdir" in done.stderr
  assert "ssh" not in {a[3] for a in launch_fakes.calls(tmp, "gcloud") if len(a) > 3}


def test_run_needs_an_active_queued_resource(cloud):
  tmp, env = cloud
  create(env, "--record_only")  # recorded, but never created
  done = launch(env, "run", "--name=mrl", "--workdir=gs://b/r", "--", "--config=c.py",
                check=False)
  assert done.returncode == 2 and "'mrl' does not exist in us-west4-a" in done.stderr
  (tmp / "cloud.json").write_text(json.dumps({**json.loads((tmp / "cloud.json").read_text()),
                                              "plans": [["WAITING_FOR_RESOURCES"]]}))
  create(env)
  done = launch(env, "run", "--name=mrl", "--workdir=gs://b/r", "--", "--config=c.py",
                check=False)
  assert done.returncode == 2 and "is WAITING_FOR_RESOURCES, not ACTIVE" in done.stderr


def test_arguments_reach_the_trainer_unchanged(tmp_path):
  """Spaces, quotes, $ and backticks: in the recorded argv, then run by bash."""
  env = launch_fakes.install(tmp_path)  # record only
  create(env)
  launch(env, "run", "--name=mrl", f"--workdir={WEIRD_WORKDIR}", "--env=XLA_FLAGS=--a=1 --b",
         "--log_sync_seconds=0.1", "--", "--config=configs/x.py", WEIRD_OVERRIDE)
  ssh = [a for a in launch_fakes.calls(tmp_path, "gcloud") if a[3:4] == ["ssh"]]
  assert len(ssh) == 1 and ssh[0][4] == "mrl" and "--worker=all" in ssh[0]
  command = ssh[0][-1].removeprefix("--command=")
  assert shlex.quote(WEIRD_OVERRIDE) in command
  assert shlex.quote(f"--workdir={WEIRD_WORKDIR}") in command
  # The worker's login shell runs it: here, bash in a fake worker's home.
  home = tmp_path / "worker"
  (home / "mrl_jax").mkdir(parents=True)
  (home / "mrl_jax_venv" / "bin").mkdir(parents=True)
  (home / "mrl_jax_venv" / "bin" / "python").symlink_to(tmp_path / "bin" / "venv-python")
  run_env = dict(env, HOME=str(home), FAKE_WORKER_NUMBER="3")
  subprocess.run(["bash", "-c", command], env=run_env, check=True, cwd=home)
  assert wait_for_exit([home]) == [0]
  trainer = launch_fakes.records(tmp_path, "trainer")
  assert trainer[0]["argv"] == ["-m", "mrl_jax.main", f"--workdir={WEIRD_WORKDIR}",
                                "--config=configs/x.py", WEIRD_OVERRIDE]
  assert trainer[0]["cwd"] == str(home / "mrl_jax") and trainer[0]["worker"] == "3"
  assert trainer[0]["env"] == {"XLA_FLAGS": "--a=1 --b"}
  log = tmp_path / "gcs" / WEIRD_WORKDIR.removeprefix("gs://") / "logs" / "worker-3.log"
  assert "trainer output" in log.read_text()


def test_run_status_logs_stop_delete_on_every_worker(cloud, tmp_path):
  tmp, env = cloud
  repo = make_repo(tmp_path / "repo")
  data = json.loads((tmp / "cloud.json").read_text())
  (tmp / "cloud.json").write_text(json.dumps({**data, "trainer_exit": "sleep"}))
  create(env, "--spot")
  launch(env, "setup", "--name=mrl", f"--repo={repo}")
  out = launch(env, "run", "--name=mrl", "--workdir=gs://b/run", "--log_sync_seconds=0.1",
               "--", "--config=configs/x.py").stdout
  assert sorted(re.findall(r"worker (\d): started", out)) == ["0", "1", "2", "3"]
  homes = worker_homes(tmp)
  t0 = time.monotonic()
  while len(launch_fakes.records(tmp, "trainer")) < 4:
    assert time.monotonic() - t0 < 30
    time.sleep(0.1)
  status = launch(env, "status", "--name=mrl").stdout
  assert "queued resource ACTIVE" in status
  assert sorted(re.findall(r"mrl_jax_running worker=(\d)", status)) == ["0", "1", "2", "3"]
  again = launch(env, "run", "--name=mrl", "--workdir=gs://b/run", "--", "--config=c.py",
                 check=False)
  assert again.returncode == 2 and "a run is already going" in again.stderr
  # A watch started now takes the running trainers over instead of starting others.
  watch = subprocess.Popen([sys.executable, str(TPU_VM), "run", "--name=mrl",
                            "--workdir=gs://b/run", "--auto_resume", "--poll_seconds=0.1", "--",
                            "--config=configs/x.py"], env=env, text=True,
                           stderr=subprocess.PIPE)
  time.sleep(0.5)  # the watch finds the trainers running before they are stopped
  logs = launch(env, "logs", "--name=mrl", "--worker=2").stdout
  assert "trainer output" in logs
  # The workers copy their log to the workdir every --log_sync_seconds.
  synced = tmp / "gcs" / "b" / "run" / "logs" / "worker-2.log"
  t0 = time.monotonic()
  while not (synced.exists() and "trainer output" in synced.read_text()):
    assert time.monotonic() - t0 < 30, "the log never reached the workdir"
    time.sleep(0.1)
  launch(env, "stop", "--name=mrl")
  assert wait_for_exit(homes) == [143] * 4  # SIGTERM reached each trainer
  # (the real trainer exits 0 once saved; this one is killed by the signal)
  assert watch.wait(timeout=30) == 143
  watched = watch.stderr.read()
  assert "a run is going on the workers: watching it" in watched
  assert "the run failed on a worker (exit 143" in watched
  assert len(launch_fakes.records(tmp, "trainer")) == 4
  assert sorted(re.findall(r"mrl_jax_exit=143 worker=(\d)",
                           launch(env, "status", "--name=mrl").stdout)) == ["0", "1", "2", "3"]
  launch(env, "delete", "--name=mrl")
  assert qr_verbs(tmp)[-1] == "delete"
  assert "queued resource does not exist" in launch(env, "status", "--name=mrl").stdout


def test_multislice_run_joins_the_slices(tmp_path):
  env = launch_fakes.install(tmp_path, exec=True, hosts=2, devices=16)
  create(env, "--num_slices=2")  # 2 x 16 chips; the fake gives each node 2 workers
  os.makedirs(tmp_path / "vms")
  for s in range(2):
    for w in range(2):
      home = tmp_path / "vms" / f"mrl-{s}" / f"worker-{w}"
      (home / "mrl_jax").mkdir(parents=True)
      (home / "mrl_jax_venv" / "bin").mkdir(parents=True)
      (home / "mrl_jax_venv" / "bin" / "python").symlink_to(tmp_path / "bin" / "venv-python")
  launch(env, "run", "--name=mrl", "--workdir=gs://b/ms", "--log_sync_seconds=0.1", "--",
         "--config=c.py")
  wait_for_exit(sorted((tmp_path / "vms").glob("mrl-*/worker-*")))
  trainer = launch_fakes.records(tmp_path, "trainer")
  slices = sorted((t["env"]["MEGASCALE_SLICE_ID"], t["worker"]) for t in trainer)
  assert slices == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
  assert {t["env"]["MEGASCALE_COORDINATOR_ADDRESS"] for t in trainer} == {"10.0.0.2"}
  assert {t["env"]["MEGASCALE_NUM_SLICES"] for t in trainer} == {"2"}
  assert (tmp_path / "gcs" / "b" / "ms" / "logs" / "slice-1-worker-0.log").exists()


# ------------------------------------------------------------- preemption --

def test_auto_resume_recovers_exactly_once_per_preemption(cloud, tmp_path):
  """ACTIVE -> SUSPENDED, then ACTIVE -> SUSPENDING, then ACTIVE until the run ends."""
  tmp, env = cloud
  repo = make_repo(tmp_path / "repo")
  data = json.loads((tmp / "cloud.json").read_text())
  data.update(plans=[["ACTIVE", "ACTIVE", "ACTIVE", "SUSPENDED"],
                     ["PROVISIONING", "ACTIVE", "ACTIVE", "ACTIVE", "SUSPENDING"],
                     ["ACTIVE"]],
              trainer_exit=["sleep", "sleep", 0])
  (tmp / "cloud.json").write_text(json.dumps(data))
  create(env, "--spot")
  launch(env, "setup", "--name=mrl", f"--repo={repo}")
  done = launch(env, "run", "--name=mrl", "--workdir=gs://b/run", "--auto_resume",
                "--poll_seconds=0.05", "--log_sync_seconds=0.1", "--",
                "--config=configs/x.py", WEIRD_OVERRIDE)
  assert qr_verbs(tmp).count("create") == 3 and qr_verbs(tmp).count("delete") == 2
  scp = [a for a in launch_fakes.calls(tmp, "gcloud") if a[3:4] == ["scp"]]
  assert len(scp) == 3  # setup, then once per recovery
  trainer = launch_fakes.records(tmp, "trainer")
  assert len(trainer) == 12  # 3 starts x 4 workers, each with the same argv
  assert {tuple(t["argv"]) for t in trainer} == {
      ("-m", "mrl_jax.main", "--workdir=gs://b/run", "--config=configs/x.py", WEIRD_OVERRIDE)}
  lines = done.stderr.splitlines()
  stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ mrl: "
  assert all(re.match(stamp, l) for l in lines), lines
  recoveries = [l for l in lines if "recovery" in l]
  assert len(recoveries) == 2
  assert "preempted (SUSPENDED): recovery 1/10" in recoveries[0]
  assert "preempted (SUSPENDING): recovery 2/10" in recoveries[1]
  assert "the run finished on all 4 workers (exit 0)" in lines[-1]
  assert (tmp / "records" / "mrl.log").read_text().splitlines()[-len(lines):] == lines


def test_auto_resume_gives_up_after_max_retries(cloud, tmp_path):
  tmp, env = cloud
  repo = make_repo(tmp_path / "repo")
  data = json.loads((tmp / "cloud.json").read_text())
  # Preempted before the watch starts, then once more after the first recovery.
  data.update(plans=[["ACTIVE", "SUSPENDED"], ["ACTIVE", "ACTIVE", "SUSPENDED"]],
              trainer_exit="sleep")
  (tmp / "cloud.json").write_text(json.dumps(data))
  create(env, "--spot")
  launch(env, "setup", "--name=mrl", f"--repo={repo}")
  done = launch(env, "run", "--name=mrl", "--workdir=gs://b/run", "--auto_resume",
                "--max_retries=1", "--poll_seconds=0.05", "--", "--config=c.py", check=False)
  assert done.returncode == 1
  assert qr_verbs(tmp).count("create") == 2
  assert "after 1 recoveries: giving up" in done.stderr.splitlines()[-1]
  launch(env, "delete", "--name=mrl")


# ----------------------------------------------------------------- dry run --

@pytest.mark.parametrize("subcommand", ["create", "setup", "run", "status", "logs", "ssh",
                                        "stop", "delete"])
def test_every_subcommand_has_help_and_a_dry_run_that_runs_nothing(tmp_path, subcommand):
  env = launch_fakes.install(tmp_path, tools=())  # no gcloud at all
  assert launch(env, subcommand, "--help").stdout.startswith("usage: tpu_vm.py " + subcommand)
  launch(env, "create", "--name=mrl", "--zone=z", "--accelerator_type=v5litepod-16",
         "--record_only")
  repo = make_repo(tmp_path / "repo")
  launch(env, "setup", "--name=mrl", f"--repo={repo}", "--dry_run")
  args = {"create": ["--zone=z", "--accelerator_type=v5litepod-16", "--spot"],
          "setup": [f"--repo={repo}"],
          "run": ["--workdir=gs://b/r", "--auto_resume", "--", "--config=c.py"]}
  out = launch(env, subcommand, "--name=mrl", "--dry_run", *args.get(subcommand, [])).stdout
  commands = printed_commands(out)
  assert commands, out
  assert not (tmp_path / "calls.jsonl").exists()  # nothing ran
  first = {"create": "create", "delete": "delete"}.get(subcommand)
  if first:
    assert commands[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", first]
  if subcommand == "run":
    assert [c[4] for c in commands] == ["describe", "ssh"]
    assert commands[1][-1].startswith("--command=") and "--config=c.py" in commands[1][-1]


def test_a_failing_gcloud_or_trainer_is_reported_with_its_exit_code(cloud, tmp_path):
  tmp, env = cloud
  data = json.loads((tmp / "cloud.json").read_text())
  (tmp / "cloud.json").write_text(json.dumps(
      {**data, "exit": {"compute tpus queued-resources create": 1}}))
  done = launch(env, "create", "--name=mrl", "--zone=z", "--accelerator_type=v5litepod-16",
                check=False)
  assert done.returncode == 2
  assert "`gcloud compute tpus queued-resources create ...` exited 1" in done.stderr
  assert not (tmp / "records" / "mrl.json").exists()  # nothing to set up or run
  # A trainer that fails: the watch stops and returns its exit code.
  (tmp / "cloud.json").write_text(json.dumps({**data, "trainer_exit": 3}))
  repo = make_repo(tmp_path / "repo")
  create(env)
  launch(env, "setup", "--name=mrl", f"--repo={repo}")
  done = launch(env, "run", "--name=mrl", "--workdir=gs://b/r", "--auto_resume",
                "--poll_seconds=0.1", "--", "--config=c.py", check=False)
  assert done.returncode == 3
  assert "the run failed on a worker (exit 3; logs: gs://b/r/logs/)" in done.stderr
