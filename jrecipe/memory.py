"""Memory estimated from shapes before anything is allocated, and refused when it cannot fit.

Why: a config whose arrays cannot fit (`--config.model.hidden='(1000000000,)'` on digits_mlp
asks for 1.2 TB) otherwise hangs in the first allocation at 0% CPU or is killed by the kernel's
OOM killer with no message, after the work directory was written. Recipe stage 2 ('end-to-end
skeleton': fail fast and loudly) and stage 3 ('get a model big enough to overfit': how big is
too big for this machine is known before the first step).

What is counted, all from abstract evaluation (`jax.eval_shape`: tracing, no compilation, no
allocation):

- the training state: `jax.eval_shape` of the same `init` and state constructor training uses,
  so parameters, the model's mutable state (BatchNorm statistics), the optimizer state and the
  EMA copy are exact;
- the gradients: one more copy of the parameters;
- the activations: the residuals reverse-mode autodiff keeps between the forward and the
  backward pass of the real loss function (`jax.vjp` of the step's loss), the part that grows
  with the batch (traced at the per-device batch b and at 2b: R(2b) - R(b), so the weights
  the backward pass also reads are not counted twice), counted twice: once kept by the forward
  pass, once more for their gradients in the backward pass. Measured against XLA's own
  accounting of the compiled step (bench/memory_estimate.py, CPU): 1.1 to 1.75 times XLA's
  arguments + temporaries for digits_mlp and the mnist5k CNN at batches 32 to 512, so an upper
  bound there; counting the residuals once undercounted the CNN (0.64x at batch 512: its
  convolutions' backward needs more scratch space than the residuals).

What it is compared with: on the CPU, the host RAM available now (`MemAvailable` in
/proc/meminfo), which holds the host copy of the state (initial state, checkpoints) and every CPU
device's copy; on an accelerator, each device's free memory (`memory_stats()`: bytes_limit less
bytes_in_use) for the per-device share, and host RAM for the host copy. The check never creates
the JAX backend (see `jrecipe.runtime`): before it exists, the devices are counted from the
flags. `JRECIPE_MEMORY_CHECK=0` turns it off (an estimate that is wrong for your model).
"""

import dataclasses
import math
import os
from typing import Optional

import numpy as np

from jrecipe.errors import UserError

ENV_OFF = "JRECIPE_MEMORY_CHECK"


def nbytes(tree) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf of a pytree."""
  import jax
  return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape"))


def human(n: float) -> str:
  """'1.2 TB', '340 kB': decimal units, three significant digits."""
  for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes one training run needs, from shapes (see the module docstring).

  Attributes:
    params, model_state, opt_state, ema: the parts of one copy of the training state.
    state: one whole copy of the training state (the parts above, plus counters and keys).
    grads: the gradients (one copy of the parameters).
    activations: per device, what backprop keeps at the per-device batch; None when the
      loss could not be traced outside the step (then not counted).
    devices: the devices the state is replicated on.
    device_batch: the batch one device computes.
  """

  params: int
  model_state: int
  opt_state: int
  ema: int
  state: int
  grads: int
  activations: Optional[int]
  devices: int
  device_batch: int

  @property
  def per_device(self) -> int:
    """One device's share: a copy of the state, the gradients, and the activations twice
    (kept by the forward pass, and their gradients of the same size in the backward pass)."""
    return self.state + self.grads + 2 * (self.activations or 0)

  def describe(self) -> str:
    parts = [f"parameters {human(self.params)}", f"optimizer state {human(self.opt_state)}"]
    if self.ema:
      parts.append(f"EMA {human(self.ema)}")
    if self.model_state:
      parts.append(f"model state {human(self.model_state)}")
    parts.append(f"gradients {human(self.grads)}")
    parts.append(f"activations {human(self.activations)} at a batch of {self.device_batch}, "
                 "counted twice (the forward pass keeps them, the backward pass makes their "
                 "gradients)" if self.activations is not None else "activations not estimated")
    return ", ".join(parts)


