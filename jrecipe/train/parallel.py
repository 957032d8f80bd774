"""Data parallelism: one pure step, placed on devices by a mesh (default) or by pmap.

- 'mesh': `jax.jit` with the state replicated and the batch split along a 'batch' mesh axis
  (`NamedSharding`); XLA inserts the gradient all-reduce. Multi-host jobs build a global
  mesh over every device of every process, and each host contributes its slice of the
  batch (`jax.make_array_from_process_local_data`).
- 'pmap': the classic API; the step averages gradients with `lax.pmean` over 'batch'.
  Multi-host: pmap maps over every device of the job (`devices=jax.devices()`, the same
  list on every process), each process feeds its local devices, and `lax.pmean` spans all
  of them. Tested with two CPU processes of two devices each (tests/test_multihost.py).
- 'single': plain `jax.jit` on the first device (one process only).
On one device all three give the same numbers as plain jit; mesh and pmap over 2 processes x
2 devices give the same parameters as one process with 4 devices.

Results of a step (state, metrics) are replicated global arrays; on several processes they
are not fully addressable, so the host reads this process's first copy (`addressable_data(0)`)
and never `jax.device_get` of the whole array.
"""

import dataclasses
import os
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jrecipe.errors import UserError

MODES = ("mesh", "pmap", "single")
AXIS = "batch"


# True once this module turned CPU async dispatch off before the backend existed.
_SYNC_CPU_CLIENT = False


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # private API moved: assume the worst
    return True


def _forced_cpu_devices() -> int:
  """The CPU device count the backend will be created with, judged from flags alone."""
  n = int(jax.config.jax_num_cpu_devices)
  m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  return max(n, int(m.group(1)) if m else 1, 1)


def prefer_sync_cpu_dispatch(force: bool = False) -> bool:
  """Turns CPU async dispatch off if the backend does not exist yet and will need it.

  JAX reads `jax_cpu_enable_async_dispatch` once, when it creates the CPU client: updating
  it afterwards changes nothing. Called before the backend starts (jrecipe.runtime does so
  for every command-line run); `force` for multi-process jobs, whose collectives cross
  processes whatever the local device count. Returns whether the CPU client is known to be
  synchronous.
  """
  global _SYNC_CPU_CLIENT
  if not _SYNC_CPU_CLIENT and not _backend_started() and (force or _forced_cpu_devices() > 1):
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    _SYNC_CPU_CLIENT = True
  return _SYNC_CPU_CLIENT


def guard_cpu_collectives() -> bool:
  """Avoid the multi-device CPU all-reduce deadlock (shared/STACK.md).

  Asynchronously dispatched collectives on several forced host devices can hang in the
  rendezvous; synchronous dispatch on CPU avoids it at a negligible cost for these steps.
  That must be chosen before the backend exists (`prefer_sync_cpu_dispatch`). Returns True
  when it was too late (the CPU client may dispatch asynchronously): the compiled steps then
  block on their results, which bounds the steps in flight to one and avoids the hang too.
  """
  prefer_sync_cpu_dispatch()
  if jax.default_backend() != "cpu" or jax.device_count() <= 1:
    return False
  return not _SYNC_CPU_CLIENT


def _blocking(fn: Callable) -> Callable:
  """`fn` that waits for its results before returning (one step in flight at most)."""

  def wrapped(*args):
    return jax.block_until_ready(fn(*args))

  return wrapped


