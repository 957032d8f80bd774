"""Profiling a run: `--config.profile.steps=START:END` (docs/performance.md, 'Profiling').

`ProfileHook` traces global steps START+1..END with `jax.profiler` into `DIR/profile`
(`plugins/profile/<time>/<host>.xplane.pb` for TensorBoard's profile plugin and
`perfetto_trace.json.gz` for ui.perfetto.dev), and writes `DIR/profile/summary.json`, a
'profile' record in metrics.jsonl and a log line with:
- each traced step's time (wall clock, the hook blocking on every step's results, so it is
  the device's step period plus any host time the loop adds);
- the compiled step's FLOPs from XLA's cost analysis (`compiled.cost_analysis()`: the
  program of one device, so one device's share under a mesh or pmap);
- model FLOPs utilisation: FLOPs / median step time / the device's peak, the peak from
  `PEAK_TFLOPS` (datasheet figures, dense, per chip), `config.profile.peak_tflops`, or a
  measured matmul peak where the table has no entry (the CPU).

Recipe stage 6 ('squeeze out the juice'): before buying time with a bigger machine, see
where the step's time goes and how far it is from the hardware's peak.
"""

import logging
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jrecipe import storage
from jrecipe.errors import UserError
from jrecipe.train.trainer import Hook
from jrecipe.train.writer import write_json_atomic

log = logging.getLogger("jrecipe")

# Dense (no sparsity) peak TFLOP/s per chip, by a substring of `device.device_kind`, first
# match wins. float32 on NVIDIA: TF32 tensor cores, which XLA uses for float32 matmuls at
# JAX's default precision. TPUs: the bf16 peak also serves float32 (default-precision float32
# matmuls run as bf16 passes).
PEAK_TFLOPS = (
    ("H200", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},
     "NVIDIA H200 datasheet (SXM): BF16/FP16 989 TFLOPS, TF32 495 TFLOPS, dense"),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0},
     "NVIDIA H100 datasheet (PCIe): BF16/FP16 756 TFLOPS, TF32 378 TFLOPS, dense"),
    ("H100", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},
     "NVIDIA H100 datasheet (SXM): BF16/FP16 989 TFLOPS, TF32 495 TFLOPS, dense"),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
     "NVIDIA A100 datasheet: BF16/FP16 312 TFLOPS, TF32 156 TFLOPS, dense"),
    ("TPU v6", {"bfloat16": 918.0},
     "Cloud TPU v6e (Trillium) documentation: 918 TFLOPS bf16 per chip"),
    ("TPU v5 lite", {"bfloat16": 197.0},
     "Cloud TPU v5e documentation: 197 TFLOPS bf16 per chip"),
    ("TPU v5e", {"bfloat16": 197.0},
     "Cloud TPU v5e documentation: 197 TFLOPS bf16 per chip"),
    ("TPU v5", {"bfloat16": 459.0},
     "Cloud TPU v5p documentation: 459 TFLOPS bf16 per chip"),
    ("TPU v4", {"bfloat16": 275.0},
     "Cloud TPU v4 documentation: 275 TFLOPS bf16 per chip"),
)

_MEASURED: dict = {}  # (device kind, dtype) -> TFLOP/s measured in this process


def parse_steps(spec: str) -> Optional[tuple[int, int]]:
  """'START:END' -> (START, END) with 0 <= START < END; '' -> None; else a UserError."""
  if not spec:
    return None
  parts = str(spec).split(":")
  try:
    start, end = (int(p) for p in parts)
  except ValueError:
    start = end = -1
  if len(parts) != 2 or not 0 <= start < end:
    raise UserError(f"profile.steps={spec!r} must be 'START:END' with 0 <= START < END (global "
                    "steps; '5:15' traces steps 6 to 15). Start after step 0 to leave the "
                    "compile out of the trace; '' turns profiling off.")
  return start, end


def table_peak(device_kind: str, dtype: str) -> Optional[tuple[float, str]]:
  """(TFLOP/s, source) of `PEAK_TFLOPS` for a device kind and compute dtype, or None."""
  for key, peaks, source in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      value = peaks.get(dtype, peaks.get("bfloat16"))
      return value, source
  return None


