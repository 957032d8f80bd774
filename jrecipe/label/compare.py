"""The human and the model compared on the same examples (recipe stage 2, the human baseline).

A human labels a small sample (15 or 50 examples); the model's accuracy on the whole split
(270 examples) is not the number to set beside it: the sample may be easier or harder than
the split. This module scores the model's newest checkpoint on exactly the examples the
human answered (first pass, skips left out), and gives both accuracies with their 95%
Wilson intervals, plus the paired counts (both right, only the human, only the model).

The examples are those of DIR/label_session.json (the rows of the split shown in the first
pass, with the human's answers), matched to the model's split by example id.
"""

import json
import os
from typing import Any, Optional

import numpy as np

from jrecipe.label.mode import SESSION_FILE, wilson


def labelled(workdir: str) -> Optional[dict[str, Any]]:
  """The answered first-pass examples of DIR/label_session.json, or None when none.

  Returns:
    {'split', 'indices' (rows of the split), 'answers' (the human's class per row)}.
  """
  try:
    with open(os.path.join(workdir, SESSION_FILE)) as f:
      session = json.load(f)
  except (OSError, ValueError):
    return None
  rows, answers = [], []
  for item, ans in zip(session.get("items", []), session.get("answers", [])):
    if item.get("pass") == 1 and not ans.get("skipped") and "label" in ans:
      rows.append(int(item["index"]))
      answers.append(int(ans["label"]))
  if not rows:
    return None
  return {"split": session.get("split", "test"), "indices": rows, "answers": answers}


def paired(y: np.ndarray, human: np.ndarray, model: np.ndarray, model_all: float,
           count_all: int) -> dict[str, Any]:
  """Both accuracies on the same examples with Wilson intervals, and the paired counts.

  Args:
    y: the true classes of the labelled examples.
    human, model: the human's and the model's classes for the same examples.
    model_all, count_all: the model's accuracy on the whole split and its size.
  """
  h, m = np.asarray(human) == np.asarray(y), np.asarray(model) == np.asarray(y)
  n, hk, mk = int(len(y)), int(h.sum()), int(m.sum())
  return {"n": n, "human_correct": hk, "human_accuracy": hk / n, "human_ci95": wilson(hk, n),
          "model_correct": mk, "model_accuracy": mk / n, "model_ci95": wilson(mk, n),
          "both_right": int((h & m).sum()), "only_human": int((h & ~m).sum()),
          "only_model": int((~h & m).sum()), "both_wrong": int((~h & ~m).sum()),
          "model_accuracy_all": float(model_all), "count_all": int(count_all)}


def model_on_labelled(workdir: str) -> Optional[dict[str, Any]]:
  """The human and the model of DIR on the examples the human labelled, or None.

  None when DIR has no label session with answers, or no checkpoint to score. The model is
  DIR's newest checkpoint, through the ensemble's evaluation code (`member_outputs`).

  Returns:
    `paired(...)` plus 'split', 'step' (the checkpoint's) and 'indices'.
  """
  from jrecipe.data_inspect.after_training import has_checkpoint
  got = labelled(workdir)
  if got is None or not has_checkpoint(workdir):
    return None
  from jrecipe.ensemble import evaluate, members as members_lib
  member = members_lib.from_runs([workdir])[0]
  arrays = member.data.arrays.get(got["split"])
  if arrays is None:
    return None
  rows = np.asarray(got["indices"])
  logits = evaluate.member_outputs(member, arrays["x"], outputs="logits")
  predicted = np.argmax(logits, axis=-1)
  y = np.asarray(arrays["y"])
  out = paired(y[rows], np.asarray(got["answers"]), predicted[rows],
               float(np.mean(predicted == y)), len(y))
  return {"split": got["split"], "step": member.step, "indices": got["indices"], **out}


def _pct(ci) -> str:
  return f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}%"


def same_examples_line(same: dict[str, Any]) -> str:
  """'on the same 15 examples: human 93.3% (95% CI ...), model 80.0% (...)' for the console."""
  return (f"on the same {same['n']} examples: human {100 * same['human_accuracy']:.1f}% "
          f"(95% CI {_pct(same['human_ci95'])}), model {100 * same['model_accuracy']:.1f}% "
          f"(95% CI {_pct(same['model_ci95'])}, checkpoint step {same.get('step')}); "
          f"only the human right on {same['only_human']}, only the model on "
          f"{same['only_model']}; the model on all {same['count_all']}: "
          f"{100 * same['model_accuracy_all']:.1f}%")
