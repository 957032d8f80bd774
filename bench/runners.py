"""The loops the benchmark times, each as a runner: jrecipe's Trainer, a hand-written loop, PyTorch.

A runner is a dict with run(n) -> None (n steps, blocking at the end), reset(), accuracy() ->
test accuracy, compile_seconds, and flops (one step, XLA's count) if known. `bench/framework.py`
drives them; `python -m jrecipe.bench` is its entry point.
"""

import os
import statistics
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = {
    "digits_mlp": {"config": "configs/digits_mlp.py", "target": 0.97, "max_epochs": 60},
    "mnist5k_cnn": {"config": "configs/mnist5k_cnn.py", "target": 0.97, "max_epochs": 15},
}
# Families whose step is recorded for `runtime.choose_cpu_devices`.
FAMILY = {"digits_mlp": "mlp", "mnist5k_cnn": "cnn"}


# ------------------------------------------------------------------------------------------
# Timing helpers
def stats(xs):
  xs = [x for x in xs if x is not None]
  if not xs:
    return None
  return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def fmt(s, scale=1.0, digits=0):
  if not s:
    return "-"
  return (f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-"
          f"{s['max'] * scale:.{digits}f})")


def timed(fn):
  """(wall seconds, process CPU seconds) of fn()."""
  w, c = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w, time.process_time() - c


def load_config(name, ema_decay=0.0):
  import importlib.util
  path = os.path.join(REPO, WORKLOADS[name]["config"])
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.progress = False
  c.ema_decay = ema_decay
  return c


