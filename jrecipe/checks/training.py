"""The sanity checks that train or evaluate a model, and the tiny jitted trainer they share.

Karpathy's stage 2 ('set up the end-to-end skeleton and get dumb baselines') and CS231n's
'sanity checks before optimizing', as plain functions of a `Model`, a `Loss`, variables and
arrays, so a researcher can call them from their own pytest suite:

  seed_determinism               'fix the random seed'
  loss_at_init                   'verify loss @ init'
  init_bias                      'init well'
  regularization_increases_loss  CS231n: 'increasing the regularization strength should
                                 increase the loss'
  input_independent_baseline     'input-independent baseline'
  overfit_one_batch              'overfit one batch'
  capacity_decreases_loss        'verify decreasing training loss' (a bigger model goes lower)

Compile time dominates short runs on a small CPU, so `fit` jits one train step per
(model, loss, optimizer, l2, augmentation, batch size) and keeps it in a module cache: the
real-input and zeroed-input runs of the baseline, every seed of a determinism run and every
check that trains the same model with the same `tx` object reuse one compiled step. The cache
is keyed on object identity (the model's apply functions, the loss's functions, the `tx` and
`augment` objects): build them once and pass the same objects to share compiled steps.

How outputs are measured (`evaluate`): models without BatchNorm run in eval mode (dropout
off); models with BatchNorm run in train mode, with batch statistics, because the running
averages of a short run (or of an initialisation) are not yet the statistics of the data.
"""

import collections
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jrecipe import optim
from jrecipe.checks.base import CheckResult, artifact_path
from jrecipe.train.state import create_state, variables_of
from jrecipe.train.step import StepParts, l2_penalty, make_train_step
from jrecipe.types import Loss, Model

# Tolerances, with the reasoning in each check's docstring.
INIT_LOSS_PASS_REL = 0.15  # loss_at_init: pass within 15% of the reference...
INIT_LOSS_FAIL_REL = 0.50  # ...warn up to 50%, fail beyond
INIT_LOSS_ATOL = 0.05  # absolute band for references near zero (regression)
BASE_RATE_TV = 0.05  # init_bias: total variation between predicted and label frequencies
BASELINE_LOSS_MARGIN = 0.10  # input_independent_baseline: real inputs >= 10% lower loss
BASELINE_ACC_MARGIN = 0.01  # ...or accuracy at least 1 point and 3 standard errors higher
OVERFIT_ABS = 0.01  # overfit_one_batch: final loss below max(0.01, 1% of the init loss)
OVERFIT_REL = 0.01
CAPACITY_DECREASE = 0.01  # capacity_decreases_loss: the loss must fall by at least 1%
CAPACITY_WIDER_MARGIN = 0.02  # the wider model must end at least 2% lower (else warn)

_CACHE_SIZE = 64
_cache: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


def clear_cache() -> None:
  """Drops every compiled train/eval function `fit` and the checks keep."""
  _cache.clear()


def _cached(kind: str, objects: tuple, extra: tuple, build: Callable):
  """A function built once per (kind, identity of objects, extra) and kept (LRU)."""
  key = (kind,) + tuple(id(o) for o in objects) + tuple(extra)
  hit = _cache.get(key)
  if hit is not None:
    _cache.move_to_end(key)
    return hit[1]
  fn = build()
  _cache[key] = (objects, fn)  # holding the objects keeps their ids from being reused
  while len(_cache) > _CACHE_SIZE:
    _cache.popitem(last=False)
  return fn


def as_key(rng: Any) -> jax.Array:
  """An int seed or a PRNG key -> a raw uint32[2] key."""
  if isinstance(rng, (int, np.integer)):
    return jax.random.PRNGKey(int(rng))
  return rng


class _NoScheduleState(NamedTuple):
  """Where `optim.current_learning_rate` finds a rate for an optimizer without one (NaN)."""
  hyperparams: dict


