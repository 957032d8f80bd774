"""Three recipe claims put to the digits MLP: ensembles, parameter EMA, bigger + early stopping.

    python -m experiments.recipe_claims --seeds=3 --epochs=20

Run from the repository root. Recipe stage 6 ('Squeeze out the juice') and CS231n's notes make
three claims; this script tests each on `configs/digits_mlp.py` (offline data), repeated over
`--seeds` repetitions, and writes one generated section per claim into `--results`
(experiments/RESULTS.md), each with its own markers, command, date, machine, wall time, table
and a verdict sentence computed from the numbers:

- `claim_ensemble`: an ensemble of 5 models beats a single model ('~2%'). For repetition r,
  members are the config trained with seeds 5r..5r+4; the ensemble (mean of probabilities)
  is compared with the mean single member on test accuracy and NLL.
- `claim_ema`: an EMA of the parameters 'almost always improves validation error' (CS231n).
  From the same runs (ema_decay of the config, default 0.999): summary['validation_ema'] vs
  summary['validation'], and test.
- `claim_bigger_early_stopped`: a larger model with early stopping beats a smaller one.
  hidden=(32,) trained `--epochs` vs hidden=(512, 512) with early_stopping_patience=3 and up to
  2 x `--epochs`, seeds 0..seeds-1, on test accuracy.

`--claims` picks a subset; `--quick` is a smoke run for the test (1 seed, 1 epoch, 2 ensemble
members unless given), labelled as such in every section.
"""

import copy
import os
import sys
import time
from typing import Any, Optional

from experiments.results import (quick_values, run_meta, start, duration as _duration,
                                 fresh_dir as _fresh_dir, mean_std as _mean_std, pm as _pm,
                                 write_section)

CLAIMS = ("ensemble", "ema", "bigger_early_stopped")
MEMBERS = 5
QUICK_MEMBERS = 2
SMALL_HIDDEN, LARGE_HIDDEN = (32,), (512, 512)
LARGE_PATIENCE, LARGE_EPOCH_FACTOR = 3, 2.0
RECIPE_ENSEMBLE_GAIN = 2.0  # points, 'ensembles give about 2%'


def train_run(base_config, workdir: str, *, seed: int, epochs: float,
              hidden: Optional[tuple] = None, patience: Optional[int] = None) -> dict[str, Any]:
  """Trains one configuration from scratch in `workdir`; returns the summary plus timing."""
  from jrecipe.train import loop
  config = copy.deepcopy(base_config)
  config.seed = int(seed)
  config.num_epochs = float(epochs)
  config.progress = False
  config.checkpoint.every_epochs = 1_000_000  # only the final checkpoint
  if hidden is not None:
    config.model.hidden = tuple(hidden)
  if patience is not None:
    config.early_stopping_patience = int(patience)
  _fresh_dir(workdir)
  t0 = time.perf_counter()
  summary = loop.train_and_evaluate(config, workdir)
  return {"workdir": workdir, "seed": int(seed), "summary": summary,
          "seconds": time.perf_counter() - t0}


def _acc(summary, split):
  d = summary.get(split) or {}
  return 100.0 * d["accuracy"] if d.get("accuracy") is not None else None


def _loss(summary, split):
  d = summary.get(split) or {}
  return d.get("loss")


# ----------------------------------------------------------------------------- runs


def ensemble_runs(config, seeds: int, members: int, epochs: float, workdir: str, log=print):
  """repetition -> list of member runs (seeds members*r .. members*r + members - 1)."""
  reps = []
  for r in range(seeds):
    runs = []
    for s in range(members * r, members * r + members):
      run = train_run(config, os.path.join(workdir, "members", f"seed_{s}"), seed=s,
                      epochs=epochs)
      runs.append(run)
      log(f"member rep {r} seed {s}: test {_acc(run['summary'], 'test'):.2f}% "
          f"({run['seconds']:.1f} s)")
    reps.append(runs)
  return reps


