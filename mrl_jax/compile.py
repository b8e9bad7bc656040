r"""`--mode=compile`: the run's programs compiled for a TPU slice, on any host.

  python -m mrl_jax.main --config=configs/imagenet_vit_b16.py --workdir=DIR \
      --mode=compile --topology=v5e:4x4 [--num_slices=1]

libtpu compiles for a named TPU topology without a chip: its abstract
devices carry the slice's layout, a `Mesh` is laid over them as the trainer
lays it over real ones, and `jit(...).lower(abstract args).compile()` returns
the executable the slice would run. This module builds what the trainer
builds (config checks, mesh, task, optimizer, state shardings, the train
step) and the evaluation programs (the embedding step at
`config.eval_batch_size`; the exact kNN search at the dataset's database and
query sizes, when an evaluator needs it) from the config alone: dataset facts
come from a prepared copy on this host, else TFDS's catalogue, else the
config fields the error names. Each program is compiled and reported per
device: the buffer assignment (`memory_analysis`), whether it fits the chip's
HBM, FLOPs, a roofline lower bound on its time and its collectives.

FLOPs: XLA's cost analysis counts a loop body once, so a program with loops
(scanned layers, gradient accumulation, a scanned loss, the kNN search's
streamed blocks) is counted from a copy with every scan unrolled
('unrolled'), or, when that copy would be too large to compile, from its
jaxpr ('analytic': matmul / convolution FLOPs plus one per element of
arithmetic ops, loop bodies times their trip counts).

Writes `DIR/compile/report.json` (schema in docs/ARCHITECTURE.md) and prints
it as a table; raises `DoesNotFit` after writing when a program needs more
than the chip's HBM.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import jax.extend as jex
import numpy as np

from mrl_jax import evaluate
from mrl_jax import sharding
from mrl_jax import train
from mrl_jax.data import input_pipeline
from mrl_jax.data import prepare
from mrl_jax.evaluators import knn

INSTALL_HINT = "pip install -c constraints.txt '.[tpu]'  (or: pip install libtpu)"


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: int
  peak_bf16_flops: float  # per chip, per second
  hbm_bytes_per_s: float
  shapes: tuple[str, ...]  # slice shapes of the Cloud TPU accelerator types
  chip_config: str = "default"  # libtpu's: v4 runs as one "megacore" device per chip


_GIB = 1 << 30
_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8",
       "8x8x16", "8x16x16", "16x16x16")
# Per chip, from the Cloud TPU system architecture pages (cloud.google.com/tpu/docs:
# "TPU v4", "TPU v5e", "TPU v5p", "TPU v6e"): HBM capacity, peak bf16 FLOP/s,
# HBM bandwidth.
CHIPS = {
    "v4": Chip(32 * _GIB, 275e12, 1228e9, _3D, chip_config="megacore"),
    "v5e": Chip(16 * _GIB, 197e12, 819e9, _2D),
    "v5p": Chip(95 * _GIB, 459e12, 2765e9, _3D),
    "v6e": Chip(32 * _GIB, 918e12, 1640e9, _2D),
}
TOPOLOGIES = tuple(f"{chip}:{shape}" for chip, c in CHIPS.items() for shape in c.shapes)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Above this many jaxpr equations once every scan is unrolled, FLOPs are
# counted from the jaxpr instead of compiling the unrolled copy.
MAX_UNROLLED_EQNS = 50_000


class DoesNotFit(ValueError):
  """A compiled program needs more memory per device than the chip has."""


# ----------------------------------------------------------------------------
# The slice.
# ----------------------------------------------------------------------------
def topology_devices(topology: str, num_slices: int = 1) -> list:
  """libtpu's abstract devices of `num_slices` slices of `topology` ('v5e:4x4')."""
  if topology not in TOPOLOGIES:
    raise ValueError(f"--topology={topology!r} is not a known TPU topology; use one of: "
                     f"{', '.join(TOPOLOGIES)}.")
  if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
    raise ValueError(f"--num_slices={num_slices!r} must be an integer >= 1.")
  chip, shape = topology.split(":")
  dims = [int(s) for s in shape.split("x")]
  # Multi-host slices have 2x2 chips per host; v5e / v6e slices of up to 8
  # chips are a single host.
  host = (dims + [1])[:3] if chip in ("v5e", "v6e") and math.prod(dims) <= 8 else [2, 2, 1]
  host = [min(h, d) for h, d in zip(host, (dims + [1])[:3])]
  # Several processes may hold libtpu at once (tests, a second compile).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name=CHIPS[chip].chip_config,
        chips_per_host_bounds=tuple(host), num_slices=num_slices)
  except ImportError as e:
    raise RuntimeError(f"--mode=compile needs libtpu, which is not installed ({e}); "
                       f"install it with: {INSTALL_HINT}") from None
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"--mode=compile: libtpu could not describe {topology!r} ({e}); "
                       f"reinstall it with: {INSTALL_HINT}") from None
  return list(desc.devices)


