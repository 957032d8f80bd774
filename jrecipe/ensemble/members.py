"""Ensemble members: trained models loaded from run work directories.

A `Member` is one model with its variables, ready for `model.apply(variables, x)`. Members
come from several runs (`from_runs`: seeds of one config, or different architectures), from
several checkpoints of one run (`from_checkpoints`), from a run's raw and EMA parameters
(`with_ema`) or from the best trials of a search directory (`from_search`).

Every member must be scored on the same examples: `check_same_dataset` (called by every
loader) insists on the same dataset name, task, classes and splits, and the same example ids
in every split, and raises a UserError otherwise.
"""

import dataclasses
import glob
import json
import logging
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from jrecipe import config_base
from jrecipe.errors import UserError
from jrecipe.types import DataSpec, Loss, Model

log = logging.getLogger("jrecipe")


@dataclasses.dataclass
class Member:
  """One model of an ensemble.

  Attributes:
    name: a label for tables (e.g. 'run0@400', 'run0@400:ema').
    model: the model as pure functions (`jrecipe.types.Model`).
    variables: {'params': ..., and the model's mutable state such as 'batch_stats'}.
    spec: the dataset's DataSpec.
    data: the member's own `Dataset` (its inputs may be preprocessed differently, e.g.
      downsampled, but its examples and labels are those of every other member), or None.
    loss: the member's loss (`jrecipe.types.Loss`), or None.
    workdir, step, ema: where the variables came from.
  """

  name: str
  model: Model
  variables: Any
  spec: DataSpec
  data: Any = None
  loss: Optional[Loss] = None
  workdir: Optional[str] = None
  step: Optional[int] = None
  ema: bool = False


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The ConfigDict a run was trained with, from `workdir/config.json`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{workdir} is not a jrecipe run directory: it has no config.json. Pass the "
                    "--workdir of a finished `jrecipe --mode=train` run.")
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"Cannot read {path}: {e}.") from e
  return config_base.from_json(raw)


class _Run:
  """A run directory opened once: its config, Experiment and restore template."""

  def __init__(self, workdir: str):
    from jrecipe import experiment
    from jrecipe.train.trainer import Trainer
    self.workdir = os.path.abspath(workdir)
    self.config = load_run_config(self.workdir)
    self.exp = experiment.build(self.config)
    self.template = Trainer.from_experiment(self.exp).initial_state()
    self._ckpt = None

  def _checkpointer(self):
    from jrecipe.train.checkpoint import Checkpointer
    if self._ckpt is None:
      if not os.path.isdir(os.path.join(self.workdir, "checkpoints")):
        raise UserError(f"The run {self.workdir} has no checkpoints/ directory: train it first "
                        "(jrecipe --mode=train) or pass another directory.")
      self._ckpt = Checkpointer(self.workdir, read_only=True)
    return self._ckpt

  def close(self) -> None:
    if self._ckpt is not None:
      self._ckpt.manager.close()
      self._ckpt = None

  def steps(self) -> list[int]:
    return self._checkpointer().steps()

  def restore(self, step: Optional[int] = None):
    """(TrainState, step) at `step` or the newest readable checkpoint."""
    available = self.steps()
    if not available:
      raise UserError(f"The run {self.workdir} has no checkpoint: train it first "
                      "(jrecipe --mode=train) or pass another directory.")
    if step is not None and step not in available:
      raise UserError(f"The run {self.workdir} has no checkpoint at step {step}; it has steps "
                      f"{available}.")
    state, _, s = self._checkpointer().restore(self.template, step=step)
    return state, int(s)

  def member(self, state, step: int, *, ema: bool = False, name: Optional[str] = None) -> Member:
    from jrecipe.train.state import variables_of
    variables = jax.device_put(variables_of(state, ema=ema))
    label = name or f"{os.path.basename(self.workdir)}@{step}" + (":ema" if ema else "")
    return Member(name=label, model=self.exp.model, variables=variables, spec=self.exp.spec,
                  data=self.exp.data, loss=self.exp.loss, workdir=self.workdir, step=step,
                  ema=ema)


def _unique_names(members: list[Member]) -> list[Member]:
  seen: dict[str, int] = {}
  for m in members:
    if m.name in seen:
      seen[m.name] += 1
      m.name = f"{m.name}#{seen[m.name]}"
    else:
      seen[m.name] = 0
  return members


