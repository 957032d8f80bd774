"""The streaming pipeline (data.pipeline='stream'): the in-memory path's batches read from the
ArrayRecord files a batch at a time; its position in the checkpoint; exact and elastic resume;
bad input refused with one paragraph."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from jrecipe.data import dataset, pipeline, stream, stream_synthetic
from jrecipe.errors import UserError
from jrecipe.train import loop
from tests.helpers import REPO, load_params, tiny_config
from tests import stream_resume

SCRIPT = os.path.join(REPO, "tests", "stream_resume.py")


def _data(name, pipeline_, data_dir="", **fields):
  c = tiny_config(**{"data.name": name, "data.pipeline": pipeline_, "data.data_dir": data_dir,
                     **{f"data.{k}": v for k, v in fields.items()}})
  return pipeline.load_dataset(c.data)


def _equal(a: dict, b: dict) -> bool:
  return set(a) == set(b) and all(
      a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  """A real TFDS ArrayRecord dataset with no validation split (carved from train)."""
  d = str(tmp_path_factory.mktemp("tfds"))
  return d, "tfds:" + stream_synthetic.prepare(d, config_name="small", num_train=600,
                                               num_test=130, shape=(12, 10))


@pytest.mark.parametrize("name,fields", [("digits", {}), ("mnist5k", {}),
                                         ("digits", {"train_subset": 300, "downsample": 2}),
                                         ("digits_seq", {}), ("tfds", {}),
                                         ("digits", {"stream_row_cache_mb": 0}),
                                         ("tfds", {"stream_row_cache_mb": 0}),
                                         ("stdlib_bytes_small", {}),
                                         ("stdlib_bytes_small", {"context_length": 32,
                                                                 "stream_row_cache_mb": 0})])
def test_streamed_batches_equal_the_in_memory_ones(name, fields, synthetic):
  data_dir, tfds_name = synthetic if name == "tfds" else ("", name)
  mem = _data(tfds_name, "memory", data_dir, **fields)
  st = _data(tfds_name, "stream", data_dir, **fields)
  assert mem.stream is None and st.stream is not None
  assert isinstance(st.arrays["train"]["x"], stream.StreamColumn)
  # read from the decoded copy (jrecipe.data.stream_rows) unless it is turned off, or the
  # labels are sequences: those are not held in memory but read with their inputs, from one
  # record read, and their class counts come from the opening pass
  sequence = st.spec.task == "sequence"
  assert st.stream.decoded_copy == (fields.get("stream_row_cache_mb") != 0 and not sequence)
  assert isinstance(st.arrays["train"]["y"], stream.StreamColumn) == sequence
  if sequence:
    for split in mem.arrays:
      assert np.array_equal(st.class_counts(split, st.spec.num_classes),
                            np.bincount(mem.arrays[split]["y"].ravel(),
                                        minlength=st.spec.num_classes))
  assert st.spec == mem.spec
  assert dataset.fingerprint(st) == dataset.fingerprint(mem)  # a checkpoint resumes on either
  for split in mem.arrays:
    assert _equal({k: mem.arrays[split][k] for k in ("y", "id")},
                  {k: st.arrays[split][k] for k in ("y", "id")})
  # Training batches from a step in the second epoch on (steps_per_epoch is 4 to 75 here),
  # on 2 processes: each reads its half of the same global batch.
  for p in range(2):
    a = pipeline.train_batches(mem, batch_size=16, seed=7, start_step=80, process_index=p,
                               process_count=2)
    b = pipeline.train_batches(st, batch_size=16, seed=7, start_step=80, process_index=p,
                               process_count=2)
    for _ in range(30):
      assert _equal(next(a), next(b))
  for split in ("validation", "test"):
    for p in range(2):
      ea = list(pipeline.eval_batches(mem, split, batch_size=100, process_index=p,
                                      process_count=2))
      eb = list(pipeline.eval_batches(st, split, batch_size=100, process_index=p,
                                      process_count=2))
      assert len(ea) == len(eb) and all(_equal(x, y) for x, y in zip(ea, eb))


def test_the_data_fingerprint_tells_datasets_apart():
  a, b = _data("digits", "memory"), _data("digits", "memory", train_subset=600)
  assert dataset.fingerprint(a) != dataset.fingerprint(b)
  assert dataset.fingerprint(a) != dataset.fingerprint(_data("mnist5k", "memory"))


def test_streamed_evaluation_covers_every_example_once_across_hosts(synthetic):
  st = _data(synthetic[1], "stream", synthetic[0])
  n = st.spec.splits["test"]
  seen = []
  for p in range(4):
    for batch in pipeline.eval_batches(st, "test", batch_size=48, process_index=p,
                                       process_count=4):
      seen += list(batch["id"][batch["mask"] > 0])
  assert sorted(seen) == list(range(n))


def test_a_streamed_column_reads_only_the_rows_asked_for(monkeypatch):
  st = _data("digits", "stream")
  col = st.arrays["train"]["x"]
  asked = []
  real = col.records._read  # noqa: SLF001 - count what reaches the source
  monkeypatch.setattr(col.records, "_read", lambda rows: asked.append(len(rows)) or real(rows))
  mem = _data("digits", "memory")
  assert np.array_equal(col[5:9], mem.arrays["train"]["x"][5:9])
  assert np.array_equal(col.take([3, 1]), mem.arrays["train"]["x"][[3, 1]])
  assert asked == [4, 2]


def test_auto_streams_a_dataset_larger_than_the_memory_budget(synthetic):
  d, name = synthetic
  assert _data(name, "auto", d).stream is None  # 600 small images: well under 4 GB
  assert _data(name, "auto", d, memory_budget_mb=1).stream is not None
  assert _data("digits", "auto", memory_budget_mb=1).stream is None  # built-in: in memory


def test_your_own_random_access_sources_stream(tmp_path):
  mem = _data("digits", "memory")

  class Source:  # the grain RandomAccessDataSource protocol: __len__, __getitem__
    def __init__(self, split):
      self.raw = mem.raw[split]

    def __len__(self):
      return len(self.raw["y"])

    def __getitem__(self, i):
      return {"x": self.raw["x"][i], "y": self.raw["y"][i]}

  meta = dict(task="classification", num_classes=10, class_names=None, time_axis=None,
              sees_current=True)
  st = stream.from_sources("mine", {s: Source(s) for s in mem.raw}, meta)
  assert st.spec.mean == mem.spec.mean and st.spec.std == mem.spec.std
  a = pipeline.train_batches(mem, batch_size=32, seed=1)
  b = pipeline.train_batches(st, batch_size=32, seed=1)
  for _ in range(5):
    assert _equal(next(a), next(b))


# --- bad input: one paragraph each, before anything is written -----------------------------


def test_bad_streamed_input_is_one_paragraph(tmp_path, synthetic):
  d = str(tmp_path)
  cases = {
      "does not exist": dict(name="tfds:anything", data_dir=str(tmp_path / "missing")),
      "it is not prepared there": dict(name="tfds:synthetic_images", data_dir=d),
      "TFDS cannot find it": dict(name="tfds:no_such_dataset", data_dir=d),
      "inconsistent shape": dict(name="tfds:" + stream_synthetic.prepare(
          d, config_name="ragged", num_train=40, num_test=10, ragged=True), data_dir=d),
      "splits ['train']": dict(name="tfds:" + stream_synthetic.prepare(
          d, config_name="notest", num_train=40, num_test=0), data_dir=d),
  }
  for needle, fields in cases.items():
    with pytest.raises(UserError) as e:
      _data(fields["name"], "stream", fields["data_dir"])
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
  with pytest.raises(UserError, match="a data function returning arrays in memory"):
    _data("tests.user_data:load", "stream")
  with pytest.raises(UserError, match="applies to the text datasets"):
    _data("digits", "stream", context_length=32)
  st = _data(synthetic[1], "stream", synthetic[0])
  with pytest.raises(UserError, match="not divisible by the 3 processes"):
    pipeline.train_batches(st, batch_size=16, seed=0, process_index=0, process_count=3)


def test_cli_exit_2_and_nothing_written_for_bad_streamed_data(tmp_path):
  d = str(tmp_path / "tfds")
  name = stream_synthetic.prepare(d, config_name="ragged", num_train=40, num_test=10,
                                  ragged=True)
  cases = {"inconsistent shape": (f"tfds:{name}", d),
           "does not exist": ("tfds:mnist", str(tmp_path / "nowhere"))}
  procs = []
  for i, (needle, (data, data_dir)) in enumerate(cases.items()):
    wd = tmp_path / f"wd{i}"
    procs.append((needle, wd, subprocess.Popen(
        [sys.executable, "-m", "jrecipe", "--config=configs/digits_mlp.py:smoke",
         f"--config.data.name={data}", f"--config.data.data_dir={data_dir}",
         "--config.data.pipeline=stream", f"--workdir={wd}"], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
  for needle, wd, p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("jrecipe: error:") and needle in last, last
    assert "Traceback" not in err
    assert not wd.exists() or not any(wd.iterdir())


# --- the position in the checkpoint: exact and elastic resume ------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted streamed run on one device."""
  wd = str(tmp_path_factory.mktemp("ref") / "run")
  loop.train_and_evaluate(stream_resume.config(), wd)
  return wd


