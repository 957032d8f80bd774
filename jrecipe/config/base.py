"""The base ConfigDict every config file starts from, generated from the schema.

Config files in `configs/` call `base_config()` and change a few fields; the entry point locks
the result so that a mistyped override is an error, not a silently ignored value.
"""

import copy

import ml_collections

from jrecipe.config import schema


def _node(root: dict, path: str) -> dict:
  """The nested dict at dotted `path` of `root`, created on the way."""
  node = root
  for part in (p for p in path.split(".") if p):
    node = node.setdefault(part, {})
  return node


def defaults_dict() -> dict:
  """Every declared field at its default, as the nested dict base_config() is built from."""
  out: dict = {}
  for section in schema.SECTIONS:
    node = _node(out, section.path)
    for name, f in section.fields.items():
      node[name] = copy.deepcopy(f.default)
  return out


def base_config() -> ml_collections.ConfigDict:
  """All fields jrecipe reads, with the recipe's defaults (fixed seed, constant Adam 3e-4).

  Returns:
    A new, unlocked ConfigDict: one entry per field of `jrecipe.config.schema`, tuples kept
    as tuples (schedule.boundaries, inspect.value_range).
  """
  return ml_collections.ConfigDict(defaults_dict())


def _tuples(v):
  if isinstance(v, dict):
    return {k: _tuples(x) for k, x in v.items()}
  if isinstance(v, list):
    return tuple(_tuples(x) for x in v)
  return v


def _fill(d: dict, defaults: dict, prefix: str = "") -> None:
  """Adds the fields of `defaults` that `d` lacks (recursively; never inside an open section)."""
  for key, value in defaults.items():
    if key not in d:
      d[key] = copy.deepcopy(value)
    elif isinstance(value, dict) and isinstance(d[key], dict):
      path = f"{prefix}{key}"
      if not schema.is_open(path):
        _fill(d[key], value, path + ".")


def from_json(d: dict) -> ml_collections.ConfigDict:
  """A ConfigDict from its JSON form (a run's config.json, the search's saved config).

  JSON lists become tuples again (model.hidden). A config.json written by an older jrecipe
  loads as today's config: a field it lacks takes its schema default (what the older code
  read it as), and a removed field (`schema.REMOVED`, which nothing read) is dropped.
  """
  d = _tuples(copy.deepcopy(d))
  for dotted in schema.REMOVED:
    parent = d
    *path, last = dotted.split(".")
    for part in path:
      parent = parent.get(part, {}) if isinstance(parent, dict) else {}
    if isinstance(parent, dict):
      parent.pop(last, None)
  _fill(d, defaults_dict())
  return ml_collections.ConfigDict(d)
