"""Every mode on a streamed dataset (data.pipeline='stream'), without reading a split whole:
train, check, inspect (exact duplicates over every example, the rest on a stated sample),
ensemble and report. A split's inputs are never turned into one array, and no read asks for
more rows than a batch, an evaluation batch or a chunk of the opening pass."""

import json
import os

import numpy as np
import pytest

from jrecipe import modes
from jrecipe.data import stream, stream_inspect, stream_synthetic
from jrecipe.ensemble.evaluate import DEFAULT_BATCH  # the ensemble's prediction batch
from jrecipe.train import loop
from tests.helpers import tiny_config

TRAIN, TEST = 1500, 700  # train 1350 after the carved validation, test > DEFAULT_BATCH
CHUNK = 256  # the opening pass's and the inspection's reads, made small for the test
SAMPLE = 200  # the inspection's per-split sample


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
  """The largest read of any split (rows), with reading a split whole refused."""
  mp = pytest.MonkeyPatch()
  largest = [0]
  real = stream.Records.read

  def read(self, rows):
    largest[0] = max(largest[0], len(rows))
    return real(self, rows)

  def whole(self, *a, **k):
    raise AssertionError(f"a streamed split was read whole: {self!r}")

  mp.setattr(stream.Records, "read", read)
  mp.setattr(stream.StreamColumn, "__array__", whole)
  mp.setattr(stream, "CHUNK", CHUNK)
  mp.setattr(stream_inspect, "CHUNK", CHUNK)
  yield largest
  mp.undo()


@pytest.fixture(scope="module")
def run(tmp_path_factory, bounded):
  d = str(tmp_path_factory.mktemp("tfds"))
  name = stream_synthetic.prepare(d, config_name="modes", num_train=TRAIN, num_test=TEST,
                                  shape=(8, 8, 1))
  cfg = tiny_config(**{"data.name": f"tfds:{name}", "data.data_dir": d,
                       "data.pipeline": "stream", "data.stream_inspect_sample": SAMPLE,
                       "num_epochs": 1, "eval_batch_size": 128, "ema_decay": 0.9,
                       "checks.only": "data_before_net,splits_match,loss_at_init,overfit_one_batch",
                       "checks.budget_steps": 20, "checks.overfit_steps": 50})
  wd = str(tmp_path_factory.mktemp("run") / "wd")
  summary = loop.train_and_evaluate(cfg, wd)
  assert summary["test"]["count"] == TEST
  return cfg, wd


def _mode(name, cfg, wd):
  return modes.MODES[name].load()(cfg, wd)


def test_train_and_report(run, bounded):
  cfg, wd = run
  assert _mode("report", cfg, wd) == 0
  assert os.path.isfile(os.path.join(wd, "report.html"))
  assert 0 < bounded[0] <= CHUNK


def test_check_mode(run, bounded, tmp_path):
  cfg, _ = run
  out = str(tmp_path / "check")
  _mode("check", cfg, out)
  with open(os.path.join(out, "checks.json")) as f:
    status = {c["name"]: c["status"] for c in json.load(f)["checks"]}
  assert {"data_before_net", "loss_at_init", "overfit_one_batch"} <= set(status)
  assert status["splits_match"] == "pass"  # rows of every split read by index, batch-sized
  assert bounded[0] <= CHUNK


def test_inspect_mode_hashes_every_example_and_samples_the_rest(run, bounded, tmp_path):
  cfg, _ = run
  out = str(tmp_path / "inspect")
  assert _mode("inspect", cfg, out) == 0
  with open(os.path.join(out, "inspect", "summary.json")) as f:
    s = json.load(f)
  st = s["streamed"]
  assert st["exact_duplicates_all"]["examples_hashed"] == TRAIN + TEST
  assert st["sample"]["splits"]["train"] == {"sampled": SAMPLE, "of": TRAIN - TRAIN // 10}
  assert s["splits"] == {"train": SAMPLE, "validation": TRAIN // 10, "test": SAMPLE}
  assert bounded[0] <= CHUNK


def test_exact_duplicates_streamed_find_a_planted_copy_across_splits(run):
  from jrecipe.data import pipeline
  cfg, _ = run
  data = pipeline.load_dataset(cfg.data)
  clean = stream_inspect.exact_duplicates(data, top_k=5)
  test = data.raw["test"]["x"]
  real = test.records._read  # noqa: SLF001 - plant: test row 7 reads as train row 3
  train_rows = data.raw["train"]["x"].records

  def planted(rows):
    cols = real(rows)
    hit = rows == test.records.start + 7
    if hit.any():
      cols = dict(cols, x=cols["x"].copy())
      cols["x"][hit] = train_rows.read(np.array([3]))["x"][0]
    return cols

  test.records._read = planted  # noqa: SLF001
  try:
    dirty = stream_inspect.exact_duplicates(data, top_k=5)
  finally:
    test.records._read = real  # noqa: SLF001
  assert dirty["groups"] == clean["groups"] + 1
  assert dirty["across_splits"].get("train/test", 0) == \
      clean["across_splits"].get("train/test", 0) + 1


def test_ensemble_mode(run, bounded, tmp_path):
  cfg, wd = run
  e = cfg.copy_and_resolve_references()
  e.ensemble.source, e.ensemble.members = "ema", wd
  out = str(tmp_path / "ensemble")
  assert _mode("ensemble", e, out) == 0
  with open(os.path.join(out, "ensemble.json")) as f:
    assert json.load(f)["count"] == TEST
  assert bounded[0] <= DEFAULT_BATCH < TEST
