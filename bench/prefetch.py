"""What prefetching batches to the device costs or saves in `Trainer.run`, interleaved A/B.

    python bench/prefetch.py [--config configs/digits_mlp.py] [--rounds 9] [--steps 300]

A: `Trainer.run` as it is (`parallel.prefetch`: batches copied two steps ahead). B: the same
loop copying each batch just before its step (what it did before), by replacing
`parallel.prefetch` with a plain map for that round. Same process, same compiled step,
alternating rounds; prints the median steps/s of each and the ratio A/B. The digits MLP's
step is the shortest of the shipped configs, so its ratio bounds the overhead on a CPU.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/digits_mlp.py")
  p.add_argument("--rounds", type=int, default=9)
  p.add_argument("--steps", type=int, default=300)
  args = p.parse_args()
  import jax
  from bench.runners import load_config, WORKLOADS
  from jrecipe import experiment, runtime
  from jrecipe.train import parallel
  from jrecipe.train.trainer import Trainer
  name = next((k for k, w in WORKLOADS.items() if w["config"] == args.config), None)
  config = load_config(name) if name else None
  if config is None:
    raise SystemExit(f"--config must be one of {[w['config'] for w in WORKLOADS.values()]}")
  runtime.setup_processes(False, config, "bench")  # one device: not a training mode
  exp = experiment.build(config)
  trainer = Trainer.from_experiment(exp, parallel.make_placement("single"))
  prefetching = parallel.prefetch
  plain = lambda batches, put, size=0: map(put, batches)  # noqa: E731  (the old loop)
  state = {"s": trainer.to_device(trainer.initial_state()), "step": 0}

  def timed(variant):
    parallel.prefetch = variant
    try:
      t = time.perf_counter()
      run = trainer.run(state["s"], start_step=state["step"], num_steps=args.steps)
      jax.block_until_ready(run.state)
      state["s"], state["step"] = run.state, run.step
      return args.steps / (time.perf_counter() - t)
    finally:
      parallel.prefetch = prefetching

  timed(prefetching)  # compile and warm up
  speeds = {"prefetch": [], "plain": []}
  for r in range(args.rounds):
    for k in (("prefetch", "plain") if r % 2 == 0 else ("plain", "prefetch")):
      speeds[k].append(timed(prefetching if k == "prefetch" else plain))
  med = {k: statistics.median(v) for k, v in speeds.items()}
  for k, v in speeds.items():
    print(f"{k:9s} steps/s median {med[k]:8.1f} (min {min(v):.1f}, max {max(v):.1f})")
  print(f"prefetch/plain: {med['prefetch'] / med['plain']:.3f}x "
        f"({args.rounds} rounds x {args.steps} steps, {config.model.name}, batch "
        f"{config.batch_size}, {jax.devices()[0].device_kind})")


if __name__ == "__main__":
  main()
