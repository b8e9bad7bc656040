"""--mode=compile: the run's programs compiled for real TPU topologies by libtpu.

Tiny models on small slices (v5e:2x2): seconds per program on a CPU host.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="--mode=compile needs libtpu: pip install "
                    "-c constraints.txt '.[tpu]'")

from configs import fashion_mnist_align  # noqa: E402
from configs import fashion_mnist_vit  # noqa: E402
from mrl_jax import compile as compile_lib  # noqa: E402
from mrl_jax import contrastive  # noqa: E402
from mrl_jax import sharding  # noqa: E402
from mrl_jax import train  # noqa: E402
from mrl_jax.data import input_pipeline  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes", "fits",
          "flops_per_device", "flops_method", "step_time_lower_bound_s", "collectives"}


def tiny_vit(**overrides):
  """The demo config with a 2-block ViT: a train step compiles in a few seconds."""
  config = fashion_mnist_vit.get_config("mrl")
  config.model.variant = "Mu/7"
  config.model.representation_size = 32
  config.mrl.nesting_dims = (8, 16, 32)
  config.batch_size = 64
  config.eval_batch_size = 64
  config.update_from_flattened_dict(overrides)
  return config


def test_demo_config_report(tmp_path):
  """The shipped demo config as it is: every program, every field, sane values."""
  config = fashion_mnist_vit.get_config("mrl")
  report = compile_lib.run(config, tmp_path, topology="v5e:2x2")
  assert json.loads((tmp_path / "compile" / "report.json").read_text()) == report
  assert report["topology"] == "v5e:2x2" and report["num_slices"] == 1
  assert report["num_devices"] == 4 and report["chip"] == "v5e"
  assert report["hbm_bytes"] == 16 * 2**30
  assert set(report["programs"]) == {"train_step", "embed_step", "knn_search"}
  for name, p in report["programs"].items():
    assert FIELDS <= set(p), name
    assert p["peak_bytes"] == (p["argument_bytes"] + p["output_bytes"] + p["temp_bytes"]
                               - p["alias_bytes"]) > 0
    assert p["fits"] and p["flops_per_device"] > 0 and p["step_time_lower_bound_s"] > 0
    assert set(p["collectives"]) == set(compile_lib.COLLECTIVES)
  train_step = report["programs"]["train_step"]
  assert train_step["flops_method"] == "xla"
  # Data parallel: gradients are summed over the 4 chips; the donated state aliases.
  assert train_step["collectives"]["all-reduce"] >= 1
  assert train_step["alias_bytes"] > 0
  # The kNN search streams the database in a loop: counted from the jaxpr.
  assert report["programs"]["knn_search"]["flops_method"] == "analytic"


def test_dual_encoder_report(tmp_path):
  config = fashion_mnist_align.get_config("smoke")
  config.model.image.variant = "Mu/7"
  config.model.text.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  report = compile_lib.run(config, tmp_path, topology="v5e:2x2")
  assert {"train_step", "embed_step", "embed_text_step"} <= set(report["programs"])
  assert all(p["fits"] for p in report["programs"].values())


def _mlp_step(mesh, batch, widths):
  """An SGD step of a plain tanh MLP, and its abstract arguments."""
  params = [jax.ShapeDtypeStruct((a, b), jnp.float32,
                                 sharding=sharding.replicated(mesh))
            for a, b in zip(widths, widths[1:])]
  x = jax.ShapeDtypeStruct((batch, widths[0]), jnp.float32,
                           sharding=sharding.batch_sharding(mesh))

  def loss(ws, x):
    for w in ws:
      x = jnp.tanh(x @ w)
    return jnp.mean(x ** 2)

  @jax.jit
  def step(ws, x):
    grads = jax.grad(loss)(ws, x)
    return [w - 0.1 * g for w, g in zip(ws, grads)]
  return step, (params, x)


def test_mlp_flops_equal_the_analytic_count():
  """2 FLOPs per multiply-add; per layer 1 product forward, 2 backward (the
  input's gradient and the weight's), except the first layer's input."""
  devices = compile_lib.topology_devices("v5e:2x2")
  mesh = sharding.create_mesh({"data": -1}, devices)
  batch, widths = 1024, (512, 1024, 1024, 256)
  step, args = _mlp_step(mesh, batch, widths)
  got = compile_lib.measure(step, args, mesh, compile_lib.CHIPS["v5e"])
  matmuls = sum(a * b for a, b in zip(widths, widths[1:]))
  expected = (6 * batch * matmuls - 2 * batch * widths[0] * widths[1]) / len(devices)
  assert got["flops_method"] == "xla"
  assert got["flops_per_device"] == pytest.approx(expected, rel=0.02)
  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(step)(*args).jaxpr
  assert compile_lib.analytic_flops(jaxpr, len(devices)) == pytest.approx(expected, rel=0.02)


