"""The CS231n gradient check: analytic gradients against centred differences, in float64.

CS231n, "gradient checks": compare the analytic gradient with the numeric one,
(f(x+h) - f(x-h)) / 2h with h about 1e-5, by the relative error |a - n| / max(|a|, |n|)
(passing when both are zero). Above 1e-2 the gradient is probably wrong; 1e-4..1e-2 is
uncomfortable; below 1e-4 is fine with kinks, but for smooth functions (tanh, softmax) 1e-4
is already too high; below 1e-7 is good. The procedure, as implemented here:

- double precision: parameters and inputs are cast to float64 inside a `jax.enable_x64`
  context that restores the previous setting on exit (nothing leaks into the process);
- a few coordinates of EVERY parameter leaf, biases included (they are a tiny share of one
  flat vector and random coordinates would miss them);
- the data loss and the regularisation loss are checked separately (two tables), so that
  regularisation cannot hide a wrong data gradient;
- randomness is held fixed by the caller: bind the same dropout key into the loss for
  f(x+h), f(x-h) and the analytic gradient (`gradient_check_model` does it);
- kinks: an optional `kink_fn` returns the "winners" (ReLU sign patterns, argmaxes); a
  coordinate whose pattern differs between x+h and x-h crossed a kink and is counted rather
  than failed (`relu_pattern` builds one for Linen models);
- the active float range: coordinates whose gradients are below 1e-10 are reported with
  their raw analytic and numeric values; when both are within float64 roundoff of zero
  (100 ulp of the loss / h) they are not compared (e.g. a bias before BatchNorm, whose
  true gradient is 0); if every coordinate is, the check warns (scale the loss up);
- double precision is verified, not assumed: a loss that comes out float32 from float64
  parameters (an `astype(float32)` in the model or loss) makes the check a warn
  ("inconclusive"), naming the cast's likely place;
- a systematic error (analytic = r x numeric on every sampled coordinate of a leaf, r != 1)
  is a fail even when r is within 1e-2 (a backward rule scaled wrong, e.g. by 1.01);
- `jax.test_util.check_grads` (one random direction, float64) is run as well and its outcome
  recorded; its default step moves every parameter at once and so often crosses ReLU kinks,
  so a failure is retried with smaller steps (1e-5, 1e-6) before it counts.

Check in a characteristic mode: the battery runs a short burn-in (a few optimizer steps)
before calling `gradient_check_model`, because at initialisation some gradients are
atypically small or the kinks atypically placed. Use few datapoints (fewer kinks, faster):
`gradient_check_model` keeps at most 8 examples.
"""

import contextlib
import inspect
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import jax.test_util  # pylint: disable=unused-import
import numpy as np
from flax import linen as nn

from jrecipe.checks import plots
from jrecipe.checks.base import CheckResult, artifact_path
from jrecipe.train.step import l2_penalty

FAIL_ABOVE = 1e-2
WARN_ABOVE = 1e-4
EXCELLENT_BELOW = 1e-7
TINY_GRAD = 1e-10
ROUNDOFF_FACTOR = 100.0  # |g| below 100 ulp(f) / h cannot be resolved by a centred difference
_SYSTEMATIC_SPREAD = 0.05  # deviations r - 1 agreeing within 5% of each other = systematic


@contextlib.contextmanager
def float64():
  """Context in which JAX computes in float64; restores the previous setting on exit.

  Recipe step: CS231n gradient checks, "use double precision".
  """
  with jax.enable_x64(True):
    yield


def _to_f64(tree):
  """Floating leaves as float64 host arrays (no per-leaf device kernels); others unchanged."""
  def cast(v):
    if isinstance(v, (jax.Array, np.ndarray, np.generic, float)):
      dtype = getattr(v, "dtype", np.dtype(float))
      if jnp.issubdtype(dtype, jnp.floating):
        return np.asarray(v, np.float64)
    return v
  return jax.tree.map(cast, tree)


def _leaf_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/") or "(root)"


def _rel_error(a: np.ndarray, n: np.ndarray) -> np.ndarray:
  denom = np.maximum(np.abs(a), np.abs(n))
  with np.errstate(invalid="ignore", divide="ignore"):
    rel = np.abs(a - n) / denom
  return np.where(denom == 0, 0.0, rel)


def _patterns_differ(p, q) -> jax.Array:
  diffs = [jnp.any(a != b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q))]
  return jnp.any(jnp.stack(diffs)) if diffs else jnp.array(False)


