"""The training loop: thin, around the pure step. `train_and_evaluate(config, workdir)`.

Recipe stage 2 ('end-to-end skeleton'): fixed seed, the whole validation split evaluated
every epoch as exact sums over exact counts, the loss at init printed beside its expected
value, and a run that resumes exactly after a kill. Babysitting (CS231n 'Learning'): when
`config.monitor.enabled`, a `jrecipe.monitor.recorder.Monitor` records update/weight ratios,
histograms, filters and prediction dynamics at its cadence, and writes diagnoses.json and
report.html at the end.
"""

import logging
import math
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jrecipe import experiment as experiment_lib
from jrecipe import optim
from jrecipe.data import pipeline
from jrecipe.errors import RunFailure
from jrecipe.train import parallel, step as step_lib, workdir as workdir_lib
from jrecipe.train.checkpoint import Checkpointer
from jrecipe.train.state import TrainState, create_state, param_count, variables_of
from jrecipe.train.writer import MetricWriter, write_json_atomic

log = logging.getLogger("jrecipe")


class _Preemption:
  """Turns SIGTERM (a cloud VM's preemption notice) into a flag the loop checks each step.

  One process: a Python SIGTERM handler sets the flag. Several processes: all of them must
  stop after the same step, or the others would wait forever in the next collective (and in
  orbax's save barriers). JAX's preemption sync manager, started by
  `jax.distributed.initialize()` with its own SIGTERM handler, agrees on that step across
  hosts; `poll(step)`, called by every process after every step, asks it (0.4 us a call).
  """

  def __init__(self):
    self.requested = False
    self._old = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if self._multi:  # keep JAX's handler: replacing it would hide the notice from the others
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def poll(self, step: int) -> bool:
    """Whether to stop after `step` (on several processes: the same answer on all of them)."""
    if self._multi and not self.requested:
      from jax.experimental import multihost_utils
      try:
        self.requested = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # jax_enable_preemption_service is off: no agreed stop
        log.warning("Preemption (SIGTERM) handling is off on this multi-host job: %s", e)
        self._multi = False
    return self.requested

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def seeds(seed: int) -> dict[str, jax.Array]:
  """Every random stream of a run, derived from the one config.seed by name."""
  key = jax.random.PRNGKey(seed)
  return {"init": jax.random.fold_in(key, 0), "train": jax.random.fold_in(key, 1)}


def init_train_state(exp: experiment_lib.Experiment, tx) -> TrainState:
  """The initial TrainState on the host (init well: head bias from the data if configured)."""
  rngs = seeds(exp.config.seed)
  variables = exp.init_variables(rngs["init"])
  if exp.config.get("init_from"):  # 'pretrained initialisation' (jrecipe/train/init_from.py)
    from jrecipe.train import init_from
    variables = init_from.restore_into(exp, variables)
  state = create_state(variables, tx, rngs["train"], ema=exp.config.ema_decay > 0)
  return jax.device_get(state)


