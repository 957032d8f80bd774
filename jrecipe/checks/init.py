"""The checks at initialisation (recipe stage 2): 'verify loss @ init' and 'init well'.

  loss_at_init  'verify loss @ init' (CS231n: 'look for correct loss at chance')
  init_bias     'init well': the data-derived final-layer bias predicts the base rates

Both measure the model before any training; `head_bias` / `copy_head_bias` read and write
the final layer's bias, which 'init well' sets from the data.
"""

from typing import Optional

import jax.numpy as jnp
import numpy as np

from jrecipe import losses as losses_lib
from jrecipe.checks.base import CheckResult, verdict
from jrecipe.checks.fitting import evaluate, mean_loss_fn
from jrecipe.checks.registry import register_check
from jrecipe.types import Loss, Model

# Tolerances, with the reasoning in each check's docstring.
INIT_LOSS_PASS_REL = 0.15  # loss_at_init: pass within 15% of the reference...
INIT_LOSS_FAIL_REL = 0.50  # ...warn up to 50%, fail beyond
INIT_LOSS_ATOL = 0.05  # absolute band for references near zero (regression)
INIT_LOSS_FORMULA_REL = 1e-3  # the loss code against its formula on constant outputs
BASE_RATE_TV = 0.05  # init_bias: total variation between label and uniform frequencies
BASE_RATE_KL = 0.7  # init_bias: nats of the init loss lost to mismatched base rates (see doc)


def head_bias(variables: dict, path: tuple = ("head", "bias")) -> Optional[np.ndarray]:
  """The final layer's bias (params at `path`, a Model's `head_path`) as numpy, or None."""
  from jrecipe.models.contract import leaf
  params = variables.get("params") if hasattr(variables, "get") else None
  found = leaf(params, path) if params is not None else None
  return None if found is None else np.asarray(found)


def copy_head_bias(variables: dict, bias: Optional[np.ndarray],
                   path: tuple = ("head", "bias")) -> dict:
  """variables with the bias at params `path` = bias when both exist with the same shape."""
  from jrecipe.experiment import set_head_bias
  return set_head_bias(variables, bias, path)


def _constant_reference(loss: Loss, outputs: np.ndarray, y, bias: Optional[np.ndarray]):
  """The loss of the outputs a vanishingly small init gives: the head bias (or 0) everywhere."""
  const = np.zeros(outputs.shape, np.float32)
  if bias is not None and bias.shape and bias.shape[-1] == outputs.shape[-1]:
    const = const + bias.astype(np.float32)
  return float(mean_loss_fn(loss.per_example)(jnp.asarray(const), jnp.asarray(y)))


