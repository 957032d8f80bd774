"""The recipe's sanity checks, each a plain function that returns a verdict with numbers.

Call them from your own pytest suite on your own model (an apply function, parameters and a
batch), or run them all on a config with `jrecipe --mode=check` / `run_battery(exp)`. The
battery's checks are registered by name (`jrecipe.checks.registry`, docs/checks.md).
"""

from jrecipe.checks.base import CheckResult
from jrecipe.checks.baselines import input_independent_baseline
from jrecipe.checks.data import data_before_net
from jrecipe.checks.dependencies import batch_independence, causal_dependency
from jrecipe.checks.determinism import seed_determinism
from jrecipe.checks.fitting import evaluate, fit, fit_metrics
from jrecipe.checks.gradcheck import gradient_check, gradient_check_model, relu_pattern
from jrecipe.checks.init import init_bias, loss_at_init
from jrecipe.checks.outputs import assert_equivalent, eval_mode, logits_not_probabilities
from jrecipe.checks.overfit import capacity_decreases_loss, overfit_one_batch
from jrecipe.checks.registry import check_names, register_check
from jrecipe.checks.regularization import regularization_increases_loss
from jrecipe.checks.schedule import lr_schedule
from jrecipe.checks.splits import splits_match

# The battery's check names, in the order it runs them (stable: scripts rely on them).
CHECK_NAMES = check_names()

__all__ = [
    "CHECK_NAMES", "CheckResult", "assert_equivalent", "batch_independence",
    "capacity_decreases_loss", "causal_dependency", "data_before_net", "eval_mode",
    "evaluate", "fit", "fit_metrics", "gradient_check", "gradient_check_model", "init_bias",
    "input_independent_baseline", "logits_not_probabilities", "loss_at_init", "lr_schedule",
    "overfit_one_batch", "register_check", "regularization_increases_loss", "relu_pattern",
    "run_battery", "seed_determinism", "splits_match",
]


def run_battery(*args, **kwargs):
  """See `jrecipe.checks.runner.run_battery` (imported lazily: it pulls in the data layer)."""
  from jrecipe.checks.runner import run_battery as _run
  return _run(*args, **kwargs)
