"""Where the model is wrong: mispredictions, confusions and likely label errors.

Recipe stage 1 ends with 'look at your network's mispredictions' and stage 1 itself asks for
noisy labels. Everything here is a plain function of predicted probabilities and labels:

  * `find_mistakes(probs, labels, losses)`: the highest-loss examples, the confidently mispredicted
    ones, the confusion matrix and the most confused pairs of classes.
  * `likely_label_errors(probs, labels)`: confident learning (Northcutt, Jiang and Chuang,
    2021): a per-class threshold t_j = mean predicted probability of class j over the examples
    labelled j; an example labelled i is a likely label error when the most probable class j
    among those with p_j >= t_j is not i and the model's top class is not i either. Ranked by
    the margin p_j - p_i. The probabilities MUST be out-of-sample (a model never trained on
    the example): training-set predictions of a network that memorised its labels agree with
    every wrong label.
  * `knn_probs(x, y, ...)`: such out-of-sample probabilities without any trained network:
    a leave-one-out k-nearest-neighbour vote in the first 32 principal components (an
    example's own label never votes for it); held-out splits vote with the training split.
"""

from typing import Optional

import numpy as np

PCA_DIMS = 32
MAX_PCA_FIT = 4000  # examples used to fit the principal components
KNN = 10


def pca_features(x_train: np.ndarray, others: list, *, standardize: bool,
                 seed: int = 0) -> tuple:
  """Unit-norm rows of the first PCA_DIMS principal components of the centred inputs.

  Images are centred only (standardising each pixel would blow up the near-constant border
  pixels); other data are standardised per feature first. The components come from the
  eigenvectors of the covariance of at most MAX_PCA_FIT training examples.
  """
  from jrecipe.data_inspect.duplicates import _unit

  def flat(v):
    return np.nan_to_num(np.asarray(v, np.float32).reshape(len(v), -1),
                         nan=0.0, posinf=0.0, neginf=0.0)
  n = len(x_train)
  d = int(np.prod(np.shape(x_train)[1:]))
  total, total_sq = np.zeros(d), np.zeros(d)
  for s in range(0, n, 8192):  # moments in chunks: no float copy of the whole split
    v = flat(x_train[s:s + 8192]).astype(np.float64)
    total += v.sum(axis=0)
    total_sq += (v * v).sum(axis=0)
  mean = (total / max(n, 1)).astype(np.float32)
  var = np.maximum(total_sq / max(n, 1) - (total / max(n, 1)) ** 2, 0)
  std = np.sqrt(var) if standardize else np.ones(d)
  std = np.where(std > 1e-12, std, 1.0).astype(np.float32)
  proj = None
  if d > PCA_DIMS:
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, min(n, MAX_PCA_FIT), replace=False))
    fit = (flat(np.asarray(x_train)[pick]) - mean) / std
    cov = (fit.T.astype(np.float64) @ fit) / max(len(fit) - 1, 1)
    _, vecs = np.linalg.eigh(cov)
    proj = vecs[:, ::-1][:, :PCA_DIMS].astype(np.float32)

  def tr(v):
    out = []
    for s in range(0, len(v), 8192):
      z = (flat(v[s:s + 8192]) - mean) / std
      out.append(_unit(z @ proj if proj is not None else z))
    return np.concatenate(out) if out else np.zeros((0, PCA_DIMS), np.float32)
  return tr(x_train), [tr(o) for o in others]


def knn_probs(x: np.ndarray, y: np.ndarray, num_classes: int, *, k: int = KNN,
              held_out: Optional[dict] = None, image: bool = True,
              seed: int = 0) -> tuple[np.ndarray, dict]:
  """Out-of-sample class probabilities from a leave-one-out k-nearest-neighbour vote.

  Each training example is predicted from the labels of its k most similar OTHER training
  examples (cosine similarity of the first PCA_DIMS principal components): leave-one-out
  cross-validation, so its own label never votes. Held-out examples are predicted from
  their k nearest training examples. Probabilities are (votes + prior) / (k + 1), the
  prior being the training class frequencies.

  Args:
    x, y: training inputs [N, ...] and int labels [N] (labels outside [0, C) do not vote).
    num_classes: C.
    k: neighbours.
    held_out: optional {split: inputs}.
    image: centre only (images) or standardise (other data) before the PCA.
    seed: PCA subsample.

  Returns:
    (probabilities [N, C] for x, {split: probabilities} for held_out).
  """
  from jrecipe.data_inspect.duplicates import neighbours
  y = np.asarray(y).astype(np.int64)
  held_out = held_out or {}
  names = list(held_out)
  f, others = pca_features(x, [held_out[s] for s in names], standardize=not image, seed=seed)
  ok = (y >= 0) & (y < num_classes)
  prior = np.bincount(y[ok], minlength=num_classes) / max(ok.sum(), 1)
  k = int(max(1, min(k, len(y) - 1)))

  def vote(nn):  # nn [M, k] rows of the training split
    yy = np.where(ok[nn], y[nn], num_classes)
    counts = np.zeros((len(nn), num_classes + 1))
    np.add.at(counts, (np.repeat(np.arange(len(nn)), nn.shape[1]), yy.ravel()), 1)
    return (counts[:, :num_classes] + prior) / (nn.shape[1] + 1)

  nn = neighbours(f, f, k + 1)
  self_hit = nn == np.arange(len(f))[:, None]
  # Drop the example itself (or, for exact copies ranked first, the k+1-th neighbour).
  drop = np.where(self_hit.any(axis=1), np.argmax(self_hit, axis=1), k)
  keep = np.ones_like(nn, bool)
  keep[np.arange(len(nn)), drop] = False
  train_probs = vote(nn[keep].reshape(len(nn), k))
  out = {s: vote(neighbours(o, f, k)) for s, o in zip(names, others)}
  return train_probs, out


