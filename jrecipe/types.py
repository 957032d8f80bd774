"""The small set of types every mode shares: what a dataset, a model and a loss look like.

A mode (train, check, inspect, search, ensemble, report) never builds its own model or
data pipeline; it receives these from `jrecipe.experiment.build(config)`.
"""

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

Array = Any
PyTree = Any


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the rest of jrecipe needs to know about a dataset.

  Attributes:
    name: the config's dataset name (e.g. 'digits', 'tfds:cifar10').
    task: 'classification' (labels int32 [B]), 'regression' (targets float32 [B, ...]) or
      'sequence' (int32 labels [B, T]: next-token classification per time step).
    input_shape: shape of one example as it enters the model, e.g. (8, 8, 1) or (64,).
    num_classes: classes (or vocabulary size for 'sequence'); None for regression.
    class_names: human-readable class names (len num_classes), or None.
    value_range: (min, max) of the raw input values as stored (before normalisation).
    splits: split name -> number of examples, e.g. {'train': 1257, 'validation': 270, 'test': 270}.
    time_axis: for sequence data, the input axis that is time (1 for [B, T, ...]); else None.
    sees_current: for sequence data, whether output t may depend on input t (True for
      next-token prediction where input t is token t and target t is token t+1).
    mean, std: the normalisation applied to the stored inputs (x - mean) / std.
    token_bytes: for text sequence data, bytes of text per token (1.0 for byte-level text),
      so that evaluation reports bits per byte; None for other data.
  """

  name: str
  task: str
  input_shape: tuple
  num_classes: Optional[int]
  class_names: Optional[tuple]
  value_range: tuple
  splits: dict
  time_axis: Optional[int] = None
  sees_current: bool = True
  mean: float = 0.0
  std: float = 1.0
  token_bytes: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Model:
  """A model used through pure functions of pytrees.

  Attributes:
    init: `init(rng, x) -> variables` where variables is a dict with 'params' and
      optionally 'batch_stats' (the model's mutable state).
    apply: `apply(variables, x, train=False, rngs=None) -> outputs`; the pure function
      every check uses. In train mode BatchNorm statistics are computed from the batch and
      the updated statistics are discarded.
    apply_with_state: `apply_with_state(variables, x, train, rngs) -> (outputs, new_state)`
      where new_state is the updated mutable collections dict ({} when there are none).
    name: registry name or import path.
    module: the underlying Flax Linen module (or None) for introspection
      (`capture_intermediates`, first-layer weights, ...).
    has_dropout: whether the model draws from the 'dropout' rng in train mode.
    has_batchnorm: whether the model keeps 'batch_stats'.
    widen: `widen(factor) -> Model` a wider variant (for capacity checks) or None.
    head: the path in params of the final layer's bias (e.g. ('head', 'bias'), or
      ('classifier', 'out', 'bias') for a nested head), where 'init well' sets the
      data-derived bias; None: ('head', 'bias') if present, else no head bias.
    axis_names: collective axis names the adapter binds around each call (a BatchNorm's
      hard-coded `axis_name` on one device; `jrecipe.models.linen_adapter.bind_axes`).
    full_precision: under `config.precision` 'bfloat16'/'float16', the same model computing
      in float32 (the gradient check's float64 reference; `jrecipe.precision`); else None.
  """

  init: Callable
  apply: Callable
  apply_with_state: Callable
  name: str = "model"
  module: Any = None
  has_dropout: bool = False
  has_batchnorm: bool = False
  widen: Optional[Callable] = None
  head: Optional[tuple] = None
  axis_names: tuple = ()
  full_precision: Optional["Model"] = None

  @property
  def head_path(self) -> tuple:
    """`head`, or the conventional ('head', 'bias') when it is not known."""
    return self.head if self.head is not None else ("head", "bias")


@dataclasses.dataclass(frozen=True)
class Loss:
  """A data loss and what it expects.

  Attributes:
    name: 'softmax_xent', 'multiclass_svm', 'l2', 'huber' or an import path.
    per_example: `per_example(outputs, labels) -> losses [B]` (sequence losses average
      over time inside each example). Pure, jit-able, float32 or float64.
    expects: 'logits' (unnormalised scores for a softmax), 'scores' (SVM class scores)
      or 'values' (regression outputs).
    chance: `chance(num_classes, targets) -> float`: the loss expected at a small
      initialisation (-ln(1/C) for softmax, C-1 for Weston-Watkins with margin 1, the
      target variance / 2-free form for L2, ...); see each loss's docstring.
    predict: `predict(outputs) -> predictions` (class ids for classification).
    correct: `correct(outputs, labels) -> [B] float` per-example accuracy (fraction of
      correct time steps for sequences), or None for regression.
  """

  name: str
  per_example: Callable
  expects: str
  chance: Callable
  predict: Callable
  correct: Optional[Callable] = None


def to_numpy(tree: PyTree) -> PyTree:
  """Host copies of a pytree of arrays."""
  import jax
  return jax.tree.map(np.asarray, tree)
