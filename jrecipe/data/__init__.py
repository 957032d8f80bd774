"""jrecipe's dataset layer: offline TFDS builders, in-memory splits, batches and augmentation.

Recipe step served: 'Become one with the data' (fixed splits, stable ids, raw values kept for
inspection), 'fix the random seed' (batches are a function of seed and step), 'evaluate on the
whole test set' (masked eval batches) and the data regularisers (subset, downsample, augment).
"""

from jrecipe.data.pipeline import (DATASETS, Dataset, augment, clear_cache, eval_batches,
                                   load_dataset, steps_per_epoch, train_batches)

__all__ = ["DATASETS", "Dataset", "augment", "clear_cache", "eval_batches", "load_dataset",
           "steps_per_epoch", "train_batches"]
