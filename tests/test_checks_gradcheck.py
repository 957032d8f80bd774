"""Planted bugs for the CS231n gradient check: wrong custom_vjp rules, kinks, every leaf, x64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jrecipe.checks.gradcheck import gradient_check, gradient_check_model, relu_pattern
from jrecipe.train.step import l2_penalty
from jrecipe.types import Loss, Model
from jrecipe.zoo.models import tanh_with_rule


def mlp_loss(act):
  def loss(params, x, y):
    h = act(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  return loss


def reg_loss(params, x, y):
  del x, y
  return 1e-3 * l2_penalty(params)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)  # numpy data: no compilations for drawing test inputs
  f32 = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
  x, y = f32(8, 5), jnp.asarray(rng.integers(0, 3, size=8), jnp.int32)
  params = {"w1": f32(5, 7, scale=0.5), "b1": f32(7, scale=0.1),
            "w2": f32(7, 3, scale=0.5), "b2": f32(3, scale=0.1)}
  return x, y, params


def test_correct_custom_vjp_passes_and_x64_is_restored(data, tmp_path):
  x, y, params = data
  r = gradient_check(mlp_loss(tanh_with_rule()), reg_loss, params, args=(x, y),
                     artifacts_dir=str(tmp_path))
  assert r.name == "gradient_check" and r.status == "pass", r.message
  assert r.value < 1e-7
  assert [row["leaf"] for row in r.details["table"]] == ["b1", "b2", "w1", "w2"]
  assert len(r.details["reg_table"]) == 4
  assert all(row["coords"] == min(4, np.prod(row["shape"])) for row in r.details["table"])
  assert r.details["check_grads"] == {"data": "passed"}
  assert not jax.config.jax_enable_x64
  assert jnp.asarray(1.0).dtype == jnp.float32
  assert jnp.asarray(x).dtype == jnp.float32
  assert r.artifacts and r.artifacts[0].endswith("gradient_check.png")
  assert set(r.details["other_h"]["data"]) == {1e-4, 1e-6}  # "try other h", for the plot


@pytest.mark.parametrize("scale,sign", [(1.01, 1.0), (1.0, -1.0)])
def test_wrong_custom_vjp_rule_fails(data, scale, sign):
  x, y, params = data
  r = gradient_check(mlp_loss(tanh_with_rule(scale, sign)), None, params, args=(x, y))
  assert r.status == "fail", r.message
  rows = {row["leaf"]: row for row in r.details["table"]}
  assert rows["w1"]["status"] == "fail" and rows["b1"]["status"] == "fail"
  assert rows["w2"]["status"] == "pass"  # the head's gradient does not go through the rule
  assert r.details["check_grads"]["data"].startswith("failed")
  assert r.details["reg_table"] == []
  if scale != 1.0:
    assert rows["w1"]["systematic_ratio"] == pytest.approx(1.01, rel=1e-6)
    assert "1.01" in r.message
  assert not jax.config.jax_enable_x64


class ReLUNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.relu(nn.Dense(6)(x)))


def test_relu_kinks_are_counted_not_failed(data):
  x, _, _ = data
  module = ReLUNet()
  params = jax.jit(module.init)(jax.random.key(1), x)["params"]
  # Piecewise linear in each single coordinate: exact except across a kink. A large h
  # crosses kinks on purpose.
  loss = lambda p: jnp.sum(module.apply({"params": p}, x))
  kinks = lambda p: relu_pattern(module, {"params": p}, x)
  r = gradient_check(loss, None, params, h=1.0, kink_fn=kinks, run_check_grads=False)
  assert r.status != "fail", r.message
  assert r.details["kinks"] > 0 and "kink" in r.message
  assert r.value < 1e-7  # the coordinates that crossed no kink are exact
  blind = gradient_check(loss, None, params, h=1.0, run_check_grads=False)
  assert blind.status == "fail"


class Net(nn.Module):
  """Dense, BatchNorm, tanh, Dropout, Dense: smooth, with every kind of state."""

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.BatchNorm(use_running_average=not train)(nn.Dense(7)(x))
    h = nn.Dropout(0.3, deterministic=not train)(jnp.tanh(h))
    return nn.Dense(3)(h)


def _model(module):
  def apply_with_state(variables, x, train=False, rngs=None):
    if not train:
      return module.apply(variables, x, train=False), {}
    out, state = module.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
    return out, dict(state)

  return Model(init=lambda rng, x: dict(module.init(rng, x)),
               apply=lambda v, x, train=False, rngs=None: apply_with_state(v, x, train, rngs)[0],
               apply_with_state=apply_with_state, module=module, has_dropout=True,
               has_batchnorm=True)


def test_gradient_check_model_train_mode_with_dropout_and_batchnorm(data):
  x, y, _ = data
  model = _model(Net())
  variables = jax.jit(model.init)(jax.random.key(2), x)
  loss = Loss(name="softmax_xent", expects="logits", chance=lambda c, t: np.log(c),
              per_example=optax.softmax_cross_entropy_with_integer_labels,
              predict=lambda o: jnp.argmax(o, -1))
  r = gradient_check_model(model, loss, variables, {"x": x, "y": y}, l2=1e-2,
                           rng=jax.random.key(3), run_check_grads=False)
  assert r.status == "pass", r.message
  assert r.value < 1e-7
  leaves = {row["leaf"] for row in r.details["table"]}
  assert leaves == {"BatchNorm_0/bias", "BatchNorm_0/scale", "Dense_0/bias", "Dense_0/kernel",
                    "Dense_1/bias", "Dense_1/kernel"}
  assert {row["leaf"] for row in r.details["reg_table"]} == leaves
  assert r.details["kink_detection"] and r.details["examples"] == 8
  assert r.artifacts == []
  assert not jax.config.jax_enable_x64
  assert variables["params"]["Dense_0"]["kernel"].dtype == jnp.float32


def test_float32_inside_the_loss_is_reported_not_trusted(data):
  x, y, params = data
  loss = lambda p, x, y: mlp_loss(jnp.tanh)(p, x, y).astype(jnp.float32)
  r = gradient_check(loss, None, params, args=(x, y), run_check_grads=False)
  assert r.status == "warn" and "float32" in r.message, r.message
  assert r.details["loss_dtypes"] == {"data": "float32"}
