"""Data losses: what a model's outputs are compared with, and what the loss should be at init.

Recipe step "verify the loss at init": every `Loss` carries `chance(num_classes, targets)`,
the value a correctly initialised model should start from, so the training core can print
it beside the measured step-0 loss.

Registered names: softmax_xent, multiclass_svm, l2, huber; or 'package.module:name' for
your own (see `build_loss`). Conventions shared by all of them:
  * `per_example(outputs, labels)` returns [B] in float32, or float64 for float64 outputs
    (so float64 gradient checks stay exact). For 'sequence' specs outputs are
    [B, T, C] and labels [B, T]; each example's loss is the mean over its T steps.
  * Regression outputs are reshaped to the targets' shape when they have the same size
    ([B, 1] outputs against [B] targets); the squared error is summed over target dims.
"""

import inspect
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jrecipe.errors import UserError
from jrecipe.registry import Registry, import_path
from jrecipe.types import DataSpec, Loss

LOSSES = Registry("loss")


def _float(x: jax.Array) -> jax.Array:
  """At least float32: bfloat16/float16 are promoted, float64 stays, integers -> float32."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.float32)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _per_example_mean(values: jax.Array) -> jax.Array:
  """[B, ...] -> [B]: mean over everything but the batch axis (time steps for sequences)."""
  values = _float(values)
  if values.ndim <= 1:
    return values
  return values.reshape((values.shape[0], -1)).mean(axis=1)


def _check_class_outputs(outputs, labels):
  if outputs.ndim != labels.ndim + 1 or outputs.shape[:-1] != labels.shape:
    raise ValueError(f"Class outputs {outputs.shape} do not match labels {labels.shape}: "
                     "expected outputs [..., C] for labels [...].")


def predict_classes(outputs: jax.Array) -> jax.Array:
  """Class ids: argmax over the last axis ([B, C] -> [B], [B, T, C] -> [B, T])."""
  return jnp.argmax(outputs, axis=-1)


def correct_classes(outputs: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example accuracy in [0, 1]: 0/1 for classification, fraction of correct steps for
  sequences."""
  return _per_example_mean((predict_classes(outputs) == labels).astype(jnp.float32))


def predict_values(outputs: jax.Array) -> jax.Array:
  """Regression predictions are the outputs themselves."""
  return outputs


def _match_targets(outputs, targets):
  if outputs.shape != targets.shape:
    if outputs.size != targets.size:
      raise ValueError(f"Regression outputs {outputs.shape} do not match targets "
                       f"{targets.shape}.")
    outputs = outputs.reshape(targets.shape)
  return _float(outputs), _float(targets)


def _require_classes(num_classes, loss):
  if not num_classes or num_classes < 2:
    raise UserError(f"The {loss} loss needs at least 2 classes, got num_classes={num_classes!r}.")
  return int(num_classes)


def _require_targets(targets, loss):
  if targets is None:
    raise UserError(f"The {loss} chance value is computed from the targets: pass them.")
  targets = np.asarray(targets, np.float64)
  return targets.reshape((targets.shape[0], -1)) if targets.ndim > 1 else targets[:, None]


def _check_task(spec: DataSpec, name: str, tasks: tuple):
  if spec.task not in tasks:
    alternatives = ("softmax_xent or multiclass_svm" if spec.task != "regression"
                    else "l2 or huber")
    raise UserError(f"The {name} loss is for {' or '.join(tasks)} tasks; dataset {spec.name!r} "
                    f"is a {spec.task} task: use {alternatives}.")


@LOSSES.register("softmax_xent")
def softmax_xent(spec: DataSpec) -> Loss:
  """Softmax cross-entropy on integer labels (optax.softmax_cross_entropy_with_integer_labels).

  Expects 'logits'. Chance: ln C, the loss of uniform predictions, which a small init (all
  logits near 0) gives: with exactly zero logits the loss is exactly ln C for every label.
  For 'sequence' specs, each example's loss is the mean over its time steps.

  Args:
    spec: a classification or sequence spec.

  Returns:
    The `Loss`.
  """
  _check_task(spec, "softmax_xent", ("classification", "sequence"))

  def per_example(logits, labels):
    _check_class_outputs(logits, labels)
    losses = optax.softmax_cross_entropy_with_integer_labels(_float(logits), labels)
    return _per_example_mean(losses)

  def chance(num_classes, targets=None):
    del targets
    return float(np.log(_require_classes(num_classes, "softmax_xent")))

  return Loss(name="softmax_xent", per_example=per_example, expects="logits", chance=chance,
              predict=predict_classes, correct=correct_classes)