class Evaluator:
  """Exact evaluation of whole splits: sums over the real examples, divided once at the end."""

  def __init__(self, exp, placement: parallel.Placement):
    self.exp = exp
    self.placement = placement
    self.fn = placement.compile_eval(
        step_lib.make_eval_step(exp.model, exp.loss, axis_name=placement.axis_name))

  def batch_size(self, split: str) -> int:
    n = self.placement.global_devices
    size = min(self.exp.config.eval_batch_size, len(self.exp.data.arrays[split]["y"]))
    return int(math.ceil(size / n) * n)

  def __call__(self, variables, split: str) -> dict[str, float]:
    total = None
    for batch in pipeline.eval_batches(self.exp.data, split, batch_size=self.batch_size(split),
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
      sums = self.fn(variables, self.placement.put_batch(batch))
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    host = self.placement.metrics_to_host(total)
    count = float(host.pop("count"))
    out = {k: float(v) / count for k, v in host.items()}
    out["count"] = int(round(count))
    return out


def _nonfinite_report(exp, host_state, bad_step: int, batch_size: int) -> str:
  """Names the step, the first leaf whose gradient is not finite, or the batch."""
  batch = next(pipeline.train_batches(exp.data, batch_size=batch_size, seed=exp.config.seed,
                                      start_step=bad_step))
  parts = [f"Training stopped: the loss or a gradient was not finite at step {bad_step}."]
  if not all(np.all(np.isfinite(v)) for v in batch.values() if v.dtype.kind == "f"):
    parts.append("The batch itself contains non-finite inputs (see --mode=inspect).")
  loss_fn = step_lib.make_loss_fn(exp.model, exp.loss, l2=exp.config.l2,
                                  augment=exp.augment_fn())
  (total, (_, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      host_state.params, host_state.model_state, batch, host_state.rng, jnp.int32(bad_step))
  parts.append(f"Recomputed on that batch from the last good parameters: loss {float(total)!r}.")
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  bad = [jax.tree_util.keystr(p) for p, g in flat if not np.all(np.isfinite(g))]
  if bad:
    parts.append(f"First parameter leaf with a non-finite gradient: {bad[0]} "
                 f"({len(bad)} of {len(flat)} leaves).")
  parts.append("Likely causes: a learning rate too high (try 10x lower), a log of zero or a "
               "division by a value that reached zero in the model or loss, or bad inputs. "
               "The last good checkpoint is untouched; rerun with "
               "--config.debug_nans=True to name the operation (jax_debug_nans).")
  return " ".join(parts)


def _debug_nans(exp, host_state, bad_step: int, batch_size: int) -> str:
  batch = next(pipeline.train_batches(exp.data, batch_size=batch_size, seed=exp.config.seed,
                                      start_step=bad_step))
  loss_fn = step_lib.make_loss_fn(exp.model, exp.loss, l2=exp.config.l2,
                                  augment=exp.augment_fn())
  jax.config.update("jax_debug_nans", True)
  try:
    jax.grad(lambda p: loss_fn(p, host_state.model_state, batch, host_state.rng,
                               jnp.int32(bad_step))[0])(host_state.params)
    return "jax_debug_nans found no operation producing a NaN (an inf, perhaps)."
  except FloatingPointError as e:
    return f"jax_debug_nans: {str(e).splitlines()[0]}"
  finally:
    jax.config.update("jax_debug_nans", False)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       exp: Optional[experiment_lib.Experiment] = None,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint) and returns the summary.

  Writes config.json, metrics.jsonl, TensorBoard events, checkpoints/ and summary.json.
  Process 0 writes; every process computes.
  """
  primary = jax.process_index() == 0
  placement = parallel.make_placement(config.parallel.mode, config.parallel.num_devices)
  parallel.check_batch_divisible(config.batch_size, placement)
  exp = exp or experiment_lib.build(config, bn_axis_name=placement.axis_name)
  workdir_lib.prepare(workdir, config, allow_config_change=allow_config_change,
                      primary=primary)

  tx = exp.optimizer()
  host_state = init_train_state(exp, tx)
  ckpt = Checkpointer(workdir, keep_best=config.checkpoint.keep_best)
  plateau = optim.PlateauScaler(factor=config.plateau.factor, patience=config.plateau.patience,
                                min_scale=config.plateau.min_scale)
  meta = {"epoch": 0, "early_stopping": {"best": None, "bad_epochs": 0},
          "plateau": plateau.state_dict()}
  restored = ckpt.restore(host_state)
  start_step = 0
  if restored is None and primary and getattr(exp, "init_from_report", None):
    from jrecipe.train import init_from
    init_from.write_report(workdir, exp.init_from_report)  # what was restored, skipped, fresh
  if restored is not None:
    host_state, meta, start_step = restored
    plateau.load_state_dict(meta["plateau"])
    log.info("Resuming from the checkpoint at step %d (epoch %s).", start_step, meta["epoch"])
  else:
    n = param_count(host_state.params)
    log.info("Model %s: %s parameters.", exp.model.name, f"{n:,}")

  writer = MetricWriter(workdir, enabled=primary,
                        resume_step=start_step if restored is not None else None)
  spe, total_steps = exp.steps_per_epoch, exp.total_steps
  state = placement.put_state(host_state)
  step_kw = dict(l2=config.l2, ema_decay=config.ema_decay, augment=exp.augment_fn(),
                 axis_name=placement.axis_name,
                 needs_value_fn=optim.needs_value_fn(config.optimizer))
  mon = None
  if config.monitor.enabled:
    from jrecipe.monitor.recorder import Monitor
    mon = Monitor(exp, workdir, writer, placement, params=host_state.params, primary=primary,
                  total_steps=total_steps,
                  resume_step=start_step if restored is not None else None)
    if mon.every:  # the same step, plus per-leaf norms on cadence steps (lax.cond)
      step_kw.update(monitor=True, monitor_every=mon.every, monitor_last=total_steps)
  train_step = placement.compile_train(step_lib.make_train_step(exp.model, exp.loss, tx,
                                                                **step_kw))
  watched = mon is not None and mon.every > 0
  step_losses = config.monitor.enabled and config.monitor.step_losses
  evaluator = Evaluator(exp, placement)
  ema = config.ema_decay > 0

  if restored is None:
    init_eval = evaluator(variables_of(state), "validation")
    chance = exp.loss.chance(exp.spec.num_classes, exp.data.arrays["train"]["y"])
    log.info("Loss at init on validation: %.4f (expected about %.4f at chance: "
             "'verify the loss at init').", init_eval["loss"], chance)
    writer.write(0, {**init_eval, "expected_loss_at_init": chance}, split="validation",
                 epoch=0.0)
    if mon is not None:
      mon.at_init(host_state, state)

  batches = pipeline.train_batches(exp.data, batch_size=config.batch_size, seed=config.seed,
                                   start_step=start_step, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  es = meta["early_stopping"]
  pending: list = []
  epoch_acc: dict[str, float] = {}
  epoch_n = 0
  stop_reason = None
  t_start = time.perf_counter()
  t_first = None
  progress = _progress(config, total_steps, start_step, primary)

  def flush_pending(step):
    nonlocal pending, epoch_n
    if not pending:
      return
    series = jax.tree.map(lambda *xs: jnp.stack(xs), *pending)
    stacked = jax.tree.map(jnp.mean, series)
    per_step = None
    if step_losses and placement.mode == "pmap":  # [steps, devices]: first replica's copies
      per_step = np.array([np.ravel(v)[0] for v in jax.device_get(
          [m["loss"].addressable_data(0) for m in pending])])
    elif step_losses:  # the stacked losses are already there: one more transfer
      stacked["_steps"] = series["loss"]
    host = placement.metrics_to_host(stacked)
    per_step = host.pop("_steps", per_step)
    for k, v in host.items():
      epoch_acc[k] = epoch_acc.get(k, 0.0) + float(v) * len(pending)
    epoch_n += len(pending)
    writer.write(step, host, split="train", epoch=step / spe)
    if per_step is not None:  # 'training loss per step' (noise, hockey sticks) in one line
      first = step - len(pending) + 1
      writer.write(step, {"first_step": first, "loss": np.asarray(per_step).ravel().tolist()},
                   split="train_steps", epoch=step / spe, tensorboard=False)
    pending = []
    bad = int(np.asarray(placement.host_state(state.bad_step)))
    if bad >= 0:
      good = placement.host_state(state)
      msg = _nonfinite_report(exp, good, bad, config.batch_size)
      if config.debug_nans:
        msg += " " + _debug_nans(exp, good, bad, config.batch_size)
      writer.write(step, {"nonfinite_step": bad}, split="events")
      if mon is not None:
        mon.finish()  # diagnoses ('exploding or NaN') and the report of the failed run
      writer.close()
      ckpt.close()
      raise RunFailure(msg)

  with _Preemption() as preempt:
    step = start_step
    while step < total_steps:
      state, metrics = train_step(state, placement.put_batch(next(batches)))
      if watched:
        norms = metrics.pop("monitor")
        if mon.due(step + 1):  # the only steps whose norms are read (and were computed)
          mon.log_step(step + 1, norms, epoch=(step + 1) / spe)
      step += 1
      preempt.poll(step)
      if t_first is None:
        jax.block_until_ready(metrics)
        t_first = time.perf_counter()
      pending.append(metrics)
      if progress is not None:
        progress.update(1)
      epoch_end = step % spe == 0 or step == total_steps
      if step % config.log_every_steps == 0 or epoch_end:
        flush_pending(step)
      if mon is not None and mon.probe_due(step):
        mon.probe(step, state)
      if epoch_end or preempt.requested:
        epoch = step / spe
        record = {}
        if epoch_end:
          if epoch_n:
            writer.write(step, {k: v / epoch_n for k, v in epoch_acc.items()},
                         split="train_epoch", epoch=epoch)
          epoch_acc.clear()
          epoch_n = 0
          val = evaluator(variables_of(state), "validation")
          writer.write(step, val, split="validation", epoch=epoch)
          record = {"val_loss": val["loss"]}
          if ema:
            writer.write(step, evaluator(variables_of(state, ema=True), "validation"),
                         split="validation_ema", epoch=epoch)
          if mon is not None:
            mon.after_eval(step, epoch, state, epoch_index=int(round(epoch)),
                           last=step == total_steps)
          if progress is not None:
            progress.set_postfix(val_loss=f"{val['loss']:.4f}",
                                 val_acc=f"{val.get('accuracy', float('nan')):.4f}")
          if config.plateau.enabled:
            scale = plateau.update(val["loss"])
            state = state.replace(lr_scale=placement.put_state(np.float32(scale)))
          if es["best"] is None or val["loss"] < es["best"]:
            es["best"], es["bad_epochs"] = val["loss"], 0
          else:
            es["bad_epochs"] += 1
          if config.early_stopping_patience and es["bad_epochs"] >= config.early_stopping_patience:
            stop_reason = (f"early stopping: validation loss did not improve for "
                           f"{es['bad_epochs']} epochs")
        meta = {"epoch": epoch, "early_stopping": es, "plateau": plateau.state_dict()}
        last = step == total_steps or stop_reason or preempt.requested
        every = config.checkpoint.every_epochs
        if last or (epoch_end and every and round(epoch) % every == 0):
          ckpt.save(step, placement.host_state(state), meta, record.get("val_loss"))
        if preempt.requested:
          stop_reason = "preempted (SIGTERM): checkpoint saved; rerun to resume"
        if stop_reason:
          break
  flush_pending(step)
  train_seconds = time.perf_counter() - t_start
  if progress is not None:
    progress.close()

  summary = {"step": step, "epoch": step / spe, "stopped": stop_reason,
             "train_seconds": round(train_seconds, 3),
             "first_step_seconds": round((t_first or time.perf_counter()) - t_start, 3),
             "checkpoints": ckpt.list_checkpoints() if primary else []}
  if not (preempt.requested):
    splits = ["validation"] + (["test"] if "test" in exp.data.arrays else [])
    for split in splits:
      summary[split] = evaluator(variables_of(state), split)
      if ema:
        summary[f"{split}_ema"] = evaluator(variables_of(state, ema=True), split)
      writer.write(step, summary[split], split=f"final_{split}", epoch=step / spe)
  ckpt.close()
  if primary:
    write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  if mon is not None and not preempt.requested:
    t0 = time.perf_counter()
    mon.finish()
    log.debug("Diagnoses and report: %.2f s", time.perf_counter() - t0)
  writer.close()
  return summary


def _progress(config, total, start, primary):
  if not (config.progress and primary):
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=True,
              mininterval=0.5)


def run_mode(config: ml_collections.ConfigDict, workdir: str, options=None) -> int:
  """`--mode=train`: `train_and_evaluate`, with the command line's --allow_config_change."""
  allow = bool(options and options.allow_config_change)
  train_and_evaluate(config, workdir, allow_config_change=allow)
  return 0
