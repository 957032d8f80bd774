"""`--mode=label`: the human baseline. You label a random sample of the test set yourself.

    jrecipe --mode=label --config=configs/digits_mlp.py --workdir=DIR \\
        [--config.label.num_examples=50] [--config.label.second_pass=20]

Recipe stage 2 ('a human-interpretable metric, and human accuracy where possible'): know
your own accuracy on the task (or annotate the data twice and treat one annotation as the
prediction) before judging the model's. A terminal interface, so it works over SSH on a
Cloud TPU VM: each image is drawn with Unicode half blocks in 24-bit colour.

Keys: a digit answers at once when there are at most 10 classes (class index); otherwise
type a class name or index and press Enter (a unique prefix of a name is enough).
`-` or Right arrow skips, `<`, Left arrow or Backspace (empty input) undoes the last answer,
Esc, Ctrl-C or Ctrl-D quits. Progress is saved atomically after every answer to
DIR/label_session.json; the same command resumes where you stopped. With
`label.second_pass = K`, K examples of the sample come back (in a new order) after the
first pass: the human's agreement with themselves, a label-noise estimate.

DIR/human.json: accuracy, ci95 (Wilson), n (answered, first pass), split, dataset,
confusion (rows: true class, columns: your label), per_class, wrong (ids and labels),
skipped_ids, labelled_indices (rows of the split answered in the first pass),
self_agreement (when a second pass was answered), complete, and model_same_examples: when DIR
also holds a trained model, its accuracy on exactly those examples beside the human's, both
with Wilson intervals (`jrecipe.label.compare`; null without a checkpoint).
"""

import math
import os
import select
import sys
import time
from typing import Optional

import numpy as np

from jrecipe import validate
from jrecipe.errors import UserError
from jrecipe.label import render
from jrecipe.sections import complete
from jrecipe.train.writer import write_json_atomic

SESSION_FILE = "label_session.json"
RESULT_FILE = "human.json"
KEYS_HELP = ("keys: digit/name+Enter answer   - or \u2192 skip   < or \u2190 undo   "
             "Esc/Ctrl-C quit (progress is saved)")


def settings(config) -> dict:
  """The validated `config.label` fields (types and ranges: `jrecipe.config.schema.LABEL`).

  A field missing from a partial section takes its schema default.
  """
  validate.check_fields(config, "label")
  return dict(complete(config.get("label"), "label").items())


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
  """The Wilson score interval of a proportion k/n (95% for z=1.96); [0, 1] when n = 0."""
  if n <= 0:
    return [0.0, 1.0]
  p = k / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return [max(0.0, centre - half), min(1.0, centre + half)]


def make_items(num_split: int, num_examples: int, second_pass: int, seed: int) -> list[dict]:
  """The ordered list of what to show: [{'pass': 1|2, 'index': row in the split}].

  The sample is a seeded random choice without replacement (the same for a given seed, so
  a resumed or repeated session shows the same examples); the second pass repeats the
  first `second_pass` examples of a fresh permutation of the sample.
  """
  rng = np.random.default_rng(seed)
  n = min(num_examples, num_split)
  sample = rng.choice(num_split, size=n, replace=False).tolist()
  k = n if second_pass == -1 else min(second_pass, n)
  again = rng.permutation(sample).tolist()[:k]
  return ([{"pass": 1, "index": int(i)} for i in sample] +
          [{"pass": 2, "index": int(i)} for i in again])


