r"""Entry point: train (then evaluate), evaluate, export embeddings, or compile for a TPU.

  python -m mrl_jax.main --config=configs/fashion_mnist_vit.py --workdir=DIR
  python -m mrl_jax.main --config=configs/fashion_mnist_vit.py --workdir=DIR --mode=eval
  python -m mrl_jax.main --config=configs/fashion_mnist_vit.py --workdir=DIR --mode=embed \
      [--split=test] [--embed_dim=16] [--normalize] [--shard_size=1000000]
  python -m mrl_jax.main --config=configs/imagenet_vit_b16.py --workdir=DIR --mode=compile \
      --topology=v5e:4x4 [--num_slices=1]

--mode=embed writes DIR/embeddings/SPLIT/{embeddings.npy, labels.npy, meta.json}
(see mrl_jax/export.py). --mode=compile compiles the train step and the
evaluation programs for a TPU slice on this host (no chip, no dataset
needed) and writes DIR/compile/report.json: memory per device, whether it
fits, FLOPs, collectives (see mrl_jax/compile.py). The whole reproduction
(MRL, MRL-E, FF at every dim, baselines, tables and plots) is
`python -m mrl_jax.reproduce`.

Any config field can be overridden: --config.batch_size=128. Re-running the
same command in the same workdir resumes from the latest checkpoint. One run
trains in a workdir at a time (WORKDIR/LOCK); --force takes over from one
that died without releasing it.
Multi-host: on Cloud TPU VMs and in a SLURM step (srun) the processes find
each other; elsewhere add --coordinator_address=HOST:PORT --num_processes=N
--process_id=I. Launchers for both: launch/ (README, "Launch").
"""
import ast
import glob
import importlib.util
import logging as std_logging
import os
import pathlib

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go "
                               "(local path or gs://).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "embed", "compile"],
                          "train: train (or resume) then evaluate; eval: evaluate the "
                          "latest checkpoint; embed: write a split's embeddings and labels "
                          "to WORKDIR/embeddings/SPLIT/; compile: compile every program "
                          "for --topology and write WORKDIR/compile/report.json.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "--mode=compile: a TPU slice, e.g. "
                                "v4:2x2x1, v5e:4x4, v5p:2x2x2, v6e:4x4.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "--mode=compile: slices of --topology "
                                   "(multislice).")
_SPLIT = flags.DEFINE_string("split", None, "--mode=embed: the TFDS split to embed "
                             "(default config.dataset.eval_split).")
_EMBED_DIM = flags.DEFINE_integer("embed_dim", None, "--mode=embed: keep the first this many "
                                  "features (default: the full embedding).")
_NORMALIZE = flags.DEFINE_bool("normalize", False, "--mode=embed: L2-normalise each exported "
                               "(truncated) embedding.")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 1_000_000, "--mode=embed: splits with more "
                                   "examples are written as numbered shards of this many rows.")
_FORCE = flags.DEFINE_bool("force", False, "--mode=train: take the workdir over from the "
                           "run that holds its lease (WORKDIR/LOCK). Only after confirming "
                           "that run is dead: two live runs overwrite each other's "
                           "checkpoints.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for multi-host CPU/GPU runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
  """Keeps library INFO chatter (every checkpoint write, dataset load) off the console."""

  _PATHS = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/absl/")

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        p in record.pathname for p in self._PATHS)


def _skip_absent_accelerators():
  """Runs on the CPU where JAX has nothing else to find.

  libtpu (installed for --mode=compile) makes JAX try to open a TPU on every
  host, which prints errors where there is none. Without a TPU attached
  (Google PCI devices, as JAX itself checks) and without a GPU plugin, the
  CPU is the only backend anyway. An explicit JAX_PLATFORMS always wins.
  """
  if "JAX_PLATFORMS" in os.environ or os.environ.get("JAX_FORCE_TPU_INIT"):
    return
  if any(importlib.util.find_spec(p) for p in _GPU_PLUGINS) or _tpu_attached():
    return
  jax.config.update("jax_platforms", "cpu")


def _tpu_attached() -> bool:
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if pathlib.Path(vendor).read_text().strip() == "0x1ae0":  # Google: a TPU
        return True
    except OSError:
      continue
  return False


