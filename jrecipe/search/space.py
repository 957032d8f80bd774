"""The search space and the stages of a search, declared in the config (recipe stage 5, 'Tune').

    --config.search.space='optimizer.learning_rate=loguniform(1e-4,1e-1); l2=loguniform(1e-6,1e-2);
                           model.dropout=uniform(0,0.5); batch_size=logint(16,256);
                           model.hidden=choice((64,),(256,256))'
    --config.search.stages='30x0.5,10x3,5x10'    # TRIALSxEPOCHS per stage, coarse to fine

One string, so it survives absl overrides and locked ConfigDicts. CS231n: search the learning
rate and regularisation strengths on a log scale (`loguniform`), dropout on its own linear
scale (`uniform`). A stage after the first narrows every range around the best trials of the
stage before it (`narrow`); `edge_warnings` says when the best value lies at the border of its
declared range ('you may be missing better settings beyond it').
"""

import ast
import copy
import dataclasses
import math
import re
from typing import Any, Optional, Sequence

import ml_collections

from jrecipe.errors import UserError

KINDS = ("loguniform", "uniform", "int", "logint", "choice")
VALID_FORMS = ("'field=loguniform(low,high)' (learning rates, regularisation), "
               "'field=uniform(low,high)' (dropout), 'field=int(low,high)', "
               "'field=logint(low,high)' (widths, batch sizes), 'field=choice(a,b,...)' "
               "(any Python literals), separated by ';'")
_ITEM = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*([a-z]+)\s*\((.*)\)\s*$", re.S)


@dataclasses.dataclass(frozen=True)
class Param:
  """One searched config field: its kind and range (or choices)."""

  field: str
  kind: str
  low: Optional[float] = None
  high: Optional[float] = None
  choices: tuple = ()

  @property
  def log(self) -> bool:
    return self.kind in ("loguniform", "logint")

  @property
  def numeric(self) -> bool:
    return self.kind != "choice"

  def distribution(self):
    """The Optuna distribution sampled for this field (choices as their Python repr)."""
    import optuna
    d = optuna.distributions
    if self.kind in ("loguniform", "uniform"):
      return d.FloatDistribution(float(self.low), float(self.high), log=self.log)
    if self.kind in ("int", "logint"):
      return d.IntDistribution(int(self.low), int(self.high), log=self.log)
    return d.CategoricalDistribution([repr(c) for c in self.choices])

  def to_value(self, sampled: Any) -> Any:
    """The config value of an Optuna sample (a choice comes back from its repr)."""
    if self.kind == "choice":
      return ast.literal_eval(sampled) if isinstance(sampled, str) else sampled
    return int(sampled) if self.kind in ("int", "logint") else float(sampled)

  def describe(self) -> str:
    if self.kind == "choice":
      return f"choice({', '.join(repr(c) for c in self.choices)})"
    return f"{self.kind}({self.low:g}, {self.high:g})"

  def position(self, value: float) -> float:
    """Where `value` lies in [low, high]: 0 at low, 1 at high (log scale if log)."""
    f = math.log if self.log else (lambda x: x)
    lo, hi = f(self.low), f(self.high)
    return 0.5 if hi == lo else (f(value) - lo) / (hi - lo)


def _config_leaf(config: ml_collections.ConfigDict, field: str):
  node = config
  parts = field.split(".")
  for i, p in enumerate(parts):
    if not hasattr(node, "keys") or p not in node.keys():
      where = ".".join(parts[:i]) or "the config"
      valid = sorted(node.keys()) if hasattr(node, "keys") else []
      raise UserError(
          f"search.space names the field {field!r}, but {where} has no field {p!r}. Valid "
          f"fields there: {', '.join(valid)}. The space can search any existing config field.")
    node = node[p]
  if isinstance(node, ml_collections.ConfigDict):
    raise UserError(f"search.space names {field!r}, which is a section, not a field: search one "
                    f"of its fields ({', '.join(sorted(node.keys()))}).")
  return node


