"""`--mode=lr_find`: the learning-rate range test (recipe stage 5, 'Tune'; Smith 2017).

    jrecipe --mode=lr_find --config=configs/digits_mlp.py --workdir=DIR

Trains from a copy of the initial state (the one `--mode=train` would start from) for
`lr_find.steps` steps, the learning rate growing by a constant factor each step from
`lr_find.min_lr` to `lr_find.max_lr`, with this config's optimizer, batch size and data order.
The copy is then thrown away: nothing is checkpointed and DIR gets only lr_find.json and
lr_find.png, so nothing leaks into later training. The optimizer runs at rate 1 and every
update is multiplied by the step's rate (the state's lr_scale), exact for every optimizer whose
update is linear in its rate (all but L-BFGS, which is refused).

How it decides (the rule, stated so a user can check it on the plot):
1. Robust smoothing: a centred running median over 7 steps (an isolated spike, even 100x, is
   removed entirely), then a bias-corrected exponential moving average (weight
   `lr_find.smoothing`) run forwards and backwards, so the smoothed curve does not lag.
2. The test stops when the smoothed loss exceeds `lr_find.stop_factor` x its minimum, or the
   loss is not finite: the rates beyond diverge.
3. lr_min: the rate at the minimum of the smoothed loss.
4. lr_steep: the rate of steepest descent of the smoothed loss against log(rate), measured as
   the slope of a least-squares line through a window of 1/10 of the points (a point-to-point
   difference would follow noise), searched only before the minimum.
5. Suggestion = min(lr_steep, lr_min / 10): the fastest-falling rate, never closer than a
   factor 10 to the rate where the loss stops falling. No suggestion when the smoothed loss
   never falls by 10% of its first value (the model is not learning in this range).
The same seed gives the same batches, initial state and therefore the same suggestion.
"""

import copy
import logging
import math
import os
from typing import Any, Optional

import numpy as np

from jrecipe.errors import UserError
from jrecipe.train.trainer import Hook
from jrecipe.train.writer import save_figure_atomic, write_json_atomic

log = logging.getLogger("jrecipe")
MEDIAN_WINDOW = 7
MIN_FALL = 0.1  # the smoothed loss must fall by 10% of its first value to suggest anything


def _ema(x: np.ndarray, smoothing: float) -> np.ndarray:
  beta = 1.0 - float(smoothing)
  out, avg = np.empty_like(x), 0.0
  for i, v in enumerate(x):
    avg = beta * avg + (1 - beta) * v
    out[i] = avg / (1 - beta ** (i + 1))  # bias correction: no pull towards 0 at the start
  return out


def smooth(losses, smoothing: float = 0.1, window: int = MEDIAN_WINDOW) -> np.ndarray:
  """Centred running median over `window` steps, then a bias-corrected EMA run forwards and
  backwards (zero phase: a one-way EMA lags, which would shift the curve to higher rates by
  an amount that depends on the number of steps)."""
  med = _median(losses, window)
  return _ema(_ema(med, smoothing)[::-1], smoothing)[::-1].copy()


