"""CLI fuzzer of config overrides: generated cases as real `python -m jrecipe` subprocesses.

    python -m bench.fuzz --cases=300 [--jobs=2] [--seed=0] [--out=/tmp/fuzz]

Each case is `jrecipe --config=configs/digits_mlp.py:smoke OVERRIDES --workdir=W` (--mode=train)
with overrides from tests/config_fuzz.py (labelled nonsense or plausible), in a new work
directory or in a copy of a finished run (alternately), plus the cases issue 19 listed. Each is
bounded to --timeout seconds (60): past it the process gets a SIGTERM, and one that then exits
75 within 15 s was a long valid run (a preemption), not a hang; one that does not is a hang
(killed).

It prints counts of: tracebacks, hangs, exit statuses outside 0/1/2/75, refusals that are not
one paragraph, nonsense accepted silently (a nonsense case that exits 0), nonsense reported as
a run failure (exit 1 instead of 2), work directories half-written by a refusal (a new one that
exists, or a finished run whose files changed), and finished runs with duplicated metric rows.
Issue 19 acceptance: 0 tracebacks, 0 hangs, 0 silently accepted nonsense in >= 300 cases.
"""

import argparse
import collections
import concurrent.futures
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
from tests.config_fuzz import snapshot  # noqa: E402  (the property tests' own comparison)

BASE = ["--config=configs/digits_mlp.py:smoke", "--config.model.hidden=(32,)"]


def generated(n: int, seed: int) -> list:
  """n labelled cases from the property tests' generator, reproducibly for `seed`."""
  import hypothesis
  from hypothesis import HealthCheck, given, settings
  from tests.config_fuzz import cases
  out = []

  @hypothesis.seed(seed)
  @settings(max_examples=n, database=None, deadline=None,
            suppress_health_check=list(HealthCheck))
  @given(case=cases())
  def collect(case):
    if len(out) < n:
      out.append(case)

  collect()
  return out


def _full_disk():
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not a killed process
  resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))


def listed(tmp: str) -> list[dict]:
  """Issue 19's cases: {'name', 'args' (replacing BASE+workdir when 'raw'), 'expect', ...}."""
  a_file = os.path.join(tmp, "a_file")
  open(a_file, "w").close()
  c = lambda name, extra, expect, **k: dict(name=name, extra=extra, expect=expect, **k)
  return [
      c("empty --workdir", [], 2, workdir=""),
      c("workdir is a file", [], 2, workdir=a_file),
      c("workdir under a file", [], 2, workdir=os.path.join(a_file, "run")),
      c("workdir in a read-only file system (/proc)", [], 2, workdir="/proc/jrecipe_fuzz"),
      c("data_dir is /etc/passwd", ["--config.data.data_dir=/etc/passwd"], 2),
      c("pmap, num_devices=-1", ["--config.parallel.mode=pmap",
                                 "--config.parallel.num_devices=-1"], 2),
      c("monitor.every_steps=-1", ["--config.monitor.every_steps=-1"], 2),
      c("monitor.probe_examples=0", ["--config.monitor.probe_examples=0"], 2),
      c("a billion hidden units", ["--config.model.hidden=(1000000000,)"], 2),
      c("config variant typo", ["--config=configs/digits_mlp.py:smok"], 2),
      c("eval_splits (removed)", ["--config.eval_splits=('validation',)"], 2),
      c("warmup longer than the run", ["--config.schedule.name=cosine",
                                       "--config.schedule.warmup=1000"], 0, needle="warmup"),
      c("search metric f1", ["--mode=search", "--config.search.metric=f1"], 2),
      c("full disk (RLIMIT_FSIZE 16 KiB)", ["--config.num_epochs=20",
                                            "--config.checkpoint.every_epochs=10"], 1,
        preexec=_full_disk),
  ]


def _run(args, timeout: float, preexec=None) -> tuple[int, str, str]:
  """(exit status, stderr, how: 'exit' | 'preempted' | 'hang')."""
  p = subprocess.Popen([sys.executable, "-m", "jrecipe", *args], cwd=REPO, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec)
  try:
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err, "exit"
  except subprocess.TimeoutExpired:
    p.send_signal(signal.SIGTERM)
    try:
      _, err = p.communicate(timeout=15)
      return p.returncode, err, "preempted" if p.returncode == 75 else "hang"
    except subprocess.TimeoutExpired:
      p.kill()
      _, err = p.communicate()
      return p.returncode, err, "hang"


