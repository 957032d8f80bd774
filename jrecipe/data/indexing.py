"""The order in which training examples are visited: a grain MapDataset of index batches.

Recipe step served: 'fix the random seed'. Global step s maps to one batch of example indices,
a pure function of (seed, s): epoch e = s // steps_per_epoch reads the permutation of [0, N)
drawn for (seed, e), and a new epoch reshuffles. Because it is random access, an iterator
created at `start_step=k` yields exactly what a fresh one yields at step k, which is how a killed
run resumes exactly.

Why not `grain.MapDataset.range(N).seed(seed).shuffle().batch(B, drop_remainder=True)
.repeat(None)`: it has the same semantics (per-epoch reshuffle, random access by step, the
remainder of each epoch dropped) but grain shuffles one index at a time through a 16-bit Simon
cipher with cycle walking (`index_shuffle`) plus per-element bookkeeping, which costs more per
batch than the training step of a small MLP. `IndexBatches` draws each epoch's permutation at
once with numpy and slices it per step (the figures: docs/performance.md).

`ShuffledIndexBatches` is the same order as a `grain.MapDataset` (it composes with `.map`,
`.to_iter_dataset()` and grain checkpointing). The training loop uses the plain class: importing
grain is a visible part of a warm start (it pulls in orbax.checkpoint), so grain is imported
only when `ShuffledIndexBatches` is first named.
"""

import sys

import numpy as np


class IndexBatches:
  """Random access to the int64 index batch of global step s (numpy only).

  Args:
    num_examples: N, the size of the training split.
    batch_size: B (global); each epoch has N // B batches, the remainder N % B of its
      permutation is dropped (grain's `batch(drop_remainder=True)` before `repeat`).
    seed: non-negative int. Hashed with numpy's SeedSequence together with the epoch, so seeds
      0 and 1 give unrelated orders in every epoch (grain's own `shuffle` uses seed + epoch, so
      seed 1 epoch 0 would equal seed 0 epoch 1).
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int):
    if not 0 < batch_size <= num_examples:
      raise ValueError(f"need 0 < batch_size={batch_size} <= num_examples={num_examples}")
    self._n = int(num_examples)
    self._b = int(batch_size)
    self._seed = int(seed)
    self.steps_per_epoch = self._n // self._b
    # (epoch, permutation) as one tuple, replaced whole: the streaming pipeline reads index
    # batches from several threads, and two separate attributes could pair one epoch's number
    # with another epoch's permutation at an epoch boundary.
    self._cached = (-1, None)

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"{type(self).__name__}(n={self._n}, batch_size={self._b}, seed={self._seed})"

  def permutation(self, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: a permutation of [0, N) determined by (seed, epoch)."""
    cached_epoch, perm = self._cached
    if epoch != cached_epoch:
      rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self._seed, epoch])))
      perm = rng.permutation(self._n)
      self._cached = (epoch, perm)
    return perm

  def __getitem__(self, step):
    epoch, j = divmod(int(step), self.steps_per_epoch)
    return self.permutation(epoch)[j * self._b:(j + 1) * self._b]


def _grain_class():
  import grain

  class ShuffledIndexBatches(IndexBatches, grain.MapDataset):
    """`IndexBatches` as an infinite grain.MapDataset: element s is the index batch of step s."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
      grain.MapDataset.__init__(self)
      IndexBatches.__init__(self, num_examples, batch_size, seed)

    def __getitem__(self, step):
      if isinstance(step, slice):
        return self.slice(step)
      return IndexBatches.__getitem__(self, step)

  # importable by name (pickle, grain's worker processes): jrecipe.data.indexing.ShuffledIndexBatches
  ShuffledIndexBatches.__module__ = __name__
  ShuffledIndexBatches.__qualname__ = "ShuffledIndexBatches"
  return ShuffledIndexBatches


def __getattr__(name):
  if name == "ShuffledIndexBatches":  # grain is imported here, at first use
    cls = _grain_class()
    globals()[name] = cls
    return cls
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
