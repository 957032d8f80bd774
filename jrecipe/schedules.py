"""Learning-rate and momentum schedules from the config: CS231n's 'annealing the learning rate'.

Karpathy, stage 3, 'Don't trust learning rate decay defaults': the default schedule is
'constant'. Nothing decays unless the config says so, every duration states its unit ('steps' or
'epochs'), and epochs become steps in one place (`Section.steps`). A decay that takes the rate
to almost zero before the run ends, or a boundary the run never reaches, is logged as a warning
when the optimizer is built (`warn_about_decay`).

Each named curve is a thin adapter over optax's own schedule (`optax.piecewise_constant_schedule`,
`exponential_decay`, `cosine_decay_schedule`, `join_schedules`, `linear_schedule`) that keeps
CS231n's names and jrecipe's units; only 'inverse_time' (1/t decay, which optax lacks) is
written here. jrecipe's warm-up multiplies any curve by min(1, (step + 1) / warmup).

Sections are ml_collections ConfigDicts (or dicts, or None); a missing field takes the base
config's default (`jrecipe.sections.complete`).

`config.schedule` (sched_config), the learning-rate schedule; `base_value` is the learning rate:
  name: one of SCHEDULES:
    'constant'      base
    'step'          base * decay_factor ** (number of boundaries passed)  (CS231n step decay)
    'exponential'   base * exp(-decay_rate * t)                          (t in `unit`s)
    'inverse_time'  base / (1 + decay_rate * t)                          (CS231n 1/t decay)
    'cosine'        end + (base - end) * (1 + cos(pi * min(t / D, 1))) / 2
    'linear'        base + (end - base) * min(t / D, 1)
    'warmup_cosine' the cosine over [warmup, D] instead of [0, D]: the rate peaks at exactly
                    `base` when warm-up ends (optax.warmup_cosine_decay_schedule); needs warmup.
  unit: 'steps' or 'epochs': how warmup, boundaries, every, decay_steps and
    decay_rate's t are counted. Epochs are converted with steps_per_epoch (rounded to whole
    steps), so a boundary at epoch 30 is step 30 * steps_per_epoch.
  warmup: 0 = none; otherwise the rate is multiplied by min(1, (step + 1) / warmup_steps): the
    first step uses base / warmup_steps, the full rate is reached at step warmup_steps - 1.
    Composes with every schedule; apart from 'warmup_cosine' the schedule's own clock still
    starts at step 0, so a boundary or a decay_rate means the same with and without warm-up.
  boundaries: for 'step': strictly increasing positive times at which the rate is
    multiplied by `decay_factor`.
  every: for 'step', instead of boundaries: multiply by decay_factor every `every` units
    (CS231n: 'halve every 5 epochs' is every=5, decay_factor=0.5).
  decay_factor: the 'step' multiplier (> 0).
  decay_rate: k > 0, required by 'exponential' and 'inverse_time' (per unit of time).
  end_value (alias alpha): the final value of 'cosine', 'warmup_cosine' and 'linear' as a
    fraction of base_value.
  decay_steps: 0 = the whole run (total_steps); otherwise D, the time (in `unit`s, from step 0)
    at which 'cosine', 'warmup_cosine' and 'linear' reach their end value and stay there.

`config.momentum_schedule` (momentum_sched_config), the momentum coefficient of 'momentum' and
'nesterov', with the same machinery (CS231n: 'momentum ... annealed 0.5 -> 0.99'):
  name: 'constant' = `opt_config.momentum` for the whole run (start and end are ignored).
  start: the value at step 0, the schedule's base value.
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
from jrecipe.sections import complete

SCHEDULES = ('constant', 'step', 'exponential', 'inverse_time', 'cosine', 'warmup_cosine',
             'linear')
UNITS = ('steps', 'epochs')
_DECAY_HINT = ("Karpathy's recipe: 'Don't trust learning rate decay defaults': keep the rate "
               "constant and tune decay at the very end.")


class Section:
  """Reads and validates one config section; the one place where units become steps.

  `cfg` is complete (`jrecipe.sections.complete`): every field is read as an attribute.
  """

  def __init__(self, cfg: Any, where: str, steps_per_epoch: Optional[int] = None):
    self.cfg, self.where = cfg, where
    if steps_per_epoch is None:  # a section without durations (config.optimizer)
      return
    self.unit = cfg.unit
    if self.unit not in UNITS:
      raise UserError(f"{where}.unit is {self.unit!r}, but durations are counted in "
                      f"{' or '.join(repr(u) for u in UNITS)}; set {where}.unit to one of these.")
    self.steps_per_unit = steps_per_epoch if self.unit == 'epochs' else 1

  def number(self, key: str, *, low: float = 0.0, high: float = math.inf,
             low_open: bool = False, high_open: bool = False, valid: str = '') -> float:
    """The field `key` as a float in the given range; UserError naming it otherwise."""
    value = self.cfg[key]
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
    """A duration in this section's unit -> whole optimizer steps; UserError past what the
    int32 step counter holds (optax counts steps, and schedules divide by them, in int32)."""
    from jrecipe.validate import MAX_STEPS
    steps = int(round(units * self.steps_per_unit))
    if steps > MAX_STEPS:
      raise UserError(f"{self.where} has a duration of {units:g} {self.unit}, which is {steps} "
                      f"steps: more than the {MAX_STEPS} an int32 step counter holds. Durations "
                      "(warmup, boundaries, every, decay_steps) must fit within the run: lower "
                      "it.")
    return steps


def schedule_section(sched_config) -> Any:
  """config.schedule with every field (a dict, partial section or None completed)."""
  return complete(sched_config, 'schedule')


def momentum_section(momentum_sched_config) -> Any:
  """config.momentum_schedule with every field, including the schedule machinery's."""
  # The momentum schedule has the learning-rate schedule's machinery (warmup, boundaries, ...):
  # the fields it does not set itself take the schedule section's defaults.
  return complete(momentum_sched_config, 'schedule', 'momentum_schedule')


