"""`inspect_splits`: every finding about a dataset, from plain arrays.

Recipe stage 1, 'become one with the data': class counts and imbalance, labels outside the
declared classes, exact duplicates within and across splits (train/test leakage), near
duplicates, corrupt records, per-example statistics to sort and filter by, and (with a cheap
cross-validated model) likely label errors. The function takes arrays, so a test can plant a
problem into a copy of a real dataset; `jrecipe.data_inspect.mode` is the thin command-line
wrapper that loads a config's dataset and writes the files (`write_findings`).
"""

import collections
import dataclasses
from typing import Any, Optional

import numpy as np

from jrecipe.data_inspect import duplicates as dup_lib
from jrecipe.data_inspect import mistakes as mistakes_lib
from jrecipe.data_inspect import stats as stats_lib
from jrecipe.data_inspect import summary as summary_lib

DEFAULT_THRESHOLD = 0.985
CORRUPT_KINDS = ("non_finite", "constant", "out_of_range", "wrong_shape")


@dataclasses.dataclass
class Findings:
  """What `inspect_splits` found.

  Attributes:
    summary: the JSON-able summary (the content of inspect/summary.json).
    table: column name -> [N] array, one row per example of every split (split order).
    x: the inputs of all splits as one array [N, *shape] (rows of a wrong shape are zeros).
    image: whether the examples are images.
    value_range: the declared (lo, hi) range used for the checks and the grids.
    class_names: display names of the classes (or None).
    near_pairs: int [M, 2] rows of near-duplicate pairs (most similar first), near_similarity
      their similarities; exact_groups: arrays of rows with identical content.
    label_issues: rows of likely label errors (best first), or None.
  """

  summary: dict
  table: dict
  x: np.ndarray
  image: bool
  value_range: tuple
  class_names: Optional[tuple] = None
  near_pairs: Any = None
  near_similarity: Any = None
  exact_groups: Any = None
  label_issues: Any = None


def _as_arrays(split) -> tuple:
  if isinstance(split, dict):
    return split["x"], split["y"], split.get("id")
  return tuple(split) if len(split) == 3 else (*split, None)


def _stack(x, expected: Optional[tuple]) -> tuple[np.ndarray, np.ndarray, tuple]:
  """A fixed-shape array from an array or a list of arrays; rows of another shape -> zeros."""
  if isinstance(x, np.ndarray) and x.dtype != object:
    shape = tuple(x.shape[1:])
    if expected is not None and shape != tuple(expected):
      return (np.zeros((len(x), *expected), x.dtype), np.ones(len(x), bool), tuple(expected))
    return x, np.zeros(len(x), bool), shape
  items = [np.asarray(v) for v in x]
  if expected is None:
    expected = collections.Counter(v.shape for v in items).most_common(1)[0][0] if items else ()
  dtype = np.result_type(*[v.dtype for v in items]) if items else np.float32
  out = np.zeros((len(items), *expected), dtype)
  wrong = np.zeros(len(items), bool)
  for i, v in enumerate(items):
    if v.shape == tuple(expected):
      out[i] = v
    else:
      wrong[i] = True
  return out, wrong, tuple(expected)


