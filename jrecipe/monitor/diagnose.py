"""Plain-language diagnoses of a run, computed purely from the files of its work directory.

CS231n's 'babysitting the learning process' and the recipe's 'overfit', 'regularize' and
'tune' stages read curves and ratios; each rule below reads them the same way and, when it
fires, says what it saw (with the numbers), what it likely means, and what to try. The
inputs are DIR/metrics.jsonl (splits 'train', 'train_steps', 'train_epoch', 'validation',
'monitor', 'probe', 'events') and DIR/config.json, so `--mode=report` can rebuild them at any
time. `diagnose(workdir)` returns the list; `write_diagnoses` also writes DIR/diagnoses.json.

Each diagnosis: {'id', 'severity' ('problem' | 'warning'), 'title', 'message', 'numbers'}.
Ids: loss_exploding, lr_too_high, lr_too_low, overfitting, capacity_too_low, loss_plateau,
loss_linear, loss_fast_then_stuck, loss_noisy, loss_hockey_stick, init_dead_units,
init_saturated_units, units_died.
"""

import json
import math
import os
from typing import Optional

import numpy as np

from jrecipe import storage

# Defaults for work directories whose config.json predates (or lacks) the monitor fields.
RATIO_LOW, RATIO_HIGH = 1e-4, 1e-2
DEAD_AT_INIT = 0.3  # fraction of ReLUs dead on the probe batch at step 0
SATURATED_AT_INIT = 0.2  # fraction of tanh/sigmoid outputs beyond +-0.99 at step 0
POOR_ACCURACY = 0.9  # final training accuracy below this, with no gap: capacity too low
WEIGHT_LEAVES = ("kernel", "embedding", "w", "weight")
EXPLODE_FACTOR = 3.0  # a training loss above 3x the loss at init: diverged
# Diagnoses that read a run as under-driven (or as a capacity/generalisation question); a
# diverged run produces their symptoms too (exploded weights make every update ratio tiny,
# a loss stuck at 4e19 is flat), so they are not applied once a rate-too-high cause is found.
TOO_LOW_SIDE = ("lr_too_low", "loss_plateau", "loss_linear", "capacity_too_low", "overfitting",
                "loss_hockey_stick", "loss_noisy")
TOO_HIGH = ("loss_exploding", "lr_too_high")


def _finite(v) -> Optional[float]:
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if math.isfinite(f) else None


def load_run(workdir: str) -> dict:
  """{'config': dict, 'records': {split: [records]}} of a work directory."""
  from jrecipe.train.writer import read_metrics
  config = {}
  path = os.path.join(workdir, "config.json")
  if storage.exists(path):
    try:
      with storage.open(path) as f:
        config = json.load(f)
    except (OSError, json.JSONDecodeError):
      config = {}
  records: dict[str, list] = {}
  for r in read_metrics(workdir):
    records.setdefault(r.get("split", "train"), []).append(r)
  return {"config": config if isinstance(config, dict) else {}, "records": records}


def _monitor_config(config: dict) -> dict:
  mc = config.get("monitor") if isinstance(config.get("monitor"), dict) else {}
  return {"ratio_low": float(mc.get("ratio_low", RATIO_LOW)),
          "ratio_high": float(mc.get("ratio_high", RATIO_HIGH))}


def _d(id_: str, severity: str, title: str, message: str, **numbers) -> dict:
  return {"id": id_, "severity": severity, "title": title, "message": message,
          "numbers": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in numbers.items()}}


def step_losses(records: dict) -> tuple[np.ndarray, np.ndarray]:
  """(steps, training losses) per step when recorded, else per logged interval."""
  steps, losses = [], []
  for r in records.get("train_steps", []):
    vals = r.get("loss") if isinstance(r.get("loss"), list) else [r.get("loss")]
    first = int(r.get("first_step", r["step"] - len(vals) + 1))
    for i, v in enumerate(vals):
      steps.append(first + i)
      losses.append(_finite(v) if _finite(v) is not None else np.nan)
  if not steps:
    for r in records.get("train", []):
      if "loss" in r:
        steps.append(r["step"])
        losses.append(_finite(r["loss"]) if _finite(r["loss"]) is not None else np.nan)
  return np.asarray(steps, np.float64), np.asarray(losses, np.float64)


