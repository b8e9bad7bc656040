"""One writer per workdir (the lease), bad workdirs, the config history."""
import json
import os
import socket
import threading
import time

import ml_collections
import pytest

from mrl_jax import train
from mrl_jax import workdir as workdir_lib
from tests.test_train import small_config


def _holder(tmp_path, **fields):
  record = dict(host="another-host", pid=1, boot_id="x", run_id="r", started=time.time(),
                heartbeat=time.time(), started_utc="2026-01-01 00:00:00 UTC")
  record.update(fields)
  (tmp_path / "LOCK").write_text(json.dumps(record))


def test_a_second_run_is_refused_with_the_holder_named(tmp_path):
  with workdir_lib.Lease(tmp_path) as lease:
    held = json.loads((tmp_path / "LOCK").read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(workdir_lib.WorkdirLocked,
                       match=rf"in use by another run: pid {os.getpid()} on "
                             rf"{socket.gethostname()}.*--force"):
      workdir_lib.Lease(tmp_path).__enter__()
    lease.check()  # still ours
  assert not (tmp_path / "LOCK").exists()  # released on exit
  with workdir_lib.Lease(tmp_path):  # and free for the next run
    pass


def test_runs_that_start_together_get_exactly_one_lease(tmp_path):
  outcomes, start = [], threading.Barrier(4)

  def contend():
    start.wait()
    try:
      workdir_lib.Lease(tmp_path)._acquire()
      outcomes.append("won")
    except workdir_lib.WorkdirLocked:
      outcomes.append("refused")

  threads = [threading.Thread(target=contend) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(outcomes) == ["refused"] * 3 + ["won"]


def test_a_live_lease_on_another_host_blocks_until_stale(tmp_path, caplog):
  _holder(tmp_path, heartbeat=time.time() - 10)
  with pytest.raises(workdir_lib.WorkdirLocked, match="pid 1 on another-host"):
    workdir_lib.Lease(tmp_path, stale_s=60).__enter__()
  _holder(tmp_path, heartbeat=time.time() - 120)
  with workdir_lib.Lease(tmp_path, stale_s=60):
    assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
  assert "last heartbeat is 120 s old" in caplog.text


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path, caplog):
  dead = 2**22 + 12345  # above the default pid_max: no such process
  _holder(tmp_path, host=socket.gethostname(), boot_id=workdir_lib._boot_id(), pid=dead)
  with workdir_lib.Lease(tmp_path):
    pass
  assert f"its process {dead} on this host has exited" in caplog.text


def test_force_takes_over_and_the_old_holder_stops_before_saving(tmp_path):
  first = workdir_lib.Lease(tmp_path, heartbeat_s=0.05, stale_s=60).__enter__()
  with workdir_lib.Lease(tmp_path, force=True):
    deadline = time.time() + 10
    while first.lost is None and time.time() < deadline:
      time.sleep(0.05)
    with pytest.raises(workdir_lib.WorkdirLocked, match="Stopping without saving: the lease"):
      first.check()
    first.__exit__(None, None, None)  # releases nothing that is not its own
    assert (tmp_path / "LOCK").exists()


def test_the_heartbeat_advances(tmp_path):
  with workdir_lib.Lease(tmp_path, heartbeat_s=0.05, stale_s=60):
    before = json.loads((tmp_path / "LOCK").read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads((tmp_path / "LOCK").read_text())["heartbeat"] > before


def test_train_refuses_a_workdir_in_use_and_writes_nothing(fake_dataset_dir, tmp_path):
  config = small_config(fake_dataset_dir)
  with workdir_lib.Lease(tmp_path):
    with pytest.raises(workdir_lib.WorkdirLocked, match="in use by another run"):
      train.run(config, str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["file", "under_a_file", "not_writable"])
def test_bad_workdirs_are_one_clear_error(tmp_path, monkeypatch, kind):
  (tmp_path / "f").write_text("")
  workdir = {"file": tmp_path / "f", "under_a_file": tmp_path / "f" / "run",
             "not_writable": tmp_path / "ro"}[kind]
  if kind == "not_writable":  # root writes anywhere: ask the check itself
    monkeypatch.setattr(workdir_lib.os, "access", lambda *a: False)
  with pytest.raises(ValueError, match=rf"--workdir={workdir} (is a file|cannot be "
                     r"created|is not writable)"):
    workdir_lib.prepare(train.workdir_path(workdir))


def test_the_original_config_is_kept_and_changes_are_recorded(tmp_path, caplog):
  config = ml_collections.ConfigDict(dict(batch_size=8, input=dict(worker_count=0)))
  path = train.workdir_path(tmp_path)
  assert workdir_lib.save_config(path, config, 0) == path / "config.json"
  assert workdir_lib.save_config(path, config, 40) is None  # unchanged: nothing new
  config.input.worker_count = 4
  assert workdir_lib.save_config(path, config, 50) == path / "config.50.json"
  assert workdir_lib.saved_config(path)["input"]["worker_count"] == 0
  assert json.loads((tmp_path / "config.50.json").read_text())["input"]["worker_count"] == 4
  assert "differs from" in caplog.text and "input.worker_count" in caplog.text
