"""splits_match: each held-out split enters the model as the training split does ('become one
with the data'). Each planted mistake in a held-out split's preparation fails (or warns) with
its cause named; the correct twin, a random split of the same data, passes."""

import numpy as np
import pytest

from jrecipe.checks.splits import splits_match, two_sample_auc
from jrecipe.types import DataSpec


def _digits():
  from sklearn.datasets import load_digits
  d = load_digits()
  order = np.random.default_rng(0).permutation(len(d.target))
  x = d.images[order][..., None].astype(np.float32)
  return (x - x.mean()) / x.std(), d.target[order].astype(np.int32)


SPEC = DataSpec(name="digits", task="classification", input_shape=(8, 8, 1), num_classes=10,
                class_names=None, value_range=None, splits={})


def _check(x, y, held=lambda x, y: (x, y), tmp_path=None, order=None):
  if order is not None:
    x, y = x[order], y[order]
  a, b = 1200, 1500
  xv, yv = held(x[a:b], y[a:b])
  xt, yt = held(x[b:], y[b:])
  samples = {"train": {"x": x[:a], "y": y[:a]}, "validation": {"x": xv, "y": yv},
             "test": {"x": xt, "y": yt}}
  counts = {s: np.bincount(v["y"], minlength=10) for s, v in samples.items()}
  return splits_match(samples, spec=SPEC, label_counts=counts,
                      artifacts_dir=str(tmp_path) if tmp_path else None)


def test_a_random_split_passes_and_draws_the_mean_images(tmp_path):
  x, y = _digits()
  r = _check(x, y, tmp_path=tmp_path)
  assert r.status == "pass", r.message
  for split in ("validation", "test"):
    d = r.details["splits"][split]
    assert abs(d["auc"] - 0.5) < 4 * d["auc_se"] and 0.9 < d["std_ratio"] < 1.1, d
  assert r.artifacts and r.artifacts[0].endswith("splits_match.png")
  assert (tmp_path / "splits_match.png").stat().st_size > 0


@pytest.mark.parametrize("bug, held, cause", [
    ("transposed", lambda x, y: (x.transpose(0, 2, 1, 3), y), "read or preprocessed otherwise"),
    ("flipped", lambda x, y: (x[:, :, ::-1], y), "read or preprocessed otherwise"),
    ("not standardised", lambda x, y: (x * 4.0 + 5.0, y), "applied to one split only"),
    ("inverted", lambda x, y: (-x, y), "read or preprocessed otherwise"),
])
def test_a_held_out_split_prepared_otherwise_fails_naming_the_cause(bug, held, cause):
  x, y = _digits()
  r = _check(x, y, held)
  assert r.status == "fail", (bug, r.message)
  assert cause in r.message and "validation" in r.message and "test" in r.message, r.message
  assert r.message.count(cause) == 1  # the cause is said once for both splits


def test_a_split_taken_before_shuffling_sorted_data_fails_on_its_classes():
  x, y = _digits()
  r = _check(x, y, order=np.argsort(y, kind="stable"))
  assert r.status == "fail", r.message
  assert r.details["splits"]["test"]["classes_absent_from_train"] == [8, 9]
  assert "split before shuffling" in r.message


def test_a_partial_shift_warns_and_unbalanced_labels_warn():
  """Half of the held-out inputs flipped: told apart, but not almost always (warn);
  a held-out split of only five classes, all seen in training, is a label warn."""
  x, y = _digits()

  def half_flipped(x, y):
    x = x.copy()
    x[::2] = x[::2, :, ::-1]
    return x, y

  r = _check(x, y, half_flipped)
  assert r.status == "warn", r.message
  assert "distribution shift" in r.message
  r = _check(x, y, lambda x, y: (x[y < 5], y[y < 5]))
  assert r.status == "warn" and "class frequencies" in r.message, r.message


def test_token_ids_from_another_vocabulary_fail_and_a_regression_target_scale_fails():
  rs = np.random.default_rng(0)
  tok = DataSpec(name="seq", task="sequence", input_shape=(16,), num_classes=50,
                 class_names=None, value_range=None, splits={})
  seqs = rs.integers(0, 40, size=(900, 16))
  samples = {"train": {"x": seqs[:600], "y": seqs[:600]},
             "validation": {"x": seqs[600:], "y": seqs[600:]}}
  assert splits_match(samples, spec=tok).status == "pass"
  samples["validation"]["x"] = seqs[600:] + 10  # ids offset by 10: 40..49 never in training
  r = splits_match(samples, spec=tok)
  assert r.status == "fail" and "another vocabulary" in r.message, r.message
  reg = DataSpec(name="reg", task="regression", input_shape=(4,), num_classes=None,
                 class_names=None, value_range=None, splits={})
  x = rs.standard_normal((900, 4)).astype(np.float32)
  t = x.sum(axis=1) * 3.0 + 50.0
  samples = {"train": {"x": x[:600], "y": t[:600]}, "test": {"x": x[600:], "y": t[600:]}}
  assert splits_match(samples, spec=reg).status == "pass"
  samples["test"]["y"] = (t[600:] - 50.0) / 3.0  # standardised targets in one split only
  r = splits_match(samples, spec=reg)
  assert r.status == "fail" and "targets of std" in r.message, r.message


def test_the_two_sample_auc_is_chance_for_one_distribution_and_pools_large_images():
  rs = np.random.default_rng(1)
  a, b = rs.standard_normal((300, 64, 64, 3)), rs.standard_normal((300, 64, 64, 3))
  auc, se, n = two_sample_auc(a, b, image=True)
  assert n == 300 and abs(auc - 0.5) < 4 * se
  auc, _, _ = two_sample_auc(a, b[:, ::-1] + np.linspace(0, 1, 64)[None, :, None, None],
                             image=True)
  assert auc > 0.9
