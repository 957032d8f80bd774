"""What a check returns, and the names of the battery's checks.

A check is a plain function of an apply function, parameters and a batch (plus what it
needs); it returns a `CheckResult`: a verdict with the measured number and the expected one,
never advice without numbers.
"""

import dataclasses
import os
from typing import Any, Optional

STATUSES = ("pass", "fail", "warn", "skip")

# The battery, in the order the recipe runs it. The names are stable: scripts rely on them.
CHECK_NAMES = (
    "data_before_net",
    "seed_determinism",
    "loss_at_init",
    "init_bias",
    "logits_not_probabilities",
    "regularization_increases_loss",
    "input_independent_baseline",
    "overfit_one_batch",
    "capacity_decreases_loss",
    "batch_independence",
    "causal_dependency",
    "gradient_check",
    "eval_mode",
    "lr_schedule",
)


@dataclasses.dataclass
class CheckResult:
  """A check's verdict.

  Attributes:
    name: the check's stable name (one of CHECK_NAMES for the battery).
    status: 'pass' | 'fail' | 'warn' | 'skip'.
    value: the measured value (a number or a short string).
    expected: what a correct setup gives (a number, a range as a string, ...).
    message: one line in plain words: what was measured, what it means, likely causes.
    artifacts: paths of files the check wrote (relative to the work directory when run by
      the battery; absolute or as given otherwise).
    details: structured extras (e.g. the gradient check's per-leaf table).
  """

  name: str
  status: str
  value: Any = None
  expected: Any = None
  message: str = ""
  artifacts: list = dataclasses.field(default_factory=list)
  details: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.status not in STATUSES:
      raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

  @property
  def ok(self) -> bool:
    return self.status != "fail"

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    return d


def artifact_path(artifacts_dir: Optional[str], filename: str) -> Optional[str]:
  """`artifacts_dir/filename` (directory created), or None when artifacts are off."""
  if not artifacts_dir:
    return None
  os.makedirs(artifacts_dir, exist_ok=True)
  return os.path.join(artifacts_dir, filename)