def _device_count(config) -> int:
  """The devices the run's placement will use, without creating the backend."""
  par = config.get("parallel", {})
  mode, requested = par.get("mode", "mesh"), int(par.get("num_devices", 0) or 0)
  if mode == "single":
    return 1
  from jrecipe import jax_private
  if jax_private.backends_are_initialized(False):
    import jax
    available = len(jax.local_devices()) if mode == "pmap" else jax.device_count()
  else:
    from jrecipe.train.parallel import _forced_cpu_devices
    available = _forced_cpu_devices()
  return max(1, min(requested or available, available))


def _residual_bytes(exp, loss_fn, abstract_state, batch: int) -> int:
  """Bytes of everything `jax.vjp` of the step's loss keeps at `batch` examples."""
  import jax
  import jax.numpy as jnp
  x = exp.sample_input(1)
  y = np.asarray(exp.data.arrays["train"]["y"][:1])
  xb = {"x": jax.ShapeDtypeStruct((batch,) + x.shape[1:], x.dtype),
        "y": jax.ShapeDtypeStruct((batch,) + y.shape[1:], y.dtype)}

  def residuals(params, model_state, xb, rng):
    f = lambda p: loss_fn(p, model_state, xb, rng, jnp.zeros((), jnp.int32))
    return jax.vjp(f, params, has_aux=True)[1]

  s = abstract_state
  return nbytes(jax.eval_shape(residuals, s.params, s.model_state, xb, s.rng))


def _activations(exp, tx, abstract_state, device_batch: int) -> Optional[int]:
  """What backprop keeps for `device_batch` examples: the part of the residuals that grows
  with the batch (traced at b and 2b: R(2b) - R(b)), so the weights the backward pass reads
  (counted with the state) and per-step constants are left out."""
  from jrecipe.train import step as step_lib
  parts = step_lib.StepParts(model=exp.model, loss=exp.loss, tx=tx, augment=exp.augment_fn(),
                             l2=float(exp.config.get("l2", 0.0)))
  loss_fn = step_lib.make_loss_fn(parts)
  try:
    one, two = (_residual_bytes(exp, loss_fn, abstract_state, b)
                for b in (device_batch, 2 * device_batch))
  except Exception:  # noqa: BLE001 - e.g. a collective axis bound only inside the step
    return None
  return max(two - one, 0)


def estimate(exp, devices: Optional[int] = None) -> Estimate:
  """The memory `exp`'s training run needs, from abstract shapes only (nothing allocated).

  Args:
    exp: a built (or being built) `jrecipe.experiment.Experiment`.
    devices: the devices the state is replicated on (default: from config.parallel).
  """
  import jax
  import jax.numpy as jnp
  import optax
  from jrecipe.train import state as state_lib
  config = exp.config
  n = devices or _device_count(config)
  try:
    tx = exp.optimizer()
  except Exception:  # noqa: BLE001 - a bad optimizer field: build reports it next
    tx = optax.identity()
  ema = float(config.get("ema_decay", 0.0)) > 0
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  variables = jax.eval_shape(exp.model.init, key, exp.sample_input(2))
  s = jax.eval_shape(lambda v, r: state_lib._create(v, tx, r, ema=ema), variables, key)
  device_batch = max(1, math.ceil(int(config.batch_size) / n))
  p = nbytes(s.params)
  return Estimate(params=p, model_state=nbytes(s.model_state), opt_state=nbytes(s.opt_state),
                  ema=nbytes(s.ema_params), state=nbytes(s), grads=p,
                  activations=_activations(exp, tx, s, device_batch), devices=n,
                  device_batch=device_batch)


