"""Runs the planted-bug zoo through `--mode=check`'s code path and scores the battery.

For every entry (jrecipe/zoo/entries.py) the whole battery runs on the bug and on its correct
twin, exactly as `jrecipe --mode=check` runs it (`jrecipe.checks.runner.run_mode`: exit
status, checks.json, the first line naming the most likely cause). Twins with identical
configs (most model-style twins are the same correct model) run once and are shared.

Scores (issue 18's targets): bugs whose expected check FAILs with exit 1 (>= 95%), bugs with
any FAIL, bugs whose first line names the planted cause (>= 90%), FAILs on twins (0), WARNs
over (twin, check) pairs that ran (<= 5%), and the time.
"""

import contextlib
import dataclasses
import io
import json
import os
import tempfile
import time
from typing import Optional

import ml_collections

from jrecipe.errors import UserError
from jrecipe.zoo.entries import Entry

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


# The check budgets the zoo runs with (the battery tests' fast budgets; `--full_budgets`
# keeps the config's own): 64 batteries must fit a shared 2-core machine.
FAST_BUDGETS = {"checks.budget_steps": 60, "checks.overfit_steps": 300,
                "checks.gradcheck_burnin_steps": 5}


def build_config(base: str, overrides: dict, budgets: Optional[dict] = None
                 ) -> ml_collections.ConfigDict:
  """The shipped config `base` with the entry's overrides: a dict value replaces the whole
  section (a user factory takes only its own fields), an 'a.b' key sets one field;
  `budgets` ('checks.*' fields) after them."""
  from jrecipe.checks.pytest_plugin import load_config
  cfg = load_config(os.path.join(CONFIGS, base))
  for key, value in {**overrides, **(budgets or {})}.items():
    if isinstance(value, dict):
      cfg[key] = ml_collections.ConfigDict(value)
      continue
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@dataclasses.dataclass
class Outcome:
  """One battery run: exit status, statuses by check, the first line's cause, seconds."""

  rc: int
  statuses: dict
  cause: Optional[str]
  line: str
  seconds: float

  def status(self, check: str) -> str:
    return self.statuses.get(check, "absent")


def run_one(base: str, overrides: dict, budgets: Optional[dict] = None) -> Outcome:
  """`--mode=check` on one config in a throwaway work directory (stdout/stderr captured)."""
  from jrecipe.checks import runner
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="jrecipe_zoo_") as workdir:
    sink = io.StringIO()
    try:
      with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        rc = runner.run_mode(build_config(base, overrides, budgets), workdir)
    except UserError as e:  # a build refusal: exit 2, one paragraph
      return Outcome(2, {}, "refused", str(e).splitlines()[0][:200],
                     time.perf_counter() - t0)
    with open(os.path.join(workdir, "checks.json")) as f:
      report = json.load(f)
  statuses = {c["name"]: c["status"] for c in report["checks"]}
  detail = report.get("cause_detail") or {}
  return Outcome(rc, statuses, detail.get("check"), report["cause"], time.perf_counter() - t0)


@dataclasses.dataclass
class Scored:
  entry: Entry
  bug: Outcome
  twin: Outcome

  @property
  def caught(self) -> bool:
    return self.bug.rc == 1 and self.bug.status(self.entry.check) == "fail"

  @property
  def any_fail(self) -> bool:
    return self.bug.rc == 1

  @property
  def right_cause(self) -> bool:
    return self.bug.cause == self.entry.root


def run_zoo(entries, *, budgets: Optional[dict] = None, progress=None) -> list[Scored]:
  """Runs each entry's bug and twin (twins shared by identical config); `progress(scored)`."""
  twins: dict = {}
  out = []
  for e in entries:
    bug = run_one(e.base, e.bug, budgets)
    key = json.dumps([e.base, e.twin], sort_keys=True)
    if key not in twins:
      twins[key] = run_one(e.base, e.twin, budgets)
    out.append(Scored(e, bug, twins[key]))
    if progress:
      progress(out[-1])
  return out


def summary(scored: list[Scored], seconds: float) -> dict:
  """The zoo's scores (fractions and counts), twins counted once per distinct config."""
  n = len(scored)
  twins = {id(s.twin): s.twin for s in scored}.values()
  pairs = [st for t in twins for st in t.statuses.values() if st != "skip"]
  return {
      "bugs": n, "distinct_twins": len(twins),
      "caught_by_expected_check": sum(s.caught for s in scored),
      "caught_by_any_fail": sum(s.any_fail for s in scored),
      "right_root_cause": sum(s.right_cause for s in scored),
      "refused_at_build": sum(s.bug.rc == 2 for s in scored),
      "twin_fails": sum(st == "fail" for t in twins for st in t.statuses.values())
                    + sum(t.rc == 2 for t in twins),
      "twin_warn_pairs": sum(st == "warn" for st in pairs), "twin_pairs": len(pairs),
      "seconds": round(seconds, 1)}


def row(s: Scored) -> str:
  """One line of the table: entry, expected check and its status, cause named, twin."""
  twin_bad = [c for c, st in s.twin.statuses.items() if st in ("fail", "warn")]
  return (f"| {s.entry.name} | {s.entry.check} | {s.bug.status(s.entry.check)} | "
          f"{s.bug.cause or '-'}{'' if s.right_cause else ' (expected ' + s.entry.root + ')'} | "
          f"{', '.join(twin_bad) or 'clean'} | {s.bug.seconds:.0f} s |")


HEADER = ("| entry | expected check | its status | first line names | twin fails/warns | "
          "time |\n|---|---|---|---|---|---|")


def report_lines(scored: list[Scored], totals: dict) -> list[str]:
  pct = lambda k, d: f"{totals[k]}/{d} ({100 * totals[k] / max(d, 1):.0f}%)"
  n = totals["bugs"]
  return [
      f"caught by the expected check (exit 1 from its FAIL): {pct('caught_by_expected_check', n)}",
      f"caught by any FAIL (exit 1): {pct('caught_by_any_fail', n)}",
      f"root cause right on the first line: {pct('right_root_cause', n)}",
      f"refused at build (exit 2): {totals['refused_at_build']}",
      f"FAILs on twins: {totals['twin_fails']} ({totals['distinct_twins']} distinct twins)",
      f"WARNs on twins: {pct('twin_warn_pairs', totals['twin_pairs'])} of (twin, check) pairs "
      "that ran",
      f"time: {totals['seconds']} s"]