def test_loops_are_counted_unrolled_or_analytically(monkeypatch):
  """A 10-trip loop: XLA alone would report 1/10 of the FLOPs."""
  devices = compile_lib.topology_devices("v5e:2x2")
  mesh = sharding.create_mesh({"data": -1}, devices)
  w = jax.ShapeDtypeStruct((512, 512), jnp.float32, sharding=sharding.replicated(mesh))
  x = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=sharding.batch_sharding(mesh))
  f = jax.jit(lambda x, w: jax.lax.fori_loop(0, 10, lambda i, c: c @ w, x))
  expected = 10 * 2 * 1024 * 512 * 512 / 4
  got = compile_lib.measure(f, (x, w), mesh, compile_lib.CHIPS["v5e"])
  assert got["flops_method"] == "unrolled"
  assert got["flops_per_device"] == pytest.approx(expected, rel=0.01)
  monkeypatch.setattr(compile_lib, "MAX_UNROLLED_EQNS", 0)
  got = compile_lib.measure(f, (x, w), mesh, compile_lib.CHIPS["v5e"])
  assert got["flops_method"] == "analytic"
  assert got["flops_per_device"] == pytest.approx(expected, rel=0.01)


def _train_step_report(config, topology="v5e:2x2"):
  s = train.setup(config, devices=compile_lib.topology_devices(topology),
                  dataset=compile_lib.dataset_facts(config), process_count=1)
  fn, args, m = compile_lib.programs(config, s)["train_step"]
  return compile_lib.measure(fn, args, m, compile_lib.CHIPS[topology.split(":")[0]])


def test_scan_layers_reports_the_flops_of_the_unrolled_model():
  loop = _train_step_report(tiny_vit())
  scan = _train_step_report(tiny_vit(**{"model.scan_layers": True}))
  assert loop["flops_method"] == "xla" and scan["flops_method"] == "unrolled"
  assert scan["flops_per_device"] == pytest.approx(loop["flops_per_device"], rel=0.01)
  # Two microbatches of 32 cost what one batch of 64 does.
  accum = _train_step_report(tiny_vit(**{"grad_accum_steps": 2}))
  assert accum["flops_method"] == "unrolled"
  assert accum["flops_per_device"] == pytest.approx(loop["flops_per_device"], rel=0.01)


def test_multislice_data_parallel_over_slices():
  devices = compile_lib.topology_devices("v5e:2x2", num_slices=2)
  assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
  mesh = sharding.create_mesh({"data": 2, "fsdp": -1}, devices)
  # The 'data' axis spans the slices: each fsdp group lies inside one slice.
  for row in mesh.devices.reshape(2, 4):
    assert len({d.slice_index for d in row}) == 1
  with pytest.raises(ValueError, match="multiple of the slices"):
    sharding.create_mesh({"data": 1, "fsdp": -1}, devices)
  with pytest.raises(ValueError, match="spans 4 slices"):
    sharding.create_mesh({"data": 8}, devices, {"data": 4})
  # config.mesh_dcn puts another axis across the slices instead.
  mesh = sharding.create_mesh({"data": 1, "fsdp": -1}, devices, {"data": 1, "fsdp": 2})
  for column in mesh.devices.reshape(2, 4).T:
    assert [d.slice_index for d in column] == [0, 1]