def _problems(case: dict, code: int, err: str, how: str, wd: str, before) -> list[str]:
  found = []
  if "Traceback" in err:
    found.append("traceback")
  if how == "hang":
    found.append("hang")
  if code not in (0, 1, 2, 75):
    found.append(f"exit status {code}")
  if code in (1, 2):
    errors = re.findall(r"^jrecipe: error: .*$", err, re.M)
    if len(errors) != 1:
      found.append(f"{len(errors)} error paragraphs")
  if case.get("nonsense") and code == 0:
    found.append("nonsense accepted silently")
  if case.get("nonsense") and code == 1:
    found.append("nonsense reported as a run failure")
  if "expect" in case and code != case["expect"] and how != "hang":
    found.append(f"expected exit {case['expect']}, got {code}")
  if case.get("needle") and case["needle"] not in err:
    found.append(f"no {case['needle']!r} on stderr")
  if code == 2 and before is None and wd and os.path.isdir(wd):
    found.append("refusal left a new work directory behind")
  if code == 2 and before is not None and snapshot(wd) != before:
    found.append("refusal changed the finished run")
  metrics = os.path.join(wd, "metrics.jsonl") if wd else ""
  if code == 0 and metrics and os.path.exists(metrics):
    rows = [(r.get("split"), r.get("step")) for r in map(json.loads, open(metrics))]
    if len(rows) != len(set(rows)):
      found.append("duplicated metric rows")
  return found


def run_case(i: int, case: dict, tmp: str, finished: tuple, timeout: float) -> dict:
  existing = case.get("existing", False)
  if "workdir" in case:
    wd, before = case["workdir"], None
  elif existing:
    wd = os.path.join(tmp, f"case{i}")
    shutil.copytree(finished[0], wd)
    before = snapshot(wd)
  else:
    wd, before = os.path.join(tmp, f"case{i}"), None
  extra = list(case["extra"])
  base = [a for a in BASE if not (a.startswith("--config=") and
                                  any(e.startswith("--config=") for e in extra))]
  t = time.perf_counter()
  code, err, how = _run([*base, *extra, f"--workdir={wd}"], timeout, case.get("preexec"))
  found = _problems(case, code, err, how, wd, before)
  if wd.startswith(tmp):
    shutil.rmtree(wd, ignore_errors=True)
  return {"i": i, "name": case.get("name", ""), "extra": extra, "nonsense": case.get("nonsense"),
          "existing": existing, "exit": code, "how": how, "seconds": time.perf_counter() - t,
          "problems": found, "stderr_tail": err.strip().splitlines()[-1:] if found else []}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cases", type=int, default=300)
  ap.add_argument("--jobs", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--timeout", type=float, default=60.0)
  ap.add_argument("--out", default=None, help="write every case's result here as JSON lines")
  args = ap.parse_args(argv)
  sys.path.insert(0, REPO)
  tmp = tempfile.mkdtemp(prefix="jrecipe_fuzz_")
  finished = os.path.join(tmp, "finished")
  code, err, _ = _run([*BASE, f"--workdir={finished}"], 600)
  assert code == 0, err[-2000:]
  todo = [dict(c) for c in listed(tmp)]
  for n, case in enumerate(generated(args.cases, args.seed)):
    todo.append({"name": case.why or "plausible", "extra": list(case.overrides),
                 "nonsense": case.nonsense, "existing": n % 2 == 1})
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    results = list(pool.map(lambda ic: run_case(*ic, tmp, (finished,), args.timeout),
                            enumerate(todo)))
  wall = time.perf_counter() - t0
  shutil.rmtree(tmp, ignore_errors=True)
  if args.out:
    with open(args.out, "w") as f:
      for r in results:
        f.write(json.dumps(r) + "\n")
  _print(results, wall, len(todo) - args.cases)
  return 0 if not any(r["problems"] for r in results) else 1


def _print(results: list, wall: float, n_listed: int) -> None:
  exits = collections.Counter(r["exit"] for r in results)
  problems = collections.Counter(p.split(",")[0] for r in results for p in r["problems"])
  gen = results[n_listed:]
  print(f"{len(results)} cases ({n_listed} listed in issue 19, {len(gen)} generated: "
        f"{sum(bool(r['nonsense']) for r in gen)} nonsense, "
        f"{sum(not r['nonsense'] for r in gen)} plausible) in {wall:.0f} s")
  print("exit statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(exits.items())))
  print(f"long valid runs stopped by SIGTERM: {sum(r['how'] == 'preempted' for r in results)}")
  for name in ("traceback", "hang", "nonsense accepted silently",
               "nonsense reported as a run failure", "refusal left a new work directory behind",
               "refusal changed the finished run", "duplicated metric rows"):
    print(f"{name}: {problems.pop(name, 0)}")
  for name, n in sorted(problems.items()):
    print(f"{name}: {n}")
  for r in results:
    if r["problems"]:
      print(f"  case {r['i']} ({r['name']}): {r['extra']} -> exit {r['exit']}: "
            f"{'; '.join(r['problems'])} | {' '.join(r['stderr_tail'])[:300]}")


if __name__ == "__main__":
  sys.exit(main())
