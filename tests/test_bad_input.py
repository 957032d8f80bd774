"""Bad input, tried on purpose: every mistake is one paragraph and exit 2 (1 at run time),
found before anything heavy runs, and an existing work directory is never damaged.

In-process where the path allows it (config parsing and `experiment.build` are importable);
subprocesses only for what needs the real entry point: exit codes, and a disk that fills up
between two checkpoints.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st

from jrecipe import experiment
from jrecipe.cli_config import load_config_with_overrides
from jrecipe.data import pipeline
from jrecipe.errors import UserError
from tests import config_fuzz
from tests.helpers import REPO, run_cli, tiny_config

DIGITS = "configs/digits_mlp.py"


def _assert_paragraph(message: str):
  """What the entry point prints after 'jrecipe: error:': non-empty, one line."""
  assert message.strip(), "empty message"
  assert "\n" not in message.strip(), message
  assert "Traceback" not in message


def _build_error(overrides, path=DIGITS) -> str:
  with pytest.raises(UserError) as e:
    experiment.build(load_config_with_overrides(path, overrides))
  _assert_paragraph(str(e.value))
  return str(e.value)


# --- 1. malformed config values ------------------------------------------------------------

@pytest.mark.parametrize("override, needles", [
    ("batch_size=-5", ["config.batch_size", "-5", ">= 1"]),
    ("batch_size=0", ["config.batch_size", ">= 1"]),
    ("eval_batch_size=0", ["config.eval_batch_size", ">= 1"]),
    ("optimizer.learning_rate=0", ["config.optimizer.learning_rate", "(0, inf)"]),
    ("optimizer.learning_rate=-0.1", ["config.optimizer.learning_rate", "(0, inf)"]),
    ("optimizer.learning_rate=nan", ["config.optimizer.learning_rate", "finite"]),
    ("optimizer.learning_rate=inf", ["config.optimizer.learning_rate", "finite"]),
    ("model.dropout=1.0", ["config.model.dropout", "[0, 1)"]),
    ("model.dropout=-0.1", ["config.model.dropout", "[0, 1)"]),
    ("num_epochs=0", ["config.num_epochs", "(0, inf)"]),
    ("num_epochs=-2", ["config.num_epochs", "(0, inf)"]),
    ("num_epochs=inf", ["config.num_epochs", "finite"]),
    ("num_epochs=1e-9", ["num_epochs", "less than one step"]),
    # found by the random-override test: 238609295 epochs of 9 steps overflowed int32 in the
    # warm-up ramp, an OverflowError from JAX instead of a paragraph
    ("schedule.warmup=238609295", ["config.schedule", "2147483655 steps", "int32"]),
    ("num_epochs=1e12", ["num_epochs", "int32"]),
    ("schedule.unit=days", ["config.schedule.unit", "'steps', 'epochs'"]),
    ("momentum_schedule.unit=weeks", ["config.momentum_schedule.unit", "'steps', 'epochs'"]),
    ("ema_decay=1.0", ["config.ema_decay", "[0, 1)"]),
    ("ema_decay=-0.5", ["config.ema_decay", "[0, 1)"]),
    ("l2=-1e-4", ["config.l2", "[0, inf)"]),
    ("seed=-1", ["config.seed", "[0, 4294967295]"]),
    ("seed=4294967296", ["config.seed", "32 bits"]),
    ("log_every_steps=0", ["config.log_every_steps", ">= 1"]),
    ("early_stopping_patience=-1", ["config.early_stopping_patience", ">= 0"]),
    ("plateau.factor=1.5", ["config.plateau.factor", "(0, 1)"]),
    ("plateau.patience=0", ["config.plateau.patience", ">= 1"]),
    ("checkpoint.every_epochs=-1", ["config.checkpoint.every_epochs", ">= 0"]),
    ("parallel.mode=tpu", ["config.parallel.mode", "'mesh', 'pmap', 'single'"]),
    ("parallel.num_devices=64", ["config.parallel.num_devices", "at most"]),
    ("eval_splits=('validation','tset')", ["config.eval_splits", "removed"]),
    ("data.augment.random_crop=8", ["random_crop", "at most 7"]),
    ("model.name=.mod:fn", ["config.model.name", "import path"]),
    ("optimizer.b1=1.0", ["config.optimizer.b1", "[0, 1)"]),
    ("model.hidden=(0,)", ["hidden", "positive"]),
])
def test_malformed_value_names_the_field_and_the_valid_range(override, needles):
  import jax
  jax.devices()  # the device-count checks run once the backend exists, as in training
  msg = _build_error([override])
  for n in needles:
    assert n in msg, (n, msg)


# --- 2-4. datasets, output shapes, labels --------------------------------------------------

def test_missing_dataset_is_a_user_error():
  msg = _build_error(["data.name=tfds:nonexistent"])
  assert "nonexistent" in msg and "array_record" in msg


def test_model_with_the_wrong_number_of_outputs_is_refused_at_build():
  msg = _build_error(["model={'name': 'tests.planted:seven_output_mlp'}"])
  assert "(2, 7)" in msg and "(2, 10)" in msg and "digits" in msg, msg


def _digits_as_regression(width: int):
  """digits with float targets [N, width] (the first pixels), to plant a regression task."""
  real = pipeline.load_dataset(tiny_config().data)
  arrays = {s: {**d, "y": np.ascontiguousarray(d["x"].reshape(len(d["x"]), -1)[:, :width],
                                              np.float32)}
            for s, d in real.arrays.items()}
  spec = dataclasses.replace(real.spec, task="regression", num_classes=None, class_names=None)
  return pipeline.Dataset(spec=spec, arrays=arrays, raw=real.raw)


def test_regression_model_of_the_wrong_width_is_refused(monkeypatch):
  regression = _digits_as_regression(2)
  monkeypatch.setattr(pipeline, "load_dataset", lambda *a, **k: regression)
  cfg = tiny_config(**{"loss.name": "l2", "init_bias": False})
  cfg.model = ml_collections.ConfigDict({"name": "tests.planted:width_three_regressor"})
  with pytest.raises(UserError, match=r"outputs shape \(2, 3\).*expects \(2, 2\)"):
    experiment.build(cfg)
  cfg.model.name = "tests.planted:width_two_regressor"
  assert experiment.build(cfg).spec.task == "regression"


@pytest.mark.parametrize("split, bad", [("train", [10, 12]), ("test", [-1])])
def test_labels_out_of_range_name_the_split_values_and_range(monkeypatch, split, bad):
  real = pipeline.load_dataset(tiny_config().data)

  def corrupted(*a, **k):
    arrays = {s: dict(d) for s, d in real.arrays.items()}
    y = np.array(arrays[split]["y"])
    y[:len(bad)] = bad
    arrays[split]["y"] = y
    return pipeline.Dataset(spec=real.spec, arrays=arrays, raw=real.raw)

  monkeypatch.setattr(pipeline, "load_dataset", corrupted)
  with pytest.raises(UserError) as e:
    experiment.build(tiny_config())
  msg = str(e.value)
  _assert_paragraph(msg)
  assert repr(split) in msg and "[0, 9]" in msg, msg
  assert all(str(v) in msg for v in bad), msg


def test_validate_experiment_rechecks_an_edited_experiment():
  exp = experiment.build(tiny_config())
  y = np.array(exp.data.arrays["validation"]["y"])
  y[3] = 11
  exp.data.arrays["validation"]["y"] = y
  with pytest.raises(UserError, match=r"'validation' split.*bad values: 11"):
    experiment.validate_experiment(exp)


# --- 7. random overrides: a build or a clean UserError, never anything else ------------------

# The generator is shared with tests/test_fuzz_config.py and bench/fuzz.py.
_override = config_fuzz.OVERRIDE


# 40 examples take about 1 s; JRECIPE_HYPOTHESIS_EXAMPLES=2000 for a longer hunt. The deadline
# is generous: the first examples import and trace on a shared 2-core machine.
@settings(max_examples=int(os.environ.get("JRECIPE_HYPOTHESIS_EXAMPLES", 40)), deadline=30_000,
          database=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.lists(_override, min_size=1, max_size=3))
def test_random_overrides_build_or_give_one_clean_paragraph(overrides):
  """Every outcome of random overrides through the command line's parser and build is a
  built Experiment or a UserError of one non-empty line: never another exception."""
  try:
    config = load_config_with_overrides(DIGITS, overrides)
  except UserError as e:
    _assert_paragraph(str(e))
    event("refused by the flag parser")
    return
  data_dir = config.data.get("data_dir", "") if hasattr(config.data, "get") else ""
  assume(data_dir == "")  # never prepare a dataset into a random directory
  try:
    experiment.build(config)
    event("built")
  except UserError as e:
    _assert_paragraph(str(e))
    event("refused by experiment.build")


# --- 5-6. through the entry point: exit codes, a full disk, an existing work directory -------

_ARGS = [f"--config={DIGITS}", "--config.num_epochs=3", "--config.model.hidden=(256,)",
         "--config.batch_size=64", "--config.checkpoint.every_epochs=1",
         "--config.progress=False"]

# Runs the real entry point, but lowers RLIMIT_FSIZE (writes past 64 kB fail with EFBIG, as on
# a full disk) once the first checkpoint is complete, just before the second is written.
_FULL_DISK_DRIVER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not a killed process
from jrecipe.train import checkpoint
save, calls = checkpoint.Checkpointer.save, []
def filling_save(self, *a, **k):
  calls.append(1)
  if len(calls) == 2:
    self.manager.wait_until_finished()
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
  return save(self, *a, **k)
checkpoint.Checkpointer.save = filling_save
sys.argv = ["jrecipe"] + sys.argv[1:]
from jrecipe.main import run
run()
"""


