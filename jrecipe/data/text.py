"""A byte-level text corpus every Python installation ships: the standard library's source.

Recipe step served: 'Become one with the data' on real text with no download: the corpus is a
stated, sorted file list, its content hash is in the dataset's metadata, and the splits are
fixed by file name, so every run, seed and Python process sees the same windows.

The corpus (`corpus_files`): every `.py` file under `sysconfig.get_paths()['stdlib']` (the
interpreter's own library directory, not a virtualenv's), sorted by its '/'-separated path
relative to that root, leaving out test code (directories named test, tests or idle_test, and
files named test_*.py) and installed packages (site-packages, dist-packages). On CPython 3.11.7
that is 734 files, 12.1 MB.

Byte-level, vocabulary 256 (`VOCAB`), not character-level: every file is taken as its raw bytes,
so the encoding is lossless and needs no vocabulary built from the corpus (a character
vocabulary would change with the Python version and treat a rare non-ASCII character as a
class of its own); the loss per token is then directly the loss per byte, so bits per byte =
cross-entropy in nats / ln 2, the unit byte-level language models are compared in. The
standard library is almost all ASCII (about 170 distinct byte values occur), so most of the
256 classes never appear: the head bias 'init well' sets from the byte frequencies makes them
unlikely from step 0.

Splits by FILE, never by window: a file belongs to 'train', 'validation' or 'test' by the first
8 bytes of the SHA-256 of its relative path (`split_of`: < 80% train, < 90% validation, the rest
test), so no text of a test file is ever trained on, and a file keeps its split when other files
come or go between Python versions. Each split's files are concatenated in sorted order and cut
into windows of `context_length + 1` bytes with a stride of `context_length` (`windows`):
window k's last byte is window k+1's first, so the model reads x = window[:-1] and predicts
y = window[1:], and every byte of the split after its first is a target exactly once; the tail
shorter than one window is dropped. A window may run across the boundary of two files of the
same split (the model then sees one file end and the next begin, as in any concatenated corpus).

'stdlib_bytes_small' is the same corpus thinned to every 16th file of each split (about 0.8 MB;
`read_corpus(every=16)`): for smoke runs and tests, whose whole-split evaluations would
otherwise read 2 MB of validation and test bytes.
"""

import hashlib
import math
import os
import platform
import sysconfig
from typing import Optional

import numpy as np

from jrecipe.errors import UserError

VOCAB = 256
DEFAULT_CONTEXT = 128
SPLIT_PERCENT = {"train": 80, "validation": 90, "test": 100}  # cumulative upper bounds
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                            "__pycache__"})


def stdlib_root() -> str:
  """The interpreter's standard-library directory (the base install's, also inside a venv)."""
  return sysconfig.get_paths()["stdlib"]


def corpus_files(root: Optional[str] = None) -> list[str]:
  """The corpus: relative '/'-separated paths of the stdlib's non-test .py files, sorted."""
  root = root or stdlib_root()
  if not os.path.isdir(root):
    raise UserError(f"The standard-library directory {root!r} (sysconfig's 'stdlib' path) does "
                    "not exist, so the stdlib_bytes corpus cannot be read. It needs a Python "
                    "installation that ships its library as source files.")
  files = []
  for d, dirs, names in os.walk(root):
    rel = os.path.relpath(d, root)
    parts = [] if rel == "." else rel.split(os.sep)
    dirs[:] = sorted(x for x in dirs if x not in _EXCLUDED_DIRS)
    files += ["/".join(parts + [n]) for n in names
              if n.endswith(".py") and not n.startswith("test_")]
  if not files:
    raise UserError(f"No .py files under the standard-library directory {root!r}: the "
                    "stdlib_bytes corpus needs a Python installation that ships its library as "
                    "source files (not only .pyc or a zip).")
  return sorted(files)


def split_of(path: str) -> str:
  """'train', 'validation' or 'test' for a relative path: a fixed function of the name only."""
  bucket = int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big") % 100
  return next(s for s, upper in SPLIT_PERCENT.items() if bucket < upper)


def split_files(files: list[str]) -> dict[str, list[str]]:
  """split -> its files (sorted), every file in exactly one split."""
  out = {s: [] for s in SPLIT_PERCENT}
  for f in sorted(files):
    out[split_of(f)].append(f)
  return out


def read_corpus(root: Optional[str] = None, every: int = 1) -> dict:
  """The corpus read once: {'root', 'files' (split -> paths), 'bytes' (split -> uint8 stream),
  'sha256' (of every (path, length, content) in sorted order), 'python'}.

  `every` > 1 keeps every `every`-th file of each split's sorted list (the first included), a
  fixed sample with at least one file per split: stdlib_bytes_small's corpus.
  """
  root = root or stdlib_root()
  by_split = {s: fs[::every] for s, fs in split_files(corpus_files(root)).items()}
  digest = hashlib.sha256()
  streams = {s: [] for s in SPLIT_PERCENT}
  for f in sorted(f for fs in by_split.values() for f in fs):
    with open(os.path.join(root, *f.split("/")), "rb") as fh:
      data = fh.read()
    digest.update(f.encode("utf-8") + b"\0" + str(len(data)).encode() + b"\0" + data)
    streams[split_of(f)].append(data)
  return {"root": root, "files": by_split, "sha256": digest.hexdigest(),
          "bytes": {s: np.frombuffer(b"".join(p), np.uint8) for s, p in streams.items()},
          "python": f"{platform.python_implementation()} {platform.python_version()}"}


def check_context(context_length) -> int:
  """`context_length` as an int >= 2 (UserError otherwise)."""
  if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)) \
      or context_length < 2:
    raise UserError(f"data.context_length={context_length!r} is invalid: it is the number of "
                    "bytes a text model reads per window, an integer >= 2 (0 = the dataset's "
                    f"default, {DEFAULT_CONTEXT}).")
  return int(context_length)


def windows(stream: np.ndarray, context_length: int) -> np.ndarray:
  """[N, context_length + 1] uint8 windows of a byte stream, stride `context_length`."""
  n = (len(stream) - 1) // context_length if len(stream) > context_length else 0
  idx = np.arange(n)[:, None] * context_length + np.arange(context_length + 1)[None, :]
  return stream[idx]


def inputs_and_targets(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(x, y) of stored windows [..., context_length + 1]: x = tokens[..., :-1], the bytes the
  model reads, y = tokens[..., 1:], the next byte at each position (one record or a batch)."""
  tokens = np.asarray(tokens)
  return tokens[..., :-1], tokens[..., 1:]


def unigram_bits(train: np.ndarray, other: np.ndarray) -> float:
  """Bits per byte of `other` under the unigram model fit on `train` ('dumb baselines').

  The model predicts every byte from the training bytes' frequencies with add-one smoothing
  (so a byte never seen in training costs log2 of a finite probability): what a model that
  ignores its inputs can reach, and about where the 'init well' head bias starts. On `train`
  itself it is (to within the smoothing) the entropy of the training bytes.
  """
  counts = np.bincount(train, minlength=VOCAB).astype(np.float64)
  q = (counts + 1) / (counts.sum() + VOCAB)
  return float(-np.mean(np.log2(q[other]))) if len(other) else math.nan


def byte_names() -> tuple:
  """Display names of the 256 byte tokens: the character for printable ASCII, tab and newline
  (so decoded windows read as source text), '\\xNN' otherwise."""
  return tuple(chr(b) if 32 <= b < 127 or b in (9, 10) else f"\\x{b:02x}" for b in range(VOCAB))
