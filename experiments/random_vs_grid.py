"""Random versus grid search (Bergstra and Bengio 2012), recipe stage 5 ('Tune').

    python -m experiments.random_vs_grid --budget=9 --seeds=5 --epochs=5

Run from the repository root. The claim: with the same budget of trials, random search finds
better settings than grid search when some hyperparameters matter much more than others,
because a k x k grid tries only k distinct values of the important one, and random search
tries as many as it has trials. The space is built so the claim is testable: one important
hyperparameter, the learning rate (log-uniform over `--lr_range`, 4 decades by default), and
one that barely matters for this job, the L2 strength (log-uniform over `--l2_range`, tiny
values). The grid is the k x k grid of cell centres in log space (k = sqrt(budget); the centres
are the strongest grid: no trial is wasted on a range's edge). Random search draws `budget`
points with jrecipe's own sampler (`jrecipe.search.study.sample_value`, log-uniform).

For each seed s (the training seed; random search also draws fresh points), each method trains
its `budget` configurations of `--config` (default configs/digits_mlp.py) for `--epochs` with
`train_and_evaluate` and keeps its best validation accuracy. The section reports the mean
± std over seeds of the best validation accuracy (and the test accuracy of that trial, never
used to choose), the number of seeds each method wins, the distinct learning rates each
tried, and an importance check computed from the grid itself (spread across learning rates vs
spread across L2 values). Its verdict is computed from the numbers. `--quick` is a smoke run
for the test (budget 4, 1 seed, 0.3 epochs), labelled as such.
"""

import copy
import math
import os
import sys
import time
from typing import Any

import numpy as np

from experiments.results import (close_section, quick_values, run_meta, start,
                                 duration as _duration, fresh_dir as _fresh_dir,
                                 mean_std as _mean_std, pm as _pm, write_section)

SECTION = "random_vs_grid"
IMPORTANT, UNIMPORTANT = "optimizer.learning_rate", "l2"


def grid_points(budget: int, lr_range, l2_range) -> list[dict[str, float]]:
  """The k x k grid of cell centres in log space (k = floor(sqrt(budget)))."""
  k = int(math.isqrt(budget))
  if k < 2 or k * k != budget:
    raise ValueError(f"--budget={budget} must be a square >= 4 (a k x k grid), e.g. 9 or 16.")

  def centres(lo, hi):
    edges = np.linspace(math.log10(lo), math.log10(hi), k + 1)
    return [float(10 ** ((a + b) / 2)) for a, b in zip(edges[:-1], edges[1:])]
  return [{IMPORTANT: lr, UNIMPORTANT: l2}
          for lr in centres(*lr_range) for l2 in centres(*l2_range)]


def random_points(budget: int, lr_range, l2_range, seed: int) -> list[dict[str, float]]:
  """`budget` log-uniform points drawn with jrecipe's search sampler."""
  import optuna
  from jrecipe.search.study import sample_value
  rng = np.random.default_rng([20_12, seed])  # Bergstra and Bengio, 2012
  lr_d = optuna.distributions.FloatDistribution(*lr_range, log=True)
  l2_d = optuna.distributions.FloatDistribution(*l2_range, log=True)
  return [{IMPORTANT: sample_value(rng, lr_d), UNIMPORTANT: sample_value(rng, l2_d)}
          for _ in range(budget)]


def train_point(base_config, point: dict, seed: int, epochs: float, workdir: str) -> dict:
  """Trains one configuration from scratch; returns its validation and test accuracy."""
  from jrecipe.errors import RunFailure
  from jrecipe.search.space import set_field
  from jrecipe.train import loop
  config = copy.deepcopy(base_config)
  for field, v in point.items():
    set_field(config, field, v)
  config.seed = int(seed)
  config.num_epochs = float(epochs)
  config.progress = False
  config.checkpoint.every_epochs = 1_000_000  # only the final checkpoint
  if "monitor" in config and "enabled" in config.monitor:
    config.monitor.enabled = False  # trials of a search: no babysitting report each
  _fresh_dir(workdir)
  t0 = time.perf_counter()
  rec = {**point, "seed": int(seed), "val_acc": None, "test_acc": None, "status": "ok"}
  try:
    summary = loop.train_and_evaluate(config, workdir)
    rec["val_acc"] = summary["validation"]["accuracy"]
    rec["test_acc"] = summary.get("test", {}).get("accuracy")
    rec["val_count"] = summary["validation"]["count"]
  except RunFailure:
    rec["status"] = "diverged"
  rec["seconds"] = time.perf_counter() - t0
  return rec


