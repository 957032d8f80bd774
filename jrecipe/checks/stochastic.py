"""Randomness and state that must really change: dropout masks, augmentations, BatchNorm stats.

  dropout_varies             'regularize: dropout': train-mode outputs change with each
                             step's dropout key, and are reproducible for one key
  augmentation_varies        'regularize: data augmentation': two steps draw different
                             augmentations, and one key always draws the same
  state_updates              'careful with BN': the running statistics change in training,
                             and evaluation uses them
  augmentation_keeps_labels  'regularize: data augmentation' ('creative augmentation'): an
                             augmented example still shows its label

Each measures the very keys the train step derives (`jrecipe.train.step.step_rngs` of the
run's train stream at steps 0 and 1), so a key that never changes is seen as the train step
would produce it.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jrecipe.checks.base import CheckResult, verdict
from jrecipe.checks.fitting import fit
from jrecipe.checks.outputs import _max_rel_diff
from jrecipe.checks.context import noted
from jrecipe.checks.registry import register_check

VARY_RTOL = 1e-6  # outputs (or inputs) closer than this count as identical
LABEL_FAIL_DROP = 0.30  # augmentation_keeps_labels: neighbour agreement lost (fail)...
LABEL_WARN_DROP = 0.15  # ...or (warn), see its docstring
NEIGHBOUR_SHIFT = 2  # pixels of translation the neighbour distance forgives
NEIGHBOUR_MAX_SIDE = 16  # images are average-pooled to at most this side first


def dropout_varies(apply: Callable, variables, x, keys, *, has_dropout: bool,
                   stateless: bool = False) -> CheckResult:
  """'Regularize: dropout' (recipe stage 4): the dropout mask changes from step to step.

  Measures train-mode outputs for two steps' dropout keys (`keys`: the keys steps 0 and 1
  use) and twice for the first key. Fail when the model declares dropout and the two
  steps' outputs are identical (max relative difference <= 1e-6: a key fixed inside the
  model, the rngs not passed on, a rate of 0), or when one key gives two different outputs
  (randomness outside the key). A model without dropout whose outputs still vary warns
  (`has_dropout` is then wrong and the overfit check leaves the noise on); without
  variation it is skipped, unless the model keeps no state (`stateless`) and its train-mode
  output still differs from its eval-mode output: a mask drawn from a key fixed inside the
  model (which then asks for no dropout rng, so `has_dropout` reads False) fails.
  Deterministic eval is `eval_mode`'s (a precondition).
  """
  k0, k1 = keys
  fn = jax.jit(lambda v, xx, a, b: (apply(v, xx, True, {"dropout": a}),
                                    apply(v, xx, True, {"dropout": a}),
                                    apply(v, xx, True, {"dropout": b}),
                                    apply(v, xx, False, None)))
  out_a, again, out_b, out_eval = fn(variables, jnp.asarray(x), k0, k1)
  across, repeat = _max_rel_diff(out_a, out_b), _max_rel_diff(out_a, again)
  train_vs_eval = _max_rel_diff(out_a, out_eval)
  result = verdict("dropout_varies", value=across, expected=f"> {VARY_RTOL:g}",
                   details={"across_steps": across, "same_key": repeat,
                            "train_vs_eval": train_vs_eval, "has_dropout": bool(has_dropout)})
  step = "Regularize, dropout: train-mode outputs at steps 0 and 1"
  if repeat > VARY_RTOL:
    return result("fail", f"{step}: one dropout key gives two different outputs (relative "
                  f"{repeat:.2g}): randomness that does not come from the key (np.random, an "
                  "unseeded generator); the run cannot be reproduced.")
  if not has_dropout:
    if across > VARY_RTOL:
      return result("warn", f"{step} differ (relative {across:.2g}) though the model declares "
                    "no dropout (has_dropout=False): the overfit check will not switch it off.")
    if stateless and train_vs_eval > VARY_RTOL:
      return result("fail", f"{step} are identical, yet train mode differs from eval mode "
                    f"(relative {train_vs_eval:.2g}) in a model without state: a dropout mask "
                    "drawn from a key fixed inside the model (PRNGKey(0), rng=... passed to "
                    "the layer), so it never changes.")
    return result("skip", f"{step}: the model has no dropout and its outputs do not depend on "
                  "the key.")
  if across <= VARY_RTOL:
    return result("fail", f"{step} are identical (relative difference {across:.2g}): the "
                  "dropout mask never changes; likely causes: a fixed PRNG key inside the "
                  "model, the train step's dropout rng not passed to the layer, a rate of 0.")
  return result("pass", f"{step} differ (relative {across:.2g}) and one key reproduces its "
                "mask exactly.")


def call_augment(augment: Callable, x, y, key):
  """(x, y) augmented by the Experiment's `augment_fn()`: `augment(x, rng) -> x`, or, when it
  also changes labels (`takes_labels`, a user's data.augment.fn), `augment(x, rng, y)`."""
  if getattr(augment, "takes_labels", False):
    return augment(x, key, y)
  return augment(x, key), y


def _changed(a, b) -> np.ndarray:
  """Per example: True where two batches differ by more than VARY_RTOL (relative)."""
  a = np.asarray(a, np.float64).reshape(len(a), -1)
  b = np.asarray(b, np.float64).reshape(len(b), -1)
  scale = max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-12)
  return np.max(np.abs(a - b), axis=1) / scale > VARY_RTOL


