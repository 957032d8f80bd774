"""Verdict rules of the gradient check: per-leaf tables and CS231n's thresholds.

CS231n: relative error |a - n| / max(|a|, |n|) (0 when both are 0). Above 1e-2 the gradient
is probably wrong; 1e-4..1e-2 is uncomfortable; below 1e-4 is fine with kinks, but for smooth
functions (tanh, softmax) 1e-4 is already too high; below 1e-7 is good. Besides: a systematic
error (analytic = r x numeric on every sampled coordinate of a leaf, r != 1) fails even
within 1e-2 (a backward rule scaled wrong); coordinates that crossed a kink, or whose both
gradients are within float64 roundoff of zero, are counted, not compared.
"""

import numpy as np

from jrecipe.checks.gradcheck.measure import KINKS_CROSSED

FAIL_ABOVE = 1e-2
WARN_ABOVE = 1e-4
EXCELLENT_BELOW = 1e-7
TINY_GRAD = 1e-10
_SYSTEMATIC_SPREAD = 0.05  # deviations r - 1 agreeing within 5% of each other = systematic
STEP = "gradient_check (CS231n gradient checks, float64 centred differences)"


def _rel_error(a: np.ndarray, n: np.ndarray) -> np.ndarray:
  denom = np.maximum(np.abs(a), np.abs(n))
  with np.errstate(invalid="ignore", divide="ignore"):
    rel = np.abs(a - n) / denom
  return np.where(denom == 0, 0.0, rel)


def table(names, shapes, leaf_of, local_idx, a, n, kinked, resolution, h, fail_above,
           warn_above):
  """Per-leaf rows: errors over the coordinates that crossed no kink and are resolvable."""
  rel = _rel_error(a, n)
  big = np.maximum(np.abs(a), np.abs(n))
  unresolved = big <= resolution  # both within roundoff of zero: agreement assumed
  tiny = (big < TINY_GRAD) | unresolved
  rows = []
  for leaf, name in enumerate(names):
    sel = np.nonzero(leaf_of == leaf)[0]
    if sel.size == 0:
      continue
    samples, tiny_rows = [], []
    for c in sel:
      index = tuple(int(v) for v in np.unravel_index(local_idx[c], shapes[leaf]))
      samples.append({"index": index, "analytic": float(a[c]), "numeric": float(n[c]),
                      "rel_error": float(rel[c]), "kink": bool(kinked[c]),
                      "unresolved": bool(unresolved[c])})
      if tiny[c]:
        tiny_rows.append({"index": index, "analytic": float(a[c]), "numeric": float(n[c]),
                          "resolution": float(resolution[c])})
    counted = [c for c in sel if not kinked[c] and not unresolved[c]]
    worst = float(np.max(rel[counted])) if counted else 0.0
    status = "fail" if worst > fail_above else "warn" if worst > warn_above else "pass"
    # A systematic ratio analytic/numeric != 1 on every counted coordinate = a scaled rule.
    systematic = None
    off = [c for c in counted if rel[c] > warn_above and n[c] != 0]
    if len(off) >= 2 and len(off) == len(counted):
      dev = a[off] / n[off] - 1.0
      mean_dev = float(np.mean(dev))
      if np.all(np.sign(dev) == np.sign(mean_dev)) and \
          np.max(np.abs(dev - mean_dev)) <= _SYSTEMATIC_SPREAD * abs(mean_dev):
        systematic = 1.0 + mean_dev
        status = "fail"
    rows.append({
        "leaf": name, "shape": tuple(shapes[leaf]), "max_rel_error": float(np.max(rel[sel])),
        "max_rel_error_no_kinks": worst, "h": float(h), "coords": int(sel.size),
        "kinks": int(np.sum(kinked[sel])), "unresolved": int(np.sum(unresolved[sel])),
        "max_abs_grad": float(np.max(big[sel])), "tiny": tiny_rows,
        "systematic_ratio": systematic, "status": status, "samples": samples})
  return rows


def overall_status(rows: list) -> str:
  """fail if any leaf fails, else warn if any warns, else pass."""
  statuses = [r["status"] for r in rows]
  return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "pass"


def _where(r: dict) -> str:
  return f"{'regularisation' if r['loss'] == 'reg' else 'data'} loss, leaf {r['leaf']}"


def _worst(rows: list, status: str) -> dict:
  return max((r for r in rows if r["status"] == status),
             key=lambda r: r["max_rel_error_no_kinks"])


