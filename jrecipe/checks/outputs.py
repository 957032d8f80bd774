"""Checks of what a model outputs: eval mode, logits vs probabilities, special vs general code.

- `eval_mode`: evaluation is deterministic and per-example (dropout off, BatchNorm on its
  running statistics). Karpathy stage 2, "evaluate on the whole test set" only means something
  when eval is a fixed function of each example; Regularize, "dropout, careful with BN".
- `logits_not_probabilities`: a model that ends in a softmax, fed to a loss that applies
  its own, trains anyway, just worse ("training fails silently").
- `assert_equivalent`: "generalize a special case": write the loopy version first, then
  vectorise and compare the two.
"""

from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jrecipe.checks.base import CheckResult, verdict
from jrecipe.checks.context import noted
from jrecipe.checks.registry import register_check


def _max_rel_diff(a, b) -> float:
  """max |a - b| / max |a| over the leaves of two output pytrees (inf on a shape mismatch)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if len(la) != len(lb):
    return float("inf")
  worst = 0.0
  for x, y in zip(la, lb):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
      return float("inf")
    if x.size == 0:
      continue
    diff = np.max(np.abs(x - y))
    if not np.isfinite(diff):
      same = np.array_equal(x, y, equal_nan=True)
      worst = max(worst, 0.0 if same else float("inf"))
      continue
    worst = max(worst, float(diff / max(np.max(np.abs(x)), 1e-12)))
  return worst


def _other_rngs(rngs: dict, k: int) -> dict:
  return {name: jax.random.fold_in(key, k) for name, key in rngs.items()}


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def eval_mode(apply: Callable, variables: Any, x: jax.Array, *, rngs: Optional[dict] = None,
              rtol: float = 1e-5, stateless: bool = False) -> CheckResult:
  """Checks that eval mode is deterministic and treats each example on its own.

  Recipe step: Karpathy stage 2 ("evaluate on the whole test set": eval must be a fixed
  function of each example) and stage 4 ("dropout ... careful with BN"): in eval, dropout is
  off and BatchNorm uses its running statistics.

  Measures, with `apply(variables, x, train=False, rngs=...)` (all calls traced separately
  inside one jitted function):
  1. two calls without rngs give identical outputs;
  2. calls with two different rngs give the same outputs as without (dropout off in eval);
  3. example 0 evaluated alone gives its output in the batch, and the batch in reverse order
     gives the same per-example outputs (no batch statistics in eval).

  Args:
    apply: `apply(variables, x, train=False, rngs=None) -> outputs` (a `Model.apply`).
    variables: the model's variables.
    x: a batch of inputs [B, ...] (B >= 2 for the batch-context test).
    rngs: rngs to pass in test 2 (default {'dropout': key(1)}); a second set is folded from
      them.
    rtol: the largest relative difference (max |a-b| / max |a|) accepted.
    stateless: the model keeps no state (no BatchNorm batch_stats). Then an example whose
      eval output depends on its batch through the other examples' VALUES (a nonzero
      gradient of output 0 with respect to inputs 1..B-1) is a layer mixing the batch in every
      mode: batch_independence's finding (its root cause), not an eval-mode one, and test 3
      is left to it; a dependence on the batch's shape or order alone (a dropout mask drawn
      at eval from a fixed stream) still fails here.

  Returns:
    CheckResult 'eval_mode': value = the largest relative difference measured, expected 0
    (<= rtol). Fail names the likely cause ("dropout left on in eval mode?", "BatchNorm using
    batch statistics in eval?").
  """
  x = jnp.asarray(x)
  b = x.shape[0] if x.ndim else 0
  r1 = rngs if rngs is not None else {"dropout": jax.random.key(1)}
  r2 = _other_rngs(r1, 1)

  def call(v, xx, r):
    return apply(v, xx, train=False, rngs=r)

  def variants(v, xx, ra, rb):
    # Two separate traces of the same call: host-side randomness or Python state shows up.
    out = {"base": call(v, xx, None), "again": call(v, xx, None),
           "rngs_a": call(v, xx, ra), "rngs_b": call(v, xx, rb)}
    if b >= 2:
      out["alone"] = call(v, xx[:1], None)
      out["reversed"] = jax.tree.map(lambda o: o[::-1], call(v, xx[::-1], None))
    return out

  try:
    outs = jax.jit(variants)(variables, x, r1, r2)
  except Exception:  # pylint: disable=broad-except
    return _eval_error(call, variables, x, r1)
  base = outs["base"]
  measured = {"repeat": _max_rel_diff(base, outs["again"]),
              "rngs_a": _max_rel_diff(base, outs["rngs_a"]),
              "rngs_b": _max_rel_diff(base, outs["rngs_b"])}
  if "alone" in outs:
    measured["alone"] = _max_rel_diff(jax.tree.map(lambda o: o[:1], base), outs["alone"])
    measured["reversed"] = _max_rel_diff(base, outs["reversed"])
  value = max(measured.values())
  result = verdict("eval_mode", value=value, expected=0.0,
                   details={"relative_differences": measured, "rtol": rtol, "batch": b})
  if stateless and b >= 2 and _mixes_values(call, variables, x):
    measured["alone"] = measured["reversed"] = 0.0  # batch_independence's finding
    result = verdict("eval_mode", value=max(measured.values()), expected=0.0, details={
        "relative_differences": measured, "rtol": rtol, "batch": b,
        "batch_mixing": "left to batch_independence"})
  problems = _eval_problems(measured, rtol)
  if problems:
    return result("fail", f"{_EVAL_STEP}: " + "; ".join(problems))
  if b < 2:
    return result("warn", f"{_EVAL_STEP}: deterministic, but a batch of {b} cannot test that "
                  "examples are evaluated independently.")
  return result("pass", f"{_EVAL_STEP}: eval outputs are deterministic, independent of the "
                f"rngs and of the rest of the batch (max relative difference {value:.2g} <= "
                f"{rtol:g}).")


def _mixes_values(call: Callable, variables: Any, x: jax.Array) -> bool:
  """Whether eval output 0 has a nonzero gradient with respect to inputs 1..B-1."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return False
  first = lambda xx: jnp.sum(jax.tree.leaves(call(variables, xx, None))[0][0])
  try:
    g = jax.jit(jax.grad(first))(x)
  except Exception:  # pylint: disable=broad-except
    return False
  return bool(jnp.any(g[1:] != 0))


_EVAL_STEP = "eval_mode (evaluate deterministically, per example; dropout/BN in eval)"


def _eval_error(call: Callable, variables: Any, x: jax.Array, rngs: dict) -> CheckResult:
  """The failed eval_mode verdict when the eval calls raise: first without rngs, then with."""
  try:
    base = jax.jit(call)(variables, x, None)
  except Exception as e:  # pylint: disable=broad-except
    text = str(e).lower()
    cause = ("dropout left on in eval mode? (it asks for a 'dropout' rng)"
             if "rng" in text or "dropout" in text else
             "does eval mode need state (e.g. mutable batch_stats: BatchNorm using batch "
             "statistics in eval?)" if "mutable" in text or "batch_stats" in text else
             "the model cannot be evaluated without rngs")
    return verdict("eval_mode", expected=0.0, details={"error": _first_line(e)})(
        "fail", f"{_EVAL_STEP}: eval apply without rngs raised {_first_line(e)}: {cause}")
  try:
    jax.jit(call)(variables, x, rngs)
    error = "the eval checks raised an error in the batch-context calls"
  except Exception as e:  # pylint: disable=broad-except
    error = f"eval apply with rngs raised {_first_line(e)}"
  details = {"error": error, "base_output_shape": str(jax.tree.map(jnp.shape, base))}
  return verdict("eval_mode", expected=0.0, details=details)("fail", f"{_EVAL_STEP}: {error}")


def _eval_problems(measured: dict, rtol: float) -> list[str]:
  """The causes named by eval_mode's measured differences above `rtol`."""
  problems = []
  if measured["repeat"] > rtol:
    problems.append(f"two identical eval calls differ (relative {measured['repeat']:.2g}): "
                    "a random op without a fixed key, or state that changes between calls?")
  rng_diff = max(measured.get("rngs_a", 0.0), measured.get("rngs_b", 0.0))
  if rng_diff > rtol:
    problems.append(f"eval outputs change with the rngs passed (relative {rng_diff:.2g}): "
                    "dropout left on in eval mode (deterministic=not train missing?)")
  ctx = max(measured.get("alone", 0.0), measured.get("reversed", 0.0))
  if ctx > rtol:
    problems.append(f"an example's eval output depends on the rest of its batch (example 0 "
                    f"alone vs in the batch: {measured.get('alone', 0.0):.2g}; reversed batch: "
                    f"{measured.get('reversed', 0.0):.2g}): BatchNorm using batch statistics in "
                    "eval (use_running_average=not train missing?) or a layer mixing the batch?")
  return problems


def logits_not_probabilities(apply: Callable, variables: Any, x: jax.Array, *,
                             expects: str = "logits", atol: float = 1e-3) -> CheckResult:
  """Checks that a model whose loss expects logits/scores does not output probabilities.

  Recipe step: Karpathy's "training fails silently" and "verify loss @ init": a model ending
  in a softmax, fed to softmax cross-entropy (which applies its own softmax), still trains,
  with squashed gradients; the loss at init even looks right. Likewise a ReLU on the head
  forbids the negative scores a softmax or an SVM needs.

  Args:
    apply: `apply(variables, x, train=False, rngs=None) -> outputs [B, ..., C]`.
    variables: the model's variables.
    x: a batch of inputs.
    expects: the loss's `expects`: 'logits' or 'scores' are checked, 'values' is skipped.
    atol: tolerance of "rows sum to 1".

  Returns:
    CheckResult 'logits_not_probabilities': value = fraction of output rows (over the last
    axis) that are probability vectors (all in [0, 1], summing to 1 within atol), expected 0.
    Fail when every row is one ("softmax applied twice"); warn when all outputs are
    non-negative and not all equal (a ReLU or sigmoid on the head?); pass when every output
    is the same number (a zero-initialised head: nothing to tell before training); skip for
    regression ('values').
  """
  name = "logits_not_probabilities"
  step = "logits_not_probabilities (training fails silently; verify the loss at init)"
  if expects == "values":
    return CheckResult(name, "skip", message=(
        f"{step}: the loss expects regression values, not logits: there is no softmax to "
        "apply twice."))
  if expects not in ("logits", "scores"):
    return CheckResult(name, "skip", message=f"{step}: unknown loss input kind {expects!r}.")
  out = apply(variables, jnp.asarray(x), train=False, rngs=None)
  leaves = jax.tree.leaves(out)
  if len(leaves) != 1:
    return CheckResult(name, "skip", message=(
        f"{step}: the model returns {len(leaves)} arrays; cannot tell which are the logits."))
  out = np.asarray(leaves[0], np.float64)
  rows = out.reshape(-1, out.shape[-1]) if out.ndim >= 2 else out.reshape(-1, 1)
  c = rows.shape[1]
  in01 = np.all((rows >= 0) & (rows <= 1), axis=1)
  sums = rows.sum(axis=1)
  prob_rows = in01 & (np.abs(sums - 1.0) <= atol)
  frac = float(np.mean(prob_rows)) if rows.size else 0.0
  with np.errstate(over="ignore"):
    lse = np.log(np.sum(np.exp(rows - rows.max(axis=1, keepdims=True)), axis=1)) + rows.max(axis=1)
  details = {"rows": int(rows.shape[0]), "classes": c, "min": float(rows.min()),
             "max": float(rows.max()), "mean_row_sum": float(np.mean(sums)),
             "log_softmax_rows": float(np.mean(np.abs(lse) <= atol)) if c > 1 else 0.0}
  if c >= 2 and frac == 1.0:
    return CheckResult(name, "fail", frac, 0.0, (
        f"{step}: all {rows.shape[0]} output rows are in [0, 1] and sum to 1: the model outputs "
        f"probabilities but the loss expects {expects} and applies its own softmax: softmax "
        "applied twice; remove the model's final softmax."), details=details)
  if rows.max() - rows.min() <= atol * max(1.0, float(np.max(np.abs(rows)))):
    return CheckResult(name, "pass", frac, 0.0, (
        f"{step}: every output is {rows.min():.3g} at init (a zero-initialised head, as in "
        "big_vision's head_zeroinit): constant rows are not probabilities (they would sum to "
        f"1, these sum to {float(np.mean(sums)):.3g}); nothing else to tell before training."),
        details=details)
  if rows.min() >= 0:
    return CheckResult(name, "warn", frac, 0.0, (
        f"{step}: all outputs are non-negative (min {rows.min():.3g}) but the loss expects "
        f"{expects}, which must be free to go negative: a ReLU (or sigmoid/softmax) on the "
        "head?"), details=details)
  note = ("; rows are log-probabilities (log_softmax on the head: harmless for softmax "
          "cross-entropy)" if details["log_softmax_rows"] == 1.0 else "")
  return CheckResult(name, "pass", frac, 0.0, (
      f"{step}: outputs look like {expects} (range {rows.min():.3g}..{rows.max():.3g}, "
      f"{frac:.0%} probability rows){note}."), details=details)


def assert_equivalent(special_fn: Callable, general_fn: Callable, inputs: Iterable, *,
                      rtol: float = 1e-5, atol: float = 1e-6) -> float:
  """Asserts that a loopy reference and a vectorised version agree on every input.

  Recipe step: "generalize a special case" (Karpathy, stage 2): write the simple, loopy
  version first, then vectorise it and compare the two on a few inputs.

  Args:
    special_fn: the reference (e.g. Python loops); its outputs are the expected values.
    general_fn: the vectorised version under test.
    inputs: the inputs to try; a tuple is unpacked into positional arguments, anything
      else is passed as the single argument (wrap a tuple argument as `(t,)`).
    rtol, atol: agreement means |general - special| <= atol + rtol * |special| everywhere.

  Returns:
    The largest absolute difference over all inputs and output leaves.

  Raises:
    AssertionError: at the first input that disagrees (structure, shape or values), naming
      the input's position, the output leaf, the first mismatching index and the max
      difference.
  """
  worst = 0.0
  for k, inp in enumerate(inputs):
    call_args = inp if isinstance(inp, tuple) else (inp,)
    want = special_fn(*call_args)
    got = general_fn(*call_args)
    lw, tw = jax.tree.flatten(want)
    lg, tg = jax.tree.flatten(got)
    if tw != tg:
      raise AssertionError(f"input #{k}: output structures differ: special {tw} vs general {tg}")
    for leaf, (w, g) in enumerate(zip(lw, lg)):
      w, g = np.asarray(w), np.asarray(g)
      if w.shape != g.shape:
        raise AssertionError(f"input #{k}, output leaf {leaf}: shapes differ: special "
                             f"{w.shape} vs general {g.shape}")
      w64, g64 = w.astype(np.float64), g.astype(np.float64)
      diff = np.abs(g64 - w64)
      bad = ~(diff <= atol + rtol * np.abs(w64))
      bad &= ~(np.isnan(w64) & np.isnan(g64))
      max_diff = float(np.nanmax(diff)) if diff.size and not np.all(np.isnan(diff)) else 0.0
      if np.any(bad):
        first = tuple(int(v) for v in np.argwhere(bad)[0])
        raise AssertionError(
            f"input #{k}, output leaf {leaf}: special and general versions differ, first at "
            f"index {first} (special {w64[first]!r} vs general {g64[first]!r}); max |difference| "
            f"{max_diff:.3g} (rtol={rtol:g}, atol={atol:g})")
      worst = max(worst, max_diff)
  return worst


@register_check("logits_not_probabilities", stage="init", needs=("eval_mode",))
def check_logits_not_probabilities(ctx) -> CheckResult:
  """The eval outputs of 64 held-out examples at init (`ctx.probed`), against the loss."""
  variables, note = ctx.probed
  return noted(logits_not_probabilities(ctx.model.apply, variables, ctx.x_val[:64],
                                        expects=ctx.loss.expects), note)


@register_check("eval_mode", stage="skeleton")
def check_eval_mode(ctx) -> CheckResult:
  """Eight held-out examples at init (`ctx.probed`), with the first train step's dropout key.

  A precondition of every check that evaluates the model (they measure it in eval mode):
  when eval mode needs a dropout key or depends on the batch, their failures follow.
  """
  _, k_drop = ctx.step_keys(0)
  stateless = not ctx.model.has_batchnorm and not set(ctx.variables) - {"params"}
  variables, note = ctx.probed
  return noted(eval_mode(ctx.model.apply, variables, ctx.x_val[:8], rngs={"dropout": k_drop},
                         stateless=stateless), note)


NONLINEAR_RTOL = 1e-4  # f(midpoint) within this of the mean of f(ends): an affine model


def nonlinearity(apply: Callable, variables: Any, x: jax.Array, *,
                 weight_layers: int) -> CheckResult:
  """A model that stacks weight layers computes a nonlinear function (recipe stage 2,
  'set up the skeleton': a missing activation collapses a deep net into a linear one).

  Measures, in eval mode at init, f((a + b) / 2) against (f(a) + f(b)) / 2 for pairs of
  real examples (a, b): equal for every affine function, whatever its depth. Fails when the
  largest difference is below 1e-4 of the outputs' scale although the model has two or more
  weight matrices; skips a model with one (a linear baseline by design), token inputs (no
  midpoint) and a model whose outputs do not depend on its input (input_independent_baseline's
  finding).
  """
  x = jnp.asarray(x)
  result = lambda value=None, **d: verdict("nonlinearity", value=value,
                                           expected=f"> {NONLINEAR_RTOL:g}",
                                           details={"weight_layers": weight_layers, **d})
  if weight_layers < 2:
    return result()("skip", f"one weight layer ({weight_layers}): a linear model by design.")
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.shape[0] < 2:
    return result()("skip", "token (integer) inputs have no midpoint to test.")
  a, b = x[0::2][: x.shape[0] // 2], x[1::2][: x.shape[0] // 2]
  f = jax.jit(lambda v, xx: apply(v, xx, train=False))
  fa, fb, fm = (np.asarray(f(variables, z), np.float64) for z in (a, b, (a + b) / 2))
  scale = max(float(np.max(np.abs(fa - fb))), 1e-30)
  if float(np.max(np.abs(fa - fb))) <= 1e-12 * max(float(np.max(np.abs(fa))), 1.0):
    return result(0.0)("skip", "the outputs do not depend on the input "
                       "(input_independent_baseline's finding).")
  value = float(np.max(np.abs(fm - (fa + fb) / 2))) / scale
  step = "Skeleton: the model's output at the midpoint of two inputs vs the mean of theirs"
  if value <= NONLINEAR_RTOL:
    return result(value)("fail", f"{step}: equal (relative {value:.2g}): the model is affine "
                         f"in its input although it stacks {weight_layers} weight layers: a "
                         "missing activation between them (or a linear one, identity)?")
  return result(value)("pass", f"{step}: differ (relative {value:.2g}): the layers compute a "
                       "nonlinear function.")


@register_check("nonlinearity", stage="init", needs=("eval_mode",))
def check_nonlinearity(ctx) -> CheckResult:
  """Sixteen held-out examples at init (`ctx.probed`); weight layers = parameter leaves with
  ndim > 1 that are not biases or scales (embeddings and kernels)."""
  from jrecipe.optim import decay_mask
  layers = sum(bool(m) for m in jax.tree.leaves(decay_mask(ctx.variables["params"])))
  variables, note = ctx.probed
  return noted(nonlinearity(ctx.model.apply, variables, ctx.x_val[:16], weight_layers=layers),
               note)
