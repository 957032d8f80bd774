"""`train_and_evaluate(config, workdir)`: the Trainer with every hook, resumable.

Recipe stage 2 ('end-to-end skeleton'): fixed seed, the whole validation split evaluated every
epoch as exact sums over exact counts, the loss at init printed beside its expected value, and a
run that resumes exactly after a kill. Babysitting (CS231n 'Learning'): with
`config.monitor.enabled`, a `jrecipe.monitor.recorder.Monitor` records update/weight ratios,
histograms, filters and prediction dynamics at its cadence, and writes diagnoses.json and
report.html at the end. This function only composes: the loop is `Trainer.run`, each job is a
hook (jrecipe/train/hooks.py).
"""

import logging
import os
import sys
from typing import Any, Optional, Sequence

import jax
import ml_collections

from jrecipe import experiment as experiment_lib
from jrecipe.train import hooks as hooks_lib
from jrecipe.train import nonfinite, parallel, patience
from jrecipe.train import step as step_lib
from jrecipe.train import workdir as workdir_lib
from jrecipe.train.checkpoint import Checkpointer
from jrecipe.train.evaluate import Evaluator
from jrecipe.train.state import param_count, variables_of
from jrecipe.train.trainer import Hook, Trainer
from jrecipe.train.writer import MetricWriter, write_json_atomic

log = logging.getLogger("jrecipe")

# Exit status of a run stopped by SIGTERM (a preemption notice) after saving a checkpoint:
# sysexits.h's EX_TEMPFAIL, "a temporary failure; the user is invited to retry". Distinct from
# 0 (done: a scheduler must not treat the job as finished), 1 (the run failed) and 2 (bad
# input); docs/failures.md shows how Slurm and Kubernetes requeue on it.
EXIT_PREEMPTED = 75


def _monitor_norms(config, total_steps: int):
  """The step's babysitting extra (per-leaf norms on cadence steps), or None when off."""
  every = int(config.monitor.every_steps)
  if not config.monitor.enabled or every <= 0:
    return None
  return step_lib.monitor_norms(every, total_steps)


def _patience(config) -> hooks_lib.PatienceHook:
  es = (patience.EarlyStopping(config.early_stopping_patience)
        if config.early_stopping_patience else None)
  plateau = (patience.PlateauScaler(factor=config.plateau.factor,
                                    patience=config.plateau.patience,
                                    min_scale=config.plateau.min_scale)
             if config.plateau.enabled else None)
  return hooks_lib.PatienceHook(es, plateau)


def _final_evaluation(exp, evaluator, loop, writer) -> dict:
  """Validation and test at the end (raw and EMA): the numbers the run is judged by."""
  out = {}
  ema = exp.config.ema_decay > 0
  for split in ["validation"] + (["test"] if "test" in exp.data.arrays else []):
    out[split] = evaluator(variables_of(loop.state), split)
    if ema:
      out[f"{split}_ema"] = evaluator(variables_of(loop.state, ema=True), split)
    writer.write(loop.step, out[split], split=f"final_{split}", epoch=loop.epoch)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       exp: Optional[experiment_lib.Experiment] = None,
                       allow_config_change: bool = False,
                       hooks: Sequence[Hook] = ()) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint) and returns the summary.

  Writes config.json, metrics.jsonl, TensorBoard events, checkpoints/ and summary.json.
  Process 0 writes, holding the work directory's lock (`workdir.locked`: a second process
  gets a UserError naming it); every process computes.

  Args:
    config, workdir: the run.
    exp: the Experiment, if already built from `config`.
    allow_config_change: resume a work directory whose config.json differs.
    hooks: your own hooks (`jrecipe.train.trainer.Hook`), run after evaluation and the
      monitor and before patience and checkpointing (so a stop they ask for is saved).
  """
  primary = jax.process_index() == 0
  placement = parallel.make_placement(config.parallel.mode, config.parallel.num_devices)
  parallel.check_batch_divisible(config.batch_size, placement)
  exp = exp or experiment_lib.build(config, bn_axis_name=placement.axis_name)
  with workdir_lib.locked(workdir, enabled=primary):
    workdir_lib.prepare(workdir, config, allow_config_change=allow_config_change,
                        primary=primary)
    return _train(config, exp, placement, workdir, list(hooks), primary)


def _train(config, exp, placement, workdir: str, user_hooks: list,
           primary: bool) -> dict[str, Any]:
  """The body of `train_and_evaluate`, inside the work directory's lock."""
  trainer = Trainer.from_experiment(exp, placement,
                                    extra_metrics=_monitor_norms(config, exp.total_steps))
  host_state = trainer.initial_state()
  ckpt = Checkpointer(workdir, keep_best=config.checkpoint.keep_best)
  restored = ckpt.restore(host_state, commit=False)
  start_step, fresh, meta = 0, restored is None, {}
  position = hooks_lib.DataPosition(exp, 0 if fresh else restored[2])
  if not fresh:  # a checkpoint whose data position means other examples is refused before
    # config.json or metrics.jsonl is touched (a damaged config.json cannot refuse a seed)
    hooks_lib.restore_hook_states(restored[1], [position])
  ckpt.commit()
  if fresh:
    if primary and exp.init_from_report:
      from jrecipe.train import init_from
      init_from.write_report(workdir, exp.init_from_report)  # restored, skipped, fresh
    log.info("Model %s: %s parameters.", exp.model.name, f"{param_count(host_state.params):,}")
  else:
    host_state, meta, start_step = restored
    log.info("Resuming from the checkpoint at step %d (epoch %s).", start_step, meta["epoch"])
  writer = MetricWriter(workdir, enabled=primary, resume_step=None if fresh else start_step)
  try:
    evaluator = Evaluator(exp, placement)
    hooks, monitor = _hooks(config, exp, trainer, ckpt, writer, evaluator, user_hooks, workdir,
                            host_state=host_state, meta=None if fresh else meta,
                            start_step=start_step, primary=primary, position=position)
    try:
      loop = trainer.run(trainer.to_device(host_state), start_step=start_step,
                         end_step=exp.total_steps, hooks=hooks)
      summary = {"step": loop.step, "epoch": loop.epoch, "stopped": loop.stop_reason,
                 "preempted": loop.preempted,
                 "train_seconds": round(loop.t_end - loop.t_start, 3),
                 "first_step_seconds": round((loop.t_first or loop.t_start) - loop.t_start, 3),
                 "checkpoints": ckpt.list_checkpoints() if primary else []}
      if not loop.preempted:
        summary.update(_final_evaluation(exp, evaluator, loop, writer))
    finally:
      ckpt.close()
    if primary:
      write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    if monitor is not None and not loop.preempted:
      monitor.finish()
  finally:
    writer.close()
  return summary


