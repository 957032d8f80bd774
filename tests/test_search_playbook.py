"""The Deep Learning Tuning Playbook's options of --mode=search (issue 22).

Quasi-random search (scrambled Sobol points, the same point for the same trial number in any
worker), Optuna's median / successive-halving pruning through a training hook (a pruned
trial is done, named pruned_..., never requeued), and hyperparameters declared scientific,
nuisance or fixed with isolation plots (the best trial per scientific bin, nuisance
hyperparameters optimised out).
"""

import json
import math
import os

import numpy as np
import optuna
import pytest

from jrecipe.errors import UserError
from jrecipe.report import mode as report_mode
from jrecipe.search import isolation, study as study_lib, summary, worker as worker_lib
from tests.test_search import _fake_search, _tell


def _positions(s, field, k=0):
  p = next(p for p in s.params if p.field == field)
  return [p.position(t.params[field]) for t in s.study(k).get_trials(deepcopy=False)]


def test_quasirandom_points_fill_every_bin_once_and_repeat_per_trial_number(tmp_path):
  space = "optimizer.learning_rate=loguniform(1e-5,1e-1); model.dropout=uniform(0,0.5)"
  s = _fake_search(tmp_path, space, "16x1", sampler="quasirandom")
  _tell(s, 0, lambda v: 0.5)
  for field in ("optimizer.learning_rate", "model.dropout"):
    pos = _positions(s, field)
    # 16 scrambled Sobol points: exactly one in each 1/16 of each axis (log axis for the lr);
    # random draws leave some bins empty (checked just below on the random sampler).
    assert sorted(int(16 * x) for x in pos) == list(range(16)), (field, pos)
  r = _fake_search(tmp_path / "r", space, "16x1", sampler="random")
  _tell(r, 0, lambda v: 0.5)
  assert sorted(int(16 * x) for x in _positions(r, "model.dropout")) != list(range(16))
  # the same trial number gets the same point in any process (a second sampler instance)
  smp = study_lib.make_sampler("quasirandom", 0, 0, [p.field for p in s.params])
  t5 = s.study(0).get_trials(deepcopy=False)[5]
  for p in s.params:
    assert smp.sample_independent(None, t5, p.field, p.distribution()) == pytest.approx(
        t5.params[p.field])
  other = study_lib.make_sampler("quasirandom", 1, 0, [p.field for p in s.params])
  assert other.sample_independent(None, t5, "model.dropout", s.params[1].distribution()) != \
      pytest.approx(t5.params["model.dropout"])  # seeded: another seed, other points


def test_unknown_sampler_and_pruner_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="quasirandom"):
    _fake_search(tmp_path, "model.dropout=uniform(0,0.5)", sampler="sobol")
  with pytest.raises(UserError, match="successive_halving"):
    study_lib.make_pruner("hyperband")


class _Loop:
  def __init__(self):
    self.last_eval, self.stop_reason, self.epoch = None, None, 1.0

  def stop(self, reason):
    self.stop_reason = reason


def _hook_run(study, values):
  """A trial whose training evaluates `values` in turn, through PruneHook."""
  trial = study.ask()
  hook, loop = worker_lib.PruneHook(trial, "accuracy"), _Loop()
  for v in values:
    loop.last_eval = {"accuracy": v, "loss": 1.0}
    hook.after_step(loop, {})
    hook.after_step(loop, {})  # the same evaluation again: reported once
    if loop.stop_reason:
      break
  return trial, hook, loop


@pytest.mark.parametrize("name", ["median", "successive_halving"])
def test_prune_hook_reports_each_evaluation_and_stops_a_hopeless_trial(name):
  study = optuna.create_study(direction="maximize", pruner=study_lib.make_pruner(name))
  for _ in range(3):
    trial, hook, loop = _hook_run(study, [0.5, 0.8, 0.9, 0.95])
    assert hook.pruned is None and loop.stop_reason is None
    study.tell(trial, 0.95)
  assert study.trials[0].intermediate_values == {1: 0.5, 2: 0.8, 3: 0.9, 4: 0.95}
  trial, hook, loop = _hook_run(study, [0.1, 0.1, 0.1, 0.1])
  assert hook.pruned and loop.stop_reason == hook.pruned and "validation accuracy" in hook.pruned
  none = optuna.create_study(direction="maximize", pruner=study_lib.make_pruner("none"))
  for _ in range(3):
    t, _, _ = _hook_run(none, [0.9, 0.9])
    none.tell(t, 0.9)
  assert _hook_run(none, [0.1, 0.1, 0.1])[1].pruned is None


