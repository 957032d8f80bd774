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
import os
print(json.dumps({{"set": n, "devices": jax.device_count(),
                   "async": not parallel.prefer_sync_cpu_dispatch(),
                   "xla": os.environ.get("XLA_FLAGS", "")}}))
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
  assert out.pop("xla") == " ".join(runtime.cpu_xla_flags("cnn"))  # the model's own flags
  assert out == {"set": runtime.host_cores(), "devices": runtime.host_cores(), "async": False}
  out = _probe("mlp", {**cache, "JRECIPE_NUM_CPU_DEVICES": "3"})
  assert out.pop("xla") == " ".join(runtime.cpu_xla_flags("mlp"))
  assert out == {"set": 3, "devices": 3, "async": False}


def test_tune_cpu_xla_adds_the_measured_flags_once(monkeypatch):
  """This jaxlib's measured flags go into XLA_FLAGS (a model family's own entry replacing the
  common one); a flag the user set by name stays theirs; $JRECIPE_XLA_DEFAULTS=1 and an
  unmeasured jaxlib leave XLA's defaults alone."""
  from importlib.metadata import version
  monkeypatch.setitem(runtime.CPU_XLA_FLAGS, version("jaxlib"),
                      {"*": ("--xla_cpu_a=-x", "--xla_cpu_b=1"), "cnn": ("--xla_cpu_a=-y",)})
  monkeypatch.delenv(runtime.ENV_XLA_DEFAULTS, raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_cpu_b=0")
  assert runtime.tune_cpu_xla("mlp") == ["--xla_cpu_a=-x"]
  assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                     "--xla_cpu_b=0 --xla_cpu_a=-x")
  assert runtime.tune_cpu_xla() == []  # idempotent
  monkeypatch.setenv("XLA_FLAGS", "")
  assert runtime.tune_cpu_xla("cnn") == ["--xla_cpu_a=-y"]
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv(runtime.ENV_XLA_DEFAULTS, "1")
  assert runtime.tune_cpu_xla() == [] and os.environ["XLA_FLAGS"] == ""
  monkeypatch.delenv(runtime.ENV_XLA_DEFAULTS)
  monkeypatch.delitem(runtime.CPU_XLA_FLAGS, version("jaxlib"))
  assert runtime.tune_cpu_xla() == [] and os.environ["XLA_FLAGS"] == ""


def test_a_bench_record_taken_with_other_xla_flags_does_not_count(tmp_path, monkeypatch):
  """Each family's record holds the XLA flags it was measured with; other flags void it."""
  from importlib.metadata import version
  d = str(tmp_path)
  monkeypatch.delenv(runtime.ENV_XLA_DEFAULTS, raising=False)
  runtime.record_measurement("cnn", 1, 1.0, {}, cache_dir=d)
  runtime.record_measurement("mlp", 1, 0.7, {}, cache_dir=d)
  assert set(runtime.measured_families(d)) == {"cnn", "mlp"}
  monkeypatch.setitem(runtime.CPU_XLA_FLAGS, version("jaxlib"),
                      {**runtime.CPU_XLA_FLAGS.get(version("jaxlib"), {}), "cnn": ("--other=1",)})
  assert set(runtime.measured_families(d)) == {"mlp"}
  monkeypatch.setenv(runtime.ENV_XLA_DEFAULTS, "1")
  assert runtime.cpu_xla_flags("cnn") == () and runtime.measured_families(d) == {}


CONV_PROBE = r"""
import re, sys
sys.path.insert(0, sys.argv[1])
from jrecipe import runtime
runtime.tune_cpu_xla(sys.argv[2] or None)  # what setup_processes does with a config
runtime.setup_processes(False)
import jax, jax.numpy as jnp
from flax import linen as nn
conv = nn.Conv(64, (3, 3))
x = jnp.ones((128, 14, 14, 32))
params = conv.init(jax.random.key(0), x)
pool = lambda h: nn.avg_pool(jax.nn.relu(h), (2, 2), strides=(2, 2))
grad = jax.jit(jax.grad(lambda p: jnp.sum(pool(conv.apply(p, x)) ** 2)))
hlo = grad.lower(params).compile().as_text()
computation = re.compile(r"^%(\S+) \(.*?\{\n(.*?)\n\}", re.M | re.S)
bodies = {m.group(1): m.group(2) for m in computation.finditer(hlo)}
ynn = [re.search(r"calls=%([^,\s]+)", ln).group(1) for ln in hlo.splitlines() if "__ynn_fusion" in ln]
print(sum(" convolution(" in bodies.get(c, "") for c in ynn),
      sum(bool(re.search(r" reduce(-window)?\(", bodies.get(c, ""))) for c in ynn),
      hlo.count(" convolution("))
"""


@pytest.mark.skipif(not runtime.cpu_xla_flags("cnn"),
                    reason="no measured XLA:CPU flags for this jaxlib (nothing to check)")
def test_convolutions_leave_ynnpack_with_the_tuned_flags():
  """The flags do what they were measured for. XLA's default hands a conv layer's
  convolutions and its ReLU + average pool to YNNPACK library fusions (together 2.2x slower
  on the mnist5k CNN). With the flags for every model the convolutions go to XLA's own
  kernels and reductions stay in YNNPACK (faster for the transformer); a convnet's flags
  take the reductions out too. Fails when a jaxlib stops honouring the flags, or stops
  needing them."""
  def probe(family, extra):
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e.update(extra)
    r = subprocess.run([sys.executable, "-c", CONV_PROBE, REPO, family], cwd=REPO, env=e,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return [int(v) for v in r.stdout.split()[-3:]]
  ynn_convs, ynn_reductions, convs = probe("", {runtime.ENV_XLA_DEFAULTS: "1"})
  assert convs >= 2 and ynn_convs >= 1, "XLA's default no longer uses YNNPACK for convs"
  assert ynn_reductions >= 1, "XLA's default no longer uses YNNPACK for reductions"
  ynn_convs, ynn_reductions, convs = probe("", {})
  assert convs >= 2 and ynn_convs == 0 and ynn_reductions >= 1
  ynn_convs, ynn_reductions, convs = probe("cnn", {})
  assert convs >= 2 and ynn_convs == 0 and ynn_reductions == 0


def test_start_up_does_not_import_what_a_fresh_run_does_not_use():
  """Warm start-up (issue 9): orbax (about 0.25 s) waits for the first checkpoint, flax.nnx
  (about 0.2 s) for an NNX model and grain (0.25-0.35 s) for a user who asks for the grain
  dataset; neither the training loop's imports nor its batch iterator pull them in."""
  code = ("import sys, types; import numpy as np; "
          "import jrecipe.main, jrecipe.train.loop, jrecipe.experiment; "
          "from jrecipe.data import pipeline; "
          "ds = types.SimpleNamespace(spec=types.SimpleNamespace(name='t', splits={'train': 10}), "
          "arrays={'train': {'x': np.arange(20.).reshape(10, 2), 'y': np.arange(10)}}); "
          "assert next(pipeline.train_batches(ds, batch_size=4, seed=0))['x'].shape == (4, 2); "
          "print(sorted(m for m in ('orbax.checkpoint', 'flax.nnx', 'grain') if m in sys.modules))")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == "[]"
