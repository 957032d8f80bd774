"""Learning-rate sweep: recipe stage 5 ('Tune') put to stage 3's claim 'Adam at 3e-4 is safe'.

    python -m experiments.lr_sweep --optimizers=adam,momentum --seeds=3 --epochs=20

Run from the repository root. For each optimizer x learning rate x seed it trains the
`--config` job (default configs/digits_mlp.py) with `jrecipe.train.loop.train_and_evaluate`
in its own work directory, then writes the table of mean +- std over seeds, the best rate per
optimizer and a generated verdict on the claim into its own section of `--results`
(experiments/RESULTS.md), between `<!-- BEGIN lr_sweep -->` and `<!-- END lr_sweep -->`.
Any `--config.field=value` override applies to every run. `--quick` is a smoke run for the
test (1 seed, 1 epoch, 2 rates unless given), labelled as such in its section.
"""

import copy
import math
import os
import sys
import time
from typing import Any, Optional

import numpy as np

# RESULTS_HEADER is re-exported (tests/test_experiments.py reads it from here).
from experiments.results import (close_section, quick_values, run_meta, start, RESULTS_HEADER,
                                 duration as _duration, fresh_dir as _fresh_dir,
                                 mean_std as _mean_std, pm as _pm, write_section)  # noqa: F401

SECTION = "lr_sweep"
CLAIM_OPTIMIZER, CLAIM_RATE, CLAIM_MARGIN = "adam", 3e-4, 1.0  # margin in accuracy points
DEFAULT_RATES = ["1e-5", "1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1"]
QUICK_RATES = ["3e-4", "3e-3"]
LABELS = {"momentum": "SGD with momentum", "nesterov": "SGD with Nesterov momentum",
          "sgd": "plain SGD", "adam": "Adam", "adamw": "AdamW"}


def fmt_rate(rate: float) -> str:
  """3e-4 -> '3e-4' (no zero padding), used in tables and run directory names."""
  mantissa, _, exponent = np.format_float_scientific(rate, trim="-").partition("e")
  return f"{mantissa}e{int(exponent)}"


def final_train_loss(workdir: str) -> Optional[float]:
  """The last epoch's mean training loss from the run's metrics.jsonl (split 'train_epoch')."""
  from jrecipe.train.writer import read_metrics
  epochs = [r for r in read_metrics(workdir) if r.get("split") == "train_epoch"]
  loss = epochs[-1].get("loss") if epochs else None
  return float(loss) if isinstance(loss, (int, float)) else None


def run_one(base_config, optimizer: str, rate: float, seed: int, epochs: float,
            workdir: str) -> dict[str, Any]:
  """Trains one (optimizer, rate, seed) from scratch and returns its final numbers.

  Args:
    base_config: the loaded job config; it is copied, never changed.
    optimizer, rate, seed, epochs: the overrides of this run.
    workdir: the run's own work directory (emptied first).

  Returns:
    {'optimizer', 'rate', 'seed', 'status': 'ok' | 'diverged', 'val_acc', 'val_loss',
     'test_acc', 'test_loss', 'train_loss', 'steps', 'val_count', 'test_count', 'seconds',
     'message'}; accuracies are fractions, None where a run stopped without them.
  """
  from jrecipe.errors import RunFailure
  from jrecipe.train import loop
  config = copy.deepcopy(base_config)
  config.optimizer.name = optimizer
  config.optimizer.learning_rate = float(rate)
  config.seed = int(seed)
  config.num_epochs = float(epochs)
  config.progress = False
  config.checkpoint.every_epochs = 1_000_000  # only the final checkpoint: keeps runs fast
  _fresh_dir(workdir)
  rec = {"optimizer": optimizer, "rate": float(rate), "seed": int(seed), "status": "ok",
         "message": "", "val_acc": None, "val_loss": None, "test_acc": None, "test_loss": None,
         "steps": None, "val_count": None, "test_count": None}
  t0 = time.perf_counter()
  try:
    summary = loop.train_and_evaluate(config, workdir)
  except RunFailure as e:  # a non-finite loss: the rate diverged
    rec.update(status="diverged", message=str(e).split(". ")[0])
  else:
    val, test = summary.get("validation", {}), summary.get("test", {})
    rec.update(val_acc=val.get("accuracy"), val_loss=val.get("loss"),
               test_acc=test.get("accuracy"), test_loss=test.get("loss"),
               steps=summary.get("step"), val_count=val.get("count"),
               test_count=test.get("count"))
  rec["seconds"] = time.perf_counter() - t0
  rec["train_loss"] = final_train_loss(workdir)
  return rec


