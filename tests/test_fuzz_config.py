"""Property test: generated config overrides (tests/config_fuzz.py) through the entry point's
real path (jrecipe.main.execute, `--mode=validate`: every check a training run makes before its
first step) give exit 0 or 2, one paragraph on stderr and no traceback; nonsense is refused;
nothing is written into a new work directory and an existing run is left byte for byte.

In-process, so hundreds of examples take seconds; bench/fuzz.py runs the same generator through
real `jrecipe --mode=train` subprocesses, each bounded in time.
"""

import contextlib
import io
import os

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from jrecipe import main as main_lib
from jrecipe import modes
from jrecipe.cli_config import load_config_with_overrides
from jrecipe.errors import UserError
from tests.config_fuzz import DIGITS, cases, snapshot
from tests.helpers import REPO

SMOKE = os.path.join(REPO, DIGITS) + ":smoke"


def run_entry(overrides, workdir: str, mode: str = "validate") -> tuple[int, str]:
  """(exit status, stderr) of `jrecipe --config=digits_mlp.py:smoke OVERRIDES --mode=MODE`.

  The flags are parsed as the entry point parses them (`load_config_with_overrides` is its
  parser on a private FlagValues: the same explanation, which main prints and exits 2 on);
  everything after parsing is `jrecipe.main.execute`, the entry point's own code.
  """
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
      try:
        config = load_config_with_overrides(SMOKE, overrides)
      except UserError as e:
        main_lib._fail(str(e))
      code = main_lib.execute(modes.MODES[mode], config, workdir, modes.ModeOptions(),
                              start_runtime=False)
    except SystemExit as e:
      code = e.code
  return code, err.getvalue()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished smoke run of digits_mlp, trained by the same entry point."""
  wd = str(tmp_path_factory.mktemp("fuzz") / "run")
  code, err = run_entry(["--config.model.hidden=(32,)"], wd, mode="train")
  assert code == 0, err
  return wd, snapshot(wd)


@pytest.fixture(scope="module")
def fresh_parent(tmp_path_factory):
  return str(tmp_path_factory.mktemp("fresh"))


def _assert_outcome(case, code, err):
  assert code in (0, 2), (case, code, err)
  if code:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jrecipe: error: "), (case, err)
    assert "Traceback" not in err
  if case.nonsense:
    assert code == 2, f"nonsense accepted: {case}"


# 300 examples take about 20 s on the shared 2-core machine; JRECIPE_HYPOTHESIS_EXAMPLES=3000
# for a longer hunt.
@settings(max_examples=int(os.environ.get("JRECIPE_HYPOTHESIS_EXAMPLES", 300)), deadline=None,
          database=None, suppress_health_check=list(HealthCheck))
@given(case=cases(), existing=st.booleans())
def test_generated_overrides_exit_0_or_2_with_one_paragraph_and_write_nothing(
    case, existing, finished_run, fresh_parent):
  run_dir, before = finished_run
  wd = run_dir if existing else os.path.join(fresh_parent, "new")
  code, err = run_entry(list(case.overrides), wd)
  event(f"exit {code}" + (" (nonsense)" if case.nonsense else ""))
  _assert_outcome(case, code, err)
  if existing:
    assert snapshot(run_dir) == before, case
  else:
    assert not os.path.exists(wd), (case, os.listdir(wd))


@pytest.mark.parametrize("overrides, needle", [
    (["--config.model.hidden=(1000000000,)"], "needs about"),
    (["--config.monitor.every_steps=-1"], "config.monitor.every_steps"),
    (["--config.monitor.probe_examples=0"], "config.monitor.probe_examples"),
    (["--config.parallel.mode=pmap", "--config.parallel.num_devices=-1"],
     "config.parallel.num_devices"),
    (["--config.eval_splits=('validation',)"], "removed"),
    (["--config.data.data_dir=/etc/passwd"], "This path is a file"),
    (["--config.data.data_dir=/etc/passwd/x"], "lies under /etc/passwd, a file"),
])
def test_the_issues_nonsense_is_refused_in_process(overrides, needle, fresh_parent):
  """The cases issue 19 found accepted, crashing or hanging: each is one paragraph, exit 2."""
  code, err = run_entry(overrides, os.path.join(fresh_parent, "listed"))
  assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
  assert not os.path.exists(os.path.join(fresh_parent, "listed"))


def test_a_warmup_longer_than_the_run_is_a_warning_line_and_a_shorter_one_is_silent(caplog):
  """Not silent: the issue found it accepted without a word. Not refused: smoke variants
  shorten num_epochs and keep the full run's warm-up on purpose."""
  from jrecipe import experiment
  from jrecipe.validate import warn_long_warmup
  long = experiment.build(load_config_with_overrides(SMOKE, [
      "--config.schedule.name=cosine", "--config.schedule.warmup=100000"]))
  with caplog.at_level("WARNING", logger="jrecipe"):
    (line,) = warn_long_warmup(long)
  assert "config.schedule.warmup is 100000 epochs" in line and "never reached" in line
  assert line in caplog.text
  short = experiment.build(load_config_with_overrides(SMOKE, ["--config.schedule.warmup=1"]))
  assert warn_long_warmup(short) == []


@pytest.mark.parametrize("mode", ["validate", "train"])
def test_a_bad_workdir_is_one_paragraph_in_every_mode(mode, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  for wd, needle in [("", "--workdir is empty"), (str(a_file), "is not a directory"),
                     (str(a_file / "run"), "a_file")]:
    code, err = run_entry([], wd, mode=mode)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (wd, err)
  assert a_file.read_text() == "" and sorted(os.listdir(tmp_path)) == ["a_file"]


@pytest.mark.parametrize("section", ["{}", "{'mode': 'single'}"])
def test_a_section_replaced_by_a_partial_dict_takes_the_defaults(section, fresh_parent):
  """bench/fuzz.py found `--config.parallel={}` an AttributeError traceback (exit 1)."""
  wd = os.path.join(fresh_parent, "partial")
  code, err = run_entry([f"--config.parallel={section}"], wd)
  assert code == 0 and not err.strip(), err
  assert not os.path.exists(wd)
