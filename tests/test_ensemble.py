"""Ensembles: loading members, averaging, metrics, --mode=ensemble, distillation."""

import dataclasses
import json
import os
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jrecipe import ensemble, experiment
from jrecipe.errors import UserError
from jrecipe.ensemble import evaluate as evaluate_lib
from jrecipe.train.loop import train_and_evaluate
from jrecipe.types import DataSpec, Model
from tests.helpers import read_json, tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two tiny digits MLP runs (seeds 0 and 1), 2 epochs each, EMA on."""
  root = tmp_path_factory.mktemp("ens_runs")
  dirs, summaries = [], []
  for seed in (0, 1):
    d = str(root / f"seed{seed}")
    summaries.append(train_and_evaluate(tiny_config(seed=seed, num_epochs=2), d))
    dirs.append(d)
  return types.SimpleNamespace(dirs=dirs, summaries=summaries, root=root)


@pytest.fixture(scope="module")
def members(runs):
  return ensemble.from_runs(runs.dirs)


def test_members_match_their_runs(runs, members):
  assert len(members) == 2 and members[0].name != members[1].name
  result = ensemble.evaluate_ensemble(members, split="test")
  for row, summary in zip(result["members"], runs.summaries):
    # the restored member scores exactly what the run reported at its end
    assert row["accuracy"] == pytest.approx(summary["test"]["accuracy"], abs=1e-9)
    assert row["nll"] == pytest.approx(summary["test"]["loss"], rel=1e-4)
  # The best member is chosen on validation (not on the test split it is reported on).
  by_val = max(result["members"], key=lambda r: (r["validation_accuracy"], -r["validation_nll"]))
  assert result["best_member"]["chosen_on"] == "validation"
  assert result["best_member"]["name"] == by_val["name"]
  best = by_val["accuracy"]
  assert result["best_member"]["accuracy"] == best
  for row, summary in zip(result["members"], runs.summaries):
    assert row["validation_accuracy"] == pytest.approx(summary["validation"]["accuracy"])
  assert result["gain"] == pytest.approx(result["ensemble"]["accuracy"] - best)
  assert result["gain_points"] == pytest.approx(100 * result["gain"])
  assert result["count"] == len(members[0].data.arrays["test"]["y"])


def test_identical_members_equal_the_member(runs):
  twice = ensemble.from_runs([runs.dirs[0], runs.dirs[0]])
  assert twice[0].name != twice[1].name
  x = twice[0].data.arrays["test"]["x"]
  single = np.exp(evaluate_lib.member_outputs(twice[0], x).astype(np.float64))
  for combine in ("prob", "logit"):
    probs = ensemble.ensemble_predict(twice, x, combine=combine)
    np.testing.assert_allclose(probs, single, atol=1e-6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    r = ensemble.evaluate_ensemble(twice, combine=combine)
    assert r["ensemble"]["accuracy"] == r["members"][0]["accuracy"]
    assert r["ensemble"]["nll"] == pytest.approx(r["members"][0]["nll"], abs=1e-6)
    assert r["gain"] == 0.0 and r["ensemble"]["disagreement"] == 0.0


def _fake_member(name, probs, spec):
  """A member whose logits for input [i] are log(probs[i])."""
  table = jnp.asarray(np.log(np.asarray(probs, np.float64)), jnp.float32)
  model = Model(init=None, name=name,
                apply=lambda v, x, train=False, rngs=None: v["table"][x[:, 0].astype(jnp.int32)],
                apply_with_state=None)
  return ensemble.Member(name=name, model=model, variables={"table": table}, spec=spec)


def test_average_by_hand():
  spec = DataSpec(name="fake", task="classification", input_shape=(1,), num_classes=3,
                  class_names=None, value_range=(0, 1), splits={"test": 2})
  pa = [[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]
  pb = [[0.1, 0.8, 0.1], [0.3, 0.6, 0.1]]
  a, b = _fake_member("a", pa, spec), _fake_member("b", pb, spec)
  x = np.array([[0.0], [1.0]], np.float32)
  y = np.array([0, 2], np.int32)
  probs = ensemble.ensemble_predict([a, b], x, batch_size=1)  # exercises the batching too
  np.testing.assert_allclose(probs, [[0.3, 0.525, 0.175], [0.25, 0.4, 0.35]], atol=1e-6)
  geo = np.sqrt(np.array(pa) * np.array(pb))
  np.testing.assert_allclose(ensemble.ensemble_predict([a, b], x, combine="logit"),
                             geo / geo.sum(-1, keepdims=True), atol=1e-6)
  data = types.SimpleNamespace(arrays={"test": {"x": x, "y": y, "id": np.arange(2)}})
  r = ensemble.evaluate_ensemble([a, b], data, split="test")
  # a: both right (0 and 2); b: both wrong; ensemble: argmax 1 and 1, both wrong.
  assert [m["accuracy"] for m in r["members"]] == [1.0, 0.0]
  assert r["members"][0]["nll"] == pytest.approx(-(np.log(0.5) + np.log(0.6)) / 2, rel=1e-6)
  assert r["ensemble"]["accuracy"] == 0.0
  assert r["ensemble"]["nll"] == pytest.approx(-(np.log(0.3) + np.log(0.35)) / 2, rel=1e-6)
  assert r["best_member"]["name"] == "a" and r["gain_points"] == pytest.approx(-100.0)
  with pytest.raises(UserError, match="combine"):
    ensemble.ensemble_predict([a, b], x, combine="median")


def test_best_member_on_validation_and_wilson_intervals():
  """Member a is best on validation, b on test: the best member is a, reported on test, and
  each accuracy carries its Wilson interval (one test example of 270 is 0.37 points)."""
  from jrecipe.label.mode import wilson
  spec = DataSpec(name="fake", task="classification", input_shape=(1,), num_classes=2,
                  class_names=None, value_range=(0, 1), splits={"validation": 4, "test": 4})
  # rows 0-3 validation, 4-7 test; a: right on validation, half the test; b: the reverse.
  pa = [[0.9, 0.1]] * 4 + [[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]]
  pb = [[0.1, 0.9]] * 2 + [[0.9, 0.1]] * 2 + [[0.9, 0.1]] * 4
  a, b = _fake_member("a", pa, spec), _fake_member("b", pb, spec)
  x = np.arange(8, dtype=np.float32)[:, None]
  y = np.zeros(8, np.int32)
  data = types.SimpleNamespace(arrays={
      "validation": {"x": x[:4], "y": y[:4], "id": np.arange(4)},
      "test": {"x": x[4:], "y": y[4:], "id": np.arange(4, 8)}})
  r = ensemble.evaluate_ensemble([a, b], data, split="test")
  assert [m["accuracy"] for m in r["members"]] == [0.5, 1.0]
  assert r["best_member"]["name"] == "a" and r["best_member"]["chosen_on"] == "validation"
  assert r["best_member"]["validation_accuracy"] == 1.0 and r["best_member"]["accuracy"] == 0.5
  assert r["members"][0]["ci95"] == pytest.approx(wilson(2, 4))
  assert r["ensemble"]["ci95"][0] <= r["ensemble"]["accuracy"] <= r["ensemble"]["ci95"][1]
  lo, hi = wilson(266, 270)
  assert 0.95 < lo < 266 / 270 < hi < 1.0
  assert "chosen on validation" in ensemble.format_table(r)
  # Without a validation split it says the choice was made on the scored split.
  only = types.SimpleNamespace(arrays={"test": data.arrays["test"]})
  assert ensemble.evaluate_ensemble([a, b], only, split="test")["best_member"][
      "chosen_on"] == "test"


def test_members_of_different_datasets_raise(members):
  other = dataclasses.replace(members[1], name="other",
                              spec=dataclasses.replace(members[1].spec, name="mnist"))
  with pytest.raises(UserError, match="share one dataset"):
    ensemble.check_same_dataset([members[0], other])
  with pytest.raises(UserError, match="share one dataset"):
    ensemble.evaluate_ensemble([members[0], other])
  splits = dict(members[1].spec.splits, train=5)
  resized = dataclasses.replace(members[1], spec=dataclasses.replace(members[1].spec,
                                                                     splits=splits))
  with pytest.raises(UserError, match="splits"):
    ensemble.check_same_dataset([members[0], resized])
  regression = dataclasses.replace(members[0], spec=dataclasses.replace(members[0].spec,
                                                                        task="regression"))
  with pytest.raises(UserError, match="regression"):
    ensemble.check_same_dataset([regression])


def test_with_ema_and_checkpoints(runs):
  pair = ensemble.with_ema(runs.dirs[0])
  assert len(pair) == 2 and [m.ema for m in pair] == [False, True]
  assert pair[1].name.endswith(":ema")
  r = ensemble.evaluate_ensemble(pair)
  assert r["members"][1]["accuracy"] == pytest.approx(runs.summaries[0]["test_ema"]["accuracy"])
  ckpts = ensemble.from_checkpoints(runs.dirs[0])
  assert len(ckpts) >= 2 and len({m.step for m in ckpts}) == len(ckpts)
  with pytest.raises(UserError, match="no checkpoint at step"):
    ensemble.from_checkpoints(runs.dirs[0], steps=[123456])
  with pytest.raises(UserError, match="config.json"):
    ensemble.from_runs([str(runs.root)])


def test_from_search_takes_the_best_trials(runs, tmp_path):
  trials = tmp_path / "search" / "trials"
  trials.mkdir(parents=True)
  for i, d in enumerate(runs.dirs):
    os.symlink(d, trials / f"t{i}")
  # a trial whose worker was killed after it wrote its result: rerun, so not counted twice
  os.symlink(runs.dirs[0], trials / "killed_stage1_trial0009")
  ranked = ensemble.rank_trials(str(tmp_path / "search"))
  accs = [a for _, a in ranked]
  assert accs == sorted(accs, reverse=True) and len(ranked) == 2
  assert not [d for d, _ in ranked if "killed_" in d]
  top = ensemble.from_search(str(tmp_path / "search"), k=1)
  assert len(top) == 1
  assert os.path.realpath(top[0].workdir) == os.path.realpath(ranked[0][0])


def test_run_mode_writes_ensemble_json(runs, tmp_path, capsys):
  config = tiny_config()
  with config.unlocked():
    config.ensemble = ml_collections.ConfigDict({"members": ",".join(runs.dirs),
                                                 "combine": "prob",
                                                 "distill_steps": 5})
  out = str(tmp_path / "ens")
  assert ensemble.run_mode(config, out) == 0
  result = read_json(os.path.join(out, "ensemble.json"))
  assert len(result["members"]) == 2 and result["source"] == "runs"
  assert result["gain"] == pytest.approx(result["ensemble"]["accuracy"] -
                                         result["best_member"]["accuracy"])
  assert result["distill"]["steps"] == 5 and "variables" not in result["distill"]
  assert sorted(os.listdir(out)) == ["ensemble.json", "student"]  # atomic: no temp left
  printed = capsys.readouterr().out
  assert "ensemble" in printed
  # The budgets, side by side: the student's 5 steps, each member's own.
  d = result["distill"]
  assert d["examples"] == 5 * d["batch_size"] and d["train_split"] == "train"
  for row, summary in zip(result["members"], runs.summaries):
    assert row["steps"] == summary["step"] and row["examples"] == summary["step"] * 64
  assert f"5 steps x {d['batch_size']}" in printed and f"{runs.summaries[0]['step']} steps" in printed
  # The student is an ordinary run directory that the other modes read.
  student = os.path.join(out, "student")
  assert d["run_dir"] == os.path.abspath(student)
  s = read_json(os.path.join(student, "summary.json"))
  assert s["step"] == 5 and s["distilled"]["examples"] == d["examples"]
  assert s["test"]["accuracy"] == pytest.approx(d["student"]["accuracy"], abs=1e-9)
  again = ensemble.from_runs([student, runs.dirs[0]])
  scored = ensemble.evaluate_ensemble(again)
  assert scored["members"][0]["accuracy"] == pytest.approx(s["test"]["accuracy"], abs=1e-9)
  assert os.path.exists(os.path.join(student, "report.html"))
  from jrecipe.report import mode as report_mode
  assert report_mode.run_mode(None, student) == 0
  with config.unlocked():
    config.ensemble.source = "nope"
  with pytest.raises(UserError, match="source"):
    ensemble.run_mode(config, out)


def test_distillation_moves_student_towards_teacher(members):
  teacher = ensemble.ensemble_predict(members, members[0].data.arrays["train"]["x"])
  reference = ensemble.evaluate_ensemble(members)
  student = experiment.build(tiny_config(seed=5, **{"model.hidden": (16,)}))
  d = ensemble.distill(student, teacher, temperature=10.0, alpha=0.9, steps=40, lr=3e-3, seed=0,
                       reference=reference)
  assert np.isfinite(d["final_loss"])
  assert d["kl_to_teacher"]["final"] < 0.5 * d["kl_to_teacher"]["init"]
  assert d["student_minus_best"] == pytest.approx(
      d["student"]["accuracy"] - reference["best_member"]["accuracy"])
  assert set(d["variables"]) == {"params"}
  with pytest.raises(UserError, match="teacher_probs_train"):
    ensemble.distill(student, teacher[:10], steps=1)
