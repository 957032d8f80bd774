"""`--mode=search_worker`: one worker of a search (CS231n: 'a worker samples random
hyperparameters, trains, tracks validation, writes checkpoints with the score in the name').

    jrecipe --mode=search_worker --config=configs/<name>.py --workdir=DIR \\
        --config.search.space='...' --config.search.storage=postgresql+psycopg://...

The master (`--mode=search`) launches these; on other machines, start them by hand with the
same config, the same study name and a shared database URL (the trial directories go to their
own DIR). A worker repeatedly takes a trial of the current stage from the study, trains it with
`train_and_evaluate` in `DIR/trials/running_stage<k>_trial<n>/`, and renames that directory to
`<metric>_stage<k>_trial<n>` (e.g. `0.9815_stage1_trial0007`) so `ls` sorts the progress, or
`diverged_...` / `error_...`. It exits when every stage is finished, or after its trial when
the master that started it is gone.

A trial diverges when the loss is not finite (train_and_evaluate's RunFailure) or when a logged
train loss exceeds `search.explode_factor` x the loss at init: a watcher thread then asks the
training loop to stop (its SIGTERM path: stop after the step, checkpoint) and the trial is
recorded PRUNED, status 'diverged'. The same thread writes the trial's heartbeat. With
`search.pruner` ('median' or 'successive_halving') the trial's training reports its
validation metric after each evaluation (PruneHook); a trial the pruner stops is recorded
PRUNED, status 'pruned', in `pruned_stage<k>_trial<n>/`: done, not a failure, not requeued.
"""

import importlib
import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
from typing import Optional

import ml_collections

from jrecipe.errors import RunFailure, UserError
from jrecipe.search import study as study_lib

log = logging.getLogger("jrecipe")
ENV_MASTER = "JRECIPE_SEARCH_MASTER_PID"
POLL_SECONDS = 0.5


# Trial directories the study does not count: the worker was killed (the trial was rerun,
# possibly after it wrote a full result), its result dropped, the run diverged or failed, or it
# is still running. A completed trial's directory is named with its score.
UNCOUNTED_STATUSES = ("running", "killed", "dropped", "diverged", "error", "pruned")


def is_counted_trial_dir(name: str) -> bool:
  """Whether a trials/ directory name is one the study counts (not `UNCOUNTED_STATUSES`)."""
  return not name.startswith(tuple(f"{s}_" for s in UNCOUNTED_STATUSES))


def trial_dir_name(status: str, stage: int, number: int, value: Optional[float] = None) -> str:
  """'0.9815_stage1_trial0007' for a finished trial, else '<status>_stage1_trial0007'."""
  tag = f"stage{stage + 1}_trial{number:04d}"
  if status == "complete" and value is not None and math.isfinite(value):
    return f"{value:.4f}_{tag}"
  return f"{status}_{tag}"


class _Watcher(threading.Thread):
  """Heartbeat of the running trial, and the exploding-loss check on its metrics.jsonl."""

  def __init__(self, storage, trial_id: int, trial_dir: str, explode_factor: float,
               heartbeat: float, can_signal: bool):
    super().__init__(daemon=True)
    self.storage, self.trial_id, self.trial_dir = storage, trial_id, trial_dir
    self.explode_factor, self.heartbeat, self.can_signal = explode_factor, heartbeat, can_signal
    self.stop = threading.Event()
    self.exploded: Optional[str] = None
    self._pos = 0
    self._init_loss: Optional[float] = None

  def run(self):
    last_beat = 0.0
    while not self.stop.wait(POLL_SECONDS):
      now = time.monotonic()
      if now - last_beat >= self.heartbeat:
        try:
          self.storage.record_heartbeat(self.trial_id)
        except Exception as e:  # a database hiccup must not kill the trial
          log.warning("search: heartbeat failed: %s", e)
        last_beat = now
      if self.exploded is None:
        self._check_explosion()

  def _check_explosion(self):
    import json
    path = os.path.join(self.trial_dir, "metrics.jsonl")
    try:
      with open(path) as f:
        f.seek(self._pos)
        chunk = f.read()
    except OSError:
      return
    end = chunk.rfind("\n")
    if end < 0:
      return
    self._pos += len(chunk[:end + 1].encode())
    for line in chunk[:end].splitlines():
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      loss = r.get("loss")
      if r.get("split") == "validation" and r.get("step") == 0 and isinstance(loss, float):
        self._init_loss = loss
      elif r.get("split") == "train" and self._init_loss is not None:
        if not isinstance(loss, (int, float)) or loss > self.explode_factor * self._init_loss:
          self.exploded = (f"train loss {loss!r} at step {r.get('step')} exceeded "
                           f"{self.explode_factor:g} x the loss at init ({self._init_loss:.4f})")
          if self.can_signal:  # the loop's SIGTERM path: stop after this step, checkpoint
            os.kill(os.getpid(), signal.SIGTERM)
          return