def sweep(base_config, optimizers: list[str], rates: list[float], seeds: int, epochs: float,
          workdir: str, log=print) -> list[dict[str, Any]]:
  """Every optimizer x rate x seed in turn (seeds 0..seeds-1), one work directory each."""
  records = []
  total = len(optimizers) * len(rates) * seeds
  for optimizer in optimizers:
    for rate in rates:
      for seed in range(seeds):
        wd = os.path.join(workdir, optimizer, f"lr_{fmt_rate(rate)}", f"seed_{seed}")
        rec = run_one(base_config, optimizer, rate, seed, epochs, wd)
        records.append(rec)
        acc = (f"val {100 * rec['val_acc']:.2f}% test {100 * rec['test_acc']:.2f}%"
               if rec["status"] == "ok" else rec["status"])
        log(f"[{len(records)}/{total}] {optimizer} lr={fmt_rate(rate)} seed={seed}: {acc} "
            f"({rec['seconds']:.1f} s)")
  return records


def summarize(records: list[dict]) -> list[dict[str, Any]]:
  """One row per (optimizer, rate): means and sample stds over the seeds that finished.

  Accuracies in the rows are in percent. `best` marks, per optimizer, the rate with the
  highest mean validation accuracy among rates where every seed finished (ties: lower mean
  validation loss). Test accuracy is reported but never used to choose.
  """
  rows = []
  keys = list(dict.fromkeys((r["optimizer"], r["rate"]) for r in records))
  for optimizer, rate in keys:
    runs = [r for r in records if (r["optimizer"], r["rate"]) == (optimizer, rate)]
    ok = [r for r in runs if r["status"] == "ok"]
    row = {"optimizer": optimizer, "rate": rate, "runs": len(runs), "ok": len(ok),
           "best": False}
    for name, scale in (("val_acc", 100.0), ("test_acc", 100.0), ("val_loss", 1.0),
                        ("train_loss", 1.0)):
      mean, std = _mean_std([r[name] * scale if r[name] is not None else None for r in ok])
      row[name], row[name + "_std"] = mean, std
    rows.append(row)
  for optimizer in dict.fromkeys(r["optimizer"] for r in rows):
    eligible = [r for r in rows if r["optimizer"] == optimizer and r["ok"] == r["runs"]
                and r["val_acc"] is not None]
    if eligible:
      best = max(eligible, key=lambda r: (r["val_acc"], -(r["val_loss"] or 0.0)))
      best["best"] = True
  return rows


def _row_for(rows, optimizer, rate=None, best=False):
  for r in rows:
    if r["optimizer"] == optimizer and (r["best"] if best else math.isclose(r["rate"], rate)):
      return r
  return None


