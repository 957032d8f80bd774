"""'Become one with the data' (recipe stage 1): the held-out splits are prepared like training.

Every held-out number (the loss at init, the baseline, the validation curve, early stopping,
the search's objective) assumes that validation and test examples enter the model as training
examples do. A data function that scales only the training split, reads the test images
transposed, or splits labels sorted by class before shuffling breaks that silently: training
looks normal, and every held-out figure measures something else.
"""

from typing import Optional

import numpy as np

from jrecipe.checks.base import CheckResult, artifact_path, verdict
from jrecipe.checks.registry import register_check
from jrecipe.types import DataSpec

SAMPLE = 1000  # examples drawn from each split
SCALE_RATIO = 3.0  # held-out std / training std outside [1/3, 3]: fail
OFFSET_STDS = 1.0  # held-out mean more than one training std from the training mean: fail
AUC_WARN, AUC_FAIL = 0.6, 0.85  # a linear classifier tells the split of an input apart
AUC_SE = 4.0  # ...and the AUC is at least 4 standard errors above chance (0.5)
MAX_FEATURES = 1024  # features the classifier sees (images pooled, the rest projected)
UNSEEN_FAIL = 0.01  # held-out examples of a class absent from training / unseen token ids
TOKEN_TV_WARN = 0.25  # total variation between the splits' token frequencies
LABEL_TV_WARN = 0.15  # ...and between their class frequencies, when also significant
LABEL_P = 1e-4  # the chi-square test's p-value under which a label difference is significant


def _scale(xt: np.ndarray, xh: np.ndarray, what: str) -> tuple[Optional[str], dict]:
  """(a fail reason or None, numbers): the held-out values' scale and offset against the
  training values', in training standard deviations."""
  mt, st = float(np.mean(xt)), float(np.std(xt))
  mh, sh = float(np.mean(xh)), float(np.std(xh))
  ratio = sh / st if st > 0 else (1.0 if sh == 0 else np.inf)
  offset = abs(mh - mt) / st if st > 0 else (0.0 if mh == mt else np.inf)
  nums = {"mean_train": mt, "std_train": st, "mean": mh, "std": sh, "std_ratio": ratio,
          "offset_stds": offset}
  if not 1 / SCALE_RATIO <= ratio <= SCALE_RATIO or offset > OFFSET_STDS:
    return ("scale", f"{what} of std {sh:.3g} and mean {mh:.3g} against training's {st:.3g} "
            f"and {mt:.3g} (ratio {ratio:.3g}, offset {offset:.2g} training stds)"), nums
  return None, nums


