"""The zoo's data: a user's data function (`data.name='jrecipe.zoo.data:<name>'`, returning
numpy arrays per split, docs/your_data.md) and augmentation functions (`data.augment.fn=
'jrecipe.zoo.data:<name>'`, `fn(x, y, rng) -> (x, y)`), one correct twin and one per bug.

The data functions are the numpy code users write around scikit-learn's 8x8 digits: a fixed
shuffle, a 70/15/15 split, and the planted mistake in the preprocessing or the split.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=1)
def _digits():
  from sklearn.datasets import load_digits
  d = load_digits()
  order = np.random.default_rng(0).permutation(len(d.target))
  return d.images[order][..., None].astype(np.float32), d.target[order].astype(np.int32)


def _splits(x, y, train=None):
  a, b = int(0.7 * len(y)), int(0.85 * len(y))
  return {"train": train or (x[:a], y[:a]), "validation": (x[a:b], y[a:b]),
          "test": (x[b:], y[b:]), "num_classes": 10, "task": "classification"}


def digits():
  """The correct twin: raw pixels 0..16 (jrecipe's data.normalize standardises them)."""
  return _splits(*_digits())


def digits_unit():
  """The correct twin with data.normalize=False: pixels scaled to [0, 1] by the user."""
  x, y = _digits()
  return _splits(x / 16.0, y)


def _train(x, y):
  a = int(0.7 * len(y))
  return x[:a], y[:a]


def labels_shuffled():
  """The training labels shuffled on their own (np.random.shuffle(y) beside x)."""
  x, y = _digits()
  xt, yt = _train(x, y)
  return _splits(x, y, train=(xt, np.random.default_rng(1).permutation(yt)))


def labels_shifted():
  """Labels one example out of step with their inputs (np.roll after a sort)."""
  x, y = _digits()
  xt, yt = _train(x, y)
  return _splits(x, y, train=(xt, np.roll(yt, 1)))


def test_in_train():
  """The test split concatenated into the training split ('use all the data')."""
  x, y = _digits()
  xt, yt = _train(x, y)
  b = int(0.85 * len(y))
  return _splits(x, y, train=(np.concatenate([xt, x[b:]]), np.concatenate([yt, y[b:]])))


def integer_division():
  """uint8 pixels divided with // by 255: every input becomes 0."""
  x, y = _digits()
  return _splits((x.astype(np.uint8) // 255).astype(np.float32), y)


def per_pixel_std():
  """Per-pixel standardisation: the always-blank border pixels divide 0 by a std of 0."""
  x, y = _digits()
  with np.errstate(invalid="ignore", divide="ignore"):
    x = (x - x.mean(axis=0)) / x.std(axis=0)
  return _splits(x.astype(np.float32), y)


def pixels_0_255():
  """Pixels rescaled to 0..255 and, with data.normalize=False, never standardised."""
  x, y = _digits()
  return _splits(x * (255.0 / 16.0), y)


def first_example_everywhere():
  """Every training input overwritten by the first one (a loop that reuses its variable)."""
  x, y = _digits()
  xt, yt = _train(x, y)
  return _splits(x, y, train=(np.broadcast_to(xt[:1], xt.shape).copy(), yt))


def _held_out(fn):
  """The twin's splits with `fn(x, y) -> (x, y)` applied to validation and test only."""
  out = digits()
  for split in ("validation", "test"):
    out[split] = fn(*out[split])
  return out


def heldout_unscaled():
  """Training pixels divided by 16 (the digits' maximum), the held-out splits left at 0..16:
  the scaling written in the training branch of the loader only."""
  out = _held_out(lambda x, y: (x, y))
  x, y = out["train"]
  out["train"] = (x / 16.0, y)
  return out


def heldout_transposed():
  """The held-out images read as [N, W, H, C] (another loader, another layout)."""
  return _held_out(lambda x, y: (x.transpose(0, 2, 1, 3), y))


def heldout_labels_shifted():
  """Held-out labels one class off ((y + 1) % 10): a class map that differs in that split."""
  return _held_out(lambda x, y: (x, ((y + 1) % 10).astype(y.dtype)))


def split_before_shuffle():
  """The 70/15/15 split taken from the examples sorted by label, shuffled only afterwards."""
  x, y = _digits()
  order = np.argsort(y, kind="stable")
  return _splits(x[order], y[order])


# --- augmentations: fn(x, y, rng) -> (x, y), inside the jitted train step ---------------------

def shift_one_pixel(x, y, rng):
  """The correct twin: a random shift of up to one pixel (edge-padded crop)."""
  dx, dy = jax.random.randint(rng, (2,), -1, 2)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  return jax.lax.dynamic_slice(padded, (0, 1 + dy, 1 + dx, 0), x.shape), y


def vertical_flip(x, y, rng):
  """Flips half of the batch upside down with the labels unchanged (a 6 becomes a 9)."""
  flip = jax.random.bernoulli(rng, 0.5, (x.shape[0],))
  return jnp.where(flip[:, None, None, None], x[:, ::-1], x), y


def rotate_90(x, y, rng):
  """Rotates half of the batch by 90 degrees, labels unchanged."""
  turn = jax.random.bernoulli(rng, 0.5, (x.shape[0],))
  return jnp.where(turn[:, None, None, None], jnp.rot90(x, axes=(1, 2)), x), y


def shift_fixed_key(x, y, rng):
  """The twin's shift drawn from PRNGKey(0) instead of the step's key: the same every step."""
  del rng
  return shift_one_pixel(x, y, jax.random.PRNGKey(0))


def noise_drowns_signal(x, y, rng):
  """Gaussian noise of std 10 on standardised inputs (meant 0.1): the digit is gone."""
  return x + 10.0 * jax.random.normal(rng, x.shape, x.dtype), y