@dataclasses.dataclass
class Placement:
  """Where the state and the batches live, and how the step is compiled.

  Attributes:
    mode: 'mesh', 'pmap' or 'single'.
    devices: the devices this process feeds: every device of the job's mesh ('mesh'), this
      process's devices ('pmap'), or one device ('single').
    mesh: the global Mesh ('mesh' only).
    pmap_devices: the `devices` argument of `jax.pmap`: every device of the job, the same
      list on every process ('pmap' only).
    block: wait for each step's results (the CPU deadlock guard when async dispatch is on).
  """

  mode: str
  devices: list
  mesh: Any = None
  pmap_devices: Optional[list] = None
  block: bool = False

  @property
  def num_devices(self) -> int:
    """Devices this process feeds (pmap: local; mesh: the whole job)."""
    return len(self.devices)

  @property
  def global_devices(self) -> int:
    """Devices the global batch is split over."""
    if self.mode == "pmap":
      return len(self.pmap_devices or self.devices)
    return len(self.devices)

  @property
  def axis_name(self):
    return AXIS if self.mode == "pmap" else None

  def _pmap(self, fn: Callable, **kw) -> Callable:
    return jax.pmap(fn, devices=self.pmap_devices or self.devices, **kw)

  # --- state -------------------------------------------------------------------------------
  def put_state(self, state):
    """Replicates a host state (the same on every process) onto the devices."""
    if self.mode == "pmap":
      n = self.num_devices
      stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), state)
      return self._pmap(lambda t: t)(stacked)
    if self.mode == "mesh":
      rep = NamedSharding(self.mesh, P())
      if jax.process_count() > 1:
        # Every process holds the whole (identical) value: its local part of a replicated array.
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(rep, np.asarray(x)), state)
      return jax.device_put(state, rep)
    return jax.device_put(state, self.devices[0])

  def host_state(self, state):
    """One host copy (numpy) of a replicated state: this process's first replica."""
    if self.mode == "pmap":
      return jax.tree.map(_first_replica, state)
    return jax.tree.map(_local_copy, state)

  # --- batches ------------------------------------------------------------------------------
  def put_batch(self, batch: dict) -> dict:
    """This host's part of a global batch, placed (split over devices along the batch axis)."""
    if self.mode == "pmap":
      n = self.num_devices
      return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)
    if self.mode == "mesh" and jax.process_count() > 1:
      sharding = NamedSharding(self.mesh, P(AXIS))
      return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
    # One process: hand the numpy batch to the jitted step, whose in_shardings place it.
    # That transfer happens in jit's C++ dispatch path; an explicit jax.device_put of the
    # batch dict costs about 0.24 ms per step on the 2-core CPU, more than a digits MLP step.
    return batch

  # --- compilation --------------------------------------------------------------------------
  def compile_train(self, step_fn: Callable) -> Callable:
    if self.mode == "pmap":
      fn = self._pmap(step_fn, axis_name=AXIS, donate_argnums=(0,))
    elif self.mode == "mesh":
      rep, data = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(AXIS))
      fn = jax.jit(step_fn, in_shardings=(rep, data), out_shardings=(rep, rep),
                   donate_argnums=(0,))
    else:
      single = jax.sharding.SingleDeviceSharding(self.devices[0])
      fn = jax.jit(step_fn, in_shardings=(single, single), donate_argnums=(0,))
    return _blocking(fn) if self.block else fn

  def compile_eval(self, eval_fn: Callable) -> Callable:
    if self.mode == "pmap":
      fn = self._pmap(eval_fn, axis_name=AXIS)
    elif self.mode == "mesh":
      rep, data = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(AXIS))
      fn = jax.jit(eval_fn, in_shardings=(rep, data), out_shardings=rep)
    else:
      single = jax.sharding.SingleDeviceSharding(self.devices[0])
      fn = jax.jit(eval_fn, in_shardings=(single, single))
    return _blocking(fn) if self.block else fn

  def metrics_to_host(self, metrics) -> dict:
    """Device metrics (replicated; per device under pmap) -> host numpy values."""
    if self.mode == "pmap":
      return jax.tree.map(_first_replica, metrics)
    return jax.tree.map(_local_copy, metrics)


def _local_copy(x) -> np.ndarray:
  """A host copy of a replicated array, from this process's first device.

  `np.asarray` (or `jax.device_get`) of an array that spans other processes' devices raises;
  the local copy is the same value. On one process it is what `jax.device_get` returns.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _first_replica(x) -> np.ndarray:
  """The first device's copy of a pmap output (replicated along a leading device axis)."""
  return np.asarray(x.addressable_data(0)).reshape(x.shape[1:])


def make_placement(mode: str, num_devices: int = 0) -> Placement:
  """Chooses devices for `mode` ('mesh' | 'pmap' | 'single'); num_devices 0 = all.

  On several processes, 'mesh' spans every device of the job (num_devices counts them all),
  'pmap' maps over every device of the job (num_devices must be 0 or this host's count) and
  'single' is refused: each process would train its own copy on its own slice of the data.
  """
  if mode not in MODES:
    raise UserError(f"Unknown parallel.mode {mode!r}. Valid modes: {', '.join(MODES)}.")
  block = guard_cpu_collectives()
  processes = jax.process_count()
  if mode == "single":
    if processes > 1:
      raise UserError(
          f"parallel.mode='single' cannot run on {processes} processes (each would train its "
          "own model on its slice of the data): use 'mesh' (the default) or 'pmap'.")
    return Placement("single", [jax.local_devices()[0]])
  if mode == "pmap":
    local = jax.local_devices()
    n = num_devices or len(local)
    if n > len(local):
      raise UserError(f"parallel.num_devices={n} but this host has {len(local)} devices.")
    if processes > 1:
      if n != len(local):
        raise UserError(
            f"parallel.num_devices={n}: multi-host pmap maps over every device of every host; "
            f"leave num_devices at 0 (this host has {len(local)}), or use parallel.mode='mesh'.")
      return Placement("pmap", local, pmap_devices=jax.devices(), block=block)
    return Placement("pmap", local[:n], block=block)
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise UserError(f"parallel.num_devices={n} but the job has {len(devices)} devices.")
  if processes > 1 and n != len(devices):
    raise UserError(
        f"parallel.num_devices={n}: a multi-host mesh spans every device of the job; leave "
        f"num_devices at 0 (the job has {len(devices)}).")
  mesh = jax.sharding.Mesh(np.array(devices[:n]), (AXIS,))
  return Placement("mesh", list(devices[:n]), mesh, block=block)


def check_batch_divisible(batch_size: int, placement: Placement) -> None:
  """The global batch must split evenly over every device of the job."""
  n = placement.global_devices
  if batch_size % n:
    raise UserError(
        f"batch_size={batch_size} does not split evenly over {n} devices: choose a multiple "
        f"of {n} (or set parallel.num_devices).")