def inspect_splits(splits: dict, *, task: str = "classification",
                   num_classes: Optional[int] = None, class_names: Optional[tuple] = None,
                   value_range: Optional[tuple] = None, expected_shape: Optional[tuple] = None,
                   near_dup_threshold: float = DEFAULT_THRESHOLD, neighbors: int = 8,
                   max_shift: int = 1, label_neighbors: int = 10, top_k: int = 32, seed: int = 0,
                   name: str = "") -> Findings:
  """Inspects a dataset given as arrays. Recipe stage 1: 'become one with the data'.

  Args:
    splits: {split: (x, y, ids)} or {split: {'x', 'y', 'id'}} with the inputs AS STORED
      (e.g. uint8 images, before normalisation), labels and stable example ids (default:
      row numbers). x may be a list of arrays of different shapes: the odd ones are
      reported as wrong_shape. The first split is the reference ('train').
    task: 'classification', 'sequence' or 'regression'.
    num_classes: declared number of classes (labels outside [0, C) are reported).
    class_names: display names of the classes.
    value_range: declared (lo, hi) of the input values: values outside are reported as
      out_of_range. None: the observed range of the first split's finite values (then only
      the other splits can be out of range).
    expected_shape: the shape one example must have; None: the most common one.
    near_dup_threshold: verified similarity at or above which two examples are near
      duplicates (see `jrecipe.data_inspect.duplicates`).
    neighbors: candidate neighbours per example for the near-duplicate search.
    max_shift: translation (pixels) the image similarity tolerates.
    label_neighbors: k of the leave-one-out nearest-neighbour vote that ranks likely label
      errors (classification only); 0 turns it off.
    top_k: examples listed per finding in the summary.
    seed: for the cross-validation folds.
    name: the dataset's name for the summary.

  Returns:
    Findings (summary, per-example table, inputs for the grids).
  """
  rows = _stack_splits(splits, expected_shape)
  n = len(rows.x)
  image = stats_lib.is_image(rows.shape, task)
  value_range, declared = _value_range(rows, value_range)

  cols, corrupt = _statistics_and_corrupt(rows, image, value_range)
  bad_label = stats_lib.label_masks(rows.y, task, num_classes)
  groups, near = _duplicates(rows, image, near_dup_threshold, neighbors, max_shift)

  # --- the table ---------------------------------------------------------------------------
  table = _base_table(rows, task, cols, near, num_classes, image)
  exact_mask, near_mask, leak = _duplicate_masks(groups, near["pairs"], rows.split, n)
  any_corrupt = np.any([np.zeros(n, bool), *corrupt.values()], axis=0)
  table.update(exact_dup=exact_mask, near_dup=near_mask, leak=leak, corrupt=any_corrupt,
               bad_label=bad_label)

  # --- likely label errors from out-of-sample predictions of a cheap model ---------------
  issues, label_summary, extra = _label_errors_if_asked(
      rows, task, num_classes, label_neighbors, seed, bad_label | any_corrupt, image)
  table.update(extra)
  table["flags"] = _flags(table, [("exact_dup", exact_mask), ("near_dup", near_mask),
                                  ("leak", leak), ("bad_label", bad_label)]
                          + list(corrupt.items()))
  assert list(table) == table_columns(task, image, num_classes, label_neighbors and (
      issues is not None)), "table_columns() is out of date"

  # --- the summary ---------------------------------------------------------------------------
  summary = {
      "dataset": name, "task": task, "splits": dict(zip(rows.names, rows.sizes)),
      "example_shape": list(rows.shape), "image": bool(image), "num_classes": num_classes,
      "value_range": list(value_range), "value_range_declared": declared,
      "per_split": summary_lib.per_split(rows, task, num_classes)}
  summary.update(summary_lib.finding_summaries(
      rows, table, near=near, groups=groups, corrupt=corrupt, value_range=value_range,
      threshold=near_dup_threshold, top_k=top_k))
  summary["statistics"] = summary_lib.statistics(cols, n)
  if issues is not None:
    label_summary["examples"] = summary_lib.label_error_examples(rows, table, issues, top_k)
  summary["label_errors"] = label_summary
  return Findings(summary=summary, table=table, x=rows.x, image=image, value_range=value_range,
                  class_names=class_names, near_pairs=near["pairs"],
                  near_similarity=near["similarity"], exact_groups=groups,
                  label_issues=issues)


@dataclasses.dataclass
class _Rows:
  """Every split's examples stacked into one array, with where each row came from."""

  names: list  # split names, the reference split first
  sizes: list  # examples per split
  offsets: dict  # split -> its first row
  shape: tuple  # the shape of one example
  first_x: np.ndarray  # the reference split's inputs
  first_wrong: np.ndarray  # its rows of a wrong shape
  ys: list  # labels per split
  x: np.ndarray
  y: np.ndarray
  id: np.ndarray
  wrong: np.ndarray
  split: np.ndarray
  index: np.ndarray


def _stack_splits(splits: dict, expected_shape: Optional[tuple]) -> _Rows:
  """The splits as one table of rows (x of a wrong shape become zeros, flagged in `wrong`)."""
  names = list(splits)
  xs, ys, ids, wrongs = [], [], [], []
  shape = tuple(expected_shape) if expected_shape is not None else None
  for s in names:
    x, y, i = _as_arrays(splits[s])
    x, wrong, shape = _stack(x, shape)
    xs.append(x)
    wrongs.append(wrong)
    ys.append(np.asarray(y))
    ids.append(np.arange(len(x), dtype=np.int64) if i is None else np.asarray(i, np.int64))
  dtype = np.result_type(*[x.dtype for x in xs])
  sizes = [len(x) for x in xs]
  return _Rows(
      names=names, sizes=sizes, offsets=dict(zip(names, np.cumsum([0] + sizes)[:-1].tolist())),
      shape=shape, first_x=xs[0], first_wrong=wrongs[0], ys=ys,
      x=np.concatenate([x.astype(dtype, copy=False) for x in xs]) if xs else np.zeros(0),
      y=np.concatenate(ys), id=np.concatenate(ids), wrong=np.concatenate(wrongs),
      split=np.concatenate([np.full(len(x), s) for s, x in zip(names, xs)]),
      index=np.concatenate([np.arange(len(x)) for x in xs]))


