"""The training loop, top to bottom.

Sections: config checks -> mesh -> input -> model and optimizer -> shardings
-> update step -> checkpoint restore -> loop (log, checkpoint, eval) -> final
eval. Everything the step touches is a pytree: the model is split with
`nnx.split` once, and the jitted step merges it back for the forward pass.
"""
from __future__ import annotations

import functools
import json
import math
import re
import signal
import threading
import time
from typing import Any, NamedTuple

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mrl_jax import checkpoint as checkpoint_lib
from mrl_jax import evaluate
from mrl_jax import matryoshka
from mrl_jax import mixup
from mrl_jax import models
from mrl_jax import pretrained
from mrl_jax import sharding
from mrl_jax import tasks
from mrl_jax import workdir as workdir_lib
from mrl_jax.data import input_pipeline
from mrl_jax.data import prepare


# ----------------------------------------------------------------------------
# Config checks: every user mistake is reported before compute is spent.
# ----------------------------------------------------------------------------
def check_config(config: ml_collections.ConfigDict, mesh, *,
                 dataset: prepare.DatasetSummary | None = None,
                 vocab_size: int | None = None,
                 process_count: int | None = None) -> dict[str, Any]:
  """Validates the config against the mesh and the dataset; returns facts.

  The dataset's facts (and the text vocabulary's size) are read from disk
  unless given; `process_count` (default: this run's) is the number of hosts
  the batch is split over. `--mode=compile` passes all three for a TPU slice
  this host is not part of.
  """
  process_count = jax.process_count() if process_count is None else process_count
  d = models.embedding_size(config)
  nesting, weights = matryoshka.validate_nesting(config.mrl.nesting_dims,
                                                 config.mrl.get("weights"), d)
  mode = config.mrl.mode
  if tasks.is_contrastive(config):
    tasks.check_contrastive_config(config)
  mixup.check_config(config, contrastive=tasks.is_contrastive(config))
  input_pipeline.randaugment_args(config)  # raises on a bad op or magnitude
  input_pipeline.random_erasing_prob(config)
  ff_dim = config.mrl.get("ff_dim") or nesting[-1]
  head_dims = matryoshka.head_dims(mode, nesting, ff_dim)
  if mode == "ff":
    if not 0 < ff_dim <= d:
      raise ValueError(f"config.mrl.ff_dim={ff_dim} must be in [1, {d}] (the embedding "
                       "size, config.model.representation_size).")
    weights = [1.0]
  for field in ("batch_size", "eval_batch_size"):
    if field in config:
      input_pipeline.validate_batch_size(
          config, sharding.num_batch_shards(mesh), process_count, field=field)
  accum = config.get("grad_accum_steps", 1)
  shards = sharding.num_batch_shards(mesh)
  if not isinstance(accum, int) or accum < 1 or config.batch_size % (accum * shards):
    raise ValueError(
        f"config.grad_accum_steps={accum!r} must be a positive integer that splits "
        f"config.batch_size={config.batch_size} into microbatches divisible by the "
        f"{shards} data shards (batch_size % (grad_accum_steps * {shards}) == 0); "
        "e.g. --config.grad_accum_steps=1.")
  check_optimizer(config)
  pretrained.check_config(config)
  info = dataset or prepare.check_config(config)
  models.check_variant(config)
  num_train = info.num_examples[config.dataset.train_split]
  input_pipeline.check_progressive_resizing(
      config, num_train_steps(config, num_train) * config.batch_size / num_train)
  facts = dict(nesting_dims=nesting, weights=weights, head_dims=head_dims,
               ff_dim=ff_dim, dataset=info)
  if config.dataset.get("text_key"):
    # Reads the vocabulary: a missing or malformed file fails here.
    facts["vocab_size"] = vocab_size or input_pipeline.load_tokenizer(config).vocab_size
  evaluate.check_evals(config, facts)  # a bad eval config fails now, not after training
  return facts


