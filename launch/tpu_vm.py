#!/usr/bin/env python3
r"""Cloud TPU VMs: create a slice, install this code on it, run on every worker.

  python launch/tpu_vm.py create --name=mrl --zone=us-west4-a \
      --accelerator_type=v5litepod-16 --spot --wait
  python launch/tpu_vm.py setup  --name=mrl
  python launch/tpu_vm.py run    --name=mrl --workdir=gs://BUCKET/runs/b16 --auto_resume \
      -- --config=configs/imagenet_vit_b16.py --config.dataset.data_dir=gs://BUCKET/tfds
  python launch/tpu_vm.py status|logs|ssh|stop|delete --name=mrl

It drives `gcloud` (queued resources, `tpu-vm ssh/scp`); every subcommand
takes `--dry_run`, which prints the exact commands instead of running them.
What `create` and `setup` were given is kept in ~/.mrl_jax/tpu/NAME.json
(`$MRL_JAX_LAUNCH_DIR` to move it), so later subcommands need only `--name`,
and `run --auto_resume` can rebuild a preempted spot slice the same way:
delete the queued resource, create it again, wait until it is ACTIVE, install
the same code, start the same command, which resumes from the last
checkpoint in the gs:// workdir. Standard library only: it runs where
gcloud does.

On every worker: the code in ~/mrl_jax, a Python 3.11 virtualenv in
~/mrl_jax_venv, and the run's state in ~/mrl_jax_run (pid, exit_code and
worker.log, copied to WORKDIR/logs/worker-N.log, or slice-S-worker-N.log on
several slices, every --log_sync_seconds).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

_GCLOUD_HELP = ("install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), "
                "then run `gcloud auth login` and `gcloud config set project PROJECT`")
REMOTE_CODE = "$HOME/mrl_jax"
REMOTE_VENV = "$HOME/mrl_jax_venv"
REMOTE_RUN = "$HOME/mrl_jax_run"
REMOTE_TARBALL = "mrl_jax_code.tar.gz"  # in the worker's home directory
MEGASCALE_PORT = 8080  # multislice: the port slices reach each other's runtime on
PREEMPTED = ("SUSPENDING", "SUSPENDED", "FAILED")


# ---------------------------------------------------------------- the table --

@dataclasses.dataclass(frozen=True)
class Accelerator:
  chips: int
  hosts: int
  runtime_version: str  # the TPU VM image for JAX on this generation
  topology: str  # for `python -m mrl_jax.main --mode=compile --topology=...`


def _accelerators() -> dict[str, Accelerator]:
  """Cloud TPU accelerator types: v4 and v5p count TensorCores (2 per chip),
  v5e (`v5litepod`) and v6e count chips. Multi-host slices have 4 chips per
  host; v5e / v6e slices of up to 8 chips are one host."""
  table = {}
  cubes = ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8",
           "8x8x16", "8x16x16", "16x16x16", "16x16x24"]
  for gen, runtime, last in (("v4", "tpu-ubuntu2204-base", "8x16x16"),
                             ("v5p", "v2-alpha-tpuv5", "16x16x24")):
    for shape in cubes[:cubes.index(last) + 1]:
      chips = _prod(shape)
      table[f"{gen}-{2 * chips}"] = Accelerator(chips, max(1, chips // 4), runtime,
                                                f"{gen}:{shape}")
  grids = ["1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"]
  for name, gen, runtime in (("v5litepod", "v5e", "v2-alpha-tpuv5-lite"),
                             ("v6e", "v6e", "v2-alpha-tpuv6e")):
    for shape in grids:
      chips = _prod(shape)
      table[f"{name}-{chips}"] = Accelerator(chips, 1 if chips <= 8 else chips // 4, runtime,
                                             f"{gen}:{shape}")
  return table


def _prod(shape: str) -> int:
  n = 1
  for s in shape.split("x"):
    n *= int(s)
  return n


ACCELERATORS = _accelerators()


class LaunchError(Exception):
  """A bad input or a refused step: printed as one `error:` line."""


def accelerator(name: str) -> Accelerator:
  if name not in ACCELERATORS:
    raise LaunchError(f"unknown accelerator type {name!r}. Known: "
                      + ", ".join(ACCELERATORS) + " (`python launch/tpu_vm.py accelerators`).")
  return ACCELERATORS[name]


# --------------------------------------------------------------- the record --

def record_path(name: str) -> pathlib.Path:
  root = os.environ.get("MRL_JAX_LAUNCH_DIR") or os.path.expanduser("~/.mrl_jax/tpu")
  return pathlib.Path(root) / f"{name}.json"


def load_record(name: str) -> dict:
  path = record_path(name)
  if not path.exists():
    raise LaunchError(
        f"no record of {name!r} ({path}): create it with `python launch/tpu_vm.py create "
        f"--name={name} ...` (add --record_only if the queued resource already exists).")
  return json.loads(path.read_text())


def save_record(rec: dict) -> None:
  path = record_path(rec["name"])
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(rec, indent=2) + "\n")


def log(name: str, message: str) -> None:
  """A timestamped line on stderr and in ~/.mrl_jax/tpu/NAME.log."""
  line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {name}: {message}"
  print(line, file=sys.stderr, flush=True)
  path = record_path(name).with_suffix(".log")
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("a") as f:
    f.write(line + "\n")


# ------------------------------------------------------------ gcloud calls --

class Gcloud:
  """Runs (or, with dry_run, prints) gcloud commands for one queued resource."""

  def __init__(self, rec: dict, dry_run: bool):
    self.rec, self.dry_run = rec, dry_run
    self._coordinator_ip = None
    if not dry_run and shutil.which("gcloud") is None:
      raise LaunchError(f"gcloud not found on PATH: {_GCLOUD_HELP}.")

  @property
  def nodes(self) -> list[str]:
    """TPU VM names: the queued resource's name, or NAME-0 ... on several slices."""
    n = self.rec["num_slices"]
    return [self.rec["name"]] if n == 1 else [f"{self.rec['name']}-{i}" for i in range(n)]

  def where(self) -> list[str]:
    return [f"--zone={self.rec['zone']}"] + (
        [f"--project={self.rec['project']}"] if self.rec.get("project") else [])

  def qr(self, verb: str, *args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", verb, self.rec["name"],
            *self.where(), *args]

  def ssh(self, node: str, command: str, worker: str = "all") -> list[str]:
    """`command` runs in the login shell of the workers: bash on the TPU VM images."""
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *self.where(),
            f"--worker={worker}", "--strict-host-key-checking=no", f"--command={command}"]

  def call(self, argv: list[str], *, capture: bool = False, check: bool = True):
    """Runs argv; returns CompletedProcess (None in a dry run)."""
    if self.dry_run:
      print(shlex.join(argv), flush=True)
      return None
    done = subprocess.run(argv, text=True, capture_output=capture)
    if check and done.returncode:
      detail = (done.stderr or "").strip().splitlines()[-1:] if capture else []
      raise LaunchError(f"`{' '.join(argv[:5])} ...` exited {done.returncode}"
                        + (f": {detail[0]}" if detail else ""))
    return done

  def parallel(self, argvs: list[list[str]]) -> None:
    """Runs one command per slice at once (each reaches all its workers)."""
    if self.dry_run or len(argvs) == 1:
      for argv in argvs:
        self.call(argv)
      return
    procs = [subprocess.Popen(argv, text=True) for argv in argvs]
    codes = [p.wait() for p in procs]
    if any(codes):
      raise LaunchError(f"gcloud exited {codes} on the slices {self.nodes}")

  def coordinator_ip(self) -> str:
    """Worker 0 of slice 0: where the slices meet (multislice); asked once."""
    if self._coordinator_ip is None:
      argv = ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.nodes[0], *self.where(),
              "--format=value(networkEndpoints[0].ipAddress)"]
      done = self.call(argv, capture=True)
      self._coordinator_ip = "IP_OF_SLICE_0_WORKER_0" if done is None else done.stdout.strip()
    return self._coordinator_ip

  def state(self) -> str | None:
    """The queued resource's state (ACTIVE, SUSPENDED, ...), None if it does not exist."""
    argv = self.qr("describe", "--format=value(state.state)")
    if self.dry_run:
      print(shlex.join(argv), flush=True)
      return "ACTIVE"
    done = subprocess.run(argv, text=True, capture_output=True)
    if done.returncode:
      if re.search(r"NOT_FOUND|not found|was not found", done.stderr):
        return None
      raise LaunchError(f"gcloud describe failed: {done.stderr.strip()}")
    return done.stdout.strip() or "UNKNOWN"

  def require_active(self) -> None:
    state = self.state()
    if state is None:
      raise LaunchError(f"queued resource {self.rec['name']!r} does not exist in "
                        f"{self.rec['zone']}: create it first (tpu_vm.py create).")
    if state != "ACTIVE":
      raise LaunchError(f"queued resource {self.rec['name']!r} is {state}, not ACTIVE: "
                        "wait for it (tpu_vm.py status), or recreate it if it was preempted.")

  def wait_active(self, poll_seconds: float, timeout_seconds: float | None = None) -> None:
    t0, last = time.monotonic(), None
    while True:
      state = self.state()
      if state != last:
        log(self.rec["name"], f"queued resource is {state}")
        last = state
      if state == "ACTIVE":
        return
      if state is None or state == "FAILED":
        raise LaunchError(f"queued resource {self.rec['name']!r} is {state or 'gone'}; "
                          "see `gcloud compute tpus queued-resources describe`.")
      if timeout_seconds is not None and time.monotonic() - t0 > timeout_seconds:
        raise LaunchError(f"queued resource {self.rec['name']!r} still {state} after "
                          f"{timeout_seconds:.0f} s.")
      time.sleep(poll_seconds)


