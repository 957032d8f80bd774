"""The two building blocks of the config schema: a typed `Field` and a `Section` of fields.

A field states its default, its type, its valid values (a range or a set of choices) and one
line of documentation, so that `base_config()`, `jrecipe.validate` and docs/config.md all read
one declaration. Checking a value is `Field.problem(value)`: None when valid, otherwise what the
value must be (the phrase the error message ends with).
"""

import dataclasses
import importlib
import math
from typing import Any, Optional, Union

import numpy as np

# Choices may be named as 'module:NAME' so that a tuple another module owns (the optimizer's
# units, the placement modes) is defined once, there, and imported only when it is checked.
Choices = Union[tuple, str, None]


def is_int(v: Any) -> bool:
  """An integer that is not a bool (True would otherwise pass as 1)."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v: Any) -> bool:
  """An int or a float (not a bool)."""
  return is_int(v) or isinstance(v, (float, np.floating))


def is_bool(v: Any) -> bool:
  """A Python or numpy bool."""
  return isinstance(v, (bool, np.bool_))


def _num(x: float) -> str:
  """A bound as a person writes it: 4294967295 (not 4.29497e+09), 0.5, 1e-08."""
  return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


_TYPE_NAMES = {bool: "True or False", int: "an integer", float: "a finite number",
               str: "a string", tuple: "a tuple"}
_ITEM_NAMES = {int: "integers", float: "numbers", str: "strings"}
_CHECKS = {bool: is_bool, int: is_int, float: is_number, str: lambda v: isinstance(v, str),
           tuple: lambda v: isinstance(v, (tuple, list))}


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its default, type, valid values and one line of documentation.

  Args:
    default: the value `base_config()` sets.
    doc: one line: what the field does (and which recipe step it serves).
    type: bool, int, float, str or tuple; a tuple of those for a field that takes either
      (a string or a tuple of strings). None: the type of `default`.
    lo, hi: the valid range of a number (of each item of a tuple of numbers); None = open.
    lo_open, hi_open: the bound itself is excluded.
    choices: the valid values, or 'module:NAME' of a tuple defined elsewhere.
    item: the type of each item of a tuple field (int, float or str).
    why: a sentence appended to the error message (what the value means, how to turn it off).
  """

  default: Any
  doc: str
  type: Any = None
  lo: Optional[float] = None
  hi: Optional[float] = None
  lo_open: bool = False
  hi_open: bool = False
  choices: Choices = None
  item: Any = None
  why: str = ""

  @property
  def types(self) -> tuple:
    """The accepted types, as a tuple."""
    t = type(self.default) if self.type is None else self.type
    return t if isinstance(t, tuple) else (t,)

  def valid_choices(self) -> Optional[tuple]:
    """The choices, imported from their module when named as 'module:NAME'."""
    if isinstance(self.choices, str):
      module, _, name = self.choices.partition(":")
      return tuple(getattr(importlib.import_module(module), name))
    return self.choices

  def range_text(self, integer: bool) -> str:
    """'>= 1', '[0, 4294967295]' or '[0, 1)': the valid interval as the messages spell it."""
    lo = -math.inf if self.lo is None else self.lo
    hi = math.inf if self.hi is None else self.hi
    if integer:
      if hi == math.inf:
        return f">= {_num(lo)}" if lo > -math.inf else ""
      return f"in [{_num(lo)}, {_num(hi)}]"
    if lo == -math.inf and hi == math.inf:
      return ""
    left = "(-inf" if lo == -math.inf else f"{'(' if self.lo_open else '['}{_num(lo)}"
    right = "inf)" if hi == math.inf else f"{_num(hi)}{')' if self.hi_open else ']'}"
    return f"in {left}, {right}"

  def _in_range(self, x: float) -> bool:
    if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
      return False
    return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

  def valid_values(self) -> str:
    """What a valid value is, in words: 'an integer >= 1', "one of 'a', 'b'", ..."""
    choices = self.valid_choices()
    if choices is not None:
      return f"one of {', '.join(repr(c) for c in choices)}"
    words = []
    for t in self.types:
      if t is tuple:
        kind = f"a tuple of {_ITEM_NAMES[self.item]}" if self.item else "a tuple"
        rng = self.range_text(self.item is int) if self.item in (int, float) else ""
        words.append(f"{kind} {'each ' + rng if rng else ''}".strip())
      elif t in (int, float):
        words.append(f"{_TYPE_NAMES[t]} {self.range_text(t is int)}".strip())
      else:
        words.append(_TYPE_NAMES[t])
    return " or ".join(words)

  def problem(self, value: Any) -> Optional[str]:
    """None if `value` is valid, else the phrase 'it must be ...' ends with."""
    choices = self.valid_choices()
    if choices is not None:
      return None if isinstance(value, str) and value in choices else self.valid_values()
    for t in self.types:
      if not _CHECKS[t](value):
        continue
      if t is tuple:
        if self.item is None or all(self._item_ok(x) for x in value):
          return None
      elif t in (int, float):
        if math.isfinite(float(value)) and self._in_range(float(value)):
          return None
      else:
        return None
    return self.valid_values()

  def _item_ok(self, x: Any) -> bool:
    if not _CHECKS[self.item](x):
      return False
    return self.item is str or (math.isfinite(float(x)) and self._in_range(float(x)))


@dataclasses.dataclass(frozen=True)
class Section:
  """The fields of one config section, declared once.

  Args:
    path: the section's dotted path in the config ('' for top-level fields, 'data.augment').
    doc: one paragraph: what the section configures and which mode reads it.
    fields: name -> Field, in the order the reference lists them.
    title: the heading in docs/config.md (default: the path).
    open: the section takes fields beyond the declared ones (model: the factory's own).
  """

  path: str
  doc: str
  fields: dict
  title: str = ""
  open: bool = False

  def dotted(self, name: str) -> str:
    """The field's dotted path in the config, e.g. 'data.augment.hflip'."""
    return f"{self.path}.{name}" if self.path else name
