"""Where measurements go: `metrics.jsonl` (one JSON object per logged point) and TensorBoard.

A tiny interface in the spirit of CLU's metric writers: `scalars`, `histogram`, `image`.
Only process 0 writes. TensorBoard event files are written with tensorboardX (no TensorFlow).
"""

import contextlib
import errno
import io
import json
import logging
import math
import os
from typing import Callable, Optional, Union

import numpy as np

from jrecipe import storage

log = logging.getLogger(__name__)


def _jsonable(v):
  if isinstance(v, (np.floating, float)):
    v = float(v)
    return v if math.isfinite(v) else str(v)
  if isinstance(v, (np.integer, int)):
    return int(v)
  if isinstance(v, np.ndarray):
    return _jsonable(v.item()) if v.size == 1 else [_jsonable(x) for x in v.tolist()]
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  return v


def save_figure_atomic(fig, path: str, dpi: int = 90) -> str:
  """Saves a matplotlib figure to `path` via a temporary file: never a half-written PNG."""
  if storage.is_remote(path):  # one upload: the object appears whole or not at all
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    storage.write_bytes(path, buf.getvalue())
    return path
  tmp = f"{path}.tmp.{os.getpid()}.png"
  fig.savefig(tmp, dpi=dpi)
  os.replace(tmp, path)
  return path


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch at module load whenever it is installed (it only uses it to
  accept torch tensors), which made every jrecipe start seconds slower once the `bench`
  extra was installed (docs/performance.md, 'Figures behind design choices'). Unless the user's program already loaded torch, the import sees it as absent.
  """
  import sys
  if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError inside this block only
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def read_jsonl(path: str, damaged: Optional[list] = None) -> list[dict]:
  """Records of a JSON-lines file; [] when missing.

  A line that is not a JSON object is skipped, and reading goes on: a torn last line is what a
  kill leaves, and a damaged line inside the file (a disk or copy error) must not hide the rows
  after it (it used to end the reading there, and a resume then rewrote the file without them).
  The 1-based numbers of damaged lines other than the last are appended to `damaged`.
  """
  out, bad, n = [], [], 0
  if not storage.exists(path):
    return out
  with storage.open(path, errors="replace") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        rec = None
      if isinstance(rec, dict):
        out.append(rec)
      else:
        bad.append(n)
  if damaged is not None:
    damaged.extend(i for i in bad if i != n)
  return out


def read_metrics(workdir: str) -> list[dict]:
  """All records of `workdir/metrics.jsonl`."""
  return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def keep_damaged_copy(path: str) -> str:
  """Copies a damaged file to `path.damaged` (the evidence) before it is rewritten; its path."""
  copy = f"{path}.damaged"
  with storage.open(path, "rb") as f:
    storage.write_bytes(copy, f.read())
  return copy


def _set_aside(path: str, damaged: list) -> None:
  """Keeps a copy of a metrics file with damaged lines, saying which lines are dropped."""
  copy = keep_damaged_copy(path)
  lines = ", ".join(map(str, damaged[:5])) + (" ..." if len(damaged) > 5 else "")
  log.warning("%s has %d damaged line(s) (line %s: not a JSON record): dropped; every other row "
              "is kept, and the file as it was is kept in %s.", path, len(damaged), lines, copy)


class MetricWriter:
  """Appends metric records to `metrics.jsonl` and TensorBoard event files.

  Args:
    workdir: the run's work directory.
    enabled: False on processes other than 0 (they compute, they do not write).
    resume_step: when resuming, records after this step (left by a killed run) and the
      final evaluation's records are dropped from metrics.jsonl, and TensorBoard is told to
      purge steps after it, so each row appears once.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: Optional[int] = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    if resume_step is not None and storage.exists(self.path):
      # Records after the resume step were written by the killed run; the final evaluation
      # ('final_*') is written again at the end of every run that reaches it: dropped so
      # that each row appears exactly once, whatever the restart point.
      damaged: list = []
      kept = [r for r in read_jsonl(self.path, damaged) if r.get("step", 0) <= resume_step
              and not str(r.get("split", "")).startswith("final_")]
      if damaged:
        _set_aside(self.path, damaged)
      text = "".join(json.dumps(r) + "\n" for r in kept)
      if storage.is_remote(self.path):  # one upload: the object appears whole or not at all
        storage.write_bytes(self.path, text.encode())
      else:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
          f.write(text)
        os.replace(tmp, self.path)
    elif resume_step is None and storage.exists(self.path):
      storage.remove(self.path)
    self._file = storage.open(self.path, "a", buffering=1)
    self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"),
                             purge_step=resume_step + 1 if resume_step is not None else None)
    self._tb_errors = _guard_event_writer(self._tb, os.path.join(workdir, "tensorboard"))

  def _check_storage(self) -> None:
    """Raises, in this thread, the OSError TensorBoard's writer thread met (a full disk)."""
    if self._tb_errors:
      raise self._tb_errors[0]

  def write(self, step: int, record: dict, *, split: str = "train",
            epoch: Optional[float] = None,
            tensorboard: Union[bool, Callable[[str], bool]] = True) -> None:
    """One record: {'step', 'epoch', 'split', metric: value, ...}; TensorBoard tag split/name.

    `tensorboard=False` keeps the record out of TensorBoard (e.g. bookkeeping fields); a
    function of the metric name chooses which scalars go there (each costs a write).
    """
    if not self.enabled:
      return
    self._check_storage()
    rec = {"step": int(step), "split": split}
    if epoch is not None:
      rec["epoch"] = round(float(epoch), 6)
    for k, v in record.items():
      rec[k] = _jsonable(v)
      to_tb = tensorboard(k) if callable(tensorboard) else tensorboard
      if to_tb and self._tb is not None and isinstance(rec[k], (int, float)):
        self._tb.add_scalar(f"{split}/{k}", rec[k], int(step))
    try:
      self._file.write(json.dumps(rec) + "\n")
    except OSError as e:  # a full disk: name the file (a write error has no filename)
      raise OSError(e.errno, e.strerror, self.path) from e

  def histogram(self, tag: str, values, step: int) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_histogram(tag, np.asarray(values).ravel(), int(step))

  def histogram_raw(self, tag: str, *, min: float, max: float, num: int, sum: float,
                    sum_squares: float, edges, counts, step: int) -> None:
    """A TensorBoard histogram from precomputed bins (`edges` has len(counts) + 1 values)."""
    if self.enabled and self._tb is not None:
      self._tb.add_histogram_raw(tag, min=min, max=max, num=num, sum=sum,
                                 sum_squares=sum_squares, bucket_limits=list(edges)[1:],
                                 bucket_counts=list(counts), global_step=int(step))

  def image(self, tag: str, image_hwc, step: int) -> None:
    if self.enabled and self._tb is not None:
      self._tb.add_image(tag, np.asarray(image_hwc), int(step), dataformats="HWC")

  def image_png(self, tag: str, png: bytes, height: int, width: int, step: int) -> None:
    """A TensorBoard image from already-encoded PNG bytes (RGB): no second encoding."""
    if self.enabled and self._tb is not None:
      from tensorboardX.proto.summary_pb2 import Summary
      img = Summary.Image(height=int(height), width=int(width), colorspace=3,
                          encoded_image_string=png)
      self._tb._get_file_writer().add_summary(
          Summary(value=[Summary.Value(tag=tag, image=img)]), int(step))

  def flush(self) -> None:
    if self.enabled:
      self._file.flush()
      self._tb.flush()
      self._check_storage()

  def close(self) -> None:
    """Closes the files; never raises for a storage error already met (it was reported)."""
    if self.enabled:
      try:
        self._file.close()
      except OSError:
        if not self._tb_errors:
          raise
      self._tb.close()