def augmentation_varies(augment: Optional[Callable], x, y, keys) -> CheckResult:
  """'Regularize: data augmentation' (recipe stage 4): each step draws a new augmentation.

  Augments one batch with the augmentation keys of steps 0 and 1, and again with step 0's.
  Fail when no example differs between the two steps (the key is ignored or fixed: every
  epoch sees the same augmented copy), or when one key gives two different batches
  (randomness outside the key); warn when neither step changes any example (an
  augmentation that does nothing); skip without augmentation.
  """
  if augment is None:
    return verdict("augmentation_varies")("skip", "Data augmentation: none configured.")
  k0, k1 = keys
  x = jnp.asarray(x)
  a, _ = call_augment(augment, x, y, k0)
  again, _ = call_augment(augment, x, y, k0)
  b, _ = call_augment(augment, x, y, k1)
  across = float(np.mean(_changed(a, b)))
  touched = float(max(np.mean(_changed(a, x)), np.mean(_changed(b, x))))
  repeat = float(np.mean(_changed(a, again)))
  result = verdict("augmentation_varies", value=across, expected="> 0",
                   details={"examples": int(x.shape[0]), "differ_across_steps": across,
                            "changed_by_augmentation": touched, "differ_same_key": repeat})
  step = f"Data augmentation at steps 0 and 1 on {x.shape[0]} examples"
  if repeat > 0:
    return result("fail", f"{step}: one key gives two different batches ({repeat:.0%} of the "
                  "examples): randomness outside the key; the run cannot be reproduced.")
  if touched == 0:
    return result("warn", f"{step}: no example is changed at either step: the augmentation "
                  "does nothing (probabilities or sizes of 0? inputs not images?).")
  if across == 0:
    return result("fail", f"{step}: identical ({touched:.0%} of the examples changed, the "
                  "same way at both steps): the augmentation ignores its key (a fixed PRNG "
                  "key, a key drawn once outside the step); every epoch sees one copy.")
  return result("pass", f"{step}: {across:.0%} of the examples are augmented differently, "
                f"{touched:.0%} changed at all, and one key reproduces its batch.")


def _frozen_layers(state0: dict, state1: dict) -> tuple[list, int]:
  """(paths of the layers none of whose state leaves changed, number of layers): a layer is
  the parent path of its leaves (a BatchNorm's mean and var)."""
  layers: dict = {}
  flat0 = jax.tree_util.tree_flatten_with_path(state0)[0]
  for (path, a), b in zip(flat0, jax.tree.leaves(state1)):
    key = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path[:-1])
    layers.setdefault(key, []).append(_max_rel_diff(a, b))
  return sorted(k for k, v in layers.items() if max(v) <= VARY_RTOL), len(layers)


