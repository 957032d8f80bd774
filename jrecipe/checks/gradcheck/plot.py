"""The gradient check's picture: max relative error per parameter leaf against the step h."""

from typing import Optional

from jrecipe.checks import plots
from jrecipe.checks.base import artifact_path
from jrecipe.checks.gradcheck.rules import EXCELLENT_BELOW


def plot_errors(artifacts_dir: Optional[str], table: list, other: dict, h: float,
                fail_above: float, warn_above: float) -> tuple[list, dict]:
  """Writes `gradient_check.png` (log-log, one line per leaf of the data loss).

  CS231n's "try other h": the error of a correct gradient is flat over a range of h and rises
  at both ends (truncation for large h, roundoff for small h); a wrong one is high everywhere.

  Args:
    artifacts_dir: where to write it (None: nothing).
    table: the data loss's rows at `h`; other: {'data': {h2: {leaf: error}}} at other steps.
    h: the step of `table`; fail_above, warn_above: the thresholds drawn.

  Returns:
    (artifact paths, details to add: {'plot_error': ...} when drawing failed).
  """
  path = artifact_path(artifacts_dir, "gradient_check.png")
  if not path:
    return [], {}
  try:
    series = {}
    for r in table:
      hs = sorted([float(h)] + list(other.get("data", {})))
      errs = [r["max_rel_error_no_kinks"] if hh == float(h) else other["data"][hh][r["leaf"]]
              for hh in hs]
      series[r["leaf"]] = (hs, [max(e, 1e-17) for e in errs])
    plots.line_plot(path, series, title="data loss: max relative error per leaf",
                    xlabel="h", ylabel="relative error", logx=True, logy=True,
                    hlines=(fail_above, warn_above, EXCELLENT_BELOW))
    return [path], {}
  except Exception as e:  # pylint: disable=broad-except
    return [], {"plot_error": f"{type(e).__name__}: {e}"}
