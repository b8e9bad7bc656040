"""The CLI's backend choice: the CPU where nothing else can be found."""
import jax

from mrl_jax import main


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