def state_updates(model, loss, variables: dict, x, y, *, tx, steps: int, rng,
                  batch_size: Optional[int] = None, pretrained: bool = False) -> CheckResult:
  """'Regularize: careful with BN' (recipe stage 4): mutable state trains and evaluates.

  Trains `steps` steps (the training step, through `fit`) and compares every non-parameter
  collection (BatchNorm's running mean and variance, ...) before and after: fail when none
  of its leaves changed (the step drops the new statistics: eval then normalises with the
  statistics of the initialisation). Then evaluates the trained parameters with the trained
  state and with the initial state: fail when the outputs are identical (evaluation does
  not read the state it keeps). A layer whose statistics alone never change while others do
  fails too (warns when `pretrained`: a deliberately frozen BatchNorm when fine-tuning): it
  normalises with its running statistics in training (`use_running_average=True` written
  into the layer, or the train flag not passed to it), i.e. with those of the
  initialisation, mean 0 and variance 1. Skip for a model without mutable state.
  """
  state0 = {k: v for k, v in variables.items() if k != "params"}
  if not jax.tree.leaves(state0):
    return verdict("state_updates")("skip", "Careful with BN: the model has no mutable state "
                                    "(no BatchNorm statistics) to update.")
  trained, _ = fit(model, loss, variables, x, y, tx=tx, steps=steps, rng=rng,
                   batch_size=batch_size)
  state1 = {k: v for k, v in trained.items() if k != "params"}
  same_tree = jax.tree.structure(state0) == jax.tree.structure(state1)
  moved = _max_rel_diff(state0, state1) if same_tree else float("inf")
  xe = jnp.asarray(x[:64])
  fn = jax.jit(lambda v: model.apply(v, xe, False, None))
  with_new = fn(trained)
  with_old = fn({**trained, **state0}) if same_tree else with_new
  uses = _max_rel_diff(with_new, with_old) if same_tree else float("inf")
  names = sorted(state0)
  result = verdict("state_updates", value=moved, expected=f"> {VARY_RTOL:g}",
                   details={"collections": names, "state_change": moved, "steps": steps,
                            "eval_change_with_trained_state": uses})
  step = f"Careful with BN: the {', '.join(names)} after {steps} training steps"
  if moved <= VARY_RTOL:
    return result("fail", f"{step} equal their initial values (relative change {moved:.2g}): "
                  "the train step does not keep the updated statistics (the model returns "
                  "its old state, or 'mutable' is not passed); eval normalises with the "
                  "statistics of the initialisation.")
  if uses <= VARY_RTOL:
    return result("fail", f"{step} changed (relative {moved:.2g}) but the eval outputs are the "
                  "same with the initial state: evaluation ignores the running statistics "
                  "(use_running_average=not train missing?).")
  frozen, n_layers = _frozen_layers(state0, state1)
  if frozen:
    result = verdict("state_updates", value=moved, expected=f"> {VARY_RTOL:g} in every layer",
                     details={"collections": names, "state_change": moved, "steps": steps,
                              "eval_change_with_trained_state": uses, "frozen_layers": frozen})
    why = ("; the parameters come from init_from: a BatchNorm frozen on purpose?"
           if pretrained else ".")
    return result("warn" if pretrained else "fail", (
        f"{step} changed (relative {moved:.2g}), except in {len(frozen)} of {n_layers} layers: "
        f"{', '.join(frozen[:5])}{' ...' if len(frozen) > 5 else ''}: those normalise with "
        "their running statistics in training (use_running_average=True written into the "
        "layer, or the train flag not passed to it), so they never learn statistics and use "
        f"the initial ones (mean 0, variance 1){why}"))
  return result("pass", f"{step} changed (relative {moved:.2g}) and evaluation uses them "
                f"(eval outputs change by {uses:.2g} with the initial state instead).")


def _pooled(x: np.ndarray) -> np.ndarray:
  """Images [B, H, W, C] average-pooled by an integer factor to a side <= 16 (float64)."""
  x = np.asarray(x, np.float64)
  f = int(np.ceil(max(x.shape[1], x.shape[2]) / NEIGHBOUR_MAX_SIDE))
  if f <= 1:
    return x
  b, h, w, c = x.shape
  x = x[:, :h - h % f, :w - w % f]
  return x.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))