def _duplicates(rows: _Rows, image: bool, threshold: float, neighbors: int,
                max_shift: int) -> tuple[list, dict]:
  """(exact groups by content hash, near duplicates); a wrong-shape row copies nothing."""
  hashes = dup_lib.content_hashes(rows.x)
  hashes[rows.wrong] = [f"wrong_shape:{i}" for i in np.flatnonzero(rows.wrong)]
  near = dup_lib.near_duplicates(rows.x, image=image, threshold=threshold, k=neighbors,
                                 max_shift=max_shift, exclude_same=hashes)
  return dup_lib.exact_groups(hashes), near


def _statistics_and_corrupt(rows: _Rows, image: bool, value_range: tuple) -> tuple[dict, dict]:
  """(per-example statistic columns, corrupt-record masks by kind); rows of a wrong shape get
  NaN statistics (their zeros are no data)."""
  cols = stats_lib.example_stats(rows.x, image=image, value_range=value_range)
  for c in cols:
    if c != "non_finite":
      cols[c][rows.wrong] = np.nan
  corrupt = stats_lib.corrupt_masks(rows.x, cols, value_range=value_range,
                                    wrong_shape=rows.wrong)
  return cols, corrupt


def _label_errors_if_asked(rows: _Rows, task: str, num_classes, label_neighbors: int, seed: int,
                           exclude, image: bool) -> tuple:
  """(issue rows or None, the label_errors summary, extra table columns)."""
  if not will_rank_label_errors(task, num_classes, label_neighbors, rows.sizes[0]):
    return None, {"skipped": "classification only" if task != "classification" else
                  "label_neighbors=0"}, {}
  return _label_errors(rows.x, rows.y, rows.names, rows.offsets, rows.sizes, num_classes,
                       label_neighbors, seed, exclude, image)


def _value_range(rows: _Rows, value_range: Optional[tuple]) -> tuple[tuple, bool]:
  """(lo, hi) and whether it was declared; else the reference split's finite range."""
  if value_range is not None:
    return (float(value_range[0]), float(value_range[1])), True
  first = rows.first_x
  ref = first.astype(np.float64)[~rows.first_wrong] if len(first) else np.zeros(1)
  fin = ref[np.isfinite(ref)]
  return ((float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)), False


def _base_table(rows: _Rows, task: str, cols: dict, near: dict, num_classes, image) -> dict:
  """The per-example table's identity, label, statistics and nearest-neighbour columns."""
  table = {"split": rows.split, "index": rows.index, "id": rows.id}
  if rows.y.ndim == 1:
    table["label"] = rows.y.astype(np.float64) if task == "regression" else rows.y
  table.update(cols)
  nn = near["nn_index"]
  table["nn_similarity"] = near["nn_similarity"]
  table["nn_split"] = np.where(nn >= 0, rows.split[np.maximum(nn, 0)], "")
  table["nn_id"] = np.where(nn >= 0, rows.id[np.maximum(nn, 0)], -1)
  if task == "classification" and num_classes:
    table["class_distance"] = _class_distance(rows.x, rows.y, num_classes, image,
                                              train_rows=np.arange(rows.sizes[0]))
  return table


def _duplicate_masks(groups, pairs, split_all, n: int) -> tuple:
  """(exact_dup, near_dup, leak) row masks; leak: a copy or near copy in another split."""
  exact_mask = np.zeros(n, bool)
  leak = np.zeros(n, bool)
  for g in groups:
    exact_mask[g] = True
    if len(set(split_all[g])) > 1:
      leak[g] = True
  near_mask = np.zeros(n, bool)
  near_mask[pairs.ravel()] = True
  cross = split_all[pairs[:, 0]] != split_all[pairs[:, 1]] if len(pairs) else np.zeros(0, bool)
  leak[pairs[cross].ravel()] = True
  return exact_mask, near_mask, leak


def _flags(table: dict, masks: list) -> np.ndarray:
  """Each row's findings as 'name;name' (the label_issue column joins when present)."""
  if "label_issue" in table:
    masks = masks + [("label_issue", table["label_issue"])]
  flags = np.full(len(table["split"]), "", dtype=object)
  for key, m in masks:
    flags[m] = flags[m] + key + ";"
  return np.array([f.rstrip(";") for f in flags], dtype=object)


def table_columns(task: str, image: bool, num_classes: Optional[int],
                  label_errors: bool) -> list[str]:
  """The columns of the per-example table, in order (known before any work is done, so a
  filter or sort_by that names no column fails fast)."""
  cols = ["split", "index", "id"] + (["label"] if task != "sequence" else [])
  cols += list(stats_lib.BASE_COLUMNS) + (list(stats_lib.IMAGE_COLUMNS) if image else [])
  cols += ["nn_similarity", "nn_split", "nn_id"]
  cols += ["class_distance"] if task == "classification" and num_classes else []
  cols += ["exact_dup", "near_dup", "leak", "corrupt", "bad_label"]
  if label_errors:
    cols += ["predicted", "p_label", "label_issue", "suggested", "p_suggested"]
  return cols + ["flags"]


