"""Tests for jrecipe.losses: each loss against a hand computation, chance values, sequence
averaging, predictions/accuracy, user losses by import path and config errors."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jrecipe.errors import UserError
from jrecipe.losses import LOSSES, build_loss
from jrecipe.types import DataSpec, Loss

CLS = DataSpec("cls", "classification", (4,), 3, None, (0.0, 1.0), {})
SEQ = DataSpec("seq", "sequence", (2,), 3, None, (0, 3), {}, time_axis=1)
REG = DataSpec("reg", "regression", (4,), None, None, (0.0, 1.0), {})

SCORES = jnp.array([[3.2, 5.1, -1.7], [1.3, 4.9, 2.0], [2.2, 2.5, -3.1]])
LABELS = jnp.array([0, 1, 2])


def test_registered_names():
  assert LOSSES.names() == ["huber", "l2", "multiclass_svm", "softmax_xent"]


def test_softmax_xent_hand_computed():
  loss = build_loss(ml_collections.ConfigDict({"name": "softmax_xent"}), CLS)
  assert loss.expects == "logits"
  s = np.asarray(SCORES, np.float64)
  expected = [np.log(np.exp(row).sum()) - row[y] for row, y in zip(s, [0, 1, 2])]
  np.testing.assert_allclose(loss.per_example(SCORES, LABELS), expected, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(loss.per_example)(SCORES, LABELS), expected, rtol=1e-5)


def test_softmax_chance_is_ln_c_exactly_at_zero_logits():
  loss = build_loss("softmax_xent", CLS)
  for c in (3, 10):
    per = loss.per_example(jnp.zeros((5, c)), jnp.arange(5) % c)
    np.testing.assert_allclose(per, math.log(c), rtol=1e-7)
    assert loss.chance(c, None) == pytest.approx(math.log(c), abs=0)


def test_multiclass_svm_hand_computed_cs231n_example():
  loss = build_loss({"name": "multiclass_svm"}, CLS)
  assert loss.expects == "scores"
  # CS231n's worked example: 2.9, 0 and 12.9.
  expected = [max(0, 5.1 - 3.2 + 1) + max(0, -1.7 - 3.2 + 1),
              max(0, 1.3 - 4.9 + 1) + max(0, 2.0 - 4.9 + 1),
              max(0, 2.2 + 3.1 + 1) + max(0, 2.5 + 3.1 + 1)]
  np.testing.assert_allclose(loss.per_example(SCORES, LABELS), expected, rtol=1e-6)
  np.testing.assert_allclose(loss.per_example(SCORES, LABELS), [2.9, 0.0, 12.9], rtol=1e-6)
  wide = build_loss({"name": "multiclass_svm", "margin": 2.0}, CLS)
  np.testing.assert_allclose(wide.per_example(SCORES[:1], LABELS[:1]), [3.9], rtol=1e-6)


def test_svm_chance_is_c_minus_one_times_margin_at_zero_scores():
  for margin in (1.0, 0.5):
    loss = build_loss({"name": "multiclass_svm", "margin": margin}, CLS)
    per = loss.per_example(jnp.zeros((4, 5)), jnp.array([0, 1, 2, 4]))
    np.testing.assert_allclose(per, 4 * margin)
    assert loss.chance(5, None) == 4 * margin


def test_l2_hand_computed_and_chance_from_targets():
  loss = build_loss("l2", REG)
  assert loss.expects == "values" and loss.correct is None
  pred = jnp.array([[1.0], [2.0], [0.5]])  # [B, 1] outputs against [B] targets
  y = jnp.array([0.0, 3.0, 1.0])
  np.testing.assert_allclose(loss.per_example(pred, y), [0.5, 0.5, 0.125])
  y2 = np.array([[1.0, -2.0], [3.0, 0.0], [2.0, 2.0]])
  np.testing.assert_allclose(loss.per_example(jnp.zeros((3, 2)), y2), [2.5, 4.5, 4.0])
  expected = 0.5 * np.sum(y2.var(axis=0) + y2.mean(axis=0) ** 2)  # = 11 / 3
  assert loss.chance(None, y2) == pytest.approx(expected)
  at_zero = float(loss.per_example(jnp.zeros((3, 2)), y2).mean())
  assert loss.chance(None, y2) == pytest.approx(at_zero)
  np.testing.assert_array_equal(loss.predict(pred), pred)


def test_huber_hand_computed_and_chance_from_targets():
  loss = build_loss({"name": "huber", "delta": 1.0}, REG)
  pred = jnp.array([0.5, 3.0, -2.0])
  y = jnp.array([0.0, 0.0, 0.0])
  np.testing.assert_allclose(loss.per_example(pred, y), [0.125, 2.5, 1.5])
  wide = build_loss({"name": "huber", "delta": 2.0}, REG)
  np.testing.assert_allclose(wide.per_example(pred, y), [0.125, 4.0, 2.0])
  targets = np.array([0.5, 3.0, -2.0])
  assert loss.chance(None, targets) == pytest.approx((0.125 + 2.5 + 1.5) / 3)


def test_sequence_losses_average_over_time():
  logits = jnp.array([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]],
                      [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])  # [B=2, T=2, C=3]
  labels = jnp.array([[0, 0], [1, 2]])
  xent = build_loss("softmax_xent", SEQ)
  lse = np.log(np.exp(2.0) + 2.0)
  lse1 = np.log(np.e + 2.0)
  np.testing.assert_allclose(xent.per_example(logits, labels),
                             [(np.log(3) + lse - 2.0) / 2, (lse1 - 1.0 + np.log(3)) / 2], rtol=1e-6)
  svm = build_loss("multiclass_svm", SEQ)
  np.testing.assert_allclose(svm.per_example(logits, labels), [(2 + 0) / 2, (0 + 2) / 2])
  np.testing.assert_array_equal(xent.predict(logits), [[0, 0], [1, 0]])
  np.testing.assert_allclose(xent.correct(logits, labels), [1.0, 0.5])


def test_classification_predict_and_correct():
  loss = build_loss("softmax_xent", CLS)
  np.testing.assert_array_equal(loss.predict(SCORES), [1, 1, 1])
  np.testing.assert_array_equal(loss.correct(SCORES, LABELS), [0.0, 1.0, 0.0])


def my_per_example(outputs, labels, scale=1.0):
  """A user loss by import path: scaled squared distance to the one-hot label."""
  return scale * jnp.sum((outputs - jax.nn.one_hot(labels, outputs.shape[-1])) ** 2, axis=-1)


def my_factory(spec, weight=1.0) -> Loss:
  """A user factory by import path returning a full Loss."""
  base = build_loss("softmax_xent", spec)
  return Loss(name="weighted", per_example=lambda o, y: weight * base.per_example(o, y),
              expects="logits", chance=lambda c, t: weight * math.log(c),
              predict=base.predict, correct=base.correct)


def test_user_losses_by_import_path():
  wrapped = build_loss({"name": f"{__name__}:my_per_example", "scale": 2.0}, CLS)
  assert wrapped.expects == "logits" and wrapped.chance(3, None) == pytest.approx(math.log(3))
  np.testing.assert_allclose(wrapped.per_example(jnp.zeros((2, 3)), jnp.array([0, 1])), [2.0, 2.0])
  np.testing.assert_array_equal(wrapped.correct(SCORES, LABELS), [0.0, 1.0, 0.0])
  full = build_loss({"name": f"{__name__}:my_factory", "weight": 0.5}, CLS)
  assert full.name == "weighted" and full.chance(3, None) == pytest.approx(0.5 * math.log(3))


def test_loss_config_errors():
  with pytest.raises(UserError, match="huber, l2, multiclass_svm, softmax_xent"):
    build_loss("cross_entropy", CLS)
  with pytest.raises(UserError, match="margin=1.0"):
    build_loss({"name": "multiclass_svm", "margn": 2.0}, CLS)
  with pytest.raises(UserError, match="regression"):
    build_loss("softmax_xent", REG)
  with pytest.raises(UserError, match="softmax_xent"):
    build_loss("l2", CLS)
  with pytest.raises(UserError, match="scale"):
    build_loss({"name": f"{__name__}:my_per_example", "sclae": 2.0}, CLS)