# ----------------------------------------------------- the remote scripts --

_WORKER_ID = ('W="${TPU_WORKER_ID:-$(curl -sf -H Metadata-Flavor:Google '
              'http://metadata.google.internal/computeMetadata/v1/instance/attributes/'
              'agent-worker-number)}"; W="${W:-0}"')
_RUNNING = f'[ -f "{REMOTE_RUN}/pid" ] && kill -0 "$(cat "{REMOTE_RUN}/pid")" 2>/dev/null'


def setup_script(expected_devices: tuple[int, ...], python: str) -> str:
  """Unpacks the code, builds the virtualenv, installs, checks the chips."""
  check = ("import jax, sys; n = jax.device_count(); "
           f"want = {expected_devices!r}; "
           "print(f'mrl_jax setup: process {jax.process_index()}: {n} devices, "
           "{jax.local_device_count()} local'); "
           "sys.exit(0 if n in want else f'error: this worker sees {n} TPU devices, "
           "not {want[0]}: check the slice (gcloud compute tpus tpu-vm describe)')")
  return "\n".join([
      "set -euo pipefail",
      f'if {_RUNNING}; then echo "error: a run is going on $(hostname): '
      'stop it first (tpu_vm.py stop)" >&2; exit 3; fi',
      f'rm -rf "{REMOTE_CODE}" && mkdir -p "{REMOTE_CODE}"',
      f'tar -xzf "$HOME/{REMOTE_TARBALL}" -C "{REMOTE_CODE}"',
      f'cd "{REMOTE_CODE}"',
      # The TPU images' system Python is older than the pinned packages need:
      # uv fetches the wanted one.
      'export PATH="$HOME/.local/bin:$PATH"',
      "command -v uv >/dev/null || python3 -m pip install -q --user uv",
      f'[ -x "{REMOTE_VENV}/bin/pip" ] || uv venv -q --seed --python {shlex.quote(python)} '
      f'"{REMOTE_VENV}"',
      f'"{REMOTE_VENV}/bin/pip" install -q -c constraints.txt ".[tpu]"',
      f'"{REMOTE_VENV}/bin/python" -c {shlex.quote(check)}',
  ])