OPTIMIZERS = ("adamw", "sgd", "lamb", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")


def check_optimizer(config) -> None:
  """config.optimizer: known names, a positive learning rate, sane coefficients."""
  oc = config.optimizer

  def bad(field, why, fix):
    return ValueError(f"config.optimizer.{field}={oc.get(field)!r} {why}. Fix: {fix}.")

  def number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

  if oc.get("name", "adamw") not in OPTIMIZERS:
    raise bad("name", f"is not one of {', '.join(map(repr, OPTIMIZERS))}",
              "e.g. --config.optimizer.name=adamw")
  if oc.get("schedule", "cosine") not in SCHEDULES:
    raise bad("schedule", f"is not one of {', '.join(map(repr, SCHEDULES))}",
              "e.g. --config.optimizer.schedule=cosine")
  lr = oc.get("learning_rate")
  if not number(lr) or lr <= 0:
    raise bad("learning_rate", "must be a positive number (a negative one climbs the loss)",
              "e.g. --config.optimizer.learning_rate=1e-3")
  for field in ("weight_decay", "final_lr_fraction"):
    v = oc.get(field, 0.0)
    if not number(v) or v < 0:
      raise bad(field, "must be a number >= 0", f"e.g. --config.optimizer.{field}=0.0")
  warmup = oc.get("warmup_steps", 0)
  if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
    raise bad("warmup_steps", "must be an int >= 0", "e.g. --config.optimizer.warmup_steps=0")
  clip = oc.get("grad_clip_norm")
  if clip is not None and (not number(clip) or clip <= 0):
    raise bad("grad_clip_norm", "must be a positive number or None",
              "e.g. --config.optimizer.grad_clip_norm=1.0")
  if not isinstance(oc.get("nesterov", True), bool):
    raise bad("nesterov", "must be True or False (SGD's Nesterov momentum)",
              "e.g. --config.optimizer.nesterov=False")
  for field in ("b1", "b2", "momentum"):
    v = oc.get(field, 0.9)
    if not number(v) or not 0 <= v < 1:
      raise bad(field, "must be in [0, 1)", f"e.g. --config.optimizer.{field}=0.9")
  for rule in oc.get("lr_mults") or ():
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str)
        or not number(rule[1]) or rule[1] < 0):
      raise bad("lr_mults", f"has {rule!r}, not a (regex, multiplier >= 0) pair",
                "e.g. (('^(head|representation)/', 1.0), ('.*', 0.1)): the first "
                "matching regex wins, 0 freezes")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise bad("lr_mults", f"has a bad regex {rule[0]!r} ({e})", "fix the regex") from e


def num_train_steps(config, num_train_examples: int) -> int:
  if config.get("num_train_steps", -1) > 0:
    return int(config.num_train_steps)
  if config.get("num_epochs", -1) and config.num_epochs > 0:
    return int(math.ceil(config.num_epochs * num_train_examples / config.batch_size))
  raise ValueError(
      "Neither config.num_train_steps nor config.num_epochs is positive "
      f"({config.get('num_train_steps')}, {config.get('num_epochs')}). Fix: set "
      "one of them, e.g. --config.num_epochs=10.")


# ----------------------------------------------------------------------------
# Model and optimizer.
# ----------------------------------------------------------------------------
def _decay_mask(params):
  # No weight decay on biases, norms' scales and other vectors (standard).
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def lr_multipliers(rules, params):
  """A tree like `params` of each parameter's learning-rate multiplier: the
  first (regex, multiplier) of `rules` whose regex matches its name
  ('blocks/0/attn/query/kernel'), else 1."""
  compiled = [(re.compile(r), float(m)) for r, m in rules]

  def mult(path, _):
    name = checkpoint_lib.path_name(path)
    return next((m for r, m in compiled if r.search(name)), 1.0)

  return jax.tree_util.tree_map_with_path(mult, params)


def _scale_by_lr_mults(rules) -> optax.GradientTransformation:
  """Multiplies each parameter's update (the learning rate times whatever the
  optimizer made of it, decoupled weight decay included) by its multiplier."""
  def update(updates, state, params=None):
    del params
    mults = lr_multipliers(rules, updates)
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mults), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_schedule(config, total_steps: int) -> optax.Schedule:
  oc = config.optimizer
  warmup = int(oc.get("warmup_steps", 0))
  if oc.get("schedule", "cosine") == "cosine":
    lr = optax.warmup_cosine_decay_schedule(
        0.0, oc.learning_rate, warmup, max(total_steps, warmup + 1),
        end_value=oc.learning_rate * oc.get("final_lr_fraction", 0.0))
  elif oc.schedule == "linear":
    lr = optax.join_schedules([
        optax.linear_schedule(0.0, oc.learning_rate, max(warmup, 1)),
        optax.linear_schedule(oc.learning_rate, 0.0, max(total_steps - warmup, 1)),
    ], [warmup])
  elif oc.schedule == "constant":
    lr = optax.join_schedules([
        optax.linear_schedule(0.0, oc.learning_rate, max(warmup, 1)),
        optax.constant_schedule(oc.learning_rate)], [warmup])
  else:
    check_optimizer(config)  # raises
  return lr


