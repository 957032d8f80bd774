"""The summary.json sections of `inspect_splits`: counts, by split, with example references.

Recipe stage 1, 'become one with the data': every finding is counted per split and lists the
first `top_k` examples as {split, id, label}, so any example can be found again.
"""

import collections
import functools
from typing import Any, Optional

import numpy as np

from jrecipe.data_inspect import stats as stats_lib


def ref(split: str, ident, label) -> dict:
  """One example's reference {split, id, label (when it is a scalar)}."""
  out = {"split": split, "id": int(ident)}
  if label is not None and np.ndim(label) == 0:
    f = float(label)
    out["label"] = int(f) if np.isfinite(f) and f == int(f) else f
  return out


def example_refs(rows: Any, top_k: int, which) -> list:
  """The summary's references {split, id, label} to the first top_k of these rows."""
  scalar = rows.y.ndim == 1
  return [ref(rows.split[r], rows.id[r], rows.y[r] if scalar else None)
          for r in list(which)[:top_k]]


def num(v) -> Optional[float]:
  """A float for JSON, or None when it is not finite."""
  v = float(v)
  return v if np.isfinite(v) else None


def by_split(mask, split_all, names) -> dict:
  """How many rows of `mask` fall in each split."""
  return {s: int(np.sum(mask & (split_all == s))) for s in names}


def per_split(rows: Any, task: str, num_classes) -> dict:
  """Class counts (or the example count, for regression) of every split."""
  if task == "regression":
    return {s: {"count": int(len(y))} for s, y in zip(rows.names, rows.ys)}
  return {s: stats_lib.class_counts(y, num_classes) for s, y in zip(rows.names, rows.ys)}


def finding_summaries(rows: Any, table: dict, *, near: dict, groups, corrupt: dict,
                       value_range: tuple, threshold: float, top_k: int) -> dict:
  """The summary's bad_labels, exact/near duplicates, leakage and corrupt sections."""
  refs = functools.partial(example_refs, rows, top_k)
  bad_label, leak = table["bad_label"], table["leak"]
  out = {"bad_labels": {"count": int(bad_label.sum()),
                        "by_split": by_split(bad_label, rows.split, rows.names),
                        "examples": refs(np.flatnonzero(bad_label))}}
  out["exact_duplicates"], across = _exact_summary(rows, groups, refs, top_k)
  out["near_duplicates"], nacross = _near_summary(rows, near, table["near_dup"], threshold,
                                                  refs, top_k)
  out["leakage"] = {
      "examples": int(leak.sum()), "by_split": by_split(leak, rows.split, rows.names),
      "exact_groups_across_splits": across, "near_pairs_across_splits": nacross,
      "examples_listed": refs(np.flatnonzero(leak))}
  out["corrupt"] = _corrupt_summary(rows, corrupt, table["corrupt"], value_range, refs)
  return out


def _exact_summary(rows: Any, groups, refs, top_k: int) -> tuple[dict, int]:
  """The exact-duplicates section, and how many groups span several splits."""
  within, across = collections.Counter(), collections.Counter()
  conflicts = 0
  for g in groups:
    ss = sorted(set(rows.split[g]), key=rows.names.index)
    if len(ss) == 1:
      within[ss[0]] += 1
    else:
      across["/".join(ss)] += 1
    if rows.y.ndim == 1 and len(set(rows.y[g].tolist())) > 1:
      conflicts += 1
  section = {
      "method": "BLAKE2b-128 hash of each example's stored bytes",
      "groups": len(groups), "examples": int(sum(len(g) for g in groups)),
      "extra_copies": int(sum(len(g) - 1 for g in groups)),
      "within_split": dict(within), "across_splits": dict(across),
      "conflicting_labels": conflicts,
      "example_groups": [refs(g) for g in groups[:top_k]]}
  return section, int(sum(across.values()))


def _near_summary(rows: Any, near: dict, near_mask, threshold: float, refs,
                  top_k: int) -> tuple[dict, int]:
  """The near-duplicates section, and how many pairs span two splits."""
  within, across = collections.Counter(), collections.Counter()
  pairs = near["pairs"]
  for a, b in pairs:
    sa, sb = rows.split[a], rows.split[b]
    if sa == sb:
      within[sa] += 1
    else:
      across["/".join(sorted((sa, sb), key=rows.names.index))] += 1
  section = {
      "similarity": near["description"], "threshold": float(threshold),
      "pairs": int(len(pairs)), "examples": int(near_mask.sum()),
      "within_split": dict(within), "across_splits": dict(across),
      "example_pairs": [{"a": refs([a])[0], "b": refs([b])[0], "similarity": float(v)}
                        for (a, b), v in list(zip(pairs, near["similarity"]))[:top_k]]}
  return section, int(sum(across.values()))


def _corrupt_summary(rows: Any, corrupt: dict, any_corrupt, value_range, refs) -> dict:
  section = {"count": int(any_corrupt.sum()),
             "by_split": by_split(any_corrupt, rows.split, rows.names)}
  for k, m in corrupt.items():
    section[k] = {"count": int(m.sum()), "by_split": by_split(m, rows.split, rows.names),
                  "examples": refs(np.flatnonzero(m))}
  section["out_of_range"]["range"] = list(value_range)
  section["wrong_shape"]["expected_shape"] = list(rows.shape)
  return section


def statistics(cols: dict, n: int) -> dict:
  """min, median and max of every per-example statistic, with its description."""
  return {c: {"min": num(np.nanmin(cols[c])) if n else None,
              "median": num(np.nanmedian(cols[c])) if n else None,
              "max": num(np.nanmax(cols[c])) if n else None,
              "description": stats_lib.COLUMN_DOCS[c]} for c in cols}


def label_error_examples(rows: Any, table: dict, issues, top_k: int) -> list:
  """The first top_k likely label errors with the suggested label and both probabilities."""
  refs = functools.partial(example_refs, rows, top_k)
  return [{**refs([r])[0], "suggested": int(table["suggested"][r]),
           "p_label": float(table["p_label"][r]), "p_suggested": float(table["p_suggested"][r])}
          for r in issues[:top_k]]