def host_available() -> Optional[tuple[int, str]]:
  """(bytes, where it was read) of the host RAM available now, or None if unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
  except (OSError, ValueError, IndexError):
    pass
  try:
    return (os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
            "the free physical pages (sysconf)")
  except (ValueError, OSError, AttributeError):
    return None


def device_free() -> Optional[tuple[int, str]]:
  """(bytes, which device) of the least free accelerator memory, or None.

  None on the CPU, when the backend does not exist yet (this check never creates it), or when
  the devices do not report memory statistics.
  """
  from jrecipe import jax_private
  if not jax_private.backends_are_initialized(False):
    return None
  import jax
  best = None
  for d in jax.local_devices():
    if d.platform == "cpu":
      return None
    try:
      stats = d.memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory statistics
      return None
    if "bytes_limit" not in stats:
      return None
    free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if best is None or free < best[0]:
      best = (free, f"the free memory of {d.device_kind} {d.id} (memory_stats)")
  return best


def _on_cpu() -> bool:
  from jrecipe import jax_private
  if jax_private.backends_are_initialized(False):
    import jax
    return jax.local_devices()[0].platform == "cpu"
  from jrecipe import runtime
  return runtime.cpu_only_host()


def _size_field(model_config) -> Optional[str]:
  """'config.model.hidden=(1000000000,)': the model field holding the largest integer."""
  best = None
  items = model_config.items() if hasattr(model_config, "items") else ()
  for k, v in items:
    values = v if isinstance(v, (tuple, list)) else (v,)
    ints = [int(x) for x in values if isinstance(x, (int, np.integer)) and not isinstance(x, bool)]
    if ints and (best is None or max(ints) > best[0]):
      best = (max(ints), f"config.model.{k}={v!r}")
  return best[1] if best and best[0] > 1 else None


def _advice(exp, without_activations: int, limit: int) -> str:
  """Which field to change: the model's size when the state alone does not fit, else the
  batch, which the activations grow with."""
  batch = f"config.batch_size (now {exp.config.batch_size})"
  field = _size_field(exp.config.get("model", {})) or "config.model's size fields"
  if without_activations > limit:
    return (f"Lower the model's size ({field}): even without activations it needs "
            f"{human(without_activations)}, so a smaller {batch} cannot help")
  return f"Lower {batch}, which the activations grow with, or the model's size ({field})"


def check_fits(exp, *, host: Optional[tuple[int, str]] = None,
               device: Optional[tuple[int, str]] = None) -> Optional[Estimate]:
  """Raises UserError when `exp`'s training run cannot fit this machine's memory.

  Args:
    exp: the Experiment.
    host, device: (bytes, description) limits to use instead of this machine's (tests).

  Returns:
    The estimate, or None when the check is off (`$JRECIPE_MEMORY_CHECK=0`).
  """
  if os.environ.get(ENV_OFF, "1").strip().lower() in ("0", "false", "off", "no"):
    return None
  est = estimate(exp)
  host = host or host_available()
  cpu = device is None and _on_cpu()
  device = device or (None if cpu else device_free())
  # On the CPU every device's copy lives in host RAM beside the host copy of the state.
  need_host = est.state + (est.devices * est.per_device if cpu else 0)
  acts = 2 * (est.activations or 0)
  checks = [(need_host, need_host - (est.devices * acts if cpu else 0), host,
             "host RAM" + (f" (a host copy of the state and {est.devices} CPU device(s), each "
                           "with the per-device share)" if cpu else
                           " (the host copy of the state)"))]
  if device is not None:
    checks.append((est.per_device, est.per_device - acts, device, "one device's share"))
  for need, without_activations, limit, what in checks:
    if limit is None or need <= limit[0]:
      continue
    raise UserError(
        f"This config needs about {human(need)} of {what}, more than the {human(limit[0])} "
        f"available ({limit[1]}); estimated from shapes before anything was allocated. Per "
        f"device: {est.describe()} ({est.devices} device(s)). "
        f"{_advice(exp, without_activations, limit[0])}, or run on "
        f"a machine with more memory (${ENV_OFF}=0 skips this check).")
  return est
