"""A config file for the workers a master launches: `--config=<this file>:DIR/search_config.json`.

The master writes its resolved config (file + command-line overrides) to JSON once; every worker
it starts loads exactly that, so master and workers cannot disagree.
"""

import json

import ml_collections


def _tuples(v):
  if isinstance(v, dict):
    return {k: _tuples(x) for k, x in v.items()}
  if isinstance(v, list):
    return tuple(_tuples(x) for x in v)
  return v


def get_config(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))
