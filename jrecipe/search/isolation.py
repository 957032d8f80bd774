"""Isolation plots: the effect of a scientific hyperparameter, the nuisance ones optimised out.

Google's Deep Learning Tuning Playbook: to ask "does dropout help?", compare the BEST trial at
each value of the scientific hyperparameter (dropout), each best over the nuisance
hyperparameters (learning rate, weight decay, ...), not single trials at arbitrary nuisance
values. A numeric scientific field is cut into `search.scientific_bins` equal-width bins on
its own scale (in the log for a log-scaled range); a choice field has one bin per value. Only
the trials of one budget are compared (the longest budget any complete trial had, as for the
search's best trial): a short coarse trial is not comparable with a long one.
"""

import math
import os
import re
from typing import Any, Optional, Sequence

from jrecipe.search import space as space_lib
from jrecipe.train.writer import save_figure_atomic


def _bin_edges(p: space_lib.Param, bins: int) -> list[float]:
  f, inv = (math.log, math.exp) if p.log else ((lambda x: x), (lambda x: x))
  lo, hi = f(p.low), f(p.high)
  return [inv(lo + (hi - lo) * i / bins) for i in range(bins + 1)]


def isolate(p: space_lib.Param, rows: Sequence[dict], direction: str,
            bins: int) -> list[dict[str, Any]]:
  """One entry per bin (or choice) of `p`: the best complete trial in it, or None if empty.

  Args:
    p: the scientific hyperparameter (its declared range).
    rows: complete trials of one budget (summary.trial_rows' dicts with a finite value).
    direction: 'maximize' or 'minimize'.
    bins: equal-width bins of a numeric range on its own scale.

  Returns:
    [{'label', 'low', 'high' (numeric) or 'choice', 'trials' (count), 'best' (number, stage,
    value, params) or None}].
  """
  sign = -1 if direction == "maximize" else 1
  if p.kind == "choice":
    groups = [({"label": repr(c), "choice": repr(c)},
               [r for r in rows if r["params"].get(p.field) == c]) for c in p.choices]
  else:
    e = _bin_edges(p, bins)
    groups = []
    for i in range(bins):
      inside = [r for r in rows if p.field in r["params"] and (
          e[i] <= r["params"][p.field] < e[i + 1] or (i == bins - 1
                                                      and r["params"][p.field] == e[-1]))]
      groups.append(({"label": f"{e[i]:.3g} to {e[i + 1]:.3g}", "low": e[i], "high": e[i + 1]},
                     inside))
  out = []
  for head, members in groups:
    best = min(members, key=lambda r: (sign * r["value"], r["number"])) if members else None
    out.append({**head, "trials": len(members), "best": None if best is None else {
        "number": best["number"], "stage": best["stage"], "value": best["value"],
        "params": {k: repr(v) if isinstance(v, tuple) else v
                   for k, v in best["params"].items()}}})
  return out


def plot(path: str, p: space_lib.Param, entries: list[dict], rows: Sequence[dict],
         metric: str, nuisance: Sequence[str]) -> None:
  """Every trial (grey) and the best per bin (blue line) against `p` on its own scale."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  if p.kind == "choice":
    pos = {repr(c): i for i, c in enumerate(p.choices)}
    ax.scatter([pos[repr(r["params"][p.field])] for r in rows], [r["value"] for r in rows],
               s=12, color="#adb5bd", label="trials")
    xs = [pos[e["choice"]] for e in entries if e["best"]]
    ax.set_xticks(range(len(p.choices)), [repr(c) for c in p.choices], rotation=30, fontsize=7)
  else:
    ax.scatter([r["params"][p.field] for r in rows], [r["value"] for r in rows], s=12,
               color="#adb5bd", label="trials")
    mid = (lambda e: math.sqrt(e["low"] * e["high"])) if p.log else (
        lambda e: (e["low"] + e["high"]) / 2)
    xs = [mid(e) for e in entries if e["best"]]
    if p.log:
      ax.set_xscale("log")
    ax.set_xlim(p.low, p.high)
  ax.plot(xs, [e["best"]["value"] for e in entries if e["best"]], "o-", color="#1f5fa8",
          label="best per bin over " + (", ".join(nuisance) or "no nuisance field"))
  ax.set_xlabel(p.field + (" (log scale)" if p.log else "") + " [scientific]")
  ax.set_ylabel(f"validation {metric}")
  ax.legend(fontsize=6)
  fig.tight_layout()
  save_figure_atomic(fig, path)
  plt.close(fig)


def isolation_report(search, rows: list[dict], budget: Optional[float],
                     plots_dir: Optional[str]) -> dict[str, Any]:
  """search.json's 'roles' and 'isolation' ({field: entries}); plots search/isolation_*.png."""
  roles = search.roles
  done = [r for r in rows if r["status"] == "complete" and r["value"] is not None
          and math.isfinite(r["value"]) and r["epochs"] == budget]
  bins = int(search.config.search.scientific_bins)
  by = {p.field: p for p in search.params}
  out = {}
  for field in roles["scientific"]:
    entries = isolate(by[field], done, search.direction, bins)
    out[field] = entries
    if plots_dir and done:
      name = "isolation_" + re.sub(r"[^\w.-]", "_", field) + ".png"
      plot(os.path.join(plots_dir, name), by[field], entries, done, search.metric,
           roles["nuisance"])
  return {"roles": roles, "isolation": out, "isolation_budget_epochs": budget}