def build_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  oc = config.optimizer
  lr = build_schedule(config, total_steps)
  name = oc.get("name", "adamw")
  wd = oc.get("weight_decay", 0.0)
  if name == "adamw":
    opt = optax.adamw(lr, b1=oc.get("b1", 0.9), b2=oc.get("b2", 0.999),
                      weight_decay=wd, mask=_decay_mask)
  elif name == "sgd":
    opt = optax.chain(optax.add_decayed_weights(wd, mask=_decay_mask),
                      optax.sgd(lr, momentum=oc.get("momentum", 0.9),
                                nesterov=oc.get("nesterov", True)))
  elif name == "lamb":
    opt = optax.lamb(lr, weight_decay=wd, mask=_decay_mask)
  elif name == "adafactor":
    opt = optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=_decay_mask)
  else:
    check_optimizer(config)  # raises
  if oc.get("lr_mults"):
    opt = optax.chain(opt, _scale_by_lr_mults(oc.lr_mults))
  if oc.get("grad_clip_norm"):
    opt = optax.chain(optax.clip_by_global_norm(oc.grad_clip_norm), opt)
  return opt


def make_train_step(config, facts, task, tx: optax.GradientTransformation,
                    mesh, state_sharding):
  """The jitted update `(state, batch) -> (state, metrics)`, state donated.

  Loss: `task.loss`, the weighted sum over nesting dims of the per-dim loss
  (softmax CE, or the contrastive loss of a dual encoder; fp32), averaged
  over `config.grad_accum_steps` microbatches when > 1. With microbatches a
  contrastive loss sees B / grad_accum_steps pairs at a time.
  """
  grad_fn = jax.value_and_grad(task.loss, has_aux=True)
  accum = config.get("grad_accum_steps", 1)

  def accumulated_grads(params, rest, batch, rng):
    """Mean loss and gradient over `accum` microbatches, one at a time."""
    if accum == 1:
      return grad_fn(params, rest, batch, rng)
    micro = jax.tree.map(lambda x: _microbatches(x, accum), batch)

    def add(carry, xs):
      microbatch, i = xs
      out = grad_fn(params, rest, microbatch, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, out), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        grad_fn, params, rest, jax.tree.map(lambda x: x[0], micro), rng))
    total, _ = jax.lax.scan(add, zeros, (micro, jnp.arange(accum)))
    return jax.tree.map(lambda x: x / accum, total)

  mix = mixup.enabled(config)
  mix_key = jax.random.fold_in(jax.random.key(config.seed), 0x6D6978)  # "mix"
  drop_key = jax.random.fold_in(jax.random.key(config.seed), 0x64726F70)  # "drop"

  @functools.partial(jax.jit, donate_argnums=0,
                     out_shardings=(state_sharding, sharding.replicated(mesh)))
  def train_step(state, batch):
    if mix:  # on the global batch: a function of (seed, step), so resumes are exact
      batch = dict(batch, image=task.model_images(batch["image"]))  # mixes floats
      batch = mixup.mix_train_batch(config, jax.random.fold_in(mix_key, state["step"]),
                                    batch, config.dataset.num_classes)
    (loss, (per_dim, extra, stats)), grads = accumulated_grads(
        state["params"], state["rest"], batch, jax.random.fold_in(drop_key, state["step"]))
    # BatchNorm's running averages (the mean over microbatches with accumulation).
    rest = task.updated_rest(state["params"], state["rest"], stats)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **extra}
    for m, l in zip(facts["head_dims"], per_dim):
      metrics[f"loss_dim{m}"] = l
    new_state = dict(state, step=state["step"] + 1, params=params, rest=rest,
                     opt_state=opt_state)
    return new_state, metrics

  return train_step


