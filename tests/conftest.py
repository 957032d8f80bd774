"""Shared test setup: a persistent JAX compilation cache so repeated sessions start warm."""

import os

os.environ.setdefault("JRECIPE_CACHE_DIR", os.path.expanduser("~/.cache/jrecipe"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.environ["JRECIPE_CACHE_DIR"], "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The product's XLA:CPU flags (runtime.CPU_XLA_FLAGS), before any test starts the backend;
# subprocesses inherit them through XLA_FLAGS.
from jrecipe import runtime  # noqa: E402  (stdlib-only at import: JAX is not started)

runtime.tune_cpu_xla()
