"""The planted-bug zoo stays honest: well-formed entries, every bug and twin plugged in by the
user contracts, the cheap expected checks run on their bug (FAIL) and twin (PASS), and the
scores computed as docs/checks.md states them. The whole zoo is `python -m jrecipe.zoo`."""

import functools

import pytest

from jrecipe.checks import registry
from jrecipe.registry import import_path
from jrecipe.zoo import entries as zoo
from jrecipe.zoo import models as zoo_models
from jrecipe.zoo import official
from jrecipe.zoo import run

BUG_NAMES = {"linen_mlp": zoo_models.MLP_BUGS, "linen_bn_mlp": zoo_models.BN_BUGS,
             "linen_cnn": zoo_models.CNN_BUGS, "nnx_mlp": zoo_models.NNX_BUGS,
             "nnx_bn_mlp": zoo_models.NNX_BN_BUGS,
             "causal_lm": zoo_models.SEQ_BUGS, "flax_resnet": official.RESNET_BUGS,
             "bv_vit": official.VIT_BUGS, "lm1b_decoder": official.LM1B_BUGS}


def _paths(overrides):
  for k, v in overrides.items():
    if isinstance(v, dict) and "name" in v:
      yield v["name"]
    elif k in ("loss.name", "optimizer.name", "data.name", "data.augment.fn"):
      yield v


def test_every_entry_is_well_formed_and_its_code_imports():
  assert len(zoo.ENTRIES) >= 40
  checks = set(registry.check_names())
  for e in zoo.ENTRIES:
    assert e.check in checks and e.root in checks, e.name
    assert e.bug != e.twin and e.kind in ("model", "loss", "optimizer", "data"), e.name
    assert any(t in e.taxonomy for t in ("H:", "I:", "T:", "D:")), e.name
    for path in [*_paths(e.bug), *_paths(e.twin)]:
      assert callable(import_path(path, "zoo entry")), (e.name, path)
    model = e.bug.get("model", {})
    if model.get("bug"):
      assert model["bug"] in BUG_NAMES[model["name"].split(":")[1]], e.name
  assert {e.kind for e in zoo.ENTRIES} == {"model", "loss", "optimizer", "data"}


# Entries whose expected check trains nothing: each bug fails it and each twin passes it, run
# through the battery (only that check) on the entry's whole config.
CHEAP = ("data_before_net", "split_leakage", "splits_match", "weight_decay",
         "effective_schedule")
_TWINS: dict = {}


@functools.lru_cache(maxsize=1)
def _mlp_params():
  import jax
  import numpy as np
  module = zoo_models.LinenMLP(10)
  return module.init(jax.random.PRNGKey(0), np.zeros((2, 8, 8, 1), np.float32))["params"]


def _only(entry, overrides, check):
  """The check on the entry's config: through the battery, or (the optimizer checks, a pure
  function of the optimizer) on the config's optimizer and the zoo MLP's parameters."""
  from jrecipe import experiment
  from jrecipe.checks.runner import run_battery
  cfg = run.build_config(entry.base, overrides, run.FAST_BUDGETS)
  if check in ("weight_decay", "effective_schedule"):
    from jrecipe import optim
    from jrecipe.checks import optimizer as opt_checks
    total, spe = 400, 10  # digits_mlp: 40 epochs of 10 steps
    tx = optim.make_optimizer(cfg.optimizer, cfg.schedule, cfg.momentum_schedule,
                              steps_per_epoch=spe, total_steps=total)
    kw = {"steps_per_epoch": spe} if check == "effective_schedule" else {}
    return getattr(opt_checks, check)(tx, _mlp_params(), total_steps=total, **kw)
  [result] = run_battery(experiment.build(cfg), only=[check])
  return result


@pytest.mark.parametrize("entry", [e for e in zoo.ENTRIES if e.check in CHEAP],
                         ids=lambda e: e.name)
def test_a_cheap_entry_fails_its_check_and_its_twin_passes(entry):
  bad = _only(entry, entry.bug, entry.check)
  assert bad.status == "fail", (bad.status, bad.message)
  key = repr((entry.base, sorted(entry.twin.items(), key=str), entry.check))
  if key not in _TWINS:
    _TWINS[key] = _only(entry, entry.twin, entry.check)
  assert _TWINS[key].status == "pass", (_TWINS[key].status, _TWINS[key].message)


def test_the_far_too_high_rate_entry_diverges_finitely_and_is_called_too_high():
  """The zoo's SGD at 10,000x: the loss peaks far above its start and ends finite (dead
  units): input_independent_baseline says 'too HIGH' from the training curve."""
  e = zoo.BY_NAME["optimizer.learning_rate_far_too_high"]
  bad = _only(e, e.bug, e.check)
  assert bad.status == "fail" and "too HIGH" in bad.message, bad.message
  assert bad.details["train_loss_peak"] > 3 * bad.details["train_loss_first"]


def _outcome(rc, cause, **statuses):
  return run.Outcome(rc, statuses, cause, f"Most likely cause: {cause}", 1.0)


def test_scores_count_the_expected_check_the_first_line_and_twins_once():
  e1, e2 = zoo.ENTRIES[0], zoo.ENTRIES[1]
  twin = _outcome(0, None, a="pass", b="warn", c="skip")
  scored = [run.Scored(e1, _outcome(1, e1.root, **{e1.check: "fail"}), twin),
            run.Scored(e2, _outcome(1, "something_else", **{e2.check: "pass"}), twin)]
  s = run.summary(scored, 3.0)
  assert (s["caught_by_expected_check"], s["caught_by_any_fail"], s["right_root_cause"]) == (
      1, 2, 1)
  # one distinct twin: its skip is not a pair; one warn over two pairs
  assert (s["distinct_twins"], s["twin_fails"], s["twin_warn_pairs"], s["twin_pairs"]) == (
      1, 0, 1, 2)


def test_the_command_lists_and_refuses_unknown_entries(capsys):
  from jrecipe.zoo.__main__ import main
  assert main(["--list", "--kind=loss"]) == 0
  listed = capsys.readouterr().out.splitlines()
  assert len(listed) == len([e for e in zoo.ENTRIES if e.kind == "loss"])
  with pytest.raises(SystemExit, match="unknown entries"):
    main(["--only=no_such_bug"])