def set_field(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
  """config.<field> = value (a dotted path to an existing field)."""
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  current = node[leaf]
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  node[leaf] = value


def parse_space(text: str, config: ml_collections.ConfigDict) -> list[Param]:
  """Parses `config.search.space` into Params, checking every field and range.

  Raises:
    UserError: naming the offending entry and the valid forms.
  """
  items = [s for s in re.split(r"[;\n]", text or "") if s.strip()]
  if not items:
    raise UserError("search.space is empty: --mode=search needs at least one field to search, "
                    "e.g. --config.search.space='optimizer.learning_rate=loguniform(1e-4,1e-1)'. "
                    f"Valid forms: {VALID_FORMS}.")
  params, seen = [], set()
  for item in items:
    m = _ITEM.match(item)
    if not m or m.group(2) not in KINDS:
      raise UserError(f"search.space entry {item.strip()!r} is not understood. Valid forms: "
                      f"{VALID_FORMS}.")
    field, kind, args_text = m.groups()
    if field.split(".")[0] in ("search", "lr_find"):
      raise UserError(f"search.space cannot search {field!r}: the search's own settings are "
                      "not hyperparameters of a trial.")
    if field in seen:
      raise UserError(f"search.space names {field!r} twice; give each field one range.")
    seen.add(field)
    current = _config_leaf(config, field)
    try:
      args = ast.literal_eval(f"({args_text},)") if args_text.strip() else ()
    except (ValueError, SyntaxError) as e:
      raise UserError(f"search.space entry {item.strip()!r}: the arguments {args_text!r} are not "
                      f"Python literals ({e}). Valid forms: {VALID_FORMS}.") from e
    params.append(_make_param(field, kind, args, current, item.strip()))
  return params


def _make_param(field, kind, args, current, item) -> Param:
  if kind == "choice":
    if len(args) < 1:
      raise UserError(f"search.space entry {item!r}: choice() needs at least one value.")
    for v in args:  # each value must be assignable to the field (type-safe ConfigDict)
      probe = ml_collections.ConfigDict({"x": copy.deepcopy(current)})
      try:
        probe.x = float(v) if isinstance(current, float) and isinstance(v, int) else v
      except (TypeError, ValueError) as e:
        raise UserError(f"search.space entry {item!r}: the value {v!r} cannot be assigned to "
                        f"{field} (currently {current!r}): {e}.") from e
    return Param(field, kind, choices=tuple(args))
  if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool)
                               for a in args):
    raise UserError(f"search.space entry {item!r}: {kind}() takes two numbers (low, high). "
                    f"Valid forms: {VALID_FORMS}.")
  low, high = args
  if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
    raise UserError(f"search.space entry {item!r}: the range needs finite low < high.")
  if kind in ("loguniform", "logint") and low <= 0:
    raise UserError(f"search.space entry {item!r}: a log-scaled range needs low > 0 (the log of "
                    f"{low!r} is undefined); use uniform()/int() for ranges that include 0.")
  if kind in ("int", "logint"):
    if not (isinstance(low, int) and isinstance(high, int)):
      raise UserError(f"search.space entry {item!r}: {kind}() takes two integers.")
    if isinstance(current, (bool, str)) or not isinstance(current, (int, float)):
      raise UserError(f"search.space entry {item!r}: {field} holds {current!r}, not a number.")
  elif isinstance(current, bool) or not isinstance(current, float):
    raise UserError(f"search.space entry {item!r}: {field} holds {current!r} "
                    f"({type(current).__name__}); {kind}() samples floats. Use int()/logint() "
                    "for an integer field, choice() for anything else.")
  return Param(field, kind, low=low, high=high)


@dataclasses.dataclass(frozen=True)
class Stage:
  trials: int
  epochs: float


def parse_stages(text: str) -> list[Stage]:
  """'30x0.5,10x3' -> [Stage(30, 0.5), Stage(10, 3.0)] (trials x epochs per trial)."""
  stages = []
  for part in [p for p in re.split(r"[,;]", str(text or "")) if p.strip()]:
    m = re.match(r"^\s*(\d+)\s*[xX*]\s*([0-9.eE+-]+)\s*$", part)
    try:
      stage = Stage(int(m.group(1)), float(m.group(2))) if m else None
    except ValueError:
      stage = None
    if stage is None or stage.trials < 1 or not (stage.epochs > 0 and math.isfinite(stage.epochs)):
      raise UserError(f"search.stages entry {part.strip()!r} is not TRIALSxEPOCHS with at least "
                      "one trial and a positive (possibly fractional) number of epochs. Valid: "
                      "e.g. '30x0.5,10x3,5x10' (coarse to fine).")
    stages.append(stage)
  if not stages:
    raise UserError("search.stages is empty; e.g. --config.search.stages='30x0.5,10x3'.")
  return stages


