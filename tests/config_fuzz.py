"""Generated command-line config overrides, each labelled with what a correct jrecipe must do.

Shared by the property tests (tests/test_fuzz_config.py, tests/test_bad_input.py) and the CLI
fuzzer (bench/fuzz.py). An override is a `--config.key=value` string; a `Case` is a few of them
and a label:

- 'nonsense': at least one override is wrong by the schema's own declaration
  (jrecipe/config/schema.py): a field that does not exist (made up, or a real one misspelt), a
  number outside the field's declared range, nan or inf, a value of another type, a string that
  is not one of the field's choices, a misspelt registered name. It must be refused: exit 2.
- 'plausible': every override is a declared field with a value its declaration accepts; the
  combination may still be refused (a crop larger than the image, a warmup longer than the run).

Either way the outcome must be exit 0, 1 or 2 with, on failure, one paragraph on stderr, never a
traceback or a hang, and nothing half-written in the work directory.
"""

import dataclasses
import math
import os

import ml_collections
from hypothesis import strategies as st

from jrecipe.cli_config import load_config_with_overrides
from jrecipe.config import schema

DIGITS = "configs/digits_mlp.py"


def _leaf_types(cfg, prefix=""):
  out = {}
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_leaf_types(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = type(v)
  return out


# data.data_dir is left out: builtin datasets are prepared into it on first use, so random
# paths would write directories all over the file system; init_from* and *_dir fields name
# paths too. (Fixed cases in bench/fuzz.py try a data_dir that is a file.)
def _generated(k: str) -> bool:
  return k != "data.data_dir" and not k.startswith("init_from") and not k.endswith("_dir")


LEAVES = {k: t for k, t in _leaf_types(load_config_with_overrides(DIGITS, [])).items()
          if _generated(k)}
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in LEAVES if "." in k})
NAMES = ["mlp", "linear", "cnn", "nnx_mlp", "transformer", "rnn", "mlpp", "softmax_xent",
         "multiclass_svm", "l2", "huber", "sgd", "nesterov", "lbfgs", "adamw", "cosine", "step",
         "warmup_cosine", "epochs", "steps", "mesh", "pmap", "single", "digits_seq",
         "tfds:nonexistent", "tests.planted:seven_output_mlp", "tests.planted:naive_xent",
         "tests.planted:nothing_here", "no.such.module:fn", "validation", "test", ""]

_idents = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(lambda k: k != "data_dir")
_typo = st.sampled_from(sorted(LEAVES)).flatmap(
    lambda k: st.integers(0, len(k) - 1).map(lambda i: k[:i] + k[i + 1:]))
_keys = st.one_of(st.sampled_from(sorted(LEAVES)), st.sampled_from(sorted(LEAVES)),
                  _typo, st.lists(_idents, min_size=1, max_size=3).map(".".join),
                  st.builds(lambda s, i: f"{s}.{i}", st.sampled_from(SECTIONS), _idents))
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                max_size=12)
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-12, 1e300, -1.0]))
_ints = st.one_of(st.integers(-3, 300), st.integers(-2**70, 2**70))
_scalars = st.one_of(_ints, _floats, st.booleans(), _text, st.sampled_from(NAMES))
_values = st.one_of(_scalars, st.tuples(_scalars, _scalars),
                    st.lists(st.integers(-2, 300), max_size=3).map(tuple),
                    st.sampled_from(["()", "{'name': 'linear'}", "{'name': 'mlp', 'x': 1}",
                                     "(64,", "None", "1e-3j", "0x1f"]))


def _typed_value(key):
  """A value of the field's own type (what gets past the flag parser into build)."""
  t = LEAVES[key]
  by_type = {bool: st.booleans(), int: _ints, float: _floats,
             str: st.one_of(st.sampled_from(NAMES), _text),
             tuple: st.one_of(st.lists(st.integers(-2, 300), max_size=3).map(tuple),
                              st.tuples(_scalars))}
  return by_type.get(t, _values)


def render(value) -> str:
  """A value as a person types it after `--config.key=`."""
  if isinstance(value, str):
    return value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # 'nan', 'inf', '-inf'
  return repr(value)


def _section_dict(section):
  """A whole section replaced by a dict literal: its keys (or made-up ones), any values."""
  keys = sorted(k.rsplit(".", 1)[1] for k in LEAVES if k.rsplit(".", 1)[0] == section)
  dicts = st.dictionaries(st.one_of(st.sampled_from(keys), _idents), _scalars, max_size=3)
  return dicts.map(lambda d: f"--config.{section}={d!r}")


def flag(key, value):
  return f"--config.{key}={render(value)}"


# Three in five overrides are a real field with a value of its type, so that most examples
# reach experiment.build; the rest are any key (typos, made-up sections) with any value, or a
# whole section replaced by a dict literal of any fields and values.
_typed = st.sampled_from(sorted(LEAVES)).flatmap(lambda k: _typed_value(k).map(
    lambda v: flag(k, v)))
OVERRIDE = st.one_of(_typed, _typed, _typed, st.builds(flag, _keys, _values),
                     st.sampled_from(SECTIONS).flatmap(_section_dict))


# --- labelled overrides --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
  """Overrides for `--config=DIGITS:smoke` and whether a correct jrecipe must refuse them."""

  overrides: tuple
  nonsense: bool
  why: str = ""  # what makes it nonsense (for the fuzzer's report)


