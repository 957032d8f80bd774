"""Process-level setup that must happen before JAX starts: caches, devices, multi-host.

Nothing here touches the JAX backend until `jax.distributed.initialize()` has run: JAX raises
if anything (even `jax.devices()`) creates the backend before it, and the CPU device count
and CPU dispatch mode are fixed when the backend is created.

Environment variables read by `setup_processes` (all optional):

- `JRECIPE_NUM_CPU_DEVICES=N`: this process's CPU platform has N devices
  (`jax.config.update('jax_num_cpu_devices', N)`; for tests and CPU clusters).
- `JRECIPE_COORDINATOR=HOST:PORT`, `JRECIPE_NUM_PROCESSES=P`, `JRECIPE_PROCESS_ID=I`: the
  arguments of `jax.distributed.initialize(coordinator_address, num_processes, process_id)`,
  read only with `--config.parallel.distributed=True`. Leave them unset where JAX finds its
  peers itself (Cloud TPU VM pods, Slurm, Open MPI); JAX's own `JAX_COORDINATOR_ADDRESS`
  also works.
"""

import logging
import os

DEFAULT_CACHE = os.path.expanduser(os.environ.get("JRECIPE_CACHE_DIR", "~/.cache/jrecipe"))

ENV_COORDINATOR = "JRECIPE_COORDINATOR"
ENV_NUM_PROCESSES = "JRECIPE_NUM_PROCESSES"
ENV_PROCESS_ID = "JRECIPE_PROCESS_ID"
ENV_NUM_CPU_DEVICES = "JRECIPE_NUM_CPU_DEVICES"

log = logging.getLogger("jrecipe")


def enable_compilation_cache(cache_dir: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache ('' or 'none' disables it).

  A second `--mode=check` or a restarted run then starts warm: on the 2-core CPU machine the
  cache cuts several seconds of compile time from every process start.
  """
  import jax
  if cache_dir is None:
    cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.join(DEFAULT_CACHE,
                                                                         "jax_cache"))
  if not cache_dir or cache_dir.lower() == "none":
    return None
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return cache_dir


def _env_int(name: str, minimum: int) -> int | None:
  """An integer environment variable (None when unset); a UserError names a bad value."""
  from jrecipe.errors import UserError
  raw = os.environ.get(name, "").strip()
  if not raw:
    return None
  try:
    value = int(raw)
  except ValueError:
    value = None
  if value is None or value < minimum:
    raise UserError(f"${name}={raw!r} must be an integer >= {minimum}.")
  return value


def setup_processes(distributed: bool) -> None:
  """Device count, CPU dispatch mode and multi-host initialisation, in the order JAX needs.

  Called once per process before anything creates the JAX backend. With `distributed`,
  every host of the job runs this with the same config and joins the job through
  `jax.distributed.initialize()`; without it, a set JRECIPE_COORDINATOR is an error, because
  each process would then believe it is process 0 and all of them would write the same files.
  """
  import jax
  from jrecipe.errors import UserError
  from jrecipe.train import parallel
  n = _env_int(ENV_NUM_CPU_DEVICES, 1)
  if n is not None:
    jax.config.update("jax_num_cpu_devices", n)
  if distributed:
    initialize_distributed()
  elif os.environ.get(ENV_COORDINATOR):
    raise UserError(
        f"${ENV_COORDINATOR} is set but --config.parallel.distributed is False: every process "
        "would train alone and write the same work directory. Pass "
        f"--config.parallel.distributed=True, or unset ${ENV_COORDINATOR}.")
  # Before the backend exists: the one moment the CPU dispatch mode can still be chosen.
  parallel.prefer_sync_cpu_dispatch()


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` for a multi-host job.

  With no JRECIPE_* variables JAX discovers the job itself (Cloud TPU VM pods, Slurm, Open
  MPI, or JAX_COORDINATOR_ADDRESS and friends). JRECIPE_COORDINATOR, JRECIPE_NUM_PROCESSES
  and JRECIPE_PROCESS_ID pass the three values explicitly (e.g. several GPU hosts, or several
  local CPU processes); the first requires the other two.
  """
  import jax
  from jrecipe.errors import UserError
  from jrecipe.train import parallel
  coordinator = os.environ.get(ENV_COORDINATOR, "").strip() or None
  num_processes = _env_int(ENV_NUM_PROCESSES, 1)
  process_id = _env_int(ENV_PROCESS_ID, 0)
  if coordinator and (num_processes is None or process_id is None):
    raise UserError(f"${ENV_COORDINATOR} is set: set ${ENV_NUM_PROCESSES} (how many processes) "
                    f"and ${ENV_PROCESS_ID} (this process, 0 to P-1) too.")
  if process_id is not None and num_processes is not None and process_id >= num_processes:
    raise UserError(f"${ENV_PROCESS_ID}={process_id} must be below "
                    f"${ENV_NUM_PROCESSES}={num_processes}.")
  # Multi-process CPU collectives run over gloo; dispatch them synchronously (shared/STACK.md).
  parallel.prefer_sync_cpu_dispatch(force=True)
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)
  log.info("Process %d of %d joined the job (%d local devices, %d in all).",
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())
