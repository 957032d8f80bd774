"""Report sections for the directories of --mode=search, ablate and ensemble.

Recipe: 'visualize everything', read by a person. Each section is a designed table (a few
columns that fit the page, numbers rounded to what they can tell, times as dates) instead of
the raw JSON, and says nothing about training a directory does not hold: a search, ensemble
or ablation directory has no metrics.jsonl of its own, so it gets no 'looks healthy' verdict
on training it never ran (its trials and runs have their own reports).
"""

import datetime
import os
from typing import Any, Optional

from jrecipe.report.html import _load_json, esc, images_in

# Tables fit the page's column: headers and text cells wrap (a dotted field name breaks at its
# dots), numbers stay on one line; a table still too wide scrolls inside its own box (.tw)
# instead of widening the page.
STYLE = ("<style>.pg td{max-width:26em;overflow-wrap:anywhere}.pg td.n{text-align:right;"
         "white-space:nowrap;font-variant-numeric:tabular-nums}.pg{max-width:100%}"
         ".pg th{overflow-wrap:anywhere;max-width:8em}"
         ".tw{max-width:100%;overflow-x:auto}.pg code{font-size:.9em}</style>")
MAX_TRIALS = 60


def _num(v: Any, digits: int = 4) -> str:
  """A readable number: 4 significant digits, thousands separated, no exponent for 1e3-1e9."""
  if isinstance(v, bool) or v is None:
    return "" if v is None else esc(v)
  if isinstance(v, int):
    return f"{v:,}"
  if isinstance(v, float):
    if v != v or v in (float("inf"), float("-inf")):
      return esc(v)
    if 1e-3 <= abs(v) < 1e9 or v == 0:
      return esc(f"{v:,.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}")
    return esc(f"{v:.3g}")
  return esc(v)


def _when(t: Any) -> str:
  """A Unix time or ISO string as 'YYYY-MM-DD HH:MM:SS UTC'."""
  if isinstance(t, (int, float)):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")
  return esc(str(t or "").replace("T", " ")[:19])


def _table(head: list[str], rows: list[list[str]], numeric: tuple = ()) -> str:
  """An HTML table; cells are already escaped HTML; columns in `numeric` align right."""
  th = "".join(f"<th>{esc(h).replace('.', '.<wbr>')}</th>" for h in head)
  body = "".join("<tr>" + "".join(f"<td{' class=n' if i in numeric else ''}>{c}</td>"
                                  for i, c in enumerate(r)) + "</tr>" for r in rows)
  return f"<div class=tw><table class=pg><tr>{th}</tr>{body}</table></div>"


def _warnings(items: list[str]) -> str:
  return "".join(f"<div class=diag><b class=warn>warning</b> {esc(w)}</div>" for w in items)


def _known(report, name: str, keys: tuple, image_dir: Optional[str] = None):
  """(the file's JSON, None) when it has jrecipe's shape, else (None, the generic render)."""
  d = _load_json(report.path(name))
  if isinstance(d, dict) and all(k in d for k in keys):
    return d, None
  return None, report.json_section(name, image_dir=image_dir)()


def diagnoses(report) -> Optional[str]:
  """The training diagnoses, only where this directory trained (it has metrics.jsonl)."""
  if not report.exists("metrics.jsonl"):
    return None
  return report.diagnoses()


