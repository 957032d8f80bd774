"""A dead peer of a multi-host job: every survivor exits within a bounded time, naming it.

Without this, a process whose peer died waits in the next collective (gloo on CPU hangs in
its rendezvous) until JAX's coordination service gives up on the peer's heartbeat (100 s by
default) and aborts the survivor with a C++ thread dump and no word about what happened.

`PeerWatchdog` is a daemon thread in each process: it bumps a counter in the coordination
service's key-value store every `period` seconds and watches the other processes' counters.
A peer whose counter has not moved for `timeout` seconds ($JRECIPE_PEER_TIMEOUT, default 20)
is lost: the survivor prints one jrecipe line naming it and exits with status 1 (the last
committed checkpoint is intact; relaunching every process resumes). A process that finished
marks itself done, so a slower peer writing its last files is not alarmed.

When process 0 (which hosts the coordination service) dies, JAX's own client in each
survivor aborts the process within about 0.1 s, before this thread notices; the survivor's
supervisor (`train.supervisor`) turns that abort into the same kind of line (docs/failures.md).
"""

import os
import sys
import threading
import time
from typing import Callable, Optional

ENV_PEER_TIMEOUT = "JRECIPE_PEER_TIMEOUT"
DEFAULT_TIMEOUT = 20.0
_PREFIX = "jrecipe/peers"


def peer_timeout() -> float:
  """Seconds without a heartbeat after which a peer counts as lost ($JRECIPE_PEER_TIMEOUT)."""
  try:
    return max(float(os.environ.get(ENV_PEER_TIMEOUT, DEFAULT_TIMEOUT)), 2.0)
  except ValueError:
    return DEFAULT_TIMEOUT


def lost_message(process: int, num_processes: int, why: str, timeout: float) -> str:
  """The one paragraph a survivor prints."""
  role = " (the coordinator)" if process == 0 else ""
  return (f"lost process {process}{role} of {num_processes}: {why}. It died, hung or lost the "
          "network; this process stops too (exit 1) instead of waiting for it in a "
          "collective. The checkpoints up to the last committed step are intact: relaunch "
          f"every process with the same command to resume. (Peer timeout: {timeout:g} s, "
          f"${ENV_PEER_TIMEOUT}.)")


class PeerWatchdog:
  """Heartbeats through the coordination service's key-value store; see the module docstring.

  Args:
    client: a DistributedRuntimeClient (`key_value_set`, `key_value_try_get`).
    process_id, num_processes: this process and the job's size.
    timeout: seconds without a peer's heartbeat before it counts as lost.
    period: seconds between heartbeats.
    on_lost: `on_lost(message)`; default: print it and `os._exit(1)` (the main thread may be
      blocked in a collective that never returns, and atexit hooks would wait for the peer).
  """

  def __init__(self, client, process_id: int, num_processes: int, *, timeout: float,
               period: float = 1.0, on_lost: Optional[Callable[[str], None]] = None):
    self.client, self.me, self.n = client, int(process_id), int(num_processes)
    self.timeout, self.period = float(timeout), float(period)
    self.on_lost = on_lost or _exit_lost
    self._stop = threading.Event()
    self._beat = 0
    self._thread: Optional[threading.Thread] = None

  def start(self) -> "PeerWatchdog":
    self._thread = threading.Thread(target=self._run, name="jrecipe-peer-watchdog", daemon=True)
    self._thread.start()
    return self

  def finish(self) -> None:
    """Marks this process done (peers stop watching it) and stops the thread."""
    self._stop.set()
    try:
      self.client.key_value_set(f"{_PREFIX}/done/{self.me}", "1", allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the service may already be gone at the very end
      pass

  def _get(self, key: str) -> Optional[str]:
    try:
      return self.client.key_value_try_get(key)
    except Exception as e:  # noqa: BLE001 - NOT_FOUND is a missing key; others re-raised
      if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
        return None
      raise

  def _run(self) -> None:
    last = {p: (None, time.monotonic()) for p in range(self.n) if p != self.me}
    while not self._stop.is_set():
      try:
        self._beat += 1
        self.client.key_value_set(f"{_PREFIX}/beat/{self.me}", str(self._beat),
                                  allow_overwrite=True)
        for p in list(last):
          if self._get(f"{_PREFIX}/done/{p}") is not None:
            del last[p]
            continue
          value, since = last[p]
          now, seen = time.monotonic(), self._get(f"{_PREFIX}/beat/{p}")
          if seen != value:
            last[p] = (seen, now)
          elif now - since > self.timeout:
            self.on_lost(lost_message(p, self.n, f"no heartbeat for {now - since:.0f} s",
                                      self.timeout))
            return
      except Exception as e:  # noqa: BLE001 - the coordination service itself is gone
        if self._stop.is_set():
          return
        self.on_lost(lost_message(0, self.n, "the coordination service it hosts stopped "
                                  f"answering ({str(e).splitlines()[0][:160]})", self.timeout))
        return
      self._stop.wait(self.period)


def _exit_lost(message: str) -> None:
  sys.stderr.write(f"jrecipe: error: {message}\n")
  sys.stderr.flush()
  os._exit(1)


def start_watchdog() -> Optional[PeerWatchdog]:
  """The watchdog of this distributed process, started; None when not distributed."""
  import jax
  from jrecipe import jax_private
  client = jax_private.distributed_client()
  if client is None or jax.process_count() < 2:
    return None
  return PeerWatchdog(client, jax.process_index(), jax.process_count(),
                      timeout=peer_timeout()).start()


def is_peer_error(e: BaseException) -> bool:
  """Whether `e` is a collective failing because a peer process went away."""
  text = str(e)
  return any(s in text for s in ("Gloo", "Connection reset by peer", "Connection closed by peer",
                                 "heartbeat timeout", "Socket closed"))


def explain_peer_error(watchdog: Optional[PeerWatchdog], e: BaseException) -> str:
  """Waits for the watchdog to name the lost peer (it exits the process when it does);
  returns the message without a name if it does not within its timeout."""
  if watchdog is not None:
    time.sleep(watchdog.timeout + 3 * watchdog.period)
  first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
  return (f"a collective failed because a peer process went away ({first}). This process "
          "stops too (exit 1); the checkpoints up to the last committed step are intact: "
          "relaunch every process with the same command to resume.")
