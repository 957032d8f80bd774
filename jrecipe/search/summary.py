"""The summary of a search: DIR/search.json, DIR/search.csv and DIR/search/<field>.png.

CS231n: 'inspect the results' and 'beware best values on the border'. The table has one row per
trial of every stage (status, value, parameters, epochs, seconds, directory); the CSV is sorted
best first and opens in any spreadsheet; each plot shows the validation metric against one
hyperparameter, on a log axis where that range is log-scaled, one colour per stage, diverged
trials as crosses at the bottom. The best trial is the best of the longest budget, from any
stage. The edge-of-range warnings are computed on the declared ranges for that trial, on each
later stage's narrowed range for that stage's best, and across stages (`edge_report`).
"""

import csv
import logging
import math
import os
import re
from typing import Any, Optional

from jrecipe.search import space as space_lib, study as study_lib
from jrecipe.search.worker import trial_dir_name
from jrecipe.train.writer import save_figure_atomic, write_json_atomic

log = logging.getLogger("jrecipe")


def _on_disk(trials_dir: str, recorded: Optional[str], status: str, stage: int, number: int,
             value: Optional[float]) -> Optional[str]:
  """The trial's directory as it is on disk: the recorded one, or, once the master renamed it
  (a killed trial becomes 'killed_...' after its record was closed), the name of its status."""
  named = os.path.join(trials_dir, trial_dir_name(status, stage, number, value))
  for candidate in (recorded, named):
    if candidate and os.path.isdir(candidate):
      return candidate
  return recorded


def trial_rows(search) -> list[dict[str, Any]]:
  """One dict per trial of every stage (excess trials left out); `dir` is the path on disk."""
  rows = []
  trials_dir = os.path.join(search.workdir, "trials")
  for k in range(len(search.stages)):
    params = search.stage_params(k)
    for t in search.study(k).get_trials(deepcopy=False):
      status = study_lib.trial_status(t)
      if status == "excess":
        continue
      seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                 if t.datetime_complete and t.datetime_start else None)
      value = t.value if status == "complete" else None
      rows.append({
          "stage": k + 1, "number": t.number, "status": status, "value": value,
          "params": search.config_values(t.params, params),
          "epochs": search.stages[k].epochs, "seconds": seconds,
          "dir": _on_disk(trials_dir, t.user_attrs.get("dir"), status, k, t.number, value),
          "worker": t.user_attrs.get("worker"),
          "message": t.user_attrs.get("message", ""),
          "retry_of": t.user_attrs.get("retry_of"),
          "start": t.datetime_start.isoformat() if t.datetime_start else None,
          "end": t.datetime_complete.isoformat() if t.datetime_complete else None})
  return rows


def _complete(rows: list[dict]) -> list[dict]:
  return [r for r in rows if r["status"] == "complete" and r["value"] is not None
          and math.isfinite(r["value"])]


def _best_of(rows: list[dict], direction: str) -> Optional[dict]:
  sign = -1 if direction == "maximize" else 1
  done = _complete(rows)
  return sorted(done, key=lambda r: (sign * r["value"], r["stage"], r["number"]))[0] \
      if done else None


def best_row(rows: list[dict], direction: str) -> Optional[dict]:
  """The best complete trial among those of the longest budget (epochs) any complete trial
  had, from whichever stage: values at one budget are comparable, a short coarse trial's
  with a long one's are not. Stages of equal budget compete, so a later stage's best is not
  reported when an earlier stage found better at the same budget."""
  done = _complete(rows)
  if not done:
    return None
  budget = max(r["epochs"] for r in done)
  return _best_of([r for r in done if r["epochs"] == budget], direction)


def edge_report(search, rows: list[dict], best: Optional[dict], fraction: float) -> list[str]:
  """Edge-of-range warnings: the best trial on the declared range; each later stage's best
  on that stage's narrowed range; and a field whose best sat at the same edge in every stage
  (narrowing chased the optimum to the border each time)."""
  if best is None:
    return []
  out = space_lib.edge_warnings(search.params, best["params"], fraction)
  sides: dict[str, list] = {}
  for k in range(len(search.stages)):
    stage_best = _best_of([r for r in rows if r["stage"] == k + 1], search.direction)
    if stage_best is None:
      sides.clear()
      break
    params = search.stage_params(k)
    declared = {p.field: p for p in search.params}
    hits = space_lib.edges(params, stage_best["params"], fraction)
    for p, side, _ in hits:
      sides.setdefault(p.field, []).append(side)
    if k == 0:
      continue
    shown = [p for p, side, _ in hits if not (stage_best is best and getattr(
        declared[p.field], "low" if side == "lower" else "high") == getattr(
        p, "low" if side == "lower" else "high"))]  # already said on the declared range
    out += space_lib.edge_warnings(shown, stage_best["params"], fraction,
                                   where=f" of stage {k + 1}")
  n = len(search.stages)
  for field, s in sides.items():
    if n > 1 and len(s) == n and len(set(s)) == 1:
      out.append(f"In every stage (1 to {n}) the best {field} lay at the {s[0]} edge of that "
                 "stage's range: narrowing followed the optimum to the border each time, so it "
                 f"probably lies beyond it. Widen the declared range on the {s[0]} side and "
                 "search again.")
  return out


