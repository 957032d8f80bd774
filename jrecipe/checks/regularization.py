"""CS231n's regularisation sanity check: 'increasing the regularization strength should
increase the loss' (recipe stage 4, 'regularize': the penalty must reach the gradient)."""

from typing import Optional

from jrecipe.checks.base import CheckResult, verdict
from jrecipe.checks.fitting import evaluate, fit, fit_metrics
from jrecipe.checks.registry import register_check
from jrecipe.train.step import l2_penalty
from jrecipe.types import Loss, Model


def regularization_increases_loss(model: Model, loss: Loss, variables: dict, x, y, *,
                                  strengths=(0.0, 1e-3, 1e-1, 1e1), tx=None, steps: int = 0,
                                  rng=0, train_strength: Optional[float] = None,
                                  batch_size: Optional[int] = None) -> CheckResult:
  """CS231n 'increasing the regularization strength should increase the loss'.

  At init: the total loss (data loss + strength * `l2_penalty`, the penalty the train step
  adds) must increase strictly with the strength. That is a deterministic function of the
  weights, so it only catches a penalty that sees no weights or has the wrong sign; to make
  it meaningful, with `tx` and `steps > 0` the model is also trained `steps` steps with the
  penalty at `train_strength` and without it (same init, batches and optimizer), and the
  trained data loss with the penalty must be higher than without: the penalty must reach
  the gradient and pull against the data.

  Args:
    model, loss, variables, x, y: the model at init and a batch.
    strengths: increasing L2 strengths (0 first is the data loss alone).
    tx, steps, rng, batch_size: the short training run (skipped when tx is None or
      steps == 0).
    train_strength: the strength of the trained comparison (default max(strengths)).

  Returns:
    fail when the total loss is not strictly increasing, or the trained data loss with the
    penalty is not higher than without; warn when the penalty is 0 at init (no kernels); pass.
  """
  name = "regularization_increases_loss"
  strengths = tuple(float(s) for s in strengths)
  ev = evaluate(model, loss, variables, x, y)
  penalty = float(l2_penalty(variables["params"]))
  totals = [ev["loss"] + s * penalty for s in strengths]
  details = {"strengths": list(strengths), "total_loss_at_init": totals, "penalty": penalty,
             "data_loss_at_init": ev["loss"]}
  expected = "strictly increasing with the strength"
  result = verdict(name, value=totals, expected=expected, details=details)
  if penalty == 0.0:
    return result("warn", ("Increasing regularization increases the loss: the L2 penalty "
                           "at init is 0 (no kernel weights with ndim > 1 are nonzero), so "
                           "regularization changes nothing."))
  monotone = all(b > a for a, b in zip(totals, totals[1:]))
  if not monotone:
    return result("fail", (f"Increasing regularization increases the loss: totals "
                           f"{[round(t, 4) for t in totals]} for strengths {list(strengths)} "
                           "are not increasing; likely causes: a negative strength or "
                           "penalty sign, or the penalty not added to the loss."))
  msg = (f"Increasing regularization increases the loss: at init {totals[0]:.4g} -> "
         f"{totals[-1]:.4g} for strengths {strengths[0]:g} -> {strengths[-1]:g}")
  if tx is None or not steps:
    return result("pass", msg + " (no training run asked).")
  s = float(train_strength if train_strength is not None else max(strengths))
  v_none, _ = fit(model, loss, variables, x, y, tx=tx, steps=steps, rng=rng, l2=0.0,
                  batch_size=batch_size)
  v_reg, m_reg = fit_metrics(model, loss, variables, x, y, tx=tx, steps=steps, rng=rng, l2=s,
                             batch_size=batch_size)
  l_none = evaluate(model, loss, v_none, x, y)["loss"]
  l_reg = evaluate(model, loss, v_reg, x, y)["loss"]
  details.update(train_strength=s, steps=steps, trained_data_loss_without=l_none,
                 trained_data_loss_with=l_reg,
                 trained_penalty_without=float(l2_penalty(v_none["params"])),
                 trained_penalty_with=float(l2_penalty(v_reg["params"])))
  msg += (f"; after {steps} steps the data loss is {l_reg:.4g} with l2={s:g} vs {l_none:.4g} "
          "without")
  if m_reg["bad_step"] >= 0:
    return result("warn", msg + f": training with l2={s:g} diverged at step "
                  f"{m_reg['bad_step']} (too strong for this learning rate); lower "
                  "train_strength to test the trained comparison.")
  if not l_reg > l_none:
    return result("fail", msg + ": the penalty does not pull against the data; likely "
                  "causes: the penalty is reported but not differentiated, or its sign.")
  return result("pass", msg + ", higher as it should be.")


def train_steps(budget: int) -> int:
  """The battery's run with and without the penalty: a third of the budget, at least 10."""
  return max(int(budget) // 3, 10)


@register_check("regularization_increases_loss", stage="regularize",
                needs=("loss_at_init", "overfit_one_batch"))
def check_regularization_increases_loss(ctx) -> CheckResult:
  """At init and after a short run with and without the penalty (a third of the budget)."""
  return regularization_increases_loss(
      ctx.model, ctx.loss, ctx.variables, ctx.x, ctx.y, tx=ctx.tx,
      steps=train_steps(ctx.steps), rng=ctx.seed, batch_size=ctx.batch_size)
