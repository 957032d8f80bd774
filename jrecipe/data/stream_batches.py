"""Training and evaluation batches of a streamed Dataset: grain pipelines over its records.

Recipe steps served:
  * 'Fix the random seed': the training batch of global step s is the in-memory path's batch
    (the same `jrecipe.data.indexing` permutation and the same per-process slice [lo, hi) of
    it), read from the records of those rows only; a pipeline
    started at `start_step=k` yields exactly what a fresh one yields at step k, which is the
    whole of the iterator's position (`jrecipe.train.hooks.DataPosition` saves it).
  * 'Evaluate on the whole test set': every example once across processes, the last batch
    padded and masked (`jrecipe.data.batches.eval_rows`), as in memory.

Each process reads only its slice of every global batch. Reading and decoding run in grain's
reader threads (`data.stream_threads`), `data.stream_prefetch` batches ahead of the step, so
they overlap it; `data.stream_workers` > 0 moves them to grain worker processes (each costs
about 1.5 s to start; on a 2-core CPU threads are faster: docs/streaming.md).
"""

from typing import Iterator

import numpy as np

from jrecipe.data import batches as batches_lib
from jrecipe.data.stream_columns import take_columns


class _TrainBatch:
  """Index batch of a step -> this process's {'x', 'y'} (a picklable grain map function)."""

  def __init__(self, x, y: np.ndarray, lo: int, hi: int):
    self.x, self.y, self.lo, self.hi = x, y, lo, hi

  def __call__(self, index_batch: np.ndarray) -> dict:
    return take_columns({"x": self.x, "y": self.y}, index_batch[self.lo:self.hi])


class _EvalBatch:
  """Batch number -> this process's slice of that global evaluation batch, masked."""

  def __init__(self, arrays: dict, n: int, batch_size: int, lo: int, hi: int):
    self.arrays, self.n, self.batch_size, self.lo, self.hi = arrays, n, batch_size, lo, hi

  def __call__(self, b: int) -> dict:
    rows, mask = batches_lib.eval_rows(self.n, self.batch_size, int(b), self.lo, self.hi)
    if isinstance(rows, slice):
      rows = np.arange(rows.start, rows.stop)
    out = take_columns(self.arrays, rows)
    out["mask"] = mask
    return out


def _iterate(dataset, info) -> Iterator[dict]:
  """A grain MapDataset of batches -> an iterator reading ahead in threads (or workers)."""
  import grain
  options = grain.ReadOptions(num_threads=info.threads, prefetch_buffer_size=info.prefetch)
  it = dataset.to_iter_dataset(options)
  if info.workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=info.workers))
  return iter(it)


def train_batches(ds, *, batch_size: int, seed: int, start_step: int, lo: int,
                  hi: int) -> Iterator[dict]:
  """Endless training batches of a streamed `ds` from `start_step`: rows [lo, hi) of every
  global index batch (arguments validated by `jrecipe.data.batches.train_batches`)."""
  from jrecipe.data.indexing import ShuffledIndexBatches
  train = ds.arrays["train"]
  steps = ShuffledIndexBatches(len(train["y"]), batch_size, int(seed))
  dataset = steps[int(start_step):].map(_TrainBatch(train["x"], train["y"], lo, hi))
  return _iterate(dataset, ds.stream)


def eval_batches(ds, split: str, *, batch_size: int, lo: int, hi: int) -> Iterator[dict]:
  """Every example of `split` once, as this process's [lo, hi) slice of each global batch."""
  import grain
  arrays = ds.arrays[split]
  n = len(arrays["id"])
  count = -(-n // batch_size)
  dataset = grain.MapDataset.range(count).map(_EvalBatch(arrays, n, batch_size, lo, hi))
  return _iterate(dataset, ds.stream)
