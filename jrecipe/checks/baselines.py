"""'Input-independent baseline' (recipe stage 2): real inputs must beat zeroed inputs, and the
given labels must be learnt faster than the same labels shuffled (a label-shuffled control)."""

from typing import Optional

import numpy as np

from jrecipe.checks.base import CheckResult, verdict, with_more_steps
from jrecipe.checks.fitting import evaluate, fit
from jrecipe.checks.registry import register_check
from jrecipe.types import Loss, Model

BASELINE_LOSS_MARGIN = 0.10  # real inputs >= 10% lower loss...
BASELINE_ACC_MARGIN = 0.01  # ...or accuracy at least 1 point and 3 standard errors higher
DIVERGE_FACTOR = 3.0  # a training loss peaking above 3x its first value diverged: rate too high
CONTROL_MARGIN = 0.01  # the given labels' training loss ends below the shuffled labels' by at
CONTROL_SE = 3.0  # least 1% and 3 standard errors of the difference of the two end means
CONTROL_EVERY = 50  # compared every 50 steps; the control stops once the labels are learnt faster
EXTEND_UP_TO = 4  # budget x2, then x4, while the real run's training loss is still falling
FALLING_MARGIN = 0.01  # ...by 1% and 3 standard errors between the last two fifths of its steps


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

  When only the accuracy rule passes, a label-shuffled control decides (`_shuffled_control`).

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
  acc_win, acc_txt, acc_rule = _accuracy_rule(ev_real["accuracy"], ev_zero["accuracy"],
                                               np.asarray(ye).size, details)
  loss_rule = f"loss <= {(1 - BASELINE_LOSS_MARGIN) * lz:.4g}"
  # The expected column states the rule that decided: the one that passed, else both.
  if loss_win or not acc_rule:
    expected, value = loss_rule, lr_
  elif acc_win:  # (reconsidered below against the label-shuffled control)
    expected, value = acc_rule, ev_real["accuracy"]
  else:
    expected, value = f"{loss_rule} or {acc_rule}", lr_
  control, overturned = "", False
  if acc_win and not loss_win:  # the accuracy rule alone: ask the label-shuffled control
    acc_win, control = _shuffled_control(model, loss, variables, x, y, tr_real, details,
                                         tx=tx, steps=steps, rng=rng, batch_size=batch_size)
    overturned = not acc_win
    if overturned:
      expected, value = f"{acc_rule} and {details['control_rule']}", \
          details["train_loss_end_real"]
  details["decided_by"] = "loss" if loss_win else "accuracy" if acc_win else None
  result = verdict(name, value=value, expected=expected, details=details)
  head = (f"Input-independent baseline: {where} loss {lr_:.4g} with real inputs vs {lz:.4g} "
          f"with zeroed inputs{acc_txt} after {steps} steps")
  if loss_win or acc_win:
    return result("pass", head + control + ": the model uses its input.")
  if held_out and not overturned and not _divergence(lr_, np.asarray(tr_real), {}):
    failed = _held_out_failure(result, head, model, loss, variables, (v_real, v_zero), x, y,
                               tr_real, details, tx=tx, steps=steps, rng=rng,
                               batch_size=batch_size)
    if failed is not None:
      return failed
  return _failed(result, head, control, lr_, tr_real, details, overturned)


def _held_out_failure(result, head: str, model, loss, init, trained, x, y, curve_real,
                      details: dict, *, tx, steps, rng, batch_size) -> Optional[CheckResult]:
  """The fail of a held-out verdict whose training examples are predicted well.

  The same two rules on the training examples (x, y); when they pass, the label-shuffled
  control (`_shuffled_control`) tells labels learnt from their inputs (so the held-out split
  is what differs: failure 'held_out') from labels that only got memorised (failure
  'labels'). None when the training examples fail too: the input is not used at all.
  """
  v_real, v_zero = trained
  ev_real, ev_zero = evaluate(model, loss, v_real, x, y), evaluate(
      model, loss, v_zero, np.zeros_like(x), y)
  acc = ev_real["accuracy"]
  details.update(train_loss_real=ev_real["loss"], train_loss_zero=ev_zero["loss"],
                 train_accuracy_real=acc, train_accuracy_zero=ev_zero["accuracy"])
  if not (ev_real["loss"] <= (1.0 - BASELINE_LOSS_MARGIN) * ev_zero["loss"] or _accuracy_rule(
      acc, ev_zero["accuracy"], np.asarray(y).size, {})[0]):
    return None
  learnt, control = _shuffled_control(model, loss, init, x, y, curve_real, details, tx=tx,
                                      steps=steps, rng=rng, batch_size=batch_size)
  # A correct model still learning can beat zeroed inputs on the examples it trains on before
  # it does on held-out ones, and before its labels are significantly ahead of shuffled ones:
  # both are extended like 'input_unused' while the training loss is still falling.
  details["failure"] = "held_out" if learnt else "labels"
  details["still_falling"] = _still_falling(curve_real)
  text = (f"; on its training examples loss {ev_real['loss']:.4g} vs {ev_zero['loss']:.4g}"
          + (f", accuracy {acc:.3f} vs {ev_zero['accuracy']:.3f}" if acc is not None else "")
          + control)
  if not learnt:
    return result("fail", head + text + ": the labels are learnt no faster than the same "
                  "labels shuffled apart from their inputs, so they do not match the inputs "
                  "(shuffled, shifted or reordered in the data pipeline).")
  return result("fail", head + text + ": the model learnt the training split, yet predicts "
                "the held-out split no better than without input: the held-out labels do not "
                "belong to its inputs as training's do (labels shifted or from another class "
                "map in that split, a split taken from sorted data, its inputs prepared "
                "otherwise; splits_match compares the splits' statistics), or the model only "
                "memorised these training examples.")


