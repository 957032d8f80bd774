"""The in-memory Dataset: fixed splits with stable ids, the inputs the model sees and the raw ones.

Recipe steps served:
  * 'Become one with the data': `load_dataset` gives the arrays the model sees (`arrays`) and the
    values as stored (`raw`), with stable example ids, so inspection can look at exactly what
    goes in and find any example again.
  * 'Overfit one batch' / 'regularise': `train_subset` (first N training examples) and
    `downsample` (smaller input dimensionality) are config switches.

In memory, each split is read once from its ArrayRecord files into numpy (`jrecipe.data.reading`)
and cached per process; batches are numpy gathers (`jrecipe.data.batches`). A dataset larger
than memory is streamed instead (data.pipeline, `choose_pipeline`; `jrecipe.data.stream`): the
same Dataset, its inputs read a batch at a time.
"""

import dataclasses
import threading
from typing import Any, Optional

import numpy as np

from jrecipe.data.reading import (DATASETS, SPLITS, TEXT_DATASETS, TFDS_PREFIX, read_builtin,
                                  read_tfds, valid_names)
from jrecipe.errors import UserError
from jrecipe.sections import complete
from jrecipe.types import DataSpec

__all__ = ["DATASETS", "SPLITS", "TFDS_PREFIX", "Dataset", "clear_cache", "int_field",
           "load_dataset"]


@dataclasses.dataclass
class Dataset:
  """A dataset in memory.

  Attributes:
    spec: what the rest of jrecipe needs to know (`jrecipe.types.DataSpec`).
    arrays: split -> {'x': model inputs [N, *spec.input_shape] (float32, normalised when
      `normalize`; int32 token ids for sequences), 'y': int32 labels [N] (int32 [N, T] for
      sequences, float32 for regression), 'id': int64 [N] stable example ids}.
    raw: split -> {'x': inputs as stored (before downsampling and normalisation, e.g. uint8
      [N, 8, 8, 1]), 'y': labels as stored, 'id': the same ids}; row i of `raw[s]` is row i of
      `arrays[s]`. Arrays are read-only and may be shared between Dataset objects.
  """

  spec: DataSpec
  arrays: dict[str, dict[str, np.ndarray]]
  raw: dict[str, dict[str, np.ndarray]]
  # None in memory; a streamed dataset's `jrecipe.data.stream.StreamInfo` (its 'x' columns are
  # then `StreamColumn`s read from the ArrayRecord files batch by batch; 'id' is numpy, and so
  # is 'y' except for sequence labels, which are StreamColumns read with their inputs).
  stream: Any = None
  # split -> class counts of its labels where the labels are not held in memory (a streamed
  # sequence dataset); None otherwise (`class_counts` counts the arrays).
  label_counts: Optional[dict] = None

  def class_counts(self, split: str, num_classes: int) -> np.ndarray:
    """The label counts of `split` over [0, num_classes) (every label of a sequence)."""
    if self.label_counts and split in self.label_counts:
      c = np.asarray(self.label_counts[split], np.int64)
    else:
      c = np.bincount(np.asarray(self.arrays[split]["y"]).ravel().astype(np.int64),
                      minlength=num_classes)
    return np.pad(c, (0, max(0, num_classes - len(c))))


def model_inputs(x: np.ndarray, *, sequence: bool, downsample: int, name: str) -> np.ndarray:
  """Stored inputs -> what the model sees before normalisation (one definition for both the
  in-memory and the streaming path, so both give bit-identical batches)."""
  if sequence:
    return x.astype(np.int32)
  x = x.astype(np.float32)
  return _downsample(x, downsample, name) if downsample > 1 else x


def normalise(x: np.ndarray, mean: float, std: float) -> np.ndarray:
  """(x - mean) / std in float32, the scalar statistics cast once (both paths)."""
  return (x - np.float32(mean)) / np.float32(std)


def fingerprint(ds: "Dataset") -> str:
  """What a checkpoint's data position is valid for: the dataset's identity and the training
  split's labels and ids (a short hash), the same whichever pipeline reads it, so a run may
  switch between the in-memory and the streaming path and still resume at the next example."""
  import hashlib
  import json
  spec = ds.spec
  h = hashlib.sha256(json.dumps(
      [spec.name, spec.splits, list(spec.input_shape), float(np.float32(spec.mean)),
       float(np.float32(spec.std))]).encode())
  for k in ("y", "id"):
    h.update(np.ascontiguousarray(ds.arrays["train"][k]).tobytes())
  return h.hexdigest()[:16]



