"""`nnx_mlp`: an MLP written with Flax NNX, run through the same pure apply as Linen models.

Also the template for bringing your own NNX model: write a module whose constructor takes
`rngs` (as `NNXMLP` in jrecipe/models/nnx_modules.py), and a factory returning
`from_nnx(lambda rngs: YourModule(..., rngs=rngs), name)`.
"""

import functools
import math

from jrecipe.errors import UserError
from jrecipe.models.core import output_dim, register_model
from jrecipe.models.nnx_adapter import from_nnx
from jrecipe.models.linear import require_not_sequence
from jrecipe.models.mlp import ACTIVATIONS, as_widths, check_rate


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
  from jrecipe.models.nnx_modules import NNXMLP  # flax.nnx, only when an NNX model is built
  make = functools.partial(
      NNXMLP, int(math.prod(spec.input_shape)), as_widths(hidden), output_dim(spec),
      activation=activation, dropout=check_rate(dropout, "dropout"), batchnorm=bool(batchnorm),
      bn_axis_name=bn_axis_name)
  return from_nnx(lambda rngs: make(rngs=rngs), "nnx_mlp")
