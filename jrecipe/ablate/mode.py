"""`--mode=ablate`: change one thing at a time, over seeds, and test the hypothesis you wrote.

    jrecipe --mode=ablate --config=configs/digits_mlp.py --workdir=DIR \\
        --config.ablate.seeds=3 \\
        --config.ablate.variants="('wider: model.hidden=(512,512) -> better', \\
                                   'no_ema: ema_decay=0.0 -> same')"

Recipe stage 3 ('complexify only one at a time': "plug signals in one by one and ensure
that you get a performance boost you'd expect") and its reverse, the classic ablation
table (`ablate.kind='remove'`: start from the full config and remove one component per
variant). Each variant is a string

    'NAME: PATH=VALUE, PATH=VALUE -> better|worse|same [by SIZE]'

whose overrides apply on top of this --config (the base, or the full config for
'remove'), with the expected direction of the change on the validation metric written
down beforehand, and optionally its size (accuracy points, or loss units). VALUE is a
Python literal (`1e-3`, `(64, 64)`, `True`, `'cosine'`) or a bare string (`cosine`).

The base and every variant train `ablate.seeds` times (seeds config.seed, +1, ...) with
`train_and_evaluate` into DIR/ablate/<name>/seed<k> (a finished run is reused, so adding a
variant later trains only the new one). Each change's effect is the difference of the mean
validation metric from the base, signed so that positive means better, with its 95% interval
from a paired bootstrap over seeds and validation examples (stats.py: base and variant share
seeds and examples); a change is 'better' or 'worse' only when the interval excludes 0, and
'same' otherwise. The hypothesis is 'held', 'refuted' (the opposite happened) or
'inconclusive' (expected a change, saw noise); with fewer than 3 seeds, 'no verdict'.

Writes DIR/ablation.json and DIR/ablation.md (the table), and prints the table.
"""

import ast
import dataclasses
import logging
import os
import re
from typing import Any, Optional

import numpy as np

from jrecipe.ablate.stats import (MIN_SEEDS, effect, paired_bootstrap, per_example_scores,
                                  verdict)
from jrecipe.errors import UserError
from jrecipe.train.writer import write_json_atomic

__all__ = ["MIN_SEEDS", "effect", "paired_bootstrap", "run_ablation", "run_mode", "verdict"]

log = logging.getLogger("jrecipe")

DIRECTIONS = ("better", "worse", "same")
KINDS = ("add", "remove")
METRICS = ("accuracy", "loss")
SYNTAX = ("'NAME: PATH=VALUE, PATH=VALUE -> better|worse|same [by SIZE]', e.g. "
          "'wider: model.hidden=(512, 512), l2=1e-4 -> better by 0.5'")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_HYPOTHESIS = re.compile(r"^(better|worse|same)(?:\s+by\s+([0-9.eE+-]+))?$")


@dataclasses.dataclass
class Variant:
  """One change: its name, overrides ({'a.b': value}), expected direction and size."""

  name: str
  overrides: dict
  direction: str
  size: Optional[float] = None
  text: str = ""


def split_top_level(text: str, sep: str = ",") -> list[str]:
  """Splits on `sep` outside brackets and quotes: 'a=(1, 2), b=3' -> ['a=(1, 2)', 'b=3']."""
  parts, depth, quote, cur = [], 0, None, []
  for ch in text:
    if quote:
      cur.append(ch)
      if ch == quote:
        quote = None
      continue
    if ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == sep and depth == 0:
      parts.append("".join(cur))
      cur = []
      continue
    cur.append(ch)
  parts.append("".join(cur))
  return [p.strip() for p in parts if p.strip()]