def ensemble_records(reps) -> list[dict]:
  from jrecipe.ensemble.evaluate import evaluate_ensemble
  from jrecipe.ensemble.members import from_runs
  out = []
  for r, runs in enumerate(reps):
    members = from_runs([run["workdir"] for run in runs])
    res = evaluate_ensemble(members, split="test")
    out.append({"rep": r, "seeds": [run["seed"] for run in runs],
                "ens_acc": 100 * res["ensemble"]["accuracy"], "ens_nll": res["ensemble"]["nll"],
                "mean_acc": 100 * res["mean_member"]["accuracy"],
                "mean_nll": res["mean_member"]["nll"],
                "best_acc": 100 * res["best_member"]["accuracy"],
                "best_nll": res["best_member"]["nll"], "count": res["count"]})
  for rec in out:
    rec["gain"] = rec["ens_acc"] - rec["mean_acc"]
    rec["gain_best"] = rec["ens_acc"] - rec["best_acc"]
    rec["nll_gain"] = rec["mean_nll"] - rec["ens_nll"]
  return out


def bigger_runs(config, seeds: int, epochs: float, workdir: str, log=print):
  out = {"small": [], "large": []}
  for s in range(seeds):
    small = train_run(config, os.path.join(workdir, "small", f"seed_{s}"), seed=s,
                      epochs=epochs, hidden=SMALL_HIDDEN, patience=0)
    large = train_run(config, os.path.join(workdir, "large", f"seed_{s}"), seed=s,
                      epochs=LARGE_EPOCH_FACTOR * epochs, hidden=LARGE_HIDDEN,
                      patience=LARGE_PATIENCE)
    out["small"].append(small)
    out["large"].append(large)
    log(f"seed {s}: small test {_acc(small['summary'], 'test'):.2f}%, large test "
        f"{_acc(large['summary'], 'test'):.2f}% after {large['summary']['epoch']:g} epochs")
  return out


# ----------------------------------------------------------------------------- sections


def _header(name: str, title: str, meta: dict, n_runs: int, wall: float, intro: str) -> list[str]:
  lines = [f"<!-- BEGIN {name} -->", f"## {title}", ""]
  if meta.get("quick"):
    lines += ["**Smoke run (`--quick`): these numbers are not results.**", ""]
  lines += [intro + " Generated by `experiments/recipe_claims.py`; do not edit, rerun the "
            "command.", "",
            f"- Command: `{meta['command']}`",
            f"- Date: {meta['date']}",
            f"- Machine: {meta['machine']}",
            f"- Wall time: {_duration(wall)} for {n_runs} runs (compilation included; runs "
            "shared between claims are counted in each)",
            f"- Job: {meta['job']}", ""]
  return lines


def _verdict_word(ok: bool) -> str:
  return "**reproduces**" if ok else "**does not reproduce** on this data"


def render_ensemble(recs: list[dict], members: int, meta: dict, wall: float) -> str:
  n = len(recs)
  lines = _header("claim_ensemble", f"Claim: an ensemble of {members} beats a single model",
                  meta, n * members, wall,
                  f"Recipe stage 6: 'ensembles are a pretty much guaranteed way to gain ~2% on "
                  f"any task'. For each of {n} repetition(s) r, {members} members are the job "
                  f"trained with seeds {members}r..{members}r+{members - 1} for "
                  f"{meta['epochs']:g} epoch(s); the ensemble averages their probabilities.")
  count = recs[0]["count"] if recs else None
  lines += [f"Test split: {count} examples (one example = {100 / count:.2f} points).", "",
            "| | test accuracy (%) | test NLL |", "|---|---|---|"]
  for label, a, l in (("ensemble", "ens_acc", "ens_nll"),
                      ("mean single member", "mean_acc", "mean_nll"),
                      ("best single member (chosen on test)", "best_acc", "best_nll"),
                      ("gain: ensemble - mean member", "gain", "nll_gain")):
    am, asd = _mean_std([r[a] for r in recs])
    lm, lsd = _mean_std([r[l] for r in recs])
    lines.append(f"| {label} | {_pm(am, asd, '.2f')} | {_pm(lm, lsd, '.4f')} |")
  gain, gsd = _mean_std([r["gain"] for r in recs])
  nllg, _ = _mean_std([r["nll_gain"] for r in recs])
  gbest, _ = _mean_std([r["gain_best"] for r in recs])
  ok = gain is not None and gain > 0
  size = ("about the recipe's ~2 points" if gain is not None and gain >= 0.5 * RECIPE_ENSEMBLE_GAIN
          else f"well under the recipe's ~{RECIPE_ENSEMBLE_GAIN:g} points")
  lines += ["", f"Mean ± sample standard deviation over {n} repetition(s) (no ± with one). "
            "NLL gain row: mean member NLL - ensemble NLL (positive = ensemble better).", "",
            f"Claim 'an ensemble beats a single model' (recipe stage 6): {_verdict_word(ok)}: "
            f"the ensemble's test accuracy is {gain:+.2f} points over the mean single member "
            f"({gbest:+.2f} over the best member), {size}; the test NLL changes by "
            f"{-nllg:+.4f} ({'lower' if nllg > 0 else 'not lower'} for the ensemble).", "",
            "<!-- END claim_ensemble -->"]
  return "\n".join(lines) + "\n"


