"""Optimizers and schedules from the config: CS231n's 'parameter updates' and 'annealing the LR'.

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

Config sections (ml_collections ConfigDicts or plain dicts; a missing or None field takes the
default shown):

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
    optax.adamw). For other optimizers use L2 regularisation, `config.l2`, added to the loss.
  grad_clip_norm: 0.0 = off; otherwise gradients are clipped to this global norm before the
    optimizer sees them (not with 'lbfgs': its line search needs the true gradient).

`config.schedule` (sched_config), the learning-rate schedule; `base_value` is the learning rate:
  name: 'constant'. One of SCHEDULES:
    'constant'      base
    'step'          base * decay_factor ** (number of boundaries passed)  (CS231n step decay)
    'exponential'   base * exp(-decay_rate * t)                          (t in `unit`s)
    'inverse_time'  base / (1 + decay_rate * t)                          (CS231n 1/t decay)
    'cosine'        end + (base - end) * (1 + cos(pi * min(t / D, 1))) / 2
    'linear'        base + (end - base) * min(t / D, 1)
    'warmup_cosine' the cosine over [warmup, D] instead of [0, D]: the rate peaks at exactly
                    `base` when warm-up ends (optax.warmup_cosine_decay_schedule); needs warmup.
  unit: 'steps' (default) or 'epochs': how warmup, boundaries, every, decay_steps and
    decay_rate's t are counted. Epochs are converted with steps_per_epoch (rounded to whole
    steps), so a boundary at epoch 30 is step 30 * steps_per_epoch.
  warmup: 0 = none; otherwise the rate is multiplied by min(1, (step + 1) / warmup_steps): the
    first step uses base / warmup_steps, the full rate is reached at step warmup_steps - 1.
    Composes with every schedule; apart from 'warmup_cosine' the schedule's own clock still
    starts at step 0, so a boundary or a decay_rate means the same with and without warm-up.
  boundaries: (), for 'step': strictly increasing positive times at which the rate is
    multiplied by `decay_factor`.
  every: 0, for 'step', instead of boundaries: multiply by decay_factor every `every` units
    (CS231n: 'halve every 5 epochs' is every=5, decay_factor=0.5).
  decay_factor: 0.1, the 'step' multiplier (> 0).
  decay_rate: k > 0, required by 'exponential' and 'inverse_time' (per unit of time).
  end_value (alias alpha): 0.0, the final value of 'cosine', 'warmup_cosine' and 'linear' as a
    fraction of base_value.
  decay_steps: 0 = the whole run (total_steps); otherwise D, the time (in `unit`s, from step 0)
    at which 'cosine', 'warmup_cosine' and 'linear' reach their end value and stay there.

`config.momentum_schedule` (momentum_sched_config), the momentum coefficient of 'momentum' and
'nesterov', with the same machinery (CS231n: 'momentum ... annealed 0.5 -> 0.99'):
  name: 'constant' = `opt_config.momentum` for the whole run (start and end are ignored).
  start: the value at step 0 (default opt_config.momentum), the schedule's base value.
  end: for 'linear' and 'cosine', the final value (absolute, not a fraction), e.g.
    {'name': 'linear', 'start': 0.5, 'end': 0.99, 'unit': 'epochs', 'decay_steps': 10}.
  unit, decay_steps, warmup, boundaries, every, decay_factor, decay_rate: as in the schedule.
  Every value the schedule takes must lie in [0, 1).
"""

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jrecipe.errors import UserError
from jrecipe.registry import import_path

OPTIMIZERS = ('sgd', 'momentum', 'nesterov', 'adagrad', 'rmsprop', 'adam', 'adamw', 'lbfgs')
SCHEDULES = ('constant', 'step', 'exponential', 'inverse_time', 'cosine', 'warmup_cosine',
             'linear')
UNITS = ('steps', 'epochs')
_DECAY_HINT = ("Karpathy's recipe: 'Don't trust learning rate decay defaults': keep the rate "
               "constant and tune decay at the very end.")


def _get(cfg: Any, key: str, default: Any) -> Any:
  """A field of a ConfigDict or dict; missing or None means the default."""
  if cfg is None:
    return default
  value = cfg.get(key, default)
  return default if value is None else value


