"""jrecipe.runtime: the CPU device count chosen before JAX starts, and its overrides."""

import json
import os
import subprocess
import sys

import pytest

from jrecipe import runtime
from jrecipe.errors import UserError
from tests.helpers import REPO, tiny_config


def _cnn(**kw):
  return tiny_config(**{"model.name": "cnn", "batch_size": 64, **kw})


@pytest.mark.parametrize("config,mode,expected", [
    (_cnn(), "train", 2),  # convnet, 2 cores: one device per core
    (_cnn(), "search_worker", 1),  # several workers share the cores
    (_cnn(), "check", 1),  # the battery's tiny computations: one device
    (_cnn(), "inspect", 1),
    (tiny_config(), "train", 1),  # small MLP: the split measured slower
    (_cnn(batch_size=63), "train", 1),  # the batch does not split over 2 cores
    (_cnn(**{"parallel.mode": "single"}), "train", 1),
    (tiny_config(**{"model.name": "mypkg.models:make"}), "train", 1),  # unknown: one device
    (tiny_config(**{"parallel.cpu_devices": 3}), "train", 3),  # the user's override wins
    (tiny_config(**{"parallel.cpu_devices": 2}), "check", 2),
])
def test_choose_cpu_devices_rule(config, mode, expected):
  n, why = runtime.choose_cpu_devices(config, mode, cores=2, cpu_only=True, measured={})
  assert n == expected, why
  assert why


def test_one_core_and_accelerator_hosts():
  assert runtime.choose_cpu_devices(_cnn(), "train", cores=1, cpu_only=True, measured={})[0] == 1
  n, why = runtime.choose_cpu_devices(_cnn(), "train", cores=2, cpu_only=False, measured={})
  assert n is None and "accelerator" in why
  n, _ = runtime.choose_cpu_devices(_cnn(**{"parallel.distributed": True}), "train", cores=2,
                                    cpu_only=True, measured={})
  assert n is None


def test_measurement_overrides_the_default_rule():
  """This machine's bench measurement beats the built-in table, both ways."""
  slow = {"cnn": {"devices": 1, "speedup": 0.8}}
  fast = {"mlp": {"devices": 2, "speedup": 1.3}}
  assert runtime.choose_cpu_devices(_cnn(), "train", cores=2, cpu_only=True,
                                    measured=slow)[0] == 1
  n, why = runtime.choose_cpu_devices(tiny_config(), "train", cores=2, cpu_only=True,
                                      measured=fast)
  assert n == 2 and "1.3x" in why


def test_negative_cpu_devices_is_a_user_error():
  with pytest.raises(UserError, match="cpu_devices"):
    runtime.choose_cpu_devices(tiny_config(**{"parallel.cpu_devices": -1}), "train", cores=2,
                               cpu_only=True, measured={})


def test_record_and_read_measurements(tmp_path):
  d = str(tmp_path)
  assert runtime.measured_families(d) == {}
  path = runtime.record_measurement("cnn", 2, 1.71, {"workload": "mnist5k_cnn"}, cache_dir=d)
  runtime.record_measurement("mlp", 1, 0.6, {}, cache_dir=d)
  got = runtime.measured_families(d)
  assert got["cnn"]["devices"] == 2 and got["cnn"]["speedup"] == 1.71
  assert got["mlp"]["devices"] == 1
  # A measurement from another machine shape (or JAX version) does not count.
  with open(path) as f:
    record = json.load(f)
  record["cores"] = runtime.host_cores() + 1
  with open(path, "w") as f:
    json.dump(record, f)
  assert runtime.measured_families(d) == {}
  with open(path, "w") as f:
    f.write("{not json")
  assert runtime.measured_families(d) == {}


def test_cpu_only_host_reads_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert runtime.cpu_only_host()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not runtime.cpu_only_host()


def test_compilation_cache_can_be_disabled():
  assert runtime.enable_compilation_cache("none") is None
  assert runtime.enable_compilation_cache("") is None


PROBE = """
import json, sys
sys.path.insert(0, {repo!r})
from jrecipe import runtime
from tests.helpers import tiny_config
cfg = tiny_config(**{{"model.name": {model!r}, "batch_size": 64}})
n = runtime.setup_processes(False, cfg, "train")
import jax
from jrecipe.train import parallel
print(json.dumps({{"set": n, "devices": jax.device_count(),
                   "async": not parallel.prefer_sync_cpu_dispatch()}}))
"""


def _probe(model, env):
  e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  e.update(env, JRECIPE_CACHE_DIR=env.get("JRECIPE_CACHE_DIR", ""))
  r = subprocess.run([sys.executable, "-c", PROBE.format(repo=REPO, model=model)], cwd=REPO,
                     env=e, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(runtime.host_cores() < 2 or not runtime.cpu_only_host(),
                    reason="needs a CPU-only host with 2+ cores")
def test_setup_processes_creates_the_chosen_devices(tmp_path):
  """Before the backend starts: a convnet gets one device per core, and sync CPU dispatch
  (the forced-device deadlock guard, shared/STACK.md); $JRECIPE_NUM_CPU_DEVICES overrides."""
  cache = {"JRECIPE_CACHE_DIR": str(tmp_path)}  # no measurement file: the built-in rule
  out = _probe("cnn", cache)
  assert out == {"set": runtime.host_cores(), "devices": runtime.host_cores(), "async": False}
  out = _probe("mlp", {**cache, "JRECIPE_NUM_CPU_DEVICES": "3"})
  assert out == {"set": 3, "devices": 3, "async": False}