class PruneHook:
  """Reports each new validation metric to the trial; stops the run when the pruner says so.

  A training hook (`jrecipe.train.trainer.Hook`): after every evaluation the metric goes to
  Optuna as the intermediate value of step 1, 2, ... (one per evaluation, the same cadence
  in every trial of a stage, whatever its batch size), and `trial.should_prune()` asks
  `search.pruner` (median or successive halving) whether it can still catch up. A pruned
  run stops after its step (and saves its checkpoint); the trial is recorded 'pruned'.
  """

  name = None

  def __init__(self, trial, metric: str):
    self.trial, self.metric = trial, metric
    self.seen, self.evals = None, 0
    self.pruned: Optional[str] = None

  def begin(self, loop) -> None:
    del loop

  def after_step(self, loop, metrics) -> None:
    del metrics
    val = loop.last_eval
    if val is None or val is self.seen or self.pruned:
      return
    self.seen = val
    value = val.get(self.metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
      return
    self.evals += 1
    self.trial.report(float(value), step=self.evals)
    if self.trial.should_prune():
      self.pruned = (f"pruned after evaluation {self.evals} (epoch {loop.epoch:.3g}): "
                     f"validation {self.metric} {value:.4f}")
      loop.stop(self.pruned)

  def end(self, loop) -> None:
    del loop


class Worker:
  """Takes trials from the study until the search is finished."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.search = study_lib.Search(config, workdir)
    self.trials_dir = os.path.join(self.search.workdir, "trials")
    os.makedirs(self.trials_dir, exist_ok=True)
    self.id = f"{socket.gethostname()}:{os.getpid()}"
    master = os.environ.get(ENV_MASTER, "").strip()
    self.master_pid = int(master) if master.isdigit() else None
    self.stop_requested = False
    importlib.import_module("jrecipe.train.loop")  # slow import: before any heartbeat starts

  def master_gone(self) -> bool:
    return self.master_pid is not None and os.getppid() != self.master_pid

  def run(self, max_trials: Optional[int] = None) -> int:
    """Runs trials until the search is finished (or `max_trials`); returns how many ran."""
    ran = 0
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, self._on_sigterm) if main else None
    try:
      while not self.stop_requested and (max_trials is None or ran < max_trials):
        if self.master_gone():
          log.info("search worker %s: the master is gone; stopping.", self.id)
          break
        st = self.search.current()
        if st is None:
          break
        if not st.can_ask:  # the stage's last trials run elsewhere; the next stage needs them
          time.sleep(POLL_SECONDS)
          continue
        if self.run_one(st.index):
          ran += 1
    finally:
      if main:
        signal.signal(signal.SIGTERM, old)
    return ran

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.stop_requested = True  # outside training: finish cleanly after this trial

  def run_one(self, k: int) -> bool:
    """Asks stage k's study for a trial and runs it; False if the budget was already full."""
    import optuna
    study = self.search.study(k)
    optuna.storages.fail_stale_trials(study)
    params = self.search.stage_params(k)
    trial = study.ask({p.field: p.distribution() for p in params})
    self.search.storage.record_heartbeat(trial._trial_id)  # from now on a dead worker shows
    trial.set_user_attr("worker", self.id)
    budget = self.search.stages[k].trials
    earlier = [t for t in study.get_trials(deepcopy=False)
               if t.number < trial.number and study_lib.trial_status(t) not in
               ("killed", "excess")]
    if len(earlier) >= budget:  # other workers filled the stage meanwhile
      trial.set_user_attr("status", "excess")
      study.tell(trial, state=optuna.trial.TrialState.FAIL)
      return False
    values = self.search.config_values(trial.params, params)
    running = os.path.join(self.trials_dir, trial_dir_name("running", k, trial.number))
    for key, v in (("stage", k + 1), ("epochs", self.search.stages[k].epochs),
                   ("dir", running), ("values", {f: repr(x) for f, x in values.items()})):
      trial.set_user_attr(key, v)
    log.info("search worker %s: stage %d trial %d: %s", self.id, k + 1, trial.number,
             ", ".join(f"{f}={v!r}" for f, v in values.items()))
    status, value, message = self._train(trial, k, values, running)
    final = os.path.join(self.trials_dir, trial_dir_name(status, k, trial.number, value))
    try:
      trial.set_user_attr("dir", final)
      trial.set_user_attr("status", status)
      if message:
        trial.set_user_attr("message", message[:2000])
    except optuna.exceptions.UpdateFinishedTrialError:
      # Failed meanwhile by a stale-heartbeat check (this worker looked dead): its retry
      # runs the same point again, so this result is dropped to keep one record per trial.
      log.warning("search worker %s: trial %d was failed by another process while it ran "
                  "(heartbeat too late); its result is dropped.", self.id, trial.number)
      if os.path.isdir(running):
        os.replace(running, running.replace("running_", "dropped_"))
      return True
    if os.path.isdir(running):
      if os.path.exists(final):
        shutil.rmtree(final)
      os.replace(running, final)
    if status == "complete":
      study.tell(trial, value, skip_if_finished=True)
    elif status in ("diverged", "pruned"):  # done, not a failure: never requeued
      study.tell(trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
    else:
      frozen = study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
      if status == "killed":
        study_lib.requeue(study, frozen, message)
    log.info("search worker %s: stage %d trial %d %s%s", self.id, k + 1, trial.number, status,
             f" {self.search.metric}={value:.4f}" if value is not None else f": {message}")
    return True

  def _train(self, trial, k: int, values: dict, trial_dir: str):
    """(status, value, message) of one training run."""
    from jrecipe.train import loop
    try:
      cfg = self.search.trial_config(values, k)
    except (TypeError, ValueError, KeyError) as e:
      return "error", None, f"cannot apply {values}: {e}"
    if os.path.isdir(trial_dir):  # a leftover of this very trial number: start it afresh
      shutil.rmtree(trial_dir)
    s = self.search.config.search
    main = threading.current_thread() is threading.main_thread()
    watcher = _Watcher(self.search.storage, trial._trial_id, trial_dir, float(s.explode_factor),
                       float(s.heartbeat_seconds), can_signal=main)
    watcher.start()
    prune = PruneHook(trial, self.search.metric) if str(s.pruner) != "none" else None
    try:
      summary = loop.train_and_evaluate(cfg, trial_dir, hooks=[prune] if prune else [])
    except RunFailure as e:  # non-finite loss or gradient
      return "diverged", None, str(e).split(". ")[0]
    except UserError as e:
      return "error", None, str(e)
    finally:
      watcher.stop.set()
      watcher.join()
    if watcher.exploded is None:  # a run shorter than the watcher's poll: read what it missed
      watcher.can_signal = False
      watcher._check_explosion()
    if watcher.exploded:
      self.stop_requested = False  # that SIGTERM was ours (the loop's stop path), not a request
      return "diverged", None, watcher.exploded
    if prune is not None and prune.pruned:
      return "pruned", None, prune.pruned
    val = summary.get("validation", {})
    value = val.get(self.search.metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
      if "validation" not in summary:  # stopped by an outside SIGTERM: not a result
        self.stop_requested = True
        return "killed", None, f"stopped before its end ({summary.get('stopped')})"
      return "error", None, (f"the validation split has no metric {self.search.metric!r} "
                             f"(it has {sorted(val)})")
    return "complete", float(value), ""


def run_mode(config: ml_collections.ConfigDict, workdir: str, options=None) -> int:
  """Entry point of `--mode=search_worker`: runs trials until the search is finished."""
  del options  # this mode takes no command-line options (jrecipe.modes.ModeOptions)
  worker = Worker(config, workdir)
  n = worker.run()
  log.info("search worker %s: ran %d trial(s); exiting.", worker.id, n)
  return 0
