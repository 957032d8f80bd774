"""The optimizer measured, not read from the config: its effective step size and its decay.

  effective_schedule  "don't trust learning rate decay defaults": the run's real optimizer
                      (schedule, warm-up, a decay inside a user's optimizer included) applied
                      to a fixed probe gradient over every step of the run
  weight_decay        'regularize: weight decay': the run's real optimizer with a zero
                      gradient over the run: the decay's sign, its total size, its leaves

Both probe a miniature of the model's parameter tree (the same names and ranks, one element
per leaf), so masks by name or rank act as they do on the model, and cost one `lax.scan` of
the run's length (at most PROBE_MAX_STEPS steps) on a few numbers.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jrecipe.checks.base import CheckResult, artifact_path, verdict
from jrecipe.checks.registry import register_check
from jrecipe.checks.schedule import (EARLY_FRACTION, FAIL_RATIO, HALF_FRACTION, WARN_RATIO, _plot,
                                     decay_limits, schedule_problems)
from jrecipe.train.step import _decayed

PROBE_MAX_STEPS = 200_000  # longer runs are probed over their first PROBE_MAX_STEPS steps
WARMUP_FAIL_FRACTION = 0.80  # the step size first reaches 90% of its peak after this fraction
WARMUP_WARN_FRACTION = 0.50
DECAY_FAIL_FACTOR = 1e-6  # weight_decay: decay alone leaves less than this of the weights...
DECAY_WARN_FACTOR = 1e-3  # ...(fail) or than this (warn) by the end of the run
_EXACT = 1e-6  # relative change that counts as 'touched'


def miniature(params, value=None):
  """The parameter tree with one element per leaf (same names and ranks).

  Each element is `value`, or the leaf's root-mean-square (1 for a leaf that is all zero:
  a zero bias shows no decay).
  """
  def one(a):
    a = jnp.asarray(a)
    rms = float(jnp.sqrt(jnp.mean(jnp.square(a.astype(jnp.float32))))) if a.size else 0.0
    v = value if value is not None else (rms if rms > 0 else 1.0)
    return jnp.full((1,) * a.ndim, v, jnp.float32)
  return jax.tree.map(one, params)


def probe(tx: optax.GradientTransformation, params, steps: int, *, grad: float,
          move: bool) -> tuple[np.ndarray, dict, list]:
  """`steps` updates of `tx` on `params` with every gradient element equal to `grad`.

  Returns:
    (global RMS of each step's update [steps], the parameters at the end, each leaf's
    summed update over the run [one float per leaf, tree-leaf order]). With move=False the
    parameters stay at their initial values (the step size of a constant gradient, without
    weight decay acting on a moving parameter).
  """
  g = jax.tree.map(lambda p: jnp.full_like(p, grad), params)

  @jax.jit
  def run(p0):
    def body(carry, _):
      p, s, total = carry
      u, s = tx.update(g, s, p)
      rms = jnp.sqrt(jnp.mean(jnp.concatenate([jnp.ravel(x) ** 2 for x in jax.tree.leaves(u)])))
      total = [t + jnp.sum(x) for t, x in zip(total, jax.tree.leaves(u))]
      return ((optax.apply_updates(p, u) if move else p), s, total), rms
    zeros = [jnp.zeros((), jnp.float32) for _ in jax.tree.leaves(p0)]
    (p, _, total), rms = jax.lax.scan(body, (p0, tx.init(p0), zeros), None, length=steps)
    return rms, p, total

  rms, end, total = run(params)
  return (np.asarray(rms, np.float64), jax.device_get(end),
          [float(t) for t in jax.device_get(total)])


def leaf_problems(params, totals: list, *, frozen_ok: bool, details: dict) -> list[str]:
  """Leaves the probe gradient (+1 everywhere) never moves, or moves uphill.

  A descent step opposes the gradient, so every leaf's summed update must be negative.
  TrainCheck's silent 'optimizer does not update some parameters' (a mask, multi_transform
  or set_to_zero on the wrong leaves) shows as a leaf whose updates are exactly zero; a
  missing minus sign (`optax.scale(lr)`) as positive ones. Leaves frozen on purpose
  (`config.init_from_freeze`) are allowed when `frozen_ok`.
  """
  names = [n for n, _ in _leaf_names(params)]
  frozen = [n for n, t in zip(names, totals) if t == 0.0]
  uphill = [n for n, t in zip(names, totals) if t > 0.0]
  details.update(frozen_leaves=frozen, uphill_leaves=uphill)
  problems = []
  if uphill:
    problems.append(f"the update points UP the gradient on {len(uphill)} of {len(names)} "
                    f"leaves ({', '.join(uphill[:3])}): gradient ascent, a missing minus sign "
                    "(optax.scale(learning_rate) where -learning_rate belongs?)")
  if frozen and not frozen_ok and len(frozen) < len(names):
    problems.append(f"{len(frozen)} of {len(names)} leaves are never updated "
                    f"({', '.join(frozen[:3])}): their gradients are dropped (a mask, "
                    "multi_transform or set_to_zero on the wrong leaves?)")
  return problems


def effective_schedule(tx: optax.GradientTransformation, params, *, total_steps: int,
                       steps_per_epoch: int, artifacts_dir: Optional[str] = None,
                       frozen_ok: bool = False) -> CheckResult:
  """'Don't trust learning rate decay defaults' (recipe stage 3), measured on the optimizer.

  Applies the run's real optimizer to a constant probe gradient (every element 1) at every
  step of the run and measures the size of each update (global RMS): the learning rate as
  the parameters feel it, whatever computes it (config.schedule, warm-up, a schedule
  inside a user's optimizer, Adagrad's own 1/sqrt(t), momentum's ramp).

  Thresholds (the decay phase: from the step of the largest update on): FAIL when the step
  size is below 1e-3 x its peak at any step up to and including 10% of the run (the run is
  over after a tenth of it) or up to 50%; WARN when below 1e-2 x peak up to 50%. Warm-up: FAIL when the
  step size first reaches 90% of its peak after 80% of the run (a linear warm-up as long as
  the run gets there at 90%: it never trains at its rate), WARN after 50% (momentum's own
  ramp takes about 22 steps at mu = 0.9). A zero or non-finite step fails, and so does a
  leaf whose updates are all zero (unless `frozen_ok`: `config.init_from_freeze`) or point
  up the gradient (`leaf_problems`).

  Returns:
    value = the smallest step / peak in the first half of the decay phase; details with
    the measured first, peak and last step sizes, the warm-up fraction and the violations.
  """
  total = max(int(total_steps), 1)
  spe = max(int(steps_per_epoch), 1)
  n = min(total, PROBE_MAX_STEPS)
  rms, _, totals = probe(tx, miniature(params, 0.0), n, grad=1.0, move=False)
  steps = np.arange(n)
  details = {"total_steps": total, "probed_steps": n, "steps_per_epoch": spe,
             "first_update": float(rms[0]), "last_update": float(rms[-1])}
  make = lambda value, expected: verdict("effective_schedule", value=value, expected=expected,
                                         details=details)
  step = "Measured step size (the real optimizer on a constant probe gradient)"
  if not np.all(np.isfinite(rms)) or float(rms.max()) <= 0:
    bad = int(np.argmax(~np.isfinite(rms))) if not np.all(np.isfinite(rms)) else None
    return make(None, "finite, > 0")("fail", f"{step}: the update is "
                                     + (f"not finite at step {bad}" if bad is not None else
                                        "zero over the whole run") + ": nothing will train.")
  peak = float(rms.max())
  details.update(peak_update=peak, peak_update_step=int(np.argmax(rms)))
  value = decay_limits(steps, rms / peak, total, details)
  status, problems = schedule_problems(details, [], total, spe)
  leaves = leaf_problems(params, totals, frozen_ok=frozen_ok, details=details)
  status, problems = ("fail" if leaves else status), leaves + problems
  warm = int(np.argmax(rms >= 0.9 * peak))
  details.update(warmup_steps=warm, warmup_fraction=warm / total)
  if warm > WARMUP_FAIL_FRACTION * total:
    status = "fail"
    problems.append(f"the step size first reaches 90% of its peak at step {warm} of {total}: "
                    "a warm-up as long as the run (it never trains at its rate)")
  elif warm > WARMUP_WARN_FRACTION * total:
    status = "warn" if status == "pass" else status
    problems.append(f"the warm-up takes {warm / total:.0%} of the run (step {warm})")
  head = (f"{step}: {rms[0]:.3g} at step 0, peak {peak:.3g} at step {details['peak_update_step']}"
          f", {rms[-1]:.3g} at the last step")
  expected = (f">= {WARN_RATIO:g} x peak to {int(HALF_FRACTION * 100)}%, >= {FAIL_RATIO:g} x "
              f"peak to {int(EARLY_FRACTION * 100)}%")
  message = head + (": " + "; ".join(problems) + "; likely causes: a decay or warm-up written "
                    "for another run length, a per-step rate used per epoch, a schedule inside "
                    "your optimizer." if problems else "; no early decay, no long warm-up.")
  result = make(value, expected)(status, message)
  path = artifact_path(artifacts_dir, "effective_schedule.png")
  if path:
    _plot(path, steps, rms, steps_per_epoch=spe, total_steps=total, peak=peak, boundaries=[],
          title=f"measured update size: {status}")
    result.artifacts.append(path)
  return result


def _leaf_names(tree) -> list[tuple[str, bool]]:
  """[(path, decayable)] per leaf: decayable = a weight matrix (jrecipe's L2 rule)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path), bool(_decayed(path, leaf))) for path, leaf in flat]


def weight_decay(tx: optax.GradientTransformation, params, *, total_steps: int) -> CheckResult:
  """'Regularize: weight decay' (recipe stage 4): the optimizer's own decay, measured.

  Runs the real optimizer with a zero gradient over the run (at most PROBE_MAX_STEPS
  steps) on a miniature of the parameters holding each leaf's RMS: whatever moves is decay,
  and the end value over the start value is the factor decay alone applies to each leaf.

  Fail when a leaf grows (a decay of the wrong sign), when biases or normalisation scales
  are decayed (1-D leaves and leaves named bias/scale: decaying them only limits what the
  network can express; AdamW and CS231n decay weight matrices), or when decay alone leaves
  less than 1e-6 of a weight matrix by the end of the run (a strength ~1000x too large);
  warn below 1e-3. Pass without decay (L2 through config.l2 is the regularisation check's).

  Returns:
    value = the smallest factor over the weight matrices; details per leaf.
  """
  n = min(max(int(total_steps), 1), PROBE_MAX_STEPS)
  start = miniature(params)
  _, end, _ = probe(tx, start, n, grad=0.0, move=True)
  s0 = [float(np.ravel(a)[0]) for a in jax.tree.leaves(start)]
  s1 = [float(np.ravel(a)[0]) for a in jax.tree.leaves(end)]
  names = _leaf_names(params)
  factors = {name: (b / a if a else 1.0) for (name, _), a, b in zip(names, s0, s1)}
  grows = [k for k, f in factors.items() if not f <= 1 + _EXACT]
  fixed = [k for (k, dec) in names if not dec and factors[k] < 1 - _EXACT]
  kernels = [factors[k] for k, dec in names if dec]
  low = min(kernels) if kernels else 1.0
  details = {"factor_per_leaf": factors, "probed_steps": n, "decayed_leaves":
             [k for k, f in factors.items() if f < 1 - _EXACT]}
  result = verdict("weight_decay", value=low,
                   expected=f"<= 1 on weight matrices only, >= {DECAY_WARN_FACTOR:g}",
                   details=details)
  step = f"Weight decay (the optimizer with a zero gradient over {n} steps)"
  if grows:
    return result("fail", f"{step}: the weights GROW ({', '.join(grows[:4])}: x"
                  f"{factors[grows[0]]:.4g}): a negative decay or a flipped sign.")
  if fixed:
    return result("fail", f"{step}: biases or normalisation scales are decayed "
                  f"({', '.join(fixed[:4])}: x{factors[fixed[0]]:.3g} over the run); decay "
                  "the weight matrices only (an optax mask such as ndim > 1).")
  if low < DECAY_FAIL_FACTOR:
    return result("fail", f"{step}: decay alone leaves x{low:.2g} of the weights by the end: "
                  "a strength ~1000x too large (or applied per example / per epoch?).")
  if low < DECAY_WARN_FACTOR:
    return result("warn", f"{step}: decay alone leaves x{low:.2g} of the weights by the end: "
                  "a very strong decay; the gradients must hold the weights up.")
  if not details["decayed_leaves"]:
    return result("pass", f"{step}: the optimizer decays nothing (L2 through config.l2 is "
                  "checked by regularization_increases_loss).")
  return result("pass", f"{step}: {len(details['decayed_leaves'])} weight matrices shrink to "
                f"x{low:.3g} at most over the run, biases and scales untouched.")


def _real_tx(ctx):
  """The run's real optimizer (schedule included), or None for a line search."""
  if ctx.exp is None:
    return ctx.tx
  from jrecipe import optim
  if optim.needs_value_fn(ctx.config.optimizer):
    return None
  return ctx.exp.optimizer()


def _skip_line_search(name: str) -> CheckResult:
  return verdict(name)("skip", "L-BFGS: its line search chooses each step from the loss, so a "
                       "probe gradient measures nothing.")


def _run_length(ctx) -> tuple[int, int]:
  if ctx.exp is None:
    return ctx.steps, ctx.steps
  return ctx.exp.total_steps, ctx.exp.steps_per_epoch


@register_check("effective_schedule", stage="schedule")
def check_effective_schedule(ctx) -> CheckResult:
  """The Experiment's optimizer (exp.optimizer(): the schedule inside) over the whole run."""
  tx = _real_tx(ctx)
  if tx is None:
    return _skip_line_search("effective_schedule")
  total, spe = _run_length(ctx)
  return effective_schedule(tx, ctx.variables["params"], total_steps=total,
                            steps_per_epoch=spe, artifacts_dir=ctx.artifacts_dir,
                            frozen_ok=bool(ctx.config.get("init_from_freeze", False)))


@register_check("weight_decay", stage="regularize")
def check_weight_decay(ctx) -> CheckResult:
  """The Experiment's optimizer with a zero gradient over the whole run."""
  tx = _real_tx(ctx)
  if tx is None:
    return _skip_line_search("weight_decay")
  total, _ = _run_length(ctx)
  return weight_decay(tx, ctx.variables["params"], total_steps=total)
