"""The dataset layer's public names in one place, for callers that import `pipeline`.

Recipe steps served (each in its own module):
  * 'Become one with the data': `load_dataset` and `Dataset` (`jrecipe.data.dataset`), read from
    ArrayRecord files by `jrecipe.data.reading`, or streamed from them a batch at a time
    (`jrecipe.data.stream`, data.pipeline='stream').
  * 'Fix the random seed' and 'evaluate on the whole test set': `train_batches`,
    `eval_batches` and `steps_per_epoch` (`jrecipe.data.batches`).
  * 'Regularise: data augmentation': `augment` (`jrecipe.data.augmentation`).
"""

from jrecipe.data.augmentation import augment
from jrecipe.data.batches import eval_batches, steps_per_epoch, train_batches
from jrecipe.data.dataset import Dataset, clear_cache, load_dataset
from jrecipe.data.reading import (DATASETS, SPLITS, TFDS_PREFIX, TFDS_VALIDATION_FRACTION,
                                  valid_names)

__all__ = ["DATASETS", "SPLITS", "TFDS_PREFIX", "TFDS_VALIDATION_FRACTION", "Dataset",
           "augment", "clear_cache", "eval_batches", "load_dataset", "steps_per_epoch",
           "train_batches", "valid_names"]
