"""`--mode=ensemble`: evaluate an ensemble of trained runs and write DIR/ensemble.json.

    jrecipe --mode=ensemble --config=configs/<name>.py --workdir=DIR \\
        --config.ensemble.members=runs/seed0,runs/seed1,runs/seed2 \\
        [--config.ensemble.source=runs] [--config.ensemble.combine=prob]


Config fields, all under `config.ensemble` (read defensively; defaults in brackets):
  members: comma-separated run work directories (or a list). For source 'checkpoints', 'ema'
    and 'search' the first entry is the one run / search directory.
  source ['runs']: 'runs' (newest checkpoint of each run: seeds or different architectures),
    'checkpoints' (several checkpoints of one run), 'ema' (a run's raw and EMA parameters),
    'search' (the top k trials of a search directory by validation accuracy).
  k [5]: how many trials for source='search'.
  steps ['']: comma-separated checkpoint steps for source='checkpoints' ('' = all kept).
  combine ['prob']: 'prob' (mean of softmax probabilities) or 'logit' (mean of logits).
  split ['test']: the split to score.
  distill_steps [0]: > 0 also distils the ensemble into the model of this --config (Adam,
    this many steps, on the train split) with `temperature` [4.0], `alpha` [0.5],
    `distill_lr` [1e-3]; the student is saved as a run directory, DIR/student/ (student.py).

DIR/ensemble.json: {'source', 'split', 'combine', 'members': [{'name', 'accuracy', 'ci95',
'nll', 'workdir', 'step', 'ema', 'model', 'steps', 'examples'}], 'ensemble': {'accuracy',
'ci95', 'nll', 'disagreement'},
'best_member', 'mean_member', 'gain' (fraction), 'gain_points', 'nll_gain', and 'distill'
when asked}. The member-set config stays in each run's own config.json.
"""

import logging
import os
from typing import Any

from jrecipe.errors import UserError
from jrecipe.ensemble import evaluate, members as members_lib
from jrecipe.train.writer import write_json_atomic

log = logging.getLogger("jrecipe")

SOURCES = ("runs", "checkpoints", "ema", "search")


def _get(section: Any, key: str, default: Any) -> Any:
  if section is None:
    return default
  if hasattr(section, "get"):
    v = section.get(key, default)
  else:
    v = getattr(section, key, default)
  return default if v is None else v


def _as_list(value: Any) -> list[str]:
  if isinstance(value, str):
    return [p.strip() for p in value.split(",") if p.strip()]
  return [str(p).strip() for p in (value or ()) if str(p).strip()]


def ensemble_settings(config) -> dict:
  """The `config.ensemble` fields with their defaults, validated."""
  section = config.get("ensemble", {}) if hasattr(config, "get") else {}
  s = {
      "members": _as_list(_get(section, "members", "")),
      "source": str(_get(section, "source", "runs")),
      "k": _get(section, "k", 5),
      "steps": [int(v) for v in _as_list(_get(section, "steps", ""))],
      "combine": str(_get(section, "combine", "prob")),
      "split": str(_get(section, "split", "test")),
      "distill_steps": int(_get(section, "distill_steps", 0)),
      "temperature": float(_get(section, "temperature", 4.0)),
      "alpha": float(_get(section, "alpha", 0.5)),
      "distill_lr": float(_get(section, "distill_lr", 1e-3)),
  }
  if s["source"] not in SOURCES:
    raise UserError(f"config.ensemble.source={s['source']!r}: use one of {', '.join(SOURCES)}.")
  if s["combine"] not in evaluate.COMBINES:
    raise UserError(f"config.ensemble.combine={s['combine']!r}: use one of "
                    f"{', '.join(evaluate.COMBINES)}.")
  if not s["members"]:
    raise UserError("--mode=ensemble needs config.ensemble.members: comma-separated run "
                    "directories (e.g. --config.ensemble.members=runs/s0,runs/s1), or the one "
                    "run / search directory for source=checkpoints, ema or search.")
  if s["source"] == "runs" and len(s["members"]) < 2:
    log.warning("An ensemble of one run is that run: pass several directories.")
  return s


