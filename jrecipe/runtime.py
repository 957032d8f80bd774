"""Process-level setup that must happen before JAX starts: caches, devices, multi-host.

Nothing here touches the JAX backend until `jax.distributed.initialize()` has run: JAX raises
if anything (even `jax.devices()`) creates the backend before it, and the CPU device count
and CPU dispatch mode are fixed when the backend is created.

Environment variables read by `setup_processes` (all optional):

- `JRECIPE_NUM_CPU_DEVICES=N`: this process's CPU platform has N devices
  (`jax.config.update('jax_num_cpu_devices', N)`; for tests and CPU clusters). Without it
  (and without `--xla_force_host_platform_device_count` in XLA_FLAGS), a CPU-only host
  chooses the count itself: `config.parallel.cpu_devices`, or by model family
  (`choose_cpu_devices`).
- `JRECIPE_XLA_DEFAULTS=1`: leave XLA's CPU compiler at its own defaults (`tune_cpu_xla`).
- `JRECIPE_COORDINATOR=HOST:PORT`, `JRECIPE_NUM_PROCESSES=P`, `JRECIPE_PROCESS_ID=I`: the
  arguments of `jax.distributed.initialize(coordinator_address, num_processes, process_id)`,
  read only with `--config.parallel.distributed=True`. Leave them unset where JAX finds its
  peers itself (Cloud TPU VM pods, Slurm, Open MPI); JAX's own `JAX_COORDINATOR_ADDRESS`
  also works.
"""

import importlib.util
import json
import logging
import os
import re

DEFAULT_CACHE = os.path.expanduser(os.environ.get("JRECIPE_CACHE_DIR", "~/.cache/jrecipe"))

ENV_COORDINATOR = "JRECIPE_COORDINATOR"
ENV_NUM_PROCESSES = "JRECIPE_NUM_PROCESSES"
ENV_PROCESS_ID = "JRECIPE_PROCESS_ID"
ENV_NUM_CPU_DEVICES = "JRECIPE_NUM_CPU_DEVICES"

log = logging.getLogger("jrecipe")

# The bench's measurements of one device per core against one device, per model family, on
# this machine (`python -m jrecipe.bench` writes it); read by `choose_cpu_devices`.
CPU_DEVICES_FILE = "cpu_devices.json"
# Used where the bench has not run on this machine: its measurements on the project's 2-core
# CPU (batch 128; docs/performance.md), with CPU_XLA_FLAGS applied. The mnist5k CNN ran 1.13x
# (1.11-1.14) the steps/s on one device per core (1.9x with XLA's default YNNPACK
# convolutions, which use one core); a small MLP's step is too short for the split and its
# all-reduce (digits MLP 0.6-0.7x). Unknown (user) models stay on one device.
DEFAULT_SPLIT_FAMILIES = {"cnn": True, "resnet": True, "mlp": False, "linear": False,
                          "nnx_mlp": False, "transformer": False}
# Modes that train for long enough to gain from several devices. The others run many tiny
# computations (the check battery, inspect, report...), fastest on one device, or share the
# cores with their siblings (search workers, usually several at once).
TRAINING_MODES = ("train",)

ENV_XLA_DEFAULTS = "JRECIPE_XLA_DEFAULTS"
# XLA:CPU compiler flags jrecipe adds to XLA_FLAGS before the backend starts, per jaxlib
# version and model family ("*": every model; a family's entry replaces it). Each was measured
# with that version (python -m jrecipe.bench, docs/performance.md); an unknown XLA flag aborts
# the process, so a new jaxlib gets none until it is measured.
# - ynn_fusion_type=-individual_convolution (every model): jaxlib 0.10.2 hands large
#   convolutions to YNNPACK library fusions by default, which took most of the CNN's step;
#   XLA's own (Eigen) convolution is about twice as fast. Models without convolutions are
#   unaffected.
# - ...,-reduce (convnets): YNNPACK's ReLU + average-pool fusion materialises a large
#   broadcast of 0.0; leaving reductions to XLA is faster for the CNN, but slower for the
#   digits transformer (softmax, layer norm), so not for every model.
# The profiles and step times: docs/performance.md, 'XLA:CPU flags jrecipe sets'.
CPU_XLA_FLAGS = {
    "0.10.2": {
        "*": ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",),
        "cnn": ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-reduce",),
    },
}


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


