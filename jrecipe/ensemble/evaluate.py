"""Ensemble predictions and metrics over a whole split (recipe: 'squeeze out the juice').

Each member's apply is jitted once and run over the split in fixed-size batches (the last one
padded, so one compile per member); per-member log-probabilities come back to the host and
are combined in float64:

  combine='prob'  (default): p(y|x) = mean_m softmax(f_m(x))  -- the usual deep ensemble;
  combine='logit':           p(y|x) = softmax(mean_m f_m(x))  -- geometric mean of members.

Sequence tasks ([B, T] labels) average per-token probabilities the same way; accuracy and NLL
are then per token.
"""

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from jrecipe.errors import UserError

COMBINES = ("prob", "logit")
DEFAULT_BATCH = 512

_JIT_CACHE: dict = {}


def _predict_fn(model, outputs: str):
  """jit(model.apply) returning log_softmax (outputs='logp') or raw outputs ('logits')."""
  key = (id(model.apply), outputs)
  fn = _JIT_CACHE.get(key)
  if fn is None:
    def f(variables, x):
      out = model.apply(variables, x, train=False)
      out = out.astype(jnp.float32)
      return jax.nn.log_softmax(out, axis=-1) if outputs == "logp" else out
    fn = jax.jit(f)
    _JIT_CACHE[key] = (fn, model)  # keep model alive so id() stays unique
    return fn
  return fn[0]


def member_outputs(member, x: np.ndarray, *, outputs: str = "logp",
                   batch_size: int = DEFAULT_BATCH) -> np.ndarray:
  """One member's log-probabilities ('logp') or logits ('logits') on all of `x`, float32.

  `x` may be a streamed split's `StreamColumn`: it is read one batch at a time."""
  if not hasattr(x, "take"):
    x = np.asarray(x)
  if tuple(x.shape[1:]) != tuple(member.spec.input_shape):
    raise UserError(f"Member {member.name!r} takes inputs of shape {member.spec.input_shape}, "
                    f"got {x.shape[1:]}.")
  n = len(x)
  if n == 0:
    raise UserError("Cannot evaluate an ensemble on an empty split.")
  bs = int(min(batch_size, n))
  fn = _predict_fn(member.model, outputs)
  chunks = []
  for start in range(0, n, bs):
    xb = x[start:start + bs]
    real = len(xb)
    if real < bs:  # pad with copies of row 0: one compiled shape per member
      xb = np.concatenate([xb, np.repeat(x[:1], bs - real, axis=0)])
    chunks.append(np.asarray(fn(member.variables, xb))[:real])
  return np.concatenate(chunks)


def combine_outputs(per_member: Sequence[np.ndarray], combine: str = "prob") -> np.ndarray:
  """The ensemble's log-probabilities (float64) from members' log-probs or logits.

  combine='prob': per_member are log-probabilities; returns log(mean_m exp(logp_m)).
  combine='logit': per_member are logits; returns log_softmax(mean_m logits_m).
  """
  if combine not in COMBINES:
    raise UserError(f"ensemble combine must be one of {COMBINES}, got {combine!r}.")
  if not per_member:
    raise UserError("An ensemble needs at least one member.")
  stack = np.stack([np.asarray(a, np.float64) for a in per_member])
  if combine == "prob":
    return logsumexp(stack, axis=0) - np.log(len(per_member))
  mean = stack.mean(axis=0)
  return mean - logsumexp(mean, axis=-1, keepdims=True)


def ensemble_predict(members: Sequence[Any], x: np.ndarray, *, combine: str = "prob",
                     batch_size: int = DEFAULT_BATCH) -> np.ndarray:
  """The ensemble's class probabilities [N, (T,) C] on `x` (the same inputs for every member)."""
  if combine not in COMBINES:
    raise UserError(f"ensemble combine must be one of {COMBINES}, got {combine!r}.")
  outputs = "logp" if combine == "prob" else "logits"
  per = [member_outputs(m, x, outputs=outputs, batch_size=batch_size) for m in members]
  return np.exp(combine_outputs(per, combine))


def _metrics(logp: np.ndarray, y: np.ndarray) -> dict:
  """Accuracy (with its 95% Wilson interval over the predictions) and mean NLL of
  log-probabilities [N, (T,) C] against int labels [N, (T,)]."""
  from jrecipe.label.mode import wilson
  y = np.asarray(y).astype(np.int64)
  pred = np.argmax(logp, axis=-1)
  nll = -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
  right = pred == y
  return {"accuracy": float(np.mean(right)), "ci95": wilson(int(right.sum()), int(right.size)),
          "nll": float(np.mean(nll))}


def _select_best(members, data, rows: list[dict], split: str, select_split: Optional[str],
                 batch_size: int) -> dict:
  """The best member, chosen on `select_split` (validation) when it is not the scored split.

  Picking the best member on the split that is then reported flatters it (the winner of a
  noisy contest on those very examples), and so understates the ensemble's gain.
  """
  on = split
  if select_split and select_split != split and select_split in data.arrays:
    y = data.arrays[select_split]["y"]
    for m, r in zip(members, rows):
      out = member_outputs(m, _inputs(m, data, select_split), outputs="logits",
                           batch_size=batch_size).astype(np.float64)
      sel = _metrics(out - logsumexp(out, axis=-1, keepdims=True), y)
      r[f"{select_split}_accuracy"], r[f"{select_split}_nll"] = sel["accuracy"], sel["nll"]
    on = select_split
  key = (lambda r: (r[f"{on}_accuracy"], -r[f"{on}_nll"])) if on != split else (
      lambda r: (r["accuracy"], -r["nll"]))
  best = max(rows, key=key)
  return {"name": best["name"], "accuracy": best["accuracy"], "ci95": best["ci95"],
          "nll": best["nll"], "chosen_on": on,
          **({f"{on}_accuracy": best[f"{on}_accuracy"]} if on != split else {})}


