"""The learning-rate schedule check: Karpathy's 'don't trust learning rate decay defaults'.

Schedules written in epochs for one dataset (ImageNet: decay 10x at epoch 30) silently drive
the rate to zero, or never decay at all, on another. The check evaluates the configured
schedule over the whole run, step by step, and plots it against epochs.
"""

from typing import Callable, Optional, Sequence

import numpy as np

from jrecipe.checks.base import CheckResult, artifact_path, verdict
from jrecipe.checks.registry import register_check

EARLY_FRACTION = 0.10  # FAIL: below FAIL_RATIO * peak within the first 10% of the run
FAIL_RATIO = 1e-3
HALF_FRACTION = 0.50  # WARN: below WARN_RATIO * peak within the first 50% of the run,
# FAIL: below FAIL_RATIO * peak there (half the run or more at under 1e-3 of the rate)
WARN_RATIO = 1e-2
_MAX_EVAL_STEPS = 200_000  # longer runs are sampled at this many evenly spaced steps


def schedule_values(schedule_fn: Callable, total_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(steps, learning rates) over the run: every step, or an even sample of long runs.

  Tries one vectorised call on an int array (jrecipe and optax schedules are vectorised),
  and falls back to one call per step.
  """
  total = max(int(total_steps), 1)
  if total <= _MAX_EVAL_STEPS:
    steps = np.arange(total)
  else:
    steps = np.unique(np.linspace(0, total - 1, _MAX_EVAL_STEPS).round().astype(np.int64))
  try:
    import jax.numpy as jnp
    values = np.asarray(schedule_fn(jnp.asarray(steps, jnp.int32)), np.float64)
    if values.shape != steps.shape:
      raise ValueError("not vectorised")
  except Exception:  # a schedule written for scalar steps only
    if len(steps) > 5000:
      steps = np.unique(np.linspace(0, total - 1, 5000).round().astype(np.int64))
    values = np.array([float(schedule_fn(int(s))) for s in steps], np.float64)
  return steps, values


def _plot(path: str, steps, values, *, steps_per_epoch: int, total_steps: int, peak: float,
          boundaries: Sequence[int], title: str) -> None:
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  spe = max(int(steps_per_epoch), 1)
  positive = values[values > 0]
  floor = (positive.min() if positive.size else max(peak, 1e-12)) * 0.5
  ax.plot(steps / spe, np.maximum(values, floor), color="C0", label="learning rate")
  ax.set_yscale("log")
  for frac, ratio, color in ((EARLY_FRACTION, FAIL_RATIO, "C3"), (HALF_FRACTION, WARN_RATIO, "C1")):
    ax.axvline(frac * total_steps / spe, color=color, ls=":", lw=1)
    ax.axhline(ratio * peak, color=color, ls="--", lw=1,
               label=f"{ratio:g} x peak (limit in the first {int(frac * 100)}%)")
  for b in boundaries:
    ax.axvline(b / spe, color="C2", lw=1, alpha=0.6)
  ax.set_xlabel("epoch")
  ax.set_ylabel("learning rate (log)")
  ax.set_xlim(0, max(total_steps / spe, max([b / spe for b in boundaries], default=0)))
  ax.set_title(title, fontsize=9)
  ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def lr_schedule(schedule_fn: Callable, *, total_steps: int, steps_per_epoch: int,
                peak: Optional[float] = None, boundaries_steps: Optional[Sequence[int]] = None,
                artifacts_dir: Optional[str] = None) -> CheckResult:
  """'Do not trust learning rate decay defaults' (recipe stage 3): the schedule over the run.

  Evaluates `schedule_fn` at every step of the configured run. Only the decay phase counts:
  steps from the first one at the schedule's maximum on (a warm-up starts low on purpose).

  Thresholds: FAIL when the rate is below 1e-3 x peak at any step within the first 10% of
  the run (the run is then effectively over after a tenth of it: the ImageNet default on a
  small dataset), or below it within the first 50% (half the run at a rate 1000x too small);
  WARN when it is below 1e-2 x peak within the first 50% (half the budget at
  a rate 100x too small to learn); WARN when step-decay boundaries lie at or beyond the end
  of the run (written for another dataset size: they never apply). A schedule that is zero
  or not finite everywhere fails.

  Args:
    schedule_fn: `schedule(step) -> learning rate` (e.g. `jrecipe.optim.make_schedule`).
    total_steps, steps_per_epoch: the run's length and epoch size in steps.
    peak: the reference rate (the configured base learning rate); default: the schedule's
      maximum over the run.
    boundaries_steps: optional step-decay boundaries, in steps.
    artifacts_dir: where to write `lr_schedule.png` (log y, epochs on x); None: no file.

  Returns:
    A CheckResult with value = the smallest lr / peak within the first 50% of the decay
    phase, and details with the step and epoch of every violation.
  """
  total = max(int(total_steps), 1)
  spe = max(int(steps_per_epoch), 1)
  steps, values = schedule_values(schedule_fn, total)
  boundaries = [int(b) for b in (boundaries_steps or ())]
  details = {"total_steps": total, "steps_per_epoch": spe, "epochs": total / spe,
             "first": float(values[0]), "last": float(values[-1])}
  if not np.all(np.isfinite(values)):
    bad = int(steps[np.argmax(~np.isfinite(values))])
    return verdict("lr_schedule", expected="finite", details=details)(
        "fail", f"Don't trust LR decay defaults: the learning rate is not finite at step "
        f"{bad}; likely causes: a division by zero in the schedule (decay steps 0, warm-up 0).")
  top = float(values.max())
  ref = float(peak) if peak else top
  details.update(max=top, peak=ref)
  if ref <= 0 or top <= 0:
    return verdict("lr_schedule", value=top, expected="> 0", details=details)(
        "fail", "Don't trust LR decay defaults: the learning rate is zero over the whole run; "
        "nothing will train.")
  value = decay_limits(steps, values / ref, total, details)
  status, problems = schedule_problems(details, boundaries, total, spe)
  if problems:
    message = ("Don't trust LR decay defaults: " + "; ".join(problems) + "; likely causes: "
               "a decay written in epochs/steps for another dataset or batch size, a decay "
               "rate per step instead of per epoch. Keep the rate constant and tune decay last.")
  else:
    message = (f"Don't trust LR decay defaults: the rate stays >= {value:.2g} x peak through "
               f"the first half of the {total}-step run (last step {values[-1]:.3g}).")
  expected = (f">= {WARN_RATIO:g} x peak in the first {int(HALF_FRACTION * 100)}%, "
              f">= {FAIL_RATIO:g} x peak in the first {int(EARLY_FRACTION * 100)}%")
  result = verdict("lr_schedule", value=value, expected=expected, details=details)(
      status, message)
  path = artifact_path(artifacts_dir, "lr_schedule.png")
  if path:
    _plot(path, steps, values, steps_per_epoch=spe, total_steps=total, peak=ref,
          boundaries=boundaries, title=f"learning rate schedule: {status}")
    result.artifacts.append(path)
  return result


def decay_limits(steps: np.ndarray, ratio: np.ndarray, total: int, details: dict) -> float:
  """The first decay-phase steps below each limit (into details); returns the check's value:
  the smallest lr / peak within the first half of the run (from the peak on).

  A step at exactly 10% (50%) of the run counts as within it: 'reaches ~0 within the first
  10%' must not escape on the boundary. Shared by `lr_schedule` and `effective_schedule`.
  """
  t_peak = int(steps[int(np.argmax(ratio))])
  decay = steps >= t_peak

  def first_below(fraction, limit):
    # 'Within the first 10%' includes the step at exactly 10% (a cosine to 0 at 10% fails).
    mask = decay & (steps <= fraction * total) & (ratio < limit)
    return int(steps[np.argmax(mask)]) if mask.any() else None

  early = first_below(EARLY_FRACTION, FAIL_RATIO)
  in_half = decay & (steps < max(HALF_FRACTION * total, t_peak + 1))
  value = float(ratio[in_half].min()) if in_half.any() else float(ratio[decay].min())
  details.update(peak_step=t_peak, min_ratio_first_half=value, fail_step=early,
                 fail_ratio=float(ratio[steps == early][0]) if early is not None else None,
                 warn_step=first_below(HALF_FRACTION, WARN_RATIO))
  dead = first_below(HALF_FRACTION, FAIL_RATIO)
  details.update(dead_step=dead,
                 dead_ratio=float(ratio[steps == dead][0]) if dead is not None else None)
  return value


def schedule_problems(details: dict, boundaries: list, total: int,
                      spe: int) -> tuple[str, list]:
  """(status, problems) from the measured limits and the step-decay boundaries."""
  epochs = total / spe
  early, half = details["fail_step"], details["warn_step"]
  late = [b for b in boundaries if b >= total]
  details["late_boundaries"] = late

  def at(step):
    return f"step {step} (epoch {step / spe:.2f} of {epochs:.3g})"

  problems, status = [], "pass"
  if early is not None:
    status = "fail"
    problems.append(f"the rate falls to {details['fail_ratio']:.2g} x peak by {at(early)}, "
                    f"within the first {int(EARLY_FRACTION * 100)}% of the run")
  elif details.get("dead_step") is not None:
    status = "fail"
    problems.append(f"the rate falls to {details['dead_ratio']:.2g} x peak by "
                    f"{at(details['dead_step'])}, within the first "
                    f"{int(HALF_FRACTION * 100)}% of the run: half the run or more at under "
                    f"{FAIL_RATIO:g} x its rate")
  elif half is not None:
    status = "warn"
    problems.append(f"the rate falls below {WARN_RATIO:g} x peak by {at(half)}, within the "
                    f"first {int(HALF_FRACTION * 100)}% of the run")
  if late:
    status = "warn" if status == "pass" else status
    late_ep = ", ".join(f"{b / spe:g}" for b in late)
    problems.append(f"decay boundaries at epoch {late_ep} but the run has {epochs:g} epochs "
                    "(they never apply: written for another dataset size?)")
  return status, problems


@register_check("lr_schedule", stage="schedule", needs=("effective_schedule",))
def check_lr_schedule(ctx) -> CheckResult:
  """The configured schedule over the configured run (steps and epochs of the experiment).

  Its precondition is the measured `effective_schedule`: a decay seen there explains this
  reading of the config.
  """
  from jrecipe import optim
  c, exp = ctx.config, ctx.exp
  sched_fn = optim.make_schedule(c.schedule, c.optimizer.learning_rate,
                                 steps_per_epoch=exp.steps_per_epoch,
                                 total_steps=exp.total_steps)
  boundaries = None
  if c.schedule.name == "step" and c.schedule.boundaries:
    mult = exp.steps_per_epoch if c.schedule.unit == "epochs" else 1
    boundaries = [int(round(b * mult)) for b in c.schedule.boundaries]
  return lr_schedule(sched_fn, total_steps=exp.total_steps, steps_per_epoch=exp.steps_per_epoch,
                     peak=c.optimizer.learning_rate, boundaries_steps=boundaries,
                     artifacts_dir=ctx.artifacts_dir)
