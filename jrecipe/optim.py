"""Optimizers from the config: CS231n's 'parameter updates', with the schedules injected.

Two recipe points shape this module:

* Karpathy, stage 3, 'Don't trust learning rate decay defaults': the default schedule is
  'constant'. Nothing decays unless the config says so, every duration states its unit
  ('steps' or 'epochs'), and epochs become steps in one place (`_Section.steps`). A decay that
  takes the rate to almost zero before the run ends, or a boundary the run never reaches, is
  logged as a warning when the optimizer is built.
* CS231n, 'updates, annealing, second order': SGD, momentum (heavy ball), Nesterov, Adagrad,
  RMSProp, Adam (the default), AdamW, and L-BFGS for full-batch problems; step, exponential
  and 1/t annealing, plus cosine, linear and warm-up; momentum can be annealed 0.5 -> 0.99;
  reduce-on-plateau (`jrecipe.train.patience.PlateauScaler`) cuts the rate 'when the
  validation error plateaus'.

Every optimizer is built with `optax.inject_hyperparams`, so the learning rate (and the
momentum coefficient) of each step is in the optimizer state: `current_learning_rate` reads
it inside jit for the train step's metrics, and the check battery plots it.

The schedules (`config.schedule`, `config.momentum_schedule`) are built by `jrecipe.schedules`.
Config sections are ml_collections ConfigDicts (or dicts, or None); a missing or None field takes
the base config's default (`jrecipe.sections.complete`).

`config.optimizer` (opt_config):
  name: 'adam'. One of OPTIMIZERS, or 'package.module:factory' for your own
    `factory(learning_rate) -> optax.GradientTransformation`.
  learning_rate: 3e-4 (Adam at 3e-4 is the recipe's safe start). Must be 1.0 for 'lbfgs',
    whose line search picks the step along the L-BFGS direction.
  momentum: 0.9, the coefficient mu of 'momentum' (heavy ball: v = mu v + g, p -= lr v) and
    'nesterov' (the lookahead form: p -= lr (g + mu v)). In [0, 1).
  b1: 0.9, b2: 0.999, eps: 1e-8: Adam/AdamW moments (with bias correction). eps is also the
    denominator guard of RMSProp (outside the square root, as in CS231n) and Adagrad.
  rms_decay: 0.9, RMSProp's decay of the squared-gradient cache (CS231n: 0.9, 0.99, 0.999).
  weight_decay: 0.0, decoupled weight decay, 'adamw' only (p -= lr * weight_decay * p, as
    optax.adamw), applied to the weight matrices only (`decay_mask`: leaves with ndim > 1
    not named bias/scale, the rule of the L2 penalty in jrecipe.train.step): recipe stage 4,
    'regularize', decays weights, never biases or normalisation scales. For other optimizers
    use L2 regularisation, `config.l2`, added to the loss.
  grad_clip_norm: 0.0 = off; otherwise gradients are clipped to this global norm before the
    optimizer sees them (not with 'lbfgs': its line search needs the true gradient).
"""

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jrecipe.errors import UserError
from jrecipe.registry import import_path
from jrecipe.schedules import (SCHEDULES, UNITS, Section, make_schedule, momentum_schedule,
                               momentum_section, schedule_from_section, schedule_section,
                               schedule_table, warn_about_decay)
from jrecipe.sections import complete

__all__ = ["OPTIMIZERS", "SCHEDULES", "UNITS", "current_learning_rate", "decay_mask",
           "make_optimizer",
           "make_schedule", "needs_value_fn", "schedule_table"]

OPTIMIZERS = ('sgd', 'momentum', 'nesterov', 'adagrad', 'rmsprop', 'adam', 'adamw', 'lbfgs')

def needs_value_fn(opt_config) -> bool:
  """True for 'lbfgs': its update needs `value`, `grad` and `value_fn` (the line search)."""
  return complete(opt_config, 'optimizer').name == 'lbfgs'


class _Hyper(NamedTuple):
  """The validated numbers of config.optimizer."""
  lr: float
  mu: float
  b1: float
  b2: float
  eps: float
  rms_decay: float
  wd: float
  clip: float


