"""The check registry, and the rule every check obeys: a planted bug it fails, a twin it passes.

The table is tests/check_cases.py (`CASES`); a check registered without its two cases fails
`test_every_registered_check_has_a_planted_bug_and_a_twin`.
"""

import pytest

from jrecipe.checks import CHECK_NAMES, registry
from jrecipe.checks.base import CheckResult
from jrecipe.errors import UserError
from tests.check_cases import CASES, TWIN_MAY_SKIP, make_kit


@pytest.fixture(scope="module")
def kit():
  return make_kit()


def test_every_registered_check_has_a_planted_bug_and_a_twin():
  assert set(CASES) == set(registry.check_names()), (
      "tests/check_cases.py must list exactly the registered checks: missing "
      f"{sorted(set(registry.check_names()) - set(CASES))}, unknown "
      f"{sorted(set(CASES) - set(registry.check_names()))}")
  assert set(TWIN_MAY_SKIP) <= set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_planted_bug_fails(kit, name):
  result = CASES[name][0](kit)
  assert isinstance(result, CheckResult) and result.name == name
  assert result.status == "fail", (result.status, result.message)


@pytest.mark.parametrize("name", sorted(CASES))
def test_correct_twin_passes(kit, name):
  result = CASES[name][1](kit)
  assert isinstance(result, CheckResult) and result.name == name
  allowed = {"pass", "skip"} if name in TWIN_MAY_SKIP else {"pass"}
  assert result.status in allowed, (result.status, result.message)


def test_check_names_are_the_registry_in_dependency_order():
  import jrecipe.checks.base as base
  assert CHECK_NAMES == registry.check_names() == base.CHECK_NAMES
  position = {n: i for i, n in enumerate(CHECK_NAMES)}
  for name, node in registry.graph().items():
    assert node["stage"] in registry.STAGES
    for dep in node["needs"] + node["after"]:
      assert position[dep] < position[name], (name, dep)
  # The graph docs/checks.md draws: everything that trains needs the loss at init.
  for trains in ("input_independent_baseline", "overfit_one_batch", "capacity_decreases_loss",
                 "regularization_increases_loss", "gradient_check"):
    assert "loss_at_init" in registry.graph()[trains]["needs"]
  for name in ("regularization_increases_loss", "capacity_decreases_loss"):
    assert "overfit_one_batch" in registry.graph()[name]["needs"]


def _throwaway(ctx):
  return CheckResult("throwaway", "pass")


def test_duplicate_registration_is_refused():
  with pytest.raises(ValueError, match="already registered.*loss_at_init"):
    registry.register_check("loss_at_init", stage="init")(_throwaway)
  assert registry.get("loss_at_init").fn.__name__ == "check_loss_at_init"


def test_unknown_stage_and_dependency_are_refused():
  with pytest.raises(ValueError, match="stage"):
    registry.register_check("throwaway", stage="nonsense")
  registry.register_check("throwaway", stage="init", needs=("no_such_check",))(_throwaway)
  try:
    with pytest.raises(ValueError, match="no_such_check"):
      registry.check_names()
  finally:
    registry.unregister("throwaway")
  assert "throwaway" not in registry.check_names()


def test_a_cycle_is_refused():
  registry.register_check("throwaway_a", stage="init", needs=("throwaway_b",))(_throwaway)
  registry.register_check("throwaway_b", stage="init", after=("throwaway_a",))(_throwaway)
  try:
    with pytest.raises(ValueError, match="cycle"):
      registry.check_names()
  finally:
    registry.unregister("throwaway_a")
    registry.unregister("throwaway_b")


def test_a_registered_check_runs_in_stage_order_after_its_dependencies():
  registry.register_check("throwaway", stage="data", needs=("overfit_one_batch",))(_throwaway)
  try:
    names = registry.check_names()
    assert names.index("overfit_one_batch") < names.index("throwaway")
    assert names.index("throwaway") < names.index("capacity_decreases_loss")
  finally:
    registry.unregister("throwaway")


def test_unknown_name_in_checks_only_is_a_user_error_listing_valid_names():
  with pytest.raises(UserError) as e:
    registry.parse_names("overfit_one_batch,overfit_one_bach", "only")
  text = str(e.value)
  assert "overfit_one_bach" in text and "config.checks.only" in text
  assert all(n in text for n in CHECK_NAMES)
  with pytest.raises(UserError, match="Valid checks"):
    registry.resolve(only=("no_such_check",))
  assert [c.name for c in registry.resolve(only=("lr_schedule", "loss_at_init"))] == [
      "loss_at_init", "lr_schedule"]
  assert "lr_schedule" not in [c.name for c in registry.resolve(skip=("lr_schedule",))]
