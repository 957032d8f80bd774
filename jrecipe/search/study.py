"""The shared state of a search: one Optuna study per stage in a real database.

Storage is Optuna's RDB storage: `sqlite:///DIR/study.db` by default (embedded, one machine),
or a PostgreSQL URL (`postgresql+psycopg://user:pw@host:port/db`) that workers on several
machines join. Each stage k is the study `<name>.stage<k>`; a stage's budget counts its
finished trials (complete, diverged, or errors of the user's config), so a trial whose worker
died does not use up the budget: it is marked FAIL and requeued with the same parameters
(a new trial number, `retry_of` naming the old one), at most `search.max_retries` times.

Trial states: COMPLETE (value = validation metric), PRUNED with user attr status='diverged'
(non-finite or exploding loss), PRUNED with status='pruned' (stopped early by
`search.pruner`; counts as done, never requeued), FAIL with status='error' (a UserError in
this trial's config; counts as done), FAIL with status='killed' or a stale heartbeat (requeued), FAIL with
status='excess' (a worker asked for a trial after the budget was filled by others; ignored).
"""

import dataclasses
import logging
import math
import os
import time
import zlib
from typing import Any, Callable, Optional, Sequence

import ml_collections
import numpy as np

from jrecipe.errors import RunFailure, UserError
from jrecipe.search import binding as binding_lib, space as space_lib

log = logging.getLogger("jrecipe")

DONE_STATUSES = ("complete", "diverged", "error", "pruned")


def storage_url(config: ml_collections.ConfigDict, workdir: str) -> str:
  url = str(config.search.get("storage", "") or "")
  return url or f"sqlite:///{os.path.abspath(workdir)}/study.db"


def redact(url: str) -> str:
  """The URL without its password (for search.json and logs)."""
  import re
  return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def open_storage(url: str, heartbeat_seconds: int = 5):
  """Optuna's RDBStorage with heartbeats (a stale running trial is failed, then requeued)."""
  import optuna
  import sqlalchemy
  quiet_optuna()
  engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {
      "pool_pre_ping": True}
  if url.startswith("sqlite:///"):
    os.makedirs(os.path.dirname(os.path.abspath(url[len("sqlite:///"):])), exist_ok=True)
    _check_sqlite(url[len("sqlite:///"):])
  hb = max(1, int(heartbeat_seconds))
  for attempt in range(5):  # concurrent first contact may race on table creation
    try:
      return optuna.storages.RDBStorage(
          url, engine_kwargs=engine_kwargs, heartbeat_interval=hb, grace_period=10 * hb,
          heartbeat_stale_trial_callback=_stale_callback)
    except (sqlalchemy.exc.ArgumentError, ImportError, ModuleNotFoundError) as e:
      raise UserError(f"search.storage {redact(url)!r} is not a usable database URL ({e}). "
                      "Valid: '' (sqlite:///DIR/study.db), sqlite:///PATH, or "
                      "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE.") from e
    except sqlalchemy.exc.OperationalError as e:
      if attempt == 4 or not url.startswith("sqlite"):
        raise UserError(f"Cannot connect to the search database {redact(url)!r}: "
                        f"{str(e).splitlines()[0]}. Check that the server runs and the URL "
                        "(user, password, host, port, database) is right.") from e
      time.sleep(0.5 + attempt)
    except sqlalchemy.exc.IntegrityError:
      time.sleep(0.2 + attempt * 0.3)
    except sqlalchemy.exc.DatabaseError as e:  # after its subclasses above
      damaged = any(sign in str(e) for sign in ("malformed", "not a database"))
      if not (url.startswith("sqlite") and damaged):
        raise
      raise RunFailure(_damaged_db(redact(url), e)) from e
  raise AssertionError("unreachable")


def _damaged_db(where: str, error) -> str:
  return (f"The search database {where} is damaged ({str(error).splitlines()[0]}). It is left "
          "as it was, and so are the trials' directories (each finished trial's summary.json "
          "is in trials/). Restore the database from a copy, or rerun with --new_study to start "
          "a clean study here (the old study's trials and files move to old_studies/).")


