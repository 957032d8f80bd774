"""jrecipe's configuration: one typed schema (`schema`), the base config generated from it
(`base_config`, `from_json`) and the reference docs generated from it (`reference`)."""

from jrecipe.config.base import base_config, from_json  # noqa: F401
