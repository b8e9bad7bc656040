r"""Data-parallel scaling and FSDP memory, measured side by side in one run.

  python benchmarks/scaling.py [--variant=S/16 --image_size=64 --per_device_batch=8]

1. Train-step time on 1, 2, 4, 8 devices at a fixed per-device batch (weak
   scaling), as a ratio to 1 device. On a CPU host the "devices" are
   `--xla_force_host_platform_device_count` slices of the same cores, so the
   ratio shows the sharding overhead rather than a speed-up; on a TPU/GPU host
   it is the scaling efficiency.
2. Per-device bytes of parameters + optimizer state, read from the compiled
   train step's input shardings, under data parallel (replicated) and FSDP
   over all devices; FSDP should hold ~1/N.
"""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] == "cpu":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import imagenet_vit_s16  # noqa: E402
from mrl_jax import matryoshka  # noqa: E402
from mrl_jax import sharding  # noqa: E402
from mrl_jax import tasks  # noqa: E402
from mrl_jax import train  # noqa: E402

_VARIANT = flags.DEFINE_string("variant", "Ti/16", "ViT variant.")
_IMAGE = flags.DEFINE_integer("image_size", 64, "Image side.")
_BATCH = flags.DEFINE_integer("per_device_batch", 8, "Examples per device.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after 2 warm-up steps).")


class _Dataset:  # what the trainer reads from the dataset summary
  image_shape = (None, None, 3)


def _config(mesh):
  config = imagenet_vit_s16.get_config("mrl")
  config.model.variant = _VARIANT.value
  config.model.dtype = "float32"
  config.input.image_size = _IMAGE.value
  width = train.models.vit.decode_variant(_VARIANT.value)["width"]
  config.model.representation_size = width
  config.mrl.nesting_dims = matryoshka.nesting_dims(width)
  config.mesh = mesh
  return config


def _setup(config, devices):
  mesh = sharding.create_mesh(config.mesh, devices)
  nesting, weights = matryoshka.validate_nesting(
      config.mrl.nesting_dims, None, config.model.representation_size)
  facts = dict(nesting_dims=nesting, weights=weights, ff_dim=nesting[-1],
               head_dims=matryoshka.head_dims("mrl", nesting, nesting[-1]),
               dataset=_Dataset())
  task = tasks.get_task(config, facts)
  tx = train.build_optimizer(config, 1000)
  init_fn = lambda: task.init_state(tx)
  abstract, shardings = train.abstract_train_state(init_fn, mesh)
  step = train.make_train_step(config, facts, task, tx, mesh, shardings)
  return mesh, init_fn, abstract, shardings, step


def _batch(n, mesh):
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(n, _IMAGE.value, _IMAGE.value, 3)).astype(np.float32),
           "label": rng.integers(0, 1000, n).astype(np.int32)}
  return jax.device_put(batch, sharding.batch_sharding(mesh))


def _step_time(n_devices):
  config = _config({"data": -1, "fsdp": 1, "tensor": 1})
  mesh, init_fn, _, shardings, step = _setup(config, jax.devices()[:n_devices])
  with jax.set_mesh(mesh):
    state = jax.jit(init_fn, out_shardings=shardings)()
    batch = _batch(_BATCH.value * n_devices, mesh)
    for _ in range(2):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_STEPS.value):
      t = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
  return float(np.median(times))


def _state_bytes_per_device(mesh_config):
  """Largest per-device bytes of params + opt state in the compiled step."""
  config = _config(mesh_config)
  mesh, _, abstract, _, step = _setup(config, jax.devices())
  batch = jax.ShapeDtypeStruct((_BATCH.value * len(jax.devices()), _IMAGE.value,
                                _IMAGE.value, 3), jnp.float32,
                               sharding=sharding.batch_sharding(mesh))
  labels = jax.ShapeDtypeStruct(batch.shape[:1], jnp.int32, sharding=batch.sharding)
  with jax.set_mesh(mesh):
    compiled = step.lower(abstract, {"image": batch, "label": labels}).compile()
  state_shardings = compiled.input_shardings[0][0]
  per_device = {d: 0 for d in mesh.devices.flat}
  total = 0
  for name in ("params", "opt_state"):
    leaves = jax.tree.leaves(abstract[name])
    shards = jax.tree.leaves(state_shardings[name])
    for x, s in zip(leaves, shards):
      nbytes = np.dtype(x.dtype).itemsize
      total += int(np.prod(x.shape)) * nbytes
      shard = int(np.prod(s.shard_shape(x.shape))) * nbytes
      for d in s.device_set:
        per_device[d] += shard
  return max(per_device.values()), total


def main(argv):
  del argv
  n = len(jax.devices())
  print(f"ViT-{_VARIANT.value} at {_IMAGE.value}px, {_BATCH.value} images per device, "
        f"{jax.devices()[0].platform} x {n}")
  print("\n1) weak scaling: step time at a fixed per-device batch")
  print(f"{'devices':>8} {'global batch':>13} {'step (ms)':>10} {'ratio to 1':>11}")
  base = None
  for k in (1, 2, 4, 8):
    if k > n:
      break
    t = _step_time(k)
    base = base or t
    print(f"{k:>8} {_BATCH.value * k:>13} {1e3 * t:>10.1f} {t / base:>11.2f}")

  print(f"\n2) per-device params + optimizer state bytes ({n} devices)")
  dp, total = _state_bytes_per_device({"data": -1, "fsdp": 1, "tensor": 1})
  fsdp, _ = _state_bytes_per_device({"data": 1, "fsdp": -1, "tensor": 1})
  print(f"{'total':>16} {total / 2**20:10.2f} MiB")
  print(f"{'data parallel':>16} {dp / 2**20:10.2f} MiB per device ({dp / total:.3f} of total)")
  print(f"{'fsdp':>16} {fsdp / 2**20:10.2f} MiB per device ({fsdp / total:.3f} of total; "
        f"1/N = {1 / n:.3f})")


if __name__ == "__main__":
  app.run(main)
