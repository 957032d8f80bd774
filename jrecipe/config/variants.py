"""Config variants (`--config=configs/name.py:smoke`): a misspelt variant is an error.

A config file's `get_config(variant)` receives the text after the colon. Without a check, a
typo (`:smok`) silently runs the full config, which on a shared machine can mean an hour of
training instead of a smoke test.
"""

from typing import Sequence


def check_variant(variant: str, known: Sequence[str], config_file: str) -> str:
  """Returns `variant` if it is '' or one of `known`; otherwise raises a ValueError.

  Args:
    variant: the text after the colon of `--config=FILE:variant` ('' without a colon).
    known: the variants this config file defines (e.g. ('smoke',)).
    config_file: the file's name, for the message.

  Raises:
    ValueError: naming the unknown variant and the valid ones (the entry point turns it into
      one paragraph and exit status 2).
  """
  if variant and variant not in known:
    valid = ", ".join(f"{config_file}:{v}" for v in known) or "none"
    raise ValueError(f"unknown config variant {variant!r} of {config_file}: valid variants are "
                     f"{valid}, or no variant (the full config).")
  return variant
