"""Checkpoints through orbax: the latest for resuming, plus the best K by validation loss.

A run that finds a checkpoint in its work directory resumes from it (data position
included: batches are a function of the step). A damaged latest checkpoint gives a warning
and a fall-back to the previous good one, never a crash and never a silent fresh start.
A checkpoint that cannot be written (full disk, quota, read-only or failing storage) stops
the run with a RunFailure (exit 1) that says the earlier checkpoints are intact: orbax
writes into a temporary directory and renames it only once complete, and deletes old
checkpoints only after a new one is committed, so a failed write never damages them.
"""

import contextlib
import errno
import logging
import os
import re
from typing import Any, Optional

import jax
import numpy as np

from jrecipe.errors import RunFailure

log = logging.getLogger("jrecipe")


# What a storage failure looks like once orbax and tensorstore have wrapped it: tensorstore
# reports an OS error as ValueError("... [os_error_code='28']"), orbax re-raises the background
# thread's exception at the next save or at wait_until_finished.
_STORAGE_TEXT = re.compile(
    r"os_error_code|No space left|File too large|Disk quota|Read-only file system|"
    r"Input/output error|Permission denied|ENOSPC|EFBIG|EDQUOT|EROFS")


_TMP_DIR = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")  # orbax's name for an unfinished step