def verdict(rows: list[dict]) -> list[str]:
  """The generated sentences: the claim's verdict, the contrast with other optimizers, the
  band of rates within the margin of each optimizer's best, and best rates on the border."""
  out = []
  claim = f"Claim 'Adam at {fmt_rate(CLAIM_RATE)} is safe' (recipe stage 3)"
  best = _row_for(rows, CLAIM_OPTIMIZER, best=True)
  at = _row_for(rows, CLAIM_OPTIMIZER, CLAIM_RATE)
  if at is None:
    out.append(f"{claim}: not tested; the sweep needs `--optimizers` to include "
               f"{CLAIM_OPTIMIZER} and `--rates` to include {fmt_rate(CLAIM_RATE)}.")
  elif at["ok"] < at["runs"] or at["val_acc"] is None or best is None:
    out.append(f"{claim}: **does not reproduce** on this data: Adam at {fmt_rate(CLAIM_RATE)} "
               f"diverged in {at['runs'] - at['ok']} of {at['runs']} seeds.")
  else:
    gap = best["val_acc"] - at["val_acc"]
    ok = gap <= CLAIM_MARGIN
    where = ("it is itself the best Adam rate" if at is best else
             f"{gap:.2f} points below the best Adam rate ({fmt_rate(best['rate'])}, "
             f"{best['val_acc']:.2f}%), {'within' if ok else 'outside'} the "
             f"{CLAIM_MARGIN:g}-point margin")
    out.append(f"{claim}: **{'reproduces' if ok else 'does not reproduce'}** on this data: "
               f"Adam at {fmt_rate(CLAIM_RATE)} reaches "
               f"{_pm(at['val_acc'], at['val_acc_std'], '.2f')}% mean validation accuracy; "
               f"{where}.")
  for optimizer in dict.fromkeys(r["optimizer"] for r in rows):
    if optimizer == CLAIM_OPTIMIZER:
      continue
    o_at, o_best = _row_for(rows, optimizer, CLAIM_RATE), _row_for(rows, optimizer, best=True)
    if o_at is None or o_best is None or o_at["val_acc"] is None:
      continue
    gap = o_best["val_acc"] - o_at["val_acc"]
    out.append(f"For contrast, {LABELS.get(optimizer, optimizer)} at the same "
               f"{fmt_rate(CLAIM_RATE)} reaches {o_at['val_acc']:.2f}%, {gap:.2f} points below "
               f"its own best rate ({fmt_rate(o_best['rate'])}, {o_best['val_acc']:.2f}%): "
               f"{fmt_rate(CLAIM_RATE)} is {'also' if gap <= CLAIM_MARGIN else 'not'} a safe "
               f"rate for it here.")
  bands = []
  for optimizer in dict.fromkeys(r["optimizer"] for r in rows):
    b = _row_for(rows, optimizer, best=True)
    if b is None:
      continue
    near = [fmt_rate(r["rate"]) for r in rows if r["optimizer"] == optimizer
            and r["ok"] == r["runs"] and r["val_acc"] is not None
            and b["val_acc"] - r["val_acc"] <= CLAIM_MARGIN]
    bands.append(f"{optimizer} {', '.join(near)}")
    swept = sorted(r["rate"] for r in rows if r["optimizer"] == optimizer)
    if len(swept) > 2 and b["rate"] in (swept[0], swept[-1]):
      edge = "lowest" if b["rate"] == swept[0] else "highest"
      out.append(f"The best {optimizer} rate, {fmt_rate(b['rate'])}, is the {edge} rate swept: "
                 "the optimum may lie beyond the range (CS231n: beware best values on the "
                 "border).")
  if bands:
    out.append(f"Rates within {CLAIM_MARGIN:g} point of their optimizer's best mean validation "
               f"accuracy: {'; '.join(bands)}.")
  return out


