"""Image grids for looking at data: one mosaic per figure (one imshow: fast), text per tile.

Recipe stage 1 is about looking: thousands of examples, the outliers at both ends of every
axis, the model's mispredictions. Each grid is rows of tiles with a caption above each tile and
an optional label at the start of each row; tiles are scaled with one value range per figure
(the declared range of the data) so that blank, dark or saturated images look it.
"""

from typing import Optional, Sequence

import numpy as np

from jrecipe.train.writer import save_figure_atomic


def _tiles(images: np.ndarray) -> np.ndarray:
  """[N, H, W] or [N, H, W, C] -> float [N, H, W, C'] with C' in (1, 3)."""
  x = np.nan_to_num(np.asarray(images, np.float64))
  if x.ndim == 3:
    x = x[..., None]
  if x.shape[-1] == 4:
    x = x[..., :3]
  if x.shape[-1] not in (1, 3):
    x = x.mean(axis=-1, keepdims=True)
  return x


def save_grid(path: str, rows: Sequence[Sequence[Optional[np.ndarray]]],
              captions: Sequence[Sequence[str]], *, title: str,
              row_labels: Optional[Sequence[str]] = None,
              value_range: Optional[tuple] = None, gap_after: Optional[int] = None) -> str:
  """Draws rows of images into one PNG and returns `path` (written via a temporary file).

  Args:
    path: output .png.
    rows: a list of rows, each a list of images ([H, W] or [H, W, C]) or None (empty tile).
    captions: text above each tile, same layout as `rows`.
    title: figure title.
    row_labels: text at the left of each row.
    value_range: (lo, hi) mapped to black..white; None: the min and max of all tiles.
    gap_after: leave an empty column after this many tiles of each row (e.g. lowest | highest).
  """
  from matplotlib.figure import Figure
  flat = [im for row in rows for im in row if im is not None]
  if not flat:
    return ""
  shapes = {np.shape(im)[:2] for im in flat}
  h = max(s[0] for s in shapes)
  w = max(s[1] for s in shapes)
  ch = 3 if any(np.ndim(im) == 3 and np.shape(im)[-1] in (3, 4) for im in flat) else 1
  if value_range is None:
    vals = np.concatenate([np.nan_to_num(np.asarray(im, np.float64)).ravel() for im in flat])
    value_range = (float(vals.min()), float(vals.max()))
  lo, hi = value_range
  span = (hi - lo) if hi > lo else 1.0
  ncols = max(len(r) for r in rows) + (1 if gap_after else 0)
  nrows = len(rows)
  pad_top, pad = max(h // 2, 4), max(1, h // 8)
  cell_h, cell_w = h + pad_top + pad, w + pad
  left_margin = 0
  mosaic = np.ones((nrows * cell_h, ncols * cell_w, ch))
  scale = 0.9 if h <= 10 else 1.0
  fig = Figure(figsize=(max(min(0.95 * scale * ncols + (1.6 if row_labels else 0.4), 24), 6.0),
                        min(1.05 * scale * nrows + 0.9, 40)))
  ax = fig.subplots()
  fontsize = 6 if ncols > 12 else 7
  for r, row in enumerate(rows):
    for c, im in enumerate(row):
      if im is None:
        continue
      col = c + (1 if gap_after and c >= gap_after else 0)
      tile = np.clip((_tiles(np.asarray(im)[None])[0] - lo) / span, 0, 1)
      if tile.shape[-1] != ch:
        tile = np.repeat(tile, ch, axis=-1)
      th, tw = tile.shape[:2]
      top, left = r * cell_h + pad_top, left_margin + col * cell_w
      mosaic[top:top + th, left:left + tw] = tile
      text = captions[r][c] if r < len(captions) and c < len(captions[r]) else ""
      if text:
        ax.text(left + w / 2, top - 0.4, text, ha="center", va="bottom", fontsize=fontsize)
  ax.imshow(mosaic[..., 0] if ch == 1 else mosaic, cmap="gray" if ch == 1 else None,
            vmin=0, vmax=1, interpolation="nearest")
  if row_labels:
    ax.set_yticks([r * cell_h + pad_top + h / 2 for r in range(nrows)])
    ax.set_yticklabels(list(row_labels), fontsize=7)
    ax.set_xticks([])
    for s in ax.spines.values():
      s.set_visible(False)
  else:
    ax.axis("off")
  fig.suptitle(title, fontsize=9, wrap=True)
  fig.tight_layout()
  return save_figure_atomic(fig, path)


def save_matrix(path: str, matrix: np.ndarray, *, title: str, labels: Sequence[str],
                xlabel: str, ylabel: str) -> str:
  """A heat map with the count in every cell (confusion matrices); returns `path`."""
  from matplotlib.figure import Figure
  m = np.asarray(matrix)
  k = len(m)
  fig = Figure(figsize=(min(1.0 + 0.45 * k, 14), min(0.8 + 0.45 * k, 14)))
  ax = fig.subplots()
  im = ax.imshow(np.log1p(m), cmap="Blues", interpolation="nearest")
  del im
  if k <= 30:
    for i in range(k):
      for j in range(k):
        if m[i, j]:
          ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                  color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(labels, fontsize=7, rotation=90 if k > 12 else 0)
    ax.set_yticklabels(labels, fontsize=7)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return save_figure_atomic(fig, path)
