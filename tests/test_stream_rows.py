"""The decoded copy of a streamed dataset's inputs (jrecipe.data.stream_rows): made once beside
the dataset, reused while the TFDS files are unchanged, remade when they change or the copy is
damaged, skipped above data.stream_row_cache_mb, and read without growing the process's
resident memory. The batches are the in-memory ones with and without it
(tests/test_stream.py::test_streamed_batches_equal_the_in_memory_ones)."""

import glob
import os

import numpy as np
import pytest

from jrecipe.data import dataset, pipeline, stream_rows, stream_synthetic
from tests.helpers import tiny_config


def _open(name, data_dir, **fields):
  dataset.clear_cache()
  c = tiny_config(**{"data.name": name, "data.pipeline": "stream", "data.data_dir": data_dir,
                     **{f"data.{k}": v for k, v in fields.items()}})
  return pipeline.load_dataset(c.data)


def _copies(data_dir):
  return sorted(glob.glob(os.path.join(data_dir, ".jrecipe_arrays", "*-rows-*.bin")))


def _batches(ds, n=5):
  it = pipeline.train_batches(ds, batch_size=32, seed=3, start_step=11, process_index=0,
                              process_count=1)
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) and x[k].dtype == y[k].dtype
             for x, y in zip(a, b) for k in x)


@pytest.fixture()
def prepared(tmp_path):
  d = str(tmp_path / "tfds")
  name = "tfds:" + stream_synthetic.prepare(d, config_name="rows", num_train=300, num_test=70,
                                            shape=(12, 10))
  yield d, name
  dataset.clear_cache()


def test_the_copy_is_made_once_reused_and_remade_when_the_files_change(prepared):
  d, name = prepared
  without = _open(name, d, stream_row_cache_mb=0)
  assert not without.stream.decoded_copy and _copies(d) == []
  expected = _batches(without)

  first = _open(name, d)
  assert first.stream.decoded_copy
  copies = _copies(d)
  assert [os.path.basename(p).rsplit("-", 1)[-1] for p in copies] == \
      ["test.bin", "train.bin", "validation.bin"]
  assert _same(_batches(first), expected)
  stamps = {p: os.stat(p).st_mtime_ns for p in copies}

  again = _open(name, d)  # a later run: the copy is read, not written again
  assert again.stream.decoded_copy and {p: os.stat(p).st_mtime_ns for p in copies} == stamps
  assert _same(_batches(again), expected)

  # The TFDS files changed (a re-prepared dataset): the old copy no longer describes them.
  info = glob.glob(os.path.join(d, "synthetic_images", "rows", "*", "dataset_info.json"))[0]
  st = os.stat(info)
  os.utime(info, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  remade = _open(name, d)
  assert remade.stream.decoded_copy
  assert all(os.stat(p).st_mtime_ns != stamps[p] for p in copies)
  assert _same(_batches(remade), expected)


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_copy_is_never_read_but_made_again(prepared, damage):
  d, name = prepared
  expected = _batches(_open(name, d, stream_row_cache_mb=0))
  _open(name, d)
  train = [p for p in _copies(d) if p.endswith("-train.bin")][0]
  size = os.path.getsize(train)
  with open(train, "r+b") as f:
    if damage == "truncated":
      f.truncate(size - 7)
    else:
      f.seek(20)
      f.write(b"#")
  ds = _open(name, d)
  assert ds.stream.decoded_copy and os.path.getsize(train) == size
  assert _same(_batches(ds), expected)


def test_no_copy_above_the_bound_or_with_copies_off(tmp_path, monkeypatch):
  d = str(tmp_path / "tfds")
  name = "tfds:" + stream_synthetic.prepare(d, config_name="big", num_train=400, num_test=20,
                                            shape=(32, 32, 3))  # 1.3 MB of decoded inputs
  try:
    assert not _open(name, d, stream_row_cache_mb=1).stream.decoded_copy
    assert _copies(d) == []
    monkeypatch.setenv("JRECIPE_DATA_SNAPSHOT", "0")
    assert not _open(name, d, stream_row_cache_mb=2).stream.decoded_copy
    monkeypatch.delenv("JRECIPE_DATA_SNAPSHOT")
    assert _open(name, d, stream_row_cache_mb=2).stream.decoded_copy
  finally:
    dataset.clear_cache()


def _mapped_kb(path: str) -> int:
  """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
  total, inside = 0, False
  with open("/proc/self/smaps") as f:
    for line in f:
      head = line.split()
      if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header
        inside = line.rstrip("\n").endswith(path)
      elif inside and line.startswith("Rss:"):
        total += int(head[1])
  return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
@pytest.mark.parametrize("map_bytes", [0, 64 * 2**20])
def test_a_copy_larger_than_map_bytes_is_read_without_growing_resident_memory(
    tmp_path, monkeypatch, map_bytes):
  """2,048 rows of 4 kB (8 MB) read in random batches of 4, and as ranges: above MAP_BYTES
  (pread) none of the file is resident in this process; below it (mapped, the control that
  shows the measurement works) most of it is."""
  monkeypatch.setattr(stream_rows, "MAP_BYTES", map_bytes)
  rows = np.random.default_rng(0).integers(0, 256, (2048, 64, 64), np.uint8)
  path = str(tmp_path / "rows.bin")
  copy = stream_rows.write_copy(path, "fp", (64, 64), np.uint8, len(rows),
                                lambda: (rows[i:i + 500] for i in range(0, len(rows), 500)))
  assert stream_rows.open_copy(path, "fp", (64, 64), np.uint8, len(rows)) is not None
  assert stream_rows.open_copy(path, "other", (64, 64), np.uint8, len(rows)) is None
  peak = 0
  for i, batch in enumerate(np.random.default_rng(1).permutation(len(rows)).reshape(-1, 4)):
    assert np.array_equal(copy.read(batch), rows[batch])
    if i % 64 == 63:  # reading smaps costs ~15 ms in a process with JAX loaded
      peak = max(peak, _mapped_kb(path))
  for a, b in ((0, 1), (5, 300), (2040, 2048)):
    assert np.array_equal(copy.read(np.arange(a, b)), rows[a:b])
  assert copy.read(np.zeros(0, np.int64)).shape == (0, 64, 64)
  assert (peak == 0) if map_bytes == 0 else (peak > 6000), peak