def measured_peak_tflops(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
  """This device's matmul throughput in TFLOP/s: the best of `repeats` timed n x n products.

  The peak MFU is quoted against where the table has no figure (the CPU): what the machine
  reaches on the kind of work a step is made of, measured in this process, once.
  """
  device = jax.devices()[0]
  key = (device.device_kind, dtype, n)
  if key in _MEASURED:
    return _MEASURED[key]
  a = jnp.ones((n, n), dtype)
  mm = jax.jit(lambda x, y: (x @ y).sum())
  mm(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    mm(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  _MEASURED[key] = 2.0 * n ** 3 / best / 1e12
  return _MEASURED[key]


def device_peak(dtype: str, override_tflops: float = 0.0) -> tuple[float, str]:
  """(peak TFLOP/s, where it comes from) for this process's first device and `dtype`."""
  if override_tflops > 0:
    return float(override_tflops), "config.profile.peak_tflops"
  kind = jax.devices()[0].device_kind
  found = table_peak(kind, dtype)
  if found is not None:
    return found
  return measured_peak_tflops(dtype), f"measured {dtype} matmul peak of this {kind} device"


def cost_flops(compiled) -> float:
  """FLOPs of a compiled program by XLA's cost analysis (0 when the backend gives none).

  `cost_analysis()` returns a dict in jax 0.10-0.11 and a list of one dict per program in
  some older versions: both are read.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def step_flops(step_fn, *args) -> float:
  """FLOPs of a jitted function's program for these arguments, e.g. a train step's for a
  state and a device batch (0 when `step_fn` cannot be lowered)."""
  lower = getattr(step_fn, "lower", None)
  if lower is None:
    return 0.0
  return cost_flops(lower(*args).compile())


def summarize(step_seconds: list, flops: float, peak_tflops: float) -> dict:
  """Median step time, achieved TFLOP/s and MFU of a profiled window."""
  median = float(np.median(step_seconds)) if step_seconds else float("nan")
  achieved = flops / median / 1e12 if step_seconds and median > 0 else 0.0
  return {"median_step_seconds": median, "achieved_tflops": achieved,
          "mfu": achieved / peak_tflops if peak_tflops > 0 else 0.0}


class ProfileHook(Hook):
  """Traces steps START+1..END (see the module docstring); `begin` reads one batch to get
  the step's FLOPs from its compiled program before the trace starts."""

  def __init__(self, workdir: str, start: int, end: int, *, precision: str = "float32",
               peak_tflops: float = 0.0, writer=None):
    self.dir = os.path.join(workdir, "profile")
    self.first, self.last = int(start), int(end)
    self.precision, self.peak_override = precision, float(peak_tflops)
    self.writer = writer
    self.tracing, self.done = False, False
    self._local = self.dir
    self.times: list = []
    self.flops = 0.0
    self._last = 0.0

  @classmethod
  def from_config(cls, config, workdir: str, writer=None) -> Optional["ProfileHook"]:
    steps = parse_steps(config.profile.steps)
    if steps is None:
      return None
    return cls(workdir, *steps, precision=str(config.precision),
               peak_tflops=float(config.profile.peak_tflops), writer=writer)

  def begin(self, loop) -> None:
    if loop.step >= self.last or self.last <= loop.start_step:
      self.done = True  # a resumed run already past the window
      return
    trainer = loop.trainer
    if trainer.exp is not None:
      batch = trainer.placement.put_batch(next(trainer.batches(loop.step)))
      self.flops = step_flops(trainer.step, loop.state, batch)
    if loop.step >= self.first:
      self._start(loop)

  def _start(self, loop) -> None:
    jax.block_until_ready(loop.state)
    self._local = self.dir
    if storage.is_remote(self.dir):  # the profiler writes local files: uploaded at the stop
      import tempfile
      self._local = tempfile.mkdtemp(prefix="jrecipe-profile-")
    os.makedirs(self._local, exist_ok=True)
    jax.profiler.start_trace(self._local, create_perfetto_trace=True)
    self.tracing, self._last = True, time.perf_counter()

  def after_step(self, loop, metrics) -> None:
    if self.done:
      return
    if self.tracing:
      jax.block_until_ready(metrics)
      now = time.perf_counter()
      self.times.append(now - self._last)
      self._last = now
      if loop.step >= self.last:
        self._stop(loop)
    elif loop.step >= self.first:
      self._start(loop)

  def end(self, loop) -> None:
    if self.tracing:  # the run stopped inside the window: what was traced is kept
      self._stop(loop)

  def _stop(self, loop) -> None:
    jax.profiler.stop_trace()
    self.tracing, self.done = False, True
    if self._local != self.dir:
      storage.upload_tree(self._local, self.dir)
    peak, source = device_peak(self.precision, self.peak_override)
    record = {"steps": [loop.step - len(self.times) + 1, loop.step],
              "step_seconds": [round(t, 6) for t in self.times],
              "flops_per_step": self.flops, "peak_tflops": peak, "peak_source": source,
              "device_kind": jax.devices()[0].device_kind, "precision": self.precision,
              "devices": loop.trainer.placement.global_devices,
              **summarize(self.times, self.flops, peak)}
    write_json_atomic(os.path.join(self.dir, "summary.json"), record)
    if self.writer is not None:
      self.writer.write(loop.step, {k: record[k] for k in (
          "step_seconds", "median_step_seconds", "flops_per_step", "achieved_tflops", "mfu")},
          split="profile", tensorboard=False)
    log.info("Profile of steps %d-%d in %s: median step %.4f s, %.3g FLOPs/step (XLA cost "
             "analysis), %.3g TFLOP/s = MFU %.1f%% of %.4g TFLOP/s (%s).", *record["steps"],
             self.dir, record["median_step_seconds"], self.flops, record["achieved_tflops"],
             100 * record["mfu"], peak, source)
