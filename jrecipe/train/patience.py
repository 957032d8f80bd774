"""One patience tracker for everything driven by 'the validation loss stopped improving'.

Recipe stage 4 ('early stopping': stop when the validation loss no longer improves) and CS231n's
step decay ('reduce the learning rate ... whenever the validation error stops improving'; Karpathy:
'tune decay at the very end') share one rule: an epoch improves when its loss beats the best so far
by a relative threshold, and `patience` epochs in a row without improvement is a plateau. `Patience`
is that rule; `EarlyStopping` and `PlateauScaler` are the two things that act on it. Their state
is a small JSON dict that the checkpoint hook saves inside the orbax checkpoint, so a resumed run
continues exactly.
"""

import math
from typing import Optional

from jrecipe.errors import UserError


class Patience:
  """Counts epochs without improvement of a loss.

  An epoch improves when `loss < best - threshold * |best|` (a non-finite loss never does).

  Args:
    patience: epochs without improvement that make a plateau (>= 1).
    threshold: the relative improvement that counts (>= 0; 0: any decrease).
  """

  def __init__(self, patience: int, threshold: float = 0.0):
    if int(patience) != patience or patience < 1:
      raise UserError(f"A patience of {patience!r} epochs is not valid: it must be a whole "
                      "number of epochs >= 1.")
    if not threshold >= 0:
      raise UserError(f"The plateau threshold is {threshold}; it must be >= 0.")
    self.patience, self.threshold = int(patience), float(threshold)
    self.best: Optional[float] = None
    self.bad_epochs = 0

  def update(self, loss: float) -> bool:
    """Records one epoch's loss; returns True when it completes a plateau."""
    loss = float(loss)
    if math.isfinite(loss) and (self.best is None
                                or loss < self.best - self.threshold * abs(self.best)):
      self.best, self.bad_epochs = loss, 0
      return False
    self.bad_epochs += 1
    return self.bad_epochs >= self.patience

  def state_dict(self) -> dict:
    return {"best": self.best, "bad_epochs": self.bad_epochs}

  def load_state_dict(self, d: dict) -> None:
    self.best = None if d.get("best") is None else float(d["best"])
    self.bad_epochs = int(d.get("bad_epochs", 0))


class EarlyStopping:
  """'Early stopping on validation loss' (recipe stage 4): stop after `patience` flat epochs.

  Any decrease of the validation loss counts as an improvement (threshold 0).
  """

  def __init__(self, patience: int):
    self.tracker = Patience(patience, threshold=0.0)

  def update(self, val_loss: float) -> Optional[str]:
    """Records an epoch; returns the stop reason when the run should stop, else None."""
    if self.tracker.update(val_loss):
      return (f"early stopping: validation loss did not improve for "
              f"{self.tracker.bad_epochs} epochs")
    return None

  def state_dict(self) -> dict:
    return self.tracker.state_dict()

  def load_state_dict(self, d: dict) -> None:
    self.tracker.load_state_dict(d)


class PlateauScaler:
  """Reduce-on-plateau: a learning-rate scale driven by the validation loss, on the host.

  Call `update(val_loss)` once per epoch; the returned scale multiplies the optimizer's updates,
  which equals multiplying the learning rate for every optimizer here (their updates are linear
  in the rate; the state does not depend on it). For 'lbfgs' the line search already chooses
  the step, so a scale below 1 only shortens the accepted step. After `patience` epochs in a row
  without an improvement of `threshold` (relative) the scale is multiplied by `factor` (never
  below `min_scale`) and the count restarts.

  Args:
    factor: multiplier in (0, 1) applied at each reduction.
    patience: epochs without improvement before a reduction (>= 1).
    min_scale: the smallest scale, in (0, 1].
    threshold: relative improvement that counts (>= 0).
  """

  def __init__(self, factor: float = 0.5, patience: int = 2, min_scale: float = 1e-3,
               threshold: float = 1e-4):
    if not 0 < factor < 1:
      raise UserError(f"config.plateau.factor is {factor}; it must lie in (0, 1) (0.5 halves "
                      "the learning rate at each plateau).")
    if int(patience) != patience or patience < 1:
      raise UserError(f"config.plateau.patience is {patience}; it must be a whole number of "
                      "epochs >= 1.")
    if not 0 < min_scale <= 1:
      raise UserError(f"config.plateau.min_scale is {min_scale}; it must lie in (0, 1].")
    self.tracker = Patience(patience, threshold)
    self.factor, self.min_scale = float(factor), float(min_scale)
    self.scale, self.num_reductions = 1.0, 0

  @property
  def best(self) -> Optional[float]:
    return self.tracker.best

  @property
  def bad_epochs(self) -> int:
    return self.tracker.bad_epochs

  def update(self, val_loss: float) -> float:
    """Records one epoch's validation loss and returns the scale for the next epoch."""
    if self.tracker.update(val_loss):
      new_scale = max(self.scale * self.factor, self.min_scale)
      if new_scale < self.scale:
        self.scale, self.num_reductions = new_scale, self.num_reductions + 1
      self.tracker.bad_epochs = 0
    return self.scale

  def state_dict(self) -> dict:
    """The state as JSON-serialisable Python values (saved with the checkpoint)."""
    return {"scale": self.scale, "num_reductions": self.num_reductions,
            **self.tracker.state_dict()}

  def load_state_dict(self, d: dict) -> None:
    """Restores a `state_dict()`, so a resumed run continues exactly."""
    self.scale = float(d["scale"])
    self.num_reductions = int(d["num_reductions"])
    self.tracker.load_state_dict(d)
