"""Where the built-in datasets live, and a numpy copy of their decoded splits (a read cache).

Imports no TFDS: a warm run finds its data through this module alone.

Why, for a warm start: reading a dataset through TFDS imports tensorflow_datasets and parses
every record on every run; reading the same arrays from one .npz file is tens of times faster
and imports nothing (docs/performance.md). TFDS stays the dataset layer: the
builders write and version the data, the first read goes through TFDS, and the copy it leaves
is only ever used while the TFDS files it was made from are unchanged.

Layout: `<data_dir>/<name>/<version>/` is the TFDS dataset; the copy is
`<data_dir>/.jrecipe_arrays/<name>-<version>.npz`. A data_dir on gs:// (Cloud TPU VMs) keeps
its copies on local disk instead, in `jrecipe.storage.local_mirror(data_dir)`: a copy is a read
cache, and its point is not to read the bucket again. It holds the splits' arrays, the dataset's
meta (task, classes) and a fingerprint of the TFDS directory (every file's name, size and
modification time) and of this format. A copy whose fingerprint differs, or that cannot be
read, is ignored (and replaced after the next TFDS read); it is written to a temporary file
and renamed, so a reader never sees half a file; a data_dir that cannot be written just gets
no copy. `JRECIPE_DATA_SNAPSHOT=0` turns it off.
"""

import json
import logging
import os
import tempfile

import numpy as np

from jrecipe import storage

log = logging.getLogger(__name__)

# The builders' TFDS version (jrecipe/data/builders.py reads it from here, so a version bump
# changes the directory the fingerprint looks at).
BUILDER_VERSION = "1.0.0"
DEFAULT_DATA_DIR = "~/.cache/jrecipe/tfds"
FORMAT = 1
ENV = "JRECIPE_DATA_SNAPSHOT"
DIRNAME = ".jrecipe_arrays"


def default_data_dir() -> str:
  """The data_dir used when a config leaves it empty: $JRECIPE_DATA_DIR or ~/.cache/jrecipe/tfds."""
  return os.path.expanduser(os.environ.get("JRECIPE_DATA_DIR", DEFAULT_DATA_DIR))


def resolve_data_dir(data_dir: str | None) -> str:
  """Absolute data_dir: the given one (with ~ expanded; a gs:// URL as given, without a
  trailing slash), or `default_data_dir()` when empty."""
  if not data_dir:
    data_dir = default_data_dir()
  if storage.is_remote(data_dir):
    return storage.absolute(data_dir)
  return os.path.abspath(os.path.expanduser(data_dir))


def copies_root(data_dir: str) -> str:
  """Where the copies of data_dir's datasets live: data_dir itself, or a local directory for
  a gs:// one (`jrecipe.storage.local_mirror`)."""
  return storage.local_mirror(data_dir) if storage.is_remote(data_dir) else data_dir


def enabled() -> bool:
  return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def path(name: str, data_dir: str) -> str:
  """The copy of `name` ('digits', or a builder config's 'stdlib_bytes/ctx128')."""
  return os.path.join(copies_root(data_dir), DIRNAME, f"{name}-{BUILDER_VERSION}.npz")


def fingerprint(name: str, data_dir: str) -> str | None:
  """The TFDS directory's files (name, size, mtime) and the format, or None if not built."""
  return dir_fingerprint(storage.join(data_dir, name, BUILDER_VERSION))


def dir_fingerprint(root: str) -> str | None:
  """A prepared TFDS directory's files (name, size, and mtime, or the object's generation on
  gs://) and this format; None if it is not prepared (no dataset_info.json)."""
  files = [list(e) for e in storage.entries(root)]
  if "dataset_info.json" not in [f[0] for f in files]:
    return None
  return json.dumps({"format": FORMAT, "version": os.path.basename(root), "files": files})


def load(name: str, data_dir: str) -> tuple[dict, dict] | None:
  """(meta, splits) from the copy, or None when there is none valid for the TFDS files."""
  if not enabled():
    return None
  out = read_npz(path(name, data_dir), fingerprint(name, data_dir))
  if out is not None and "class_names" in out[0]:
    out[0]["class_names"] = tuple(out[0]["class_names"])
  return out


def read_npz(p: str, fp: str | None) -> tuple[dict, dict] | None:
  """(meta, {split: {column: array}}) of a file `write_npz` wrote for fingerprint `fp`, or
  None (no file, another fingerprint, or a damaged file)."""
  if fp is None or not os.path.isfile(p):
    return None
  try:
    with np.load(p, allow_pickle=False) as z:
      if str(z["fingerprint"]) != fp:
        return None
      meta = json.loads(str(z["meta"]))
      splits = {}
      for key in z.files:
        if "/" in key:
          split, col = key.split("/", 1)
          splits.setdefault(split, {})[col] = z[key]
  except Exception as e:  # a damaged or foreign file: read TFDS instead
    log.warning("Ignoring the dataset copy %s (%s); reading TFDS.", p, e)
    return None
  return meta, splits


def save(name: str, data_dir: str, meta: dict, splits: dict) -> None:
  """Writes the copy atomically; any failure (a read-only data_dir, ...) only logs."""
  if enabled():
    write_npz(path(name, data_dir), fingerprint(name, data_dir), meta, splits)


def write_npz(p: str, fp: str | None, meta: dict, splits: dict) -> None:
  """Writes (fingerprint, meta, splits) to `p` atomically; any failure only logs."""
  if fp is None:
    return
  arrays = {f"{split}/{col}": np.asarray(a) for split, cols in splits.items()
            for col, a in cols.items()}
  tmp = None
  try:
    os.makedirs(os.path.dirname(p), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(p), prefix=".copy-", suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
      np.savez(f, fingerprint=np.array(fp), meta=np.array(json.dumps(meta)), **arrays)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from others sharing the data_dir
    os.replace(tmp, p)
    tmp = None
  except OSError as e:
    log.info("No dataset copy written to %s: %s", p, e)
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