def _hooks(config, exp, trainer, ckpt, writer, evaluator, user_hooks, workdir, *, host_state,
           meta: Optional[dict], start_step: int, primary: bool, position):
  """(the hooks of a training run in their order, the Monitor or None); `meta` None: fresh;
  `position`: the DataPosition hook, already restored from `meta`."""
  fresh = meta is None
  chance = exp.loss.chance(exp.spec.num_classes, exp.data.arrays["train"]["y"])

  def on_nonfinite(loop, bad_step):
    return nonfinite.report(trainer, trainer.to_host(loop.state), bad_step,
                            debug_nans=config.debug_nans)

  patience_hook = _patience(config)
  logger = hooks_lib.MetricLogger(writer, log_every=config.log_every_steps,
                                  step_losses=config.monitor.enabled
                                  and config.monitor.step_losses,
                                  on_nonfinite=on_nonfinite)
  stateful = [patience_hook, logger, position]
  if not fresh:
    hooks_lib.restore_hook_states(meta, [patience_hook, logger])
  from jrecipe.profile import ProfileHook  # --config.profile.steps: first, so it times the step
  profiler = ProfileHook.from_config(config, workdir, writer) if primary else None
  hooks = [*([profiler] if profiler else []), hooks_lib.Preemption(), logger,
           hooks_lib.EpochEvaluation(evaluator, writer, ema=config.ema_decay > 0,
                                     at_init=chance if fresh else None)]
  if config.progress and primary:
    hooks.append(hooks_lib.Progress(exp.total_steps, start_step))
  monitor = None
  if config.monitor.enabled:
    from jrecipe.monitor.recorder import Monitor
    monitor = Monitor(exp, workdir, writer, trainer.placement, params=host_state.params,
                      primary=primary, total_steps=exp.total_steps,
                      resume_step=None if fresh else start_step)
    hooks.append(hooks_lib.MonitorHook(monitor, fresh=fresh))
  hooks += [*user_hooks, patience_hook, position,
            hooks_lib.CheckpointHook(ckpt, every_epochs=config.checkpoint.every_epochs,
                                     stateful=stateful)]
  return hooks, monitor


def _metric_text(m: dict) -> str:
  acc, bpb = m.get("accuracy"), m.get("bits_per_byte")
  return (f"loss {m['loss']:.4f}" + (f", accuracy {100 * acc:.2f}%" if acc is not None else "")
          + (f", {bpb:.3f} bits per byte" if bpb is not None else ""))


def print_results(summary: dict) -> None:
  """The numbers a run is judged by, on stdout: final validation and test, raw and EMA."""
  parts = []
  for split in ("validation", "test"):
    if split in summary:
      text = f"{split} {_metric_text(summary[split])}"
      if f"{split}_ema" in summary:
        text += f" (EMA: {_metric_text(summary[f'{split}_ema'])})"
      parts.append(text)
  stopped = f"; stopped: {summary['stopped']}" if summary.get("stopped") else ""
  print(f"jrecipe: step {summary['step']} (epoch {summary['epoch']:.4g}): "
        f"{'; '.join(parts)}{stopped}", flush=True)


def run_mode(config: ml_collections.ConfigDict, workdir: str, options=None) -> int:
  """`--mode=train`: `train_and_evaluate`, with the command line's --allow_config_change.

  Returns 0 when the run finished (or stopped early on purpose), and `EXIT_PREEMPTED` (75)
  when a SIGTERM or a first Ctrl-C stopped it with a checkpoint: not finished, resumable by
  rerunning.
  """
  allow = bool(options and options.allow_config_change)
  summary = train_and_evaluate(config, workdir, allow_config_change=allow)
  if summary.get("preempted"):
    name = "SIGINT" if "(SIGINT)" in str(summary.get("stopped")) else "SIGTERM"
    sys.stderr.write(f"jrecipe: preempted ({name}) at step {summary['step']}: checkpoint "
                     f"saved in {workdir}; rerun the same command to resume (exit status "
                     f"{EXIT_PREEMPTED}).\n")
    return EXIT_PREEMPTED
  print_results(summary)
  return 0
