"""DIR/report.html: one self-contained page with everything a work directory holds.

Recipe: 'visualize everything' and CS231n's babysitting, in one file a person would rather
look at than read: the config, curves with epochs on the x-axis (loss on a linear and a log
scale), the diagnoses with their numbers, the babysitting pictures (update ratios,
dead/saturated units, histograms, first-layer filters, prediction dynamics) and, when the
files exist, the check battery (checks.json, checks/*.png: gradient-check table, dependency
heatmaps), data inspection (inspect/), the human baseline (human.json), ablations, the
learning-rate finder, a search and an ensemble. Every number comes from files in DIR; images
are embedded as base64 data: URIs; no script or stylesheet is fetched from the network.

JSON files whose format jrecipe's report does not know field by field are rendered as
generic nested tables, and a section that cannot be rendered shows its error instead of
breaking the page.
"""

import base64
import contextlib
import datetime
import html
import json
import math
import os
from typing import Any, Callable, Optional

from jrecipe import storage
from jrecipe.monitor import diagnose as diagnose_lib
from jrecipe.train.writer import read_jsonl
from jrecipe.report import plots

MAX_ROWS = 200
MAX_IMAGES = 24
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;
color:#212529;background:#f8f9fa}
main{max-width:1100px;margin:auto;padding:1em 2em}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:2px solid #dee2e6;padding-bottom:.2em;
margin-top:1.6em}h3{font-size:1.05em}
nav a{margin-right:.8em;font-size:.9em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em;background:#fff}
td,th{border:1px solid #dee2e6;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#e9ecef}
.pass{color:#2b8a3e;font-weight:600}.fail{color:#c92a2a;font-weight:600}
.warn{color:#e67700;font-weight:600}.skip{color:#868e96}
.diag{border-left:5px solid #e67700;background:#fff;padding:.5em 1em;margin:.6em 0}
.diag.problem{border-color:#c92a2a}.diag.ok{border-color:#2b8a3e}
.figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure{margin:0;background:#fff;padding:.4em;border:1px solid #dee2e6}
figcaption{font-size:.8em;color:#495057;max-width:560px}
img{max-width:100%;image-rendering:pixelated}
.muted{color:#868e96;font-size:.85em}
.scale input{display:none}.scale label{cursor:pointer;padding:.2em .6em;border:1px solid #adb5bd;
border-radius:3px;margin-right:.3em;font-size:.85em}
.scale .lin,.scale .log{display:none}
#s-lin:checked~.lin,#s-log:checked~.log{display:block}
#s-lin:checked~label[for=s-lin],#s-log:checked~label[for=s-log]{background:#1f5fa8;color:#fff}
"""


# --- small HTML helpers --------------------------------------------------------------------
def esc(x: Any) -> str:
  return html.escape(str(x), quote=True)


def fmt(v: Any) -> str:
  if isinstance(v, bool) or v is None:
    return esc(v)
  if isinstance(v, float):
    if not math.isfinite(v):
      return esc(v)
    return esc(f"{v:.4g}")
  return esc(v)


def img_tag(data: bytes, alt: str = "", mime: str = "image/png") -> str:
  b64 = base64.b64encode(data).decode("ascii")
  return f'<img alt="{esc(alt)}" src="data:{mime};base64,{b64}">'


def figure(data, caption: str) -> str:
  """A figure from PNG bytes or an inline SVG string; '' for None."""
  if not data:
    return ""
  inner = data if isinstance(data, str) else img_tag(data, caption)
  return f"<figure>{inner}<figcaption>{esc(caption)}</figcaption></figure>"


def file_figure(path: str, caption: Optional[str] = None) -> str:
  try:
    with storage.open(path, "rb") as f:
      data = f.read()
  except OSError:
    return ""
  return figure(data, caption or os.path.basename(path))


def _load_json(path: str):
  with storage.open(path) as f:
    return json.load(f)


def generic(obj: Any, depth: int = 0, workdir: Optional[str] = None) -> str:
  """Any JSON value as HTML: dicts as key/value tables, lists of dicts as tables."""
  if depth > 5:
    return f"<code>{esc(json.dumps(obj)[:300])}</code>"
  if isinstance(obj, dict):
    if not obj:
      return "<span class=muted>{}</span>"
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{generic(v, depth + 1, workdir)}</td></tr>"
                   for k, v in list(obj.items())[:MAX_ROWS])
    more = f"<tr><td colspan=2 class=muted>... {len(obj) - MAX_ROWS} more</td></tr>" \
        if len(obj) > MAX_ROWS else ""
    return f"<table>{rows}{more}</table>"
  if isinstance(obj, list):
    if obj and all(isinstance(r, dict) for r in obj):
      cols: list = []
      for r in obj[:MAX_ROWS]:
        for k in r:
          if k not in cols:
            cols.append(k)
      cols = cols[:16]
      head = "".join(f"<th>{esc(c)}</th>" for c in cols)
      body = "".join("<tr>" + "".join(f"<td>{generic(r.get(c, ''), depth + 1, workdir)}</td>"
                                      for c in cols) + "</tr>" for r in obj[:MAX_ROWS])
      more = (f"<tr><td colspan={len(cols)} class=muted>... {len(obj) - MAX_ROWS} more rows"
              "</td></tr>") if len(obj) > MAX_ROWS else ""
      return f"<table><tr>{head}</tr>{body}{more}</table>"
    if all(not isinstance(x, (dict, list)) for x in obj):
      shown = ", ".join(fmt(x) for x in obj[:20])
      return f"[{shown}{', ...' if len(obj) > 20 else ''}]" + (
          f" <span class=muted>({len(obj)} values)</span>" if len(obj) > 20 else "")
    return "<ol>" + "".join(f"<li>{generic(x, depth + 1, workdir)}</li>"
                            for x in obj[:MAX_ROWS]) + "</ol>"
  if isinstance(obj, str) and workdir and obj.lower().endswith(".png"):
    p = obj if os.path.isabs(obj) else os.path.join(workdir, obj)
    if storage.isfile(p):
      return file_figure(p, obj)
  return fmt(obj)


def images_in(directory: str, limit: int = MAX_IMAGES) -> str:
  paths = sorted(storage.glob(directory, "*.png"))[:limit]
  return "<div class=figs>" + "".join(file_figure(p) for p in paths) + "</div>" if paths else ""


def _step_of(path: str) -> str:
  """'step_0000114.png' -> '114'."""
  return os.path.basename(path)[5:-4].lstrip("0") or "0"


def json_or_error(path: str, workdir: Optional[str] = None) -> str:
  """A JSON file rendered generically, or a note saying why it could not be read."""
  try:
    return generic(_load_json(path), workdir=workdir)
  except (OSError, ValueError) as e:
    return (f"<p class=fail>{esc(os.path.basename(path))} could not be rendered: "
            f"{esc(type(e).__name__)}: {esc(e)}</p>")


def json_files(directory: str) -> list[str]:
  return sorted(storage.glob(directory, "*.json"))


# --- sections ------------------------------------------------------------------------------
class Report:
  """Builds the page from `workdir`'s files (see the module docstring)."""

  def __init__(self, workdir: str, loss_scale: Optional[str] = None):
    self.dir = workdir
    self.run = diagnose_lib.load_run(workdir)
    self.rec = self.run["records"]
    self.config = self.run["config"]
    mc = self.config.get("monitor") if isinstance(self.config.get("monitor"), dict) else {}
    self.loss_scale = loss_scale or mc.get("report_loss_scale", "both")
    self.sections: list[tuple[str, str, str]] = []  # (anchor, title, html)

  def path(self, *parts) -> str:
    return os.path.join(self.dir, *parts)

  def exists(self, *parts) -> bool:
    return storage.exists(self.path(*parts))

  def add(self, anchor: str, title: str, fn: Callable[[], Optional[str]]) -> None:
    try:
      body = fn()
    except Exception as e:  # noqa: BLE001 - one broken file must not hide the rest
      body = f"<p class=fail>This section could not be rendered: {esc(type(e).__name__)}: " \
             f"{esc(e)}</p>"
    if body:
      self.sections.append((anchor, title, body))

  # summary ---------------------------------------------------------------------------------
  def summary(self) -> Optional[str]:
    if not self.exists("summary.json"):
      return None
    s = _load_json(self.path("summary.json"))
    rows = []
    for split in ("test", "test_ema", "validation", "validation_ema"):
      if isinstance(s.get(split), dict):
        r = s[split]
        rows.append(f"<tr><th>{split}</th><td>{fmt(r.get('accuracy', ''))}</td>"
                    f"<td>{fmt(r.get('loss', ''))}</td><td>{fmt(r.get('count', ''))}</td></tr>")
    head = ("<table><tr><th>split</th><th>accuracy</th><th>loss</th><th>examples</th></tr>"
            + "".join(rows) + "</table>") if rows else ""
    info = {k: s[k] for k in ("step", "epoch", "stopped", "train_seconds", "first_step_seconds")
            if k in s}
    return head + generic(info)

  # diagnoses -------------------------------------------------------------------------------
  def diagnoses(self) -> str:
    found = diagnose_lib.diagnose(self.dir)
    if not found:
      u = diagnose_lib.update_ratios(self.rec)
      ratio = f" Median update/weight ratio {u['median']:.2g}." if u else ""
      return ("<div class='diag ok'><b>No diagnosis fired.</b> The loss shape, update ratios,"
              f" train/validation gap and unit statistics look healthy.{esc(ratio)}</div>")
    out = []
    for d in found:
      nums = generic(d.get("numbers", {}))
      out.append(f"<div class='diag {esc(d['severity'])}'><b>{esc(d['title'])}</b> "
                 f"<span class=muted>[{esc(d['id'])}, {esc(d['severity'])}]</span>"
                 f"<p>{esc(d['message'])}</p><details><summary>numbers</summary>{nums}"
                 "</details></div>")
    return "".join(out)

  # curves ----------------------------------------------------------------------------------
  def curves(self) -> Optional[str]:
    steps, losses = diagnose_lib.step_losses(self.rec)
    per_step = (steps, losses) if len(steps) and "train_steps" in self.rec else None
    lin = plots.curve(self.rec, "loss", per_step=per_step)
    if lin is None:
      return None
    parts = []
    if self.loss_scale == "both":
      log = plots.curve(self.rec, "loss", per_step=per_step, logy=True)
      parts.append("<div class=scale><input type=radio name=s id=s-lin checked>"
                   "<input type=radio name=s id=s-log><label for=s-lin>linear</label>"
                   "<label for=s-log>log scale</label>"
                   f"<div class=lin>{figure(lin, 'loss (linear)')}</div>"
                   f"<div class=log>{figure(log, 'loss (log scale)')}</div></div>")
    else:
      parts.append(figure(plots.curve(self.rec, "loss", per_step=per_step,
                                      logy=self.loss_scale == "log"), "loss"))
    figs = [figure(plots.curve(self.rec, "accuracy"), "accuracy"),
            figure(plots.curve(self.rec, "learning_rate"), "learning rate")]
    return "".join(parts) + "<div class=figs>" + "".join(figs) + "</div>"

  def babysitting(self) -> Optional[str]:
    spe = plots.steps_per_epoch(self.rec)
    mon, probe = self.rec.get("monitor", []), self.rec.get("probe", [])
    mc = diagnose_lib._monitor_config(self.config)
    figs = [
        figure(plots.prefixed(mon, "update_ratio/", spe, logy=True,
                              band=(mc["ratio_low"], mc["ratio_high"]), hlines=(1e-3,),
                              title="update/weight ratio per leaf (~1e-3 dashed)"),
               "update/weight ratio per parameter leaf"),
        figure(plots.prefixed(mon, "grad_norm/", spe, logy=True, title="gradient norm per leaf"),
               "gradient norm per parameter leaf"),
        figure(plots.prefixed(probe, "dead_fraction/", spe, title="dead ReLU fraction"),
               "fraction of dead ReLUs per layer (probe batch)"),
        figure(plots.prefixed(probe, "saturated_fraction/", spe,
                              title="saturated tanh/sigmoid fraction"),
               "fraction of saturated units per layer (probe batch)"),
    ]
    hist = read_jsonl(self.path("monitor", "histograms.jsonl"))
    figs += [figure(h, "activations (layer output before the non-linearity), first (grey) vs "
                    "last (blue) probe") for h in plots.histograms(hist, "activations")]
    figs += [figure(h, "gradient of the loss, first (grey) vs last (blue) probe")
             for h in plots.histograms(hist, "gradients")]
    body = "".join(f for f in figs if f)
    overview = ""
    if self.exists("monitor", "params_at_init.json"):
      ov = _load_json(self.path("monitor", "params_at_init.json"))
      overview = (f"<h3>Parameter overview at init ({fmt(ov.get('total'))} parameters)</h3>"
                  + generic(ov.get("leaves", [])))
    if not body and not overview:
      return None
    return f"<div class=figs>{body}</div>{overview}"

  def filters(self) -> Optional[str]:
    paths = storage.glob(self.path("monitor", "filters"), "*.png")
    if not paths:
      return None
    if len(paths) > 8:
      idx = sorted({round(i * (len(paths) - 1) / 7) for i in range(8)})
      paths = [paths[i] for i in idx]
    figs = "".join(file_figure(p, f"step {_step_of(p)}") for p in paths)
    return ("<p class=muted>First-layer weights, each filter on its own grey scale: smooth, "
            f"structured filters are healthy; noise suggests too little regularisation.</p>"
            f"<div class=figs>{figs}</div>")

  def predictions(self) -> Optional[str]:
    recs = read_jsonl(self.path("monitor", "predictions.jsonl"))
    if not recs:
      return None
    out = []
    if self.exists("monitor", "prediction_dynamics.png"):
      out.append(file_figure(self.path("monitor", "prediction_dynamics.png"),
                             f"probability of the true class on {len(recs[0].get('y', []))} "
                             f"fixed {recs[0].get('split', '')} examples (rows) after each of "
                             f"{len(recs)} evaluations (columns): green = right, red = wrong"))
    paths = storage.glob(self.path("monitor", "predictions"), "*.png")
    if len(paths) > 6:
      paths = [paths[round(i * (len(paths) - 1) / 5)] for i in range(6)]
    out += [file_figure(p, f"predictions at step {_step_of(p)}") for p in paths]
    if "pred" in recs[-1]:
      out.append(figure(plots.regression_scatter(recs[-1]), "prediction vs target"))
    return "<div class=figs>" + "".join(out) + "</div>"

  # other modes' files ----------------------------------------------------------------------
  def checks(self) -> Optional[str]:
    if not self.exists("checks.json"):
      return images_in(self.path("checks")) or None
    data = _load_json(self.path("checks.json"))
    checks = data.get("checks", []) if isinstance(data, dict) else []
    rows = []
    grad = ""
    for c in checks:
      if not isinstance(c, dict):
        continue
      st = str(c.get("status", ""))
      rows.append(f"<tr><td>{esc(c.get('name', ''))}</td><td class={esc(st)}>{esc(st.upper())}"
                  f"</td><td>{fmt(c.get('value'))}</td><td>{fmt(c.get('expected'))}</td>"
                  f"<td>{esc(c.get('message', ''))}</td></tr>")
      det = c.get("details") if isinstance(c.get("details"), dict) else {}
      if c.get("name") == "gradient_check" and det.get("table"):
        grad = "<h3>Gradient check</h3>" + generic(det["table"])
        if det.get("reg_table"):
          grad += "<h3>Gradient check (regularisation loss)</h3>" + generic(det["reg_table"])
    table = ("<table><tr><th>check</th><th>status</th><th>value</th><th>expected</th>"
             "<th>explanation</th></tr>" + "".join(rows) + "</table>")
    summary = generic(data.get("summary", {})) if isinstance(data, dict) else ""
    return summary + table + grad + images_in(self.path("checks"))

  def inspect(self) -> Optional[str]:
    d = self.path("inspect")
    if not storage.isdir(d):
      return None
    parts = []
    for p in json_files(d):
      parts.append(f"<h3>{esc(os.path.relpath(p, self.dir))}</h3>" + json_or_error(p, self.dir))
    return "".join(parts) + images_in(d)

  def json_section(self, name: str, image: Optional[str] = None,
                   image_dir: Optional[str] = None) -> Callable[[], Optional[str]]:
    def render():
      parts = []
      if self.exists(name):
        parts.append(json_or_error(self.path(name), self.dir))
      if image and self.exists(image):
        parts.append(f"<div class=figs>{file_figure(self.path(image))}</div>")
      if image_dir:
        parts.append(images_in(self.path(image_dir)))
      return "".join(p for p in parts if p) or None
    return render

  def config_section(self) -> Optional[str]:
    if not self.config:
      return None
    return f"<details open><summary>config.json</summary>{generic(self.config)}</details>"

  def build(self) -> str:
    from jrecipe.report import pages  # designed search/ablation/ensemble/label pages
    self.add("summary", "Result", self.summary)
    self.add("diagnoses", "Diagnoses", lambda: pages.diagnoses(self))
    self.add("curves", "Curves", self.curves)
    self.add("babysitting", "Babysitting: updates, gradients and units", self.babysitting)
    self.add("filters", "First-layer filters over time", self.filters)
    self.add("predictions", "Prediction dynamics", self.predictions)
    self.add("checks", "Check battery", self.checks)
    self.add("inspect", "Data inspection", self.inspect)
    self.add("lr_find", "Learning-rate finder", self.json_section("lr_find.json", "lr_find.png"))
    self.add("search", "Hyperparameter search", lambda: pages.search(self))
    self.add("ablation", "Ablations", lambda: pages.ablation(self))
    self.add("ensemble", "Ensemble", lambda: pages.ensemble(self))
    self.add("human", "Human baseline", lambda: pages.label(self))
    self.add("config", "Config", self.config_section)
    name = os.path.basename(storage.absolute(self.dir))
    nav = "".join(f"<a href='#{a}'>{esc(t)}</a>" for a, t, _ in self.sections)
    body = "".join(f"<section id='{a}'><h2>{esc(t)}</h2>{b}</section>"
                   for a, t, b in self.sections)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>jrecipe report: {esc(name)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>jrecipe report: {esc(name)}</h1><p class=muted>{esc(storage.absolute(self.dir))}"
            f" &middot; built {esc(when)} from the files of this work directory</p>"
            f"<nav>{nav}</nav>{body}</main></body></html>\n")


def write_report(workdir: str, loss_scale: Optional[str] = None) -> str:
  """Builds DIR/report.html (atomically) and returns its path."""
  page = Report(workdir, loss_scale).build()
  path = os.path.join(workdir, "report.html")
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with storage.open(tmp, "w", encoding="utf-8") as f:
      f.write(page)
    storage.replace(tmp, path)
  except OSError as e:  # a full disk: no half-written temporary file left, the file named
    with contextlib.suppress(OSError):
      storage.remove(tmp)
    raise OSError(e.errno, e.strerror, path) from e
  return path
