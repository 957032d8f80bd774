"""`linear`: flatten + one Dense layer, the dumb baseline."""

import jax.numpy as jnp
from flax import linen as nn

from jrecipe.errors import UserError
from jrecipe.models.core import output_dim, register_model
from jrecipe.models.linen_adapter import from_linen


def as_float(x):
  """Floating inputs keep their dtype (float64 gradient checks stay float64); others -> f32."""
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def flatten(x):
  """[B, ...] -> [B, prod(...)], floating."""
  return as_float(x.reshape((x.shape[0], -1)))


def require_not_sequence(spec, name):
  """Per-example models cannot produce per-time-step outputs: say which models can."""
  if spec.task == "sequence":
    raise UserError(f"The model {name!r} maps one example to one output; the dataset "
                    f"{spec.name!r} is a 'sequence' task: use 'transformer' or 'rnn'.")


class Linear(nn.Module):
  """Flatten, then a Dense layer named 'head'."""

  num_outputs: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    # Zero weights (CS231n's linear classifiers start from small W): at init every example
    # gets the head bias, so the loss at init is exactly the prior entropy ('init well').
    return nn.Dense(self.num_outputs, kernel_init=nn.initializers.zeros, name="head")(
        flatten(x))


@register_model("linear")
def linear(spec, bn_axis_name):
  """A linear classifier / regressor on the flattened input.

  Recipe step: "don't be a hero": the baseline you cannot get wrong; every other model
  must beat it. No fields; `widen` is None (there is no width).

  Returns:
    A Model wrapping the `Linear` Linen module, with `spec`'s output size.
  """
  del bn_axis_name
  require_not_sequence(spec, "linear")
  return from_linen(Linear(num_outputs=output_dim(spec)), "linear", has_dropout=False,
                    has_batchnorm=False)
