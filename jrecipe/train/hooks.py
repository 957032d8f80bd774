"""The hooks of the training loop: small classes with one job each (see `trainer.Hook`).

`--mode=train` composes them in this order (jrecipe.train.loop.train_and_evaluate):

  Preemption       SIGTERM -> stop after this step with a checkpoint (all hosts agree on the step)
  MetricLogger     per-step metrics to metrics.jsonl/TensorBoard at the log cadence, epoch means,
                   and the non-finite guard ('fail fast': the step and the first bad leaf)
  EpochEvaluation  'evaluate on the whole validation split' every epoch (raw and EMA), and the
                   loss at init beside its expected value ('verify loss @ init')
  Progress         a console progress bar with the latest validation numbers
  MonitorHook      babysitting (CS231n): norms, probes, predictions, diagnoses, report
  PatienceHook     early stopping and reduce-on-plateau on the validation loss
  CheckpointHook   orbax checkpoints each `every_epochs`, at the end and at a stop; it saves the
                   state dicts of the stateful hooks inside the checkpoint
  DataPosition     (stateful, no cadence) the input pipeline's position saved with the state:
                   the next global step, the global batch, the seed and the data's fingerprint

Each hook is usable alone (tests/test_hooks.py) and by other modes.
"""

import logging
import signal
import sys
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jrecipe.errors import UserError
from jrecipe.train.trainer import Hook, Loop

log = logging.getLogger("jrecipe")


class Preemption(Hook):
  """Turns SIGTERM (a cloud VM's preemption notice) or a first Ctrl-C (SIGINT) into a stop
  after the current step, with a checkpoint.

  One process: a Python handler sets a flag. A second Ctrl-C stops at once (the last
  committed checkpoint stays intact: `KeyboardInterrupt`, one line and exit 130 at the entry
  point); a first one used to end the run in a KeyboardInterrupt traceback, losing the steps
  since the last checkpoint. Several processes: all of them must stop after the same step,
  or the others would wait forever in the next collective (and in orbax's save barriers).
  JAX's preemption sync manager, started by `jax.distributed.initialize()` with its own
  SIGTERM handler, agrees on that step across hosts; `after_step` asks it every step (0.4 us
  a call). SIGINT is left alone there.
  """

  REASON = "preempted ({}): checkpoint saved; rerun to resume"

  def __init__(self):
    self.requested = False
    self.signal_name = "SIGTERM"
    self._old = {}
    self._multi = jax.process_count() > 1

  def begin(self, loop: Loop) -> None:
    if self._multi:  # keep JAX's handler: replacing it would hide the notice from the others
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handler
        pass

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
      self.end(None)
      raise KeyboardInterrupt
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      sys.stderr.write("jrecipe: Ctrl-C: stopping after this step with a checkpoint (press "
                       "Ctrl-C again to stop at once).\n")

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

  def after_step(self, loop: Loop, metrics: dict) -> None:
    if self.poll(loop.step):
      loop.preempted = True
      loop.stop(self.REASON.format(self.signal_name))

  def end(self, loop: Optional[Loop]) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


