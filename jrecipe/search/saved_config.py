"""A config file for the workers a master launches: `--config=<this file>:DIR/search_config.json`.

The master writes its resolved config (file + command-line overrides) to JSON once; every worker
it starts loads exactly that, so master and workers cannot disagree.
"""

import json

import ml_collections

from jrecipe import config_base


def get_config(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return config_base.from_json(json.load(f))