def _shifts(x: np.ndarray) -> np.ndarray:
  """[B, S, D]: every translation by up to NEIGHBOUR_SHIFT pixels (edge padding)."""
  p = NEIGHBOUR_SHIFT
  b, h, w, _ = x.shape
  pad = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
  return np.stack([pad[:, i:i + h, j:j + w] for i in range(2 * p + 1)
                   for j in range(2 * p + 1)], 1).reshape(b, (2 * p + 1) ** 2, -1)


@jax.jit
def _nearest(queries, pool):
  """[B] index into pool of each query's nearest neighbour, min over its translations,
  never the query's own source (query i is pool row i)."""
  d = (jnp.sum(queries ** 2, -1)[:, :, None] - 2 * jnp.einsum("bsd,nd->bsn", queries, pool)
       + jnp.sum(pool ** 2, -1)[None, None])
  d = d.min(axis=1)
  d = d.at[jnp.arange(d.shape[0]), jnp.arange(d.shape[0])].set(jnp.inf)
  return jnp.argmin(d, axis=1)


def _neighbour_labels(queries: np.ndarray, pool: np.ndarray, pool_y: np.ndarray) -> np.ndarray:
  images = queries.ndim == 4
  q = _shifts(_pooled(queries)) if images else queries.reshape(len(queries), 1, -1)
  p = (_pooled(pool) if images else pool).reshape(len(pool), -1)
  return pool_y[np.asarray(_nearest(jnp.asarray(q, jnp.float32), jnp.asarray(p, jnp.float32)))]


def label_drop_status(drop: float, se: float) -> str:
  """augmentation_keeps_labels' thresholds: 'fail' when the neighbours' label agreement drops
  by more than LABEL_FAIL_DROP plus 2 standard errors, 'warn' above LABEL_WARN_DROP plus 2
  standard errors, else 'pass' (a drop exactly at a threshold is inside it)."""
  if drop > LABEL_FAIL_DROP + 2 * se:
    return "fail"
  return "warn" if drop > LABEL_WARN_DROP + 2 * se else "pass"


def augmentation_keeps_labels(augment: Optional[Callable], x, y, pool_x, pool_y, key, *,
                              task: str) -> CheckResult:
  """'Regularize: data augmentation' (recipe stage 4): augmented examples keep their labels.

  The rule: a model that has memorised the clean data keeps its predictions on augmented
  copies of its training examples when the augmentation preserves labels. The memorising
  model is jrecipe's own, not the user's (an MLP is not shift-invariant, and would blame a
  benign crop): the nearest clean neighbour (leave-one-out: never the example's own source)
  under a distance that forgives translations by up to 2 pixels (images average-pooled to a
  side <= 16 first). Benign augmentations (crops, shifts, noise) keep an example's
  neighbours in its class; a horizontal flip of digits or text makes a 2 look like a 5 and
  moves them to other classes. Measured on the examples the augmentation changed: the
  neighbours' label agreement with the clean inputs against with the augmented ones
  (against the augmented labels when the augmentation returns labels too).

  Thresholds (measured on digits: clean 0.99, 1-pixel crops 0.92, 2-pixel crops of 8x8
  images 0.76, flips 0.28): fail when the agreement drops by more than 0.30, warn above
  0.15, each plus 2 standard errors. Skip without augmentation, for regression or sequence
  labels, or when neighbours do not predict the clean labels (agreement < 0.5: the rule has
  nothing to say on such data).
  """
  if augment is None:
    return verdict("augmentation_keeps_labels")("skip", "Data augmentation: none configured.")
  if task != "classification":
    return verdict("augmentation_keeps_labels")(
        "skip", f"Augmentation keeps labels: a {task} task has no class neighbours to ask.")
  x, y = np.asarray(x), np.asarray(y)
  xa, ya = call_augment(augment, jnp.asarray(x), jnp.asarray(y), key)
  xa, ya = np.asarray(xa), np.asarray(ya)
  changed = _changed(xa, x)
  pool = np.concatenate([x, np.asarray(pool_x)])
  labels = np.concatenate([y, np.asarray(pool_y)])
  clean = _neighbour_labels(x, pool, labels) == y
  aug = _neighbour_labels(xa, pool, labels) == ya
  n = int(changed.sum())
  a_clean = float(clean[changed].mean()) if n else float(clean.mean())
  a_aug = float(aug[changed].mean()) if n else a_clean
  se = float(np.sqrt(max(a_aug * (1 - a_aug), 1.0 / max(n, 1)) / max(n, 1)))
  drop = a_clean - a_aug
  result = verdict("augmentation_keeps_labels", value=a_aug,
                   expected=f">= {a_clean - LABEL_WARN_DROP:.3g}",
                   details={"changed_examples": n, "examples": len(x), "agreement_clean": a_clean,
                            "agreement_augmented": a_aug, "drop": drop, "standard_error": se,
                            "pool": len(pool)})
  head = (f"Augmentation keeps labels: the nearest clean neighbours of {n} augmented examples "
          f"share their label {a_aug:.0%} of the time, {a_clean:.0%} before augmentation")
  if not n:
    return result("skip", f"{head}: the augmentation changed no example.")
  if a_clean < 0.5:
    return result("skip", f"{head}: neighbours in input space do not predict the labels of "
                  "this data, so they cannot judge the augmentation.")
  status = label_drop_status(drop, se)
  if status == "fail":
    return result("fail", f"{head}: augmented examples look like other classes; likely causes: "
                  "a flip or rotation of asymmetric images (digits, text), a crop that cuts "
                  "the object out, labels not transformed with the inputs.")
  if status == "warn":
    return result("warn", f"{head}: a strong augmentation; check the pictures that it keeps "
                  "the labels.")
  return result("pass", f"{head}: the labels survive the augmentation.")