class MetricLogger(Hook):
  """Training metrics at the log cadence and epoch means; fails the run on a non-finite step.

  Metrics stay on the device between log steps and come back in one transfer ('a host sync
  every step' is what the admired codebases avoid). Writes split 'train' (means over the
  steps since the last log), 'train_steps' (every step's loss, when `step_losses`) and
  'train_epoch' (means over the epoch). The per-step 'monitor' extras are the monitor's.
  Stateful: a run stopped mid-epoch (preemption) saves the epoch's sums and its not yet
  logged steps in the checkpoint, so the resumed run writes exactly the rows and means an
  uninterrupted run writes.

  Args:
    writer: the run's MetricWriter.
    log_every: steps between 'train' records (epoch ends always log).
    step_losses: also write every step's loss.
    on_nonfinite: `on_nonfinite(loop, bad_step) -> message` for the RunFailure; called when
      the state records a step whose loss or gradient was not finite.
  """

  name = "metric_logger"

  def __init__(self, writer, *, log_every: int, step_losses: bool = False,
               on_nonfinite: Optional[Callable[[Loop, int], str]] = None):
    self.writer, self.log_every, self.step_losses = writer, int(log_every), step_losses
    self.on_nonfinite = on_nonfinite
    self.pending: list = []  # device metrics of the steps since the last log
    self.carried: list = []  # host metrics of such steps taken before a resume
    self.epoch_sum: dict[str, float] = {}
    self.epoch_n = 0
    self._placement = None

  def after_step(self, loop: Loop, metrics: dict) -> None:
    self._placement = loop.trainer.placement
    self.pending.append({k: v for k, v in metrics.items() if k != "monitor"})
    if loop.step % self.log_every == 0 or loop.epoch_end:
      self.flush(loop)
    if loop.epoch_end and loop.failure is None:
      if self.epoch_n:
        self.writer.write(loop.step, {k: v / self.epoch_n for k, v in self.epoch_sum.items()},
                          split="train_epoch", epoch=loop.epoch)
      self.epoch_sum.clear()
      self.epoch_n = 0

  def _device_means(self, placement) -> tuple[dict, Optional[np.ndarray]]:
    """(host means of the pending device metrics, their per-step losses or None)."""
    pending = self.pending
    series = jax.tree.map(lambda *xs: jnp.stack(xs), *pending)
    stacked = jax.tree.map(jnp.mean, series)
    per_step = None
    if self.step_losses and placement.mode == "pmap":  # [steps, devices]: first replica's
      per_step = np.array([np.ravel(v)[0] for v in jax.device_get(
          [m["loss"].addressable_data(0) for m in pending])])
    elif self.step_losses:  # the stacked losses are already there: one more transfer
      stacked["_steps"] = series["loss"]
    host = placement.metrics_to_host(stacked)
    return host, host.pop("_steps", per_step)

  def flush(self, loop: Loop) -> None:
    """Writes the pending steps' means; fails the loop if the state saw a non-finite step."""
    n_new, n_old = len(self.pending), len(self.carried)
    if not n_new + n_old:
      return
    placement, step = loop.trainer.placement, loop.step
    host, per_step = self._device_means(placement) if n_new else ({}, None)
    if n_old:  # steps before a resume: exact means over the whole window
      keys = set(host) | set(self.carried[0])
      host = {k: (sum(float(c[k]) for c in self.carried) + float(host.get(k, 0.0)) * n_new)
              / (n_old + n_new) for k in keys}
      if self.step_losses:
        old = [float(c["loss"]) for c in self.carried]
        per_step = old + (np.asarray(per_step).ravel().tolist() if n_new else [])
    self.pending, self.carried = [], []
    for k, v in host.items():
      self.epoch_sum[k] = self.epoch_sum.get(k, 0.0) + float(v) * (n_new + n_old)
    self.epoch_n += n_new + n_old
    self.writer.write(step, host, split="train", epoch=loop.epoch)
    if per_step is not None:  # 'training loss per step' (noise, hockey sticks) in one line
      self.writer.write(step, {"first_step": step - n_new - n_old + 1,
                               "loss": np.asarray(per_step).ravel().tolist()},
                        split="train_steps", epoch=loop.epoch, tensorboard=False)
    bad = int(np.asarray(placement.host_state(loop.state.bad_step)))
    if bad >= 0:
      self.writer.write(step, {"nonfinite_step": bad}, split="events")
      message = (self.on_nonfinite(loop, bad) if self.on_nonfinite else
                 f"Training stopped: the loss or a gradient was not finite at step {bad}.")
      loop.fail(message)

  def state_dict(self) -> dict:
    """The epoch's sums and every not yet logged step's metrics, as host values."""
    carried = list(self.carried)
    if self.pending:
      carried += [{k: float(v) for k, v in self._placement.metrics_to_host(m).items()}
                  for m in self.pending]
    return {"epoch_sum": dict(self.epoch_sum), "epoch_n": self.epoch_n, "carried": carried}

  def load_state_dict(self, d: dict) -> None:
    self.epoch_sum = {k: float(v) for k, v in d.get("epoch_sum", {}).items()}
    self.epoch_n = int(d.get("epoch_n", 0))
    self.carried = list(d.get("carried", []))

  def end(self, loop: Loop) -> None:
    # A preempted run keeps its unlogged steps in the checkpoint: logging them now would add
    # a row an uninterrupted run does not have.
    if loop.failure is None and not loop.preempted:
      self.flush(loop)