def likely_label_errors(probs: np.ndarray, labels: np.ndarray, slack: float = 0.0) -> dict:
  """Confident learning on out-of-sample probabilities (see the module docstring).

  Args:
    probs: [N, C] predicted probabilities (out-of-sample!).
    labels: [N] given int labels.
    slack: lowers every threshold t_j by this much. For a k-nearest-neighbour vote, one
      vote (1 / (k + 1)): one wrong neighbour (say a near copy flipped as well) must not
      hide a label error when the class's examples mostly get unanimous votes.

  Returns:
    {'rows': int indices of likely label errors, best first, 'suggested': the class the
     model suggests for each, 'margin': p_suggested - p_given, 'p_given', 'p_suggested',
     'thresholds': per-class t_j}.
  """
  p = np.asarray(probs, np.float64)
  y = np.asarray(labels).astype(np.int64)
  n, c = p.shape if p.ndim == 2 else (0, 0)
  empty = {"rows": np.zeros(0, np.int64), "suggested": np.zeros(0, np.int64),
           "margin": np.zeros(0), "p_given": np.zeros(0), "p_suggested": np.zeros(0),
           "thresholds": []}
  if n == 0:
    return empty
  valid = (y >= 0) & (y < c)
  yv = np.where(valid, y, 0)
  thresholds = np.ones(c)
  for j in range(c):
    sel = valid & (y == j)
    if sel.any():
      thresholds[j] = p[sel, j].mean()
  # - 1e-9: a mean of equal values can round above them.
  above = p >= thresholds[None, :] - slack - 1e-9
  masked = np.where(above, p, -1.0)
  suggested = np.argmax(masked, axis=1)
  has = above.any(axis=1)
  p_given = p[np.arange(n), yv]
  top = np.argmax(p, axis=1)
  issue = valid & has & (suggested != yv) & (top != yv)
  rows = np.flatnonzero(issue)
  margin = p[rows, suggested[rows]] - p_given[rows]
  order = np.argsort(-margin, kind="stable")
  rows = rows[order]
  return {"rows": rows, "suggested": suggested[rows], "margin": margin[order],
          "p_given": p_given[rows], "p_suggested": p[rows, suggested[rows]],
          "thresholds": thresholds.tolist()}


def find_mistakes(probs: np.ndarray, labels: np.ndarray, losses: Optional[np.ndarray] = None,
             top_k: int = 32) -> dict:
  """Highest-loss and confidently mispredicted examples, confusion matrix, confused pairs.

  Args:
    probs: [N, C] predicted probabilities.
    labels: [N] int labels.
    losses: [N] per-example losses (default: -log p_label).
    top_k: how many examples each list keeps.

  Returns:
    {'accuracy', 'errors', 'highest_loss': rows, 'confident_mistakes': rows (mispredicted,
     most confident first), 'predicted', 'p_predicted', 'p_label', 'loss' (arrays [N]),
     'confusion': [C, C] ints (row = label, column = prediction), 'most_confused':
     [{'label', 'predicted', 'count', 'fraction_of_label'}] (largest first)}.
  """
  p = np.asarray(probs, np.float64)
  y = np.asarray(labels).astype(np.int64)
  n, c = p.shape
  pred = np.argmax(p, axis=1)
  p_pred = p[np.arange(n), pred]
  yv = np.clip(y, 0, c - 1)
  p_label = p[np.arange(n), yv]
  loss = (np.asarray(losses, np.float64) if losses is not None
          else -np.log(np.clip(p_label, 1e-12, None)))
  wrong = pred != y
  conf = np.zeros((c, c), np.int64)
  ok = (y >= 0) & (y < c)
  np.add.at(conf, (y[ok], pred[ok]), 1)
  off = conf.copy()
  np.fill_diagonal(off, 0)
  flat = np.argsort(-off, axis=None, kind="stable")
  pairs = []
  per_label = conf.sum(axis=1)
  for f in flat[:10]:
    i, j = divmod(int(f), c)
    if off[i, j] == 0:
      break
    pairs.append({"label": i, "predicted": j, "count": int(off[i, j]),
                  "fraction_of_label": float(off[i, j] / max(per_label[i], 1))})
  wrong_rows = np.flatnonzero(wrong)
  confident = wrong_rows[np.argsort(-p_pred[wrong_rows], kind="stable")][:top_k]
  highest = np.argsort(-np.nan_to_num(loss, nan=np.inf), kind="stable")[:top_k]
  return {"accuracy": float(1 - wrong.mean()) if n else float("nan"),
          "errors": int(wrong.sum()), "highest_loss": highest, "confident_mistakes": confident,
          "predicted": pred, "p_predicted": p_pred, "p_label": p_label, "loss": loss,
          "confusion": conf, "most_confused": pairs}
