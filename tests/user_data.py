"""The worked example of docs/your_data.md: your own data and augmentation in one short file."""

import jax
import jax.numpy as jnp
import numpy as np


def load():
  """scikit-learn's 8x8 digits as numpy arrays per split (a fixed shuffle, 70/15/15)."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  x = digits.images[..., None].astype(np.float32)  # [N, 8, 8, 1], values 0..16
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  x, y = x[order], y[order]
  a, b = int(0.7 * len(y)), int(0.85 * len(y))
  return {"train": (x[:a], y[:a]), "validation": (x[a:b], y[a:b]), "test": (x[b:], y[b:]),
          "num_classes": 10, "task": "classification"}


# A digit turned upside down: 0, 1 and 8 stay themselves, 6 and 9 swap; other digits stay put.
_ROT180 = jnp.array([0, 1, -1, -1, -1, -1, 9, -1, 8, 6])


def rotate_with_label(x, y, rng):
  """Turns half of the turnable digits by 180 degrees, and their labels with them."""
  target = _ROT180[y]
  turn = (jax.random.uniform(rng, y.shape) < 0.5) & (target >= 0)
  x = jnp.where(turn[:, None, None, None], x[:, ::-1, ::-1, :], x)
  return x, jnp.where(turn, target, y).astype(y.dtype)


# --- bad inputs (tests/test_foreign_models.py): each is one paragraph and exit 2 -------------

def mismatched():
  out = load()
  x, y = out["validation"]
  out["validation"] = (x, y[:-3])
  return out


def crop_to_six(x, y, rng):
  del rng
  return x[:, 1:-1, 1:-1, :], y
