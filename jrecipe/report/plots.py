"""The report's charts, drawn from a work directory's records as inline SVG (`svg.py`).

Epochs on every x-axis ('training loss per step and train/validation loss per epoch, with
epochs on the x-axis').
"""

from typing import Optional

import numpy as np

from jrecipe.report import svg

COLORS = {"train": "#a5c3e8", "train_epoch": "#1f5fa8", "validation": "#d9480f",
          "validation_ema": "#2b8a3e"}


def _series(records: list, key: str, steps_per_epoch: Optional[float]):
  xs, ys = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      x = r.get("epoch")
      if x is None and steps_per_epoch:
        x = r["step"] / steps_per_epoch
      if x is not None:
        xs.append(float(x))
        ys.append(float(v))
  return np.asarray(xs), np.asarray(ys)


def steps_per_epoch(records: dict) -> Optional[float]:
  """Steps per epoch, from any record that has both a step and an epoch."""
  for split in ("train", "validation", "train_epoch", "monitor"):
    for r in records.get(split, []):
      if r.get("epoch") and r.get("step"):
        return r["step"] / r["epoch"]
  return None


def curve(records: dict, key: str, *, logy: bool = False, per_step=None,
          title: str = "") -> Optional[str]:
  """`key` against epochs for the train/train_epoch/validation(/EMA) splits; None if absent."""
  spe = steps_per_epoch(records)
  series = []
  if per_step is not None and len(per_step[0]) and spe:
    series.append({"label": "train (per step)", "x": np.asarray(per_step[0]) / spe,
                   "y": per_step[1], "color": COLORS["train"], "width": 1, "markers": False})
  for split in ("train", "train_epoch", "validation", "validation_ema"):
    if split == "train" and series:
      continue
    xs, ys = _series(records.get(split, []), key, spe)
    if len(xs):
      series.append({"label": split, "x": xs, "y": ys, "color": COLORS[split],
                     "dash": "5,3" if split == "validation_ema" else None})
  return svg.line_chart(series, title=title or key, ylabel=key, logy=logy)


def prefixed(records: list, prefix: str, spe, *, title: str, logy: bool = False,
             band: Optional[tuple] = None, hlines=(), max_lines: int = 12) -> Optional[str]:
  """Every `prefix<name>` key of `records` against epochs (one line per name)."""
  names = []
  for r in records:
    for k in r:
      if k.startswith(prefix) and k not in names:
        names.append(k)
  series = []
  for k in names[:max_lines]:
    xs, ys = _series(records, k, spe)
    if len(xs):
      series.append({"label": k[len(prefix):], "x": xs, "y": ys})
  return svg.line_chart(series, title=title, ylabel=prefix.rstrip("/"), logy=logy, band=band,
                        hlines=hlines)


def histograms(hist_records: list, kind: str, max_layers: int = 6) -> list[str]:
  """First vs last histogram of each layer (activations) or leaf (gradients)."""
  if not hist_records:
    return []
  first, last = hist_records[0], hist_records[-1]
  out = []
  for name in list(first.get(kind, {}))[:max_layers]:
    hs = []
    for rec, color in ((first, "#868e96"), (last, "#1f5fa8")):
      h = rec.get(kind, {}).get(name)
      if h:
        hs.append({**h, "label": f"step {rec.get('step')}", "color": color})
      if last is first:
        break
    chart = svg.histogram_chart(hs, title=name)
    if chart:
      out.append(chart)
  return out


def regression_scatter(record: dict) -> Optional[str]:
  """Prediction against target on the fixed batch (regression runs)."""
  if "pred" not in record:
    return None
  return svg.scatter_chart(record["y"], record["pred"], title=f"step {record.get('step')}")
