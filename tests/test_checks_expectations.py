"""Expectations from first principles and the boundaries of every threshold (issue 18 items 1
and 4): a loss reduced over the wrong axis fails loss_at_init; the measured step size and
decay of the real optimizer; each threshold tested just inside and just outside."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jrecipe import losses
from jrecipe.checks import init as init_checks
from jrecipe.checks import optimizer as opt_checks
from jrecipe.checks import schedule as schedule_checks
from jrecipe.checks.base import verdict
from jrecipe.types import DataSpec, Loss
from tests.check_cases import SPEC, make_kit

TOTAL, SPE = 360, 36


@pytest.fixture(scope="module")
def kit():
  return make_kit()


def _user_loss(per_example):
  """A user's classification loss by import path, as `build_loss` wraps it (chance ln C)."""
  return losses.wrap_per_example(per_example, SPEC, "user:loss")


def _xent(axis=-1, scale=1.0):
  def per_example(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=axis)
    return -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0] * scale
  return per_example


@pytest.mark.parametrize("bug", ["wrong_axis", "divided_by_C", "summed_over_classes"])
def test_a_loss_wrong_in_its_own_expectation_fails(kit, bug):
  if bug == "wrong_axis":  # log_softmax over the batch: ln B at init, and ln B expected
    per_example = _xent(axis=0)
  elif bug == "divided_by_C":
    per_example = _xent(scale=0.1)
  else:  # the one-hot product summed the wrong way: every class's -log p
    per_example = lambda o, y: -jnp.sum(jax.nn.log_softmax(o), axis=-1)
  r = kit.run("loss_at_init", loss=_user_loss(per_example))
  assert r.status == "fail", r.message
  assert "softmax cross-entropy" in r.details["reference_kind"]


def test_the_correct_user_loss_and_the_registered_ones_pass(kit):
  assert kit.run("loss_at_init", loss=_user_loss(_xent())).status == "pass"
  assert kit.run("loss_at_init", loss=losses.softmax_xent(SPEC)).status == "pass"
  r = kit.run("loss_at_init", loss=losses.multiclass_svm(SPEC))
  assert r.status == "pass" and "Weston-Watkins" in r.details["reference_kind"], r.message


def test_an_unknown_loss_says_what_was_compared(kit):
  focal = Loss(name="focal", per_example=_xent(), expects="logits",
               chance=lambda c, t: 0.9 * np.log(c), predict=losses.predict_classes)
  r = kit.run("loss_at_init", loss=focal)
  assert "no closed form known for loss 'focal'" in r.message
  assert r.details["closed_form"] is None


@pytest.mark.parametrize("name", ["softmax_xent", "multiclass_svm", "l2", "huber"])
def test_closed_forms_agree_with_the_registered_losses_on_constant_outputs(name):
  rs = np.random.RandomState(0)
  if name in ("l2", "huber"):
    spec = DataSpec(name="r", task="regression", input_shape=(3,), num_classes=None,
                    class_names=None, value_range=(0.0, 1.0), splits={})
    loss, c = losses.LOSSES.get(name)(spec), None
    y, const = rs.randn(200, 2) * 3 + 1, np.array([0.5, -1.0])
  else:
    loss, c = losses.LOSSES.get(name)(SPEC), 10
    y, const = rs.randint(0, 10, 200), rs.randn(10)
  for b in (None, const):
    closed = losses.closed_form_at_constant(loss, c, y, b)
    outputs = np.broadcast_to(0.0 if b is None else b, (len(y), 10 if c else 2))
    code = float(jnp.mean(loss.per_example(jnp.asarray(outputs, jnp.float32), jnp.asarray(y))))
    assert closed["value"] == pytest.approx(code, rel=1e-5)
  if name == "softmax_xent":
    assert losses.closed_form_at_constant(loss, c, y, None)["value"] == pytest.approx(np.log(10))
  if name == "multiclass_svm":
    assert losses.closed_form_at_constant(loss, c, y, None)["value"] == pytest.approx(9.0)


@pytest.mark.parametrize("dev, status", [(0.099, "pass"), (0.101, "warn"), (0.199, "warn"),
                                         (0.201, "fail"), (-0.201, "fail")])
def test_loss_at_init_bands_both_sides(dev, status):
  r = init_checks._loss_at_init_band(verdict("loss_at_init"), "h", dev, pass_band=0.1,
                                     fail_band=0.2)
  assert r.status == status


# ------------------------------------------------------------- the measured step size

def _params(kit):
  return kit.ctx.variables["params"]


def _effective(kit, tx, total=TOTAL):
  return opt_checks.effective_schedule(tx, _params(kit), total_steps=total, steps_per_epoch=SPE)


