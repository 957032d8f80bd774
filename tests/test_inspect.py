"""--mode=inspect: planted data problems in copies of real offline datasets must all be found,
the clean originals must yield only what the real data truly contains; filters; mistakes."""

import os

import numpy as np
import pytest

from jrecipe.data import pipeline
from jrecipe.errors import UserError
from jrecipe.data_inspect import (evaluate_filter, find_mistakes, inspect_splits, likely_label_errors,
                             read_csv, select, write_csv)
from jrecipe.data_inspect import duplicates as dup_lib
from jrecipe.data_inspect import mode as mode_lib
from tests.helpers import read_json, run_cli, tiny_config

# What the clean digits data truly contains (see docs/inspect.md): no exact duplicates, no
# corrupt records, no bad labels; a few near-identical '1's (8 pairs at >= 0.985) and a few
# examples whose 10 nearest neighbours overwhelmingly carry another label.
DIGITS_NEAR_PAIRS_MAX = 10
DIGITS_LABEL_ISSUES_MAX = 10


def _inspect(splits, spec, **kw):
  return inspect_splits(splits, task=spec.task, num_classes=spec.num_classes,
                        class_names=spec.class_names, value_range=spec.value_range,
                        name=spec.name, **kw)


def _ids(refs):
  return {(r["split"], r["id"]) for r in refs}


@pytest.fixture(scope="module")
def digits():
  return pipeline.load_dataset({"name": "digits"})


@pytest.fixture(scope="module")
def clean(digits):
  return _inspect(digits.raw, digits.spec)


NEW = 100_000  # ids of planted examples


@pytest.fixture(scope="module")
def planted(digits, clean):
  """A float copy of digits with every kind of problem planted; returns (findings, plan)."""
  raw = {s: {k: np.array(v) for k, v in d.items()} for s, d in digits.raw.items()}
  for d in raw.values():
    d["x"] = d["x"].astype(np.float32)
  tr, te = raw["train"], raw["test"]
  tid = tr["id"]
  rng = np.random.default_rng(0)
  plan = {}
  # corrupt records, in place
  tr["x"][50, 3, 4, 0] = np.nan
  tr["x"][60] = 0.0
  tr["x"][70, 2, 2, 0] = 40.0  # digits are 0..16
  plan["non_finite"] = {("train", int(tid[50]))}
  plan["constant"] = {("train", int(tid[60]))}
  plan["out_of_range"] = {("train", int(tid[70]))}
  # labels outside the declared classes
  tr["y"][80] = -1
  te["y"][5] = 10
  plan["bad_labels"] = {("train", int(tid[80])), ("test", int(te["id"][5]))}
  # flipped labels on examples the clean vote is sure of
  t = clean.table
  sure = np.flatnonzero((t["split"] == "train") & (t["p_label"] > 0.9)
                        & (t["predicted"] == t["label"]))
  sure = np.setdiff1d(sure, [10, 20, 30, 40, 50, 60, 70, 80])
  flip = rng.choice(sure, 12, replace=False)
  plan["original"] = {int(tid[i]): int(tr["y"][i]) for i in flip}
  tr["y"][flip] = (tr["y"][flip] + 3) % 10
  plan["flipped"] = {("train", int(tid[i])) for i in flip}
  # appended copies: exact duplicate in train, a train/test leak, a shifted and a noised copy
  shifted = np.zeros_like(tr["x"][30])
  shifted[:, 1:] = tr["x"][30][:, :-1]
  noised = np.clip(tr["x"][40] + rng.normal(0, 0.03 * 16, tr["x"][40].shape), 0, 16)

  def append(split, x, y, ident):
    raw[split] = {"x": np.concatenate([raw[split]["x"], x[None].astype(np.float32)]),
                  "y": np.concatenate([raw[split]["y"], [y]]),
                  "id": np.concatenate([raw[split]["id"], [ident]])}
  append("train", tr["x"][10], tr["y"][10], NEW)
  append("test", tr["x"][20], tr["y"][20], NEW + 1)
  append("train", shifted, tr["y"][30], NEW + 2)
  append("validation", noised.astype(np.float32), tr["y"][40], NEW + 3)
  plan["exact_within"] = {("train", int(tid[10])), ("train", NEW)}
  plan["leak"] = {("train", int(tid[20])), ("test", NEW + 1)}
  plan["near_shift"] = {("train", int(tid[30])), ("train", NEW + 2)}
  plan["near_noise"] = {("train", int(tid[40])), ("validation", NEW + 3)}
  # one validation record of the wrong shape (x as a list of arrays)
  vx = list(raw["validation"]["x"])
  vx[7] = vx[7][:, :7]
  plan["wrong_shape"] = {("validation", int(raw["validation"]["id"][7]))}
  splits = {s: (raw[s]["x"] if s != "validation" else vx, raw[s]["y"], raw[s]["id"])
            for s in ("train", "validation", "test")}
  return _inspect(splits, digits.spec), plan


