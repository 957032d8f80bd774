"""Inline SVG charts for the report: line charts (linear or log y) and step histograms.

Plain string building, no matplotlib: a chart costs about a millisecond, so training can
write its report at the end of every run without a noticeable delay, and the page stays
one self-contained file that any browser opens.
"""

import math
from html import escape
from typing import Optional, Sequence

import numpy as np

PALETTE = ("#1f5fa8", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#c2255c",
           "#5c940d", "#364fc7", "#a61e4d", "#495057", "#087f5b")
MAX_POINTS = 1500


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
  """About n round numbers covering [lo, hi]."""
  if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
    return [lo]
  raw = (hi - lo) / max(n, 1)
  mag = 10 ** math.floor(math.log10(raw))
  step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
  first = math.ceil(lo / step) * step
  ticks, t = [], first
  while t <= hi + 1e-9 * step:
    ticks.append(round(t, 12))
    t += step
  return ticks


def _label(v: float) -> str:
  if v == 0:
    return "0"
  a = abs(v)
  if a >= 1e4 or a < 1e-3:
    return f"{v:.3g}"
  return f"{v:.4g}"


def _thin(x: np.ndarray, y: np.ndarray):
  if len(x) <= MAX_POINTS:
    return x, y
  idx = np.linspace(0, len(x) - 1, MAX_POINTS).astype(int)
  return x[idx], y[idx]


def _prepare(series: Sequence[dict], logy: bool) -> list:
  """(series, x, y, color) of every series with a finite point (log10 of y when logy)."""
  prepared = []
  for i, s in enumerate(series):
    x = np.asarray(s["x"], np.float64).ravel()
    y = np.asarray(s["y"], np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y) & ((y > 0) if logy else True)
    x, y = x[ok], y[ok]
    if len(x):
      prepared.append((s, *_thin(x, np.log10(y) if logy else y),
                       s.get("color", PALETTE[i % len(PALETTE)])))
  return prepared


def _span(lo: float, hi: float, logy: bool) -> tuple[float, float]:
  """A readable axis range around [lo, hi].

  A constant or near-constant series (e.g. a learning rate of 1e-3 read back through float32,
  which varies in its 8th digit) gets a range of +-10% around its value (half a decade on a
  log axis) instead of a range stretched over rounding noise, so it plots as a flat line
  whose tick labels differ.
  """
  scale = max(abs(lo), abs(hi))
  if hi - lo <= 1e-6 * scale or hi <= lo:
    mid = 0.5 * (lo + hi)
    half = 0.5 if logy or mid == 0 else 0.1 * abs(mid)
    return mid - half, mid + half
  return lo, hi


def _y_axis(prepared, hlines, band, logy: bool) -> tuple[float, float]:
  ys = np.concatenate([p[2] for p in prepared])
  extra = [math.log10(v) if logy else v for v in list(hlines) + list(band or ())
           if (v > 0 or not logy)]
  y0, y1 = _span(float(min([ys.min(), *extra])), float(max([ys.max(), *extra])), logy)
  pad = 0.04 * (y1 - y0)
  return y0 - pad, y1 + pad


def _grid(out: list, frame: dict, logy: bool) -> None:
  """Tick lines and labels of both axes."""
  L, T, pw, ph = frame["L"], frame["T"], frame["pw"], frame["ph"]
  px, py, (x0, x1), (y0, y1) = frame["px"], frame["py"], frame["x"], frame["y"]
  yt = nice_ticks(y0, y1)
  if logy:  # whole decades, unless the range holds fewer than two
    decades = [float(k) for k in range(math.ceil(y0), math.floor(y1) + 1)]
    yt = decades if len(decades) >= 2 else yt
  for t in yt:
    y = py(t)
    out.append(f'<line x1="{L}" x2="{L + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e9ecef"/>')
    lab = _label(10 ** t) if logy else _label(t)
    out.append(f'<text x="{L - 5}" y="{y + 4:.1f}" text-anchor="end">{lab}</text>')
  for t in nice_ticks(x0, x1, 8):
    x = px(t)
    out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{T}" y2="{T + ph}" stroke="#f1f3f5"/>')
    out.append(f'<text x="{x:.1f}" y="{T + ph + 14}" text-anchor="middle">{_label(t)}</text>')