def loss_at_init(model: Model, loss: Loss, variables: dict, x, y, *,
                 num_classes: Optional[int]) -> CheckResult:
  """'Verify loss @ init' (recipe stage 2; CS231n 'look for correct loss at chance').

  Measures the data loss (no regularisation) at initialisation and compares it with the
  loss of the outputs a vanishingly small init produces (the head bias, at the model's
  `head_path` wherever the final layer sits, broadcast over the outputs; zeros when there
  is none), computed from the loss's FORMULA
  (`jrecipe.losses.closed_form_at_constant`: ln C for softmax cross-entropy, per token for
  sequences; (C-1) x margin for the Weston-Watkins SVM; the target variance (+ mean^2 at a
  zero bias) for L2; the Huber of the targets), never from the code under test: a loss
  reduced over the wrong axis, divided by C or summed over time steps is then caught. The
  user's loss of those same constant outputs is measured too; when it disagrees with the
  formula the loss code itself is wrong (fail). A loss with no known form (a user Loss
  declaring another chance value, a user regression loss) is compared with its own value
  of the constant outputs, and the message says so.

  Tolerance: the excess loss of small random logits with spread s is about s^2/2, so a
  default (LeCun) init sits a few percent above chance; 15% allows logits of std ~0.8 at
  C=10. Pass when |loss - reference| <= max(15% of |reference|, 0.05) + 3 standard errors
  of the batch mean (a small batch measures the loss with noise; the 0.05 absolute band
  handles references near 0, e.g. regression targets near their mean); warn up to 50%;
  fail beyond (an init scale 10x too large gives losses many times chance). The user's
  loss of the constant outputs must match the formula within max(1e-3 relative, 1e-4).

  A softmax applied before a loss that expects logits also starts near -ln(1/C) and passes
  here; the check `logits_not_probabilities` catches it.

  Args:
    model, loss, variables: the model at init (without any training).
    x, y: a batch (a few hundred examples measure the mean well).
    num_classes: C for classification (None for regression).

  Returns:
    A CheckResult with value = measured loss, expected = the reference.
  """
  ev = evaluate(model, loss, variables, x, y)
  measured = ev["loss"]
  bias = head_bias(variables, model.head_path)  # wherever the head sits (models.contract)
  bias_set = bias is not None and bool(np.any(np.abs(bias) > 1e-6))
  const = bias if bias_set else None
  own = _constant_reference(loss, ev["outputs"], y, const)
  closed = losses_lib.closed_form_at_constant(loss, num_classes, y, const)
  reference = closed["value"] if closed else own
  if closed:
    ref_name = closed["formula"]
  else:
    ref_name = (f"no closed form known for loss {loss.name!r} (expects {loss.expects!r}): "
                "compared with that loss's own value of constant outputs"
                + (" (the head bias)" if bias_set else " (zeros)"))
  dev = measured - reference
  rel = abs(dev) / max(abs(reference), 1e-12)
  noise = 3.0 * ev["se"]
  pass_band = max(INIT_LOSS_PASS_REL * abs(reference), INIT_LOSS_ATOL) + noise
  fail_band = max(INIT_LOSS_FAIL_REL * abs(reference), 2 * INIT_LOSS_ATOL) + noise
  details = {"loss": measured, "reference": reference, "reference_kind": ref_name,
             "closed_form": closed["value"] if closed else None,
             "loss_of_constant_outputs": own, "relative_deviation": rel,
             "standard_error": ev["se"], "pass_band": pass_band, "fail_band": fail_band,
             "head_bias_set": bias_set}
  result = verdict("loss_at_init", value=measured,
                   expected=f"{reference:.4g} +/- {pass_band:.3g}", details=details)
  head = (f"Verify loss @ init: {measured:.4g} vs {reference:.4g} expected ({ref_name}), "
          f"{100 * rel:.0f}% off")
  if not np.isfinite(measured):
    return result("fail", f"{head}: the loss at init is not finite; likely causes: "
                  "non-finite inputs, log of zero, overflow from a huge init scale.")
  if closed and not abs(own - closed["value"]) <= max(INIT_LOSS_FORMULA_REL * abs(
      closed["value"]), 1e-4):
    return result("fail", f"{head}; the loss code gives {own:.4g} for constant outputs where "
                  f"the formula gives {closed['value']:.4g}: the loss is computed wrongly "
                  "(reduced over the wrong axis, summed instead of averaged over classes or "
                  "time steps, divided by the number of classes, labels and outputs "
                  f"swapped?){_own_loss_note(loss)}.")
  return _loss_at_init_band(result, head, dev, pass_band, fail_band)


def _own_loss_note(loss) -> str:
  """For a user's plain loss function: the formula is an assumption, and how to replace it."""
  if loss.name in losses_lib.LOSSES.names():
    return ""
  return ("; or your loss is another one by design (a sigmoid cross-entropy, a focal loss): "
          f"jrecipe takes a plain function such as {loss.name!r} for a softmax cross-entropy "
          "and compares it with ln C; give a factory returning a jrecipe.types.Loss with its "
          "own `chance` instead (docs/your_model.md, 'Your own loss')")


