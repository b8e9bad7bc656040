"""Two JAX processes x 4 CPU devices on loopback (gloo collectives).

One test walks a 2-process run through the failures a TPU pod sees: a
SIGTERM to one host (both save at the agreed step and exit 0), a kill -9 of
both hosts at an arbitrary step, and restarts. The losses of every step and
the final parameters must equal one uninterrupted 1-process x 8-device run.
"""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mrl_jax import train
from tests import tiny_config
from tests.conftest import TEST_XLA_FLAGS
from tests.test_train import _final_params

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, data_dir, log_dir, tag):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=TEST_XLA_FLAGS.format(4))
  procs = []
  for i in range(2):
    log = open(log_dir / f"{tag}_{i}.log", "w")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "mrl_jax.main",
         f"--config={REPO / 'tests' / 'tiny_config.py'}:{data_dir}",
         f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _logged_steps(workdir):
  path = workdir / "metrics.jsonl"
  return [m["step"] for m in train.MetricsLog.read(path)] if path.exists() else []


def _wait_for_step(procs, workdir, step, log_dir, tag):
  deadline = time.time() + TIMEOUT
  while time.time() < deadline:
    if max(_logged_steps(workdir), default=0) >= step:
      return
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.05)
  for p in procs:
    p.kill()
  logs = "\n".join((log_dir / f"{tag}_{i}.log").read_text()[-3000:] for i in range(2))
  pytest.fail(f"{tag}: step {step} not reached.\n{logs}")


def _wait(procs, log_dir, tag):
  codes = [p.wait(timeout=TIMEOUT) for p in procs]
  if codes != [0, 0]:
    logs = "\n".join((log_dir / f"{tag}_{i}.log").read_text()[-3000:] for i in range(2))
    pytest.fail(f"{tag}: exit codes {codes}.\n{logs}")


def test_two_processes_survive_sigterm_and_kill_and_match_one(fake_dataset_dir, tmp_path):
  config = tiny_config.get_config(fake_dataset_dir)
  train.run(config, str(tmp_path / "one"))  # 1 process x 8 devices
  expected = [m["loss"] for m in train.MetricsLog.read(tmp_path / "one" / "metrics.jsonl")]
  _, expected_params = _final_params(tmp_path / "one")

  workdir, logs = tmp_path / "two", tmp_path
  # 1) SIGTERM to process 1 only: both save at the same step and exit 0.
  procs = _launch(workdir, fake_dataset_dir, logs, "sigterm")
  _wait_for_step(procs, workdir, 2, logs, "sigterm")
  procs[1].send_signal(signal.SIGTERM)
  _wait(procs, logs, "sigterm")
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  preempted = saved[-1]
  assert 2 <= preempted < 12
  assert max(_logged_steps(workdir)) == preempted  # stopped right there
  for i in range(2):  # every process saved its own input pipeline state
    assert (workdir / "checkpoints" / str(preempted) / "data" /
            f"process_{i}-of-2.json").exists()

  # 2) Resume, then kill -9 both processes mid-run (after a periodic save).
  procs = _launch(workdir, fake_dataset_dir, logs, "kill")
  _wait_for_step(procs, workdir, 9, logs, "kill")
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait(timeout=TIMEOUT)

  # 3) Resume to the end.
  procs = _launch(workdir, fake_dataset_dir, logs, "final")
  _wait(procs, logs, "final")
  # From the last checkpoint committed before the kill (a save still in
  # flight at the kill is discarded whole).
  resumed = re.search(r"Resuming from step (\d+)", (logs / "final_0.log").read_text())
  assert resumed and int(resumed.group(1)) in (4, 8), resumed

  log = train.MetricsLog.read(workdir / "metrics.jsonl")
  assert [m["step"] for m in log] == list(range(1, 13))
  # Same losses at every step: the same examples, augmented the same way.
  np.testing.assert_allclose([m["loss"] for m in log], expected, rtol=2e-5)
  step, params = _final_params(workdir)
  assert step == 12
  # Cross-process (gloo) and in-process all-reduces sum in different orders;
  # Adam turns that float noise into O(lr) moves of weights whose gradient
  # is ~0, so compare on the scale of lr (3e-3).
  for a, b in zip(params, expected_params):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert (workdir / "eval" / "results.json").exists()  # written by process 0


def test_evaluation_on_process_local_rows_matches_one_process(tmp_path):
  """kNN over two processes' own rows (uneven, ties across them) = one process."""
  from tests import multihost_eval  # pylint: disable=g-import-not-at-top
  from mrl_jax.evaluators import knn  # pylint: disable=g-import-not-at-top
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=TEST_XLA_FLAGS.format(4))
  out = tmp_path / "out.npz"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.multihost_eval", f"127.0.0.1:{port}", str(i), str(out)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(l[-3000:] for l in logs)
  got = np.load(out)
  queries, database = multihost_eval.data()
  for k in (1, 100):
    scores, indices = knn.knn_search(queries, database, [4, 8, 16], k)  # 1 process, 8 devices
    np.testing.assert_array_equal(got[f"indices_{k}"], indices)
    np.testing.assert_allclose(got[f"scores_{k}"], scores, rtol=1e-6)
  # The tied copies in process 1's rows lose to the originals in process 0's.
  np.testing.assert_array_equal(got["indices_1"][:, :10, 0], np.tile(np.arange(10, 20), (3, 1)))
  np.testing.assert_array_equal(got["gathered_embedding"], database)
  np.testing.assert_array_equal(got["gathered_logits"], np.arange(300 * 6).reshape(2, 300, 3))
  np.testing.assert_array_equal(got["summed"], [2, 1])


@pytest.mark.parametrize("failure", ["corrupt", "error"])
def test_processes_agree_when_only_one_finds_a_step_bad(tmp_path, failure):
  """Process 1 alone finds step 2 corrupt (both resume from step 1, renamed once)
  or fails to read it (both raise, nothing renamed)."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=TEST_XLA_FLAGS.format(4))
  directory, out = tmp_path / "checkpoints", tmp_path / "out.json"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.multihost_checkpoint", f"127.0.0.1:{port}", str(i),
       str(directory), failure, str(out)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(l[-3000:] for l in logs)
  results = [json.loads(pathlib.Path(f"{out}.{i}").read_text()) for i in range(2)]
  names = sorted(p.name for p in directory.iterdir())
  if failure == "corrupt":
    assert results == [{"step": 1, "equal": True}] * 2
    assert names == ["1", "2.corrupt"]
  else:
    assert all(r["error"].startswith("Could not restore the checkpoint of step 2")
               for r in results), results
    assert "another process failed to read it" in results[0]["error"]
    assert names == ["1", "2"]