def run_script(trainer_args: list[str], workdir: str, log_name: str, env: dict[str, str],
               log_sync_seconds: float) -> str:
  """Starts `python -m mrl_jax.main` detached (setsid + nohup: it survives the
  ssh session), its output in ~/mrl_jax_run/worker.log, copied to
  WORKDIR/logs/ as it grows and once at the end, then its exit code. A
  SIGTERM to the wrapper goes to the trainer, which saves a checkpoint at a
  step all hosts agree on and exits 0."""
  dest = shlex.quote(f"{workdir.rstrip('/')}/logs/{log_name}") + '"$W.log"'
  if workdir.startswith("gs://"):
    copy = f'gcloud storage cp -q "$log" {dest} >/dev/null 2>&1 || true'
  else:
    copy = (f'mkdir -p {shlex.quote(workdir.rstrip("/") + "/logs")} && '
            f'cp "$log" {dest} 2>/dev/null || true')
  exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
  tick = min(1.0, log_sync_seconds)
  every = max(1, round(log_sync_seconds / tick))
  trainer = shlex.join(["-m", "mrl_jax.main", f"--workdir={workdir}", *trainer_args])
  detached = (
      f'echo $$ > "{REMOTE_RUN}/pid"\n'
      f'log="{REMOTE_RUN}/worker.log"\n'
      f"sync_log() {{ {copy}; }}\n"
      f'cd "{REMOTE_CODE}"\n'
      f"{exports}"
      f'"{REMOTE_VENV}/bin/python" {trainer} > "$log" 2>&1 &\n'
      "child=$!\n"
      f'echo "$child" > "{REMOTE_RUN}/child_pid"\n'
      "trap 'kill -TERM \"$child\" 2>/dev/null' TERM\n"
      # Wake every `tick` seconds (the trainer's exit is seen at once), copy
      # the log every `every` ticks.
      f'i=0; while kill -0 "$child" 2>/dev/null; do sleep {tick:g}; i=$((i + 1)); '
      f'[ $((i % {every})) -ne 0 ] || sync_log; done\n'
      'wait "$child"; code=$?\n'
      "sync_log\n"
      f'echo "$code" > "{REMOTE_RUN}/exit_code"\n')
  if _EOF in detached.splitlines():
    raise LaunchError(f"a trainer argument is the line {_EOF!r}, which the launcher reserves.")
  return "\n".join([
      f'mkdir -p "{REMOTE_RUN}"',
      f'if {_RUNNING}; then echo "error: a run is already going on $(hostname) '
      f'(pid $(cat "{REMOTE_RUN}/pid")): stop it first (tpu_vm.py stop)" >&2; exit 3; fi',
      f'rm -f "{REMOTE_RUN}/exit_code"',
      f"cat > \"{REMOTE_RUN}/run.sh\" <<'{_EOF}'",
      detached + _EOF,
      _WORKER_ID,
      f'W="$W" setsid nohup bash "{REMOTE_RUN}/run.sh" >/dev/null 2>&1 </dev/null &',
      'echo "worker $W: started (log: ~/mrl_jax_run/worker.log)"',
  ])


