"""gs:// work directories against a real GCS JSON API server on loopback (tests/gcs_server.py).

Cloud TPU VMs keep their runs in buckets: `--workdir=gs://bucket/run` trains, survives a
SIGKILL and resumes bit for bit, refuses a second process, and builds its report, with every
file in the bucket and none on local disk.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jrecipe import storage
from jrecipe.train import object_lock
from tests.helpers import REPO, load_params

ARGS = ["--config=configs/digits_mlp.py", "--config.num_epochs=12", "--config.model.hidden=(32,)",
        "--config.progress=False", "--config.batch_size=64"]


def _jrecipe(*args, timeout=300, env=None):
  return subprocess.run([sys.executable, "-m", "jrecipe", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


def _steps(ckdir: str, committed: bool) -> list[str]:
  """The checkpoint steps under `ckdir` that orbax began writing, or that it committed
  (jrecipe's manifest, then orbax's commit_success.txt and _CHECKPOINT_METADATA)."""
  try:
    names = [n for n in storage.listdir(ckdir) if n.isdigit()]
  except FileNotFoundError:
    return []
  return [n for n in names if not committed or all(
      storage.exists(f"{ckdir}/{n}/{f}") for f in ("commit_success.txt", "_CHECKPOINT_METADATA"))]


# 40 epochs, a checkpoint every 10: the kill lands while orbax writes the first checkpoint in
# place (on GCS there is no temporary directory to rename), or after orbax committed it.
KILL_ARGS = [a if a != "--config.num_epochs=12" else "--config.num_epochs=40" for a in ARGS]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
  """The same run, uninterrupted, in a local work directory."""
  ref = str(tmp_path_factory.mktemp("gcs") / "ref")
  r = _jrecipe(*KILL_ARGS, f"--workdir={ref}")
  assert r.returncode == 0, r.stderr[-2000:]
  return ref


@pytest.mark.parametrize("when", ["writing", "committed"])
def test_a_gs_run_resumes_after_sigkill_bit_identical_and_reports(when, reference, gcs_bucket):
  ref = reference
  wd = f"{gcs_bucket}/runs/killed"  # the report's title is the work directory's name
  p = subprocess.Popen([sys.executable, "-m", "jrecipe", *KILL_ARGS, f"--workdir={wd}"],
                       cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and not _steps(f"{wd}/checkpoints", committed=when == "committed"):
    time.sleep(0.05)
  assert p.poll() is None, "still training at its first checkpoint"
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert storage.exists(f"{wd}/jrecipe.lock"), "a SIGKILL leaves the lock object behind"
  unfinished = [n for n in _steps(f"{wd}/checkpoints", False)
                if n not in _steps(f"{wd}/checkpoints", True)]

  r = _jrecipe(*KILL_ARGS, f"--workdir={wd}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Taking over the lock" in r.stderr and "no longer runs" in r.stderr, r.stderr[-2000:]
  # A step killed mid-write is removed and never read; a committed one is resumed from.
  resumed = "Resuming from the checkpoint at step" in r.stderr
  assert resumed == (when == "committed" or not unfinished), (unfinished, r.stderr[-2000:])
  a, b = load_params(ref), load_params(wd)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  with storage.open(f"{wd}/metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  steps = [r["step"] for r in rows if r["split"] == "train"]
  assert steps == sorted(set(steps)), "each logged step appears once after resume"
  local = [json.loads(line) for line in open(os.path.join(ref, "metrics.jsonl"))]
  assert [r["step"] for r in local if r["split"] == "train"] == steps
  names = set(storage.walk_files(wd))
  assert {"config.json", "summary.json", "diagnoses.json", "report.html",
          "monitor/params_at_init.json"} <= names, sorted(names)
  assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
  assert "jrecipe.lock" not in names, "released at the end"

  with storage.open(f"{wd}/report.html", "rb") as f:
    f.read()
  storage.remove(f"{wd}/report.html")
  r = _jrecipe(f"--workdir={wd}", "--mode=report")
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"Report: {wd}/report.html" in r.stdout
  with storage.open(f"{wd}/report.html") as f:
    page = f.read()
  assert "jrecipe report: killed" in page and "<img" in page


def test_a_run_with_its_data_and_work_directory_in_a_bucket_equals_a_local_run(
    reference, gcs_bucket, tmp_path):
  """data.data_dir on gs:// too, streamed: digits is prepared locally, uploaded, read back
  from the bucket, and trains to the local run's parameters bit for bit."""
  wd, data = f"{gcs_bucket}/run", f"{gcs_bucket}/tfds"
  r = _jrecipe(*KILL_ARGS, f"--workdir={wd}", f"--config.data.data_dir={data}",
               "--config.data.pipeline=stream", env={"JRECIPE_CACHE_DIR": str(tmp_path)})
  assert r.returncode == 0, r.stderr[-3000:]
  a, b = load_params(reference), load_params(wd)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert storage.exists(f"{data}/digits/1.0.0/dataset_info.json")
  assert not any(".jrecipe_arrays" in f for f in storage.walk_files(data))
  copies = os.path.join(str(tmp_path), "gcs", gcs_bucket[len("gs://"):], "tfds", ".jrecipe_arrays")
  assert os.listdir(copies), "the copies beside the dataset are kept on local disk"


