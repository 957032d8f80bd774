"""A seeded synthetic image dataset as a real TFDS ArrayRecord builder, of any size.

For the streaming pipeline's benchmark (bench/stream_memory.py: several GB, larger than the
memory it may use) and its tests (small configs, plus deliberately bad ones: a split missing,
records of inconsistent shape). Each image is a class-dependent bar pattern plus seeded
noise, so a model can learn it; example i of a split depends only on (seed, split, i), written
in chunks so that generating gigabytes takes bounded memory.

Usage:
    from jrecipe.data import stream_synthetic
    name = stream_synthetic.prepare(data_dir, num_train=5000, shape=(28, 28, 1))
    config.data.name = f'tfds:{name}'; config.data.data_dir = data_dir
"""

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_CLASSES = 10
_CHUNK = 8192


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  """num_train / num_validation / num_test examples (0: no such split) of `shape` uint8
  images; `ragged`: every other record one row shorter (a dataset jrecipe must refuse)."""
  num_train: int = 1000
  num_validation: int = 0
  num_test: int = 200
  shape: tuple = (28, 28, 1)
  seed: int = 0
  ragged: bool = False


class SyntheticImages(tfds.core.GeneratorBasedBuilder):
  """Seeded images with class-dependent bars, 'image' uint8 and 'label' ClassLabel."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Seeded synthetic images for the streaming pipeline."}
  BUILDER_CONFIGS = [SyntheticConfig(name="default")]
  code_path = epath.Path(__file__)  # see jrecipe.data.builders: no importlib_resources lookup

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self):
    c = self.builder_config
    shape = (None, *c.shape[1:]) if c.ragged else tuple(c.shape)
    encoding = tfds.features.Encoding.NONE if c.ragged else tfds.features.Encoding.BYTES
    return tfds.core.DatasetInfo(
        builder=self, description="Seeded synthetic images (jrecipe.data.stream_synthetic).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=encoding),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}),
        supervised_keys=("image", "label"), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
    return {s: self._generate_examples(s, n) for s, n in sizes.items() if n}

  def _generate_examples(self, split: str, n: int) -> Iterator:
    c = self.builder_config
    for start in range(0, n, _CHUNK):
      images, labels = images_chunk(c.seed, split, start, min(n, start + _CHUNK), c.shape)
      for k in range(len(labels)):
        image = images[k][:-1] if c.ragged and (start + k) % 2 else images[k]
        yield start + k, {"image": image, "label": int(labels[k])}


def images_chunk(seed: int, split: str, start: int, stop: int, shape: tuple):
  """(uint8 images [stop - start, *shape], int64 labels) of examples start..stop-1."""
  rng = np.random.default_rng([seed, ("train", "validation", "test").index(split), start])
  n = stop - start
  labels = rng.integers(0, NUM_CLASSES, n)
  h = shape[0]
  rows = np.arange(h)[None, :] * NUM_CLASSES // h  # which class's bar each row is
  bars = (rows == labels[:, None]).astype(np.float32)  # [n, h]
  base = bars.reshape((n, h) + (1,) * (len(shape) - 1)) * 160.0
  noise = rng.integers(0, 96, (n, *shape))
  return np.clip(base + noise, 0, 255).astype(np.uint8), labels


def prepare(data_dir: str, *, config_name: str = "default", **fields) -> str:
  """Builds SyntheticImages with these config fields into data_dir (once) -> its TFDS name
  ('synthetic_images/<config_name>') for `data.name = 'tfds:' + name`."""
  config = SyntheticConfig(name=config_name, **fields)
  builder = SyntheticImages(data_dir=data_dir, config=config)
  if not (builder.data_path / "dataset_info.json").exists():
    from jrecipe.data.builders import _quiet_progress_bars  # noqa: PLC0415 - TFDS is loaded
    with _quiet_progress_bars():
      builder.download_and_prepare()
  return f"synthetic_images/{config_name}"