def run(base_config, budget: int, seeds: int, epochs: float, workdir: str, lr_range, l2_range,
        log=print) -> list[dict[str, Any]]:
  """Every (method, seed, trial): one record each, method 'grid' or 'random'."""
  records = []
  grid = grid_points(budget, lr_range, l2_range)
  for seed in range(seeds):
    for method, points in (("grid", grid),
                           ("random", random_points(budget, lr_range, l2_range, seed))):
      for i, p in enumerate(points):
        wd = os.path.join(workdir, f"seed{seed}", method, f"trial{i:02d}")
        rec = {"method": method, "trial": i, **train_point(base_config, p, seed, epochs, wd)}
        records.append(rec)
        acc = f"{100 * rec['val_acc']:.2f}%" if rec["val_acc"] is not None else rec["status"]
        log(f"seed {seed} {method} {i + 1}/{budget}: lr={p[IMPORTANT]:.3g} "
            f"l2={p[UNIMPORTANT]:.3g} -> val {acc} ({rec['seconds']:.1f} s)")
  return records


def best_per_seed(records: list[dict]) -> dict[str, list[dict]]:
  """{method: [the best trial (validation accuracy) of each seed]}; a seed whose every trial
  diverged counts as accuracy 0."""
  out: dict[str, list[dict]] = {}
  for method in ("grid", "random"):
    for seed in sorted({r["seed"] for r in records}):
      rs = [r for r in records if r["method"] == method and r["seed"] == seed]
      if not rs:
        continue
      ok = [r for r in rs if r["val_acc"] is not None]
      best = max(ok, key=lambda r: (r["val_acc"], -r["trial"])) if ok else {
          **rs[0], "val_acc": 0.0, "test_acc": None}
      out.setdefault(method, []).append(best)
  return out


def importance(records: list[dict]) -> tuple[float, float]:
  """From the grid: the mean spread (max - min, points) of validation accuracy across the
  learning rates at a fixed L2, and across the L2 values at a fixed learning rate."""
  grid = [r for r in records if r["method"] == "grid"]
  acc = lambda rs: [100 * (r["val_acc"] or 0.0) for r in rs]  # noqa: E731
  spreads = {IMPORTANT: [], UNIMPORTANT: []}
  for seed in {r["seed"] for r in grid}:
    g = [r for r in grid if r["seed"] == seed]
    for fixed, varied in ((UNIMPORTANT, IMPORTANT), (IMPORTANT, UNIMPORTANT)):
      for v in {r[fixed] for r in g}:
        a = acc([r for r in g if r[fixed] == v])
        spreads[varied].append(max(a) - min(a))
  return float(np.mean(spreads[IMPORTANT])), float(np.mean(spreads[UNIMPORTANT]))


def verdict(records: list[dict]) -> list[str]:
  """The generated sentences: who won, by how much, and whether the space was as designed."""
  best = best_per_seed(records)
  g = [100 * r["val_acc"] for r in best.get("grid", [])]
  rnd = [100 * r["val_acc"] for r in best.get("random", [])]
  if not g or not rnd:
    return ["No comparison: one of the methods has no trials."]
  n = min(len(g), len(rnd))
  wins = sum(b > a for a, b in zip(g[:n], rnd[:n]))
  ties = sum(b == a for a, b in zip(g[:n], rnd[:n]))
  diff = float(np.mean(rnd) - np.mean(g))
  val_n = next((r.get("val_count") for r in records if r.get("val_count")), None)
  one = 100 / val_n if val_n else 0.0
  claim = "Claim 'random search beats grid search for the same budget' (Bergstra and Bengio)"
  if abs(diff) < one:
    word = "**inconclusive** here"
  elif diff > 0 and wins > n / 2:
    word = "**reproduces**"
  else:
    word = "**does not reproduce**"
  out = [f"{claim}: {word}: the best validation accuracy of random search is {diff:+.2f} points "
         f"from grid search's on average ({_pm(*_mean_std(rnd), '.2f')}% vs "
         f"{_pm(*_mean_std(g), '.2f')}%); random search wins {wins}, ties {ties} and loses "
         f"{n - wins - ties} of {n} seeds" + (f" (one validation example = {one:.2f} points)."
                                               if one else ".")]
  lr_spread, l2_spread = importance(records)
  designed = lr_spread > 2 * l2_spread
  out.append(f"Importance check from the grid: changing the learning rate at a fixed L2 moves "
             f"validation accuracy by {lr_spread:.2f} points on average, changing L2 at a fixed "
             f"learning rate by {l2_spread:.2f} points: the space "
             f"{'has' if designed else 'does NOT have'} one important and one unimportant "
             "hyperparameter, as the claim requires.")
  return out