def load_members(s: dict) -> list:
  first = s["members"][0]
  if s["source"] == "runs":
    return members_lib.from_runs(s["members"])
  if s["source"] == "checkpoints":
    return members_lib.from_checkpoints(first, s["steps"] or None)
  if s["source"] == "ema":
    return members_lib.with_ema(first)
  try:
    k = int(s["k"])
  except (TypeError, ValueError) as e:
    raise UserError(f"config.ensemble.k={s['k']!r} must be a positive integer.") from e
  return members_lib.from_search(first, k)


def run_mode(config, workdir: str, options=None) -> int:
  """Evaluates the ensemble the config names; writes workdir/ensemble.json; returns 0."""
  del options  # this mode takes no command-line options (jrecipe.modes.ModeOptions)
  s = ensemble_settings(config)
  members = load_members(s)
  result = evaluate.evaluate_ensemble(members, split=s["split"], combine=s["combine"])
  from jrecipe.ensemble.student import budget_of_run
  for row, m in zip(result["members"], members):  # each member's training budget
    row.update(budget_of_run(m.workdir, m.step) if m.workdir else {"steps": m.step,
                                                                    "examples": None})
  out = {"source": s["source"], "sources": s["members"], **result}
  table = evaluate.format_table(result)
  if s["distill_steps"] > 0:
    from jrecipe import experiment
    from jrecipe.ensemble.distill import distill as distill_fn
    student_exp = experiment.build(config)
    members_lib.check_same_dataset(members + [members_lib.Member(
        name="student", model=student_exp.model, variables=None, spec=student_exp.spec,
        data=student_exp.data)])
    teacher = evaluate.ensemble_predict(members, members[0].data.arrays["train"]["x"],
                                        combine=s["combine"]) if all(
        m.data is members[0].data for m in members) else _teacher_per_member(members, s)
    d = distill_fn(student_exp, teacher, temperature=s["temperature"],
                            alpha=s["alpha"], steps=s["distill_steps"], lr=s["distill_lr"],
                            seed=int(config.get("seed", 0)), reference=result,
                            eval_split=s["split"])
    variables = d.pop("variables")
    os.makedirs(workdir, exist_ok=True)
    from jrecipe.ensemble.student import save_student
    summary = save_student(
        student_exp, variables, workdir, steps=d["steps"], batch_size=d["batch_size"],
        distilled_from=[{k: r[k] for k in ("name", "workdir", "step", "steps", "examples")}
                        for r in out["members"]],
        settings={"temperature": d["temperature"], "alpha": d["alpha"], "lr": s["distill_lr"]})
    d["run_dir"] = os.path.join(os.path.abspath(workdir), "student")
    d["student_validation"] = summary.get("validation")
    out["distill"] = d
    table += "\n" + _distill_line(d, out["members"])
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "ensemble.json")
  write_json_atomic(path, out)
  print(table)
  print(f"Wrote {path}")
  return 0


def _distill_line(d: dict, rows: list[dict]) -> str:
  """The student's result and its budget beside the members' (steps and examples seen)."""
  def count(v):
    return "?" if v is None else f"{v:,}"
  members = ", ".join(f"{count(r.get('steps'))} steps / {count(r.get('examples'))} examples"
                      for r in rows)
  return (f"  distilled student ({d['steps']:,} steps x {d['batch_size']} = "
          f"{d['examples']:,} {d['train_split']} examples, T={d['temperature']:g}): accuracy "
          f"{d['student']['accuracy']:.4f} ({100 * d['student_minus_best']:+.2f} points vs the "
          f"best member); the members trained {members}. Student run: {d['run_dir']}")


def _teacher_per_member(members, s):
  """Ensemble train probabilities when members preprocess inputs differently."""
  import numpy as np
  outputs = "logp" if s["combine"] == "prob" else "logits"
  per = [evaluate.member_outputs(m, m.data.arrays["train"]["x"], outputs=outputs)
         for m in members]
  return np.exp(evaluate.combine_outputs(per, s["combine"]))
