"""'Visualize just before the net' (recipe stage 2): the exact batch that enters `model(x)`.

The one correct place to look at data is right before `y_hat = model(x)`: after decoding,
preprocessing, normalisation and augmentation. The check draws that batch and tests the
properties every batch must have.
"""

from typing import Optional

import jax.numpy as jnp
import numpy as np

from jrecipe.checks.base import CheckResult, artifact_path, verdict
from jrecipe.checks.registry import register_check
from jrecipe.types import DataSpec

# Warn thresholds for float inputs (see data_before_net's docstring).
MAX_ABS_MEAN = 3.0
MAX_STD = 10.0
MIN_STD = 1e-2
RAW_PIXELS = 30.0  # images with |mean| or std above this fail: raw 0-255 pixels (std ~70-100)


def _is_image(x: np.ndarray) -> bool:
  if x.ndim == 3:
    return min(x.shape[1:]) >= 4
  return x.ndim == 4 and x.shape[-1] in (1, 3, 4) and min(x.shape[1:3]) >= 4


def _is_tokens(x: np.ndarray, spec: Optional[DataSpec]) -> bool:
  if spec is not None and spec.task == "sequence":
    return True
  return np.issubdtype(x.dtype, np.integer) and x.ndim == 2


def _label_text(label, spec: Optional[DataSpec]) -> str:
  label = np.asarray(label)
  if label.ndim == 0 and np.issubdtype(label.dtype, np.integer):
    names = spec.class_names if spec is not None else None
    if names and 0 <= int(label) < len(names) and str(names[int(label)]) != str(int(label)):
      return f"{int(label)}: {names[int(label)]}"[:14]
    return str(int(label))
  if label.size == 1:
    return f"{float(label.ravel()[0]):.3g}"
  return f"[{label.size}]"


