"""A TFDS data_dir in a bucket (`data.data_dir=gs://...`), against the GCS JSON API server on
loopback (tests/gcs_server.py): datasets are prepared into it and read from it, in memory and
streamed, exactly as from a local directory, and the copies jrecipe keeps beside a dataset stay
on local disk.
"""

import collections
import os
import pickle

import numpy as np
import pytest

from jrecipe import storage
from jrecipe.data import dataset, pipeline, stream, stream_readers, stream_synthetic
from tests.helpers import tiny_config


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
  """Each test its own local mirror of the bucket ($JRECIPE_CACHE_DIR/gcs/...), nothing cached
  in memory from another test."""
  monkeypatch.setenv("JRECIPE_CACHE_DIR", str(tmp_path / "cache"))
  dataset.clear_cache()
  yield
  dataset.clear_cache()


def _data(name, pipeline_, data_dir, **fields):
  c = tiny_config(**{"data.name": name, "data.pipeline": pipeline_, "data.data_dir": data_dir,
                     **{f"data.{k}": v for k, v in fields.items()}})
  ds = pipeline.load_dataset(c.data)
  dataset.clear_cache()
  return ds


def _equal(a: dict, b: dict) -> bool:
  return set(a) == set(b) and all(
      a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _same_data(a, b, batches: bool = True) -> None:
  """`a` and `b` hold the same examples and give the same training and evaluation batches
  (`batches` False: the same inputs at a sample of rows, no batches)."""
  assert a.spec == b.spec and dataset.fingerprint(a) == dataset.fingerprint(b)
  for split in a.arrays:
    assert _equal({k: a.arrays[split][k] for k in ("y", "id")},
                  {k: np.asarray(b.arrays[split][k]) for k in ("y", "id")})
  if not batches:
    for split in a.arrays:
      rows = np.random.default_rng(0).permutation(len(a.arrays[split]["x"]))[:24]
      assert np.array_equal(a.arrays[split]["x"][rows], b.arrays[split]["x"].take(rows))
    return
  ta = pipeline.train_batches(a, batch_size=32, seed=3, start_step=5)
  tb = pipeline.train_batches(b, batch_size=32, seed=3, start_step=5)
  for _ in range(12):
    assert _equal(next(ta), next(tb))
  for split in ("validation", "test"):
    ea, eb = (list(pipeline.eval_batches(d, split, batch_size=64)) for d in (a, b))
    assert len(ea) == len(eb) and all(_equal(x, y) for x, y in zip(ea, eb))


def _upload(local_root: str, url: str) -> None:
  for rel in storage.walk_files(local_root):
    storage.upload_file(os.path.join(local_root, rel), f"{url}/{rel}")


def test_a_builtin_dataset_is_prepared_into_a_bucket_and_read_as_from_a_local_dir(
    gcs_bucket, tmp_path):
  url = f"{gcs_bucket}/tfds"
  local = _data("digits", "memory", str(tmp_path / "local"))
  remote = _data("digits", "memory", url)
  _same_data(local, remote)
  files = list(storage.walk_files(url))
  assert "digits/1.0.0/dataset_info.json" in files, files
  assert any(f.startswith("digits/1.0.0/digits-train.array_record") for f in files), files
  assert not any(".jrecipe_arrays" in f or f.endswith(".lock") for f in files), \
      "the copies beside a dataset and its lock stay local"
  assert os.listdir(os.path.join(storage.local_mirror(url), ".jrecipe_arrays"))
  mirror = storage.local_mirror(url)
  assert not os.path.exists(os.path.join(mirror, "downloads")) and not list(
      storage.walk_files(os.path.join(mirror, "digits"))), "the staged dataset is removed"
  streamed = _data("digits", "stream", url)
  assert streamed.stream.decoded_copy
  _same_data(local, streamed)
  # The second load reads the kept copies; no shard is left behind by the opening pass.
  _same_data(local, _data("digits", "stream", url))
  left = [d for _, dirs, _ in os.walk(storage.local_mirror(url)) for d in dirs
          if d.startswith(".in-turn")]
  assert not left, left


def test_a_partial_upload_is_prepared_again(gcs_bucket, tmp_path):
  """A dataset whose upload stopped before its dataset_info.json (written last) is not
  prepared: it is prepared again over the stray files."""
  url = f"{gcs_bucket}/tfds"
  storage.write_bytes(f"{url}/digits/1.0.0/digits-train.array_record-00000-of-00001", b"junk")
  _same_data(_data("digits", "memory", str(tmp_path / "local")), _data("digits", "memory", url))
  assert storage.exists(f"{url}/digits/1.0.0/dataset_info.json")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  """A TFDS dataset of 3 shards per split, prepared locally (no validation split: carved)."""
  import tensorflow_datasets as tfds
  d = str(tmp_path_factory.mktemp("sharded"))
  config = stream_synthetic.SyntheticConfig(name="sharded", num_train=500, num_test=120,
                                            shape=(8, 6))
  builder = stream_synthetic.SyntheticImages(data_dir=d, config=config)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3))
  return d, "tfds:synthetic_images/sharded"


