"""`jrecipe --mode=check`: the recipe's sanity battery on exactly the model, data and loss a
config trains, with a verdict per check, `checks.json`, and exit status 1 on any failure.

Every check is a function registered in `jrecipe.checks.registry`; this module builds the
shared `CheckContext` once (so compiled functions are shared between checks), runs the
checks in the registry's order and collects the results.
"""

import logging
import os
import sys
import time
from typing import Callable, Optional, Sequence

import ml_collections

from jrecipe import experiment as experiment_lib
from jrecipe.checks import fitting, registry, regularization, rootcause
from jrecipe.checks.base import CheckResult
from jrecipe.checks.context import CheckContext
from jrecipe.checks.registry import parse_names
from jrecipe.errors import UserError
from jrecipe.train.writer import write_json_atomic

log = logging.getLogger("jrecipe")

__all__ = ["format_row", "human_baseline", "parse_names", "run_battery", "run_check",
           "run_mode"]


def run_check(check: registry.RegisteredCheck, ctx: CheckContext) -> CheckResult:
  """Runs one registered check; a check that raises is reported as a fail carrying the error.

  A UserError (the input is wrong, not the model) propagates: the entry point exits 2.
  """
  t0 = time.perf_counter()
  try:
    result = check.fn(ctx)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - a crashing check is a finding, not a crash
    log.debug("check %s raised", check.name, exc_info=True)
    text = str(e).splitlines()[0][:300] if str(e) else ""
    result = CheckResult(check.name, "fail", None, None,
                         f"the check could not run on this model: {type(e).__name__}: {text}")
  result.details["seconds"] = round(time.perf_counter() - t0, 3)
  return result


def run_battery(exp: experiment_lib.Experiment, *, workdir: Optional[str] = None,
                only: Sequence[str] = (), skip: Sequence[str] = (),
                on_result: Optional[Callable[[CheckResult], None]] = None) -> list[CheckResult]:
  """Runs the battery (or `only` those checks, minus `skip`) on an Experiment.

  Args:
    exp: from `jrecipe.experiment.build(config)`.
    workdir: where artifacts go (`workdir/checks/*.png`, paths reported relative to
      workdir); None writes no files.
    only, skip: check names (see `jrecipe.checks.CHECK_NAMES`).
    on_result: called with each result as soon as it is known (the console table).

  Returns:
    One CheckResult per check run, in the registry's order (a check never runs before the
    checks it depends on). A check that raises is reported as a fail carrying the error, and
    the battery goes on. A fail or warn whose precondition failed carries `consequence_of`
    (`jrecipe.checks.rootcause`).
  """
  checks = registry.resolve(only, skip)
  ctx = CheckContext.from_experiment(exp, os.path.join(workdir, "checks") if workdir else None)
  needs = {n: node["needs"] for n, node in registry.graph().items()}
  results, done = [], {}
  # One run where two checks train the same thing; the gradient check's burn-in and the
  # regularization run are prefixes of the baseline's run, which continues the burn-in.
  # The baseline's extended budgets continue its own run (baselines.EXTEND_UP_TO).
  prefixes = (ctx.config.checks.gradcheck_burnin_steps, regularization.train_steps(ctx.steps),
              ctx.steps, 2 * ctx.steps)
  with fitting.shared_runs(snapshots=prefixes):
    for check in checks:
      result = rootcause.mark(run_check(check, ctx), done, needs)
      done[check.name] = result
      if workdir:
        result.artifacts = [os.path.relpath(p, workdir) if os.path.isabs(p) else p
                            for p in result.artifacts]
      results.append(result)
      if on_result:
        on_result(result)
  return results


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(_fmt(x) for x in v[:3]) + ("..." if len(v) > 3 else "") + "]"
  s = str(v)
  return s if len(s) <= 18 else s[:17] + "…"


def format_row(r: CheckResult) -> str:
  """One line of the console table: name, status, value, expected, explanation.

  A consequence of a failed precondition shows its status in parentheses and names the
  precondition first: it is not an independent finding.
  """
  status, message = r.status.upper(), r.message
  if r.consequence_of:
    status, message = f"({status})", f"consequence of {r.consequence_of}: {message}"
  return (f"{r.name:<30} {status:<6} {_fmt(r.value):>12} {_fmt(r.expected):>12}  "
          f"{message}")


