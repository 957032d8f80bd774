"""--mode=label (the human baseline): the real terminal interface driven through a pty.

Recipe stage 2 (human baseline): know your own accuracy before judging the model's. The pty test types a
scripted session on the offline digits test split (right and wrong answers, a skip, an
undo, quit, resume, a second pass) and checks human.json against the script exactly.
"""

import json
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jrecipe.data import pipeline
from jrecipe.errors import UserError
from jrecipe.label import mode as label_mode
from jrecipe.label import render
from tests.helpers import REPO, read_json, run_cli, tiny_config


def test_wilson_interval_known_values():
  lo, hi = label_mode.wilson(45, 50)
  assert (round(lo, 4), round(hi, 4)) == (0.7864, 0.9565)  # textbook value for 45/50
  assert label_mode.wilson(0, 0) == [0.0, 1.0]
  lo, hi = label_mode.wilson(10, 10)
  assert hi == 1.0 and 0.69 < lo < 0.73


def test_resolve_answer_names_indices_prefixes():
  names = ["airplane", "automobile", "bird", "cat"]
  assert label_mode.resolve_answer("bird", names) == 2
  assert label_mode.resolve_answer("CAT", names) == 3
  assert label_mode.resolve_answer("3", names) == 3
  assert label_mode.resolve_answer("b", names) == 2
  assert label_mode.resolve_answer("a", names) is None  # ambiguous prefix
  assert label_mode.resolve_answer("dog", names) is None
  assert label_mode.resolve_answer("7", names) is None


def test_half_blocks_draw_two_rows_per_cell_in_true_colour():
  img = np.array([[[0], [16]], [[8], [16]], [[16], [0]]], np.uint8)  # 3 x 2, values 0..16
  lines = render.half_blocks(render.to_rgb(img, (0, 16)), scale=1, indent=0)
  assert len(lines) == 2  # 3 rows -> 2 cell rows (the last padded with black)
  first = lines[0]
  assert first.count(render.UPPER_HALF) == 2
  assert "\x1b[38;2;0;0;0m\x1b[48;2;128;128;128m" in first  # top 0, bottom 8 -> 128
  assert "\x1b[38;2;255;255;255m\x1b[48;2;255;255;255m" in first
  assert "\x1b[38;2;255;255;255m\x1b[48;2;0;0;0m" in lines[1]
  assert len(render.half_blocks(render.to_rgb(img, (0, 16)), scale=4)) == 6


def test_items_are_seeded_and_second_pass_repeats_the_sample():
  a = label_mode.make_items(270, 10, 4, seed=0)
  assert a == label_mode.make_items(270, 10, 4, seed=0)
  first = [it["index"] for it in a if it["pass"] == 1]
  second = [it["index"] for it in a if it["pass"] == 2]
  assert len(set(first)) == 10 and len(second) == 4 and set(second) <= set(first)
  assert len(label_mode.make_items(270, 10, -1, seed=0)) == 20
  assert label_mode.make_items(270, 10, 0, seed=1) != label_mode.make_items(270, 10, 0, seed=0)


class Pty:
  """A subprocess on a pseudo-terminal: send keys, wait for text on its screen."""

  def __init__(self, args, env=None):
    self.master, slave = os.openpty()
    e = dict(os.environ, TERM="xterm-256color", **(env or {}))
    self.proc = subprocess.Popen([sys.executable, "-m", "jrecipe", *args], cwd=REPO, env=e,
                                 stdin=slave, stdout=slave, stderr=slave,
                                 start_new_session=True)
    os.close(slave)
    self.buf = b""

  def _read(self, timeout):
    ready, _, _ = select.select([self.master], [], [], timeout)
    if not ready:
      return False
    try:
      chunk = os.read(self.master, 65536)
    except OSError:  # the child closed the terminal
      return None
    if not chunk:
      return None
    self.buf += chunk
    return True

  def expect(self, text: str, timeout: float = 90.0) -> str:
    """Waits until `text` is on the screen; returns (and consumes) the output up to it."""
    deadline = time.time() + timeout
    want = text.encode()
    while want not in self.buf:
      left = deadline - time.time()
      if left <= 0 or self._read(left) is None:
        raise AssertionError(f"{text!r} never appeared; last output: {self.buf[-1500:]!r}")
    i = self.buf.index(want) + len(want)
    out, self.buf = self.buf[:i], self.buf[i:]
    return out.decode("utf-8", "replace")

  def send(self, keys: str) -> None:
    os.write(self.master, keys.encode())

  def finish(self, timeout: float = 60.0) -> tuple[int, str]:
    deadline = time.time() + timeout
    while time.time() < deadline and self._read(0.2) is not None:
      pass
    try:
      code = self.proc.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      os.killpg(self.proc.pid, signal.SIGKILL)
      raise
    os.close(self.master)
    return code, self.buf.decode("utf-8", "replace")


