"""Files wherever a run keeps them: a local path, or a `gs://bucket/path` URL (Cloud TPU VMs).

Every file of a work directory that `--mode=train`, `validate` and `report` read or write goes
through these functions: config.json, the lock, metrics.jsonl, TensorBoard (tensorboardX's own
GCS writer), the monitor's files, summary.json, diagnoses and the report, and the checkpoints'
manifests (orbax writes the checkpoints themselves, through etils.epath and tensorstore's GCS
driver). A local path takes the `os` call it always did, unchanged; a URL goes to the
ecosystem's fsspec layer (gcsfs, the filesystem etils.epath uses for gs:// without
TensorFlow), never hand-written HTTP.

What an object store changes, and how each is kept:
- no rename: `replace` copies then deletes; a GCS object appears whole or not at all, so a
  reader still never sees half a file;
- no append: `open(path, 'a')` returns a file that rewrites the whole object at each flush
  (what tensorboardX's GCS writer does for its event files); a kill loses at most the lines
  written since the last flush, and metrics are flushed line by line;
- no flock: the work directory's lock is an object created only if absent (GCS's
  `ifGenerationMatch=0`, `create_exclusive`), with a heartbeat (`jrecipe.train.workdir`).

A gs:// data_dir (TFDS's prepared datasets) goes through the same layer: a dataset is prepared
locally and uploaded with its dataset_info.json last (`jrecipe.data.builders`); ArrayRecord's
own reader reads single records from the bucket; a whole read (the memory pipeline) and the
stream's sequential passes download the files to the local mirror (`local_mirror`) first, since
one request per record is what makes an object store slow.

The emulator for tests (`tests/gcs_server.py`) and for trying it offline: set
`STORAGE_EMULATOR_HOST`, `FSSPEC_GCS_TOKEN=anon`, `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`,
`TENSORSTORE_GCS_HTTP_URL` and `CLOUD_STORAGE_EMULATOR_ENDPOINT` (ArrayRecord's reader of a
gs:// data_dir) (docs/cloud.md).
"""

import builtins
import io
import os
import shutil
from typing import Iterator

from jrecipe.errors import UserError

SCHEMES = ("gs",)


def _no_listing_cache() -> None:
  """Turns off gcsfs's directory-listing cache, for jrecipe's calls and orbax's (etils.epath
  shares the one fsspec instance). Other writers change a work directory behind its back
  (tensorstore writes the checkpoints' arrays, another process resumes or reports), and a
  cached listing then names steps that are gone or misses ones that are new."""
  try:
    import fsspec.config
  except ImportError:
    return
  fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False


_no_listing_cache()


def is_remote(path) -> bool:
  """Whether `path` is a URL (`gs://...`) rather than a local path."""
  return "://" in str(path)


def scheme_problem(path) -> str | None:
  """Why jrecipe cannot use `path` as a location (an unknown scheme), or None."""
  text = str(path)
  if not is_remote(text):
    return None
  scheme, _, rest = text.partition("://")
  if scheme not in SCHEMES:
    return (f"{text!r} is a {scheme}:// URL; jrecipe reads and writes local paths and gs:// "
            "(Google Cloud Storage) URLs only. Use a local or mounted directory, or a "
            "gs://bucket/path URL.")
  if not rest.split("/")[0]:
    return f"{text!r} names no bucket: write gs://BUCKET/PATH."
  return None


def _fs(path):
  """The fsspec filesystem of a URL (gcsfs for gs://); UserError when it is not installed."""
  problem = scheme_problem(path)
  if problem:
    raise UserError(problem)
  try:
    import fsspec
    return fsspec.filesystem("gcs", finalize_on_close=True)
  except ImportError as e:
    raise UserError(
        f"{path} is on Google Cloud Storage, which needs gcsfs and google-cloud-storage "
        f"({e}). Install them with `pip install -c constraints.txt -e \".[gcs]\"` (the `tpu` "
        "extra includes them), or use a local or mounted directory.") from None


def _key(path) -> str:
  """gcsfs's name of a URL: 'bucket/path' without the scheme or a trailing slash."""
  return str(path).partition("://")[2].rstrip("/")


def key(path) -> str:
  """A name that is the same for every spelling of one location (a dict key): the real
  path of a local path, the URL without a trailing slash of a remote one."""
  return "gs://" + _key(path) if is_remote(path) else os.path.realpath(path)


def absolute(path) -> str:
  """An absolute local path, or the URL as given (URLs are absolute)."""
  return str(path).rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(base, *parts) -> str:
  return os.path.join(str(base), *parts)