def _hyperparameters(cfg) -> _Hyper:
  """Reads config.optimizer's numbers and refuses the combinations that would be ignored."""
  o, name = Section(cfg, 'config.optimizer'), cfg.name
  unit_interval = dict(high=1.0, high_open=True)
  h = _Hyper(lr=o.number('learning_rate'), mu=o.number('momentum', **unit_interval),
             b1=o.number('b1', **unit_interval), b2=o.number('b2', **unit_interval),
             eps=o.number('eps', low_open=True), rms_decay=o.number('rms_decay', **unit_interval),
             wd=o.number('weight_decay'),
             clip=o.number('grad_clip_norm', valid='0 turns clipping off.'))
  if h.wd and name != 'adamw':
    raise UserError(f"config.optimizer.weight_decay={h.wd:g} is decoupled weight decay, which "
                    f"only 'adamw' applies; {name!r} would ignore it. For L2 regularisation "
                    "with any optimizer set config.l2 (added to the loss) and weight_decay=0, "
                    "or switch to name='adamw'.")
  if name == 'lbfgs' and h.clip:
    raise UserError("config.optimizer.grad_clip_norm must be 0 with 'lbfgs': its line search "
                    "needs the true gradient. Clip only with the first-order optimizers.")
  if name == 'lbfgs' and h.lr != 1.0:
    raise UserError(f"config.optimizer.learning_rate is {h.lr:g} with 'lbfgs', whose line search "
                    "chooses the step along the L-BFGS direction starting from a step of "
                    "learning_rate; anything but 1.0 only costs line-search evaluations. Set "
                    "learning_rate=1.0 (and batch_size to the train split size: full batch).")
  return h


def _base_optimizer(name: str, h: _Hyper, learning_rate, momentum=None):
  """The optax transformation named by config.optimizer.name, at these hyperparameters."""
  if name == 'sgd':
    return optax.sgd(learning_rate)
  if name in ('momentum', 'nesterov'):
    return optax.sgd(learning_rate, momentum=momentum, nesterov=name == 'nesterov')
  if name == 'adagrad':
    return optax.adagrad(learning_rate, initial_accumulator_value=0.0, eps=h.eps)
  if name == 'rmsprop':
    return optax.rmsprop(learning_rate, decay=h.rms_decay, eps=h.eps, eps_in_sqrt=False)
  if name == 'adam':
    return optax.adam(learning_rate, b1=h.b1, b2=h.b2, eps=h.eps)
  if name == 'adamw':
    return optax.adamw(learning_rate, b1=h.b1, b2=h.b2, eps=h.eps, weight_decay=h.wd,
                       mask=decay_mask)
  if name == 'lbfgs':
    return optax.lbfgs(learning_rate)
  return import_path(name, 'optimizer')(learning_rate)


def decay_mask(params):
  """True on the leaves weight decay acts on: weight matrices (ndim > 1, not named bias/scale).

  Recipe stage 4, 'regularize': CS231n and AdamW decay weights, not biases or normalisation
  scales (decaying those only limits what the network can express). The same rule as the L2
  penalty (`jrecipe.train.step.l2_penalty`), so 'adamw' and `config.l2` touch the same leaves;
  the battery's weight_decay check measures it.
  """
  from jrecipe.train.step import _decayed  # train.step imports this module
  return jax.tree_util.tree_map_with_path(_decayed, params)