@pytest.mark.parametrize("mesh, dcn", [({"data": 2, "fsdp": -1}, None),
                                       ({"data": 1, "fsdp": -1}, {"data": 1, "fsdp": 2})],
                         ids=["dp_x_fsdp", "fsdp_over_dcn"])
def test_two_slice_train_step_crosses_slices_only_to_reduce_gradients(mesh, dcn):
  """The ViT train step compiled for 2 x v5e:2x2, read from its HLO.

  libtpu compiles per slice: every collective's replica groups hold one
  slice's 4 chips, and what crosses the slices (DCN) is listed apart
  (`dcn_transfers`). With 'data' across the slices only the gradient and
  metric reductions of data parallelism cross; putting FSDP across them
  instead (the layout to avoid) all-gathers parameters over DCN, which the
  same check sees.
  """
  overrides = {f"mesh.{k}": v for k, v in mesh.items()}
  overrides.update({f"mesh_dcn.{k}": v for k, v in (dcn or {}).items()})
  config = tiny_vit(**overrides)
  s = train.setup(config, devices=compile_lib.topology_devices("v5e:2x2", num_slices=2),
                  dataset=compile_lib.dataset_facts(config), process_count=2)
  step, args, program_mesh = compile_lib.programs(config, s)["train_step"]
  with jax.set_mesh(program_mesh):
    hlo = step.lower(*args).compile().as_text()
  groups = compile_lib.replica_groups(hlo)
  assert groups and all(i in range(4) for _, gs in groups for g in gs for i in g)
  dcn_kinds = compile_lib.dcn_transfers(hlo)
  if dcn is None:
    assert set(dcn_kinds) <= {"ALL_REDUCE", "REDUCE_SCATTER"} and dcn_kinds
  else:
    assert dcn_kinds.get("ALL_GATHER", 0) > 0


def test_replica_groups_reads_explicit_and_iota_forms():
  hlo = ("  %a = f32[4] all-reduce(%x), replica_groups={{0,2},{1,3}}, to_apply=%add\n"
         "  %b = f32[8] all-gather-start(%y), replica_groups=[2,2]<=[4], dimensions={0}\n"
         "  %c = f32[8] reduce-scatter(%z), replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}\n"
         "  %d = f32[8] add(%z, %z)\n")
  assert compile_lib.replica_groups(hlo) == [
      ("all-reduce", [[0, 2], [1, 3]]), ("all-gather", [[0, 1], [2, 3]]),
      ("reduce-scatter", [[0, 2], [1, 3]])]


def test_fsdp_splits_parameters_and_optimizer_state():
  """From the compiled executables: argument bytes of params + optimizer state / 4.

  Widths are multiples of 128, so that TPU memory tiles are full on every
  shard (a 64-wide shard would be padded to 128 and blur the ratio).
  """
  tpu_shapes = {"model.width": 256, "model.depth": 2, "model.mlp_dim": 1024,
                "model.num_heads": 2, "dataset.num_classes": 1024,
                "model.representation_size": 256, "mrl.nesting_dims": (64, 128, 256)}
  state_bytes = {}
  for name, mesh in (("dp", {}), ("fsdp", {"mesh.data": 1, "mesh.fsdp": -1})):
    config = tiny_vit(**tpu_shapes, **mesh)
    s = train.setup(config, devices=compile_lib.topology_devices("v5e:2x2"),
                    dataset=compile_lib.dataset_facts(config), process_count=1)
    mesh = s.mesh
    step, (state, batch), _ = compile_lib.programs(config, s)["train_step"]
    chip = compile_lib.CHIPS["v5e"]
    batch_only = compile_lib.measure(jax.jit(lambda b: jax.tree.map(jnp.sum, b)), (batch,),
                                     mesh, chip)
    got = compile_lib.measure(step, (state, batch), mesh, chip)
    state_bytes[name] = got["argument_bytes"] - batch_only["argument_bytes"]
    if name == "fsdp":  # parameters are gathered where they are used
      assert got["collectives"]["all-gather"] > 0
  assert state_bytes["fsdp"] == pytest.approx(state_bytes["dp"] / 4, rel=0.03)