def render_section(records: list[dict], meta: dict[str, Any]) -> str:
  """The markdown of this experiment's RESULTS.md section, markers included."""
  best = best_per_seed(records)
  seeds = len({r["seed"] for r in records})
  budget = meta["budget"]
  lines = [f"<!-- BEGIN {SECTION} -->", "## Random versus grid search (Bergstra and Bengio)", ""]
  if meta.get("quick"):
    lines += ["**Smoke run (`--quick`): these numbers are not results.**", ""]
  lines += [
      "Recipe stage 5 ('Tune'): the same budget of trials, a grid against random search, over "
      "one important hyperparameter (the learning rate) and one unimportant one (a tiny L2). "
      "Generated by `experiments/random_vs_grid.py`; do not edit, rerun the command.", "",
      f"- Command: `{meta['command']}`",
      f"- Date: {meta['date']}",
      f"- Machine: {meta['machine']}",
      f"- Wall time: {meta['wall']} for {len(records)} runs "
      f"(mean {np.mean([r['seconds'] for r in records]):.1f} s per run, compilation included)",
      f"- Job: {meta['job']}; {meta['epochs']:g} epoch(s) per trial; {budget} trials per method "
      f"and seed; seeds 0..{seeds - 1}",
      f"- Space: learning rate log-uniform [{meta['lr_range'][0]:g}, {meta['lr_range'][1]:g}], "
      f"L2 log-uniform [{meta['l2_range'][0]:g}, {meta['l2_range'][1]:g}]; grid: "
      f"{math.isqrt(budget)} x {math.isqrt(budget)} cell centres in log space",
      "",
      "| method | best validation accuracy (%) | range over seeds | its test accuracy (%) "
      "| distinct learning rates tried | diverged trials |",
      "|---|---|---|---|---|---|"]
  for method in ("grid", "random"):
    rs = best.get(method, [])
    val = [100 * r["val_acc"] for r in rs]
    test = [100 * r["test_acc"] if r.get("test_acc") is not None else None for r in rs]
    mine = [r for r in records if r["method"] == method]
    lrs = len({round(math.log10(r[IMPORTANT]), 6) for r in mine})
    diverged = sum(r["status"] != "ok" for r in mine)
    rng = f"{min(val):.2f} – {max(val):.2f}" if val else "n/a"
    lines.append(f"| {method} | {_pm(*_mean_std(val), '.2f')} | {rng} "
                 f"| {_pm(*_mean_std(test), '.2f')} | {lrs} | {diverged} |")
  lines += ["", f"Mean ± sample standard deviation over {seeds} seed(s) of each method's best "
            "trial by validation accuracy (test accuracy of that trial is reported, never used "
            "to choose). The grid tries the same points for every seed; random search draws "
            "new ones.", ""]
  return close_section(lines, verdict(records), SECTION)


def define_flags():
  """The flags, defined when run as a script (importing this module defines none)."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/digits_mlp.py",
                                  "Config file of the job (get_config()).", lock_config=True)
  flags.DEFINE_integer("budget", 9, "Trials per method and seed (a square: k x k grid).")
  flags.DEFINE_integer("seeds", 5, "Repetitions: seeds 0..seeds-1.", lower_bound=1)
  flags.DEFINE_float("epochs", 5, "Epochs per trial.", lower_bound=0)
  flags.DEFINE_list("lr_range", ["1e-5", "1e-1"], "Learning-rate range (log-uniform).")
  flags.DEFINE_list("l2_range", ["1e-8", "1e-5"], "L2 range (log-uniform).")
  flags.DEFINE_string("workdir", "/tmp/jrecipe_experiments/random_vs_grid",
                      "Parent of the trials' work directories (each emptied before its run).")
  flags.DEFINE_string("results", "experiments/RESULTS.md", "Markdown file of the results.")
  flags.DEFINE_bool("quick", False, "Smoke run: budget 4, 1 seed, 0.3 epochs unless given.")
  return flags.FLAGS


def main(argv: list[str]) -> None:
  """Runs the comparison from the flags and writes this experiment's section of --results."""
  from absl import flags
  from ml_collections import config_flags
  from jrecipe.errors import UserError
  FLAGS = flags.FLAGS
  start("random_vs_grid", argv)
  budget, seeds, epochs = quick_values(FLAGS, {"budget": 4, "seeds": 1, "epochs": 0.3})
  try:
    lr_range = tuple(float(v) for v in FLAGS.lr_range)
    l2_range = tuple(float(v) for v in FLAGS.l2_range)
    assert len(lr_range) == len(l2_range) == 2 and 0 < lr_range[0] < lr_range[1] \
        and 0 < l2_range[0] < l2_range[1]
    grid_points(budget, lr_range, l2_range)
  except (ValueError, AssertionError) as e:
    sys.exit(f"random_vs_grid: error: {e or 'ranges must be two positive numbers, low < high'}")
  config, config_file = FLAGS.config, config_flags.get_config_filename(FLAGS["config"])
  meta = run_meta(FLAGS, epochs, (
      f"`{config_file}` (data {config.data.name}, model {config.model.name} "
      f"{tuple(config.model.get('hidden', ()))}, optimizer {config.optimizer.name}, "
      f"batch {config.batch_size})"), budget=budget, lr_range=lr_range, l2_range=l2_range)
  t0 = time.perf_counter()
  try:
    records = run(config, budget, seeds, epochs, FLAGS.workdir, lr_range, l2_range)
  except UserError as e:
    sys.exit(f"random_vs_grid: error: {e}")
  meta["wall"] = _duration(time.perf_counter() - t0)
  section = render_section(records, meta)
  write_section(FLAGS.results, SECTION, section)
  print(section, end="")
  print(f"Wrote the {SECTION} section of {FLAGS.results}.")


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main)