def _loss_at_init_band(result, head: str, dev: float, pass_band: float,
                       fail_band: float) -> CheckResult:
  """loss_at_init's pass / warn / fail bands around the reference (see its docstring)."""
  if dev > 0:
    causes = ("init scale too large (logits spread widely), inputs not normalised, a final "
              "bias set badly, or a loss that sums where it should average")
  else:
    causes = ("labels off (wrong or leaked labels, wrong num_classes), a loss that does not "
              "expect these outputs or divides by too much, or a bias fit to this batch")
  side = "above" if dev > 0 else "below"
  if abs(dev) <= pass_band:
    return result("pass", f"{head}: within tolerance.")
  if abs(dev) <= fail_band:
    return result("warn", f"{head}: {side} the expected value; likely causes: {causes}.")
  return result("fail", f"{head}: far {side} the expected value; likely causes: {causes}.")


def _softmax_rates(outputs, axis_mean: bool) -> np.ndarray:
  """Softmax of the batch-mean logits (axis_mean) or mean of the per-example softmaxes."""
  z = np.asarray(outputs, np.float64)
  if axis_mean:
    z = z.reshape(-1, z.shape[-1]).mean(axis=0)
    p = np.exp(z - z.max())
    return p / p.sum()
  p = np.exp(z - z.max(axis=-1, keepdims=True))
  p /= p.sum(axis=-1, keepdims=True)
  return p.reshape(-1, p.shape[-1]).mean(axis=0)


def _base_rate_mismatch(ev0: dict, ev1: dict, y: np.ndarray, num_classes, details: dict):
  """Logits: (KL with, its tolerance, label imbalance, its tolerance, what with, without).

  The rates the bias sets are the softmax of the batch-mean logits; the mean of per-example
  softmaxes also depends on the spread of the logits at init (Jensen), which the bias does
  not control: it is kept in details as 'mean_softmax_with'.
  """
  c = int(num_classes or ev1["outputs"].shape[-1])
  freq = np.bincount(y.ravel().astype(np.int64), minlength=c)[:c] / max(y.size, 1)
  p_with = _softmax_rates(ev1["outputs"], True)
  p_without = _softmax_rates(ev0["outputs"], True)
  tv_with = 0.5 * float(np.abs(p_with - freq).sum())
  tv_without = 0.5 * float(np.abs(p_without - freq).sum())
  noise = 0.5 * float(np.sum(np.sqrt(2 * freq * (1 - freq) / (np.pi * max(y.size, 1)))))
  tol = BASE_RATE_TV + 2 * noise
  kl_with = float(np.sum(freq * (np.log(np.maximum(freq, 1e-12)) - np.log(np.maximum(p_with,
                                                                              1e-300)))))
  imbalance = 0.5 * float(np.abs(freq - 1.0 / c).sum())
  details.update(label_frequencies=freq.tolist(), predicted_with=p_with.tolist(),
                 predicted_without=p_without.tolist(), tv_with=tv_with,
                 mean_softmax_with=_softmax_rates(ev1["outputs"], False).tolist(),
                 tv_without=tv_without, tolerance=tol,
                 imbalance_tv=imbalance, kl_with=kl_with, kl_tolerance=BASE_RATE_KL)
  return (kl_with, BASE_RATE_KL, imbalance, tol,
          f"predicted base rates vs label frequencies: KL {kl_with:.3f} nats (tol "
          f"{BASE_RATE_KL:g}), TV {tv_with:.3f}",
          f"labels {imbalance:.3f} (TV) from uniform, tol {tol:.3f}; base-rate TV "
          f"{tv_without:.3f} without the bias")