_EOF = "MRL_JAX_RUN_SH"


STATUS_SCRIPT = "\n".join([
    _WORKER_ID,
    f'if [ -f "{REMOTE_RUN}/exit_code" ]; then echo "mrl_jax_exit=$(cat "{REMOTE_RUN}/exit_code")'
    ' worker=$W";',
    f'elif {_RUNNING}; then echo "mrl_jax_running worker=$W pid=$(cat "{REMOTE_RUN}/pid")";',
    'else echo "mrl_jax_not_started worker=$W"; fi',
])
STOP_SCRIPT = (f'if {_RUNNING}; then kill -TERM "$(cat "{REMOTE_RUN}/child_pid")" && '
               'echo "stopping on $(hostname) (the trainer saves a checkpoint, then exits)"; '
               'else echo "nothing running on $(hostname)"; fi')


# -------------------------------------------------------------- subcommands --

def cmd_accelerators(args) -> int:
  del args
  print(f"{'accelerator type':18} {'chips':>6} {'hosts':>6}  {'runtime version':22} "
        "--mode=compile --topology")
  for name, a in ACCELERATORS.items():
    print(f"{name:18} {a.chips:6d} {a.hosts:6d}  {a.runtime_version:22} {a.topology}")
  return 0


def cmd_create(args) -> int:
  acc = accelerator(args.accelerator_type)
  if args.num_slices < 1:
    raise LaunchError(f"--num_slices={args.num_slices} must be >= 1.")
  rec = {"name": args.name, "zone": args.zone, "project": args.project,
         "accelerator_type": args.accelerator_type, "num_slices": args.num_slices,
         "runtime_version": args.runtime_version or acc.runtime_version,
         "provisioning": "spot" if args.spot else "reserved" if args.reserved else "on-demand"}
  g = Gcloud(rec, args.dry_run or args.record_only)
  if not args.record_only:
    create(g)
  if not args.dry_run:
    save_record({**(_old_record(args.name)), **rec})
  if args.wait and not args.record_only:
    g.wait_active(args.poll_seconds)
  return 0