def parse_value(text: str) -> Any:
  """A Python literal, else the bare string; lists become tuples (config fields are tuples)."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return tuple(value) if isinstance(value, list) else value


def parse_variant(text: str) -> Variant:
  """Parses one variant string (see the module docstring); UserError with the syntax."""
  if not isinstance(text, str):
    raise UserError(f"ablate.variants entry {text!r} is not a string. Each entry: {SYNTAX}.")
  head, colon, rest = text.partition(":")
  name = head.strip()
  if not colon or not _NAME.match(name) or name == "base":
    raise UserError(f"ablate.variants entry {text!r} does not start with a name ('NAME:', "
                    "letters, digits, _ . + -; not 'base'). Each entry: " + SYNTAX + ".")
  body, arrow, hypothesis = rest.rpartition("->")
  if not arrow:
    raise UserError(f"ablate.variants entry {text!r} has no hypothesis: write down what you "
                    f"expect after '->' (better, worse or same, optionally 'by SIZE'). Each "
                    f"entry: {SYNTAX}.")
  m = _HYPOTHESIS.match(hypothesis.strip().lower())
  if not m:
    raise UserError(f"ablate.variants entry {text!r}: hypothesis {hypothesis.strip()!r} is not "
                    f"one of {', '.join(DIRECTIONS)} (optionally followed by 'by SIZE').")
  size = None
  if m.group(2) is not None:
    try:
      size = float(m.group(2))
    except ValueError:
      size = -1.0
    if not size > 0 or m.group(1) == "same":
      raise UserError(f"ablate.variants entry {text!r}: 'by {m.group(2)}' must be a positive "
                      "number, after 'better' or 'worse'.")
  overrides = {}
  for item in split_top_level(body):
    path, eq, value = item.partition("=")
    path = path.strip()
    if not eq or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$", path):
      raise UserError(f"ablate.variants entry {text!r}: {item!r} is not an override "
                      f"'PATH=VALUE' (e.g. model.hidden=(64, 64)). Each entry: {SYNTAX}.")
    overrides[path] = parse_value(value.strip())
  if not overrides:
    raise UserError(f"ablate.variants entry {text!r} changes nothing: give at least one "
                    f"PATH=VALUE. Each entry: {SYNTAX}.")
  return Variant(name=name, overrides=overrides, direction=m.group(1), size=size, text=text)


def settings(config) -> dict:
  """The validated `config.ablate` fields, variants parsed."""
  section = config.ablate
  variants = section.get("variants", ())
  if isinstance(variants, str):  # one string: entries separated by ';' or new lines
    variants = [v for v in re.split(r"[;\n]", variants) if v.strip()]
  variants = [parse_variant(v) for v in variants]
  if not variants:
    raise UserError("--mode=ablate needs config.ablate.variants: a tuple of strings " + SYNTAX +
                    ", one change each, applied one at a time on top of this config.")
  names = [v.name for v in variants]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise UserError(f"ablate.variants has duplicate names {', '.join(dup)}: names must be unique "
                    "(each gets DIR/ablate/<name>/).")
  seeds, kind, metric = section.get("seeds", 3), section.get("kind", "add"), section.get(
      "metric", "accuracy")
  if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
    raise UserError(f"ablate.seeds={seeds!r} must be an integer >= 1 (2 or more give a spread).")
  if kind not in KINDS:
    raise UserError(f"ablate.kind={kind!r} is not valid: 'add' (each variant adds a change to "
                    "the base) or 'remove' (each removes a component from the full config).")
  if metric not in METRICS:
    raise UserError(f"ablate.metric={metric!r} is not valid: {', '.join(METRICS)} (on the "
                    "validation split).")
  return {"variants": variants, "seeds": seeds, "kind": kind, "metric": metric}


def variant_config(config, overrides: dict, seed: int):
  """A locked copy of `config` with `overrides`, `seed`, and the ablate section reset.

  The ablation's own fields are reset to their defaults so that a run's config.json does
  not depend on the list of variants (runs are reused when variants are added).
  """
  from jrecipe.config_base import base_config
  cfg = config.copy_and_resolve_references()
  defaults = base_config().ablate
  for key in list(cfg.ablate.keys()):
    with cfg.ablate.ignore_type():
      cfg.ablate[key] = defaults.get(key)
  cfg.seed = int(seed)
  for path, value in overrides.items():
    node, where = cfg, "config"
    *parents, leaf = path.split(".")
    for depth, name in enumerate([*parents, leaf]):
      if not hasattr(node, "keys") or name not in node:
        valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none (a value)"
        raise UserError(f"ablate override {path}={value!r}: {where} has no field {name!r}. "
                        f"PATH must be an existing config field, as in --config.PATH=...; "
                        f"fields of {where}: {valid}.")
      if depth < len(parents):
        node, where = node[name], f"{where}.{name}"
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise UserError(f"ablate override {path}={value!r}: the field holds a "
                      f"{type(old).__name__} ({old!r}), and {value!r} cannot replace it. Give a "
                      "VALUE of the field's type (strings may be bare or quoted).") from e
  cfg.lock()
  return cfg


def _score(summary: dict, metric: str) -> float:
  """The validation metric in display units: accuracy in percentage points, loss as is."""
  v = float(summary["validation"][metric])
  return 100.0 * v if metric == "accuracy" else v


def _fmt(mean: float, std: Optional[float]) -> str:
  return f"{mean:.2f}" + (f" +- {std:.2f}" if std is not None else "")


def markdown(result: dict) -> str:
  """The ablation table as Markdown."""
  metric, unit = result["metric"], result["unit"]
  base_label = "full config" if result["kind"] == "remove" else "base"
  lines = [f"# Ablation ({'remove one at a time' if result['kind'] == 'remove' else 'add one at a time'})",
           "", f"Validation {metric} ({unit}), mean +- std over {result['seeds']} seeds; effect "
           "= variant - base (paired by seed), positive = better, with its 95% interval (a "
           "paired bootstrap over seeds and validation examples). No verdict below "
           f"{MIN_SEEDS} seeds.", "",
           f"| variant | overrides | validation {metric} | effect | hypothesis | verdict |",
           "|---|---|---|---|---|---|",
           f"| {base_label} | - | {_fmt(result['base']['mean'], result['base']['std'])} | - | - | - |"]
  for v in result["variants"]:
    label = f"- {v['name']}" if result["kind"] == "remove" else f"+ {v['name']}"
    ov = ", ".join(f"{k}={val!r}" for k, val in v["overrides"].items())
    if v.get("interval"):
      eff = f"{v['effect']:+.2f} [{v['interval'][0]:+.2f}, {v['interval'][1]:+.2f}]"
    else:
      eff = f"{v['effect']:+.2f}" + (f" +- {v['se']:.2f}" if v["se"] else "")
    hyp = v["direction"] + (f" by {v['size']:g}" if v["size"] else "")
    lines.append(f"| {label} | `{ov}` | {_fmt(v['mean'], v['std'])} | {eff} | {hyp} | "
                 f"{v['verdict']}: {v['text']} |")
  return "\n".join(lines) + "\n"


def _train(cfg, workdir: str) -> dict:
  """A run's summary: reused if `workdir` holds a finished run of this config."""
  import json
  from jrecipe.train import loop, workdir as workdir_lib
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):
    try:
      with open(os.path.join(workdir, "config.json")) as f:
        same = json.load(f) == workdir_lib.config_dict(cfg)
      with open(path) as f:
        summary = json.load(f)
      if same and "validation" in summary and not str(summary.get("stopped") or "").startswith(
          "preempted"):
        log.info("ablate: reusing the finished run in %s", workdir)
        return summary
    except (OSError, ValueError, AttributeError):
      pass
  return loop.train_and_evaluate(cfg, workdir)


