"""Device placement that fits accelerators: donated state buffers, batches prefetched to the
device ahead of the step, and the CPU-only tuning applied only on a CPU-only host."""

from importlib.metadata import version

import jax
import pytest

from jrecipe import experiment, runtime
from jrecipe.train import parallel
from jrecipe.train.trainer import Hook, Trainer
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def exp():
  return experiment.build(tiny_config())


@pytest.mark.parametrize("mode", ["single", "mesh"])
def test_the_compiled_step_donates_the_state(exp, mode):
  trainer = Trainer.from_experiment(exp, parallel.make_placement(mode, 1))
  state = trainer.to_device(trainer.initial_state())
  batch = trainer.placement.put_batch(next(trainer.batches(0)))
  hlo = trainer.step.lower(state, batch).as_text()
  assert hlo.count("tf.aliasing_output") >= len(jax.tree.leaves(state)) - 2  # in place
  new_state, _ = trainer.step(state, batch)
  assert all(x.is_deleted() for x in jax.tree.leaves(state))  # the old buffers were reused
  assert not any(x.is_deleted() for x in jax.tree.leaves(new_state))


class _Counting:
  def __init__(self, source):
    self.source, self.reads = source, 0

  def __iter__(self):
    return self

  def __next__(self):
    self.reads += 1
    return next(self.source)


class _Reads(Hook):
  def __init__(self, counter):
    self.counter, self.seen = counter, []

  def after_step(self, loop, metrics):
    self.seen.append((loop.step, self.counter.reads))


def test_batches_are_on_the_device_before_their_step(exp):
  trainer = Trainer.from_experiment(exp)
  counter = _Counting(trainer.batches(0))
  hook = _Reads(counter)
  trainer.run(trainer.to_device(trainer.initial_state()), num_steps=4, batches=counter,
              hooks=[hook])
  # While step k runs, batch k+1 has already been read and copied to the device.
  assert hook.seen == [(1, 2), (2, 3), (3, 4), (4, 5)]
  device = parallel.prefetch(iter([next(trainer.batches(0))]), trainer.placement.put_batch)
  first = next(device)
  assert all(isinstance(v, jax.Array) and v.committed for v in first.values())
  assert next(device, None) is None  # a finite source ends without an error


@pytest.mark.parametrize("platforms,tuned", [("cpu", True), ("cuda", False), ("tpu", False)])
def test_xla_cpu_flags_only_on_a_cpu_only_host(monkeypatch, platforms, tuned):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.delenv(runtime.ENV_XLA_DEFAULTS, raising=False)
  monkeypatch.delenv(runtime.ENV_NUM_CPU_DEVICES, raising=False)
  monkeypatch.setitem(runtime.CPU_XLA_FLAGS, version("jaxlib"), {"*": ("--xla_cpu_probe=1",)})
  runtime.setup_processes(False, None)
  assert ("--xla_cpu_probe=1" in runtime.os.environ["XLA_FLAGS"]) == tuned


def test_prefetch_bench_runs():
  """bench/prefetch.py (the A/B behind docs/performance.md's figure) in a tiny form."""
  import subprocess
  import sys
  from tests.helpers import REPO
  r = subprocess.run([sys.executable, "bench/prefetch.py", "--rounds", "1", "--steps", "3"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "prefetch/plain:" in r.stdout
