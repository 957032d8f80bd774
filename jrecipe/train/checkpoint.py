"""Checkpoints through orbax: the latest for resuming, plus the best K by validation loss.

A run that finds a checkpoint in its work directory resumes from it (data position
included: batches are a function of the step). Every checkpoint carries a SHA-256 manifest
of its files (`jrecipe.train.integrity`), checked before it is restored: a damaged one
(changed or truncated bytes, a missing item, a half-deleted step) is moved to
`checkpoints/damaged/<step>` with one line, and the newest intact one is used; never a crash
and never a silent fresh start. A checkpoint that cannot be written (full disk, quota,
read-only or failing storage) stops the run with a RunFailure (exit 1) that says the earlier
checkpoints are intact: orbax writes into a temporary directory and renames it only once
complete, and old checkpoints are deleted (renamed into the trash first) only after a new
one is committed, so a failed write never damages them."""

import collections
import contextlib
import errno
import logging
import os
import re
from typing import Any, Optional

import jax
import numpy as np

from jrecipe import storage
from jrecipe.errors import RunFailure, UserError
from jrecipe.train import integrity

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


class Checkpointer:
  """Saves (state, meta) pairs under `workdir/checkpoints/<step>/`, each with a manifest.

  Retention: the newest checkpoint, plus the `keep_best` with the lowest validation loss
  (recorded in each step's manifest). A checkpoint without one (a preemption's stop
  checkpoint) is kept only while it is the newest. Deletion is crash-safe and a damaged step
  is moved aside, not deleted (`jrecipe.train.integrity`).

  Args:
    workdir: the run's work directory.
    keep_best: how many of the best checkpoints (lowest validation loss) to keep beside
      the latest one.
    read_only: never write, move or delete (ensembles, init_from, tests).
  """

  def __init__(self, workdir: str, keep_best: int = 2, read_only: bool = False):
    self.directory = storage.absolute(os.path.join(workdir, "checkpoints"))
    self.keep_best = keep_best
    self.read_only = read_only
    self._manager = None
    self._pending: collections.deque = collections.deque()  # (step, val_loss) being written
    self._primary: Optional[bool] = None
    _quiet_storage_error_tracebacks()

  @property
  def primary(self) -> bool:
    """Whether this process writes manifests and moves or deletes steps (process 0)."""
    if self._primary is None:
      self._primary = jax.process_index() == 0
    return self._primary

  @property
  def manager(self):
    """The orbax CheckpointManager, created at first use (see `_ocp`).

    It keeps every step (jrecipe's `_prune` deletes), and seals each step with its manifest
    after the data is complete and before the step's directory gets its final name.
    """
    if self._manager is None:
      ocp = _ocp()
      options = ocp.CheckpointManagerOptions(
          create=not self.read_only, read_only=self.read_only,
          enable_async_checkpointing=True, cleanup_tmp_directories=not self.read_only,
          async_options=None if self.read_only else ocp.AsyncOptions(
              post_finalization_callback=self._seal))
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=("state", "meta"))
    return self._manager

  def _seal(self) -> None:
    """orbax's post-finalization callback (process 0, every process done): the manifest.

    Runs in orbax's background thread while the step is still `<step>.orbax-checkpoint-tmp`,
    so the rename that commits the step also commits its manifest.
    """
    step, val = self._pending.popleft()
    if storage.is_remote(self.directory):  # orbax writes in place there (no rename)
      integrity.write_manifest(self._step_dir(step), step, val)
      return
    prefix = f"{step}{integrity.TMP_SUFFIX}"
    tmp = [n for n in os.listdir(self.directory) if n.startswith(prefix)]
    if len(tmp) != 1:
      raise RuntimeError(f"cannot find the temporary directory of step {step} under "
                         f"{self.directory} (found {tmp})")
    integrity.write_manifest(os.path.join(self.directory, tmp[0]), step, val)

  def save(self, step: int, state: Any, meta: dict, val_loss: Optional[float] = None) -> None:
    """Saves a host copy of `state` and the JSON `meta` at `step` (asynchronously).

    The previous save is finished (orbax waits for it anyway) and retention applied first.

    Raises:
      RunFailure: this write, or the previous asynchronous one (orbax reports it here),
        failed in the storage.
    """
    val = float(val_loss) if val_loss is not None and np.isfinite(val_loss) else None
    ocp = _ocp()
    with self._storage_guard(f"the checkpoint of step {step} (or the one before it, still "
                             "being written in the background)"):
      self.manager.wait_until_finished()
      self._prune()
      self._pending.append((int(step), val))
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _digit_steps(self) -> list[int]:
    return sorted(int(n) for n in self._names() if n.isdigit())

  def committed_steps(self) -> list[int]:
    """Steps whose checkpoint is complete on disk: renamed by orbax, every file of its
    manifest present at its size (a half-deleted or unsealed step is not committed)."""
    return [s for s in self._digit_steps() if integrity.quick_problem(self._step_dir(s)) is None]

  def unfinished_steps(self) -> list[int]:
    """Steps whose checkpoint is still (or forever, after a failure) a temporary directory."""
    return sorted({int(m.group(1)) for m in map(_TMP_DIR.match, self._names()) if m})

  def _names(self) -> list[str]:
    try:
      return storage.listdir(self.directory)
    except OSError:
      return []

  def _writer(self) -> bool:
    return not self.read_only and self.primary

  def _prune(self) -> None:
    """Retention: keeps the newest committed step and the `keep_best` lowest validation losses.

    A step without a validation loss (a preemption's stop) is kept only while it is newest.
    Deletion renames first (`integrity.delete`), so a kill never leaves a half step.
    """
    if not self._writer():
      return
    steps = self.committed_steps()
    if not steps:
      return
    scored = [(v, s) for s in steps if (v := integrity.val_loss(self._step_dir(s))) is not None]
    keep = {steps[-1]} | {s for _, s in sorted(scored)[:max(self.keep_best, 0)]}
    for s in steps:
      if s not in keep:
        integrity.delete(self.directory, s)

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
    """The committed steps, oldest first."""
    return self.committed_steps()

  def _set_aside(self, step: int, why: str) -> None:
    if self._writer():
      integrity.move_aside(self.directory, step, why)
      if self._manager is not None:
        self._manager.reload()  # orbax lists steps in memory: it must forget this one
    else:
      log.warning("Checkpoint at step %d is damaged or corrupt (%s) and is skipped.", step, why)

  def commit(self) -> None:
    """The resume is settled (after `restore(commit=False)`): see `_restored`."""
    self._restored()

  def _restored(self) -> None:
    """The resume is settled: config.json may now take the new config (`workdir.prepare`)."""
    if self._writer():
      from jrecipe.train import workdir as workdir_lib
      workdir_lib.commit_config(os.path.dirname(self.directory))

  def _restore_fitting(self, step: int, abstract: Any) -> dict:
    """orbax's restore of an intact `step`, refused (UserError) unless every leaf has the
    target's structure and shape: orbax itself restores a leaf of another shape as saved."""
    ocp = _ocp()
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      detail = integrity.shape_differences(out["state"], abstract)
    except Exception as e:  # noqa: BLE001 - the bytes are intact: the target differs
      detail, out = str(e).splitlines()[0][:300], None
    if out is not None and not detail:
      return out
    from jrecipe.train import workdir as workdir_lib
    diff = workdir_lib.PENDING_DIFF.get(storage.key(os.path.dirname(self.directory)))
    raise UserError(
        f"The checkpoint at step {step} in {self.directory} is intact (its files match their "
        f"SHA-256 manifest) but does not fit this config's training state: {detail}. The "
        "config changed in a way a resume cannot follow (a parameter shape, the optimizer or "
        "its state)" + (f"; the config's changes: {diff}" if diff else "") + ". config.json "
        "is left as it was: rerun with the run's config, or train this config in a new "
        "--workdir.")

  def restore(self, target: Any, step: Optional[int] = None, *, commit: bool = True):
    """Restores (state, meta) at `step` or the newest intact step; None if there is none.

    `commit=False` leaves config.json to the caller (`commit_config`), which checks more of
    the restored meta first (the training loop: the data position).

    Each candidate's files are checked against its manifest first; a damaged one is moved to
    `checkpoints/damaged/` (read-only: skipped) with one line, and the one before it is used.
    The process holding the work directory also empties what a killed run left (the trash,
    unfinished temporary steps).

    Raises:
      RunFailure: checkpoints exist but every one is damaged (never a silent fresh start).
      UserError: an intact checkpoint does not fit `target` (the config's state changed).
    """
    skipped = []
    if self._writer():
      integrity.clean_leftovers(self.directory)
      for s in self._digit_steps():  # half-deleted or unsealed: never committed, set aside
        if step in (None, s) and (why := integrity.quick_problem(self._step_dir(s))):
          self._set_aside(s, why)
          skipped.append(s)
    steps = [step] if step is not None else self._digit_steps()[::-1]
    if not steps and not skipped:
      if commit:
        self._restored()
      return None  # a fresh run: nothing to read, and no need for orbax yet
    ocp = _ocp()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    for s in steps:
      why = integrity.problem(self._step_dir(s))
      if why:
        self._set_aside(s, why)
        skipped.append(s)
        continue
      out = self._restore_fitting(s, abstract)
      if skipped:
        log.warning("Resuming from checkpoint %d (damaged checkpoints were set aside: %s).",
                    s, ", ".join(map(str, sorted(skipped))))
      if commit:
        self._restored()
      return out["state"], dict(out["meta"]), s
    where = (f"moved to {os.path.join(self.directory, integrity.DAMAGED)}; a rerun starts "
             "from scratch" if self._writer() else "left in place")
    tried = sorted(set(steps + skipped))
    raise RunFailure(
        f"None of the {len(tried)} checkpoints in {self.directory} could be read intact "
        f"(steps {tried}; {where}). Refusing to start from scratch silently in this run: "
        "restore a backup, or rerun to start a fresh run.")

  def best_step(self) -> Optional[int]:
    """The committed step with the lowest recorded validation loss, or None."""
    scored = [(v, s) for s in self.committed_steps()
              if (v := integrity.val_loss(self._step_dir(s))) is not None]
    return min(scored)[1] if scored else None

  def list_checkpoints(self) -> list[dict]:
    """[{'step': s, 'val_loss': v}] for every committed checkpoint (val_loss None if unknown)."""
    return [{"step": s, "val_loss": integrity.val_loss(self._step_dir(s))}
            for s in self.committed_steps()]

  def wait(self) -> None:
    """Blocks until the asynchronous save is on disk (retention applied); RunFailure if the
    storage refused it."""
    if self._manager is None:
      return
    with self._storage_guard("the latest checkpoint (written in the background)"):
      self._manager.wait_until_finished()
      self._prune()

  def close(self) -> None:
    """Finishes the pending save and closes; RunFailure if the storage refused it."""
    if self._manager is None:
      return
    with self._storage_guard("the latest checkpoint (written in the background)"):
      self._manager.wait_until_finished()
      self._prune()
      self._manager.close()
