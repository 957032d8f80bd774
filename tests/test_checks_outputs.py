"""Planted bugs for the output checks: dropout/BN in eval, softmax twice, a bad vectorisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jrecipe.checks.outputs import assert_equivalent, eval_mode, logits_not_probabilities


class Net(nn.Module):
  """Dense, BatchNorm, ReLU, Dropout, Dense head; each flag plants one bug."""
  dropout_in_eval: bool = False
  bn_batch_stats_in_eval: bool = False
  head: str = "logits"  # 'logits' | 'softmax' | 'relu'

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(8)(x)
    h = nn.BatchNorm(use_running_average=not (train or self.bn_batch_stats_in_eval))(h)
    h = nn.Dropout(0.5, deterministic=not (train or self.dropout_in_eval))(nn.relu(h))
    out = nn.Dense(4)(h)
    if self.head == "softmax":
      return jax.nn.softmax(out)
    if self.head == "relu":
      return nn.relu(out)
    return out


def make(module, x, default_rng=False):
  """(apply, variables); BatchNorm updates discarded; `default_rng` supplies a dropout key
  when none is given (a framework that always passes one)."""
  variables = jax.jit(module.init)(jax.random.key(0), x)
  # Non-trivial running statistics, so that batch and running statistics differ.
  variables = {**variables, "batch_stats": jax.tree.map(lambda v: v + 0.3,
                                                        variables["batch_stats"])}

  def apply(v, xx, train=False, rngs=None):
    if rngs is None and default_rng:
      rngs = {"dropout": jax.random.key(42)}
    return module.apply(v, xx, train=train, rngs=rngs, mutable=["batch_stats"])[0]

  return apply, variables


@pytest.fixture(scope="module")
def x():
  return jnp.asarray(np.random.default_rng(1).normal(size=(6, 5)), jnp.float32)


def test_eval_mode_passes_correct_model(x):
  apply, variables = make(Net(), x)
  r = eval_mode(apply, variables, x)
  assert r.name == "eval_mode" and r.status == "pass", r.message
  assert r.value <= 1e-5 and r.expected == 0.0


def test_dropout_left_on_in_eval_fails(x):
  apply, variables = make(Net(dropout_in_eval=True), x)
  r = eval_mode(apply, variables, x)  # asks for a dropout rng in eval
  assert r.status == "fail" and "dropout left on in eval" in r.message, r.message
  apply, variables = make(Net(dropout_in_eval=True), x, default_rng=True)
  r = eval_mode(apply, variables, x)  # gets a key anyway: the output changes with it
  assert r.status == "fail" and "dropout left on in eval" in r.message, r.message
  assert r.details["relative_differences"]["rngs_a"] > 1e-3


def test_batchnorm_batch_statistics_in_eval_fails(x):
  apply, variables = make(Net(bn_batch_stats_in_eval=True), x)
  r = eval_mode(apply, variables, x)
  assert r.status == "fail" and "BatchNorm using batch statistics in eval" in r.message, r.message
  assert r.details["relative_differences"]["alone"] > 1e-3


def test_logits_not_probabilities(x):
  apply, variables = make(Net(), x)
  r = logits_not_probabilities(apply, variables, x, expects="logits")
  assert r.name == "logits_not_probabilities" and r.status == "pass", r.message
  assert r.value == 0.0
  apply, variables = make(Net(head="softmax"), x)
  r = logits_not_probabilities(apply, variables, x, expects="logits")
  assert r.status == "fail" and "softmax applied twice" in r.message, r.message
  assert r.value == 1.0
  apply, variables = make(Net(head="relu"), x)
  r = logits_not_probabilities(apply, variables, x, expects="scores")
  assert r.status == "warn" and "ReLU" in r.message, r.message
  r = logits_not_probabilities(apply, variables, x, expects="values")
  assert r.status == "skip" and r.message


def pairwise_loop(a, b):
  out = np.zeros((a.shape[0], b.shape[0]))
  for i in range(a.shape[0]):
    for j in range(b.shape[0]):
      out[i, j] = np.sqrt(np.sum((a[i] - b[j]) ** 2))
  return out


def pairwise_vectorised(a, b):
  sq = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
  return jnp.sqrt(jnp.maximum(sq, 0.0))


def pairwise_wrong(a, b):  # the classic slip: a transposed broadcast
  sq = jnp.sum(a * a, 1)[None, :] + jnp.sum(b * b, 1)[:, None] - 2.0 * a @ b.T
  return jnp.sqrt(jnp.maximum(sq, 0.0))


def test_assert_equivalent():
  rng = np.random.default_rng(0)
  inputs = [(rng.normal(size=(4, 3)), rng.normal(size=(4, 3))) for _ in range(3)]
  inputs = [tuple(np.asarray(v, np.float32) for v in pair) for pair in inputs]
  worst = assert_equivalent(pairwise_loop, pairwise_vectorised, inputs, rtol=1e-4, atol=1e-5)
  assert 0.0 <= worst < 1e-4
  with pytest.raises(AssertionError, match=r"input #0.*index \(0, 1\)"):
    assert_equivalent(pairwise_loop, pairwise_wrong, inputs)
  with pytest.raises(AssertionError, match="shapes differ"):
    assert_equivalent(lambda v: v, lambda v: v[None], [np.ones(3)])
