"""Fake `gcloud`, `xpk`, `sbatch`, `srun` (and what runs on a TPU worker) for the launch tests.

`install(tmp)` writes executables into tmp/bin that record their argv as JSON
lines in tmp/calls.jsonl and act out a small cloud:

* queued resources: `create` starts one with the next list of states of
  cloud.json's "plans" (each `describe` reads one; the last repeats);
  `delete` removes it and wipes its workers.
* `tpu-vm scp` / `ssh --worker=all`: with "exec" on, each worker is a folder
  tmp/vms/NODE/worker-W that serves as its $HOME: scp copies the file
  there, ssh runs the command in it with bash (the worker number from the
  fake metadata server, i.e. `curl`), as the TPU VM's login shell would.
* on the workers: `uv` makes a venv whose `pip` records its argv and whose
  `python` is the fake trainer (argv to tmp/trainer_calls.jsonl, exits with
  cloud.json's "trainer_exit", or sleeps until killed when it is "sleep"), or,
  for `python -c`, the real Python with a fake `jax` that sees
  cloud.json's "devices" devices.
* `gcloud storage cp SRC gs://B/P` copies into tmp/gcs/B/P.
"""
import json
import os
import pathlib
import stat
import sys

_COMMON = r'''
import json, os, pathlib, shutil, subprocess, sys, time
ROOT = pathlib.Path(os.environ["FAKE_CLOUD"])

def record(tool, argv, **extra):
  with open(ROOT / "calls.jsonl", "a") as f:
    f.write(json.dumps({"tool": tool, "argv": argv, **extra}) + "\n")

def cloud():
  return json.loads((ROOT / "cloud.json").read_text())

def save(c):
  (ROOT / "cloud.json").write_text(json.dumps(c))
'''

GCLOUD = _COMMON + r'''
argv = sys.argv[1:]
record("gcloud", argv)
c = cloud()
flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)

def workers(node):
  return [ROOT / "vms" / node / f"worker-{w}" for w in range(c["hosts"])]

if argv[:3] == ["compute", "tpus", "queued-resources"]:
  verb, name = argv[3], argv[4]
  qrs = c.setdefault("qrs", {})
  if verb == "create":
    if name in qrs:
      sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS")
    plans = c.setdefault("plans", [["ACTIVE"]])
    qrs[name] = {"states": plans.pop(0) if len(plans) > 1 else list(plans[0])}
    c["creates"] = c.get("creates", 0) + 1
  elif verb == "describe":
    if name not in qrs:
      sys.exit(f"ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: {name}")
    states = qrs[name]["states"]
    print(states.pop(0) if len(states) > 1 else states[0])
  elif verb == "delete":
    qrs.pop(name, None)
    for vm in (ROOT / "vms").glob(f"{name}*"):  # the workers are gone: kill, wipe
      for pid in vm.glob("worker-*/mrl_jax_run/*pid"):
        subprocess.run(["kill", "-KILL", pid.read_text().strip()], stderr=subprocess.DEVNULL)
      shutil.rmtree(vm)
  save(c)
elif argv[:3] == ["compute", "tpus", "tpu-vm"]:
  verb, node = argv[3], argv[4]
  if verb == "describe":
    print("10.0.0.2")
  elif verb == "scp" and c.get("exec"):
    src, dest = argv[4], argv[5]
    node, path = dest.split(":", 1)
    for home in workers(node):
      home.mkdir(parents=True, exist_ok=True)
      shutil.copy(src, home / path)
  elif verb == "ssh" and c.get("exec"):
    homes = workers(node) if flags["worker"] == "all" else [workers(node)[int(flags["worker"])]]
    code = 0
    for home in homes:
      home.mkdir(parents=True, exist_ok=True)
      env = {k: v for k, v in os.environ.items() if k != "TPU_WORKER_ID"}
      env.update(HOME=str(home), FAKE_WORKER_NUMBER=home.name.split("-")[1])
      code |= subprocess.run(["bash", "-c", flags["command"]], env=env, cwd=home).returncode
    sys.exit(code)
elif argv[:2] == ["storage", "cp"]:
  src, dest = [a for a in argv[2:] if not a.startswith("-")]
  out = ROOT / "gcs" / dest[len("gs://"):]
  out.parent.mkdir(parents=True, exist_ok=True)
  shutil.copy(src, out)
sys.exit(c.get("exit", {}).get(" ".join(argv[:4]), 0))
'''

