"""Babysitting on real training runs: planted problems get the right diagnosis, a healthy run
none; the monitor's files, TensorBoard events and the report of a real run.

Each run is a real digits MLP trained by `train_and_evaluate` (real TFDS data, orbax
checkpoints, TensorBoard files), shared by the tests through a module fixture.
"""

import glob
import json
import os
import struct

import jax
import numpy as np
import optax
import pytest

from tests.helpers import ReportPage, initial_state, read_json, tiny_config
from jrecipe import experiment as experiment_lib
from jrecipe.monitor import diagnose
from jrecipe.train import step as step_lib
from jrecipe.train.loop import train_and_evaluate
from jrecipe.train.writer import read_metrics

# SGD (the optimiser CS231n's ~1e-3 update/weight heuristic is stated for) on digits:
# lr 0.1 trains well in 6 epochs; 1.0 is 10x too high, 1e-4 is 1000x too low.
BASE = {"model.hidden": (64,), "num_epochs": 6, "optimizer.name": "sgd",
        "optimizer.learning_rate": 0.1, "monitor.every_steps": 20,
        "monitor.probe_every_steps": 40, "ema_decay": 0.0, "checkpoint.every_epochs": 0}
RUNS = {
    "healthy": {},
    "lr_high": {"optimizer.learning_rate": 1.0},
    "lr_low": {"optimizer.learning_rate": 1e-4},
    "tanh_saturated": {"model.activation": "tanh", "model.init_scale": 10.0},
    # a big model on 50 examples: memorises them, the validation accuracy falls behind
    "overfit": {"model.hidden": (256,), "num_epochs": 25, "batch_size": 25,
                "data.train_subset": 50},
}
PLANTED = {"lr_high": "lr_too_high", "lr_low": "lr_too_low",
           "tanh_saturated": "init_saturated_units", "overfit": "overfitting"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      wd = str(tmp_path_factory.mktemp(name))
      summary = train_and_evaluate(tiny_config(**{**BASE, **RUNS[name]}), wd)
      cache[name] = (wd, summary)
    return cache[name]

  return get


def ids(workdir):
  return {d["id"] for d in read_json(os.path.join(workdir, "diagnoses.json"))["diagnoses"]}


@pytest.mark.slow
def test_healthy_run_gets_no_diagnosis(runs):
  wd, summary = runs("healthy")
  assert summary["test"]["accuracy"] > 0.85
  assert ids(wd) == set(), read_json(os.path.join(wd, "diagnoses.json"))
  assert diagnose.diagnose(wd) == []  # rebuilt from the files: the same verdict


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_problem_gets_its_diagnosis(runs, name):
  wd, _ = runs(name)
  found = ids(wd)
  assert PLANTED[name] in found, (name, found)
  others = set(PLANTED.values()) - {PLANTED[name]}
  # the learning-rate verdicts never contradict each other
  assert not {"lr_too_high", "lr_too_low"} <= found
  if name in ("lr_high", "lr_low"):
    assert not found & (others - {"overfitting"}), found
  entry = [d for d in read_json(os.path.join(wd, "diagnoses.json"))["diagnoses"]
           if d["id"] == PLANTED[name]][0]
  assert entry["numbers"] and entry["message"]  # the numbers behind the verdict


@pytest.mark.slow
def test_update_ratios_are_update_over_weight_norms(runs):
  wd, _ = runs("healthy")
  mon = [r for r in read_metrics(wd) if r["split"] == "monitor"]
  # every 20 steps and the last (6 epochs of 19 steps: batch 64 of 1257 examples)
  assert [r["step"] for r in mon] == [20, 40, 60, 80, 100, 114]
  for r in mon:
    for leaf in ("dense_0/kernel", "dense_0/bias", "head/kernel", "head/bias"):
      assert r[f"grad_norm/{leaf}"] >= 0
      assert r[f"update_ratio/{leaf}"] == pytest.approx(
          r[f"update_norm/{leaf}"] / r[f"param_norm/{leaf}"], rel=1e-6)
    # plain SGD: the update is exactly lr * gradient
    assert r["update_norm/head/kernel"] == pytest.approx(0.1 * r["grad_norm/head/kernel"],
                                                         rel=1e-4)
    assert r["param_norm"] == pytest.approx(np.sqrt(sum(
        r[f"param_norm/{leaf}"] ** 2 for leaf in ("dense_0/kernel", "dense_0/bias",
                                                   "head/kernel", "head/bias"))), rel=1e-5)


@pytest.mark.slow
def test_train_records_and_per_step_losses(runs):
  wd, _ = runs("healthy")
  recs = read_metrics(wd)
  train = [r for r in recs if r["split"] == "train"]
  for r in train:
    for k in ("loss", "accuracy", "total_loss", "reg_loss", "learning_rate", "finite"):
      assert k in r
    assert "grad_norm" not in r  # moved to the monitored step: the plain step stays lean
  steps = [r for r in recs if r["split"] == "train_steps"]
  flat = [(r["first_step"] + i, v) for r in steps for i, v in enumerate(r["loss"])]
  assert [s for s, _ in flat] == list(range(1, 115))
  by_step = dict(flat)
  for r in train:  # each logged mean is the mean of its steps' losses
    n = r["step"] - max(s["step"] for s in train + [{"step": 0}] if s["step"] < r["step"])
    window = [by_step[s] for s in range(r["step"] - n + 1, r["step"] + 1)]
    assert r["loss"] == pytest.approx(np.mean(window), rel=1e-5)


@pytest.mark.slow
def test_parameter_overview_probe_and_pictures(runs):
  wd, _ = runs("healthy")
  ov = read_json(os.path.join(wd, "monitor", "params_at_init.json"))
  assert [r["name"] for r in ov["leaves"]] == ["dense_0/bias", "dense_0/kernel", "head/bias",
                                               "head/kernel"]
  assert ov["total"] == 64 * 64 + 64 + 64 * 10 + 10
  kernel = [r for r in ov["leaves"] if r["name"] == "dense_0/kernel"][0]
  assert kernel["shape"] == [64, 64] and kernel["std"] == pytest.approx(1 / 8, rel=0.1)
  probes = [r for r in read_metrics(wd) if r["split"] == "probe"]
  assert [r["step"] for r in probes] == [0, 40, 80]
  assert 0 <= probes[0]["dead_fraction/dense_0"] < 0.3
  assert "dead_fraction/head" not in probes[0]  # the head has no ReLU
  hist = [json.loads(x) for x in open(os.path.join(wd, "monitor", "histograms.jsonl"))]
  assert len(hist) == 3
  h = hist[0]["activations"]["dense_0"]
  assert sum(h["counts"]) == 256 * 64 and len(h["edges"]) == len(h["counts"]) + 1
  assert set(hist[0]["gradients"]) == {"dense_0/bias", "dense_0/kernel", "head/bias",
                                        "head/kernel"}
  # filters at init and (auto cadence: ~6 per run) every epoch of 6; predictions every eval
  filters = sorted(glob.glob(os.path.join(wd, "monitor", "filters", "*.png")))
  assert len(filters) == 7
  from PIL import Image
  img = np.asarray(Image.open(filters[0]))
  assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 10  # 64 tiles of 8x8 weights
  preds = [json.loads(x) for x in open(os.path.join(wd, "monitor", "predictions.jsonl"))]
  assert [p["step"] for p in preds] == [0, 19, 38, 57, 76, 95, 114]  # 19 steps an epoch
  assert np.allclose(np.sum(preds[-1]["probs"], 1), 1, atol=1e-3)
  acc = np.mean(np.argmax(preds[-1]["probs"], 1) == np.asarray(preds[-1]["y"]))
  assert acc > np.mean(np.argmax(preds[0]["probs"], 1) == np.asarray(preds[0]["y"]))
  assert os.path.exists(os.path.join(wd, "monitor", "prediction_dynamics.png"))
  assert len(glob.glob(os.path.join(wd, "monitor", "predictions", "*.png"))) == 7


def _tb_events(workdir):
  """(tags of scalars, histograms, images) in the run's TensorBoard event files."""
  from tensorboardX.proto import event_pb2
  scalars, hists, imgs = set(), set(), set()
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events*")):
    data = open(path, "rb").read()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in ev.summary.value:
        kind = v.WhichOneof("value")
        {"simple_value": scalars, "histo": hists, "image": imgs}.get(kind, set()).add(v.tag)
  return scalars, hists, imgs


@pytest.mark.slow
def test_tensorboard_gets_scalars_histograms_and_images(runs):
  wd, _ = runs("healthy")
  scalars, hists, imgs = _tb_events(wd)
  assert {"train/loss", "validation/loss", "monitor/update_ratio/head/kernel",
          "probe/dead_fraction/dense_0"} <= scalars
  assert {"activations/dense_0", "gradients/head/kernel"} <= hists
  assert {"monitor/first_layer_weights", "monitor/predictions"} <= imgs


@pytest.mark.slow
def test_report_of_a_real_run(runs):
  wd, summary = runs("healthy")
  page = ReportPage()
  text = open(os.path.join(wd, "report.html"), encoding="utf-8").read()
  page.feed(text)
  page.close()
  assert page.sections == ["summary", "diagnoses", "curves", "babysitting", "filters",
                           "predictions", "config"]
  assert page.images and all(s.startswith("data:image/png;base64,") for s in page.images)
  assert page.svgs >= 6 and not page.external
  assert f"{summary['test']['accuracy']:.4g}" in text
  assert "No diagnosis fired" in text


@pytest.mark.slow
def test_report_names_the_planted_problem(runs):
  wd, _ = runs("lr_low")
  text = open(os.path.join(wd, "report.html"), encoding="utf-8").read()
  assert "Learning rate likely too low" in text and "lr_too_low" in text


def test_monitored_step_updates_exactly_like_the_plain_step():
  """The cadence variant is the same update plus norms (no hidden second update)."""
  config = tiny_config(**{"model.hidden": (8,)})
  exp = experiment_lib.build(config)
  tx = optax.adam(1e-2)
  state = initial_state(exp, tx)
  batch = {k: exp.data.arrays["train"][k][:16] for k in ("x", "y")}
  parts = step_lib.StepParts(exp.model, exp.loss, tx)
  plain = jax.jit(step_lib.make_train_step(parts))
  watched = jax.jit(step_lib.make_train_step(parts, extra_metrics=step_lib.monitor_norms(2, 7)))
  s1, m1 = plain(state, batch)
  s2, m2 = watched(state, batch)  # step count 1: not due, zeros
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert set(m2) == set(m1) | {"monitor"}
  assert not np.any(np.asarray(m2["monitor"]["grad_norm"]))
  s3, m3 = watched(s2, batch)  # step count 2: due
  s1, _ = plain(s1, batch)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s3)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  names = step_lib.leaf_names(state.params)
  mon = step_lib.expand_monitor(jax.device_get(m3["monitor"]), names)
  upd = jax.tree.map(lambda a, b: a - b, s3.params, s2.params)
  for name, u, p in zip(names, jax.tree.leaves(upd), jax.tree.leaves(s2.params)):
    assert mon[f"update_norm/{name}"] == pytest.approx(np.linalg.norm(u), rel=1e-4)
    assert mon[f"param_norm/{name}"] == pytest.approx(np.linalg.norm(p), rel=1e-5)
  assert mon["param_norm"] == pytest.approx(
      np.sqrt(sum(np.sum(np.square(p)) for p in jax.tree.leaves(s2.params))), rel=1e-5)


