"""Tests for jrecipe.models: shapes, train/eval behaviour, BatchNorm state, spatial dropout,
causality, the NNX adapter and config errors. Tiny widths; each model is initialised once."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from jrecipe.errors import UserError
from jrecipe.models import MODELS, build_model, example_input, from_linen, from_nnx
from jrecipe.types import DataSpec, Model

B = 4
IMG = DataSpec("img", "classification", (8, 8, 1), 3, None, (0.0, 1.0), {"train": 8})
SEQ = DataSpec("seq", "sequence", (6,), 7, None, (0, 7), {"train": 8}, time_axis=1)
REG = DataSpec("reg", "regression", (5,), None, None, (-1.0, 1.0), {"train": 8})

CONFIGS = {
    "linear": ({"name": "linear"}, IMG),
    "mlp": ({"name": "mlp", "hidden": (8, 8)}, IMG),
    "cnn": ({"name": "cnn", "width": 0.25}, IMG),
    "resnet18": ({"name": "resnet18", "width": 4}, IMG),
    "transformer": ({"name": "transformer", "dim": 8, "heads": 2, "num_layers": 1}, SEQ),
    "rnn": ({"name": "rnn", "hidden": 8}, SEQ),
    "nnx_mlp": ({"name": "nnx_mlp", "hidden": (8,)}, IMG),
}


def _x(spec, seed=0):
  if spec.task == "sequence":
    return jax.random.randint(jax.random.key(seed), (B,) + spec.input_shape, 0, spec.num_classes)
  return jax.random.normal(jax.random.key(seed), (B,) + spec.input_shape)


@pytest.fixture(scope="module")
def built():
  """name -> (model, variables, x): every registered model initialised once."""
  out = {}
  for name, (cfg, spec) in CONFIGS.items():
    model = build_model(ml_collections.ConfigDict(cfg), spec)
    x = _x(spec)
    out[name] = (model, model.init(jax.random.key(0), x), x)
  return out


def test_every_registered_model_is_tested():
  assert set(MODELS.names()) == set(CONFIGS) | {"resnet50"}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_shape_and_head(built, name):
  model, variables, x = built[name]
  spec = CONFIGS[name][1]
  out = model.apply(variables, x)
  expected = (B, 6, 7) if spec.task == "sequence" else (B, 3)
  assert out.shape == expected
  assert bool(jnp.all(jnp.isfinite(out)))
  assert variables["params"]["head"]["bias"].shape == (expected[-1],)
  assert model.name == name


def test_resnet50_imagenet_stem_shapes():
  # Shapes only (tracing, no compile): the cifar stem runs for real in the resnet18 tests.
  model = build_model({"name": "resnet50", "width": 4, "stem": "imagenet"}, IMG)
  x = example_input(IMG, B)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert "batch_stats" in variables and model.has_batchnorm
  assert variables["params"]["conv_init"]["kernel"].shape == (7, 7, 1, 4)
  out, state = jax.eval_shape(lambda v: model.apply_with_state(v, x, True, None), variables)
  assert out.shape == (B, 3)
  assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


@pytest.mark.parametrize("name", ["linear", "mlp", "cnn", "transformer", "rnn", "nnx_mlp"])
def test_train_equals_eval_without_dropout_or_batchnorm(built, name):
  model, variables, x = built[name]
  assert not model.has_dropout and not model.has_batchnorm
  np.testing.assert_allclose(model.apply(variables, x, train=True), model.apply(variables, x),
                             rtol=1e-6, atol=1e-6)
  out, state = model.apply_with_state(variables, x, True, None)
  assert state == {}


def test_dropout_only_in_train_mode_and_needs_a_key(built):
  _, variables, x = built["mlp"]
  model = build_model({"name": "mlp", "hidden": (8, 8), "dropout": 0.5}, IMG)
  assert model.has_dropout
  eval_out = model.apply(variables, x)
  np.testing.assert_allclose(eval_out, built["mlp"][0].apply(variables, x), rtol=1e-6)
  with pytest.raises(UserError, match="dropout"):
    model.apply(variables, x, train=True)
  a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  c = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, eval_out) and not np.allclose(a, c)


def test_apply_is_jittable(built):
  model, variables, x = built["mlp"]
  np.testing.assert_allclose(jax.jit(model.apply, static_argnums=2)(variables, x, False),
                             model.apply(variables, x), rtol=1e-5, atol=1e-6)


def test_resnet_batch_stats_update_in_train_mode_only(built):
  model, variables, x = built["resnet18"]
  assert model.has_batchnorm and set(variables) == {"params", "batch_stats"}
  out, state = model.apply_with_state(variables, x, True, None)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))
  out_eval, state_eval = model.apply_with_state(variables, x, False, None)
  assert state_eval == {}
  assert not np.allclose(out, out_eval)  # batch statistics vs running averages
  np.testing.assert_allclose(model.apply(variables, x, train=True), out, rtol=1e-5, atol=1e-6)


def _captured_dropout2d(model, variables, x):
  """Train-mode output of the first spatial-dropout layer, captured through the Linen module."""
  _, state = model.module.apply(
      variables, x, train=True, rngs={"dropout": jax.random.key(3)},
      capture_intermediates=lambda mdl, _: mdl.name == "dropout2d_0",
      mutable=["intermediates", "batch_stats"] if "batch_stats" in variables else ["intermediates"])
  return state["intermediates"]["dropout2d_0"]["__call__"][0]


@pytest.mark.parametrize("name,cfg", [("cnn", {"name": "cnn", "width": 0.25}),
                                      ("resnet18", {"name": "resnet18", "width": 4})])
def test_dropout2d_zeroes_whole_channels_in_train_mode_only(built, name, cfg):
  ref_model, variables, x = built[name]
  model = build_model({**cfg, "dropout2d": 0.5}, IMG)
  assert model.has_dropout
  np.testing.assert_allclose(model.apply(variables, x), ref_model.apply(variables, x), rtol=1e-6)
  dropped = _captured_dropout2d(model, variables, x)
  kept = _captured_dropout2d(ref_model, variables, x)
  channels = dropped.reshape(B, -1, dropped.shape[-1])  # [B, positions, C]
  reference = kept.reshape(B, -1, kept.shape[-1])
  zero = jnp.all(channels == 0, axis=1)
  per_channel_ok = zero | jnp.all(jnp.isclose(channels, 2.0 * reference, rtol=1e-5, atol=1e-6),
                                  axis=1)
  assert bool(jnp.all(per_channel_ok))  # each map is dropped whole or kept whole (scaled by 2)
  assert 0 < int(zero.sum()) < zero.size


@pytest.mark.parametrize("name", ["transformer", "rnn"])
def test_sequence_models_are_causal(built, name):
  model, variables, x = built[name]
  out = model.apply(variables, x)
  t = 2
  changed = x.at[:, t + 1:].set((x[:, t + 1:] + 1) % SEQ.num_classes)
  out2 = model.apply(variables, changed)
  np.testing.assert_allclose(out2[:, :t + 1], out[:, :t + 1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(out2[:, t + 1:], out[:, t + 1:])


def test_transformer_without_sees_current_ignores_the_current_input(built):
  _, variables, x = built["transformer"]
  spec = DataSpec("seq", "sequence", (6,), 7, None, (0, 7), {}, time_axis=1, sees_current=False)
  model = build_model(CONFIGS["transformer"][0], spec)
  out = model.apply(variables, x)
  t = 2
  changed = x.at[:, t].set((x[:, t] + 1) % 7)
  np.testing.assert_allclose(model.apply(variables, changed)[:, :t + 1], out[:, :t + 1],
                             rtol=1e-5, atol=1e-6)


class _UserNNX(nnx.Module):
  """A user's NNX model with BatchNorm and dropout."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(64, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return self.head(self.drop(nnx.relu(self.bn(self.dense(x)))))