def _plot(path: str, x: np.ndarray, y: np.ndarray, spec: Optional[DataSpec], title: str,
          max_examples: int) -> None:
  from matplotlib.figure import Figure
  n = min(len(x), max_examples)
  if _is_image(x) and not _is_tokens(x, spec):
    # One mosaic image (one imshow: fast) with each example's label above its tile.
    imgs = x[:n].astype(np.float64)
    if imgs.ndim == 3:
      imgs = imgs[..., None]
    if imgs.shape[-1] == 4:
      imgs = imgs[..., :3]
    # One colour scale for the whole batch, so relative intensities stay visible.
    lo, hi = float(np.min(imgs)), float(np.max(imgs))
    imgs = (imgs - lo) / (hi - lo) if hi > lo else np.zeros_like(imgs)
    h, w, ch = imgs.shape[1:]
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    pad_top, pad = max(h // 3, 3), 1
    cell_h, cell_w = h + pad_top + pad, w + pad
    mosaic = np.ones((rows * cell_h, cols * cell_w, ch))
    fig = Figure(figsize=(min(1.1 * cols + 0.5, 14), min(1.25 * rows + 0.8, 16)))
    ax = fig.subplots()
    for i in range(n):
      r, c = divmod(i, cols)
      top, left = r * cell_h + pad_top, c * cell_w
      mosaic[top:top + h, left:left + w] = imgs[i]
      ax.text(left + w / 2, top - 0.5, _label_text(y[i], spec) if i < len(y) else "",
              ha="center", va="bottom", fontsize=7)
    ax.imshow(mosaic[..., 0] if ch == 1 else mosaic, cmap="gray" if ch == 1 else None,
              vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    title += f"  (shown rescaled from [{lo:.3g}, {hi:.3g}])"
  else:
    flat = x[:n].reshape(n, -1)
    fig = Figure(figsize=(9, max(3.0, 0.22 * n + 1.2)))
    ax = fig.subplots()
    im = ax.imshow(flat.astype(np.float64), aspect="auto", interpolation="nearest",
                   cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.03)
    ticks = [_label_text(y[i], spec) if i < len(y) else "" for i in range(n)]
    if _is_tokens(x, spec) and spec is not None and spec.class_names:
      names = spec.class_names
      def decode(row):
        return "".join(str(names[t]) if 0 <= t < len(names) else "?" for t in row[:24])
      ticks = [repr(decode(row)) for row in flat.astype(np.int64)]
      if y.ndim == 2 and np.issubdtype(y.dtype, np.integer):
        ticks = [f"{t} -> {decode(row)!r}" for t, row in zip(ticks, y[:n].astype(np.int64))]
      ax.set_xlabel("time step (rows: decoded input -> decoded target)")
    else:
      ax.set_xlabel("feature / time step (flattened)")
    if n <= 64:
      ax.set_yticks(np.arange(n))
      ax.set_yticklabels(ticks, fontsize=6)
    ax.set_ylabel("example (label)")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def data_before_net(x, y, *, spec: Optional[DataSpec] = None,
                    num_classes: Optional[int] = None, artifacts_dir: Optional[str] = None,
                    max_examples: int = 64) -> CheckResult:
  """'Visualize just before the net' (recipe stage 2): look at and test the batch model(x) sees.

  Pass exactly the batch that enters the model, after preprocessing and augmentation.

  Fails when: any input is not finite; a classification label is not an integer in
  [0, num_classes) (or a regression target is not finite); the inputs are constant (std 0
  over the whole batch) or every example in the batch is identical (a broadcast or indexing
  bug). Warns when float inputs look unnormalised: |mean| > 3 or std > 10 (raw pixels 0-255
  have std ~70, raw digits 0-16 mean ~5; a normalised input has mean ~0 and std ~1, and
  [0, 1] images stay below both) or 0 < std < 0.01 (scaled twice); for 2-D feature matrices
  the same limits apply to every feature's mean and std (one feature in the thousands
  dominates a dot product). Images with |mean| > 30 or std > 30 fail: raw 0-255 pixels
  (mean ~33-120, std ~70-100) saturate the first layer, a preprocessing step forgotten (raw
  0-16 digits only warn). Token inputs (integer sequences) are not tested for scale.

  Args:
    x: the inputs [B, ...] as they enter the model.
    y: the labels [B] / [B, T] (int) or targets [B, ...] (float).
    spec: the dataset's DataSpec (task, num_classes, class names for titles), optional.
    num_classes: overrides spec.num_classes for the label range test.
    artifacts_dir: where to write `data_before_net.png`: a grid of the first examples with
      their labels as titles (images), a heatmap of the feature matrix (other data) or of
      the token ids with decoded text (sequences); None writes nothing.
    max_examples: examples drawn.

  Returns:
    A CheckResult with value = [min, max] of the inputs and details with mean, std, shape,
    dtype, label range and counts.
  """
  x = np.asarray(x)
  y = np.asarray(y)
  task = spec.task if spec is not None else (
      "classification" if np.issubdtype(y.dtype, np.integer) else "regression")
  c = num_classes if num_classes is not None else (spec.num_classes if spec else None)
  tokens = _is_tokens(x, spec)
  xf = x.astype(np.float64)
  details = {"shape": list(x.shape), "dtype": str(x.dtype), "task": task}
  problems = _input_problems(x, xf, details)
  problems += _label_problems(y, task, c, details)
  warnings = []
  if not problems and not tokens and np.issubdtype(x.dtype, np.floating) and "mean" in details:
    warnings = _scale_warnings(x, xf, details)
    if warnings and _is_image(x) and max(abs(details["mean"]), details["std"]) > RAW_PIXELS:
      problems, warnings = [warnings[0] + " (raw 0-255 pixels?)"], []
  summary = (f"batch {tuple(x.shape)} {x.dtype}, range [{details.get('min', float('nan')):.4g}, "
             f"{details.get('max', float('nan')):.4g}], mean "
             f"{details.get('mean', float('nan')):.3g}, std {details.get('std', float('nan')):.3g}")
  result = verdict("data_before_net", value=[details.get("min"), details.get("max")],
                   expected="finite, varied, labels in range", details=details)
  if problems:
    result = result("fail", f"Visualize just before the net: {summary}; " +
                    "; ".join(problems) + ".")
  elif warnings:
    result = result("warn", f"Visualize just before the net: {summary}; " +
                    "; ".join(warnings) + ".")
  else:
    result = result("pass", f"Visualize just before the net: {summary}; finite, labels in "
                    "range, not constant; look at the picture.")
  path = artifact_path(artifacts_dir, "data_before_net.png")
  if path and len(x):
    _plot(path, np.nan_to_num(xf) if not tokens else x, y, spec,
          f"just before the net: {result.status}", max_examples)
    result.artifacts.append(path)
  return result


def _input_problems(x: np.ndarray, xf: np.ndarray, details: dict) -> list[str]:
  """Non-finite, empty, constant or identical inputs (details gain min/max/mean/std)."""
  finite = np.isfinite(xf)
  fin_vals = xf[finite]
  details["non_finite"] = int(x.size - finite.sum())
  if fin_vals.size:
    details.update(min=float(fin_vals.min()), max=float(fin_vals.max()),
                   mean=float(fin_vals.mean()), std=float(fin_vals.std()))
  problems = []
  if details["non_finite"]:
    first = int(np.argmax(~finite.reshape(len(x), -1).all(axis=1)))
    problems.append(f"{details['non_finite']} input values are not finite (first in example "
                    f"{first}): a division by a zero std, log of 0, or corrupt files")
  if len(x) == 0:
    problems.append("the batch is empty")
  elif fin_vals.size and details["std"] == 0.0:
    problems.append(f"every input value is {details['min']:.4g}: the batch is constant "
                    "(zeroed or overwritten in preprocessing)")
  elif len(x) > 1 and np.all(x == x[:1]):
    problems.append("every example in the batch is identical (a broadcast or indexing bug)")
  return problems


def _label_problems(y: np.ndarray, task: str, c: Optional[int], details: dict) -> list[str]:
  """Labels that are not class ids in [0, c), or regression targets that are not finite."""
  problems = []
  if task not in ("classification", "sequence"):
    if not np.all(np.isfinite(y.astype(np.float64))):
      problems.append("some regression targets are not finite")
    elif y.size:
      details.update(target_mean=float(y.mean()), target_std=float(y.std()))
    return problems
  if y.size and not (np.issubdtype(y.dtype, np.integer) or
                     (np.all(np.isfinite(y)) and np.all(y == np.round(y)))):
    problems.append(f"labels are not integers (dtype {y.dtype}): one-hot or probabilities "
                    "where class ids are expected")
  elif y.size:
    lo, hi = int(np.min(y)), int(np.max(y))
    details.update(label_min=lo, label_max=hi)
    if c:
      counts = np.bincount(np.clip(y.ravel().astype(np.int64), 0, None), minlength=c)
      details["label_counts"] = counts[:c].tolist()
      if lo < 0 or hi >= c:
        bad = np.unique(y[(y < 0) | (y >= c)])[:10].tolist()
        problems.append(f"labels {bad} are outside [0, {c}): wrong label mapping "
                        "(1-based ids?) or the wrong num_classes")
  return problems


def _scale_warnings(x: np.ndarray, xf: np.ndarray, details: dict) -> list[str]:
  """Float inputs that look unnormalised or squashed (see data_before_net's limits)."""
  m, s = details["mean"], details["std"]
  if abs(m) > MAX_ABS_MEAN or s > MAX_STD:
    return [f"inputs look unnormalised (mean {m:.3g}, std {s:.3g}; expected about 0 and 1): "
            "subtract the mean and divide by the std of the training set"]
  if 0 < s < MIN_STD:
    return [f"inputs are squashed (std {s:.2g}): normalised twice?"]
  if x.ndim == 2 and len(x) > 1:
    fm, fs = xf.mean(axis=0), xf.std(axis=0)
    j = int(np.argmax(np.maximum(np.abs(fm) / MAX_ABS_MEAN, fs / MAX_STD)))
    details.update(worst_feature=j, worst_feature_mean=float(fm[j]),
                   worst_feature_std=float(fs[j]))
    if abs(fm[j]) > MAX_ABS_MEAN or fs[j] > MAX_STD:
      return [f"feature {j} is unnormalised (mean {fm[j]:.3g}, std {fs[j]:.3g}): normalise "
              "each feature"]
  return []


@register_check("data_before_net", stage="data")
def check_data_before_net(ctx) -> CheckResult:
  """The first training batch of the configured pipeline, augmented as step 0 augments it."""
  from jrecipe.data import pipeline
  batch = next(pipeline.train_batches(ctx.exp.data, batch_size=ctx.config.batch_size,
                                      seed=ctx.seed))
  x = batch["x"]
  if ctx.augment is not None:
    k_aug, _ = ctx.step_keys(0)
    x = np.asarray(ctx.augment(jnp.asarray(x), k_aug))
  return data_before_net(x, batch["y"], spec=ctx.spec, artifacts_dir=ctx.artifacts_dir)


LEAK_FAIL_FRACTION = 0.01  # held-out examples that are exact copies of training ones: fail above


def _row_hashes(x: np.ndarray) -> list[bytes]:
  import hashlib
  rows = np.ascontiguousarray(x).reshape(len(x), -1)
  return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]


def split_leakage(arrays: dict) -> CheckResult:
  """'Become one with the data' (recipe stage 1): no held-out example is also a training one.

  Hashes every example's exact bytes (as they enter the model, so the same preprocessing on
  every split) and counts, for the validation and test splits, the examples that are exact
  copies of a training example: test data leaked into training (a concatenation, a split
  taken before de-duplication) makes every held-out number a training number. Fails above
  1% of a held-out split, warns for fewer copies (a dataset's own duplicates); near copies
  are `--mode=inspect`'s job.

  Args:
    arrays: {split: {'x': [N, ...], ...}} with a 'train' split.

  Returns:
    value = the largest fraction of a held-out split found in train; details per split.
  """
  train = set(_row_hashes(np.asarray(arrays["train"]["x"])))
  copies = {}
  for split in ("validation", "test"):
    if split in arrays and len(arrays[split]["x"]):
      hashes = _row_hashes(np.asarray(arrays[split]["x"]))
      copies[split] = (sum(h in train for h in hashes), len(hashes))
  result = verdict("split_leakage", value=max([c / n for c, n in copies.values()], default=0.0),
                   expected=f"0 (fail > {LEAK_FAIL_FRACTION:.0%})",
                   details={"copies_in_train": {k: list(v) for k, v in copies.items()}})
  step = "Become one with the data: held-out examples that are exact copies of training ones"
  found = ", ".join(f"{split} {c} of {n}" for split, (c, n) in copies.items())
  if not copies:
    return result("skip", f"{step}: no validation or test split to compare.")
  if any(c > LEAK_FAIL_FRACTION * n for c, n in copies.values()):
    return result("fail", f"{step}: {found}: held-out data leaked into training (a split "
                  "concatenated into train, or split before de-duplicating): every held-out "
                  "score is a training score.")
  if any(c for c, _ in copies.values()):
    return result("warn", f"{step}: {found}: a few copies (the dataset's own duplicates?); "
                  "`--mode=inspect` lists them.")
  return result("pass", f"{step}: none ({found}).")


@register_check("split_leakage", stage="data")
def check_split_leakage(ctx) -> CheckResult:
  """The Experiment's in-memory splits (a streaming source is skipped, saying so)."""
  arrays = getattr(ctx.exp.data, "arrays", None) if ctx.exp is not None else None
  if not arrays or "train" not in arrays:
    return verdict("split_leakage")("skip", "the data source has no in-memory splits to "
                                    "compare (streaming); `--mode=inspect` finds leakage.")
  return split_leakage(arrays)
