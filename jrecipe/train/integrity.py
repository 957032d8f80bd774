"""Checkpoints that are verified: a content manifest per step, damage set aside, safe deletion.

orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, but it
reads back whatever bytes are there: a flipped byte in a data file restores silently with
changed weights, and a kill during its deletion of an old step leaves a directory that looks
complete. jrecipe adds three things around it:

- a manifest (`jrecipe_manifest.json`: SHA-256 and size of every file of the step, and the
  step's validation loss), written by process 0 into the temporary directory once every
  process finished writing the data and before orbax renames it, so a committed step always
  has one; a restore checks it first;
- a step whose files do not match (changed or truncated bytes, a missing item or manifest, a
  half-deleted directory) is moved to `checkpoints/damaged/<step>`, never deleted, so the
  evidence stays and the next good step is used;
- an old step is deleted by renaming it into `checkpoints/.trash/` first, then removing it: a
  kill in between leaves only the trash, which the next run empties.
"""

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Optional

import numpy as np

from jrecipe import storage

log = logging.getLogger("jrecipe")

MANIFEST = "jrecipe_manifest.json"
DAMAGED = "damaged"
TRASH = ".trash"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Written by orbax after the manifest, when it renames the step: a marker, and its step
# metadata, which gains a commit timestamp then. The metadata's restore-relevant part (which
# handler reads which item) is checked instead of its bytes.
_AFTER_MANIFEST = ("commit_success.txt", "_CHECKPOINT_METADATA")
_ORBAX_METADATA = "_CHECKPOINT_METADATA"
_CHUNK = 1 << 20


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with storage.open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def _data_files(step_dir: str) -> list[str]:
  """Relative paths of the step's files that the manifest covers, sorted."""
  return sorted(rel for rel in storage.walk_files(step_dir)
                if not rel.startswith(MANIFEST) and rel not in _AFTER_MANIFEST)


def _item_handlers(step_dir: str):
  """orbax's record of which handler reads which item (None when unreadable)."""
  try:
    with storage.open(os.path.join(step_dir, _ORBAX_METADATA)) as f:
      return json.load(f).get("item_handlers")
  except (OSError, ValueError, AttributeError):
    return None


