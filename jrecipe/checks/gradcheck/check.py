"""`gradient_check`: sampled analytic gradients against centred differences, in float64.

Measuring lives in `measure`, the verdict rules in `rules`, the picture in `plot`; this
module runs them in order (see the package docstring for the whole procedure).
"""

from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np

from jrecipe.checks.base import CheckResult, verdict
from jrecipe.checks.gradcheck import measure, rules
from jrecipe.checks.gradcheck.plot import plot_errors
from jrecipe.checks.gradcheck.rules import EXCELLENT_BELOW, FAIL_ABOVE, WARN_ABOVE


def gradient_check(loss_fn_data: Callable, loss_fn_reg: Optional[Callable], params: Any, *,
                   h: float = 1e-5, coords_per_leaf: int = 4,
                   rng: Union[int, np.random.Generator, jax.Array] = 0,
                   kink_fn: Optional[Callable] = None, args: Sequence = (),
                   fail_above: float = FAIL_ABOVE, warn_above: float = WARN_ABOVE,
                   other_h: Sequence[float] = (1e-4, 1e-6), run_check_grads: bool = True,
                   artifacts_dir: Optional[str] = None) -> CheckResult:
  """Compares analytic and centred-difference gradients on sampled coordinates, in float64.

  Recipe step: CS231n "gradient checks" (the whole procedure: centred differences, relative
  error, double precision, every parameter, data loss and regularisation separately, fixed
  randomness, kinks, the active float range; see the module docstring).

  Args:
    loss_fn_data: `loss_fn_data(params, *args) -> scalar` data loss. Any randomness
      (dropout) must be bound inside (the same key for every call).
    loss_fn_reg: `loss_fn_reg(params, *args) -> scalar` regularisation loss, or None.
    params: the parameter pytree; its floating leaves are checked (cast to float64).
    h: the finite-difference step.
    coords_per_leaf: coordinates sampled (without replacement) from every leaf.
    rng: seed, numpy Generator or JAX key for the coordinate sampling.
    kink_fn: optional `kink_fn(params, *args) -> pytree of bool/int arrays` (jit-able): the
      'winners' of every max (ReLU sign patterns, argmaxes). A coordinate whose pattern
      differs between x+h and x-h crossed a kink: counted, not failed. See `relu_pattern`.
    args: extra arguments of the loss functions (e.g. the batch); floating leaves are cast
      to float64 (close over float32 arrays instead and they are promoted, which is exact).
    fail_above, warn_above: relative-error thresholds (CS231n: 1e-2 and 1e-4).
    other_h: other steps tried when the check does not pass ("try other h"), and plotted.
    run_check_grads: also run `jax.test_util.check_grads(order=1, modes=('rev',))` on the
      data loss (one random direction over all parameters; about 3 extra compilations).
    artifacts_dir: where to write `gradient_check.png` (max relative error per leaf against
      h; None: no files).

  Returns:
    CheckResult 'gradient_check': value = max relative error over the coordinates that
    crossed no kink and are resolvable (data and regularisation), expected '< 1e-07
    (float64)'. details:
      'table': one row per parameter leaf for the data loss: 'leaf' (path), 'shape',
        'max_rel_error' (all sampled coordinates), 'max_rel_error_no_kinks' (the verdict's
        number), 'h', 'coords' (checked), 'kinks' (crossed), 'unresolved' (both gradients
        within float64 roundoff of zero: agreement assumed), 'max_abs_grad', 'tiny' (raw
        analytic and numeric values of coordinates with |g| < 1e-10 or unresolved),
        'systematic_ratio' (analytic/numeric when constant across the leaf, else None),
        'status', 'samples' (index, analytic, numeric, rel_error, kink per coordinate);
      'reg_table': the same for the regularisation loss ([] without one);
      'check_grads': {'data': 'passed' | 'passed at eps=...' | 'failed ...' | 'error ...'};
      'other_h': {loss: {h: {leaf: max error}}} when computed; 'kinks'; 'loss_dtypes'.
    Fail: an error > fail_above not explained by a kink, or a systematic ratio. Warn: an
    error in (warn_above, fail_above]; check_grads failing at every step it tries; a loss
    computed below float64 or not traceable in float64 (inconclusive); every gradient
    within roundoff of zero (outside the active float range). Skip: no float parameters.
  """
  np_rng = measure.seed_generator(rng)
  expected = f"< {EXCELLENT_BELOW:g} (float64)"
  losses = {"data": (loss_fn_data, kink_fn)}
  losses.update({"reg": (loss_fn_reg, None)} if loss_fn_reg is not None else {})
  with measure.float64():
    args64 = tuple(measure.to_f64(tuple(args)))
    flat = measure.flatten_params(measure.to_f64(params))
    if flat is None:
      return verdict("gradient_check")("skip", f"{rules.STEP}: no floating parameters to check.")
    coords = measure.sample_coords(flat, coords_per_leaf, np_rng)
    loss_dtypes, errors = measure.trace_dtypes(losses, flat, args64)
    if errors:
      which, err = next(iter(errors.items()))
      return verdict("gradient_check", expected=expected, details={"errors": errors})(
          "warn", f"{rules.STEP}: the {which} loss could not be traced in float64 ({err}): a "
          "part of the model pinned to float32 (e.g. an RNN carry or a constant created as "
          "float32)? Nothing was verified; check this model's gradients by hand.")
    inside = measure.compute_dtypes(losses, flat, args64)
    if inside and set(loss_dtypes.values()) == {"float64"}:  # float32 under a float64 output
      return _inconclusive(inside, expected=expected)
    tables, other = _measure(losses, flat, coords, args64, h=h, other_h=other_h,
                             always_other=bool(artifacts_dir), fail_above=fail_above,
                             warn_above=warn_above)
    cg = {"data": _check_grads(loss_fn_data, kink_fn, flat, args64)} if run_check_grads else {}
  return _verdict(tables, other, cg, loss_dtypes, h=h, coords_per_leaf=coords_per_leaf,
                  n_losses=len(losses), kink_detection=kink_fn is not None,
                  artifacts_dir=artifacts_dir, fail_above=fail_above, warn_above=warn_above)


