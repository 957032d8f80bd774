"""Mixed precision (`config.precision`, jrecipe/precision.py): what computes in 16 bits, what
stays float32, float16's dynamic loss scaling, and the accuracy it reaches on this CPU."""

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jrecipe import experiment, precision
from jrecipe.errors import UserError
from jrecipe.models import build_model
from jrecipe.train import step as step_lib
from jrecipe.train.state import create_state
from jrecipe.train.trainer import Trainer
from jrecipe.types import DataSpec
from tests.helpers import tiny_config

SPEC = DataSpec(name="toy", task="classification", input_shape=(8, 8, 1), num_classes=10,
                class_names=None, value_range=(0, 16), splits={"train": 64})


class Float32Head(nn.Module):
  """A user model that hard-codes float32 in its last layer (the warning's case)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, name="dense_0")(x.reshape((x.shape[0], -1))))
    return nn.Dense(10, dtype=jnp.float32, name="head")(x)


def float32_head(spec):
  del spec
  return Float32Head()


def _dense_outputs(model, variables, x):
  """The dtype of every Dense output inside `model.apply` (an intermediate, not the result)."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Dense):
      seen[context.module.name] = out.dtype
    return out

  with nn.intercept_methods(interceptor):
    out = model.apply(variables, x)
  return seen, out


@pytest.mark.parametrize("prec,dtype", [("bfloat16", jnp.bfloat16), ("float16", jnp.float16),
                                        ("float32", jnp.float32)])
def test_activations_in_the_compute_dtype_parameters_and_outputs_float32(prec, dtype):
  model = build_model({"name": "mlp", "hidden": (16,)}, SPEC, precision=prec)
  x = jnp.ones((2, 8, 8, 1))
  variables = model.init(jax.random.key(0), x)
  assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  seen, out = _dense_outputs(model, variables, x)
  assert seen == {"dense_0": dtype, "head": dtype}
  assert out.dtype == jnp.float32  # the loss and metrics are computed in float32
  assert precision.matmul_dtypes(model, variables, x) == {jnp.dtype(dtype).name: 2}
  assert (model.full_precision is None) == (prec == "float32")


def test_nnx_model_computes_in_bfloat16_and_keeps_float32_batch_stats():
  model = build_model({"name": "nnx_mlp", "hidden": (16,), "batchnorm": True}, SPEC,
                      precision="bfloat16")
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  variables = model.init(jax.random.key(0), x)
  assert precision.matmul_dtypes(model, variables, x) == {"bfloat16": 2}
  out, state = model.apply_with_state(variables, x, True, None)
  assert out.dtype == jnp.float32
  assert {v.dtype for v in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}


def test_a_model_hard_coding_float32_is_named_in_a_warning(caplog):
  with caplog.at_level(logging.WARNING, logger="jrecipe"):
    model = build_model({"name": "tests.test_precision:float32_head"}, SPEC,
                        precision="bfloat16")
  assert "computes 1 of its 2 matrix products/convolutions in float32" in caplog.text
  x = jnp.ones((2, 8, 8, 1))
  assert precision.matmul_dtypes(model, model.init(jax.random.key(0), x), x) == {
      "bfloat16": 1, "float32": 1}
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jrecipe"):  # the twin: follows its input
    build_model({"name": "mlp", "hidden": (16,)}, SPEC, precision="bfloat16")
  assert "matrix products" not in caplog.text


def test_unknown_precision_is_a_user_error():
  with pytest.raises(UserError, match="float32, bfloat16, float16"):
    precision.compute_dtype("float8")


def _f16_trainer_parts(init_scale, period=precision.LOSS_SCALE_PERIOD):
  model = build_model({"name": "mlp", "hidden": (16,)}, SPEC, precision="float16")
  tx = precision.dynamic_loss_scale(optax.adam(1e-2), init_scale=init_scale, period=period)
  from jrecipe.losses import build_loss
  parts = step_lib.StepParts(model=model, loss=build_loss("softmax_xent", SPEC), tx=tx)
  return model, parts


