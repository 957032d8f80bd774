"""Root cause first (issue 18 item 3): verdicts behind a failed precondition are reported as
its consequences, and the table and checks.json open with the most likely cause."""

import dataclasses
import json
import os

import ml_collections
import pytest

from jrecipe.checks import registry, rootcause
from jrecipe.checks.base import CheckResult
from jrecipe.checks.pytest_plugin import load_config
from jrecipe.checks.runner import format_row, run_check, run_mode
from tests.check_cases import make_kit, mlp
from tests.helpers import REPO

def _results(statuses: dict, needs: dict) -> list:
  done, out = {}, []
  for name, status in statuses.items():
    r = rootcause.mark(CheckResult(name, status, value=1.0, expected=0.0, message=name),
                       done, needs)
    done[name] = r
    out.append(r)
  return out


def test_consequences_follow_the_needs_transitively_to_the_root():
  needs = {"a": [], "b": ["a"], "c": ["b"], "d": [], "e": ["d"]}
  res = _results({"a": "fail", "b": "fail", "c": "warn", "d": "pass", "e": "fail"}, needs)
  by = {r.name: r for r in res}
  assert by["a"].consequence_of is None and by["e"].consequence_of is None
  assert by["b"].consequence_of == "a" and by["c"].consequence_of == "a"
  cause = rootcause.root_cause(res)
  assert cause["check"] == "a" and cause["consequences"] == ["b", "c"]
  assert cause["other_roots"] == ["e"] and cause["line"].startswith("Most likely cause: a")
  assert "(FAIL)" in format_row(by["b"]) and "consequence of a" in format_row(by["b"])
  assert rootcause.root_cause(_results({"a": "pass", "b": "warn"}, needs)) is None


def test_the_graph_names_the_preconditions_the_docs_draw():
  g = registry.graph()
  for name in ("loss_at_init", "logits_not_probabilities", "dropout_varies"):
    assert "eval_mode" in g[name]["needs"], name
  assert "input_independent_baseline" in g["overfit_one_batch"]["needs"]
  assert "effective_schedule" in g["lr_schedule"]["needs"]
  for name in ("regularization_increases_loss", "capacity_decreases_loss"):
    assert "overfit_one_batch" in rootcause.ancestors(name, {n: v["needs"]
                                                             for n, v in g.items()})


# Checks that read the Experiment itself (its pipeline, trainer, config schedule) cannot run
# on the hand-built context.
EXP_ONLY = ("data_before_net", "seed_determinism", "lr_schedule")


@pytest.fixture(scope="module")
def kit():
  return make_kit()


def _kit_battery(kit, model):
  """Every other registered check on the shared context with `model` planted, marked."""
  ctx = dataclasses.replace(kit.ctx, model=model)
  needs = {n: v["needs"] for n, v in registry.graph().items()}
  done = {}
  for check in registry.resolve(skip=EXP_ONLY):
    done[check.name] = rootcause.mark(run_check(check, ctx), done, needs)
  return list(done.values())


def test_dropout_left_on_at_eval_is_one_root_cause_and_the_rest_consequences(kit):
  res = _kit_battery(kit, mlp(dropout_in_eval=True))
  fails = [r for r in res if r.status == "fail"]
  assert len(fails) >= 5, [(r.name, r.status) for r in res]
  roots = [r.name for r in fails if r.consequence_of is None]
  assert roots == ["eval_mode"], [(r.name, r.status, r.consequence_of) for r in res]
  assert rootcause.root_cause(res)["check"] == "eval_mode"


def test_a_model_that_cannot_learn_does_not_blame_the_penalty(kit):
  res = {r.name: r for r in _kit_battery(kit, mlp(detach_output=True))}
  reg = res["regularization_increases_loss"]
  assert reg.status != "fail" or reg.consequence_of is not None, reg.message
  cause = rootcause.root_cause(res.values())
  assert cause["check"] in ("input_independent_baseline", "overfit_one_batch"), cause
  assert "regularization_increases_loss" not in cause["other_roots"]
  assert res["capacity_decreases_loss"].consequence_of == cause["check"]


def test_check_mode_opens_with_the_root_cause_and_exits_1(tmp_path, capsys):
  cfg = load_config(os.path.join(REPO, "configs", "digits_mlp.py"))
  cfg.model.init_scale = 100.0  # the loss at init is many times chance
  cfg.checks.only = "eval_mode,loss_at_init,init_bias,input_independent_baseline,lr_schedule"
  cfg.checks.budget_steps = 20
  assert run_mode(cfg, str(tmp_path)) == 1
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("Most likely cause: loss_at_init failed"), out[0]
  assert out[1].split()[:2] == ["check", "status"]
  data = json.load(open(tmp_path / "checks.json"))
  assert list(data)[0] == "cause" and data["cause"] == out[0]
  by = {c["name"]: c for c in data["checks"]}
  assert by["loss_at_init"]["consequence_of"] is None
  for name in ("init_bias", "input_independent_baseline"):
    if by[name]["status"] in ("fail", "warn"):
      assert by[name]["consequence_of"] == "loss_at_init"
      assert "consequence of loss_at_init" in "\n".join(out)