def make_optimizer(opt_config, sched_config, momentum_sched_config, *, steps_per_epoch: int,
                   total_steps: int) -> optax.GradientTransformationExtraArgs:
  """The optax optimizer for the config, with its schedules injected into the state.

  CS231n 'parameter updates': Adam (3e-4) by default, SGD+Nesterov as the alternative;
  'annealing the learning rate' through `sched_config`, 'momentum annealed 0.5 -> 0.99'
  through `momentum_sched_config`. Field meanings: the module docstring.

  'lbfgs' (CS231n: 'works full-batch; rarely used at scale') is optax.lbfgs with its
  zoom line search. Use it only for full-batch problems: set batch_size to the size of the
  train split, so every step sees the same deterministic loss, and set learning_rate to 1.0.
  Its step must call `tx.update(grads, state, params, value=loss, grad=grads,
  value_fn=loss_of_params)` (see `needs_value_fn`).

  Args:
    opt_config, sched_config, momentum_sched_config: the config.optimizer, config.schedule
      and config.momentum_schedule sections (missing fields, or None for a whole section,
      take the base config's defaults).
    steps_per_epoch: optimizer steps per epoch (for durations in epochs).
    total_steps: steps in the whole run.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is an injected-hyperparameters
    state: `state.hyperparams['learning_rate']` (and `['momentum']` for 'momentum' and
    'nesterov') hold the value the NEXT update will use, so `current_learning_rate` of the
    state a step receives is the rate that step applies.
  """
  opt = complete(opt_config, 'optimizer')
  name = opt.name
  if name not in OPTIMIZERS and ':' not in name:
    raise UserError(f"Unknown optimizer {name!r} in config.optimizer.name. Valid optimizers: "
                    f"{', '.join(OPTIMIZERS)}; or your own 'package.module:factory' taking "
                    "learning_rate. CS231n: Adam is the default, SGD+Nesterov the alternative.")
  h = _hyperparameters(opt)
  run = dict(steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  sched = schedule_section(sched_config)
  lr_fn = schedule_from_section(sched, h.lr, None, 'config.schedule', **run)
  warn_about_decay(lr_fn, sched, h.lr, 'config.schedule', **run)
  schedules = {'learning_rate': lr_fn}
  mom = momentum_section(momentum_sched_config)
  if name in ('momentum', 'nesterov'):
    schedules['momentum'] = momentum_schedule(mom, h.mu, **run)
  elif mom.name != 'constant':
    raise UserError(f"config.momentum_schedule.name is {mom.name!r}, but only 'momentum' and "
                    f"'nesterov' have a momentum coefficient to schedule ({name!r} does not). "
                    "Set the momentum schedule to 'constant' or switch optimizer.")

  if 'momentum' in schedules:
    def factory(learning_rate, momentum):
      return _clipped(_base_optimizer(name, h, learning_rate, momentum), h.clip)
  else:
    def factory(learning_rate):
      return _clipped(_base_optimizer(name, h, learning_rate), h.clip)
  return _next_step_hyperparams(optax.inject_hyperparams(factory)(**schedules), schedules)


def _clipped(tx, clip: float):
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


def _next_step_hyperparams(tx, schedules: dict) -> optax.GradientTransformationExtraArgs:
  """After each update, store the hyperparameters of the NEXT update in the state.

  optax.inject_hyperparams stores the values the last update used; storing the next ones
  instead makes the state a step receives carry the rate that step applies (as at init),
  so the train step can log `current_learning_rate(state.opt_state)` without an off-by-one.
  The update itself still evaluates the schedules at the state's count.
  """

  def update(updates, state, params=None, **extra_args):
    updates, state = tx.update(updates, state, params, **extra_args)
    hyperparams = dict(state.hyperparams)
    for key, fn in schedules.items():
      hyperparams[key] = jnp.asarray(fn(state.count), hyperparams[key].dtype)
    return updates, state._replace(hyperparams=hyperparams)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def current_learning_rate(opt_state) -> jax.Array:
  """The learning rate the next update applies (the schedule at the state's step count).

  Read from the injected hyperparameters, so it works inside jit and costs nothing; the
  train step logs it (CS231n babysitting: the loss curve's shape tells the rate). Finds the
  injected state even when the optimizer is wrapped (chain, MultiSteps, ...). A plateau
  scale applied to the updates outside the optimizer is not included.
  """
  found = _find_hyperparams(opt_state)
  if found is None:
    raise ValueError("No injected hyperparameters with a 'learning_rate' in this optimizer "
                     "state: was it built by jrecipe.optim.make_optimizer?")
  return found['learning_rate']


def _find_hyperparams(state) -> Optional[dict]:
  hyperparams = getattr(state, 'hyperparams', None)
  if isinstance(hyperparams, dict) and 'learning_rate' in hyperparams:
    return hyperparams
  if isinstance(state, (tuple, list)):
    for child in state:
      found = _find_hyperparams(child)
      if found is not None:
        return found
  return None
