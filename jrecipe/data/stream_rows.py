"""A decoded copy of a streamed split's inputs: fixed-size rows in one flat file.

Recipe step served: 'Build an end-to-end skeleton' at the speed of the in-memory loop. A
streamed batch of small records is bound by the ArrayRecord reader, not by the step: each
record is its own compressed chunk, about 9 us to read and parse, so 128 digits cost 1.3 ms
of CPU against a 0.65 ms MLP step (docs/streaming.md). Read from a flat file of decoded rows
(no decompression, no parse), the same 128 rows take 25 us memory-mapped, 265 us by pread.
This is tf.data's `Dataset.cache(filename)` for a random-access source.

The copy lives beside the in-memory copies, `<data_dir>/.jrecipe_arrays/<name>-<version>-rows-
<split>.bin`: a header (this format, the TFDS directory's fingerprint, the row shape and dtype,
the row count) padded to HEADER bytes, then the rows in split order. It is written to a
temporary file and renamed (a reader, or another host sharing the data_dir, never sees half a
file), used only while the TFDS files are unchanged (the same fingerprint as
`jrecipe.data.store`) and while its size is exactly header + rows, and made only when all the
splits' decoded inputs fit in `data.stream_row_cache_mb` (so the extra disk is bounded; 0 turns
it off, as does JRECIPE_DATA_SNAPSHOT=0). Only a copy of at most MAP_BYTES is memory-mapped
(`RowFile`); a larger one is read by `pread`, so a streamed run's resident memory does not
grow with the copy.
"""

import json
import logging
import mmap
import os
import tempfile
from typing import Callable, Optional

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1
HEADER = 4096
MAGIC = b"jrecipe-rows\n"
MAP_BYTES = 64 * 2**20  # a copy up to this size is memory-mapped, a larger one read by pread


class RowFile:
  """Random access to the rows of one copy: `read(rows)` -> [len(rows), *shape] array.

  A copy of at most MAP_BYTES is memory-mapped (128 random rows in ~25 us; its pages count in
  the process's resident memory, at most MAP_BYTES). A larger one is read with one `pread` per
  row (a range in one), never mapped, so reading it does not grow the resident memory: on a
  196 MB copy, 200 random batches mapped 191 MB (the kernel maps whole page-cache folios),
  while `pread` took 265 us a batch with nothing resident; dropping the map's pages after each
  batch (`madvise(MADV_DONTNEED)`) took 386 us. Picklable (grain's worker processes): the
  file is opened per process on first use.
  """

  def __init__(self, path: str, shape: tuple, dtype, count: int):
    self.path, self.shape, self.dtype, self.count = path, tuple(shape), np.dtype(dtype), count
    self.row_bytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
    self.mapped = count * self.row_bytes <= MAP_BYTES
    self._source, self._pid = None, None

  def __getstate__(self):
    return {**self.__dict__, "_source": None, "_pid": None}

  def _open(self):
    if self._source is None or self._pid != os.getpid():
      if self.mapped:
        with open(self.path, "rb") as f:
          view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._source = np.frombuffer(view, self.dtype, count=self.count * (
            self.row_bytes // self.dtype.itemsize), offset=HEADER).reshape(
                self.count, *self.shape)
      else:
        self._source = os.open(self.path, os.O_RDONLY)
      self._pid = os.getpid()
    return self._source

  def read(self, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    source = self._open()
    if self.mapped:
      return source.take(rows, axis=0)
    out = np.empty((len(rows), *self.shape), self.dtype)
    flat, size = memoryview(out.reshape(-1).view(np.uint8)), self.row_bytes
    if len(rows) > 1 and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
      _read_exactly(source, flat, HEADER + int(rows[0]) * size)  # a range: one read
      return out
    for i, r in enumerate(rows.tolist()):
      _read_exactly(source, flat[i * size:(i + 1) * size], HEADER + r * size)
    return out

  def __del__(self):
    if isinstance(self._source, int) and self._pid == os.getpid():
      try:
        os.close(self._source)
      except OSError:
        pass


def _read_exactly(fd: int, buf: memoryview, offset: int) -> None:
  while len(buf):
    n = os.preadv(fd, [buf], offset)
    if n <= 0:
      raise OSError(f"the decoded copy ended early at byte {offset}")
    buf, offset = buf[n:], offset + n


class RowReader:
  """rows -> {'x', 'y', 'id'}: the inputs from the copy, labels and ids from memory (the
  opening pass's). The same contract as the stream's record readers (`stream.Records`)."""

  def __init__(self, rows: RowFile, y: np.ndarray, ids: np.ndarray):
    self.rows, self.y, self.ids = rows, y, ids

  def __call__(self, rows: np.ndarray) -> dict:
    return {"x": self.rows.read(rows), "y": self.y[rows], "id": self.ids[rows]}


def _header(fp: str, shape: tuple, dtype, count: int) -> bytes:
  meta = json.dumps({"format": FORMAT, "fingerprint": fp, "shape": list(shape),
                     "dtype": np.dtype(dtype).str, "count": int(count)}).encode()
  if len(MAGIC) + len(meta) + 1 > HEADER:
    raise ValueError("the copy's header does not fit")
  return (MAGIC + meta + b"\n").ljust(HEADER, b"\0")


def open_copy(path: str, fp: str, shape: tuple, dtype, count: int) -> Optional[RowFile]:
  """The copy at `path` if it was written for these files, shape, dtype and count."""
  try:
    with open(path, "rb") as f:
      head = f.read(HEADER)
    if os.path.getsize(path) != HEADER + count * RowFile(path, shape, dtype, 0).row_bytes:
      return None
  except OSError:
    return None
  if head != _header(fp, shape, dtype, count):
    return None
  return RowFile(path, shape, dtype, count)


def write_copy(path: str, fp: str, shape: tuple, dtype, count: int,
               chunks: Callable[[], "iter"]) -> Optional[RowFile]:
  """Writes the rows that `chunks()` yields (arrays of `shape`/`dtype`, in order) to `path`
  atomically; None (and a log line) if the directory cannot be written or the rows differ."""
  tmp = None
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".rows-", suffix=".tmp")
    written = 0
    with os.fdopen(fd, "wb") as f:
      f.write(_header(fp, shape, dtype, count))
      for x in chunks():
        if x.shape[1:] != tuple(shape) or x.dtype != np.dtype(dtype):
          return None
        f.write(np.ascontiguousarray(x).tobytes())
        written += len(x)
    if written != count:
      return None
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from others sharing the data_dir
    os.replace(tmp, path)
    tmp = None
  except OSError as e:
    log.info("No decoded copy written to %s: %s", path, e)
    return None
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
  return RowFile(path, shape, dtype, count)
