"""Reading a dataset's splits from its ArrayRecord files into numpy: the names jrecipe knows.

Recipe step served: 'Become one with the data': every split is read once, whole, into numpy
columns ('x', 'y', 'id') with the values as stored, so that the rest of jrecipe sees exactly
what is on disk. Built-in datasets (`DATASETS`, see `jrecipe.data.builders`) are built on first
use; 'tfds:<name>' reads any TFDS dataset already prepared in the array_record format, without
TensorFlow. Nothing here downloads, except a dataset prepared in a gs:// data_dir, whose files
are copied to local disk to be read whole (`whole`). Read costs are in docs/performance.md.
"""

import contextlib
import os
import shutil
import tempfile

import numpy as np

from jrecipe.data import damage
from jrecipe.errors import UserError

DATASETS: list[str] = ["digits", "mnist5k", "digits_seq", "stdlib_bytes", "stdlib_bytes_small"]
# Byte-level text datasets (jrecipe/data/text.py): windows cut at data.context_length.
TEXT_DATASETS = ("stdlib_bytes", "stdlib_bytes_small")
TFDS_PREFIX = "tfds:"
SPLITS = ("train", "validation", "test")
# For a 'tfds:<name>' dataset without a 'validation' split: this last fraction of 'train'.
TFDS_VALIDATION_FRACTION = 0.1


def valid_names() -> str:
  """The dataset names jrecipe accepts, for error messages."""
  return ", ".join(DATASETS) + ", or 'tfds:<name>' for any TFDS dataset prepared in data_dir"


def fast_plan(features) -> dict | None:
  """How to parse each feature of a TFDS ArrayRecord record without TFDS's decoding, or None.

  Handles what jrecipe's builders store: fixed-shape Tensors with BYTES encoding (one raw bytes
  value per example) and int64 scalars (ClassLabel, ids). Anything else returns None and is
  read generically (through the data source's own decoding).
  """
  import tensorflow_datasets as tfds
  serialized = features.get_serialized_info()
  plan = {}
  for key, feature in features.items():
    info = serialized.get(key)
    if info is None or getattr(info, "shape", None) != ():
      return None
    if (isinstance(feature, tfds.features.Tensor)
        and getattr(feature, "_encoding", None) == tfds.features.Encoding.BYTES
        and all(isinstance(d, int) for d in feature.shape)):
      plan[key] = ("bytes", np.dtype(feature.np_dtype), tuple(feature.shape))
    elif np.dtype(info.np_dtype) == np.int64 and tuple(feature.shape) == ():
      plan[key] = ("int64", np.dtype(np.int64), ())
    else:
      return None
  return plan


def parse_records(raw: list, plan: dict) -> dict:
  """Serialized tf.train.Examples -> stacked numpy columns, following `fast_plan`'s plan.

  One protobuf parse per record, then one `np.frombuffer` per column.
  """
  from tensorflow_datasets.proto import tf_example_pb2
  n = len(raw)
  maps = [tf_example_pb2.Example.FromString(r).features.feature for r in raw]
  out = {}
  for key, (kind, dtype, shape) in plan.items():
    if kind == "bytes":
      buf = b"".join([m[key].bytes_list.value[0] for m in maps])
      out[key] = np.frombuffer(buf, dtype=dtype).reshape((n, *shape))
    else:
      out[key] = np.fromiter((m[key].int64_list.value[0] for m in maps), np.int64, n)
  return out


def read_fast(source, features) -> dict | None:
  """All records of a TFDS ArrayRecord source as stacked numpy columns, or None if unsupported.

  One array_record batch read, one protobuf parse per record, then one `np.frombuffer` per
  column (`fast_plan`, `parse_records`): several times faster than the data source's
  per-example decoding (docs/performance.md; the equivalence is tested).
  """
  plan = fast_plan(features)
  records = getattr(source, "data_source", None)
  if plan is None or records is None or not hasattr(records, "__getitems__"):
    return None
  n = len(source)
  return parse_records(records.__getitems__(list(range(n))) if n else [], plan)


def read_generic(source, keys, chunk: int = 1024) -> dict:
  """All records of a random-access TFDS source through its own decoding (images, ...)."""
  n = len(source)
  parts = {k: [] for k in keys}
  for start in range(0, n, chunk):
    examples = source.__getitems__(list(range(start, min(n, start + chunk))))
    for k in keys:
      try:
        parts[k].append(np.stack([np.asarray(e[k]) for e in examples]))
      except ValueError as e:
        raise UserError(
            f"The feature {k!r} has examples of different shapes ({e}); jrecipe keeps datasets "
            "in memory as one array per split and needs a fixed shape per example.") from e
  return {k: np.concatenate(v) for k, v in parts.items()} if n else {}