def check_same_dataset(members: Sequence[Member]) -> None:
  """UserError unless every member was trained and is scored on the same dataset and splits."""
  if not members:
    raise UserError("An ensemble needs at least one member: none were given.")
  ref = members[0]
  for m in members[1:]:
    diffs = []
    for field in ("name", "task", "num_classes", "splits"):
      a, b = getattr(ref.spec, field), getattr(m.spec, field)
      if a != b:
        diffs.append(f"data {field} {a!r} vs {b!r}")
    if not diffs and ref.data is not None and m.data is not None:
      for split, arrays in ref.data.arrays.items():
        other = m.data.arrays.get(split)
        if other is None or not np.array_equal(arrays["id"], other["id"]):
          diffs.append(f"the examples of the {split!r} split differ")
    if diffs:
      raise UserError(
          f"Ensemble members must share one dataset and its splits, but member {m.name!r} "
          f"differs from {ref.name!r}: {'; '.join(diffs)}. Ensemble runs of the same "
          "data config (data.name, data.train_subset, ...) only.")
  if ref.spec.task not in ("classification", "sequence"):
    raise UserError(f"Ensembles average class probabilities: dataset {ref.spec.name!r} is a "
                    f"{ref.spec.task} task, which is not supported.")


def from_runs(workdirs: Sequence[str], *, ema: bool = False) -> list[Member]:
  """The newest checkpoint of each run (seeds of one config, or different architectures)."""
  workdirs = [w for w in workdirs if w]
  if not workdirs:
    raise UserError("from_runs needs at least one run directory.")
  members = []
  for w in workdirs:
    run = _Run(w)
    try:
      if ema and not run.config.ema_decay > 0:
        raise UserError(f"The run {w} has no EMA parameters (ema_decay=0).")
      state, step = run.restore()
      members.append(run.member(state, step, ema=ema))
    finally:
      run.close()
  members = _unique_names(members)
  check_same_dataset(members)
  return members


def from_checkpoints(workdir: str, steps: Optional[Sequence[int]] = None) -> list[Member]:
  """Several checkpoints of one run (default: every kept checkpoint)."""
  run = _Run(workdir)
  try:
    steps = list(steps) if steps is not None else run.steps()
    if not steps:
      raise UserError(f"The run {workdir} has no checkpoint.")
    members = []
    for s in steps:
      state, step = run.restore(int(s))
      members.append(run.member(state, step))
  finally:
    run.close()
  check_same_dataset(members)
  return members


def with_ema(workdir: str, step: Optional[int] = None) -> list[Member]:
  """A run's raw and EMA parameters (newest or given checkpoint) as two members."""
  run = _Run(workdir)
  if not run.config.ema_decay > 0:
    run.close()
    raise UserError(f"The run {workdir} kept no EMA of its parameters (ema_decay="
                    f"{run.config.ema_decay}): train with --config.ema_decay=0.999.")
  try:
    state, s = run.restore(step)
  finally:
    run.close()
  members = [run.member(state, s), run.member(state, s, ema=True)]
  check_same_dataset(members)
  return members


def _search_trials(directory: str) -> list[str]:
  """Run directories (summary.json + checkpoints/) under `directory` (trials/* preferred),
  without the trial directories the search did not count (a killed trial that wrote a full
  result is the same point as its retry)."""
  from jrecipe.search.worker import is_counted_trial_dir
  found = sorted(os.path.dirname(p) for p in glob.glob(
      os.path.join(directory, "trials", "*", "summary.json"))
      if is_counted_trial_dir(os.path.basename(os.path.dirname(p))))
  if not found:
    for root, dirs, files in os.walk(directory):
      if not is_counted_trial_dir(os.path.basename(root)):
        dirs[:] = []
        continue
      if "summary.json" in files and "checkpoints" in dirs:
        found.append(root)
        dirs[:] = []  # a run's own subdirectories hold no other run
    found.sort()
  return [d for d in found if os.path.isdir(os.path.join(d, "checkpoints"))]


def rank_trials(directory: str) -> list[tuple[str, float]]:
  """[(run dir, validation accuracy)] of a search directory, best first."""
  out = []
  for d in _search_trials(directory):
    try:
      with open(os.path.join(d, "summary.json")) as f:
        acc = json.load(f)["validation"]["accuracy"]
      acc = float(acc)
    except (OSError, ValueError, KeyError, TypeError) as e:
      log.warning("Skipping trial %s: no validation accuracy in summary.json (%s).", d, e)
      continue
    if np.isfinite(acc):
      out.append((d, acc))
  out.sort(key=lambda t: -t[1])
  return out


def from_search(directory: str, k: int) -> list[Member]:
  """The K trials of a search directory with the highest validation accuracy."""
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
    raise UserError(f"ensemble k must be a positive integer, got {k!r}.")
  ranked = rank_trials(directory)
  if not ranked:
    raise UserError(f"No finished trials (summary.json with a validation accuracy, and "
                    f"checkpoints/) under {directory}.")
  if len(ranked) < k:
    log.warning("Only %d finished trials under %s (k=%d): using all of them.", len(ranked),
                directory, k)
  return from_runs([d for d, _ in ranked[:k]])
