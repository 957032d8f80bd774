"""Turns config-flag failures into one paragraph that names the problem and the valid choices."""

import difflib
import glob
import os
import re
from collections.abc import Mapping

from jrecipe.config import schema


def _config_arg(argv):
  for a in argv:
    if a.startswith("--config=") or a.startswith("--config "):
      return a.split("=", 1)[1]
  return None


def _load_config(argv):
  """The config file's ConfigDict (without overrides), or None if it does not load."""
  path = _config_arg(argv)
  if not path:
    return None
  try:
    import importlib.util
    file, _, variant = path.partition(":")
    spec = importlib.util.spec_from_file_location("_jrecipe_cfg", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant) if variant else mod.get_config()
  except Exception:  # noqa: BLE001 - best effort: the message stays useful without it
    return None


def _valid_keys(argv, dotted_parent: str) -> list[str]:
  """Keys of the config section `dotted_parent`, loaded from the config file if it loads."""
  node = _load_config(argv)
  if node is None:
    return []
  try:
    for part in [p for p in dotted_parent.split(".") if p]:
      node = node[part]
    return sorted(node.keys())
  except Exception:  # noqa: BLE001
    return []


def _override_paths(argv) -> list[str]:
  """The dotted field paths of the `--config.a.b=...` (or `--noconfig.a.b`) overrides."""
  out = []
  for a in argv:
    m = re.match(r"-{1,2}(?:no)?config\.", a)
    if m:
      out.append(a[m.end():].split("=", 1)[0])
  return out


def _is_section(node) -> bool:
  return isinstance(node, Mapping) or hasattr(node, "keys") and hasattr(node, "__getitem__")


def _bad_path(argv):
  """One sentence about the first override whose path is not in the config, else None.

  Walking the paths ourselves names the right key for every failure absl and ml_collections
  report differently (KeyError text, 'Did you mean', or a TypeError from indexing a tuple).
  """
  cfg = _load_config(argv)
  if cfg is None:
    return None
  for dotted in _override_paths(argv):
    node, parts = cfg, dotted.split(".")
    for i, part in enumerate(parts):
      parent = ".".join(parts[:i])
      if not _is_section(node):
        return (f"unknown config key '{dotted}' in --config.{dotted}: the config field "
                f"'{parent}' is a value of type {type(node).__name__}, not a section, so it "
                f"has no field '{part}'. Set it with --config.{parent}=VALUE.")
      keys = sorted(str(k) for k in node.keys())
      if part not in keys and dotted in schema.REMOVED:
        return (f"config key '{dotted}' in --config.{dotted} was removed from jrecipe; "
                f"{schema.REMOVED[dotted]}.")
      if part not in keys:
        where = f"config section '{parent}'" if parent else "the config"
        msg = f"unknown config key '{dotted}' in --config.{dotted}: {where} has no field '{part}'."
        close = difflib.get_close_matches(part, keys, n=1)
        if close:
          msg += f" Did you mean '{close[0]}'?"
        if keys:
          msg += f" Valid keys there: {', '.join(keys)}."
        return msg + " (Configs are locked so that a mistyped override is an error.)"
      node = node[part]
  return None


def _field_hint(dotted: str) -> str:
  """': <type and valid values>' of a schema field, '' for others (a model's own fields)."""
  f = schema.FIELDS.get(dotted)
  return f": {f.valid_values()}" if f is not None else ""


def _shipped_configs() -> list[str]:
  here = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
  return sorted(os.path.relpath(p) for p in glob.glob(os.path.join(here, "*.py")))


def one_paragraph(text: str) -> str:
  """The message on one line: the entry point prints it after 'jrecipe: error:'."""
  return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def explain(error: BaseException, argv: list[str]) -> str:
  """One paragraph for `error` raised while parsing `argv` (the config flag and overrides)."""
  return one_paragraph(_explain(error, argv))


def _explain(error: BaseException, argv: list[str]) -> str:
  text = str(error)
  m = re.match(r"flag (--config\.[^=]+)=", text)
  if m:
    flag = m.group(1)
    # The value is the one on the command line: absl's text has no quoting to split it at.
    value = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith(flag + "=")), None)
    if value is not None and text.startswith(f"flag {flag}={value}: "):
      detail = text[len(f"flag {flag}={value}: "):]
    else:
      value, _, detail = text[m.end():].partition(": ")
    return (f"bad value {value!r} for {flag}: {detail.strip().rstrip('.')}. The value must "
            f"have the type of the field's default{_field_hint(flag[len('--config.'):])} (see "
            "the config file, or docs/config.md for every field).")
  if "Error whilst parsing config file" in text and "unknown config variant" in text:
    return text[text.rindex("unknown config variant"):].strip().splitlines()[0]
  if "Failed loading config file" in text or isinstance(error, (FileNotFoundError, OSError)):
    path = _config_arg(argv) or "?"
    last = text.strip().splitlines()[-1].strip() if text.strip() else type(error).__name__
    return (f"cannot load the config file {path!r}: {last.rstrip('.')}. A config file is a "
            f"Python file with get_config() returning a ConfigDict; shipped configs: "
            f"{', '.join(_shipped_configs())}.")
  bad = _bad_path(argv)
  if bad:
    return bad
  if isinstance(error, (AttributeError, KeyError)) or "Did you mean" in text:
    m = re.search(r'instead of "([^"]+)"', text) or re.search(r"([A-Za-z_][A-Za-z0-9_]*)", text)
    name = m.group(1) if m else "?"
    overrides = [a for a in argv if a.startswith("--config.")]
    flag = next((a for a in overrides if re.search(rf"[.]{re.escape(name)}(=|$)", a.split("=")[0])
                 ), None)
    dotted = flag.split("=")[0][len("--config."):] if flag else name
    parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    keys = _valid_keys(argv, parent)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    where = f"config section '{parent}'" if parent else "the config"
    msg = f"unknown config key '{dotted}' in --config.{dotted}: {where} has no field '{name}'."
    if hint:
      msg += f" Did you mean '{hint.group(1)}'?"
    if keys:
      msg += f" Valid keys there: {', '.join(keys)}."
    return msg + " (Configs are locked so that a mistyped override is an error.)"
  detail = text.strip().rstrip(".") or type(error).__name__
  return (f"cannot apply the config overrides {_override_paths(argv) or ''}: {detail}. "
          "Overrides are --config.FIELD=VALUE with FIELD a dotted path of the config and VALUE "
          "of the field's type; run `jrecipe --helpfull` for the valid flags.")