def test_clean_digits_yield_only_what_the_data_contains(clean):
  s = clean.summary
  assert s["splits"] == {"train": 1257, "validation": 270, "test": 270}
  assert s["per_split"]["train"]["class_counts"][0] == 124
  assert 1.0 <= s["per_split"]["train"]["imbalance_ratio"] < 1.1
  assert s["exact_duplicates"]["groups"] == 0 and s["bad_labels"]["count"] == 0
  assert s["corrupt"]["count"] == 0
  assert s["near_duplicates"]["pairs"] <= DIGITS_NEAR_PAIRS_MAX
  assert all(p["similarity"] >= 0.985 for p in s["near_duplicates"]["example_pairs"])
  assert s["label_errors"]["count"] <= DIGITS_LABEL_ISSUES_MAX
  assert s["label_errors"]["model_accuracy"]["train"] > 0.95
  t = clean.table
  assert len(t["id"]) == 1797 and not t["corrupt"].any() and not t["exact_dup"].any()
  # statistics are those of the stored values
  row = 0
  x0 = np.asarray(pipeline.load_dataset({"name": "digits"}).raw["train"]["x"][0], np.float64)
  assert t["mean"][row] == pytest.approx(x0.mean()) and t["max"][row] == x0.max()
  assert t["norm"][row] == pytest.approx(np.linalg.norm(x0))


def test_planted_duplicates_and_leak_are_found(planted, clean):
  f, plan = planted
  s = f.summary
  groups = [_ids(g) for g in s["exact_duplicates"]["example_groups"]]
  assert plan["exact_within"] in groups and plan["leak"] in groups
  assert s["exact_duplicates"]["across_splits"] == {"train/test": 1}
  assert s["exact_duplicates"]["within_split"].get("train") == 1
  assert plan["leak"] <= _ids(s["leakage"]["examples_listed"])
  pairs = [_ids([p["a"], p["b"]]) for p in s["near_duplicates"]["example_pairs"]]
  assert plan["near_shift"] in pairs and plan["near_noise"] in pairs
  # exact copies are reported as exact, not also as near duplicates
  assert plan["exact_within"] not in pairs and plan["leak"] not in pairs
  # nothing planted appears among the clean data's near duplicates
  clean_pairs = [_ids([p["a"], p["b"]]) for p in clean.summary["near_duplicates"]["example_pairs"]]
  assert plan["near_shift"] not in clean_pairs and plan["near_noise"] not in clean_pairs
  assert s["near_duplicates"]["pairs"] <= clean.summary["near_duplicates"]["pairs"] + 2


def test_planted_corrupt_records_and_bad_labels_are_found(planted):
  f, plan = planted
  c = f.summary["corrupt"]
  for kind in ("non_finite", "constant", "out_of_range", "wrong_shape"):
    assert _ids(c[kind]["examples"]) == plan[kind], kind
  assert c["count"] == 4
  assert _ids(f.summary["bad_labels"]["examples"]) == plan["bad_labels"]
  assert f.summary["per_split"]["test"]["class_counts"] != []


def test_planted_label_flips_are_found_out_of_sample(planted):
  f, plan = planted
  flagged = {(str(f.table["split"][r]), int(f.table["id"][r])) for r in f.label_issues}
  assert plan["flipped"] <= flagged
  for r in f.label_issues:  # the suggestion is the original label
    if (str(f.table["split"][r]), int(f.table["id"][r])) in plan["flipped"]:
      assert f.table["suggested"][r] == plan["original"][int(f.table["id"][r])]
  le = f.summary["label_errors"]
  assert le["count"] <= len(plan["flipped"]) + DIGITS_LABEL_ISSUES_MAX + 2
  assert "leave-one-out" in le["source"]


