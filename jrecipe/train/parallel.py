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

import collections
import dataclasses
import os
import re
from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jrecipe import jax_private
from jrecipe.errors import UserError

MODES = ("mesh", "pmap", "single")
AXIS = "batch"


# True once this module turned CPU async dispatch off before the backend existed.
_SYNC_CPU_CLIENT = False


def _backend_started() -> bool:
  return jax_private.backends_are_initialized(default=True)  # if unknown: assume the worst


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
  That must be chosen before the backend exists (`prefer_sync_cpu_dispatch`). Synchronous
  dispatch alone was not enough: a 2-device digits MLP bench (1,400+ steps per loop, loaded
  machine) still aborted once in the rendezvous ("only 1 of them arrived on time"). So on
  several CPU devices the compiled steps also block on their results, which bounds the steps
  in flight to one (STACK.md's other remedy); the CNN steps this is used for are long next
  to the wait (docs/performance.md, 'Figures behind design choices'). Returns whether to block.
  """
  prefer_sync_cpu_dispatch()
  return jax.default_backend() == "cpu" and jax.device_count() > 1


def _blocking(fn: Callable) -> Callable:
  """`fn` that waits for its results before returning (one step in flight at most)."""

  def wrapped(*args):
    return jax.block_until_ready(fn(*args))

  wrapped.lower = fn.lower  # the compiled program stays inspectable (jrecipe.profile's FLOPs)
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

  # --- shardings ---------------------------------------------------------------------------
  def _sharding(self, replicated: bool):
    """The sharding of a replicated value or of a batch split along the leading axis.

    'pmap' arrays carry a leading device axis; `jax.pmap` (built on jit + shard_map) accepts
    any NamedSharding that splits that axis over its devices, so both go through the same
    explicit `jax.device_put`.
    """
    key = "_rep" if replicated else "_data"
    cached = self.__dict__.get(key)
    if cached is not None:
      return cached
    if self.mode == "single":
      sharding = jax.sharding.SingleDeviceSharding(self.devices[0])
    elif self.mode == "pmap":
      mesh = jax.sharding.Mesh(np.array(self.pmap_devices or self.devices), (AXIS,))
      sharding = NamedSharding(mesh, P(AXIS))
    else:
      sharding = NamedSharding(self.mesh, P() if replicated else P(AXIS))
    self.__dict__[key] = sharding
    return sharding

  # --- state -------------------------------------------------------------------------------
  def put_state(self, state):
    """Replicates a host state (the same on every process) onto the devices (explicitly)."""
    if self.mode == "pmap":
      n = self.num_devices
      stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), state)
      return self._put(stacked, self._sharding(replicated=False))
    return self._put(state, self._sharding(replicated=True))

  def _put(self, tree, sharding):
    if jax.process_count() > 1:
      # Each process holds its part (replicated values: the whole, identical value).
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)
    return device_put(tree, sharding)

  def host_state(self, state):
    """One host copy (numpy) of a replicated state: this process's first replica."""
    if self.mode == "pmap":
      return jax.tree.map(_first_replica, state)
    return jax.tree.map(_local_copy, state)

  # --- batches ------------------------------------------------------------------------------
  def put_batch(self, batch: dict) -> dict:
    """This host's part of a global batch, placed on the devices (split along the batch axis).

    An explicit `jax.device_put` with the step's input sharding: nothing is copied to the
    devices implicitly, so the loop runs under `jax.transfer_guard('disallow')`.
    """
    if self.mode == "pmap":
      n = self.num_devices
      batch = jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)
    return self._put(batch, self._sharding(replicated=False))

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


PREFETCH = 2  # device batches kept ready ahead of the step (flax's prefetch_to_device default)