def _old_record(name: str) -> dict:
  path = record_path(name)
  return json.loads(path.read_text()) if path.exists() else {}


def create(g: Gcloud) -> None:
  rec = g.rec
  nodes = (["--node-id=" + rec["name"]] if rec["num_slices"] == 1 else
           [f"--node-count={rec['num_slices']}", f"--node-prefix={rec['name']}"])
  kind = {"spot": ["--spot"], "reserved": ["--reserved"]}.get(rec["provisioning"], [])
  g.call(g.qr("create", f"--accelerator-type={rec['accelerator_type']}",
              f"--runtime-version={rec['runtime_version']}", *nodes, *kind))


def cmd_setup(args) -> int:
  rec = load_record(args.name)
  g = Gcloud(rec, args.dry_run)
  rec["code"] = package_code(args, g)
  rec["python"] = args.python
  if not args.dry_run:
    save_record(rec)
  g.require_active()
  setup(g)
  return 0


def package_code(args, g: Gcloud) -> dict:
  """The code to install: a commit (`git archive`), or with --allow_dirty the
  working tree as it is. Kept in the record's folder for re-installs."""
  repo = pathlib.Path(args.repo).resolve()
  git = ["git", "-C", str(repo)]
  status = subprocess.run([*git, "status", "--porcelain"], text=True, capture_output=True)
  if status.returncode:
    raise LaunchError(f"{repo} is not a git checkout: {status.stderr.strip()}")
  commit = subprocess.run([*git, "rev-parse", args.commit or "HEAD"], text=True,
                          capture_output=True)
  if commit.returncode:
    raise LaunchError(f"no commit {args.commit!r} in {repo}.")
  sha = commit.stdout.strip()
  dirty = status.stdout.strip() and not args.commit
  if dirty and not args.allow_dirty:
    changed = [l for l in status.stdout.splitlines() if l.strip()]
    raise LaunchError(
        f"{repo} has uncommitted changes ({len(changed)} files, e.g. {changed[0][3:]}): "
        "commit them, so every worker runs code that is in the history, or pass "
        "--allow_dirty to install the working tree as it is.")
  tarball = record_path(g.rec["name"]).with_name(f"{g.rec['name']}-code.tar.gz")
  if dirty:
    files = subprocess.run([*git, "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], text=True, capture_output=True).stdout
    print(f"(tar of the working tree of {repo}: `git ls-files --cached --others "
          f"--exclude-standard`) > {tarball}", flush=True)
    if not args.dry_run:
      tarball.parent.mkdir(parents=True, exist_ok=True)
      with tarfile.open(tarball, "w:gz") as tar:
        for f in sorted(filter(None, files.split("\0"))):
          if (repo / f).exists():
            tar.add(repo / f, arcname=f, recursive=False)
    return {"commit": sha + "+dirty", "tarball": str(tarball)}
  argv = [*git, "archive", "--format=tar.gz", f"--output={tarball}", sha]
  if args.dry_run:
    print(shlex.join(argv), flush=True)
  else:
    tarball.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(argv, check=True)
  return {"commit": sha, "tarball": str(tarball)}


def setup(g: Gcloud) -> None:
  """Copies the recorded code to every worker of every slice and installs it."""
  rec = g.rec
  acc = accelerator(rec["accelerator_type"])
  if not g.dry_run:
    log(rec["name"], f"setup: code {rec['code']['commit']} on {rec['num_slices']} x "
        f"{rec['accelerator_type']} ({acc.hosts} workers each)")
  g.parallel([["gcloud", "compute", "tpus", "tpu-vm", "scp", rec["code"]["tarball"],
               f"{node}:{REMOTE_TARBALL}", *g.where(), "--worker=all",
               "--strict-host-key-checking=no"] for node in g.nodes])
  # One slice's chips, or all of them when the multislice runtime is joined.
  expected = tuple(dict.fromkeys((acc.chips, acc.chips * rec["num_slices"])))
  script = setup_script(expected, rec.get("python", "3.11"))
  g.parallel([g.ssh(node, script) for node in g.nodes])


def cmd_run(args) -> int:
  rec = load_record(args.name)
  acc = accelerator(rec["accelerator_type"])
  hosts = acc.hosts * rec["num_slices"]
  if hosts > 1 and not args.workdir.startswith("gs://"):
    raise LaunchError(
        f"--workdir={args.workdir} is not gs://: a {rec['num_slices']} x "
        f"{rec['accelerator_type']} run has {hosts} hosts, which save one checkpoint "
        "together and resume from it, so every worker must see the same workdir "
        "(e.g. --workdir=gs://BUCKET/runs/NAME).")
  trainer_args = list(args.trainer_args)
  if trainer_args[:1] == ["--"]:
    trainer_args = trainer_args[1:]
  if any(a.startswith("--workdir") for a in trainer_args):
    raise LaunchError("pass the workdir as the launcher's --workdir (before `--`): "
                      "it also holds the workers' logs.")
  env = {}
  for item in args.env:
    key, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise LaunchError(f"--env={item!r} must be NAME=VALUE.")
    env[key] = value
  rec["run"] = {"workdir": args.workdir, "trainer_args": trainer_args, "env": env,
                "log_sync_seconds": args.log_sync_seconds}
  if args.auto_resume and "code" not in rec and not args.dry_run:
    raise LaunchError("run --auto_resume reinstalls the same code after a preemption: "
                      f"run `tpu_vm.py setup --name={args.name}` first.")
  g = Gcloud(rec, args.dry_run)
  if not args.dry_run:
    save_record(rec)
  if args.auto_resume and not args.dry_run:
    state = g.state()
    if state == "ACTIVE" and any("mrl_jax_running" in l for l in worker_states(g) or []):
      log(args.name, "a run is going on the workers: watching it")
    elif state not in PREEMPTED:  # preempted already: the watch recovers it first
      g.require_active()
      start_run(g)
    return watch(g, args, state)
  g.require_active()
  start_run(g)
  if args.auto_resume:
    print(f"# then, every {args.poll_seconds:g} s: the describe command above; on "
          f"{'/'.join(PREEMPTED)}: delete, create, setup and run again (at most "
          f"{args.max_retries} times)", flush=True)
  return 0


def start_run(g: Gcloud) -> None:
  rec, run = g.rec, g.rec["run"]
  argvs = []
  for s, node in enumerate(g.nodes):
    env = dict(run["env"])
    name = "worker-"
    if rec["num_slices"] > 1:
      name = f"slice-{s}-worker-"
      env.update(MEGASCALE_COORDINATOR_ADDRESS=g.coordinator_ip(), MEGASCALE_PORT=str(
          MEGASCALE_PORT), MEGASCALE_NUM_SLICES=str(rec["num_slices"]),
                 MEGASCALE_SLICE_ID=str(s))
    script = run_script(run["trainer_args"], run["workdir"], name, env,
                        run["log_sync_seconds"])
    argvs.append(g.ssh(node, script))
  if not g.dry_run:
    log(rec["name"], "run: python -m mrl_jax.main "
        + shlex.join([f"--workdir={run['workdir']}", *run["trainer_args"]]))
  g.parallel(argvs)


def worker_states(g: Gcloud) -> list[str] | None:
  """One status line per worker of every slice, None if a worker did not answer."""
  lines = []
  for node in g.nodes:
    done = subprocess.run(g.ssh(node, STATUS_SCRIPT), text=True, capture_output=True)
    got = re.findall(r"^mrl_jax_\S+.*$", done.stdout, re.M)
    if done.returncode or len(got) < accelerator(g.rec["accelerator_type"]).hosts:
      return None
    lines += got
  return lines


def watch(g: Gcloud, args, state: str) -> int:
  """Until the run ends: recreates, sets up and restarts a preempted slice.

  `state` is the queued resource's state now; each later one is read every
  --poll_seconds, and each change is logged.
  """
  name, retries = g.rec["name"], 0
  log(name, f"watching every {args.poll_seconds:g} s (at most {args.max_retries} recoveries)")
  while True:
    if state is None:
      log(name, "the queued resource was deleted: stopped watching")
      return 1
    if state in PREEMPTED:
      if retries == args.max_retries:
        log(name, f"preempted again ({state}) after {retries} recoveries: giving up "
            f"(raise --max_retries, or rerun `tpu_vm.py run --auto_resume`)")
        return 1
      retries += 1
      log(name, f"preempted ({state}): recovery {retries}/{args.max_retries}: delete, "
          "create, setup, run")
      g.call(g.qr("delete", "--force", "--quiet"))
      create(g)
      g.wait_active(args.poll_seconds)
      setup(g)
      start_run(g)
      state = "ACTIVE"
    elif state == "ACTIVE":
      code = run_result(g)
      if code is not None:
        return code
    time.sleep(args.poll_seconds)
    last, state = state, g.state()
    if state != last:
      log(name, f"queued resource {last} -> {state}")


def run_result(g: Gcloud) -> int | None:
  """The run's exit code once every worker has one (0) or one failed; else None."""
  lines = worker_states(g)
  if lines is None:
    return None  # a worker did not answer this time; ask again next poll
  codes = [int(m) for m in re.findall(r"^mrl_jax_exit=(-?\d+)", "\n".join(lines), re.M)]
  failed = [c for c in codes if c]
  name = g.rec["name"]
  if failed:
    log(name, f"the run failed on a worker (exit {failed[0]}; logs: "
        f"{g.rec['run']['workdir']}/logs/): stopping the others")
    for node in g.nodes:
      g.call(g.ssh(node, STOP_SCRIPT), check=False)
    return failed[0]
  if len(codes) == len(lines):
    log(name, f"the run finished on all {len(codes)} workers (exit 0)")
    return 0
  return None


def cmd_status(args) -> int:
  rec = load_record(args.name)
  g = Gcloud(rec, args.dry_run)
  state = g.state()
  print(f"{rec['name']}: {rec['num_slices']} x {rec['accelerator_type']} in {rec['zone']} "
        f"({rec['provisioning']}), queued resource {state or 'does not exist'}; code "
        f"{rec.get('code', {}).get('commit', '(no setup yet)')}")
  if args.dry_run:
    for node in g.nodes:
      g.call(g.ssh(node, STATUS_SCRIPT))
  elif state == "ACTIVE":
    lines = worker_states(g)
    print("\n".join(lines) if lines else "(a worker did not answer)")
  return 0


def _node(g: Gcloud, slice_index: int) -> str:
  if not 0 <= slice_index < len(g.nodes):
    raise LaunchError(f"--slice={slice_index}: the run has {len(g.nodes)} slice(s).")
  return g.nodes[slice_index]


def cmd_logs(args) -> int:
  rec = load_record(args.name)
  g = Gcloud(rec, args.dry_run)
  tail = f'tail -n {args.lines} {"-F " if args.follow else ""}"{REMOTE_RUN}/worker.log"'
  done = g.call(g.ssh(_node(g, args.slice), tail, worker=str(args.worker)),
                check=False)
  return 0 if done is None else done.returncode


def cmd_ssh(args) -> int:
  rec = load_record(args.name)
  g = Gcloud(rec, args.dry_run)
  argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", _node(g, args.slice), *g.where(),
          f"--worker={args.worker}"]
  if args.command:
    argv.append(f"--command={args.command}")
  done = g.call(argv, check=False)
  return 0 if done is None else done.returncode


def cmd_stop(args) -> int:
  rec = load_record(args.name)
  g = Gcloud(rec, args.dry_run)
  g.parallel([g.ssh(node, STOP_SCRIPT) for node in g.nodes])
  return 0


def cmd_delete(args) -> int:
  rec = load_record(args.name)
  g = Gcloud(rec, args.dry_run)
  g.call(g.qr("delete", "--force", "--quiet"))
  if not args.dry_run:
    log(rec["name"], "deleted the queued resource (its record stays, for `create` again)")
  return 0


# ---------------------------------------------------------------- the CLI --

def parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", required=True, help="the queued resource (and TPU VM) name")
  common.add_argument("--dry_run", action="store_true",
                      help="print the commands instead of running them")
  p = argparse.ArgumentParser(prog="tpu_vm.py", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

  sub.add_parser("accelerators", help="the known accelerator types and their runtime "
                 "versions").set_defaults(fn=cmd_accelerators)

  fmt = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
  c = sub.add_parser("create", parents=[common], help="request a slice (a queued resource)",
                     **fmt)
  c.add_argument("--zone", required=True)
  c.add_argument("--project", default=None, help="default: gcloud's configured project")
  c.add_argument("--accelerator_type", required=True,
                 help="e.g. v4-32, v5litepod-16, v5p-64, v6e-16 (see `accelerators`)")
  c.add_argument("--num_slices", type=int, default=1, help="multislice: this many slices")
  c.add_argument("--runtime_version", default=None,
                 help="the TPU VM image (default: the table's, for the generation)")
  kind = c.add_mutually_exclusive_group()
  kind.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
  kind.add_argument("--reserved", action="store_true", help="the project's reservation")
  c.add_argument("--wait", action="store_true",
                 help="return once it is ACTIVE (no time limit: spot capacity can take "
                 "hours; Ctrl-C leaves the request queued, `delete` withdraws it)")
  c.add_argument("--poll_seconds", type=float, default=30, help="--wait: between checks")
  c.add_argument("--record_only", action="store_true",
                 help="it exists already: only record it for setup/run")
  c.set_defaults(fn=cmd_create)

  s = sub.add_parser("setup", parents=[common],
                     help="install a commit of this checkout on every worker", **fmt)
  s.add_argument("--commit", default=None, help="default: HEAD (the tree must be clean)")
  s.add_argument("--allow_dirty", action="store_true",
                 help="install the working tree with its uncommitted changes")
  s.add_argument("--repo", default=str(pathlib.Path(__file__).resolve().parent.parent),
                 help="the checkout (default: the one this script is in)")
  s.add_argument("--python", default="3.11", help="the workers' Python version")
  s.set_defaults(fn=cmd_setup)

  r = sub.add_parser("run", parents=[common],
                     help="start python -m mrl_jax.main on every worker; args after --", **fmt)
  r.add_argument("--workdir", required=True,
                 help="gs://... on more than one host; also gets logs/worker-N.log")
  r.add_argument("--env", action="append", default=[],
                 help="NAME=VALUE for the trainer's environment (repeatable)")
  r.add_argument("--log_sync_seconds", type=float, default=60,
                 help="how often each worker copies its log to WORKDIR/logs/")
  r.add_argument("--auto_resume", action="store_true",
                 help="stay and watch: recreate, set up and restart a preempted slice")
  r.add_argument("--max_retries", type=int, default=10,
                 help="--auto_resume: preemptions to recover from (each one counts, however "
                 "long its new slice takes to become ACTIVE); then it gives up")
  r.add_argument("--poll_seconds", type=float, default=60,
                 help="--auto_resume: between checks of the slice and the workers")
  r.add_argument("trainer_args", nargs=argparse.REMAINDER,
                 help="-- then the trainer's flags, e.g. -- --config=configs/x.py")
  r.set_defaults(fn=cmd_run)

  st = sub.add_parser("status", parents=[common], help="the slice's state and each worker's")
  st.set_defaults(fn=cmd_status)

  lg = sub.add_parser("logs", parents=[common], help="a worker's log (ssh + tail)", **fmt)
  lg.add_argument("--worker", type=int, default=0)
  lg.add_argument("--slice", type=int, default=0)
  lg.add_argument("--lines", type=int, default=100)
  lg.add_argument("--follow", action="store_true")
  lg.set_defaults(fn=cmd_logs)

  sh = sub.add_parser("ssh", parents=[common], help="a shell (or --command) on a worker",
                      **fmt)
  sh.add_argument("--worker", type=int, default=0)
  sh.add_argument("--slice", type=int, default=0)
  sh.add_argument("--command", default=None)
  sh.set_defaults(fn=cmd_ssh)

  sub.add_parser("stop", parents=[common], help="stop the run on every worker "
                 "(SIGTERM: it saves a checkpoint)").set_defaults(fn=cmd_stop)
  sub.add_parser("delete", parents=[common],
                 help="delete the queued resource and its TPU VMs (the local record stays, "
                 "for `create` again)").set_defaults(fn=cmd_delete)
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    return args.fn(args)
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