def exists(path) -> bool:
  return _fs(path).exists(_key(path)) if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
  return _fs(path).isdir(_key(path)) if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
  return _fs(path).isfile(_key(path)) if is_remote(path) else os.path.isfile(path)


def getsize(path) -> int:
  """The size in bytes; FileNotFoundError when missing (like os.path.getsize)."""
  if not is_remote(path):
    return os.path.getsize(path)
  try:
    return int(_fs(path).info(_key(path))["size"])
  except FileNotFoundError:
    raise FileNotFoundError(2, "No such file", str(path)) from None


def listdir(path) -> list[str]:
  """Names in a directory; FileNotFoundError when there is none (an empty prefix)."""
  if not is_remote(path):
    return os.listdir(path)
  fs = _fs(path)
  try:
    entries = fs.ls(_key(path), detail=False)
  except FileNotFoundError:
    raise FileNotFoundError(2, "No such directory", str(path)) from None
  here = _key(path)
  return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != here]


def walk_files(root) -> Iterator[str]:
  """Paths of every file under `root`, relative to it, in no particular order."""
  if not is_remote(root):
    for d, _, files in os.walk(root):
      for name in files:
        yield os.path.relpath(os.path.join(d, name), root)
    return
  fs, base = _fs(root), _key(root)
  for name in fs.find(base):
    if name.startswith(base + "/"):
      yield name[len(base) + 1:]


def makedirs(path, exist_ok: bool = True) -> None:
  """Creates a directory and its parents; on an object store there are no directories."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=exist_ok)


def remove(path) -> None:
  if not is_remote(path):
    os.remove(path)
    return
  try:
    _fs(path).rm_file(_key(path))
  except FileNotFoundError:
    raise FileNotFoundError(2, "No such file", str(path)) from None


def rmtree(path) -> None:
  """Removes a directory tree, ignoring what is already gone."""
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  fs = _fs(path)
  files = fs.find(_key(path))
  if files:
    fs.rm(files)


def rmdir(path) -> None:
  """Removes an empty directory (OSError if not empty); nothing to do on an object store."""
  if not is_remote(path):
    os.rmdir(path)


def _copy_delete(fs, src: str, dst: str) -> None:
  """GCS's rename of one object: a server-side copy, then the delete of the source."""
  fs.cp_file(src, dst)
  fs.rm_file(src)


def replace(src, dst) -> None:
  """Moves a file over another: os.replace locally (atomic); a copy then a delete on GCS."""
  if not is_remote(dst):
    os.replace(src, dst)
    return
  _copy_delete(_fs(dst), _key(src), _key(dst))


def move_tree(src, dst) -> None:
  """Moves a directory: os.rename locally (atomic); file by file on an object store."""
  if not is_remote(dst):
    os.rename(src, dst)
    return
  fs, base = _fs(dst), _key(src)
  for rel in list(walk_files(src)):
    _copy_delete(fs, f"{base}/{rel}", f"{_key(dst)}/{rel}")


class _RewriteOnFlush(io.TextIOBase):
  """A text file opened for appending on an object store, which cannot append: it keeps the
  object's text and uploads all of it at each flush (after each line, like `buffering=1`)."""

  def __init__(self, path: str, line_buffered: bool):
    self._path, self._lines = path, line_buffered
    self._text = io.StringIO()
    if exists(path):
      with open(path) as f:
        self._text.write(f.read())
    self._dirty = False

  def write(self, s: str) -> int:
    self._text.write(s)
    self._dirty = True
    if self._lines and "\n" in s:
      self.flush()
    return len(s)

  def flush(self) -> None:
    if self._dirty:
      _fs(self._path).pipe_file(_key(self._path), self._text.getvalue().encode())
      self._dirty = False

  def close(self) -> None:
    if not self.closed:
      self.flush()
    super().close()


def open(path, mode: str = "r", buffering: int = -1, **kwargs):  # noqa: A001 - like builtins
  """builtins.open for a local path; the object store's file for a URL ('a' rewrites on
  flush, see `_RewriteOnFlush`)."""
  if not is_remote(path):
    return builtins.open(path, mode, buffering, **kwargs)
  if "a" in mode:
    if "b" in mode:
      raise ValueError("binary append is not supported on an object store")
    return _RewriteOnFlush(str(path), line_buffered=buffering == 1)
  return _fs(path).open(_key(path), mode.replace("t", "") if "b" in mode else mode, **kwargs)


def write_bytes(path, data: bytes) -> None:
  """Writes a whole file (one upload on GCS: the object appears complete or not at all)."""
  if not is_remote(path):
    with builtins.open(path, "wb") as f:
      f.write(data)
    return
  _fs(path).pipe_file(_key(path), data)