# ---------------------------------------------------------------- registration

def _two_steps(ctx) -> tuple:
  """The keys steps 0 and 1 use: (augmentation keys, dropout keys)."""
  (a0, d0), (a1, d1) = ctx.step_keys(0), ctx.step_keys(1)
  return (a0, a1), (d0, d1)


@register_check("dropout_varies", stage="regularize", needs=("eval_mode",))
def check_dropout_varies(ctx) -> CheckResult:
  """Sixteen training examples at init (`ctx.probed`), with the dropout keys of steps 0, 1."""
  _, drop = _two_steps(ctx)
  stateless = not ctx.model.has_batchnorm and not set(ctx.variables) - {"params"}
  variables, note = ctx.probed
  return noted(dropout_varies(ctx.model.apply, variables, ctx.x[:16], drop,
                              has_dropout=bool(ctx.model.has_dropout), stateless=stateless),
               note)


@register_check("augmentation_varies", stage="regularize", needs=("data_before_net",))
def check_augmentation_varies(ctx) -> CheckResult:
  """Sixty-four training examples, with the augmentation keys of steps 0 and 1."""
  aug, _ = _two_steps(ctx)
  return augmentation_varies(ctx.augment, ctx.x[:64], ctx.y[:64], aug)


@register_check("augmentation_keeps_labels", stage="regularize", needs=("data_before_net",),
                after=("augmentation_varies",))
def check_augmentation_keeps_labels(ctx) -> CheckResult:
  """128 training examples, step 0's augmentation, neighbours among up to 384 more."""
  aug, _ = _two_steps(ctx)
  return augmentation_keeps_labels(ctx.augment, ctx.x[:128], ctx.y[:128], ctx.x_val[:384],
                                   ctx.y_val[:384], aug[0], task=ctx.spec.task)


@register_check("state_updates", stage="regularize", needs=("loss_at_init",))
def check_state_updates(ctx) -> CheckResult:
  """Three training steps of the configured model on the train sample."""
  return state_updates(ctx.model, ctx.loss, ctx.variables, ctx.x, ctx.y, tx=ctx.tx, steps=3,
                       rng=ctx.seed, batch_size=ctx.batch_size,
                       pretrained=bool(ctx.config.get("init_from", "")))