def make_schedule(sched_config, base_value: float, *, steps_per_epoch: int,
                  total_steps: int) -> Callable[[Any], jax.Array]:
  """Builds `schedule(step) -> value` from a schedule config (see the module docstring).

  CS231n 'annealing the learning rate' (step, exponential, 1/t decay) and Karpathy's
  'Don't trust learning rate decay defaults': 'constant' unless the config asks otherwise,
  with every duration in an explicit unit.

  Args:
    sched_config: the schedule section (fields: name, unit, warmup, boundaries, every,
      decay_factor, decay_rate, end_value/alpha, decay_steps); missing fields (a dict, or
      None) take the base config's defaults.
    base_value: the value the schedule scales (the learning rate), >= 0.
    steps_per_epoch: optimizer steps in one epoch (converts unit='epochs').
    total_steps: steps in the whole run (decay_steps=0 means this many).

  Returns:
    A pure, jit-able and vectorised function of the step count (int or int array) returning a
    float32 value of the same shape.
  """
  return schedule_from_section(schedule_section(sched_config), base_value, None, 'config.schedule',
                   steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def schedule_from_section(cfg, base_value: float, end_abs: Optional[float], where: str, *,
              steps_per_epoch: int, total_steps: int) -> Callable[[Any], jax.Array]:
  """`make_schedule` of a complete section, with an optional absolute end value (the momentum
  schedule's `end`); jrecipe's warm-up ramp multiplies the curve. Arguments: make_schedule's."""
  if int(steps_per_epoch) < 1 or int(total_steps) < 1:
    raise UserError(f"The run has steps_per_epoch={steps_per_epoch} and total_steps="
                    f"{total_steps}; both must be at least 1 (is the train split smaller than "
                    "the batch size, or num_epochs 0?).")
  if not base_value >= 0:
    raise UserError(f"The base value of {where} is {base_value}; rates must be >= 0.")
  if cfg.name not in SCHEDULES:
    raise UserError(f"Unknown schedule {cfg.name!r} in {where}.name. Valid schedules: "
                    f"{', '.join(SCHEDULES)}. {_DECAY_HINT}")
  s = Section(cfg, where, steps_per_epoch)
  warmup = s.steps(s.number('warmup', valid='0 means no warm-up.'))
  base = float(base_value)
  end = base * _end_fraction(s) if end_abs is None else float(end_abs)
  curve = _CURVES[cfg.name](s, base, end, warmup, int(total_steps))

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    value = jnp.broadcast_to(jnp.asarray(curve(t), jnp.float32), t.shape)
    if warmup:
      value = value * jnp.minimum(1.0, (t + 1.0) / warmup)
    return value.astype(jnp.float32)

  return schedule


# Each curve: (section, base, end, warm-up steps, total steps) -> f(float32 step) -> value, an
# adapter over optax's own schedule where optax has it (CS231n's names, jrecipe's units).


def _constant_curve(s: Section, base, end, warmup, total_steps):
  return optax.constant_schedule(base)


def _step_curve(s: Section, base, end, warmup, total_steps):
  """CS231n step decay: base * decay_factor ** (boundaries passed), or every N units."""
  factor = s.number('decay_factor', low_open=True)
  boundaries = s.cfg.boundaries
  boundaries = (boundaries,) if isinstance(boundaries, (int, float)) else tuple(boundaries or ())
  every = s.number('every')
  if bool(boundaries) == bool(every):
    raise UserError(f"The 'step' schedule needs exactly one of {s.where}.boundaries (increasing "
                    f"times in {s.unit}) or {s.where}.every (decay every N {s.unit}); got "
                    f"boundaries={boundaries} and every={every:g}.")
  if boundaries:
    b_steps = [s.steps(float(b)) for b in boundaries]
    if any(float(b) <= 0 for b in boundaries) or any(
        b2 <= b1 for b1, b2 in zip(b_steps, b_steps[1:])):
      raise UserError(f"{s.where}.boundaries={boundaries} ({s.unit}) must be positive and "
                      f"strictly increasing, also once converted to steps ({b_steps}).")
    return optax.piecewise_constant_schedule(base, {b: factor for b in b_steps})
  e_steps = s.steps(every)
  if e_steps < 1:
    raise UserError(f"{s.where}.every={every:g} {s.unit} is less than one step.")
  return optax.exponential_decay(base, e_steps, factor, staircase=True)


def _decay_rate(s: Section) -> float:
  return s.number('decay_rate', low_open=True,
                  valid=f"The {s.cfg.name!r} schedule needs a decay rate k > 0 per "
                        f"{s.unit[:-1]}.")


def _exponential_curve(s: Section, base, end, warmup, total_steps):
  """base * exp(-k t), t in the section's unit."""
  return optax.exponential_decay(base, s.steps_per_unit, math.exp(-_decay_rate(s)))


def _inverse_time_curve(s: Section, base, end, warmup, total_steps):
  """CS231n's 1/t decay, base / (1 + k t): optax has no such schedule."""
  k, per_unit = _decay_rate(s), s.steps_per_unit
  return lambda t: base / (1.0 + k * t / per_unit)


def _decay_window(s: Section, start: int, total_steps: int) -> int:
  """The steps from `start` to decay_steps (0: the run's end), at least 1."""
  d = s.number('decay_steps', valid='0 means the whole run.')
  d_steps = s.steps(d) if d else int(total_steps)
  if d_steps <= start:
    raise UserError(f"{s.where}.decay_steps is {d_steps} steps, which leaves no room to decay "
                    f"after the {start} warm-up steps; decay_steps counts from step 0 and "
                    "0 means the whole run.")
  return d_steps - start


def _cosine_curve(s: Section, base, end, warmup, total_steps):
  """optax.cosine_decay_schedule from base to end (absolute) over decay_steps."""
  cosine = optax.cosine_decay_schedule(base - end, _decay_window(s, 0, total_steps))
  return lambda t: end + cosine(t)


def _warmup_cosine_curve(s: Section, base, end, warmup, total_steps):
  """The cosine started when warm-up ends (as optax.warmup_cosine_decay_schedule)."""
  if not warmup:
    raise UserError(f"'warmup_cosine' needs {s.where}.warmup > 0 (it is 'cosine' started when "
                    "warm-up ends); for no warm-up use 'cosine'.")
  cosine = optax.cosine_decay_schedule(base - end, _decay_window(s, warmup, total_steps))
  return optax.join_schedules([optax.constant_schedule(base), lambda t: end + cosine(t)],
                              [warmup])


def _linear_curve(s: Section, base, end, warmup, total_steps):
  return optax.linear_schedule(base, end, _decay_window(s, 0, total_steps))


_CURVES = {'constant': _constant_curve, 'step': _step_curve, 'exponential': _exponential_curve,
           'inverse_time': _inverse_time_curve, 'cosine': _cosine_curve,
           'warmup_cosine': _warmup_cosine_curve, 'linear': _linear_curve}


def _end_fraction(s: Section) -> float:
  """end_value, or its synonym alpha (optax's cosine calls the fraction alpha)."""
  # alpha is not a base-config field: a config that prefers optax's name adds it.
  alpha, end_value = s.cfg.get('alpha'), float(s.cfg.end_value)
  if alpha is None:
    return s.number('end_value')
  if end_value not in (0.0, float(alpha)):
    raise UserError(f"{s.where}.end_value={end_value} and {s.where}.alpha={alpha} disagree; "
                    "they are the same thing (the final value as a fraction of the base): set one.")
  return s.number('alpha')


def warn_about_decay(sched_fn, cfg, base: float, where: str, *,
                      steps_per_epoch: int, total_steps: int) -> None:
  """'Don't trust LR decay defaults': say when a clock-driven decay misfits the run length."""
  if base <= 0 or cfg.name not in ('step', 'exponential', 'inverse_time'):
    return
  last = float(sched_fn(total_steps - 1))
  if last < 1e-2 * base:
    logging.warning("%s %r reaches %.3g by the last step (%d), %.2g of the base rate %.3g. %s",
                    where, cfg.name, last, total_steps - 1, last / base, base, _DECAY_HINT)
  if cfg.name == 'step' and cfg.boundaries:
    s = Section(cfg, where, steps_per_epoch)
    late = [b for b in cfg.boundaries if s.steps(float(b)) >= total_steps]
    if late:
      logging.warning("%s boundaries %s (%s) fall after the run's %d steps and never apply. %s",
                      where, late, s.unit, total_steps, _DECAY_HINT)


def momentum_schedule(cfg, opt_momentum: float, *, steps_per_epoch: int,
                       total_steps: int) -> Callable[[Any], jax.Array]:
  """The momentum coefficient per step; CS231n: 'annealed 0.5 -> 0.99'."""
  where = 'config.momentum_schedule'
  run = dict(steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  if cfg.name == 'constant':
    return schedule_from_section(schedule_section(None), opt_momentum, None, where, **run)
  s = Section(cfg, where, steps_per_epoch)
  coefficient = dict(high=1.0, high_open=True, valid='A momentum coefficient lies in [0, 1).')
  start = s.number('start', **coefficient)
  end = (s.number('end', **coefficient) if cfg.name in ('linear', 'cosine', 'warmup_cosine')
         else None)
  fn = schedule_from_section(cfg, start, end, where, **run)
  _, values = schedule_table(fn, total_steps)
  if values.max() >= 1.0:
    raise UserError(f"{where} reaches momentum {values.max():.4g} during the run; a momentum "
                    "coefficient must stay in [0, 1) (check decay_factor).")
  return fn


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
