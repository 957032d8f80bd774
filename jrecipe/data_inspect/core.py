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


def _ref(split: str, ident, label) -> dict:
  out = {"split": split, "id": int(ident)}
  if label is not None and np.ndim(label) == 0:
    f = float(label)
    out["label"] = int(f) if np.isfinite(f) and f == int(f) else f
  return out


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
  x_all = np.concatenate([x.astype(dtype, copy=False) for x in xs]) if xs else np.zeros(0)
  y_all = np.concatenate(ys)
  id_all = np.concatenate(ids)
  wrong_all = np.concatenate(wrongs)
  split_all = np.concatenate([np.full(len(x), s) for s, x in zip(names, xs)])
  index_all = np.concatenate([np.arange(len(x)) for x in xs])
  offsets = dict(zip(names, np.cumsum([0] + [len(x) for x in xs])[:-1].tolist()))
  n = len(x_all)
  image = stats_lib.is_image(shape, task)
  if value_range is None:
    ref = xs[0].astype(np.float64)[~wrongs[0]] if len(xs[0]) else np.zeros(1)
    fin = ref[np.isfinite(ref)]
    value_range = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
    declared = False
  else:
    declared = True
  value_range = (float(value_range[0]), float(value_range[1]))

  # --- per-example statistics and corrupt records ---------------------------------------
  cols = stats_lib.example_stats(x_all, image=image, value_range=value_range)
  for c in cols:
    if c != "non_finite":
      cols[c][wrong_all] = np.nan
  corrupt = stats_lib.corrupt_masks(x_all, cols, value_range=value_range, wrong_shape=wrong_all)
  bad_label = stats_lib.label_masks(y_all, task, num_classes)

  # --- exact duplicates (content hash) ---------------------------------------------------
  hashes = dup_lib.content_hashes(x_all)
  hashes[wrong_all] = [f"wrong_shape:{i}" for i in np.flatnonzero(wrong_all)]
  groups = dup_lib.exact_groups(hashes)

  # --- near duplicates -------------------------------------------------------------------
  near = dup_lib.near_duplicates(x_all, image=image, threshold=near_dup_threshold, k=neighbors,
                                 max_shift=max_shift, exclude_same=hashes)
  pairs = near["pairs"]

  # --- the table ---------------------------------------------------------------------------
  scalar_labels = y_all.ndim == 1
  table = {"split": split_all, "index": index_all, "id": id_all}
  if scalar_labels:
    table["label"] = y_all.astype(np.float64) if task == "regression" else y_all
  table.update(cols)
  nn = near["nn_index"]
  table["nn_similarity"] = near["nn_similarity"]
  table["nn_split"] = np.where(nn >= 0, split_all[np.maximum(nn, 0)], "")
  table["nn_id"] = np.where(nn >= 0, id_all[np.maximum(nn, 0)], -1)
  if task == "classification" and num_classes:
    table["class_distance"] = _class_distance(x_all, y_all, num_classes, image,
                                              train_rows=np.arange(len(xs[0])))
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
  any_corrupt = np.zeros(n, bool)
  for m in corrupt.values():
    any_corrupt |= m
  table.update(exact_dup=exact_mask, near_dup=near_mask, leak=leak, corrupt=any_corrupt,
               bad_label=bad_label)

  # --- likely label errors from out-of-sample predictions of a cheap model ---------------
  issues = None
  label_summary = {"skipped": "classification only" if task != "classification" else
                   "label_neighbors=0"}
  if will_rank_label_errors(task, num_classes, label_neighbors, len(xs[0])):
    issues, label_summary, extra = _label_errors(
        x_all, y_all, names, offsets, [len(x) for x in xs], num_classes, label_neighbors, seed,
        bad_label | any_corrupt, image)
    table.update(extra)

  flags = np.full(n, "", dtype=object)
  for key, m in [("exact_dup", exact_mask), ("near_dup", near_mask), ("leak", leak),
                 ("bad_label", bad_label)] + list(corrupt.items()) + (
                     [("label_issue", table["label_issue"])] if "label_issue" in table else []):
    flags[m] = flags[m] + key + ";"
  table["flags"] = np.array([f.rstrip(";") for f in flags], dtype=object)
  assert list(table) == table_columns(task, image, num_classes, label_neighbors and (
      issues is not None)), "table_columns() is out of date"

  # --- the summary ---------------------------------------------------------------------------
  def refs(rows):
    return [_ref(split_all[r], id_all[r], y_all[r] if scalar_labels else None)
            for r in list(rows)[:top_k]]

  per_split = {}
  for s, y in zip(names, ys):
    per_split[s] = stats_lib.class_counts(y, num_classes) if task != "regression" else {
        "count": int(len(y))}
  summary = {
      "dataset": name, "task": task, "splits": {s: int(len(x)) for s, x in zip(names, xs)},
      "example_shape": list(shape), "image": bool(image), "num_classes": num_classes,
      "value_range": list(value_range), "value_range_declared": declared,
      "per_split": per_split,
      "bad_labels": {"count": int(bad_label.sum()), "by_split": _by_split(bad_label, split_all,
                                                                           names),
                     "examples": refs(np.flatnonzero(bad_label))},
  }
  within = collections.Counter()
  across = collections.Counter()
  conflicts = 0
  for g in groups:
    ss = sorted(set(split_all[g]), key=names.index)
    if len(ss) == 1:
      within[ss[0]] += 1
    else:
      across["/".join(ss)] += 1
    if scalar_labels and len(set(y_all[g].tolist())) > 1:
      conflicts += 1
  summary["exact_duplicates"] = {
      "method": "BLAKE2b-128 hash of each example's stored bytes",
      "groups": len(groups), "examples": int(sum(len(g) for g in groups)),
      "extra_copies": int(sum(len(g) - 1 for g in groups)),
      "within_split": dict(within), "across_splits": dict(across),
      "conflicting_labels": conflicts,
      "example_groups": [refs(g) for g in groups[:top_k]]}
  nwithin, nacross = collections.Counter(), collections.Counter()
  for a, b in pairs:
    sa, sb = split_all[a], split_all[b]
    if sa == sb:
      nwithin[sa] += 1
    else:
      nacross["/".join(sorted((sa, sb), key=names.index))] += 1
  summary["near_duplicates"] = {
      "similarity": near["description"], "threshold": float(near_dup_threshold),
      "pairs": int(len(pairs)), "examples": int(near_mask.sum()),
      "within_split": dict(nwithin), "across_splits": dict(nacross),
      "example_pairs": [{"a": refs([a])[0], "b": refs([b])[0], "similarity": float(v)}
                        for (a, b), v in list(zip(pairs, near["similarity"]))[:top_k]]}
  summary["leakage"] = {
      "examples": int(leak.sum()), "by_split": _by_split(leak, split_all, names),
      "exact_groups_across_splits": int(sum(across.values())),
      "near_pairs_across_splits": int(sum(nacross.values())),
      "examples_listed": refs(np.flatnonzero(leak))}
  summary["corrupt"] = {"count": int(any_corrupt.sum()),
                        "by_split": _by_split(any_corrupt, split_all, names)}
  for k, m in corrupt.items():
    summary["corrupt"][k] = {"count": int(m.sum()), "by_split": _by_split(m, split_all, names),
                             "examples": refs(np.flatnonzero(m))}
  summary["corrupt"]["out_of_range"]["range"] = list(value_range)
  summary["corrupt"]["wrong_shape"]["expected_shape"] = list(shape)
  summary["statistics"] = {
      c: {"min": _num(np.nanmin(cols[c])) if n else None,
          "median": _num(np.nanmedian(cols[c])) if n else None,
          "max": _num(np.nanmax(cols[c])) if n else None,
          "description": stats_lib.COLUMN_DOCS[c]} for c in cols}
  if issues is not None:
    label_summary["examples"] = [
        {**refs([r])[0], "suggested": int(table["suggested"][r]),
         "p_label": float(table["p_label"][r]), "p_suggested": float(table["p_suggested"][r])}
        for r in issues[:top_k]]
  summary["label_errors"] = label_summary
  return Findings(summary=summary, table=table, x=x_all, image=image, value_range=value_range,
                  class_names=class_names, near_pairs=pairs,
                  near_similarity=near["similarity"], exact_groups=groups,
                  label_issues=issues)


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


def _num(v) -> Optional[float]:
  v = float(v)
  return v if np.isfinite(v) else None


def _by_split(mask, split_all, names) -> dict:
  return {s: int(np.sum(mask & (split_all == s))) for s in names}


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
      "by_split": _by_split(issue, np.concatenate([np.full(k, s) for s, k in zip(names, sizes)]),
                            names)}
  extra = {"predicted": pred, "p_label": p_label, "label_issue": issue,
           "suggested": suggested, "p_suggested": p_suggested}
  return rows, summary, extra
