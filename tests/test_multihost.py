"""Multi-host: two local processes of two CPU devices each train like one process of four.

Each process runs the same `python -m jrecipe` command with --config.parallel.distributed=True
and the JRECIPE_* coordinator variables (loopback, a free port), in one shared work directory:
the real launch path, flags and all. Every subprocess has a deadline and is killed in a
`finally`, so a hung collective fails the test instead of hanging it.
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import REPO, load_params, read_json, run_cli

TIMEOUT = 180  # seconds, per launch of the two processes
ARGS = ["--config=configs/digits_mlp.py", "--config.model.hidden=(32,)", "--config.num_epochs=1",
        "--config.batch_size=64", "--config.progress=False"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra) -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the device count comes from JRECIPE_NUM_CPU_DEVICES alone
  for k in ("JRECIPE_COORDINATOR", "JRECIPE_NUM_PROCESSES", "JRECIPE_PROCESS_ID",
            "JRECIPE_NUM_CPU_DEVICES"):
    env.pop(k, None)
  env.update(extra)
  return env


class _Job:
  """Two `python -m jrecipe` processes joined on loopback; logs go to files, not pipes.

  Files, because a process blocked on a full stderr pipe would stall its peer's collectives.
  """

  def __init__(self, tmp_path, args, name, extra_env=None):
    port = _free_port()
    self.logs = [str(tmp_path / f"{name}.{i}.log") for i in range(2)]
    self.procs = []
    for i in range(2):
      env = _env(JRECIPE_COORDINATOR=f"127.0.0.1:{port}", JRECIPE_NUM_PROCESSES="2",
                 JRECIPE_PROCESS_ID=str(i), JRECIPE_NUM_CPU_DEVICES="2", **(extra_env or {}))
      with open(self.logs[i], "w") as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "jrecipe", *args, "--config.parallel.distributed=True"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))

  def wait(self, deadline: float) -> list[int]:
    return [p.wait(timeout=max(deadline - time.time(), 1)) for p in self.procs]

  def wait_for_checkpoint(self, wd: str, deadline: float) -> None:
    """Returns once the first checkpoint of `wd` is committed (training is under way)."""
    ckdir = os.path.join(wd, "checkpoints")
    while time.time() < deadline and not (os.path.isdir(ckdir) and any(
        d.isdigit() for d in os.listdir(ckdir))):
      assert all(p.poll() is None for p in self.procs), (self.log(0)[-3000:], self.log(1)[-3000:])
      time.sleep(0.05)

  def log(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)


def _run_job(tmp_path, args, name) -> _Job:
  job = _Job(tmp_path, args, name)
  try:
    codes = job.wait(time.time() + TIMEOUT)
  finally:
    job.kill()
  assert codes == [0, 0], (codes, job.log(0)[-3000:], job.log(1)[-3000:])
  return job


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One process with four forced CPU devices, the same global batch."""
  wd = str(tmp_path_factory.mktemp("ref") / "wd")
  r = run_cli([*ARGS, f"--workdir={wd}"], timeout=TIMEOUT,
              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert r.returncode == 0, r.stderr[-3000:]
  return wd


@pytest.mark.parametrize("mode", ["mesh", "pmap"])
def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path, reference, mode):
  wd = str(tmp_path / "wd")
  job = _run_job(tmp_path, [*ARGS, f"--workdir={wd}", f"--config.parallel.mode={mode}"], mode)
  for i in range(2):
    assert f"Process {i} of 2 joined the job (2 local devices, 4 in all)" in job.log(i)

  ref, got = load_params(reference), load_params(wd)
  diff = max(float(np.max(np.abs(ref[k].astype(np.float64) - got[k]))) for k in ref)
  print(f"{mode}: max |param difference| 2x2 processes vs 1x4 = {diff:.3g}")
  assert diff < 1e-6, diff

  # Written once, by process 0: the same records as the one-process run, no leftovers.
  a, b = read_json(os.path.join(reference, "summary.json")), read_json(os.path.join(wd,
                                                                              "summary.json"))
  assert a["step"] == b["step"] and a["test"]["count"] == b["test"]["count"] == 270
  assert abs(a["test"]["loss"] - b["test"]["loss"]) < 1e-5
  assert [c["step"] for c in a["checkpoints"]] == [c["step"] for c in b["checkpoints"]]
  records = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  ref_records = [json.loads(line) for line in open(os.path.join(reference, "metrics.jsonl"))]
  assert [(r["step"], r["split"]) for r in records] == [
      (r["step"], r["split"]) for r in ref_records]
  assert len(glob.glob(os.path.join(wd, "tensorboard", "events*"))) == 1
  assert not glob.glob(os.path.join(wd, "**", "*tmp*"), recursive=True)