def _check_sqlite(path: str) -> None:
  """SQLite's own structural check of an existing study database (read only, milliseconds for a
  study's size): a truncated or overwritten file, or flipped bytes in its pages, made Optuna's
  first query raise a traceback, or passed unnoticed and were written to (measured)."""
  import sqlite3
  if not os.path.isfile(path) or os.path.getsize(path) == 0:
    return
  try:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    try:
      rows = con.execute("PRAGMA quick_check").fetchall()
    finally:
      con.close()
  except sqlite3.DatabaseError as e:
    if "locked" in str(e) or "busy" in str(e):
      return  # another worker is writing: its transactions are SQLite's to keep consistent
    raise RunFailure(_damaged_db(path, e)) from e
  if rows != [("ok",)]:
    raise RunFailure(_damaged_db(path, "; ".join(str(r[0]) for r in rows[:3])))


def quiet_optuna() -> None:
  """Optuna's per-study INFO lines and 'experimental' warnings (heartbeats) off the console."""
  import warnings
  import optuna
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
  warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


def _stale_callback(study, frozen) -> None:
  """Optuna found a running trial without a heartbeat (its worker died): requeue it."""
  requeue(study, frozen, reason="stale heartbeat (worker died or lost the database)")


def requeue(study, frozen, reason: str) -> Optional[int]:
  """Enqueues the failed trial `frozen` again with the same parameters, unless its retries
  are used up; returns the retry's trial number (None when not retried)."""
  import optuna
  retries = int(frozen.user_attrs.get("retries", 0))
  max_retries = int(study.user_attrs.get("max_retries", 2))
  if retries >= max_retries:
    log.warning("search: trial %d of %s failed (%s) after %d retries: not requeued.",
                frozen.number, study.study_name, reason, retries)
    return None
  study.enqueue_trial(frozen.params, user_attrs={"retry_of": frozen.number,
                                                 "retries": retries + 1,
                                                 "retry_reason": reason})
  waiting = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))]
  log.warning("search: trial %d of %s failed (%s): requeued as trial %d.", frozen.number,
              study.study_name, reason, waiting[-1].number if waiting else -1)
  return waiting[-1].number if waiting else None


def fail_and_requeue(study, number: int, reason: str) -> Optional[int]:
  """Marks the RUNNING trial `number` FAIL (status 'killed') and requeues it."""
  import optuna
  storage = study._storage
  trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
  try:
    storage.set_trial_user_attr(trial_id, "status", "killed")
    storage.set_trial_user_attr(trial_id, "message", reason)
    if not storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
      return None
  except optuna.exceptions.UpdateFinishedTrialError:
    return None  # its worker (or Optuna's stale check) finished it first
  return requeue(study, storage.get_trial(trial_id), reason)


class NumberSeededSampler:
  """Random search whose trial number n always draws the same values (any worker, any order).

  Each value comes from a generator seeded by (config.seed, stage, trial number, field), so a
  resumed or re-run search samples exactly the same trials, and two workers never draw the same
  point by sharing a seed. Log-scaled ranges are uniform in the log (even over decades).
  """

  def __new__(cls, seed: int, stage: int):
    def draw(number: int, name: str, dist) -> Any:
      return sample_value(np.random.default_rng([seed, stage, number, zlib.crc32(name.encode())]),
                          dist)
    return _per_trial_sampler(draw)


def _per_trial_sampler(draw: Callable[[int, str, Any], Any]):
  """An Optuna sampler whose every value is `draw(trial number, field, distribution)`: no state
  shared between workers, so a trial number always gets the same point."""
  import optuna

  class _Sampler(optuna.samplers.BaseSampler):

    def infer_relative_search_space(self, study, trial):
      return {}

    def sample_relative(self, study, trial, search_space):
      return {}

    def sample_independent(self, study, trial, name, dist):
      return draw(trial.number, name, dist)

  return _Sampler()