def _script(wd, *args, devices=1):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.run([sys.executable, SCRIPT, str(wd), *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _checkpoint_meta(wd, step):
  with open(os.path.join(wd, "checkpoints", str(step), "meta", "metadata")) as f:
    return json.load(f)


def test_sigkill_mid_epoch_resumes_at_the_next_example_bit_for_bit(reference, tmp_path):
  wd = tmp_path / "killed"
  r = _script(wd, "--kill-at", 30)
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  assert sorted(os.listdir(wd / "checkpoints")) == ["19"]
  position = _checkpoint_meta(wd, 19)["data"]
  assert position["next_step"] == 19 and position["pipeline"] == "stream"
  summary = loop.train_and_evaluate(stream_resume.config(), str(wd))
  assert summary["step"] == 57
  a, b = load_params(reference), load_params(wd)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  # the same batches as the in-memory path: the streamed run's parameters are the in-memory
  # run's, bit for bit
  mem = str(tmp_path / "memory")
  loop.train_and_evaluate(stream_resume.config("memory"), mem)
  c = load_params(mem)
  assert all(np.array_equal(a[k], c[k]) for k in a)


def test_elastic_resume_8_to_4_to_2_devices_matches_the_uninterrupted_run(reference, tmp_path):
  wd = tmp_path / "elastic"
  for devices, stop in ((8, 25), (4, 44), (2, None)):
    r = _script(wd, *(("--stop-at", stop) if stop else ()), devices=devices)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {
        "step": stop or 57, "devices": devices, "processes": 1}
    if stop:
      assert _checkpoint_meta(wd, stop)["data"]["next_step"] == stop
  a, b = load_params(reference), load_params(wd)
  diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
  assert diff <= 3e-8, diff


def test_two_processes_stopped_mid_epoch_resume_as_one_process(reference, tmp_path):
  """Two local processes of 2 devices each (loopback, gloo) stop at step 30; one process of 2
  devices finishes the run: the data position maps to the same next global example."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  wd = tmp_path / "hosts"
  procs, logs = [], [tmp_path / f"host{i}.log" for i in range(2)]
  for i in range(2):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JRECIPE_COORDINATOR=f"127.0.0.1:{port}", JRECIPE_NUM_PROCESSES="2",
               JRECIPE_PROCESS_ID=str(i), JRECIPE_NUM_CPU_DEVICES="2")
    with open(logs[i], "w") as log:  # files, not pipes: a full pipe would stall a peer
      procs.append(subprocess.Popen([sys.executable, SCRIPT, str(wd), "--stop-at", "30"],
                                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  codes = [p.wait(timeout=300) for p in procs]
  assert codes == [0, 0], [open(f).read()[-3000:] for f in logs]
  out = [json.loads(open(f).read().strip().splitlines()[-1]) for f in logs]
  assert out[0] == {"step": 30, "devices": 4, "processes": 2}, out
  assert _checkpoint_meta(wd, 30)["data"]["next_step"] == 30
  r = _script(wd, devices=2)
  assert r.returncode == 0, r.stderr[-3000:]
  a, b = load_params(reference), load_params(wd)
  diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
  assert diff <= 3e-8, diff


def test_a_checkpoint_whose_position_means_other_examples_is_refused(reference, tmp_path):
  import shutil
  wd = str(tmp_path / "other")
  shutil.copytree(reference, wd)
  cfg = stream_resume.config()
  cfg.batch_size, cfg.num_epochs = 32, 4  # step 57 of batch 32 is not step 57 of batch 64
  # The config comparison refuses a batch_size change first (jrecipe.train.workdir); the data
  # position in the checkpoint is the guard of last resort, for checkpoints copied under a
  # config.json that already says the new batch size.
  with pytest.raises(UserError, match="cannot change on resume"):
    loop.train_and_evaluate(cfg, wd, allow_config_change=True)
  with open(os.path.join(wd, "config.json")) as f:
    saved = json.load(f)
  saved["batch_size"], saved["num_epochs"] = 32, 4
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump(saved, f)
  with pytest.raises(UserError, match="data position means other examples: its batch_size"):
    loop.train_and_evaluate(cfg, wd, allow_config_change=True)


def test_array_records_are_read_per_file_directly_and_equal_getitems(synthetic, monkeypatch):
  import tensorflow_datasets as tfds
  d, name = synthetic
  source = tfds.builder(name[len("tfds:"):], data_dir=d).as_data_source()["train"].data_source
  keys = [5, 0, 599, 5, 300]
  called = []
  monkeypatch.setattr(type(source), "__getitems__",
                      lambda self, k: called.append(k) or [self[i] for i in k])
  direct = stream.read_array_records(source, keys)
  assert not called  # the direct path, on this array_record version
  assert direct == source.__getitems__(keys) and called


def test_the_opening_pass_is_kept_beside_the_dataset_while_its_files_are_unchanged(
    tmp_path, monkeypatch):
  d = str(tmp_path)
  name = "tfds:" + stream_synthetic.prepare(d, config_name="kept", num_train=200, num_test=50,
                                            shape=(6, 6))
  first = _data(name, "stream", d)
  copies = [f for f in os.listdir(os.path.join(d, ".jrecipe_arrays")) if "-rows-" not in f]
  assert len(copies) == 1 and "-stream-" in copies[0], copies  # (rows: test_stream_rows.py)
  scans = []
  real = stream._scan  # noqa: SLF001
  monkeypatch.setattr(stream, "_scan", lambda *a, **k: scans.append(a[2]) or real(*a, **k))
  dataset.clear_cache()
  again = _data(name, "stream", d)
  assert not scans and again.spec == first.spec
  assert np.array_equal(again.arrays["train"]["y"], first.arrays["train"]["y"])
  info = os.path.join(d, name[len("tfds:"):], "1.0.0", "dataset_info.json")
  os.utime(info, ns=(0, 0))  # the files changed: the copy no longer counts
  dataset.clear_cache()
  _data(name, "stream", d)
  assert scans == ["train", "validation", "test"]


def test_grain_worker_processes_give_the_same_batches():
  """data.stream_workers=1: reading and decoding in a grain worker process (the readers and
  transforms pickle); the same batches as the threads."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["pytest"])  # grain reads its absl flags before starting workers
  threads = _data("digits", "stream")
  workers = _data("digits", "stream", stream_workers=1)
  assert workers.stream.workers == 1
  a = pipeline.train_batches(threads, batch_size=64, seed=2, start_step=15)
  b = pipeline.train_batches(workers, batch_size=64, seed=2, start_step=15)
  for _ in range(25):
    assert _equal(next(a), next(b))


def test_streamed_sequence_labels_are_not_held_in_memory():
  """A streamed text corpus keeps no labels in memory: they are read with their inputs from
  each record (one read for both), and the opening pass keeps their class counts (priors,
  validation). Opening stdlib_bytes_small holds well under a tenth of its labels' bytes."""
  import tracemalloc
  open_ = lambda: _data("stdlib_bytes_small", "stream")
  open_()  # prepared and scanned
  dataset.clear_cache()
  tracemalloc.start()
  try:
    st = open_()
    held = tracemalloc.get_traced_memory()[0]
  finally:
    tracemalloc.stop()
  labels = sum(int(c.sum()) for c in st.label_counts.values())
  assert labels > 10**6 and held < 4 * labels / 10, (held, labels)
  reads = []
  records = st.arrays["train"]["x"].records
  real = records._read  # noqa: SLF001
  records._read = lambda rows: reads.append(len(rows)) or real(rows)  # noqa: SLF001
  batch = stream.take_columns(st.arrays["train"], np.arange(8))
  assert reads == [8] and batch["y"].dtype == np.int32
  assert np.array_equal(batch["y"][:, :-1], batch["x"][:, 1:])  # next-byte targets


def test_sequence_labels_outside_the_classes_are_refused_from_the_counts():
  import types
  from jrecipe import validate
  from jrecipe.errors import UserError
  spec = types.SimpleNamespace(name="corpus", task="sequence", num_classes=2)
  ok = types.SimpleNamespace(arrays={"train": {"y": None}},
                             label_counts={"train": np.array([4, 1])})
  validate.check_labels(ok, spec)
  bad = types.SimpleNamespace(arrays={"train": {"y": None}},
                              label_counts={"train": np.array([4, 1, 0, 2])})
  with pytest.raises(UserError, match=r"2 labels outside the valid range \[0, 1\].*values: 3"):
    validate.check_labels(bad, spec)


def test_the_opening_pass_refuses_sequence_labels_it_cannot_count():
  """Negative, non-integer or huge (>= 2**24) sequence labels are one paragraph at the opening
  pass, before a count array of that size is ever allocated."""
  from jrecipe.errors import UserError
  empty = np.zeros(0, np.int64)
  assert stream._add_counts(empty, np.array([[0, 2], [2, 1]]), "c", "train", 0).tolist() == \
      [1, 1, 2]  # noqa: SLF001
  for bad in (np.array([-1]), np.array([0.5]), np.array([5_000_000_000])):
    with pytest.raises(UserError, match=r"not integers in \[0, 16777216\) \(from record 7\)"):
      stream._add_counts(empty, bad, "corpus", "train", 7)  # noqa: SLF001


def test_labels_in_memory_outside_the_classes_get_the_same_paragraph():
  import types
  from jrecipe import validate
  from jrecipe.errors import UserError
  spec = types.SimpleNamespace(name="digits", task="classification", num_classes=3)
  data = types.SimpleNamespace(arrays={"train": {"y": np.array([0, 2, 3, -1, 3])}})
  with pytest.raises(UserError, match=r"3 labels outside the valid range \[0, 2\] for its 3 "
                     r"classes \(bad values: -1, 3\)"):
    validate.check_labels(data, spec)
  validate.check_labels(types.SimpleNamespace(arrays={"train": {"y": np.array([0, 2])}}), spec)
