"""`mlp`: flatten + Dense layers, with the knobs the recipe's checks need."""

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from jrecipe.errors import UserError
from jrecipe.models.core import output_dim, register_model
from jrecipe.models.linen_adapter import from_linen
from jrecipe.models.linear import flatten, require_not_sequence

ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh, "sigmoid": nn.sigmoid, "gelu": nn.gelu}


def scaled_init(init, scale: float):
  """The initializer `init` with its draws multiplied by `scale`."""
  if scale == 1.0:
    return init

  def scaled(key, shape, dtype=jnp.float32):
    return scale * init(key, shape, dtype)
  return scaled


def as_widths(hidden, field="hidden"):
  """An int or a sequence of ints -> a tuple of positive ints (UserError otherwise)."""
  widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
  if not all(isinstance(h, int) and h > 0 for h in widths):
    raise UserError(f"{field} must be a positive int or a tuple of positive ints, got {hidden!r}.")
  return widths


def check_rate(value, field):
  """A dropout rate must be in [0, 1)."""
  if not 0.0 <= float(value) < 1.0:
    raise UserError(f"{field} must be in [0, 1), got {value!r}.")
  return float(value)


class MLP(nn.Module):
  """Flatten; (Dense 'dense_i', activation, Dropout) per hidden width; Dense 'head'."""

  num_outputs: int
  hidden: Sequence[int] = (256, 256)
  activation: str = "relu"
  dropout: float = 0.0
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    kernel_init = scaled_init(nn.linear.default_kernel_init, self.init_scale)
    act = ACTIVATIONS[self.activation]
    x = flatten(x)
    for i, width in enumerate(self.hidden):
      x = act(nn.Dense(width, kernel_init=kernel_init, name=f"dense_{i}")(x))
      x = nn.Dropout(self.dropout, deterministic=not train, name=f"dropout_{i}")(x)
    return nn.Dense(self.num_outputs, kernel_init=kernel_init, name="head")(x)


@register_model("mlp", widen_fields=("hidden",))
def mlp(spec, bn_axis_name, hidden=(256, 256), activation="relu", dropout=0.0, init_scale=1.0):
  """A multilayer perceptron on the flattened input.

  Recipe step: "don't be a hero" (a simple model you cannot get wrong), and the planted-bug
  knob for "verify the init": `init_scale=100` gives a loss far above chance at step 0.

  Args:
    spec: the dataset spec (input size, output size).
    bn_axis_name: unused (no BatchNorm).
    hidden: hidden widths, e.g. (256, 256); an int means one layer. `widen` multiplies them.
    activation: 'relu', 'tanh', 'sigmoid' or 'gelu'.
    dropout: dropout rate after each hidden activation (train mode only).
    init_scale: multiplies every layer's default (LeCun normal) kernel init.

  Returns:
    A Model wrapping the `MLP` Linen module.
  """
  del bn_axis_name
  require_not_sequence(spec, "mlp")
  if activation not in ACTIVATIONS:
    raise UserError(f"Unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}.")
  module = MLP(num_outputs=output_dim(spec), hidden=as_widths(hidden), activation=activation,
               dropout=check_rate(dropout, "dropout"), init_scale=float(init_scale))
  return from_linen(module, "mlp", has_dropout=module.dropout > 0, has_batchnorm=False)
