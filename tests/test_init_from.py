"""Pretrained initialisation (`--config.init_from`): restore by name and shape, report, freeze.

Recipe stage 4 ('use a pretrained network'): a source MLP is trained once on the digits
downsampled to 4x4; the tests restore it into fresh models (same task, skipped head, other
widths), freeze it, and fine-tune it on another offline dataset with the same input size and
classes (mnist5k downsampled 28 -> 4), where it must learn faster than from scratch.
"""

import json
import os

import jax
import numpy as np
import pytest

from jrecipe import experiment as experiment_lib
from jrecipe.errors import UserError
from jrecipe.train import init_from, loop
from tests.helpers import initial_state, load_params, read_json, tiny_config


HIDDEN = (64,)
BODY = 16 * 64 + 64  # dense_0 parameters on 4x4 inputs
HEAD = 64 * 10 + 10


def _cfg(**kw):
  kw = {"data.downsample": 2, "model.hidden": HIDDEN, **kw}
  c = tiny_config(**kw)
  c.lock()
  return c


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  """A digits (4x4) MLP 16-64-10 trained for 6 epochs: the 'pretrained network'."""
  wd = str(tmp_path_factory.mktemp("init_src") / "src")
  summary = loop.train_and_evaluate(_cfg(num_epochs=6, seed=3), wd)
  return wd, summary


def _val_loss(exp, variables):
  val = exp.data.arrays["validation"]
  out = exp.model.apply(variables, val["x"], train=False)
  return float(np.mean(exp.loss.per_example(out, val["y"])))


def _flat_params(state):
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def test_restore_matches_source_and_starts_lower(source_run):
  src, summary = source_run
  cfg = _cfg(init_from=src, seed=7)
  exp = experiment_lib.build(cfg)
  state = initial_state(exp)
  restored = _flat_params(state)
  want = load_params(src)
  assert set(restored) == set(want)
  for k in want:
    np.testing.assert_array_equal(restored[k], want[k])
  scratch_exp = experiment_lib.build(_cfg(seed=7))
  scratch = initial_state(scratch_exp)
  from jrecipe.train.state import variables_of
  loss_restored = _val_loss(exp, variables_of(state))
  loss_scratch = _val_loss(exp, variables_of(scratch))
  assert loss_restored == pytest.approx(summary["validation"]["loss"], rel=1e-4)
  assert loss_restored < 0.8 * loss_scratch
  report = exp.init_from_report
  assert report["restored_fraction"] == 1.0 and report["fresh"] == []
  assert report["step"] == max(s["step"] for s in summary["checkpoints"])
  path = init_from.write_report(str(os.path.dirname(src)), report)
  assert read_json(path)["restored"] == report["restored"]


def test_skip_pattern_leaves_head_fresh(source_run):
  src, _ = source_run
  exp = experiment_lib.build(_cfg(init_from=src, init_from_skip="head", seed=7))
  state = initial_state(exp)
  fresh_exp = experiment_lib.build(_cfg(seed=7))
  fresh = _flat_params(initial_state(fresh_exp))
  got, want = _flat_params(state), load_params(src)
  # Fresh, drawn like a scratch init (same scale), from the stream of (seed, source):
  # not the scratch run's own draw, so no seed can replay another run's head.
  head, scratch = got["['head']['kernel']"], fresh["['head']['kernel']"]
  assert not np.allclose(head, scratch) and not np.allclose(head, want["['head']['kernel']"])
  assert np.std(head) == pytest.approx(np.std(scratch), rel=0.2)
  np.testing.assert_array_equal(
      head, _flat_params(initial_state(experiment_lib.build(_cfg(
          init_from=src, init_from_skip="head", seed=7))))["['head']['kernel']"])  # repeatable
  np.testing.assert_array_equal(got["['dense_0']['kernel']"], want["['dense_0']['kernel']"])
  report = exp.init_from_report
  assert sorted(report["skipped"]["pattern"]) == ["params/head/bias", "params/head/kernel"]
  assert report["leaves"]["params/head/kernel"]["pattern"] == "head"
  assert report["restored_fraction"] == pytest.approx(BODY / (BODY + HEAD))


def test_a_skipped_head_with_the_source_seed_is_not_the_source_initial_head(source_run):
  """Issue 22: with the source's own seed, a 'fresh' head drawn from the seed's init stream is
  the very head the source started from, which its trained body fits: the run starts at the
  pretrained loss. The fresh stream folds in the source's identity, so it never is."""
  src, _ = source_run
  source_init = _flat_params(initial_state(experiment_lib.build(_cfg(seed=3))))
  exp = experiment_lib.build(_cfg(init_from=src, init_from_skip="head", seed=3))
  state = initial_state(exp)
  got = _flat_params(state)
  leaf = "['head']['kernel']"  # (the bias starts at zero either way)
  assert not np.allclose(got[leaf], source_init[leaf])
  assert np.std(got[leaf]) == pytest.approx(np.std(source_init[leaf]), rel=0.2)  # same law


