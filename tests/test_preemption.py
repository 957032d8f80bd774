"""Preemption as schedulers see it: a SIGTERM mid-epoch saves, exits 75 and resumes to exactly
the uninterrupted run: the same parameters, the same metric rows and epoch means; and the final
evaluation is written once whatever the restart point."""

import collections
import json
import os
import signal

import numpy as np
import pytest

from jrecipe.train import loop
from jrecipe.train.trainer import Hook
from tests.helpers import load_params, tiny_config

# 19 steps per epoch (1257 digits at batch 64); logged every 5 steps.
CFG = dict(num_epochs=3, log_every_steps=5)


class _SigtermAt(Hook):
  """Sends this process a SIGTERM after step `step` (the notice a preempted VM gets), or
  `times` SIGINTs (Ctrl-C pressed that often)."""

  def __init__(self, step, sig=signal.SIGTERM, times=1):
    self.step, self.sig, self.times = step, sig, times

  def after_step(self, loop_, metrics):
    if loop_.step == self.step:
      for _ in range(self.times):
        os.kill(os.getpid(), self.sig)


def _rows(workdir):
  out = collections.defaultdict(list)
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    r = json.loads(line)
    out[(r["split"], r["step"])].append(r)
  return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("ref") / "run")
  loop.train_and_evaluate(tiny_config(**CFG), wd)
  return wd


def test_sigterm_mid_epoch_resumes_to_the_uninterrupted_rows_and_means(reference, tmp_path):
  wd = str(tmp_path / "pre")
  summary = loop.train_and_evaluate(tiny_config(**CFG), wd, hooks=[_SigtermAt(26)])
  assert summary["preempted"] and "preempted" in summary["stopped"]
  stop = summary["step"]
  assert 19 < stop < 38 and stop % 5, stop  # mid-epoch, between two log steps
  assert "test" not in summary  # no final evaluation of an unfinished run
  assert {"step": stop, "val_loss": None} in summary["checkpoints"]  # the stop checkpoint
  final = loop.train_and_evaluate(tiny_config(**CFG), wd)
  # The stop checkpoint (no validation loss to rank it) goes once a newer one exists, instead
  # of being kept forever by keep-best.
  assert stop not in [c["step"] for c in final["checkpoints"]], final["checkpoints"]
  assert not os.path.exists(os.path.join(wd, "checkpoints", str(stop)))
  assert all(c["val_loss"] is not None for c in final["checkpoints"])
  a, b = load_params(reference), load_params(wd)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  ref, got = _rows(reference), _rows(wd)
  ignore = {"events"}
  assert {k for k in ref if k[0] not in ignore} == {k for k in got if k[0] not in ignore}
  for key, recs in ref.items():
    if key[0] in ignore:
      continue
    assert len(got[key]) == len(recs) == 1, key
    for name, value in recs[0].items():
      if isinstance(value, float) and name not in ("epoch",):
        assert got[key][0][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, name)
      elif name == "loss" and isinstance(value, list):
        np.testing.assert_allclose(got[key][0][name], value, rtol=1e-6)


def test_final_rows_once_after_rerunning_a_finished_run(reference, tmp_path):
  import shutil
  wd = str(tmp_path / "again")
  shutil.copytree(reference, wd)
  loop.train_and_evaluate(tiny_config(**CFG), wd)
  rows = _rows(wd)
  finals = {k: len(v) for k, v in rows.items() if k[0].startswith("final_")}
  assert finals and set(finals.values()) == {1}, finals
  assert {k for k in rows} == {k for k in _rows(reference)}


def test_a_first_ctrl_c_stops_with_a_checkpoint_and_a_second_stops_at_once(reference, tmp_path,
                                                                          capsys):
  """Ctrl-C used to end the run in a KeyboardInterrupt traceback, losing the steps since the
  last checkpoint; now the first one stops after the step with a checkpoint, as SIGTERM does
  (the resumed run is bit-identical), and a second one stops at once."""
  wd = str(tmp_path / "ctrl_c")
  summary = loop.train_and_evaluate(tiny_config(**CFG), wd, hooks=[_SigtermAt(26, signal.SIGINT)])
  assert summary["preempted"] and "preempted (SIGINT)" in summary["stopped"]
  assert {"step": summary["step"], "val_loss": None} in summary["checkpoints"]
  assert "press Ctrl-C again to stop at once" in capsys.readouterr().err
  loop.train_and_evaluate(tiny_config(**CFG), wd)
  a, b = load_params(reference), load_params(wd)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(tiny_config(**CFG), str(tmp_path / "twice"),
                            hooks=[_SigtermAt(26, signal.SIGINT, times=2)])
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
