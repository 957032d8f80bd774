"""The recipe's sanity checks, each a plain function that returns a verdict with numbers.

Call them from your own pytest suite on your own model (an apply function, parameters and a
batch), or run them all on a config with `jrecipe --mode=check` / `run_battery(exp)`.
"""

from jrecipe.checks.base import CHECK_NAMES, CheckResult
from jrecipe.checks.data import data_before_net
from jrecipe.checks.dependencies import batch_independence, causal_dependency
from jrecipe.checks.gradcheck import gradient_check, gradient_check_model, relu_pattern
from jrecipe.checks.outputs import assert_equivalent, eval_mode, logits_not_probabilities
from jrecipe.checks.schedule import lr_schedule
from jrecipe.checks.training import (capacity_decreases_loss, fit, init_bias,
                                     input_independent_baseline, loss_at_init,
                                     overfit_one_batch, regularization_increases_loss,
                                     seed_determinism)

__all__ = [
    "CHECK_NAMES", "CheckResult", "assert_equivalent", "batch_independence",
    "capacity_decreases_loss", "causal_dependency", "data_before_net", "eval_mode", "fit",
    "gradient_check", "gradient_check_model", "init_bias", "input_independent_baseline",
    "logits_not_probabilities", "loss_at_init", "lr_schedule", "overfit_one_batch",
    "regularization_increases_loss", "relu_pattern", "run_battery", "seed_determinism",
]


def run_battery(*args, **kwargs):
  """See `jrecipe.checks.runner.run_battery` (imported lazily: it pulls in the data layer)."""
  from jrecipe.checks.runner import run_battery as _run
  return _run(*args, **kwargs)
