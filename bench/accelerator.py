"""ResNet-18 on CIFAR-10-shaped synthetic data: jrecipe's loop, a hand-written `jax.jit` loop
and PyTorch (`torch.compile`, channels_last, bfloat16 autocast), interleaved round by round.

    python bench/accelerator.py --out DIR             # a GPU: batch 512, width 64, bfloat16
    python bench/accelerator.py --out DIR --reduced   # this CPU: the same code, tiny sizes

Each runner lives in a process of its own (JAX and PyTorch each load their own CUDA
libraries; one JAX client per process), built and warmed up first; then every round times
`--steps` steps of each runner in turn (the order rotated), so all three see the same
machine. Printed and written to DIR/results.json: images/s and step time (median and range
over rounds) and MFU = the step's FLOPs (XLA's cost analysis of jrecipe's compiled step; the
same architecture for the other two) / step time / the device's peak (jrecipe.profile: the
datasheet table on a GPU or TPU, a measured matmul peak on a CPU). Every runner feeds its
step host batches gathered by a numpy permutation from the same normalised arrays, so the
input path costs the three the same.

Recipe stage 6 ('squeeze out the juice'): a framework must cost nothing next to a hand loop.
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
sys.path.insert(0, REPO)

from bench.runners import permutation_batches  # noqa: E402  (numpy only: every worker)

SIZES = {  # --reduced: minutes of compile on a 2-core CPU become seconds
    "full": {"batch": 512, "width": 64, "steps": 50, "rounds": 5, "train": 16384},
    "reduced": {"batch": 16, "width": 4, "steps": 3, "rounds": 2, "train": 256},
}
RUNNERS = ("jrecipe", "hand", "torch")
LEARNING_RATE = 1e-3


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="", help="Folder for results.json, summary.txt, logs.")
  p.add_argument("--reduced", action="store_true", help="Tiny sizes (this CPU, the test).")
  for k in SIZES["full"]:
    p.add_argument(f"--{k}", type=int, default=0, help=f"Override the {k} (0: by mode).")
  p.add_argument("--precision", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--runners", default=",".join(RUNNERS))
  p.add_argument("--torch_compile", default="auto", choices=("auto", "on", "off"),
                 help="auto: on with CUDA, off on a CPU (inductor's CPU compile takes minutes).")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for k, v in SIZES["reduced" if args.reduced else "full"].items():
    if not getattr(args, k):
      setattr(args, k, v)
  return args


# --- runners (each in its worker process) -----------------------------------------------

def _config(args):
  from jrecipe.config_base import base_config
  c = base_config()
  c.data.name = "bench.accelerator_data:cifar_shaped"
  c.model.name, c.model.width = "resnet18", args.width
  c.batch_size, c.precision, c.ema_decay = args.batch, args.precision, 0.0
  c.optimizer.learning_rate = LEARNING_RATE
  c.progress, c.monitor.enabled = False, False
  return c


def jrecipe_runner(args):
  """`Trainer.run` with no hooks, on a mesh over every local device, as --mode=train runs."""
  import jax
  from jrecipe import experiment, profile
  from jrecipe.train import parallel
  from jrecipe.train.trainer import Trainer
  exp = experiment.build(_config(args))
  trainer = Trainer.from_experiment(exp, parallel.make_placement("mesh"))
  h = {"state": trainer.to_device(trainer.initial_state()), "step": 0}
  batch = trainer.placement.put_batch(next(trainer.batches(0)))
  flops = profile.step_flops(trainer.step, h["state"], batch)

  def run(n):
    loop = trainer.run(h["state"], start_step=h["step"], num_steps=n)
    jax.block_until_ready(loop.state)
    h["state"], h["step"] = loop.state, loop.step

  peak, source = profile.device_peak(args.precision)
  return run, {"flops": flops, "peak_tflops": peak, "peak_source": source,
               "devices": trainer.placement.global_devices}


def hand_runner(args):
  """A minimal `jax.jit` loop over the same Linen ResNet: casts to the compute dtype by hand,
  optax.adam, BatchNorm statistics threaded through, state donated."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jrecipe import experiment, profile
  exp = experiment.build(_config(args))
  module, dtype = exp.model.module, jnp.dtype(args.precision)
  x_all = np.asarray(exp.data.arrays["train"]["x"])
  y_all = np.asarray(exp.data.arrays["train"]["y"])
  variables = jax.jit(lambda k, x: module.init(k, x, train=False))(jax.random.key(0), x_all[:2])
  tx = optax.adam(LEARNING_RATE)

  def step(params, stats, opt_state, x, y):
    def loss_fn(p):
      low = jax.tree.map(lambda a: a.astype(dtype), p)
      logits, new = module.apply({"params": low, "batch_stats": stats}, x.astype(dtype),
                                 train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
      return loss.mean(), new["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  jstep = jax.jit(step, donate_argnums=(0, 1, 2))
  h = {"s": (variables["params"], variables["batch_stats"], tx.init(variables["params"]))}
  order = permutation_batches(len(y_all), args.batch)
  idx = next(order)
  flops = profile.step_flops(jstep, *h["s"], x_all[idx], y_all[idx])

  def run(n):
    for _ in range(n):
      i = next(order)
      *h["s"], loss = jstep(*h["s"], jax.device_put(x_all[i]), jax.device_put(y_all[i]))
    jax.block_until_ready(loss)

  return run, {"flops": flops}


def torch_runner(args):
  """PyTorch: the twin ResNet-18 (bench/accelerator_torch.py), channels_last, bfloat16
  autocast, torch.compile on CUDA, fused Adam; host batches copied with non_blocking."""
  import numpy as np
  import torch
  import torch.nn.functional as F
  from bench.accelerator_data import cifar_shaped
  from bench.accelerator_torch import ResNet18
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  x, y = cifar_shaped()["train"]
  x = x.astype(np.float32)
  x_all = (x - x.mean()) / x.std()  # jrecipe's data.normalize: the train split's scalar stats
  y_all = torch.from_numpy(y.astype(np.int64))
  model = ResNet18(10, args.width).to(dev, memory_format=torch.channels_last)
  opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, fused=dev == "cuda")
  compiled = args.torch_compile == "on" or (args.torch_compile == "auto" and dev == "cuda")
  forward = torch.compile(model) if compiled else model
  amp = torch.bfloat16 if args.precision == "bfloat16" else None

  def step(xb, yb):
    with torch.autocast(dev, dtype=amp or torch.float32, enabled=amp is not None):
      loss = F.cross_entropy(forward(xb).float(), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  order = permutation_batches(len(y_all), args.batch)

  def run(n):
    for _ in range(n):
      i = next(order)
      # NHWC memory viewed as NCHW: already channels_last strides, copied as they are.
      xb = torch.from_numpy(x_all[i]).permute(0, 3, 1, 2).to(dev, non_blocking=True)
      loss = step(xb, y_all[i].to(dev, non_blocking=True))
    loss.item()

  return run, {"torch": torch.__version__, "device": dev, "compiled": compiled}


def worker_main(args):
  """Protocol: 'READY {info}' once built and warm, then 'run N' -> 'DONE seconds'."""
  if args.worker != "torch":
    from jrecipe import runtime
    runtime.setup_processes(False, _config(args), "train")
  t = time.perf_counter()
  run, info = {"jrecipe": jrecipe_runner, "hand": hand_runner, "torch": torch_runner}[
      args.worker](args)
  run(2)  # compile and warm up (allocator, autotuning)
  run(5)
  info["build_seconds"] = round(time.perf_counter() - t, 2)
  print("READY " + json.dumps(info), flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "exit":
      return
    t = time.perf_counter()
    run(int(cmd[1]))
    print(f"DONE {time.perf_counter() - t}", flush=True)


# --- the parent: interleaved rounds --------------------------------------------------------

class Worker:
  """One runner's process, driven line by line; its stderr goes to OUT/<name>.log."""

  def __init__(self, name, args, out):
    argv = [a for a in sys.argv[1:] if not a.startswith("--worker")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.setdefault("JRECIPE_NUM_CPU_DEVICES", "1")  # a CPU run: one device, like the others
    env.setdefault("JRECIPE_BENCH_TRAIN", str(args.train))
    if name != "torch":  # two JAX clients and PyTorch share the GPU's memory
      env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")
    self.name, self.log = name, open(os.path.join(out, f"{name}.log"), "w")
    self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv,
                               f"--worker={name}"], cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=self.log, text=True)
    self.info = None

  def ready(self):
    """Waits for the worker to be built and warm; its info (FLOPs, peak, versions)."""
    if self.info is None:
      self.info = json.loads(self._read("READY"))
    return self.info

  def _read(self, tag):
    for line in self.p.stdout:
      if line.startswith(tag + " "):
        return line[len(tag) + 1:]
    raise RuntimeError(f"the {self.name} worker died: see {self.log.name}")

  def time(self, steps):
    self.p.stdin.write(f"run {steps}\n")
    self.p.stdin.flush()
    return float(self._read("DONE"))

  def close(self):
    if self.p.poll() is None:
      self.p.stdin.write("exit\n")
      self.p.stdin.flush()
      self.p.wait(timeout=60)
    self.log.close()


def summarize(seconds, args, flops, peak_tflops):
  """{images_per_s, step_ms, mfu}: median and range over rounds."""
  def stat(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
  step = [s / args.steps for s in seconds]
  out = {"images_per_s": stat([args.batch / s for s in step]),
         "step_ms": stat([1e3 * s for s in step])}
  if flops and peak_tflops:
    out["mfu"] = stat([flops / s / (peak_tflops * 1e12) for s in step])
  return out


def table(results) -> str:
  runners = results["runners"]
  lines = [f"{results['device']}: ResNet-18 (width {results['width']}), batch "
           f"{results['batch']}, {results['precision']}, {results['rounds']} rounds x "
           f"{results['steps']} steps; median (min-max)",
           f"{'runner':8s} {'images/s':>24s} {'step ms':>22s} {'MFU':>18s}"]
  for name, r in runners.items():
    mfu = r.get("mfu")
    lines.append(f"{name:8s} {_fmt(r['images_per_s'], 0):>24s} {_fmt(r['step_ms'], 2):>22s} "
                 f"{_fmt(mfu, 1, 100) + '%' if mfu else '-':>18s}")
  for a, b in (("jrecipe", "hand"), ("jrecipe", "torch")):
    if a in runners and b in runners:
      ratio = (runners[a]["images_per_s"]["median"] / runners[b]["images_per_s"]["median"])
      lines.append(f"{a}/{b} images/s: {ratio:.3f}x")
  lines.append(f"FLOPs/step {results['flops_per_step']:.4g} (XLA cost analysis); peak "
               f"{results['peak_tflops']:.4g} TFLOP/s ({results['peak_source']})")
  return "\n".join(lines)


def _fmt(s, digits, scale=1.0):
  return (f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-"
          f"{s['max'] * scale:.{digits}f})")


def main(args):
  out = args.out or tempfile.mkdtemp(prefix="jrecipe_accelerator_")
  os.makedirs(out, exist_ok=True)
  names = [n for n in args.runners.split(",") if n]
  workers, t0 = {}, time.perf_counter()
  try:
    for name in names:  # built side by side (the compiles dominate the start), timed apart
      workers[name] = Worker(name, args, out)
    for w in workers.values():
      w.ready()
    times = {n: [] for n in names}
    for r in range(args.rounds):
      order = names[r % len(names):] + names[:r % len(names)]
      for name in order:
        times[name].append(workers[name].time(args.steps))
  finally:
    for w in workers.values():
      w.close()
  first = workers[names[0]].info if names else {}
  flops = (workers["jrecipe"].info if "jrecipe" in workers else first).get("flops", 0.0)
  peak = first.get("peak_tflops", 0.0)
  results = {"device": _device_name(), "batch": args.batch, "width": args.width,
             "precision": args.precision, "rounds": args.rounds, "steps": args.steps,
             "flops_per_step": flops, "peak_tflops": peak,
             "peak_source": first.get("peak_source", ""),
             "wall_seconds": round(time.perf_counter() - t0, 1),
             "runners": {n: {**summarize(times[n], args, flops, peak), "seconds": times[n],
                             "info": workers[n].info} for n in names}}
  text = table(results)
  print(text)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(out, "summary.txt"), "w") as f:
    f.write(text + "\n")
  return results


def _device_name() -> str:
  try:
    r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=20)
    if r.returncode == 0 and r.stdout.strip():
      return r.stdout.strip().splitlines()[0]
  except (OSError, subprocess.TimeoutExpired):
    pass
  import platform
  return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
  ARGS = parse()
  if ARGS.worker:
    worker_main(ARGS)
  else:
    main(ARGS)