def _target_mean_mismatch(ev0: dict, ev1: dict, y: np.ndarray, details: dict):
  """Regression: the same tuple, in target standard deviations of the mean prediction (with
  the bias, and without it)."""
  out1 = ev1["outputs"].reshape(len(y), -1)
  out0 = ev0["outputs"].reshape(len(y), -1)
  t = y.reshape(len(y), -1).astype(np.float64)
  std = t.std(axis=0) + 1e-12
  mismatch = float(np.max(np.abs(out1.mean(0) - t.mean(0)) / std))
  mismatch_without = float(np.max(np.abs(out0.mean(0) - t.mean(0)) / std))
  tol = 0.1 + 2.0 / np.sqrt(max(len(t), 1))
  details.update(target_mean=t.mean(0).tolist(), predicted_mean_with=out1.mean(0).tolist(),
                 mismatch_with_std=mismatch, mismatch_without_std=mismatch_without,
                 tolerance=tol)
  return (mismatch, tol, mismatch_without, tol,
          f"mean prediction vs target mean {mismatch:.3f} std (tol {tol:.3f})",
          f"mean prediction {mismatch_without:.3f} std from the target mean without the bias "
          f"(tol {tol:.3f})")


def init_bias(model: Model, loss: Loss, variables_without: dict, variables_with: dict, x, y,
              *, num_classes: Optional[int]) -> CheckResult:
  """'Init well' (recipe stage 2): the data-derived final-layer bias and the base rates.

  Compares the data loss at init without and with the data-derived 'head' bias (log class
  priors for softmax classification and sequences, the target mean for regression) and
  checks that the model then predicts the base rates: the softmax of the batch-mean logits
  against the label frequencies, or the mean prediction against the target mean (in target
  standard deviations). The head is the model's `head_path` (wherever the final layer sits).

  Tolerances. The bias must not raise the loss by more than 2% (plus 3 standard errors):
  else fail. With the bias set, the base rates count as matched when KL(label frequencies
  || predicted base rates) <= 0.7 nats: the part of the loss at init that mismatched base
  rates cost (the hockey stick 'init well' removes). Calibrated on a population of correctly
  initialised models (the measurement is in the tests' calibration): 126 Linen MLPs with
  Flax's default Dense head (widths 32..512, 1-3 hidden layers, relu/tanh/gelu, 3 seeds) on
  256 normalised digits, balanced and with priors 2%..18%: KL at most 0.45 nats (median
  0.07), while TV reached 0.40, so a TV rule cannot separate them; the same MLPs with every
  kernel 2x too large give at least 1.6 nats. Without the bias, the labels count as balanced
  when their TV from uniform is below 0.05 plus twice the expected sampling TV of the batch
  (0.5 * sum_c sqrt(2 f_c (1 - f_c) / (pi n))). Regression: |mean prediction - mean target|
  < 0.1 std + 2 std/sqrt(n). On a balanced dataset both losses are nearly equal: that passes.

  Args:
    model, loss: the model and loss.
    variables_without: variables at init, head bias as initialised (usually zeros).
    variables_with: the same variables with the data-derived head bias
      (`jrecipe.experiment.set_head_bias(v, experiment.head_bias())`).
    x, y: a batch (larger is better; the whole train split is cheap at init).
    num_classes: C for classification; None for regression.

  Returns:
    skip for the SVM (no priors for hinge scores) or a model without a head bias; fail when
    the bias raises the loss; warn when the bias is set but the base rates still mismatch
    by more than the tolerance (the weights dominate it), or when the bias was not set (the
    two variables agree) and the labels are imbalanced; else pass.
  """
  skip = verdict("init_bias")
  if loss.expects == "scores":
    return skip("skip", "Init well: skipped, the SVM's hinge scores have no class-prior bias "
                "(the loss at init is C-1 whatever the priors).")
  if loss.expects not in ("logits", "values"):
    return skip("skip", f"Init well: skipped, loss.expects={loss.expects!r} has no "
                "data-derived bias.")
  path = model.head_path
  b_with, b_without = head_bias(variables_with, path), head_bias(variables_without, path)
  if b_with is None or b_without is None:
    return skip("skip", "Init well: skipped, no parameter vector is added unchanged to the "
                "outputs (no bias on the final layer, or a normalisation after it), so there "
                "is no bias to set from the data.")
  ev0 = evaluate(model, loss, variables_without, x, y)
  ev1 = evaluate(model, loss, variables_with, x, y)
  bias_set = not np.array_equal(b_with, b_without)
  details = {"loss_without": ev0["loss"], "loss_with": ev1["loss"], "bias_set": bias_set}
  y_np = np.asarray(y)
  if loss.expects == "logits":
    measured = _base_rate_mismatch(ev0, ev1, y_np, num_classes, details)
  else:
    measured = _target_mean_mismatch(ev0, ev1, y_np, details)
  slack = 0.02 * abs(ev0["loss"]) + 3 * max(ev0["se"], ev1["se"])
  rule = ("KL <= {:g} nats".format(measured[1]) if loss.expects == "logits" else
          f"mean within {measured[1]:.3g} std")
  result = verdict("init_bias", value=ev1["loss"], details=details,
                   expected=f"<= {ev0['loss'] + slack:.4g}, base rates {rule}" if bias_set
                   else f"labels balanced (within {measured[3]:.3g})")
  return _init_bias_verdict(result, ev0, ev1, bias_set, *measured)