@pytest.mark.parametrize("decay_steps, status", [(36, "fail"), (37, "fail"), (183, "fail"),
                                                 (184, "warn"), (190, "warn"), (200, "pass")])
def test_a_cosine_reaching_zero_at_exactly_10_percent_fails(kit, decay_steps, status):
  # optax's cosine is 0 at decay_steps: at step 36 = 10% of 360 it fails, and so it does
  # one step later (below 1e-3 x peak within the first half: half the run at ~0). At step
  # 180 (50%) the rate is 6.6e-4 x peak for 183 decay steps (fail), 1.2e-3 for 184 (warn),
  # 0.6% for 190 (warn), 2.4% for 200 (pass).
  cos = optax.cosine_decay_schedule(1e-3, decay_steps)
  assert _effective(kit, optax.adam(cos)).status == status
  ratio = lambda t: float(cos(t)) / 1e-3
  fn = lambda t: jnp.asarray(cos(t))
  r = schedule_checks.lr_schedule(fn, total_steps=TOTAL, steps_per_epoch=SPE, peak=1e-3)
  assert r.status == status, (r.message, ratio(35), ratio(36))


@pytest.mark.parametrize("warmup, status", [(TOTAL, "fail"), (2 * TOTAL, "fail"),
                                            (int(0.85 * TOTAL), "warn"),
                                            (int(0.5 * TOTAL), "pass")])
def test_a_warmup_as_long_as_the_run_fails(kit, warmup, status):
  sched = optax.linear_schedule(0.0, 1e-3, warmup)
  r = _effective(kit, optax.adam(sched))
  assert r.status == status, (r.message, r.details["warmup_fraction"])


def test_the_measured_step_size_of_sgd_momentum_and_adagrad(kit):
  assert _effective(kit, optax.sgd(0.1)).details["peak_update"] == pytest.approx(0.1)
  r = _effective(kit, optax.sgd(0.1, momentum=0.9))  # ramps to lr / (1 - mu): not a warm-up
  assert r.status == "pass" and r.details["peak_update"] == pytest.approx(1.0, rel=1e-3)
  assert _effective(kit, optax.adagrad(0.1)).status == "pass"  # 1/sqrt(t) by itself


def test_a_schedule_inside_a_user_optimizer_built_by_import_path(kit):
  from jrecipe import optim
  import ml_collections
  tx = optim.make_optimizer(ml_collections.ConfigDict({"name": "tests.test_checks_expectations:"
                                                       "decaying_adam", "learning_rate": 1e-3}),
                            None, None, steps_per_epoch=SPE, total_steps=TOTAL)
  r = _effective(kit, tx)
  assert r.status == "fail" and r.details["fail_step"] <= 36, r.message


def decaying_adam(learning_rate):
  """A user's optimizer factory with its own per-step decay (10x every 3 steps)."""
  return optax.adam(optax.exponential_decay(learning_rate, 3, 0.1))


# ------------------------------------------------------------- weight decay

_KERNELS = lambda p: jax.tree.map(lambda a: a.ndim > 1, p)


def _decay(kit, tx, total=TOTAL):
  return opt_checks.weight_decay(tx, _params(kit), total_steps=total)


def test_weight_decay_on_biases_fails_and_on_kernels_passes(kit):
  r = _decay(kit, optax.adamw(1e-3, weight_decay=1e-2))  # optax's default: every leaf
  assert r.status == "fail" and "bias" in r.message, r.message
  r = _decay(kit, optax.adamw(1e-3, weight_decay=1e-2, mask=_KERNELS))
  assert r.status == "pass" and r.details["decayed_leaves"], r.message
  assert _decay(kit, optax.adam(1e-3)).message.endswith("regularization_increases_loss).")


def test_weight_decay_1000x_too_strong_fails(kit):
  ok = _decay(kit, optax.adamw(1e-3, weight_decay=0.1, mask=_KERNELS))
  bad = _decay(kit, optax.adamw(1e-3, weight_decay=100.0, mask=_KERNELS))
  assert ok.status == "pass" and bad.status == "fail", (ok.message, bad.message)


@pytest.mark.parametrize("target, status", [(1.1e-6, "warn"), (0.9e-6, "fail"),
                                            (1.1e-3, "pass"), (0.9e-3, "warn")])
def test_weight_decay_thresholds_both_sides(kit, target, status):
  # decoupled decay multiplies the weights by (1 - lr * wd) each step
  lr = 1e-2
  wd = (1 - target ** (1 / TOTAL)) / lr
  r = _decay(kit, optax.adamw(lr, weight_decay=wd, mask=_KERNELS))
  assert r.value == pytest.approx(target, rel=1e-2) and r.status == status, r.message
