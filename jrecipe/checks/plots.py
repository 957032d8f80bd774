"""Small PNG figures for the checks: dependency heatmaps and line plots.

Drawn with matplotlib's Agg canvas directly (`matplotlib.figure.Figure`), never through
pyplot, so the checks neither open windows nor change the process's global backend. The
figures are the "visualize" half of a check: the number in the `CheckResult` says pass or
fail, the picture shows where (e.g. which example of a batch leaks into which).
"""

import textwrap
from typing import Mapping, Optional, Sequence, Union

import numpy as np


def _figure(ncols: int, width: float = 4.0, height: float = 3.6):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width * ncols, height))
  FigureCanvasAgg(fig)
  return fig


def heatmap(path: str, matrices: Union[np.ndarray, Mapping[str, np.ndarray]], *,
            title: str = "", xlabel: str = "", ylabel: str = "", log: bool = True,
            floor: float = 1e-12, colorbar_label: str = "",
            boundary: Optional[int] = None) -> str:
  """Saves one heatmap per matrix, side by side, as a PNG.

  Recipe step: "use backprop to chart dependencies": the batch (BxB) and causal (TxT)
  dependency matrices are easiest to read as pictures: a correct model is a clean diagonal
  (batch) or lower triangle (causal).

  Args:
    path: the PNG file to write (its directory must exist).
    matrices: a 2-D array, or panel title -> 2-D array (one panel each).
    title: the figure's title.
    xlabel, ylabel: axis labels shared by the panels.
    log: plot log10(max(value, floor)) so that exact zeros and 1e-8 leaks look different.
    floor: the smallest value shown on the log scale.
    colorbar_label: the colour bar's label (defaults to 'log10(value)' or 'value').
    boundary: draw the edge of the allowed lower triangle {(row s, column t): t <= s +
      boundary} in red (0: causal with the current step, -1: strictly causal).

  Returns:
    `path`.
  """
  if not isinstance(matrices, Mapping):
    matrices = {"": matrices}
  shown = {name: np.asarray(m, np.float64) for name, m in matrices.items()}
  if log:
    shown = {name: np.log10(np.maximum(m, floor)) for name, m in shown.items()}
  # One colour scale for every panel, so that panels compare at a glance.
  vmin = min(float(np.min(m)) for m in shown.values())
  vmax = max(float(np.max(m)) for m in shown.values())
  fig = _figure(len(shown))
  for k, (name, m) in enumerate(shown.items()):
    ax = fig.add_subplot(1, len(shown), k + 1)
    im = ax.imshow(m, cmap="viridis", interpolation="nearest", vmin=vmin,
                   vmax=max(vmax, vmin + 1e-12))
    ax.set_title(name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if m.shape[0] <= 16 and m.shape[1] <= 16:
      ax.set_xticks(range(m.shape[1]))
      ax.set_yticks(range(m.shape[0]))
    if boundary is not None:
      for row in range(m.shape[0]):
        edge = row + boundary + 0.5
        ax.plot([edge, edge], [row - 0.5, row + 0.5], color="red", linewidth=1.5)
        ax.plot([edge, edge + 1], [row + 0.5, row + 0.5], color="red", linewidth=1.5)
      ax.set_xlim(-0.5, m.shape[1] - 0.5)
      ax.set_ylim(m.shape[0] - 0.5, -0.5)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label(colorbar_label or ("log10(value)" if log else "value"))
  if title:
    fig.suptitle(textwrap.fill(title, width=45 * len(shown)), fontsize="medium")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def line_plot(path: str, series: Mapping[str, tuple], *, title: str = "", xlabel: str = "",
              ylabel: str = "", logx: bool = False, logy: bool = False,
              hlines: Optional[Sequence[float]] = None) -> str:
  """Saves a small line plot (one line per named series) as a PNG.

  Recipe step: babysitting and gradient checks ("print raw gradients", "try other h"): a
  quantity against a parameter, e.g. the relative error against the step h.

  Args:
    path: the PNG file to write (its directory must exist).
    series: label -> (x values, y values).
    title, xlabel, ylabel: text of the figure.
    logx, logy: logarithmic axes.
    hlines: y values drawn as dashed horizontal reference lines (e.g. thresholds).

  Returns:
    `path`.
  """
  fig = _figure(1, width=5.0, height=3.6)
  ax = fig.add_subplot(1, 1, 1)
  for label, (xs, ys) in series.items():
    ax.plot(np.asarray(xs), np.asarray(ys), marker="o", markersize=3, label=label)
  for y in hlines or ():
    ax.axhline(y, linestyle="--", color="gray", linewidth=0.8)
  if logx:
    ax.set_xscale("log")
  if logy:
    ax.set_yscale("log")
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if len(series) > 1:
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path
