"""Planted bugs, importable by path (`tests.planted:Name`) the way users plug in their code."""

import jax
import jax.numpy as jnp


def naive_xent(outputs, labels):
  """Cross-entropy as -log(softmax): the classic log-of-zero bug once a probability underflows."""
  p = jax.nn.softmax(outputs)
  return -jnp.log(jnp.take_along_axis(p, labels[:, None], axis=1)[:, 0])


# --- planted model bugs for the check battery (factories: factory(spec, bn_axis_name)) ------

from flax import linen as nn  # noqa: E402

from jrecipe.zoo.models import tanh_with_rule  # noqa: E402


class _MLP(nn.Module):
  """A small MLP with switches that plant the silent bugs the battery must catch."""

  num_outputs: int
  mix_batch: bool = False
  softmax_out: bool = False
  zero_input: bool = False
  dropout_in_eval: bool = False
  detach_output: bool = False  # outputs behind a stop_gradient: nothing can be learned
  hidden: int = 32
  fixed_dropout_key: bool = False  # the mask drawn from PRNGKey(0) at every step

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    if self.zero_input:
      x = x * 0.0
    h = nn.relu(nn.Dense(self.hidden, name="dense_0")(x))
    if self.mix_batch:  # view-vs-transpose: reshape to (features, batch) and transpose back
      h = h.reshape((h.shape[1], h.shape[0])).T
    if self.fixed_dropout_key and train:
      keep = jax.random.bernoulli(jax.random.PRNGKey(0), 0.5, h.shape)
      h = jnp.where(keep, h / 0.5, 0.0)
    else:
      h = nn.Dropout(0.5, deterministic=not (train or self.dropout_in_eval))(h)
    out = nn.Dense(self.num_outputs, name="head")(h)
    if self.detach_output:
      out = jax.lax.stop_gradient(out)
    return jax.nn.softmax(out) if self.softmax_out else out


def correct_mlp(spec, bn_axis_name):
  return _MLP(spec.num_classes)


def batch_mixing_mlp(spec, bn_axis_name):
  return _MLP(spec.num_classes, mix_batch=True)


def softmax_twice_mlp(spec, bn_axis_name):
  return _MLP(spec.num_classes, softmax_out=True)


def input_ignoring_mlp(spec, bn_axis_name):
  return _MLP(spec.num_classes, zero_input=True)


def dropout_in_eval_mlp(spec, bn_axis_name):
  return _MLP(spec.num_classes, dropout_in_eval=True)


def detached_output_mlp(spec, bn_axis_name):
  """Outputs behind a stop_gradient: a model that cannot learn anything."""
  return _MLP(spec.num_classes, detach_output=True)


_bad_tanh = tanh_with_rule(1.01)  # the wrong rule: 1% too large


class _BadVjpMLP(nn.Module):
  num_outputs: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_outputs, name="head")(_bad_tanh(nn.Dense(16)(x)))


def wrong_vjp_mlp(spec, bn_axis_name):
  return _BadVjpMLP(spec.num_classes)


class _OffByOneCausal(nn.Module):
  """One self-attention layer over tokens whose mask lets position t see t+1."""

  vocab: int
  off_by_one: bool = True

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    t = tokens.shape[1]
    h = nn.Embed(self.vocab, 32)(tokens) + self.param(
        "pos", nn.initializers.normal(0.02), (t, 32))
    mask = jnp.tril(jnp.ones((t, t), bool), k=1 if self.off_by_one else 0)
    h = h + nn.SelfAttention(num_heads=2, qkv_features=32)(h, mask=mask[None, None])
    return nn.Dense(self.vocab, name="head")(h)


def off_by_one_transformer(spec, bn_axis_name):
  return _OffByOneCausal(spec.num_classes)


# --- planted bad inputs for tests/test_bad_input.py -----------------------------------------

def seven_output_mlp(spec, bn_axis_name):
  """A classifier whose head has 7 units whatever the dataset: the wrong-width bug."""
  return _MLP(7)


def width_three_regressor(spec, bn_axis_name):
  """A regressor emitting 3 values per example, for targets of another width."""
  return _MLP(3)


def width_two_regressor(spec, bn_axis_name):
  """The correct regressor for 2-wide targets (the control case)."""
  return _MLP(2)


# --- plain wrappers for tests that call the checks directly (no model or loss registry) ------

class _BNMLP(nn.Module):
  """Dense -> BatchNorm -> ReLU -> head: a model with mutable state (batch_stats)."""

  num_outputs: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(32)(x.reshape((x.shape[0], -1)))
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(h))
    return nn.Dense(self.num_outputs, name="head")(h)


class _TwoBNMLP(nn.Module):
  """Two Dense -> BatchNorm -> ReLU blocks; `frozen` plants `use_running_average=True`
  written into the second BatchNorm (it never learns statistics)."""

  num_outputs: int
  frozen: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(32)(x.reshape((x.shape[0], -1)))
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(h))
    h = nn.Dense(32)(h)
    frozen = True if self.frozen else not train
    h = nn.relu(nn.BatchNorm(use_running_average=frozen, momentum=0.9, name="bn2")(h))
    return nn.Dense(self.num_outputs, name="head")(h)


def linen_bn_model(module, *, drop_state: bool = False):
  """A Linen module with BatchNorm as a `jrecipe.types.Model`; `drop_state` plants the bug of
  a train step that returns the old statistics instead of the updated ones."""
  from jrecipe.types import Model

  def apply_with_state(variables, x, train=False, rngs=None):
    if not train:
      return module.apply(variables, x, train=False), {"batch_stats": variables["batch_stats"]}
    out, new = module.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
    return out, ({"batch_stats": variables["batch_stats"]} if drop_state else dict(new))

  def apply(variables, x, train=False, rngs=None):
    return apply_with_state(variables, x, train, rngs)[0]

  return Model(init=jax.jit(lambda r, x: dict(module.init(r, x))), apply=apply,
               apply_with_state=apply_with_state, name=type(module).__name__, module=module,
               has_batchnorm=True)


def linen_model(module, *, widen=None, has_dropout=None):
  """A Linen module without BatchNorm as a `jrecipe.types.Model`.

  `has_dropout` defaults to the module's `dropout` field being nonzero.
  """
  from jrecipe.types import Model
  if has_dropout is None:
    has_dropout = bool(getattr(module, "dropout", 0.0))

  def apply_with_state(variables, x, train=False, rngs=None):
    return module.apply(variables, x, train=train, rngs=rngs), {}

  def apply(variables, x, train=False, rngs=None):
    return apply_with_state(variables, x, train, rngs)[0]

  return Model(init=jax.jit(lambda r, x: dict(module.init(r, x))), apply=apply,
               apply_with_state=apply_with_state, name=type(module).__name__, module=module,
               has_dropout=has_dropout, widen=widen)


def xent_loss():
  """Softmax cross-entropy with integer labels as a `jrecipe.types.Loss`."""
  import numpy as np
  import optax
  from jrecipe.types import Loss
  return Loss(
      name="softmax_xent",
      per_example=optax.softmax_cross_entropy_with_integer_labels,
      expects="logits",
      chance=lambda c, t: float(np.log(c)),
      predict=lambda o: jnp.argmax(o, -1),
      correct=lambda o, y: (jnp.argmax(o, -1) == y).astype(jnp.float32))