def sample_value(rng: np.random.Generator, dist) -> Any:
  """One draw of an Optuna distribution: log-uniform in log space, ints inclusive."""
  import optuna
  d = optuna.distributions
  if isinstance(dist, d.CategoricalDistribution):
    return dist.choices[int(rng.integers(len(dist.choices)))]
  if isinstance(dist, d.FloatDistribution):
    if dist.log:
      return float(math.exp(rng.uniform(math.log(dist.low), math.log(dist.high))))
    return float(rng.uniform(dist.low, dist.high))
  if isinstance(dist, d.IntDistribution):
    if dist.log:  # uniform in log over [low - 0.5, high + 0.5], rounded: even per decade
      v = math.exp(rng.uniform(math.log(dist.low - 0.5 if dist.low > 0.5 else dist.low),
                               math.log(dist.high + 0.5)))
      return int(min(max(round(v), dist.low), dist.high))
    return int(rng.integers(dist.low, dist.high + 1))
  raise TypeError(f"unsupported distribution {dist!r}")


class QuasiRandomSampler:
  """Quasi-random search (the Deep Learning Tuning Playbook's default for exploration).

  Trial number n takes point n of a scrambled Sobol sequence in [0, 1)^d, d = the fields of
  the space, scrambled by a generator seeded with (config.seed, stage): the points fill the
  space more evenly than random draws, and any worker, in any order, gets the same point for
  the same trial number (Optuna's QMCSampler counts samples in a study attribute that two
  workers can read at once, and draws its first trial at random). Each coordinate maps onto
  its field's own scale: uniform in the log for log-scaled ranges, equal-width bins for
  integers and choices.
  """

  def __new__(cls, seed: int, stage: int, fields: Sequence[str]):
    fields = list(fields)

    def draw(number: int, name: str, dist) -> Any:
      return from_unit(quasi_point(seed, stage, len(fields), number)[fields.index(name)], dist)
    return _per_trial_sampler(draw)


def quasi_point(seed: int, stage: int, dims: int, number: int) -> np.ndarray:
  """Point `number` of the scrambled Sobol sequence of (seed, stage) in [0, 1)^dims."""
  import warnings
  from scipy.stats import qmc
  sobol = qmc.Sobol(d=max(1, dims), scramble=True, seed=np.random.default_rng([seed, stage]))
  with warnings.catch_warnings():  # balance properties need 2^m points; one point is asked
    warnings.simplefilter("ignore")
    if number:
      sobol.fast_forward(number)
    return sobol.random(1)[0]


def from_unit(u: float, dist) -> Any:
  """The value of an Optuna distribution at position u in [0, 1) of its own scale."""
  import optuna
  d = optuna.distributions
  if isinstance(dist, d.CategoricalDistribution):
    return dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
  if isinstance(dist, d.FloatDistribution):
    if dist.log:
      return float(math.exp(math.log(dist.low) + u * (math.log(dist.high) - math.log(dist.low))))
    return float(dist.low + u * (dist.high - dist.low))
  if isinstance(dist, d.IntDistribution):
    if dist.log:
      lo, hi = math.log(dist.low - 0.5 if dist.low > 0.5 else dist.low), math.log(dist.high + 0.5)
      return int(min(max(round(math.exp(lo + u * (hi - lo))), dist.low), dist.high))
    return int(min(dist.low + int(u * (dist.high - dist.low + 1)), dist.high))
  raise TypeError(f"unsupported distribution {dist!r}")


def make_sampler(name: str, seed: int, stage: int, fields: Sequence[str] = ()):
  """The Optuna sampler of `search.sampler` for stage `stage` (0-based) of a search."""
  import optuna
  if name == "random":
    return NumberSeededSampler(seed, stage)
  if name == "quasirandom":
    return QuasiRandomSampler(seed, stage, fields)
  if name == "tpe":  # seeded per process: workers sharing a seed would propose the same points
    return optuna.samplers.TPESampler(seed=(seed * 1_000_003 + stage * 7919 + os.getpid())
                                      % 2**31)
  raise UserError(f"search.sampler={name!r} is not known. Valid: 'random' (Bergstra and Bengio's "
                  "random search, the default), 'quasirandom' (scrambled Sobol points, the "
                  "Tuning Playbook's choice for exploration) or 'tpe' (Optuna's Bayesian TPE "
                  "sampler).")


PRUNERS = ("none", "median", "successive_halving")