def ema_records(reps) -> list[dict]:
  out = []
  for runs in reps:
    for run in runs:
      s = run["summary"]
      out.append({"seed": run["seed"],
                  "val_err": 100 - _acc(s, "validation"),
                  "val_err_ema": 100 - _acc(s, "validation_ema"),
                  "val_loss": _loss(s, "validation"), "val_loss_ema": _loss(s, "validation_ema"),
                  "test_err": 100 - _acc(s, "test"), "test_err_ema": 100 - _acc(s, "test_ema"),
                  "steps": s.get("step"), "count": (s.get("validation") or {}).get("count")})
  return out


def render_ema(recs: list[dict], decay: float, meta: dict, wall: float) -> str:
  n = len(recs)
  lines = _header("claim_ema", "Claim: an EMA of the parameters improves validation error",
                  meta, n, wall,
                  "CS231n: evaluating with an exponential moving average of the parameters "
                  "'almost always improves validation error'. The runs are the ensemble's "
                  f"members ({n} runs, {meta['epochs']:g} epochs, {recs[0]['steps']} steps each),"
                  f" trained with ema_decay={decay:g}; each is evaluated with its raw and its "
                  "EMA parameters.")
  count = recs[0]["count"]
  lines += [f"Validation split: {count} examples (one example = {100 / count:.2f} points).", "",
            "| parameters | validation error (%) | validation loss | test error (%) |",
            "|---|---|---|---|"]
  for label, suf in (("raw", ""), ("EMA", "_ema")):
    cols = [_pm(*_mean_std([r[k + suf] for r in recs]), f)
            for k, f in (("val_err", ".2f"), ("val_loss", ".4f"), ("test_err", ".2f"))]
    lines.append(f"| {label} | " + " | ".join(cols) + " |")
  diff, _ = _mean_std([r["val_err_ema"] - r["val_err"] for r in recs])
  tdiff, _ = _mean_std([r["test_err_ema"] - r["test_err"] for r in recs])
  better = sum(r["val_err_ema"] < r["val_err"] for r in recs)
  worse = sum(r["val_err_ema"] > r["val_err"] for r in recs)
  ok = diff < 0
  lines += ["", f"Mean ± sample standard deviation over {n} run(s).", "",
            f"Claim 'EMA almost always improves validation error' (CS231n): "
            f"{_verdict_word(ok)}: EMA changes the mean validation error by {diff:+.2f} points "
            f"(lower in {better}, higher in {worse}, equal in {n - better - worse} of {n} runs) "
            f"and the mean test error by {tdiff:+.2f} points, with ema_decay={decay:g} over "
            f"{recs[0]['steps']} steps.", "", "<!-- END claim_ema -->"]
  return "\n".join(lines) + "\n"