def _progress(r: CheckResult) -> None:
  """One line per finished check on stderr, while the table waits for the root cause."""
  print(f"jrecipe: check {r.name}: {r.status} ({r.details.get('seconds', 0):.1f} s)",
        file=sys.stderr, flush=True)


def human_baseline(workdir: str) -> Optional[dict]:
  """Human accuracy (DIR/human.json, from --mode=label) beside the model's, or None.

  When DIR also holds the label session (label_session.json) and a checkpoint, the model is
  scored on exactly the examples the human answered, both with Wilson intervals
  (`jrecipe.label.compare`); otherwise its accuracy on the whole split comes from
  DIR/summary.json, said so on the line. Recipe: compare with your own accuracy.
  """
  import json
  path = os.path.join(workdir, "human.json")
  try:
    with open(path) as f:
      human = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(human, dict) or human.get("accuracy") is None:
    return None
  split = human.get("split", "test")
  out = {"split": split, "human_accuracy": human["accuracy"], "human_ci95": human.get("ci95"),
         "n": human.get("n"), "model_accuracy": None}
  from jrecipe.label import compare
  same = compare.model_on_labelled(workdir)
  if same is not None and same["split"] == split:
    out.update(same_examples=same, model_accuracy=same["model_accuracy"],
               model_ci95=same["model_ci95"])
    out["line"] = f"Human baseline on {split}, {compare.same_examples_line(same)}"
    return out
  try:
    with open(os.path.join(workdir, "summary.json")) as f:
      out["model_accuracy"] = json.load(f).get(split, {}).get("accuracy")
  except (OSError, ValueError, AttributeError):
    pass
  lo, hi = (out["human_ci95"] or [float("nan")] * 2)[:2]
  line = (f"Human baseline on {split}: {100 * out['human_accuracy']:.1f}% (95% CI "
          f"{100 * lo:.1f}-{100 * hi:.1f}%, n={out['n']}, from human.json)")
  if out["model_accuracy"] is not None:
    line += (f"; model: {100 * out['model_accuracy']:.1f}% (summary.json, on the whole split: "
             "not the same examples, as no checkpoint and label session are here)")
  out["line"] = line
  return out


def run_mode(config: ml_collections.ConfigDict, workdir: str, options=None) -> int:
  """The `--mode=check` entry: table on stdout, `workdir/checks.json`, exit 1 on a fail."""
  del options  # this mode takes no command-line options (jrecipe.modes.ModeOptions)
  only = parse_names(config.checks.only, "only")
  skip = parse_names(config.checks.skip, "skip")
  exp = experiment_lib.build(config)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  results = run_battery(exp, workdir=workdir, only=only, skip=skip, on_result=_progress)
  counts = {s: sum(r.status == s for r in results) for s in ("pass", "warn", "fail", "skip")}
  counts["consequences"] = sum(r.consequence_of is not None for r in results)
  elapsed = time.perf_counter() - t0
  cause = rootcause.root_cause(results)
  first = cause["line"] if cause else (
      f"Most likely cause: none, no check failed ({counts['warn']} warned).")
  human = human_baseline(workdir)
  write_json_atomic(os.path.join(workdir, "checks.json"), {
      "cause": first, "cause_detail": cause,  # sorted keys: "cause" comes first
      "checks": [r.to_json() for r in results], "summary": counts,
      "seconds": round(elapsed, 2), **({"human_baseline": human} if human else {})})
  print(first, flush=True)
  print(f"{'check':<30} {'status':<6} {'value':>12} {'expected':>12}  explanation", flush=True)
  for r in results:
    print(format_row(r), flush=True)
  print(f"{counts['pass']} passed, {counts['fail']} failed ({counts['consequences']} of the "
        f"fails and warns are consequences of a failed precondition), {counts['warn']} "
        f"warned, {counts['skip']} skipped in {elapsed:.1f} s; details in "
        f"{os.path.join(workdir, 'checks.json')}", flush=True)
  if human:
    print(human["line"], flush=True)
  return 1 if counts["fail"] else 0
