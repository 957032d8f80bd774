"""The work directory: one per run, one process at a time; it refuses to mix two configs.

A work directory that holds a run of another config is not resumed into (that would
silently blend two experiments) unless the user says so. A work directory in use by a live
process is refused (`locked`): the second process exits 2 naming the holder.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Optional

import ml_collections

from jrecipe import storage
from jrecipe.errors import UserError
from jrecipe.train.writer import keep_damaged_copy, write_json_atomic

log = logging.getLogger(__name__)

# What may differ between a run's config.json and the config that resumes it
# (docs/failures.md, "Changing the config of a run"). A dotted field matches a rule equal to it
# or to one of its sections. Three kinds:
# - RESUMABLE_CHANGES, no flag needed: raising num_epochs is 'leave it training' (recipe stage
#   6); the rest are logging, placement and the settings of other modes.
# - COMPATIBLE_CHANGES, with --allow_config_change: how the same parameters keep training (the
#   optimizer's hyperparameters, the schedule, regularisation, augmentation, babysitting).
#   The checkpoint must still fit: a change that alters the optimizer state's structure
#   (Adam to SGD, momentum switched on, EMA switched on) is refused by the restore, which
#   compares every leaf's shape, and config.json is rewritten only after a restore succeeded.
# - anything else is incompatible, with the flag or without: it changes what the parameters
#   are or what they were trained on (INCOMPATIBLE_REASONS).
RESUMABLE_CHANGES = ("num_epochs", "progress", "log_every_steps", "checkpoint", "parallel",
                     "eval_batch_size", "early_stopping_patience", "checks", "ensemble",
                     "inspect", "report", "debug_nans")
COMPATIBLE_CHANGES = ("optimizer", "schedule", "momentum_schedule", "l2", "plateau", "monitor",
                      "ema_decay", "data.augment", "init_bias", "init_from",
                      "init_from_allow_partial", "init_from_checkpoint", "init_from_freeze",
                      "init_from_skip", "lr_find", "search", "ablate", "label")
INCOMPATIBLE_REASONS = {
    "model": "the model: its parameters' shapes or what they compute",
    "data": "the dataset the parameters were trained on",
    "loss": "the objective: the losses before and after would not compare",
    "batch_size": "the step counter counts batches of the old size, so every epoch boundary "
                  "and schedule position after it would move",
    "seed": "the run's random streams and the order of every epoch's batches",
}


def _matches(dotted: str, rules) -> bool:
  return any(dotted == r or dotted.startswith(r + ".") for r in rules)


def classify(changed: list[str]) -> dict[str, list[str]]:
  """{'resumable': [...], 'compatible': [...], 'incompatible': [...]} of changed fields."""
  out = {"resumable": [], "compatible": [], "incompatible": []}
  for k in changed:
    kind = ("resumable" if _matches(k, RESUMABLE_CHANGES) else
            "compatible" if _matches(k, COMPATIBLE_CHANGES) else "incompatible")
    out[kind].append(k)
  return out


def config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _diff(a, b, prefix=""):
  out = []
  for k in sorted(set(a) | set(b)):
    key = f"{prefix}{k}"
    if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
      out += _diff(a[k], b[k], key + ".")
    elif a.get(k) != b.get(k):
      out.append(key)
  return out


def _lookup(d: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(d, dict) or part not in d:
      return "(absent)"
    d = d[part]
  return d


def _changes_text(old: dict, new: dict, keys: list[str], limit: int = 8) -> str:
  shown = [f"{k}: {_lookup(old, k)!r} -> {_lookup(new, k)!r}" for k in keys[:limit]]
  more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
  return "; ".join(shown) + more


def _reason(key: str) -> str:
  for rule, why in INCOMPATIBLE_REASONS.items():
    if _matches(key, (rule,)):
      return f"{rule} ({why})"
  return f"{key} (not known to be compatible)"


# storage.key of a work directory -> (config.json path, the config to write once the run's
# checkpoint restored): `prepare` never overwrites config.json before that (`commit_config`).
_PENDING: dict[str, tuple[str, dict]] = {}
PENDING_DIFF: dict[str, str] = {}  # storage.key -> the changes, for a restore that does not fit


_DAMAGED: set = set()  # config.json paths found damaged by `_read_old`


def _set_aside_damaged(path: str) -> None:
  """Keeps a damaged config.json as config.json.damaged, saying what resumes in its place."""
  copy = keep_damaged_copy(path)
  _DAMAGED.discard(path)
  log.warning("%s is damaged (not a JSON object): kept as %s, and replaced by this command's "
              "config once the run's checkpoint restored into it (or at a fresh start). A "
              "checkpoint is resumed only if it fits: its parameter and optimizer-state "
              "shapes, and its dataset, batch size and seed, are checked on restore; other "
              "fields (the optimizer's hyperparameters, the loss) cannot be checked against the "
              "lost file.", path, copy)


def _read_old(path: str) -> Optional[dict]:
  """The run's config.json as a dict; None when there is none, or when it is damaged (not a
  JSON object: it joins `_DAMAGED`, and `prepare` sets it aside before writing a new one)."""
  if not storage.exists(path):
    return None
  with storage.open(path, errors="replace") as f:
    try:
      old = json.load(f)
    except json.JSONDecodeError:
      old = None
  if not isinstance(old, dict):
    _DAMAGED.add(path)
    return None
  # An older config.json lacks fields added since (schema defaults) and may hold removed
  # ones: neither is a change of the experiment.
  from jrecipe.config.base import from_json
  return config_dict(from_json(old))


def prepare(workdir: str, config: ml_collections.ConfigDict, *, allow_config_change: bool,
            primary: bool = True) -> None:
  """Creates `workdir` and writes config.json, refusing a workdir of a different config.

  A work directory whose config.json differs is resumed only when every difference is
  resumable, or compatible and `allow_config_change` (see COMPATIBLE_CHANGES); the new
  config.json is then written by `commit_config`, once the checkpoint restored into the new
  config's state, so a refused resume leaves the old one in place.

  Raises:
    UserError: naming the incompatible differences (old -> new), or the compatible ones
      when `allow_config_change` is False; nothing is written.
  """
  path = os.path.join(workdir, "config.json")
  new = config_dict(config)
  old = _read_old(path)
  key = storage.key(workdir)
  changed = _diff(old, new) if old is not None else []
  kinds = classify(changed)
  head = f"The work directory {workdir} holds a run of a different config (changed: "
  if kinds["incompatible"]:
    raise UserError(
        f"{head}{_changes_text(old, new, kinds['incompatible'])}). These cannot change on "
        f"resume, with --allow_config_change or without: they change "
        f"{'; '.join(dict.fromkeys(map(_reason, kinds['incompatible'])))}. Train this config "
        "in a new --workdir. Changes --allow_config_change accepts: "
        f"{', '.join(COMPATIBLE_CHANGES)}; and without it: {', '.join(RESUMABLE_CHANGES)}.")
  if kinds["compatible"] and not allow_config_change:
    raise UserError(
        f"{head}{_changes_text(old, new, kinds['compatible'])}). Resuming into it would mix "
        "two experiments. Use a new --workdir, or pass --allow_config_change to continue this "
        "run's parameters with the new settings (compatible: "
        f"{', '.join(COMPATIBLE_CHANGES)}). Fields that may change on resume without it: "
        f"{', '.join(RESUMABLE_CHANGES)}.")
  if not primary:
    return
  storage.makedirs(workdir, exist_ok=True)
  if changed:
    _PENDING[key] = (path, new)
    PENDING_DIFF[key] = _changes_text(old, new, changed)
  elif path in _DAMAGED:  # written, like a change, once a checkpoint restored into it
    _set_aside_damaged(path)
    _PENDING[key] = (path, new)
  elif old is None:
    write_json_atomic(path, new)


def commit_config(workdir: str) -> None:
  """Writes the config.json `prepare` held back, now that the run's checkpoint restored."""
  key = storage.key(workdir)
  PENDING_DIFF.pop(key, None)
  pending = _PENDING.pop(key, None)
  if pending is not None:
    write_json_atomic(*pending)


