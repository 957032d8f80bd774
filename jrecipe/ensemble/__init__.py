"""Ensembles of trained runs: load members, score them together, distil them into one net.

Recipe stage 6, 'squeeze out the juice': ensembles give about +2% on anything; distil into
one network if test time is limited.

    from jrecipe import ensemble
    members = ensemble.from_runs(["runs/s0", "runs/s1", "runs/s2"])
    result = ensemble.evaluate_ensemble(members, split="test")   # members, ensemble, gain
    probs = ensemble.ensemble_predict(members, x)                 # [N, C]

Command line: `jrecipe --mode=ensemble` (see `jrecipe.ensemble.mode`).
"""

from jrecipe.ensemble.distill import distill, distill_loss, teacher_kl
from jrecipe.ensemble.evaluate import (combine_outputs, ensemble_predict, evaluate_ensemble,
                                       format_table, member_outputs)
from jrecipe.ensemble.members import (Member, check_same_dataset, from_checkpoints, from_runs,
                                      from_search, load_run_config, rank_trials, with_ema)
from jrecipe.ensemble.mode import run_mode

__all__ = [
    "Member", "check_same_dataset", "combine_outputs", "distill", "distill_loss",
    "ensemble_predict", "evaluate_ensemble", "format_table", "from_checkpoints", "from_runs",
    "from_search", "load_run_config", "member_outputs", "rank_trials", "run_mode", "teacher_kl",
    "with_ema",
]
