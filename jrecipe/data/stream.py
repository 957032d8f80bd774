"""Streamed datasets: splits read from their ArrayRecord files a batch at a time, never whole.

Recipe steps served, at a scale that does not fit in memory:
  * 'Become one with the data': the same `Dataset` as the in-memory path (`spec`, `arrays`,
    `raw`, stable ids), but each split's inputs are a `StreamColumn`, an array-like that reads
    only the rows asked for (`take`, slicing) from the random-access source. Labels and ids
    (a few bytes per example) are kept in memory, so label checks, class priors and
    evaluation sizes work unchanged; sequence labels (one per token of a text corpus) are
    not: they are StreamColumns read with their inputs, and the opening pass keeps their
    class counts (`Dataset.label_counts`).
  * 'Fix the random seed': the training order is the in-memory one (`jrecipe.data.indexing`),
    so both paths give identical batches for the same (seed, global step) (tested).

Sources: any TFDS dataset prepared as array_record (`tfds:<name>`, read without TensorFlow
through `builder.as_data_source()`), jrecipe's built-in datasets (their TFDS files), and your
own random-access sources (`from_sources`: anything with `__len__` and `__getitem__`, the grain
`RandomAccessDataSource` protocol, whose records are dicts or (x, y) pairs).

Opening a dataset makes one bounded-memory pass over every split (`_scan`, CHUNK records at a
time): labels and ids, the stored value range, a check that every record has one shape and
dtype, and the training split's normalisation statistics (exact for integer-valued inputs,
combined per chunk otherwise: equal to the in-memory statistics once cast to float32, which is
all normalisation uses). The batches themselves come from `jrecipe.data.stream_batches`.
"""

import dataclasses
import os
from typing import Any, Callable, Optional

import numpy as np

from jrecipe import storage
from jrecipe.data import dataset as dataset_lib
from jrecipe.data import stream_readers
from jrecipe.data.stream_columns import StreamColumn, label_column, take_columns  # noqa: F401
from jrecipe.data.stream_readers import (GenericReader, TextWindows,  # noqa: F401
                                         read_array_records, tfds_reader)
from jrecipe.data.reading import SPLITS, TEXT_DATASETS, TFDS_PREFIX, TFDS_VALIDATION_FRACTION
from jrecipe.errors import UserError
from jrecipe.types import DataSpec

CHUNK = 4096  # records per read in the opening pass (a few MB for image datasets)
MAX_SEQUENCE_CLASSES = 1 << 24  # sequence labels are counted per id, so ids stay below this


@dataclasses.dataclass(frozen=True)
class StreamInfo:
  """How a streamed dataset is read (`Dataset.stream`).

  Attributes:
    source: where the records come from (a directory, or 'your sources').
    disk_bytes: the size of its files on disk (0 when unknown).
    prefetch: batches produced ahead of the step (grain's prefetch buffer).
    threads: reader threads (grain's ReadOptions.num_threads).
    workers: grain worker processes (0: threads in this process).
    row_cache_mb: the largest decoded copy of the inputs kept beside the dataset
      (`jrecipe.data.stream_rows`; 0: none).
    decoded_copy: whether the inputs are read from that copy (set when the dataset opens).
  """

  source: str
  disk_bytes: int
  prefetch: int
  threads: int
  workers: int
  row_cache_mb: int = 0
  decoded_copy: bool = False