def _smooth(x: np.ndarray, w: int) -> np.ndarray:
  if w <= 1 or len(x) < w:
    return x
  pad = np.pad(x, (w // 2, w - 1 - w // 2), mode="edge")
  return np.convolve(pad, np.ones(w) / w, mode="valid")


# --- rules --------------------------------------------------------------------------------
def nonfinite(records: dict) -> list[dict]:
  events = [r for r in records.get("events", []) if "nonfinite_step" in r]
  _, losses = step_losses(records)
  if events:
    s = int(events[0]["nonfinite_step"])
    return [_d("loss_exploding", "problem",
               "TRAINING DIVERGED (NaN/inf): learning rate likely too high",
               f"The loss or a gradient became non-finite at step {s} and training stopped. "
               "Most often the learning rate is too high (try 10x lower); otherwise a log of "
               "zero or a division by zero in the model or loss, or bad inputs.", step=s)]
  finite = losses[np.isfinite(losses)]
  if len(finite) >= 5:
    early = float(np.median(finite[:max(3, len(finite) // 20)]))
    init = _init_loss(records)
    # The loss at init, not the early losses: a run that explodes at its first step has
    # exploded early losses too, and must not read as a plateau at a high level.
    start = init if init is not None else early
    peak = float(np.max(finite[len(finite) // 20:])) if init is None else float(finite.max())
    if start > 0 and peak > EXPLODE_FACTOR * start:
      end = float(np.mean(finite[-max(1, len(finite) // 10):]))
      acc = _final_accuracy(records)
      acc_txt = "" if acc is None else f"; final validation accuracy {acc:.1%}"
      return [_d("loss_exploding", "problem", "TRAINING DIVERGED: learning rate too high",
                 f"The training loss rose to {peak:.4g}, {peak / start:.3g}x the loss at init "
                 f"{start:.4g}, and ends at {end:.4g}{acc_txt}: the learning rate is too high "
                 "(try 10x lower, or warm-up). Rules that would read the exploded weights as "
                 "a rate too low are not applied.", start=start, peak=peak, end=end,
                 final_accuracy=acc)]
  return []


def _init_loss(records: dict) -> Optional[float]:
  """The validation loss at step 0 (or the first training step's), None when not logged."""
  for r in records.get("validation", []):
    if r.get("step") == 0 and _finite(r.get("loss")) is not None:
      return _finite(r["loss"])
  _, losses = step_losses(records)
  return float(losses[0]) if len(losses) and np.isfinite(losses[0]) else None


def _final_accuracy(records: dict) -> Optional[float]:
  val = [r for r in records.get("validation", []) if _finite(r.get("accuracy")) is not None]
  return _finite(val[-1]["accuracy"]) if val else None


def update_ratios(records: dict) -> dict:
  """{'median': float, 'per_leaf': {leaf: median ratio}} over the monitored steps (weights)."""
  per_leaf: dict[str, list] = {}
  for r in records.get("monitor", []):
    for k, v in r.items():
      if k.startswith("update_ratio/") and k.rsplit("/", 1)[-1] in WEIGHT_LEAVES:
        f = _finite(v)
        if f is not None and f > 0:
          per_leaf.setdefault(k[len("update_ratio/"):], []).append(f)
  if not per_leaf:
    return {}
  med = {k: float(np.median(v)) for k, v in per_leaf.items()}
  return {"median": float(np.exp(np.median(np.log(list(med.values()))))), "per_leaf": med,
          "records": len(records.get("monitor", []))}


def learning_rate(records: dict, mc: dict) -> list[dict]:
  u = update_ratios(records)
  if not u:
    return []
  m = u["median"]
  leaves = ", ".join(f"{k} {v:.2g}" for k, v in sorted(u["per_leaf"].items()))
  if m < mc["ratio_low"]:
    return [_d("lr_too_low", "problem", "Learning rate likely too low",
               f"The updates are a tiny fraction of the weights: median update/weight ratio "
               f"{m:.2g} (per weight leaf: {leaves}), far below the ~1e-3 heuristic (rule "
               f"threshold {mc['ratio_low']:.0e}). Raise the learning rate (try 10x; an "
               "lr_find sweep gives the range).",
               median_ratio=m, threshold=mc["ratio_low"], per_leaf=u["per_leaf"])]
  if m > mc["ratio_high"]:
    return [_d("lr_too_high", "problem", "Learning rate likely too high",
               f"Each update changes the weights by a large fraction: median update/weight "
               f"ratio {m:.2g} (per weight leaf: {leaves}), far above the ~1e-3 heuristic "
               f"(rule threshold {mc['ratio_high']:.0e}). Lower the learning rate (try 10x "
               "lower) or add warm-up.",
               median_ratio=m, threshold=mc["ratio_high"], per_leaf=u["per_leaf"])]
  return []


def _epoch_curves(records: dict) -> dict:
  val = {r["epoch"]: r for r in records.get("validation", []) if r.get("epoch", 0) > 0}
  tr = {r["epoch"]: r for r in records.get("train_epoch", [])}
  epochs = sorted(set(val) & set(tr))
  out = {"epoch": np.asarray(epochs)}
  for key in ("loss", "accuracy"):
    t = [_finite(tr[e].get(key)) for e in epochs]
    v = [_finite(val[e].get(key)) for e in epochs]
    if epochs and all(x is not None for x in t + v):
      out[f"train_{key}"], out[f"val_{key}"] = np.asarray(t), np.asarray(v)
  return out


def generalisation(records: dict) -> list[dict]:
  c = _epoch_curves(records)
  if len(c["epoch"]) < 3 or "val_loss" not in c:
    return []
  tl, vl = c["train_loss"], c["val_loss"]
  gap = vl - tl
  best = int(np.argmin(vl))
  out = []
  rise = vl[-1] - vl[best]
  acc_gap = (float(c["train_accuracy"][-1] - c["val_accuracy"][-1])
             if "val_accuracy" in c else None)
  ga = (c["train_accuracy"] - c["val_accuracy"]) if "val_accuracy" in c else None
  rising = (best < len(vl) - 1 and rise > 0.1 * vl[best] and rise > 0.02
            and gap[-1] > max(2 * gap[best], 0.05))
  acc_growing = (ga is not None and ga[-1] > 0.05 and ga[-1] > ga[0] + 0.05
                 and gap[-1] > 0.1 and gap[-1] > tl[-1])
  if rising or acc_growing:
    extra = f"; accuracy gap {acc_gap:.1%}" if acc_gap is not None else ""
    q = 0
    what = (f"Validation loss was lowest at epoch {c['epoch'][best]:.3g} ({vl[best]:.4g}) and "
            f"rose to {vl[-1]:.4g} while the training loss fell to {tl[-1]:.4g}; the loss gap "
            f"grew from {gap[best]:.4g} to {gap[-1]:.4g}{extra}." if rising else
            f"Training accuracy {c['train_accuracy'][-1]:.1%} against validation "
            f"{c['val_accuracy'][-1]:.1%}: the accuracy gap grew from {ga[q]:.1%} at epoch "
            f"{c['epoch'][q]:.3g} to {ga[-1]:.1%} (loss: train {tl[-1]:.4g}, validation "
            f"{vl[-1]:.4g}).")
    out.append(_d("overfitting", "problem", "Overfitting: the train/validation gap grows",
                  f"{what} Regularise (more "
                  "data or augmentation, weight decay, dropout, early stopping, a smaller "
                  "model).", best_epoch=float(c["epoch"][best]), best_val_loss=float(vl[best]),
                  final_val_loss=float(vl[-1]), final_train_loss=float(tl[-1]),
                  gap_at_best=float(gap[best]), final_gap=float(gap[-1]),
                  accuracy_gap=acc_gap))
    return out
  n = len(tl)
  third = max(1, n // 3)
  flat = tl[-third - 1] - tl[-1] < 0.05 * abs(tl[-third - 1]) if n > third else False
  if "train_accuracy" in c:
    ta, va = float(c["train_accuracy"][-1]), float(c["val_accuracy"][-1])
    poor = ta < POOR_ACCURACY and abs(ta - va) < 0.05
    level = f"training accuracy {ta:.1%} and validation accuracy {va:.1%}"
  else:
    first = _finite(records.get("validation", [{}])[0].get("loss"))
    poor = first is not None and tl[-1] > 0.5 * first and abs(gap[-1]) < 0.1 * tl[-1]
    level = f"training loss {tl[-1]:.4g} and validation loss {vl[-1]:.4g}"
  if poor and flat:
    out.append(_d("capacity_too_low", "warning", "Capacity too low (underfitting)",
                  f"Validation tracks training at a poor level ({level}) and the training "
                  "loss has stopped improving: the model cannot fit the training set. Use a "
                  "bigger model (wider, deeper), train longer, or remove regularisation.",
                  final_train_loss=float(tl[-1]), final_val_loss=float(vl[-1])))
  return out


def loss_shape(records: dict) -> list[dict]:
  steps, losses = step_losses(records)
  ok = np.isfinite(losses)
  steps, losses = steps[ok], losses[ok]
  n = len(losses)
  if n < 20:
    return []
  w = max(3, n // 25)
  sm = _smooth(losses, w)
  head = max(3, n // 20)
  start = float(np.mean(losses[:max(2, n // 100 + 1)]))
  end = float(np.mean(losses[-max(3, n // 10):]))
  drop = start - end
  out = []
  if end >= 0.95 * start:
    out.append(_d("loss_plateau", "problem", "Loss plateau from the start",
                  f"The training loss barely moved: {start:.4g} at the start, {end:.4g} at the "
                  "end. The learning rate is likely far too low, or the gradient does not "
                  "reach the parameters (a frozen layer, a detached loss, shuffled labels).",
                  start_loss=start, end_loss=end))
    return out
  x = (steps - steps[0]) / max(steps[-1] - steps[0], 1)
  half = n // 2
  slope1 = float(np.polyfit(x[:half], sm[:half], 1)[0])
  slope2 = float(np.polyfit(x[half:], sm[half:], 1)[0])
  fit = np.polyfit(x, sm, 1)
  r2 = 1 - float(np.sum((sm - np.polyval(fit, x)) ** 2)) / max(
      float(np.sum((sm - sm.mean()) ** 2)), 1e-12)
  if slope1 < 0 and slope2 < 0 and slope2 / slope1 > 0.5 and r2 > 0.95:
    out.append(_d("loss_linear", "warning", "Linear-looking loss decay",
                  f"The training loss falls along a straight line (R^2 {r2:.3f}; slope in the "
                  f"second half {slope2 / slope1:.2f}x the first) from {start:.4g} to {end:.4g}: "
                  "it has not started to level off. The learning rate is likely low: try 3-10x "
                  "higher.", r2=r2, slope_ratio=slope2 / slope1, start_loss=start,
                  end_loss=end))
  early = start - float(np.mean(sm[head:2 * head]))
  late = float(sm[half] - sm[-1])
  resid = losses[half:] - sm[half:]
  noise = float(np.std(resid))
  if drop > 0 and early > 0.8 * drop and late < 0.05 * drop and end > 0.25 * start:
    out.append(_d("loss_fast_then_stuck", "warning", "Fast decay, then stuck high",
                  f"{early / drop:.0%} of the loss decrease happened in the first "
                  f"{2 * head} steps, then it stalled at {end:.4g} ({end / start:.0%} of the "
                  "start): the learning rate is likely too high to settle into a good minimum. "
                  "Lower it, or decay it.", early_fraction=early / drop, end_loss=end,
                  start_loss=start))
  if drop > 0 and noise > 0.15 * drop:
    out.append(_d("loss_noisy", "warning", "Very noisy loss",
                  f"Step-to-step noise in the training loss (std {noise:.4g} around its moving "
                  f"average) is {noise / drop:.0%} of the whole decrease {drop:.4g}: the batch "
                  "is likely too small (or the learning rate too high). Try a larger batch.",
                  noise_std=noise, drop=drop))
  first_val = records.get("validation", [{}])[0]
  measured, expected = _finite(first_val.get("loss")), _finite(
      first_val.get("expected_loss_at_init"))
  k = max(3, n // 50)
  quick = start - float(np.mean(losses[k:2 * k])) if n > 2 * k else 0.0
  high_init = (measured is not None and expected is not None and expected > 0
               and measured > 1.3 * expected)
  if drop > 0 and quick > 0.5 * drop and (high_init or (expected is None and quick > 0.7 * drop)):
    init_txt = (f"the loss at init was {measured:.4g}, expected about {expected:.4g}; "
                if high_init else "")
    out.append(_d("loss_hockey_stick", "warning", "Hockey-stick loss at the start",
                  f"{quick / drop:.0%} of the whole decrease happened in the first {2 * k} "
                  f"steps ({init_txt}'init well'): the first iterations only learn the output "
                  "scale/bias. Initialise the final layer's bias from the class priors "
                  "(config init_bias) and keep the initial logits small.",
                  quick_fraction=quick / drop, init_loss=measured, expected_init_loss=expected))
  return out


def units(records: dict) -> list[dict]:
  probes = records.get("probe", [])
  if not probes:
    return []
  first, last = probes[0], probes[-1]
  out = []
  if first.get("step") == 0:
    dead = {k[len("dead_fraction/"):]: float(v) for k, v in first.items()
            if k.startswith("dead_fraction/") and _finite(v) is not None}
    sat = {k[len("saturated_fraction/"):]: float(v) for k, v in first.items()
           if k.startswith("saturated_fraction/") and _finite(v) is not None}
    bad = {k: v for k, v in dead.items() if v > DEAD_AT_INIT}
    if bad:
      out.append(_d("init_dead_units", "problem", "Dead ReLUs from the start",
                    "At initialisation " + ", ".join(f"{v:.0%} of {k}'s ReLUs" for k, v in
                                                     bad.items())
                    + " never activate on the probe batch: an initialisation problem (biases "
                    "too negative, weights badly scaled, inputs not normalised). Use He "
                    "initialisation and normalised inputs.", dead_fraction=dead,
                    threshold=DEAD_AT_INIT))
    bad = {k: v for k, v in sat.items() if v > SATURATED_AT_INIT}
    if bad:
      out.append(_d("init_saturated_units", "problem", "Saturated units from the start",
                    "At initialisation " + ", ".join(f"{v:.0%} of {k}'s outputs" for k, v in
                                                     bad.items())
                    + " are saturated (tanh/sigmoid beyond +-0.99, where the gradient nearly "
                    "vanishes): an initialisation problem, weights too large. Scale the "
                    "initial weights down (LeCun/Xavier) and normalise the inputs.",
                    saturated_fraction=sat, threshold=SATURATED_AT_INIT))
  if last is not first:
    for k, v in last.items():
      if k.startswith("dead_fraction/") and _finite(v) is not None:
        v0 = _finite(first.get(k)) or 0.0
        if v > 0.5 and v > v0 + 0.3:
          out.append(_d("units_died", "warning", "ReLUs died during training",
                        f"{v:.0%} of {k[len('dead_fraction/'):]}'s ReLUs are dead at step "
                        f"{last['step']} (at step {first.get('step')}: {v0:.0%}): a learning "
                        "rate too high often knocks units into the dead zone.",
                        layer=k[len("dead_fraction/"):], dead_fraction=float(v), before=v0))
  return out


def diagnose(workdir: str) -> list[dict]:
  """Every rule on the files of `workdir`; problems first.

  A diverged run (loss far above the loss at init, non-finite values, update ratios above
  the high threshold) is diagnosed 'learning rate too high' first, and the rules that
  would read it as under-driven (TOO_LOW_SIDE) are not applied. Such a run still exits 0:
  it finished and wrote valid results, and a diverged trial is a legitimate result of a
  learning-rate search; the diagnosis is printed first, titled 'TRAINING DIVERGED'.
  """
  run = load_run(workdir)
  rec, mc = run["records"], _monitor_config(run["config"])
  # Too high first: divergence and explosion are named with their numbers before any rule
  # that could read the same run as a rate too low is considered.
  found = nonfinite(rec) + learning_rate(rec, mc)
  if {d["id"] for d in found} & set(TOO_HIGH):
    found = [d for d in found + units(rec) + loss_shape(rec) if d["id"] not in TOO_LOW_SIDE]
    return sorted(found, key=lambda d: (d["severity"] != "problem", d["id"] not in TOO_HIGH))
  found += generalisation(rec) + loss_shape(rec) + units(rec)
  ids = {d["id"] for d in found}
  if ids & {"lr_too_low", "loss_plateau", "loss_exploding"}:
    # A model that did not train says nothing about its capacity: name the cause only.
    found = [d for d in found if d["id"] != "capacity_too_low"]
  return sorted(found, key=lambda d: d["severity"] != "problem")


def write_diagnoses(workdir: str) -> list[dict]:
  """`diagnose(workdir)`, also written to DIR/diagnoses.json."""
  from jrecipe.train.writer import write_json_atomic
  found = diagnose(workdir)
  u = update_ratios(load_run(workdir)["records"])
  write_json_atomic(os.path.join(workdir, "diagnoses.json"),
                    {"diagnoses": found, "update_ratio_median": u.get("median")})
  return found