def test_mostly_mismatched_is_an_error_unless_allowed(source_run, tmp_path):
  src, _ = source_run
  wd = str(tmp_path / "run")
  with pytest.raises(UserError, match="most of this model.*shape mismatch.*allow_partial"):
    loop.train_and_evaluate(_cfg(init_from=src, **{"model.hidden": (48,)}), wd)
  assert not os.path.exists(wd)  # refused before anything was written
  exp = experiment_lib.build(_cfg(init_from=src, init_from_allow_partial=True,
                                  **{"model.hidden": (48,)}))
  initial_state(exp)
  report = exp.init_from_report
  assert report["restored"] == ["params/head/bias"]
  assert report["leaves"]["params/dense_0/kernel"]["source_shape"] == [16, 64]
  assert report["leaves"]["params/dense_0/kernel"]["shape"] == [16, 48]
  exp = experiment_lib.build(_cfg(init_from=src, init_from_allow_partial=True,
                                  **{"model.hidden": (64, 64)}))
  initial_state(exp)
  assert exp.init_from_report["skipped"]["missing"] == ["params/dense_1/bias",
                                                        "params/dense_1/kernel"]


@pytest.mark.parametrize("overrides,match", [
    ({"init_from": "/nonexistent/run"}, "does not exist"),
    ({"init_from_checkpoint": "12345"}, "no checkpoint at that step"),
    ({"init_from_checkpoint": "newest"}, "'latest', 'best' or a step"),
    ({"init_from_skip": "head,("}, "not a valid regular expression"),
])
def test_bad_input(source_run, overrides, match, tmp_path):
  src, _ = source_run
  wd = str(tmp_path / "run")
  with pytest.raises(UserError, match=match):
    loop.train_and_evaluate(_cfg(**{"init_from": src, **overrides}), wd)
  assert not os.path.exists(wd)


def test_a_damaged_source_checkpoint_is_refused_naming_the_other_steps(source_run, tmp_path):
  """One changed byte in the source's latest checkpoint: refused before orbax reads it (its
  SHA-256 manifest), naming the run's other steps; nothing written."""
  import shutil
  src, summary = source_run
  copy = str(tmp_path / "src")
  shutil.copytree(src, copy)
  latest = max(s["step"] for s in summary["checkpoints"])
  d = os.path.join(copy, "checkpoints", str(latest), "state", "d")
  biggest = max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.seek(os.path.getsize(biggest) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
  wd = str(tmp_path / "run")
  others = sorted(s["step"] for s in summary["checkpoints"] if s["step"] != latest)
  with pytest.raises(UserError, match=rf"given by init_from is damaged .*changed bytes.*"
                                      rf"also has steps \{others}"):
    loop.train_and_evaluate(_cfg(init_from=copy), wd)
  assert not os.path.exists(wd)


def test_checkpoint_dir_and_best(source_run):
  src, summary = source_run
  steps = sorted(s["step"] for s in summary["checkpoints"])
  for value, which, step in ((os.path.join(src, "checkpoints", str(steps[0])), "latest",
                              steps[0]), (src, "best", None), (src, str(steps[0]), steps[0])):
    exp = experiment_lib.build(_cfg(init_from=value, init_from_checkpoint=which))
    state = initial_state(exp)
    got_step = exp.init_from_report["step"]
    if step is not None:
      assert got_step == step
      want = load_params(src, step=step)
      np.testing.assert_array_equal(_flat_params(state)["['head']['kernel']"],
                                    want["['head']['kernel']"])
    else:
      best = min(summary["checkpoints"], key=lambda s: s["val_loss"])["step"]
      assert got_step == best


@pytest.mark.slow
def test_fine_tune_on_another_dataset_learns_faster(source_run, tmp_path):
  """digits 4x4 -> mnist5k 4x4 (256 examples, one epoch): lower loss than from scratch."""
  src, _ = source_run
  kw = {"num_epochs": 1, "batch_size": 32, "ema_decay": 0.0, "seed": 1, "data.name": "mnist5k",
        "data.downsample": 7, "data.train_subset": 256, "optimizer.learning_rate": 3e-3}
  scratch = loop.train_and_evaluate(_cfg(**kw), str(tmp_path / "scratch"))
  tuned = loop.train_and_evaluate(_cfg(init_from=src, **kw), str(tmp_path / "tuned"))
  # Measured (seeds 1, 2): validation loss 2.15 / 2.19 from scratch, 1.95 / 1.98 fine-tuned.
  assert tuned["validation"]["loss"] < scratch["validation"]["loss"] - 0.08
  assert tuned["validation"]["accuracy"] > scratch["validation"]["accuracy"] + 0.05
  report = json.load(open(tmp_path / "tuned" / "init_from.json"))  # the run says what it restored
  assert report["restored"] and not (tmp_path / "scratch" / "init_from.json").exists()


@pytest.mark.slow
def test_freeze_keeps_restored_params_and_trains_the_rest(source_run, tmp_path):
  src, _ = source_run
  cfg = _cfg(init_from=src, init_from_skip="head", init_from_freeze=True, num_epochs=0.5,
             ema_decay=0.0)
  exp = experiment_lib.build(cfg)
  init = _flat_params(initial_state(exp))
  loop.train_and_evaluate(cfg, str(tmp_path / "frozen"), exp=exp)
  got, want = load_params(str(tmp_path / "frozen")), load_params(src)
  np.testing.assert_array_equal(got["['dense_0']['kernel']"], want["['dense_0']['kernel']"])
  np.testing.assert_array_equal(got["['dense_0']['bias']"], want["['dense_0']['bias']"])
  assert not np.allclose(got["['head']['kernel']"], init["['head']['kernel']"])
  # Planted: the same run without freezing moves the restored layer.
  cfg2 = _cfg(init_from=src, init_from_skip="head", num_epochs=0.5, ema_decay=0.0)
  loop.train_and_evaluate(cfg2, str(tmp_path / "free"))
  moved = load_params(str(tmp_path / "free"))
  assert not np.allclose(moved["['dense_0']['kernel']"], want["['dense_0']['kernel']"])