@LOSSES.register("multiclass_svm")
def multiclass_svm(spec: DataSpec, margin: float = 1.0) -> Loss:
  """Weston-Watkins multiclass hinge loss (CS231n's SVM loss).

  loss(s, y) = sum_{j != y} max(0, s_j - s_y + margin). Expects 'scores'. Chance: with all
  scores equal (a small init), each of the C-1 wrong classes contributes `margin`, so
  (C - 1) * margin; exactly that at zero scores.

  Args:
    spec: a classification or sequence spec.
    margin: the required gap between the true score and every other score (> 0).

  Returns:
    The `Loss`.
  """
  _check_task(spec, "multiclass_svm", ("classification", "sequence"))
  margin = float(margin)
  if not margin > 0:
    raise UserError(f"multiclass_svm margin must be positive, got {margin!r}.")

  def per_example(scores, labels):
    _check_class_outputs(scores, labels)
    scores = _float(scores)
    true = jnp.take_along_axis(scores, labels[..., None].astype(jnp.int32), axis=-1)
    hinge = jnp.maximum(0.0, scores - true + margin)
    wrong = jax.nn.one_hot(labels, scores.shape[-1], dtype=jnp.int32) == 0
    return _per_example_mean(jnp.sum(jnp.where(wrong, hinge, 0.0), axis=-1))

  def chance(num_classes, targets=None):
    del targets
    return float((_require_classes(num_classes, "multiclass_svm") - 1) * margin)

  return Loss(name="multiclass_svm", per_example=per_example, expects="scores", chance=chance,
              predict=predict_classes, correct=correct_classes)


@LOSSES.register("l2")
def l2(spec: DataSpec) -> Loss:
  """Half squared error, summed over target dimensions: 0.5 * ||pred - y||^2 per example.

  Expects 'values'. The 0.5 makes the gradient pred - y. Chance is the loss of predicting 0
  (what a zero-mean init with a zero head bias outputs):

      chance(C, targets) = mean_i 0.5 * ||y_i||^2 = 0.5 * sum_d (Var[y_d] + E[y_d]^2)

  with population variance (ddof=0) over examples i, for each target dimension d. After
  "init well" sets the head bias to the target mean, the expected loss drops to
  0.5 * sum_d Var[y_d].

  Args:
    spec: a regression spec.

  Returns:
    The `Loss` (`correct` is None).
  """
  _check_task(spec, "l2", ("regression",))

  def per_example(outputs, targets):
    pred, y = _match_targets(outputs, targets)
    sq = 0.5 * jnp.square(pred - y)
    return sq.reshape((sq.shape[0], -1)).sum(axis=1)

  def chance(num_classes, targets):
    del num_classes
    y = _require_targets(targets, "l2")
    return float(0.5 * np.sum(y.var(axis=0) + np.square(y.mean(axis=0))))

  return Loss(name="l2", per_example=per_example, expects="values", chance=chance,
              predict=predict_values, correct=None)


def _huber(residual, delta):
  abs_r = jnp.abs(residual)
  return jnp.where(abs_r <= delta, 0.5 * jnp.square(residual), delta * (abs_r - 0.5 * delta))


@LOSSES.register("huber")
def huber(spec: DataSpec, delta: float = 1.0) -> Loss:
  """Huber loss summed over target dimensions (quadratic within `delta`, linear beyond).

  h(r) = 0.5 r^2 if |r| <= delta else delta * (|r| - delta / 2), r = pred - y; equal to
  l2's 0.5 r^2 for small residuals. Expects 'values'. Chance, the analogue of l2's, is the
  loss of predicting 0: chance(C, targets) = mean_i sum_d h(y_id) (no closed form in
  mean and variance since h is not quadratic).

  Args:
    spec: a regression spec.
    delta: where the loss turns from quadratic to linear (> 0).

  Returns:
    The `Loss` (`correct` is None).
  """
  _check_task(spec, "huber", ("regression",))
  delta = float(delta)
  if not delta > 0:
    raise UserError(f"huber delta must be positive, got {delta!r}.")

  def per_example(outputs, targets):
    pred, y = _match_targets(outputs, targets)
    h = _huber(pred - y, delta)
    return h.reshape((h.shape[0], -1)).sum(axis=1)

  def chance(num_classes, targets):
    del num_classes
    y = _require_targets(targets, "huber")
    abs_y = np.abs(y)
    h = np.where(abs_y <= delta, 0.5 * y ** 2, delta * (abs_y - 0.5 * delta))
    return float(h.sum(axis=1).mean())

  return Loss(name="huber", per_example=per_example, expects="values", chance=chance,
              predict=predict_values, correct=None)