@contextlib.contextmanager
def whole(builder):
  """The builder to read every record of a prepared dataset from: `builder` itself, or, for
  one prepared in a gs:// data_dir, a read-only builder of a local download of its files
  (removed afterwards; the numpy copy that `jrecipe.data.store` keeps is what later runs read).

  Why: ArrayRecord reads an object with one ranged request per record, which is what random
  access needs (the streamed pipeline reads a bucket that way) but costs a round trip per
  example when the whole split is wanted; the download is one request per file (digits from
  the emulator on loopback: 170 s by records, under 1 s downloaded).
  """
  path = str(builder.data_path)
  from jrecipe import storage
  if not storage.is_remote(path):
    yield builder
    return
  import tensorflow_datasets as tfds
  root = storage.local_mirror(path)
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=root, prefix=".download-")
  try:
    storage.download_tree(path, tmp)
    yield tfds.builder_from_directory(tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _read_split(source, features, keys, split: str, name: str) -> dict:
  with damage.reading_records(source, split=split, dataset=name):
    columns = read_fast(source, features)
    if columns is None:
      columns = read_generic(source, keys)
  return columns


def read_builtin(name: str, data_dir: str, context_length: int = 0) -> tuple[dict, dict]:
  """(meta, splits) of a jrecipe dataset, building it into data_dir on first use.

  After the first read through TFDS, later processes read a numpy copy of the same arrays
  (`jrecipe.data.store`: valid only while the TFDS files are unchanged). A text dataset is
  read at `context_length` (0 = its default): its stored windows of context_length + 1 bytes
  become x = window[:-1] and y = window[1:] (next-byte targets at every position).
  """
  from jrecipe.data import store, text
  is_text, stored_as = name in TEXT_DATASETS, name
  if is_text:
    length = text.check_context(context_length or text.DEFAULT_CONTEXT)
    stored_as = f"{name}/ctx{length}"  # the builder config's directory (StdlibBytesConfig)
  cached = store.load(stored_as, data_dir)
  if cached is not None:
    return cached
  from jrecipe.data import builders
  builder = builders.prepare(name, data_dir,
                             builders.stdlib_bytes_config(length) if is_text else None)
  keys = ("tokens", "id") if is_text else builtin_keys(name)
  splits = {}
  with whole(builder) as readable:
    sources, features = readable.as_data_source(), readable.info.features
    for split in SPLITS:
      cols = _read_split(sources[split], features, keys, split, name)
      x, y = (text.inputs_and_targets(cols["tokens"]) if is_text else
              (cols[keys[0]], cols[keys[1]]))
      splits[split] = {"x": x, "y": y, "id": cols["id"]}
  meta = builtin_meta(name, features)
  store.save(stored_as, data_dir, meta, splits)
  return meta, splits


def builtin_meta(name: str, features) -> dict:
  """The task, classes, time axis (and bytes per token) of a built-in dataset."""
  from jrecipe.data import builders, text
  if name in TEXT_DATASETS:
    return dict(task="sequence", num_classes=text.VOCAB, class_names=text.byte_names(),
                time_axis=1, sees_current=True, token_bytes=1.0)
  if name == "digits_seq":
    return dict(task="sequence", num_classes=builders.SEQ_VOCAB,
                class_names=tuple(str(i) for i in range(builders.SEQ_VOCAB)), time_axis=1,
                sees_current=True)
  label = features["label"]
  return dict(task="classification", num_classes=label.num_classes,
              class_names=tuple(label.names), time_axis=None, sees_current=True)


def builtin_keys(name: str) -> tuple[str, str, str]:
  """The (input, label, id) feature names of a jrecipe built-in image or sequence dataset."""
  return ("x", "y", "id") if name == "digits_seq" else ("image", "label", "id")


def _tfds_help(name: str, data_dir: str, problem: str) -> UserError:
  return UserError(
      f"Cannot read the TFDS dataset {name!r} from data_dir {data_dir!r}: {problem} jrecipe "
      "reads TFDS datasets without TensorFlow, through random access, so the dataset must "
      "already be prepared in that directory in the array_record file format: on a machine "
      f"with TensorFlow run `tfds build {name} --data_dir={data_dir} --file_format=array_record`"
      f" (or `tfds.builder({name!r}, data_dir=...).download_and_prepare(file_format="
      "'array_record')`) and copy the result, or set data.data_dir (or $JRECIPE_DATA_DIR) to "
      f"where it is prepared. Built-in datasets that need no preparation: {', '.join(DATASETS)}.")


def _first_line(err: Exception) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0] if text else ''}"


def _tfds_sources(name: str, data_dir: str):
  """(sources by split, features) of a TFDS dataset prepared in data_dir; UserError if not."""
  return _checked_sources(name, data_dir, _tfds_builder(name, data_dir))


