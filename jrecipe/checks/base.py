"""What a check returns, how its verdict is built, and the names of the battery's checks.

A check is a plain function of an apply function, parameters and a batch (plus what it
needs); it returns a `CheckResult`: a verdict with the measured number and the expected one,
never advice without numbers. The battery's checks are registered by name in
`jrecipe.checks.registry`; `CHECK_NAMES` is derived from it.
"""

import dataclasses
import os
from typing import Any, Callable, Optional

STATUSES = ("pass", "fail", "warn", "skip")


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
    consequence_of: set by the battery (`jrecipe.checks.rootcause`) on a fail or warn of a
      check one of whose preconditions (`needs`, transitively) failed: the name of the
      failed precondition it is reported as a consequence of; None for an independent
      verdict.
  """

  name: str
  status: str
  value: Any = None
  expected: Any = None
  message: str = ""
  artifacts: list = dataclasses.field(default_factory=list)
  details: dict = dataclasses.field(default_factory=dict)
  consequence_of: Optional[str] = None

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


def verdict(name: str, *, value: Any = None, expected: Any = None,
            details: Optional[dict] = None,
            artifacts: Optional[list] = None) -> Callable[[str, str], CheckResult]:
  """The one builder of a check's verdict record: numbers now, status and words later.

  A check measures first and decides after, often with several possible outcomes that all
  carry the same numbers; `verdict` binds the numbers once and returns
  `make(status, message) -> CheckResult`.

  Args:
    name: the check's stable name.
    value, expected, details, artifacts: as in `CheckResult` (details and artifacts are
      shared by every record made, so a check may still add to them before deciding).

  Returns:
    `make(status, message)` building the CheckResult.
  """
  details = {} if details is None else details
  artifacts = [] if artifacts is None else artifacts

  def make(status: str, message: str) -> CheckResult:
    return CheckResult(name, status, value=value, expected=expected, message=message,
                       artifacts=artifacts, details=details)

  return make


def with_more_steps(run: Callable[[int], "CheckResult"], base: int,
                    again: Callable[["CheckResult"], bool], *, field: str, why: str,
                    up_to: int = 4) -> "CheckResult":
  """`run(base)`, re-run with x2 then x4 (`up_to`) the steps while `again(result)`: a verdict
  that is the budget's (a slow starter, a loss 'almost there'), not the model's. An extension
  is said in the message ('checks.<field>=150 extended to 300<why>') and in
  details['budget_extended_from']."""
  steps, result = base, run(base)
  while again(result) and steps * 2 <= up_to * base:
    steps *= 2
    result = run(steps)
  if steps > base:
    result.details["budget_extended_from"] = base
    result.message = (f"{result.message.rstrip('.')} (checks.{field}={base} extended to "
                      f"{steps}{why}).")
  return result


def __getattr__(attr: str):
  # CHECK_NAMES is derived from the registry, which imports every check module: resolved on
  # first use so that the check modules can import this one.
  if attr == "CHECK_NAMES":
    from jrecipe.checks import registry
    return registry.check_names()
  raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
