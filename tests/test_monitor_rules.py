"""Each diagnosis rule on a planted metrics file, and the clean curve that must trigger none.

The rules are pure functions of a work directory's files (metrics.jsonl, config.json), so
each problem is planted as the records a run with that problem writes: per-step losses,
per-epoch train/validation records, probe and monitor records, events.
"""

import json
import os

import numpy as np
import pytest

from jrecipe.errors import RunFailure
from jrecipe.monitor import diagnose

STEPS = 300
SPE = 30  # steps per epoch: 10 epochs


def clean_losses(rng, noise=0.01):
  t = np.arange(1, STEPS + 1)
  return 0.1 + 2.2 * np.exp(-t / 30) + noise * rng.standard_normal(STEPS)


def write_run(path, losses, *, epochs=None, probes=(), monitor=(), events=(), config=None,
              init_loss=2.3, expected=2.3026):
  """Writes metrics.jsonl (+ config.json) the way the training loop does."""
  os.makedirs(path, exist_ok=True)
  recs = [{"step": 0, "split": "validation", "epoch": 0.0, "loss": init_loss,
           "expected_loss_at_init": expected}]
  losses = np.asarray(losses, float)
  for end in range(10, len(losses) + 1, 10):
    chunk = losses[end - 10:end]
    recs.append({"step": end, "split": "train", "epoch": end / SPE, "loss": float(chunk.mean())})
    recs.append({"step": end, "split": "train_steps", "epoch": end / SPE,
                 "first_step": end - 9, "loss": [float(x) for x in chunk]})
  if epochs is None:  # validation tracks training, both good
    epochs = [(e, float(losses[e * SPE - SPE:e * SPE].mean()),
               float(losses[e * SPE - 5:e * SPE].mean()) + 0.01, 0.9 + 0.009 * e,
               0.9 + 0.008 * e) for e in range(1, len(losses) // SPE + 1)]
  for e, tl, vl, ta, va in epochs:
    recs.append({"step": e * SPE, "split": "train_epoch", "epoch": float(e), "loss": tl,
                 "accuracy": ta})
    recs.append({"step": e * SPE, "split": "validation", "epoch": float(e), "loss": vl,
                 "accuracy": va})
  recs += [{"split": "probe", **p} for p in probes]
  recs += [{"split": "monitor", **m} for m in monitor]
  recs += [{"split": "events", **e} for e in events]
  recs.sort(key=lambda r: r["step"])
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for r in recs:
      f.write(json.dumps(r) + "\n")
  if config is not None:
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(config, f)
  return str(path)


def healthy_monitor(ratio=2e-3):
  return [{"step": s, "update_ratio/dense_0/kernel": ratio, "update_ratio/head/kernel": ratio,
           "update_ratio/head/bias": 0.5} for s in (100, 200, 300)]


def healthy_probes():
  return [{"step": 0, "dead_fraction/dense_0": 0.02}, {"step": 300, "dead_fraction/dense_0": 0.1}]


def ids(path):
  return {d["id"] for d in diagnose.diagnose(path)}


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def test_clean_run_triggers_no_rule(tmp_path, rng):
  wd = write_run(tmp_path, clean_losses(rng), probes=healthy_probes(), monitor=healthy_monitor())
  assert diagnose.diagnose(wd) == []


@pytest.mark.parametrize("curve,expected", [
    ("plateau", "loss_plateau"), ("linear", "loss_linear"),
    ("fast_then_stuck", "loss_fast_then_stuck"), ("noisy", "loss_noisy"),
    ("hockey", "loss_hockey_stick"), ("explode", "loss_exploding")])
def test_loss_shapes(tmp_path, rng, curve, expected):
  t = np.arange(1, STEPS + 1)
  init = 2.3
  if curve == "plateau":
    losses = 2.3 + 0.01 * rng.standard_normal(STEPS)
  elif curve == "linear":
    losses = 2.3 - 1.5 * t / STEPS + 0.01 * rng.standard_normal(STEPS)
  elif curve == "fast_then_stuck":
    losses = 1.2 + 1.1 * np.exp(-t / 5) + 0.01 * rng.standard_normal(STEPS)
  elif curve == "noisy":
    losses = clean_losses(rng, noise=0.5)
  elif curve == "hockey":
    losses = 0.3 + 8 * np.exp(-t / 2) + 1.0 * np.exp(-t / 100)
    init = 9.0
  else:
    losses = clean_losses(rng)
    losses[200:] = np.linspace(0.2, 20, STEPS - 200)
  wd = write_run(tmp_path, losses, monitor=healthy_monitor(), init_loss=init)
  found = diagnose.diagnose(wd)
  assert expected in {d["id"] for d in found}, found
  d = [d for d in found if d["id"] == expected][0]
  assert d["numbers"] and any(ch.isdigit() for ch in d["message"])


def test_nan_event_is_reported_with_its_step(tmp_path, rng):
  wd = write_run(tmp_path, clean_losses(rng), events=[{"step": 120, "nonfinite_step": 117}])
  d = [d for d in diagnose.diagnose(wd) if d["id"] == "loss_exploding"][0]
  assert d["numbers"]["step"] == 117 and "117" in d["message"]


def test_update_ratio_thresholds_come_from_the_run_config(tmp_path, rng):
  low = write_run(tmp_path / "low", clean_losses(rng), monitor=healthy_monitor(5e-6))
  high = write_run(tmp_path / "high", clean_losses(rng), monitor=healthy_monitor(0.05))
  ok = write_run(tmp_path / "ok", clean_losses(rng), monitor=healthy_monitor(0.05),
                 config={"monitor": {"ratio_low": 1e-4, "ratio_high": 0.1}})
  assert "lr_too_low" in ids(low) and "lr_too_high" not in ids(low)
  assert "lr_too_high" in ids(high)
  assert not ids(ok) & {"lr_too_low", "lr_too_high"}
  d = [d for d in diagnose.diagnose(high) if d["id"] == "lr_too_high"][0]
  # biases are not weights: their ratio (0.5 here) is left out of the verdict
  assert d["numbers"]["median_ratio"] == pytest.approx(0.05)
  assert set(d["numbers"]["per_leaf"]) == {"dense_0/kernel", "head/kernel"}


def test_overfitting_by_rising_validation_loss(tmp_path, rng):
  epochs = [(e, 2.0 / e, 0.5 + 0.02 * (e - 4) ** 2, 0.7 + 0.03 * e, 0.75 + 0.01 * e)
            for e in range(1, 11)]
  wd = write_run(tmp_path, clean_losses(rng), epochs=epochs, monitor=healthy_monitor())
  assert "overfitting" in ids(wd)
  assert "capacity_too_low" not in ids(wd)


def test_capacity_too_low(tmp_path, rng):
  t = np.arange(1, STEPS + 1)
  losses = 1.2 + 1.1 * np.exp(-t / 40) + 0.01 * rng.standard_normal(STEPS)
  epochs = [(e, 1.2 + 1.1 * np.exp(-e * SPE / 40), 1.22 + 1.1 * np.exp(-e * SPE / 40), 0.6,
             0.59) for e in range(1, 11)]
  wd = write_run(tmp_path, losses, epochs=epochs, monitor=healthy_monitor())
  assert "capacity_too_low" in ids(wd) and "overfitting" not in ids(wd)


def test_capacity_verdict_yields_to_a_learning_rate_cause(tmp_path, rng):
  losses = 2.3 + 0.01 * rng.standard_normal(STEPS)
  epochs = [(e, 2.3, 2.3, 0.15, 0.15) for e in range(1, 11)]
  wd = write_run(tmp_path, losses, epochs=epochs, monitor=healthy_monitor(5e-6))
  found = ids(wd)
  assert {"lr_too_low", "loss_plateau"} <= found and "capacity_too_low" not in found


def test_dead_and_saturated_units_at_init_and_dying_units(tmp_path, rng):
  probes = [{"step": 0, "dead_fraction/dense_0": 0.6, "saturated_fraction/dense_1": 0.4},
            {"step": 300, "dead_fraction/dense_0": 0.65, "saturated_fraction/dense_1": 0.1}]
  wd = write_run(tmp_path / "init", clean_losses(rng), probes=probes, monitor=healthy_monitor())
  assert {"init_dead_units", "init_saturated_units"} <= ids(wd)
  died = [{"step": 0, "dead_fraction/dense_0": 0.05}, {"step": 300, "dead_fraction/dense_0": 0.7}]
  wd = write_run(tmp_path / "died", clean_losses(rng), probes=died, monitor=healthy_monitor())
  assert ids(wd) == {"units_died"}


def test_write_diagnoses_and_missing_files(tmp_path, rng):
  assert diagnose.diagnose(str(tmp_path)) == []  # an empty directory: nothing to say
  wd = write_run(tmp_path / "run", 2.3 + 0.01 * rng.standard_normal(STEPS))
  found = diagnose.write_diagnoses(wd)
  with open(os.path.join(wd, "diagnoses.json")) as f:
    assert json.load(f)["diagnoses"] == found
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 301, "split": "tra')  # a torn line from a kill is ignored
  assert diagnose.diagnose(wd) == found


# --- real runs at both extremes of the learning rate (issue 18: diagnoses that cannot point
# the wrong way). digits_mlp for 12 epochs (108 steps), the monitor every 50 steps.

def _real_run(tmp_path, name, lr):
  from jrecipe.checks.pytest_plugin import load_config
  from jrecipe.train.loop import train_and_evaluate
  from tests.helpers import REPO
  cfg = load_config(os.path.join(REPO, "configs", "digits_mlp.py"))
  cfg.optimizer.name, cfg.optimizer.learning_rate = name, lr
  cfg.num_epochs = 12
  cfg.monitor.every_steps = 50
  cfg.checkpoint.every_epochs = 0
  wd = str(tmp_path / f"{name}_{lr:g}")
  try:
    return wd, train_and_evaluate(cfg, wd)
  except RunFailure as e:  # a non-finite loss stops the run (exit 1): still diagnosed
    return wd, str(e)


@pytest.mark.parametrize("name, lr, cause, wrong_way", [
    ("adam", 1e6, "loss_exploding", "lr_too_low"),
    ("sgd", 1e3, "loss_exploding", "lr_too_low"),
    ("adam", 1e-7, "lr_too_low", "loss_exploding"),
    ("sgd", 1e-7, "lr_too_low", "loss_exploding"),
])
def test_real_runs_at_both_extremes_are_diagnosed_the_right_way(tmp_path, name, lr, cause,
                                                                wrong_way):
  wd, _ = _real_run(tmp_path, name, lr)
  found = diagnose.diagnose(wd)
  got = [d["id"] for d in found]
  assert got and got[0] == cause, found
  assert wrong_way not in got and not ({"lr_too_high", "loss_exploding"} & set(got)
                                       and {"lr_too_low", "loss_plateau"} & set(got)), got
  if cause == "loss_exploding":
    d = found[0]
    assert "too high" in d["title"]
    if "peak" in d["numbers"]:  # finite but exploded; else non-finite, named with its step
      assert d["numbers"]["peak"] > 3 * d["numbers"]["start"]
    assert any(ch.isdigit() for ch in d["message"])


def test_divergence_at_the_first_step_is_too_high_not_a_plateau(tmp_path, rng):
  # The loss explodes at step 1 and stays there: the early losses are huge too, and the
  # update ratios of the exploded weights are tiny (the symptoms of a rate too low).
  losses = np.full(STEPS, 4e19) * (1 + 0.01 * rng.standard_normal(STEPS))
  wd = write_run(tmp_path, losses, monitor=healthy_monitor(1e-10), init_loss=2.45)
  found = [d["id"] for d in diagnose.diagnose(wd)]
  assert found[0] == "loss_exploding" and not {"lr_too_low", "loss_plateau"} & set(found)


@pytest.mark.parametrize("factor, exploded", [(2.99, False), (3.01, True)])
def test_explosion_threshold_both_sides(tmp_path, rng, factor, exploded):
  losses = clean_losses(rng)
  losses[200:] = 2.3 * factor
  wd = write_run(tmp_path, losses, monitor=healthy_monitor(), init_loss=2.3)
  assert ("loss_exploding" in ids(wd)) == exploded