def test_a_pruned_trial_is_done_named_pruned_and_not_requeued(tmp_path):
  """End to end in one worker: two good trials, then a hopeless learning rate (enqueued, so
  the order is planted) that the median pruner stops after its second evaluation."""
  s = _fake_search(tmp_path, "optimizer.learning_rate=loguniform(1e-8,1e-1)", "3x3",
                   pruner="median")
  for lr in (3e-3, 3e-3, 1e-8):
    s.study(0).enqueue_trial({"optimizer.learning_rate": lr})
  w = worker_lib.Worker(s.config, s.workdir)
  assert w.run(max_trials=5) == 3
  trials = s.study(0).get_trials(deepcopy=False)
  assert [study_lib.trial_status(t) for t in trials] == ["complete", "complete", "pruned"]
  assert trials[2].state == optuna.trial.TrialState.PRUNED
  assert len(trials[2].intermediate_values) < len(trials[0].intermediate_values)
  assert os.path.isdir(os.path.join(s.workdir, "trials", "pruned_stage1_trial0002"))
  assert s.current() is None  # the pruned trial used up its budget slot: nothing requeued
  out = summary.summarize(s)
  assert out["counts"] == {"complete": 2, "pruned": 1} and out["pruner"] == "median"
  assert out["trials"][2]["dir"].endswith("pruned_stage1_trial0002")
  assert not worker_lib.is_counted_trial_dir("pruned_stage1_trial0002")


def test_pruner_is_part_of_the_study_binding(tmp_path):
  _fake_search(tmp_path, "model.dropout=uniform(0,0.5)", pruner="median")
  with pytest.raises(UserError, match="pruner"):
    _fake_search(tmp_path, "model.dropout=uniform(0,0.5)", pruner="none")


SPACE = "model.dropout=uniform(0,0.5); optimizer.learning_rate=loguniform(1e-4,1e-1)"


def _planted(v):
  """Dropout helps, but only with the right learning rate: single trials hide it."""
  lr_fit = -abs(math.log10(v["optimizer.learning_rate"]) + 2.5)
  return 0.8 + 0.2 * v["model.dropout"] + 0.05 * lr_fit


def test_isolation_is_the_best_trial_per_scientific_bin(tmp_path):
  s = _fake_search(tmp_path, SPACE, "40x1", scientific="model.dropout", scientific_bins=4,
                   fixed="batch_size, model.hidden")
  assert s.roles == {"scientific": ["model.dropout"], "nuisance": ["optimizer.learning_rate"],
                     "fixed": {"batch_size": 64, "model.hidden": [32]}}
  _tell(s, 0, _planted)
  out = summary.summarize(s)
  entries = out["isolation"]["model.dropout"]
  assert [e["label"] for e in entries] == ["0 to 0.125", "0.125 to 0.25", "0.25 to 0.375",
                                           "0.375 to 0.5"]
  trials = [t for t in out["trials"] if t["status"] == "complete"]
  for e in entries:  # by hand: the best value among the trials whose dropout is in the bin
    inside = [t for t in trials if e["low"] <= t["params"]["model.dropout"] < e["high"]]
    assert e["trials"] == len(inside)
    best = max(inside, key=lambda t: t["value"])
    assert (e["best"]["number"], e["best"]["value"]) == (best["number"], best["value"])
  assert out["roles"]["fixed"] == {"batch_size": 64, "model.hidden": [32]}
  assert os.path.exists(os.path.join(s.workdir, "search", "isolation_model.dropout.png"))
  assert report_mode.run_mode(None, s.workdir) == 0
  text = open(os.path.join(s.workdir, "report.html"), encoding="utf-8").read()
  assert "Isolation of <code>model.dropout</code>" in text and "nuisance (optimised out)" in text
  log_entries = isolation.isolate(s.params[1], trials, "maximize", 3)
  assert [e["label"] for e in log_entries] == ["0.0001 to 0.001", "0.001 to 0.01", "0.01 to 0.1"]


def test_roles_refuse_a_scientific_field_outside_the_space_and_a_fixed_one_inside(tmp_path):
  with pytest.raises(UserError, match="search.scientific names 'l2'"):
    _fake_search(tmp_path, SPACE, scientific="l2")
  with pytest.raises(UserError, match="either searched"):
    _fake_search(tmp_path / "b", SPACE, fixed="model.dropout")
  with pytest.raises(UserError, match="no field"):
    _fake_search(tmp_path / "c", SPACE, fixed="model.dropuot")
