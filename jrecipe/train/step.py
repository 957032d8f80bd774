"""The pure steps: `train_step(state, batch) -> (state, metrics)` and `eval_step(variables, batch)`.

A train step is built from a few explicit parts (`StepParts`: model, loss, optimizer, optional
augmentation, L2 strength, parameter EMA) and nothing else. What a mode needs beyond that is
composed around it: the monitor's per-leaf norms are an `extra_metrics` function, a fixed
dropout key is a different `rng` in the state, a line-search optimizer is recognised from its
own state. Nothing here knows about devices: the same function is jitted on one device, jitted
over a device mesh, or pmapped (then `axis_name` names the device axis and gradients are
averaged with `lax.pmean`). The plain step returns what every logged record needs (losses,
accuracy, learning rate, finiteness) and nothing more, so it stays as lean as a hand loop.
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jrecipe import optim
from jrecipe import precision
from jrecipe.train.state import TrainState
from jrecipe.types import Loss, Model

NOT_DECAYED = ("bias", "scale", "b")


@dataclasses.dataclass(frozen=True)
class StepParts:
  """What a train step is made of.

  Attributes:
    model, loss: the experiment's model and data loss.
    tx: the optax transformation (any; a line search such as L-BFGS's is detected from its
      state and given `value`, `grad` and `value_fn`).
    augment: `augment(x, rng) -> x` applied to the batch inside the step (train only); one
      whose `takes_labels` is True is called `augment(x, rng, y) -> (x, y)` and may change
      the labels with the inputs (a flip of an asymmetric label, a crop of a box).
    l2: L2 regularisation strength added to the data loss (reported separately).
    ema_decay: decay of the parameters' moving average; 0 keeps none.
  """

  model: Model
  loss: Loss
  tx: optax.GradientTransformation
  augment: Optional[Callable] = None
  l2: float = 0.0
  ema_decay: float = 0.0


def _decayed(path, leaf) -> bool:
  last = path[-1] if path else None
  name = getattr(last, "key", getattr(last, "name", None))
  return leaf.ndim > 1 and name not in NOT_DECAYED


def l2_penalty(params) -> jax.Array:
  """0.5 * sum of squared weights over kernels and embeddings.

  Leaves with ndim > 1 count, except those named 'bias' or 'scale' (attention biases are
  2-D but are still biases): CS231n regularises weights, not biases or norm scales.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  leaves = [p for path, p in flat if _decayed(path, p)]
  if not leaves:
    return jnp.zeros(())
  return 0.5 * sum(jnp.sum(jnp.square(p)) for p in leaves)