def tune_cpu_xla(family: str | None = None) -> list[str]:
  """Adds this jaxlib's measured XLA:CPU flags for `family` to XLA_FLAGS; returns them.

  Must run before the JAX backend starts (XLA reads XLA_FLAGS once, then). `family` is the
  config's model.name ('cnn', 'mlp', ...; None: the flags for every model). A flag the user
  already set in XLA_FLAGS, by name, is left as the user set it; `$JRECIPE_XLA_DEFAULTS=1`
  leaves XLA's defaults alone altogether (the bench's `--xla_defaults` uses it).
  """
  flags = cpu_xla_flags(family)
  current = os.environ.get("XLA_FLAGS", "")
  added = [f for f in flags if f.split("=", 1)[0] + "=" not in current]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current.strip()] + added).strip()
  return added


def cpu_xla_flags(family: str | None = None) -> tuple:
  """The flags `tune_cpu_xla(family)` adds here (a bench record is valid only with them)."""
  if os.environ.get(ENV_XLA_DEFAULTS, "").strip().lower() in ("1", "true", "yes"):
    return ()
  from importlib.metadata import PackageNotFoundError, version
  try:
    table = CPU_XLA_FLAGS.get(version("jaxlib"), {})
  except PackageNotFoundError:
    return ()
  return tuple(table.get(family, table.get("*", ())))


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