def search(report) -> Optional[str]:
  """search.json: the best trial, warnings, stages, the trials best first, the events."""
  if not report.exists("search.json"):
    return None
  d, other = _known(report, "search.json", ("trials", "stages"), image_dir="search")
  if d is None:
    return other
  fields = [s["field"] for s in (d.get("stages") or [{}])[0].get("space", [])]
  counts = ", ".join(f"{v} {k}" for k, v in sorted((d.get("counts") or {}).items()))
  pruner = d.get("pruner") if d.get("pruner") not in (None, "none") else None
  parts = [STYLE, f"<p>Study <code>{esc(d.get('study'))}</code> ({esc(d.get('sampler'))} "
           f"sampler{', ' + esc(pruner) + ' pruner' if pruner else ''}) in "
           f"<code>{esc(d.get('storage'))}</code>; validation "
           f"{esc(d.get('metric'))} ({'higher' if d.get('direction') == 'maximize' else 'lower'}"
           f" is better). Trials: {esc(counts)}.</p>"]
  best = d.get("best")
  if best:
    parts.append(f"<p><b>Best:</b> {_num(best.get('value'))} (stage {best.get('stage')}, trial "
                 f"{best.get('number')}), the best of the longest budget, "
                 f"{_num(d.get('best_budget_epochs'))} epochs, from any stage: "
                 + ", ".join(f"<code>{esc(k)}={_num(v)}</code>"
                             for k, v in best.get("params", {}).items()) + "</p>")
  parts.append(_warnings(d.get("warnings") or []))
  stages = [[str(s["stage"]), _num(s["trials"]), _num(s["epochs"]),
             "<br>".join(esc(_space(p)) for p in s.get("space", []))]
            for s in d.get("stages", [])]
  parts.append("<h3>Stages</h3>" + _table(["stage", "trials", "epochs", "space"], stages, (1, 2)))
  sign = -1 if d.get("direction") == "maximize" else 1
  trials = sorted(d.get("trials", []), key=lambda t: (t.get("value") is None,
                                                      sign * (t.get("value") or 0.0)))
  rows = [[str(t["stage"]), str(t["number"]), esc(t["status"]), _num(t.get("value")),
           *[_num(t["params"].get(f)) for f in fields], _num(t.get("epochs")),
           _num(t.get("seconds"), 3), esc(os.path.basename(t.get("dir") or ""))]
          for t in trials[:MAX_TRIALS]]
  more = (f"<p class=muted>{len(trials) - MAX_TRIALS} more trials in search.csv.</p>"
          if len(trials) > MAX_TRIALS else "")
  n = 4 + len(fields)
  parts.append("<h3>Trials, best first</h3>" + _table(
      ["stage", "trial", "status", esc(d.get("metric")), *fields, "epochs", "seconds",
       "directory"], rows, (0, 1, 3, *range(4, n), n, n + 1)) + more)
  parts.append(_isolation(d))
  events = [[_when(e.get("time")), str(e.get("trial")), esc(e.get("event")),
             esc(e.get("requeued_as"))] for e in d.get("events", [])]
  if events:
    parts.append("<h3>Master events</h3>" + _table(["time", "trial", "event", "requeued as"],
                                                   events))
  parts.append(images_in(report.path("search")))
  return "".join(parts)


def _isolation(d: dict) -> str:
  """The roles of the hyperparameters and, per scientific field, the best trial per bin."""
  roles = d.get("roles") or {}
  if not roles.get("scientific") and not roles.get("fixed"):
    return ""
  fixed = ", ".join(f"<code>{esc(k)}={esc(v)}</code>" for k, v in roles.get("fixed", {}).items())
  out = [f"<h3>Scientific, nuisance and fixed hyperparameters</h3><p>Scientific: "
         f"{esc(', '.join(roles.get('scientific', [])) or 'none')}; nuisance (optimised out): "
         f"{esc(', '.join(roles.get('nuisance', [])) or 'none')}; fixed: {fixed or 'none'}.</p>"]
  for field, entries in (d.get("isolation") or {}).items():
    rows = [[esc(e["label"]), _num(e["trials"]),
             _num(e["best"]["value"]) if e["best"] else "",
             f"{e['best']['stage']}/{e['best']['number']}" if e["best"] else "",
             "<br>".join(f"<code>{esc(k)}={_num(v)}</code>" for k, v in
                         (e["best"] or {}).get("params", {}).items() if k != field)]
            for e in entries]
    out.append(f"<p>Isolation of <code>{esc(field)}</code>: the best trial of each bin over "
               f"the nuisance hyperparameters, trials of "
               f"{_num(d.get('isolation_budget_epochs'))} epochs (plot "
               f"<code>search/isolation_{esc(field)}.png</code> below).</p>" + _table(
                   [field, "trials", f"best {d.get('metric')}", "stage/trial",
                    "its nuisance values"], rows, (1, 2)))
  return "".join(out)