def int_field(value: Any, where: str, minimum: int = 0) -> int:
  """`value` as an int >= minimum; UserError naming the field `where` otherwise."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise UserError(
        f"The config field {where}={value!r} is invalid: it must be an integer >= {minimum} "
        f"(0 turns it off).")
  return int(value)


_LOCK = threading.Lock()
# (name, data_dir, context_length) -> (meta, splits as stored)
_SPLITS_CACHE: dict[tuple, tuple[dict, dict]] = {}
_DATASET_CACHE: dict[tuple, Dataset] = {}


def clear_cache() -> None:
  """Forgets every dataset loaded in this process (the next load reads the files again)."""
  with _LOCK:
    _SPLITS_CACHE.clear()
    _DATASET_CACHE.clear()


def _readonly(a: np.ndarray) -> np.ndarray:
  a = np.asarray(a)
  a.flags.writeable = False
  return a


def _downsample(x: np.ndarray, factor: int, name: str) -> np.ndarray:
  """Average-pools [N, H, W, C] images by `factor` in H and W (vectorised)."""
  n, h, w, c = x.shape
  if h % factor or w % factor:
    valid = [f for f in range(2, min(h, w) + 1) if h % f == 0 and w % f == 0]
    raise UserError(
        f"data.downsample={factor} does not divide the {h}x{w} images of {name!r}. Valid "
        f"factors: {', '.join(map(str, valid)) or 'none'} (or 0/1 for off).")
  x = x.reshape(n, h // factor, factor, w // factor, factor, c)
  return x.mean(axis=(2, 4), dtype=np.float64).astype(np.float32)


def check_fields(name: str, meta: dict, n_train: int, train_subset: int,
                 downsample: int) -> None:
  """UserError for a train_subset larger than the split, or downsampling a sequence."""
  if train_subset > n_train:
    raise UserError(
        f"data.train_subset={train_subset} exceeds the {n_train} training examples of "
        f"{name!r}. Use at most {n_train}, or 0 for all of them.")
  if meta["task"] == "sequence" and downsample > 1:
    raise UserError(
        f"data.downsample={downsample} applies to images, but {name!r} is a sequence dataset. "
        "Set data.downsample to 0.")


def _build(name: str, meta: dict, stored_full: dict, normalize: bool, train_subset: int,
           downsample: int) -> Dataset:
  """The Dataset for one configuration, from the splits as stored (shared, read-only)."""
  stored = dict(stored_full)
  check_fields(name, meta, len(stored["train"]["id"]), train_subset, downsample)
  if train_subset:
    stored["train"] = {k: v[:train_subset] for k, v in stored["train"].items()}
  sequence = meta["task"] == "sequence"
  lo = min(float(s["x"].min()) for s in stored_full.values() if len(s["x"]))
  hi = max(float(s["x"].max()) for s in stored_full.values() if len(s["x"]))

  def inputs(x):
    return model_inputs(x, sequence=sequence, downsample=downsample, name=name)

  arrays = {s: {"x": inputs(v["x"])} for s, v in stored.items()}
  mean, std = 0.0, 1.0
  if normalize and not sequence:
    # Scalar statistics of the WHOLE training split (after downsampling, never of validation or
    # test; not of train_subset either, so a run on a subset sees inputs scaled as the full run).
    ref = inputs(stored_full["train"]["x"]) if train_subset else arrays["train"]["x"]
    mean = float(np.mean(ref, dtype=np.float64))
    std = float(np.std(ref, dtype=np.float64)) or 1.0
    for a in arrays.values():
      a["x"] = normalise(a["x"], mean, std)
  for s, v in stored.items():
    y = v["y"]
    arrays[s]["y"] = y.astype(np.float32) if meta["task"] == "regression" else y.astype(np.int32)
    arrays[s]["id"] = v["id"].astype(np.int64)
  arrays = {s: {k: _readonly(a) for k, a in d.items()} for s, d in arrays.items()}
  raw = {s: {k: _readonly(a) for k, a in d.items()} for s, d in stored.items()}
  spec = DataSpec(
      name=name, task=meta["task"],
      input_shape=tuple(int(d) for d in arrays["train"]["x"].shape[1:]),
      num_classes=meta["num_classes"], class_names=meta["class_names"], value_range=(lo, hi),
      splits={s: int(len(v["id"])) for s, v in arrays.items()}, time_axis=meta["time_axis"],
      sees_current=meta["sees_current"], mean=mean, std=std,
      token_bytes=meta.get("token_bytes"))
  return Dataset(spec=spec, arrays=arrays, raw=raw)


def load_dataset(data_config: Any, *, seed: int = 0) -> Dataset:
  """Loads a dataset into memory, with its fixed splits. Recipe: 'Become one with the data'.

  Built-in datasets are built into data_dir on first use (a few seconds, once per data_dir; see
  `jrecipe.data.builders`) and then read from their ArrayRecord files. Results are cached per
  process: a second call with the same configuration returns the same (read-only) arrays at
  no cost.

  Args:
    data_config: the config.data section (a ConfigDict; a dict or None works too, its missing
      fields taking the base config's defaults) with fields
      name: 'digits', 'mnist5k', 'digits_seq', 'stdlib_bytes', 'stdlib_bytes_small', or
        'tfds:<name>' (any TFDS dataset with 'image' and 'label' features already prepared in
        data_dir in the array_record format; its validation split is 'validation' if
        present, else the last 10% of 'train'), or an import path 'pkg.module:Name' to your
        own data: a function returning arrays or random-access sources per split, or a TFDS
        builder class (docs/your_data.md).
      data_dir: TFDS data directory; '' = $JRECIPE_DATA_DIR or ~/.cache/jrecipe/tfds.
      normalize: (default True) images become (x - mean) / std with scalar mean and std computed
        on the whole training split only (stored in spec.mean / spec.std). Sequence token ids
        are never normalised.
      train_subset: (default 0 = all) keep only the first N training examples of the fixed
        split (a random, roughly stratified subset): for overfitting studies.
      downsample: (default 0 = off; 1 = off) average-pool images by this factor (must divide
        height and width): the recipe's 'smaller input dimensionality' regulariser.
        spec.input_shape is the pooled shape; `raw` keeps the stored images.
      context_length: (default 0 = the dataset's default, 128) text datasets only: bytes per
        window; x is the window's first context_length bytes, y the next byte at each.
      pipeline: 'auto' (default), 'memory' or 'stream' (`choose_pipeline`). Streamed, the
        'x' columns are `jrecipe.data.stream.StreamColumn`s read a batch at a time, with the
        same values, ids, spec and batches as in memory (docs/streaming.md).
    seed: accepted for a uniform interface; the splits, the subset and the normalisation are
      deliberately independent of it (every run and seed is scored on the same examples).

  Returns:
    A `Dataset` with splits 'train', 'validation' and 'test'.

  Raises:
    UserError: unknown name (the message lists the valid ones), a TFDS dataset that is not
      prepared (the message says how to prepare it), or an invalid field.
  """
  del seed
  name, data_dir, normalize, train_subset, downsample, context = _fields(data_config)
  mode, cfg = choose_pipeline(data_config)
  key = (name, data_dir, normalize, train_subset, downsample, context, mode)
  if mode == "stream":
    key += (int(cfg.stream_prefetch), int(cfg.stream_threads), int(cfg.stream_workers),
            int(cfg.stream_row_cache_mb))
  with _LOCK:
    if key not in _DATASET_CACHE:
      if mode == "stream":
        from jrecipe.data import stream
        _DATASET_CACHE[key] = stream.open_stream(data_config)
      else:
        meta, stored = _stored_splits(name, data_dir, context)
        _DATASET_CACHE[key] = _build(name, meta, stored, normalize, train_subset, downsample)
    ds = _DATASET_CACHE[key]
  # Fresh dicts around the shared read-only arrays: a caller can rebind entries safely.
  return Dataset(spec=ds.spec, arrays={s: dict(d) for s, d in ds.arrays.items()},
                 raw={s: dict(d) for s, d in ds.raw.items()}, stream=ds.stream,
                 label_counts=ds.label_counts)


PIPELINES = ("auto", "memory", "stream")
# Bytes in memory per stored byte of an image dataset read whole: the stored copy ('raw') plus
# the float32 model inputs (4 bytes per uint8 value).
_MEMORY_FACTOR = 5


def choose_pipeline(data_config: Any) -> tuple[str, Any]:
  """('memory' or 'stream', the completed data section): data.pipeline, with 'auto' streaming
  a 'tfds:' dataset whose in-memory copy (about 5x its stored bytes: the stored values plus
  float32 inputs) would exceed data.memory_budget_mb. Built-in datasets and data functions
  are small: 'auto' keeps them in memory."""
  cfg = complete(data_config, "data")
  mode = cfg.pipeline
  if mode not in PIPELINES:
    raise UserError(f"data.pipeline={mode!r} is not a pipeline. Valid values: 'auto' (stream "
                    "datasets larger than data.memory_budget_mb), 'memory', 'stream'.")
  if mode != "auto":
    return mode, cfg
  name = cfg.name
  if not (isinstance(name, str) and name.startswith(TFDS_PREFIX)):
    return "memory", cfg
  from jrecipe.data import store
  from jrecipe import storage
  stored = storage.tree_size(storage.join(store.resolve_data_dir(cfg.data_dir),
                                          name[len(TFDS_PREFIX):]))
  big = stored * _MEMORY_FACTOR > float(cfg.memory_budget_mb) * 2**20
  return ("stream" if big else "memory"), cfg


def _fields(data_config: Any) -> tuple[str, str, bool, int, int, int]:
  """(name, resolved data_dir, normalize, train_subset, downsample (0 = off), context_length
  (0 = the dataset's default)), validated."""
  from jrecipe.data import store
  cfg = complete(data_config, "data")
  name = cfg.name
  if not isinstance(name, str) or not name:
    raise UserError(f"data.name={name!r} is not a dataset name. Valid names: {valid_names()}.")
  from jrecipe.data.user import is_user_data
  if name not in DATASETS and not name.startswith(TFDS_PREFIX) and not is_user_data(name):
    raise UserError(f"Unknown dataset {name!r}. Valid names: {valid_names()}.")
  if not isinstance(cfg.data_dir, str):
    raise UserError(f"data.data_dir={cfg.data_dir!r} must be a path string ('' for the "
                    "default).")
  if not isinstance(cfg.normalize, (bool, np.bool_)):
    raise UserError(f"data.normalize={cfg.normalize!r} must be true or false.")
  train_subset = int_field(cfg.train_subset, "train_subset")
  downsample = int_field(cfg.downsample, "downsample")
  context = int_field(cfg.context_length, "context_length")
  data_dir = store.resolve_data_dir(cfg.data_dir)
  from jrecipe import storage
  if storage.is_remote(data_dir):  # one request per bucket and process
    storage.check_bucket(data_dir, f"data.data_dir={data_dir}")
  return (name, data_dir, bool(cfg.normalize), train_subset, downsample if downsample > 1 else 0,
          context)


def _stored_splits(name: str, data_dir: str, context: int = 0) -> tuple[dict, dict]:
  """(meta, read-only splits as stored), read once per process (call with _LOCK held)."""
  if context and name not in TEXT_DATASETS:
    raise UserError(f"data.context_length={context} applies to the text datasets "
                    f"({', '.join(TEXT_DATASETS)}), but {name!r} is not one: set it to 0.")
  if (name, data_dir, context) not in _SPLITS_CACHE:
    from jrecipe.data.user import is_user_data, read_user
    if name.startswith(TFDS_PREFIX):
      meta, stored = read_tfds(name[len(TFDS_PREFIX):], data_dir)
    elif is_user_data(name):
      meta, stored = read_user(name, data_dir)
    else:
      meta, stored = read_builtin(name, data_dir, context)
    stored = {s: {k: _readonly(a) for k, a in d.items()} for s, d in stored.items()}
    _SPLITS_CACHE[(name, data_dir, context)] = (meta, stored)
  return _SPLITS_CACHE[(name, data_dir, context)]