def host_cores() -> int:
  """CPU cores this process may run on (its affinity mask, not the machine's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def cpu_only_host() -> bool:
  """Whether JAX will run on the CPU alone, judged without creating the backend.

  JAX_PLATFORMS names the platforms when set; otherwise an installed accelerator plugin
  (CUDA, ROCm, TPU) means JAX will use it.
  """
  platforms = os.environ.get("JAX_PLATFORMS", os.environ.get("JAX_PLATFORM_NAME", "")).strip()
  if platforms:
    return platforms.lower() == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  try:
    from importlib.metadata import entry_points
    if list(entry_points(group="jax_plugins")):
      return False
  except Exception:  # broken metadata: fall through to the namespace packages
    pass
  try:
    import jax_plugins  # namespace package of the CUDA/ROCm plugins
    return not list(getattr(jax_plugins, "__path__", []))
  except ImportError:
    return True


def _forced_by_flags() -> bool:
  return bool(re.search(r"--xla_force_host_platform_device_count=\d+",
                        os.environ.get("XLA_FLAGS", "")))


def measured_families(cache_dir: str | None = None) -> dict:
  """{family: {'devices': n, 'speedup': x, ...}} measured by the bench on this machine, or {}.

  Only measurements taken with this many cores, this JAX version and the family's XLA flags
  count.
  """
  path = os.path.join(cache_dir or DEFAULT_CACHE, CPU_DEVICES_FILE)
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return {}
  from importlib.metadata import version
  if record.get("cores") != host_cores() or record.get("jax") != version("jax"):
    return {}
  return {family: m for family, m in dict(record.get("families", {})).items()
          if m.get("xla_flags", []) == list(cpu_xla_flags(family))}


def record_measurement(family: str, devices: int, speedup: float, details: dict,
                       cache_dir: str | None = None) -> str:
  """Stores the bench's split/one-device speedup for a model family (read at the next start).

  Returns the file's path. `devices` is what the family should get: one per core if the split
  was faster (speedup > 1.05), else 1.
  """
  from importlib.metadata import version
  from jrecipe.train.writer import write_json_atomic
  cache_dir = cache_dir or DEFAULT_CACHE
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, CPU_DEVICES_FILE)
  families = measured_families(cache_dir)
  families[family] = {"devices": int(devices), "speedup": round(float(speedup), 3),
                      "xla_flags": list(cpu_xla_flags(family)), **details}
  write_json_atomic(path, {"cores": host_cores(), "jax": version("jax"), "families": families})
  return path


def choose_cpu_devices(config, mode: str = "train", *, cores: int | None = None,
                       cpu_only: bool | None = None,
                       measured: dict | None = None) -> tuple[int | None, str]:
  """How many host devices a CPU-only process should create, and why (before JAX starts).

  Order: `config.parallel.cpu_devices` > 0 wins; 0 (auto) gives one device per core to a
  training mode whose model family ran faster split over the cores (this machine's bench
  measurement if `python -m jrecipe.bench` recorded one, else DEFAULT_SPLIT_FAMILIES), when
  the batch splits evenly; everything else gets one device. Returns (None, why) where the
  count is not jrecipe's to choose (an accelerator host, a multi-host job).

  Args:
    config: the run's ConfigDict (parallel.cpu_devices, model.name, batch_size).
    mode: the --mode being run.
    cores, cpu_only, measured: the host's facts (defaults: read from this machine).
  """
  from jrecipe.errors import UserError
  requested = int(config.parallel.get("cpu_devices", 0) or 0)
  if requested < 0:
    raise UserError(f"parallel.cpu_devices={requested} must be 0 (auto) or a device count.")
  cpu_only = cpu_only_host() if cpu_only is None else cpu_only
  if not cpu_only:
    return None, "accelerator host: JAX uses its accelerators"
  if requested:
    return requested, f"parallel.cpu_devices={requested}"
  if config.parallel.get("distributed"):
    return None, "multi-host job: set parallel.cpu_devices or $JRECIPE_NUM_CPU_DEVICES"
  cores = host_cores() if cores is None else cores
  family = str(config.model.name)
  if mode not in TRAINING_MODES or cores < 2 or config.parallel.mode == "single":
    return 1, f"one device for --mode={mode}" if mode not in TRAINING_MODES else "one device"
  measured = measured_families() if measured is None else measured
  if family in measured:
    split = measured[family].get("devices", 1) > 1
    source = (f"this machine's bench measured {measured[family].get('speedup')}x with "
              f"{cores} devices")
  elif family in DEFAULT_SPLIT_FAMILIES:
    split = DEFAULT_SPLIT_FAMILIES[family]
    source = "the bench's measurements on a 2-core CPU (docs/performance.md)"
  else:
    return 1, f"model {family!r}: one device unless parallel.cpu_devices says otherwise"
  if not split:
    return 1, f"model {family!r}: one device is fastest ({source})"
  if config.batch_size % cores:
    return 1, f"batch_size={config.batch_size} does not split over {cores} cores"
  return cores, f"model {family!r}: one device per core is faster ({source})"


def setup_processes(distributed: bool, config=None, mode: str = "train") -> int | None:
  """XLA:CPU flags (CPU-only hosts), device count, CPU dispatch mode and multi-host init.

  Called once per process before anything creates the JAX backend. With `distributed`,
  every host of the job runs this with the same config and joins the job through
  `jax.distributed.initialize()`; without it, a set JRECIPE_COORDINATOR is an error, because
  each process would then believe it is process 0 and all of them would write the same files.
  The CPU device count comes from $JRECIPE_NUM_CPU_DEVICES, else XLA_FLAGS, else
  `choose_cpu_devices(config, mode)` (with a config). Returns the count set, or None.
  """
  import jax
  from jrecipe.errors import UserError
  from jrecipe.train import parallel
  if cpu_only_host():  # XLA:CPU flags are measured for the CPU; an accelerator host keeps XLA's
    tune_cpu_xla(str(config.model.name) if config is not None else None)
  n = _env_int(ENV_NUM_CPU_DEVICES, 1)
  if n is None and config is not None and not _forced_by_flags():
    n, why = choose_cpu_devices(config, mode)
    if n is not None and n > 1:
      log.info("CPU-only host: %d host devices, the batch split over them (%s; "
               "--config.parallel.cpu_devices=1 for one).", n, why)
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
  return n


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