def _per_example(workdir: str, metric: str) -> Optional[np.ndarray]:
  """The run's per-example validation scores, or None (with a warning) if unreadable."""
  try:
    return per_example_scores(workdir, metric)
  except (UserError, OSError, ValueError, KeyError) as e:
    log.warning("ablate: no per-example scores for %s (%s); its interval is left out.",
                workdir, e)
    return None


def run_ablation(config, workdir: str) -> dict:
  """Trains base and variants over seeds; returns (and writes) the ablation result."""
  s = settings(config)
  variants, seeds, metric = s["variants"], s["seeds"], s["metric"]
  # Every override is checked (names and types) before anything trains.
  for v in variants:
    variant_config(config, v.overrides, config.seed)
  unit = "points" if metric == "accuracy" else "loss"
  runs, examples = {}, {}
  for name, overrides in [("base", {})] + [(v.name, v.overrides) for v in variants]:
    scores, per_example = [], []
    for k in range(seeds):
      cfg = variant_config(config, overrides, config.seed + k)
      with cfg.unlocked():
        cfg.progress = False
      wd = os.path.join(workdir, "ablate", name, f"seed{k}")
      log.info("ablate: training %s, seed %d (%s)", name, config.seed + k, wd)
      scores.append(_score(_train(cfg, wd), metric))
      per_example.append(_per_example(wd, metric))
    runs[name], examples[name] = scores, per_example

  def stats(values):
    a = np.asarray(values, float)
    return {"values": [float(x) for x in a], "mean": float(a.mean()),
            "std": float(a.std(ddof=1)) if len(a) > 1 else None}

  result = {"kind": s["kind"], "metric": metric, "unit": unit, "split": "validation",
            "seeds": seeds, "base": {"name": "base", **stats(runs["base"])}, "variants": []}
  for v in variants:
    e = effect(runs["base"], runs[v.name], metric)
    pairs = [(b, x) for b, x in zip(examples["base"], examples[v.name])
             if b is not None and x is not None and len(b) == len(x)]
    interval = paired_bootstrap(*zip(*pairs), metric) if len(pairs) == seeds else None
    entry = {"name": v.name, "spec": v.text, "overrides": v.overrides, "direction": v.direction,
             "size": v.size, **stats(runs[v.name]), **e, "interval": interval,
             **verdict(e["effect"], e["se"], v.direction, v.size, unit, interval=interval,
                       seeds=seeds),
             "runs": [os.path.join("ablate", v.name, f"seed{k}") for k in range(seeds)]}
    result["variants"].append(entry)
  os.makedirs(workdir, exist_ok=True)
  write_json_atomic(os.path.join(workdir, "ablation.json"), result)
  md = markdown(result)
  tmp = os.path.join(workdir, f"ablation.md.tmp.{os.getpid()}")
  with open(tmp, "w") as f:
    f.write(md)
  os.replace(tmp, os.path.join(workdir, "ablation.md"))
  return result


def run_mode(config, workdir: str, options=None) -> int:
  """The `--mode=ablate` entry: trains, writes DIR/ablation.json and .md, prints the table."""
  del options  # this mode takes no command-line options (jrecipe.modes.ModeOptions)
  result = run_ablation(config, workdir)
  print(markdown(result), flush=True)
  for v in result["variants"]:
    print(f"{v['name']}: {v['verdict']}: {v['text']}", flush=True)
  return 0
