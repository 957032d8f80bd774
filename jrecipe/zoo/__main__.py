"""`python -m jrecipe.zoo [--only=NAME,...] [--kind=model,loss,...] [--check=NAME] [--json=PATH]`:
the planted-bug zoo through `--mode=check`'s code path, scored (jrecipe/zoo/run.py).

Exit status 0 when the issue-18 targets hold (>= 95% caught by the expected check, >= 90%
right root cause, 0 FAIL on twins, <= 5% WARN pairs), 1 otherwise, 2 for a bad flag.
"""

import argparse
import json
import sys
import time

from jrecipe.zoo import entries as entries_lib
from jrecipe.zoo import run


def _select(args) -> list:
  chosen = list(entries_lib.ENTRIES)
  only = [n for n in (args.only or "").split(",") if n]
  bad = [n for n in only if n not in entries_lib.BY_NAME]
  if bad:
    sys.exit(f"jrecipe.zoo: unknown entries {bad}; valid: {', '.join(entries_lib.BY_NAME)}")
  if only:
    chosen = [entries_lib.BY_NAME[n] for n in only]
  if args.kind:
    chosen = [e for e in chosen if e.kind in args.kind.split(",")]
  if args.check:
    chosen = [e for e in chosen if e.check in args.check.split(",")]
  return chosen


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jrecipe.zoo", description=__doc__.splitlines()[0])
  p.add_argument("--only", help="comma-separated entry names")
  p.add_argument("--kind", help="model, loss, optimizer, data (comma-separated)")
  p.add_argument("--check", help="entries whose expected check is one of these")
  p.add_argument("--json", help="write every outcome and the scores here")
  p.add_argument("--full_budgets", action="store_true",
                 help="the configs' own check budgets instead of run.FAST_BUDGETS")
  p.add_argument("--list", action="store_true", help="list the entries and exit")
  p.add_argument("--compilation_cache", default=None,
                 help="JAX persistent cache directory (jrecipe's default when unset)")
  args = p.parse_args(argv)
  chosen = _select(args)
  if args.list:
    for e in chosen:
      print(f"{e.name:<42} {e.check:<28} {e.taxonomy}")
    return 0
  from jrecipe import runtime
  runtime.enable_compilation_cache(args.compilation_cache)
  print(run.HEADER, flush=True)
  t0 = time.perf_counter()
  budgets = None if args.full_budgets else run.FAST_BUDGETS
  scored = run.run_zoo(chosen, budgets=budgets, progress=lambda s: print(run.row(s), flush=True))
  totals = run.summary(scored, time.perf_counter() - t0)
  for line in run.report_lines(scored, totals):
    print(line)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"summary": totals, "entries": [
          {"name": s.entry.name, "check": s.entry.check, "cause": s.entry.root,
           "bug": s.bug.__dict__, "twin": s.twin.__dict__} for s in scored]}, f, indent=1)
  n = max(totals["bugs"], 1)
  ok = (totals["caught_by_expected_check"] >= 0.95 * n and totals["right_root_cause"] >= 0.9 * n
        and totals["twin_fails"] == 0
        and totals["twin_warn_pairs"] <= 0.05 * max(totals["twin_pairs"], 1))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
