"""Tiny name registries: components are chosen by name, or by `package.module:Name` import path."""

import importlib
from typing import Any, Callable

from jrecipe.errors import UserError


class Registry:
  """Maps names to factories for one kind of component (model, loss, dataset, ...).

  `get(name)` returns the registered object, or imports `package.module:Attr` for a
  user's own code; anything else raises a UserError that lists the valid names.
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._table: dict[str, Any] = {}

  def register(self, name: str) -> Callable[[Any], Any]:
    def deco(obj):
      self._table[name] = obj
      return obj
    return deco

  def names(self) -> list[str]:
    return sorted(self._table)

  def get(self, name: str) -> Any:
    if name in self._table:
      return self._table[name]
    if ":" in name:
      return import_path(name, self.kind)
    raise UserError(
        f"Unknown {self.kind} {name!r}. Valid {self.kind} names: {', '.join(self.names())}; "
        f"or your own code as an import path 'package.module:Name'.")


def import_path(path: str, kind: str = "object") -> Any:
  """Imports `package.module:Attr` (Attr may be dotted); a clear UserError if it fails."""
  module_name, _, attr = path.partition(":")
  if not module_name or not attr:
    raise UserError(f"The {kind} import path {path!r} is not of the form 'package.module:Name'.")
  try:
    obj = importlib.import_module(module_name)
  except ImportError as e:
    raise UserError(
        f"Cannot import module {module_name!r} for the {kind} {path!r}: {e}. "
        "Check that the package is installed or on PYTHONPATH.") from e
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise UserError(f"Module {module_name!r} has no attribute {attr!r} (the {kind} {path!r}).")
    obj = getattr(obj, part)
  return obj
