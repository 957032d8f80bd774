"""The check rules the planted-bug zoo (jrecipe/zoo) made: each with its bug and correct twin,
and both sides of their thresholds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jrecipe.checks import data as data_checks
from jrecipe.checks import optimizer as opt_checks

PARAMS = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
          "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}


def _schedule(tx, **kw):
  return opt_checks.effective_schedule(tx, PARAMS, total_steps=100, steps_per_epoch=10, **kw)


def test_effective_schedule_fails_a_frozen_layer_and_passes_it_when_frozen_on_purpose():
  labels = lambda p: {k: jax.tree.map(lambda _: "frozen" if k == "Dense_0" else "train", v)
                      for k, v in p.items()}
  frozen = optax.multi_transform({"train": optax.adam(1e-3), "frozen": optax.set_to_zero()},
                                 labels)
  bad = _schedule(frozen)
  assert bad.status == "fail" and "never updated" in bad.message, bad.message
  assert sorted(bad.details["frozen_leaves"]) == ["['Dense_0']['bias']", "['Dense_0']['kernel']"]
  assert _schedule(frozen, frozen_ok=True).status == "pass"  # config.init_from_freeze
  assert _schedule(optax.adam(1e-3)).status == "pass"


def test_effective_schedule_fails_gradient_ascent():
  bad = _schedule(optax.chain(optax.scale_by_adam(), optax.scale(1e-3)))
  assert bad.status == "fail" and "UP the gradient" in bad.message, bad.message
  good = _schedule(optax.chain(optax.scale_by_adam(), optax.scale(-1e-3)))
  assert good.status == "pass", good.message


def test_split_leakage_both_sides_of_its_threshold():
  x = np.random.RandomState(0).randn(400, 5).astype(np.float32)
  train, test = x[:300], x[300:]  # 100 test examples: fail above 1 copy (1%)
  arrays = lambda k: {"train": {"x": np.concatenate([train, test[:k]])}, "test": {"x": test}}
  assert data_checks.split_leakage(arrays(0)).status == "pass"
  assert data_checks.split_leakage(arrays(1)).status == "warn"  # 1% is inside
  over = data_checks.split_leakage(arrays(2))
  assert over.status == "fail" and "leaked" in over.message
  assert over.details["copies_in_train"]["test"] == [2, 100]


def test_lr_schedule_below_a_thousandth_within_the_first_half_fails_both_sides():
  """1e-3 x peak reached at 40% of the run fails; 1.1e-3 x peak at 50% only warns."""
  from jrecipe.checks import schedule as schedule_checks
  total = 1000
  reach = lambda ratio, at: (lambda t: 0.1 * jnp.power(ratio, jnp.minimum(t / at, 1.0)))
  dead = schedule_checks.lr_schedule(reach(0.9e-3, 400), total_steps=total, steps_per_epoch=100)
  assert dead.status == "fail" and "first 50%" in dead.message, dead.message
  assert 0.1 * total < dead.details["dead_step"] <= 400
  low = schedule_checks.lr_schedule(reach(1.1e-3, 500), total_steps=total, steps_per_epoch=100)
  assert low.status == "warn" and low.details["dead_step"] is None, low.message


def test_dropout_varies_fails_a_fixed_key_the_model_does_not_declare():
  """A mask from PRNGKey(0) asks for no dropout rng (has_dropout reads False): train mode
  still differs from eval, so it fails; the correct dropout passes; no dropout skips."""
  from jrecipe.checks import stochastic
  from tests import planted
  x = np.random.RandomState(0).randn(16, 8, 8, 1).astype(np.float32)
  keys = (jax.random.PRNGKey(1), jax.random.PRNGKey(2))

  def run(has_dropout, **bug):
    model = planted.linen_model(planted._MLP(10, **bug), has_dropout=has_dropout)  # pylint: disable=protected-access
    v = model.init(jax.random.PRNGKey(0), x[:2])
    return stochastic.dropout_varies(model.apply, v, x, keys, has_dropout=has_dropout,
                                     stateless=True)
  bad = run(False, fixed_dropout_key=True)
  assert bad.status == "fail" and "fixed inside the model" in bad.message, bad.message
  assert run(True).status == "pass"
  ident = lambda v, xx, train=False, rngs=None: xx.reshape((xx.shape[0], -1))
  no_dropout = stochastic.dropout_varies(ident, {}, x, keys, has_dropout=False, stateless=True)
  assert no_dropout.status == "skip", no_dropout.message


def test_eval_mode_leaves_batch_mixing_to_batch_independence_in_a_stateless_model():
  """A stateless model mixing the batch by value is batch_independence's root cause; with
  state (BatchNorm) the same dependence is eval_mode's."""
  from jrecipe.checks.outputs import eval_mode
  from tests import planted
  x = np.random.RandomState(0).randn(8, 8, 8, 1).astype(np.float32)
  model = planted.linen_model(planted._MLP(10, mix_batch=True), has_dropout=True)  # pylint: disable=protected-access
  v = model.init(jax.random.PRNGKey(0), x[:2])
  left = eval_mode(model.apply, v, x, stateless=True)
  assert left.status == "pass" and left.details["batch_mixing"], left.message
  assert eval_mode(model.apply, v, x, stateless=False).status == "fail"