def _features(x: np.ndarray, image: bool, seed: int) -> np.ndarray:
  """[N, <= MAX_FEATURES] float64 features: images average-pooled to at most 16 x 16 pixels,
  anything still larger projected by a fixed Gaussian matrix (linear: a mean difference of
  the inputs stays a mean difference of the features)."""
  x = np.asarray(x, np.float64)
  if image and x.ndim == 4:
    f = max(1, int(np.ceil(max(x.shape[1], x.shape[2]) / 16)))
    h, w = x.shape[1] // f * f, x.shape[2] // f * f
    x = x[:, :h, :w].reshape(len(x), h // f, f, w // f, f, x.shape[3]).mean(axis=(2, 4))
  x = x.reshape(len(x), -1)
  if x.shape[1] > MAX_FEATURES:
    proj = np.random.default_rng(seed).standard_normal((x.shape[1], MAX_FEATURES))
    x = x @ (proj / np.sqrt(x.shape[1]))
  return x


def two_sample_auc(xt: np.ndarray, xh: np.ndarray, *, image: bool = False,
                   seed: int = 0) -> tuple[float, float, int]:
  """(AUC, its standard error under chance, n per split) of a classifier two-sample test.

  An L2-regularised logistic regression learns to tell held-out inputs from training ones
  (equal numbers of each, features standardised over both), two-fold cross-validated: each
  half is scored by the model fitted on the other, so a classifier that only memorised its
  half scores chance. Splits drawn from one distribution give 0.5 (measured 0.44-0.52 on
  digits and mnist5k); a held-out split read transposed, inverted or scaled gave 1.0.
  """
  from sklearn.linear_model import LogisticRegression
  rs = np.random.default_rng(seed)
  n = min(len(xt), len(xh))
  a = _features(xt[np.sort(rs.choice(len(xt), n, replace=False))], image, seed)
  b = _features(xh[np.sort(rs.choice(len(xh), n, replace=False))], image, seed)
  x = np.concatenate([a, b])
  sd = x.std(axis=0)
  x = (x - x.mean(axis=0)) / np.maximum(sd, 1e-3 * max(float(sd.max()), 1e-12))
  label = np.r_[np.zeros(n), np.ones(n)]
  fold = rs.permutation(2 * n) % 2
  score = np.zeros(2 * n)
  for f in (0, 1):
    clf = LogisticRegression(C=0.1, max_iter=300).fit(x[fold != f], label[fold != f])
    score[fold == f] = clf.decision_function(x[fold == f])
  ranks = np.argsort(np.argsort(score, kind="stable"), kind="stable") + 1.0
  auc = (ranks[n:].sum() - n * (n + 1) / 2) / (n * n)
  return float(auc), float(np.sqrt((2 * n + 1) / (12.0 * n * n))), n


def _tokens(xt: np.ndarray, xh: np.ndarray) -> tuple[Optional[str], Optional[str], dict]:
  """(fail reason, warn reason, numbers) for token-id inputs: held-out ids never seen in the
  training sample, and the distance between the splits' token frequencies."""
  xt, xh = np.asarray(xt, np.int64).ravel(), np.asarray(xh, np.int64).ravel()
  lo = min(int(xt.min()), int(xh.min()), 0)
  size = max(int(xt.max()), int(xh.max())) - lo + 1
  ct, ch = np.bincount(xt - lo, minlength=size), np.bincount(xh - lo, minlength=size)
  unseen = float(ch[ct == 0].sum() / max(1, ch.sum()))
  tv = float(0.5 * np.abs(ct / ct.sum() - ch / ch.sum()).sum())
  nums = {"unseen_token_share": unseen, "token_tv": tv}
  if unseen > UNSEEN_FAIL:
    return ("unseen_tokens", f"{unseen:.1%} of its tokens are ids that never occur in "
            "training"), None, nums
  if tv > TOKEN_TV_WARN:
    return None, ("token_tv", f"token frequencies at total variation {tv:.2f} from "
                  "training's"), nums
  return None, None, nums


def _labels(ct: np.ndarray, ch: np.ndarray) -> tuple[Optional[str], Optional[str], dict]:
  """(fail reason, warn reason, numbers): held-out examples of classes training never shows,
  and a significant difference of class frequencies (a chi-square test of homogeneity)."""
  from scipy import stats
  ct, ch = np.asarray(ct, np.float64), np.asarray(ch, np.float64)
  absent = [int(c) for c in np.flatnonzero((ct == 0) & (ch > 0))]
  share = float(ch[ct == 0].sum() / max(1.0, ch.sum()))
  tv = float(0.5 * np.abs(ct / max(1.0, ct.sum()) - ch / max(1.0, ch.sum())).sum())
  keep = (ct + ch) > 0
  p = float(stats.chi2_contingency(np.stack([ct[keep], ch[keep]]))[1]) if keep.sum() > 1 \
      else 1.0
  nums = {"classes_absent_from_train": absent, "absent_share": share, "label_tv": tv,
          "label_p": p}
  if share > UNSEEN_FAIL:
    return ("absent_classes", f"{share:.0%} of its examples of classes {absent[:8]} that "
            "training never shows"), None, nums
  if tv > LABEL_TV_WARN and p < LABEL_P:
    return None, ("label_tv", f"class frequencies at total variation {tv:.2f} from "
                  f"training's (chi-square p={p:.1g})"), nums
  return None, None, nums


def splits_match(samples: dict, *, spec: Optional[DataSpec] = None,
                 label_counts: Optional[dict] = None, seed: int = 0,
                 artifacts_dir: Optional[str] = None) -> CheckResult:
  """'Become one with the data' (recipe stage 1): each held-out split enters the model as the
  training split does.

  For each held-out split against training (samples of up to SAMPLE examples, as they enter
  the model):
  - the scale of the inputs (and of regression targets): FAIL when the held-out std is over
    3x or under 1/3 of training's, or its mean over one training std away;
  - a classifier two-sample test (`two_sample_auc`, not for token ids): FAIL at AUC >= 0.85
    (a linear classifier tells most held-out inputs from training ones: read transposed,
    flipped, cropped or preprocessed otherwise; digits flipped left-right scored 0.89,
    transposed 1.0), WARN at >= 0.6 (a real distribution shift, or a subtler preprocessing
    difference: half the digits flipped scored 0.64-0.66), either only when the AUC is also
    at least 4 standard errors above 0.5 (random splits of digits and mnist5k: 0.44-0.54);
  - token ids: FAIL when over 1% of the held-out tokens never occur in the training sample,
    WARN when the token frequencies differ by a total variation over 0.25;
  - labels (`label_counts`, whole splits): FAIL when over 1% of the held-out examples are of
    classes training never shows (a split before shuffling), WARN when the class frequencies
    differ (total variation over 0.15 and chi-square p < 1e-4).
  For images it draws the splits' mean images and their difference (`splits_match.png`).

  Args:
    samples: {split: {'x': inputs, 'y': labels}} with 'train' and at least one held-out split.
    spec: the DataSpec (task, token inputs).
    label_counts: {split: class counts} for classification.
    seed, artifacts_dir: the sampling seed; where the picture goes (None: none).

  Returns:
    value = the largest two-sample AUC (token inputs: the largest token total variation).
  """
  from jrecipe.checks.data import _is_image, _is_tokens
  step = "Become one with the data: the held-out splits enter the model as training does"
  held = [s for s in ("validation", "test") if s in samples and len(samples[s]["x"])]
  if "train" not in samples or not held:
    return verdict("splits_match")("skip", f"{step}: no held-out split to compare.")
  xt = np.asarray(samples["train"]["x"])
  tokens, image = _is_tokens(xt, spec), _is_image(xt)
  per, fails, warns = {}, [], []
  for split in held:
    fail, warn, nums = _compare(samples, split, tokens, image, spec, label_counts, seed)
    per[split] = nums
    fails += [(split, *r) for r in fail]
    warns += [(split, *r) for r in warn]
  key = "token_tv" if tokens else "auc"
  value = max(per[s].get(key, 0.0) for s in held)
  expected = (f"tv < {TOKEN_TV_WARN}" if tokens else f"AUC < {AUC_WARN} (fail >= {AUC_FAIL})")
  artifacts = [a for a in [_picture(samples, held, artifacts_dir)] if a] if image and not \
      tokens else []
  result = verdict("splits_match", value=value, expected=expected, details={"splits": per},
                   artifacts=artifacts)
  if fails:
    return result("fail", f"{step}: {_findings(fails)} Every held-out score then measures "
                  "something other than training's data: prepare every split with the same "
                  "code.")
  if warns:
    return result("warn", f"{step}: {_findings(warns)}")
  return result("pass", f"{step}: " + "; ".join(_summary(s, per[s], tokens) for s in held)
                + ".")


# What each kind of finding suggests, said once however many splits show it.
CAUSES = {
    "absent_classes": "split before shuffling (data sorted by label; without a 'validation' "
                      "split jrecipe holds out the last 10% of 'train', so shuffle 'train' "
                      "first), or a class map that differs between splits",
    "scale": "a scaling, offset or normalisation applied to one split only (divided by 255 or "
             "standardised in training and not here, or with other statistics)",
    "read_otherwise": "read or preprocessed otherwise (transposed, flipped, cropped, another "
                      "channel order or normalisation)",
    "shift": "a real distribution shift, or a subtler preprocessing difference",
    "unseen_tokens": "tokenised with another vocabulary, or its ids offset",
    "token_tv": "another tokeniser, or text of another kind",
    "label_tv": "a split that is not stratified, or taken from ordered data (fine for a "
                "deliberately balanced test set)",
}


def _findings(found: list) -> str:
  """'validation: A; test: A: cause of A. ...' from [(split, kind, text)], kinds in order."""
  parts = []
  for kind in dict.fromkeys(k for _, k, _ in found):
    texts = "; ".join(f"{split} {text}" for split, k, text in found if k == kind)
    parts.append(f"{texts}: {CAUSES[kind]}.")
  return " ".join(parts)


def _compare(samples, split, tokens, image, spec, label_counts, seed):
  """([fail reasons], [warn reasons], numbers) of one held-out split against training."""
  xt, xh = np.asarray(samples["train"]["x"]), np.asarray(samples[split]["x"])
  fails, warns, nums = [], [], {"n": int(len(xh))}
  task = spec.task if spec is not None else "classification"
  if label_counts and split in label_counts and task == "classification":
    fail, warn, more = _labels(label_counts["train"], label_counts[split])
    nums.update(more)
    fails += [fail] if fail else []
    warns += [warn] if warn else []
  if tokens:
    fail, warn, more = _tokens(xt, xh)
    nums.update(more)
    fails += [fail] if fail else []
    warns += [warn] if warn else []
  else:
    fail, more = _scale(xt, xh, "inputs")
    nums.update(more)
    fails += [fail] if fail else []
    auc, se, n = two_sample_auc(xt, xh, image=image, seed=seed)
    nums.update(auc=auc, auc_se=se, auc_n=n)
    if auc >= 0.5 + AUC_SE * se and auc >= AUC_WARN and not fails:
      where = (f"inputs told from training ones by a linear classifier with AUC {auc:.2f} "
               f"(chance 0.5 +/- {se:.2f}, {n} of each)")
      (fails if auc >= AUC_FAIL else warns).append(
          ("read_otherwise" if auc >= AUC_FAIL else "shift", where))
  if task == "regression":
    fail, more = _scale(np.asarray(samples["train"]["y"]), np.asarray(samples[split]["y"]),
                        "targets")
    nums.update({f"target_{k}": v for k, v in more.items()})
    fails += [fail] if fail else []
  return fails, warns, nums


def _summary(split: str, nums: dict, tokens: bool) -> str:
  if tokens:
    return (f"{split} token frequencies within total variation {nums['token_tv']:.2f} of "
            f"training's, {nums['unseen_token_share']:.1%} unseen ids")
  text = (f"{split} indistinguishable from training (two-sample AUC {nums['auc']:.2f}, chance "
          f"0.5 +/- {nums['auc_se']:.2f}; std ratio {nums['std_ratio']:.2f}")
  if "label_tv" in nums:
    text += f"; class frequencies within total variation {nums['label_tv']:.2f}"
  return text + ")"


def _picture(samples: dict, held: list, artifacts_dir: Optional[str]) -> Optional[str]:
  """splits_match.png: the mean image of each split and its difference from training's."""
  path = artifact_path(artifacts_dir, "splits_match.png")
  if path is None:
    return None
  from matplotlib.figure import Figure
  mean = {s: np.asarray(samples[s]["x"], np.float64).mean(axis=0) for s in ["train", *held]}
  fig = Figure(figsize=(2.2 * (1 + 2 * len(held)), 2.6))
  axes = fig.subplots(1, 1 + 2 * len(held))
  panels = [("train: mean", mean["train"])]
  for s in held:
    panels += [(f"{s}: mean", mean[s]), (f"{s} - train", mean[s] - mean["train"])]
  for ax, (title, img) in zip(np.ravel(axes), panels):
    img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
    if img.ndim == 3:
      img = (img - img.min()) / max(float(np.ptp(img)), 1e-12)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  return path


def _rows(column, idx: np.ndarray, piece: int = 128) -> np.ndarray:
  """column[idx] read `piece` rows at a time (a streamed column is read by the batch)."""
  if not len(idx):
    return np.asarray(column[idx])
  return np.concatenate([np.asarray(column[idx[i:i + piece]])
                         for i in range(0, len(idx), piece)])


@register_check("splits_match", stage="data")
def check_splits_match(ctx) -> CheckResult:
  """Samples of the Experiment's splits (in memory or streamed: rows read by index) and the
  whole splits' class counts."""
  ds = ctx.exp.data if ctx.exp is not None else None
  arrays = getattr(ds, "arrays", None)
  if not arrays or "train" not in arrays:
    return verdict("splits_match")("skip", "no training split to compare with.")
  rs = np.random.default_rng(ctx.seed)
  samples = {}
  for split, a in arrays.items():
    n = len(a["y"])
    idx = np.sort(rs.choice(n, size=min(n, SAMPLE), replace=False)) if n else np.arange(0)
    samples[split] = {k: _rows(a[k], idx) for k in ("x", "y")}
  counts = None
  if ctx.spec.task == "classification" and ctx.spec.num_classes:
    counts = {s: ds.class_counts(s, ctx.spec.num_classes) for s in arrays}
  return splits_match(samples, spec=ctx.spec, label_counts=counts, seed=ctx.seed,
                      artifacts_dir=ctx.artifacts_dir)
