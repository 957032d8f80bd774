"""`--mode=inspect` on a streamed dataset, in bounded memory. Recipe stage 1: 'become one with
the data', at a scale where the data cannot all be looked at at once.

Two parts, each saying what it covers:
  * exact duplicates and train/test leakage by exact copy over EVERY example: the same
    BLAKE2b-128 content hash as the in-memory inspection (`jrecipe.data_inspect.duplicates`),
    computed CHUNK records at a time; only the 16-byte digests stay in memory.
  * everything else (class counts, near duplicates, corrupt records, outliers, likely label
    errors, the per-example table and the grids) on a seeded sample of at most
    `data.stream_inspect_sample` examples per split, stated in inspect/summary.json under
    'streamed' (the class counts of the whole splits are exact anyway: labels are in memory).
"""

import collections
import hashlib

import numpy as np

from jrecipe.data.stream import CHUNK


def sample(data, seed: int, per_split: int) -> tuple[dict, dict]:
  """({split: {'x', 'y', 'id'} of a seeded sample}, {split: {'sampled': k, 'of': N}}).

  The rows of split s are `default_rng([seed, s's index]).choice(N, k)` in stored order, read
  CHUNK at a time; a split no larger than `per_split` is read whole.
  """
  out, info = {}, {}
  for i, (split, raw) in enumerate(data.raw.items()):
    n = len(raw["y"])
    k = min(n, int(per_split))
    rows = np.sort(np.random.default_rng([seed, i]).choice(n, k, replace=False)) if k < n \
        else np.arange(n)
    x = np.concatenate([raw["x"].take(rows[a:a + CHUNK]) for a in range(0, k, CHUNK)])
    out[split] = {"x": x, "y": raw["y"][rows], "id": raw["id"][rows]}
    info[split] = {"sampled": k, "of": n}
  return out, info


def _digests(x: np.ndarray) -> np.ndarray:
  """The in-memory inspection's content hash (shape and dtype included), as 16 raw bytes."""
  x = np.ascontiguousarray(x)
  head = f"{x.dtype.str}{x.shape[1:]}".encode()
  return np.array([hashlib.blake2b(head + row.tobytes(), digest_size=16).digest() for row in x],
                  dtype="S16")


def exact_duplicates(data, top_k: int) -> dict:
  """Exact copies over every example of every split, streamed: the summary section."""
  names, digests, splits, ids, labels = list(data.raw), [], [], [], []
  for i, split in enumerate(names):
    raw = data.raw[split]
    n = len(raw["y"])
    for a in range(0, n, CHUNK):
      digests.append(_digests(raw["x"].take(np.arange(a, min(n, a + CHUNK)))))
    splits.append(np.full(n, i, np.int8))
    ids.append(np.asarray(raw["id"]))
    if isinstance(raw["y"], np.ndarray) and raw["y"].ndim == 1:  # not streamed sequences
      labels.append(raw["y"])
  h = np.concatenate(digests)
  split_of, id_of = np.concatenate(splits), np.concatenate(ids)
  y = np.concatenate(labels) if len(labels) == len(names) else None
  from jrecipe.data_inspect.duplicates import exact_groups
  groups = exact_groups(h)
  within, across, conflicts = collections.Counter(), collections.Counter(), 0
  for g in groups:
    ss = sorted({int(s) for s in split_of[g]})
    key = "/".join(names[s] for s in ss)
    (within if len(ss) == 1 else across)[key] += 1
    conflicts += int(y is not None and len(set(y[g].tolist())) > 1)
  return {
      "method": "BLAKE2b-128 hash of each example's stored bytes, over every example "
                "(streamed)",
      "examples_hashed": int(len(h)), "groups": len(groups),
      "examples": int(sum(len(g) for g in groups)),
      "extra_copies": int(sum(len(g) - 1 for g in groups)),
      "within_split": dict(within), "across_splits": dict(across),
      "conflicting_labels": conflicts,
      "example_groups": [[{"split": names[int(split_of[r])], "id": int(id_of[r])} for r in g]
                         for g in groups[:top_k]]}