def test_dropout_varies_vary_rtol_both_sides():
  """Outputs that differ across the two steps' keys by just under VARY_RTOL count as
  identical (fail: the mask never changes); just over, as different (pass)."""
  from jrecipe.checks import stochastic
  x = np.ones((4, 3), np.float32)
  keys = (jax.random.PRNGKey(0), jax.random.PRNGKey(1))  # raw keys [0, 0] and [0, 1]

  def varies_by(delta):
    apply = lambda v, xx, train, rngs: xx + (
        delta * rngs["dropout"][1].astype(jnp.float32) if train else 0.0)
    return stochastic.dropout_varies(apply, {}, x, keys, has_dropout=True)
  inside, outside = varies_by(0.5 * stochastic.VARY_RTOL), varies_by(2 * stochastic.VARY_RTOL)
  assert (inside.status, outside.status) == ("fail", "pass"), (inside.message, outside.message)
  assert inside.value < stochastic.VARY_RTOL < outside.value


def test_input_independent_baseline_calls_a_diverged_run_a_rate_too_high():
  """SGD at a huge rate diverges (loss peak > 3x its start): 'too HIGH', never 'too small';
  the same model and data at a sane rate pass."""
  from jrecipe.checks.baselines import input_independent_baseline
  from tests import planted
  rs = np.random.RandomState(0)
  x = rs.randn(256, 8, 8, 1).astype(np.float32)
  y = np.argmax(x.reshape(256, -1)[:, :10], axis=1).astype(np.int32)  # learnable from x
  model = planted.linen_model(planted._MLP(10))  # pylint: disable=protected-access
  v = model.init(jax.random.PRNGKey(0), x[:2])
  run = lambda tx: input_independent_baseline(model, planted.xent_loss(), v, x[:192], y[:192],
                                              tx=tx, steps=60, rng=0, x_val=x[192:],
                                              y_val=y[192:], batch_size=32)
  bad = run(optax.sgd(1e3))  # a non-finite loss (the finite peak: test_zoo's entry)
  assert bad.status == "fail" and "too HIGH" in bad.message, bad.message
  good = run(optax.adam(1e-2))
  assert good.status == "pass", good.message


