"""Planted bugs for the CS231n gradient check: wrong custom_vjp rules, kinks, every leaf, x64."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

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


def test_products_cast_to_float32_in_the_code_are_inconclusive(data):
  """A float32 product written in the code (not a layer's dtype field) under a float64 output:
  every gradient carries float32 rounding, so nothing is verified (skip, not a FAIL)."""
  x, y, params = data

  def loss(p, x, y):
    h = jnp.tanh((x.astype(jnp.float32) @ p["w1"].astype(jnp.float32)).astype(x.dtype))
    logits = h @ p["w2"] + p["b2"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  r = gradient_check(loss, None, params, args=(x, y), run_check_grads=False)
  assert r.status == "skip" and "inconclusive: the model computes in float32" in r.message, \
      r.message


def test_float32_inside_the_loss_is_reported_not_trusted(data):
  x, y, params = data
  loss = lambda p, x, y: mlp_loss(jnp.tanh)(p, x, y).astype(jnp.float32)
  r = gradient_check(loss, None, params, args=(x, y), run_check_grads=False)
  assert r.status == "warn" and "float32" in r.message, r.message
  assert r.details["loss_dtypes"] == {"data": "float32"}


class PinnedNet(nn.Module):
  """Flax's ImageNet style: a `dtype` field every layer gets (and a final cast to it)."""
  dtype: Any = jnp.float32
  rule: Any = None  # a custom_vjp activation (tanh_with_rule) or None for tanh

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, dtype=self.dtype)
    h = norm()(nn.Dense(7, dtype=self.dtype)(x))
    h = (self.rule or jnp.tanh)(h)
    return jnp.asarray(nn.Dense(3, dtype=self.dtype)(h), self.dtype)


@dataclasses.dataclass(unsafe_hash=True)
class PinnedConfig:
  dtype: Any = jnp.float32
  width: int = 7


class ConfigNet(nn.Module):
  """Flax's LM1B style: the dtype lives in a config dataclass the module holds."""
  config: PinnedConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = jnp.tanh(nn.Dense(cfg.width, dtype=cfg.dtype)(x.astype(cfg.dtype)))
    return nn.LayerNorm(dtype=cfg.dtype)(nn.Dense(3, dtype=cfg.dtype)(h))


class PinnedNNX(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(5, 7, dtype=jnp.float32, rngs=rngs)
    self.out = nnx.Linear(7, 3, dtype=jnp.float32, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.dense(x)))


def _xent():
  return Loss(name="softmax_xent", expects="logits", chance=lambda c, t: np.log(c),
              per_example=optax.softmax_cross_entropy_with_integer_labels,
              predict=lambda o: jnp.argmax(o, -1))


def _pinned(style, x):
  from jrecipe.models.linen_adapter import from_linen
  from jrecipe.models.nnx_adapter import from_nnx
  if style == "nnx":
    return from_nnx(PinnedNNX(nnx.Rngs(0)), "pinned_nnx"), {"PinnedNNX": 0}
  module = {"imagenet": PinnedNet(), "lm1b": ConfigNet(PinnedConfig()),
            "vjp_bug": PinnedNet(rule=tanh_with_rule(1.01))}[style]
  return from_linen(module, style, example_input=x), None


@pytest.mark.parametrize("style", ["imagenet", "lm1b", "nnx"])
def test_layers_pinned_to_float32_are_checked_in_float64(data, style):
  """Flax's examples pin `dtype=jnp.float32` in every layer: the check raises those fields to
  float64 and verifies (< 1e-7), instead of an inconclusive warn; as written it is float32."""
  x, y, _ = data
  model, _ = _pinned(style, x)
  variables = model.init(jax.random.key(0), x)
  kw = dict(l2=1e-2, rng=jax.random.key(3), run_check_grads=False)
  as_written = gradient_check_model(model, _xent(), variables, {"x": x, "y": y},
                                    raise_layers=False, **kw)
  assert as_written.status == "warn" and "float32" in as_written.message, as_written.message
  r = gradient_check_model(model, _xent(), variables, {"x": x, "y": y}, **kw)
  assert r.status == "pass" and r.value < 1e-7, r.message
  assert r.details["loss_dtypes"] == {"data": "float64", "reg": "float64"}
  expected = {"imagenet": ["PinnedNet.dtype"], "lm1b": ["ConfigNet.config.dtype"],
              "nnx": ["Linear.dtype"]}[style]
  assert r.details["raised_dtype_fields"] == expected
  assert "pins a compute dtype below float64" in r.message and ".;" not in r.message
  assert not jax.config.jax_enable_x64
  leaf = jax.tree.leaves(variables["params"])[0]
  assert leaf.dtype == jnp.float32
  if style == "imagenet":  # the user's module is untouched
    assert model.module.dtype == jnp.float32


def test_wrong_vjp_inside_a_pinned_model_still_fails(data):
  x, y, _ = data
  model, _ = _pinned("vjp_bug", x)
  variables = model.init(jax.random.key(0), x)
  r = gradient_check_model(model, _xent(), variables, {"x": x, "y": y}, l2=1e-2,
                           rng=jax.random.key(3), run_check_grads=False)
  assert r.status == "fail", r.message
  assert r.details["raised_dtype_fields"] == ["PinnedNet.dtype"]


def test_check_grads_failure_explained_by_the_kinks_its_own_direction_crosses():
  """check_grads steps every parameter at once: near a ReLU kink it fails at every step even
  for a correct gradient. The kinks its own direction crosses are counted (a transformer's
  MLP after a burn-in); a failure with none crossed stays unexplained."""
  from jrecipe.checks.gradcheck import measure, rules
  theta = np.linspace(-1.0, 1.0, 50)
  theta[::5] = 1e-9  # ten pre-activations within any step of the kink
  f_flat = lambda th, a: jnp.sum(jax.nn.relu(th) * a[0])
  kinks = lambda th, scale: th > 0  # kink_fn(params, *args)
  with measure.float64():
    plain = measure.check_grads_outcome(f_flat, theta, (1.0,))
    counted = measure.check_grads_outcome(f_flat, theta, (1.0,), kinks)
    smooth = measure.check_grads_outcome(lambda th, a: jnp.sum(jnp.tanh(th)), theta, (1.0,),
                                         kinks)
  assert plain.startswith("failed") and measure.KINKS_CROSSED not in plain, plain
  assert counted.startswith("failed") and measure.KINKS_CROSSED in counted, counted
  assert smooth == "passed"
  n = int(counted.split("1e-06, ")[1].split(" ")[0])
  assert 1 <= n <= 10, counted
  row = {"max_rel_error_no_kinks": 1e-9, "kinks": 0, "samples": [{"unresolved": False}],
         "unresolved": 0, "coords": 1, "leaf": "w", "max_abs_grad": 1.0}
  tables = {"data": [row]}
  status, message = rules._agreeing(tables, {"data": counted}, value=1e-9, summary="s",
                                   warn_above=1e-4)  # pylint: disable=protected-access
  assert status == "pass" and "its own direction crosses" in message, message
  status, _ = rules._agreeing(tables, {"data": plain}, value=1e-9, summary="s",
                              warn_above=1e-4)  # pylint: disable=protected-access
  assert status == "warn"
