"""`nnx_mlp`: an MLP written with Flax NNX, run through the same pure apply as Linen models.

Also the template for bringing your own NNX model: write a module whose constructor takes
`rngs`, and a factory returning `from_nnx(lambda rngs: YourModule(..., rngs=rngs), name)`.
"""

import functools
import math
from typing import Optional

from flax import nnx

from jrecipe.errors import UserError
from jrecipe.models.core import from_nnx, output_dim, register_model
from jrecipe.models.linear import flatten, require_not_sequence
from jrecipe.models.mlp import ACTIVATIONS, as_widths, check_rate


class NNXMLP(nnx.Module):
  """Flatten; per hidden width: nnx.Linear 'dense_i', [BatchNorm 'bn_i'], activation,
  nnx.Dropout 'dropout_i'; then nnx.Linear 'head'."""

  def __init__(self, in_features: int, hidden: tuple, num_outputs: int, *, activation="relu",
               dropout=0.0, batchnorm=False, bn_axis_name: Optional[str] = None,
               rngs: nnx.Rngs):
    self.hidden = tuple(hidden)
    self.activation = activation
    self.batchnorm = batchnorm
    width = in_features
    for i, h in enumerate(self.hidden):
      setattr(self, f"dense_{i}", nnx.Linear(width, h, rngs=rngs))
      if batchnorm:
        setattr(self, f"bn_{i}", nnx.BatchNorm(h, momentum=0.9, axis_name=bn_axis_name,
                                               rngs=rngs))
      setattr(self, f"dropout_{i}", nnx.Dropout(dropout, rngs=rngs))
      width = h
    self.head = nnx.Linear(width, num_outputs, rngs=rngs)

  def __call__(self, x):
    x = flatten(x)
    act = ACTIVATIONS[self.activation]
    for i in range(len(self.hidden)):
      x = getattr(self, f"dense_{i}")(x)
      if self.batchnorm:
        x = getattr(self, f"bn_{i}")(x)
      x = getattr(self, f"dropout_{i}")(act(x))
    return self.head(x)


@register_model("nnx_mlp", widen_fields=("hidden",))
def nnx_mlp(spec, bn_axis_name, hidden=(256, 256), activation="relu", dropout=0.0,
            batchnorm=False):
  """An NNX multilayer perceptron (the NNX example model: `--config.model.name=nnx_mlp`).

  Args:
    spec: the dataset spec.
    bn_axis_name: pmap axis for BatchNorm statistics, or None.
    hidden: hidden widths (an int means one layer). `widen` multiplies them.
    activation: 'relu', 'tanh', 'sigmoid' or 'gelu'.
    dropout: dropout rate after each hidden activation (train only).
    batchnorm: BatchNorm after each hidden Linear (then variables hold 'batch_stats').

  Returns:
    A `Model` built with `from_nnx` from a constructor, so `init(rng, x)` draws new weights.
  """
  require_not_sequence(spec, "nnx_mlp")
  if activation not in ACTIVATIONS:
    raise UserError(f"Unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}.")
  make = functools.partial(
      NNXMLP, int(math.prod(spec.input_shape)), as_widths(hidden), output_dim(spec),
      activation=activation, dropout=check_rate(dropout, "dropout"), batchnorm=bool(batchnorm),
      bn_axis_name=bn_axis_name)
  return from_nnx(lambda rngs: make(rngs=rngs), "nnx_mlp")