def _guard_event_writer(tb, logdir: str) -> list:
  """Makes tensorboardX's writer thread survive a write error; returns where it is kept.

  Why: on a full disk the thread died on the OSError, its queue filled up, and the next
  `add_scalar` blocked forever at 0% CPU. The guarded writer keeps the first error (events
  after it are dropped) and `MetricWriter` raises it in the training thread instead, where the
  entry point turns it into one paragraph and exit 1.
  """
  errors: list = []
  try:
    events = tb._get_file_writer().event_writer._ev_writer  # the thread's record writer
  except AttributeError:  # another tensorboardX layout: unguarded, as before
    return errors

  def guarded(fn):
    def call(*args):
      if errors:
        return None
      try:
        return fn(*args)
      except OSError as e:
        errors.append(OSError(e.errno, e.strerror, logdir))
        return None
      except Exception as e:  # noqa: BLE001 - an object store's client error (gs://)
        errors.append(OSError(errno.EIO, f"{type(e).__name__}: {e}"[:300], logdir))
        return None
    return call

  for name in ("write_event", "flush", "close"):
    setattr(events, name, guarded(getattr(events, name)))
  return errors


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON to a temp file and renames it: a reader never sees half a file."""
  if storage.is_remote(path):  # one upload: the object appears whole or not at all
    text = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n"
    storage.write_bytes(path, text.encode())
    return
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
      f.write("\n")
    os.replace(tmp, path)
  except OSError as e:  # a full disk: no half-written temporary file left, the file named
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise OSError(e.errno, e.strerror, path) from e