def _with_lr_slot(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` plus an empty learning-rate slot, so any optax optimizer works in the train step.

  The train step reports the learning rate from optax.inject_hyperparams state (what
  `optim.make_optimizer` builds); a plain `optax.adam(1e-3)` has none, so we add one (NaN).
  """

  def init(params):
    return (tx.init(params), _NoScheduleState({"learning_rate": jnp.full((), jnp.nan)}))

  def update(updates, state, params=None):
    updates, inner = tx.update(updates, state[0], params)
    return updates, (inner, state[1])

  return optax.GradientTransformation(init, update)


def _has_lr(tx, params) -> bool:
  try:
    optim.current_learning_rate(jax.eval_shape(tx.init, params))
    return True
  except ValueError:
    return False


def _train_step_fn(model: Model, loss: Loss, tx, l2: float, augment, batch_size, params):
  """(jitted `run(state, x, y, data_key) -> (state, metrics)`, the tx the state must use)."""

  def build():
    tx_used = tx if _has_lr(tx, params) else _with_lr_slot(tx)
    step = make_train_step(StepParts(model, loss, tx_used, augment=augment, l2=l2))

    def run(state, x, y, data_key):
      n = x.shape[0]
      if batch_size is not None and batch_size < n:
        k = jax.random.fold_in(data_key, state.step)
        idx = jax.random.choice(k, n, (batch_size,), replace=False)
        batch = {"x": x[idx], "y": y[idx]}
      else:
        batch = {"x": x, "y": y}
      state, metrics = step(state, batch)
      out = {"loss": metrics["loss"], "total_loss": metrics["total_loss"]}
      if "accuracy" in metrics:
        out["accuracy"] = metrics["accuracy"]
      return state, out

    return jax.jit(run), tx_used

  # Keyed on the functions the step calls, so Model/Loss copies that share them share it.
  return _cached("train", (model.apply_with_state, loss.per_example, loss.correct, tx, augment),
                 (float(l2), batch_size), build)


def fit_metrics(model: Model, loss: Loss, variables: dict, x, y, *, tx, steps: int, rng,
                l2: float = 0.0, batch_size: Optional[int] = None,
                augment: Optional[Callable] = None) -> tuple[dict, dict]:
  """`fit`, returning every per-step metric: (variables, {'loss', 'total_loss', 'accuracy'}).

  Same arguments as `fit`. The metrics are numpy arrays of length `steps`; 'accuracy' is
  present when the loss has `correct`. 'bad_step' (an int, -1 when none) is the first step
  whose loss or gradient was not finite (that step and later bad ones left params as they
  were).
  """
  x = jnp.asarray(x)
  y = jnp.asarray(y)
  run, tx_used = _train_step_fn(model, loss, tx, float(l2), augment, batch_size,
                                variables["params"])
  train_rng, data_key = jax.random.split(as_key(rng))
  state = create_state(variables, tx_used, train_rng, ema=False)
  per_step = []
  for _ in range(int(steps)):
    state, m = run(state, x, y, data_key)
    per_step.append(m)
  host = jax.device_get(per_step)  # the only host sync: once, at the end
  keys = ("loss", "total_loss", "accuracy")
  metrics = {k: np.array([m[k] for m in host], np.float64) for k in keys
             if host and k in host[0]}
  if not host:
    metrics = {"loss": np.zeros((0,)), "total_loss": np.zeros((0,))}
  metrics["bad_step"] = int(state.bad_step)
  return variables_of(state), metrics


def fit(model: Model, loss: Loss, variables: dict, x, y, *, tx, steps: int, rng,
        l2: float = 0.0, batch_size: Optional[int] = None,
        augment: Optional[Callable] = None) -> tuple[dict, np.ndarray]:
  """Trains `steps` steps with `jrecipe.train.step.make_train_step`: the checks' tiny trainer.

  Recipe: the short runs behind the stage-2 baselines ('input-independent baseline',
  'overfit one batch', 'verify decreasing training loss'). The step is jitted once per
  (model.apply_with_state, loss functions, tx, augment) identities and (l2, batch_size)
  values, and kept in a module cache (jit itself specialises on shapes), so repeated calls
  with the same objects never recompile; the per-step metrics stay on the device until the
  run ends.

  Args:
    model, loss: a `jrecipe.types.Model` and `jrecipe.types.Loss`. Train mode (dropout and
      BatchNorm batch statistics as the model defines them).
    variables: initial variables {'params': ..., optional 'batch_stats': ...}; not modified.
    x, y: the training arrays (the whole set stays on the device).
    tx: any optax GradientTransformation (a fresh optimizer state is made from it).
    steps: number of optimizer steps.
    rng: int seed or PRNG key. Split into the train state's key (dropout, augmentation: the
      train step folds in the step number) and the data key: the minibatch of step t is
      drawn without replacement from fold_in(data_key, t), so the same rng gives the same
      batches, whatever the inputs hold.
    l2: L2 strength (0.5 * l2 * sum of squared kernels added to the optimised loss).
    batch_size: examples per step; None (or >= len(x)) trains on the full set every step.
    augment: `augment(x, rng) -> x` applied inside the step.

  Returns:
    (trained variables, data losses np.ndarray [steps]: the minibatch loss each step
    computed before its update, without the penalty).
  """
  variables, metrics = fit_metrics(model, loss, variables, x, y, tx=tx, steps=steps, rng=rng,
                                   l2=l2, batch_size=batch_size, augment=augment)
  return variables, metrics["loss"]


def _eval_fn(model: Model, loss: Loss):
  """Jitted `(variables, x, y, key) -> dict` of outputs, per-example losses and accuracy."""

  def build():
    def run(variables, x, y, key):
      if model.has_batchnorm:
        rngs = {"dropout": key} if model.has_dropout else None
        outputs = model.apply(variables, x, True, rngs)
      else:
        outputs = model.apply(variables, x, False, None)
      per_ex = loss.per_example(outputs, y)
      out = {"outputs": outputs, "per_example": per_ex}
      if loss.correct is not None:
        out["correct"] = loss.correct(outputs, y)
      return out
    return jax.jit(run)

  return _cached("eval", (model.apply, loss.per_example, loss.correct),
                 (model.has_batchnorm, model.has_dropout), build)


def evaluate(model: Model, loss: Loss, variables: dict, x, y, *, rng=0) -> dict:
  """The data loss (no regularisation) of `variables` on (x, y), on the host.

  Eval mode for models without BatchNorm; train mode (batch statistics, and dropout drawn
  from `rng` when the model has both) for BatchNorm models (see the module docstring).

  Returns:
    {'loss': mean, 'se': standard error of the mean, 'accuracy': mean or None,
     'per_example': [B], 'outputs': model outputs}, numpy values.
  """
  out = jax.device_get(_eval_fn(model, loss)(variables, jnp.asarray(x), jnp.asarray(y),
                                             as_key(rng)))
  per_ex = np.asarray(out["per_example"], np.float64)
  n = max(per_ex.size, 1)
  return {
      "loss": float(np.mean(per_ex)),
      "se": float(np.std(per_ex) / np.sqrt(n)) if per_ex.size > 1 else 0.0,
      "accuracy": float(np.mean(out["correct"])) if "correct" in out else None,
      "per_example": per_ex,
      "outputs": np.asarray(out["outputs"]),
  }


def head_bias(variables: dict) -> Optional[np.ndarray]:
  """params['head']['bias'] as numpy, or None when the model has no 'head' with a bias."""
  params = variables.get("params") if hasattr(variables, "get") else None
  head = params.get("head") if hasattr(params, "get") else None
  if head is None or not hasattr(head, "get") or head.get("bias") is None:
    return None
  return np.asarray(head["bias"])


def _constant_reference(loss: Loss, outputs: np.ndarray, y, bias: Optional[np.ndarray]):
  """The loss of the outputs a vanishingly small init gives: the head bias (or 0) everywhere."""
  const = np.zeros(outputs.shape, np.float32)
  if bias is not None and bias.shape and bias.shape[-1] == outputs.shape[-1]:
    const = const + bias.astype(np.float32)
  fn = _cached("const", (loss.per_example,), (), lambda: jax.jit(
      lambda o, t: jnp.mean(loss.per_example(o, t))))
  return float(fn(jnp.asarray(const), jnp.asarray(y)))


def _first_diff(a, b) -> tuple[Optional[str], str]:
  """(path of the first leaf where two pytrees differ bitwise, a description), or (None, '')."""
  fa, ta = jax.tree_util.tree_flatten_with_path(a)
  fb, tb = jax.tree_util.tree_flatten_with_path(b)
  if ta != tb:
    return "<structure>", f"tree structures differ: {ta} vs {tb}"
  for (path, la), (_, lb) in zip(fa, fb):
    la, lb = np.asarray(la), np.asarray(lb)
    name = jax.tree_util.keystr(path)
    if la.shape != lb.shape or la.dtype != lb.dtype:
      return name, f"shape/dtype {la.shape} {la.dtype} vs {lb.shape} {lb.dtype}"
    if la.tobytes() != lb.tobytes():
      with np.errstate(all="ignore"):
        diff = np.max(np.abs(la.astype(np.float64) - lb.astype(np.float64))) if la.size else 0
      return name, f"max |difference| {diff:.3g}"
  return None, ""


def seed_determinism(train_fn: Callable[[int], Any], *, seed: int = 0) -> CheckResult:
  """'Fix the random seed' (recipe stage 2): the same seed gives bit-identical parameters.

  Runs `train_fn(seed)` twice and `train_fn(seed + 1)` once and compares the returned pytrees
  leaf by leaf, bit for bit (float bytes, so NaNs in the same places compare equal).

  Args:
    train_fn: `train_fn(seed) -> params pytree`, e.g. a function that runs a few steps of the
      real pipeline (init, data order, dropout, augmentation all derived from the seed).
    seed: the seed of the repeated run.

  Returns:
    fail when the two same-seed runs differ (value: the first differing leaf); warn when a
    different seed gives identical parameters (the seed reaches nothing: fine only for a
    model with no randomness at all, e.g. zero init and full-batch training); pass otherwise.
  """
  a = train_fn(seed)
  b = train_fn(seed)
  c = train_fn(seed + 1)
  leaf, how = _first_diff(a, b)
  n_leaves = len(jax.tree.leaves(a))
  if leaf is not None:
    return CheckResult(
        "seed_determinism", "fail", value=leaf, expected="bit-identical",
        message=(f"Fix the random seed: two runs with seed {seed} differ at {leaf} ({how}); "
                 "likely causes: an unseeded random source (np.random/random/time), a data "
                 "order or augmentation not derived from the seed, or nondeterministic ops."),
        details={"leaf": leaf, "difference": how, "leaves": n_leaves})
  leaf_c, how_c = _first_diff(a, c)
  if leaf_c is None:
    return CheckResult(
        "seed_determinism", "warn", value="identical across seeds", expected="differ",
        message=(f"Fix the random seed: runs with seeds {seed} and {seed + 1} give identical "
                 "parameters; the seed is not reaching init or data order (fine only if the "
                 "setup has no randomness at all)."),
        details={"leaves": n_leaves})
  return CheckResult(
      "seed_determinism", "pass", value="bit-identical", expected="bit-identical",
      message=(f"Fix the random seed: two runs with seed {seed} are bit-identical "
               f"({n_leaves} leaves) and seed {seed + 1} differs (first at {leaf_c})."),
      details={"leaves": n_leaves, "first_leaf_differing_across_seeds": leaf_c})


def loss_at_init(model: Model, loss: Loss, variables: dict, x, y, *,
                 num_classes: Optional[int]) -> CheckResult:
  """'Verify loss @ init' (recipe stage 2; CS231n 'look for correct loss at chance').

  Measures the data loss (no regularisation) at initialisation and compares it with the
  loss of the outputs a vanishingly small init produces: the 'head' bias broadcast over the
  outputs, zeros when there is none. With a zero bias that is exactly `loss.chance` for the
  standard losses (-ln(1/C) for softmax, C-1 for the Weston-Watkins SVM); with a
  data-derived bias it is the cross-entropy of the class priors (or, for L2, the target
  variance), which is what a correct 'init well' model starts at. `loss.chance(num_classes,
  y)` is reported beside it in `details`.

  Tolerance: the excess loss of small random logits with spread s is about s^2/2, so a
  default (LeCun) init sits a few percent above chance; 15% allows logits of std ~0.8 at
  C=10. Pass when |loss - reference| <= max(15% of |reference|, 0.05) + 3 standard errors
  of the batch mean (a small batch measures the loss with noise; the 0.05 absolute band
  handles references near 0, e.g. regression targets near their mean); warn up to 50%;
  fail beyond (an init scale 10x too large gives losses many times chance).

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
  bias = head_bias(variables)
  bias_set = bias is not None and bool(np.any(np.abs(bias) > 1e-6))
  reference = _constant_reference(loss, ev["outputs"], y, bias if bias_set else None)
  try:
    chance = float(loss.chance(num_classes, np.asarray(y)))
  except Exception as e:  # a user loss without a closed form: the reference still stands
    chance = None
    details_chance = f"loss.chance failed: {e}"
  else:
    details_chance = None
  ref_name = ("the loss of predicting the head bias (class priors / target mean)" if bias_set
              else "chance (all outputs zero)")
  dev = measured - reference
  rel = abs(dev) / max(abs(reference), 1e-12)
  noise = 3.0 * ev["se"]
  pass_band = max(INIT_LOSS_PASS_REL * abs(reference), INIT_LOSS_ATOL) + noise
  fail_band = max(INIT_LOSS_FAIL_REL * abs(reference), 2 * INIT_LOSS_ATOL) + noise
  details = {"loss": measured, "reference": reference, "reference_kind": ref_name,
             "chance": chance, "relative_deviation": rel, "standard_error": ev["se"],
             "pass_band": pass_band, "fail_band": fail_band, "head_bias_set": bias_set}
  if details_chance:
    details["chance_error"] = details_chance
  expected = f"{reference:.4g} +/- {pass_band:.3g}"
  head = (f"Verify loss @ init: {measured:.4g} vs {reference:.4g} expected "
          f"({ref_name}{'' if chance is None else f'; loss.chance={chance:.4g}'}), "
          f"{100 * rel:.0f}% off")
  if not np.isfinite(measured):
    return CheckResult("loss_at_init", "fail", value=measured, expected=expected,
                       message=f"{head}: the loss at init is not finite; likely causes: "
                       "non-finite inputs, log of zero, overflow from a huge init scale.",
                       details=details)
  if dev > 0:
    causes = ("init scale too large (logits spread widely), inputs not normalised, or a "
              "final bias set badly")
  else:
    causes = ("labels off (wrong or leaked labels, wrong num_classes), a loss that does not "
              "expect these outputs, or a bias fit to this batch")
  side = "above" if dev > 0 else "below"
  if abs(dev) <= pass_band:
    status, tail = "pass", "within tolerance"
  elif abs(dev) <= fail_band:
    status, tail = "warn", f"{side} the expected value; likely causes: {causes}"
  else:
    status, tail = "fail", f"far {side} the expected value; likely causes: {causes}"
  return CheckResult("loss_at_init", status, value=measured, expected=expected,
                     message=f"{head}: {tail}.", details=details)


def init_bias(model: Model, loss: Loss, variables_without: dict, variables_with: dict, x, y,
              *, num_classes: Optional[int]) -> CheckResult:
  """'Init well' (recipe stage 2): the data-derived final-layer bias and the base rates.

  Compares the data loss at init without and with the data-derived 'head' bias (log class
  priors for softmax classification and sequences, the target mean for regression) and
  checks that the model then predicts the base rates: the softmax of the batch-mean logits
  against the label frequencies (total variation distance), or the mean prediction against
  the target mean (in target standard deviations).

  Tolerance: TV < 0.05 plus twice the expected sampling TV of the batch's own label
  frequencies (0.5 * sum_c sqrt(2 f_c (1 - f_c) / (pi n)): a batch of a few hundred
  examples does not have exactly the training priors); for regression |mean prediction -
  mean target| < 0.1 std + 2 std/sqrt(n). The bias must not raise the loss by more than 2%
  (plus 3 standard errors). On a balanced dataset both losses are nearly equal: that passes.

  Args:
    model, loss: the model and loss.
    variables_without: variables at init, head bias as initialised (usually zeros).
    variables_with: the same variables with the data-derived head bias
      (`jrecipe.experiment.set_head_bias(v, experiment.head_bias())`).
    x, y: a batch (larger is better; the whole train split is cheap at init).
    num_classes: C for classification; None for regression.

  Returns:
    skip for the SVM (no priors for hinge scores) or a model without a 'head' bias; fail when
    the bias raises the loss; warn when the bias is set but the base rates still mismatch
    (the weights dominate it), or when the
    bias was not set (the two variables agree) and the labels are imbalanced; else pass.
  """
  name = "init_bias"
  if loss.expects == "scores":
    return CheckResult(name, "skip", message="Init well: skipped, the SVM's hinge scores have "
                       "no class-prior bias (the loss at init is C-1 whatever the priors).")
  b_with, b_without = head_bias(variables_with), head_bias(variables_without)
  if b_with is None or b_without is None:
    return CheckResult(name, "skip", message="Init well: skipped, the model has no final Dense "
                       "named 'head' with a bias, so there is no bias to set from the data.")
  ev0 = evaluate(model, loss, variables_without, x, y)
  ev1 = evaluate(model, loss, variables_with, x, y)
  bias_set = not np.array_equal(b_with, b_without)
  y_np = np.asarray(y)
  details = {"loss_without": ev0["loss"], "loss_with": ev1["loss"], "bias_set": bias_set}
  if loss.expects == "logits":
    c = int(num_classes or ev1["outputs"].shape[-1])
    freq = np.bincount(y_np.ravel().astype(np.int64), minlength=c)[:c] / max(y_np.size, 1)
    n = y_np.size

    def base_rates(outputs):
      # The rates the bias sets: softmax of the batch-mean logits. The mean of per-example
      # softmaxes also depends on the spread of the logits at init (Jensen), which the bias
      # does not control; it is kept in details as 'mean_softmax_*'.
      z = np.asarray(outputs, np.float64).reshape(-1, np.shape(outputs)[-1]).mean(axis=0)
      p = np.exp(z - z.max())
      return p / p.sum()

    def mean_softmax(outputs):
      z = np.asarray(outputs, np.float64)
      p = np.exp(z - z.max(axis=-1, keepdims=True))
      p /= p.sum(axis=-1, keepdims=True)
      return p.reshape(-1, p.shape[-1]).mean(axis=0)

    p_with, p_without = base_rates(ev1["outputs"]), base_rates(ev0["outputs"])
    tv_with = 0.5 * float(np.abs(p_with - freq).sum())
    tv_without = 0.5 * float(np.abs(p_without - freq).sum())
    noise = 0.5 * float(np.sum(np.sqrt(2 * freq * (1 - freq) / (np.pi * max(n, 1)))))
    tol = BASE_RATE_TV + 2 * noise
    mismatch, mismatch_without = tv_with, tv_without
    imbalance = 0.5 * float(np.abs(freq - 1.0 / c).sum())  # TV from uniform
    details.update(label_frequencies=freq.tolist(), predicted_with=p_with.tolist(),
                   predicted_without=p_without.tolist(), tv_with=tv_with,
                   mean_softmax_with=mean_softmax(ev1["outputs"]).tolist(),
                   tv_without=tv_without, tolerance=tol, imbalance_tv=imbalance)
    what = f"predicted base rates vs label frequencies TV {tv_with:.3f} (tol {tol:.3f})"
    what_without = f"base-rate TV {tv_without:.3f} without the bias (tol {tol:.3f})"
  elif loss.expects == "values":
    out1 = ev1["outputs"].reshape(len(y_np), -1)
    out0 = ev0["outputs"].reshape(len(y_np), -1)
    t = y_np.reshape(len(y_np), -1).astype(np.float64)
    std = t.std(axis=0) + 1e-12
    n = len(t)
    mismatch = float(np.max(np.abs(out1.mean(0) - t.mean(0)) / std))
    mismatch_without = float(np.max(np.abs(out0.mean(0) - t.mean(0)) / std))
    tol = 0.1 + 2.0 / np.sqrt(max(n, 1))
    details.update(target_mean=t.mean(0).tolist(), predicted_mean_with=out1.mean(0).tolist(),
                   mismatch_with_std=mismatch, mismatch_without_std=mismatch_without,
                   tolerance=tol)
    what = f"mean prediction vs target mean {mismatch:.3f} std (tol {tol:.3f})"
    what_without = (f"mean prediction {mismatch_without:.3f} std from the target mean without "
                    f"the bias (tol {tol:.3f})")
  else:
    return CheckResult(name, "skip", message=f"Init well: skipped, loss.expects="
                       f"{loss.expects!r} has no data-derived bias.")
  losses = f"loss at init {ev0['loss']:.4g} without the bias, {ev1['loss']:.4g} with it"
  worse = ev1["loss"] - ev0["loss"] > 0.02 * abs(ev0["loss"]) + 3 * max(ev0["se"], ev1["se"])
  value, expected = ev1["loss"], f"<= {ev0['loss']:.4g} and base rates matched"
  if not bias_set:
    if mismatch_without > tol:
      return CheckResult(name, "warn", value=value, expected=expected, details=details,
                         message=(f"Init well: {losses}: the head bias is not set from the "
                                  f"data and the labels are imbalanced ({what_without}); set "
                                  "the final bias to the log class priors / target mean "
                                  "(config.init_bias) to remove the hockey stick."))
    return CheckResult(name, "pass", value=value, expected=expected, details=details,
                       message=(f"Init well: {losses}; the bias is not set, but the labels are "
                                f"balanced so the model already predicts the base rates "
                                f"({what_without})."))
  if worse:
    return CheckResult(name, "fail", value=value, expected=expected, details=details,
                       message=(f"Init well: {losses}; the bias raises the loss ({what}); "
                                "likely causes: priors from the wrong split or label mapping, a "
                                "bias without the log, or a head whose outputs are not "
                                "logits/values."))
  if mismatch > tol:
    return CheckResult(name, "warn", value=value, expected=expected, details=details,
                       message=(f"Init well: {losses}; the bias is set but the outputs at init "
                                f"do not predict the base rates ({what}): the weights dominate "
                                "the bias; a smaller head init, or inputs centred per feature, "
                                "lets the bias set the rates."))
  if abs(ev1["loss"] - ev0["loss"]) <= 0.02 * abs(ev0["loss"]) + 3 * max(ev0["se"], ev1["se"]):
    note = "nearly equal, as expected for balanced labels"
  else:
    note = f"the bias lowers it by {ev0['loss'] - ev1['loss']:.4g} (no hockey stick)"
  return CheckResult(name, "pass", value=value, expected=expected, details=details,
                     message=f"Init well: {losses}: {note}; {what}.")


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
  if penalty == 0.0:
    return CheckResult(name, "warn", value=totals, expected=expected, details=details,
                       message=("Increasing regularization increases the loss: the L2 penalty "
                                "at init is 0 (no kernel weights with ndim > 1 are nonzero), so "
                                "regularization changes nothing."))
  monotone = all(b > a for a, b in zip(totals, totals[1:]))
  if not monotone:
    return CheckResult(name, "fail", value=totals, expected=expected, details=details,
                       message=(f"Increasing regularization increases the loss: totals "
                                f"{[round(t, 4) for t in totals]} for strengths {list(strengths)} "
                                "are not increasing; likely causes: a negative strength or "
                                "penalty sign, or the penalty not added to the loss."))
  msg = (f"Increasing regularization increases the loss: at init {totals[0]:.4g} -> "
         f"{totals[-1]:.4g} for strengths {strengths[0]:g} -> {strengths[-1]:g}")
  if tx is None or not steps:
    return CheckResult(name, "pass", value=totals, expected=expected, details=details,
                       message=msg + " (no training run asked).")
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
    return CheckResult(name, "warn", value=totals, expected=expected, details=details,
                       message=msg + f": training with l2={s:g} diverged at step "
                       f"{m_reg['bad_step']} (too strong for this learning rate); lower "
                       "train_strength to test the trained comparison.")
  if not l_reg > l_none:
    return CheckResult(name, "fail", value=totals, expected=expected, details=details,
                       message=msg + ": the penalty does not pull against the data; likely "
                       "causes: the penalty is reported but not differentiated, or its sign.")
  return CheckResult(name, "pass", value=totals, expected=expected, details=details,
                     message=msg + ", higher as it should be.")


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
  overfitting while accuracy still shows the input is used.

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
  value = lr_
  expected = f"<= {(1 - BASELINE_LOSS_MARGIN) * lz:.4g} (10% below the zero-input loss)"
  head = (f"Input-independent baseline: {where} loss {lr_:.4g} with real inputs vs {lz:.4g} "
          f"with zeroed inputs{acc_txt} after {steps} steps")
  if loss_win or acc_win:
    return CheckResult(name, "pass", value=value, expected=expected, details=details,
                       message=head + ": the model uses its input.")
  if not np.isfinite(lr_) or not np.all(np.isfinite(tr_real)):
    return CheckResult(name, "fail", value=value, expected=expected, details=details,
                       message=head + ": training on the real inputs diverged (non-finite "
                       "loss); lower the learning rate, check the inputs for inf/NaN.")
  return CheckResult(name, "fail", value=value, expected=expected, details=details,
                     message=head + ": the model is not using its input; likely causes: inputs "
                     "zeroed, replaced or detached inside the model or pipeline, labels not "
                     "matching inputs, or a budget/learning rate too small to learn anything.")


def _without_dropout(model: Model) -> Model:
  """The model run in eval mode for training (dropout off, BatchNorm running statistics)."""

  def build():
    def apply_with_state(variables, x, train=False, rngs=None):
      del train, rngs
      state = {k: v for k, v in variables.items() if k != "params"}
      return model.apply(variables, x, False, None), state

    def apply(variables, x, train=False, rngs=None):
      return apply_with_state(variables, x, train, rngs)[0]

    return Model(init=model.init, apply=apply, apply_with_state=apply_with_state,
                 name=f"{model.name} (dropout off)", module=model.module, has_dropout=False,
                 has_batchnorm=False, widen=None)

  return _cached("nodrop", (model,), (), build)


def _plot_overfit(path: str, y, outputs, loss: Loss, curve: np.ndarray, title: str) -> None:
  from matplotlib.figure import Figure
  fig = Figure(figsize=(10, 4))
  ax1, ax2 = fig.subplots(1, 2)
  y = np.asarray(y)
  idx = np.arange(len(y))
  if loss.expects in ("logits", "scores"):
    pred = np.asarray(loss.predict(jnp.asarray(outputs)))
    if y.ndim > 1:  # sequences: flatten the time steps of the batch
      y, pred = y.ravel(), pred.ravel()
      idx = np.arange(len(y))
    ax1.scatter(idx, y, s=90, facecolors="none", edgecolors="C0", label="label")
    ax1.scatter(idx, pred, s=30, marker="x", color="C3", label="prediction")
    ax1.set_xlabel("example (time steps flattened)" if np.asarray(outputs).ndim > 2
                   else "example")
    ax1.set_ylabel("class")
    ax1.yaxis.get_major_locator().set_params(integer=True)
  else:
    t = y.reshape(len(y), -1).ravel()
    p = np.asarray(outputs).reshape(len(y), -1).ravel()
    ax1.scatter(t, p, s=20, color="C3")
    lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
    ax1.plot([lo, hi], [lo, hi], color="C0", lw=1, label="prediction = target")
    ax1.set_xlabel("target")
    ax1.set_ylabel("prediction")
  ax1.set_title("labels and predictions after training (must align)")
  ax1.legend(loc="best", fontsize=8)
  steps = np.arange(len(curve))
  ax2.plot(steps, np.maximum(curve, 1e-12))
  ax2.set_yscale("log")
  ax2.set_xlabel("step")
  ax2.set_ylabel("training loss (log)")
  ax2.set_title("loss curve")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def achievable(x, y) -> tuple[float, float]:
  """(lowest achievable mean cross-entropy, highest achievable accuracy) on a batch.

  Examples whose inputs are identical but whose labels differ cannot all be fitted: the
  best a model can do is predict each group's label frequencies. For sequences ([B, T]
  labels with [B, T] tokens), a causal model sees the prefix x[:t+1], so positions are
  grouped by identical prefixes (next-pixel targets after an all-zero prefix differ between
  digits).
  """
  x, y = np.asarray(x), np.asarray(y)
  keys, labels = [], []
  if y.ndim == 2 and x.ndim >= 2 and x.shape[:2] == y.shape:
    for b in range(y.shape[0]):
      for t in range(y.shape[1]):
        keys.append(x[b, :t + 1].tobytes())
        labels.append(int(y[b, t]))
  else:
    keys = [row.tobytes() for row in x.reshape(len(x), -1)]
    labels = [int(v) for v in y.reshape(len(y), -1)[:, 0]]
  groups: dict = {}
  for k, lab in zip(keys, labels):
    groups.setdefault(k, []).append(lab)
  n = len(labels)
  ent, hits = 0.0, 0
  for labs in groups.values():
    counts = np.bincount(labs)
    counts = counts[counts > 0]
    p = counts / counts.sum()
    ent += float(-(counts * np.log(p)).sum())
    hits += int(counts.max())
  return ent / max(n, 1), hits / max(n, 1)


def overfit_one_batch(model: Model, loss: Loss, variables: dict, x, y, *, tx, steps: int, rng,
                      max_examples: int = 20, artifacts_dir: Optional[str] = None) -> CheckResult:
  """'Overfit one batch' (recipe stage 2; CS231n 'overfit a tiny subset of data').

  Trains on one tiny batch (the first `max_examples`, 2 to 20 examples) with the full batch
  every step and no regularisation or augmentation. Dropout is switched off by training the
  model in eval mode when `model.has_dropout` (BatchNorm then uses its running statistics,
  an affine map that can still be fitted); a dropout-free model trains in train mode.

  Pass when the final loss on the batch (measured after training, as in `evaluate`) is
  below max(0.01, 1% of the init loss) -- 'about zero' in absolute terms for losses of
  order 1 (softmax, SVM), and relative for regression losses in the targets' units -- and,
  when the loss has `correct`, accuracy is 100%. Warn when accuracy is 100% and the loss fell
  below 10% of the init loss but not to the threshold (not converged in the budget); fail
  otherwise. This is necessary, not sufficient: random features can be overfit too.

  Args:
    model, loss, variables: the model at init.
    x, y: the batch (only the first `max_examples` are used).
    tx, steps, rng: the run (config.checks.overfit_steps).
    max_examples: the batch size used.
    artifacts_dir: where to write `overfit_one_batch.png` (labels and predictions over
      the batch, and the loss curve); None writes nothing.

  Returns:
    A CheckResult with value = final loss, expected = the threshold.
  """
  name = "overfit_one_batch"
  x, y = np.asarray(x)[:max_examples], np.asarray(y)[:max_examples]
  if len(x) < 2:
    return CheckResult(name, "skip", message="Overfit one batch: skipped, needs at least 2 "
                       f"examples, got {len(x)}.")
  used = _without_dropout(model) if model.has_dropout else model
  ev0 = evaluate(used, loss, variables, x, y)
  trained, curve = fit(used, loss, variables, x, y, tx=tx, steps=steps, rng=rng)
  ev1 = evaluate(used, loss, trained, x, y)
  # Only autoregressive data has an inherent floor (a shared prefix, different next tokens).
  # For per-example data, identical inputs with different labels in a tiny batch are a
  # pipeline bug the check must fail on, not excuse.
  sequence = np.ndim(y) == 2 and np.ndim(x) >= 2 and np.shape(x)[:2] == np.shape(y)
  floor_loss, best_acc = (achievable(x, y) if sequence and loss.correct is not None
                          else (0.0, 1.0))
  threshold = max(OVERFIT_ABS, OVERFIT_REL * abs(ev0["loss"])) + floor_loss
  acc = ev1["accuracy"]
  loss_ok = bool(np.isfinite(ev1["loss"]) and ev1["loss"] <= threshold)
  acc_ok = acc is None or acc >= best_acc - 1e-9
  details = {"examples": len(x), "steps": steps, "init_loss": ev0["loss"],
             "achievable_loss": floor_loss, "achievable_accuracy": best_acc,
             "final_loss": ev1["loss"], "accuracy": acc, "threshold": threshold,
             "min_train_loss": float(np.nanmin(curve)) if len(curve) else None,
             "dropout_disabled": bool(model.has_dropout)}
  acc_txt = "" if acc is None else f", accuracy {100 * acc:.0f}%"
  head = (f"Overfit one batch: {len(x)} examples, loss {ev0['loss']:.4g} -> {ev1['loss']:.4g} "
          f"in {steps} steps{acc_txt} (target <= {threshold:.3g}")
  head += f", {100 * best_acc:.0f}% accuracy)" if acc is not None else ")"
  if floor_loss > 0:
    head += (f" [identical inputs with different labels: the lowest achievable loss is "
             f"{floor_loss:.3g}, accuracy {100 * best_acc:.1f}%]")
  if loss_ok and acc_ok:
    status, tail = "pass", ": the model can memorise a batch."
  elif acc_ok and np.isfinite(ev1["loss"]) and ev1["loss"] <= 0.1 * abs(ev0["loss"]):
    status, tail = "warn", (": almost there; raise the step budget or the learning rate.")
  else:
    status, tail = "fail", (": cannot fit a handful of examples; likely causes: outputs "
                            "detached from the parameters, labels not matching inputs "
                            "(shuffled/misaligned), inputs destroyed in preprocessing, a "
                            "learning rate too low/high, or regularisation left on.")
  result = CheckResult(name, status, value=ev1["loss"], expected=f"<= {threshold:.3g}",
                       message=head + tail, details=details)
  path = artifact_path(artifacts_dir, "overfit_one_batch.png")
  if path:
    _plot_overfit(path, y, ev1["outputs"], loss, curve,
                  f"overfit one batch: {status} ({head})")
    result.artifacts.append(path)
  return result


def capacity_decreases_loss(model: Model, loss: Loss, variables: dict, x, y, *, tx, steps: int,
                            rng, factor: float = 2.0,
                            batch_size: Optional[int] = None) -> CheckResult:
  """'Verify decreasing training loss' (recipe stage 2): down over the run, lower when wider.

  Trains the model and `model.widen(factor)` (initialised from `rng`, with the same 'head'
  bias as `variables`) with the same budget, batches and optimizer, and compares the
  training loss (`evaluate` on (x, y)) at init and at the end.

  Thresholds: fail when the loss falls by less than 1% of its init value (not going down
  at all); warn when the wider model does not end at least 2% lower (relative) than the
  base one, unless both already reach ~0 (below 0.1% of the init loss: capacity is not the
  limit on this data).

  Args:
    model, loss, variables: the model at init; `model.widen` builds the wider variant.
    x, y: the training data; tx, steps, rng, batch_size: the run (see `fit`).
    factor: the width multiplier (2 or 4).

  Returns:
    fail when the loss does not go down; skip when it does but `model.widen` is None (the
    wider comparison is the check's point; the measured decrease is still in `details`);
    else pass or warn. value = the final training loss of the base model.
  """
  name = "capacity_decreases_loss"
  ev0 = evaluate(model, loss, variables, x, y)
  trained, _ = fit(model, loss, variables, x, y, tx=tx, steps=steps, rng=rng,
                   batch_size=batch_size)
  ev1 = evaluate(model, loss, trained, x, y)
  l0, l1 = ev0["loss"], ev1["loss"]
  details = {"init_loss": l0, "final_loss": l1, "steps": steps}
  if not (np.isfinite(l1) and l1 < (1.0 - CAPACITY_DECREASE) * l0):
    return CheckResult(name, "fail", value=l1, expected=f"< {l0:.4g}", details=details,
                       message=(f"Verify decreasing training loss: {l0:.4g} at init -> {l1:.4g} "
                                f"after {steps} steps: not going down; likely causes: learning "
                                "rate too low or too high, gradients not flowing, a bug in "
                                "the loss or the labels."))
  if model.widen is None:
    return CheckResult(name, "skip", value=l1, details=details,
                       message=(f"Verify decreasing training loss: {l0:.4g} -> {l1:.4g}; the "
                                "wider-model comparison is skipped (the model has no widen)."))
  wide = model.widen(factor)
  x_np = np.asarray(x)
  v_wide = jax.jit(wide.init)(jax.random.fold_in(as_key(rng), 1), jnp.asarray(x_np[:2]))
  v_wide = _copy_head_bias(v_wide, head_bias(variables))
  w_trained, _ = fit(wide, loss, v_wide, x, y, tx=tx, steps=steps, rng=rng,
                     batch_size=batch_size)
  lw = evaluate(wide, loss, w_trained, x, y)["loss"]
  details.update(factor=factor, wide_final_loss=lw)
  head = (f"Verify decreasing training loss: {l0:.4g} -> {l1:.4g} in {steps} steps; "
          f"{factor:g}x wider reaches {lw:.4g}")
  expected = f"wider < {(1 - CAPACITY_WIDER_MARGIN) * l1:.4g}"
  if lw < (1.0 - CAPACITY_WIDER_MARGIN) * l1:
    return CheckResult(name, "pass", value=l1, expected=expected, details=details,
                       message=head + ": a bigger model goes lower, as it should.")
  if max(l1, lw) <= 1e-3 * abs(l0):
    return CheckResult(name, "pass", value=l1, expected=expected, details=details,
                       message=head + ": both fit the data to ~0, capacity is not the limit.")
  return CheckResult(name, "warn", value=l1, expected=expected, details=details,
                     message=head + ": the wider model is not lower; likely causes: the "
                     "bottleneck is elsewhere (optimisation, learning rate for the wider model, "
                     "data), or widen() does not change the layers that matter.")


def _copy_head_bias(variables: dict, bias: Optional[np.ndarray]) -> dict:
  """variables with params['head']['bias'] = bias when both exist with the same shape."""
  current = head_bias(variables)
  if bias is None or current is None or current.shape != bias.shape:
    return variables
  params = dict(variables["params"])
  head = dict(params["head"])
  head["bias"] = jnp.asarray(bias, current.dtype)
  params["head"] = head
  return {**variables, "params": params}