def test_nnx_module_through_pure_apply_matches_direct_call():
  module = _UserNNX(nnx.Rngs(0))
  model = from_nnx(module, "user_nnx")
  assert model.has_dropout and model.has_batchnorm and model.module is None
  x = _x(IMG)
  variables = model.init(jax.random.key(0), x)
  assert set(variables) == {"params", "batch_stats"}
  apply = jax.jit(model.apply_with_state, static_argnums=2)
  out, state = apply(variables, x, False, None)
  assert state == {}
  module.eval()
  np.testing.assert_allclose(out, module(x), rtol=1e-5, atol=1e-6)
  with pytest.raises(UserError, match="dropout"):
    model.apply(variables, x, train=True)
  out_train, state = apply(variables, x, True, {"dropout": jax.random.key(1)})
  again, _ = apply(variables, x, True, {"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(out_train, again)
  assert not np.allclose(out_train, out)
  assert not np.allclose(state["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])
  # The pure apply leaves the original module untouched, and a (graphdef, state) pair works too.
  np.testing.assert_allclose(module(x), out, rtol=1e-5, atol=1e-6)
  pair = from_nnx(nnx.split(module), "pair")
  np.testing.assert_allclose(pair.apply(pair.init(None, x), x), out, rtol=1e-5, atol=1e-6)


def test_registered_nnx_mlp_draws_new_weights_per_seed(built):
  model, variables, x = built["nnx_mlp"]
  other = model.init(jax.random.key(1), x)
  assert not np.allclose(other["params"]["head"]["kernel"], variables["params"]["head"]["kernel"])
  bn = build_model({"name": "nnx_mlp", "hidden": (8,), "batchnorm": True, "dropout": 0.1}, IMG)
  assert bn.has_batchnorm and bn.has_dropout


def test_widen(built):
  assert built["linear"][0].widen is None
  wide = built["mlp"][0].widen(2)
  shapes = jax.eval_shape(wide.init, jax.random.key(0), _x(IMG))
  assert shapes["params"]["dense_0"]["kernel"].shape == (64, 16)
  assert built["transformer"][0].widen(1.5).module.dim == 12
  assert built["cnn"][0].widen(2).module.width == 0.5
  assert built["resnet18"][0].widen(2).module.width == 8
  assert built["rnn"][0].widen(2).module.hidden == 16


def test_regression_output_is_one_value_per_example():
  model = build_model({"name": "mlp", "hidden": 4}, REG)
  out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), _x(REG)), _x(REG)))
  assert out.shape == (B, 1)


