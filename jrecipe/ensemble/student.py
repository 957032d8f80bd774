"""The distilled student as an ordinary run directory (recipe stage 6, 'squeeze out the juice').

`--mode=ensemble` with `ensemble.distill_steps > 0` trains a student on the ensemble's soft
targets; the student is kept in `DIR/student/`, written the way training writes a run:
`config.json` (the --config, whose model the student is), `checkpoints/<steps>/` through the
same Checkpointer (so `--mode=ensemble`, `init_from` and `--mode=report` read it),
`summary.json` (validation and test scored by the same Evaluator as training, the budget,
what it was distilled from) and `report.html`. The checkpoint's optimizer state is a fresh one
of the config's optimizer: distillation's own Adam state is not a state this config could
resume.
"""

import json
import os
import shutil
from typing import Any

from jrecipe.errors import UserError
from jrecipe.train.writer import write_json_atomic

STUDENT_DIR = "student"


def budget_of_run(workdir: str, step: int) -> dict:
  """{'steps', 'examples'} a member trained for: its checkpoint step times its batch size."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      batch = int(json.load(f)["batch_size"])
  except (OSError, ValueError, KeyError, TypeError):
    return {"steps": step, "examples": None}
  return {"steps": step, "examples": None if step is None else int(step) * batch}


def _clear(directory: str) -> None:
  """Removes a previous student; refuses to touch a directory that is not one."""
  if not os.path.exists(directory):
    return
  try:
    with open(os.path.join(directory, "summary.json")) as f:
      is_student = "distilled" in json.load(f)
  except (OSError, ValueError, TypeError):
    is_student = not os.listdir(directory)
  if not is_student:
    raise UserError(f"{directory} exists and is not a distilled student of an earlier "
                    "--mode=ensemble run: move it away, or use another --workdir.")
  shutil.rmtree(directory)


def save_student(student_exp, variables: Any, workdir: str, *, steps: int, batch_size: int,
                 distilled_from: list[dict], settings: dict) -> dict:
  """Writes the student as a run directory `workdir/student`; returns its summary.

  Args:
    student_exp: the student's Experiment (built from this --config).
    variables: the student's trained variables.
    workdir: the ensemble's work directory.
    steps, batch_size: the distillation's budget (optimizer steps, examples per step).
    distilled_from: the members ({'name', 'workdir', 'step', ...}).
    settings: temperature, alpha, learning rate and split of the distillation.
  """
  import jax
  from jrecipe.report import html
  from jrecipe.train import workdir as workdir_lib
  from jrecipe.train.checkpoint import Checkpointer
  from jrecipe.train.evaluate import Evaluator
  from jrecipe.train.trainer import Trainer, seeds
  directory = os.path.join(workdir, STUDENT_DIR)
  _clear(directory)
  config = student_exp.config
  workdir_lib.prepare(directory, config, allow_config_change=False)
  trainer = Trainer.from_experiment(student_exp)
  state = trainer.state_from(jax.device_get(variables), seeds(int(config.seed))["train"])
  epoch = steps * batch_size / max(1, len(student_exp.data.arrays["train"]["y"]))
  evaluator = Evaluator(student_exp, trainer.placement)
  scores = {split: evaluator(variables, split) for split in ("validation", "test")
            if split in student_exp.data.arrays}
  ckpt = Checkpointer(directory)
  try:
    ckpt.save(int(steps), state, {"epoch": epoch, "distilled": True},
              (scores.get("validation") or {}).get("loss"))
    ckpt.wait()
    kept = ckpt.list_checkpoints()
  finally:
    ckpt.close()
  summary = {"step": int(steps), "epoch": epoch, "stopped": None, "preempted": False,
             "train_seconds": None, "checkpoints": kept, **scores,
             "distilled": {"steps": int(steps), "examples": int(steps) * int(batch_size),
                           "batch_size": int(batch_size), "split": "train",
                           "from": distilled_from, **settings}}
  write_json_atomic(os.path.join(directory, "summary.json"), summary)
  html.write_report(directory)
  return summary