def chip_of(topology: str) -> Chip:
  return CHIPS[topology.split(":")[0]]


# ----------------------------------------------------------------------------
# Dataset facts without the dataset.
# ----------------------------------------------------------------------------
def dataset_facts(config) -> prepare.DatasetSummary:
  """What the trainer reads from a prepared dataset, from this host's copy if
  there is one, else TFDS's catalogue and the config."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  ds = config.dataset
  try:
    builder = tfds.builder(ds.name, data_dir=ds.get("data_dir"))
    prepared = builder.is_prepared()
  except tfds.core.registered.DatasetNotFoundError:
    builder, prepared = None, False
  except Exception:  # pylint: disable=broad-except  (e.g. an unreachable gs:// data_dir)
    builder, prepared = tfds.builder(ds.name), False
  if prepared:
    return prepare.check_config(config)
  features = builder.info.features if builder is not None else {}
  missing = []
  splits = {"config.dataset.train_split": ds.train_split}
  if ds.get("eval_split"):
    splits["config.dataset.eval_split"] = ds.eval_split
  declared = dict(ds.get("num_examples") or {})
  num_examples = {}
  for field, split in splits.items():
    n = declared.get(split)
    if n is None and builder is not None and split in builder.info.splits:
      n = builder.info.splits[split].num_examples or None
    if n is None:
      missing.append(f"config.dataset.num_examples.{split} (examples in {field}={split!r})")
    else:
      num_examples[split] = int(n)
  image_key = ds.get("image_key", "image")
  shape = tuple(features[image_key].shape) if image_key in features else ()
  channels = config.input.get("channels") or (shape[-1] if len(shape) == 3 else None)
  if not channels:
    missing.append("config.input.channels (image channels, e.g. 3)")
  label_key = ds.get("label_key")
  label = features[label_key] if label_key and label_key in features else None
  num_classes = getattr(label, "num_classes", None)
  if missing:
    example = {s: "N" for s in splits.values()}
    raise ValueError(
        f"--mode=compile: config.dataset.name={ds.name!r} is not prepared on this host and "
        f"the TFDS catalogue does not record {', '.join(missing)}. Fix: set them in the "
        f"config (config.dataset.num_examples = {example}, config.input.channels = C), "
        "or on the command line where the config has them: "
        + " ".join(f"--{m.split(' ')[0]}=..." for m in missing) + ".")
  return prepare.DatasetSummary(
      name=ds.name, path="", num_examples=num_examples,
      image_shape=(*shape[:2], channels) if len(shape) == 3 else (None, None, channels),
      num_classes=num_classes, class_names=tuple(getattr(label, "names", ())) or None)


def vocab_size(config) -> int | None:
  """The text tower's vocabulary size: from config.text.vocab_path when it can
  be read here, else config.text.vocab_size."""
  if not config.dataset.get("text_key"):
    return None
  text = config.get("text") or {}
  path = text.get("vocab_path")
  try:
    readable = bool(path) and epath.Path(path).exists()
  except Exception:  # pylint: disable=broad-except  (e.g. gs:// without credentials)
    readable = False
  if readable:
    return input_pipeline.load_tokenizer(config).vocab_size
  if text.get("vocab_size"):
    return int(text.vocab_size)
  raise ValueError(
      f"--mode=compile: the text tower's vocabulary size is unknown: "
      f"config.text.vocab_path={path!r} cannot be read here and config.text.vocab_size "
      "is not set. Fix: --config.text.vocab_size=30522 (BERT uncased) or a readable "
      "--config.text.vocab_path.")


# ----------------------------------------------------------------------------
# One program: compile, measure.
# ----------------------------------------------------------------------------
def _unrolled(jaxpr):
  """`jaxpr` with every scan fully unrolled (sub-jaxprs included)."""
  def sub(v):
    if isinstance(v, jex.core.ClosedJaxpr):
      return v.replace(jaxpr=_unrolled(v.jaxpr))
    if isinstance(v, jex.core.Jaxpr):
      return _unrolled(v)
    if isinstance(v, tuple) and v and isinstance(v[0], (jex.core.ClosedJaxpr, jex.core.Jaxpr)):
      return tuple(sub(x) for x in v)
    return v
  eqns = []
  for eqn in jaxpr.eqns:
    params = {k: sub(v) for k, v in eqn.params.items()}
    if eqn.primitive.name == "scan":
      params["unroll"] = params["length"]
    eqns.append(eqn.replace(params=params))
  return jaxpr.replace(eqns=eqns)


def _subjaxprs(eqn):
  for v in eqn.params.values():
    for x in (v if isinstance(v, tuple) else (v,)):
      if isinstance(x, jex.core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jex.core.Jaxpr):
        yield x


def _trips(eqn) -> int:
  """Times a sub-jaxpr of `eqn` runs: a scan's length, a Pallas kernel's grid."""
  if eqn.primitive.name == "scan":
    return eqn.params["length"]
  if eqn.primitive.name == "pallas_call":
    return math.prod(eqn.params["grid_mapping"].grid)
  return 1


def unrolled_size(jaxpr) -> int:
  """Equations `jaxpr` has once every scan is unrolled."""
  return sum(1 if e.primitive.name == "pallas_call"  # one custom call
             else max(1, _trips(e) * sum(unrolled_size(j) for j in _subjaxprs(e)))
             for e in jaxpr.eqns)


# XLA counts these as transcendentals, not FLOPs; conversions and data
# movement are free.
_ARITHMETIC = frozenset(
    "add sub mul div rem max min neg abs sign floor ceil round select_n clamp eq ne lt le "
    "gt ge and or not xor integer_pow square pow add_any nextafter".split())
_REDUCTIONS = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or "
                        "argmax argmin cumsum cummax cummin cumprod cumlogsumexp".split())


def analytic_flops(jaxpr, num_devices: int, *, per_device: bool = False) -> float:
  """FLOPs per device of `jaxpr`, loop bodies times their trip counts.

  Matmuls and convolutions count 2 per multiply-add, arithmetic ops one per
  output element, reductions one per input element (as XLA's cost analysis
  does). Work outside a `shard_map` is split evenly over `num_devices`; inside
  one it is per device already. A Pallas kernel counts its body once per grid
  step; of a `cond`'s branches (`lax.platform_dependent` too) the costliest.
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    out = sum(math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      flops = 2.0 * out * math.prod(lhs[i] for i in contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      flops = 2.0 * out * math.prod(rhs) / out_features
    elif name in _ARITHMETIC:
      flops = float(out)
    elif name in _REDUCTIONS:
      flops = float(sum(math.prod(v.aval.shape) for v in eqn.invars if hasattr(v, "aval")))
    elif name == "cond":
      flops = max(analytic_flops(j, num_devices, per_device=True) for j in _subjaxprs(eqn))
    else:
      inner = per_device or name == "shard_map"
      flops = _trips(eqn) * sum(analytic_flops(j, num_devices, per_device=inner)
                                for j in _subjaxprs(eqn))
      total += flops
      continue
    total += flops if per_device else flops / num_devices
  return total


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Instructions of each collective kind in compiled HLO (async pairs once)."""
  return {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo_text)) for op in COLLECTIVES}


def dcn_transfers(hlo_text: str) -> dict[str, int]:
  """Collective pieces that cross slices (DCN), by kind, in compiled multislice HLO.

  libtpu compiles a multislice program per slice: its collectives'
  replica groups hold one slice's chips (ICI), and what crosses slices is a
  host transfer to the multislice runtime whose attributes name the
  collective (ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, ...). Each send is one
  piece. Empty for a single slice.
  """
  kinds = re.findall(r"\ssend\([^\n]*_xla_megascale_transfer_type=\"(\w+)\"", hlo_text)
  return dict(sorted(collections.Counter(kinds).items()))


def replica_groups(hlo_text: str) -> list[tuple[str, list[list[int]]]]:
  """(collective, its groups of device ids) for each collective in compiled HLO.

  Reads both forms XLA prints: explicit `{{0,1},{2,3}}` and iota
  `[2,2]<=[4]` / `[2,2]<=[2,2]T(1,0)` (arange over the dims, transposed,
  reshaped to [groups, size]).
  """
  out = []
  ops = "|".join(COLLECTIVES)
  for line in hlo_text.splitlines():
    op = re.search(rf"\s({ops})(?:-start)?\(", line)
    found = re.search(r"replica_groups=(\{[\d,{}]*\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)",
                      line)
    if not (op and found):
      continue
    text = found.group(1)
    if text.startswith("{"):
      groups = [[int(i) for i in g.split(",") if i]
                for g in re.findall(r"\{([\d,]*)\}", text[1:-1])]
    else:
      shape, dims, perm = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?",
                                       text).groups()
      ints = lambda t: [int(i) for i in t.split(",")]  # noqa: E731
      ids = np.arange(math.prod(ints(dims))).reshape(ints(dims))
      if perm:
        ids = ids.transpose(ints(perm))
      groups = ids.reshape(ints(shape)).tolist()
    out.append((op.group(1), groups))
  return out


def _has_loops(hlo_text: str) -> bool:
  return re.search(r"\swhile\(", hlo_text) is not None


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def measure(fn: Callable, args, mesh, chip: Chip) -> dict[str, Any]:
  """Compiles `fn(*args)` (abstract args) under `mesh` and reports it."""
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = fn.lower(*args)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      return _out_of_memory(str(e), fn, args, lowered, mesh, chip,
                            time.perf_counter() - t0)
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  cost = _cost(compiled)
  xla_flops, xla_bytes = cost.get("flops", 0.0), cost.get("bytes accessed")
  flops, nbytes, method = xla_flops, xla_bytes, "xla"
  if _has_loops(hlo):  # XLA counted each loop body once
    with jax.set_mesh(mesh):
      closed = jax.make_jaxpr(fn)(*args)
    unrolled = None
    if unrolled_size(closed.jaxpr) <= MAX_UNROLLED_EQNS:
      flat = jex.core.jaxpr_as_fun(closed.replace(jaxpr=_unrolled(closed.jaxpr)))
      try:
        with jax.set_mesh(mesh):
          unrolled = jax.jit(flat).lower(*jax.tree.leaves(args)).compile()
      except jax.errors.JaxRuntimeError as e:  # unrolled, it may need more HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
    if unrolled is not None and not _has_loops(unrolled.as_text()):
      cost = _cost(unrolled)
      flops, nbytes, method = cost.get("flops", 0.0), cost.get("bytes accessed"), "unrolled"
    else:  # too large to compile unrolled, or loops that are not scans
      flops, nbytes, method = analytic_flops(closed.jaxpr, mesh.devices.size), None, "analytic"
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  compute_s = flops / chip.peak_bf16_flops
  memory_s = nbytes / chip.hbm_bytes_per_s if nbytes is not None else 0.0
  bound = max(compute_s, memory_s)
  return {
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "alias_bytes": int(mem.alias_size_in_bytes),
      "peak_bytes": int(peak),
      "fits": bool(peak <= chip.hbm_bytes),
      "flops_per_device": float(flops),
      "flops_method": method,
      "bytes_accessed": None if nbytes is None else float(nbytes),
      "step_time_lower_bound_s": bound,
      # The best MFU the roofline allows: < 1 when XLA's bytes estimate says
      # the program is memory-bound.
      "mfu_ceiling": compute_s / bound if bound > 0 and nbytes is not None else None,
      # XLA's own counts of the compiled program (loop bodies once).
      "xla_flops": float(xla_flops),
      "xla_bytes_accessed": None if xla_bytes is None else float(xla_bytes),
      "collectives": count_collectives(hlo),
      "dcn_transfers": dcn_transfers(hlo),
      "compile_seconds": round(seconds, 2),
  }


def _shard_bytes(tree, num_devices: int) -> int:
  """Bytes per device of abstract arrays (split evenly where no sharding is known)."""
  def one(x):
    size = np.dtype(x.dtype).itemsize
    if getattr(x, "sharding", None) is None:
      return math.prod(x.shape) * size // num_devices
    return math.prod(x.sharding.shard_shape(x.shape)) * size
  return sum(one(x) for x in jax.tree.leaves(tree))


def _out_of_memory(message, fn, args, lowered, mesh, chip, seconds) -> dict[str, Any]:
  """The report of a program the TPU compiler refused for lack of HBM.

  The compiler stops before a buffer assignment exists, so temp bytes are
  the ones its message names, arguments and outputs their unpadded shard
  sizes (no aliasing assumed: the peak is an upper estimate), and FLOPs are
  counted from the jaxpr.
  """
  match = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
  temp = int(float(match.group(1)) * 1024 ** ("KMGT".index(match.group(2)) + 1)) if match else 0
  n = mesh.devices.size
  arg, out = _shard_bytes(args, n), _shard_bytes(lowered.out_info, n)
  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  flops = analytic_flops(jaxpr, n)
  return {
      "argument_bytes": arg, "output_bytes": out, "temp_bytes": temp, "alias_bytes": 0,
      "peak_bytes": arg + out + temp, "fits": False, "flops_per_device": flops,
      "flops_method": "analytic", "bytes_accessed": None,
      "step_time_lower_bound_s": flops / chip.peak_bf16_flops, "mfu_ceiling": None,
      "collectives": dict.fromkeys(COLLECTIVES, 0), "dcn_transfers": {},
      "compile_seconds": round(seconds, 2),
      "compiler_error": message.strip().splitlines()[0],
  }


# ----------------------------------------------------------------------------
# The run's programs.
# ----------------------------------------------------------------------------
def _abstract(spec: dict, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
          for k, (shape, dtype) in spec.items()}


def programs(config, s: train.Setup) -> dict[str, tuple[Callable, tuple, Any]]:
  """{name: (jitted fn, abstract args, mesh)} of everything a run compiles."""
  facts, mesh, task, tx = s.facts, s.mesh, s.task, s.tx
  state, state_sharding = s.abstract_state, s.state_sharding
  batch_sharding = sharding.batch_sharding(mesh)
  channels = facts["dataset"].image_shape[-1]
  out = {"train_step": (
      train.make_train_step(config, facts, task, tx, mesh, state_sharding),
      (state, _abstract(input_pipeline.train_batch_spec(config, channels), batch_sharding)),
      mesh)}
  eval_batch = config.get("eval_batch_size", config.batch_size)
  with_text = evaluate.embeds_captions(config)
  batch = _abstract(input_pipeline.eval_batch_spec(config, channels, eval_batch,
                                                   with_text=with_text), batch_sharding)
  out["embed_step"] = (evaluate.make_embed_step(task, with_logits=True),
                       (state["params"], state["rest"], batch["image"]), mesh)
  if with_text:
    out["embed_text_step"] = (evaluate.make_embed_text_step(task),
                              (state["params"], state["rest"], batch["text"]), mesh)
  k = evaluate.num_neighbours(evaluate.check_evals(config, facts))
  if k:
    num = facts["dataset"].num_examples
    dims = knn.eval_dims(facts["nesting_dims"])
    search_mesh = knn.default_mesh(mesh.devices.flat)
    plan = knn.search_plan(num[config.dataset.eval_split], num[config.dataset.train_split],
                           len(dims), k, search_mesh.devices.size, platform="tpu")
    out["knn_search"] = (*knn.search_program(search_mesh, facts["nesting_dims"][-1], dims,
                                             k, plan), search_mesh)
  return out


def _fixes(config, name: str, num_slices: int = 1) -> list[str]:
  """The config changes that lower `name`'s memory per device."""
  if name == "knn_search":
    return ["the kNN search holds the whole train split's embeddings on every device: "
            "search a slice of it (--config.dataset.train_split='train[:50%]') or drop the "
            "kNN-based evaluators from config.evals"]
  fixes = []
  if config.mesh.get("fsdp", 1) == 1:  # on several slices, 'data' spans them (DCN)
    fixes.append(f"--config.mesh.data={num_slices} --config.mesh.fsdp=-1 (parameters and "
                 "optimizer state split over the chips" + (" of each slice)" if num_slices > 1
                                                           else ")"))
  towers = (("model.image", config.model.image), ("model.text", config.model.text)) if (
      config.model.name == "dual_encoder") else (("model", config.model),)
  for where, m in towers:
    if not m.get("remat", False):
      fixes.append(f"--config.{where}.remat=True (recompute activations in the backward)")
  if name == "train_step":
    fixes.append(f"--config.grad_accum_steps={2 * config.get('grad_accum_steps', 1)} "
                 "(microbatches; a contrastive loss then sees fewer pairs at a time)")
    fixes.append(f"a smaller --config.batch_size (now {config.batch_size})")
  else:
    fixes.append("a smaller --config.eval_batch_size (now "
                 f"{config.get('eval_batch_size', config.batch_size)})")
  return fixes


def compile_report(config, topology: str, num_slices: int = 1) -> dict[str, Any]:
  """Compiles the run of `config` for `num_slices` x `topology`; returns the report."""
  devices = topology_devices(topology, num_slices)
  chip = chip_of(topology)
  num_hosts = len({d.process_index for d in devices})  # global across slices
  s = train.setup(config, devices=devices, dataset=dataset_facts(config),
                  vocab_size=vocab_size(config), process_count=num_hosts)
  mesh = s.mesh
  report = {"topology": topology, "num_slices": num_slices, "num_devices": len(devices),
            "chip": topology.split(":")[0], "hbm_bytes": chip.hbm_bytes,
            "config": config.get("name", ""), "mesh": dict(mesh.shape),
            "num_hosts": num_hosts, "programs": {}}
  for name, (fn, args, program_mesh) in programs(config, s).items():
    logging.info("Compiling %s for %s x %d", name, topology, num_slices)
    report["programs"][name] = measure(fn, args, program_mesh, chip)
  return report


def run(config, workdir, *, topology: str, num_slices: int = 1) -> dict[str, Any]:
  """`compile_report`, written to WORKDIR/compile/report.json and printed;
  raises `DoesNotFit` (after writing) when a program needs more than the HBM."""
  report = compile_report(config, topology, num_slices)
  chip = chip_of(topology)
  outdir = epath.Path(workdir) / "compile"
  outdir.mkdir(parents=True, exist_ok=True)
  (outdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  print(format_report(report))
  too_big = [n for n, p in report["programs"].items() if not p["fits"]]
  if too_big:
    raise DoesNotFit(
        f"{' and '.join(too_big)} {'does' if len(too_big) == 1 else 'do'} not fit the "
        f"{chip.hbm_bytes / _GIB:.0f} GiB of HBM of a {report['chip']} chip (report: "
        f"{outdir / 'report.json'}). Fixes that apply: "
        + "; ".join(dict.fromkeys(f for n in too_big
                                  for f in _fixes(config, n, report["num_slices"]))) + ".")
  return report


def format_report(report: dict[str, Any]) -> str:
  """The report as a table: one row per program."""
  gb = 1e9
  head = (f"{report.get('config', '')} on {report['topology']} x {report['num_slices']} "
          f"({report['num_devices']} devices, mesh {report.get('mesh')}, "
          f"{report['hbm_bytes'] / _GIB:.0f} GiB HBM per chip); per device:")
  rows = [("program", "args GB", "out GB", "temp GB", "peak GB", "fits", "GFLOP", "flops by",
           "bound ms", "MFU max", "collectives")]
  for name, p in report["programs"].items():
    coll = " ".join(f"{k}:{v}" for k, v in p["collectives"].items() if v) or "-"
    if p.get("dcn_transfers"):
      coll += " | across slices: " + " ".join(
          f"{k.lower().replace('_', '-')}:{v}" for k, v in p["dcn_transfers"].items())
    rows.append((name, f"{p['argument_bytes'] / gb:.3f}", f"{p['output_bytes'] / gb:.3f}",
                 f"{p['temp_bytes'] / gb:.3f}", f"{p['peak_bytes'] / gb:.3f}",
                 "yes" if p["fits"] else "NO", f"{p['flops_per_device'] / 1e9:.1f}",
                 p["flops_method"], f"{1e3 * p['step_time_lower_bound_s']:.2f}",
                 "-" if p.get("mfu_ceiling") is None else f"{p['mfu_ceiling']:.2f}", coll))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  return "\n".join([head, *lines])


def load_report(workdir) -> dict[str, Any]:
  return json.loads((epath.Path(workdir) / "compile" / "report.json").read_text())