@pytest.mark.slow
def test_scripted_session_through_a_pty(tmp_path):
  wd = str(tmp_path / "label")
  n, again = 6, 3
  args = ["--config=configs/digits_mlp.py", f"--workdir={wd}", "--mode=label",
          f"--config.label.num_examples={n}", f"--config.label.second_pass={again}"]
  raw = pipeline.load_dataset({"name": "digits"}).raw["test"]
  y, ids = np.asarray(raw["y"]), np.asarray(raw["id"])
  items = label_mode.make_items(len(y), n, again, seed=0)
  total = len(items)
  truth = [int(y[it["index"]]) for it in items]
  wrong = [(t + 1) % 10 for t in truth]

  def at(k):
    return f"[{k}/{total}]"

  # Session 1: right, wrong, skip, wrong-then-undo-then-right, then quit with Esc.
  term = Pty(args)
  term.expect(at(1))
  screen = term.expect("answer> ")
  assert "\u2580" in screen and "\x1b[38;2;" in screen  # the image, in half blocks
  term.send(str(truth[0]))
  term.expect(at(2))
  term.send(str(wrong[1]))
  term.expect(at(3))
  term.send("-")
  term.expect(at(4))
  term.send(str(wrong[3]))
  term.expect(at(5))
  term.send("<")  # undo the wrong answer to item 4
  term.expect(at(4))
  term.send("\x1b[D")  # Left arrow: undo once more (the skip of item 3) ...
  term.expect(at(3))
  term.send("\x1b[C")  # ... and Right arrow skips it again
  term.expect(at(4))
  term.send(str(truth[3]))
  term.expect(at(5))
  term.expect("answer> ")
  term.send("\x1b")  # Esc: quit
  code, out = term.finish()
  assert code == 0, out
  assert "incomplete" in out
  session = read_json(os.path.join(wd, label_mode.SESSION_FILE))
  assert [a.get("label") for a in session["answers"]] == [truth[0], wrong[1], None, truth[3]]
  partial = read_json(os.path.join(wd, label_mode.RESULT_FILE))
  assert partial["complete"] is False and partial["n"] == 3 and partial["correct"] == 2

  # Session 2: resumes at item 5; right, wrong, then the second pass.
  term = Pty(args)
  term.expect(at(5))
  term.expect("answer> ")
  term.send(str(truth[4]))
  term.expect(at(6))
  term.send(str(wrong[5]))
  term.expect(at(7))
  first_answer = {}
  for k, label in zip(range(6), [truth[0], wrong[1], None, truth[3], truth[4], wrong[5]]):
    first_answer[items[k]["index"]] = label
  second = []
  for k in range(n, total):
    idx = items[k]["index"]
    prev = first_answer[idx]
    # agree with pass 1 on the first repeat, disagree on the others (a skipped one: answer).
    label = prev if (k == n and prev is not None) else (truth[k] if prev is None
                                                        else (prev + 5) % 10)
    second.append(label)
    term.expect("answer> ")
    term.send(str(label))
    if k + 1 < total:
      term.expect(at(k + 2))
  code, out = term.finish()
  assert code == 0, out
  assert "Human accuracy on test" in out and "[complete]" in out

  human = read_json(os.path.join(wd, label_mode.RESULT_FILE))
  first_labels = [truth[0], wrong[1], None, truth[3], truth[4], wrong[5]]
  answered = [(k, lab) for k, lab in enumerate(first_labels) if lab is not None]
  correct = sum(lab == truth[k] for k, lab in answered)
  assert human["complete"] is True
  assert human["split"] == "test" and human["dataset"] == "digits"
  assert human["n"] == len(answered) == 5 and human["correct"] == correct == 3
  assert human["accuracy"] == pytest.approx(3 / 5)
  assert human["ci95"] == pytest.approx(label_mode.wilson(3, 5))
  assert human["skipped"] == 1 and human["skipped_ids"] == [int(ids[items[2]["index"]])]
  assert sorted(w["id"] for w in human["wrong"]) == sorted(
      int(ids[items[k]["index"]]) for k in (1, 5))
  for w in human["wrong"]:
    assert w["human"] == (w["true"] + 1) % 10
  confusion = np.array(human["confusion"])
  assert confusion.sum() == 5 and np.trace(confusion) == 3
  assert confusion[truth[1], wrong[1]] >= 1 and confusion[truth[5], wrong[5]] >= 1
  pairs = [(first_labels[items.index({"pass": 1, "index": items[k]["index"]})], second[k - n])
           for k in range(n, total)]
  pairs = [(a, b) for a, b in pairs if a is not None]
  sa = human["self_agreement"]
  assert sa["n"] == len(pairs)
  assert sa["agreement"] == pytest.approx(sum(a == b for a, b in pairs) / len(pairs))
  assert sa["label_noise_estimate"] == pytest.approx(1 - sa["agreement"])


