"""The record readers of a streamed dataset: rows of a random-access source -> the columns
{'x', 'y', 'id'} that `jrecipe.data.stream.Records` hands out (split out of stream.py).

Each is a class, not a closure, so that grain's worker processes can be sent it (pickled).
"""

import copy
import os
import shutil
from typing import Callable

import numpy as np

from jrecipe import storage
from jrecipe.data import damage
from jrecipe.errors import UserError


def _stack(values: list, what: str, name: str) -> np.ndarray:
  try:
    return np.stack([np.asarray(v) for v in values])
  except ValueError as e:
    shapes = sorted({str(np.shape(v)) for v in values})
    raise UserError(
        f"The {what} of dataset {name!r} are records of inconsistent shape ({', '.join(shapes)}"
        "): jrecipe batches a split's records into one array per batch, so every record's "
        "input must have one shape and dtype (and its label one shape). Pad or crop the "
        "records to one shape when preparing the dataset.") from e


class GenericReader:
  """rows -> columns through the source's own decoding (`__getitems__` or `__getitem__`);
  records are dicts (keyed by `keys` = (input, label, id or None)) or (x, y) pairs. A class,
  not a closure, so that grain's worker processes can be sent it (pickled)."""

  def __init__(self, source, keys: tuple, name: str, ids_from_rows: bool):
    self.source, self.keys, self.name, self.ids_from_rows = source, keys, name, ids_from_rows

  def __call__(self, rows: np.ndarray) -> dict:
    kx, ky, kid = self.keys
    getitems = getattr(self.source, "__getitems__", None)
    with damage.reading_records(self.source, dataset=self.name):
      recs = getitems(rows.tolist()) if getitems else [self.source[int(i)] for i in rows]
    if recs and not isinstance(recs[0], dict):
      recs = [{kx: r[0], ky: r[1]} for r in recs]
    out = {"x": _stack([r[kx] for r in recs], "inputs", self.name),
           "y": _stack([r[ky] for r in recs], "labels", self.name)}
    out["id"] = rows.copy() if self.ids_from_rows or not kid else \
        np.asarray([r[kid] for r in recs], np.int64)
    return out


class TfdsReader:
  """rows -> columns of a TFDS ArrayRecord source by the fast protobuf parse
  (`jrecipe.data.reading.fast_plan`, `parse_records`)."""

  def __init__(self, records, plan: dict, keys: tuple, ids_from_rows: bool):
    self.records, self.plan, self.keys, self.ids_from_rows = records, plan, keys, ids_from_rows

  def __call__(self, rows: np.ndarray) -> dict:
    from jrecipe.data import reading
    kx, ky, kid = self.keys
    cols = reading.parse_records(read_array_records(self.records, rows.tolist()), self.plan)
    ids = rows.copy() if self.ids_from_rows or not kid else cols[kid]
    return {"x": cols[kx], "y": cols[ky], "id": ids}


def tfds_reader(source, features, keys: tuple, name: str, ids_from_rows: bool) -> Callable:
  """The reader of a TFDS ArrayRecord source: the fast parse where the features allow it,
  the source's own decoding otherwise."""
  from jrecipe.data import reading
  plan = reading.fast_plan(features)
  records = getattr(source, "data_source", None)
  if plan is None or not hasattr(records, "__getitems__"):
    return GenericReader(source, keys, name, ids_from_rows)
  return TfdsReader(records, plan, keys, ids_from_rows)


def read_array_records(source, keys: list) -> list:
  """The serialized records `keys` of an array_record `ArrayRecordDataSource`, in order.

  Why not `source.__getitems__(keys)`: it starts a thread pool on every call (one thread per
  file touched), which cost more than the reads themselves: 2.8 ms against 1.2 ms for 128
  random records of a 2-file dataset on the 2-core CPU (grain's reader threads already read
  batches in parallel). This groups the keys per file and calls each file's reader directly;
  if the source's private layout moves (`_split_keys_per_reader`, `_ensure_reader_exists`,
  `_readers`), it falls back to `__getitems__` (tests/test_stream.py checks both agree and
  that the direct path is the one taken on this stack).
  """
  try:
    per_reader = source._split_keys_per_reader(keys)  # noqa: SLF001 - see the docstring
    out = [None] * len(keys)
    for reader_idx, positions_and_indices in per_reader.items():
      source._ensure_reader_exists(reader_idx)  # noqa: SLF001
      positions, indices = zip(*positions_and_indices)
      with damage.reading_records(files=source._paths[reader_idx:reader_idx + 1]):  # noqa: SLF001
        records = source._readers[reader_idx].read(list(positions))  # noqa: SLF001
      for record, i in zip(records, indices):
        out[i] = record
    return out
  except AttributeError:
    with damage.reading_records(source):
      return source.__getitems__(keys)