def _init_bias_verdict(result, ev0, ev1, bias_set, mismatch, tol, mismatch_without,
                       tol_without, what, what_without) -> CheckResult:
  """init_bias's rules (see its docstring) on the measured losses and base rates."""
  losses = f"loss at init {ev0['loss']:.4g} without the bias, {ev1['loss']:.4g} with it"
  slack = 0.02 * abs(ev0["loss"]) + 3 * max(ev0["se"], ev1["se"])
  if not bias_set:
    if mismatch_without > tol_without:
      return result("warn", f"Init well: {losses}: the head bias is not set from the data and "
                    f"the labels are imbalanced ({what_without}); set the final bias to the "
                    "log class priors / target mean (config.init_bias) to remove the hockey "
                    "stick.")
    return result("pass", f"Init well: {losses}; the bias is not set, but the labels are "
                  f"balanced, so the priors' bias would be ~0 ({what_without}).")
  if ev1["loss"] - ev0["loss"] > slack:
    return result("fail", f"Init well: {losses}; the bias raises the loss ({what}); likely "
                  "causes: priors from the wrong split or label mapping, a bias without the "
                  "log, or a head whose outputs are not logits/values.")
  if mismatch > tol:
    return result("warn", f"Init well: {losses}; the bias is set but the outputs at init do "
                  f"not predict the base rates ({what}): the weights dominate the bias; a "
                  "smaller head init, or inputs centred per feature, lets the bias set the "
                  "rates.")
  if abs(ev1["loss"] - ev0["loss"]) <= slack:
    note = "nearly equal, as expected for balanced labels"
  else:
    note = f"the bias lowers it by {ev0['loss'] - ev1['loss']:.4g} (no hockey stick)"
  return result("pass", f"Init well: {losses}: {note}; {what}.")


@register_check("loss_at_init", stage="init",
                needs=("data_before_net", "splits_match", "eval_mode"))
def check_loss_at_init(ctx) -> CheckResult:
  """The loss at init on held-out examples against the loss of a vanishingly small init."""
  return loss_at_init(ctx.model, ctx.loss, ctx.variables, ctx.x_val, ctx.y_val,
                      num_classes=ctx.spec.num_classes)


@register_check("init_bias", stage="init", needs=("loss_at_init",))
def check_init_bias(ctx) -> CheckResult:
  """The head bias from the data against the same draw without it, on the train sample."""
  return init_bias(ctx.model, ctx.loss, ctx.variables_plain, ctx.variables, ctx.x, ctx.y,
                   num_classes=ctx.spec.num_classes)