def test_storage_errors_from_save_wait_and_close_become_run_failures(tmp_path):
  """orbax reports a failed background write at the next save or wait, often as tensorstore's
  ValueError: each becomes a RunFailure, other errors stay what they are, and the earlier
  checkpoint still restores."""
  import errno
  from jrecipe.errors import RunFailure
  from jrecipe.train.checkpoint import Checkpointer
  state = {"w": np.arange(3, dtype=np.float32)}
  ck = Checkpointer(str(tmp_path))
  ck.save(1, state, {"epoch": 1})
  ck.wait()

  def raises(e):
    def f(*a, **k):
      raise e
    return f

  full = OSError(errno.ENOSPC, "No space left on device")
  ts = ValueError("OUT_OF_RANGE: Failed writing: ... [os_error_code='28']")
  for method, call, err in [("save", lambda: ck.save(2, state, {"epoch": 2}), full),
                            ("wait_until_finished", ck.wait, ts),
                            ("wait_until_finished", ck.close, full)]:
    original = getattr(ck.manager, method)
    setattr(ck.manager, method, raises(err))
    with pytest.raises(RunFailure, match=r"untouched \(complete: steps 1; a rerun resumes from "
                                         r"step 1\)\. Free disk space"):
      call()
    setattr(ck.manager, method, original)
  original = ck.manager.wait_until_finished
  ck.manager.wait_until_finished = raises(ValueError("a bug, not the disk"))
  with pytest.raises(ValueError, match="a bug"):
    ck.wait()
  ck.manager.wait_until_finished = original
  ck.close()
  restored = Checkpointer(str(tmp_path), read_only=True).restore(state)
  assert restored[2] == 1 and np.array_equal(restored[0]["w"], state["w"])