def _flat_loss(loss_fn: Callable, rebuild: Callable) -> Callable:
  def f(theta, args):
    return jnp.reshape(loss_fn(rebuild(theta), *args), ())
  return f


def _make_runner(loss_fn: Callable, rebuild: Callable, kink_fn: Optional[Callable]):
  """jit(theta, idx, h, args) -> (analytic[idx], f(x+h), f(x-h), kinked, (x+h)-(x-h)).

  One compilation; the coordinates run sequentially (lax.map) so memory stays at one
  forward pass whatever their number.
  """
  f = _flat_loss(loss_fn, rebuild)

  @jax.jit
  def run(theta, idx, h, args):
    analytic = jax.grad(f)(theta, args)[idx]

    def one(i):
      plus, minus = theta.at[i].add(h), theta.at[i].add(-h)
      kinked = (_patterns_differ(kink_fn(rebuild(plus), *args), kink_fn(rebuild(minus), *args))
                if kink_fn is not None else jnp.array(False))
      return f(plus, args), f(minus, args), kinked, plus[i] - minus[i]

    fp, fm, kinked, step = jax.lax.map(one, idx)
    return analytic, fp, fm, kinked, step

  return run


def _run_numbers(run, theta, idx, h, args):
  a, fp, fm, k, step = run(theta, idx, jnp.asarray(h, jnp.float64), args)
  a, fp, fm, step = (np.asarray(v, np.float64) for v in (a, fp, fm, step))
  # Smallest gradient the centred difference resolves: float64 roundoff in f(x+-h) / h.
  resolution = ROUNDOFF_FACTOR * np.finfo(np.float64).eps * np.maximum(
      np.maximum(np.abs(fp), np.abs(fm)), np.finfo(np.float64).tiny) / h
  # Centred difference over the step actually taken ((x+h) - (x-h) is 2h up to rounding).
  return a, (fp - fm) / step, np.asarray(k, bool), resolution