def _median(losses, window: int = MEDIAN_WINDOW) -> np.ndarray:
  x = np.asarray(losses, np.float64)
  return np.array([np.median(x[max(0, i - window // 2):i + window // 2 + 1])
                   for i in range(len(x))])


def suggest(lrs, losses, smoothing: float = 0.1, stop_factor: float = 4.0) -> dict[str, Any]:
  """The rule of the module docstring on a recorded curve.

  Args:
    lrs: increasing learning rates, one per step.
    losses: the training loss at each step (may contain spikes, NaN or inf at the end).
    smoothing, stop_factor: as `lr_find.smoothing`, `lr_find.stop_factor`.

  Returns:
    {'suggestion', 'lr_steep', 'lr_min', 'stop_index', 'min_index', 'steep_index',
     'smoothed' (list)}; 'suggestion' is None when the loss never fell.
  """
  lrs = np.asarray(lrs, np.float64)
  losses = np.asarray(losses, np.float64)
  finite = np.isfinite(losses)
  n = int(np.argmin(finite)) if not finite.all() else len(losses)  # up to the first non-finite
  stop = n
  if n:  # where the test stops: the causal (online) smoothed loss, as during the run
    causal = _ema(_median(losses[:n]), smoothing)
    over = np.nonzero(causal > stop_factor * np.minimum.accumulate(causal))[0]
    stop = int(over[0]) if over.size else n
  s = smooth(losses[:stop], smoothing) if stop else np.zeros(0)
  out = {"suggestion": None, "lr_steep": None, "lr_min": None, "stop_index": stop,
         "min_index": None, "steep_index": None, "smoothed": s.tolist()}
  if stop < 10:
    return out
  i_min = int(np.argmin(s))
  out.update(min_index=i_min, lr_min=float(lrs[i_min]))
  if s[0] - s[i_min] < MIN_FALL * abs(s[0]):  # the loss never really fell: nothing to suggest
    return out
  w = max(3, stop // 10)
  logx = np.log(lrs[:stop])
  best, i_steep = 0.0, None
  for i in range(0, max(1, i_min - w + 2)):
    j = min(i + w, i_min + 1)
    if j - i < 3:
      break
    slope = np.polyfit(logx[i:j], s[i:j], 1)[0]
    if slope < best:
      best, i_steep = slope, (i + j - 1) // 2
  if i_steep is None:  # the smoothed loss never fell: no rate to suggest
    return out
  lr_steep = float(lrs[i_steep])
  out.update(steep_index=i_steep, lr_steep=lr_steep,
             suggestion=float(min(lr_steep, lrs[i_min] / 10)))
  return out


def _settings(config) -> dict:
  lf = config.lr_find
  s = {"min_lr": float(lf.min_lr), "max_lr": float(lf.max_lr), "steps": int(lf.steps),
       "smoothing": float(lf.smoothing), "stop_factor": float(lf.stop_factor)}
  if not 0 < s["min_lr"] < s["max_lr"]:
    raise UserError(f"lr_find needs 0 < min_lr < max_lr, got min_lr={s['min_lr']!r}, "
                    f"max_lr={s['max_lr']!r}.")
  if s["steps"] < 20:
    raise UserError(f"lr_find.steps={s['steps']} is too few to read a curve: use 100 to 500.")
  if not 0 < s["smoothing"] < 1:
    raise UserError(f"lr_find.smoothing must be in (0, 1), got {s['smoothing']!r}.")
  if not s["stop_factor"] > 1:
    raise UserError(f"lr_find.stop_factor must be > 1, got {s['stop_factor']!r}.")
  return s


class _RangeTest(Hook):
  """The range test as a Trainer hook: the rate of each step, its loss, and when to stop.

  Before step i the update scale (`state.lr_scale`, with the optimizer's own rate at 1) is
  lrs[i]; after it the loss is read back (the test needs every step's loss on the host) and
  the run stops once the loss is not finite or the smoothed loss is far above its minimum.
  """

  def __init__(self, lrs: np.ndarray, smoothing: float, stop_factor: float):
    self.lrs, self.beta, self.stop_factor = lrs, 1.0 - smoothing, stop_factor
    self.losses: list[float] = []
    self.best, self.avg = math.inf, 0.0

  def _scale(self, loop, i: int) -> None:
    loop.state = loop.state.replace(
        lr_scale=loop.trainer.placement.put_state(np.float32(self.lrs[i])))

  def begin(self, loop) -> None:
    self._scale(loop, 0)

  def after_step(self, loop, metrics: dict) -> None:
    i = len(self.losses)
    loss = float(loop.trainer.placement.metrics_to_host(metrics["total_loss"]))
    self.losses.append(loss)
    if not math.isfinite(loss):
      return loop.stop("the loss is not finite")
    self.avg = self.beta * self.avg + (1 - self.beta) * loss
    sm = self.avg / (1 - self.beta ** (i + 1))
    self.best = min(self.best, sm)
    if i >= MEDIAN_WINDOW and sm > 2 * self.stop_factor * self.best:  # far gone: stop early
      return loop.stop("the loss exploded")
    if i + 1 < len(self.lrs):
      self._scale(loop, i + 1)


def range_test(config, exp=None) -> dict[str, Any]:
  """Runs the range test on a throwaway copy of the initial state; returns the record.

  The same Trainer (and compiled step) as training, with the schedule held constant and the
  rate of each step set through the update scale.
  """
  from jrecipe import experiment as experiment_lib, optim
  from jrecipe.train.trainer import Trainer
  s = _settings(config)
  if optim.needs_value_fn(config.optimizer):
    raise UserError(f"lr_find does not work with optimizer {config.optimizer.name!r}: its line "
                    "search chooses its own step. Use it with adam, sgd, momentum, ...")
  cfg = copy.deepcopy(config)
  cfg.optimizer.learning_rate = 1.0  # the rate of each step goes in through lr_scale
  cfg.schedule.name = "constant"
  cfg.schedule.warmup = 0
  exp = exp or experiment_lib.build(cfg)
  trainer = Trainer.from_experiment(exp, tx=exp.optimizer(cfg), ema_decay=0.0)
  lrs = s["min_lr"] * (s["max_lr"] / s["min_lr"]) ** (np.arange(s["steps"]) / (s["steps"] - 1))
  test = _RangeTest(lrs, s["smoothing"], s["stop_factor"])
  state = trainer.to_device(trainer.initial_state())  # a fresh copy, never saved
  trainer.run(state, num_steps=len(lrs), batches=trainer.batches(0, seed=cfg.seed,
                                                                 batch_size=cfg.batch_size),
              hooks=[test])
  lrs = lrs[:len(test.losses)]
  rule = suggest(lrs, test.losses, s["smoothing"], s["stop_factor"])
  return {"settings": s, "lrs": lrs.tolist(), "losses": test.losses, **rule,
          "optimizer": str(cfg.optimizer.name), "batch_size": int(cfg.batch_size),
          "seed": int(cfg.seed)}


def plot(path: str, rec: dict) -> None:
  """Loss against rate (log axis): raw, smoothed, the minimum and the suggestion."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  lrs = np.asarray(rec["lrs"])
  raw = np.asarray(rec["losses"], np.float64)
  ax.plot(lrs, np.where(np.isfinite(raw), raw, np.nan), color="0.75", lw=0.8, label="loss")
  sm = rec["smoothed"]
  ax.plot(lrs[:len(sm)], sm, color="C0", label="smoothed (median 7, EMA)")
  if rec["lr_min"]:
    ax.axvline(rec["lr_min"], color="C1", ls=":", label=f"minimum {rec['lr_min']:.2g}")
  if rec["suggestion"]:
    ax.axvline(rec["suggestion"], color="C2", ls="--",
               label=f"suggestion {rec['suggestion']:.2g}")
  ax.set_xscale("log")
  finite = raw[np.isfinite(raw)]
  if finite.size:
    ax.set_ylim(min(finite.min(), min(sm, default=finite.min())) * 0.95,
                max(sm, default=finite.max()) * 1.5 if sm else finite.max())
  ax.set_xlabel("learning rate (log scale)")
  ax.set_ylabel("training loss")
  ax.set_title("learning-rate range test")
  ax.legend(fontsize=8)
  fig.tight_layout()
  save_figure_atomic(fig, path)
  plt.close(fig)


def run_mode(config, workdir: str, options=None, *,
             exp: Optional[Any] = None) -> dict[str, Any]:
  """Entry point of `--mode=lr_find`: writes DIR/lr_find.json and DIR/lr_find.png."""
  del options  # this mode takes no command-line options (jrecipe.modes.ModeOptions)
  rec = range_test(config, exp)
  os.makedirs(workdir, exist_ok=True)
  write_json_atomic(os.path.join(workdir, "lr_find.json"), rec)
  plot(os.path.join(workdir, "lr_find.png"), rec)
  if rec["suggestion"] is None:
    log.warning("lr_find: the smoothed loss never fell between %g and %g: no suggestion. "
                "Lower lr_find.min_lr, or check the model and data (--mode=check).",
                rec["settings"]["min_lr"], rec["settings"]["max_lr"])
  else:
    log.info("lr_find: suggested learning rate %.3g (steepest descent at %.3g, loss minimum at "
             "%.3g, /10 = %.3g). Plot: %s", rec["suggestion"], rec["lr_steep"], rec["lr_min"],
             rec["lr_min"] / 10, os.path.join(workdir, "lr_find.png"))
  return rec