def _inputs(member, data, split: str) -> np.ndarray:
  """A member's own inputs of `split` (its own preprocessing), else those of `data`."""
  source = member.data if member.data is not None else data
  if source is None:
    raise UserError(f"No data to evaluate member {member.name!r} on: pass `data`.")
  if split not in source.arrays:
    raise UserError(f"Unknown split {split!r}. Valid splits: {', '.join(source.arrays)}.")
  return source.arrays[split]["x"]


def evaluate_ensemble(members: Sequence[Any], data: Any = None, split: str = "test",
                      combine: str = "prob", *, batch_size: int = DEFAULT_BATCH,
                      return_probs: bool = False,
                      select_split: Optional[str] = "validation") -> dict:
  """Each member's and the ensemble's accuracy and mean NLL on the whole `split`.

  Args:
    members: `Member`s (see `jrecipe.ensemble.members`), one dataset.
    data: a `Dataset` with the split's labels (default: the first member's).
    split: 'train', 'validation' or 'test'.
    combine: 'prob' (mean of probabilities) or 'logit' (mean of logits).
    return_probs: also return the ensemble probabilities under 'probs' (not JSON).
    select_split: the split the best member is chosen on ('validation'; the scored split
      itself when the data has no such split, which `best_member['chosen_on']` says).

  Returns:
    {'split', 'count', 'combine', 'members': [{'name', 'accuracy', 'nll', ...}],
     'ensemble': {'accuracy', 'nll'}, 'best_member': {...}, 'mean_member': {...},
     'gain': ensemble - best member accuracy (a fraction, like accuracy),
     'gain_points': the same in percentage points, 'nll_gain': best member NLL - ensemble NLL}.
    Each accuracy carries 'ci95', its Wilson interval over the split's predictions.
  """
  from jrecipe.ensemble.members import check_same_dataset
  members = list(members)
  check_same_dataset(members)
  if combine not in COMBINES:
    raise UserError(f"ensemble combine must be one of {COMBINES}, got {combine!r}.")
  data = data if data is not None else members[0].data
  if data is None or split not in data.arrays:
    raise UserError(f"Unknown split {split!r}" + (
        f". Valid splits: {', '.join(data.arrays)}." if data is not None else "."))
  y = data.arrays[split]["y"]
  rows, logps, logits = [], [], []
  for m in members:
    x = _inputs(m, data, split)
    if len(x) != len(y):
      raise UserError(f"Member {m.name!r} has {len(x)} {split} examples, the labels {len(y)}.")
    out = member_outputs(m, x, outputs="logits", batch_size=batch_size).astype(np.float64)
    lp = out - logsumexp(out, axis=-1, keepdims=True)
    logps.append(lp)
    if combine == "logit":
      logits.append(out)
    rows.append({"name": m.name, **_metrics(lp, y), "workdir": m.workdir, "step": m.step,
                 "ema": m.ema, "model": getattr(m.model, "name", None)})
  ens_logp = combine_outputs(logps if combine == "prob" else logits, combine)
  ens = _metrics(ens_logp, y)
  best = _select_best(members, data, rows, split, select_split, batch_size)
  preds = np.stack([np.argmax(lp, axis=-1) for lp in logps])
  ens_pred = np.argmax(ens_logp, axis=-1)
  result = {
      "split": split, "count": int(len(y)), "combine": combine, "num_members": len(members),
      "members": rows,
      "ensemble": {**ens, "disagreement": float(np.mean(preds != ens_pred[None]))},
      "best_member": best,
      "mean_member": {"accuracy": float(np.mean([r["accuracy"] for r in rows])),
                      "nll": float(np.mean([r["nll"] for r in rows]))},
      "gain": ens["accuracy"] - best["accuracy"],
      "gain_points": 100.0 * (ens["accuracy"] - best["accuracy"]),
      "nll_gain": best["nll"] - ens["nll"],
  }
  if return_probs:
    result["probs"] = np.exp(ens_logp)
  return result


def format_table(result: dict) -> str:
  """A plain-text table of `evaluate_ensemble`'s result."""
  name_w = max([len("ensemble")] + [len(r["name"]) for r in result["members"]]) + 2
  on = result["best_member"].get("chosen_on", result["split"])
  lines = [f"Ensemble of {result['num_members']} on {result['split']} ({result['count']} "
           f"examples, combine={result['combine']}); accuracy with its 95% Wilson interval:",
           f"  {'member':<{name_w}}{'accuracy':>10}{'95% interval':>18}{'nll':>10}"]

  def ci(r):
    lo, hi = r.get("ci95") or (float("nan"), float("nan"))
    return f"{lo:.4f}-{hi:.4f}"
  for r in result["members"]:
    mark = (f"  <- best member (chosen on {on})"
            if r["name"] == result["best_member"]["name"] else "")
    lines.append(f"  {r['name']:<{name_w}}{r['accuracy']:>10.4f}{ci(r):>18}{r['nll']:>10.4f}"
                 f"{mark}")
  e = result["ensemble"]
  lines.append(f"  {'ensemble':<{name_w}}{e['accuracy']:>10.4f}{ci(e):>18}{e['nll']:>10.4f}")
  lines.append(f"  gain over the best member: {result['gain_points']:+.2f} accuracy points, "
               f"NLL {-result['nll_gain']:+.4f}")
  return "\n".join(lines)