def derived_metrics(metrics: Mapping, spec: DataSpec, loss: Loss) -> dict:
  """Metrics that follow from an evaluation's per-token loss: bits per byte for byte text.

  Recipe step 'add a human-interpretable metric': for a language model on text whose tokens
  are bytes (`spec.token_bytes`, 1.0 for stdlib_bytes), the softmax cross-entropy per token
  in nats becomes bits per byte = loss / (ln 2 * token_bytes), the unit byte-level language
  models are compared in (the unigram baseline of stdlib_bytes is about 4.7 bits per byte).
  Only the registered softmax_xent is known to be that cross-entropy: other losses get none.

  Args:
    metrics: an evaluation's means ({'loss': per-token cross-entropy in nats, ...}).
    spec: the dataset's DataSpec.
    loss: the data loss.

  Returns:
    {'bits_per_byte': float} or {}.
  """
  if not spec.token_bytes or loss.name != "softmax_xent" or "loss" not in metrics:
    return {}
  return {"bits_per_byte": float(metrics["loss"]) / (np.log(2.0) * float(spec.token_bytes))}


def _fields(loss_config: Any) -> tuple[str, dict]:
  if isinstance(loss_config, str):
    return loss_config, {}
  if hasattr(loss_config, "to_dict"):
    loss_config = loss_config.to_dict()
  if not isinstance(loss_config, Mapping) or not loss_config.get("name"):
    raise UserError(f"The loss config must be a ConfigDict with a 'name', got {loss_config!r}.")
  fields = dict(loss_config)
  return fields.pop("name"), fields


def _signature(fn: Callable) -> Optional[inspect.Signature]:
  try:
    return inspect.signature(fn)
  except (TypeError, ValueError):
    return None


