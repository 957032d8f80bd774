"""`jrecipe --mode=report --workdir=DIR`: rebuild DIR/report.html (and diagnoses.json).

Everything comes from the files of DIR, so the report of any run (finished, failed or
still running) can be rebuilt at any time; `--config` is optional (DIR/config.json is read).
"""

import logging
import os

from jrecipe import storage
from jrecipe.errors import UserError

log = logging.getLogger("jrecipe")
LOSS_SCALES = ("linear", "log", "both")


def run_mode(config, workdir: str, options=None) -> int:
  """Writes DIR/diagnoses.json and DIR/report.html; prints the report's path.

  Args:
    config: a locked ConfigDict (its `monitor.report_loss_scale` is used) or None.
    workdir: a run's work directory (must hold config.json or metrics.jsonl, or another
      mode's results such as checks.json).

  Returns:
    0. Raises UserError when DIR does not exist or holds nothing to report.
  """
  del options  # this mode takes no command-line options (jrecipe.modes.ModeOptions)
  if not storage.isdir(workdir):
    raise UserError(f"--workdir={workdir!r} does not exist: --mode=report needs the work "
                    "directory of a run (train, check, inspect, search ...).")
  known = ("config.json", "metrics.jsonl", "summary.json", "checks.json", "inspect",
           "lr_find.json", "search.json", "ablation.json", "ensemble.json", "human.json")
  if not any(storage.exists(os.path.join(workdir, k)) for k in known):
    raise UserError(f"--workdir={workdir!r} holds nothing to report: expected at least one "
                    f"of {', '.join(known)} (written by --mode=train, check, inspect, ...).")
  scale = None
  if config is not None:
    scale = config.monitor.report_loss_scale
    if scale not in LOSS_SCALES:
      raise UserError(f"monitor.report_loss_scale={scale!r}; valid: {', '.join(LOSS_SCALES)}.")
  from jrecipe.monitor import diagnose
  from jrecipe.report import html
  found = diagnose.write_diagnoses(workdir) if storage.exists(
      os.path.join(workdir, "metrics.jsonl")) else []
  path = html.write_report(workdir, loss_scale=scale)
  for d in found:
    print(f"[{d['severity']}] {d['title']}: {d['message']}")
  print(f"Report: {path}", flush=True)
  return 0