def _table(names, shapes, leaf_of, local_idx, a, n, kinked, resolution, h, fail_above,
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


def _check_grads_outcome(f_flat: Callable, theta: np.ndarray, args) -> str:
  """jax.test_util.check_grads on the flat parameter vector (one leaf: few eager kernels).

  Its default float64 step (1e-4 on every parameter at once) often crosses ReLU kinks; on a
  failure it is retried with smaller steps ("try other h"): a wrong rule fails at every step.
  """
  fn = jax.jit(lambda th: f_flat(th, args))
  first = None
  for eps in (None, 1e-5, 1e-6):
    try:
      jax.test_util.check_grads(fn, (jnp.asarray(theta),), order=1, modes=("rev",), eps=eps)
      if first is None:
        return "passed"
      return (f"passed at eps={eps:g} (failed at the default eps: kinks or curvature crossed "
              f"by its step on all parameters at once: {first})")
    except AssertionError as e:
      lines = [l.strip() for l in str(e).splitlines() if l.strip()]
      text = " ".join(l for l in lines if "difference" in l or "ACTUAL" in l or "DESIRED" in l)
      first = first or text[:200]
    except Exception as e:  # pylint: disable=broad-except
      return f"error: {type(e).__name__}: {str(e)[:200]}"
  return f"failed at eps=default, 1e-05 and 1e-06: {first}"


def _seed(rng) -> np.random.Generator:
  if isinstance(rng, np.random.Generator):
    return rng
  if isinstance(rng, jax.Array):
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())
  return np.random.default_rng(0 if rng is None else rng)


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
  name = "gradient_check"
  step = "gradient_check (CS231n gradient checks, float64 centred differences)"
  np_rng = _seed(rng)
  with float64():
    params64 = _to_f64(params)
    args64 = tuple(_to_f64(tuple(args)))
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params64)
    leaves = [v for _, v in path_leaves]
    float_pos = [k for k, v in enumerate(leaves)
                 if isinstance(v, np.ndarray) and v.dtype == np.float64 and v.size > 0]
    names = [_leaf_name(path_leaves[k][0]) for k in float_pos]
    shapes = [tuple(leaves[k].shape) for k in float_pos]
    if not float_pos:
      return CheckResult(name, "skip", message=f"{step}: no floating parameters to check.")
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = np.cumsum([0] + sizes[:-1])
    theta = np.concatenate([np.ravel(leaves[k]) for k in float_pos])

    def rebuild(th):
      new = list(leaves)
      for k, o, size, shape in zip(float_pos, offsets, sizes, shapes):
        new[k] = jnp.reshape(th[o:o + size], shape)
      return jax.tree_util.tree_unflatten(treedef, new)

    leaf_of, local_idx = [], []
    for leaf, size in enumerate(sizes):
      chosen = np.sort(np_rng.choice(size, size=min(coords_per_leaf, size), replace=False))
      leaf_of += [leaf] * len(chosen)
      local_idx += chosen.tolist()
    leaf_of, local_idx = np.asarray(leaf_of), np.asarray(local_idx)
    idx = jnp.asarray(offsets[leaf_of] + local_idx)

    losses = {"data": (loss_fn_data, kink_fn)}
    if loss_fn_reg is not None:
      losses["reg"] = (loss_fn_reg, None)
    # Double precision end to end? A float32 cast in the model or loss defeats the check.
    loss_dtypes, errors = {}, {}
    for which, (fn, kf) in losses.items():
      try:
        loss_dtypes[which] = str(jax.eval_shape(_flat_loss(fn, rebuild), theta, args64).dtype)
        if kf is not None:
          jax.eval_shape(lambda th, a, kf=kf: kf(rebuild(th), *a), theta, args64)
      except Exception as e:  # pylint: disable=broad-except
        errors[which] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if errors:
      which, err = next(iter(errors.items()))
      return CheckResult(name, "warn", None, f"< {EXCELLENT_BELOW:g} (float64)", (
          f"{step}: the {which} loss could not be traced in float64 ({err}): a part of the "
          "model pinned to float32 (e.g. an RNN carry or a constant created as float32)? "
          "Nothing was verified; check this model's gradients by hand."),
          details={"errors": errors})
    low_precision = {k: d for k, d in loss_dtypes.items() if d != "float64"}
    tables, runners, numbers, cg = {}, {}, {}, {}
    for which, (fn, kf) in losses.items():
      runners[which] = _make_runner(fn, rebuild, kf)
      numbers[which] = _run_numbers(runners[which], theta, idx, h, args64)
      tables[which] = _table(names, shapes, leaf_of, local_idx, *numbers[which], h,
                             fail_above, warn_above)
      for r in tables[which]:
        r["loss"] = which
      if run_check_grads and which == "data":
        cg[which] = _check_grads_outcome(_flat_loss(fn, rebuild), theta, args64)

    rows = tables["data"] + tables.get("reg", [])
    statuses = [r["status"] for r in rows]
    status = "fail" if "fail" in statuses else "warn" if "warn" in statuses else "pass"
    other = {}
    if status != "pass" or artifacts_dir:
      for h2 in other_h:
        for which in losses:
          t2 = _table(names, shapes, leaf_of, local_idx,
                      *_run_numbers(runners[which], theta, idx, h2, args64), h2, fail_above,
                      warn_above)
          other.setdefault(which, {})[float(h2)] = {r["leaf"]: r["max_rel_error_no_kinks"]
                                                    for r in t2}

  value = max(r["max_rel_error_no_kinks"] for r in rows)
  n_kinks = sum(r["kinks"] for r in rows)
  n_coords = sum(r["coords"] for r in tables["data"])
  details = {"table": tables["data"], "reg_table": tables.get("reg", []), "h": float(h),
             "coords_per_leaf": coords_per_leaf, "check_grads": cg, "other_h": other,
             "kinks": n_kinks, "kink_detection": kink_fn is not None,
             "loss_dtypes": loss_dtypes,
             "thresholds": {"fail": fail_above, "warn": warn_above,
                            "excellent": EXCELLENT_BELOW}}
  artifacts = []
  path = artifact_path(artifacts_dir, "gradient_check.png")
  if path:
    try:
      series = {}
      for r in tables["data"]:
        hs = sorted([float(h)] + list(other.get("data", {})))
        errs = [r["max_rel_error_no_kinks"] if hh == float(h) else other["data"][hh][r["leaf"]]
                for hh in hs]
        series[r["leaf"]] = (hs, [max(e, 1e-17) for e in errs])
      plots.line_plot(path, series, title="data loss: max relative error per leaf",
                      xlabel="h", ylabel="relative error", logx=True, logy=True,
                      hlines=(fail_above, warn_above, EXCELLENT_BELOW))
      artifacts.append(path)
    except Exception as e:  # pylint: disable=broad-except
      details["plot_error"] = f"{type(e).__name__}: {e}"

  def where(r):
    return f"{'regularisation' if r['loss'] == 'reg' else 'data'} loss, leaf {r['leaf']}"

  kink_txt = f"; {n_kinks} coordinates crossed a kink and were not counted" if n_kinks else ""
  summary = (f"{len(rows) // max(len(losses), 1)} leaves x up to {coords_per_leaf} coordinates"
             f" ({n_coords} per loss), h={h:g}{kink_txt}")
  if low_precision:
    which = ", ".join(low_precision)
    r = max(rows, key=lambda r: r["max_rel_error_no_kinks"])
    msg = (f"{step}: the {which} loss is computed in {', '.join(set(low_precision.values()))} "
           "although parameters and inputs are float64 (an astype(float32) or dtype=float32 in "
           "the model or loss): a gradient check needs double precision, so the errors measured "
           f"(max {value:.2g}, in {where(r)}) are not conclusive; " + summary)
    return CheckResult(name, "warn", value, f"< {EXCELLENT_BELOW:g} (float64)", msg, artifacts,
                       details)
  cg_txt = ("; jax.test_util.check_grads also failed" if cg.get("data", "").startswith("failed")
            else "")
  if status == "fail":
    sys_rows = [r for r in rows if r["systematic_ratio"] is not None]
    if sys_rows:
      r = sys_rows[0]
      ratio = r["systematic_ratio"]
      what = ("the wrong sign in a backward rule" if ratio < 0 else
              "a backward rule scaled wrong (a custom_vjp, a missing or extra factor?)")
      msg = (f"{step}: analytic = {ratio:.6g} x numeric on every sampled coordinate of "
             f"{where(r)} (max relative error {r['max_rel_error_no_kinks']:.2g}): {what}"
             f"{cg_txt}; " + summary)
    else:
      r = max((r for r in rows if r["status"] == "fail"), key=lambda r: r["max_rel_error_no_kinks"])
      msg = (f"{step}: relative error {r['max_rel_error_no_kinks']:.2g} > {fail_above:g} in "
             f"{where(r)}: the analytic gradient is probably wrong (a custom_vjp rule, a "
             "stop_gradient, randomness not held fixed, a non-differentiable op?)"
             f"{cg_txt}; " + summary)
    return CheckResult(name, "fail", value, f"< {EXCELLENT_BELOW:g} (float64)", msg, artifacts,
                       details)
  if status == "warn":
    r = max((r for r in rows if r["status"] == "warn"), key=lambda r: r["max_rel_error_no_kinks"])
    msg = (f"{step}: relative error {r['max_rel_error_no_kinks']:.2g} in {where(r)} is "
           f"uncomfortable ({warn_above:g}..{fail_above:g}); a smooth model gives < "
           f"{EXCELLENT_BELOW:g} in float64: suspect the backward rule, undetected kinks "
           "(pass a kink_fn), or h (see details['other_h']); " + summary)
    return CheckResult(name, "warn", value, f"< {EXCELLENT_BELOW:g} (float64)", msg, artifacts,
                       details)
  resolvable = [c for r in tables["data"] for c in r["samples"] if not c["unresolved"]]
  if not resolvable:
    top = max(r["max_abs_grad"] for r in tables["data"])
    msg = (f"{step}: every sampled data-loss gradient is within float64 roundoff of zero "
           f"(largest |g| {top:.2g}; raw values in details['table'][i]['tiny']): outside the "
           "active float range, nothing was verified: scale the loss up, or does the loss "
           "depend on the parameters at all?; " + summary)
    return CheckResult(name, "warn", value, f"< {EXCELLENT_BELOW:g} (float64)", msg, artifacts,
                       details)
  failed_cg = {k: v for k, v in cg.items() if not v.startswith("passed")}
  explained_cg = ""
  if failed_cg and n_kinks:
    # CS231n: kinks make the numeric gradient wrong where x+h and x-h straddle one; the
    # sampled coordinates (kinks tracked) agree, so check_grads' one random direction
    # through every ReLU at once is reported, not failed.
    explained_cg = (f"; check_grads' random direction failed for the "
                    f"{', '.join(failed_cg)} loss, explained by the kinks crossed")
    failed_cg = {}
  if failed_cg:
    why = " (kinks crossed: likely the cause)" if n_kinks else ""
    msg = (f"{step}: sampled coordinates agree (max relative error {value:.2g}) but "
           f"jax.test_util.check_grads failed for the {', '.join(failed_cg)} loss{why}: "
           "check the full-vector gradient; " + summary)
    return CheckResult(name, "warn", value, f"< {EXCELLENT_BELOW:g} (float64)", msg, artifacts,
                       details)
  grade = (f"excellent (< {EXCELLENT_BELOW:g})" if value < EXCELLENT_BELOW else
           f"acceptable (< {warn_above:g}; < {EXCELLENT_BELOW:g} is expected in float64 "
           "without kinks)")
  zero = [r["leaf"] for r in tables["data"] if r["unresolved"] == r["coords"]]
  zero_txt = (f"; zero gradient within roundoff for {', '.join(zero)} (a bias before "
              "BatchNorm, an attention key bias, dead units, an unused parameter?)"
              if zero else "")
  cg_pass = ("" if not cg else "; check_grads passed" if cg.get("data") == "passed" else
             "; check_grads passed with a smaller step (its default crossed kinks)")
  if explained_cg:
    cg_pass = explained_cg
  msg = (f"{step}: max relative error {value:.2g}, {grade}, over {summary}{cg_pass}"
         f"{zero_txt}.")
  return CheckResult(name, "pass", value, f"< {EXCELLENT_BELOW:g} (float64)", msg, artifacts,
                     details)