def render_bigger(runs: dict, meta: dict, wall: float) -> str:
  n = len(runs["small"])
  e = meta["epochs"]
  lines = _header("claim_bigger_early_stopped",
                  "Claim: a bigger model with early stopping beats a smaller one", meta, 2 * n,
                  wall,
                  "Recipe stage 4 ('Regularize'): rather than shrinking the model, use a larger "
                  "one and stop it early. Small MLP hidden="
                  f"{SMALL_HIDDEN} trained {e:g} epochs vs large hidden={LARGE_HIDDEN} with "
                  f"early_stopping_patience={LARGE_PATIENCE} and up to "
                  f"{LARGE_EPOCH_FACTOR * e:g} epochs, seeds 0..{n - 1}; the final parameters "
                  "are evaluated.")
  lines += ["| model | epochs trained | validation accuracy (%) | test accuracy (%) "
            "| test loss |", "|---|---|---|---|---|"]
  for label, key in ((f"small {SMALL_HIDDEN}", "small"),
                     (f"large {LARGE_HIDDEN} + early stopping", "large")):
    ss = [r["summary"] for r in runs[key]]
    cols = [_pm(*_mean_std([s["epoch"] for s in ss]), ".1f"),
            _pm(*_mean_std([_acc(s, "validation") for s in ss]), ".2f"),
            _pm(*_mean_std([_acc(s, "test") for s in ss]), ".2f"),
            _pm(*_mean_std([_loss(s, "test") for s in ss]), ".4f")]
    lines.append(f"| {label} | " + " | ".join(cols) + " |")
  small, _ = _mean_std([_acc(r["summary"], "test") for r in runs["small"]])
  large, _ = _mean_std([_acc(r["summary"], "test") for r in runs["large"]])
  wins = sum(_acc(l["summary"], "test") > _acc(s["summary"], "test")
             for s, l in zip(runs["small"], runs["large"]))
  stopped = sum(bool(r["summary"].get("stopped")) for r in runs["large"])
  ok = large > small
  lines += ["", f"Mean ± sample standard deviation over {n} seed(s).", "",
            f"Claim 'a bigger model with early stopping beats a smaller one' (recipe stage 4): "
            f"{_verdict_word(ok)}: the large model's mean test accuracy is {large - small:+.2f} "
            f"points vs the small one ({large:.2f}% vs {small:.2f}%; higher for {wins} of {n} "
            f"seeds); early stopping fired in {stopped} of {n} large runs.", "",
            "<!-- END claim_bigger_early_stopped -->"]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def define_flags():
  """The flags, defined when run as a script (importing this module defines none)."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/digits_mlp.py",
                                  "Config file of the job (get_config()).", lock_config=True)
  flags.DEFINE_integer("seeds", 3, "Repetitions (seeds) per claim.", lower_bound=1)
  flags.DEFINE_float("epochs", 20, "Epochs per run (the large model may use 2x).",
                     lower_bound=0)
  flags.DEFINE_string("workdir", "/tmp/jrecipe_experiments/claims",
                      "Parent of the runs' work directories (each is emptied before its run).")
  flags.DEFINE_string("results", "experiments/RESULTS.md", "Markdown file of the results.")
  flags.DEFINE_bool("quick", False, "Smoke run: 1 seed, 1 epoch, 2 ensemble members unless "
                    "--seeds/--epochs/--members are given.")
  flags.DEFINE_list("claims", list(CLAIMS), f"Claims to test, from {','.join(CLAIMS)}.")
  flags.DEFINE_integer("members", MEMBERS, "Ensemble members per repetition.", lower_bound=1)
  return flags.FLAGS


def main(argv: list[str]) -> None:
  from absl import flags
  from ml_collections import config_flags
  FLAGS = flags.FLAGS
  start("recipe_claims", argv)
  unknown = [c for c in FLAGS.claims if c not in CLAIMS]
  if unknown:
    sys.exit(f"recipe_claims: error: unknown claims {unknown}; choose from {','.join(CLAIMS)}.")
  seeds, epochs, members = quick_values(FLAGS, {"seeds": 1, "epochs": 1,
                                                "members": QUICK_MEMBERS})
  config, config_file = FLAGS.config, config_flags.get_config_filename(FLAGS["config"])
  meta = run_meta(FLAGS, epochs, (
      f"`{config_file}` (data {config.data.name}, model {config.model.name} "
      f"{tuple(config.model.get('hidden', ()))}, batch {config.batch_size}, "
      f"{config.optimizer.name} {config.optimizer.learning_rate:g}, schedule "
      f"{config.schedule.name}, ema_decay {config.ema_decay:g})"))
  sections = []
  if "ensemble" in FLAGS.claims or "ema" in FLAGS.claims:
    t0 = time.perf_counter()
    reps = ensemble_runs(config, seeds, members, epochs, FLAGS.workdir)
    t_train = time.perf_counter() - t0
    if "ensemble" in FLAGS.claims:
      t1 = time.perf_counter()
      recs = ensemble_records(reps)
      sections.append(("claim_ensemble", render_ensemble(
          recs, members, meta, t_train + time.perf_counter() - t1)))
    if "ema" in FLAGS.claims:
      sections.append(("claim_ema", render_ema(ema_records(reps), config.ema_decay, meta,
                                               t_train)))
  if "bigger_early_stopped" in FLAGS.claims:
    t0 = time.perf_counter()
    runs = bigger_runs(config, seeds, epochs, FLAGS.workdir)
    sections.append(("claim_bigger_early_stopped",
                     render_bigger(runs, meta, time.perf_counter() - t0)))
  for name, body in sections:
    write_section(FLAGS.results, name, body)
    print(body)
  print(f"Wrote {', '.join(n for n, _ in sections)} to {FLAGS.results}.")


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main)