def _check_grads(loss_fn_data: Callable, kink_fn: Optional[Callable], flat, args64) -> str:
  """`measure.check_grads_outcome` of the data loss on the flat parameter vector."""
  return measure.check_grads_outcome(measure.flat_loss(loss_fn_data, flat.rebuild), flat.theta,
                                     args64, kink_fn, flat.rebuild)


def _verdict(tables: dict, other: dict, cg: dict, loss_dtypes: dict, *, h: float,
             coords_per_leaf: int, n_losses: int, kink_detection: bool,
             artifacts_dir: Optional[str], fail_above: float,
             warn_above: float) -> CheckResult:
  """The CheckResult from the measured tables: details, picture, and `rules.decide`."""
  rows = tables["data"] + tables.get("reg", [])
  value = max(r["max_rel_error_no_kinks"] for r in rows)
  n_kinks = sum(r["kinks"] for r in rows)
  details = {"table": tables["data"], "reg_table": tables.get("reg", []), "h": float(h),
             "coords_per_leaf": coords_per_leaf, "check_grads": cg, "other_h": other,
             "kinks": n_kinks, "kink_detection": kink_detection, "loss_dtypes": loss_dtypes,
             "thresholds": {"fail": fail_above, "warn": warn_above,
                            "excellent": EXCELLENT_BELOW}}
  artifacts, plot_info = plot_errors(artifacts_dir, tables["data"], other, h, fail_above,
                                     warn_above)
  details.update(plot_info)
  kink_txt = f"; {n_kinks} coordinates crossed a kink and were not counted" if n_kinks else ""
  summary = (f"{len(rows) // max(n_losses, 1)} leaves x up to {coords_per_leaf} coordinates"
             f" ({sum(r['coords'] for r in tables['data'])} per loss), h={h:g}{kink_txt}")
  low_precision = {k: d for k, d in loss_dtypes.items() if d != "float64"}
  status, message = rules.decide(tables, cg, low_precision, value=value, summary=summary,
                                 fail_above=fail_above, warn_above=warn_above,
                                 kink_detection=kink_detection)
  return verdict("gradient_check", value=value, expected=f"< {EXCELLENT_BELOW:g} (float64)",
                 details=details, artifacts=artifacts)(status, message)


def _measure(losses: dict, flat, coords, args64, *, h: float, other_h: Sequence[float],
             always_other: bool, fail_above: float, warn_above: float) -> tuple[dict, dict]:
  """(tables at h per loss, {loss: {h2: {leaf: max error}}} at the other steps).

  The other steps are measured when the check does not pass at h, or for the picture
  (CS231n: "try other h"). One compiled runner per loss serves every step.
  """
  leaf_of, local_idx, idx = coords
  runners = {w: measure.make_runner(fn, flat.rebuild, kf) for w, (fn, kf) in losses.items()}

  def tables_at(step_h):
    out = {}
    for which in losses:
      numbers = measure.run_numbers(runners[which], flat.theta, idx, step_h, args64)
      out[which] = rules.table(flat.names, flat.shapes, leaf_of, local_idx, *numbers, step_h,
                               fail_above, warn_above)
      for r in out[which]:
        r["loss"] = which
    return out

  tables = tables_at(h)
  other = {}
  if always_other or rules.overall_status(tables["data"] + tables.get("reg", [])) != "pass":
    for h2 in other_h:
      for which, rows in tables_at(h2).items():
        other.setdefault(which, {})[float(h2)] = {r["leaf"]: r["max_rel_error_no_kinks"]
                                                  for r in rows}
  return tables, other


def _inconclusive(inside: dict, *, expected: str) -> CheckResult:
  """Skip, 'inconclusive': the model's products run below float64 under a float64 output.

  Nothing is measured: float32 rounding in every gradient (relative errors of 1e-3 and more
  are normal there) would read as a wrong backward rule under the float64 thresholds.
  """
  dtypes = sorted({d for ds in inside.values() for d in ds})
  details = {"compute_dtypes": inside, "loss_dtypes": {k: "float64" for k in inside}}
  return verdict("gradient_check", expected=expected, details=details)(
      "skip", f"{rules.STEP}: inconclusive: the model computes in {'/'.join(dtypes)} (its matrix "
      "products and convolutions stay "
      f"{'/'.join(dtypes)} when parameters and inputs are float64: a dtype=float32 layer or an "
      "astype at its input), then casts its output to float64; a float64 gradient check cannot "
      "resolve gradients carrying that rounding, so nothing was verified. To check it, let the "
      "model follow its input's dtype (dtype=None) for the check.")