def test_a_config_that_cannot_fit_exits_non_zero_with_the_fixes(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "mrl_jax.main", "--config=configs/fashion_mnist_vit.py",
       f"--workdir={tmp_path}", "--mode=compile", "--topology=v5e:2x2",
       "--config.model.variant=Mu/7", "--config.batch_size=2097152"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode != 0, out.stderr[-2000:]
  report = json.loads((tmp_path / "compile" / "report.json").read_text())
  assert not report["programs"]["train_step"]["fits"]
  assert "train_step" in out.stderr and "--config.mesh.fsdp=-1" in out.stderr
  assert "--config.model.remat=True" in out.stderr and "grad_accum_steps" in out.stderr


def test_bad_input():
  with pytest.raises(ValueError, match="v5e:4x4"):  # the list of known topologies
    compile_lib.topology_devices("v5e:3x3")
  with pytest.raises(ValueError, match="num_slices"):
    compile_lib.topology_devices("v5e:2x2", 0)
  devices = compile_lib.topology_devices("v5e:2x2")
  with pytest.raises(ValueError, match="has 8 devices but 4 are available"):
    sharding.create_mesh({"data": 8}, devices)
  config = tiny_vit()
  config.dataset.num_examples = {"train": 60_000}  # no eval split size
  config.dataset.name = "no_such_dataset_anywhere"
  with pytest.raises(ValueError, match=r"config\.dataset\.num_examples\.test.*config\.input"
                                       r"\.channels"):
    compile_lib.dataset_facts(config)


def test_missing_libtpu_is_one_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # import fails
  with pytest.raises(RuntimeError, match=r"needs libtpu.*pip install"):
    compile_lib.topology_devices("v5e:2x2")


def test_train_batch_spec_matches_the_loader(fake_dataset_dir):
  from tests import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config(fake_dataset_dir)
  batch = next(iter(input_pipeline.create_train_loader(config)))
  spec = input_pipeline.train_batch_spec(config, channels=1)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items()}
  evals = next(iter(input_pipeline.create_eval_iterator(config, "test", 32)))
  spec = input_pipeline.eval_batch_spec(config, 1, 32)
  assert {k: (v.shape, v.dtype) for k, v in evals.items()} == {
      k: (shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items()}


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_contrastive_loss_is_a_ring_of_pallas_kernels_on_tpu(kind):
  """On a TPU the nested loss runs `contrastive_kernels` in a ring over the
  batch shards: no all-gather, no [M, b, B] logits in HBM, and FLOPs of four
  b x B x d products per device (the gradient recomputes the forward's)."""
  devices = compile_lib.topology_devices("v5e:2x2")
  mesh = sharding.create_mesh({"data": -1}, devices)
  batch, d, dims = 1024, 64, (8, 16, 32, 64)
  emb = jax.ShapeDtypeStruct((batch, d), jnp.float32, sharding=sharding.batch_sharding(mesh))
  kw = dict(temperature=0.1) if kind == "softmax" else dict(temperature=0.1, bias=-10.0)
  step = jax.jit(jax.value_and_grad(
      lambda x, y: contrastive.contrastive(x, y, dims, kind=kind, **kw), argnums=(0, 1)))
  got = compile_lib.measure(step, (emb, emb), mesh, compile_lib.CHIPS["v5e"])
  with jax.set_mesh(mesh):
    hlo = step.lower(emb, emb).compile().as_text()
  assert "tpu_custom_call" in hlo
  assert got["collectives"]["all-gather"] == 0 and got["collectives"]["collective-permute"] > 0
  local = batch // len(devices)
  assert got["temp_bytes"] < len(dims) * local * batch * 4
  products = 4 * 2 * local * batch * d
  assert got["flops_method"] == "unrolled"
  assert products < got["flops_per_device"] < 1.3 * products  # + elementwise work