class EpochEvaluation(Hook):
  """'Evaluate on the whole validation split' at every epoch end (raw and EMA parameters).

  On a fresh run (`at_init`) it also evaluates before the first step and logs the measured
  loss beside the loss expected at chance ('verify loss @ init', recipe stage 2).

  Args:
    evaluator: `evaluator(variables, split) -> metrics` (`jrecipe.train.evaluate.Evaluator`).
    writer: the run's MetricWriter.
    ema: also evaluate the EMA parameters.
    at_init: the expected loss at init, to evaluate before the first step; None on a resume.
  """

  def __init__(self, evaluator, writer, *, ema: bool, at_init: Optional[float] = None):
    self.evaluator, self.writer, self.ema, self.at_init = evaluator, writer, ema, at_init

  def begin(self, loop: Loop) -> None:
    if self.at_init is None:
      return
    from jrecipe.train.state import variables_of
    init_eval = self.evaluator(variables_of(loop.state), "validation")
    log.info("Loss at init on validation: %.4f (expected about %.4f at chance: "
             "'verify the loss at init').", init_eval["loss"], self.at_init)
    self.writer.write(0, {**init_eval, "expected_loss_at_init": self.at_init},
                      split="validation", epoch=0.0)

  def after_step(self, loop: Loop, metrics: dict) -> None:
    if not loop.epoch_end:
      return
    from jrecipe.train.state import variables_of
    val = self.evaluator(variables_of(loop.state), "validation")
    self.writer.write(loop.step, val, split="validation", epoch=loop.epoch)
    loop.last_eval = val
    if self.ema:
      self.writer.write(loop.step, self.evaluator(variables_of(loop.state, ema=True),
                                                  "validation"),
                        split="validation_ema", epoch=loop.epoch)


class Progress(Hook):
  """A tqdm progress bar with ETA and the latest validation loss and accuracy."""

  def __init__(self, total: int, initial: int):
    from tqdm import tqdm
    self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True,
                    mininterval=0.5)

  def after_step(self, loop: Loop, metrics: dict) -> None:
    self.bar.update(1)
    if loop.epoch_end and loop.last_eval is not None:
      val = loop.last_eval
      self.bar.set_postfix(val_loss=f"{val['loss']:.4f}",
                           val_acc=f"{val.get('accuracy', float('nan')):.4f}")

  def end(self, loop: Loop) -> None:
    self.bar.close()


class MonitorHook(Hook):
  """Babysitting (CS231n 'Learning'): the `jrecipe.monitor.recorder.Monitor` at its cadence.

  At a fresh start: the parameter overview, a probe and pictures at step 0. After each step:
  the per-leaf norms of monitored steps (computed inside the step by `monitor_norms`), the
  probe when due, prediction dynamics after each evaluation. At the end of a failed run:
  diagnoses and the report (a finished run gets them from train_and_evaluate, after the final
  evaluation, so the report includes it).
  """

  def __init__(self, monitor, *, fresh: bool):
    self.monitor, self.fresh = monitor, fresh

  def begin(self, loop: Loop) -> None:
    if self.fresh:
      self.monitor.at_init(loop.trainer.to_host(loop.state), loop.state)

  def after_step(self, loop: Loop, metrics: dict) -> None:
    mon = self.monitor
    if "monitor" in metrics and mon.due(loop.step):
      mon.log_step(loop.step, metrics["monitor"], epoch=loop.epoch)
    if mon.probe_due(loop.step):
      mon.probe(loop.step, loop.state)
    if loop.epoch_end:
      mon.after_eval(loop.step, loop.epoch, loop.state, epoch_index=int(round(loop.epoch)),
                     last=loop.last_step)

  def end(self, loop: Loop) -> None:
    if loop.failure is not None:
      self.monitor.finish()  # diagnoses ('exploding or NaN') and the report of the failed run


class PatienceHook(Hook):
  """Early stopping and reduce-on-plateau, both on the epoch's validation loss.

  Args:
    early_stopping: a `patience.EarlyStopping` or None.
    plateau: a `patience.PlateauScaler` or None; its scale goes into `state.lr_scale`.
  """

  name = "patience"

  def __init__(self, early_stopping=None, plateau=None):
    self.early_stopping, self.plateau = early_stopping, plateau

  def after_step(self, loop: Loop, metrics: dict) -> None:
    if not loop.epoch_end or loop.last_eval is None:
      return
    val_loss = loop.last_eval["loss"]
    if self.plateau is not None:
      scale = self.plateau.update(val_loss)
      loop.state = loop.state.replace(
          lr_scale=loop.trainer.placement.put_state(np.float32(scale)))
    if self.early_stopping is not None:
      reason = self.early_stopping.update(val_loss)
      if reason:
        loop.stop(reason)

  def state_dict(self) -> dict:
    return {k: t.state_dict() for k, t in (("early_stopping", self.early_stopping),
                                           ("plateau", self.plateau)) if t is not None}

  def load_state_dict(self, d: dict) -> None:
    for k, t in (("early_stopping", self.early_stopping), ("plateau", self.plateau)):
      if t is not None and k in d:
        t.load_state_dict(d[k])


