"""CIFAR-10-shaped synthetic data for bench/accelerator.py: 32x32x3 images, 10 classes.

A jrecipe user data function (docs/your_data.md), so the benchmark needs no download and no
dataset package on a machine without network. Each class is a fixed random 32x32x3 pattern
plus noise, so a model can learn it (the accelerator tests check the loss goes down) while the
step's shapes and FLOPs are exactly CIFAR-10's.
"""

import os

import numpy as np

ENV_TRAIN = "JRECIPE_BENCH_TRAIN"  # training examples (default 8192); the tests use fewer


def cifar_shaped(seed: int = 0):
  """{'train': (x, y), 'validation': ..., 'test': ..., 'num_classes': 10}; x uint8 [N,32,32,3]."""
  rng = np.random.default_rng(seed)
  patterns = rng.uniform(0, 255, size=(10, 32, 32, 3))
  out = {"num_classes": 10, "task": "classification"}
  sizes = {"train": int(os.environ.get(ENV_TRAIN, "8192")), "validation": 256, "test": 256}
  for split, n in sizes.items():
    y = rng.integers(0, 10, size=n).astype(np.int32)
    x = 0.8 * patterns[y] + rng.normal(0, 30, size=(n, 32, 32, 3)) + 25
    out[split] = (np.clip(x, 0, 255).astype(np.uint8), y)
  return out
