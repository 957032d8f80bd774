"""A pytest plugin: run the recipe's battery on your own configs inside your own test suite.

Installed with jrecipe (entry point `pytest11`), so in a research codebase:

    def test_my_config_passes_the_battery(jrecipe_battery):
      results = jrecipe_battery("configs/my_model.py", budget_steps=60)
      # fails the test with the table of failed checks if any check failed

`jrecipe_battery(config, *, only=(), skip=(), workdir=None, allow_warn=True, **checks)` takes a
config path (`path.py` or `path.py:variant`) or a ConfigDict; keyword arguments override
`config.checks.*` (e.g. a smaller `budget_steps` for a fast suite). It returns the results
and fails the calling test, listing every failed check with its numbers and explanation.
"""

import pytest


def load_config(path: str):
  """A config file (`path.py[:variant]`) -> its ConfigDict, as the command line loads it."""
  import importlib.util
  file, _, variant = path.partition(":")
  spec = importlib.util.spec_from_file_location("_jrecipe_user_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def battery(config, *, only=(), skip=(), workdir=None, allow_warn=True, **check_overrides):
  """Runs the battery on `config`; raises AssertionError listing failed checks."""
  from jrecipe import experiment
  from jrecipe.checks.runner import format_row, run_battery
  cfg = load_config(config) if isinstance(config, str) else config
  cfg = cfg.copy_and_resolve_references()
  for k, v in check_overrides.items():
    cfg.checks[k] = v
  results = run_battery(experiment.build(cfg), workdir=workdir, only=only, skip=skip)
  bad = [r for r in results if r.status == "fail" or (not allow_warn and r.status == "warn")]
  if bad:
    raise AssertionError("jrecipe battery found problems:\n" +
                         "\n".join(format_row(r) for r in bad))
  return results


@pytest.fixture
def jrecipe_battery():
  """The `battery(config, ...)` function: the recipe's checks as one assertion."""
  return battery
