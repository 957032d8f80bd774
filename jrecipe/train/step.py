"""Pure train and eval steps: `(state, batch) -> (state, metrics)` and `(variables, batch) -> sums`.

Nothing here knows about devices: the same functions are jitted on one device, jitted over a
device mesh, or pmapped (then `axis_name` names the device axis and gradients are averaged
with `lax.pmean`). The plain step returns what every logged record needs (losses,
accuracy, learning rate, finiteness) and nothing more, so it stays as lean as a hand-written
loop. With `monitor=True` the same step also returns the per-leaf gradient, parameter and
update norms (CS231n's update/weight ratios) as three stacked vectors; with `monitor_every`
they are computed inside a `lax.cond` only on cadence steps (zeros otherwise), so one
compiled step serves both and watching training costs nothing measurable between them.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jrecipe import optim
from jrecipe.train.state import TrainState
from jrecipe.types import Loss, Model


NOT_DECAYED = ("bias", "scale", "b")


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


def make_loss_fn(model: Model, loss: Loss, *, l2: float, augment: Optional[Callable] = None):
  """`loss_fn(params, model_state, batch, rng, step) -> (total, (data_loss, aux))`, for grad."""

  def loss_fn(params, model_state, batch, rng, step):
    k_aug, k_drop = step_rngs(rng, step)
    x = batch["x"]
    if augment is not None:
      x = augment(x, k_aug)
    variables = {"params": params, **model_state}
    outputs, new_state = model.apply_with_state(variables, x, True, {"dropout": k_drop})
    data_loss = jnp.mean(loss.per_example(outputs, batch["y"]))
    reg_loss = l2 * l2_penalty(params) if l2 else jnp.zeros((), data_loss.dtype)
    aux = {"loss": data_loss, "reg_loss": reg_loss}
    if loss.correct is not None:
      aux["accuracy"] = jnp.mean(loss.correct(outputs, batch["y"]))
    return data_loss + reg_loss, (new_state, aux)

  return loss_fn


def _global_norm(tree) -> jax.Array:
  return optax.tree.norm(tree) if jax.tree.leaves(tree) else jnp.zeros(())


def _learning_rate(opt_state) -> jax.Array:
  """The injected learning rate, or NaN for an optimizer built outside jrecipe.optim."""
  try:
    return jnp.asarray(optim.current_learning_rate(opt_state), jnp.float32)
  except ValueError:
    return jnp.full((), jnp.nan, jnp.float32)


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


def make_train_step(model: Model, loss: Loss, tx: optax.GradientTransformation, *,
                    l2: float = 0.0, ema_decay: float = 0.0, augment: Optional[Callable] = None,
                    axis_name: Optional[str] = None, needs_value_fn: bool = False,
                    monitor: bool = False, monitor_every: int = 0, monitor_last: int = 0):
  """Builds the pure train step `(state, batch) -> (state, metrics)`.

  Args:
    model, loss, tx: the experiment's model, data loss and optax transformation.
    l2: L2 regularisation strength (added to the data loss; reported separately).
    ema_decay: decay of the parameter EMA; 0 keeps no EMA.
    augment: `augment(x, rng) -> x` applied to the batch inside the step (train only).
    axis_name: the pmap axis to average gradients, metrics and batch statistics over.
    needs_value_fn: pass value/grad/value_fn to tx.update (L-BFGS's line search).
    monitor: also return `metrics['monitor']` = {'grad_norm', 'param_norm', 'update_norm'}:
      per-leaf norms stacked in `jax.tree.leaves(params)` order (parameters before the
      update; the update as applied). `expand_monitor` names them on the host.
    monitor_every, monitor_last: when monitor_every > 0 the norms are computed only when
      the step count after this step is a multiple of it or equals monitor_last (a
      `lax.cond`; zeros on other steps).

  Returns:
    A function to jit/pmap. A non-finite loss or gradient leaves the state unchanged and
    records the step in `state.bad_step` (checked on the host only when metrics are
    logged: no per-step host sync).
  """
  loss_fn = make_loss_fn(model, loss, l2=l2, augment=augment)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def pmean(x):
    return jax.lax.pmean(x, axis_name) if axis_name else x

  def train_step(state: TrainState, batch: dict[str, Any]):
    (total, (new_model_state, aux)), grads = grad_fn(
        state.params, state.model_state, batch, state.rng, state.step)
    grads, total, aux, new_model_state = pmean((grads, total, aux, new_model_state))
    finite = jnp.isfinite(total) & _all_finite(grads)

    def updated(_):
      """The optimizer's step: (new state, the updates as applied)."""
      if needs_value_fn:
        def value_fn(p):
          v, _ = loss_fn(p, state.model_state, batch, state.rng, state.step)
          return pmean(v)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, value=total,
                                       grad=grads, value_fn=value_fn)
      else:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
      updates = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), updates)
      params = optax.apply_updates(state.params, updates)
      if ema_decay:
        # Warm-up of the decay (as tf.train.ExponentialMovingAverage with num_updates): early
        # on the average would otherwise be dominated by the initial parameters.
        t = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
      else:
        ema = state.ema_params
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                           model_state=new_model_state, ema_params=ema), updates

    # A non-finite loss or gradient keeps the state (and counts the step in bad_step). A
    # lax.cond, not a select over the whole state: selecting between the new and the old
    # optimizer state made XLA copy every Adam moment at the start of each step (two
    # 256x256 copies took 0.11 ms of a 1.9 ms digits MLP step). Measured side by side
    # against the hand loop: wall 0.97 -> 0.99, CPU 0.87 -> 0.94 (docs/performance.md).
    kept = state.replace(step=state.step + 1,
                         bad_step=jnp.where(state.bad_step >= 0, state.bad_step, state.step))
    zero_updates = jax.tree.map(jnp.zeros_like, state.params)
    new_state, updates = jax.lax.cond(finite, updated, lambda _: (kept, zero_updates), None)
    metrics = dict(aux)
    metrics.update(
        total_loss=total,
        learning_rate=_learning_rate(state.opt_state) * state.lr_scale,
        finite=finite.astype(jnp.float32),
    )
    if monitor:
      def norms(trees):
        return {k: leaf_norms(t) for k, t in zip(MONITOR_KINDS, trees)}

      trees = (grads, state.params, updates)
      if monitor_every > 0:
        count = state.step + 1
        due = (count % monitor_every == 0) | (count == monitor_last)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(norms, trees))
        metrics["monitor"] = jax.lax.cond(due, norms, lambda _: zeros, trees)
      else:
        metrics["monitor"] = norms(trees)
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