def _failed(result, head: str, control: str, held_out_loss: float, curve, details: dict,
            overturned: bool) -> CheckResult:
  """The fail of `input_independent_baseline`: diverged, labels not matching the inputs, or
  the input unused; `details['still_falling']` tells the battery to extend the budget."""
  diverged = _divergence(held_out_loss, np.asarray(curve, np.float64), details)
  details["still_falling"] = _still_falling(curve)
  details["failure"] = "diverged" if diverged else "labels" if overturned else "input_unused"
  if diverged:
    return result("fail", head + diverged)
  if overturned:
    return result("fail", head + control + ": the labels are learnt no faster than the same "
                  "labels shuffled apart from their inputs, so they do not match the inputs: "
                  "labels shuffled, shifted or reordered against the inputs in the data "
                  "pipeline, or inputs replaced after the labels were paired with them.")
  return result("fail", head + ": the model is not using its input; likely causes: inputs "
                "zeroed, replaced or detached inside the model or pipeline, labels not "
                "matching inputs, or a budget/learning rate too small to learn anything.")


def _still_falling(curve) -> bool:
  """Whether a training loss curve is still going down at its end: the mean of its last fifth
  below the fifth before by at least FALLING_MARGIN of it and 3 standard errors."""
  curve = np.asarray(curve, np.float64)
  k = len(curve) // 5
  if k < 2 or not np.all(np.isfinite(curve)):
    return False
  last, prev = curve[-k:], curve[-2 * k:-k]
  se = np.sqrt(np.var(last, ddof=1) / k + np.var(prev, ddof=1) / k)
  return bool(prev.mean() - last.mean() > max(FALLING_MARGIN * abs(last.mean()), 3.0 * se))


def _accuracy_rule(a1, a0, n: int, details: dict) -> tuple[bool, str, str]:
  """(passed, text for the message, the rule) of the accuracy rule: the real model's
  accuracy at least max(1 point, 3 binomial standard errors at the zero model's level) above
  the zero model's over `n` predicted labels; (False, '', '') for a loss without accuracy."""
  if a1 is None:
    return False, "", ""
  margin = max(BASELINE_ACC_MARGIN, 3.0 * np.sqrt(max(a0 * (1 - a0), 1.0 / n) / n))
  details["accuracy_margin"] = margin
  return (a1 >= a0 + margin, f", accuracy {a1:.3f} vs {a0:.3f}",
          f"accuracy >= {a0 + margin:.3f}")


