"""Config file + `--config.x=y` overrides -> a locked ConfigDict, or one UserError paragraph.

The command line's config parsing as an importable function, so that tests (and tools that
build a config the way `jrecipe` does) go through exactly the parser a person's flags go
through, and every way it can fail ends as a UserError whose message is the paragraph
`jrecipe.config_errors.explain` writes (exit status 2 at the entry point).
"""

from typing import Sequence

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
  argv = config_argv(path, overrides)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  try:
    fv(argv)
    config = fv.config
    _ = config.seed  # the file loads lazily: load it here, inside the try
    return config
  except PARSE_ERRORS as e:
    raise UserError(config_errors.explain(e, argv)) from e