def test_monitor_off_writes_nothing_extra(tmp_path):
  wd = str(tmp_path / "off")
  train_and_evaluate(tiny_config(**{"model.hidden": (8,), "num_epochs": 1,
                                    "monitor.enabled": False}), wd)
  splits = {r["split"] for r in read_metrics(wd)}
  assert not splits & {"monitor", "probe", "train_steps"}
  for name in ("monitor", "diagnoses.json", "report.html"):
    assert not os.path.exists(os.path.join(wd, name))


@pytest.mark.slow
def test_monitor_under_pmap_placement(tmp_path):
  """The pmap path (per-device copies of every metric) records the same kinds of values."""
  wd = str(tmp_path / "pmap")
  train_and_evaluate(tiny_config(**{"model.hidden": (8,), "num_epochs": 1, "ema_decay": 0.0,
                                    "parallel.mode": "pmap", "monitor.every_steps": 5,
                                    "monitor.probe_every_steps": 10}), wd)
  recs = read_metrics(wd)
  steps = [r for r in recs if r["split"] == "train_steps"]
  assert sum(len(r["loss"]) if isinstance(r["loss"], list) else 1 for r in steps) == 19
  mon = [r for r in recs if r["split"] == "monitor"]
  assert [r["step"] for r in mon] == [5, 10, 15, 19]
  assert all(0 < r["update_ratio/dense_0/kernel"] < 1 for r in mon)
  assert [r["step"] for r in recs if r["split"] == "probe"] == [0, 10]
  assert os.path.exists(os.path.join(wd, "report.html"))


@pytest.mark.slow
def test_a_nonfinite_run_still_gets_its_diagnosis_and_report(tmp_path):
  from jrecipe.errors import RunFailure
  wd = str(tmp_path / "nan")
  with pytest.raises(RunFailure, match="not finite"):
    train_and_evaluate(tiny_config(**{"model.hidden": (8,), "num_epochs": 1, "ema_decay": 0.0,
                                      "optimizer.name": "sgd",
                                      "optimizer.learning_rate": 1e30}), wd)
  assert "loss_exploding" in ids(wd)
  text = open(os.path.join(wd, "report.html"), encoding="utf-8").read()
  assert "TRAINING DIVERGED" in text  # the diagnosis title, on the page
