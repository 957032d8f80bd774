"""Per-example statistics, class counts and corrupt records: 'become one with the data'.

Recipe stage 1 asks for code that can 'search, filter and sort by anything' because outliers
along any axis almost always reveal bugs in data quality or preprocessing. This module turns
every example into one row of numbers (label, mean, std, min, max, norm and, for images, a few
cheap descriptors) and flags the records that cannot be right: non-finite values, constant
inputs, values outside the declared range, a shape unlike the others, labels outside the
declared classes. Everything is vectorised over examples, in chunks (bounded memory).
"""

from typing import Optional, Sequence

import numpy as np

CHUNK = 4096  # examples per vectorised chunk: about 13 MB of float32 for 28x28 images

# Columns computed for every example; IMAGE_COLUMNS only for images.
BASE_COLUMNS = ("mean", "std", "min", "max", "norm", "non_finite")
IMAGE_COLUMNS = ("ink", "com_row", "com_col", "edge")
COLUMN_DOCS = {
    "mean": "mean of the finite input values as stored",
    "std": "standard deviation of the finite input values",
    "min": "smallest finite input value",
    "max": "largest finite input value",
    "norm": "L2 norm of the (finite) input values",
    "non_finite": "number of NaN or infinite values",
    "ink": "fraction of pixels above 10% of the declared range (foreground share)",
    "com_row": "intensity centre of mass, row, 0 (top) .. 1 (bottom)",
    "com_col": "intensity centre of mass, column, 0 (left) .. 1 (right)",
    "edge": "mean absolute difference of neighbouring pixels / range (sharpness or noise)",
}


def is_image(x_shape: Sequence[int], task: str = "classification") -> bool:
  """Whether examples of shape [H, W] or [H, W, C] (C in 1, 3, 4) are pictures worth drawing."""
  if task == "sequence":
    return False
  shape = tuple(x_shape)
  if len(shape) == 2:
    return min(shape) >= 4
  return len(shape) == 3 and shape[-1] in (1, 3, 4) and min(shape[:2]) >= 4