def _committed(wd):
  return sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit())


def test_full_disk_exits_1_keeps_checkpoints_and_bad_input_leaves_the_workdir_alone(tmp_path):
  wd = str(tmp_path / "wd")
  r = subprocess.run([sys.executable, "-c", _FULL_DISK_DRIVER, *_ARGS, f"--workdir={wd}"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  # The message is one write, but orbax's and tensorstore's threads may still be printing
  # their own 'Event loop is closed' tracebacks around it: find it rather than take the last line.
  errors = re.findall(r"jrecipe: error: .*", r.stderr)
  assert len(errors) == 1 and errors[0].startswith("jrecipe: error: Could not write"), \
      r.stderr[-3000:]
  spe = 1257 // 64
  msg = errors[0]
  assert f"the checkpoint of step {2 * spe} under" in msg, msg
  assert (f"The previous checkpoints are untouched (complete: steps {spe}; a rerun resumes from "
          f"step {spe}). Free disk space") in msg, msg
  assert "File too large" in msg and "Traceback" not in msg, msg
  assert _committed(wd) == [spe], os.listdir(os.path.join(wd, "checkpoints"))
  assert not os.path.exists(os.path.join(wd, "summary.json"))

  r = run_cli([*_ARGS, f"--workdir={wd}"])  # disk space back: the rerun resumes
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Resuming from the checkpoint at step {spe}" in r.stderr, r.stderr[-3000:]
  assert json.load(open(os.path.join(wd, "summary.json")))["step"] == 3 * spe

  # 6 and 'never corrupts': bad values and another config on this finished run change nothing
  before = {p: open(os.path.join(wd, p), "rb").read() for p in ("config.json", "summary.json")}
  listing = sorted(os.listdir(os.path.join(wd, "checkpoints")))
  for extra, code, needle in [("--config.eval_batch_size=0", 2, "config.eval_batch_size"),
                              ("--config.model.hidden=(128,)", 2, "different config")]:
    r = run_cli([*_ARGS, extra, f"--workdir={wd}"])
    assert r.returncode == code, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("jrecipe: error:") and needle in last, r.stderr[-3000:]
  assert {p: open(os.path.join(wd, p), "rb").read() for p in before} == before
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == listing


def _file_size_limit(kib):
  def limit():  # in the child, before exec: every file it writes stops at `kib` KiB
    import resource
    import signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (kib * 1024, kib * 1024))
  return limit


@pytest.mark.parametrize("kib, failed", [(2, "config.json"),
                                          (16, "tensorboard|metrics.jsonl")])
def test_a_full_disk_under_config_or_metrics_is_one_paragraph_exit_1(tmp_path, kib, failed):
  """A real OS limit (RLIMIT_FSIZE) fails the write of config.json (2 KiB) or of the metrics'
  TensorBoard events (16 KiB; the writer thread used to die and the run hang at 0% CPU)."""
  wd = tmp_path / "wd"
  args = [*_ARGS, "--config.num_epochs=20", "--config.checkpoint.every_epochs=10",
          "--compilation_cache=none", f"--workdir={wd}"]
  r = subprocess.run([sys.executable, "-m", "jrecipe", *args], cwd=REPO, capture_output=True,
                     text=True, timeout=300, preexec_fn=_file_size_limit(kib))
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  (line,) = re.findall(r"jrecipe: error: .*", r.stderr)
  assert re.search(rf"writing {wd}/({failed}) failed with File too large \(EFBIG\)", line), line
  assert not list(tmp_path.rglob("*.tmp*"))  # no half-written JSON left behind
  if kib == 2:
    assert not wd.exists()  # nothing but the lock was there, and it is gone
    return
  r = run_cli(args)  # space back: the rerun finishes, each metric row once
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [(x["split"], x["step"]) for x in map(json.loads, open(wd / "metrics.jsonl"))]
  assert len(rows) == len(set(rows)) and ("final_test", 20 * (1257 // 64)) in rows


# The storage fills up at the very end, while report.html is written (after summary.json).
_FULL_DISK_AT_REPORT_DRIVER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from jrecipe.report import html
write = html.write_report
def filling_write(*a, **k):
  resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
  return write(*a, **k)
html.write_report = filling_write
sys.argv = ["jrecipe"] + sys.argv[1:]
from jrecipe.main import run
run()
"""


def test_a_full_disk_while_the_report_is_written_is_exit_1_and_a_rerun_writes_it(tmp_path):
  """A finished run whose report.html the storage refused used to exit 0 with a warning, so a
  scheduler saw success and the report was missing: now it is the storage paragraph and exit 1,
  no temporary file is left, and the rerun writes the report without repeating a final row."""
  wd = tmp_path / "wd"
  args = [*_ARGS, "--config.num_epochs=1", f"--workdir={wd}"]
  r = subprocess.run([sys.executable, "-c", _FULL_DISK_AT_REPORT_DRIVER, *args], cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  (line,) = re.findall(r"jrecipe: error: .*", r.stderr)
  assert re.search(rf"writing {wd}/report.html failed with File too large \(EFBIG\)", line), line
  assert "The checkpoints are intact" in line, line
  assert not (wd / "report.html").exists() and not list(tmp_path.rglob("*.tmp*"))
  r = run_cli(args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (wd / "report.html").stat().st_size > 1024
  rows = [(x["split"], x["step"]) for x in map(json.loads, open(wd / "metrics.jsonl"))]
  assert len(rows) == len(set(rows)) and [s for s, _ in rows].count("final_test") == 1


def test_cli_exit_2_for_shape_mismatch_missing_dataset_and_indivisible_batch(tmp_path):
  cases = [("--config.model={'name': 'tests.planted:seven_output_mlp'}", {}, "(2, 7)"),
           ("--config.data.name=tfds:nonexistent", {}, "nonexistent"),
           ("--config.batch_size=63",
            {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, "2 devices")]
  procs = []
  for i, (extra, env, _) in enumerate(cases):
    wd = tmp_path / f"wd{i}"
    procs.append((wd, subprocess.Popen(
        [sys.executable, "-m", "jrecipe", f"--config={DIGITS}:smoke", extra, f"--workdir={wd}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env})))
  for (wd, p), (_, _, needle) in zip(procs, cases):
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("jrecipe: error:") and needle in last, err[-3000:]
    assert "Traceback" not in err
    assert not wd.exists() or not any(wd.iterdir())


def test_distributed_without_a_job_to_join_is_exit_2_not_a_traceback(tmp_path):
  """bench/fuzz.py found JAX's ValueError ('coordinator_address should be defined') as a
  traceback and exit 1."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JRECIPE_COORDINATOR",
                                                                  "JRECIPE_NUM_PROC",
                                                                  "JRECIPE_PROCESS_ID"))}
  r = subprocess.run([sys.executable, "-m", "jrecipe", f"--config={DIGITS}:smoke",
                      "--config.parallel.distributed=True", f"--workdir={tmp_path / 'wd'}"],
                     cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  (line,) = r.stderr.strip().splitlines()
  assert "JAX found no multi-host job to join" in line and "$JRECIPE_COORDINATOR" in line
  assert not (tmp_path / "wd").exists()