def _tfds_builder(name: str, data_dir: str):
  """The builder of a TFDS dataset prepared in data_dir; UserError if there is none."""
  import tensorflow_datasets as tfds
  if not name:
    raise UserError("The dataset name 'tfds:' names no TFDS dataset: use 'tfds:<name>', e.g. "
                    "'tfds:mnist'.")
  try:
    # What `tfds.data_source(name, data_dir=..., download=False)` does, in two steps so that
    # 'not prepared' gets its own message.
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError, a catalogue builder failing to import, ...
    raise _tfds_help(name, data_dir, f"TFDS cannot find it ({_first_line(e)}).") from e
  if not (builder.data_path / "dataset_info.json").exists():
    raise _tfds_help(name, data_dir, f"it is not prepared there (no {builder.data_path}).")
  return builder


def _checked_sources(name: str, data_dir: str, builder):
  """(sources by split, features) of a prepared TFDS builder, with the features and splits
  jrecipe's 'tfds:' loader needs; UserError if not."""
  try:
    sources = builder.as_data_source()
  except Exception as e:  # e.g. prepared as tfrecord, which needs TensorFlow to read
    raise _tfds_help(
        name, data_dir, f"it is prepared there but cannot be read by random access "
        f"(file format {builder.info.file_format}; {_first_line(e)}).") from e
  features = builder.info.features
  missing = [k for k in ("image", "label") if k not in features]
  if missing:
    raise UserError(
        f"The TFDS dataset {name!r} has features {sorted(features.keys())}, but jrecipe's "
        f"'tfds:' loader needs 'image' and 'label' (missing: {missing}). Write a builder for it "
        "in jrecipe/data/builders.py instead.")
  for split in ("train", "test"):
    if split not in sources:
      raise UserError(
          f"The TFDS dataset {name!r} has splits {sorted(sources)}; jrecipe needs 'train' and "
          "'test' (and uses 'validation' when present, else the last 10% of 'train').")
  return sources, features


def _carve_validation(name: str, splits: dict) -> dict:
  """`splits` with 'validation' taken from the end of 'train' when the dataset has none."""
  if "validation" in splits:
    return splits
  train = splits["train"]
  n = len(train["x"])
  n_val = max(1, int(round(TFDS_VALIDATION_FRACTION * n)))
  if n_val >= n:
    raise UserError(f"The TFDS dataset {name!r} has only {n} training examples: too few to "
                    "carve a validation split from.")
  splits = dict(splits)
  splits["validation"] = {k: v[n - n_val:] for k, v in train.items()}
  splits["train"] = {k: v[:n - n_val] for k, v in train.items()}
  return splits


def _tfds_meta(label, splits: dict) -> dict:
  """The task, classes and time axis of a TFDS dataset, from its 'label' feature."""
  import tensorflow_datasets as tfds
  if isinstance(label, tfds.features.ClassLabel):
    return dict(task="classification", num_classes=label.num_classes,
                class_names=tuple(label.names), time_axis=None, sees_current=True)
  if np.issubdtype(np.dtype(label.np_dtype), np.floating):
    return dict(task="regression", num_classes=None, class_names=None, time_axis=None,
                sees_current=True)
  k = int(max(int(s["y"].max()) for s in splits.values() if len(s["y"]))) + 1
  return dict(task="classification", num_classes=k, class_names=None, time_axis=None,
              sees_current=True)


def read_tfds(name: str, data_dir: str) -> tuple[dict, dict]:
  """(meta, splits) of any TFDS dataset already prepared (array_record) in data_dir.

  Needs features 'image' and 'label' and splits 'train' and 'test'. The validation split is
  'validation' if the dataset has one, else the last TFDS_VALIDATION_FRACTION (10%) of 'train'
  (which is then removed from train). Ids are record indices within the TFDS split (a carved
  validation example keeps its index in 'train'). Never downloads or prepares anything.
  """
  splits = {}
  with whole(_tfds_builder(name, data_dir)) as builder:
    sources, features = _checked_sources(name, data_dir, builder)
    for split in SPLITS:
      if split in sources:
        cols = _read_split(sources[split], features, ("image", "label"), split, name)
        x, y = cols["image"], cols["label"]
        if x.ndim == 3:  # [N, H, W] grey images without a channel axis
          x = x[..., None]
        splits[split] = {"x": x, "y": y, "id": np.arange(len(x), dtype=np.int64)}
  splits = _carve_validation(name, splits)
  splits = {s: splits[s] for s in SPLITS}
  if splits["train"]["x"].ndim != 4:
    raise UserError(f"The TFDS dataset {name!r} has images of shape "
                    f"{splits['train']['x'].shape[1:]}; jrecipe expects [H, W] or [H, W, C].")
  return _tfds_meta(features["label"], splits), splits
