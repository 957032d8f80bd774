"""'Input-independent baseline' (recipe stage 2): real inputs must beat zeroed inputs."""

from typing import Optional

import numpy as np

from jrecipe.checks.base import CheckResult, verdict
from jrecipe.checks.fitting import evaluate, fit
from jrecipe.checks.registry import register_check
from jrecipe.types import Loss, Model

BASELINE_LOSS_MARGIN = 0.10  # real inputs >= 10% lower loss...
BASELINE_ACC_MARGIN = 0.01  # ...or accuracy at least 1 point and 3 standard errors higher
DIVERGE_FACTOR = 3.0  # a training loss peaking above 3x its first value diverged: rate too high


def input_independent_baseline(model: Model, loss: Loss, variables: dict, x, y, *, tx,
                               steps: int, rng, x_val=None, y_val=None,
                               batch_size: Optional[int] = None) -> CheckResult:
  """'Input-independent baseline' (recipe stage 2): real inputs must beat zeroed inputs.

  Trains the same init with the same budget, batches and optimizer twice, on the real
  inputs and on zeros of the same shape (one compiled step serves both), then evaluates
  the real model on (x_val, y_val) and the zero model on zeros of x_val's shape (what it
  would predict without input): without held-out data, on (x, y).

  Pass when the real model's loss is at least 10% lower, or its accuracy is higher by at
  least max(1 point, 3 standard errors of a binomial accuracy at the zero model's level,
  counting every predicted label: each token of a sequence): a held-out loss can rise with
  overfitting while accuracy still shows the input is used. The row's value and expected
  column are those of the rule that decided (the loss rule first; the accuracy rule when only
  it passed; both, with the loss, when neither did).

  Args:
    model, loss, variables: the model at init.
    x, y: the training data; tx, steps, rng, batch_size: the short run (see `fit`).
    x_val, y_val: optional held-out data.

  Returns:
    pass or fail ('the model is not using its input').
  """
  name = "input_independent_baseline"
  x = np.asarray(x)
  zeros = np.zeros_like(x)
  v_real, tr_real = fit(model, loss, variables, x, y, tx=tx, steps=steps, rng=rng,
                        batch_size=batch_size)
  v_zero, tr_zero = fit(model, loss, variables, zeros, y, tx=tx, steps=steps, rng=rng,
                        batch_size=batch_size)
  held_out = x_val is not None and y_val is not None
  xe, ye = (np.asarray(x_val), y_val) if held_out else (x, y)
  ev_real = evaluate(model, loss, v_real, xe, ye)
  ev_zero = evaluate(model, loss, v_zero, np.zeros_like(xe), ye)
  where = "held-out" if held_out else "training"
  lr_, lz = ev_real["loss"], ev_zero["loss"]
  details = {"loss_real": lr_, "loss_zero": lz, "accuracy_real": ev_real["accuracy"],
             "accuracy_zero": ev_zero["accuracy"], "evaluated_on": where, "steps": steps,
             "train_loss_curve_real_last": float(tr_real[-1]) if len(tr_real) else None,
             "train_loss_curve_zero_last": float(tr_zero[-1]) if len(tr_zero) else None}
  loss_win = np.isfinite(lr_) and lr_ <= (1.0 - BASELINE_LOSS_MARGIN) * lz
  acc_win, acc_txt = False, ""
  if ev_real["accuracy"] is not None:
    n = np.asarray(ye).size
    a0 = ev_zero["accuracy"]
    margin = max(BASELINE_ACC_MARGIN, 3.0 * np.sqrt(max(a0 * (1 - a0), 1.0 / n) / n))
    acc_win = ev_real["accuracy"] >= a0 + margin
    details["accuracy_margin"] = margin
    acc_txt = f", accuracy {ev_real['accuracy']:.3f} vs {a0:.3f}"
  loss_rule = f"loss <= {(1 - BASELINE_LOSS_MARGIN) * lz:.4g}"
  acc_rule = (f"accuracy >= {ev_zero['accuracy'] + details['accuracy_margin']:.3f}"
              if ev_real["accuracy"] is not None else "")
  # The expected column states the rule that decided: the one that passed, else both.
  if loss_win or not acc_rule:
    expected, value = loss_rule, lr_
  elif acc_win:
    expected, value = acc_rule, ev_real["accuracy"]
  else:
    expected, value = f"{loss_rule} or {acc_rule}", lr_
  details["decided_by"] = "loss" if loss_win else "accuracy" if acc_win else None
  result = verdict(name, value=value, expected=expected, details=details)
  head = (f"Input-independent baseline: {where} loss {lr_:.4g} with real inputs vs {lz:.4g} "
          f"with zeroed inputs{acc_txt} after {steps} steps")
  if loss_win or acc_win:
    return result("pass", head + ": the model uses its input.")
  diverged = _divergence(lr_, np.asarray(tr_real, np.float64), details)
  if diverged:
    return result("fail", head + diverged)
  return result("fail", head + ": the model is not using its input; likely causes: inputs "
                "zeroed, replaced or detached inside the model or pipeline, labels not "
                "matching inputs, or a budget/learning rate too small to learn anything.")


def _divergence(held_out_loss: float, curve: np.ndarray, details: dict) -> str:
  """': training ... diverged ...' when the real run's loss is non-finite or its training
  loss peaked above DIVERGE_FACTOR x its first value (a rate too HIGH, said before any 'too
  small'), else ''."""
  if not np.isfinite(held_out_loss) or not np.all(np.isfinite(curve)):
    return (": training on the real inputs diverged (non-finite loss): the learning rate is "
            "too HIGH (lower it), or the inputs hold inf/NaN.")
  if len(curve) and np.max(curve) > DIVERGE_FACTOR * curve[0]:
    details["train_loss_first"], details["train_loss_peak"] = float(curve[0]), float(
        np.max(curve))
    return (f": training on the real inputs diverged (training loss {curve[0]:.4g} at the "
            f"first step, peak {np.max(curve):.4g}, more than {DIVERGE_FACTOR:g}x): the "
            "learning rate is too HIGH (or the optimizer amplifies its steps); lower it, then "
            "re-run.")
  return ""


@register_check("input_independent_baseline", stage="baselines",
                needs=("data_before_net", "loss_at_init", "batch_independence",
                       "effective_schedule", "weight_decay"))
def check_input_independent_baseline(ctx) -> CheckResult:
  """Real against zeroed inputs, trained with the budget, compared on held-out examples.

  Needs batch_independence: a model that mixes the examples of its batch learns from the
  wrong inputs, so its failure here (and overfit_one_batch's) follows from that one. Needs
  the optimizer's measured checks: the short runs train with the user's optimizer, so a
  schedule inside it that stops the steps, a frozen leaf, an uphill step or a decay that
  erases the weights explains a failure here and in every training check after it.
  """
  return input_independent_baseline(
      ctx.model, ctx.loss, ctx.variables, ctx.x, ctx.y, tx=ctx.tx, steps=ctx.steps,
      rng=ctx.seed, x_val=ctx.x_val, y_val=ctx.y_val, batch_size=ctx.batch_size)
