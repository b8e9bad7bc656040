"""The benchmarks run and print their tables (tiny sizes; figures are not checked).

Timing figures live in the benchmarks' docstrings, measured side by side in
one run; these tests only keep the scripts working. benchmarks/scaling.py
compiles a train step on four meshes and is left out (minutes even tiny).
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device, as the benchmarks are run
  proc = subprocess.run([sys.executable, str(_ROOT / "benchmarks" / script), *args],
                        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_contrastive_loss_benchmark_prints_every_ratio():
  out = _run("contrastive_loss.py", "--batch_sizes=32,64", "--dim=48", "--start=12",
             "--reps=1")
  rows = re.findall(r"^(softmax|sigmoid)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+"
                    r"([\d.]+)\s+([\d.]+)$", out, flags=re.M)
  assert [(kind, int(b)) for kind, b, *_ in rows] == [
      ("softmax", 32), ("softmax", 64), ("sigmoid", 32), ("sigmoid", 64)], out
  for kind, _, *values in rows:  # times in ms and ratios (0.1 ms rounding: not recomputed)
    assert len(values) == 5 and all(float(v) > 0 for v in values), values


def test_knn_benchmark_prints_ratios_and_agreement():
  pytest.importorskip("faiss")
  out = _run("knn.py", "--num_db=600", "--num_queries=50", "--dims=16", "--ks=1,40",
             "--start=4", "--reps=1")
  lines = [l for l in out.splitlines() if l.startswith("d=")]
  assert len(lines) == 3, out  # k = 1, k = 40 (seeded thresholds), the funnel
  for line in lines[:2]:
    assert "ours / faiss" in line and "top-k agreement at d 100.00%" in line, line
  assert "funnel / exact time" in lines[2] and "MFLOPs" in lines[2], lines[2]


def test_randaugment_benchmark_prints_both_rates_and_the_ratio():
  out = _run("randaugment.py", "--num_images=6", "--reps=1")
  rates = re.findall(r"^(base|randaug)\s+([\d.]+) img/s\s+([\d.]+) CPU-ms/img$", out, re.M)
  assert [r[0] for r in rates] == ["base", "randaug"], out
  assert re.search(r"^randaug / base throughput: [\d.]+$", out, re.M), out
