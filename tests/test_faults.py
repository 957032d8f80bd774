"""Fault injection: damaged checkpoints, two processes on one work directory, a kill while an
old checkpoint is being deleted. Each fault is detected, reported in one line, and the rerun
finishes bit-identical to an uninterrupted run (bench/soak.py repeats these at random)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jrecipe.errors import UserError
from jrecipe.train import integrity, loop
from jrecipe.train import workdir as workdir_lib
from jrecipe.train.checkpoint import Checkpointer
from tests.helpers import REPO, load_params, read_json, tiny_config

# 19 steps per epoch; a checkpoint every epoch: steps 19, 38, 57 (newest + best 2 kept).
CFG = dict(num_epochs=3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("ref") / "run")
  loop.train_and_evaluate(tiny_config(**CFG), wd)
  return wd


def _ckdir(wd):
  return os.path.join(wd, "checkpoints")


def _data_files(step_dir):
  m = integrity.read_manifest(step_dir)
  return sorted((f for f in m["files"] if "/d/" in f or f.startswith("d/")),
                key=lambda f: -m["files"][f]["size"])


def _overwrite_bytes(step_dir, rng):
  path = os.path.join(step_dir, _data_files(step_dir)[0])
  data = bytearray(open(path, "rb").read())
  for off in rng.choice(len(data), size=int(rng.integers(1, 65)), replace=False):
    data[off] ^= int(rng.integers(1, 256))  # never the same byte
  open(path, "wb").write(bytes(data))


def _truncate(step_dir, rng):
  path = os.path.join(step_dir, _data_files(step_dir)[0])
  os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = {
    "bytes_overwritten": _overwrite_bytes,
    "truncated": _truncate,
    "manifest_missing": lambda d, rng: os.remove(os.path.join(d, integrity.MANIFEST)),
    "meta_missing": lambda d, rng: shutil.rmtree(os.path.join(d, "meta")),
    "half_deleted": lambda d, rng: _half_delete(d),
}


def _half_delete(step_dir):
  """What a kill during a plain rmtree of the step left: only `state/` of it."""
  for name in os.listdir(step_dir):
    path = os.path.join(step_dir, name)
    if name != "state":
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _rows(wd):
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  return sorted((r["split"], r["step"]) for r in rows)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_rerun_finishes(reference, tmp_path,
                                                                       damage, caplog):
  """Issue 19 item 1: the rerun used to retrain to the damaged step and die on
  StepAlreadyExistsError forever; now it is moved aside and the run ends bit-identical."""
  wd = str(tmp_path / "run")
  shutil.copytree(reference, wd)
  latest = Checkpointer(wd, read_only=True).steps()[-1]
  DAMAGE[damage](os.path.join(_ckdir(wd), str(latest)), np.random.default_rng(0))
  with caplog.at_level("WARNING", logger="jrecipe"):
    summary = loop.train_and_evaluate(tiny_config(**CFG), wd)
  lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(lines) == 1 and f"step {latest} is damaged" in lines[0], caplog.text
  assert os.path.isdir(os.path.join(_ckdir(wd), integrity.DAMAGED, str(latest)))
  assert summary["step"] == latest  # it trained past the damaged step's number again
  a, b = load_params(reference), load_params(wd)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert _rows(wd) == _rows(reference)  # every row once, none missing
  assert integrity.problem(os.path.join(_ckdir(wd), str(latest))) is None


def test_every_byte_corruption_is_detected_before_a_restore(reference, tmp_path):
  """Issue 19 item 2: 12 of 12 corrupted restores succeeded silently; 0 of 40 here."""
  rng = np.random.default_rng(1)
  src = os.path.join(_ckdir(reference), str(Checkpointer(reference, read_only=True).steps()[-1]))
  assert integrity.problem(src) is None
  files = sorted(integrity.read_manifest(src)["files"])
  silent = 0
  for trial in range(40):
    d = str(tmp_path / f"t{trial}")
    shutil.copytree(src, d)
    path = os.path.join(d, files[trial % len(files)])
    data = bytearray(open(path, "rb").read())
    if not data:
      continue
    for off in rng.choice(len(data), size=min(len(data), int(rng.integers(1, 65))),
                          replace=False):
      data[off] ^= int(rng.integers(1, 256))
    open(path, "wb").write(bytes(data))
    silent += integrity.problem(d) is None
    shutil.rmtree(d)
  assert silent == 0


def test_retention_keeps_the_newest_and_the_best_and_drops_a_stop_checkpoint(tmp_path):
  """A checkpoint without a validation loss (a preemption's stop) is kept only while it is
  the newest; old steps go through the trash (nothing half-deleted is left)."""
  ck = Checkpointer(str(tmp_path), keep_best=1)
  state = {"w": np.arange(3, dtype=np.float32)}
  for step, val in [(1, 3.0), (2, 1.0), (3, None), (4, 2.0), (5, 2.5)]:
    ck.save(step, state, {"epoch": step}, val)
    ck.wait()
    if step == 3:
      assert ck.steps() == [2, 3]
  ck.close()
  assert ck.list_checkpoints() == [{"step": 2, "val_loss": 1.0}, {"step": 5, "val_loss": 2.5}]
  assert ck.best_step() == 2
  assert sorted(os.listdir(ck.directory)) == ["2", "5"]


def test_an_intact_checkpoint_that_does_not_fit_is_a_user_error_not_damage(tmp_path):
  ck = Checkpointer(str(tmp_path))
  ck.save(1, {"w": np.zeros(3, np.float32)}, {"epoch": 1}, 1.0)
  ck.close()
  with pytest.raises(UserError, match="intact .* does not fit"):
    Checkpointer(str(tmp_path)).restore({"w": np.zeros(3, np.float32), "b": np.zeros(2)})
  # Same structure, another shape: orbax alone restores the saved (3,) silently.
  with pytest.raises(UserError, match=r"\['w'\] is \(3,\) in the checkpoint, \(4,\) in this "):
    Checkpointer(str(tmp_path)).restore({"w": np.zeros(4, np.float32)})
  assert Checkpointer(str(tmp_path), read_only=True).steps() == [1]  # not moved aside
  assert Checkpointer(str(tmp_path)).restore({"w": np.ones(3, np.float32)})[2] == 1  # the twin


def test_every_checkpoint_damaged_is_a_run_failure_not_a_silent_fresh_start(tmp_path):
  from jrecipe.errors import RunFailure
  ck = Checkpointer(str(tmp_path))
  ck.save(1, {"w": np.zeros(3, np.float32)}, {"epoch": 1}, 1.0)
  ck.close()
  os.remove(os.path.join(ck.directory, "1", integrity.MANIFEST))
  with pytest.raises(RunFailure, match="None of the 1 checkpoints"):
    Checkpointer(str(tmp_path)).restore({"w": np.zeros(3, np.float32)})
  assert os.listdir(os.path.join(ck.directory, integrity.DAMAGED)) == ["1"]


def test_leftovers_of_a_killed_run_are_cleaned_at_start(reference, tmp_path):
  wd = str(tmp_path / "run")
  shutil.copytree(reference, wd)
  steps = Checkpointer(wd, read_only=True).steps()
  os.makedirs(os.path.join(_ckdir(wd), integrity.TRASH, "7.123", "state"))
  shutil.copytree(os.path.join(_ckdir(wd), str(steps[-1])),
                  os.path.join(_ckdir(wd), f"{steps[-1] + 19}{integrity.TMP_SUFFIX}"))
  loop.train_and_evaluate(tiny_config(**CFG), wd)
  names = os.listdir(_ckdir(wd))
  assert integrity.TRASH not in names and not any(integrity.TMP_SUFFIX in n for n in names)


def test_the_lock_names_its_holder_and_a_dead_holders_file_is_taken_over(tmp_path):
  wd = str(tmp_path / "wd")
  first = workdir_lib.WorkdirLock(wd).acquire()  # creates wd; removes it on release if empty
  with pytest.raises(UserError, match=rf"in use by another jrecipe process: pid {os.getpid()} "
                                      r"on host .*, since .* s ago\)"):
    workdir_lib.WorkdirLock(wd).acquire()
  first.release()
  assert not os.path.exists(wd)
  os.makedirs(wd)
  # A lock file left by a process that died (no flock held any more): taken over.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  with open(os.path.join(wd, workdir_lib.LOCK_FILE), "w") as f:
    json.dump({"host": "elsewhere", "pid": int(dead), "since": 0}, f)
  second = workdir_lib.WorkdirLock(wd).acquire()
  assert read_json(os.path.join(wd, workdir_lib.LOCK_FILE))["pid"] == os.getpid()
  second.release()
  assert not os.path.exists(os.path.join(wd, workdir_lib.LOCK_FILE))


CLI = ["--config=configs/digits_mlp.py", "--config.model.hidden=(32,)",
       "--config.progress=False", "--config.batch_size=64"]


def test_a_second_process_on_a_workdir_in_use_exits_2_at_once(tmp_path):
  wd = str(tmp_path / "wd")
  args = [sys.executable, "-m", "jrecipe", *CLI, "--config.num_epochs=60", f"--workdir={wd}"]
  first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
  try:
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.isdir(_ckdir(wd)):
      assert first.poll() is None, first.stderr.read()[-2000:]
      time.sleep(0.05)
    t0 = time.time()
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
    took = time.time() - t0
    _, err = first.communicate(timeout=300)
  finally:
    if first.poll() is None:
      first.kill()
  assert second.returncode == 2 and took < 2.0, (second.returncode, took, second.stderr)
  lines = second.stderr.strip().splitlines()
  assert len(lines) == 1 and f"pid {first.pid} on host" in lines[0], second.stderr
  assert first.returncode == 0 and "Resuming" not in err, err[-2000:]
  rows = _rows(wd)
  assert len(rows) == len(set(rows))
  assert read_json(os.path.join(wd, "summary.json"))["step"] == 60 * 19


# The real entry point, but the deletion of an old checkpoint dies (SIGKILL) after removing
# one file: the state a kill during deletion leaves.
_KILLED_IN_DELETE = """
import os, signal, sys, types
from jrecipe.train import integrity
def dying_rmtree(path, ignore_errors=False):
  for root, _, files in os.walk(path):
    if files:
      os.remove(os.path.join(root, files[0]))
      break
  os.kill(os.getpid(), signal.SIGKILL)
integrity.shutil = types.SimpleNamespace(rmtree=dying_rmtree)
sys.argv = ["jrecipe"] + sys.argv[1:]
from jrecipe.main import run
run()
"""


def test_sigkill_during_the_deletion_of_an_old_checkpoint_resumes_cleanly(tmp_path):
  args = [*CLI, "--config.num_epochs=4", "--config.checkpoint.keep_best=0",
          "--config.checkpoint.every_epochs=1"]
  ref, wd = str(tmp_path / "ref"), str(tmp_path / "wd")
  r = subprocess.run([sys.executable, "-m", "jrecipe", *args, f"--workdir={ref}"], cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  r = subprocess.run([sys.executable, "-c", _KILLED_IN_DELETE, *args, f"--workdir={wd}"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
  assert os.path.isdir(os.path.join(_ckdir(wd), integrity.TRASH))  # killed mid-deletion
  r = subprocess.run([sys.executable, "-m", "jrecipe", *args, f"--workdir={wd}"], cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "damaged" not in r.stderr, r.stderr[-2000:]
  a, b = load_params(ref), load_params(wd)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert sorted(os.listdir(_ckdir(wd))) == sorted(os.listdir(_ckdir(ref)))
  assert _rows(wd) == _rows(ref)


class _FakeKV:
  """The coordination service's key-value store, in memory."""

  def __init__(self):
    self.kv = {}

  def key_value_set(self, key, value, allow_overwrite=False):
    self.kv[key] = value

  def key_value_try_get(self, key):
    if key not in self.kv:
      raise RuntimeError(f"NOT_FOUND: {key}")
    return self.kv[key]


def test_the_peer_watchdog_names_a_silent_peer_and_ignores_a_finished_one():
  from jrecipe.train import peers
  kv, lost = _FakeKV(), []
  me = peers.PeerWatchdog(kv, 0, 3, timeout=0.4, period=0.02, on_lost=lost.append).start()
  alive = peers.PeerWatchdog(kv, 1, 3, timeout=60, period=0.02, on_lost=lost.append).start()
  done = peers.PeerWatchdog(kv, 2, 3, timeout=60, period=0.02, on_lost=lost.append).start()
  time.sleep(0.1)
  done.finish()  # finished: process 0 must stop watching it, not call it lost
  time.sleep(0.8)
  assert lost == [], lost
  alive.finish()
  alive.client = None  # dies without a word: reset the done mark it just wrote
  del kv.kv[f"{peers._PREFIX}/done/1"]
  me._thread.join(timeout=5)
  assert len(lost) == 1 and lost[0].startswith("lost process 1 of 3: no heartbeat"), lost


def test_config_changes_are_resumable_compatible_with_the_flag_or_incompatible():
  kinds = workdir_lib.classify(["num_epochs", "checkpoint.keep_best", "optimizer.learning_rate",
                                "optimizer.name", "schedule.warmup", "data.augment.hflip",
                                "ema_decay", "model.hidden", "batch_size", "data.name",
                                "seed", "loss.name", "made_up"])
  assert kinds == {"resumable": ["num_epochs", "checkpoint.keep_best"],
                   "compatible": ["optimizer.learning_rate", "optimizer.name",
                                  "schedule.warmup", "data.augment.hflip", "ema_decay"],
                   "incompatible": ["model.hidden", "batch_size", "data.name", "seed",
                                    "loss.name", "made_up"]}


def _snapshot(wd):
  return (open(os.path.join(wd, "config.json"), "rb").read(), sorted(os.listdir(_ckdir(wd))))


def test_allow_config_change_continues_compatible_changes_and_refuses_the_rest(reference,
                                                                             tmp_path):
  wd = str(tmp_path / "run")
  shutil.copytree(reference, wd)
  before = _snapshot(wd)
  lr = {"optimizer.learning_rate": 5e-4}
  with pytest.raises(UserError, match=r"optimizer.learning_rate: 0.001 -> 0.0005\). .*pass "
                                      r"--allow_config_change"):
    loop.train_and_evaluate(tiny_config(**CFG, **lr), wd)
  for change, diff, why in [({"model.hidden": (16,)}, r"model.hidden: \[32\] -> \[16\]", "shapes"),
                            ({"batch_size": 32}, r"batch_size: 64 -> 32", "step counter"),
                            ({"seed": 3}, r"seed: 0 -> 3", "random streams")]:
    with pytest.raises(UserError, match=rf"{diff}\)\. .*with --allow_config_change or without.*"
                                        rf"{why}"):
      loop.train_and_evaluate(tiny_config(**CFG, **change), wd, allow_config_change=True)
    assert _snapshot(wd) == before
  # Compatible by field, but Adam's state does not fit momentum's: refused by the restore,
  # and config.json is still the run's (a rerun with the original config is not refused).
  with pytest.raises(UserError, match=r"does not fit .*the config's changes: optimizer.name: "
                                      r"'adam' -> 'momentum'.*config.json is left as it was"):
    loop.train_and_evaluate(tiny_config(**CFG, **{"optimizer.name": "momentum"}), wd,
                            allow_config_change=True)
  assert _snapshot(wd) == before
  # The compatible change, allowed, leaves it training one more epoch with the new rate.
  summary = loop.train_and_evaluate(tiny_config(num_epochs=4, **lr), wd,
                                    allow_config_change=True)
  assert summary["step"] == 4 * 19
  assert read_json(os.path.join(wd, "config.json"))["optimizer"]["learning_rate"] == 5e-4


def test_a_damaged_line_inside_metrics_jsonl_costs_that_line_only(reference, tmp_path, caplog):
  """A line of metrics.jsonl damaged in the middle (a disk or copy error) used to end the
  reading there: the resume rewrote the file without every row after it (15 of 20 rows lost,
  measured). Now that line alone is dropped, with a warning, and the file as it was is kept."""
  wd = str(tmp_path / "run")
  shutil.copytree(reference, wd)
  path = os.path.join(wd, "metrics.jsonl")
  with open(path) as f:
    lines = f.readlines()
  lines[4] = "{garbage\n"
  with open(path, "w") as f:
    f.writelines(lines)
  with caplog.at_level("WARNING"):
    loop.train_and_evaluate(tiny_config(num_epochs=4), wd)
  assert "has 1 damaged line(s) (line 5" in caplog.text
  with open(path + ".damaged") as f:
    assert f.readlines() == lines
  rows = [json.loads(ln) for ln in open(path)]
  kept = [json.loads(ln) for i, ln in enumerate(lines) if i != 4]
  old = [r for r in kept if not r["split"].startswith("final_")]
  assert rows[:len(old)] == old and max(r["step"] for r in rows) == 4 * 19


def test_a_damaged_config_json_is_set_aside_and_replaced_only_by_a_config_that_resumes(
    reference, tmp_path):
  """A config.json that is not JSON: kept as config.json.damaged; a config whose checkpoint
  does not resume (another seed: the data position) is refused with config.json and
  metrics.jsonl untouched; the run's own config resumes and writes config.json."""
  wd = str(tmp_path / "run")
  shutil.copytree(reference, wd)
  path = os.path.join(wd, "config.json")
  os.truncate(path, 50)

  def files():
    top = {n: open(os.path.join(wd, n), "rb").read() for n in os.listdir(wd)
           if os.path.isfile(os.path.join(wd, n)) and n != "jrecipe.lock"}
    return top, sorted(os.listdir(_ckdir(wd)))

  before = files()
  with pytest.raises(UserError, match="its seed is 0, this run's is 3"):
    loop.train_and_evaluate(tiny_config(**CFG, seed=3), wd)
  after = files()
  assert after[0].pop("config.json.damaged") == before[0]["config.json"]
  assert after == before
  summary = loop.train_and_evaluate(tiny_config(num_epochs=4), wd)
  assert summary["step"] == 4 * 19
  assert read_json(path)["num_epochs"] == 4
