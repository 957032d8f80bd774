"""The work directory: one per run; it refuses to mix two different configs.

A work directory that holds a run of another config is not resumed into (that would
silently blend two experiments) unless the user says so.
"""

import json
import os

import ml_collections

from jrecipe.errors import UserError
from jrecipe.train.writer import write_json_atomic

# Fields that may change between a run and its continuation without changing what it is:
# raising num_epochs is 'leave it training'; the rest are logging and placement.
RESUMABLE_CHANGES = ("num_epochs", "progress", "log_every_steps", "checkpoint", "parallel",
                     "eval_batch_size", "early_stopping_patience", "checks", "ensemble",
                     "inspect", "report", "debug_nans")


def config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _diff(a, b, prefix=""):
  out = []
  for k in sorted(set(a) | set(b)):
    key = f"{prefix}{k}"
    if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
      out += _diff(a[k], b[k], key + ".")
    elif a.get(k) != b.get(k):
      out.append(key)
  return out


def prepare(workdir: str, config: ml_collections.ConfigDict, *, allow_config_change: bool,
            primary: bool = True) -> None:
  """Creates `workdir` and writes config.json, refusing a workdir of a different config."""
  path = os.path.join(workdir, "config.json")
  new = config_dict(config)
  if os.path.exists(path):
    with open(path) as f:
      try:
        old = json.load(f)
      except json.JSONDecodeError:
        old = None
    if old is not None:
      changed = [k for k in _diff(old, new) if k.split(".")[0] not in RESUMABLE_CHANGES]
      if changed and not allow_config_change:
        raise UserError(
            f"The work directory {workdir} holds a run of a different config (changed: "
            f"{', '.join(changed[:8])}). Resuming into it would mix two experiments. Use a "
            "new --workdir, or pass --allow_config_change to resume it with the new config "
            f"anyway. Fields that may change on resume: {', '.join(RESUMABLE_CHANGES)}.")
  if primary:
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(path, new)