def write_manifest(step_dir: str, step: int, val_loss: Optional[float]) -> dict:
  """Hashes every file of `step_dir` and writes the manifest into it atomically.

  Recipe stage 2 ('resume exactly'): a checkpoint is only trusted if its bytes are those
  written. Returns the manifest.
  """
  files = {}
  for rel in _data_files(step_dir):
    path = os.path.join(step_dir, rel)
    files[rel] = {"size": storage.getsize(path), "sha256": _sha256(path)}
  manifest = {"format": 1, "step": int(step), "val_loss": val_loss, "files": files,
              "item_handlers": _item_handlers(step_dir)}
  if storage.is_remote(step_dir):  # one upload: the object appears whole or not at all
    storage.write_bytes(os.path.join(step_dir, MANIFEST),
                        json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest
  tmp = os.path.join(step_dir, f"{MANIFEST}.tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))
  return manifest


def read_manifest(step_dir: str) -> Optional[dict]:
  """The step's manifest, or None when it is missing or unreadable."""
  try:
    with storage.open(os.path.join(step_dir, MANIFEST)) as f:
      m = json.load(f)
    return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None
  except (OSError, ValueError):
    return None


def quick_problem(step_dir: str) -> Optional[str]:
  """Why the step is not complete, from its manifest and file sizes only; None if it looks so.

  Cheap (no hashing): used to count a step as committed. A half-deleted step fails it.
  """
  m = read_manifest(step_dir)
  if m is None:
    return f"no readable {MANIFEST} (an unfinished, half-deleted or damaged step)"
  for rel, info in m["files"].items():
    path = os.path.join(step_dir, rel)
    try:
      size = storage.getsize(path)
    except OSError:
      return f"{rel} is missing"
    if size != info.get("size"):
      return f"{rel} has {size} bytes instead of {info.get('size')} (truncated or changed)"
  if _item_handlers(step_dir) != m.get("item_handlers"):
    return f"{_ORBAX_METADATA} is missing or changed"
  if storage.is_remote(step_dir) and not storage.exists(os.path.join(step_dir, _AFTER_MANIFEST[0])):
    return f"{_AFTER_MANIFEST[0]} is missing (killed before orbax committed the step in place)"
  return None


def problem(step_dir: str) -> Optional[str]:
  """Why the step's bytes are not the ones written (sizes, then SHA-256); None when intact."""
  why = quick_problem(step_dir)
  if why:
    return why
  for rel, info in read_manifest(step_dir)["files"].items():
    if _sha256(os.path.join(step_dir, rel)) != info.get("sha256"):
      return f"{rel} does not match its SHA-256 in {MANIFEST} (changed bytes)"
  return None


def val_loss(step_dir: str) -> Optional[float]:
  """The validation loss recorded for the step (None: not evaluated, e.g. a preemption stop)."""
  m = read_manifest(step_dir)
  v = None if m is None else m.get("val_loss")
  return float(v) if isinstance(v, (int, float)) else None


def _unique(path: str) -> str:
  out, n = path, 0
  while storage.exists(out):
    n += 1
    out = f"{path}.{n}"
  return out


def move_aside(directory: str, step: int, why: str) -> str:
  """Moves step `step` to `directory/damaged/<step>` (never deletes it); returns the new path."""
  storage.makedirs(os.path.join(directory, DAMAGED), exist_ok=True)
  dest = _unique(os.path.join(directory, DAMAGED, str(step)))
  storage.move_tree(os.path.join(directory, str(step)), dest)
  log.warning("Checkpoint at step %d is damaged (%s): moved to %s; the newest good checkpoint "
              "is used instead.", step, why, dest)
  return dest


def delete(directory: str, step: int) -> None:
  """Deletes step `step` crash-safely: renamed into `.trash/` (atomic), then removed.

  On an object store (no rename) its manifest goes first, which uncommits the step in one
  delete; what a kill leaves after that is an unfinished step `clean_leftovers` removes.
  """
  if storage.is_remote(directory):
    step_dir = os.path.join(directory, str(step))
    with contextlib.suppress(FileNotFoundError):
      storage.remove(os.path.join(step_dir, MANIFEST))
    storage.rmtree(step_dir)
    return
  os.makedirs(os.path.join(directory, TRASH), exist_ok=True)
  dest = os.path.join(directory, TRASH, f"{step}.{time.time_ns()}")
  os.rename(os.path.join(directory, str(step)), dest)
  shutil.rmtree(dest, ignore_errors=True)
  with contextlib.suppress(OSError):
    os.rmdir(os.path.dirname(dest))  # only when empty


def clean_leftovers(directory: str) -> list[str]:
  """Removes what a killed run left: the trash and unfinished `*.orbax-checkpoint-tmp*` steps
  (on an object store: steps without a manifest, `_unfinished_remote`).

  Only the work directory's lock holder may call this (a live writer owns its tmp dirs).
  Returns the names removed.
  """
  removed = []
  try:
    names = storage.listdir(directory)
  except OSError:
    return removed
  for name in names:
    if name == TRASH or TMP_SUFFIX in name or _unfinished_remote(directory, name):
      storage.rmtree(os.path.join(directory, name))
      removed.append(name)
  return removed


def _unfinished_remote(directory: str, name: str) -> bool:
  """On an object store orbax writes a step in place (no rename): jrecipe's manifest, then
  orbax's `commit_success.txt` and `_CHECKPOINT_METADATA`, come last (the two in either
  order: a kill between them was seen in CI). A step without all three was being written, or deleted
  (the manifest goes first), when the run was killed; left there, the next write of that step
  would meet tensorstore's files of the dead one."""
  if not (storage.is_remote(directory) and name.isdigit()):
    return False
  step_dir = os.path.join(directory, name)
  return not all(storage.exists(os.path.join(step_dir, n)) for n in (MANIFEST, *_AFTER_MANIFEST))


def shape_differences(restored: Any, target: Any, limit: int = 4) -> str:
  """'' when every leaf of `restored` has its `target` leaf's shape; else the first few
  differences ('params/dense_0/kernel is (64, 256) in the checkpoint, (64, 128) here')."""
  import jax
  got = jax.tree_util.tree_flatten_with_path(restored)[0]
  want = jax.tree.leaves(target)
  if len(got) != len(want):
    return f"the checkpoint holds {len(got)} arrays, this config's state {len(want)}"
  bad = [f"{jax.tree_util.keystr(path)} is {tuple(np.shape(g))} in the checkpoint, "
         f"{tuple(w.shape)} in this config's state"
         for (path, g), w in zip(got, want) if tuple(np.shape(g)) != tuple(w.shape)]
  more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
  return "; ".join(bad[:limit]) + more