class Records:
  """Random access to one split's stored columns ('x', 'y', 'id') through `read(rows)`.

  Args:
    read: rows (int64 indices of the underlying source) -> {'x', 'y', 'id'} numpy columns.
    start, stop: this split's rows of the source (a carved validation split is a range of
      'train').
    in_order: the same for a pass that reads the rows in increasing order (`InOrder`, for a
      dataset in a bucket); `read` when None. Never sent to worker processes.
  """

  def __init__(self, read: Callable[[np.ndarray], dict], start: int, stop: int,
               in_order: Optional[Callable[[np.ndarray], dict]] = None):
    self._read, self.start, self.stop = read, int(start), int(stop)
    self._in_order = in_order

  def __len__(self) -> int:
    return self.stop - self.start

  def _source_rows(self, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
      raise IndexError(f"rows outside [0, {len(self)})")
    return rows + self.start

  def read(self, rows: np.ndarray) -> dict:
    return self._read(self._source_rows(rows))

  def read_in_order(self, rows: np.ndarray) -> dict:
    """`read` for a pass over the rows in increasing order (the scan, the decoded copy)."""
    return (self._in_order or self._read)(self._source_rows(rows))

  def close_in_order(self) -> None:
    """Removes the local files of the in-order reader (`ShardsInTurn.close`)."""
    close = getattr(self._in_order, "close", None)
    if close is not None:
      close()

  def view(self, start: int, stop: int) -> "Records":
    return Records(self._read, self.start + start, self.start + stop, self._in_order)

  def __getstate__(self):
    return {**self.__dict__, "_in_order": None}


def _disk_bytes(path: Optional[str]) -> int:
  return sum(e[1] for e in storage.entries(path)) if path else 0


def _open_tfds(name: str, data_dir: str, context: int = 0):
  """(records by split, meta, label feature, directory, stored_as) of a TFDS dataset or a
  jrecipe built-in one. A text dataset (`TEXT_DATASETS`) is opened at `context` (0: its
  default): its records are windows of context + 1 bytes, read as x = window[:-1] and
  y = window[1:] (`TextWindows`), as the in-memory path reads them."""
  from jrecipe.data import reading
  stored_as = name
  if name.startswith(TFDS_PREFIX):
    tfds_name = name[len(TFDS_PREFIX):]
    sources, features = reading._tfds_sources(tfds_name, data_dir)  # noqa: SLF001 - shared
    keys, ids_from_rows = ("image", "label", None), True
    builder_dir = _data_path(sources)
  else:
    from jrecipe.data import builders, text
    config = None
    if name in TEXT_DATASETS:
      length = text.check_context(context or text.DEFAULT_CONTEXT)
      config, stored_as = builders.stdlib_bytes_config(length), f"{name}/ctx{length}"
    builder = builders.prepare(name, data_dir, config)
    sources, features = builder.as_data_source(), builder.info.features
    keys = ("tokens", "tokens", "id") if config else reading.builtin_keys(name)
    ids_from_rows = False
    builder_dir = str(builder.data_path)
  records = {}
  for s, src in sources.items():
    if s in SPLITS:
      read = tfds_reader(src, features, keys, name, ids_from_rows)
      records[s] = Records(TextWindows(read) if name in TEXT_DATASETS else read, 0, len(src),
                           stream_readers.in_order(src, features, keys, name, ids_from_rows,
                                                   builder_dir, s, name in TEXT_DATASETS))
  records = _carve_validation(name, records)
  if name.startswith(TFDS_PREFIX):
    meta = None  # from the labels (`_tfds_meta`), after the scan
    label = features["label"]
  else:
    meta, label = reading.builtin_meta(name, features), None
  return records, meta, label, builder_dir, stored_as


def _data_path(sources) -> Optional[str]:
  src = next(iter(sources.values()))
  info = getattr(src, "dataset_info", None)
  return str(info.data_dir) if info is not None else None


def _carve_validation(name: str, records: dict) -> dict:
  """The last TFDS_VALIDATION_FRACTION of 'train' as 'validation' when there is none (the
  in-memory path's rule, `jrecipe.data.reading._carve_validation`)."""
  if "validation" in records:
    return records
  train = records["train"]
  n = len(train)
  n_val = max(1, int(round(TFDS_VALIDATION_FRACTION * n)))
  if n_val >= n:
    raise UserError(f"The TFDS dataset {name!r} has only {n} training examples: too few to "
                    "carve a validation split from.")
  return {**records, "train": train.view(0, n - n_val), "validation": train.view(n - n_val, n)}


@dataclasses.dataclass
class _Scan:
  """What one pass over a split found."""
  y: np.ndarray
  ids: np.ndarray
  shape: tuple
  dtype: Any
  lo: float
  hi: float
  total: float = 0.0  # sum of the model inputs (train only)
  m2: float = 0.0  # sum of squared deviations (Chan et al.'s pairwise combination)
  count: int = 0
  # Sequence labels are not kept (y is None): read with their inputs from each record. The
  # pass keeps their class counts (priors, validation) instead.
  label_counts: Optional[np.ndarray] = None


def _scan(records: Records, name: str, split: str, inputs: Optional[Callable],
          keep_labels: bool = True) -> _Scan:
  """One pass over a split, CHUNK records at a time: labels (or, `keep_labels` False, their
  class counts), ids, shape, range, statistics."""
  ys, ids, shape, dtype, counts = [], [], None, None, np.zeros(0, np.int64)
  lo, hi, total, m2, count = np.inf, -np.inf, 0.0, 0.0, 0
  for start in range(0, len(records), CHUNK):
    cols = records.read_in_order(np.arange(start, min(len(records), start + CHUNK)))
    x = cols["x"]
    if shape is None:
      shape, dtype = x.shape[1:], x.dtype
    elif x.shape[1:] != shape or x.dtype != dtype:
      raise UserError(
          f"The {split!r} split of dataset {name!r} has records of inconsistent shape: inputs "
          f"{shape} {dtype} in its first records, {x.shape[1:]} {x.dtype} from record {start}. "
          "jrecipe batches a split's records into one array per batch, so every record must "
          "have one input shape and dtype: pad or crop them when preparing the dataset.")
    if keep_labels:
      ys.append(cols["y"])
    else:
      counts = _add_counts(counts, cols["y"], name, split, start)
    ids.append(np.asarray(cols["id"], np.int64))
    if len(x):
      lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    if inputs is not None and len(x):
      f = inputs(x)
      n_c, s_c = f.size, float(np.sum(f, dtype=np.float64))
      m2_c = float(np.sum(np.square(f.astype(np.float64) - s_c / n_c)))
      if count:
        delta = s_c / n_c - total / count
        m2 += m2_c + delta * delta * count * n_c / (count + n_c)
      else:
        m2 = m2_c
      total, count = total + s_c, count + n_c
  if shape is None:
    raise UserError(f"The {split!r} split of dataset {name!r} has no records: every split "
                    "needs at least one example.")
  return _Scan(np.concatenate(ys) if keep_labels else None, np.concatenate(ids), tuple(shape),
               dtype, lo, hi, total, m2, count, None if keep_labels else counts)


def _add_counts(counts: np.ndarray, y, name: str, split: str, start: int) -> np.ndarray:
  """`counts` plus the class counts of the label chunk `y` (non-negative integers)."""
  y = np.asarray(y).ravel()
  if y.size and (not np.issubdtype(y.dtype, np.integer) or int(y.min()) < 0 or
                 int(y.max()) >= MAX_SEQUENCE_CLASSES):
    raise UserError(f"The {split!r} split of dataset {name!r} has sequence labels that are not "
                    f"integers in [0, {MAX_SEQUENCE_CLASSES}) (from record {start}): a sequence "
                    "task's labels are class (token) ids.")
  c = np.bincount(y.astype(np.int64), minlength=len(counts))
  c[:len(counts)] += counts
  return c


def count_labels(records: Records, n: int) -> np.ndarray:
  """The class counts of the labels of `records`' first n rows, CHUNK rows at a time."""
  counts = np.zeros(0, np.int64)
  for a in range(0, n, CHUNK):
    counts = _add_counts(counts, records.read_in_order(np.arange(a, min(n, a + CHUNK)))["y"],
                         "", "", a)
  return counts


def _scans(name: str, records: dict, path: str, variant: str,
           scan: Callable[[str], _Scan]) -> dict:
  """Every split's `_Scan`, from the copy beside the dataset when it is valid for its files.

  Why: the pass reads every record; a later run, or another host sharing the data_dir, reads
  the labels and statistics from `<data_dir>/.jrecipe_arrays/` instead (the same rule as the
  in-memory copy, `jrecipe.data.store`: used only while the TFDS files' names, sizes and
  modification times are unchanged; JRECIPE_DATA_SNAPSHOT=0 turns it off).
  """
  from jrecipe.data import store
  fp = _fingerprint(path)
  if fp is None:
    return {s: scan(s) for s in SPLITS}
  copy = _copy_path(path, name, f"stream-{variant}.npz")
  cached = store.read_npz(copy, fp)
  if cached is not None and set(cached[0]) == set(SPLITS):
    meta, cols = cached
    return {s: _Scan(y=cols[s].get("y"), ids=cols[s]["id"], shape=tuple(m["shape"]),
                     dtype=np.dtype(m["dtype"]), lo=m["lo"], hi=m["hi"], total=m["total"],
                     m2=m["m2"], count=m["count"], label_counts=cols[s].get("label_counts"))
            for s, m in meta.items()}
  scans = {s: scan(s) for s in SPLITS}
  store.write_npz(copy, fp, {s: {"shape": list(v.shape), "dtype": v.dtype.str, "lo": v.lo,
                                 "hi": v.hi, "total": v.total, "m2": v.m2, "count": v.count}
                             for s, v in scans.items()},
                  {s: {"id": v.ids, **({"y": v.y} if v.y is not None else
                                       {"label_counts": v.label_counts})}
                   for s, v in scans.items()})
  return scans


def _fingerprint(path: Optional[str]) -> Optional[str]:
  """The prepared TFDS directory's fingerprint (`store.dir_fingerprint`), or None when it is
  not one or the copies beside datasets are off (JRECIPE_DATA_SNAPSHOT=0)."""
  from jrecipe.data import store
  return store.dir_fingerprint(path) if path and store.enabled() else None


def _copy_path(path: str, name: str, suffix: str) -> str:
  """Where a copy of the dataset at `path` lives: `<data_dir>/.jrecipe_arrays/...` (a local
  directory for a gs:// data_dir, `store.copies_root`)."""
  from jrecipe.data import store
  safe = name.replace(":", "_").replace("/", "_")
  return os.path.join(store.copies_root(_data_root(path, name)), store.DIRNAME,
                      f"{safe}-{os.path.basename(path)}-{suffix}")


def _decoded_copies(name: str, records: dict, scans: dict, info: StreamInfo) -> tuple:
  """(records, used): each split's records read from its decoded copy
  (`jrecipe.data.stream_rows`) when all the splits' inputs fit in `info.row_cache_mb`, the
  copy is made or already valid, and the dataset is a prepared TFDS directory."""
  from jrecipe.data import stream_rows
  fp = _fingerprint(info.source) if info.row_cache_mb else None
  if fp is None or any(scans[s].y is None for s in SPLITS):  # labels streamed: one record read
    return records, False
  total = sum(len(records[s]) * int(np.prod(scans[s].shape, dtype=np.int64)) *
              np.dtype(scans[s].dtype).itemsize for s in SPLITS)
  if total > info.row_cache_mb * 2**20:
    return records, False
  out = {}
  for s in SPLITS:
    sc, r, n = scans[s], records[s], len(records[s])
    where = _copy_path(info.source, name, f"rows-{s}.bin")
    chunks = lambda r=r, n=n: (  # noqa: E731
        r.read_in_order(np.arange(a, min(n, a + CHUNK)))["x"] for a in range(0, n, CHUNK))
    rows = (stream_rows.open_copy(where, fp, sc.shape, sc.dtype, n) or
            stream_rows.write_copy(where, fp, sc.shape, sc.dtype, n, chunks))
    if rows is None:
      return records, False
    out[s] = Records(stream_rows.RowReader(rows, sc.y, sc.ids), 0, n)
  return out, True


def _data_root(path: str, name: str) -> str:
  """The data_dir of a prepared dataset's directory: <data_dir>/<name>[/<config>]/<version>
  (`name` with its config: 'tfds:mnist', 'tfds:synthetic_images/small', 'stdlib_bytes/ctx128')."""
  depth = 1 + name.removeprefix(TFDS_PREFIX).count("/") + 1
  for _ in range(depth):
    path = os.path.dirname(path)
  return path


def open_stream(data_config: Any) -> dataset_lib.Dataset:
  """The Dataset a config's data section names, streamed (data.pipeline='stream').

  Raises:
    UserError: a missing data_dir, a TFDS dataset that is not prepared, a missing split,
      records of inconsistent shape, or a field that does not fit the data.
  """
  name, data_dir, normalize, train_subset, downsample, context = dataset_lib._fields(data_config)  # noqa: SLF001
  if not name.startswith(TFDS_PREFIX) and name not in dataset_lib.DATASETS:
    raise UserError(
        f"data.pipeline='stream' reads TFDS-prepared ArrayRecord datasets (the built-in ones "
        f"or 'tfds:<name>'), but data.name={name!r} is a data function returning arrays in "
        "memory. Use data.pipeline='memory' (or 'auto') for it, or pass your random-access "
        "sources to jrecipe.data.stream.from_sources.")
  if name.startswith(TFDS_PREFIX) and not storage.isdir(data_dir):
    raise UserError(
        f"The data_dir {data_dir!r} of the TFDS dataset {name!r} does not exist: set "
        "data.data_dir (or $JRECIPE_DATA_DIR) to the directory where it is prepared (the one "
        f"holding {name[len(TFDS_PREFIX):]}/<version>/dataset_info.json).")
  if context and name not in TEXT_DATASETS:
    raise UserError(f"data.context_length={context} applies to the text datasets "
                    f"({', '.join(TEXT_DATASETS)}), but {name!r} is not one: set it to 0.")
  records, meta, label, path, stored_as = _open_tfds(name, data_dir, context)
  return _assemble(name, records, meta, label, _info(data_config, path), normalize,
                   train_subset, downsample, stored_as=stored_as)


def from_sources(name: str, sources: dict, meta: dict, data_config: Any = None,
                 keys: tuple = ("x", "y", None)) -> dataset_lib.Dataset:
  """A streamed Dataset over your own random-access sources (the grain protocol).

  Args:
    name: the dataset's name in messages and the spec.
    sources: 'train', 'validation', 'test' -> an object with `__len__` and `__getitem__`
      (optionally `__getitems__`) whose records are dicts (keys `keys`) or (x, y) pairs.
    meta: dict(task=..., num_classes=..., class_names=..., time_axis=..., sees_current=...)
      as `jrecipe.data.user.read_user` returns.
    data_config: the config.data section (normalize, train_subset, downsample, stream_*).
    keys: (input key, label key, id key or None: ids are record indices).
  """
  missing = [s for s in SPLITS if s not in sources]
  if missing:
    raise UserError(f"The sources of {name!r} lack the splits {missing}: give 'train', "
                    "'validation' and 'test' random-access sources.")
  from jrecipe.sections import complete
  cfg = complete(data_config, "data")
  records = {s: Records(GenericReader(sources[s], keys, name, keys[2] is None), 0,
                        len(sources[s])) for s in SPLITS}
  return _assemble(name, records, dict(meta), None, _info(cfg, "your sources"),
                   bool(cfg.normalize), int(cfg.train_subset), int(cfg.downsample))


def _info(data_config: Any, path: Optional[str]) -> StreamInfo:
  from jrecipe.sections import complete
  cfg = complete(data_config, "data")
  return StreamInfo(source=path or "", disk_bytes=_disk_bytes(path),
                    prefetch=int(cfg.stream_prefetch), threads=int(cfg.stream_threads),
                    workers=int(cfg.stream_workers), row_cache_mb=int(cfg.stream_row_cache_mb))


class Transform:
  """Stored records -> what a column holds: the stored values (with a channel axis added to
  [H, W] images), or, with `name`, the model inputs (`dataset.model_inputs`, then
  `dataset.normalise` with `stats` = (mean, std)). A class so that it pickles."""

  def __init__(self, channel: bool, *, sequence: bool = False, downsample: int = 0,
               name: Optional[str] = None, stats: Optional[tuple] = None):
    self.channel, self.sequence, self.downsample = channel, sequence, downsample
    self.name, self.stats = name, stats

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = x[..., None] if self.channel else x
    if self.name is None:
      return x
    f = dataset_lib.model_inputs(x, sequence=self.sequence, downsample=self.downsample,
                                 name=self.name)
    return dataset_lib.normalise(f, *self.stats) if self.stats else f


def _assemble(name, records, meta, label, info, normalize, train_subset, downsample, *,
              stored_as: Optional[str] = None) -> dataset_lib.Dataset:
  """Scan every split, then the Dataset of StreamColumns around the in-memory labels.
  `stored_as`: the name with its builder config ('stdlib_bytes/ctx128') that names the copies
  kept beside the dataset; default `name`."""
  stored_as = stored_as or name
  opened = records
  downsample = downsample if downsample > 1 else 0
  task_guess = (meta or {}).get("task")
  sequence = task_guess == "sequence"

  def inputs(x):  # the model inputs before normalisation, for the statistics
    channel = x.ndim == 3 and name.startswith(TFDS_PREFIX) and not sequence
    return Transform(channel, sequence=sequence, downsample=downsample, name=name)(x)

  stats = normalize and not sequence
  scans = _scans(stored_as, records, info.source,
                 f"d{downsample}{'n' if stats else ''}{'q' if sequence else ''}",
                 lambda s: _scan(records[s], name, s, inputs if s == "train" and stats else None,
                                 keep_labels=not sequence))
  if meta is None:
    from jrecipe.data import reading
    meta = reading._tfds_meta(label, {s: {"y": v.y} for s, v in scans.items()})  # noqa: SLF001
  shape = scans["train"].shape
  shapes = {s: v.shape for s, v in scans.items()}
  if len(set(shapes.values())) > 1:
    raise UserError(f"The splits of dataset {name!r} have records of inconsistent shape "
                    f"({shapes}): every split's inputs must have one shape.")
  dataset_lib.check_fields(name, meta, len(records["train"]), train_subset, downsample)
  records, copied = _decoded_copies(stored_as, records, scans, info)
  info = dataclasses.replace(info, decoded_copy=copied)
  if train_subset:
    records = {**records, "train": records["train"].view(0, train_subset)}
    t = scans["train"]
    scans["train"] = dataclasses.replace(
        t, y=None if t.y is None else t.y[:train_subset], ids=t.ids[:train_subset],
        label_counts=None if t.y is not None else count_labels(records["train"], train_subset))
  for r in opened.values():  # the passes are over: a bucket's shards leave the local disk
    r.close_in_order()
  channel = not sequence and len(shape) == 2 and name.startswith(TFDS_PREFIX)
  if not sequence and len(shape) + channel != 3 and name.startswith(TFDS_PREFIX):
    raise UserError(f"The TFDS dataset {name!r} has images of shape {shape}; jrecipe expects "
                    "[H, W] or [H, W, C].")
  mean, std = 0.0, 1.0
  if stats:
    t = scans["train"]
    mean = t.total / t.count
    std = float(np.sqrt(t.m2 / t.count)) or 1.0

  stored = Transform(channel)
  model = Transform(channel, sequence=sequence, downsample=downsample, name=name,
                    stats=(mean, std) if stats else None)

  probe = model(records["train"].read(np.arange(1))["x"])
  raw_probe = stored(records["train"].read(np.arange(1))["x"])
  arrays, raw = {}, {}
  for s in SPLITS:
    ids = dataset_lib._readonly(scans[s].ids)  # noqa: SLF001
    y = scans[s].y
    arrays[s] = {"x": StreamColumn(records[s], model, probe.shape[1:], probe.dtype),
                 "y": label_column(y, records[s], meta["task"], as_stored=False), "id": ids}
    raw[s] = {"x": StreamColumn(records[s], stored, raw_probe.shape[1:], raw_probe.dtype),
              "y": label_column(y, records[s], meta["task"], as_stored=True), "id": ids}
  lo = min(v.lo for v in scans.values())
  hi = max(v.hi for v in scans.values())
  spec = DataSpec(name=name, task=meta["task"], input_shape=tuple(int(d) for d in probe.shape[1:]),
                  num_classes=meta["num_classes"], class_names=meta["class_names"],
                  value_range=(lo, hi), splits={s: len(records[s]) for s in SPLITS},
                  time_axis=meta["time_axis"], sees_current=meta["sees_current"], mean=mean,
                  std=std, token_bytes=meta.get("token_bytes"))
  counts = {s: v.label_counts for s, v in scans.items() if v.label_counts is not None}
  return dataset_lib.Dataset(spec=spec, arrays=arrays, raw=raw, stream=info,
                             label_counts=counts or None)
