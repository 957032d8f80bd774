"""Writing what `inspect_splits` found: summary.json, examples.csv, PNG grids, console lines.

Recipe stage 1, 'become one with the data': the files are for looking (grids of the outliers at
both ends of every axis, per-class means and samples, duplicates, corrupt records, likely
label errors) and for searching (the per-example table). Everything is written atomically.
"""

import os
from typing import Optional

import numpy as np

from jrecipe.data_inspect import grids
from jrecipe.data_inspect import table as table_lib
from jrecipe.train.writer import write_json_atomic

# Axes whose two ends are drawn in outliers.png (those present in the table).
OUTLIER_AXES = ("mean", "std", "min", "max", "norm", "ink", "com_row", "com_col", "edge",
                "class_distance", "nn_similarity", "p_label")


def _image(f, row: int) -> np.ndarray:
  x = f.x[row]
  return x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x


def _label(f, row: int) -> str:
  if "label" not in f.table:
    return ""
  v = f.table["label"][row]
  try:
    i = int(v)
  except (TypeError, ValueError):
    return str(v)
  if float(v) != i:
    return f"{float(v):.3g}"
  names = f.class_names
  if names and 0 <= i < len(names) and str(names[i]) != str(i):
    return f"{i}:{names[i]}"[:10]
  return str(i)


def _who(f, row: int) -> str:
  """'tr:793' for train example id 793 (first two letters of the split)."""
  return f"{str(f.table['split'][row])[:2]}:{int(f.table['id'][row])}"


def _fmt(v) -> str:
  v = float(v)
  return "nan" if np.isnan(v) else f"{v:.3g}"


def _grid_rows(f, rows, caption, per_row: int) -> tuple[list, list]:
  rows = list(rows)
  tiles, caps = [], []
  for start in range(0, len(rows), per_row):
    chunk = rows[start:start + per_row]
    tiles.append([_image(f, r) for r in chunk])
    caps.append([caption(r) for r in chunk])
  return tiles, caps


def write_grids(f, outdir: str, *, outlier_k: int = 8, samples_per_class: int = 10,
                top_k: int = 32, seed: int = 0, selection=None,
                selection_title: str = "") -> list[str]:
  """The PNG grids of an image dataset; returns the paths written (none for other data).

  Recipe stage 1, 'become one with the data': outliers along every statistic, class means and
  random samples, duplicates side by side, corrupt records, likely label errors and the rows a
  filter selected.
  """
  if not f.image or len(f.x) == 0:
    return []
  out = [_outlier_grid(f, outdir, outlier_k)]
  if "label" in f.table and f.summary.get("num_classes"):
    out += [_class_means_grid(f, outdir),
            _samples_grid(f, outdir, samples_per_class, np.random.default_rng(seed))]
  out += [_duplicates_grid(f, outdir, top_k), _corrupt_grid(f, outdir, top_k),
          _label_errors_grid(f, outdir, top_k)]
  if selection is not None and len(selection):
    srows, scaps = _grid_rows(f, selection[:max(top_k, 1)],
                              lambda r: f"{_who(f, r)} y{_label(f, r)}", 8)
    out.append(grids.save_grid(os.path.join(outdir, "selection.png"), srows, scaps,
                               value_range=f.value_range, title=selection_title))
  return [p for p in out if p]


def _outlier_grid(f, outdir: str, outlier_k: int) -> Optional[str]:
  """Outliers at both ends of every axis (None when no axis has finite values)."""
  t = f.table
  rows, caps, labels = [], [], []
  for axis in OUTLIER_AXES:
    if axis not in t:
      continue
    col = np.asarray(t[axis], np.float64)
    ok = np.flatnonzero(np.isfinite(col))
    if len(ok) == 0:
      continue
    order = ok[np.argsort(col[ok], kind="stable")]
    k = min(outlier_k, len(order))
    low, high = order[:k], order[::-1][:k][::-1]
    rows.append([_image(f, r) for r in low] + [_image(f, r) for r in high])
    caps.append([f"{_label(f, r)} {_fmt(col[r])}" for r in list(low) + list(high)])
    labels.append(f"{axis}: low | high")
  if not rows:
    return None
  return grids.save_grid(
      os.path.join(outdir, "outliers.png"), rows, caps, row_labels=labels,
      value_range=f.value_range, gap_after=outlier_k,
      title=f"Outliers along every axis: the {outlier_k} lowest | {outlier_k} highest "
            "(caption: label value)")


