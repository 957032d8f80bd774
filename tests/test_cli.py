"""The command line: the Flax-examples convention, and bad input -> one paragraph, exit 2."""

import json
import os

import pytest

from tests.helpers import run_cli

SMOKE = "--config=configs/digits_mlp.py:smoke"


@pytest.mark.parametrize("args, needle", [
    ([SMOKE, "--config.optimizer.learnin_rate=1e-3"], "learning_rate"),
    ([SMOKE, "--config.optimizer.learning_rate=abc"], "learning_rate"),
    ([SMOKE, "--config.model.name=mlpp"], "Valid model names"),
    ([SMOKE, "--config.data.name=digitz"], "digits"),
    ([SMOKE, "--config.loss.name=xent"], "softmax_xent"),
    (["--config=configs/does_not_exist.py"], "digits_mlp.py"),
    ([SMOKE, "--mode=trian"], "Valid modes"),
    (["--config=configs/digits_mlp.py:smok"], "valid variants are digits_mlp.py:smoke"),
    ([SMOKE, "--mode=search", "--config.search.metric=f1",
      "--config.search.space=optimizer.learning_rate=loguniform(1e-4,1e-2)"], "search.metric"),
])
def test_bad_input_exits_2_with_a_paragraph_and_writes_nothing(tmp_path, args, needle):
  wd = tmp_path / "wd"
  r = run_cli([*args, f"--workdir={wd}"])
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  err = r.stderr.strip().splitlines()
  assert err and err[-1].startswith("jrecipe: error:"), r.stderr[-2000:]
  assert needle in err[-1]
  assert "Traceback" not in r.stderr
  assert not wd.exists() or not any(wd.iterdir())


def test_smoke_run_writes_resolved_config_with_overrides(tmp_path):
  wd = tmp_path / "wd"
  r = run_cli([SMOKE, f"--workdir={wd}", "--config.optimizer.learning_rate=0.002",
               "--config.seed=3"])
  assert r.returncode == 0, r.stderr[-3000:]
  cfg = json.load(open(wd / "config.json"))
  assert cfg["optimizer"]["learning_rate"] == 0.002 and cfg["seed"] == 3
  assert (wd / "summary.json").exists()
  # the same work directory with another config is refused, not blended
  r = run_cli([SMOKE, f"--workdir={wd}", "--config.seed=4"])
  assert r.returncode == 2 and "different config" in r.stderr
  assert json.load(open(wd / "config.json"))["seed"] == 3
