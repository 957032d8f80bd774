"""The battery on whole configs: no false alarms on shipped configs, planted bugs caught, and
the `--mode=check` contract (table, checks.json, exit status) that scripts and CI rely on."""

import json
import os

import ml_collections
import pytest

from jrecipe import experiment
from jrecipe.checks import CHECK_NAMES
from jrecipe.checks.pytest_plugin import load_config
from jrecipe.checks.runner import run_battery
from tests.helpers import REPO, run_cli

FAST = dict(budget_steps=60, overfit_steps=300, gradcheck_burnin_steps=5)

SHIPPED = ["digits_mlp.py", "digits_linear.py", "mnist5k_cnn.py:smoke",
           "cifar10_resnet18.py:smoke", "digits_seq_transformer.py:smoke",
           "stdlib_bytes_transformer.py:smoke"]


@pytest.mark.parametrize("config", SHIPPED)
def test_every_shipped_config_passes_its_own_battery(jrecipe_battery, config, tmp_path):
  """The pytest plugin's fixture, used as a research codebase would use it."""
  results = jrecipe_battery(os.path.join(REPO, "configs", config), workdir=str(tmp_path), **FAST)
  assert [r.name for r in results] == list(CHECK_NAMES)
  statuses = {r.name: r.status for r in results}
  exp = experiment.build(load_config(os.path.join(REPO, "configs", config)))
  sequence = exp.spec.task == "sequence"
  expected_skip = {"causal_dependency"} if not sequence else set()
  if "linear" in config:  # a linear model has no width to double, and is affine by design
    expected_skip |= {"capacity_decreases_loss", "nonlinearity"}
  if sequence:  # token inputs have no midpoint
    expected_skip.add("nonlinearity")
  if not exp.model.has_dropout:
    expected_skip.add("dropout_varies")
  if not exp.model.has_batchnorm:
    expected_skip.add("state_updates")
  if exp.augment_fn() is None:
    expected_skip |= {"augmentation_varies", "augmentation_keeps_labels"}
  elif "digits" not in config:  # pixel neighbours do not predict natural-image labels
    expected_skip.add("augmentation_keeps_labels")
  assert {n for n, s in statuses.items() if s == "skip"} <= expected_skip, statuses


def _battery(model, only, config="digits_linear.py", **overrides):
  cfg = load_config(os.path.join(REPO, "configs", config))
  cfg.model = ml_collections.ConfigDict({"name": model})  # planted factories take no fields
  fast = {f"checks.{k}": v for k, v in FAST.items()}
  for k, v in {**fast, **overrides}.items():
    node = cfg
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return {r.name: r for r in run_battery(experiment.build(cfg), only=only)}


@pytest.mark.parametrize("model, check", [
    ("tests.planted:batch_mixing_mlp", "batch_independence"),
    ("tests.planted:softmax_twice_mlp", "logits_not_probabilities"),
    ("tests.planted:input_ignoring_mlp", "input_independent_baseline"),
    ("tests.planted:dropout_in_eval_mlp", "eval_mode"),
    ("tests.planted:wrong_vjp_mlp", "gradient_check"),
])
def test_planted_model_bug_fails_its_check_and_the_correct_model_passes(model, check):
  bad = _battery(model, [check])[check]
  assert bad.status == "fail", (bad.status, bad.message)
  good = _battery("tests.planted:correct_mlp", [check])[check]
  assert good.status == "pass", (good.status, good.message)


def test_planted_off_by_one_causal_mask_fails():
  r = _battery("tests.planted:off_by_one_transformer", ["causal_dependency"],
               config="digits_seq_transformer.py", **{"data.normalize": False})
  assert r["causal_dependency"].status == "fail", r["causal_dependency"].message


def test_planted_huge_init_and_decaying_schedule_fail():
  r = _battery("mlp", ["loss_at_init", "lr_schedule"], config="digits_mlp.py",
               **{"model.init_scale": 100.0, "schedule.name": "exponential",
                  "schedule.unit": "epochs", "schedule.decay_rate": 3.0})
  assert r["loss_at_init"].status == "fail", r["loss_at_init"].message
  assert r["lr_schedule"].status == "fail", r["lr_schedule"].message


def test_check_mode_contract_exit_1_json_and_artifacts(tmp_path):
  wd = tmp_path / "wd"
  r = run_cli(["--mode=check", "--config=configs/digits_linear.py",
               "--config.model.name=tests.planted:batch_mixing_mlp",
               "--config.checks.only=batch_independence,loss_at_init,lr_schedule",
               f"--workdir={wd}"])
  assert r.returncode == 1, r.stderr[-2000:]
  assert "batch_independence" in r.stdout and "FAIL" in r.stdout
  data = json.load(open(wd / "checks.json"))
  names = [c["name"] for c in data["checks"]]
  assert names == ["loss_at_init", "batch_independence", "lr_schedule"]
  for c in data["checks"]:
    assert set(c) >= {"name", "status", "value", "expected", "message", "artifacts"}
    assert c["status"] in ("pass", "fail", "warn", "skip")
    for a in c["artifacts"]:
      assert not os.path.isabs(a) and (wd / a).exists(), a
  assert data["checks"][1]["status"] == "fail" and data["checks"][1]["artifacts"]
  r = run_cli(["--mode=check", "--config=configs/digits_linear.py",
               "--config.checks.only=overfit_one_bach", f"--workdir={tmp_path / 'x'}"])
  assert r.returncode == 2 and "overfit_one_batch" in r.stderr
