"""Models written in the ecosystem's styles (tests/foreign_models.py), your own data and your
own augmentation (tests/user_data.py), through every mode: no crash, no false alarm, and the
planted bugs caught by the check made for them (issue 17)."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from jrecipe import experiment
from jrecipe.checks.pytest_plugin import load_config
from jrecipe.checks.runner import run_battery
from jrecipe.data_inspect import mode as inspect_mode
from jrecipe.errors import UserError
from jrecipe.report import mode as report_mode
from jrecipe.train import loop
from tests.helpers import REPO

FAST = dict(budget_steps=40, batch_size=32, overfit_steps=300, gradcheck_burnin_steps=5)

# style -> (adapter fields of the config's model section, the checks its adaptation touches)
STYLES = {
    "nnx_cnn": ({"width_field": "width"},
                ["seed_determinism", "eval_mode", "state_updates", "gradient_check",
                 "capacity_decreases_loss"]),
    "partitioned_mlp": ({"width_field": "hidden"},
                        ["init_bias", "gradient_check", "capacity_decreases_loss"]),
    "float32_inside": ({}, ["gradient_check", "loss_at_init"]),
    "with_extras": ({"output": 0}, ["logits_not_probabilities", "eval_mode", "dropout_varies"]),
    "zero_head": ({"width_field": "width"},
                  ["logits_not_probabilities", "init_bias", "capacity_decreases_loss"]),
    "nested_head": ({}, ["init_bias"]),
    "tiny_resnet": ({}, ["eval_mode", "state_updates", "gradient_check"]),
    "shifting_decoder": ({"shifts_inputs": True}, ["loss_at_init", "causal_dependency"]),
}
SEQUENCE = {"shifting_decoder", "leaky_decoder"}


def config_for(factory: str, **model_fields):
  """A shipped config (digits MLP, or the digits-sequence transformer) on `factory`."""
  base = "digits_seq_transformer.py" if factory in SEQUENCE else "digits_mlp.py"
  cfg = load_config(os.path.join(REPO, "configs", base))
  cfg.model = ml_collections.ConfigDict({"name": f"tests.foreign_models:{factory}",
                                         **model_fields})
  for k, v in FAST.items():
    cfg.checks[k] = v
  return cfg


@pytest.fixture(scope="module")
def built():
  return {name: experiment.build(config_for(name, **fields))
          for name, (fields, _) in STYLES.items()}


@pytest.mark.parametrize("name", sorted(STYLES))
def test_the_checks_each_adaptation_touches_pass(built, name):
  results = run_battery(built[name], only=STYLES[name][1])
  bad = {r.name: (r.status, r.message) for r in results if r.status in ("fail", "warn")}
  assert not bad, bad
  by_name = {r.name: r for r in results}
  if name == "float32_inside":  # not a FAIL: the model computes in float32 by design
    g = by_name["gradient_check"]
    assert g.status == "skip" and "inconclusive: the model computes in float32" in g.message


def test_heads_are_found_wherever_they_sit(built):
  heads = {n: built[n].model.head for n in ("nested_head", "zero_head", "partitioned_mlp",
                                              "nnx_cnn", "shifting_decoder")}
  assert heads == {"nested_head": ("classifier", "out", "bias"), "zero_head": ("head", "bias"),
                   "partitioned_mlp": ("wo", "bias"), "nnx_cnn": ("linear", "bias"),
                   "shifting_decoder": ("logits", "bias")}
  exp = built["nested_head"]
  v = exp.init_variables(jax.random.key(0))
  np.testing.assert_allclose(np.asarray(v["params"]["classifier"]["out"]["bias"]),
                             exp.head_bias(), rtol=1e-6)


def test_params_are_unboxed_and_the_built_nnx_module_follows_the_seed(built):
  from flax import linen as nn
  v = built["partitioned_mlp"].init_variables(jax.random.key(0))
  assert not any(isinstance(x, nn.meta.AxisMetadata) for x in
                 jax.tree.leaves(v, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)))
  model = built["nnx_cnn"].model  # the factory returns NNXCNN(..., rngs=nnx.Rngs(0))
  x = built["nnx_cnn"].sample_input()
  a, b = model.init(jax.random.key(0), x), model.init(jax.random.key(1), x)
  assert not np.allclose(a["params"]["conv"]["kernel"], b["params"]["conv"]["kernel"])
  again = model.init(jax.random.key(0), x)
  np.testing.assert_array_equal(a["params"]["conv"]["kernel"], again["params"]["conv"]["kernel"])


@pytest.mark.parametrize("factory, fields, check", [
    ("leaky_decoder", {"shifts_inputs": True}, "causal_dependency"),  # mask sees t+1
    ("nnx_bn_batch_stats_at_eval", {}, "eval_mode"),  # BatchNorm on batch statistics at eval
    ("batch_mixing", {}, "batch_independence"),  # a flatten that mixes the batch
])
def test_planted_bug_in_a_foreign_model_is_caught_by_its_check(factory, fields, check):
  result = run_battery(experiment.build(config_for(factory, **fields)), only=[check])
  assert {r.name: r.status for r in result}[check] == "fail"


@pytest.mark.parametrize("name", ["nnx_cnn", "with_extras", "tiny_resnet", "shifting_decoder"])
def test_every_mode_runs(name, tmp_path):
  cfg = config_for(name, **STYLES[name][0])
  cfg.num_epochs = 0.5
  cfg.progress = False
  cfg.monitor.every_steps = 2
  cfg.monitor.probe_every_steps = 4
  wd = str(tmp_path / name)
  summary = loop.train_and_evaluate(cfg, wd)
  assert "test" in summary and os.path.exists(os.path.join(wd, "report.html"))
  assert inspect_mode.run_mode(cfg, wd) == 0
  assert report_mode.run_mode(None, wd) == 0


# --- your own data and augmentation (docs/your_data.md) ----------------------------------------

def user_data_config(**data):
  cfg = load_config(os.path.join(REPO, "configs", "digits_mlp.py"))
  cfg.data.name = "tests.user_data:load"
  for k, v in data.items():
    cfg.data.augment[k] = v
  for k, v in FAST.items():
    cfg.checks[k] = v
  cfg.num_epochs = 1
  cfg.progress = False
  return cfg


def test_your_data_and_augmentation_train_check_inspect_report(tmp_path):
  cfg = user_data_config(fn="tests.user_data:rotate_with_label")
  exp = experiment.build(cfg)
  assert exp.spec.splits == {"train": 1257, "validation": 270, "test": 270}
  wd = str(tmp_path / "run")
  summary = loop.train_and_evaluate(cfg, wd, exp=exp)
  assert summary["test"]["accuracy"] > 0.5
  results = run_battery(exp, only=["data_before_net", "input_independent_baseline"])
  assert all(r.status == "pass" for r in results), [(r.name, r.message) for r in results]
  assert inspect_mode.run_mode(cfg, wd) == 0 and report_mode.run_mode(None, wd) == 0


def test_the_augmentation_changes_labels_with_the_inputs():
  import jax.numpy as jnp
  exp = experiment.build(user_data_config(fn="tests.user_data:rotate_with_label"))
  fn = exp.augment_fn()
  y = jnp.asarray([6, 9, 3, 0] * 16, jnp.int32)
  x = jnp.broadcast_to(jnp.arange(64.0).reshape(1, 8, 8, 1), (64, 8, 8, 1))
  x2, y2 = fn(x, jax.random.key(0), y)
  turned = np.asarray(y2 != y)
  assert turned.any() and set(np.asarray(y)[turned].tolist()) <= {6, 9}
  np.testing.assert_array_equal(np.asarray(x2)[turned], np.asarray(x)[turned][:, ::-1, ::-1])
  assert np.all(np.asarray(y2)[np.asarray(y) == 3] == 3)


@pytest.mark.parametrize("change, needle", [
    ({"data": "tests.user_data:mismatched"}, "mismatched 'validation' arrays"),
    ({"fn": "tests.user_data:crop_to_six"}, "changes the inputs from (2, 8, 8, 1)"),
    ({"model": {"name": "tests.foreign_models:zero_head", "widht": 8}}, "widht"),
])
def test_bad_input_is_one_paragraph(change, needle):
  cfg = user_data_config(**({"fn": change["fn"]} if "fn" in change else {}))
  if "data" in change:
    cfg.data.name = change["data"]
  if "model" in change:
    cfg.model = ml_collections.ConfigDict(change["model"])
  with pytest.raises(UserError) as e:
    experiment.build(cfg)
  assert needle in str(e.value) and "\n" not in str(e.value)


# --- a shipped config pointed at your factory, your fields on the command line ------------------

def test_a_shipped_config_takes_your_factory_and_its_own_fields():
  from jrecipe.cli_config import load_config_with_overrides
  cfg = load_config_with_overrides(os.path.join(REPO, "configs", "digits_mlp.py"), [
      "--config.model.name=tests.foreign_models:zero_head", "--config.model.width=16"])
  assert cfg.model.width == 16 and "activation" in cfg.model.inherited
  exp = experiment.build(cfg)  # hidden/activation/dropout/init_scale are mlp's: not passed
  v = exp.model.init(jax.random.key(0), exp.sample_input())
  assert v["params"]["Dense_0"]["kernel"].shape == (64, 16)


def test_a_typo_in_your_field_exits_2_naming_the_valid_ones(tmp_path):
  from tests.helpers import run_cli
  r = run_cli([f"--config={os.path.join(REPO, 'configs', 'digits_mlp.py')}",
               "--config.model.name=tests.foreign_models:zero_head", "--config.model.widht=16",
               f"--workdir={tmp_path / 'run'}", "--mode=check"])
  assert r.returncode == 2, r.stderr[-2000:]
  assert "widht" in r.stderr and "width=32" in r.stderr


# --- init_bias's tolerance, on a population of correctly initialised models --------------------

def test_init_bias_passes_default_flax_heads_and_warns_on_a_2x_init():
  """A miniature of the calibration in init_bias's docstring (there: 126 MLPs, max 0.45 nats)."""
  from flax import linen as nn
  from sklearn.datasets import load_digits
  from jrecipe.checks.init import copy_head_bias, init_bias
  from tests.planted import linen_model, xent_loss

  class MLP(nn.Module):
    widths: tuple
    act: str

    @nn.compact
    def __call__(self, h, train: bool = False):
      for w in self.widths:
        h = getattr(nn, self.act)(nn.Dense(w)(h))
      return nn.Dense(10, name="head")(h)

  d = load_digits()
  x = ((d.data - d.data.mean()) / d.data.std()).astype(np.float32)[:256]
  y = d.target[:256].astype(np.int32)
  freq = (np.bincount(d.target, minlength=10) + 1.0) / (len(d.target) + 10)
  bias = np.log(freq) - np.log(freq).mean()
  kl = {}
  for widths, act, scale in [((32,), "relu", 1.0), ((256, 256), "gelu", 1.0),
                             ((64, 64, 64), "tanh", 1.0), ((256, 256), "relu", 2.0)]:
    model = linen_model(MLP(widths, act))
    v = model.init(jax.random.key(0), x[:2])
    v = {"params": jax.tree.map(lambda a: a * scale if a.ndim == 2 else a, v["params"])}
    r = init_bias(model, xent_loss(), v, copy_head_bias(v, bias), x, y, num_classes=10)
    kl[(widths, act, scale)] = (r.status, round(r.details["kl_with"], 3))
  assert [s for (_, _, sc), (s, _) in kl.items() if sc == 1.0] == ["pass"] * 3, kl
  assert kl[((256, 256), "relu", 2.0)][0] == "warn", kl


def test_loss_at_init_reads_a_nested_head_bias(built):
  """A data-derived bias at classifier/out/bias is the reference, not ('head', 'bias')."""
  from jrecipe.checks.init import loss_at_init
  from jrecipe.experiment import set_head_bias
  exp = built["nested_head"]
  v = exp.init_variables(jax.random.key(0), init_bias=False)
  bias = np.array([4.0] + [0.0] * 9, np.float32)  # far from uniform: ln 10 would be wrong
  v = set_head_bias(v, bias, exp.model.head_path)
  x, y = exp.data.arrays["validation"]["x"][:256], exp.data.arrays["validation"]["y"][:256]
  r = loss_at_init(exp.model, exp.loss, v, x, y, num_classes=10)
  assert r.details["head_bias_set"] and r.status == "pass", r.message
  assert r.details["reference"] > 3.0  # the loss of the constant bias, not ln 10 = 2.30