def compute_results(session: dict, y: np.ndarray, ids: np.ndarray,
                    class_names: list[str]) -> dict:
  """human.json from a session: accuracy with its Wilson interval, confusion, self-agreement."""
  k = len(class_names)
  items, answers = session["items"], session["answers"]
  confusion = np.zeros((k, k), np.int64)
  wrong, skipped, first = [], [], {}
  for item, ans in zip(items, answers):
    if item["pass"] != 1:
      continue
    i = item["index"]
    if ans.get("skipped"):
      skipped.append(int(ids[i]))
      continue
    t, h = int(y[i]), int(ans["label"])
    first[i] = h
    confusion[t, h] += 1
    if t != h:
      wrong.append({"id": int(ids[i]), "true": t, "human": h, "true_name": class_names[t],
                    "human_name": class_names[h]})
  n = int(confusion.sum())
  correct = int(np.trace(confusion))
  per_class = {}
  for c in range(k):
    m = int(confusion[c].sum())
    per_class[class_names[c]] = {"n": m, "accuracy": (int(confusion[c, c]) / m) if m else None}
  pairs = agree = 0
  disagreements = []
  second_correct = second_n = 0
  for item, ans in zip(items, answers):
    if item["pass"] != 2 or ans.get("skipped"):
      continue
    i, h = item["index"], int(ans["label"])
    second_n += 1
    second_correct += int(h == int(y[i]))
    if i in first:
      pairs += 1
      if first[i] == h:
        agree += 1
      else:
        disagreements.append({"id": int(ids[i]), "first": first[i], "second": h,
                              "true": int(y[i])})
  first_total = sum(1 for it in items if it["pass"] == 1)
  done_first = sum(1 for it, _ in zip(items, answers) if it["pass"] == 1)
  out = {
      "dataset": session["dataset"], "split": session["split"],
      "accuracy": (correct / n) if n else None, "ci95": wilson(correct, n), "n": n,
      "correct": correct, "num_examples": first_total, "shown": done_first,
      "skipped": len(skipped), "skipped_ids": skipped, "class_names": list(class_names),
      "confusion": confusion.tolist(), "per_class": per_class, "wrong": wrong,
      "labelled_indices": [int(i) for i in first],
      "complete": len(answers) == len(items),
      "self_agreement": None,
  }
  if pairs:
    out["self_agreement"] = {"n": pairs, "agreement": agree / pairs, "ci95": wilson(agree, pairs),
                             "label_noise_estimate": 1 - agree / pairs,
                             "disagreements": disagreements,
                             "second_pass_accuracy": second_correct / second_n}
  return out


class Session:
  """The labelling state on disk: the items to show and the answers so far."""

  def __init__(self, workdir: str, meta: dict, items: list[dict]):
    self.path = os.path.join(workdir, SESSION_FILE)
    self.workdir = workdir
    self.data = {**meta, "items": items, "answers": []}
    if os.path.exists(self.path):
      import json
      try:
        with open(self.path) as f:
          old = json.load(f)
      except (OSError, ValueError) as e:
        raise UserError(f"{self.path} exists but cannot be read ({e}): move it away to start a "
                        "new labelling session.") from e
      differs = [k for k in (*meta, "items") if old.get(k) != self.data.get(k)]
      if differs:
        raise UserError(
            f"{self.path} holds a labelling session of a different sample (differs in "
            f"{', '.join(differs)}). Resume it with the same config, or use another --workdir "
            "(or move the file away) for a new session.")
      self.data["answers"] = list(old.get("answers", []))

  @property
  def position(self) -> int:
    return len(self.data["answers"])

  @property
  def done(self) -> bool:
    return self.position >= len(self.data["items"])

  def answer(self, label: Optional[int]) -> None:
    entry = {"skipped": True} if label is None else {"label": int(label)}
    entry["t"] = round(time.time(), 3)
    self.data["answers"].append(entry)
    self.save()

  def undo(self) -> bool:
    if not self.data["answers"]:
      return False
    self.data["answers"].pop()
    self.save()
    return True

  def save(self) -> None:
    write_json_atomic(self.path, self.data)


def resolve_answer(text: str, class_names: list[str]) -> Optional[int]:
  """A class index from a typed name, index, or unique name prefix; None if none fits."""
  t = text.strip().lower()
  if not t:
    return None
  names = [c.lower() for c in class_names]
  if t in names:
    return names.index(t)
  if t.isdigit() and int(t) < len(class_names):
    return int(t)
  matches = [i for i, c in enumerate(names) if c.startswith(t)]
  return matches[0] if len(matches) == 1 else None


