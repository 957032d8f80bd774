"""Pictures of the model during training, drawn with numpy (no matplotlib: milliseconds each).

- First-layer weights as an image grid (CS231n: 'visualize the first-layer weights'; noisy
  filters after training mean too little regularisation or a learning rate too high).
- Prediction dynamics (the recipe's 'visualize prediction dynamics'): the model's predicted
  probabilities on one fixed test batch after every evaluation. Classification: one row per
  example, one cell per class, green = probability on the true class, red = probability on a
  wrong class. Sequences: one cell per time step (probability of the true token).
  Regression: a 2-D histogram of prediction against target, with the diagonal in blue.
"""

import os
from typing import Any, Optional

import numpy as np

from jrecipe import storage

MAX_TILES = 64


def first_layer_kernel(params) -> tuple[Optional[str], Any]:
  """(name, leaf) of the first 'kernel' leaf in the model's layer order (dict order)."""

  def walk(tree, prefix):
    if isinstance(tree, dict) or hasattr(tree, "items"):
      for k, v in tree.items():
        found = walk(v, f"{prefix}/{k}" if prefix else str(k))
        if found[0] is not None:
          return found
      return None, None
    if prefix.endswith("kernel"):
      return prefix, tree
    return None, None

  return walk(params, "")


def _tiles(kernel: np.ndarray, input_shape: tuple) -> np.ndarray:
  """[N, h, w, c] tiles (c is 1 or 3) of a first-layer kernel."""
  k = np.asarray(kernel, np.float32)
  if k.ndim == 4:  # conv2d [kh, kw, cin, cout]
    t = np.transpose(k, (3, 0, 1, 2))
    if t.shape[-1] not in (1, 3):
      t = t.mean(-1, keepdims=True)
    return t
  if k.ndim == 3:  # conv1d [k, cin, cout]
    return np.transpose(k.mean(1), (1, 0))[:, None, :, None]
  if k.ndim == 2:
    fan_in, n = k.shape
    shape = tuple(input_shape)
    if int(np.prod(shape)) == fan_in and len(shape) >= 2:
      h, w = shape[0], shape[1]
      c = fan_in // (h * w)
      t = k.T.reshape(n, h, w, c)
      return t if c in (1, 3) else t.mean(-1, keepdims=True)
    return k.T[:, None, :, None]
  return k.reshape(1, 1, -1, 1)


def _grid(tiles: np.ndarray, min_px: int = 24) -> np.ndarray:
  tiles = tiles[:MAX_TILES]
  n, h, w, c = tiles.shape
  lo = tiles.reshape(n, -1).min(1)[:, None, None, None]
  hi = tiles.reshape(n, -1).max(1)[:, None, None, None]
  tiles = (tiles - lo) / np.maximum(hi - lo, 1e-12)  # each filter on its own scale
  scale = max(1, int(np.ceil(min_px / max(h, w))))
  tiles = np.repeat(np.repeat(tiles, scale, 1), scale, 2)
  h, w = h * scale, w * scale
  cols = int(np.ceil(np.sqrt(n))) if h > 1 else 1
  rows = int(np.ceil(n / cols))
  out = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.float32)
  for i in range(n):
    r, q = divmod(i, cols)
    out[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = tiles[i]
  if c == 1:
    out = np.repeat(out, 3, -1)
  return (out * 255).astype(np.uint8)


def filter_grid(kernel: np.ndarray, input_shape: tuple) -> np.ndarray:
  """An HWC uint8 image of (up to 64 of) the first layer's filters, each min-max scaled."""
  return _grid(_tiles(kernel, input_shape))


def _cells(values_rgb: np.ndarray, cell: int = 10) -> np.ndarray:
  img = np.repeat(np.repeat(values_rgb, cell, 0), cell, 1)
  img[::cell] = 0.25
  img[:, ::cell] = 0.25
  return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _true_token_probs(p: np.ndarray, y: np.ndarray) -> bool:
  """Whether `probs` already hold the probability of the true label (sequences: [N, T] for
  [N, T] labels), rather than one probability per class ([N, C] for [N] labels)."""
  return p.shape == y.shape


def prediction_image(record: dict) -> np.ndarray:
  """An HWC uint8 image of one evaluation's predictions (see the module docstring)."""
  if "probs" in record:
    p = np.asarray(record["probs"], np.float32)
    y = np.asarray(record["y"]).astype(int)
    rgb = np.zeros(p.shape + (3,), np.float32)
    if not _true_token_probs(p, y):  # [N, C]
      true = np.zeros_like(p, bool)
      true[np.arange(len(y)), y] = True
      rgb[..., 1] = np.where(true, p, 0)
      rgb[..., 0] = np.where(true, 0, p)
    else:  # [N, T]: probability of the true token per step
      rgb[..., 1] = p
      rgb[..., 0] = 1 - p
    return _cells(rgb)
  pred = np.asarray(record["pred"], np.float32).ravel()
  target = np.asarray(record["y"], np.float32).ravel()
  lo = float(min(pred.min(), target.min()))
  hi = float(max(pred.max(), target.max(), lo + 1e-6))
  h, _, _ = np.histogram2d(pred, target, bins=32, range=[[lo, hi], [lo, hi]])
  h = h[::-1] / max(h.max(), 1)
  rgb = np.stack([h, h, h], -1)
  idx = np.arange(32)
  rgb[31 - idx, idx, 2] = np.maximum(rgb[31 - idx, idx, 2], 0.6)
  return _cells(rgb, cell=4)


def prediction_record(outputs: np.ndarray, y: np.ndarray, task: str, loss_expects: str) -> dict:
  """What to keep of one evaluation on the fixed batch: probabilities or predictions."""
  outputs = np.asarray(outputs, np.float64)
  if task in ("classification", "sequence") and loss_expects in ("logits", "scores"):
    z = outputs - outputs.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    if task == "sequence":
      y_i = np.asarray(y).astype(int)
      p = np.take_along_axis(p, y_i[..., None], -1)[..., 0]
    return {"probs": np.round(p, 4).tolist(), "y": np.asarray(y).tolist()}
  return {"pred": np.round(outputs.reshape(len(outputs), -1), 5).tolist(),
          "y": np.asarray(y, np.float64).reshape(len(outputs), -1).tolist()}


def dynamics_image(records: list[dict]) -> Optional[np.ndarray]:
  """Rows = examples, columns = evaluations: probability of the true class (green) or of
  the rest (red); for sequences, its mean over the time steps. None for regression."""
  cols = []
  for r in records:
    if "probs" not in r or np.ndim(r["probs"]) != 2:
      return None
    p = np.asarray(r["probs"], np.float32)
    y = np.asarray(r["y"]).astype(int)
    cols.append(p.mean(1) if _true_token_probs(p, y) else p[np.arange(len(y)), y])
  if not cols:
    return None
  m = np.stack(cols, 1)
  rgb = np.stack([1 - m, m, np.zeros_like(m)], -1)
  return _cells(rgb, cell=8)


def encode_png(image_hwc: np.ndarray) -> bytes:
  """PNG bytes of an HWC uint8 image (fast compression: these are small pictures)."""
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image_hwc, np.uint8)).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def save_png(path: str, image_hwc: np.ndarray) -> bytes:
  """Writes a PNG atomically (tmp + rename); returns its bytes."""
  data = encode_png(image_hwc)
  storage.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  with storage.open(tmp, "wb") as f:
    f.write(data)
  storage.replace(tmp, path)
  return data