class _Section:
  """Reads and validates one config section; the one place where units become steps."""

  def __init__(self, cfg: Any, where: str, steps_per_epoch: Optional[int] = None):
    self.cfg, self.where = cfg, where
    if steps_per_epoch is None:  # a section without durations (config.optimizer)
      return
    self.unit = _get(cfg, 'unit', 'steps')
    if self.unit not in UNITS:
      raise UserError(f"{where}.unit is {self.unit!r}, but durations are counted in "
                      f"{' or '.join(repr(u) for u in UNITS)}; set {where}.unit to one of these.")
    self.steps_per_unit = steps_per_epoch if self.unit == 'epochs' else 1

  def number(self, key: str, default: float, *, low: float = 0.0, high: float = math.inf,
             low_open: bool = False, high_open: bool = False, valid: str = '') -> float:
    value = _get(self.cfg, key, default)
    try:
      value = float(value)
    except (TypeError, ValueError):
      raise UserError(f"{self.where}.{key} is {value!r}, which is not a number.") from None
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or math.isnan(value):
      lo = f"{'(' if low_open else '['}{low:g}"
      hi = f"{high:g}{')' if high_open else ']'}" if high < math.inf else 'inf)'
      raise UserError(f"{self.where}.{key} is {value:g}, outside the valid range {lo}, {hi}. "
                      f"{valid}".strip())
    return value

  def steps(self, units: float) -> int:
    """A duration in this section's unit -> whole optimizer steps."""
    return int(round(units * self.steps_per_unit))