def prefetch(batches: Iterable[dict], put: Callable, size: int = PREFETCH) -> Iterator[dict]:
  """Device batches `size` ahead: the copy of batch k+1 is under way while step k runs.

  `put` is the placement's explicit host-to-device copy (`Placement.put_batch`). The copies
  are asynchronous on accelerators, so the step never waits for its input's transfer; on
  CPU the cost is one batch gathered early. Batches are a pure function of (seed, step), so
  reading ahead changes nothing a resumed run sees.
  """
  it = iter(batches)
  queue: collections.deque = collections.deque()

  def fill():
    while len(queue) < size:
      try:
        queue.append(put(next(it)))
      except StopIteration:
        return

  fill()
  while queue:
    yield queue.popleft()
    fill()


def _fast_put(leaves: list, sharding) -> Optional[list]:
  """The explicit host-to-device copy that `jax.device_put` makes, without its Python layers.

  `jax.device_put`'s Python layers cost a noticeable share of a small model's step on CPU
  (figures in docs/performance.md, 'Figures behind design choices'). This calls the C++
  transfer it ends in (`batched_device_put`, inside JAX's explicit-transfer scope, so
  `jax.transfer_guard` sees an explicit copy), with the abstract value, devices and shard
  indices of each (sharding, shape, dtype) computed once.
  Only numpy arrays of JAX's canonical dtypes take this path. Private API: returns None (the
  caller uses `jax.device_put`) if it moved.
  """
  global _FAST_PUT
  if _FAST_PUT is False or not all(type(x) is np.ndarray for x in leaves):
    return None
  try:
    if _FAST_PUT is None:
      api = jax_private.device_put_api()
      if api is None:
        raise ImportError("the private batched_device_put moved")
      _JAX_PRIVATE.update(api)
    api = _JAX_PRIVATE
    out = []
    with api["scope"]():
      for x in leaves:
        key = (sharding, x.shape, x.dtype)
        plan = _PUT_PLANS.get(key)
        if plan is None:
          if api["dtypes"].canonicalize_dtype(x.dtype) != x.dtype:
            return None  # e.g. float64 without x64: jax.device_put converts it
          index = dict(sharding.addressable_devices_indices_map(x.shape))
          plan = _PUT_PLANS[key] = (api["core"].ShapedArray(x.shape, x.dtype), list(index),
                                    list(index.values()))
        aval, devices, indices = plan
        out.append(api["put"](aval, sharding, [_shard(x, i) for i in indices], devices, True,
                              True))
    _FAST_PUT = True
    return out
  except (ImportError, AttributeError, TypeError):  # the private API moved: the public one
    _FAST_PUT = False
    return None
  except RuntimeError:  # an input layout the C++ call refuses: this call takes the public path
    return None


_FAST_PUT = None  # None: not tried yet; False: unavailable in this JAX version
_JAX_PRIVATE: dict = {}  # the private JAX functions _fast_put calls, looked up once
_PUT_PLANS: dict = {}  # (sharding, shape, dtype) -> (aval, devices, shard indices)


def _shard(x: np.ndarray, index) -> np.ndarray:
  """x[index] as a C-contiguous ndarray (a 0-d array stays 0-d: x[()] would be a scalar)."""
  if x.ndim == 0:
    return x
  part = x[index]
  return part if part.flags.c_contiguous else np.ascontiguousarray(part)


def device_put(tree, sharding):
  """`jax.device_put(tree, sharding)` for host (numpy) pytrees: an explicit transfer, fast."""
  leaves, treedef = jax.tree.flatten(tree)
  out = _fast_put(leaves, sharding)
  if out is None:
    return jax.device_put(tree, sharding)
  return jax.tree.unflatten(treedef, out)


def _local_copy(x) -> np.ndarray:
  """A host copy of a replicated array, from this process's first device (explicit transfer).

  `jax.device_get` of an array that spans other processes' devices raises; the local copy is
  the same value. On one process it is what `jax.device_get` returns.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(jax.device_get(x))


def _first_replica(x) -> np.ndarray:
  """The first device's copy of a pmap output (replicated along a leading device axis)."""
  return np.asarray(jax.device_get(x.addressable_data(0))).reshape(x.shape[1:])


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