class CheckpointHook(Hook):
  """Orbax checkpoints every `every_epochs` epochs, at the last step and whenever the loop stops.

  The checkpoint holds the TrainState and, beside it, the epoch and the `state_dict()` of each
  stateful hook, so a resumed run continues them exactly. The validation loss of the epoch
  (when evaluated) ranks the checkpoint for keep-best.

  Args:
    checkpointer: a `jrecipe.train.checkpoint.Checkpointer`.
    every_epochs: 0 saves only at the end (and on a stop).
    stateful: hooks whose `state_dict()` is saved under their `name`.
  """

  def __init__(self, checkpointer, *, every_epochs: int, stateful: Sequence[Hook] = ()):
    self.ckpt, self.every, self.stateful = checkpointer, int(every_epochs), list(stateful)

  def meta(self, loop: Loop) -> dict:
    return {"epoch": loop.epoch, **{h.name: h.state_dict() for h in self.stateful}}

  def after_step(self, loop: Loop, metrics: dict) -> None:
    due = loop.epoch_end and self.every and round(loop.epoch) % self.every == 0
    if not (loop.stopping or due):
      return
    val_loss = loop.last_eval["loss"] if loop.epoch_end and loop.last_eval else None
    self.ckpt.save(loop.step, loop.trainer.to_host(loop.state), self.meta(loop), val_loss)

  def end(self, loop: Loop) -> None:
    self.ckpt.wait()  # the owner closes the Checkpointer (it may still list or restore)


def restore_hook_states(meta: dict, hooks: Sequence[Any]) -> None:
  """Loads each stateful hook's saved dict from a checkpoint's meta (missing: left fresh)."""
  for h in hooks:
    if getattr(h, "name", None) and h.name in meta and hasattr(h, "load_state_dict"):
      h.load_state_dict(meta[h.name])


class DataPosition(Hook):
  """The input pipeline's position, saved inside every checkpoint ('fix the random seed').

  Batch k is a pure function of (seed, k) on both pipelines (in memory and streaming), so the
  position is the next global step plus what makes step k mean the same examples: the global
  batch size, the seed and the data's fingerprint (`jrecipe.data.dataset.fingerprint`). On
  resume the saved position must match the run's, so a SIGKILL or a preemption continues at
  the exact next example, whichever pipeline and however many devices or hosts read it; a
  checkpoint whose position points at other examples is refused with a paragraph.

  Args:
    exp: the Experiment (its data and config).
    start_step: the global step the run starts (or resumes) at.
  """

  name = "data"

  def __init__(self, exp, start_step: int):
    from jrecipe.data import dataset
    self.exp, self.step = exp, int(start_step)
    self.position = {"fingerprint": dataset.fingerprint(exp.data),
                     "batch_size": int(exp.config.batch_size), "seed": int(exp.config.seed),
                     "pipeline": "stream" if exp.data.stream is not None else "memory"}

  def after_step(self, loop: Loop, metrics: dict) -> None:
    self.step = loop.step

  def state_dict(self) -> dict:
    return {**self.position, "next_step": self.step}

  def load_state_dict(self, d: dict) -> None:
    for key in ("fingerprint", "batch_size", "seed"):
      if key in d and d[key] != self.position[key]:
        raise UserError(
            f"The checkpoint to resume was written by a run whose data position means other "
            f"examples: its {key} is {d[key]!r}, this run's is {self.position[key]!r}. The "
            "position is a global step, and step k reads the examples that (seed, global "
            "batch size, dataset) give it; with another of them the resumed run would not "
            "continue at the next example. Resume with the original dataset, batch_size and "
            "seed (the device and host counts may change), or start in a new workdir.")
    if "next_step" in d and int(d["next_step"]) != self.step:
      raise UserError(
          f"The checkpoint at step {self.step} records its data position at step "
          f"{d['next_step']}: the checkpoint is inconsistent. Resume from another checkpoint "
          "or start in a new workdir.")
