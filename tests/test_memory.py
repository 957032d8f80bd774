"""Memory estimated from shapes before allocation (jrecipe/memory.py): exact for the state,
growing with the batch for the activations, and a config that cannot fit refused at once with
exit 2, the estimate, the limit and the field to change, and nothing written."""

import os
import subprocess
import sys
import time

import pytest

from jrecipe import experiment, memory
from jrecipe.errors import UserError
from tests.helpers import REPO, initial_state, tiny_config


@pytest.fixture(scope="module")
def exp():
  return experiment.build(tiny_config(ema_decay=0.99))


def test_the_state_estimate_is_the_real_initial_states_size(exp):
  est = memory.estimate(exp)
  state = initial_state(exp)
  assert est.state == memory.nbytes(state)
  assert est.params == memory.nbytes(state.params) == est.grads == est.ema
  assert est.opt_state == memory.nbytes(state.opt_state) > 0  # Adam: two moments
  assert est.devices == 1 and est.device_batch == exp.config.batch_size


def test_activations_grow_with_the_batch_and_exclude_the_weights(exp):
  import dataclasses
  a16, a32, a64 = (memory.estimate(dataclasses.replace(exp, config=tiny_config(batch_size=b)))
                   .activations for b in (16, 32, 64))
  assert a64 - a32 == 2 * (a32 - a16) > 0  # affine in the batch: per-example residuals
  # per example, at least the input (64 floats) and the (32,) hidden activation in float32
  assert (a32 - a16) / 16 >= (64 + 32) * 4


def test_a_config_that_cannot_fit_is_refused_with_estimate_limit_and_field(exp):
  est = memory.estimate(exp)
  need = est.state + est.per_device
  with pytest.raises(UserError) as e:
    memory.check_fits(exp, host=(need - 1, "a test limit"))
  msg = str(e.value)
  assert "\n" not in msg
  for needle in (memory.human(need), memory.human(need - 1), "a test limit",
                 "config.model.hidden=(32,)", "before anything was allocated"):
    assert needle in msg, msg
  assert memory.check_fits(exp, host=(need, "a test limit")) == est  # exactly fits: runs
  # The field named: the batch when the activations make the difference, else the model.
  without = need - 2 * est.activations
  with pytest.raises(UserError, match=r"Lower config.batch_size \(now 64\), which the "):
    memory.check_fits(exp, host=(without, "a test limit"))
  with pytest.raises(UserError, match=r"Lower the model's size \(config.model.hidden=\(32,\)\)"
                                      r": even without activations"):
    memory.check_fits(exp, host=(without - 1, "a test limit"))


def test_a_device_limit_checks_one_devices_share(exp, monkeypatch):
  est = memory.estimate(exp)
  big = (10**12, "plenty")
  with pytest.raises(UserError, match="of one device's share"):
    memory.check_fits(exp, host=big, device=(est.per_device - 1, "a small accelerator"))
  assert memory.check_fits(exp, host=big, device=(est.per_device, "an accelerator")) == est
  monkeypatch.setenv(memory.ENV_OFF, "0")
  assert memory.check_fits(exp, host=(1, "nothing")) is None


class _Accelerator:
  """What `device_free` reads of a jax Device on a GPU or TPU (this CPU has none)."""

  def __init__(self, i, stats, platform="gpu", kind="NVIDIA H100 80GB HBM3"):
    self.id, self.platform, self.device_kind, self._stats = i, platform, kind, stats

  def memory_stats(self):
    if isinstance(self._stats, Exception):
      raise self._stats
    return self._stats


def test_the_accelerator_branch_reads_the_least_free_devices_memory_stats(exp, monkeypatch):
  """On a GPU/TPU host the limit is the least free device's bytes_limit - bytes_in_use
  (`memory_stats()`), and a run that does not fit it is refused naming that device; a
  device without statistics (or a CPU device) leaves the device limit unknown, so only host
  RAM is checked. The devices here stand in for the accelerator this machine lacks."""
  import jax
  from jrecipe import jax_private
  gib = 1 << 30
  devices = []
  monkeypatch.setattr(jax_private, "backends_are_initialized", lambda *a: True)
  monkeypatch.setattr(jax, "local_devices", lambda *a, **k: devices)
  devices[:] = [_Accelerator(0, {"bytes_limit": 80 * gib, "bytes_in_use": 10 * gib}),
                _Accelerator(1, {"bytes_limit": 80 * gib, "bytes_in_use": 75 * gib})]
  assert memory.device_free() == (5 * gib, "the free memory of NVIDIA H100 80GB HBM3 1 "
                                  "(memory_stats)")
  for unknown in ({"bytes_in_use": 1}, RuntimeError("no statistics"), None):
    devices[:] = [_Accelerator(0, unknown)]
    assert memory.device_free() is None
  devices[:] = [_Accelerator(0, {"bytes_limit": gib}, platform="cpu")]
  assert memory.device_free() is None
  # check_fits on that host: not the CPU, so one device's share against the device limit.
  est = memory.estimate(exp)
  devices[:] = [_Accelerator(0, {"bytes_limit": est.per_device - 1, "bytes_in_use": 0},
                             platform="tpu", kind="TPU v5 lite")]
  with pytest.raises(UserError, match=r"of one device's share.*TPU v5 lite 0 \(memory_stats\)"):
    memory.check_fits(exp, host=(10**12, "plenty"))
  devices[:] = [_Accelerator(0, {"bytes_limit": est.per_device, "bytes_in_use": 0},
                             platform="tpu", kind="TPU v5 lite")]
  assert memory.check_fits(exp, host=(10**12, "plenty")) == est


def test_a_billion_unit_layer_exits_2_in_seconds_and_writes_nothing(tmp_path):
  """It used to hang at 0% CPU in the first allocation, after writing config.json."""
  wd = tmp_path / "wd"
  t = time.perf_counter()
  r = subprocess.run([sys.executable, "-m", "jrecipe", "--config=configs/digits_mlp.py",
                      f"--workdir={wd}", "--config.model.hidden=(1000000000,)"],
                     cwd=REPO, capture_output=True, text=True, timeout=60,
                     env={**os.environ, "JRECIPE_MEMORY_CHECK": "1"})
  elapsed = time.perf_counter() - t
  assert r.returncode == 2, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jrecipe: error: This config needs about"), \
      r.stderr[-3000:]
  assert "config.model.hidden=(1000000000,)" in lines[0] and "TB" in lines[0]
  assert not wd.exists()
  assert elapsed < 30, elapsed  # a start-up and a trace; no allocation, no compile
