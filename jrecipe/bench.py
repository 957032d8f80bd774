"""`python -m jrecipe.bench`: the framework's training step against a minimal hand-written loop.

For each workload (digits MLP, mnist5k CNN) it runs, interleaved in one process so that both
see the same machine load:
  - jrecipe: the loop's own path (step-indexed batches -> placement.put_batch -> the jitted
    pure step with state donation), exactly as `train_and_evaluate` drives it;
  - hand: a minimal `jax.jit` loop written from scratch (optax.adam, the same Linen module,
    a numpy permutation per epoch, numpy batches handed to the jitted step);
and prints steps/s, examples/s and compile time as medians (min-max) over rounds, plus the
ratio jrecipe/hand (target >= 0.95, i.e. at most 5% overhead). `--full` also times a whole
`train_and_evaluate` run (evaluation and checkpoints included) to the target accuracy.
"""

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds per workload.")
flags.DEFINE_integer("steps", 200, "Timed steps per round.")
flags.DEFINE_list("workloads", ["digits_mlp", "mnist5k_cnn"], "Which workloads to run.")
flags.DEFINE_bool("full", True, "Also time a whole train_and_evaluate run of each config.")
flags.DEFINE_string("json", "", "Write the figures to this JSON file.")
FLAGS = flags.FLAGS

CONFIGS = {"digits_mlp": "configs/digits_mlp.py", "mnist5k_cnn": "configs/mnist5k_cnn.py"}


def _load_config(name):
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), CONFIGS[name])
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.progress = False
  c.parallel.mode = "single"
  return c


def _jrecipe_runner(config):
  import jax
  from jrecipe import experiment, optim
  from jrecipe.data import pipeline
  from jrecipe.train import loop, parallel, step as step_lib
  exp = experiment.build(config)
  placement = parallel.make_placement(config.parallel.mode)
  tx = exp.optimizer()
  state = placement.put_state(loop.init_train_state(exp, tx))
  fn = placement.compile_train(step_lib.make_train_step(
      exp.model, exp.loss, tx, l2=config.l2, ema_decay=config.ema_decay,
      augment=exp.augment_fn(), axis_name=placement.axis_name,
      needs_value_fn=optim.needs_value_fn(config.optimizer)))
  batches = pipeline.train_batches(exp.data, batch_size=config.batch_size, seed=config.seed)
  holder = {"state": state}
  t0 = time.perf_counter()
  s, m = fn(holder["state"], placement.put_batch(next(batches)))
  jax.block_until_ready(m)
  holder["state"] = s
  compile_s = time.perf_counter() - t0

  def run(n):
    st = holder["state"]
    t = time.perf_counter()
    for _ in range(n):
      st, m = fn(st, placement.put_batch(next(batches)))
    jax.block_until_ready((st, m))
    holder["state"] = st
    return time.perf_counter() - t

  return exp, run, compile_s


def _hand_runner(exp, config):
  """A minimal hand-written loop: the same Linen module, optax.adam, a numpy permutation."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  module = exp.model.module
  # Host arrays gathered with numpy and handed to the jitted step, as the Flax examples'
  # loops do (indexing device arrays instead costs two extra dispatches per step).
  x_all = np.asarray(exp.data.arrays["train"]["x"])
  y_all = np.asarray(exp.data.arrays["train"]["y"])
  n, bs = x_all.shape[0], config.batch_size
  params = module.init(jax.random.PRNGKey(0), x_all[:2])["params"]
  tx = optax.adam(config.optimizer.learning_rate)
  opt_state = tx.init(params)

  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = module.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  rng = np.random.default_rng(0)
  holder = {"p": params, "o": opt_state, "perm": rng.permutation(n), "i": 0}

  def next_batch():
    if (holder["i"] + 1) * bs > n:
      holder["perm"], holder["i"] = rng.permutation(n), 0
    idx = holder["perm"][holder["i"] * bs:(holder["i"] + 1) * bs]
    holder["i"] += 1
    return x_all[idx], y_all[idx]

  t0 = time.perf_counter()
  p, o, loss = step(holder["p"], holder["o"], *next_batch())
  jax.block_until_ready(loss)
  holder["p"], holder["o"] = p, o
  compile_s = time.perf_counter() - t0

  def run(k):
    p, o = holder["p"], holder["o"]
    t = time.perf_counter()
    for _ in range(k):
      p, o, loss = step(p, o, *next_batch())
    jax.block_until_ready((p, loss))
    holder["p"], holder["o"] = p, o
    return time.perf_counter() - t

  return run, compile_s


def _full_run(config):
  from jrecipe.train import loop
  with tempfile.TemporaryDirectory() as wd:
    t = time.perf_counter()
    summary = loop.train_and_evaluate(config, wd)
    wall = time.perf_counter() - t
  return {"wall_seconds": round(wall, 2), "train_seconds": summary["train_seconds"],
          "steps": summary["step"], "test_accuracy": summary["test"].get("accuracy"),
          "test_accuracy_ema": summary.get("test_ema", {}).get("accuracy")}


def _stats(xs):
  return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bench_workload(name, rounds, steps, full):
  config = _load_config(name)
  exp, jr_run, jr_compile = _jrecipe_runner(config)
  hand_run, hand_compile = _hand_runner(exp, config)
  jr_run(20)
  hand_run(20)  # warm both
  jr, hd, ratio = [], [], []
  for _ in range(rounds):
    a = steps / jr_run(steps)
    b = steps / hand_run(steps)
    jr.append(a)
    hd.append(b)
    ratio.append(a / b)
  out = {"workload": name, "batch_size": config.batch_size,
         "jrecipe_steps_per_s": _stats(jr), "hand_steps_per_s": _stats(hd),
         "ratio_jrecipe_over_hand": _stats(ratio),
         "jrecipe_examples_per_s": statistics.median(jr) * config.batch_size,
         "compile_seconds": {"jrecipe": round(jr_compile, 3), "hand": round(hand_compile, 3)}}
  if full:
    out["full_run"] = _full_run(_load_config(name))
  return out


def main(argv):
  del argv
  from jrecipe import runtime
  runtime.enable_compilation_cache()
  results = []
  for name in FLAGS.workloads:
    r = bench_workload(name, FLAGS.rounds, FLAGS.steps, FLAGS.full)
    results.append(r)
    s = r["ratio_jrecipe_over_hand"]
    print(f"{name}: jrecipe {r['jrecipe_steps_per_s']['median']:.0f} steps/s "
          f"({r['jrecipe_examples_per_s']:.0f} ex/s), hand loop "
          f"{r['hand_steps_per_s']['median']:.0f} steps/s; ratio {s['median']:.3f} "
          f"(min {s['min']:.3f}, max {s['max']:.3f}); compile {r['compile_seconds']}")
    if "full_run" in r:
      print(f"  full run: {r['full_run']}")
    sys.stdout.flush()
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
