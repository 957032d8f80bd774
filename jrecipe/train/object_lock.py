"""The work directory's lock on an object store (a `gs://` work directory), where flock is not.

Recipe stage 2 ('resume exactly'): one process per run. The lock is the object
`WORKDIR/jrecipe.lock`, created only if absent (`storage.create_exclusive`: GCS's
`ifGenerationMatch=0`, so of two processes racing exactly one creates it). It records its
holder's host, pid, start time and a heartbeat, which a thread renews every `HEARTBEAT_S`.

flock dies with its process; an object does not. A lock left by a process that died (a
SIGKILL, a preempted VM) is taken over when it is stale:
- its holder ran on this host and that pid no longer runs (the kill-and-resume case), or
- its heartbeat is older than `STALE_S` (a holder on another host that stopped beating).
Otherwise the second process exits 2 naming the holder, as with a local work directory.
"""

import contextlib
import json
import os
import socket
import threading
import time
from typing import Optional

from jrecipe import storage
from jrecipe.errors import UserError

HEARTBEAT_S = float(os.environ.get("JRECIPE_LOCK_HEARTBEAT", 30))
STALE_S = float(os.environ.get("JRECIPE_LOCK_STALE", 120))


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read(path: str) -> Optional[dict]:
  try:
    with storage.open(path) as f:
      h = json.load(f)
    return h if isinstance(h, dict) else None
  except (OSError, ValueError):
    return None


def stale_reason(holder: Optional[dict], now: float) -> Optional[str]:
  """Why the lock `holder` wrote may be taken over, or None while it may still be held.

  An unreadable lock (a holder killed between creating and writing it: not possible with one
  upload, but a damaged object) is stale only once it is old enough, like a silent holder.
  """
  if holder is None:
    return None
  try:
    host, pid, beat = holder["host"], int(holder["pid"]), float(holder["beat"])
  except (KeyError, TypeError, ValueError):
    return None
  if host == socket.gethostname() and not _pid_alive(pid):
    return f"its holder, pid {pid} on this host, no longer runs"
  if now - beat > STALE_S:
    return (f"its holder (pid {pid} on host {host}) last renewed it {now - beat:.0f} s ago, "
            f"more than {STALE_S:.0f} s")
  return None


def _holder_text(h: Optional[dict], now: float) -> str:
  if h is None:
    return "a process whose lock object cannot be read"
  try:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(h["since"])))
    return (f"pid {h['pid']} on host {h['host']}, since {since} "
            f"({now - float(h['since']):.0f} s ago; last heartbeat "
            f"{now - float(h['beat']):.0f} s ago)")
  except (KeyError, TypeError, ValueError):
    return "a process that wrote an unreadable lock object"


class ObjectLock:
  """Exclusive lock on a work directory on an object store; see the module docstring."""

  def __init__(self, workdir: str, lock_file: str):
    self.workdir = workdir
    self.path = storage.join(workdir, lock_file)
    self._info: Optional[dict] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def _body(self) -> bytes:
    self._info["beat"] = time.time()
    return (json.dumps(self._info) + "\n").encode()

  def acquire(self) -> "ObjectLock":
    """Takes the lock or raises UserError naming the holder."""
    now = time.time()
    self._info = {"host": socket.gethostname(), "pid": os.getpid(), "since": now}
    for _ in range(3):
      if storage.create_exclusive(self.path, self._body()):
        break
      holder = _read(self.path)
      why = stale_reason(holder, time.time())
      if why is None:
        raise UserError(
            f"The work directory {self.workdir} is in use by another jrecipe process: "
            f"{_holder_text(holder, time.time())} (lock object {self.path}). Two processes "
            "in one run would mix their checkpoints and metrics. Wait for it to finish, stop "
            "it (a SIGTERM saves a checkpoint and exits 75), or use another --workdir; a "
            f"holder that died is taken over once its heartbeat is {STALE_S:.0f} s old.")
      import logging
      logging.getLogger("jrecipe").warning("Taking over the lock of %s: %s.", self.workdir, why)
      with contextlib.suppress(FileNotFoundError):
        storage.remove(self.path)
    else:
      raise UserError(f"Could not take the lock {self.path}: other processes kept taking it "
                      "over. Run one jrecipe process per --workdir.")
    self._thread = threading.Thread(target=self._beat, name="jrecipe-lock", daemon=True)
    self._thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      with contextlib.suppress(Exception):  # a missed beat only makes the lock look older
        storage.write_bytes(self.path, self._body())

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock object."""
    if self._info is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=HEARTBEAT_S + 5)
    with contextlib.suppress(OSError):
      storage.remove(self.path)
    self._info = None