def test_config_errors():
  with pytest.raises(UserError, match="mlp.*resnet18"):
    build_model({"name": "no_such_model"}, IMG)
  with pytest.raises(UserError, match="hiden.*hidden=\\(256, 256\\)"):
    build_model(ml_collections.ConfigDict({"name": "mlp", "hiden": 3}), IMG)
  with pytest.raises(UserError, match="relu"):
    build_model({"name": "mlp", "activation": "swish"}, IMG)
  with pytest.raises(UserError, match="transformer"):
    build_model({"name": "mlp"}, SEQ)
  with pytest.raises(UserError, match="stem"):
    build_model({"name": "resnet18", "stem": "tiny"}, IMG)
  with pytest.raises(UserError, match="name"):
    build_model({"hidden": 3}, IMG)


class _UserLinen(nn.Module):
  rate: float = 0.5

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(4)(x.reshape((x.shape[0], -1)))
    return nn.Dense(3, name="head")(nn.Dropout(self.rate, deterministic=not train)(x))


def tiny_factory(spec, bn_axis_name, rate=0.5):
  """An import-path model factory (used as f'{__name__}:tiny_factory')."""
  del spec, bn_axis_name
  return _UserLinen(rate=rate)


def test_import_path_factory_and_linen_detection():
  model = build_model({"name": f"{__name__}:tiny_factory", "rate": 0.25}, IMG)
  assert isinstance(model, Model) and model.has_dropout and not model.has_batchnorm
  assert model.module.rate == 0.25
  assert not build_model({"name": f"{__name__}:tiny_factory", "rate": 0.0}, IMG).has_dropout
  assert from_linen(_UserLinen(), "u").has_dropout  # guessed from the field without an example


@pytest.mark.parametrize("shape,n", [((3, 28, 28, 5), 2), ((3, 14, 14, 4), 2), ((2, 7, 7, 3), 2),
                                     ((2, 6, 9, 3), 2), ((4, 40, 6), 1), ((4, 9, 2), 1)])
def test_cnn_pool_equals_flax_avg_pool(shape, n):
  """The CNN's reshape-and-mean pool (a cheaper gradient on XLA:CPU, issue 9) is nn.avg_pool:
  the same values and the same input gradient, even and odd (padded) spatial sizes."""
  from jrecipe.models.cnn import avg_pool2
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  ref = lambda a: nn.avg_pool(a, (2,) * n, strides=(2,) * n, padding="SAME")
  ours = lambda a: avg_pool2(a, n)
  np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6, atol=1e-7)
  g = jax.random.normal(jax.random.PRNGKey(1), ref(x).shape)
  grad = lambda f: jax.grad(lambda a: jnp.sum(f(a) * g))(x)
  np.testing.assert_allclose(grad(ours), grad(ref), rtol=1e-6, atol=1e-7)
