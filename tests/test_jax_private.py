"""jrecipe's uses of JAX's private API still exist in the installed JAX (jrecipe/jax_private.py).

Each private entry point has a public fallback, so a JAX that moved one would run, slower or
more cautiously, without anyone noticing. This test makes that a decision: it fails on such a
JAX, naming what moved.
"""

import jax
import numpy as np

from jrecipe import jax_private
from jrecipe.train import parallel


def test_backend_probe_is_the_private_one_and_true_once_started():
  jax.devices()  # the test session has started the backend
  assert jax_private.backends_are_initialized(default=False) is True, (
      "jax._src.xla_bridge.backends_are_initialized moved: jrecipe can no longer tell whether "
      "the backend exists before choosing CPU dispatch (see jrecipe/jax_private.py)")


def test_batched_device_put_is_available_and_used():
  api = jax_private.device_put_api()
  assert api is not None, ("jax._src's batched_device_put or explicit_device_put_scope moved: "
                           "batches now go through the slower public jax.device_put")
  placement = parallel.make_placement("single")
  batch = {"x": np.ones((4, 3), np.float32)}
  out = placement.put_batch(batch)
  assert parallel._FAST_PUT is True  # the private path, not the fallback
  np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
