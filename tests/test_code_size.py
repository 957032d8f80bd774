"""Sizes a reader can hold (STYLE.md, lesson 8): no module in jrecipe/ over 500 lines, no
function over 80 lines, except the few listed below with the reason they are still long."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jrecipe"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

# path (relative to jrecipe/) or path::function -> why it is still over the limit. Shrink this
# list as each file is split; an entry that no longer needs to be here fails the test too.
ALLOWED: dict[str, str] = {}


def oversized() -> dict[str, int]:
  """Every module over MAX_MODULE_LINES and function over MAX_FUNCTION_LINES: name -> lines."""
  found = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE).as_posix()
    source = path.read_text()
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
      found[rel] = lines
    for node in ast.walk(ast.parse(source, filename=str(path))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
          found[f"{rel}::{node.name}"] = length
  return found


def test_no_module_or_function_over_the_limits():
  found = oversized()
  offenders = {k: v for k, v in found.items() if k not in ALLOWED}
  assert not offenders, (
      f"Over {MAX_MODULE_LINES} lines per module or {MAX_FUNCTION_LINES} per function (split "
      "them, or add 'path::function': 'reason' to ALLOWED):\n"
      + "\n".join(f"  jrecipe/{k}: {v} lines" for k, v in sorted(offenders.items())))


def test_allow_list_has_no_stale_entries():
  stale = sorted(set(ALLOWED) - set(oversized()))
  assert not stale, ("These entries of ALLOWED are within the limits now: remove them so they "
                     "cannot grow back unnoticed:\n" + "\n".join(f"  {k}" for k in stale))