def _takes_train(module: nn.Module) -> bool:
  try:
    return "train" in inspect.signature(module.__call__).parameters
  except (TypeError, ValueError):
    return False


def relu_pattern(apply: Any, variables: Any, x: jax.Array, *, train: bool = False,
                 rngs: Optional[dict] = None) -> dict:
  """The sign pattern (> 0) of the output of every Linen module called by a model.

  Recipe step: CS231n gradient checks, "kinks": track the winners of each max. For a ReLU
  the winner is the sign of its input, i.e. of the preceding Dense/Conv/BatchNorm output;
  parameter values with the same pattern lie on the same linear piece. Use it as the
  `kink_fn` of `gradient_check`:
  `kink_fn=lambda p: relu_pattern(apply, {**variables, 'params': p}, x)`.

  Every Linen module's `__call__` output is recorded with `flax.linen.intercept_methods`
  while the model runs, so the model runs exactly as in the loss (same adapter, same
  dropout stream) and any apply built on Linen works, not only a bare module.

  Limits (pass your own `kink_fn` when they matter): only module outputs are seen, so a ReLU
  applied to a tensor that no module returns (after a residual addition, `x * 2`) is caught
  only through the module outputs that feed it; max-pooling winners (`nn.max_pool` is a
  function), hinge-loss margins and `abs` are not tracked; outputs of modules inside lifted
  transforms (nn.scan, nn.remat, nn.vmap, RNN cells) are skipped; sign flips of outputs
  that feed no ReLU (a tanh layer, the logits) count as kinks too, which only excuses the
  rare coordinate whose pre-activation crosses zero within +-h. NNX models are not seen.

  Args:
    apply: the model's pure apply `apply(variables, x, train=..., rngs=...)` (a
      `jrecipe.types.Model` or its `.apply` also work), or a bare Linen module (called
      with `train` when its `__call__` takes it; BatchNorm updates discarded).
    variables: the model's variables ({'params': ..., maybe 'batch_stats': ...}).
    x: the batch.
    train: the mode (the same as the loss being checked).
    rngs: rngs for train mode (the same dropout key as the loss being checked).

  Returns:
    {'<module path>:<k>': boolean array} for the k-th call of each module (jit-able).
  """
  records = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      path = "/".join(str(p) for p in (getattr(context.module, "path", None) or ()))
      records.append((path or type(context.module).__name__, out))
    return out

  with nn.intercept_methods(interceptor):
    if isinstance(apply, nn.Module):
      kw = {"train": train} if _takes_train(apply) else {}
      mutable = [k for k in variables if k != "params"] if train else False
      result = apply.apply(variables, x, rngs=rngs, mutable=mutable, **kw)
    else:
      fn = apply.apply if callable(getattr(apply, "apply", None)) else apply
      result = fn(variables, x, train=train, rngs=rngs)
  # Values recorded inside a lifted transform (nn.scan, nn.remat, ...) belong to that
  # transform's trace, not ours: keep only values of the trace the model's output lives in.
  top = next(iter(jax.tree.leaves(result)), None)
  top_trace = getattr(top, "_trace", None) if isinstance(top, jax.core.Tracer) else None

  def visible(leaf):
    if not isinstance(leaf, jax.core.Tracer):
      return not isinstance(top, jax.core.Tracer)
    return top_trace is not None and getattr(leaf, "_trace", None) is top_trace

  pattern, counts = {}, {}
  for path, out in records:
    for leaf in jax.tree.leaves(out):
      if not (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)):
        continue
      if not visible(leaf):
        continue
      k = counts[path] = counts.get(path, -1) + 1
      pattern[f"{path}:{k}"] = leaf > 0
  return pattern