def make_pruner(name: str):
  """Optuna's pruner of `search.pruner`: a trial reports its validation metric each epoch
  (worker.PruneHook) and stops early when the pruner says it will not catch up."""
  import optuna
  if name == "none":
    return optuna.pruners.NopPruner()
  if name == "median":  # no pruning before 2 finished trials, nor in a trial's first epoch
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
  if name == "successive_halving":
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
  raise UserError(f"search.pruner={name!r} is not known. Valid: {', '.join(PRUNERS)} ('median': "
                  "stop a trial whose metric is worse than the median of earlier trials at the "
                  "same epoch; 'successive_halving': keep the best third at each rung).")


@dataclasses.dataclass
class StageStatus:
  index: int
  done: int
  running: int
  waiting: int
  budget: int

  @property
  def finished(self) -> bool:
    return self.done >= self.budget

  @property
  def can_ask(self) -> bool:
    return not self.finished and (self.waiting > 0 or self.done + self.running < self.budget)


def trial_status(t) -> str:
  """'complete' | 'diverged' | 'error' | 'killed' | 'excess' | 'running' | 'waiting'."""
  state = t.state.name
  if state == "COMPLETE":
    return "complete"
  if state == "PRUNED":
    return t.user_attrs.get("status", "diverged")
  if state == "FAIL":
    return t.user_attrs.get("status", "killed")
  return state.lower()