def make_schedule(sched_config, base_value: float, *, steps_per_epoch: int,
                  total_steps: int) -> Callable[[Any], jax.Array]:
  """Builds `schedule(step) -> value` from a schedule config (see the module docstring).

  CS231n 'annealing the learning rate' (step, exponential, 1/t decay) and Karpathy's
  'Don't trust learning rate decay defaults': 'constant' unless the config asks otherwise,
  with every duration in an explicit unit.

  Args:
    sched_config: the schedule section (fields: name, unit, warmup, boundaries, every,
      decay_factor, decay_rate, end_value/alpha, decay_steps).
    base_value: the value the schedule scales (the learning rate), >= 0.
    steps_per_epoch: optimizer steps in one epoch (converts unit='epochs').
    total_steps: steps in the whole run (decay_steps=0 means this many).

  Returns:
    A pure, jit-able and vectorised function of the step count (int or int array) returning a
    float32 value of the same shape.
  """
  return _schedule(sched_config, base_value, None, 'config.schedule',
                   steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def _schedule(cfg, base_value: float, end_abs: Optional[float], where: str, *,
              steps_per_epoch: int, total_steps: int) -> Callable[[Any], jax.Array]:
  """make_schedule with an optional absolute end value (the momentum schedule's `end`)."""
  if int(steps_per_epoch) < 1 or int(total_steps) < 1:
    raise UserError(f"The run has steps_per_epoch={steps_per_epoch} and total_steps="
                    f"{total_steps}; both must be at least 1 (is the train split smaller than "
                    "the batch size, or num_epochs 0?).")
  if not base_value >= 0:
    raise UserError(f"The base value of {where} is {base_value}; rates must be >= 0.")
  name = _get(cfg, 'name', 'constant')
  if name not in SCHEDULES:
    raise UserError(f"Unknown schedule {name!r} in {where}.name. Valid schedules: "
                    f"{', '.join(SCHEDULES)}. {_DECAY_HINT}")
  s = _Section(cfg, where, steps_per_epoch)
  warmup = s.steps(s.number('warmup', 0, valid='0 means no warm-up.'))
  base = float(base_value)
  end = base * _end_fraction(s) if end_abs is None else float(end_abs)
  curve = lambda t: jnp.full_like(t, base)  # 'constant'; curves take and return float32 steps

  if name == 'step':
    factor = s.number('decay_factor', 0.1, low_open=True)
    boundaries = _get(cfg, 'boundaries', ())
    boundaries = (boundaries,) if isinstance(boundaries, (int, float)) else tuple(boundaries)
    every = s.number('every', 0)
    if bool(boundaries) == bool(every):
      raise UserError(f"The 'step' schedule needs exactly one of {where}.boundaries (increasing "
                      f"times in {s.unit}) or {where}.every (decay every N {s.unit}); got "
                      f"boundaries={boundaries} and every={every:g}.")
    if boundaries:
      b_steps = [s.steps(float(b)) for b in boundaries]
      if any(float(b) <= 0 for b in boundaries) or any(
          b2 <= b1 for b1, b2 in zip(b_steps, b_steps[1:])):
        raise UserError(f"{where}.boundaries={boundaries} ({s.unit}) must be positive and "
                        f"strictly increasing, also once converted to steps ({b_steps}).")
      b_arr = jnp.asarray(b_steps, jnp.float32)
      passed = lambda t: jnp.sum(t[..., None] >= b_arr, axis=-1).astype(jnp.float32)
    else:
      e_steps = s.steps(every)
      if e_steps < 1:
        raise UserError(f"{where}.every={every:g} {s.unit} is less than one step.")
      passed = lambda t: jnp.floor(t / e_steps)
    curve = lambda t: base * factor ** passed(t)
  elif name in ('exponential', 'inverse_time'):
    k = s.number('decay_rate', 0.0, low_open=True,
                 valid=f"The {name!r} schedule needs a decay rate k > 0 per {s.unit[:-1]}.")
    per_unit = s.steps_per_unit
    if name == 'exponential':
      curve = lambda t: base * jnp.exp(-k * t / per_unit)
    else:
      curve = lambda t: base / (1.0 + k * t / per_unit)
  elif name in ('cosine', 'warmup_cosine', 'linear'):
    d = s.number('decay_steps', 0, valid='0 means the whole run.')
    d_steps = s.steps(d) if d else int(total_steps)
    start = warmup if name == 'warmup_cosine' else 0
    if name == 'warmup_cosine' and not warmup:
      raise UserError(f"'warmup_cosine' needs {where}.warmup > 0 (it is 'cosine' started when "
                      "warm-up ends); for no warm-up use 'cosine'.")
    if d_steps <= start:
      raise UserError(f"{where}.decay_steps is {d_steps} steps, which leaves no room to decay "
                      f"after the {start} warm-up steps; decay_steps counts from step 0 and "
                      "0 means the whole run.")
    length = d_steps - start
    if name == 'linear':
      shape = lambda p: 1.0 - p
    else:
      shape = lambda p: 0.5 * (1.0 + jnp.cos(jnp.pi * p))
    curve = lambda t: end + (base - end) * shape(jnp.clip((t - start) / length, 0.0, 1.0))

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    value = curve(t)
    if warmup:
      value = value * jnp.minimum(1.0, (t + 1.0) / warmup)
    return value.astype(jnp.float32)

  return schedule


def _end_fraction(s: _Section) -> float:
  """end_value and alpha are synonyms (optax's cosine calls the fraction alpha)."""
  end_value, alpha = _get(s.cfg, 'end_value', None), _get(s.cfg, 'alpha', None)
  if end_value is not None and alpha is not None and float(end_value) != float(alpha):
    raise UserError(f"{s.where}.end_value={end_value} and {s.where}.alpha={alpha} disagree; "
                    "they are the same thing (the final value as a fraction of the base): set one.")
  key = 'alpha' if end_value is None and alpha is not None else 'end_value'
  return s.number(key, 0.0)


def _warn_about_decay(sched_fn, sched_config, base: float, where: str, *,
                      steps_per_epoch: int, total_steps: int) -> None:
  """'Don't trust LR decay defaults': say when a clock-driven decay misfits the run length."""
  name = _get(sched_config, 'name', 'constant')
  if base <= 0 or name not in ('step', 'exponential', 'inverse_time'):
    return
  last = float(sched_fn(total_steps - 1))
  if last < 1e-2 * base:
    logging.warning("%s %r reaches %.3g by the last step (%d), %.2g of the base rate %.3g. %s",
                    where, name, last, total_steps - 1, last / base, base, _DECAY_HINT)
  if name == 'step' and _get(sched_config, 'boundaries', ()):
    s = _Section(sched_config, where, steps_per_epoch)
    late = [b for b in _get(sched_config, 'boundaries', ()) if s.steps(float(b)) >= total_steps]
    if late:
      logging.warning("%s boundaries %s (%s) fall after the run's %d steps and never apply. %s",
                      where, late, s.unit, total_steps, _DECAY_HINT)


def needs_value_fn(opt_config) -> bool:
  """True for 'lbfgs': its update needs `value`, `grad` and `value_fn` (the line search)."""
  return _get(opt_config, 'name', 'adam') == 'lbfgs'


def make_optimizer(opt_config, sched_config, momentum_sched_config, *, steps_per_epoch: int,
                   total_steps: int) -> optax.GradientTransformationExtraArgs:
  """The optax optimizer for the config, with its schedules injected into the state.

  CS231n 'parameter updates': Adam (3e-4) by default, SGD+Nesterov as the alternative;
  'annealing the learning rate' through `sched_config`, 'momentum annealed 0.5 -> 0.99'
  through `momentum_sched_config`. Field meanings and defaults: the module docstring.

  'lbfgs' (CS231n: 'works full-batch; rarely used at scale') is optax.lbfgs with its
  zoom line search. Use it only for full-batch problems: set batch_size to the size of the
  train split, so every step sees the same deterministic loss, and set learning_rate to 1.0.
  Its step must call `tx.update(grads, state, params, value=loss, grad=grads,
  value_fn=loss_of_params)` (see `needs_value_fn`).

  Args:
    opt_config, sched_config, momentum_sched_config: the config.optimizer, config.schedule
      and config.momentum_schedule sections (None = all defaults).
    steps_per_epoch: optimizer steps per epoch (for durations in epochs).
    total_steps: steps in the whole run.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is an injected-hyperparameters
    state: `state.hyperparams['learning_rate']` (and `['momentum']` for 'momentum' and
    'nesterov') hold the value the NEXT update will use, so `current_learning_rate` of the
    state a step receives is the rate that step applies.
  """
  o = _Section(opt_config, 'config.optimizer')
  name = _get(opt_config, 'name', 'adam')
  if name not in OPTIMIZERS and ':' not in name:
    raise UserError(f"Unknown optimizer {name!r} in config.optimizer.name. Valid optimizers: "
                    f"{', '.join(OPTIMIZERS)}; or your own 'package.module:factory' taking "
                    "learning_rate. CS231n: Adam is the default, SGD+Nesterov the alternative.")
  lr = o.number('learning_rate', 3e-4)
  unit_interval = dict(high=1.0, high_open=True)
  mu = o.number('momentum', 0.9, **unit_interval)
  b1 = o.number('b1', 0.9, **unit_interval)
  b2 = o.number('b2', 0.999, **unit_interval)
  eps = o.number('eps', 1e-8, low_open=True)
  rms_decay = o.number('rms_decay', 0.9, **unit_interval)
  wd = o.number('weight_decay', 0.0)
  clip = o.number('grad_clip_norm', 0.0, valid='0 turns clipping off.')
  if wd and name != 'adamw':
    raise UserError(f"config.optimizer.weight_decay={wd:g} is decoupled weight decay, which "
                    f"only 'adamw' applies; {name!r} would ignore it. For L2 regularisation "
                    "with any optimizer set config.l2 (added to the loss) and weight_decay=0, "
                    "or switch to name='adamw'.")
  if name == 'lbfgs':
    if clip:
      raise UserError("config.optimizer.grad_clip_norm must be 0 with 'lbfgs': its line search "
                      "needs the true gradient. Clip only with the first-order optimizers.")
    if lr != 1.0:
      raise UserError(f"config.optimizer.learning_rate is {lr:g} with 'lbfgs', whose line search "
                      "chooses the step along the L-BFGS direction starting from a step of "
                      "learning_rate; anything but 1.0 only costs line-search evaluations. Set "
                      "learning_rate=1.0 (and batch_size to the train split size: full batch).")

  lr_fn = _schedule(sched_config, lr, None, 'config.schedule',
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  _warn_about_decay(lr_fn, sched_config, lr, 'config.schedule',
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  schedules = {'learning_rate': lr_fn}
  if name in ('momentum', 'nesterov'):
    schedules['momentum'] = _momentum_schedule(momentum_sched_config, mu,
                                               steps_per_epoch=steps_per_epoch,
                                               total_steps=total_steps)
  elif _get(momentum_sched_config, 'name', 'constant') != 'constant':
    raise UserError(f"config.momentum_schedule.name is "
                    f"{_get(momentum_sched_config, 'name', '')!r}, but only 'momentum' and "
                    f"'nesterov' have a momentum coefficient to schedule ({name!r} does not). "
                    "Set the momentum schedule to 'constant' or switch optimizer.")

  def base(learning_rate, momentum=None):
    if name == 'sgd':
      return optax.sgd(learning_rate)
    if name in ('momentum', 'nesterov'):
      return optax.sgd(learning_rate, momentum=momentum, nesterov=name == 'nesterov')
    if name == 'adagrad':
      return optax.adagrad(learning_rate, initial_accumulator_value=0.0, eps=eps)
    if name == 'rmsprop':
      return optax.rmsprop(learning_rate, decay=rms_decay, eps=eps, eps_in_sqrt=False)
    if name == 'adam':
      return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    if name == 'adamw':
      return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    if name == 'lbfgs':
      return optax.lbfgs(learning_rate)
    return import_path(name, 'optimizer')(learning_rate)

  if 'momentum' in schedules:
    def factory(learning_rate, momentum):
      return _clipped(base(learning_rate, momentum), clip)
  else:
    def factory(learning_rate):
      return _clipped(base(learning_rate), clip)
  return _next_step_hyperparams(optax.inject_hyperparams(factory)(**schedules), schedules)


def _clipped(tx, clip: float):
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


def _momentum_schedule(cfg, opt_momentum: float, *, steps_per_epoch: int,
                       total_steps: int) -> Callable[[Any], jax.Array]:
  """The momentum coefficient per step; CS231n: 'annealed 0.5 -> 0.99'."""
  where = 'config.momentum_schedule'
  name = _get(cfg, 'name', 'constant')
  if name == 'constant':
    return _schedule(None, opt_momentum, None, where, steps_per_epoch=steps_per_epoch,
                     total_steps=total_steps)
  s = _Section(cfg, where, steps_per_epoch)
  coefficient = dict(high=1.0, high_open=True, valid='A momentum coefficient lies in [0, 1).')
  start = s.number('start', opt_momentum, **coefficient)
  end = s.number('end', start, **coefficient) if name in ('linear', 'cosine', 'warmup_cosine') else None
  fn = _schedule(cfg, start, end, where, steps_per_epoch=steps_per_epoch,
                 total_steps=total_steps)
  _, values = schedule_table(fn, total_steps)
  if values.max() >= 1.0:
    raise UserError(f"{where} reaches momentum {values.max():.4g} during the run; a momentum "
                    "coefficient must stay in [0, 1) (check decay_factor).")
  return fn


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


def schedule_table(sched_fn, total_steps: int, n: int = 200):
  """Samples a schedule for plotting: (steps, values) numpy arrays of about n points.

  For the report and the check battery, which plot the learning rate (CS231n babysitting:
  read the loss curve against the rate; 'Don't trust learning rate decay defaults': see the
  whole schedule before the run). The steps are evenly spaced over [0, total_steps - 1],
  both ends included; `sched_fn` may be vectorised (as make_schedule's are) or not.
  """
  steps = np.unique(np.linspace(0, max(int(total_steps) - 1, 0), max(int(n), 2)).round())
  steps = steps.astype(np.int32)
  try:
    values = np.asarray(sched_fn(jnp.asarray(steps)))
  except Exception:  # a schedule written for one step at a time; errors recur in the loop
    values = None
  if values is None or values.shape != steps.shape:
    values = np.array([float(sched_fn(int(s))) for s in steps])
  return steps, values.astype(np.float64)