def test_sigterm_on_one_host_stops_both_after_the_same_step(tmp_path):
  """A preemption notice reaching only process 1 must stop process 0 too, at the same step.

  Otherwise one process waits forever in the next collective or checkpoint barrier.
  """
  wd = str(tmp_path / "wd")
  args = [*ARGS, f"--workdir={wd}", "--config.num_epochs=300",
          "--config.checkpoint.every_epochs=1"]
  job = _Job(tmp_path, args, "preempt")
  try:
    deadline = time.time() + TIMEOUT
    job.wait_for_checkpoint(wd, deadline)
    job.procs[1].send_signal(signal.SIGTERM)
    codes = job.wait(deadline)
  finally:
    job.kill()
  # Both exit 75 (EX_TEMPFAIL, "stopped early, resume me"): a scheduler requeues the job.
  assert codes == [75, 75], (codes, job.log(0)[-3000:], job.log(1)[-3000:])
  assert "resume" in job.log(0) and "resume" in job.log(1)
  summary = read_json(os.path.join(wd, "summary.json"))
  assert summary["stopped"] and "preempted" in summary["stopped"], summary
  assert summary["step"] < 300 * 19
  assert summary["step"] in [c["step"] for c in summary["checkpoints"]]


def _kill_one(tmp_path, victim: int, name: str) -> tuple[int, float, str, list]:
  """Two processes training with a 5 s peer timeout; `victim` is SIGKILLed after the first
  checkpoint. -> (the survivor's exit status, seconds it took after the kill, its log, its
  jrecipe error lines)."""
  wd = str(tmp_path / "wd")
  args = [*ARGS, f"--workdir={wd}", "--config.num_epochs=300",
          "--config.checkpoint.every_epochs=1"]
  job = _Job(tmp_path, args, name, extra_env={"JRECIPE_PEER_TIMEOUT": "5"})
  survivor = 1 - victim
  try:
    job.wait_for_checkpoint(wd, time.time() + TIMEOUT)
    job.procs[victim].kill()
    t0 = time.time()
    code = job.procs[survivor].wait(timeout=60)
    took = time.time() - t0
  finally:
    job.kill()
  log = job.log(survivor)
  assert "Fatal Python error" not in log and "Traceback" not in log, log[-3000:]
  return code, took, log, [l for l in log.splitlines() if l.startswith("jrecipe: error:")]


def test_a_dead_peer_stops_the_survivor_in_bounded_time_with_a_message_naming_it(tmp_path):
  """Issue 19 item 7: killing process 1 left process 0 hanging in a collective until JAX
  aborted it 96 s later with a C++ thread dump. Now it exits 1 after the peer timeout
  (JRECIPE_PEER_TIMEOUT, 5 s here), with one jrecipe line naming process 1."""
  code, took, log, lines = _kill_one(tmp_path, 1, "dead")
  assert code == 1 and took < 5 + 10, (code, took, log[-3000:])
  assert len(lines) == 1 and "lost process 1 of 2" in lines[0], log[-3000:]


