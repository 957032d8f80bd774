"""Every shipped config, as a new user first runs it: its `:smoke` variant trains (with the
monitor on, as by default), inspects its data and rebuilds its report with no crash. (The
battery on each shipped config is tests/test_checks_battery.py.)"""

import json
import os

import pytest

from jrecipe.config_base import base_config  # noqa: F401  (the shipped configs import it)
from jrecipe.cli_config import load_config_with_overrides
from jrecipe.data_inspect import mode as inspect_mode
from jrecipe.report import mode as report_mode
from jrecipe.train import loop
from tests.helpers import REPO

SHIPPED = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))


@pytest.mark.parametrize("name", SHIPPED)
def test_smoke_variant_trains_inspects_and_reports(name, tmp_path):
  config = load_config_with_overrides(os.path.join(REPO, "configs", name) + ":smoke",
                                      ["--config.progress=False"])
  assert config.monitor.enabled, "the monitor is on by default: train as users do"
  wd = str(tmp_path / "run")
  summary = loop.train_and_evaluate(config, wd)
  assert summary["step"] >= 1 and "test" in summary
  for f in ("summary.json", "metrics.jsonl", "report.html", "diagnoses.json"):
    assert os.path.exists(os.path.join(wd, f)), f
  assert inspect_mode.run_mode(config, wd) == 0
  with open(os.path.join(wd, "inspect", "summary.json")) as f:
    assert json.load(f)
  assert report_mode.run_mode(None, wd) == 0