def _space(p: dict) -> str:
  if p.get("choices"):
    return f"{p['field']}=choice({', '.join(p['choices'])})"
  return f"{p['field']}={p['kind']}({p['low']:.4g}, {p['high']:.4g})"


def _ci(r: dict) -> str:
  ci = r.get("ci95")
  return f"{100 * ci[0]:.2f} to {100 * ci[1]:.2f}" if ci else ""


def ensemble(report) -> Optional[str]:
  """ensemble.json: members and the ensemble with intervals and budgets, the student."""
  if not report.exists("ensemble.json"):
    return None
  d, other = _known(report, "ensemble.json", ("members", "ensemble"))
  if d is None or not isinstance(d["members"], list):
    return other or report.json_section("ensemble.json")()
  best = d.get("best_member") or {}
  rows = [[esc(r["name"]) + (" <b>(best)</b>" if r["name"] == best.get("name") else ""),
           _num(100 * r["accuracy"]), _ci(r), _num(r.get("nll")), _num(r.get("steps")),
           _num(r.get("examples"))] for r in d.get("members", [])]
  e = d.get("ensemble", {})
  rows.append(["<b>ensemble</b>", _num(100 * e.get("accuracy", float("nan"))), _ci(e),
               _num(e.get("nll")), "", ""])
  dist = d.get("distill")
  if dist:
    s = dist.get("student", {})
    rows.append([f"student (distilled; <code>{esc(dist.get('run_dir', ''))}</code>)",
                 _num(100 * s.get("accuracy", float("nan"))), _ci(s), _num(s.get("nll")),
                 _num(dist.get("steps")), _num(dist.get("examples"))])
  head = (f"<p>{_num(d.get('num_members'))} members ({esc(d.get('source'))}), combined by "
          f"{esc(d.get('combine'))}, scored on the {esc(d.get('split'))} split "
          f"({_num(d.get('count'))} examples). The best member is chosen on the "
          f"{esc(best.get('chosen_on', d.get('split')))} split. Gain over it: "
          f"{_num(d.get('gain_points'))} accuracy points.</p>")
  return STYLE + head + _table(["model", "accuracy (%)", "95% interval (Wilson)", "NLL",
                                "steps", "examples"], rows, (1, 3, 4, 5))


def ablation(report) -> Optional[str]:
  """ablation.json: base and variants, effects with intervals, hypotheses and verdicts."""
  if not report.exists("ablation.json"):
    return None
  d, other = _known(report, "ablation.json", ("base", "variants", "metric"))
  if d is None:
    return other
  b = d["base"]
  std = lambda r: f" &plusmn; {_num(r['std'], 2)}" if r.get("std") is not None else ""  # noqa
  rows = [["full config" if d.get("kind") == "remove" else "base", "", _num(b["mean"]) + std(b),
           "", "", ""]]
  for v in d.get("variants", []):
    iv = v.get("interval")
    eff = f"{v['effect']:+.2f}" + (f" [{iv[0]:+.2f}, {iv[1]:+.2f}]" if iv else "")
    rows.append([esc(v["name"]), "<code>" + esc(", ".join(f"{k}={x!r}" for k, x in
                                                          v["overrides"].items())) + "</code>",
                 _num(v["mean"]) + std(v), esc(eff),
                 esc(v["direction"] + (f" by {v['size']:g}" if v.get("size") else "")),
                 f"<b>{esc(v['verdict'])}</b>: {esc(v['text'])}"])
  head = (f"<p>Validation {esc(d['metric'])} ({esc(d['unit'])}), mean &plusmn; std over "
          f"{d['seeds']} seeds; effect = variant - base, positive = better, with its 95% "
          "interval (paired bootstrap over seeds and validation examples).</p>")
  return STYLE + head + _table(["variant", "change", f"validation {esc(d['metric'])}",
                                "effect [95%]", "hypothesis", "verdict"], rows, (2, 3))