def render_section(records: list[dict], meta: dict[str, Any]) -> str:
  """The markdown of this experiment's RESULTS.md section, markers included."""
  rows = summarize(records)
  n_seeds = max((r["runs"] for r in rows), default=0)
  first = next((r for r in records if r["status"] == "ok"), {})
  val_n, test_n = first.get("val_count"), first.get("test_count")
  lines = [f"<!-- BEGIN {SECTION} -->",
           f"## Learning-rate sweep: is Adam at {fmt_rate(CLAIM_RATE)} safe?", ""]
  if meta.get("quick"):
    lines += ["**Smoke run (`--quick`): these numbers are not results.**", ""]
  lines += [
      "Recipe stage 5 ('Tune') applied to stage 3's 'Adam at 3e-4 is safe': the same job trained "
      "at each learning rate, from scratch, for each seed. Generated by `experiments/lr_sweep.py`;"
      " do not edit, rerun the command.", "",
      f"- Command: `{meta['command']}`",
      f"- Date: {meta['date']}",
      f"- Machine: {meta['machine']}",
      f"- Wall time: {meta['wall']} for {len(records)} runs "
      f"(mean {np.mean([r['seconds'] for r in records]):.1f} s per run, compilation included)",
      f"- Job: {meta['job']}; {meta['epochs']:g} epoch{'' if meta['epochs'] == 1 else 's'} "
      f"({first.get('steps', 'n/a')} steps) per run, seeds 0..{n_seeds - 1}, constant rate "
      "unless the config says otherwise",
      f"- Splits: validation {val_n}, test {test_n} examples"
      + (f" (one validation example = {100 / val_n:.2f} points)" if val_n else ""),
      "",
      "| optimizer | learning rate | validation accuracy (%) | test accuracy (%) "
      "| final train loss | |",
      "|---|---|---|---|---|---|"]
  for r in rows:
    mark = "**best**" if r["best"] else ""
    if r["ok"] < r["runs"]:
      mark = f"diverged in {r['runs'] - r['ok']}/{r['runs']} seeds"
    lines.append(f"| {r['optimizer']} | {fmt_rate(r['rate'])} "
                 f"| {_pm(r['val_acc'], r['val_acc_std'], '.2f')} "
                 f"| {_pm(r['test_acc'], r['test_acc_std'], '.2f')} "
                 f"| {_pm(r['train_loss'], r['train_loss_std'], '.4f')} | {mark} |")
  lines += [
      "",
      f"Mean ± sample standard deviation over {n_seeds} seed(s) (no ± with one seed). Final "
      "train loss: the mean data loss over the last epoch's steps (metrics.jsonl, split "
      "`train_epoch`). **best**: the highest mean validation accuracy of its optimizer; test "
      "accuracy is reported, never used to choose.", ""]
  return close_section(lines, verdict(rows), SECTION)


def define_flags():
  """The flags, defined when run as a script (importing this module defines none)."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/digits_mlp.py",
                                  "Config file of the job to sweep (get_config()).",
                                  lock_config=True)
  flags.DEFINE_list("rates", DEFAULT_RATES, "Learning rates to sweep.")
  flags.DEFINE_list("optimizers", ["adam"], "Optimizer names (jrecipe.optim.OPTIMIZERS).")
  flags.DEFINE_integer("seeds", 3, "Seeds per (optimizer, rate): 0..seeds-1.", lower_bound=1)
  flags.DEFINE_float("epochs", 20, "Epochs per run.", lower_bound=0)
  flags.DEFINE_string("workdir", "/tmp/jrecipe_experiments/lr_sweep",
                      "Parent of the runs' work directories (each is emptied before its run).")
  flags.DEFINE_string("results", "experiments/RESULTS.md", "Markdown file of the results.")
  flags.DEFINE_bool("quick", False, "Smoke run: 1 seed, 1 epoch and rates "
                    f"{','.join(QUICK_RATES)} unless those flags are given.")
  return flags.FLAGS


def main(argv: list[str]) -> None:
  """Runs the sweep from the flags and writes this experiment's section of --results."""
  from absl import flags
  from ml_collections import config_flags
  from jrecipe.errors import UserError
  FLAGS = flags.FLAGS
  start("lr_sweep", argv)
  seeds, epochs, rates = quick_values(FLAGS, {"seeds": 1, "epochs": 1, "rates": QUICK_RATES})
  try:
    rates = [float(r) for r in rates]
  except ValueError:
    sys.exit(f"lr_sweep: error: --rates={','.join(rates)} must be numbers, e.g. 1e-4,3e-4.")
  config, config_file = FLAGS.config, config_flags.get_config_filename(FLAGS["config"])
  meta = run_meta(FLAGS, epochs, (
      f"`{config_file}` (data {config.data.name}, model "
      f"{config.model.name} {tuple(config.model.get('hidden', ()))}, batch "
      f"{config.batch_size}, schedule {config.schedule.name}, momentum "
      f"{config.optimizer.momentum:g} for SGD with momentum)"))
  t0 = time.perf_counter()
  try:
    records = sweep(config, FLAGS.optimizers, rates, seeds, epochs, FLAGS.workdir)
  except UserError as e:
    sys.exit(f"lr_sweep: error: {e}")
  meta["wall"] = _duration(time.perf_counter() - t0)
  section = render_section(records, meta)
  write_section(FLAGS.results, SECTION, section)
  print(section, end="")
  print(f"Wrote the {SECTION} section of {FLAGS.results}.")


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main)