CURL = r'''#!/bin/sh
echo "$FAKE_WORKER_NUMBER"
'''

UV = _COMMON + r'''
argv = sys.argv[1:]
record("uv", argv)
if argv[0] == "venv":
  venv = pathlib.Path(argv[-1])
  (venv / "bin").mkdir(parents=True, exist_ok=True)
  for tool in ("python", "pip"):
    shutil.copy(ROOT / "bin" / f"venv-{tool}", venv / "bin" / tool)
'''

VENV_PIP = _COMMON + r'''
record("pip", sys.argv[1:], cwd=os.getcwd())
'''

VENV_PYTHON = _COMMON + r'''
argv = sys.argv[1:]
if argv[:1] == ["-c"]:  # the device check: the real Python with a fake jax
  env = dict(os.environ, PYTHONPATH=str(ROOT / "fake_jax"))
  sys.exit(subprocess.run([sys.executable, *argv], env=env).returncode)
record("trainer", argv, cwd=os.getcwd(), worker=os.environ.get("W"),
       env={k: v for k, v in os.environ.items() if k.startswith(("MEGASCALE", "XLA"))})
print("trainer output", argv, flush=True)
c = cloud()
plan = c.get("trainer_exit", 0)
if isinstance(plan, list):  # one entry per queued resource created so far
  plan = plan[min(c.get("creates", 1), len(plan)) - 1]
if plan == "sleep":
  time.sleep(300)
sys.exit(int(plan))
'''

FAKE_JAX = r'''
import json, os, pathlib
_c = json.loads((pathlib.Path(os.environ["FAKE_CLOUD"]) / "cloud.json").read_text())
def device_count(): return _c["devices"]
def local_device_count(): return 4
def process_index(): return int(os.environ.get("FAKE_WORKER_NUMBER", 0))
'''

SIMPLE = _COMMON + r'''
record(os.path.basename(sys.argv[0]), sys.argv[1:])
sys.exit(cloud().get("exit", {}).get(os.path.basename(sys.argv[0]), 0))
'''


def _write(path: pathlib.Path, text: str, python: bool = True) -> None:
  path.write_text((f"#!{sys.executable}\n" if python else "") + text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def install(tmp: pathlib.Path, tools=("gcloud", "xpk", "sbatch", "srun"), **cloud) -> dict:
  """The fakes in tmp/bin; returns the environment to run the launchers in."""
  bin_dir = tmp / "bin"
  bin_dir.mkdir(parents=True, exist_ok=True)
  for tool in tools:
    _write(bin_dir / tool, GCLOUD if tool == "gcloud" else SIMPLE)
  _write(bin_dir / "curl", CURL, python=False)
  _write(bin_dir / "uv", UV)
  _write(bin_dir / "venv-pip", VENV_PIP)
  _write(bin_dir / "venv-python", VENV_PYTHON)
  (tmp / "fake_jax").mkdir(exist_ok=True)
  (tmp / "fake_jax" / "jax.py").write_text(FAKE_JAX)
  (tmp / "cloud.json").write_text(json.dumps({"hosts": 4, "devices": 16, **cloud}))
  # The fakes and a few basic tools only: a real gcloud must never be reached.
  return dict(os.environ, PATH=f"{bin_dir}:{_basic_tools(tmp)}", FAKE_CLOUD=str(tmp),
              MRL_JAX_LAUNCH_DIR=str(tmp / "records"), HOME=str(tmp / "home"))


def _basic_tools(tmp: pathlib.Path) -> str:
  """A folder of links to the system tools the scripts use."""
  out = tmp / "sysbin"
  out.mkdir(exist_ok=True)
  for name in ("bash", "sh", "cat", "mkdir", "rm", "cp", "tar", "gzip", "kill", "sleep",
               "setsid", "nohup", "hostname", "git", "env", "printf", "dirname", "tail", "sed",
               "tr", "awk"):
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
      if os.path.exists(os.path.join(d, name)) and not (out / name).exists():
        (out / name).symlink_to(os.path.join(d, name))
  return str(out)


def calls(tmp: pathlib.Path, tool: str | None = None) -> list[list[str]]:
  path = tmp / "calls.jsonl"
  rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
  return [r["argv"] for r in rows if tool in (None, r["tool"])]


def records(tmp: pathlib.Path, tool: str) -> list[dict]:
  path = tmp / "calls.jsonl"
  rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
  return [r for r in rows if r["tool"] == tool]