def _class_means_grid(f, outdir: str) -> Optional[str]:
  """The mean image of every class, one row per split."""
  t = f.table
  c = int(f.summary["num_classes"])
  y = np.asarray(t["label"])
  splits = list(f.summary["splits"])
  mrows, mcaps = [], []
  for s in splits:
    sel = np.asarray(t["split"]) == s
    row, cap = [], []
    for j in range(c):
      m = sel & (y == j)
      row.append(f.x[m].astype(np.float64).mean(axis=0)[..., 0] if m.any() and
                 f.x.shape[-1] == 1 else (f.x[m].astype(np.float64).mean(axis=0) if m.any()
                                          else None))
      cap.append(f"{j} n={int(m.sum())}")
    mrows.append(row)
    mcaps.append(cap)
  return grids.save_grid(os.path.join(outdir, "class_means.png"), mrows, mcaps,
                         row_labels=splits, value_range=f.value_range,
                         title="Mean image per class (rows: splits)")


def _samples_grid(f, outdir: str, samples_per_class: int, rng) -> Optional[str]:
  """Random examples of the first split, one row per class (at most 100 classes)."""
  t = f.table
  y = np.asarray(t["label"])
  splits = list(f.summary["splits"])
  first = np.asarray(t["split"]) == splits[0]
  srows, scaps, slabels = [], [], []
  for j in range(min(int(f.summary["num_classes"]), 100)):
    pool = np.flatnonzero(first & (y == j))
    pick = rng.choice(pool, min(samples_per_class, len(pool)), replace=False) if len(
        pool) else []
    srows.append([_image(f, r) for r in pick])
    scaps.append([str(int(t["id"][r])) for r in pick])
    slabels.append(f"class {_label_name(f, j)}")
  return grids.save_grid(os.path.join(outdir, "samples.png"), srows, scaps,
                         row_labels=slabels, value_range=f.value_range,
                         title=f"Random {splits[0]} examples per class (caption: id)")


def _duplicates_grid(f, outdir: str, top_k: int) -> Optional[str]:
  """Exact and near duplicates, side by side (None when there are none)."""
  pairs = []
  for g in (f.exact_groups or [])[:top_k]:
    pairs.append((g[0], g[1], "exact"))
  near_sim = f.near_similarity if f.near_similarity is not None else []
  for (a, b), v in list(zip(f.near_pairs if f.near_pairs is not None else [], near_sim))[:top_k]:
    pairs.append((a, b, f"~{v:.3f}"))
  if not pairs:
    return None
  per_row = 4  # pairs per row
  drows, dcaps = [], []
  for start in range(0, len(pairs), per_row):
    chunk = pairs[start:start + per_row]
    drows.append([im for a, b, _ in chunk for im in (_image(f, a), _image(f, b))])
    dcaps.append([c for a, b, kind in chunk for c in (
        f"{_who(f, a)} y{_label(f, a)}", f"{_who(f, b)} {kind}")])
  return grids.save_grid(os.path.join(outdir, "duplicates.png"), drows, dcaps,
                         value_range=f.value_range, title="Duplicates: pairs side by side "
                         "(exact, then near with their similarity); tr:/va:/te: = split:id")


def _corrupt_grid(f, outdir: str, top_k: int) -> Optional[str]:
  """Corrupt records and labels outside the classes (None when there are none)."""
  t = f.table
  bad = np.flatnonzero(np.asarray(t["corrupt"]) | np.asarray(t["bad_label"]))[:top_k]
  if not len(bad):
    return None
  flags = t["flags"]
  crows, ccaps = _grid_rows(f, bad, lambda r: f"{_who(f, r)} {str(flags[r])[:14]}", 8)
  return grids.save_grid(os.path.join(outdir, "corrupt.png"), crows, ccaps,
                         value_range=f.value_range, title="Corrupt records and bad labels")


def _label_errors_grid(f, outdir: str, top_k: int) -> Optional[str]:
  """Likely label errors (out-of-sample votes), given -> suggested; None when none."""
  if f.label_issues is None or not len(f.label_issues):
    return None
  t = f.table
  lrows, lcaps = _grid_rows(
      f, f.label_issues[:top_k], lambda r: f"y{_label(f, r)}->{int(t['suggested'][r])} "
                                           f"p{_fmt(t['p_suggested'][r])}", 8)
  return grids.save_grid(os.path.join(outdir, "label_errors.png"), lrows, lcaps,
                         value_range=f.value_range, title="Likely label errors: given -> "
                         "suggested (p of the suggestion, out-of-sample)")


def _label_name(f, j: int) -> str:
  names = f.class_names
  if names and j < len(names) and str(names[j]) != str(j):
    return f"{j}: {names[j]}"
  return str(j)


