"""Config file + `--config.x=y` overrides -> a locked ConfigDict, or one UserError paragraph.

The command line's config parsing as an importable function, so that tests (and tools that
build a config the way `jrecipe` does) go through exactly the parser a person's flags go
through, and every way it can fail ends as a UserError whose message is the paragraph
`jrecipe.config_errors.explain` writes (exit status 2 at the entry point).
"""

import ast
import re
from typing import Optional, Sequence

from absl import flags
from ml_collections import config_flags

from jrecipe import config_errors
from jrecipe.errors import UserError

# What absl and ml_collections raise for a bad flag, a config file that does not load or an
# override that does not fit its field. Anything else is a bug in jrecipe, not a bad input.
PARSE_ERRORS = (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError,
                ImportError, SyntaxError, OverflowError, RecursionError)


def config_argv(path: str, overrides: Sequence[str]) -> list[str]:
  """The argv the command line would see: `--config=path` then the overrides.

  Each override is `--config.a.b=value`, `a.b=value` or a bare `--config.flag` (booleans).
  """
  out = ["jrecipe", f"--config={path}"]
  for o in overrides:
    o = str(o)
    out.append(o if o.startswith("-") else f"--config.{o}")
  return out


_MODEL_FIELD = re.compile(r"^--?(no)?config\.model\.([A-Za-z_]\w*)(?:=(.*))?$", re.S)


def _file_model(argv: Sequence[str]) -> Optional[dict]:
  """The model section of the config file argv names (loaded without overrides), or None."""
  path = None
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      path = arg.split("=", 1)[1]
    elif arg in ("--config", "-config") and i + 1 < len(argv):
      path = argv[i + 1]
  if not path:
    return None
  from ml_collections.config_flags import config_flags as parsers
  try:
    config = parsers.ConfigFileFlagParser("config", lock_config=False).parse(path)
    return config.model.to_dict()
  except Exception:  # noqa: BLE001 - the real parse reports a broken file as a paragraph
    return None


def split_model_fields(argv: Sequence[str]) -> tuple[list, dict, Optional[dict]]:
  """Takes `--config.model.<field>=...` for fields the config file lacks out of argv.

  Why: the config is locked, so a user factory's own fields (docs/your_model.md) could not
  be set on the command line. They are set after parsing (`apply_model_fields`), and the
  factory's signature still checks them at build time: a typo is an exit-2 paragraph.

  Returns:
    (argv without them, {field: value text}, the config file's model section or None).
  """
  model = _file_model(argv)
  if model is None:
    return list(argv), {}, None
  kept, new = [], {}
  for arg in argv:
    m = _MODEL_FIELD.match(arg)
    if m and m.group(2) not in model:
      no, field, value = m.groups()
      new[field] = "False" if no else ("True" if value is None else value)
    else:
      kept.append(arg)
  return kept, new, model


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word: a string, as ml_collections parses a string field


def apply_model_fields(config, new: dict, file_model: Optional[dict],
                       argv: Sequence[str] = ()) -> None:
  """Adds the user's model fields to the parsed config, and `model.inherited` on a new model.

  When the command line changes `model.name`, the config file's other model fields (those
  not also set on the command line) are recorded as `model.inherited`: the new factory gets
  them only where it declares them (`jrecipe.models.contract.drop_inherited`).
  """
  if file_model is None:
    return
  set_here = set(new) | {m.group(2) for m in map(_MODEL_FIELD.match, argv) if m}
  inherited = ()
  if config.model.name != file_model.get("name"):
    inherited = tuple(sorted(k for k in file_model if k not in set_here | {"name"}))
  if not (new or inherited):
    return
  with config.model.unlocked():
    for field, text in new.items():
      config.model[field] = _literal(text)
    if inherited:
      config.model.inherited = inherited


def load_config_with_overrides(path: str, overrides: Sequence[str] = ()):
  """Loads config file `path` (optionally `file.py:variant`) with command-line overrides.

  The config is locked, as on the command line, so a mistyped key is an error rather than a
  new field. Parsing uses a private FlagValues: calling this never touches absl's global
  FLAGS, so it is safe in tests and in a process that already parsed its own flags.

  Args:
    path: the config file, as given to `--config=`.
    overrides: strings as on the command line (see `config_argv`).

  Returns:
    The resolved, locked ConfigDict.

  Raises:
    UserError: with the one-paragraph explanation (unknown key with the valid keys, a value
      that does not parse for its field's type, a config file that does not load).
  """
  full = config_argv(path, overrides)
  argv, new, file_model = split_model_fields(full)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  try:
    fv(argv)
    config = fv.config
    _ = config.seed  # the file loads lazily: load it here, inside the try
    apply_model_fields(config, new, file_model, full)
    return config
  except PARSE_ERRORS as e:
    raise UserError(config_errors.explain(e, argv)) from e