class Terminal:
  """Raw keyboard input (no echo, no line buffering, Ctrl-C as a key) and screen output."""

  def __init__(self, fd_in: int, out):
    self.fd = fd_in
    self.out = out
    self._saved = None

  def __enter__(self):
    import termios
    self._saved = termios.tcgetattr(self.fd)
    mode = termios.tcgetattr(self.fd)
    mode[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
    mode[6][termios.VMIN] = 1
    mode[6][termios.VTIME] = 0
    termios.tcsetattr(self.fd, termios.TCSAFLUSH, mode)
    self.write("\x1b[?1049h\x1b[?25l")  # alternate screen, hide the cursor
    return self

  def __exit__(self, *exc):
    import termios
    self.write("\x1b[0m\x1b[?25h\x1b[?1049l")
    if self._saved is not None:
      termios.tcsetattr(self.fd, termios.TCSAFLUSH, self._saved)

  def write(self, text: str) -> None:
    self.out.write(text)
    self.out.flush()

  def key(self) -> str:
    """One key: a character, or 'LEFT'/'RIGHT'/'UP'/'DOWN'/'ESC'/'EOF'."""
    b = os.read(self.fd, 1)
    if not b:
      return "EOF"
    if b == b"\x1b":
      ready, _, _ = select.select([self.fd], [], [], 0.05)
      if not ready:
        return "ESC"
      seq = os.read(self.fd, 2)
      return {b"[D": "LEFT", b"[C": "RIGHT", b"[A": "UP", b"[B": "DOWN"}.get(seq, "OTHER")
    if b[0] >= 0x80:  # the rest of a UTF-8 character
      more = b
      while True:
        try:
          return more.decode("utf-8")
        except UnicodeDecodeError:
          if len(more) >= 4:
            return "OTHER"
          more += os.read(self.fd, 1)
    return b.decode("latin-1")


def _screen(session: Session, raw_x: np.ndarray, y: np.ndarray, class_names: list[str],
            value_range, scale: int, typed: str, message: str) -> str:
  items = session.data["items"]
  pos = session.position
  item = items[pos]
  first_n = sum(1 for it in items if it["pass"] == 1)
  answers = session.data["answers"]
  skipped = sum(1 for a in answers if a.get("skipped"))
  image = raw_x[item["index"]]
  s = scale or render.auto_scale(image.shape[1])
  lines = ["\x1b[H\x1b[2J",
           f"jrecipe label: {session.data['dataset']} / {session.data['split']}   "
           f"[{pos + 1}/{len(items)}] pass {item['pass']}"
           + (f" (again: {pos + 1 - first_n} of {len(items) - first_n})" if item["pass"] == 2
              else ""), ""]
  lines += render.half_blocks(render.to_rgb(image, value_range), s)
  lines.append("")
  legend = "  ".join(f"{i}={n}" if n != str(i) else n for i, n in enumerate(class_names))
  lines.append(f"classes: {legend}")
  lines.append(f"answered {pos - skipped}, skipped {skipped}")
  lines.append(KEYS_HELP)
  if message:
    lines.append(message)
  lines.append(f"answer> {typed}")
  return "\r\n".join(lines)


def run_session(session: Session, raw_x, y, class_names, value_range, scale: int,
                term: Terminal) -> bool:
  """The interactive loop; returns True when every item has an answer (False: quit)."""
  typed, message = "", ""
  instant = len(class_names) <= 10
  while not session.done:
    term.write(_screen(session, raw_x, y, class_names, value_range, scale, typed, message))
    message = ""
    k = term.key()
    if k in ("ESC", "EOF", "\x03", "\x04"):
      return False
    if k in ("-", "RIGHT") and not typed:
      session.answer(None)
    elif k in ("<", "LEFT") or (k in ("\x7f", "\x08") and not typed):
      if not session.undo():
        message = "nothing to undo"
    elif k in ("\x7f", "\x08"):
      typed = typed[:-1]
    elif k in ("\r", "\n"):
      if typed:
        label = resolve_answer(typed, class_names)
        if label is None:
          message = f"no class matches {typed!r}"
        else:
          session.answer(label)
        typed = ""
    elif instant and not typed and len(k) == 1 and k.isdigit():
      if int(k) < len(class_names):
        session.answer(int(k))
      else:
        message = f"class index {k} is out of range (0-{len(class_names) - 1})"
    elif len(k) == 1 and k.isprintable():
      typed += k
  return True


def _print_summary(result: dict, workdir: str, out) -> None:
  if result["n"]:
    lo, hi = result["ci95"]
    out.write(f"Human accuracy on {result['split']}: {100 * result['accuracy']:.1f}% "
              f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}%, n={result['n']}, "
              f"{result['skipped']} skipped)")
  else:
    out.write("No answers yet")
  sa = result.get("self_agreement")
  if sa:
    out.write(f"; self-agreement {100 * sa['agreement']:.1f}% over {sa['n']} repeats")
  state = "complete" if result["complete"] else "incomplete: rerun the same command to resume"
  out.write(f" [{state}]. Written to {os.path.join(workdir, RESULT_FILE)}\n")
  if result.get("model_same_examples"):
    from jrecipe.label import compare
    out.write(f"Human and model {compare.same_examples_line(result['model_same_examples'])}\n")
  out.flush()