def write_findings(f, outdir: str, *, filter_expr: str = "", sort_by: str = "",
                   descending: bool = True, top_k: int = 32, outlier_k: int = 8,
                   samples_per_class: int = 10, seed: int = 0) -> dict:
  """Writes summary.json, examples.csv, the grids and (with a filter or sort) selection.csv.

  The selection is computed FIRST, so a bad filter (UserError) writes nothing.

  Returns:
    The summary as written (with 'files' and, when asked, 'selection').
  """
  selection = None
  title = ""
  if (filter_expr and filter_expr.strip()) or sort_by:
    selection = table_lib.select(f.table, filter_expr, sort_by, descending)
    title = (f"Selection: filter {filter_expr or '(none)'}, sorted by {sort_by or '(table order)'}"
             f"{' descending' if sort_by and descending else ''}: {len(selection)} examples")
  os.makedirs(outdir, exist_ok=True)
  files = []
  path = os.path.join(outdir, "examples.csv")
  table_lib.write_csv(path, f.table)
  files.append(path)
  summary = dict(f.summary)
  summary["table_columns"] = list(f.table)
  if selection is not None:
    spath = os.path.join(outdir, "selection.csv")
    table_lib.write_csv(spath, f.table, selection)
    files.append(spath)
    summary["selection"] = {
        "filter": filter_expr, "sort_by": sort_by, "descending": bool(descending),
        "count": int(len(selection)),
        "examples": [{"split": str(f.table["split"][r]), "id": int(f.table["id"][r])}
                     for r in selection[:top_k]]}
  files += write_grids(f, outdir, outlier_k=outlier_k, samples_per_class=samples_per_class,
                       top_k=top_k, seed=seed, selection=selection, selection_title=title)
  summary["files"] = [os.path.basename(p) for p in files] + ["summary.json"]
  write_json_atomic(os.path.join(outdir, "summary.json"), summary)
  return summary


def console_lines(summary: dict, outdir: Optional[str] = None) -> list[str]:
  """A few lines, numbers first: what `--mode=inspect` prints."""
  s = summary
  sizes = " / ".join(f"{k} {v}" for k, v in s["splits"].items())
  total = sum(s["splits"].values())
  lines = [f"{total} examples ({sizes}) of {s.get('dataset') or 'the dataset'}, shape "
           f"{tuple(s['example_shape'])}, {s.get('num_classes') or 'no'} classes"]
  ratios = [(k, v.get("imbalance_ratio")) for k, v in s["per_split"].items()
            if "class_counts" in v]
  if ratios:
    lines[-1] += "; imbalance (largest/smallest class) " + ", ".join(
        f"{k} {r:.2f}" if r is not None else f"{k} inf (missing classes)" for k, r in ratios)
  e, nd = s["exact_duplicates"], s["near_duplicates"]
  lines.append(f"{e['groups']} exact-duplicate groups ({e['extra_copies']} extra copies, "
               f"{sum(e['across_splits'].values())} across splits, {e['conflicting_labels']} "
               f"with conflicting labels); {nd['pairs']} near-duplicate pairs at similarity >= "
               f"{nd['threshold']:g} ({sum(nd['across_splits'].values())} across splits); "
               f"{s['leakage']['examples']} examples leak across splits")
  c = s["corrupt"]
  lo, hi = c["out_of_range"]["range"]
  lines.append(f"{c['count']} corrupt ({c['non_finite']['count']} non-finite, "
               f"{c['constant']['count']} constant, {c['out_of_range']['count']} outside "
               f"[{lo:g}, {hi:g}], {c['wrong_shape']['count']} of a wrong shape); "
               f"{s['bad_labels']['count']} labels outside the declared classes")
  le = s.get("label_errors", {})
  if "count" in le:
    acc = ", ".join(f"{k} {100 * v:.1f}%" for k, v in le.get("model_accuracy", {}).items())
    lines.append(f"{le['count']} likely label errors (out-of-sample nearest-neighbour vote; its "
                 f"accuracy {acc})")
  if "selection" in s:
    sel = s["selection"]
    ids = ", ".join(f"{r['split']}:{r['id']}" for r in sel["examples"][:8])
    lines.append(f"{sel['count']} examples selected (filter {sel['filter'] or '-'}, sort "
                 f"{sel['sort_by'] or '-'}): {ids}{' ...' if sel['count'] > 8 else ''}")
  if outdir:
    lines.append(f"Wrote {outdir}/: {', '.join(s.get('files', []))}")
  return lines