def create_exclusive(path, data: bytes) -> bool:
  """Creates `path` holding `data` only if it does not exist; False when it does.

  Locally O_CREAT|O_EXCL; on GCS one upload with `ifGenerationMatch=0`, which the server
  refuses (412) when the object exists: two processes racing, one wins.
  """
  if not is_remote(path):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    return True
  try:
    _fs(path).pipe_file(_key(path), data, mode="create")
  except FileExistsError:
    return False
  return True


def glob(directory, pattern: str) -> list[str]:
  """Sorted paths of the files in `directory` whose names match `pattern` ('*.png'); [] when
  there is no such directory (glob.glob of one directory level)."""
  import fnmatch
  try:
    names = listdir(directory)
  except (FileNotFoundError, NotADirectoryError):
    return []
  return sorted(join(directory, n) for n in names if fnmatch.fnmatch(n, pattern))


def check_bucket(url, what: str) -> None:
  """`url`'s scheme is known, gcsfs is installed and its bucket exists (read only); else a
  UserError that starts with `what` ('--workdir=gs://b/run'). A bucket found once is not
  asked for again in this process (start-up checks the work directory, then locks it)."""
  problem = scheme_problem(url)
  if problem:
    raise UserError(f"{what}: {problem}")
  bucket = "gs://" + _key(url).split("/")[0]
  if bucket in _BUCKETS_FOUND:
    return
  try:
    found = exists(bucket)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - credentials, network: said in one paragraph
    raise UserError(f"Cannot reach the bucket of {what}: "
                    f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}. Check the "
                    "machine's credentials (`gcloud auth application-default login`, or the "
                    "VM's service account) and the bucket's name.") from None
  if not found:
    raise UserError(f"{what} is in the bucket {bucket}, which does not exist (or this "
                    "machine's credentials cannot see it). Create it (`gcloud storage buckets "
                    "create`) or give another location.")
  _BUCKETS_FOUND.add(bucket)


_BUCKETS_FOUND: set = set()


def entries(root) -> list[tuple[str, int, int | str]]:
  """(name, size, version) of each file directly in `root`, by name; [] when there is none.
  The version changes whenever the file is rewritten: its modification time in ns locally,
  the object's generation on GCS."""
  if not is_remote(root):
    if not os.path.isdir(root):
      return []
    return sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                  for e in os.scandir(root) if e.is_file())
  try:
    infos = _fs(root).ls(_key(root), detail=True)
  except FileNotFoundError:
    return []
  return sorted((i["name"].rstrip("/").rsplit("/", 1)[-1], int(i.get("size") or 0),
                 str(i.get("generation") or i.get("updated") or ""))
                for i in infos if i.get("type") == "file")


def tree_size(root) -> int:
  """The bytes of every file under `root` (0 when there is none)."""
  if not is_remote(root):
    return sum(os.path.getsize(os.path.join(root, rel)) for rel in walk_files(root))
  try:
    return int(sum(_fs(root).du(_key(root), total=False).values()))
  except FileNotFoundError:
    return 0


def local_mirror(url) -> str:
  """A local directory kept for a URL, for copies that must be local files (read caches,
  memory maps, a staging area): `$JRECIPE_CACHE_DIR/gcs/BUCKET/PATH`
  (~/.cache/jrecipe by default)."""
  cache = os.path.expanduser(os.environ.get("JRECIPE_CACHE_DIR", "~/.cache/jrecipe"))
  return os.path.join(cache, "gcs", *_key(url).split("/"))


def upload_file(local_path: str, dest) -> None:
  """Uploads one local file to `dest` (a URL) without reading it into memory (one object:
  it appears whole or not at all)."""
  _fs(dest).put_file(local_path, _key(dest))


def download_file(src, local_path: str) -> None:
  """Copies one file (a URL) to `local_path`, streamed in one request."""
  _fs(src).get_file(_key(src), local_path)


def download_tree(src, local_dir: str) -> None:
  """Copies every file under `src` (a URL) into `local_dir`, streamed (one request a file)."""
  fs, base = _fs(src), _key(src)
  for rel in list(walk_files(src)):
    target = os.path.join(local_dir, *rel.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fs.get_file(f"{base}/{rel}", target)


def upload_tree(local_dir: str, dest, last: tuple = ()) -> None:
  """Copies a local directory's files under `dest` (a URL), each streamed as one object, the
  files named in `last` after all the others (a marker that says the rest is complete); then
  removes the local copy."""
  for rel in sorted(walk_files(local_dir), key=lambda rel: rel in last):
    upload_file(os.path.join(local_dir, rel), join(dest, rel))
  shutil.rmtree(local_dir, ignore_errors=True)