def check_writable(workdir: str) -> None:
  """Raises UserError unless `workdir` is, or can be created as, a directory this process
  writes in (what the lock finds when it creates the directory; checked without writing)."""
  if not str(workdir).strip():
    raise UserError("--workdir is empty: pass the run's directory (it is created if missing).")
  if storage.is_remote(workdir):
    _check_bucket(workdir)
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"--workdir={workdir} exists and is not a directory: pass a directory (it "
                    "is created if missing).")
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise UserError(f"--workdir={workdir} is under {probe}, which is a file, not a directory: "
                    "pass a directory path (it is created if missing).")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise UserError(f"Cannot write in the work directory {workdir}: {probe} is not writable "
                    "by this user. Pass a --workdir you can write to (it is created if "
                    "missing).")


def _check_bucket(workdir: str) -> None:
  """A gs:// work directory: a known scheme, gcsfs installed, the bucket there (no write)."""
  storage.check_bucket(workdir, f"--workdir={workdir}")


# The storage refusing a write: a full disk, a file-size limit, a quota, a read-only or failing
# file system. Anything else an OSError says is a bug or a user error reported elsewhere.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO)


def storage_failure(e: OSError, workdir: str) -> Optional[str]:
  """The one paragraph for a write the storage refused (exit 1), or None for other errors.

  Says which file, why, and what is safe: the committed checkpoints (orbax commits a step
  by renaming it once complete, and JSON files are written to a temporary file first).
  """
  if e.errno not in STORAGE_ERRNOS:
    return None
  from jrecipe.train.checkpoint import Checkpointer
  what = f"writing {e.filename}" if e.filename else "writing the run's files"
  steps = Checkpointer(workdir, read_only=True).committed_steps() if workdir else []
  safe = (f"The checkpoints are intact (complete: steps {', '.join(map(str, steps))}; a rerun "
          f"resumes from step {steps[-1]})" if steps else
          "No checkpoint was written yet, so a rerun starts from the beginning")
  return (f"The storage refused a write: {what} failed with {os.strerror(e.errno)} "
          f"({errno.errorcode.get(e.errno, e.errno)}). {safe}; JSON files are replaced only "
          "when complete, and a torn last line of metrics.jsonl is dropped on resume. Free disk "
          "space (or fix the storage or the file-size limit) and rerun the same command.")