def _check_fields(name: str, fn: Callable, fields: dict, skip: tuple):
  sig = _signature(fn)
  if sig is None or any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
    return
  accepted = {n: p.default for n, p in sig.parameters.items()
              if n not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
  unknown = sorted(set(fields) - set(accepted))
  if unknown:
    shown = ", ".join(f"{k}={v!r}" if v is not inspect.Parameter.empty else k
                      for k, v in accepted.items()) or "(none)"
    raise UserError(f"The loss {name!r} does not accept the field(s) {unknown}. "
                    f"Accepted fields (with defaults): {shown}.")


def _is_loss_factory(fn: Callable) -> bool:
  sig = _signature(fn)
  if sig is None:
    return False
  ret = sig.return_annotation
  return "spec" in sig.parameters or ret is Loss or ret == "Loss"


def wrap_per_example(fn: Callable, spec: DataSpec, name: str) -> Loss:
  """Wraps a user's `fn(outputs, labels) -> [B]` as a Loss that expects logits.

  Chance is ln C (what a softmax-style loss gives at zero logits); predictions and accuracy
  are argmax-based for classification and sequence specs. For regression specs the outputs
  are the predictions, `correct` is None and chance is the loss of predicting 0 — but only
  a registered loss knows its own chance, so for regression chance is computed by calling
  `fn(zeros, targets)`.
  """
  def per_example(outputs, labels):
    return _per_example_mean(jnp.asarray(fn(outputs, labels)))

  if spec.task == "regression":
    def chance(num_classes, targets):
      del num_classes
      if targets is None:
        raise UserError(f"The chance value of loss {name!r} needs the targets.")
      targets = jnp.asarray(targets)
      return float(jnp.mean(per_example(jnp.zeros_like(targets, jnp.float32), targets)))
    return Loss(name=name, per_example=per_example, expects="values", chance=chance,
                predict=predict_values, correct=None)

  def chance(num_classes, targets=None):
    del targets
    return float(np.log(_require_classes(num_classes, name)))

  return Loss(name=name, per_example=per_example, expects="logits", chance=chance,
              predict=predict_classes, correct=correct_classes)


def build_loss(loss_config: Any, spec: DataSpec) -> Loss:
  """Builds the data loss a config names.

  Recipe step "verify the loss at init": the returned Loss's `chance` is what step 0 should
  show.

  Args:
    loss_config: a ConfigDict (or mapping) with `name` and the loss's fields (e.g.
      `margin` for multiclass_svm, `delta` for huber), or a bare name. The name is a
      registered loss or an import path 'package.module:attr' where attr is
        - a `jrecipe.types.Loss` instance, used as is;
        - a factory returning a Loss: a callable with a `spec` parameter (or annotated
          `-> Loss`), called as `factory(spec=spec, **fields)`;
        - any other callable `f(outputs, labels, **fields) -> [B]`, wrapped by
          `wrap_per_example` (expects 'logits', chance ln C for classification).
    spec: the dataset's DataSpec (task and num_classes).

  Returns:
    A `jrecipe.types.Loss`.

  Raises:
    UserError: unknown name (the message lists valid names), an unaccepted field, a loss
      that does not fit the task, or an import path that is not a loss.
  """
  name, fields = _fields(loss_config)
  if name in LOSSES.names():
    factory = LOSSES.get(name)
    _check_fields(name, factory, fields, ("spec",))
    return factory(spec, **fields)
  if ":" not in name:
    LOSSES.get(name)  # raises the UserError listing valid names
  obj = import_path(name, "loss")
  if isinstance(obj, Loss):
    if fields:
      raise UserError(f"The loss {name!r} is a ready-made Loss; it takes no fields "
                      f"(got {sorted(fields)}).")
    return obj
  if not callable(obj):
    raise UserError(f"The loss {name!r} is a {type(obj).__name__}, not a Loss or a callable.")
  if _is_loss_factory(obj):
    _check_fields(name, obj, fields, ("spec",))
    loss = obj(spec=spec, **fields)
    if not isinstance(loss, Loss):
      raise UserError(f"The loss factory {name!r} returned {type(loss).__name__}, "
                      "not a jrecipe.types.Loss.")
    return loss
  sig = _signature(obj)
  _check_fields(name, obj, fields, tuple(sig.parameters)[:2] if sig else ())
  fn = (lambda outputs, labels: obj(outputs, labels, **fields)) if fields else obj
  return wrap_per_example(fn, spec, name)


def _log_softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max()
  return z - np.log(np.sum(np.exp(z)))


def closed_form_at_constant(loss: Loss, num_classes: Optional[int], targets,
                            constant: Optional[np.ndarray]) -> Optional[dict]:
  """The loss of predicting `constant` for every example, from its formula, not its code.

  Recipe step 'verify the loss at init' (CS231n: 'look for correct loss at chance'): the
  expected value must not come from the code under test, or a loss reduced over the wrong
  axis (or divided by C, or summed over time steps) is equally wrong in the expectation.
  The constant is what a vanishingly small init outputs: the head bias, or zeros.

  Known forms: loss.expects 'logits' (softmax cross-entropy: -mean_i log softmax(b)_{y_i};
  ln C at b = 0, per token ln V for sequences; the contract `wrap_per_example` gives a
  user's classification loss); the registered multiclass_svm (Weston-Watkins, its margin m:
  mean_i sum_{j != y_i} max(0, b_j - b_{y_i} + m); (C-1) m at b = 0); the registered l2 and
  huber (their closed-form `chance` of the residual y - b). A user Loss that declares
  another chance than ln C for logits, or any other loss, has no known form: None.

  Args:
    loss: the data loss.
    num_classes: C (None for regression).
    targets: the labels [B] / [B, T] or regression targets [B, ...].
    constant: [C] (or the target width) predicted everywhere; None means zeros.

  Returns:
    {'value': float, 'formula': str} or None.
  """
  y = np.asarray(targets)
  c = int(num_classes) if num_classes else None
  if loss.expects == "logits" and c:
    try:
      declared = float(loss.chance(c, y))
    except Exception:  # noqa: BLE001 - a user chance that cannot be called declares nothing
      declared = None
    if declared is None or abs(declared - np.log(c)) > 1e-6 * np.log(c):
      return None  # the loss declares another value at chance (e.g. a focal loss)
    b = np.zeros(c) if constant is None else np.asarray(constant, np.float64).reshape(c)
    logp = _log_softmax(b)
    value = float(-np.mean(logp[y.astype(np.int64).ravel()]))
    what = ("ln C" if constant is None or not np.any(b) else
            "cross-entropy of the head bias's class probabilities")
    return {"value": value, "formula": f"softmax cross-entropy of constant logits ({what}, "
            f"C={c}{', per token' if y.ndim > 1 else ''})"}
  if loss.expects == "scores" and c and loss.name == "multiclass_svm":
    margin = float(loss.chance(c, y)) / (c - 1)
    b = np.zeros(c) if constant is None else np.asarray(constant, np.float64).reshape(c)
    labels = y.astype(np.int64).ravel()
    hinge = np.maximum(0.0, b[None, :] - b[labels][:, None] + margin)
    hinge[np.arange(len(labels)), labels] = 0.0
    return {"value": float(hinge.sum(axis=1).mean()),
            "formula": f"Weston-Watkins hinge of constant scores ((C-1) x margin = "
                       f"{(c - 1) * margin:g} at zero scores, C={c})"}
  if loss.expects == "values" and loss.name in ("l2", "huber") and loss.name in LOSSES.names():
    t = np.asarray(y, np.float64).reshape(len(y), -1)
    b = 0.0 if constant is None else np.asarray(constant, np.float64).reshape(-1)
    if np.ndim(b) and b.size != t.shape[1]:
      return None
    formula = ("0.5 * sum_d (Var[y_d] + (E[y_d] - b_d)^2)" if loss.name == "l2" else
               "mean_i sum_d huber(y_id - b_d)")
    return {"value": float(loss.chance(None, t - b)),
            "formula": f"{loss.name} of a constant prediction: {formula}"}
  return None
