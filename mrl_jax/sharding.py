"""Device mesh and shardings.

One mesh with axes ('data', 'fsdp', 'tensor') covers data parallel, FSDP and
tensor parallel; its sizes come from `config.mesh` with -1 meaning "all the
devices left". Batches are split over ('data', 'fsdp').
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves `config.mesh` (-1 = the rest) into sizes for MESH_AXES."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(
        f"config.mesh has unknown axes {sorted(unknown)}; the mesh axes are "
        f"{MESH_AXES}. Fix: use only these keys, e.g. "
        "--config.mesh.data=-1 --config.mesh.fsdp=1 --config.mesh.tensor=1.")
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(
        f"config.mesh={dict(zip(MESH_AXES, sizes))} has more than one -1; "
        "only one axis can take 'the rest of the devices'.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(
        f"config.mesh={dict(zip(MESH_AXES, sizes))}: sizes must be positive "
        "or -1 (= the rest of the devices).")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"config.mesh={dict(zip(MESH_AXES, sizes))}: the fixed axes use "
          f"{known} devices, which does not divide the {num_devices} devices "
          "available. Fix: choose axis sizes whose product divides the "
          "device count.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh={dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} "
        f"devices but {num_devices} are available. Fix: make the product of "
        "the axis sizes equal the device count, or set one axis to -1.")
  return tuple(sizes)


def create_mesh(mesh_config: Mapping[str, int], devices=None,
                dcn_config: Mapping[str, int] | None = None) -> jax.sharding.Mesh:
  """The mesh of `config.mesh` over `devices` (default: all).

  On several TPU slices (multislice) the slices are linked by the data-center
  network (DCN), much slower than the links inside a slice (ICI).
  `dcn_config` (`config.mesh_dcn`) says how many slices each axis spans;
  the default puts 'data' across all slices, so only the gradient reduction
  of data parallelism crosses DCN while FSDP's all-gathers and tensor
  parallelism stay inside a slice. Each axis' size in `config.mesh` is its
  total: `dcn x ici`.
  """
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1 and not dcn_config:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  dcn = dcn_shape(dcn_config, slices)
  bad = [a for a, n, d in zip(MESH_AXES, shape, dcn) if n % d]
  if bad:
    raise ValueError(
        f"config.mesh={dict(zip(MESH_AXES, shape))} on {slices} slices with "
        f"config.mesh_dcn={dict(zip(MESH_AXES, dcn))}: the size of {bad} is not a "
        "multiple of the slices it spans. Fix: e.g. "
        f"--config.mesh.data={slices} --config.mesh.fsdp=-1.")
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  ici = tuple(n // d for n, d in zip(shape, dcn))
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def dcn_shape(dcn_config: Mapping[str, int] | None, slices: int) -> tuple[int, ...]:
  """Slices spanned by each of MESH_AXES (`config.mesh_dcn`; None: 'data' spans all)."""
  if not dcn_config:
    return (slices,) + (1,) * (len(MESH_AXES) - 1)
  unknown = set(dcn_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(
        f"config.mesh_dcn has unknown axes {sorted(unknown)}; the mesh axes are "
        f"{MESH_AXES}.")
  sizes = [int(dcn_config.get(a, 1)) for a in MESH_AXES]
  if -1 in sizes:
    if sizes.count(-1) > 1 or slices % math.prod(s for s in sizes if s != -1):
      raise ValueError(f"config.mesh_dcn={dict(zip(MESH_AXES, sizes))}: one -1 at most, "
                       f"and the other sizes must divide the {slices} slices.")
    sizes[sizes.index(-1)] = slices // math.prod(s for s in sizes if s != -1)
  if any(s < 1 for s in sizes) or math.prod(sizes) != slices:
    raise ValueError(
        f"config.mesh_dcn={dict(zip(MESH_AXES, sizes))} spans {math.prod(sizes)} slices "
        f"but the devices are {slices} slices. Fix: make the product of its sizes "
        f"{slices}, e.g. --config.mesh_dcn.data={slices} (the default when unset).")
  return tuple(sizes)


def num_batch_shards(mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dim split over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ------------------------------------------------------- parameter shardings --

# Logical axis name -> mesh axis (or None: not split). Tensor parallelism
# splits the MLP hidden units and the attention heads (Megatron-style); the
# 'embed' axis is left to FSDP. 'repr' (the Matryoshka embedding, whose
# prefixes the heads slice) and 'classes' stay whole by default.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("repr", None),
    ("classes", None),
    ("layers", None),  # the stacked axis of scanned layers
    ("conv_in", None),  # ResNet convolutions: data parallel (FSDP still applies)
    ("conv_out", None),
)


def _rules(rules) -> dict[str, str | tuple[str, ...] | None]:
  out = dict(DEFAULT_RULES)
  for item in rules or ():
    if len(item) != 2:
      raise ValueError(
          f"config.sharding_rules entry {item!r} must be a pair "
          "(logical_name, mesh_axis or None), e.g. ('mlp', 'tensor').")
    name, axis = item
    axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(
          f"config.sharding_rules maps {name!r} to {axis!r}, but {bad} is not a "
          f"mesh axis; use one of {MESH_AXES} or None.")
    out[name] = axis
  return out


def logical_spec(names, shape, mesh: jax.sharding.Mesh, rules=None, *,
                 fsdp: bool = True) -> P:
  """PartitionSpec of one array from its logical axis names.

  Each name maps to a mesh axis by `rules` (on top of DEFAULT_RULES); a mesh
  axis is used at most once per array and only where it divides the dim.
  Then, when the mesh has an 'fsdp' axis of size N > 1 that the array does
  not use yet, a dim divisible by N is split over it: parameters and
  optimizer state are stored 1/N per device and all-gathered by XLA where a
  computation needs them. Of the dims that divide, the one whose shard fills
  TPU memory tiles best (`_tiled_size`) is split, the largest on a tie (the
  largest dim is big_vision's rule; splitting a [192, 768] kernel's 768
  leaves 192-wide rows that a TPU pads to 256, which the other dim avoids).
  Arrays without names (scalars, counters) are only FSDP-split.
  """
  table = _rules(rules)
  names = tuple(names) if names is not None else (None,) * len(shape)
  if len(names) != len(shape):
    raise ValueError(f"Logical axis names {names} do not match shape {shape}.")
  spec: list = [None] * len(shape)
  used: set[str] = set()
  for i, (name, size) in enumerate(zip(names, shape)):
    if name is None:
      continue
    if name not in table:
      raise ValueError(
          f"Logical axis {name!r} has no sharding rule; add one, e.g. "
          f"--config.sharding_rules='[(\"{name}\", None)]'.")
    axis = table[name]
    axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      spec[i] = axes[0] if len(axes) == 1 else axes
      used.update(axes)
  n = mesh.shape.get("fsdp", 1)
  if fsdp and n > 1 and "fsdp" not in used:
    free = [i for i, s in enumerate(shape) if spec[i] is None and s % n == 0]
    if free:
      shard = [size // math.prod(mesh.shape[a] for a in _axes(spec[i]))
               for i, size in enumerate(shape)]
      def cost(i):
        split = list(shard)
        split[i] //= n
        return _tiled_size(split), -shape[i], i
      spec[min(free, key=cost)] = "fsdp"
  while spec and spec[-1] is None:  # P("fsdp", None) == P("fsdp") in effect
    spec.pop()
  return P(*spec)


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _tiled_size(shape) -> int:
  """Elements `shape` takes in TPU memory, whose tiles are 8 x 128 on the two
  minor dims (a float32 [192, 192] array fills [192, 256])."""
  if not shape:
    return 1
  *major, minor = shape
  if major:
    major[-1] = -(-major[-1] // 8) * 8
  return math.prod(major) * (-(-minor // 128) * 128)


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, rules=None):
  """NamedShardings for a train state from its variables' logical names.

  Leaves inside `nnx.Variable`s (params, and the optimizer moments optax
  builds in the same structure) use their `out_sharding` metadata; other
  leaves (step counters, RNG state) are FSDP-split if large enough, else
  replicated. Sharded optimizer state follows its parameter because both carry
  the same names.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def one(x):
    if isinstance(x, nnx.Variable):
      names = x.get_metadata().get("out_sharding")
      return jax.tree.map(
          lambda v: NamedSharding(mesh, logical_spec(names, v.shape, mesh, rules)), x)
    shape = getattr(x, "shape", ())
    return NamedSharding(mesh, logical_spec(None, shape, mesh, rules))

  return jax.tree.map(one, abstract_state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain_batch(x: jax.Array, axis: int = 0) -> jax.Array:
  """Pins an activation's batch dim (`axis`) to ('data', 'fsdp').

  A no-op outside a mesh context (`jax.set_mesh`), so models also run eagerly
  on one device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  spec = [None] * x.ndim
  spec[axis] = BATCH_AXES
  return jax.lax.with_sharding_constraint(x, P(*spec))


# ----------------------------------------------------------------------------
# Rings over mesh axes, inside `jax.shard_map`: each device keeps its own
# shard and works through everyone's, the shards passed one device on per step.
# ----------------------------------------------------------------------------
def vary(tree, axes: tuple[str, ...]):
  """`tree` cast to vary over `axes` (shard_map's type check), where it doesn't."""
  def one(v):
    missing = tuple(a for a in axes if a not in jax.typeof(v).mat.varying)
    return jax.lax.pcast(v, missing, to="varying") if missing else v
  return jax.tree.map(one, tree) if axes else tree


def ring(step, acc, data, res, axes: tuple[str, ...], n: int):
  """Runs `step(s, acc, data, res) -> (acc, res)` on every device's shard.

  Inside a `shard_map` over `axes` (n devices in all; `()` and 1: no ring).
  At step s this device holds the shard of device (i - s) mod n: `data`
  (read-only) and `res` (results that every device adds to). Both move one
  device on after each step; the next `data` is sent before this one is
  worked on, so the transfer overlaps the work, and after the n-th hop `res`
  is back on its own device. `acc` stays: this device's own results.
  """
  acc, data, res = vary((acc, data, res), axes)
  if n == 1:
    return step(0, acc, data, res)
  perm = [(i, (i + 1) % n) for i in range(n)]

  def shift(tree):
    return jax.tree.map(lambda v: jax.lax.ppermute(v, axes, perm), tree)

  def body(s, state):
    acc, data, res = state
    following = shift(data)
    acc, res = step(s, acc, data, res)
    return acc, following, shift(res)

  acc, data, res = jax.lax.fori_loop(0, n - 1, body, (acc, data, res))
  acc, res = step(n - 1, acc, data, res)
  return acc, shift(res)