def step_rngs(rng: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(augmentation key, dropout key) for a step: derived from the one seed by fold_in."""
  k = jax.random.fold_in(rng, step)
  k_aug, k_drop = jax.random.split(k)
  return k_aug, k_drop


def make_loss_fn(parts: StepParts):
  """`loss_fn(params, model_state, batch, rng, step) -> (total, (new_model_state, aux))`."""
  model, loss, augment, l2 = parts.model, parts.loss, parts.augment, parts.l2

  def loss_fn(params, model_state, batch, rng, step):
    k_aug, k_drop = step_rngs(rng, step)
    x, y = batch["x"], batch["y"]
    if getattr(augment, "takes_labels", False):
      x, y = augment(x, k_aug, y)
    elif augment is not None:
      x = augment(x, k_aug)
    variables = {"params": params, **model_state}
    outputs, new_state = model.apply_with_state(variables, x, True, {"dropout": k_drop})
    data_loss = jnp.mean(loss.per_example(outputs, y))
    reg_loss = l2 * l2_penalty(params) if l2 else jnp.zeros((), data_loss.dtype)
    aux = {"loss": data_loss, "reg_loss": reg_loss}
    if loss.correct is not None:
      aux["accuracy"] = jnp.mean(loss.correct(outputs, y))
    return data_loss + reg_loss, (new_state, aux)

  return loss_fn


def _learning_rate(opt_state) -> jax.Array:
  """The injected learning rate, or NaN for an optimizer built outside jrecipe.optim."""
  try:
    return jnp.asarray(optim.current_learning_rate(opt_state), jnp.float32)
  except ValueError:
    return jnp.full((), jnp.nan, jnp.float32)


_LINE_SEARCH_STATES = (optax.ScaleByZoomLinesearchState,
                       optax.ScaleByBacktrackingLinesearchState)


def has_line_search(opt_state) -> bool:
  """Whether an optimizer state holds a line search (its update needs value_fn)."""
  leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, _LINE_SEARCH_STATES))
  return any(isinstance(x, _LINE_SEARCH_STATES) for x in leaves)


def leaf_names(tree) -> list[str]:
  """'dense_0/kernel'-style names of a pytree's leaves, in `jax.tree.leaves` order."""
  out = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = []
    for k in path:
      parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    out.append("/".join(parts) or "value")
  return out


def leaf_norms(tree) -> jax.Array:
  """The L2 norm of every leaf (float32), stacked in `jax.tree.leaves` order."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((0,), jnp.float32)
  return jnp.stack([jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)))) for x in leaves])


MONITOR_KINDS = ("grad_norm", "param_norm", "update_norm")


def monitor_norms(every: int = 0, last: int = 0) -> Callable:
  """The babysitting extra of a step: per-leaf gradient, parameter and update norms.

  CS231n's update/weight ratios. Returns an `extra_metrics(count, grads, params, updates)`
  for `make_train_step`: {'monitor': {'grad_norm', 'param_norm', 'update_norm'}}, each a
  vector of per-leaf norms in `jax.tree.leaves(params)` order (parameters before the update,
  the update as applied; `expand_monitor` names them on the host). With `every` > 0 they are
  computed only when the step count after this step is a multiple of `every` or equals `last`
  (a `lax.cond`; zeros on other steps), so one compiled step serves both.
  """

  def norms(trees):
    return {k: leaf_norms(t) for k, t in zip(MONITOR_KINDS, trees)}

  def extra(count, grads, params, updates):
    trees = (grads, params, updates)
    if every <= 0:
      return {"monitor": norms(trees)}
    due = (count % every == 0) | (count == last)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(norms, trees))
    return {"monitor": jax.lax.cond(due, norms, lambda _: zeros, trees)}

  return extra


def expand_monitor(mon: dict, names: list[str]) -> dict[str, float]:
  """Host values of `metrics['monitor']` -> {'grad_norm/<leaf>': ..., 'grad_norm': global}."""
  out = {}
  for kind in MONITOR_KINDS:
    vec = [float(v) for v in list(getattr(mon[kind], "ravel", lambda: mon[kind])())]
    out[kind] = float(sum(v * v for v in vec) ** 0.5)
    out.update({f"{kind}/{n}": v for n, v in zip(names, vec)})
  return out


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _ema(ema_decay: float, step, ema_params, params):
  """The EMA after an update. Warm-up of the decay (as tf.train.ExponentialMovingAverage with
  num_updates): early on the average would otherwise be dominated by the initial parameters."""
  t = step.astype(jnp.float32)
  decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def _scaled_grads(loss_fn, scale, params, model_state, batch, rng, step):
  """(loss, new model state, aux, gradients) from the loss multiplied by `scale` (float16)."""
  def scaled(p, *args):
    total, (new_state, aux) = loss_fn(p, *args)
    return total * scale, (total, new_state, aux)
  (_, (total, new_state, aux)), grads = jax.value_and_grad(scaled, has_aux=True)(
      params, model_state, batch, rng, step)
  return total, new_state, aux, jax.tree.map(lambda g: g / scale.astype(g.dtype), grads)


def make_train_step(parts: StepParts, *, axis_name: Optional[str] = None,
                    extra_metrics: Optional[Callable] = None):
  """Builds the pure train step `(state, batch) -> (state, metrics)`.

  Args:
    parts: model, loss, optimizer, augmentation, L2 strength and EMA decay (`StepParts`).
    axis_name: the pmap axis to average gradients, metrics and batch statistics over.
    extra_metrics: `extra(count, grads, params, updates) -> dict` merged into the metrics
      (count is the step count after this step), e.g. `monitor_norms(every, last)`.

  Returns:
    A function to jit/pmap. A non-finite loss or gradient leaves the state unchanged and
    records the step in `state.bad_step` (checked on the host only when metrics are
    logged: no per-step host sync).
  """
  loss_fn = make_loss_fn(parts)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  tx, ema_decay = parts.tx, parts.ema_decay

  def pmean(x):
    return jax.lax.pmean(x, axis_name) if axis_name else x

  def train_step(state: TrainState, batch: dict[str, Any]):
    scale = precision.loss_scale(state.opt_state)
    if scale is None:
      (total, (new_model_state, aux)), grads = grad_fn(
          state.params, state.model_state, batch, state.rng, state.step)
    else:  # float16: differentiate the scaled loss, unscale the gradients (jrecipe.precision)
      total, new_model_state, aux, grads = _scaled_grads(
          loss_fn, scale, state.params, state.model_state, batch, state.rng, state.step)
    grads, total, aux, new_model_state = pmean((grads, total, aux, new_model_state))
    finite = jnp.isfinite(total) & _all_finite(grads)
    # An overflow of the float16 loss scale skips the step and halves the scale; only at the
    # smallest scale is a non-finite step the run's own (bad_step).
    overflow = (~finite & (scale > precision.LOSS_SCALE_MIN)) if scale is not None else None

    def updated(_):
      """The optimizer's step: (new state, the updates as applied)."""
      if has_line_search(state.opt_state):
        def value_fn(p):
          v, _ = loss_fn(p, state.model_state, batch, state.rng, state.step)
          return pmean(v)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=total,
                                       grad=grads, value_fn=value_fn)
      else:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
      updates = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), updates)
      params = optax.apply_updates(state.params, updates)
      ema = _ema(ema_decay, state.step, state.ema_params, params) if ema_decay else (
          state.ema_params)
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                           model_state=new_model_state, ema_params=ema), updates

    # A non-finite loss or gradient keeps the state (and counts the step in bad_step). A
    # lax.cond, not a select over the whole state: selecting between the new and the old
    # optimizer state made XLA copy every Adam moment at the start of each step
    # (docs/performance.md).
    kept = state.replace(step=state.step + 1,
                         bad_step=jnp.where(state.bad_step >= 0, state.bad_step, state.step))
    if overflow is not None:
      kept = kept.replace(opt_state=precision.on_overflow(state.opt_state),
                          bad_step=jnp.where(overflow, state.bad_step, kept.bad_step))
    zero_updates = jax.tree.map(jnp.zeros_like, state.params)
    new_state, updates = jax.lax.cond(finite, updated, lambda _: (kept, zero_updates), None)
    metrics = dict(aux)
    metrics.update(
        total_loss=total,
        learning_rate=_learning_rate(state.opt_state) * state.lr_scale,
        finite=finite.astype(jnp.float32),
    )
    if overflow is not None:
      metrics.update(loss_scale=scale, overflow=overflow.astype(jnp.float32))
    if extra_metrics is not None:
      metrics.update(extra_metrics(state.step + 1, grads, state.params, updates))
    return new_state, metrics

  return train_step


def make_eval_step(model: Model, loss: Loss, *, axis_name: Optional[str] = None):
  """Builds `eval_step(variables, batch) -> sums`: exact sums over the real (mask=1) examples.

  Sums, never means: evaluation over a split adds them up and divides by the exact count
  ('evaluate on the whole test set'). Eval mode: dropout off, BatchNorm running statistics.
  """

  def eval_step(variables, batch):
    outputs = model.apply(variables, batch["x"], False, None)
    mask = batch["mask"]
    per_ex = loss.per_example(outputs, batch["y"])
    sums = {"loss": jnp.sum(per_ex * mask), "count": jnp.sum(mask)}
    if loss.correct is not None:
      sums["accuracy"] = jnp.sum(loss.correct(outputs, batch["y"]) * mask)
    if axis_name:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  return eval_step
