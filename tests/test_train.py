"""The training core end to end: determinism, resume after SIGKILL, outputs, exact evaluation."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jrecipe import experiment
from jrecipe.train import loop
from jrecipe.train.checkpoint import Checkpointer
from jrecipe.train.evaluate import Evaluator
from tests.helpers import REPO, initial_state, load_params, read_json, tiny_config


def _params_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("run_a"))
  summary = loop.train_and_evaluate(tiny_config(), wd)
  return wd, summary


def test_run_writes_everything(run_a):
  wd, summary = run_a
  for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoints"):
    assert os.path.exists(os.path.join(wd, name)), name
  assert any(f.startswith("events") for f in os.listdir(os.path.join(wd, "tensorboard")))
  records = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  splits = {r["split"] for r in records}
  assert {"train", "validation", "train_epoch", "final_test"} <= splits
  assert all("step" in r and "epoch" in r for r in records)
  s = read_json(os.path.join(wd, "summary.json"))
  assert s["test"]["count"] == summary["test"]["count"] > 0
  assert "test_ema" in s and "validation_ema" in s
  assert s["checkpoints"] and all("val_loss" in c for c in s["checkpoints"])


def test_same_seed_bit_identical_different_seed_differs(run_a, tmp_path):
  wd_a, _ = run_a
  loop.train_and_evaluate(tiny_config(), str(tmp_path / "b"))
  loop.train_and_evaluate(tiny_config(seed=1), str(tmp_path / "c"))
  a, b, c = (load_params(w) for w in (wd_a, tmp_path / "b", tmp_path / "c"))
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_rerun_of_finished_run_resumes_not_restarts(run_a):
  wd, summary = run_a
  before = load_params(wd)
  again = loop.train_and_evaluate(tiny_config(), wd)
  assert again["step"] == summary["step"]
  assert again["test"] == summary["test"]
  after = load_params(wd)
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_continuing_with_more_epochs_equals_one_longer_run(run_a, tmp_path):
  """'Leave it training': raising num_epochs continues; equal to one run of that length."""
  wd, _ = run_a
  import shutil
  cont = str(tmp_path / "cont")
  shutil.copytree(wd, cont)
  loop.train_and_evaluate(tiny_config(num_epochs=3), cont)
  loop.train_and_evaluate(tiny_config(num_epochs=3), str(tmp_path / "long"))
  a, b = load_params(cont), load_params(tmp_path / "long")
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_evaluation_counts_every_example_once():
  exp = experiment.build(tiny_config(eval_batch_size=37))
  from jrecipe.train import parallel
  ev = Evaluator(exp, parallel.make_placement("single"))
  state = initial_state(exp)
  for split in ("validation", "test"):
    out = ev({"params": state.params}, split)
    assert out["count"] == len(exp.data.arrays[split]["y"])
    # the exact mean over examples, not a mean of batch means
    logits = exp.model.apply({"params": state.params}, exp.data.arrays[split]["x"])
    ref = np.mean(np.asarray(exp.loss.per_example(logits, exp.data.arrays[split]["y"])))
    np.testing.assert_allclose(out["loss"], ref, rtol=1e-5)


def test_corrupt_latest_checkpoint_falls_back(run_a, tmp_path, caplog):
  import shutil
  wd = str(tmp_path / "corrupt")
  shutil.copytree(run_a[0], wd)
  ck = Checkpointer(wd, read_only=True)
  steps = ck.steps()
  assert len(steps) >= 2
  latest = os.path.join(wd, "checkpoints", str(steps[-1]), "state")
  for root, _, files in os.walk(latest):
    for f in files:
      if not f.endswith(".json"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"\0garbage")
  exp = experiment.build(tiny_config())
  template = initial_state(exp)
  with caplog.at_level("WARNING", logger="jrecipe"):
    state, meta, step = Checkpointer(wd, read_only=True).restore(template)
  assert step == steps[-2]
  assert "corrupt" in caplog.text or "incomplete" in caplog.text


def test_nonfinite_loss_stops_with_report(tmp_path):
  from jrecipe.errors import RunFailure
  cfg = tiny_config(**{"loss.name": "tests.planted:naive_xent", "optimizer.name": "sgd",
                       "optimizer.learning_rate": 30.0, "num_epochs": 3})
  with pytest.raises(RunFailure, match=r"not finite at step \d+.*leaf.*log of zero"):
    loop.train_and_evaluate(cfg, str(tmp_path / "nan"))
  assert not Checkpointer(str(tmp_path / "nan"), read_only=True).steps()


def test_a_nonfinite_step_keeps_the_whole_state_and_records_it():
  """The step's finite guard: a NaN batch leaves parameters, Adam moments and the EMA exactly
  as they were (the step count moves on, bad_step records the step, the applied update the
  monitor sees is zero); the next finite batch trains again and bad_step keeps the first."""
  from jrecipe.train import step as step_lib
  cfg = tiny_config(ema_decay=0.9)
  exp = experiment.build(cfg)
  tx = exp.optimizer()
  step = jax.jit(step_lib.make_train_step(step_lib.StepParts(exp.model, exp.loss, tx,
                                                             ema_decay=0.9),
                                          extra_metrics=step_lib.monitor_norms()))
  x = np.asarray(exp.data.arrays["train"]["x"][:64])
  y = np.asarray(exp.data.arrays["train"]["y"][:64])
  state, _ = step(initial_state(exp, tx), {"x": x, "y": y})
  before = jax.device_get(state)
  bad = x.copy()
  bad[3] = np.nan
  after, m = step(state, {"x": bad, "y": y})
  after = jax.device_get(after)
  assert float(m["finite"]) == 0.0 and int(after.step) == 2 and int(after.bad_step) == 1
  for name in ("params", "opt_state", "ema_params", "model_state"):
    same = jax.tree.map(lambda a, b: np.array_equal(a, b, equal_nan=True),
                        getattr(before, name), getattr(after, name))
    assert all(jax.tree.leaves(same)), name
  assert not np.any(np.asarray(m["monitor"]["update_norm"]))
  again, m = step(jax.device_put(after), {"x": x, "y": y})
  again = jax.device_get(again)
  assert float(m["finite"]) == 1.0 and int(again.bad_step) == 1
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), after.params, again.params)
  assert all(jax.tree.leaves(moved))


def test_nnx_model_trains_through_the_same_pure_step(tmp_path):
  cfg = tiny_config(**{"model": _nnx_model_config()})
  summary = loop.train_and_evaluate(cfg, str(tmp_path / "nnx"))
  assert summary["test"]["accuracy"] > 0.5


def _nnx_model_config():
  import ml_collections
  return ml_collections.ConfigDict({"name": "nnx_mlp"})


def test_sigkill_and_sigterm_mid_run_resume_to_identical_params(tmp_path):
  """A run killed with SIGKILL (at a checkpoint write or between), or preempted with SIGTERM,
  ends like an uninterrupted one."""
  args = ["--config=configs/digits_mlp.py", "--config.num_epochs=12", "--config.model.hidden=(32,)",
          "--config.progress=False", "--config.batch_size=64"]
  ref = str(tmp_path / "ref")
  r = subprocess.run([sys.executable, "-m", "jrecipe", *args, f"--workdir={ref}"], cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  rng = np.random.default_rng(0)
  for trial in range(2):
    wd = str(tmp_path / f"killed{trial}")
    p = subprocess.Popen([sys.executable, "-m", "jrecipe", *args, f"--workdir={wd}"], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = os.path.join(wd, "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for training to be under way, then kill at random
      if os.path.isdir(ckdir) and len(os.listdir(ckdir)) >= 1 + trial:
        break
      time.sleep(0.05)
    time.sleep(float(rng.uniform(0.0, 0.5)))
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = subprocess.run([sys.executable, "-m", "jrecipe", *args, f"--workdir={wd}"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_params(ref), load_params(wd)
    assert all(np.array_equal(a[k], b[k]) for k in a), f"trial {trial}"
    steps = [json.loads(l)["step"] for l in open(os.path.join(wd, "metrics.jsonl"))
             if json.loads(l)["split"] == "train"]
    assert steps == sorted(set(steps)), "each logged step appears once after resume"

  # SIGTERM (a cloud VM's preemption notice): finish the step, save, exit 75 (EX_TEMPFAIL:
  # resumable) with one line on stderr; rerun resumes.
  wd = str(tmp_path / "preempted")
  p = subprocess.Popen([sys.executable, "-m", "jrecipe", *args, f"--workdir={wd}"], cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  ckdir = os.path.join(wd, "checkpoints")
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.isdir(ckdir) and os.listdir(ckdir)):
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=120)
  assert p.returncode == loop.EXIT_PREEMPTED == 75, err[-2000:]
  assert "preempted (SIGTERM) at step" in err and "rerun the same command" in err, err[-2000:]
  summary = json.load(open(os.path.join(wd, "summary.json")))
  assert summary["stopped"] and "preempted" in summary["stopped"]
  r = subprocess.run([sys.executable, "-m", "jrecipe", *args, f"--workdir={wd}"], cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  a, b = load_params(ref), load_params(wd)
  assert all(np.array_equal(a[k], b[k]) for k in a), "resumed after SIGTERM"


def test_early_stopping_and_reduce_on_plateau_follow_the_validation_loss(tmp_path):
  """A small subset overfits fast: the validation loss turns up, the rate is cut, then stops."""
  cfg = tiny_config(**{"data.train_subset": 64, "batch_size": 32, "num_epochs": 200,
                       "optimizer.learning_rate": 1e-2, "early_stopping_patience": 4,
                       "plateau.enabled": True, "plateau.patience": 2, "plateau.factor": 0.5,
                       "log_every_steps": 1, "model.hidden": (128,)})
  summary = loop.train_and_evaluate(cfg, str(tmp_path / "es"))
  assert summary["stopped"] and "early stopping" in summary["stopped"]
  assert summary["epoch"] < 200
  records = [json.loads(l) for l in open(tmp_path / "es" / "metrics.jsonl")]
  rates = [r["learning_rate"] for r in records if r["split"] == "train"]
  assert rates[0] == pytest.approx(1e-2) and min(rates) <= 0.5e-2 + 1e-9
  val = [r["loss"] for r in records if r["split"] == "validation" and r["step"] > 0]
  assert min(val) < val[-1], "stopped after the validation loss stopped improving"


_NO_TORCH = """
import sys
from jrecipe.train.writer import MetricWriter
w = MetricWriter(sys.argv[1], enabled=True)
w.write(1, {"loss": 1.0})
w.close()
print("torch" in sys.modules)
"""


def test_tensorboard_writer_does_not_import_torch(tmp_path):
  """tensorboardX imports torch whenever it is installed (2 s of every start): a planted
  `torch` package on the path must stay unimported by the metric writer."""
  fake = tmp_path / "site" / "torch"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("Tensor = object\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), REPO])}
  (tmp_path / "wd").mkdir()
  r = subprocess.run([sys.executable, "-c", _NO_TORCH, str(tmp_path / "wd")], cwd=REPO,
                     capture_output=True, text=True, timeout=120, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["False"], r.stdout
  assert list((tmp_path / "wd" / "tensorboard").iterdir())
