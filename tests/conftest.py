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

# The gs:// tests (tests/test_gcs.py) talk to a GCS API server on loopback: the one .ci/run
# started ($JRECIPE_TEST_GCS_PORT), or one the `gcs_server` fixture starts on a free port (each
# pytest-xdist worker its own: a worker inherits the controller's variables, so they are set,
# not defaulted). The client variables are set here, before any test imports gcsfs or fsspec
# (both read them at import); nothing else in the suite touches gs://.
import pytest  # noqa: E402

from tests import gcs_server as _gcs  # noqa: E402

if os.environ.get("JRECIPE_TEST_GCS_PORT"):
  _GCS_PORT, _GCS_OWN = int(os.environ["JRECIPE_TEST_GCS_PORT"]), False
else:
  _GCS_PORT, _GCS_OWN = _gcs.free_port(), True
os.environ.update(_gcs.client_env(_GCS_PORT))


@pytest.fixture(scope="session")
def gcs_server():
  """The GCS emulator's port: CI's, or one started for this test session (stopped after)."""
  srv = _gcs.serve(_GCS_PORT) if _GCS_OWN else None
  yield _GCS_PORT
  if srv is not None:
    srv.stop()


@pytest.fixture
def gcs_bucket(gcs_server):
  """A new, empty bucket on the emulator: 'gs://NAME'."""
  import uuid
  name = f"jr-{uuid.uuid4().hex[:12]}"
  _gcs.create_bucket(gcs_server, name)
  return f"gs://{name}"