def permutation_batches(n, bs, seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  while True:
    perm = rng.permutation(n)
    for i in range(n // bs):
      yield perm[i * bs:(i + 1) * bs]


# ------------------------------------------------------------------------------------------
# Runners: each is a dict with run(n) -> None (n steps, blocking at the end), reset(),
# accuracy() -> test accuracy, compile_seconds, flops (one step, XLA's count) if known.
def stream_config(config):
  """The same config reading its dataset through the streaming pipeline (data.pipeline)."""
  c = config.copy_and_resolve_references()
  c.data.pipeline = "stream"
  return c


def jrecipe_runner(config, exp=None):
  """jrecipe's own loop: `Trainer.run` (step-indexed batches, explicit transfers, the jitted
  pure step with state donation), with no hooks, as every mode drives it. With
  `stream_config(config)` the batches come from the streaming pipeline instead."""
  import jax
  from jrecipe import experiment
  from jrecipe.train import parallel
  from jrecipe.train.evaluate import Evaluator
  from jrecipe.train.state import variables_of
  from jrecipe.train.trainer import Trainer
  placement = parallel.make_placement(config.parallel.mode, config.parallel.num_devices)
  exp = exp or experiment.build(config, bn_axis_name=placement.axis_name)
  trainer = Trainer.from_experiment(exp, placement)
  evaluator = Evaluator(exp, placement)
  h = {}

  def reset():
    h["state"] = trainer.to_device(trainer.initial_state())
    h["step"] = 0
    # One batch iterator for the whole run, as training has: a streamed dataset's grain
    # pipeline (threads, prefetch buffer) is started once, not once per timed round.
    h["batches"] = trainer.batches(0)

  def run(n):
    loop = trainer.run(h["state"], start_step=h["step"], num_steps=n, batches=h["batches"])
    jax.block_until_ready(loop.state)
    h["state"], h["step"] = loop.state, loop.step

  def accuracy():
    return evaluator(variables_of(h["state"]), "test")["accuracy"]

  reset()
  compile_s = timed(lambda: run(1))[0]
  return {"run": run, "reset": reset, "accuracy": accuracy, "compile_seconds": compile_s,
          "exp": exp, "devices": placement.global_devices}


def hand_runner(exp, config):
  """A minimal `jax.jit` loop: the same Linen module, optax.adam, a numpy permutation."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  module = exp.model.module
  ema_decay = config.ema_decay
  # Host arrays gathered with numpy and handed to the jitted step, as the Flax examples do.
  x_all = np.asarray(exp.data.arrays["train"]["x"])
  y_all = np.asarray(exp.data.arrays["train"]["y"])
  tx = optax.adam(config.optimizer.learning_rate)

  def step(params, opt_state, ema, t, x, y):
    def loss_fn(p):
      logits = module.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if ema_decay:
      d = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
    return params, opt_state, ema, t + 1, loss

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
  jstep = jax.jit(step, in_shardings=(rep, rep, rep, rep, data, data),
                  out_shardings=(rep,) * 5, donate_argnums=(0, 1, 2))
  predict = jax.jit(lambda p, x: jnp.argmax(module.apply({"params": p}, x), -1))
  h = {}

  def reset():
    params = jax.device_put(module.init(jax.random.PRNGKey(0), x_all[:2])["params"], rep)
    h["p"], h["o"] = params, jax.device_put(tx.init(params), rep)
    h["e"] = jax.tree.map(jnp.copy, params) if ema_decay else {}
    h["t"] = jax.device_put(jnp.zeros((), jnp.float32), rep)
    h["idx"] = permutation_batches(len(y_all), config.batch_size)

  # On several CPU devices, the same guard as jrecipe's (parallel.guard_cpu_collectives):
  # one step in flight, or the all-reduce rendezvous can abort.
  block = len(jax.devices()) > 1 and jax.default_backend() == "cpu"

  def run(n):
    p, o, e, t, loss = h["p"], h["o"], h["e"], h["t"], None
    for _ in range(n):
      i = next(h["idx"])
      p, o, e, t, loss = h["step"](p, o, e, t, x_all[i], y_all[i])
      if block:
        loss.block_until_ready()
    jax.block_until_ready((p, loss))
    h["p"], h["o"], h["e"], h["t"] = p, o, e, t

  def accuracy():
    test = exp.data.arrays["test"]
    return float(np.mean(np.asarray(predict(h["p"], test["x"])) == test["y"]))

  reset()
  i = next(permutation_batches(len(y_all), config.batch_size))
  t0 = time.perf_counter()
  compiled = jstep.lower(h["p"], h["o"], h["e"], h["t"], x_all[i], y_all[i]).compile()
  flops = None
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) or None
  except Exception:  # cost analysis is best effort (backend dependent)
    pass
  h["step"] = compiled
  run(1)
  compile_s = time.perf_counter() - t0
  return {"run": run, "reset": reset, "accuracy": accuracy, "compile_seconds": compile_s,
          "flops": flops}


def torch_available() -> bool:
  import importlib.util
  return importlib.util.find_spec("torch") is not None


def torch_runner(exp, config, probe_threads=True):
  """The same model in plain PyTorch (CPU): Adam, cross-entropy, a numpy permutation."""
  import numpy as np
  import torch
  import torch.nn.functional as F
  from torch import nn
  torch.manual_seed(0)
  x_all = np.asarray(exp.data.arrays["train"]["x"])
  y_all = np.asarray(exp.data.arrays["train"]["y"]).astype(np.int64)
  test_x = np.asarray(exp.data.arrays["test"]["x"])
  test_y = np.asarray(exp.data.arrays["test"]["y"])
  classes = exp.spec.num_classes
  if config.model.name == "cnn":  # the Flax MNIST example's ConvNet, NCHW
    def to_t(x):
      return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    h_, w_ = x_all.shape[1:3]

    def make():
      return nn.Sequential(
          nn.Conv2d(x_all.shape[3], 32, 3, padding=1), nn.ReLU(),
          nn.AvgPool2d(2, ceil_mode=True), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
          nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(),
          nn.Linear(64 * -(-h_ // 4) * -(-w_ // 4), 256), nn.ReLU(), nn.Linear(256, classes))
  elif config.model.name == "mlp":
    def to_t(x):
      return torch.from_numpy(np.ascontiguousarray(x.reshape(len(x), -1)))

    def make():
      layers, width = [], int(np.prod(x_all.shape[1:]))
      for w in config.model.hidden:
        layers += [nn.Linear(width, w), nn.ReLU()]
        width = w
      return nn.Sequential(*layers, nn.Linear(width, classes))
  else:
    raise ValueError(f"no PyTorch twin for model {config.model.name!r}")
  xt, yt, test_xt = to_t(x_all), torch.from_numpy(y_all), to_t(test_x)
  ema_decay = config.ema_decay
  h = {}

  def reset():
    torch.manual_seed(0)
    h["model"] = make()
    h["opt"] = torch.optim.Adam(h["model"].parameters(), lr=config.optimizer.learning_rate)
    h["ema"] = [p.detach().clone() for p in h["model"].parameters()] if ema_decay else None
    h["t"] = 0
    h["idx"] = permutation_batches(len(y_all), config.batch_size)

  def run(n):
    model, opt = h["model"], h["opt"]
    model.train()
    for _ in range(n):
      i = torch.from_numpy(next(h["idx"]))
      loss = F.cross_entropy(model(xt[i]), yt[i])
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      if ema_decay:
        t = h["t"]
        d = min(ema_decay, (1.0 + t) / (10.0 + t))
        with torch.no_grad():
          torch._foreach_lerp_(h["ema"], list(model.parameters()), 1.0 - d)
      h["t"] += 1
    loss.item()  # torch runs eagerly; this only reads the last loss

  def accuracy():
    model = h["model"]
    model.eval()
    with torch.no_grad():
      pred = torch.cat([model(test_xt[i:i + 1000]).argmax(-1)
                        for i in range(0, len(test_xt), 1000)])
    return float((pred.numpy() == test_y).mean())

  reset()
  compile_s = timed(lambda: run(1))[0]
  # PyTorch's best thread count: its OpenMP threads spin at barriers, and on a loaded 2-core
  # machine 2 threads ran 6-15x slower than 1 (an MLP: 217 vs 14-36 steps/s). Give PyTorch
  # whichever is faster here, measured now.
  from jrecipe import runtime
  counts = sorted({1, runtime.host_cores()}) if probe_threads else [torch.get_num_threads()]
  speed = {}
  for _ in range(2):
    for n in counts:
      torch.set_num_threads(n)
      speed.setdefault(n, []).append(timed(lambda: run(10))[0])
  best = min(counts, key=lambda n: min(speed[n]))
  torch.set_num_threads(best)
  reset()
  return {"run": run, "reset": reset, "accuracy": accuracy, "compile_seconds": compile_s,
          "threads": best, "model": lambda: h["model"]}


def time_to_target(r, steps_per_epoch, target, max_epochs):
  """Training seconds (evaluation excluded) until the test accuracy reaches `target`."""
  r["reset"]()
  seconds, acc = 0.0, 0.0
  for epoch in range(1, max_epochs + 1):
    seconds += timed(lambda: r["run"](steps_per_epoch))[0]
    acc = r["accuracy"]()
    if acc >= target:
      return {"seconds": seconds, "epochs": epoch, "accuracy": acc}
  return {"seconds": None, "epochs": max_epochs, "accuracy": acc, "note": "target not reached"}