class Search:
  """A search directory's config, space, stages and the study of each stage."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, fresh: bool = False):
    """Validates the search settings and binds `workdir` to its study (binding.py).

    Args:
      config: the search's config (its `search` section and the fields it searches).
      workdir: the search directory.
      fresh: a new study is asked for (`--new_study`): its name must be new to the storage.

    Raises:
      UserError: a bad setting, or a study here whose space, stages, metric, sampler or seed
        differ from `config`'s.
    """
    s = config.search
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.params = space_lib.parse_space(s.space, config)
    self.stages = space_lib.parse_stages(s.stages)
    self.metric = str(s.metric)
    self.direction = "minimize" if self.metric == "loss" else "maximize"
    if not int(s.keep_top) >= 1:
      raise UserError(f"search.keep_top must be >= 1, got {s.keep_top!r}.")
    if not float(s.explode_factor) > 1:
      raise UserError(f"search.explode_factor must be > 1, got {s.explode_factor!r}.")
    make_sampler(str(s.sampler), int(config.seed), 0)  # validates the name
    make_pruner(str(s.pruner))
    self.roles = space_lib.roles(config, self.params)
    self.url = storage_url(config, workdir)
    self.fingerprint = binding_lib.fingerprint(config, self.params, self.stages)
    self.storage = open_storage(self.url, int(s.heartbeat_seconds))
    self._studies: dict[int, Any] = {}
    self.name = self._bind(str(s.study_name or ""), fresh)

  def _exists(self, name: str) -> bool:
    try:
      self.storage.get_study_id_from_name(f"{name}.stage1")
      return True
    except KeyError:
      return False

  def _check_study_attrs(self, name: str) -> None:
    """Refuses a study in the storage whose recorded fingerprint differs from this one."""
    if not self._exists(name):
      return
    sid = self.storage.get_study_id_from_name(f"{name}.stage1")
    old = self.storage.get_study_user_attrs(sid).get("fingerprint")
    if old is not None and binding_lib.differences(old, self.fingerprint):
      binding_lib.refuse(self.workdir, name, old, self.fingerprint)

  def _bind(self, explicit: str, fresh: bool) -> str:
    """The study's name: `search.study_name`, else the one DIR/study.json records, else a new
    one (or, for a directory of an older jrecipe, the study named after the directory)."""
    bound = binding_lib.read(self.workdir)
    if bound is not None:
      if binding_lib.differences(bound.get("fingerprint") or {}, self.fingerprint):
        binding_lib.refuse(self.workdir, bound["study"], bound["fingerprint"], self.fingerprint)
      if explicit and explicit != bound["study"]:
        raise UserError(f"The search directory {self.workdir} is bound to the study "
                        f"{bound['study']!r}, not search.study_name={explicit!r}: use that "
                        "name, another --workdir, or --new_study.")
      self._check_study_attrs(bound["study"])
      return bound["study"]
    legacy = os.path.basename(self.workdir.rstrip("/"))
    name = explicit or (legacy if not fresh and self._exists(legacy) else binding_lib.new_name())
    if fresh and self._exists(name):
      raise UserError(f"--new_study: the study {name!r} already exists in "
                      f"{redact(self.url)}; give a new search.study_name (or leave it empty).")
    self._check_study_attrs(name)
    bound = binding_lib.write_once(self.workdir, name, self.fingerprint)
    if binding_lib.differences(bound["fingerprint"], self.fingerprint):  # another process won
      binding_lib.refuse(self.workdir, bound["study"], bound["fingerprint"], self.fingerprint)
    return bound["study"]

  def study(self, k: int):
    """The study of stage k (0-based), created on first use."""
    import optuna
    if k not in self._studies:
      sampler = make_sampler(str(self.config.search.sampler), int(self.config.seed), k,
                             [p.field for p in self.params])
      for attempt in range(5):
        try:
          st = optuna.create_study(storage=self.storage, study_name=f"{self.name}.stage{k + 1}",
                                   sampler=sampler, direction=self.direction,
                                   pruner=make_pruner(str(self.config.search.pruner)),
                                   load_if_exists=True)
          break
        except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
          time.sleep(0.2 * (attempt + 1))
      else:
        raise RuntimeError("could not create or load the study")
      if st.direction.name.lower() != self.direction:
        raise UserError(f"The study {st.study_name!r} in {redact(self.url)} maximises/minimises "
                        f"differently from search.metric={self.metric!r}: use a new study_name.")
      if "max_retries" not in st.user_attrs:
        st.set_user_attr("max_retries", int(self.config.search.max_retries))
      old = st.user_attrs.get("fingerprint")
      if old is None:
        st.set_user_attr("fingerprint", self.fingerprint)
      elif binding_lib.differences(old, self.fingerprint):
        binding_lib.refuse(self.workdir, self.name, old, self.fingerprint)
      self._studies[k] = st
    return self._studies[k]

  def status(self, k: int) -> StageStatus:
    trials = self.study(k).get_trials(deepcopy=False)
    statuses = [trial_status(t) for t in trials]
    return StageStatus(k, sum(s in DONE_STATUSES for s in statuses), statuses.count("running"),
                       statuses.count("waiting"), self.stages[k].trials)

  def top_trials(self, k: int) -> list:
    """The complete trials of stage k, best first (ties: lower trial number)."""
    done = [t for t in self.study(k).get_trials(deepcopy=False) if trial_status(t) == "complete"
            and t.value is not None and math.isfinite(t.value)]
    sign = -1 if self.direction == "maximize" else 1
    return sorted(done, key=lambda t: (sign * t.value, t.number))

  def stage_params(self, k: int) -> list[space_lib.Param]:
    """Stage k's space: the declared one, narrowed around the best trials of each stage before."""
    params = self.params
    keep = int(self.config.search.keep_top)
    for j in range(k):
      top = [self.config_values(t.params, params) for t in self.top_trials(j)[:keep]]
      params = space_lib.narrow(params, top)
    return params

  @staticmethod
  def config_values(sampled: dict, params) -> dict:
    by = {p.field: p for p in params}
    return {f: by[f].to_value(v) if f in by else v for f, v in sampled.items()}

  def current(self) -> Optional[StageStatus]:
    """The first unfinished stage (None: the search is finished)."""
    for k in range(len(self.stages)):
      st = self.status(k)
      if not st.finished:
        return st
    return None

  def trial_config(self, values: dict, k: int) -> ml_collections.ConfigDict:
    import copy
    cfg = copy.deepcopy(self.config)
    for field, v in values.items():
      space_lib.set_field(cfg, field, v)
    cfg.num_epochs = float(self.stages[k].epochs)
    cfg.progress = False
    monitor = cfg.get("monitor")
    if monitor is not None and "enabled" in monitor and not self.config.search.monitor_trials:
      cfg.monitor.enabled = False  # babysitting belongs to the final run, not to every trial
    return cfg
