"""Every use of JAX's private API in jrecipe, in one place, each with its public fallback.

JAX changes its private modules (`jax._src...`) between releases without notice. jrecipe uses
two private entry points, for reasons measured on this stack (docs/performance.md):

- `backends_are_initialized()`: whether the XLA backend already exists. jrecipe must choose
  CPU dispatch and device counts before the backend starts, and must never be what starts it
  (`jax.distributed.initialize()` has to come first on multi-host jobs).
- `batched_device_put`: the C++ host-to-device copy that `jax.device_put` ends in, called
  directly inside JAX's explicit-transfer scope (a 7x cheaper per-batch transfer on the 2-core
  CPU machine; see `jrecipe.train.parallel.device_put`).

If an entry point moves, the functions here fall back to the public API (or to the safe
answer) instead of failing; tests/test_jax_private.py fails loudly on such a JAX so that the
fallback is a decision, not an accident.
"""

from typing import Any, Optional


def backends_are_initialized(default: bool) -> bool:
  """Whether JAX's XLA backends exist yet; `default` if the private API moved."""
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return default


def device_put_api() -> Optional[dict[str, Any]]:
  """The private pieces of an explicit batched transfer, or None if they moved.

  Returns:
    {'scope': the explicit-device-put context manager (so `jax.transfer_guard` sees an
     explicit copy), 'core': jax._src.core (ShapedArray), 'dtypes': jax._src.dtypes
     (canonicalize_dtype), 'put': xla_client.batched_device_put}.
  """
  try:
    from jax._src import config as jax_config
    from jax._src import core, dtypes
    from jax._src.lib import xla_client as xc
    return {"scope": jax_config.explicit_device_put_scope, "core": core, "dtypes": dtypes,
            "put": xc.batched_device_put}
  except (ImportError, AttributeError):
    return None


def distributed_client() -> Optional[Any]:
  """The coordination-service client `jax.distributed.initialize()` made (its key-value store
  carries jrecipe's peer heartbeats, `jrecipe.train.peers`); None if the private API moved or
  the job is not distributed."""
  try:
    from jax._src import distributed
    return distributed.global_state.client
  except (ImportError, AttributeError):
    return None