def _pct_ci(acc: Any, ci: Any) -> tuple[str, str]:
  """('93.3', '70.2 to 98.8') from an accuracy and its interval (fractions)."""
  a = _num(100 * acc) if isinstance(acc, (int, float)) else ""
  c = (f"{100 * ci[0]:.1f} to {100 * ci[1]:.1f}"
       if isinstance(ci, (list, tuple)) and len(ci) == 2 else "")
  return a, c


def _same_examples(report, h: dict) -> Optional[dict]:
  """The human and the model on the same examples: human.json's, else checks.json's."""
  same = h.get("model_same_examples")
  if not same and report.exists("checks.json"):
    c = _load_json(report.path("checks.json"))
    same = ((c.get("human_baseline") or {}).get("same_examples")
            if isinstance(c, dict) else None)
  return same if isinstance(same, dict) and same.get("n") else None


def label(report) -> Optional[str]:
  """human.json: the human's accuracy with its interval, per class, self-agreement, and the
  model on exactly the labelled examples (never the model's accuracy on the whole split
  set beside the human's as if it were the same measurement)."""
  if not report.exists("human.json"):
    return None
  h, other = _known(report, "human.json", ("accuracy", "n"))
  if h is None:
    return other
  acc, ci = _pct_ci(h.get("accuracy"), h.get("ci95"))
  state = "complete" if h.get("complete", True) else "incomplete (rerun --mode=label to resume)"
  parts = [STYLE, f"<p>You labelled {_num(h.get('n'))} examples of the "
           f"{esc(h.get('split', 'test'))} split of {esc(h.get('dataset', ''))} "
           f"({_num(h.get('skipped', 0))} skipped; session {esc(state)}). Human accuracy: "
           f"<b>{acc}%</b> (95% Wilson interval {esc(ci)}).</p>"]
  same = _same_examples(report, h)
  if same:
    ha, hc = _pct_ci(same["human_accuracy"], same["human_ci95"])
    ma, mc = _pct_ci(same["model_accuracy"], same["model_ci95"])
    rows = [["human", _num(same["human_correct"]), ha, esc(hc)],
            [f"model (checkpoint step {_num(same.get('step'))})", _num(same["model_correct"]),
             ma, esc(mc)]]
    parts.append(f"<h3>Human and model on the same {_num(same['n'])} examples</h3>" + _table(
        ["who", "right", "accuracy (%)", "95% interval (Wilson)"], rows, (1, 2)) +
        f"<p>Both right on {_num(same['both_right'])}, only the human on "
        f"{_num(same['only_human'])}, only the model on {_num(same['only_model'])}, both wrong "
        f"on {_num(same['both_wrong'])}. For reference, the model on the whole split "
        f"({_num(same['count_all'])} examples): {_num(100 * same['model_accuracy_all'])}%; "
        "that number is not comparable with the human's, which was measured on the sample.</p>")
  else:
    parts.append("<p class=muted>No trained model in this directory (or no label session): "
                 "train here, or run --mode=check here, to score the model on the same "
                 "examples.</p>")
  names = h.get("class_names") or []
  per = h.get("per_class") or {}
  if per:
    rows = [[esc(k), _num(v.get("n")), _num(100 * v["accuracy"]) if v.get("accuracy")
             is not None else ""] for k, v in per.items()]
    parts.append("<h3>Per class</h3>" + _table(["class", "labelled", "accuracy (%)"], rows,
                                               (1, 2)))
  sa = h.get("self_agreement")
  if isinstance(sa, dict):
    a, c = _pct_ci(sa.get("agreement"), sa.get("ci95"))
    parts.append(f"<p>Self-agreement over {_num(sa.get('n'))} repeats: {a}% (95% interval "
                 f"{esc(c)}), a label-noise estimate of "
                 f"{_num(100 * sa.get('label_noise_estimate', 0.0))}%.</p>")
  wrong = h.get("wrong") or []
  if wrong:
    rows = [[_num(w.get("id")), esc(w.get("true_name", names[w["true"]] if names else "")),
             esc(w.get("human_name", ""))] for w in wrong[:MAX_TRIALS]]
    parts.append("<h3>Your mistakes</h3>" + _table(["example id", "true", "your label"], rows,
                                                   (0,)))
  return "".join(parts)