def test_shifted_and_noised_copies_found_at_28x28():
  """mnist5k (28x28 takes the Fourier path, no translated queries): 1-pixel diagonal shift and
  3% noise are found; the clean subset has no pair at the threshold."""
  ds = pipeline.load_dataset({"name": "mnist5k"})
  x = np.asarray(ds.raw["train"]["x"][:1500])
  clean = dup_lib.near_duplicates(x, image=True, threshold=0.985)
  assert len(clean["pairs"]) == 0
  rng = np.random.default_rng(1)
  src = rng.choice(len(x), 10, replace=False)
  shifted = np.zeros_like(x[src[:5]])
  shifted[:, 1:, 1:] = x[src[:5], :-1, :-1]
  noised = np.clip(x[src[5:]] + rng.normal(0, 0.03 * 255, x[src[5:]].shape), 0, 255)
  both = np.concatenate([x, shifted, noised.astype(np.uint8)])
  r = dup_lib.near_duplicates(both, image=True, threshold=0.985)
  found = set(map(tuple, r["pairs"].tolist()))
  assert all((int(i), len(x) + j) in found for j, i in enumerate(src))
  assert len(found) == 10


def test_shift_similarity_matches_the_definition():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 20, 9, 7)).astype(np.float32)
  best = np.full(20, -1.0)
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      wa = a[:, max(dy, 0):9 + min(dy, 0), max(dx, 0):7 + min(dx, 0)].reshape(20, -1)
      wb = b[:, max(-dy, 0):9 + min(-dy, 0), max(-dx, 0):7 + min(-dx, 0)].reshape(20, -1)
      wa, wb = wa - wa.mean(1, keepdims=True), wb - wb.mean(1, keepdims=True)
      best = np.maximum(best, (wa * wb).sum(1) / np.linalg.norm(wa, axis=1)
                        / np.linalg.norm(wb, axis=1))
  np.testing.assert_allclose(dup_lib.shift_similarity(a, b), best, atol=1e-6)
  np.testing.assert_allclose(dup_lib.shift_similarity(a, a), 1.0, atol=1e-6)


def test_filter_and_sort(clean, tmp_path):
  t = clean.table
  rows = select(t, "label==3", sort_by="std", descending=True)
  assert len(rows) == sum(v["class_counts"][3] for v in clean.summary["per_split"].values())
  assert (t["label"][rows] == 3).all() and (np.diff(t["std"][rows]) <= 0).all()
  rows = select(t, "split == 'test' and (std < 6 or abs(mean - 5) > 1) and not near_dup")
  assert set(t["split"][rows]) == {"test"} and (~t["near_dup"][rows]).all()
  assert len(select(t, "'near_dup' in flags")) == int(t["near_dup"].sum())
  assert (select(t, "", sort_by="mean") == np.argsort(t["mean"], kind="stable")).all()
  for bad in ("label ==", "nope > 1", "__import__('os').system('true')", "label.real > 0",
              "label + 1", "[x for x in label]", "'a' in label", "lambda: 1"):
    with pytest.raises(UserError, match="filter"):
      evaluate_filter(t, bad)
  with pytest.raises(UserError, match="sort_by"):
    select(t, "", sort_by="nope")
  path = str(tmp_path / "t.csv")
  write_csv(path, t, rows[:5])
  back = read_csv(path)
  assert list(back) == list(t)
  np.testing.assert_allclose(back["std"], t["std"][rows[:5]], rtol=1e-5)


def test_label_errors_and_mistakes_by_hand():
  # 3 classes; row 3 is labelled 0 but the model is sure it is 2
  probs = np.array([[.9, .05, .05], [.8, .1, .1], [.1, .8, .1], [.02, .03, .95],
                    [.1, .1, .8], [.05, .9, .05]])
  labels = np.array([0, 0, 1, 0, 2, 1])
  r = likely_label_errors(probs, labels)
  assert r["rows"].tolist() == [3] and r["suggested"].tolist() == [2]
  assert r["margin"][0] == pytest.approx(0.93)
  m = find_mistakes(probs, labels, top_k=2)
  assert m["errors"] == 1 and m["confident_mistakes"].tolist() == [3]
  assert m["confusion"][0, 2] == 1 and m["confusion"].sum() == 6
  assert m["most_confused"] == [{"label": 0, "predicted": 2, "count": 1,
                                 "fraction_of_label": pytest.approx(1 / 3)}]
  assert m["highest_loss"][0] == 3