def decide(tables: dict, cg: dict, low_precision: dict, *, value: float, summary: str,
           fail_above: float, warn_above: float,
           kink_detection: bool = True) -> tuple[str, str]:
  """(status, message) of the gradient check from its tables (see `gradient_check`).

  Args:
    tables: {'data': rows, maybe 'reg': rows} from `table` (rows carry their 'loss').
    cg: {'data': outcome of jax.test_util.check_grads} ({} when not run).
    low_precision: {loss: dtype} of the losses computed below float64.
    value: the largest counted relative error; summary: what was sampled, in words.
    fail_above, warn_above: the thresholds used.
    kink_detection: whether kinks were tracked (a `kink_fn`); without it, check_grads'
      direction through every ReLU at once can fail with no kink counted.
  """
  rows = tables["data"] + tables.get("reg", [])
  status = overall_status(rows)
  if low_precision:
    r = max(rows, key=lambda r: r["max_rel_error_no_kinks"])
    return "warn", (
        f"{STEP}: the {', '.join(low_precision)} loss is computed in "
        f"{', '.join(set(low_precision.values()))} although parameters and inputs are float64 "
        "(an astype(float32) or dtype=float32 in the model or loss): a gradient check needs "
        f"double precision, so the errors measured (max {value:.2g}, in {_where(r)}) are not "
        "conclusive; " + summary)
  cg_txt = ("; jax.test_util.check_grads also failed" if cg.get("data", "").startswith("failed")
            else "")
  if status == "fail":
    return "fail", _fail_message(rows, fail_above, cg_txt, summary)
  if status == "warn":
    r = _worst(rows, "warn")
    return "warn", (
        f"{STEP}: relative error {r['max_rel_error_no_kinks']:.2g} in {_where(r)} is "
        f"uncomfortable ({warn_above:g}..{fail_above:g}); a smooth model gives < "
        f"{EXCELLENT_BELOW:g} in float64: suspect the backward rule, undetected kinks (pass a "
        "kink_fn), or h (see details['other_h']); " + summary)
  return _agreeing(tables, cg, value=value, summary=summary, warn_above=warn_above,
                   kink_detection=kink_detection)


def _fail_message(rows: list, fail_above: float, cg_txt: str, summary: str) -> str:
  """A systematic ratio names a scaled backward rule; otherwise the worst relative error."""
  sys_rows = [r for r in rows if r["systematic_ratio"] is not None]
  if sys_rows:
    r = sys_rows[0]
    ratio = r["systematic_ratio"]
    what = ("the wrong sign in a backward rule" if ratio < 0 else
            "a backward rule scaled wrong (a custom_vjp, a missing or extra factor?)")
    return (f"{STEP}: analytic = {ratio:.6g} x numeric on every sampled coordinate of "
            f"{_where(r)} (max relative error {r['max_rel_error_no_kinks']:.2g}): {what}"
            f"{cg_txt}; " + summary)
  r = _worst(rows, "fail")
  return (f"{STEP}: relative error {r['max_rel_error_no_kinks']:.2g} > {fail_above:g} in "
          f"{_where(r)}: the analytic gradient is probably wrong (a custom_vjp rule, a "
          "stop_gradient, randomness not held fixed, a non-differentiable op?)"
          f"{cg_txt}; " + summary)


def _agreeing(tables: dict, cg: dict, *, value: float, summary: str, warn_above: float,
              kink_detection: bool = True) -> tuple[str, str]:
  """Every counted coordinate agrees: pass, unless nothing was resolvable or check_grads'
  full-vector direction failed where tracked kinks cannot explain it (warn). Without kink
  tracking (NNX and user models) a failed direction with every sampled coordinate agreeing
  below `warn_above` is reported, not warned: the direction crosses every ReLU at once."""
  n_kinks = sum(r["kinks"] for rows in tables.values() for r in rows)
  resolvable = [c for r in tables["data"] for c in r["samples"] if not c["unresolved"]]
  if not resolvable:
    top = max(r["max_abs_grad"] for r in tables["data"])
    return "warn", (
        f"{STEP}: every sampled data-loss gradient is within float64 roundoff of zero (largest "
        f"|g| {top:.2g}; raw values in details['table'][i]['tiny']): outside the active float "
        "range, nothing was verified: scale the loss up, or does the loss depend on the "
        "parameters at all?; " + summary)
  failed_cg = {k: v for k, v in cg.items() if not v.startswith("passed")}
  explained = {k for k, v in failed_cg.items() if KINKS_CROSSED in v}
  if set(failed_cg) - explained and not n_kinks and (kink_detection or value >= warn_above):
    return "warn", (
        f"{STEP}: sampled coordinates agree (max relative error {value:.2g}) but "
        f"jax.test_util.check_grads failed for the {', '.join(failed_cg)} loss: check the "
        "full-vector gradient; " + summary)
  if failed_cg:
    # CS231n: kinks make the numeric gradient wrong where x+h and x-h straddle one; the
    # sampled coordinates (kinks tracked) agree, so check_grads' one random direction
    # through every ReLU at once is reported, not failed.
    why = ("explained by the kinks crossed" if n_kinks else "explained by the ReLU kinks its "
           "own direction crosses" if explained else "kinks are not tracked for this model, "
           "and its ReLUs are crossed by a step on every parameter at once")
    cg_txt = (f"; check_grads' random direction failed for the {', '.join(failed_cg)} loss, "
              f"{why}")
  else:
    cg_txt = ("" if not cg else "; check_grads passed" if cg.get("data") == "passed" else
              "; check_grads passed with a smaller step (its default crossed kinks)")
  grade = (f"excellent (< {EXCELLENT_BELOW:g})" if value < EXCELLENT_BELOW else
           f"acceptable (< {warn_above:g}; < {EXCELLENT_BELOW:g} is expected in float64 "
           "without kinks)")
  zero = [r["leaf"] for r in tables["data"] if r["unresolved"] == r["coords"]]
  zero_txt = (f"; zero gradient within roundoff for {', '.join(zero)} (a bias before "
              "BatchNorm, an attention key bias, dead units, an unused parameter?)"
              if zero else "")
  return "pass", (f"{STEP}: max relative error {value:.2g}, {grade}, over {summary}{cg_txt}"
                  f"{zero_txt}.")

