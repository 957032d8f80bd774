"""`python -m jrecipe.bench`: the project's benchmark. Recipe: 'overfit', fast.

For each workload (digits MLP, mnist5k CNN; batch 128) a worker process per CPU device count
(1, and one device per core) runs, interleaved round by round so that all see the same
machine load:
  - jrecipe: the training loop's own path (step-indexed batches -> Placement.put_batch, an
    explicit transfer -> the jitted pure step with state donation), as train_and_evaluate
    drives it, the batch split over the process's devices (mesh);
  - stream: the same loop with the dataset read through the streaming pipeline
    (data.pipeline='stream': grain over the ArrayRecord files, a batch at a time); its ratio
    to 'jrecipe' is the streaming path's cost on data that fits in memory;
  - hand: a minimal hand-written `jax.jit` loop (the same Linen module, optax.adam, a numpy
    permutation per epoch, numpy batches handed to the step; sharded the same way);
  - torch: the same model in plain PyTorch (when installed: `pip install torch==2.13.0`), in
    a process of its own (beside XLA's thread pools its OpenMP threads ran up to 1.7x slower).
It prints steps/s (wall clock and CPU time per step), examples/s, compile time, time to a
target test accuracy (training time, evaluation excluded), the fraction of this machine's
float32 matmul peak (numpy) reached, and the ratios, as medians (min-max) over rounds; then
the start-up time (process start to first train step of the real CLI, cold and warm
compilation cache) and the wall time of `--mode=check` and `--mode=inspect`. `--json PATH`
writes every figure. The split/one-device speedup of each model family is recorded in the
jrecipe cache dir, where `jrecipe.runtime.choose_cpu_devices` reads it.

All runners train without a parameter EMA unless `--ema_decay` is set (then all three keep
one), so that the comparison is like with like.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("rounds", 5, "Timing rounds, alternating between the device-count workers.")
flags.DEFINE_integer("steps", 100, "Timed steps per runner per round.")
flags.DEFINE_list("workloads", ["digits_mlp", "mnist5k_cnn"], "Which workloads to run.")
flags.DEFINE_list("devices", ["1", "cores"], "CPU device counts to run each workload with "
                  "('cores' = one per core).")
flags.DEFINE_list("runners", ["jrecipe", "stream", "hand", "torch"], "Which loops to time "
                  "(stream: jrecipe's loop on data.pipeline='stream').")
flags.DEFINE_float("ema_decay", 0.0, "Parameter EMA kept by every runner (0 = none).")
flags.DEFINE_bool("time_to_target", True, "Train each runner from scratch to the target test "
                  "accuracy (in the worker with the auto-chosen device count).")
flags.DEFINE_integer("startup_repeats", 2, "Warm-cache start-up measurements per workload "
                     "(after one cold); 0 = skip start-up timing.")
flags.DEFINE_list("end_to_end", ["check", "inspect"], "CLI modes timed end to end on the "
                  "digits MLP config ('' = none).")
flags.DEFINE_bool("xla_defaults", False, "Run every process with XLA's own CPU compiler "
                  "defaults instead of jrecipe's measured flags (runtime.CPU_XLA_FLAGS); "
                  "nothing is recorded for the auto device rule then.")
flags.DEFINE_bool("record", True, "Record each family's measured split speedup in the cache.")
flags.DEFINE_string("json", "", "Write the figures to this JSON file.")
flags.DEFINE_string("worker", "", "Internal: run one workload's timing in this process.")
FLAGS = flags.FLAGS

from bench.runners import (FAMILY, REPO, WORKLOADS, fmt, hand_runner,  # noqa: E402
                           jrecipe_runner, load_config, stats, stream_config, time_to_target,
                           timed, torch_available, torch_runner)

# ------------------------------------------------------------------------------------------
# Worker: one workload, this process's device count, every runner; driven round by round by
# the parent over stdin/stdout, so that workers with different device counts interleave.
class Worker:
  """Every runner of one workload built in this process (its devices), ready to time."""

  def __init__(self, name, runners, ema_decay):
    import jax
    self.name = name
    self.config = config = load_config(name, ema_decay)
    self.info = {"workload": name, "devices": jax.device_count(),
                 "batch_size": config.batch_size, "ema_decay": ema_decay, "runners": {},
                 "notes": []}
    from jrecipe import experiment
    from jrecipe.train import parallel
    placement = parallel.make_placement(config.parallel.mode, config.parallel.num_devices)
    self.exp = experiment.build(config, bn_axis_name=placement.axis_name)
    self.built = {}
    for kind in runners:
      if kind == "jrecipe":
        self.built[kind] = jrecipe_runner(config, self.exp)
      elif kind == "stream":  # the same loop, batches read from the ArrayRecord files
        self.built[kind] = jrecipe_runner(stream_config(config))
      elif kind == "hand":
        self.built[kind] = hand_runner(self.exp, config)
      elif kind == "torch":
        if not torch_available():
          self.info["notes"].append("PyTorch runner skipped: torch is not installed "
                                    "(pip install torch==2.13.0, or the 'bench' extra).")
          continue
        self.built[kind] = torch_runner(self.exp, config)
      else:
        raise ValueError(f"unknown runner {kind!r}; valid: jrecipe, stream, hand, torch")
    for k, r in self.built.items():
      r["run"](10)  # warm-up: caches, allocator, thread pools
      self.info["runners"][k] = {x: r[x] for x in ("compile_seconds", "flops", "threads")
                                 if r.get(x) is not None}
    self.rounds = 0

  def round(self, steps):
    """One timed round: {runner: [steps/s (wall), CPU seconds per step]}, order rotated."""
    order = list(self.built)
    i = self.rounds % max(1, len(order))
    self.rounds += 1
    out = {}
    for k in order[i:] + order[:i]:  # rotate: no runner always first after a pause
      w, c = timed(lambda: self.built[k]["run"](steps))
      out[k] = [steps / w, c / steps]
    return out

  def time_to_target(self):
    spec = WORKLOADS[self.name]
    out = {"target": spec["target"]}
    for k, r in self.built.items():
      out[k] = time_to_target(r, self.exp.steps_per_epoch, spec["target"], spec["max_epochs"])
    return out


def _worker_main():
  """Protocol: prints 'READY {info}', then answers 'round N' / 'ttt' / 'exit' lines."""
  from jrecipe import runtime
  runtime.tune_cpu_xla(FAMILY[FLAGS.worker])  # the flags a run of this model gets
  runtime.setup_processes(False)  # $JRECIPE_NUM_CPU_DEVICES from the parent
  runtime.enable_compilation_cache()
  w = Worker(FLAGS.worker, FLAGS.runners, FLAGS.ema_decay)
  print("READY " + json.dumps(w.info), flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "exit":
      break
    if cmd[0] == "round":
      print("ROUND " + json.dumps(w.round(int(cmd[1]))), flush=True)
    elif cmd[0] == "ttt":
      print("TTT " + json.dumps(w.time_to_target()), flush=True)


class _WorkerProcess:
  """A worker subprocess with `devices` CPU devices, driven line by line."""

  def __init__(self, name, devices, runners):
    env = dict(_child_env(), JRECIPE_NUM_CPU_DEVICES=str(devices))
    cmd = [sys.executable, "-m", "jrecipe.bench", f"--worker={name}",
           f"--runners={','.join(runners)}", f"--ema_decay={FLAGS.ema_decay}"]
    self.err = tempfile.TemporaryFile("w+")
    self.p = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=self.err, text=True)
    self.info = self._read("READY")

  def _read(self, tag):
    for line in self.p.stdout:
      if line.startswith(tag + " "):
        return json.loads(line[len(tag) + 1:])
    self.err.seek(0)
    lines = [ln for ln in self.err.read().splitlines()
             if ln.strip() and not ln.startswith(("I1", "W1", "Extension modules"))]
    fatal = [ln for ln in lines if ln.startswith(("F1", "E1", "Fatal", "jaxlib", "RuntimeError"))]
    raise RuntimeError("bench worker died: " + " | ".join(fatal[:5] + lines[-8:])[-2000:])

  def ask(self, cmd, tag):
    self.p.stdin.write(cmd + "\n")
    self.p.stdin.flush()
    return self._read(tag)

  def close(self):
    if self.p.poll() is None:
      try:
        self.p.stdin.write("exit\n")
        self.p.stdin.flush()
        self.p.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.p.kill()
        self.p.wait()
    self.err.close()


def _child_env() -> dict:
  """The environment of the bench's processes: `--xla_defaults` turns jrecipe's XLA flags off."""
  from jrecipe import runtime
  env = dict(os.environ)
  if FLAGS.xla_defaults:
    env[runtime.ENV_XLA_DEFAULTS] = "1"
  return env


def bench_workload(name, counts, auto, rounds, steps, ttt):
  """Workers for each device count, plus PyTorch in its own process; figures per JAX worker.

  The JAX loops of one device count share a process (the same devices, the same XLA thread
  pools). PyTorch runs in a process of its own: its OpenMP threads and XLA's thread pools,
  in one process, each slowed the other down and made PyTorch's thread probe pick 1 thread
  where 2 ran 1.7x faster. Every round runs every process once, one at a time, in a rotated
  order, and ratios pair each JAX figure with PyTorch's figure of the same round.
  """
  jax_runners = [k for k in FLAGS.runners if k != "torch"]
  torch_on = "torch" in FLAGS.runners
  workers, out = {}, []
  try:
    for n in counts:
      if jax_runners:
        workers[n] = _WorkerProcess(name, n, jax_runners)
    if torch_on:
      workers["torch"] = _WorkerProcess(name, 1, ["torch"])
    order = list(workers)
    per_round = {k: [] for k in order}
    for i in range(rounds):
      for k in order[i % len(order):] + order[:i % len(order)]:
        per_round[k].append(workers[k].ask(f"round {steps}", "ROUND"))
    torch_rounds = per_round.get("torch", [])
    torch_fig = workers["torch"].info["runners"].get("torch") if torch_on else None
    torch_notes = workers["torch"].info["notes"] if torch_on else []
    one = workers.get(1)
    flops = one.info["runners"].get("hand", {}).get("flops") if one else None
    for n in [n for n in counts if n in workers]:
      info = workers[n].info
      info["auto_choice"] = n == auto
      info["notes"] = info["notes"] + torch_notes
      # One step's FLOPs on one device: a sharded step's cost analysis counts one shard.
      if flops and "hand" in info["runners"]:
        info["runners"]["hand"]["flops"] = flops
      rs = [dict(r, **({"torch": t["torch"]} if "torch" in t else {}))
            for r, t in zip(per_round[n], torch_rounds or [{}] * len(per_round[n]))]
      if torch_fig is not None:
        info["runners"]["torch"] = dict(torch_fig)
      for k, fig in info["runners"].items():
        sps = [r[k][0] for r in rs]
        fig.update(steps_per_s=stats(sps), examples_per_s=statistics.median(sps) *
                   info["batch_size"], cpu_ms_per_step=stats([r[k][1] * 1e3 for r in rs]))
      ratios = {}
      for a, b in (("jrecipe", "hand"), ("jrecipe", "torch"), ("hand", "torch"),
                   ("stream", "jrecipe")):
        if a in info["runners"] and b in info["runners"]:
          ratios[f"{a}/{b}"] = stats([r[a][0] / r[b][0] for r in rs])
          ratios[f"{a}/{b} cpu"] = stats([r[b][1] / r[a][1] for r in rs])
      info["ratios"] = ratios
      if ttt and n == auto:
        info["time_to_target"] = workers[n].ask("ttt", "TTT")
        if torch_fig is not None:
          t = workers["torch"].ask("ttt", "TTT")
          info["time_to_target"]["torch"] = t["torch"]
      out.append(info)
    if len(counts) > 1 and 1 in counts and jax_runners:
      # Split over all cores against one device, paired round by round (same load).
      top = max(counts)
      for k in jax_runners:
        pairs = [a[k][0] / b[k][0] for a, b in zip(per_round[top], per_round[1])]
        for info in out:
          if info["devices"] == top:
            info.setdefault("split_speedup", {})[k] = stats(pairs)
  finally:
    for w in workers.values():
      w.close()
  return out


# ------------------------------------------------------------------------------------------
# Machine and process-level figures (run by the parent)
def matmul_peak_gflops(n=1024, repeats=7) -> dict:
  """This machine's float32 matmul throughput with numpy, GFLOP/s.

  'wall': the best of `repeats` by the clock (what the machine gave just now); 'cpu': per
  CPU-second, times the cores (what it gives when nothing else runs: robust to other load).
  """
  import numpy as np
  from jrecipe import runtime
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  b = a.T.copy()
  a @ b
  times = [timed(lambda: a @ b) for _ in range(repeats)]
  flops = 2 * n ** 3 / 1e9
  return {"wall": flops / min(w for w, _ in times),
          "cpu": flops / min(c for _, c in times) * runtime.host_cores()}


def startup_seconds(name, cache_dir, devices=None, timeout=600):
  """Process start to the end of the first train step of the real CLI (`python -m jrecipe`).

  The run logs every step (`log_every_steps=1`); the first 'train' record of metrics.jsonl is
  written right after the first step's metrics reach the host. The process is then killed.
  """
  with tempfile.TemporaryDirectory() as wd:
    metrics = os.path.join(wd, "metrics.jsonl")
    config = os.path.join(REPO, WORKLOADS[name]["config"])
    cmd = [sys.executable, "-m", "jrecipe", f"--config={config}",
           f"--workdir={wd}", f"--compilation_cache={cache_dir}", "--config.log_every_steps=1"]
    env = _child_env()
    if devices:
      env["JRECIPE_NUM_CPU_DEVICES"] = str(devices)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
      while time.perf_counter() - t0 < timeout:
        if p.poll() is not None:
          return None, f"exit status {p.returncode}: {p.stderr.read()[-500:]}"
        try:
          with open(metrics) as f:
            if any('"split": "train"' in line for line in f):
              return time.perf_counter() - t0, None
        except OSError:
          pass
        time.sleep(0.01)
      return None, "timed out"
    finally:
      if p.poll() is None:
        p.kill()
      p.wait()


def time_mode(mode, name="digits_mlp", timeout=1800):
  """Wall seconds of `python -m jrecipe --mode=MODE` end to end, and its exit status."""
  with tempfile.TemporaryDirectory() as wd:
    config = os.path.join(REPO, WORKLOADS[name]["config"])
    cmd = [sys.executable, "-m", "jrecipe", f"--config={config}",
           f"--workdir={wd}", f"--mode={mode}"]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=_child_env(), capture_output=True, text=True,
                       timeout=timeout)
    wall = time.perf_counter() - t
  out = {"mode": mode, "config": WORKLOADS[name]["config"], "seconds": wall,
         "exit_status": r.returncode}
  if r.returncode not in (0, 1):  # 1 = the battery found a failing check: still timed
    out["note"] = (f"--mode={mode} did not run (exit {r.returncode}); skipped: "
                   + r.stderr.strip().splitlines()[-1][:300] if r.stderr.strip() else "")
  return out


def _cores_value(v, cores):
  return cores if v == "cores" else int(v)


def run_bench():
  """The whole benchmark; returns the figures (printed as it goes)."""
  from jrecipe import runtime
  cores = runtime.host_cores()
  xla = ("XLA's own defaults (--xla_defaults)" if FLAGS.xla_defaults else
         "; ".join(f"{w}: {' '.join(runtime.cpu_xla_flags(FAMILY[w])) or 'none'}"
                   for w in FLAGS.workloads))
  results = {"machine": {"cores": cores, "load_average_start": os.getloadavg(),
                         "matmul_peak_gflops": matmul_peak_gflops(),
                         "torch": torch_available(), "xla_cpu_flags": xla},
             "workloads": [], "startup": [], "end_to_end": []}
  peaks = results["machine"]["matmul_peak_gflops"]
  peak = peaks["cpu"]
  print(f"machine: {cores} cores, float32 matmul peak {peak:.0f} GFLOP/s (numpy, per "
        f"CPU-second x cores; {peaks['wall']:.0f} by the clock now), load average "
        f"{results['machine']['load_average_start'][0]:.1f}")
  print(f"XLA:CPU flags jrecipe adds: {xla}")
  for name in FLAGS.workloads:
    cfg = load_config(name)
    auto, why = runtime.choose_cpu_devices(cfg, "train", cpu_only=True)
    counts = sorted({_cores_value(v, cores) for v in FLAGS.devices} | {auto})
    try:
      infos = bench_workload(name, counts, auto, FLAGS.rounds, FLAGS.steps,
                             FLAGS.time_to_target)
    except RuntimeError as e:
      infos = [{"workload": name, "error": str(e)}]
    for info in infos:
      results["workloads"].append(info)
      _print_worker(info, peak, cores)
      split = info.get("split_speedup", {}).get("jrecipe")
      if split:
        line = (f"  {name}: {info['devices']} devices / 1 device = {fmt(split, 1, 2)}x "
                f"(jrecipe steps/s, paired rounds); auto choice: {auto} device(s) ({why})")
        if FLAGS.record and not FLAGS.xla_defaults:
          path = runtime.record_measurement(
              FAMILY[name], info["devices"] if split["median"] > 1.05 else 1, split["median"],
              {"workload": name, "batch_size": cfg.batch_size, "min": split["min"],
               "max": split["max"]})
          line += f"; recorded in {path}"
        print(line)
    sys.stdout.flush()
  if FLAGS.startup_repeats:
    for name in FLAGS.workloads:
      with tempfile.TemporaryDirectory() as cache:
        cold, err = startup_seconds(name, cache)
        warm = []
        for _ in range(FLAGS.startup_repeats):
          s, err2 = startup_seconds(name, cache)
          warm.append(s)
          err = err or err2
      rec = {"workload": name, "cold_seconds": cold, "warm_seconds": stats(warm)}
      if err:
        rec["error"] = err
      results["startup"].append(rec)
      print(f"start-up {name} (process start to first train step, real CLI): cold "
            f"{cold if cold is None else round(cold, 2)} s, warm "
            f"{fmt(rec['warm_seconds'], 1, 2)} s"
            + (f" [{err}]" if err else ""))
      sys.stdout.flush()
  for mode in [m for m in FLAGS.end_to_end if m]:
    rec = time_mode(mode)
    results["end_to_end"].append(rec)
    print(f"--mode={mode} on {rec['config']}: {rec['seconds']:.1f} s, exit {rec['exit_status']}"
          + (f" [{rec['note']}]" if rec.get("note") else ""))
    sys.stdout.flush()
  results["machine"]["load_average_end"] = os.getloadavg()
  return results


def _print_worker(r, peak, cores):
  if "error" in r:
    print(f"{r['workload']}: worker failed: {r['error'][-600:]}")
    return
  flops = r["runners"].get("hand", {}).get("flops")
  print(f"{r['workload']} on {r['devices']} CPU device(s), batch {r['batch_size']}"
        f"{' (auto choice)' if r.get('auto_choice') else ''}:")
  for k, f in r["runners"].items():
    frac = ""
    if flops:  # the same model and arithmetic in every runner: XLA's count stands for all
      wall = flops * f["steps_per_s"]["median"] / 1e9 / peak
      cpu = flops / (f["cpu_ms_per_step"]["median"] / 1e3) / 1e9 / (peak / cores)
      f["fraction_of_peak"] = {"wall": wall, "per_cpu_second": cpu}
      frac = f", {wall:.1%} of matmul peak ({cpu:.1%} per CPU-second)"
    extra = f", {f['threads']} thread(s)" if f.get("threads") else ""
    print(f"  {k:8s} {fmt(f['steps_per_s'])} steps/s, {f['examples_per_s']:.0f} ex/s, "
          f"{fmt(f['cpu_ms_per_step'], 1, 2)} CPU ms/step, compile "
          f"{f['compile_seconds']:.2f} s{frac}{extra}")
  for k, s in r["ratios"].items():
    print(f"  ratio {k:28s} {fmt(s, 1, 3)}")
  for k, t in r.get("time_to_target", {}).items():
    if k != "target":
      sec = "not reached" if t["seconds"] is None else f"{t['seconds']:.2f} s"
      print(f"  time to {r['time_to_target']['target']:.0%} test accuracy, {k}: {sec} "
            f"({t['epochs']} epochs, {t['accuracy']:.4f})")
  for n in r.get("notes", []):
    print(f"  note: {n}")


def main(argv):
  del argv
  if FLAGS.worker:
    _worker_main()
    return
  results = run_bench()
  if FLAGS.json:
    from jrecipe.train.writer import write_json_atomic
    write_json_atomic(FLAGS.json, results)
    print(f"figures written to {FLAGS.json}")


if __name__ == "__main__":
  app.run(main)