def test_sequence_data_gets_the_table_without_pictures(tmp_path):
  c = tiny_config()
  c.data.name = "digits_seq"
  assert mode_lib.run_mode(c, str(tmp_path)) == 0
  out = tmp_path / "inspect"
  s = read_json(out / "summary.json")
  assert s["task"] == "sequence" and not s["image"]
  assert len(s["per_split"]["train"]["class_counts"]) == 17
  assert not list(out.glob("*.png"))
  assert len(read_csv(str(out / "examples.csv"))["id"]) == 1797


def test_bad_input_is_a_user_error_and_writes_nothing(tmp_path):
  def cfg(**kw):
    c = tiny_config()
    for k, v in kw.items():
      c.inspect[k] = v
    return c
  cases = [(cfg(filter="label =="), "does not parse"),
           (cfg(filter="nope > 1"), "no column 'nope'"),
           (cfg(sort_by="nope"), "not a column"),
           (cfg(mistakes="on"), "no checkpoint"),
           (cfg(filter="abs(nope) > 1"), "no column"),
           (cfg(filter="len(flags) > 1"), "not allowed"),
           (cfg(mistakes="maybe"), "mistakes"),
           (cfg(value_range=(5, 1)), "value_range"),
           (cfg(split="nope"), "not a split")]
  missing = tiny_config()
  missing.data.name = "tfds:no_such_dataset"
  cases.append((missing, "no_such_dataset"))
  for i, (c, msg) in enumerate(cases):
    d = tmp_path / str(i)
    with pytest.raises(UserError, match=msg):
      mode_lib.run_mode(c, str(d))
    assert not (d / "inspect").exists()


@pytest.mark.slow
def test_mode_after_training_shows_mistakes(tmp_path):
  from jrecipe.train.loop import train_and_evaluate
  d = str(tmp_path / "run")
  summary = train_and_evaluate(tiny_config(num_epochs=2), d)
  c = tiny_config(num_epochs=2)
  c.inspect.split = "test"
  assert mode_lib.run_mode(c, d) == 0
  m = read_json(os.path.join(d, "inspect", "mistakes.json"))
  assert m["split"] == "test" and m["count"] == 270
  assert m["accuracy"] == pytest.approx(summary["test"]["accuracy"], abs=1e-6)
  conf = np.array(m["confusion_matrix"])
  assert conf.sum() == 270 and conf.trace() == 270 - m["errors"]
  assert m["errors"] == sum(p["count"] for p in m["most_confused"]) or len(m["most_confused"]) == 10
  losses = [e["loss"] for e in m["highest_loss"]]
  assert losses == sorted(losses, reverse=True)
  assert all(e["predicted"] != e["label"] for e in m["confident_mistakes"])
  assert "held-out" in m["likely_label_errors"]["source"]
  assert {"validation", "test"} >= {e["split"] for e in m["likely_label_errors"]["examples"]}
  for name in ("confusion.png", "mistakes_highest_loss.png", "mistakes_confident.png",
               "outliers.png", "summary.json", "examples.csv"):
    assert os.path.getsize(os.path.join(d, "inspect", name)) > 0, name


@pytest.mark.slow
def test_cli_inspect_and_bad_filter(tmp_path):
  d = str(tmp_path / "cli")
  r = run_cli(["--config=configs/digits_mlp.py", f"--workdir={d}", "--mode=inspect",
               "--config.inspect.sort_by=std", "--config.inspect.filter=label==3"])
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines()[0].startswith("1797 examples")
  s = read_json(os.path.join(d, "inspect", "summary.json"))
  for key in ("per_split", "exact_duplicates", "near_duplicates", "leakage", "corrupt",
              "bad_labels", "statistics", "label_errors", "selection"):
    assert key in s, key
  assert s["selection"]["count"] == sum(v["class_counts"][3] for v in s["per_split"].values())
  sel = read_csv(os.path.join(d, "inspect", "selection.csv"))
  assert (sel["label"] == 3).all() and (np.diff(sel["std"]) <= 0).all()
  for name in ("outliers.png", "class_means.png", "samples.png", "selection.png"):
    assert os.path.getsize(os.path.join(d, "inspect", name)) > 1000
  bad = str(tmp_path / "bad")
  r = run_cli(["--config=configs/digits_mlp.py", f"--workdir={bad}", "--mode=inspect",
               "--config.inspect.filter=label=="])
  assert r.returncode == 2 and "does not parse" in r.stderr
  assert not os.path.exists(os.path.join(bad, "inspect"))
