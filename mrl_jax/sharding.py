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


def create_mesh(mesh_config: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
      shape, MESH_AXES,
      axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
      devices=devices)


def num_batch_shards(mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dim split over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
