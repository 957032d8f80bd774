"""The NNX module behind `nnx_mlp` (jrecipe/models/nnx_mlp.py registers it).

A module of its own so that registering the model does not import flax.nnx (a noticeable part
of every process start: docs/performance.md); it is imported when an `nnx_mlp` model is built.
"""

from typing import Optional

from flax import nnx

from jrecipe.models.linear import flatten
from jrecipe.models.mlp import ACTIVATIONS


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
      if self.batchnorm:  # NNX's BatchNorm promotes to its float32 statistics: keep x's dtype
        x = getattr(self, f"bn_{i}")(x).astype(x.dtype)  # (mixed precision, jrecipe.precision)
      x = getattr(self, f"dropout_{i}")(act(x))
    return self.head(x)
