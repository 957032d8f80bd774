"""'Visualize just before the net' and 'don't trust LR decay defaults': planted bugs caught."""

import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jrecipe.checks import data as data_checks
from jrecipe.checks import schedule as schedule_checks
from jrecipe.types import DataSpec

SPEC = DataSpec(name="digits", task="classification", input_shape=(8, 8, 1), num_classes=10,
                class_names=tuple(str(i) for i in range(10)), value_range=(0.0, 16.0),
                splits={"train": 64})


@pytest.fixture(scope="module")
def digits():
  from sklearn.datasets import load_digits
  d = load_digits()
  x = d.images[:64].astype(np.float32)[..., None]
  return x, d.target[:64].astype(np.int32)


def normalized(x):
  return (x - x.mean()) / x.std()


# ---------------------------------------------------------------- data_before_net

def test_data_before_net_normalized_images_pass_with_grid(digits, tmp_path):
  x, y = digits
  r = data_checks.data_before_net(normalized(x), y, spec=SPEC, artifacts_dir=str(tmp_path))
  assert r.status == "pass", r.message
  lo, hi = r.value
  assert lo < 0 < hi and abs(r.details["mean"]) < 1e-4
  assert r.artifacts[0].endswith("data_before_net.png") and os.path.getsize(r.artifacts[0]) > 1000
  assert sum(r.details["label_counts"]) == 64


def test_data_before_net_no_artifacts_dir_writes_nothing(digits):
  x, y = digits
  r = data_checks.data_before_net(normalized(x), y, spec=SPEC)
  assert r.artifacts == []


def test_data_before_net_non_finite_fails(digits):
  x, y = digits
  x = normalized(x)
  x[5, 2, 3, 0] = np.nan
  r = data_checks.data_before_net(x, y, spec=SPEC)
  assert r.status == "fail" and "not finite" in r.message and "example 5" in r.message


def test_data_before_net_constant_inputs_fail(digits):
  _, y = digits
  r = data_checks.data_before_net(np.zeros((64, 8, 8, 1), np.float32), y, spec=SPEC)
  assert r.status == "fail" and "constant" in r.message


def test_data_before_net_identical_examples_fail(digits):
  x, y = digits
  same = np.repeat(normalized(x)[:1], 64, axis=0)
  r = data_checks.data_before_net(same, y, spec=SPEC)
  assert r.status == "fail" and "identical" in r.message


def test_data_before_net_labels_out_of_range_fail(digits):
  x, y = digits
  r = data_checks.data_before_net(normalized(x), y + 1, spec=SPEC)  # 1-based labels
  assert r.status == "fail" and "[10]" in r.message and "outside [0, 10)" in r.message


def test_data_before_net_one_hot_labels_fail(digits):
  x, y = digits
  r = data_checks.data_before_net(normalized(x), np.eye(10, dtype=np.float32)[y] * 0.5,
                                  spec=SPEC)
  assert r.status == "fail" and "not integers" in r.message


def test_data_before_net_unnormalised_warns_and_raw_pixels_fail(digits):
  x, y = digits
  raw = data_checks.data_before_net(x, y, spec=SPEC)  # raw digits: 0..16, mean ~5
  assert raw.status == "warn" and "unnormalised" in raw.message
  pixels = data_checks.data_before_net(x * 255.0 / 16.0, y, spec=SPEC)  # mean ~78, std ~96
  assert pixels.status == "fail" and "raw 0-255" in pixels.message
  # both sides of RAW_PIXELS: a scale just inside warns, just outside fails
  std = float(np.std(x))
  inside = data_checks.data_before_net(x * (0.99 * data_checks.RAW_PIXELS / std), y, spec=SPEC)
  outside = data_checks.data_before_net(x * (1.01 * data_checks.RAW_PIXELS / std), y, spec=SPEC)
  assert (inside.status, outside.status) == ("warn", "fail"), (inside.message, outside.message)
  unit = data_checks.data_before_net(x / 16.0, y, spec=SPEC)  # [0, 1] images are fine
  assert unit.status == "pass", unit.message


def test_data_before_net_features_heatmap_and_feature_scale(tmp_path):
  rs = np.random.RandomState(0)
  x = rs.randn(32, 12).astype(np.float32)
  y = rs.randint(0, 3, 32)
  r = data_checks.data_before_net(x, y, num_classes=3, artifacts_dir=str(tmp_path))
  assert r.status == "pass", r.message and os.path.exists(r.artifacts[0])
  x[:, 4] = x[:, 4] * 1000.0 + 5000.0
  bad = data_checks.data_before_net(x, y, num_classes=3)
  assert bad.status == "warn"