def test_a_second_process_on_a_gs_workdir_is_refused_and_a_stale_lock_taken_over(gcs_bucket):
  wd = f"{gcs_bucket}/busy"
  held = object_lock.ObjectLock(wd, "jrecipe.lock").acquire()
  try:
    r = _jrecipe(*ARGS, f"--workdir={wd}", timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"is in use by another jrecipe process: pid {os.getpid()}" in r.stderr
    assert storage.listdir(wd) == ["jrecipe.lock"], "the refused process wrote nothing"
  finally:
    held.release()
  assert not storage.exists(f"{wd}/jrecipe.lock")

  # A holder on another host that stopped renewing its heartbeat: taken over once stale.
  now = time.time()
  other = {"host": "another-vm", "pid": 1, "since": now - 900}
  storage.write_bytes(f"{wd}/jrecipe.lock", json.dumps({**other, "beat": now - 30}).encode())
  with pytest.raises(Exception, match="last heartbeat 30 s ago"):
    object_lock.ObjectLock(wd, "jrecipe.lock").acquire()
  storage.write_bytes(f"{wd}/jrecipe.lock",
                      json.dumps({**other, "beat": now - object_lock.STALE_S - 5}).encode())
  lock = object_lock.ObjectLock(wd, "jrecipe.lock").acquire()
  with storage.open(f"{wd}/jrecipe.lock") as f:
    assert json.load(f)["pid"] == os.getpid()
  lock.release()


def test_create_exclusive_lets_exactly_one_creator_win(gcs_bucket, tmp_path):
  for base in (gcs_bucket, str(tmp_path)):
    path = storage.join(base, "only-once")
    assert storage.create_exclusive(path, b"first")
    assert not storage.create_exclusive(path, b"second")
    with storage.open(path, "rb") as f:
      assert f.read() == b"first"


@pytest.mark.parametrize("where", ["local", "gs"])
def test_the_storage_layer_behaves_alike_locally_and_on_gs(where, gcs_bucket, tmp_path):
  base = str(tmp_path / "d") if where == "local" else f"{gcs_bucket}/d"
  storage.makedirs(storage.join(base, "sub"))
  assert not storage.exists(storage.join(base, "a.jsonl"))
  with storage.open(storage.join(base, "a.jsonl"), "a", buffering=1) as f:
    f.write("one\n")
    with storage.open(storage.join(base, "a.jsonl")) as g:
      assert g.read() == "one\n", "a line is written when it ends"
  with storage.open(storage.join(base, "a.jsonl"), "a", buffering=1) as f:
    f.write("two\n")
  with storage.open(storage.join(base, "a.jsonl")) as f:
    assert f.read() == "one\ntwo\n"
  storage.write_bytes(storage.join(base, "sub", "x.png"), b"\x89PNG")
  storage.write_bytes(storage.join(base, "sub", "y.txt"), b"y")
  assert storage.getsize(storage.join(base, "sub", "x.png")) == 4
  assert storage.glob(storage.join(base, "sub"), "*.png") == [storage.join(base, "sub", "x.png")]
  assert storage.glob(storage.join(base, "missing"), "*.png") == []
  assert sorted(storage.listdir(base)) == ["a.jsonl", "sub"]
  assert storage.isdir(storage.join(base, "sub")) and storage.isfile(storage.join(base, "a.jsonl"))
  storage.replace(storage.join(base, "sub", "y.txt"), storage.join(base, "z.txt"))
  storage.move_tree(storage.join(base, "sub"), storage.join(base, "moved"))
  assert sorted(storage.walk_files(base)) == ["a.jsonl", "moved/x.png", "z.txt"]
  storage.rmtree(storage.join(base, "moved"))
  assert sorted(storage.walk_files(base)) == ["a.jsonl", "z.txt"]
  with pytest.raises(FileNotFoundError):
    storage.listdir(storage.join(base, "nothing-here"))
  with pytest.raises(FileNotFoundError):
    storage.getsize(storage.join(base, "nothing-here"))


def test_gs_workdirs_that_cannot_work_are_refused_in_one_paragraph(gcs_bucket):
  cases = [
      (["--mode=search", f"--workdir={gcs_bucket}/s"], "gs:// work directories work with "
       "--mode=train, validate, report"),
      (["--workdir=s3://bucket/run"], "jrecipe reads and writes local paths and gs://"),
      (["--workdir=gs:///run"], "names no bucket"),
      (["--workdir=gs://jr-no-such-bucket-here/run"], "which does not exist"),
      ([f"--workdir={gcs_bucket}/e", "--config.data.data_dir=s3://bucket/tfds"],
       "jrecipe reads and writes local paths"),
      ([f"--workdir={gcs_bucket}/d", "--config.data.data_dir=gs://jr-no-such-bucket-here/t"],
       "which does not exist"),
  ]
  for extra, expected in cases:
    r = _jrecipe(*ARGS, *extra, timeout=120)
    assert r.returncode == 2, (extra, r.stderr[-2000:])
    assert expected in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr[-2000:])
  assert list(storage.walk_files(gcs_bucket)) == [], "a refusal writes nothing"
  r = _jrecipe(*ARGS, "--mode=validate", f"--workdir={gcs_bucket}/v", timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "starts a new run" in r.stdout and not storage.exists(f"{gcs_bucket}/v/config.json")


def test_upload_tree_copies_every_file_then_removes_the_local_copy(gcs_bucket, tmp_path):
  """What a profile's trace and a dataset staged for a bucket go through."""
  local = tmp_path / "tree"
  (local / "sub").mkdir(parents=True)
  (local / "dataset_info.json").write_bytes(b"{}")
  (local / "sub" / "a.bin").write_bytes(b"\0" * 70000)
  storage.upload_tree(str(local), f"{gcs_bucket}/up", last=("dataset_info.json",))
  assert sorted(storage.walk_files(f"{gcs_bucket}/up")) == ["dataset_info.json", "sub/a.bin"]
  assert storage.getsize(f"{gcs_bucket}/up/sub/a.bin") == 70000 and not local.exists()