def as_images(x: np.ndarray) -> np.ndarray:
  """[N, H, W] or [N, H, W, C] -> float32 [N, H, W] (channels averaged), non-finite -> 0."""
  x = np.asarray(x, np.float32)
  if x.ndim == 4:
    x = x.mean(axis=-1)
  return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def example_stats(x: np.ndarray, *, image: bool, value_range: tuple) -> dict[str, np.ndarray]:
  """Per-example statistics of inputs as stored.

  Args:
    x: [N, ...] inputs (any numeric dtype).
    image: whether to add the image descriptors (ink, centre of mass, edge energy).
    value_range: (lo, hi) declared range of the values (scales 'ink' and 'edge').

  Returns:
    column name -> float64 [N] (non_finite is an int64 count). Statistics of an example
    without any finite value are NaN.
  """
  n = len(x)
  cols = {c: np.empty(n, np.float64) for c in BASE_COLUMNS + (IMAGE_COLUMNS if image else ())}
  cols["non_finite"] = np.zeros(n, np.int64)
  lo, hi = float(value_range[0]), float(value_range[1])
  span = hi - lo if hi > lo else 1.0
  for start in range(0, n, CHUNK):
    xb = np.asarray(x[start:start + CHUNK])
    flat = xb.reshape(len(xb), -1).astype(np.float64)
    finite = np.isfinite(flat)
    count = finite.sum(axis=1)
    z = np.where(finite, flat, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
      mean = z.sum(axis=1) / count
      var = np.where(finite, (flat - mean[:, None]) ** 2, 0.0).sum(axis=1) / count
    sl = slice(start, start + len(xb))
    cols["mean"][sl] = mean
    cols["std"][sl] = np.sqrt(var)
    cols["min"][sl] = np.where(count > 0, np.where(finite, flat, np.inf).min(axis=1), np.nan)
    cols["max"][sl] = np.where(count > 0, np.where(finite, flat, -np.inf).max(axis=1), np.nan)
    cols["norm"][sl] = np.sqrt((z * z).sum(axis=1))
    cols["non_finite"][sl] = flat.shape[1] - count
    if image:
      img = (as_images(xb).astype(np.float64) - lo) / span  # [B, H, W] in ~[0, 1]
      h, w = img.shape[1:]
      cols["ink"][sl] = (img > 0.1).mean(axis=(1, 2))
      mass = np.clip(img, 0, None)
      total = mass.sum(axis=(1, 2))
      rows = (np.arange(h) + 0.5) / h
      colv = (np.arange(w) + 0.5) / w
      with np.errstate(invalid="ignore", divide="ignore"):
        cols["com_row"][sl] = np.where(total > 0, (mass.sum(axis=2) * rows).sum(axis=1) / total,
                                       0.5)
        cols["com_col"][sl] = np.where(total > 0, (mass.sum(axis=1) * colv).sum(axis=1) / total,
                                       0.5)
      dy = np.abs(np.diff(img, axis=1)).mean(axis=(1, 2)) if h > 1 else 0.0
      dx = np.abs(np.diff(img, axis=2)).mean(axis=(1, 2)) if w > 1 else 0.0
      cols["edge"][sl] = (dy + dx) / 2
  return cols


def corrupt_masks(x: np.ndarray, stats: dict, *, value_range: Optional[tuple],
                  wrong_shape: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
  """Boolean [N] masks of the records that cannot be right.

  non_finite: any NaN/inf value; constant: every finite value equal (a blank, zeroed or
  overwritten image; sequences too); out_of_range: a finite value below value_range[0] or above
  value_range[1] (None: not checked); wrong_shape: as passed by the caller.
  """
  n = len(x)
  masks = {
      "non_finite": stats["non_finite"] > 0,
      "constant": np.nan_to_num(stats["std"], nan=0.0) == 0.0,
      "out_of_range": np.zeros(n, bool),
      "wrong_shape": np.zeros(n, bool) if wrong_shape is None else np.asarray(wrong_shape, bool),
  }
  if value_range is not None and n:
    lo, hi = float(value_range[0]), float(value_range[1])
    masks["out_of_range"] = (np.nan_to_num(stats["min"], nan=lo) < lo) | (
        np.nan_to_num(stats["max"], nan=hi) > hi)
  masks["constant"] &= ~masks["wrong_shape"]
  return masks


def label_masks(y: np.ndarray, task: str, num_classes: Optional[int]) -> np.ndarray:
  """Boolean [N]: the example's label (any token of it, for sequences) is not a declared class.

  Classification and sequence labels must be integers in [0, num_classes); regression targets
  must be finite.
  """
  y = np.asarray(y)
  n = len(y)
  if n == 0:
    return np.zeros(0, bool)
  flat = y.reshape(n, -1)
  if task == "regression" or not num_classes:
    return ~np.isfinite(flat.astype(np.float64)).all(axis=1)
  f = flat.astype(np.float64)
  bad = ~np.isfinite(f) | (f != np.round(f)) | (f < 0) | (f >= num_classes)
  return bad.any(axis=1)


def class_counts(y: np.ndarray, num_classes: Optional[int]) -> dict:
  """Counts per declared class and the imbalance ratio (largest / smallest class count).

  For sequence labels every token counts. The ratio is None when a class has no example
  (the classes are then listed under 'missing').
  """
  y = np.asarray(y)
  if not num_classes:
    return {}
  f = y.ravel().astype(np.float64)
  ok = np.isfinite(f) & (f >= 0) & (f < num_classes) & (f == np.round(f))
  counts = np.bincount(f[ok].astype(np.int64), minlength=num_classes)
  out = {"count": int(len(y)), "class_counts": counts.tolist(),
         "missing": [int(c) for c in np.flatnonzero(counts == 0)]}
  if counts.sum():
    out["majority_class"] = int(np.argmax(counts))
    out["minority_class"] = int(np.argmin(counts))
    out["imbalance_ratio"] = (float(counts.max() / counts.min()) if counts.min() > 0 else None)
  return out
