"""--mode=lr_find (recipe stage 5, 'Tune'): the rule on synthetic curves with planted noise and
spikes, and the real range test on digits: repeatable, sane, and nothing left behind."""

import json
import math
import os

import numpy as np
import pytest

from jrecipe.errors import UserError
from jrecipe.search import lr_find
from tests.helpers import tiny_config

LRS = 1e-7 * (1e1 / 1e-7) ** (np.arange(200) / 199)  # 8 decades over 200 steps


def curve(lrs):
  """A textbook range-test curve: flat at 2.3, falls fastest near 1e-3, flat bottom near
  3e-2, explodes past 1e-1."""
  x = np.log10(lrs)
  fall = 2.0 / (1 + np.exp(-(x + 3) * 3.0))  # logistic in log10(lr), centre 1e-3
  blow = np.where(x > -1, 10 ** ((x + 1) * 3) - 1, 0.0)
  return 2.3 - fall + blow


def naive_suggestion(lrs, losses):
  """What fragile finders do: the steepest raw point-to-point drop before the raw minimum."""
  losses = np.asarray(losses)
  i_min = int(np.nanargmin(losses))
  d = np.diff(losses[:i_min + 1]) / np.diff(np.log(lrs[:i_min + 1]))
  return float(lrs[int(np.argmin(d))])


def test_rule_on_a_clean_curve():
  rec = lr_find.suggest(LRS, curve(LRS))
  assert 1e-4 < rec["lr_steep"] < 3e-3  # the steepest fall, near 1e-3 (smoothing lag included)
  assert 1e-2 < rec["lr_min"] < 2e-1
  assert rec["suggestion"] == min(rec["lr_steep"], rec["lr_min"] / 10)
  assert LRS[rec["stop_index"] - 1] < 3e-1  # stopped once the loss exploded


@pytest.mark.parametrize("seed", range(5))
def test_rule_is_not_fooled_by_noise_and_spikes(seed):
  clean = lr_find.suggest(LRS, curve(LRS))["suggestion"]
  rng = np.random.default_rng(seed)
  noisy = curve(LRS) * np.exp(rng.normal(0, 0.08, LRS.size))  # 8% multiplicative noise
  spikes = rng.choice(np.arange(20, 150), size=6, replace=False)
  noisy[spikes] *= rng.uniform(5, 50, size=6)  # planted spikes, up to 50x
  noisy[int(np.searchsorted(LRS, 3e-5))] = 0.01  # and one planted dip far below the rest
  got = lr_find.suggest(LRS, noisy)["suggestion"]
  assert abs(math.log10(got / clean)) < 0.35, (got, clean)  # within a factor of ~2
  # The planted spikes do fool the naive rule: a test of the robust one that could fail.
  assert abs(math.log10(naive_suggestion(LRS, noisy) / clean)) > 0.35


def test_rule_without_descent_and_with_nan():
  flat = np.full(200, 2.3)
  assert lr_find.suggest(LRS, flat)["suggestion"] is None
  nan_end = curve(LRS)
  nan_end[120:] = np.nan  # diverged: the rest of the curve is ignored
  rec = lr_find.suggest(LRS, nan_end)
  assert rec["stop_index"] <= 120 and rec["suggestion"] is not None


def test_bad_settings_are_user_errors(tmp_path):
  c = tiny_config()
  c.lr_find.min_lr, c.lr_find.max_lr = 1.0, 1e-3
  with pytest.raises(UserError, match="min_lr < max_lr"):
    lr_find.run_mode(c, str(tmp_path))
  c = tiny_config()
  c.lr_find.steps = 5
  with pytest.raises(UserError, match="too few"):
    lr_find.run_mode(c, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.slow
def test_range_test_on_digits_is_repeatable_and_sane(tmp_path):
  """Adam on digits trains well at 1e-3 (configs/digits_mlp.py): the suggestion must land
  within a factor of 10 of it, and the same seed must give the same suggestion."""
  from configs import digits_mlp
  c = digits_mlp.get_config()
  c.progress = False
  assert c.optimizer.name == "adam" and c.optimizer.learning_rate == 1e-3
  c.lr_find.steps = 200
  c.lr_find.min_lr, c.lr_find.max_lr = 1e-6, 1.0
  a = lr_find.run_mode(c, str(tmp_path / "a"))
  b = lr_find.run_mode(c, str(tmp_path / "b"))
  assert a["suggestion"] == b["suggestion"] and a["losses"] == b["losses"]
  assert 1e-4 <= a["suggestion"] <= 1e-2, a["suggestion"]
  assert a["lr_min"] > a["suggestion"]
  assert sorted(os.listdir(tmp_path / "a")) == ["lr_find.json", "lr_find.png"]
  rec = json.loads((tmp_path / "a" / "lr_find.json").read_text())
  assert rec["suggestion"] == a["suggestion"] and len(rec["lrs"]) == len(rec["losses"])
  # Nothing leaks into training: DIR has no checkpoint or metrics for --mode=train to resume.
  assert not (tmp_path / "a" / "checkpoints").exists()
