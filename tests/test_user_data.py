"""Your own data by import path (tests/user_data.py, docs/your_data.md): numpy arrays per split,
grain data sources over ArrayRecord files and a TFDS builder class give the same examples and
go end to end (train, check, inspect, report); your own augmentation changes labels with the
inputs; bad input is one paragraph and exit 2 (issue 17)."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from jrecipe import experiment
from jrecipe.checks import runner as check_runner
from jrecipe.checks.pytest_plugin import load_config
from jrecipe.data.user import read_user
from jrecipe.data_inspect import mode as inspect_mode
from jrecipe.errors import UserError
from jrecipe.report import mode as report_mode
from jrecipe.train import loop
from tests.helpers import REPO, run_cli

FAST = dict(budget_steps=40, batch_size=32, overfit_steps=300, gradcheck_burnin_steps=5)
WAYS = ["tests.user_data:load", "tests.user_data:load_array_records",
        "tests.user_data:DigitsBuilder"]


# --- your own data and augmentation (docs/your_data.md) ----------------------------------------

def user_data_config(name="tests.user_data:load", data_dir="", **data):
  cfg = load_config(os.path.join(REPO, "configs", "digits_mlp.py"))
  cfg.data.name = name
  cfg.data.data_dir = data_dir
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
  _check_inspect_report(cfg, wd)


def _check_inspect_report(cfg, wd):
  """--mode=check (two data checks), inspect and report on a trained run, in process."""
  cfg.checks.only = "data_before_net,input_independent_baseline"
  assert check_runner.run_mode(cfg, wd) == 0
  with open(os.path.join(wd, "checks.json")) as f:
    assert json.load(f)["summary"]["pass"] == 2
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
    ({"data": "tests.user_data:uneven_source"}, "a 'train' source returning mismatched shapes"),
    ({"data": "tests.user_data:huge_source"}, "the in-memory path reads every split whole"),
    ({"data": "tests.user_data:NoSuchBuilder"}, "has no attribute 'NoSuchBuilder'"),
    ({"data": "tests.user_data:NotTfds"}, "is a class but not a TFDS builder"),
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




# --- the same digits three ways: arrays, grain sources over ArrayRecord, a TFDS builder ---------

def _rows(split):
  """A split's (x, y) rows in a canonical order (TFDS stores examples shuffled by key)."""
  flat = np.concatenate([split["x"].reshape(len(split["x"]), -1), split["y"][:, None]], axis=1)
  return flat[np.lexsort(flat.T[::-1])]


def test_each_way_gives_the_same_examples(tmp_path):
  arrays = read_user(WAYS[0])
  grain_meta, grain_splits = read_user(WAYS[1])
  tfds_meta, tfds_splits = read_user(WAYS[2], str(tmp_path / "tfds"))
  assert os.path.exists(tmp_path / "tfds" / "digits_builder" / "1.0.0" / "dataset_info.json")
  for s, d in arrays[1].items():  # the grain sources keep the stored order
    np.testing.assert_array_equal(grain_splits[s]["x"], d["x"])
    np.testing.assert_array_equal(grain_splits[s]["y"], d["y"])
    np.testing.assert_array_equal(_rows(tfds_splits[s]), _rows(d))
  assert grain_meta == arrays[0]
  assert tfds_meta["task"] == "classification" and tfds_meta["num_classes"] == 10
  assert tfds_meta["class_names"] == tuple(str(i) for i in range(10))  # from its ClassLabel


def test_a_builder_named_in_the_config_trains_checks_inspects_reports(tmp_path):
  """Prepared into data.data_dir; the other ways end in the same arrays (test above)."""
  cfg = user_data_config(WAYS[2], data_dir=str(tmp_path / "tfds"))
  wd = str(tmp_path / "run")
  summary = loop.train_and_evaluate(cfg, wd)
  assert summary["test"]["accuracy"] > 0.5
  _check_inspect_report(cfg, wd)


def test_a_source_of_mismatched_shapes_exits_2_writing_nothing(tmp_path):
  wd = tmp_path / "run"
  r = run_cli([f"--config={os.path.join(REPO, 'configs', 'digits_mlp.py')}",
               "--config.data.name=tests.user_data:uneven_source", f"--workdir={wd}"])
  assert r.returncode == 2, r.stderr[-2000:]
  assert "element 7 has x (7, 8, 1)" in r.stderr and not wd.exists()


def test_a_source_of_pairs_reads_in_order():
  import grain
  from jrecipe.data.user import read_source
  x, y = np.arange(24, dtype=np.float32).reshape(6, 2, 2), np.arange(6) % 3
  src = grain.MapDataset.source(range(6)).map(lambda i: (x[i], y[i]))
  xs, ys = read_source("test", "train", src)
  np.testing.assert_array_equal(xs, x)
  np.testing.assert_array_equal(ys, y)