def _end(curve) -> tuple[float, float]:
  """(mean, squared standard error of the mean) of the training loss over the last 10% of a
  run's steps (at least two where there are two)."""
  curve = np.asarray(curve, np.float64)
  if not len(curve):
    return float("nan"), float("nan")
  tail = curve[-min(len(curve), max(2, len(curve) // 10)):]
  var = float(np.var(tail, ddof=1)) / len(tail) if len(tail) > 1 else 0.0
  return float(np.mean(tail)), var


def _shuffled_control(model, loss, variables, x, y, curve_real, details: dict, *, tx, steps,
                      rng, batch_size) -> tuple[bool, str]:
  """(whether the given labels were learnt faster than shuffled ones, text for the message):
  trains on `x` with `y` permuted along its example axis, same init, budget, batches and
  optimizer.

  The accuracy rule alone is not enough. A model trained on labels shuffled apart from their
  inputs reached 27% held-out accuracy on digits against 8.9% for the zero model (random-label
  models scored 8-20% over three permutations, far more spread than a binomial error), while
  its held-out loss was only 4% below the zero model's. So when only the accuracy rule
  passes, a third run trains on the same inputs with the labels shuffled by a seeded
  permutation (the control of Zhang et al., 2017, 'Understanding deep learning requires
  rethinking generalization'),
  and the accuracy rule counts only if the given labels were learnt faster: their mean
  training loss over the last 10% of the steps below the control's by at least 1% and 3
  standard errors (of the difference of the two means, from the batch losses' spread).
  The comparison is made every 50 steps too (the real run's curve up to the same step), and the
  control stops at the first where the given labels are already ahead by that margin: the pass
  is reached; labels that do not match their inputs keep the two curves together, so the control
  then runs its whole budget. Training loss, not held-out accuracy, because it averages over
  every step's batch and so varies little between permutations: on the zoo's shuffled digits
  both ended at 2.141, while a correct causal LM on digit sequences, which only just passes the
  accuracy rule after 60 steps, ended 6% below its control (1.654 vs 1.764).
  """
  seed = int(rng) if isinstance(rng, (int, np.integer)) else 0
  shuffled = np.asarray(y)[np.random.default_rng(seed + 7919).permutation(len(y))]
  curve_real = np.asarray(curve_real, np.float64)
  _, curve_ctrl = fit(model, loss, variables, x, shuffled, tx=tx, steps=steps, rng=rng,
                      batch_size=batch_size, check_every=CONTROL_EVERY,
                      stop_when=lambda _, ctrl: _compare(curve_real[:len(ctrl)], ctrl)[0])
  learnt, end_real, end_ctrl, margin = _compare(curve_real[:len(curve_ctrl)], curve_ctrl)
  details.update(train_loss_end_real=end_real, train_loss_end_shuffled=end_ctrl,
                 control_margin=float(margin), control_steps=len(curve_ctrl),
                 control_rule=f"training loss <= {end_ctrl - margin:.4g}")
  at = "at the end" if len(curve_ctrl) >= steps else f"after {len(curve_ctrl)} steps"
  text = (f"; training loss {at} {end_real:.4g} with the given labels vs {end_ctrl:.4g} "
          "with them shuffled")
  return learnt, text


def _compare(curve_real, curve_ctrl) -> tuple[bool, float, float, float]:
  """(learnt faster, end of the real curve, end of the control's, margin) of two curves of
  equal length: the real end mean below the control's by at least CONTROL_MARGIN of it and
  CONTROL_SE standard errors of the difference."""
  (end_real, var_real), (end_ctrl, var_ctrl) = _end(curve_real), _end(curve_ctrl)
  margin = max(CONTROL_MARGIN * abs(end_ctrl), CONTROL_SE * np.sqrt(var_real + var_ctrl))
  learnt = bool(np.isfinite(end_real) and np.isfinite(end_ctrl) and
                end_real <= end_ctrl - margin)
  return learnt, end_real, end_ctrl, float(margin)


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
                       "effective_schedule", "weight_decay", "logits_not_probabilities",
                       "causal_dependency"))
def check_input_independent_baseline(ctx) -> CheckResult:
  """Real against zeroed inputs, trained with the budget, compared on held-out examples.

  Needs batch_independence: a model that mixes the examples of its batch learns from the
  wrong inputs, so its failure here (and overfit_one_batch's) follows from that one. Needs
  the optimizer's measured checks: the short runs train with the user's optimizer, so a
  schedule inside it that stops the steps, a frozen leaf, an uphill step or a decay that
  erases the weights explains a failure here and in every training check after it. Needs
  logits_not_probabilities: outputs that are already probabilities, fed to a softmax loss
  (softmax applied twice), barely train (big_vision's ViT with a softmax after its zero head
  did not beat zeroed inputs in 60 steps). Needs causal_dependency: a sequence model that
  sees the future, or never its current token (LM1B's decoder without model.shifts_inputs:
  2.015 with real inputs against 1.81 with zeros), learns the wrong thing from its input.

  The budget is extended (x2, then up to x4) while the verdict would be 'not using its input'
  (or 'learnt the training split only', or 'labels learnt no faster than shuffled ones': a
  correct model 20 steps into Adam 5e-4 was 0.15 below its control, not yet 3 standard errors)
  and the real run's training loss is still falling: a correct model can take longer than
  `checks.budget_steps` to start using its input (an LM1B-style decoder on digit sequences
  first learns the per-position token frequencies, which zeroed inputs learn as well, and
  used its context only after about 200 steps, measured), while a model that ignores its
  input is flat by then. Said in the message.
  """
  return with_more_steps(
      lambda steps: input_independent_baseline(
          ctx.model, ctx.loss, ctx.variables, ctx.x, ctx.y, tx=ctx.tx, steps=steps,
          rng=ctx.seed, x_val=ctx.x_val, y_val=ctx.y_val, batch_size=ctx.batch_size),
      ctx.steps, lambda r: r.details.get("failure") in ("input_unused", "held_out", "labels")
      and bool(r.details.get("still_falling")), field="budget_steps", up_to=EXTEND_UP_TO,
      why=" while the training loss on the real inputs was still falling")
