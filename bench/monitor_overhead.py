"""What babysitting costs: training with the monitor off vs on at its default cadence.

    python bench/monitor_overhead.py [--repeats 5] [--models mlp,cnn] [--cnn_epochs 2]

Runs `train_and_evaluate` in this process, interleaving monitor-off and monitor-on runs
(order alternating each repeat, after one untimed warm-up of each, with JAX's persistent
compilation cache on as on the command line), on the digits MLP (configs/digits_mlp.py as
shipped: 40 epochs, 360 steps) and a slice of the mnist5k CNN (configs/mnist5k_cnn.py,
`--cnn_epochs` epochs). Per run it reads summary.json's numbers:
- step time: (train_seconds - first_step_seconds) / (steps - 1): every step after the first
  one, including evaluation, logging, checkpoints and all the monitor's cadence work
  (monitored steps, probes, images) but not the first step's compilation;
- wall: the whole train_and_evaluate call (init, parameter overview, the probe at init, the
  diagnoses and report.html at the end).
Prints medians per model and mode and the on/off ratios of the medians (the issue's target:
step-time ratio <= 1.10).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.expanduser("~/.cache/jrecipe/jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(name: str, epochs: float = 0):
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.progress = False
  if epochs:
    c.num_epochs = epochs
  return c


def one_run(config, monitor: bool) -> dict:
  from jrecipe.train.loop import train_and_evaluate
  config.monitor.enabled = monitor
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    s = train_and_evaluate(config, os.path.join(d, "run"))
    wall = time.perf_counter() - t0
  steady = (s["train_seconds"] - s["first_step_seconds"]) / max(s["step"] - 1, 1)
  return {"step_ms": 1e3 * steady, "wall_s": wall, "steps": s["step"]}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--models", default="mlp,cnn")
  ap.add_argument("--cnn_epochs", type=float, default=2)
  args = ap.parse_args()
  from jrecipe import runtime
  runtime.tune_cpu_xla()
  runtime.enable_compilation_cache(None)
  import logging
  logging.getLogger("jrecipe").setLevel(logging.WARNING)
  configs = {"mlp": lambda: load_config("digits_mlp"),
             "cnn": lambda: load_config("mnist5k_cnn", args.cnn_epochs)}
  for model in args.models.split(","):
    runs = {False: [], True: []}
    for mon in (False, True):  # warm-up: compilation cache, dataset cache, imports
      one_run(configs[model](), mon)
    for i in range(args.repeats):
      order = (False, True) if i % 2 == 0 else (True, False)
      for mon in order:
        runs[mon].append(one_run(configs[model](), mon))
    med = {m: {k: statistics.median(r[k] for r in runs[m]) for k in ("step_ms", "wall_s")}
           for m in runs}
    steps = runs[True][0]["steps"]
    print(f"{model} ({steps} steps, {args.repeats} interleaved pairs):")
    for m, label in ((False, "monitor off"), (True, "monitor on (default cadence)")):
      print(f"  {label:<30} median step {med[m]['step_ms']:.3f} ms   median wall "
            f"{med[m]['wall_s']:.2f} s   (steps: "
            + ", ".join(f"{r['step_ms']:.3f}" for r in runs[m]) + ")")
    print(f"  ratio on/off: step time {med[True]['step_ms'] / med[False]['step_ms']:.3f}, "
          f"wall {med[True]['wall_s'] / med[False]['wall_s']:.3f}", flush=True)


if __name__ == "__main__":
  main()