def test_a_dead_coordinator_stops_the_survivor_at_once_with_a_message_naming_it(tmp_path):
  """Process 0 hosts JAX's coordination service: when it dies, JAX's client in every survivor
  aborts the process (SIGABRT, a C++ 'Terminating process' line and thread dump). The
  survivor's supervisor (jrecipe.train.supervisor) turns that into one line naming process 0
  and exit 1, with JAX's text kept in a file instead of the log."""
  code, took, log, lines = _kill_one(tmp_path, 0, "deadcoord")
  assert code == 1 and took < 5 + 10, (code, took, log[-3000:])
  assert len(lines) == 1 and "lost process 0 (the coordinator) of 2" in lines[0], log[-3000:]
  assert "Terminating process" not in log, log[-3000:]


def test_distributed_settings_that_cannot_work_are_refused(tmp_path):
  """Coordinator variables without the distributed flag would make every process 'process 0'
  and all of them would write the same files; check mode has no multi-host path."""
  wd = tmp_path / "wd"
  r = run_cli([*ARGS, f"--workdir={wd}"], timeout=TIMEOUT,
              env=_env(JRECIPE_COORDINATOR="127.0.0.1:1"))
  assert r.returncode == 2 and "JRECIPE_COORDINATOR" in r.stderr, r.stderr[-2000:]
  r = run_cli([*ARGS, f"--workdir={wd}", "--mode=check", "--config.parallel.distributed=True"],
              timeout=TIMEOUT)
  assert r.returncode == 2 and "one host" in r.stderr, r.stderr[-2000:]
  r = run_cli([*ARGS, f"--workdir={wd}", "--config.parallel.distributed=True"], timeout=TIMEOUT,
              env=_env(JRECIPE_COORDINATOR="127.0.0.1:1", JRECIPE_NUM_PROCESSES="2"))
  assert r.returncode == 2 and "JRECIPE_PROCESS_ID" in r.stderr, r.stderr[-2000:]
  assert not wd.exists() or not any(wd.iterdir())


_GUARD = """
import sys, jax
from jrecipe.train import parallel
if sys.argv[1] == 'late':
  jax.devices()  # the backend exists before the guard runs: async dispatch is fixed on
p = parallel.make_placement('mesh')
print(jax.device_count(), p.block, parallel._SYNC_CPU_CLIENT)
"""


@pytest.mark.parametrize("when, expected", [("early", "2 True True"), ("late", "2 True False")])
def test_cpu_deadlock_guard_applies_before_or_after_the_backend(when, expected):
  """jax_cpu_enable_async_dispatch is read once, when the CPU client is created: set later it
  does nothing. Early, synchronous dispatch is chosen; early or late, steps on several CPU
  devices block on their results, since synchronous dispatch alone still deadlocked once
  (shared/STACK.md deadlock; parallel.guard_cpu_collectives)."""
  r = subprocess.run([sys.executable, "-c", _GUARD, when], cwd=REPO, capture_output=True,
                     text=True, timeout=TIMEOUT,
                     env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split("\n")[-2] == expected, r.stdout


def test_two_processes_with_work_and_data_in_a_bucket_equal_one_process_of_four(
    tmp_path, reference, gcs_bucket):
  """Cloud TPU VMs' layout: --workdir and data.data_dir on gs:// (the loopback GCS emulator,
  tests/gcs_server.py), every process reading the data and calling orbax, process 0 writing
  the rest and holding the lock object."""
  from jrecipe import storage
  wd, data = f"{gcs_bucket}/run", f"{gcs_bucket}/tfds"
  _run_job(tmp_path, [*ARGS, f"--workdir={wd}", f"--config.data.data_dir={data}"], "gcs")
  ref, got = load_params(reference), load_params(wd)
  diff = max(float(np.max(np.abs(ref[k].astype(np.float64) - got[k]))) for k in ref)
  assert diff < 1e-6, diff
  with storage.open(f"{wd}/summary.json") as f:
    assert json.load(f)["test"]["count"] == 270
  with storage.open(f"{wd}/metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  ref_records = [json.loads(line) for line in open(os.path.join(reference, "metrics.jsonl"))]
  assert [(r["step"], r["split"]) for r in records] == [
      (r["step"], r["split"]) for r in ref_records], "written once, by process 0"
  assert not storage.exists(f"{wd}/jrecipe.lock"), "released at the end"
  assert storage.exists(f"{data}/digits/1.0.0/dataset_info.json")
