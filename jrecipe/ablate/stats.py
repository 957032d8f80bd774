"""The statistics of an ablation: effects, their intervals, and when a verdict is given.

A variant and its base train with the same seeds, and are scored on the same validation
examples, so the honest uncertainty has two sources: seeds (another init and data order) and
the finite split (one example of 270 is 0.37 points, and two runs that differ on the same two
examples in every seed have shown two examples' worth of evidence, not a difference with no
spread). `paired_bootstrap` resamples both at once, paired: the same seeds and the same
examples for base and variant. Below `MIN_SEEDS` seeds no verdict is given: two seeds cannot
tell a change from seed noise.
"""

import math
from typing import Optional, Sequence

import numpy as np

MIN_SEEDS = 3
BOOTSTRAP_SAMPLES = 2000


def effect(base: list[float], variant: list[float], metric: str) -> dict:
  """Improvement of `variant` over `base` (positive = better) and its standard error.

  Base and variant run with the same seeds (same init and data order), so the difference
  is taken per seed (paired) and its spread is the standard error of those differences
  (0 when every seed moved by the same amount: that is no interval, see
  `paired_bootstrap`). Unequal lengths fall back to the unpaired standard error.
  """
  b, v = np.asarray(base, float), np.asarray(variant, float)
  sign = -1.0 if metric == "loss" else 1.0
  se = None
  if len(b) == len(v):
    d = sign * (v - b)
    diff = float(d.mean())
    if len(d) > 1:
      se = float(d.std(ddof=1) / math.sqrt(len(d)))
  else:
    diff = float(sign * (v.mean() - b.mean()))
    if len(b) > 1 and len(v) > 1:
      se = float(math.sqrt(b.var(ddof=1) / len(b) + v.var(ddof=1) / len(v)))
  return {"effect": diff, "se": se, "paired": len(b) == len(v)}


def paired_bootstrap(base: Sequence[np.ndarray], variant: Sequence[np.ndarray], metric: str,
                     samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
  """The 95% interval of the effect, resampling seeds and validation examples, paired.

  Args:
    base, variant: per seed (same order), the per-example score on the validation split
      (accuracy in points: 100 for right, 0 for wrong; or the example's loss).
    metric: 'accuracy' (higher is better) or 'loss' (lower is better).

  Returns:
    (low, high) of the effect (positive = better), (0, 0) for identical predictions.
  """
  d = np.stack([np.asarray(v, float) - np.asarray(b, float) for b, v in zip(base, variant)])
  d = -d if metric == "loss" else d
  if not np.any(d):
    return 0.0, 0.0
  s, n = d.shape
  rng = np.random.default_rng(seed)
  out = []
  for start in range(0, samples, 250):  # chunks: a large split must not hold samples x n
    k = min(250, samples - start)
    w = rng.multinomial(s, [1.0 / s] * s, size=k) if s > 1 else np.ones((k, 1))
    c = rng.multinomial(n, [1.0 / n] * n, size=k)
    out.append(np.einsum("bs,sn,bn->b", w, d, c) / (s * n))
  lo, hi = np.percentile(np.concatenate(out), [2.5, 97.5])
  return float(lo), float(hi)


def _observed(eff: float, se: Optional[float], interval) -> tuple[str, float, float]:
  """(direction seen, smallest and largest plausible size of the change)."""
  if interval is not None:
    lo, hi = interval
    if lo > 0:
      return "better", lo, hi
    if hi < 0:
      return "worse", -hi, -lo
    return "same", 0.0, max(abs(lo), abs(hi))
  noise = 2 * se if se else 0.0
  if se and abs(eff) <= noise:
    return "same", 0.0, abs(eff) + noise
  if eff == 0:
    return "same", 0.0, 0.0
  return ("better" if eff > 0 else "worse"), abs(eff) - noise, abs(eff) + noise


def verdict(eff: float, se: Optional[float], direction: str, size: Optional[float],
            unit: str, *, interval: Optional[tuple] = None, seeds: Optional[int] = None) -> dict:
  """Observed direction and the hypothesis verdict, with a sentence.

  Args:
    eff, se: the effect (positive = better) and its standard error over seeds.
    direction, size: the hypothesis ('better' | 'worse' | 'same', optional size).
    unit: 'points' or 'loss'.
    interval: the 95% interval of `paired_bootstrap`; it decides the direction when given
      (else twice the standard error does).
    seeds: how many seeds; below MIN_SEEDS the verdict is 'no verdict'.
  """
  se = None if se == 0 and interval is None else se  # identical differences: no spread known
  observed, small, large = _observed(eff, se, interval)
  if observed == direction:
    result = "held"
  elif observed == "same" or direction == "same" and se is None and interval is None:
    result = "inconclusive"
  else:
    result = "refuted"
  if se is None and interval is None and result == "held" and direction != "same":
    result = "held (one seed: no spread)"
  if interval is not None:
    spread = f" (95% interval {interval[0]:+.2f} to {interval[1]:+.2f})"
  else:
    spread = f" +- {se:.2g}" if se is not None else ""
  if observed == "same":
    got = f"no change beyond noise ({eff:+.2f}{spread} {unit})"
  else:
    got = f"{observed} by {abs(eff):.2f}{spread} {unit}"
  expected = direction + (f" by {size:g}" if size else "")
  text = f"expected {expected}, got {got}"
  if size and observed == direction and direction != "same":
    if large < size / 2:
      text += f"; smaller than the {size:g} expected"
    elif small > 2 * size:
      text += f"; larger than the {size:g} expected"
    else:
      text += "; about the size expected (within a factor of 2)"
  if seeds is not None and seeds < MIN_SEEDS:
    result = "no verdict"
    text += (f"; no verdict: fewer than {MIN_SEEDS} seeds ({seeds}) cannot tell a change from "
             "seed noise (set ablate.seeds)")
  return {"observed": observed, "verdict": result, "text": text}


def per_example_scores(workdir: str, metric: str) -> np.ndarray:
  """A finished run's score on each validation example: 100 x right, or the example's loss.

  From the run's newest checkpoint (its final state, the one summary.json scored).
  """
  from jrecipe.ensemble.evaluate import member_outputs
  from jrecipe.ensemble.members import from_runs
  member, = from_runs([workdir])
  val = member.data.arrays["validation"]
  out = member_outputs(member, val["x"], outputs="logits")
  y = np.asarray(val["y"])
  if metric == "accuracy":
    right = (np.argmax(out, axis=-1) == y).astype(float)
    return 100.0 * right.reshape(len(right), -1).mean(axis=1)
  return np.asarray(member.loss.per_example(out, y), float)
