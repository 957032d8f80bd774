"""Battery time (`--mode=check`, end to end) per config, interleaved rounds, medians.

    python bench/battery.py --configs=configs/mnist5k_cnn.py,configs/digits_seq_transformer.py --rounds=3

Each round runs every config once (so a machine shared with other work slows all configs
alike); the first, unreported warm-up run fills JAX's persistent compilation cache, so the
figures are the issue-18 targets' 'persistent cache warm' (mnist5k CNN <= 60 s,
digits_seq_transformer <= 45 s). Prints each run's wall seconds, the battery's own seconds
(checks.json) and the median per config.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(config: str) -> dict:
  with tempfile.TemporaryDirectory() as wd:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "jrecipe", f"--config={config}", f"--workdir={wd}",
                        "--mode=check"], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
      with open(os.path.join(wd, "checks.json")) as f:
        report = json.load(f)
    except OSError:
      return {"wall": wall, "exit": r.returncode, "error": r.stderr[-300:]}
  return {"wall": wall, "battery": report["seconds"], "exit": r.returncode,
          "summary": report["summary"]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="configs/mnist5k_cnn.py,configs/digits_seq_transformer.py")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  configs = args.configs.split(",")
  print(f"load average at start: {os.getloadavg()}", flush=True)
  for c in configs:  # warm-up: fills the persistent cache, not reported
    print(f"warm-up {c}: {run_once(c)['wall']:.1f} s", flush=True)
  runs = {c: [] for c in configs}
  for k in range(args.rounds):
    for c in configs:
      r = run_once(c)
      runs[c].append(r)
      print(f"round {k} {c}: wall {r['wall']:.1f} s, battery {r.get('battery', float('nan'))} "
            f"s, exit {r['exit']}", flush=True)
  out = {c: {"median_wall_s": statistics.median(r["wall"] for r in rs),
             "median_battery_s": statistics.median(r.get("battery", float("nan")) for r in rs),
             "runs": rs} for c, rs in runs.items()}
  for c, o in out.items():
    print(f"{c}: median wall {o['median_wall_s']:.1f} s, battery {o['median_battery_s']:.1f} s "
          f"over {args.rounds} rounds")
  print(f"load average at end: {os.getloadavg()}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