# ----------------------------------------------------------------------------
# Everything.
# ----------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, workdir: str, *,
        devices=None, force: bool = False) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`, then evaluates; returns the results.

  `devices` (default: all) are the devices the mesh is laid over. The run
  holds the workdir's lease (`workdir.Lease`) throughout; `force` takes it
  over from a run that is known to be dead.
  """
  workdir = workdir_path(workdir)
  # Mesh, config checks, model and optimizer, the state's shardings: every
  # mistake in the config is reported before anything is written.
  s = setup(config, devices=devices)
  total_steps = num_train_steps(
      config, s.facts["dataset"].num_examples[config.dataset.train_split])
  if jax.process_index() == 0:
    workdir_lib.prepare(workdir)
  with workdir_lib.Lease(workdir, force=force) as lease:
    try:
      return _train(config, workdir, s, total_steps, lease)
    except Exception as e:
      if workdir_lib.is_disk_full(e):  # one error naming what survived, not a cascade
        raise workdir_lib.disk_full(workdir, workdir / "checkpoints", e) from e
      raise


def _train(config, workdir: epath.Path, s: Setup, total_steps: int,
           lease: workdir_lib.Lease) -> dict[str, Any]:
  """`run`'s body, under the workdir's lease."""
  is_main = jax.process_index() == 0
  mesh, facts, task, tx = s.mesh, s.facts, s.task, s.tx
  init_fn, abstract_state, state_sharding = s.init_fn, s.abstract_state, s.state_sharding
  logging.info("Mesh %s; %d steps of global batch %d; nesting dims %s (%s)",
               dict(mesh.shape), total_steps, config.batch_size,
               facts["nesting_dims"], config.mrl.mode)

  # Input: this process's slice of the data, as global arrays on the mesh.
  train_loader = input_pipeline.create_train_loader(config)
  train_iter = iter(train_loader)
  batch_sharding = sharding.batch_sharding(mesh)

  # Train state: initialised directly in its sharding, or restored below.
  schedule = build_schedule(config, total_steps)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state["params"]))
  logging.info("Model: %s %s, %.2fM parameters", config.model.name,
               config.model.get("variant", ""), num_params / 1e6)

  train_step = make_train_step(config, facts, task, tx, mesh, state_sharding)

  # Checkpoint: resume if the workdir has one, else initialise.
  ckpt = checkpoint_lib.Checkpointer(
      workdir / "checkpoints", max_to_keep=config.get("keep_checkpoints", 3))
  latest, state = ckpt.restore_latest(abstract_state, train_iter)
  if latest is not None:
    logging.info("Resuming from step %d", latest)
    if pretrained.init_specs(config):
      logging.warning("config.model.init is not applied: resuming from the checkpoint of "
                      "step %d, which wins (init only starts a fresh run).", latest)
  else:
    state = jax.jit(init_fn, out_shardings=state_sharding)()
    state = pretrained.init_train_state(config, state, tx)
  start_step = int(state["step"])
  # The config is recorded only now that the checkpoint is known to fit it.
  if is_main:
    workdir_lib.save_config(workdir, config, start_step)

  # Metrics: TensorBoard events + console, from process 0 only.
  writer = metric_writers.create_default_writer(
      workdir, just_logging=not is_main, asynchronous=True)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
  metrics_log = MetricsLog(workdir / "metrics.jsonl", start_step, enabled=is_main)
  progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_secs=None,
      every_steps=config.log_every_steps)

  # The loop. The loss of step s is read on the host only after step s+1 is
  # dispatched, so the check for non-finite values never stalls the device.
  ckpt_every = config.get("checkpoint_every_steps", 0)
  eval_every = config.get("eval_every_steps", 0)
  preemption = PreemptionWatcher()
  pending = None  # (step, metrics) of the last dispatched step
  t0, images_since = time.perf_counter(), 0
  try:
    with jax.set_mesh(mesh):
      for step in range(start_step + 1, total_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          batch = input_pipeline.make_global_batch(next(train_iter), batch_sharding)
          state, metrics = train_step(state, batch)
        images_since += config.batch_size
        if pending is not None:
          _check_finite(*pending, ckpt)
        pending = (step, metrics)
        progress(step)

        last = step == total_steps
        if step % config.log_every_steps == 0 or last:
          _check_finite(step, metrics, ckpt)
          dt = time.perf_counter() - t0
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          scalars["images_per_sec"] = images_since / dt
          scalars["learning_rate"] = float(schedule(step))
          writer.write_scalars(step, scalars)
          metrics_log.write(step, scalars)
          logging.info("step %d/%d  loss %.4f  %.0f img/s  (%.1f%%)", step, total_steps,
                       scalars["loss"], scalars["images_per_sec"], 100 * step / total_steps)
          t0, images_since = time.perf_counter(), 0

        if (ckpt_every > 0 and step % ckpt_every == 0) or last:
          _check_finite(step, metrics, ckpt)
          _save(ckpt, step, state, train_iter, lease)

        if not last and preemption.reached(step):
          _check_finite(step, metrics, ckpt)
          if ckpt.latest_step() != step:
            _save(ckpt, step, state, train_iter, lease)
          ckpt.wait_until_finished()
          logging.warning("Preempted: saved the checkpoint of step %d; exiting. "
                          "Re-run the same command to continue.", step)
          return {"preempted_at_step": step}

        if eval_every > 0 and step % eval_every == 0 and not last:
          results = evaluate.evaluate(config, facts, task, state, mesh, step=step)
          _write_eval_scalars(writer, step, results)

    ckpt.wait_until_finished()
    # Final evaluation at every dimension, written to workdir/eval; under the
    # mesh as the periodic ones, so it reuses their compiled programs.
    with jax.set_mesh(mesh):
      results = evaluate.evaluate(config, facts, task, state, mesh, step=int(state["step"]),
                                  outdir=workdir / "eval")
    _write_eval_scalars(writer, int(state["step"]), results)
  finally:
    # Also on Ctrl-C or an error: an in-flight checkpoint still commits and
    # buffered metrics reach disk.
    preemption.close()
    ckpt.close()
    writer.close()
  return results


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates the latest checkpoint in `workdir` (no training)."""
  s = setup(config)
  step, state = restore_model(s, workdir, mode="eval")
  with jax.set_mesh(s.mesh):
    return evaluate.evaluate(config, s.facts, s.task, state, s.mesh, step=step,
                             outdir=workdir_path(workdir) / "eval")


def workdir_path(workdir) -> epath.Path:
  # Orbax needs absolute paths; remote ones (gs://...) already are.
  path = epath.Path(workdir)
  return path if "://" in str(workdir) else epath.Path(path.absolute())


class Setup(NamedTuple):
  """What every mode builds from a config before it computes anything."""
  mesh: jax.sharding.Mesh
  facts: dict[str, Any]  # `check_config`'s: dataset, nesting dims, weights, ...
  task: Any  # tasks.ClassificationTask | tasks.ContrastiveTask
  tx: optax.GradientTransformation
  init_fn: Any  # () -> train state
  abstract_state: Any  # jax.ShapeDtypeStructs with their shardings
  state_sharding: Any


def setup(config, *, devices=None, dataset=None, vocab_size=None,
          process_count=None) -> Setup:
  """Mesh, config checks, task, optimizer and the abstract train state with
  its shardings (nothing allocated): the one setup of training, --mode=eval,
  --mode=embed and --mode=compile.

  `devices` (default: all) are the devices the mesh is laid over; `dataset`,
  `vocab_size` and `process_count` go to `check_config` (compile passes them
  for a TPU slice this host is not part of).
  """
  mesh = sharding.create_mesh(config.mesh, devices, config.get("mesh_dcn"))
  facts = check_config(config, mesh, dataset=dataset, vocab_size=vocab_size,
                       process_count=process_count)
  task = tasks.get_task(config, facts)
  total_steps = num_train_steps(config, facts["dataset"].num_examples[config.dataset.train_split])
  tx = build_optimizer(config, total_steps)
  init_fn = functools.partial(task.init_state, tx)
  abstract_state, state_sharding = abstract_train_state(
      init_fn, mesh, config.get("sharding_rules"))
  return Setup(mesh, facts, task, tx, init_fn, abstract_state, state_sharding)


# The parts of the train state a trained model is: evaluation and export
# restore these only, not the optimizer state.
MODEL_KEYS = ("params", "rest")


def restore_model(s: Setup, workdir, *, mode: str) -> tuple[int, dict[str, Any]]:
  """(step, {'params', 'rest'}) of the newest checkpoint in `workdir`."""
  workdir = workdir_path(workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", read_only=True)
  try:
    model = {k: s.abstract_state[k] for k in MODEL_KEYS}
    step, state = ckpt.restore_latest(model, partial=True)
  finally:
    ckpt.close()
  if step is None:
    raise FileNotFoundError(
        f"No checkpoint in {workdir / 'checkpoints'}: --mode={mode} needs a trained "
        f"model. Fix: train first (same command without --mode={mode}).")
  return step, state


def abstract_train_state(init_fn, mesh, rules=None):
  """Shapes, dtypes and shardings of the train state, without allocating it.

  Shardings come from each variable's logical axis names under the config's
  rules (`sharding.state_shardings`); with an 'fsdp' mesh axis, parameters
  and optimizer state are split over it.
  """
  shapes = jax.eval_shape(init_fn)
  state_sharding = sharding.state_shardings(shapes, mesh, rules)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, state_sharding)
  return abstract, state_sharding


def _microbatches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...] with every microbatch spread over all devices.

  Microbatch j takes rows j, j+k, j+2k, ...: each device's contiguous block
  of the batch contributes B/(k*devices) rows to every microbatch, so no
  device idles and no rows move between devices.
  """
  x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
  return sharding.constrain_batch(x, axis=1)


class PreemptionWatcher:
  """Decides the step at which a preempted run saves and exits.

  Cloud schedulers send SIGTERM some time before killing a VM. With several
  processes, JAX's preemption sync manager (started by
  `jax.distributed.initialize`) catches it on any host and all hosts agree on
  the next safe step: `reached(step)` turns True there on every process at
  once, so the collective checkpoint lines up. With one process a SIGTERM
  handler does the same job. `reached` must be called at every step.
  """

  def __init__(self):
    self._multi = jax.distributed.is_initialized()
    self._signalled = False
    self._previous = None
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._signalled = True
    logging.warning("SIGTERM received: saving a checkpoint after this step.")

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class MetricsLog:
  """`workdir/metrics.jsonl`: one JSON line of train scalars per logged step.

  Easy to read back (pandas, jq, tests). On resume, lines of steps after the
  restored checkpoint are dropped, since those steps are trained again.
  """

  def __init__(self, path: epath.Path, start_step: int, *, enabled: bool = True):
    self.path, self.enabled = path, enabled
    if enabled and path.exists():
      kept = [line for line in path.read_text().splitlines()
              if line and json.loads(line)["step"] <= start_step]
      path.write_text("".join(line + "\n" for line in kept))

  def write(self, step: int, scalars: dict[str, float]):
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps({"step": step, **scalars}) + "\n")

  @staticmethod
  def read(path: epath.PathLike) -> list[dict[str, float]]:
    return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line]


def _check_finite(step, metrics, ckpt):
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"Non-finite loss ({loss}) at step {step}; stopping without saving. "
        f"The last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. "
        "Fix: lower config.optimizer.learning_rate or set "
        "config.optimizer.grad_clip_norm, then re-run to resume from it.")


def _save(ckpt, step, state, train_iter, lease):
  lease.check()  # never a second writer: stop if another run took the workdir over
  try:
    ckpt.save(step, state, train_iter, force=True)
  except checkpoint_lib.NonFiniteState as e:
    raise FloatingPointError(
        f"Non-finite values in the train state at step {step} ({e}); stopping without "
        f"saving. The last good checkpoint is step {ckpt.latest_step()} in "
        f"{ckpt.directory}. Fix: lower config.optimizer.learning_rate or set "
        "config.optimizer.grad_clip_norm, then re-run to resume from it.") from None


def _write_eval_scalars(writer, step, results):
  scalars = {f"eval/{metric}_dim{dim}": v
             for metric, per_dim in results["metrics"].items()
             for dim, v in per_dim.items()}
  writer.write_scalars(step, scalars)


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