_DECLARED = {k: schema.FIELDS[k] for k in LEAVES if k in schema.FIELDS}
_NUMERIC = sorted(k for k, f in _DECLARED.items()
                  if set(f.types) & {int, float} and f.valid_choices() is None
                  and (f.lo is not None or f.hi is not None))
_CHOICES = sorted(k for k, f in _DECLARED.items() if f.valid_choices())
_FLOATS = sorted(k for k, f in _DECLARED.items() if f.types == (float,))
_INTS = sorted(k for k, f in _DECLARED.items() if f.types == (int,) and f.valid_choices() is None)
_BOOLS = sorted(k for k, f in _DECLARED.items() if f.types == (bool,))
_REGISTERED = ["model.name", "loss.name", "optimizer.name", "data.name"]


def _outside(key: str):
  """A number just or far outside the field's declared range."""
  f = _DECLARED[key]
  integer = f.types == (int,)
  options = []
  if f.lo is not None:
    below = [f.lo - 1, f.lo - 1e6] if integer else [f.lo - 0.5, f.lo - 1e9]
    options += below + ([f.lo] if f.lo_open else [])
  if f.hi is not None:
    above = [f.hi + 1, f.hi + 1e6] if integer else [f.hi + 0.5, f.hi + 1e9]
    options += above + ([f.hi] if f.hi_open else [])
  cast = (lambda x: int(x)) if integer else float
  return st.sampled_from(options).map(cast)


def _inside(key: str):
  """A number inside the declared range (small: the smoke run stays short)."""
  f = _DECLARED[key]
  lo = -1e3 if f.lo is None else f.lo
  hi = (lo + 50) if f.hi is None else f.hi
  if f.types == (int,):
    return st.integers(math.ceil(lo) + (1 if f.lo_open else 0),
                       max(math.ceil(lo) + 1, math.floor(hi) - (1 if f.hi_open else 0)))
  return st.floats(lo, hi, exclude_min=f.lo_open or f.lo is None,
                   exclude_max=f.hi_open or f.hi is None)


def _bad_choice(key):
  choices = set(_DECLARED[key].valid_choices())
  return _idents.map(lambda s: s + "zz").filter(lambda s: s not in choices)


def _made_up_key(k: str) -> bool:
  parts = k.split(".")
  open_section = any(schema.is_open(".".join(parts[:i])) for i in range(1, len(parts)))
  return k not in schema.FIELDS and k not in schema.SECTION_PATHS and not open_section


_NONSENSE = st.one_of(
    st.sampled_from(_NUMERIC).flatmap(lambda k: _outside(k).map(
        lambda v: (flag(k, v), f"{k} outside its range"))),
    st.sampled_from(_FLOATS).flatmap(lambda k: st.sampled_from(["nan", "inf", "-inf"]).map(
        lambda v: (flag(k, v), f"{k} not finite"))),
    st.sampled_from(_INTS + _FLOATS).flatmap(lambda k: st.sampled_from(
        ["abc", "1..2", "(1, 2)", "True_"]).map(lambda v: (flag(k, v), f"{k} not a number"))),
    st.sampled_from(_BOOLS).flatmap(lambda k: st.sampled_from(["maybe", "2", "yes_"]).map(
        lambda v: (flag(k, v), f"{k} not a bool"))),
    st.sampled_from(_CHOICES).flatmap(lambda k: _bad_choice(k).map(
        lambda v: (flag(k, v), f"{k} not one of its choices"))),
    st.sampled_from(_REGISTERED).flatmap(lambda k: _idents.map(
        lambda v: (flag(k, v + "zz"), f"{k} not a registered name"))),
    _typo.filter(_made_up_key).map(lambda k: (flag(k, 1), f"{k}: misspelt field")),
    st.builds(lambda s, i: f"{s}.{i}zz", st.sampled_from(
        [p for p in schema.SECTION_PATHS if not schema.is_open(p)]), _idents).map(
            lambda k: (flag(k, 1), f"{k}: made-up field")),
)

_PLAUSIBLE = st.one_of(
    st.sampled_from(_NUMERIC).flatmap(lambda k: _inside(k).map(lambda v: flag(k, v))),
    st.sampled_from(_CHOICES).flatmap(lambda k: st.sampled_from(
        _DECLARED[k].valid_choices()).map(lambda v: flag(k, v))),
    st.sampled_from(_BOOLS).flatmap(lambda k: st.booleans().map(lambda v: flag(k, v))),
)


@st.composite
def cases(draw, max_overrides: int = 3):
  """A Case: a few plausible overrides, plus (half the time) one nonsense one among them."""
  overrides = draw(st.lists(_PLAUSIBLE, max_size=max_overrides - 1))
  why = ""
  if draw(st.booleans()):
    bad, why = draw(_NONSENSE)
    key = bad.split("=", 1)[0]
    # last: a later override of the same field would replace it (the flag parser's order)
    overrides = [o for o in overrides if o.split("=", 1)[0] != key] + [bad]
  elif draw(st.integers(0, 3)) == 0:  # the free-form overrides: anything at all, unlabelled
    overrides.append(draw(OVERRIDE))
    return Case(tuple(overrides), nonsense=False, why="free-form")
  return Case(tuple(overrides), nonsense=bool(why), why=why)


def snapshot(root: str) -> dict:
  """{relative path: bytes} of every file under root: a refused run must leave it equal."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = fh.read()
  return out
