"""Images in a terminal: Unicode upper half blocks with 24-bit colour, two pixels per cell.

Each character cell shows two image rows: the foreground colour paints the upper half
('▀'), the background colour the lower half, so a pixel is about square on a usual
terminal font. Works over SSH in any terminal with true colour (xterm, tmux, iTerm2,
GNOME Terminal, Windows Terminal, VS Code).
"""

import numpy as np

UPPER_HALF = "\u2580"
RESET = "\x1b[0m"


def to_rgb(x: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
  """[H, W, C] (or [H, W]) image -> uint8 [H, W, 3], scaled from `value_range` to 0..255."""
  x = np.asarray(x, np.float64)
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3:
    raise ValueError(f"expected an [H, W, C] image, got shape {x.shape}")
  lo, hi = float(value_range[0]), float(value_range[1])
  scaled = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
  scaled = np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)
  if scaled.shape[-1] >= 3:
    return scaled[..., :3]
  return np.repeat(scaled[..., :1], 3, axis=-1)


def auto_scale(width: int, target_columns: int = 32) -> int:
  """Columns per pixel so the image is about `target_columns` wide (at least 1)."""
  return max(1, int(round(target_columns / max(width, 1))))


def half_blocks(rgb: np.ndarray, scale: int = 1, indent: int = 2) -> list[str]:
  """Lines of ANSI text drawing `rgb` [H, W, 3] uint8, each pixel `scale` x `scale` cells/2."""
  img = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
  if img.shape[0] % 2:
    img = np.concatenate([img, np.zeros_like(img[:1])], axis=0)
  lines = []
  for r in range(0, img.shape[0], 2):
    top, bottom = img[r], img[r + 1]
    cells = []
    for (r1, g1, b1), (r2, g2, b2) in zip(top.tolist(), bottom.tolist()):
      cells.append(f"\x1b[38;2;{r1};{g1};{b1}m\x1b[48;2;{r2};{g2};{b2}m{UPPER_HALF}")
    lines.append(" " * indent + "".join(cells) + RESET)
  return lines
