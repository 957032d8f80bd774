"""docs/config.md, generated from the schema: every field of every section in one reference.

    python -m jrecipe.config.reference > docs/config.md

tests/test_config_schema.py fails when the committed file differs from what this writes, so
the reference cannot drift from the fields jrecipe reads.
"""

import sys

from jrecipe.config import schema
from jrecipe.config.fields import Field

HEADER = """# Config reference

Every field jrecipe reads, with its type, default and valid values. A config file
(`configs/*.py`) starts from `jrecipe.config_base.base_config()` and changes a few fields;
any field can be overridden on the command line (`--config.optimizer.learning_rate=1e-3`).
The config is locked, so a mistyped field is an error, and every value is checked against this
table before anything runs (exit status 2 with the field, the value and the valid values).

Generated from `jrecipe/config/schema.py` by `python -m jrecipe.config.reference`; do not edit
by hand."""


def _type_name(f: Field) -> str:
  names = []
  for t in f.types:
    if t is tuple and f.item is not None:
      names.append(f"tuple of {f.item.__name__}")
    else:
      names.append(t.__name__)
  return " or ".join(names)


def _cell(text: str) -> str:
  return str(text).replace("|", "\\|")


def _row(dotted: str, f: Field) -> str:
  cells = [f"`{dotted}`", _type_name(f), f"`{f.default!r}`", f.valid_values(), f.doc]
  return "| " + " | ".join(_cell(c) for c in cells) + " |"


def section_text(section) -> str:
  """One section: its heading, its paragraph and a table of its fields."""
  title = section.title or section.path or "top level"
  lines = [f"## {title}", "", section.doc, "",
           "| field | type | default | valid values | what it does |",
           "|---|---|---|---|---|"]
  lines += [_row(section.dotted(name), f) for name, f in section.fields.items()]
  if section.open:
    lines += ["", "Any other field of this section is passed to the model factory; see "
              "jrecipe/models and the shipped configs for each model's fields."]
  return "\n".join(lines)


def markdown() -> str:
  """The whole reference: the header, then every section in `schema.SECTIONS` order."""
  parts = [HEADER]
  parts += [section_text(s) for s in schema.SECTIONS]
  if schema.REMOVED:
    parts.append("## Removed fields\n\nA config that sets one of these is refused with the "
                 "reason.\n\n" + "\n".join(f"- `{k}`: {v}." for k, v in schema.REMOVED.items()))
  return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
  sys.stdout.write(markdown())
