"""Turns config-flag failures into one paragraph that names the problem and the valid choices."""

import glob
import os
import re


def _config_arg(argv):
  for a in argv:
    if a.startswith("--config=") or a.startswith("--config "):
      return a.split("=", 1)[1]
  return None


def _valid_keys(argv, dotted_parent: str) -> list[str]:
  """Keys of the config section `dotted_parent`, loaded from the config file if it loads."""
  path = _config_arg(argv)
  if not path:
    return []
  try:
    from ml_collections import config_flags  # noqa: F401
    import importlib.util
    file, _, variant = path.partition(":")
    spec = importlib.util.spec_from_file_location("_jrecipe_cfg", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(variant) if variant else mod.get_config()
    node = cfg
    for part in [p for p in dotted_parent.split(".") if p]:
      node = node[part]
    return sorted(node.keys())
  except Exception:  # noqa: BLE001 - best effort: the message stays useful without it
    return []


def _shipped_configs() -> list[str]:
  here = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
  return sorted(os.path.relpath(p) for p in glob.glob(os.path.join(here, "*.py")))


def explain(error: BaseException, argv: list[str]) -> str:
  text = str(error)
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
  if "Failed loading config file" in text or isinstance(error, (FileNotFoundError, OSError)):
    path = _config_arg(argv) or "?"
    return (f"cannot load the config file {path!r}: "
            f"{text.strip().splitlines()[-1].strip()}. A config file is a Python file with "
            f"get_config() returning a ConfigDict; shipped configs: "
            f"{', '.join(_shipped_configs())}.")
  m = re.match(r"flag (--config\.[^=]+)=(.*?): (.*)", text, re.S)
  if m:
    return (f"bad value {m.group(2)!r} for {m.group(1)}: {m.group(3).strip()}. The value must "
            "have the type of the field's default (see the config file or "
            "jrecipe/config_base.py).")
  return f"{text.strip()}. Run `jrecipe --helpfull` for the valid flags."