@pytest.mark.parametrize("fields", [{}, {"stream_row_cache_mb": 0}])
def test_a_tfds_dataset_in_a_bucket_streams_as_from_a_local_dir(fields, sharded, gcs_bucket,
                                                                monkeypatch):
  local_dir, name = sharded
  url = f"{gcs_bucket}/uploaded"
  _upload(local_dir, url)
  assert len([f for f in storage.walk_files(url) if "-train.array_record-" in f]) == 3
  downloaded = []
  monkeypatch.setattr(storage, "download_file",
                      lambda src, dst, f=storage.download_file: (downloaded.append(src),
                                                                 f(src, dst)))
  remote = _data(name, "stream", url, **fields)
  # The opening pass downloaded each shard once (the carved validation split re-reads the
  # last training shard), rather than reading the bucket record by record.
  shards = sorted(f for f in storage.walk_files(url) if ".array_record-" in f)
  assert sorted(set(d.rsplit("/", 1)[-1] for d in downloaded)) == \
      sorted(f.rsplit("/", 1)[-1] for f in shards), downloaded
  copied = fields.get("stream_row_cache_mb") != 0
  assert remote.stream.decoded_copy == copied
  # Without the decoded copy, inputs are read from the bucket record by record, which the
  # loopback emulator serves slowly (about 45 ms a record), and batch iterators left behind
  # read ahead: a sample of rows, no batches.
  _same_data(_data(name, "memory", local_dir), remote, batches=copied)
  _same_data(_data(name, "memory", url), remote, batches=False)


def test_shards_in_turn_reads_records_across_shards_and_skips(gcs_bucket, tmp_path):
  """The in-order reader of a bucket's shards: keys across shard boundaries, a shard's first
  records skipped (a sliced split), one shard on local disk at a time, none after close."""
  from array_record.python import array_record_module

  FileInstruction = collections.namedtuple("FileInstruction", "filename skip take")
  paths = []
  for shard, n in enumerate((5, 7, 4)):
    local = str(tmp_path / f"s{shard}")
    w = array_record_module.ArrayRecordWriter(local, "group_size:1")
    for i in range(n):
      w.write(f"{shard}:{i}".encode())
    w.close()
    paths.append(f"{gcs_bucket}/shards/s{shard}")
    storage.upload_file(local, paths[-1])
  instructions = [FileInstruction(paths[0], 2, 3), FileInstruction(paths[1], 0, 7),
                  FileInstruction(paths[2], 1, 3)]
  where = str(tmp_path / "in-turn")
  shards = stream_readers.ShardsInTurn(instructions, where)
  assert len(shards) == 13
  got = shards.__getitems__(list(range(0, 13)))
  assert got == [f"0:{i}".encode() for i in (2, 3, 4)] + \
      [f"1:{i}".encode() for i in range(7)] + [f"2:{i}".encode() for i in (1, 2, 3)]
  assert os.listdir(where) == ["shard-2"], "one shard on local disk at a time"
  assert shards.__getitems__([12, 0]) == [b"2:3", b"0:2"]
  shards.close()
  assert not os.path.exists(where)


def test_records_send_no_in_order_reader_to_worker_processes():
  r = stream.Records(dict, 0, 3, in_order=lambda rows: {})  # a lambda does not pickle
  sent = pickle.loads(pickle.dumps(r))
  assert sent._in_order is None and len(sent) == 3  # noqa: SLF001
