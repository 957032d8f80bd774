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