def is_storage_error(e: BaseException) -> bool:
  """Whether `e` (or an exception it chains) is the storage refusing a write."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) or _STORAGE_TEXT.search(str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


class _StorageErrorNoise(logging.Filter):
  """Shortens the library reports of a storage failure that jrecipe reports itself.

  Why: one failed asynchronous write makes orbax log the same tensorstore error with a full
  traceback from four threads, and asyncio log it again ('Task exception was never
  retrieved') at interpreter exit, after jrecipe's own one-paragraph RunFailure. The orbax
  records keep their one line; the exit-time asyncio repeats are dropped. Records about
  anything but a storage error pass untouched.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None or not is_storage_error(exc):
      return True
    if record.name == "asyncio":
      return False
    record.exc_info, record.exc_text = None, None
    return True


_NOISE_FILTER = _StorageErrorNoise()


def _quiet_storage_error_tracebacks() -> None:
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if _NOISE_FILTER not in logger.filters:
      logger.addFilter(_NOISE_FILTER)


def storage_cause(e: BaseException) -> str:
  """'File too large (EFBIG); orbax reported: <its first line, shortened>' for the message."""
  cause = None
  detail = ""
  seen = set()
  while e is not None and id(e) not in seen and cause is None:
    seen.add(id(e))
    text = str(e).strip()
    code = e.errno if isinstance(e, OSError) else None
    m = re.search(r"os_error_code='?(\d+)", text)
    if code is None and m:
      code = int(m.group(1))
    if code:
      cause = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    first = (text.splitlines() or [type(e).__name__])[0]
    if isinstance(e, OSError) and e.strerror:  # '[Errno 28] ...' would repeat the cause
      first = f"writing {e.filename}" if e.filename else ""
    detail = detail or re.sub(r"\s*\[(tensorstore_spec|os_error_code)=.*", "", first)
    e = e.__cause__ or e.__context__
  if len(detail) > 240:
    detail = detail[:240].rstrip() + " (...)"
  if cause is None:
    return detail
  return cause if detail in ("", cause) else f"{cause}; orbax reported: {detail}"


def _ocp():
  """orbax.checkpoint, imported at the first real checkpoint work, not at start-up.

  Why: the import costs about 0.25 s, and a fresh run needs orbax only at its first save.
  """
  import orbax.checkpoint as ocp
  return ocp


def _val_metric(metrics: dict) -> float:
  return float(metrics.get("val_loss", np.inf))


class Checkpointer:
  """Saves (state, meta) pairs under `workdir/checkpoints/<step>/`.

  Args:
    workdir: the run's work directory.
    keep_best: how many of the best checkpoints (lowest validation loss) to keep beside
      the latest one. The validation loss is stored with each checkpoint (orbax metrics),
      and `list_checkpoints` shows it.
  """

  def __init__(self, workdir: str, keep_best: int = 2, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.keep_best = keep_best
    self.read_only = read_only
    self._manager = None
    _quiet_storage_error_tracebacks()

  @property
  def manager(self):
    """The orbax CheckpointManager, created at first use (see `_ocp`)."""
    if self._manager is None:
      ocp = _ocp()
      from orbax.checkpoint import checkpoint_managers as cm
      policy = cm.AnyPreservationPolicy([
          cm.LatestN(n=1),
          cm.BestN(get_metric_fn=_val_metric, reverse=True, n=max(self.keep_best, 0)),
      ])
      options = ocp.CheckpointManagerOptions(
          best_fn=_val_metric, best_mode="min", preservation_policy=policy,
          create=not self.read_only, read_only=self.read_only,
          enable_async_checkpointing=True, cleanup_tmp_directories=not self.read_only)
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=("state", "meta"))
    return self._manager

  def save(self, step: int, state: Any, meta: dict, val_loss: Optional[float] = None) -> None:
    """Saves a host copy of `state` and the JSON `meta` at `step` (asynchronously).

    Raises:
      RunFailure: this write, or the previous asynchronous one (orbax reports it here),
        failed in the storage.
    """
    metrics = {"val_loss": float(val_loss)} if val_loss is not None and np.isfinite(
        val_loss) else None
    ocp = _ocp()
    with self._storage_guard(f"the checkpoint of step {step} (or the one before it, still "
                             "being written in the background)"):
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                        metrics=metrics, force=True)

  def committed_steps(self) -> list[int]:
    """Steps whose checkpoint is complete on disk (orbax's finished, renamed directories)."""
    return sorted(int(n) for n in self._names() if n.isdigit())

  def unfinished_steps(self) -> list[int]:
    """Steps whose checkpoint is still (or forever, after a failure) a temporary directory."""
    return sorted({int(m.group(1)) for m in map(_TMP_DIR.match, self._names()) if m})

  def _names(self) -> list[str]:
    try:
      return os.listdir(self.directory)
    except OSError:
      return []

  @contextlib.contextmanager
  def _storage_guard(self, what: str):
    """Turns a storage failure while writing `what` into a RunFailure saying what is safe."""
    try:
      yield
    except RunFailure:
      raise
    except Exception as e:  # noqa: BLE001 - filtered by is_storage_error; others re-raised
      if not is_storage_error(e):
        raise
      kept = self.committed_steps()
      safe = (f"The previous checkpoints are untouched (complete: steps "
              f"{', '.join(map(str, kept))}; a rerun resumes from step {kept[-1]})" if kept
              else "No earlier checkpoint exists, so a rerun starts from the beginning")
      self._abandon()
      failed = [s for s in self.unfinished_steps() if not kept or s > kept[-1]]
      if failed:  # the background write that failed left its temporary directory behind
        what = f"the checkpoint of step {', '.join(map(str, failed))}"
      raise RunFailure(
          f"Could not write {what} under {self.directory}: {storage_cause(e)}. {safe}. Free "
          "disk space (or fix the storage) and rerun the same command to resume.") from e

  def _abandon(self) -> None:
    """Lets orbax's background writers finish failing before the RunFailure is reported.

    Why: after one failed write the others still in flight fail too and print tracebacks
    from their threads; closing the manager joins them, so jrecipe's message comes last
    instead of in the middle of that output. The manager is unusable afterwards.
    """
    if self._manager is None:
      return
    try:
      self._manager.close()
    except Exception:  # noqa: BLE001 - it re-raises the failure being reported
      pass

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, target: Any, step: Optional[int] = None):
    """Restores (state, meta) at `step` or the newest readable step; None if there is none.

    A checkpoint that fails to restore is reported and skipped in favour of the one
    before it. If checkpoints exist but none can be read, raises RunFailure rather than
    starting over silently.
    """
    if step is None and not self.committed_steps():
      return None  # a fresh run: nothing to read, and no need for orbax yet
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    ocp = _ocp()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    errors = []
    for s in steps:
      try:
        out = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        if errors:
          log.warning("Resuming from checkpoint %d instead (the newer ones could not be read).",
                      s)
        return out["state"], dict(out["meta"]), s
      except Exception as e:  # noqa: BLE001 - any damage to a checkpoint lands here
        log.warning("Checkpoint at step %d is incomplete or corrupt and is skipped: %s", s,
                    str(e).splitlines()[0][:300])
        errors.append((s, e))
    raise RunFailure(
        f"None of the {len(steps)} checkpoints in {self.directory} could be read "
        f"(steps {steps}). Refusing to start from scratch silently: move the directory away "
        "to start a fresh run, or restore a backup.")

  def best_step(self) -> Optional[int]:
    return self.manager.best_step()

  def list_checkpoints(self) -> list[dict]:
    """[{'step': s, 'val_loss': v}] for every kept checkpoint (val_loss None if unknown)."""
    out = []
    for info in self.manager._checkpoints:  # noqa: SLF001 - orbax keeps metrics here
      m = info.metrics or {}
      out.append({"step": int(info.step), "val_loss": m.get("val_loss")})
    return out

  def wait(self) -> None:
    """Blocks until the asynchronous save is on disk; RunFailure if the storage refused it."""
    if self._manager is None:
      return
    with self._storage_guard("the latest checkpoint (written in the background)"):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes the pending save and closes; RunFailure if the storage refused it."""
    if self._manager is None:
      return
    with self._storage_guard("the latest checkpoint (written in the background)"):
      self._manager.wait_until_finished()
      self._manager.close()
