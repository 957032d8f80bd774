"""The streamed dataset's columns: `StreamColumn` (an array-like read on demand from a split's
records), `take_columns` (several columns of one batch from one read of their records) and
`label_column` (a split's labels: numpy, or read with the inputs for sequences).

Recipe step: 'become one with the data' at a scale that does not fit in memory: the columns
act like the in-memory arrays, so every mode reads them unchanged.
"""

from typing import Callable

import numpy as np

from jrecipe.data import dataset as dataset_lib

CHUNK = 4096  # rows per read when a whole column is asked for (np.asarray)


class StreamColumn:
  """A split's inputs as a read-on-demand array: `take(rows)`, `col[i]`, `col[a:b]`, `len`.

  Reads only the rows asked for and returns numpy; `np.asarray(col)` reads the whole column
  (CHUNK records at a time): what the bounded-memory modes avoid.
  """

  def __init__(self, records, transform: Callable, shape: tuple, dtype,
               column: str = "x"):
    self.records, self.transform, self.column = records, transform, column
    self.shape, self.dtype = (len(records), *shape), np.dtype(dtype)

  ndim = property(lambda self: len(self.shape))
  size = property(lambda self: int(np.prod(self.shape)))

  def __len__(self) -> int:
    return self.shape[0]

  def take(self, rows, axis: int = 0) -> np.ndarray:
    if axis != 0:
      raise ValueError("a StreamColumn is read along its example axis only")
    rows = np.asarray(rows, np.int64)
    if rows.ndim == 0:
      return self.take(rows[None])[0]
    if not rows.size:
      return np.zeros((0, *self.shape[1:]), self.dtype)
    return self.transform(self.records.read(rows)[self.column])

  def __getitem__(self, key):
    if isinstance(key, slice):
      return self.take(np.arange(*key.indices(len(self))))
    if isinstance(key, tuple):
      return self[key[0]][(slice(None), *key[1:])]
    if isinstance(key, (int, np.integer)):
      return self.take(np.asarray([key if key >= 0 else len(self) + key]))[0]
    return self.take(np.asarray(key))

  def __array__(self, dtype=None, copy=None):
    del copy
    parts = [self[i:i + CHUNK] for i in range(0, len(self), CHUNK)]
    out = np.concatenate(parts) if parts else np.zeros(self.shape, self.dtype)
    return out.astype(dtype) if dtype is not None else out

  def __repr__(self) -> str:
    return f"StreamColumn(shape={self.shape}, dtype={self.dtype}, column={self.column!r})"


def take_columns(arrays: dict, rows: np.ndarray) -> dict:
  """{key: column.take(rows)} for numpy arrays and StreamColumns, reading the records that
  several StreamColumns share once (a streamed sequence's inputs and labels are one record)."""
  rows = np.asarray(rows, np.int64)
  out, read = {}, {}
  for k, col in arrays.items():
    if isinstance(col, StreamColumn) and rows.size:
      cols = read.get(id(col.records))
      if cols is None:
        cols = read[id(col.records)] = col.records.read(rows)
      out[k] = col.transform(cols[col.column])
    else:
      out[k] = col.take(rows, axis=0)
  return out


def label_column(y, records, task: str, *, as_stored: bool):
  """A split's labels: the opening pass's numpy array `y`, or (None: sequence labels, not kept)
  a StreamColumn reading them from `records` with the inputs."""
  if y is not None:
    if not as_stored:
      y = y.astype(np.float32) if task == "regression" else y.astype(np.int32)
    return dataset_lib._readonly(y)  # noqa: SLF001
  probe = np.asarray(records.read(np.arange(1))["y"])
  if as_stored:
    return StreamColumn(records, _identity, probe.shape[1:], probe.dtype, column="y")
  return StreamColumn(records, _as_int32, probe.shape[1:], np.int32, column="y")


def _identity(y):
  return y


def _as_int32(y):
  return np.asarray(y).astype(np.int32)