def _batch(nan=False):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 8, 8, 1)).astype(np.float32)
  if nan:
    x[0, 0, 0, 0] = np.nan
  return {"x": x, "y": (np.arange(32) % 10).astype(np.int32)}


def test_float16_loss_scale_recovers_from_overflow_steps():
  # 2**40 times the loss overflows float16's cotangents (max 65504): those steps are skipped,
  # the scale halves each time, and training then proceeds; no step counts as divergence.
  model, parts = _f16_trainer_parts(init_scale=2.0 ** 40, period=5)
  step = jax.jit(step_lib.make_train_step(parts))
  state = create_state(model.init(jax.random.key(0), jnp.ones((2, 8, 8, 1))), parts.tx,
                       jax.random.PRNGKey(1), ema=False)
  p0 = state.params
  batch = _batch()
  state, m = step(state, batch)
  assert float(m["overflow"]) == 1.0 and float(state.opt_state.scale) == 2.0 ** 39
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p0),
                                                  jax.tree.leaves(state.params)))
  history = [m]
  for _ in range(60):
    state, m = step(state, batch)
    history.append(m)
  overflows = [float(h["overflow"]) for h in history]
  first_ok = overflows.index(0.0)
  assert 10 < first_ok < 40
  # Then the scale doubles after 5 finite steps and overflows again at most once per growth.
  assert sum(overflows[first_ok:]) <= (len(overflows) - first_ok) // 5 + 1
  assert int(state.bad_step) == -1
  losses = [float(h["loss"]) for h in history[first_ok:]]
  assert losses[-1] < 0.7 * losses[0]
  scales = [float(h["loss_scale"]) for h in history[first_ok:]]
  assert max(scales) > scales[0]  # 5 finite steps in a row double it again


def test_float16_non_finite_at_the_smallest_scale_is_a_bad_step():
  model, parts = _f16_trainer_parts(init_scale=precision.LOSS_SCALE_MIN)
  step = jax.jit(step_lib.make_train_step(parts))
  state = create_state(model.init(jax.random.key(0), jnp.ones((2, 8, 8, 1))), parts.tx,
                       jax.random.PRNGKey(1), ema=False)
  state, m = step(state, _batch(nan=True))
  assert int(state.bad_step) == 0 and float(m["overflow"]) == 0.0


def _test_accuracy(config):
  exp = experiment.build(config)
  trainer = Trainer.from_experiment(exp)
  loop = trainer.run(trainer.to_device(trainer.initial_state()), end_step=exp.total_steps)
  x, y = exp.data.arrays["test"]["x"], exp.data.arrays["test"]["y"]
  variables = {"params": loop.state.params, **loop.state.model_state}
  out = jax.jit(exp.model.apply)(variables, x)
  products = precision.matmul_dtypes(exp.model, variables, x[:2])
  assert set(products) == {config.precision}, products  # every product in the chosen dtype
  return 100.0 * float(np.mean(np.argmax(np.asarray(out), -1) == y)), loop.state