def _jsonable_params(params: dict) -> dict:
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


def write_csv(path: str, rows: list[dict], fields: list[str], direction: str) -> None:
  sign = -1 if direction == "maximize" else 1
  ordered = sorted(rows, key=lambda r: (r["value"] is None, sign * (r["value"] or 0.0),
                                        r["stage"], r["number"]))
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["stage", "trial", "status", "value", *fields, "epochs", "seconds", "dir",
                "message"])
    for r in ordered:
      w.writerow([r["stage"], r["number"], r["status"],
                  "" if r["value"] is None else f"{r['value']:.6g}",
                  *[repr(r["params"].get(f)) if isinstance(r["params"].get(f), tuple)
                    else r["params"].get(f, "") for f in fields],
                  r["epochs"], "" if r["seconds"] is None else f"{r['seconds']:.1f}",
                  os.path.basename(r["dir"] or ""), (r["message"] or "")[:200]])
  os.replace(tmp, path)


def plot(path: str, param: space_lib.Param, rows: list[dict], metric: str) -> None:
  """Metric vs one hyperparameter: a log x-axis for log-scaled ranges, one colour per stage."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  done = [r for r in rows if r["status"] == "complete" and param.field in r["params"]]
  bad = [r for r in rows if r["status"] == "diverged" and param.field in r["params"]]
  floor = min((r["value"] for r in done), default=0.0)
  if param.kind == "choice":
    labels = [repr(c) for c in param.choices]
    pos = {lab: i for i, lab in enumerate(labels)}
    xs = lambda rs: [pos.get(repr(r["params"][param.field]), -1) for r in rs]  # noqa: E731
    ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
  else:
    xs = lambda rs: [r["params"][param.field] for r in rs]  # noqa: E731
    if param.log:
      ax.set_xscale("log")
    ax.set_xlim(param.low, param.high)  # the declared range, its edges visible
  for stage in sorted({r["stage"] for r in done}):
    rs = [r for r in done if r["stage"] == stage]
    ax.scatter(xs(rs), [r["value"] for r in rs], s=18, label=f"stage {stage}")
  if bad:
    ax.scatter(xs(bad), [floor] * len(bad), marker="x", color="red", label="diverged")
  ax.set_xlabel(param.field + (" (log scale)" if param.log else ""))
  ax.set_ylabel(f"validation {metric}")
  if done or bad:
    ax.legend(fontsize=7)
  fig.tight_layout()
  save_figure_atomic(fig, path)
  plt.close(fig)


def summarize(search, events: Optional[list] = None) -> dict[str, Any]:
  """Writes DIR/search.json, DIR/search.csv and DIR/search/*.png; returns the search.json dict."""
  rows = trial_rows(search)
  best = best_row(rows, search.direction)
  fraction = float(search.config.search.edge_fraction)
  warnings = edge_report(search, rows, best, fraction)
  if best is None:
    warnings.append("No trial finished with a finite validation metric: every trial diverged "
                    "or failed. Lower the learning-rate range.")
  counts: dict[str, int] = {}
  for r in rows:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  fields = [p.field for p in search.params]
  out = {
      "metric": search.metric, "direction": search.direction, "study": search.name,
      "storage": study_lib.redact(search.url), "sampler": str(search.config.search.sampler),
      "stages": [{"stage": k + 1, "trials": st.trials, "epochs": st.epochs,
                  "space": space_lib.space_json(search.stage_params(k))}
                 for k, st in enumerate(search.stages)],
      "counts": counts, "warnings": warnings, "events": events or [],
      "best": None if best is None else {**best, "params": _jsonable_params(best["params"])},
      "best_budget_epochs": None if best is None else best["epochs"],
      "best_per_stage": [None if b is None else {k: b[k] for k in ("number", "value", "epochs")}
                         for b in (_best_of([r for r in rows if r["stage"] == k + 1],
                                            search.direction)
                                   for k in range(len(search.stages)))],
      "trials": [{**r, "params": _jsonable_params(r["params"])} for r in rows],
  }
  plots = os.path.join(search.workdir, "search")
  os.makedirs(plots, exist_ok=True)
  from jrecipe.search import isolation  # scientific vs nuisance (the Tuning Playbook)
  out.update(isolation.isolation_report(search, rows, out["best_budget_epochs"], plots))
  out["pruner"] = str(search.config.search.pruner)
  write_json_atomic(os.path.join(search.workdir, "search.json"), out)
  write_csv(os.path.join(search.workdir, "search.csv"), rows, fields, search.direction)
  for p in search.params:
    plot(os.path.join(plots, re.sub(r"[^\w.-]", "_", p.field) + ".png"), p, rows, search.metric)
  return out