def gradient_check_model(model: Any, loss: Any, variables: Any, batch: dict, *, l2: float = 0.0,
                         rng: Optional[jax.Array] = None, h: float = 1e-5,
                         coords_per_leaf: int = 4, seed: int = 0,
                         kink_fn: Union[str, Callable, None] = "auto", max_examples: int = 8,
                         artifacts_dir: Optional[str] = None, **kwargs) -> CheckResult:
  """`gradient_check` for a jrecipe Model and Loss on (a few examples of) a batch.

  Recipe step: CS231n gradient checks, in a characteristic mode: call it after a short
  burn-in (the battery does), on few datapoints (at most `max_examples`), in train mode with
  randomness fixed (the same dropout key for f(x+h), f(x-h) and the analytic gradient),
  BatchNorm normalising with the batch statistics (as in training; the updated running
  statistics are discarded), data loss and L2 regularisation checked separately.

  Args:
    model: a `jrecipe.types.Model` (uses `apply_with_state` and, for kinks, `module`).
    loss: a `jrecipe.types.Loss`; the data loss is mean(loss.per_example(outputs, y)).
    variables: {'params': ..., maybe 'batch_stats': ...}.
    batch: {'x': inputs, 'y': labels} (other keys ignored).
    l2: the L2 strength; the regularisation loss l2 * l2_penalty(params) is checked when > 0.
    rng: the fixed dropout key (default jax.random.key(0)).
    h, coords_per_leaf: as in `gradient_check`.
    seed: seed of the coordinate sampling.
    kink_fn: 'auto' (`relu_pattern` through `model.apply` when the model wraps a Linen
      module, else none), None, or `kink_fn(params, x, y, state) -> pattern`.
    max_examples: examples of the batch used.
    artifacts_dir: where to write `gradient_check.png` (None: no files).
    **kwargs: passed to `gradient_check` (fail_above, warn_above, other_h, ...).

  Returns:
    The `gradient_check` CheckResult.
  """
  rngs = {"dropout": rng if rng is not None else jax.random.key(0)}
  x = jnp.asarray(batch["x"])[:max_examples]
  y = jnp.asarray(batch["y"])[:max_examples]
  state = {k: v for k, v in variables.items() if k != "params"}

  def data_loss(params, x, y, state):
    out, _ = model.apply_with_state({"params": params, **state}, x, True, rngs)
    return jnp.mean(loss.per_example(out, y))

  def reg_loss(params, x, y, state):
    del x, y, state
    return l2 * l2_penalty(params)

  if kink_fn == "auto":
    if isinstance(getattr(model, "module", None), nn.Module):
      def kink_fn(params, x, y, state):  # pylint: disable=function-redefined
        del y
        return relu_pattern(model.apply, {"params": params, **state}, x, train=True,
                            rngs=rngs)
    else:
      kink_fn = None
  result = gradient_check(data_loss, reg_loss if l2 else None, variables["params"], h=h,
                          coords_per_leaf=coords_per_leaf, rng=seed, kink_fn=kink_fn,
                          args=(x, y, state), artifacts_dir=artifacts_dir, **kwargs)
  if result.details.get("loss_dtypes", {}).get("data", "float64") != "float64":
    with float64():
      out = jax.eval_shape(
          lambda p, xx, st: model.apply_with_state({"params": p, **st}, xx, True, rngs)[0],
          _to_f64(variables["params"]), _to_f64(x), _to_f64(state))
    dtypes = sorted({str(o.dtype) for o in jax.tree.leaves(out)})
    where = (f"the loss {getattr(loss, 'name', '')!r} casts the model's float64 outputs down "
             "(astype(float32) in per_example?)" if dtypes == ["float64"] else
             f"the model outputs {'/'.join(dtypes)} (dtype=float32 or astype(float32) in a layer?)")
    result.message += f"; {where}"
    result.details["output_dtypes"] = dtypes
  result.details["examples"] = int(x.shape[0])
  result.details["l2"] = float(l2)
  return result
