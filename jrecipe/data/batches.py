"""Training and evaluation batches of an in-memory Dataset, on one host or many.

Recipe steps served:
  * 'Fix the random seed': `train_batches` is a pure function of (seed, global step); resuming at
    `start_step=k` yields exactly the batches a fresh iterator yields from step k.
  * 'Evaluate on the whole test set': `eval_batches` covers every example of a split exactly once
    (the last batch padded and masked), on one host or many.
"""

import math
from typing import Iterator

import numpy as np

from jrecipe.data.dataset import Dataset
from jrecipe.errors import UserError


def _check_processes(batch_size: int, process_index: int, process_count: int) -> int:
  """The per-process batch size; UserError unless the global batch splits evenly."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise UserError(f"batch_size={batch_size!r} must be a positive integer.")
  if not isinstance(process_count, (int, np.integer)) or process_count < 1:
    raise UserError(f"process_count={process_count!r} must be a positive integer.")
  if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
    raise UserError(f"process_index={process_index!r} must be in [0, {process_count}).")
  if batch_size % process_count:
    raise UserError(
        f"The global batch_size={batch_size} is not divisible by the {process_count} processes: "
        f"each process takes batch_size / process_count examples. Use a multiple of "
        f"{process_count}.")
  return batch_size // process_count


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
  """Number of full training batches in one epoch: N_train // batch_size (>= 1).

  Raises:
    UserError: batch_size < 1 or larger than the training split (including a small
      train_subset): every step must be a full batch.
  """
  n = int(ds.spec.splits["train"])
  _check_processes(batch_size, 0, 1)
  if batch_size > n:
    raise UserError(
        f"batch_size={batch_size} is larger than the {n} training examples of {ds.spec.name!r} "
        "(after any data.train_subset): every training step needs a full batch. Use a "
        f"batch_size of at most {n}, or more training examples.")
  return n // batch_size


def train_batches(ds: Dataset, *, batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Endless shuffled training batches. Recipe: 'fix the random seed'.

  Global step s yields the same batch whatever `start_step` the iterator was created at: the
  index batch of step s is a pure function of (seed, s) (see `jrecipe.data.indexing`): epoch
  e = s // steps_per_epoch is a fresh permutation of the training split drawn from (seed, e);
  its last N % batch_size examples are skipped for that epoch. Multi-host: every process
  computes the same global index batch and keeps the contiguous slice
  [process_index * B/P, (process_index + 1) * B/P); batch_size is global.

  The index batch comes from numpy (`jrecipe.data.indexing.IndexBatches`), the rest is one
  gather per array: microseconds per batch (docs/performance.md; tests/test_data.py guards
  against regressions).

  Args:
    ds: the Dataset (its 'train' arrays).
    batch_size: global batch size; divisible by process_count, at most N_train.
    seed: non-negative integer; the same seed gives the same batches.
    start_step: global step of the first batch yielded (resume a run with its step).
    process_index, process_count: this process and how many share the global batch.

  Returns:
    An iterator of {'x': [B/P, ...], 'y': [B/P] (or [B/P, T])} numpy arrays, forever.
  """
  from jrecipe.data.indexing import IndexBatches
  local = _check_processes(batch_size, process_index, process_count)
  steps_per_epoch(ds, batch_size)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise UserError(f"seed={seed!r} must be a non-negative integer.")
  if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) \
      or start_step < 0:
    raise UserError(f"start_step={start_step!r} must be a non-negative integer.")
  lo, hi = process_index * local, (process_index + 1) * local
  if getattr(ds, "stream", None) is not None:  # grain over the ArrayRecord files, the same order
    from jrecipe.data import stream_batches
    return stream_batches.train_batches(ds, batch_size=batch_size, seed=seed,
                                        start_step=start_step, lo=lo, hi=hi)
  x, y = ds.arrays["train"]["x"], ds.arrays["train"]["y"]
  index_batches = IndexBatches(len(x), batch_size, int(seed))

  def generate():
    step = int(start_step)
    while True:
      idx = index_batches[step][lo:hi]
      yield {"x": x.take(idx, axis=0), "y": y.take(idx, axis=0)}
      step += 1

  return generate()


def eval_batches(ds: Dataset, split: str, *, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """Every example of a split exactly once, in order. Recipe: 'evaluate on the whole test set'.

  Batches have the full (global) batch size: the last one is padded with copies of the split's
  example 0. Every batch carries 'mask' float32 (1 real, 0 padding): weight per-example metrics
  by it. Multi-host: each process gets the contiguous slice [process_index * B/P,
  (process_index + 1) * B/P) of every global batch, so all processes see the same number of
  batches (as collectives require) and the union of masked-in rows is the split.

  Args:
    ds: the Dataset.
    split: 'train', 'validation' or 'test'.
    batch_size: global batch size, divisible by process_count.
    process_index, process_count: this process and how many share each batch.

  Returns:
    An iterator of ceil(N / batch_size) dicts {'x', 'y', 'id': int64, 'mask': float32 [B/P]}.
  """
  if split not in ds.arrays:
    raise UserError(f"Unknown split {split!r} of {ds.spec.name!r}. Valid splits: "
                    f"{', '.join(ds.arrays)}.")
  local = _check_processes(batch_size, process_index, process_count)
  arrays = ds.arrays[split]
  n = len(arrays["id"])
  lo, hi = process_index * local, (process_index + 1) * local
  if getattr(ds, "stream", None) is not None:
    from jrecipe.data import stream_batches
    return stream_batches.eval_batches(ds, split, batch_size=batch_size, lo=lo, hi=hi)

  def generate():
    for b in range(math.ceil(n / batch_size)):
      rows, mask = eval_rows(n, batch_size, b, lo, hi)
      if isinstance(rows, slice):  # all real examples: views, no copy
        batch = {k: v[rows] for k, v in arrays.items()}
      else:
        batch = {k: v.take(rows, axis=0) for k, v in arrays.items()}
      batch["mask"] = mask
      yield batch

  return generate()


def eval_rows(n: int, batch_size: int, b: int, lo: int, hi: int):
  """(rows, mask) of this process's slice [lo, hi) of global evaluation batch b of a split
  of n examples: a slice when every row is real, else indices padded with row 0 and a mask
  (1 real, 0 padding). Shared by the in-memory and the streaming path."""
  start = b * batch_size
  if start + hi <= n:
    mask = np.ones(hi - lo, np.float32)
    return slice(start + lo, start + hi), mask
  idx = np.arange(start + lo, start + hi)
  real = idx < n
  return np.where(real, idx, 0), real.astype(np.float32)
