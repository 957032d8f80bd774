"""A multi-host process whose coordinator died: one jrecipe line and exit 1, not JAX's abort.

Process 0 hosts JAX's coordination service. When it dies, JAX's client in every other process
notices within about 0.1 s and aborts the process from a C++ thread: SIGABRT, a
"Terminating process because the JAX distributed service detected fatal errors" line and a
thread dump, no word from jrecipe. Nothing in the process can intercept that: the client's
`missed_heartbeat_callback` cannot be a Python function on this jaxlib (the absl::Status it
passes has no Python type, and the call ends in std::bad_cast and the same abort).

So a distributed run (`parallel.distributed=True`) runs its training in a child process (the
same command line, `$JRECIPE_SUPERVISED=1`), and this small parent, which never imports JAX:

- forwards SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to the child (preemption notices keep
  their meaning, exit 75 included) and passes the child's exit status through;
- copies the child's stderr through as it comes, until JAX's abort text begins; that text is
  kept in a file named in the message instead of flooding the log;
- when the child aborted (SIGABRT), prints one jrecipe line naming the lost process: process 0
  if its coordination service no longer accepts connections, else the coordination error.

The child dies with the parent (Linux `PR_SET_PDEATHSIG`), so killing the launcher, as a
scheduler or a test does, still kills the training, and its peers see it go.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Optional

ENV_SUPERVISED = "JRECIPE_SUPERVISED"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# Where JAX's abort text starts (absl's fatal log line, or Python's fault handler).
ABORT_MARKERS = (b"Terminating process because the JAX distributed service",
                 b"Fatal Python error: Aborted", b"terminate called after throwing")


def supervised() -> bool:
  """Whether this process is the supervised child (or must not supervise)."""
  return os.environ.get(ENV_SUPERVISED) == "1"


def die_with_parent() -> None:
  """In the child: the kernel kills it when the parent (the supervisor) dies (Linux only)."""
  parent = os.getppid()
  try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() != parent:  # the parent died before prctl: nobody would stop this child
    os._exit(1)


def _coordinator() -> Optional[tuple[str, int]]:
  from jrecipe import runtime
  address = (os.environ.get(runtime.ENV_COORDINATOR) or
             os.environ.get("JAX_COORDINATOR_ADDRESS") or "").strip()
  host, sep, port = address.rpartition(":")
  if not sep or not port.isdigit():
    return None
  return host.strip("[]") or "127.0.0.1", int(port)


def _answers(address: tuple[str, int]) -> bool:
  try:
    with socket.create_connection(address, timeout=2.0):
      return True
  except OSError:
    return False


def abort_message(process: Optional[str], processes: Optional[str], kept: Optional[str]) -> str:
  """The one paragraph for a child that JAX's coordination client aborted."""
  from jrecipe.train import peers
  address = _coordinator()
  where = f" (JAX's abort text: {kept})" if kept else ""
  resume = ("The checkpoints up to the last committed step are intact: relaunch every process "
            "with the same command to resume.")
  if process not in (None, "0") and address is not None and not _answers(address):
    return peers.lost_message(
        0, int(processes) if processes and processes.isdigit() else 2,
        f"its coordination service at {address[0]}:{address[1]} no longer accepts "
        f"connections, and JAX's client aborted this process's training{where}",
        peers.peer_timeout())
  return ("JAX's coordination service reported a fatal error and aborted this process's "
          f"training (SIGABRT){where}: another process of the job most likely died or lost the "
          f"network (see its log). This process stops too (exit 1). {resume}")


def _copy_until_abort(pipe, out, keep_path: str) -> bool:
  """Copies the child's stderr to `out` as it comes; from JAX's abort text on, into
  `keep_path` instead. Returns whether abort text was seen."""
  held, keep = b"", None
  while True:
    chunk = os.read(pipe, 65536)
    if not chunk:
      break
    if keep is not None:
      keep.write(chunk)
      continue
    data = held + chunk
    hits = [data.find(m) for m in ABORT_MARKERS if m in data]
    if hits:
      cut = min(hits)
      start = max(data.rfind(b"\n", 0, cut), data.rfind(b"\r", 0, cut)) + 1
      out.write(data[:start])
      out.flush()
      keep = open(keep_path, "wb")
      keep.write(data[start:])
      held = b""
      continue
    # hold back the unfinished line: an abort marker may start in it
    end = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
    if len(data) - end > 4096:
      end = len(data)
    out.write(data[:end])
    out.flush()
    held = data[end:]
  if held:
    out.write(held)
    out.flush()
  if keep is not None:
    keep.close()
  return keep is not None


def supervise() -> int:
  """Runs this command line again as the supervised child; returns the exit status to use."""
  from jrecipe import runtime
  env = dict(os.environ, **{ENV_SUPERVISED: "1"})
  child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env=env, stderr=subprocess.PIPE)

  def forward(signum, _frame):
    if child.poll() is None:
      child.send_signal(signum)

  for s in FORWARDED:
    signal.signal(s, forward)
  process = os.environ.get(runtime.ENV_PROCESS_ID)
  keep_path = os.path.join(tempfile.gettempdir(),
                           f"jrecipe-abort.process{process or 'x'}.{child.pid}.log")
  out = sys.stderr.buffer
  aborted_text = _copy_until_abort(child.stderr.fileno(), out, keep_path)
  code = child.wait()
  if code == -signal.SIGABRT:
    message = abort_message(process, os.environ.get(runtime.ENV_NUM_PROCESSES),
                            keep_path if aborted_text else None)
    sys.stderr.write(f"jrecipe: error: {message}\n")
    sys.stderr.flush()
    return 1
  if aborted_text:  # not JAX's abort after all: the text belongs in the log
    with open(keep_path, "rb") as f:
      out.write(f.read())
    out.flush()
    os.remove(keep_path)
  return 128 - code if code < 0 else code