def _marks(out: list, frame: dict, prepared, hlines, band, logy: bool) -> None:
  """The shaded band, reference lines, series and legend."""
  L, T, pw = frame["L"], frame["T"], frame["pw"]
  px, py, (y0, y1) = frame["px"], frame["py"], frame["y"]
  if band:
    lo, hi = (math.log10(b) if logy else b for b in band)
    lo, hi = max(lo, y0), min(hi, y1)
    if hi > lo:
      out.insert(2, f'<rect x="{L}" y="{py(hi):.1f}" width="{pw}" '
                 f'height="{py(lo) - py(hi):.1f}" fill="#2b8a3e" fill-opacity="0.08"/>')
  for v in hlines:
    if logy and v <= 0:
      continue
    y = py(math.log10(v) if logy else v)
    out.append(f'<line x1="{L}" x2="{L + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#868e96" '
               'stroke-dasharray="5,4"/>')
  for s, x, y, color in prepared:
    pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, y))
    dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
    out.append(f'<polyline fill="none" stroke="{color}" stroke-width="{s.get("width", 1.6)}"'
               f'{dash} points="{pts}"/>')
    if s.get("markers", len(x) <= 60):
      out.extend(f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="2.4" fill="{color}"/>'
                 for a, b in zip(x, y))
  for i, (s, _, _, color) in enumerate(prepared[:12]):
    ly = T + 12 + 14 * i
    out.append(f'<line x1="{L + pw - 150}" x2="{L + pw - 134}" y1="{ly - 4}" y2="{ly - 4}" '
               f'stroke="{color}" stroke-width="2.5"/><text x="{L + pw - 130}" y="{ly}">'
               f'{escape(str(s.get("label", "")))[:28]}</text>')


def line_chart(series: Sequence[dict], *, title: str = "", xlabel: str = "epoch",
               ylabel: str = "", logy: bool = False, band: Optional[tuple] = None,
               hlines: Sequence[float] = (), width: int = 560,
               height: int = 300) -> Optional[str]:
  """An SVG line chart.

  Args:
    series: dicts with 'label', 'x', 'y' and optional 'color', 'width' (stroke), 'dash',
      'markers' (bool).
    title, xlabel, ylabel: text.
    logy: log10 y axis (non-positive values are dropped).
    band: (low, high) y range shaded green (e.g. the healthy update-ratio band).
    hlines: dashed horizontal reference lines.

  Returns:
    The `<svg>` element, or None when no series has a finite point.
  """
  prepared = _prepare(series, logy)
  if not prepared:
    return None
  xs = np.concatenate([p[1] for p in prepared])
  x0, x1 = float(xs.min()), float(xs.max())
  if x1 <= x0:
    x0, x1 = x0 - 0.5, x1 + 0.5
  y0, y1 = _y_axis(prepared, hlines, band, logy)
  L, R, T, B = 62, 14, 26 if title else 10, 38
  pw, ph = width - L - R, height - T - B
  frame = {"L": L, "T": T, "pw": pw, "ph": ph, "x": (x0, x1), "y": (y0, y1),
           "px": lambda v: L + (v - x0) / (x1 - x0) * pw,
           "py": lambda v: T + (1 - (v - y0) / (y1 - y0)) * ph}
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
         f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="#fff" stroke="#adb5bd"/>']
  if title:
    out.append(f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">'
               f'{escape(title)}</text>')
  _grid(out, frame, logy)
  _marks(out, frame, prepared, hlines, band, logy)
  out.append(f'<text x="{L + pw / 2}" y="{height - 6}" text-anchor="middle">'
             f'{escape(xlabel)}</text>')
  out.append(f'<text transform="translate(13,{T + ph / 2}) rotate(-90)" text-anchor="middle">'
             f'{escape(ylabel + (" (log scale)" if logy else ""))}</text></svg>')
  return "".join(out)


def histogram_chart(hists: Sequence[dict], *, title: str = "", width: int = 260,
                    height: int = 190) -> Optional[str]:
  """Step histograms (dicts with 'edges', 'counts', 'label', optional 'color'), normalised."""
  series = []
  for i, h in enumerate(hists):
    e = np.asarray(h["edges"], np.float64)
    c = np.asarray(h["counts"], np.float64)
    if len(e) != len(c) + 1 or not len(c):
      continue
    c = c / max(c.sum(), 1)
    x = np.repeat(e, 2)[1:-1]
    y = np.repeat(c, 2)
    series.append({"label": h.get("label", ""), "x": x, "y": y, "markers": False,
                   "color": h.get("color", PALETTE[i % len(PALETTE)])})
  if not series:
    return None
  return line_chart(series, title=title, xlabel="value", ylabel="fraction", width=width,
                    height=height)


def scatter_chart(x, y, *, title: str = "", xlabel: str = "target",
                  ylabel: str = "prediction", size: int = 300) -> Optional[str]:
  """Prediction against target with the diagonal (regression)."""
  x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
  if not len(x):
    return None
  lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
  diag = {"label": "y = x", "x": [lo, hi], "y": [lo, hi], "color": "#adb5bd", "dash": "4,3",
          "markers": False}
  pts = {"label": "examples", "x": x, "y": y, "width": 0, "markers": True}
  return line_chart([diag, pts], title=title, xlabel=xlabel, ylabel=ylabel, width=size,
                    height=size)
