"""`--mode=search`: the master of a random search, coarse to fine (recipe stage 5, 'Tune').

    jrecipe --mode=search --config=configs/digits_mlp.py --workdir=DIR \\
        --config.search.space='optimizer.learning_rate=loguniform(1e-4,1e-1); l2=uniform(0,1e-3)' \\
        --config.search.stages='30x0.5,10x3' --config.search.workers=2

CS231n: 'a master launches and kills workers and inspects their results'. The master launches
`search.workers` local worker processes (`--mode=search_worker`, logs in DIR/workers/), watches
them and the study, and:
- a worker that exits while its trial runs (killed, crashed): the trial is marked FAIL
  (status 'killed') and requeued with the same parameters; a new worker replaces it;
- a worker whose running trial wrote nothing for `search.stuck_seconds` (no new line in its
  metrics.jsonl, no file change): killed (SIGKILL), its trial requeued, a new worker started;
- diverged trials stop themselves (the worker's watcher), and are recorded as 'diverged'.
Running it again on the same DIR resumes the study: finished trials are kept, never repeated;
a trial left RUNNING by a killed master's worker is failed by its stale heartbeat and requeued.
At the end it writes DIR/search.json, DIR/search.csv and DIR/search/*.png (summary.py).
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import ml_collections

from jrecipe.errors import RunFailure, UserError
from jrecipe.search import binding as binding_lib, space as space_lib, study as study_lib
from jrecipe.search import summary as summary_lib, worker as worker_lib
from jrecipe.train import workdir as workdir_lib
from jrecipe.train.writer import write_json_atomic

log = logging.getLogger("jrecipe")
POLL_SECONDS = 1.0


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """DIR/search_config.json: what every worker of this master loads."""
  path = os.path.join(workdir, "search_config.json")
  write_json_atomic(path, workdir_lib.config_dict(config))
  return path


class Master:
  """Launches, watches and replaces the local workers of one search directory."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, new_study: bool = False):
    self.config = config
    n = config.search.workers
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise UserError(f"search.workers must be a positive integer, got {n!r}.")
    self.n = n
    if new_study:  # validated before anything moves; then the old study's files step aside
      space_lib.parse_space(config.search.space, config)
      space_lib.parse_stages(config.search.stages)
      in_dir = not str(config.search.get("storage", "") or "")
      moved = binding_lib.move_aside(os.path.abspath(workdir), sqlite_in_dir=in_dir)
      if moved:
        log.info("search: --new_study: the previous study's files moved to %s.", moved)
    # validates space, stages and storage, and refuses a study of other settings
    self.search = study_lib.Search(config, workdir, fresh=new_study)
    self.workdir = self.search.workdir
    os.makedirs(self.workdir, exist_ok=True)
    self.config_path = _save_config(config, self.workdir)
    self.logs = os.path.join(self.workdir, "workers")
    os.makedirs(self.logs, exist_ok=True)
    self.procs: dict[int, subprocess.Popen] = {}
    self.starts = 0
    self.events: list[dict] = []

  def _cmd(self) -> list[str]:
    saved = os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_config.py")
    return [sys.executable, "-m", "jrecipe", "--mode=search_worker",
            f"--config={saved}:{self.config_path}", f"--workdir={self.workdir}"]

  def spawn(self, slot: int) -> None:
    env = dict(os.environ, **{worker_lib.ENV_MASTER: str(os.getpid())})
    out = open(os.path.join(self.logs, f"worker{slot}.log"), "a")
    self.procs[slot] = subprocess.Popen(self._cmd(), env=env, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    out.close()
    self.starts += 1
    log.info("search: started worker %d (pid %d).", slot, self.procs[slot].pid)

  def _running_of(self, pid: int) -> list[tuple]:
    """(study, frozen trial) of every RUNNING trial owned by the worker process `pid`."""
    out, host = [], socket.gethostname()
    for k in range(len(self.search.stages)):
      study = self.search.study(k)
      for t in study.get_trials(deepcopy=False):
        if t.state.name == "RUNNING" and t.user_attrs.get("worker") == f"{host}:{pid}":
          out.append((study, t))
    return out

  def _requeue_worker(self, pid: int, reason: str) -> None:
    for study, t in self._running_of(pid):
      retry = study_lib.fail_and_requeue(study, t.number, reason)
      now = study._storage.get_trial(t._trial_id)
      if now.state.name == "FAIL" and now.user_attrs.get("status") == "killed":
        self._mark_killed(now)
      event = {"time": time.time(), "trial": t.number, "study": study.study_name,
               "event": reason, "requeued_as": retry}
      self.events.append(event)
      with open(os.path.join(self.logs, "events.jsonl"), "a") as f:  # kept across masters
        f.write(json.dumps(event) + "\n")

  def _mark_killed(self, trial) -> None:
    """Renames a killed trial's directory to 'killed_stageS_trialNNNN'.

    The worker names it 'running_...' and, once trained, with its score; a worker killed
    between naming its result and recording it leaves the scored name (or, a moment earlier,
    still 'running_...') on a trial that is failed and rerun: either is marked killed.
    """
    stage = int(trial.user_attrs.get("stage", 1)) - 1
    trials_dir = os.path.join(self.workdir, "trials")
    killed = os.path.join(trials_dir, worker_lib.trial_dir_name("killed", stage, trial.number))
    running = os.path.join(trials_dir, worker_lib.trial_dir_name("running", stage, trial.number))
    for candidate in (trial.user_attrs.get("dir"), running):
      if candidate and os.path.isdir(candidate) and not os.path.exists(killed):
        os.replace(candidate, killed)
        return

  def _stuck(self, pid: int) -> Optional[str]:
    limit = float(self.config.search.stuck_seconds)
    for _, t in self._running_of(pid):
      d = t.user_attrs.get("dir")
      started = t.datetime_start.timestamp() if t.datetime_start else time.time()
      newest = started
      if d and os.path.isdir(d):
        for root, _, files in os.walk(d):
          for f in files:
            try:
              newest = max(newest, os.path.getmtime(os.path.join(root, f)))
            except OSError:
              pass
      if time.time() - newest > limit:
        return f"stuck: trial {t.number} wrote nothing for {time.time() - newest:.0f} s"
    return None

  def watch(self) -> None:
    """Until every stage is finished: replace dead workers, kill stuck ones, requeue trials."""
    import optuna
    for slot in range(self.n):
      self.spawn(slot)
    max_starts = 4 * self.n + 4  # a worker that keeps crashing is a bug, not bad luck
    while True:
      time.sleep(POLL_SECONDS)
      for k in range(len(self.search.stages)):
        optuna.storages.fail_stale_trials(self.search.study(k))
      finished = self.search.current() is None
      for slot, p in list(self.procs.items()):
        code = p.poll()
        if code is None:
          reason = self._stuck(p.pid)
          if reason:
            log.warning("search: worker %d (pid %d) is %s; killing it.", slot, p.pid, reason)
            p.kill()
            p.wait()
            self._requeue_worker(p.pid, reason)
            code = "killed"
          else:
            continue
        else:
          self._requeue_worker(p.pid, f"worker pid {p.pid} exited with status {code}")
        del self.procs[slot]
        if code == 2:
          raise UserError(f"A search worker stopped on a configuration error; see "
                          f"{os.path.join(self.logs, f'worker{slot}.log')}:\n"
                          f"{_tail(os.path.join(self.logs, f'worker{slot}.log'))}")
        if not finished:
          if self.starts >= max_starts:
            raise RunFailure(f"search: workers were started {self.starts} times and keep dying; "
                             f"see the logs in {self.logs}.")
          if code not in (0, "killed"):
            log.warning("search: worker %d exited with status %s; restarting it.", slot, code)
          self.spawn(slot)
      if finished and not self.procs:
        return

  def stop(self) -> None:
    for p in self.procs.values():
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    for p in self.procs.values():
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()


def _read_events(logs: str) -> list[dict]:
  """Every master's events (kills, requeues) of this search directory."""
  out = []
  try:
    with open(os.path.join(logs, "events.jsonl")) as f:
      for line in f:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          pass
  except OSError:
    pass
  return out


def _tail(path: str, n: int = 15) -> str:
  try:
    with open(path) as f:
      return "".join(f.readlines()[-n:])
  except OSError:
    return ""


def run_mode(config: ml_collections.ConfigDict, workdir: str, options=None) -> int:
  """Entry point of `--mode=search`: runs (or resumes) the search and writes its summary.

  `options.new_study` (the --new_study flag) moves the directory's current study aside and
  starts a clean one; without it, a study of other settings is refused (binding.py).
  """
  master = Master(config, workdir, new_study=bool(getattr(options, "new_study", False)))
  before = {k: master.search.status(k).done for k in range(len(master.search.stages))}
  if any(before.values()):
    log.info("search: resuming %s: %s finished trial(s) per stage already.",
             master.search.name, list(before.values()))
  try:
    master.watch()
  except BaseException:  # Ctrl-C, a configuration error in a worker, a bug: stop the workers
    master.stop()
    raise
  result = summary_lib.summarize(master.search, events=_read_events(master.logs))
  for w in result["warnings"]:
    log.warning("search: %s", w)
  best = result.get("best")
  if best:
    log.info("search: best %s %.4f (stage %d trial %d) among the trials of the longest "
             "budget, %g epochs, from any stage: %s. Table: %s", result["metric"],
             best["value"], best["stage"], best["number"], best["epochs"],
             json.dumps(best["params"]), os.path.join(master.workdir, "search.csv"))
  return 0
