"""jrecipe.memory's estimate beside XLA's own accounting of the compiled train step.

    python -m bench.memory_estimate [--batch_sizes=32,128,512]

For digits_mlp and the mnist5k CNN: the estimate (from shapes, no compilation: state, gradients,
activations) and, for the same step compiled by XLA on this backend, `memory_analysis()`:
argument bytes (state + batch), output bytes (new state + metrics) and temporary bytes (what
the step allocates besides its arguments and outputs: gradients, activations, the update),
and the time each took. The estimate is meant to be an upper bound of arguments + temporaries.
"""

import argparse
import time

import jax
import numpy as np

from jrecipe import experiment, memory
from jrecipe.cli_config import load_config_with_overrides
from jrecipe.train import step as step_lib
from jrecipe.train.trainer import Trainer

CONFIGS = {"digits_mlp": "configs/digits_mlp.py", "mnist5k_cnn": "configs/mnist5k_cnn.py"}


def measure(name: str, batch: int) -> dict:
  exp = experiment.build(load_config_with_overrides(CONFIGS[name],
                                                    [f"--config.batch_size={batch}"]))
  t = time.perf_counter()
  est = memory.estimate(exp, devices=1)
  t_est = time.perf_counter() - t
  trainer = Trainer.from_experiment(exp)
  state = trainer.initial_state()
  x = exp.data.arrays["train"]["x"][:batch]
  y = exp.data.arrays["train"]["y"][:batch]
  fn = jax.jit(step_lib.make_train_step(trainer.parts), donate_argnums=0)
  t = time.perf_counter()
  compiled = fn.lower(state, {"x": np.asarray(x), "y": np.asarray(y)}).compile()
  t_xla = time.perf_counter() - t
  m = compiled.memory_analysis()
  return {"config": name, "batch": batch, "estimate": est.per_device, "state": est.state,
          "grads": est.grads, "activations": est.activations, "estimate_s": t_est,
          "xla_arguments": m.argument_size_in_bytes, "xla_outputs": m.output_size_in_bytes,
          "xla_temp": m.temp_size_in_bytes, "compile_s": t_xla}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch_sizes", default="32,128,512")
  args = ap.parse_args(argv)
  h = memory.human
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind})")
  print("config        batch  estimate (state+grads+2x activations)    XLA arguments+temp "
        "(temp)   estimate/XLA  estimate s  compile s")
  for name in CONFIGS:
    for b in map(int, args.batch_sizes.split(",")):
      r = measure(name, b)
      xla = r["xla_arguments"] + r["xla_temp"]
      print(f"{name:13s} {b:5d}  {h(r['estimate']):>9s} ({h(r['state'])}+{h(r['grads'])}+"
            f"{h(r['activations'] or 0)})  {h(xla):>12s} ({h(r['xla_temp'])})  "
            f"{r['estimate'] / xla:9.2f}  {r['estimate_s']:10.3f}  {r['compile_s']:9.2f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