def test_not_a_terminal_and_bad_settings(tmp_path):
  wd = str(tmp_path / "noterm")
  r = run_cli(["--config=configs/digits_mlp.py", f"--workdir={wd}", "--mode=label",
               "--config.label.num_examples=3"], stdin=subprocess.DEVNULL)
  assert r.returncode == 2, r.stderr
  assert "interactive" in r.stderr and "terminal" in r.stderr
  assert not os.path.exists(os.path.join(wd, label_mode.RESULT_FILE))
  for field, value, match in (("num_examples", 0, "at least 1"), ("second_pass", -2, "second"),
                              ("split", "dev", "not a split")):
    c = tiny_config(**{f"label.{field}": value})
    with pytest.raises(UserError, match=match):
      label_mode.run_mode(c, str(tmp_path / "bad"))


def test_session_of_another_sample_is_refused(tmp_path):
  meta = {"dataset": "digits", "split": "test", "seed": 0, "num_examples": 3, "second_pass": 0}
  items = label_mode.make_items(270, 3, 0, 0)
  s = label_mode.Session(str(tmp_path), meta, items)
  s.answer(4)
  with pytest.raises(UserError, match="different sample.*num_examples"):
    label_mode.Session(str(tmp_path), {**meta, "num_examples": 4},
                       label_mode.make_items(270, 4, 0, 0))
  again = label_mode.Session(str(tmp_path), meta, items)
  assert again.position == 1
  with open(os.path.join(str(tmp_path), label_mode.SESSION_FILE)) as f:
    assert json.load(f)["answers"][0]["label"] == 4


def test_check_battery_summary_shows_human_beside_model(tmp_path, capsys):
  """The battery's summary line and checks.json carry human.json's accuracy."""
  from jrecipe.checks import runner
  from jrecipe.train.writer import write_json_atomic
  wd = str(tmp_path)
  assert runner.human_baseline(wd) is None  # no human.json: nothing shown
  write_json_atomic(os.path.join(wd, "human.json"),
                    {"accuracy": 0.96, "ci95": [0.9, 0.98], "n": 50, "split": "test"})
  write_json_atomic(os.path.join(wd, "summary.json"), {"test": {"accuracy": 0.978}})
  c = tiny_config(**{"checks.only": "lr_schedule"})
  c.lock()
  assert runner.run_mode(c, wd) == 0
  out = capsys.readouterr().out
  assert "Human baseline on test: 96.0% (95% CI 90.0-98.0%, n=50" in out
  assert "model: 97.8%" in out
  checks = read_json(os.path.join(wd, "checks.json"))
  assert checks["human_baseline"]["human_accuracy"] == 0.96
  assert checks["human_baseline"]["model_accuracy"] == 0.978


def test_human_and_model_are_compared_on_the_same_examples(tmp_path, capsys):
  """Planted: the 15 labelled examples are chosen so the model gets 10 right (66.7%), far from
  its accuracy on all 270; --mode=check's line and human.json report the 15, not the 270."""
  from jrecipe.checks import runner
  from jrecipe.ensemble import evaluate, members as members_lib
  from jrecipe.label import compare
  from jrecipe.train import loop
  from jrecipe.train.writer import write_json_atomic
  wd = str(tmp_path)
  c = tiny_config(num_epochs=1, **{"optimizer.learning_rate": 3e-4})
  loop.train_and_evaluate(c, wd)
  member = members_lib.from_runs([wd])[0]
  test = member.data.arrays["test"]
  pred = np.argmax(evaluate.member_outputs(member, test["x"], outputs="logits"), -1)
  y = np.asarray(test["y"])
  right, wrong = np.flatnonzero(pred == y), np.flatnonzero(pred != y)
  assert len(wrong) >= 5 and len(right) >= 10
  rows = [*right[:10].tolist(), *wrong[:5].tolist()]
  items = [{"pass": 1, "index": int(i)} for i in rows]
  answers = [{"label": int(y[i])} for i in rows[:14]] + [{"label": int((y[rows[14]] + 1) % 10)}]
  session = {"dataset": "digits", "split": "test", "seed": 0, "num_examples": 15,
             "second_pass": 0, "items": items, "answers": answers}
  write_json_atomic(os.path.join(wd, label_mode.SESSION_FILE), session)
  human = label_mode.compute_results(session, y, np.asarray(test["id"]),
                                     [str(i) for i in range(10)])
  write_json_atomic(os.path.join(wd, label_mode.RESULT_FILE), human)
  assert human["labelled_indices"] == rows
  same = compare.model_on_labelled(wd)
  assert same["n"] == 15 and same["model_correct"] == 10 and same["human_correct"] == 14
  assert same["model_ci95"] == label_mode.wilson(10, 15)
  assert same["human_ci95"] == label_mode.wilson(14, 15)
  assert same["only_human"] == 4 and same["only_model"] == 0 and same["both_wrong"] == 1
  all_acc = float(np.mean(pred == y))
  assert abs(all_acc - 10 / 15) > 0.05 and same["model_accuracy_all"] == pytest.approx(all_acc)
  got = runner.human_baseline(wd)
  assert got["model_accuracy"] == pytest.approx(10 / 15)
  assert "on the same 15 examples: human 93.3%" in got["line"]
  assert "model 66.7%" in got["line"] and f"{100 * all_acc:.1f}%" in got["line"]
  assert got["same_examples"]["indices"] == rows