def run_mode(config, workdir: str, options=None) -> int:
  """The `--mode=label` entry: label, save after each answer, write DIR/human.json."""
  del options  # this mode takes no command-line options (jrecipe.modes.ModeOptions)
  from jrecipe import experiment
  s = settings(config)
  data = experiment.build_data(config)
  spec = data.spec
  if spec.task != "classification":
    raise UserError(f"--mode=label asks you for class labels, but dataset {spec.name!r} is a "
                    f"{spec.task} task. Use a classification dataset.")
  if s["split"] not in data.raw:
    raise UserError(f"label.split={s['split']!r} is not a split of {spec.name!r}; valid: "
                    f"{', '.join(sorted(data.raw))}.")
  raw = data.raw[s["split"]]
  if len(np.shape(raw["x"])) not in (3, 4):  # .shape: a streamed split stays unread
    raise UserError(f"--mode=label draws images, but {spec.name!r} has inputs of shape "
                    f"{tuple(np.shape(raw['x'])[1:])}.")
  class_names = list(spec.class_names or [str(i) for i in range(spec.num_classes)])
  y, ids = np.asarray(raw["y"]), np.asarray(raw["id"])
  items = make_items(len(y), s["num_examples"], s["second_pass"], config.seed)
  meta = {"dataset": spec.name, "split": s["split"], "seed": int(config.seed),
          "num_examples": int(s["num_examples"]), "second_pass": int(s["second_pass"])}
  os.makedirs(workdir, exist_ok=True)
  session = Session(workdir, meta, items)
  if not session.done:
    if not (os.isatty(sys.stdin.fileno()) and sys.stdout.isatty()):
      raise UserError("--mode=label is interactive: run it in a terminal (over SSH: `ssh -t`, "
                      "or inside tmux/screen). stdin and stdout must both be a terminal.")
    with Terminal(sys.stdin.fileno(), sys.stdout) as term:
      run_session(session, raw["x"], y, class_names, spec.value_range, s["scale"], term)
  if not session.data["answers"]:
    sys.stdout.write("No answers recorded; nothing written.\n")
    return 0
  result = compute_results(session.data, y, ids, class_names)
  from jrecipe.label import compare  # a trained model here: scored on the same examples
  result["model_same_examples"] = compare.model_on_labelled(workdir)
  write_json_atomic(os.path.join(workdir, RESULT_FILE), result)
  _print_summary(result, workdir, sys.stdout)
  return 0
