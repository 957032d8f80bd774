"""A config section with every field present, so that modules read fields as attributes.

The entry point hands every module a locked config that already holds every field. Tests,
notebooks and library callers may instead pass a partial dict (`{'name': 'digits'}`) or None.
`complete` turns either into the same complete section, taking each missing field's default
from `jrecipe.config.schema` (through `jrecipe.config.base.defaults_dict`, what `base_config()`
is built from), the one place defaults are written, so a module never restates a default (the recipe's 'fix the random seed' and 'don't trust defaults' both rely on
every run reading the same values).
"""

import copy
import functools
from typing import Any

import ml_collections


@functools.cache
def _defaults() -> dict:
  from jrecipe.config.base import defaults_dict
  return defaults_dict()


def _section_dict(section: Any) -> dict:
  if section is None:
    return {}
  if isinstance(section, ml_collections.ConfigDict):
    return dict(section.items())
  if hasattr(section, "items"):
    return dict(section.items())
  return dict(vars(section))


def complete(section: Any, *paths: str) -> ml_collections.ConfigDict:
  """`section` with every field of the base config's sections at `paths` filled in.

  Args:
    section: a ConfigDict, a dict, an object with attributes, or None (all defaults). A field
      that is missing or None takes the default; fields the base config lacks are kept.
    *paths: dotted paths of schema sections whose fields are the defaults (e.g. 'data',
      'data.augment'); a later path's fields override an earlier one's.

  Returns:
    A new, unlocked ConfigDict; `section` itself is not changed.
  """
  fields = {}
  for path in paths:
    node = _defaults()
    for part in path.split("."):
      node = node[part]
    fields.update(copy.deepcopy(node))
  fields.update({k: v for k, v in _section_dict(section).items() if v is not None})
  return ml_collections.ConfigDict(fields)
