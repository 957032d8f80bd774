"""`base_config()` and `from_json()`, kept here for config files and code that import them.

The fields, their defaults, types, valid values and docs are declared once, in
`jrecipe.config.schema`; `base_config()` is generated from it (jrecipe.config.base). The
reference of every field is docs/config.md.
"""

from jrecipe.config.base import base_config, from_json

__all__ = ["base_config", "from_json"]
