"""Checkpoints through orbax: the latest for resuming, plus the best K by validation loss.

A run that finds a checkpoint in its work directory resumes from it (data position
included: batches are a function of the step). A damaged latest checkpoint gives a warning
and a fall-back to the previous good one, never a crash and never a silent fresh start.
"""

import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from jrecipe.errors import RunFailure

log = logging.getLogger("jrecipe")


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
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=1),
        cm.BestN(get_metric_fn=_val_metric, reverse=True, n=max(keep_best, 0)),
    ])
    options = ocp.CheckpointManagerOptions(
        best_fn=_val_metric, best_mode="min", preservation_policy=policy,
        create=not read_only, read_only=read_only, enable_async_checkpointing=True,
        cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def save(self, step: int, state: Any, meta: dict, val_loss: Optional[float] = None) -> None:
    """Saves a host copy of `state` and the JSON `meta` at `step` (asynchronously)."""
    metrics = {"val_loss": float(val_loss)} if val_loss is not None and np.isfinite(
        val_loss) else None
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                        metrics=metrics, force=True)
    except OSError as e:
      raise RunFailure(
          f"Could not write the checkpoint for step {step} under {self.directory}: {e}. "
          "The previous checkpoints are untouched; free disk space and rerun the same "
          "command to resume.") from e

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, target: Any, step: Optional[int] = None):
    """Restores (state, meta) at `step` or the newest readable step; None if there is none.

    A checkpoint that fails to restore is reported and skipped in favour of the one
    before it. If checkpoints exist but none can be read, raises RunFailure rather than
    starting over silently.
    """
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
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
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