LOCK_FILE = "jrecipe.lock"
_HELD: dict = {}  # storage.key -> the lock this process holds (WorkdirLock or ObjectLock)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def _holder_text(path: str) -> str:
  """'pid 123 on host h, since 2025-01-01 12:00:00 UTC (5 s ago)' from a lock file."""
  try:
    with open(path) as f:
      h = json.load(f)
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(h["since"])))
    text = (f"pid {h['pid']} on host {h['host']}, since {since} "
            f"({time.time() - float(h['since']):.0f} s ago)")
    if h["host"] == socket.gethostname() and not _pid_alive(int(h["pid"])):
      text += (", a process that no longer runs: a process it started (a data or search "
               "worker) still holds the lock")
    return text
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that has not written its name yet"


class WorkdirLock:
  """An exclusive lock on a work directory: `workdir/jrecipe.lock`, held with flock.

  flock is released by the OS when its holder dies (even by SIGKILL), so a dead run never
  blocks the next one; the file records the holder's host, pid and start time for the
  message a second process gets. On several hosts only process 0 takes it (the others
  write nothing but checkpoint shards orbax coordinates). flock on a network file system
  may not exclude processes on different hosts: run one job per work directory there.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: Optional[int] = None
    self._created = False

  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises UserError naming the holder; creates `workdir` if needed."""
    if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
      raise UserError(f"--workdir={self.workdir} exists and is not a directory: pass a "
                      "directory (it is created if missing).")
    self._created = not os.path.exists(self.workdir)
    while True:
      try:
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise UserError(f"Cannot write in the work directory {self.workdir}: "
                        f"{e.strerror or e}. Pass a --workdir you can write to (it is created "
                        "if missing).") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"The work directory {self.workdir} is in use by another jrecipe process: "
            f"{_holder_text(self.path)} (lock file {self.path}). Two processes in one run "
            "would mix their checkpoints and metrics. Wait for it to finish, stop it (a "
            "SIGTERM saves a checkpoint and exits 75), or use another --workdir.") from None
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:  # else the holder we waited for unlinked it on release: lock the new file
        break
      os.close(fd)
    info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (info + "\n").encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    """Removes the lock file and releases the lock (unlink first: see `acquire`).

    A work directory this lock created and nothing else wrote into (input refused) is
    removed too: bad input leaves nothing behind.
    """
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      os.unlink(self.path)
    os.close(self._fd)
    self._fd = None
    if self._created:
      with contextlib.suppress(OSError):
        os.rmdir(self.workdir)  # only when empty


@contextlib.contextmanager
def locked(workdir: str, enabled: bool = True):
  """Holds the work directory's lock for the block (re-entrant within a process).

  Recipe stage 2 ('resume exactly'): one process per run, so a resume never reads a
  checkpoint another live process is writing. `enabled=False` (processes other than 0 of a
  multi-host job, read-only modes) takes nothing.
  """
  key = storage.key(workdir)
  if not enabled or key in _HELD:
    yield
    return
  if storage.is_remote(workdir):
    _check_bucket(workdir)
    from jrecipe.train.object_lock import ObjectLock
    lock = ObjectLock(workdir, LOCK_FILE).acquire()
  else:
    lock = WorkdirLock(workdir).acquire()
  _HELD[key] = lock
  try:
    yield
  finally:
    del _HELD[key]
    lock.release()