class TextWindows:
  """A reader of stored byte windows -> {'x': window[:-1], 'y': window[1:], 'id'} (the
  in-memory path's `jrecipe.data.text.inputs_and_targets`). A class so that it pickles."""

  def __init__(self, read: Callable[[np.ndarray], dict]):
    self.read = read

  def __call__(self, rows: np.ndarray) -> dict:
    from jrecipe.data import text
    cols = self.read(rows)
    x, y = text.inputs_and_targets(cols["x"])
    return {"x": x, "y": y, "id": cols["id"]}


class ShardsInTurn:
  """The records of a TFDS ArrayRecord split in a bucket, for a pass that reads them in order
  (the stream's opening scan, its decoded copy): each shard is downloaded whole into a local
  directory, read there, and removed when the pass moves on to the next one.

  Why: ArrayRecord's reader fetches a gs:// shard one record per request (TFDS writes one
  record per chunk for random access), which made a pass over a 1,797-record dataset take
  about a minute against the loopback GCS emulator; one request per shard is what an object
  store is fast at. At most one shard is on local disk at a time. Random access in training
  still reads from the bucket (or from the decoded copy).

  Args:
    instructions: the split's TFDS `FileInstruction`s (filename, skip, take), in order.
    local_dir: where the shard in use is kept (removed by `close`).
  """

  def __init__(self, instructions, local_dir: str):
    self.instructions, self.local_dir = list(instructions), local_dir
    self.ends = np.cumsum([int(fi.take) for fi in self.instructions])
    self._shard, self._reader = -1, None

  def __len__(self) -> int:
    return int(self.ends[-1]) if len(self.ends) else 0

  def _open(self, shard: int):
    from array_record.python import array_record_module
    if shard != self._shard:
      self.close()
      os.makedirs(self.local_dir, exist_ok=True)
      local = os.path.join(self.local_dir, f"shard-{shard}")
      storage.download_file(self.instructions[shard].filename, local)
      self._reader = array_record_module.ArrayRecordReader(local, "readahead_buffer_size:0")
      self._shard = shard
    return self._reader

  def __getitems__(self, keys) -> list:
    keys = np.asarray(keys, np.int64)
    shards = np.searchsorted(self.ends, keys, side="right")
    out = [None] * len(keys)
    for shard in np.unique(shards):
      at = np.flatnonzero(shards == shard)
      first = int(self.ends[shard - 1]) if shard else 0
      positions = keys[at] - first + int(self.instructions[shard].skip)
      for i, record in zip(at, self._open(int(shard)).read(positions.tolist())):
        out[i] = record
    return out

  def close(self) -> None:
    """Removes the local shard (the next read downloads it again)."""
    if self._reader is not None:
      self._reader.close()
    self._shard, self._reader = -1, None
    shutil.rmtree(self.local_dir, ignore_errors=True)


class InOrder:
  """rows -> columns through `read`, which reads from `shards` (a `ShardsInTurn`)."""

  def __init__(self, read: Callable[[np.ndarray], dict], shards: ShardsInTurn):
    self.read, self.shards = read, shards

  def __call__(self, rows: np.ndarray) -> dict:
    return self.read(rows)

  def close(self) -> None:
    self.shards.close()


def in_order(source, features, keys: tuple, name: str, ids_from_rows: bool, data_path: str,
             split: str, text: bool):
  """The in-order reader (`InOrder`) of the TFDS ArrayRecord `source` when its files are in a
  bucket (`data_path` a gs:// URL): a copy of it whose records are read shard by shard from
  local copies (`ShardsInTurn`), with the same decoding. None otherwise (a local source reads
  in order as fast as it reads at random)."""
  info, where = getattr(source, "dataset_info", None), getattr(source, "split", None)
  if not data_path or not storage.is_remote(data_path) or info is None or where is None or \
      not hasattr(source, "data_source"):
    return None
  try:
    instructions = info.splits[where].file_instructions
  except (KeyError, AttributeError, TypeError):
    return None
  local = os.path.join(storage.local_mirror(data_path), f".in-turn-{split}-{os.getpid()}")
  shards = ShardsInTurn(instructions, local)
  copied = copy.copy(source)
  object.__setattr__(copied, "data_source", shards)
  read = tfds_reader(copied, features, keys, name, ids_from_rows)
  return InOrder(TextWindows(read) if text else read, shards)
