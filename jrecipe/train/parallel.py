"""Data parallelism: one pure step, placed on devices by a mesh (default) or by pmap.

- 'mesh': `jax.jit` with the state replicated and the batch split along a 'data' mesh axis
  (`NamedSharding`); XLA inserts the gradient all-reduce. Multi-host jobs build a global
  mesh and each host contributes its slice of the batch.
- 'pmap': the classic API; the step averages gradients with `lax.pmean` over 'batch'.
- 'single': plain `jax.jit` on the first device.
On one device all three give the same numbers as plain jit.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jrecipe.errors import UserError

MODES = ("mesh", "pmap", "single")
AXIS = "batch"


def guard_cpu_collectives() -> None:
  """Avoid the multi-device CPU all-reduce deadlock (shared/STACK.md).

  Asynchronously dispatched collectives on several forced host devices can hang in the
  rendezvous; synchronous dispatch on CPU avoids it at a negligible cost for these steps.
  """
  if jax.default_backend() == "cpu" and jax.device_count() > 1:
    jax.config.update("jax_cpu_enable_async_dispatch", False)


@dataclasses.dataclass
class Placement:
  """Where the state and the batches live, and how the step is compiled."""

  mode: str
  devices: list
  mesh: Any = None

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def axis_name(self):
    return AXIS if self.mode == "pmap" else None

  # --- state -------------------------------------------------------------------------------
  def put_state(self, state):
    """Replicates a (host or single-device) state onto the devices."""
    if self.mode == "pmap":
      n = self.num_devices
      stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), state)
      return jax.pmap(lambda t: t, devices=self.devices)(stacked)
    if self.mode == "mesh":
      rep = NamedSharding(self.mesh, P())
      if jax.process_count() > 1:
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(rep, np.asarray(x)), state)
      return jax.device_put(state, rep)
    return jax.device_put(state, self.devices[0])

  def host_state(self, state):
    """One host copy (numpy) of a replicated state."""
    if self.mode == "pmap":
      return jax.tree.map(_first_replica, state)
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))
                        if isinstance(x, jax.Array) else np.asarray(x), state)

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
      return jax.pmap(step_fn, axis_name=AXIS, devices=self.devices, donate_argnums=(0,))
    if self.mode == "mesh":
      rep, data = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(AXIS))
      return jax.jit(step_fn, in_shardings=(rep, data), out_shardings=(rep, rep),
                     donate_argnums=(0,))
    single = jax.sharding.SingleDeviceSharding(self.devices[0])
    return jax.jit(step_fn, in_shardings=(single, single), donate_argnums=(0,))

  def compile_eval(self, eval_fn: Callable) -> Callable:
    if self.mode == "pmap":
      return jax.pmap(eval_fn, axis_name=AXIS, devices=self.devices)
    if self.mode == "mesh":
      rep, data = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(AXIS))
      return jax.jit(eval_fn, in_shardings=(rep, data), out_shardings=rep)
    single = jax.sharding.SingleDeviceSharding(self.devices[0])
    return jax.jit(eval_fn, in_shardings=(single, single))

  def metrics_to_host(self, metrics) -> dict:
    """Device metrics (possibly replicated per device under pmap) -> host floats."""
    if self.mode == "pmap":
      return jax.tree.map(_first_replica, metrics)
    return jax.tree.map(np.asarray, jax.device_get(metrics))


def _first_replica(x) -> np.ndarray:
  """The first device's copy of a pmap output (replicated along a leading device axis)."""
  return np.asarray(x.addressable_data(0)).reshape(x.shape[1:])


def make_placement(mode: str, num_devices: int = 0) -> Placement:
  """Chooses devices for `mode` ('mesh' | 'pmap' | 'single'); num_devices 0 = all."""
  if mode not in MODES:
    raise UserError(f"Unknown parallel.mode {mode!r}. Valid modes: {', '.join(MODES)}.")
  if mode == "single":
    return Placement("single", [jax.local_devices()[0]])
  if mode == "pmap":
    local = jax.local_devices()
    n = num_devices or len(local)
    if n > len(local):
      raise UserError(f"parallel.num_devices={n} but this host has {len(local)} devices.")
    guard_cpu_collectives()
    return Placement("pmap", local[:n])
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise UserError(f"parallel.num_devices={n} but the job has {len(devices)} devices.")
  guard_cpu_collectives()
  mesh = jax.sharding.Mesh(np.array(devices[:n]), (AXIS,))
  return Placement("mesh", list(devices[:n]), mesh)


def check_batch_divisible(batch_size: int, placement: Placement) -> None:
  """The global batch must split evenly over every device of the job."""
  n = placement.num_devices * (jax.process_count() if placement.mode == "pmap" else 1)
  if batch_size % n:
    raise UserError(
        f"batch_size={batch_size} does not split evenly over {n} devices: choose a multiple "
        f"of {n} (or set parallel.num_devices).")
