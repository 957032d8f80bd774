"""'Fix the random seed' (recipe stage 2): the same seed gives a bit-identical run.

`seed_determinism` compares a few training steps run twice with one seed and once with the
next; the battery's version runs the real pipeline (init, data order, dropout, augmentation,
all derived from the config seed) through the training Trainer.
"""

from typing import Any, Callable, Optional

import jax
import numpy as np

from jrecipe.checks.base import CheckResult, verdict
from jrecipe.checks.registry import register_check
from jrecipe.train.trainer import Trainer


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
  details = {"leaves": len(jax.tree.leaves(a))}
  if leaf is not None:
    details.update(leaf=leaf, difference=how)
    return verdict("seed_determinism", value=leaf, expected="bit-identical", details=details)(
        "fail", f"Fix the random seed: two runs with seed {seed} differ at {leaf} ({how}); "
        "likely causes: an unseeded random source (np.random/random/time), a data order or "
        "augmentation not derived from the seed, or nondeterministic ops.")
  leaf_c, _ = _first_diff(a, c)
  if leaf_c is None:
    return verdict("seed_determinism", value="identical across seeds", expected="differ",
                   details=details)(
        "warn", f"Fix the random seed: runs with seeds {seed} and {seed + 1} give identical "
        "parameters; the seed is not reaching init or data order (fine only if the setup has "
        "no randomness at all).")
  details["first_leaf_differing_across_seeds"] = leaf_c
  return verdict("seed_determinism", value="bit-identical", expected="bit-identical",
                 details=details)(
      "pass", f"Fix the random seed: two runs with seed {seed} are bit-identical "
      f"({details['leaves']} leaves) and seed {seed + 1} differs (first at {leaf_c}).")


@register_check("seed_determinism", stage="skeleton")
def check_seed_determinism(ctx) -> CheckResult:
  """A few steps of the configured run (the training Trainer, EMA off) twice per seed."""
  trainer = Trainer.from_experiment(ctx.exp, ema_decay=0.0)
  n_steps = min(5, ctx.exp.total_steps)

  def train_fn(seed):
    state = trainer.to_device(trainer.initial_state(seed))
    loop = trainer.run(state, num_steps=n_steps, batches=trainer.batches(0, seed=seed))
    return trainer.to_host(loop.state).params

  return seed_determinism(train_fn, seed=ctx.seed)
