"""The worked examples of docs/your_data.md: your own data and augmentation in one short file.

The same digits three ways: numpy arrays per split (`load`), grain data sources over
ArrayRecord files (`load_array_records`) and a TFDS builder class (`DigitsBuilder`).
"""

import os
import tempfile

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds


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


# --- grain data sources over ArrayRecord files: one record per example --------------------------

def write_array_records(directory: str) -> None:
  """Writes `load()`'s splits as ArrayRecord files: int32 label, then the float32 image."""
  from array_record.python.array_record_module import ArrayRecordWriter
  os.makedirs(directory, exist_ok=True)
  for split, (x, y) in _splits(load()):
    writer = ArrayRecordWriter(os.path.join(directory, f"{split}.array_record"), "group_size:1")
    for image, label in zip(x, y):
      writer.write(np.int32(label).tobytes() + image.tobytes())
    writer.close()


def _splits(out):
  return [(s, out[s]) for s in ("train", "validation", "test")]


def parse(record: bytes) -> dict:
  """One record back into {'image': [8, 8, 1] float32, 'label': int32}."""
  return {"label": np.frombuffer(record[:4], np.int32)[0],
          "image": np.frombuffer(record[4:], np.float32).reshape(8, 8, 1)}


def load_array_records():
  """A grain source per split (`__len__`, `__getitem__` -> dict); jrecipe reads them whole."""
  directory = os.path.join(tempfile.gettempdir(), f"user_data_ar_{os.getuid()}")
  if not os.path.exists(os.path.join(directory, "test.array_record")):
    write_array_records(directory)  # your files would exist already
  def source(split):
    path = os.path.join(directory, f"{split}.array_record")
    return grain.MapDataset.source(grain.sources.ArrayRecordDataSource([path])).map(parse)
  return {"train": source("train"), "validation": source("validation"), "test": source("test"),
          "num_classes": 10, "task": "classification"}


# --- a TFDS builder class: prepared as array_record on first use, no TensorFlow ---------------

class DigitsBuilder(tfds.core.GeneratorBasedBuilder):
  """The digits of `load()` as a TFDS dataset."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"),
                                 features=tfds.features.FeaturesDict({
                                     "image": tfds.features.Tensor(shape=(8, 8, 1),
                                                                   dtype=np.float32),
                                     "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(x, y) for split, (x, y) in _splits(load())}

  def _generate_examples(self, x, y):
    for i in range(len(y)):
      yield i, {"image": x[i], "label": int(y[i])}


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


class _Uneven:
  """A source whose element 7 is a 7x8 image among 8x8 ones."""

  def __init__(self, x, y):
    self.x, self.y = x, y

  def __len__(self):
    return len(self.y)

  def __getitem__(self, i):
    return (self.x[i][:7] if i == 7 else self.x[i]), self.y[i]


def uneven_source():
  out = load()
  out["train"] = _Uneven(*out["train"])
  return out


class _Huge:
  """A source of 10**9 examples computed on demand: too big to read into memory."""

  def __len__(self):
    return 10**9

  def __getitem__(self, i):
    return np.zeros((64, 64, 3), np.float32), np.int32(i % 10)


def huge_source():
  out = load()
  out["train"] = _Huge()
  return out


class NotTfds:
  """Not a builder: a class naming no data."""


def crop_to_six(x, y, rng):
  del rng
  return x[:, 1:-1, 1:-1, :], y