def narrow(params: Sequence[Param], top: Sequence[dict], pad: float = 0.25,
           min_width: float = 0.1) -> list[Param]:
  """The next stage's ranges: each range shrunk around the values of the best trials.

  Args:
    params: this stage's Params.
    top: the best trials of the stage, as {field: config value} dicts (best first).
    pad: the narrowed range extends this fraction of its width past the extreme top values.
    min_width: a range never shrinks below this fraction of its previous width (in log units
      for log-scaled fields), so one lucky trial does not collapse it to a point.

  Returns:
    Params with ranges inside the old ones (choices: those the top trials used). With no top
    trials (all diverged) the ranges stay as they were.
  """
  if not top:
    return list(params)
  out = []
  for p in params:
    values = [t[p.field] for t in top if p.field in t]
    if not values:
      out.append(p)
      continue
    if p.kind == "choice":
      kept = tuple(c for c in p.choices if any(v == c for v in values))
      out.append(dataclasses.replace(p, choices=kept or p.choices))
      continue
    f, inv = (math.log, math.exp) if p.log else ((lambda x: x), (lambda x: x))
    lo, hi = f(p.low), f(p.high)
    vlo, vhi = f(min(values)), f(max(values))
    width = max(vhi - vlo, min_width * (hi - lo))
    mid = (vlo + vhi) / 2
    nlo, nhi = min(vlo, mid - width / 2) - pad * width, max(vhi, mid + width / 2) + pad * width
    nlo, nhi = inv(max(nlo, lo)), inv(min(nhi, hi))
    if p.kind in ("int", "logint"):
      nlo, nhi = int(math.floor(nlo + 1e-9)), int(math.ceil(nhi - 1e-9))
      nlo, nhi = max(nlo, int(p.low)), min(nhi, int(p.high))
      if nlo >= nhi:
        nlo, nhi = int(p.low), int(p.high)
    else:
      nlo, nhi = float(max(nlo, p.low)), float(min(nhi, p.high))
    out.append(dataclasses.replace(p, low=nlo, high=nhi))
  return out


def edges(params: Sequence[Param], best: dict, fraction: float = 0.1) -> list[tuple]:
  """(param, side 'lower'|'upper', position 0..1) of each numeric field whose `best` value
  lies within `fraction` of either end of its range (log scale if log-scaled)."""
  out = []
  for p in params:
    if not p.numeric or p.field not in best:
      continue
    pos = p.position(best[p.field])
    if pos <= fraction or pos >= 1 - fraction:
      out.append((p, "lower" if pos <= fraction else "upper", pos))
  return out


def edge_warnings(params: Sequence[Param], best: dict, fraction: float = 0.1,
                  where: str = "") -> list[str]:
  """CS231n's 'beware best values on the border': one sentence per field whose best value
  lies within `fraction` of either end of the range `params` gives (the declared range, or
  a stage's narrowed one: `where` says which, e.g. ' of stage 2')."""
  out = []
  for p, side, pos in edges(params, best, fraction):
    bound = p.low if side == "lower" else p.high
    scale = "log scale" if p.log else "linear scale"
    out.append(f"The best {p.field}{where}, {best[p.field]:.4g}, lies at the {side} edge of its "
               f"range {p.describe()} ({100 * pos:.0f}% of the way, {scale}): you may be "
               f"missing better settings beyond it; widen the range past {bound:g}.")
  return out


def space_json(params: Sequence[Param]) -> list[dict]:
  return [{"field": p.field, "kind": p.kind, "low": p.low, "high": p.high,
           "choices": [repr(c) for c in p.choices] if p.choices else None, "log": p.log}
          for p in params]


def _names(text: Any) -> list[str]:
  return [f.strip() for f in re.split(r"[,;\s]+", str(text or "")) if f.strip()]


def roles(config: ml_collections.ConfigDict, params: Sequence[Param]) -> dict[str, Any]:
  """The Tuning Playbook's roles of the hyperparameters: scientific, nuisance and fixed.

  `search.scientific` names the space fields whose effect the search is to measure; every
  other space field is a nuisance hyperparameter, optimised over for each scientific value
  (the isolation plots); `search.fixed` names config fields held at their config value for
  the whole study (recorded with their values, so a reader knows what the result assumes).

  Returns:
    {'scientific': [fields], 'nuisance': [fields], 'fixed': {field: value}}.

  Raises:
    UserError: a scientific field outside the space, a fixed field inside it or unknown.
  """
  space = [p.field for p in params]
  scientific = _names(config.search.get("scientific", ""))
  for f in scientific:
    if f not in space:
      raise UserError(f"search.scientific names {f!r}, which the space does not search. Valid: "
                      f"fields of search.space ({', '.join(space)}).")
  fixed = {}
  for f in _names(config.search.get("fixed", "")):
    if f in space:
      raise UserError(f"search.fixed names {f!r}, which search.space searches: a field is "
                      "either searched (scientific or nuisance) or fixed, not both.")
    value = _config_leaf(config, f)
    fixed[f] = list(value) if isinstance(value, tuple) else value
  return {"scientific": scientific, "nuisance": [f for f in space if f not in scientific],
          "fixed": fixed}