def will_rank_label_errors(task: str, num_classes: Optional[int], label_neighbors: int,
                           num_train: int) -> bool:
  return bool(task == "classification" and num_classes and label_neighbors
              and num_train > label_neighbors)


def _class_distance(x, y, num_classes, image, train_rows) -> np.ndarray:
  """1 - cosine similarity to the training mean of the example's class (thumbnail space):
  the atypical examples of a class (mislabelled, cropped, another domain) score high."""
  if image:
    def thumbs(v):
      return dup_lib._unit(dup_lib._pool(dup_lib._blur(dup_lib.gray(v))))
    emb = np.concatenate([thumbs(x[s:s + 8192]) for s in range(0, len(x), 8192)]) \
        if len(x) else np.zeros((0, 1))
  else:
    emb = dup_lib.flat_embedding(x)[1]
  yv = np.asarray(y).astype(np.int64)
  ok = (yv >= 0) & (yv < num_classes)
  means = np.zeros((num_classes, emb.shape[1]), np.float32)
  ytr = yv[train_rows]
  for c in range(num_classes):
    sel = train_rows[(ytr == c)]
    if len(sel):
      means[c] = emb[sel].mean(axis=0)
  norms = np.linalg.norm(means, axis=1, keepdims=True)
  means = np.divide(means, norms, out=np.zeros_like(means), where=norms > 0)
  out = np.full(len(x), np.nan)
  out[ok] = 1.0 - (emb[ok] * means[yv[ok]]).sum(axis=1)
  return out


def _label_errors(x_all, y_all, names, offsets, sizes, num_classes, folds, seed, exclude, image):
  """Likely label errors from a leave-one-out k-nearest-neighbour vote (train) and the
  training split's vote for the other splits: every probability is out-of-sample."""
  n = len(x_all)
  train = slice(0, sizes[0])
  held = {s: x_all[offsets[s]:offsets[s] + k] for s, k in zip(names[1:], sizes[1:])}
  oof, held_probs = mistakes_lib.knn_probs(x_all[train], y_all[train], num_classes, k=folds,
                                           held_out=held, image=image, seed=seed)
  probs = np.concatenate([oof] + [held_probs[s] for s in names[1:]])
  yv = np.asarray(y_all).astype(np.int64)
  rows_all, sugg_all, margin_all = [], [], []
  # Thresholds per split: each split's probabilities come from a different model.
  for s, k in zip(names, sizes):
    lo = offsets[s]
    r = mistakes_lib.likely_label_errors(probs[lo:lo + k], yv[lo:lo + k],
                                         slack=1.0 / (folds + 1))  # one vote
    rows_all.append(r["rows"] + lo)
    sugg_all.append(r["suggested"])
    margin_all.append(r["margin"])
  rows = np.concatenate(rows_all)
  sugg = np.concatenate(sugg_all)
  margin = np.concatenate(margin_all)
  keep = ~exclude[rows]
  rows, sugg, margin = rows[keep], sugg[keep], margin[keep]
  order = np.argsort(-margin, kind="stable")
  rows, sugg, margin = rows[order], sugg[order], margin[order]
  pred = np.argmax(probs, axis=1)
  yc = np.clip(yv, 0, num_classes - 1)
  p_label = probs[np.arange(n), yc]
  issue = np.zeros(n, bool)
  issue[rows] = True
  suggested = np.full(n, -1, np.int64)
  suggested[rows] = sugg
  p_suggested = np.full(n, np.nan)
  p_suggested[rows] = probs[rows, sugg]
  acc = {s: float(np.mean(pred[offsets[s]:offsets[s] + k] == yv[offsets[s]:offsets[s] + k]))
         for s, k in zip(names, sizes) if k}
  summary = {
      "method": "confident learning: per-class thresholds t_j = mean p_j over examples "
                "labelled j, less one vote; flagged when the most probable class above its "
                "threshold and the top class both differ from the label; ranked by "
                "p_suggested - p_label",
      "source": f"leave-one-out {folds}-nearest-neighbour vote of {names[0]} (cosine "
                f"similarity of the first {mistakes_lib.PCA_DIMS} principal components; an "
                f"example's own label never votes); the other splits' neighbours are "
                f"{names[0]} examples",
      "model_accuracy": acc, "count": int(len(rows)),
      "by_split": summary_lib.by_split(
          issue, np.concatenate([np.full(k, s) for s, k in zip(names, sizes)]), names)}
  extra = {"predicted": pred, "p_label": p_label, "label_issue": issue,
           "suggested": suggested, "p_suggested": p_suggested}
  return rows, summary, extra