@pytest.mark.slow
@pytest.mark.parametrize("name,epochs", [("digits_mlp", 10), ("mnist5k_cnn", 2)])
def test_bfloat16_reaches_float32_accuracy(name, epochs):
  """Measured on the 2-core CPU (raw parameters, test split): digits_mlp 10 epochs (90 steps,
  batch 128) and the mnist5k CNN 2 epochs (62 steps): see docs/performance.md."""
  import importlib
  get_config = importlib.import_module(f"configs.{name}").get_config
  acc = {}
  for prec in ("float32", "bfloat16"):
    c = get_config()
    c.precision, c.num_epochs, c.progress = prec, epochs, False
    acc[prec], state = _test_accuracy(c)
    assert {v.dtype for v in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  print(name, acc)
  assert acc["float32"] > 85
  assert abs(acc["bfloat16"] - acc["float32"]) <= 0.5, acc


def test_float16_experiment_wraps_its_optimizer_and_bfloat16_does_not():
  f16 = experiment.build(tiny_config(precision="float16"))
  assert isinstance(f16.optimizer().init({"w": jnp.zeros(2)}), precision.LossScaleState)
  bf16 = experiment.build(tiny_config(precision="bfloat16"))
  assert not isinstance(bf16.optimizer().init({"w": jnp.zeros(2)}), precision.LossScaleState)
  assert bf16.model.full_precision is not None


def test_gradient_check_runs_float64_on_the_full_precision_model():
  from jrecipe.checks.gradcheck import gradient_check_model
  from jrecipe.checks.runner import run_battery
  exp = experiment.build(tiny_config(precision="bfloat16"))
  rows = {r.name: r for r in run_battery(exp, only=("loss_at_init", "gradient_check"))}
  row = rows["gradient_check"]
  assert row.status == "pass", row.message
  assert "precision=bfloat16: checked in float64" in row.message
  assert rows["loss_at_init"].status == "pass", rows["loss_at_init"].message
  # The twin: the 16-bit model itself cannot be checked in float64 (its products are bf16).
  variables = exp.init_variables(jax.random.key(0))
  batch = {"x": exp.data.arrays["train"]["x"][:4], "y": exp.data.arrays["train"]["y"][:4]}
  direct = gradient_check_model(exp.model, exp.loss, variables, batch)
  assert direct.status == "warn" and "float32" in direct.message, direct.message


def test_float16_run_resumed_from_its_checkpoint_is_bit_identical(tmp_path):
  """The loss scale lives in the optimizer state, so it is checkpointed and resumed with it."""
  from jrecipe.train import loop
  from tests.helpers import load_params
  over = {"precision": "float16", "monitor.enabled": False}
  loop.train_and_evaluate(tiny_config(num_epochs=4, **over), str(tmp_path / "whole"))
  loop.train_and_evaluate(tiny_config(num_epochs=2, **over), str(tmp_path / "halves"))
  loop.train_and_evaluate(tiny_config(num_epochs=4, **over), str(tmp_path / "halves"))
  a, b = load_params(str(tmp_path / "whole")), load_params(str(tmp_path / "halves"))
  assert a and all(np.array_equal(a[k], b[k]) for k in a)


class FlaxStyleNet(nn.Module):
  """Flax's ImageNet style: a top-level `dtype` every layer receives (and a final cast)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16, dtype=self.dtype)(x.reshape((x.shape[0], -1))))
    return jnp.asarray(nn.Dense(10, dtype=self.dtype, name="head")(h), self.dtype)


def flax_style(spec):
  del spec
  return FlaxStyleNet()


def test_a_flax_style_dtype_field_follows_the_precision(caplog):
  """precision=bfloat16 on a model written like Flax's examples: its own `dtype` field (what
  ImageNet's half_precision flag sets) becomes bfloat16, so every product runs in bfloat16
  (before: all in float32, and a warning); a literal dtype=float32 in a layer (Float32Head)
  is left alone and still warned about; float32 runs and the gradient check are unchanged."""
  x = jnp.ones((2, 8, 8, 1))
  with caplog.at_level(logging.INFO, logger="jrecipe"):
    model = build_model({"name": "tests.test_precision:flax_style"}, SPEC, precision="bfloat16")
  assert "FlaxStyleNet.dtype set to bfloat16" in caplog.text
  assert "matrix products" not in caplog.text
  variables = model.init(jax.random.key(0), x)
  assert precision.matmul_dtypes(model, variables, x) == {"bfloat16": 2}
  assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert model.apply(variables, x).dtype == jnp.float32
  plain = build_model({"name": "tests.test_precision:flax_style"}, SPEC)
  assert precision.matmul_dtypes(plain, variables, x) == {"float32": 2}
  assert plain.module.dtype == jnp.float32
  from jrecipe.checks.gradcheck import gradient_check_model
  from jrecipe.losses import build_loss
  r = gradient_check_model(precision.full_precision(model), build_loss("softmax_xent", SPEC),
                           variables, {"x": x, "y": jnp.arange(2)}, run_check_grads=False)
  assert r.status == "pass" and r.details["raised_dtype_fields"] == ["FlaxStyleNet.dtype"], \
      r.message
