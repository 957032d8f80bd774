"""Convnet regularisers and input size (recipe stage 4, 'regularise').

Spatial dropout (`model.dropout2d`) must drop whole feature maps, in train mode only;
`data.downsample` must shrink the input (average pooling) and still train; a smaller
`batch_size` must mean more, noisier steps per epoch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jrecipe import experiment as experiment_lib
from jrecipe.checks import fitting
from jrecipe.data import pipeline
from jrecipe.models.cnn import CNN
from jrecipe.models.resnet import ResNet, ResNetBlock
from tests.helpers import tiny_config


def whole_channel_drops(before: np.ndarray, after: np.ndarray) -> tuple[bool, float]:
  """(every (example, channel) map is either all dropped or all kept, fraction dropped).

  Only maps with some non-zero input say anything (a ReLU map may be zero already).
  """
  before = before.reshape(before.shape[0], -1, before.shape[-1])
  after = after.reshape(after.shape[0], -1, after.shape[-1])
  live = np.any(before != 0, axis=1)  # [B, C]
  zeroed = (after == 0) & (before != 0)
  all_dropped = np.all((after == 0) | (before == 0), axis=1)
  partial = np.any(zeroed, axis=1) & ~all_dropped
  frac = float(np.sum(all_dropped & live) / max(np.sum(live), 1))
  return not bool(np.any(partial & live)), frac


def _dropout_io(module, variables, x, rng):
  """{'train'|'eval': {dropout layer name: (its input, its output)}}, one jitted call."""

  def run(variables, x, rng):
    out = {}
    for mode, train in (("train", True), ("eval", False)):
      ins = out[mode] = {}

      def record(next_fun, args, kwargs, context, ins=ins):
        y = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
          ins[context.module.name] = (args[0], y)
        return y

      with nn.intercept_methods(record):
        module.apply(variables, x, train=train, rngs={"dropout": rng},
                     mutable=["batch_stats"] if train else False)
    return out

  return jax.tree.map(np.asarray, jax.jit(run)(variables, x, rng))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_dropout2d_zeroes_whole_channels_in_train_mode_only(kind):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, 1)), jnp.float32)
  if kind == "cnn":
    module = CNN(num_outputs=10, width=0.5, dropout2d=0.5)
  else:
    module = ResNet(stage_sizes=(1,), block_cls=ResNetBlock, num_outputs=10, width=4,
                    dropout2d=0.5)
  variables = jax.jit(module.init)({"params": jax.random.PRNGKey(0)}, x)
  io = _dropout_io(module, variables, x, jax.random.PRNGKey(1))
  train_io, eval_io = io["train"], io["eval"]
  names = sorted(n for n in train_io if n.startswith("dropout2d"))
  assert len(names) == (2 if kind == "cnn" else 1)  # one per conv block / per stage
  for name in names:
    before, after = train_io[name]
    whole, frac = whole_channel_drops(before, after)
    assert whole, f"{name} dropped parts of feature maps, not whole maps"
    assert 0.3 < frac < 0.7, frac  # rate 0.5
    kept = after != 0
    np.testing.assert_allclose(after[kept], 2.0 * before[kept], rtol=1e-5)  # 1 / (1 - rate)
  for name in names:
    before, after = eval_io[name]
    np.testing.assert_array_equal(before, after)  # eval mode: identity


def test_channel_check_catches_elementwise_dropout():
  """Planted: ordinary (element-wise) dropout on a feature map is not spatial dropout."""
  x = np.ones((4, 6, 6, 8), np.float32)
  key = jax.random.PRNGKey(0)
  for dims, want in (((), False), ((1, 2), True)):
    layer = nn.Dropout(0.5, broadcast_dims=dims, deterministic=False)
    out = jax.jit(lambda v, k, layer=layer: layer.apply({}, v, rngs={"dropout": k}))(x, key)
    assert whole_channel_drops(x, np.asarray(out))[0] is want


def test_downsample_pools_the_input_and_still_trains():
  full = pipeline.load_dataset({"name": "digits", "normalize": False})
  half = pipeline.load_dataset({"name": "digits", "normalize": False, "downsample": 2})
  assert full.spec.input_shape == (8, 8, 1) and half.spec.input_shape == (4, 4, 1)
  x = np.asarray(full.arrays["train"]["x"], np.float64)
  pooled = x.reshape(-1, 4, 2, 4, 2, 1).mean(axis=(2, 4))
  np.testing.assert_allclose(half.arrays["train"]["x"], pooled, rtol=1e-6)
  np.testing.assert_array_equal(half.raw["train"]["x"], full.raw["train"]["x"])  # raw kept

  c = tiny_config(**{"data.downsample": 2})
  c.lock()
  exp = experiment_lib.build(c)
  assert exp.spec.input_shape == (4, 4, 1)
  variables = exp.init_variables(jax.random.PRNGKey(0))
  assert variables["params"]["dense_0"]["kernel"].shape == (16, 32)  # 4x fewer inputs
  tr, val = exp.data.arrays["train"], exp.data.arrays["validation"]
  trained, _ = fitting.fit(exp.model, exp.loss, variables, tr["x"], tr["y"],
                            tx=optax.adam(3e-3), steps=150, rng=0, batch_size=64)
  pred = np.argmax(np.asarray(exp.model.apply(trained, val["x"], train=False)), axis=-1)
  acc = float(np.mean(pred == val["y"]))
  assert acc > 0.6, acc  # 16 pixels still carry most of the digit (chance: 0.1)


def test_smaller_batch_means_more_steps_per_epoch():
  for bs in (16, 128):
    c = tiny_config(batch_size=bs, num_epochs=1)
    c.lock()
    exp = experiment_lib.build(c)
    assert exp.steps_per_epoch == 1257 // bs
    batch = next(pipeline.train_batches(exp.data, batch_size=bs, seed=0))
    assert batch["x"].shape[0] == bs