def test_augmentation_keeps_labels_thresholds_both_sides():
  """A drop of agreement just above 0.30 + 2 SE fails and just below warns; just above
  0.15 + 2 SE warns and just below passes; exactly at a threshold is inside it."""
  from jrecipe.checks import stochastic
  status = stochastic.label_drop_status
  for se in (0.0, 0.02):
    fail_at = stochastic.LABEL_FAIL_DROP + 2 * se
    warn_at = stochastic.LABEL_WARN_DROP + 2 * se
    assert [status(fail_at + 1e-9, se), status(fail_at, se), status(fail_at - 1e-9, se)] == \
        ["fail", "warn", "warn"]
    assert [status(warn_at + 1e-9, se), status(warn_at, se), status(warn_at - 1e-9, se)] == \
        ["warn", "pass", "pass"]


def _init_bias_case(loss_with, mismatch, mismatch_without=0.0, bias_set=True):
  from jrecipe.checks import base, init
  ev0 = {"loss": 2.0, "se": 0.0}
  ev1 = {"loss": loss_with, "se": 0.0}
  return init._init_bias_verdict(  # pylint: disable=protected-access
      base.verdict("init_bias"), ev0, ev1, bias_set, mismatch, init.BASE_RATE_KL,
      mismatch_without, 0.05, "what", "what without").status


def test_init_bias_thresholds_both_sides():
  """The bias may raise the loss by 2% (+ 3 SE; here SE = 0): just under 2.04 from 2.0
  passes, just over fails. With the bias set, base rates within KL 0.7 nats pass, just above warn.
  Without the bias, labels within the balance tolerance pass, just above warn."""
  from jrecipe.checks import init
  kl = init.BASE_RATE_KL
  assert _init_bias_case(2.04 - 1e-6, 0.0) == "pass"
  assert _init_bias_case(2.04 + 1e-6, 0.0) == "fail"
  assert _init_bias_case(1.5, kl) == "pass"
  assert _init_bias_case(1.5, kl + 1e-6) == "warn"
  assert _init_bias_case(2.0, 0.0, mismatch_without=0.05, bias_set=False) == "pass"
  assert _init_bias_case(2.0, 0.0, mismatch_without=0.05 + 1e-6, bias_set=False) == "warn"


def test_label_shuffled_control_margin_both_sides():
  """The given labels count as learnt faster when their end mean is below the control's by
  at least 1% of it (flat curves: no standard error) and by 3 standard errors (noisy ones)."""
  from jrecipe.checks import baselines
  compare = baselines._compare  # pylint: disable=protected-access
  ctrl = np.full(100, 2.0)
  margin = baselines.CONTROL_MARGIN * 2.0
  assert compare(np.full(100, 2.0 - margin), ctrl)[0]
  assert not compare(np.full(100, 2.0 - 0.99 * margin), ctrl)[0]
  noise = np.tile([-0.2, 0.2], 50)  # the last 10 steps' mean has this spread's standard error
  se = np.sqrt(2 * np.var(noise[-10:], ddof=1) / 10)
  gap = baselines.CONTROL_SE * se
  assert gap > margin
  learnt = compare(2.0 - 1.001 * gap + noise, ctrl + noise)
  assert learnt[0] and learnt[3] == pytest.approx(gap)
  assert not compare(2.0 - 0.999 * gap + noise, ctrl + noise)[0]


def test_augmentation_varies_and_state_updates_no_change_tolerance_both_sides():
  """The 'no change' tolerance of augmentation_varies (per example) and state_updates (per
  leaf): a relative change of half VARY_RTOL counts as none, twice VARY_RTOL as a change."""
  from jrecipe.checks import stochastic
  from jrecipe.checks.outputs import _max_rel_diff  # pylint: disable=protected-access
  a = np.ones((3, 4), np.float64)
  for k, expect in ((0.5, False), (2.0, True)):
    b = a.copy()
    b[1, 2] += k * stochastic.VARY_RTOL
    changed = stochastic._changed(b, a)  # pylint: disable=protected-access
    assert changed.tolist() == [False, expect, False]
    state0 = {"batch_stats": {"mean": a}}
    moved = _max_rel_diff(state0, {"batch_stats": {"mean": b}})
    assert (moved > stochastic.VARY_RTOL) is expect, moved