def distributed_init_args(environ, tpu_attached: bool) -> dict | None:
  """`jax.distributed.initialize` arguments for this process, None if it runs alone.

  Cloud TPU VMs (and GKE TPU pods): JAX finds the workers itself. A SLURM
  step with several tasks: JAX reads them from SLURM's environment; with one
  task per node (or one GPU bound per task by SLURM) the task keeps every GPU
  it sees, else task i takes GPU SLURM_LOCALID (one task per GPU).
  """
  if tpu_attached or "TPU_ACCELERATOR_TYPE" in environ or "CLOUD_TPU_TASK_ID" in environ:
    return {}
  if "SLURM_STEP_NODELIST" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
    tasks = int(environ["SLURM_NTASKS"])
    nodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if tasks == nodes or len(visible) == 1:
      return {"local_device_ids": []}
    return {}
  return None


_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin",
                "jax_rocm60_plugin")


def main(argv):
  del argv
  _skip_absent_accelerators()
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # TFDS and TensorFlow must never claim an accelerator that JAX owns.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if _MODE.value == "compile":
    _compile()
    return
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif (init := distributed_init_args(os.environ, _tpu_attached())) is not None:
    jax.distributed.initialize(**init)  # Cloud TPU VMs, SLURM: auto-detected
  logging.info("JAX process %d/%d, %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)

  # pylint: disable=g-import-not-at-top
  from mrl_jax import checkpoint
  from mrl_jax import train
  from mrl_jax import workdir
  # pylint: enable=g-import-not-at-top
  try:
    if _MODE.value == "train":
      train.run(_CONFIG.value, _WORKDIR.value, force=_FORCE.value)
    elif _MODE.value == "eval":
      train.run_eval(_CONFIG.value, _WORKDIR.value)
    else:
      from mrl_jax import export  # pylint: disable=g-import-not-at-top
      export.run_embed(_CONFIG.value, _WORKDIR.value, split=_SPLIT.value,
                       dim=_EMBED_DIM.value, normalize=_NORMALIZE.value,
                       shard_size=_SHARD_SIZE.value)
  # Bad configs and workdirs, refused resumes, divergence, a full disk: each
  # message says what is wrong and what to do, so it is printed alone (the
  # traceback too with --verbosity=1).
  except (ValueError, FloatingPointError, workdir.WorkdirLocked, workdir.DiskFull,
          checkpoint.RestoreError, checkpoint.CorruptCheckpoint) as e:
    logging.debug("Traceback of the error below:", exc_info=e)
    raise SystemExit(f"error: {e}") from None


def _parse_flags(argv):
  """absl's parsing, with a bad --config file or --config.FIELD override as one line."""
  path = ([a.split("=", 1)[1] for a in argv if a.startswith("--config=")] or [""])[-1]
  overrides = [a for a in argv if a.startswith("--config.")]
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.keys()  # a file that failed to load raises on first use
  except flags.Error as e:
    raise SystemExit(f"error: {e}\nPass --help for the flags.") from None
  except (KeyError, AttributeError) as e:
    if not overrides:
      raise
    raise SystemExit(f"error: bad config override ({' '.join(overrides)}): "
                     f"{_unquoted(e)}") from None
  except Exception as e:  # pylint: disable=broad-except  (the file: absent or broken)
    file = path.split(":")[0]
    reason = (f"no such file: {os.path.abspath(file)}" if not os.path.exists(file)
              else _last_line(e.__cause__ or e))
    raise SystemExit(f"error: could not load --config={path} ({reason})") from None
  return rest


def _unquoted(error: BaseException) -> str:
  """ml_collections' KeyError as "no field 'x'. Did you mean ...", without its quoting."""
  text = str(error)
  while text[:1] in ("'", '"'):
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
  field, _, hint = text.partition("\n")
  return f"the config has no field '{field.strip(chr(39))}'" + (f". {hint}" if hint else "")


def _last_line(error: BaseException) -> str:
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  return lines[-1] if lines else type(error).__name__


def _compile():
  """--mode=compile: on this host, for a slice it is not part of (no distributed init)."""
  if not _TOPOLOGY.value:
    raise app.UsageError("--mode=compile needs --topology, e.g. --topology=v5e:4x4.")
  from mrl_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
  try:
    compile_lib.run(_CONFIG.value, _WORKDIR.value, topology=_TOPOLOGY.value,
                    num_slices=_NUM_SLICES.value)
  except (ValueError, RuntimeError) as e:  # bad input, no libtpu, does not fit
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