def test_data_before_net_tokens_and_regression(tmp_path):
  spec = DataSpec(name="seq", task="sequence", input_shape=(16,), num_classes=5,
                  class_names=tuple("abcde"), value_range=(0, 4), splits={"train": 8},
                  time_axis=1)
  rs = np.random.RandomState(0)
  tokens = rs.randint(0, 5, (8, 16)).astype(np.int32)
  r = data_checks.data_before_net(tokens, np.roll(tokens, -1, axis=1), spec=spec,
                                  artifacts_dir=str(tmp_path))
  assert r.status == "pass", r.message and os.path.getsize(r.artifacts[0]) > 1000
  bad = data_checks.data_before_net(tokens, tokens + 1, spec=spec)
  assert bad.status == "fail"
  reg = data_checks.data_before_net(rs.randn(16, 3).astype(np.float32),
                                    np.array([0.5] * 15 + [np.inf], np.float32))
  assert reg.status == "fail" and "targets" in reg.message


# ---------------------------------------------------------------- lr_schedule

TOTAL, SPE = 1000, 100  # a 10-epoch run


def test_lr_schedule_constant_passes_with_plot(tmp_path):
  r = schedule_checks.lr_schedule(lambda t: jnp.full(jnp.shape(t), 3e-4), total_steps=TOTAL,
                                  steps_per_epoch=SPE, artifacts_dir=str(tmp_path))
  assert r.status == "pass", r.message
  assert r.value == pytest.approx(1.0)
  assert r.artifacts[0].endswith("lr_schedule.png") and os.path.getsize(r.artifacts[0]) > 1000


def test_lr_schedule_decay_to_zero_in_first_tenth_fails():
  # An exponential decay rate meant per epoch, applied per step: gone after ~70 steps.
  r = schedule_checks.lr_schedule(lambda t: 0.1 * jnp.exp(-0.1 * t), total_steps=TOTAL,
                                  steps_per_epoch=SPE)
  assert r.status == "fail", r.message
  assert r.details["fail_step"] < 0.1 * TOTAL
  assert "first 10%" in r.message


def test_lr_schedule_cosine_over_the_run_passes():
  cosine = lambda t: 0.1 * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(t / TOTAL, 1.0)))
  r = schedule_checks.lr_schedule(cosine, total_steps=TOTAL, steps_per_epoch=SPE)
  assert r.status == "pass", r.message


def test_lr_schedule_warmup_from_zero_is_not_a_decay():
  warm = lambda t: 0.1 * jnp.minimum(1.0, t / 50.0)  # starts at exactly 0
  r = schedule_checks.lr_schedule(warm, total_steps=TOTAL, steps_per_epoch=SPE, peak=0.1)
  assert r.status == "pass", r.message


def test_lr_schedule_early_step_decay_warns():
  # Decays at epochs 2 and 3: 0.5% of the peak from 30% of the run on.
  step = lambda t: 0.1 * jnp.where(t >= 300, 0.005, jnp.where(t >= 200, 0.1, 1.0))
  r = schedule_checks.lr_schedule(step, total_steps=TOTAL, steps_per_epoch=SPE)
  assert r.status == "warn", r.message
  assert r.details["warn_step"] == 300


def test_lr_schedule_boundaries_beyond_the_run_warn():
  imagenet = lambda t: 0.1 * jnp.where(t >= 30 * SPE, 0.1, 1.0)
  r = schedule_checks.lr_schedule(imagenet, total_steps=5 * SPE, steps_per_epoch=SPE,
                                  boundaries_steps=[30 * SPE, 60 * SPE])
  assert r.status == "warn", r.message
  assert "epoch 30" in r.message and "5 epochs" in r.message


def test_lr_schedule_scalar_only_python_schedule():
  # float(t) only works on scalars: the check falls back to one call per step. 1/t decay with
  # k=5 per step: 1.0% of the peak at step 19 (first 10%: above 1e-3), 0.2% by step 99.
  r = schedule_checks.lr_schedule(lambda t: 0.1 / (1.0 + 5.0 * float(t)), total_steps=200,
                                  steps_per_epoch=20)
  assert r.status == "warn", r.message
  assert r.details["fail_step"] is None and r.details["warn_step"] < 100


def test_lr_schedule_zero_and_nan_fail():
  zero = schedule_checks.lr_schedule(lambda t: jnp.zeros(jnp.shape(t)), total_steps=10,
                                     steps_per_epoch=5)
  assert zero.status == "fail"
  nan = schedule_checks.lr_schedule(lambda t: jnp.full(jnp.shape(t), math.nan), total_steps=10,
                                    steps_per_epoch=5)
  assert nan.status == "fail"
