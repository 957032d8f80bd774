"""The registry of modes: what `--mode=NAME` runs, with one signature for all of them.

Every mode is `run_mode(config, workdir, options) -> int` (the exit status; 0 done, 1 the run
failed) in its own module, imported only when chosen (start-up time). `options` carries the few
command-line flags that are not config fields. Internal entry points (the search worker that the
search master launches) are registered too, but not listed among the user's modes in `--help`.
"""

import dataclasses
import importlib
from typing import Callable


@dataclasses.dataclass(frozen=True)
class ModeOptions:
  """Command-line options that are not part of the config.

  Attributes:
    allow_config_change: resume a work directory whose config.json differs (train).
    new_study: move a search directory's study aside and start a clean one (search).
  """

  allow_config_change: bool = False
  new_study: bool = False


@dataclasses.dataclass(frozen=True)
class Mode:
  """One mode: its name, where its `run_mode` lives, and how the entry point treats it.

  Attributes:
    name: the `--mode` value.
    target: 'package.module:function', imported when the mode runs.
    help: one line for `--help`.
    needs_config: False when the mode can rebuild everything from the work directory.
    multihost: whether it may run with `parallel.distributed=True` on several hosts.
    internal: launched by jrecipe itself, never by a person; hidden from `--help`.
    locks_workdir: it writes a run into --workdir, so the entry point takes the work
      directory's lock first (a second process exits 2 at once); modes that only read, and
      the search worker (its master holds the lock), take none.
    object_store: it reads and writes --workdir through `jrecipe.storage`, so a gs:// work
      directory works; the others use local files (a study database, worker processes).
  """

  name: str
  target: str
  help: str
  needs_config: bool = True
  multihost: bool = False
  internal: bool = False
  locks_workdir: bool = False
  object_store: bool = False

  def load(self) -> Callable:
    module, _, fn = self.target.partition(":")
    return getattr(importlib.import_module(module), fn)


_ALL = (
    Mode("train", "jrecipe.train.loop:run_mode",
         "train and evaluate; resumes from the latest checkpoint in --workdir", multihost=True,
         locks_workdir=True, object_store=True),
    Mode("validate", "jrecipe.validate:run_mode",
         "every check a run makes before it starts (config, data, model, memory, work "
         "directory), then exit 0; writes nothing", object_store=True),
    Mode("check", "jrecipe.checks.runner:run_mode",
         "the recipe's sanity-check battery; exit 1 if a check fails"),
    Mode("inspect", "jrecipe.data_inspect.mode:run_mode",
         "'become one with the data': duplicates, leakage, outliers, label errors, mistakes"),
    Mode("report", "jrecipe.report.mode:run_mode",
         "rebuild report.html from the work directory", needs_config=False,
         object_store=True),
    Mode("lr_find", "jrecipe.search.lr_find:run_mode", "learning-rate range test",
         locks_workdir=True),
    Mode("search", "jrecipe.search.mode:run_mode",
         "random (or TPE) hyperparameter search, coarse to fine, over local workers",
         locks_workdir=True),
    Mode("search_worker", "jrecipe.search.worker:run_mode",
         "one search worker (launched by --mode=search)", internal=True),
    Mode("ablate", "jrecipe.ablate.mode:run_mode", "one change at a time, over seeds",
         locks_workdir=True),
    Mode("label", "jrecipe.label.mode:run_mode", "the human baseline: label examples yourself"),
    Mode("ensemble", "jrecipe.ensemble.mode:run_mode",
         "ensembles of runs, checkpoints, EMA or search trials; optional distillation",
         locks_workdir=True),
)
MODES: dict[str, Mode] = {m.name: m for m in _ALL}


def user_modes() -> list[str]:
  """The modes a person runs (for --help and error messages)."""
  return [m.name for m in _ALL if not m.internal]


def describe() -> str:
  """'train: ...; check: ...' for the --mode flag's help."""
  return "; ".join(f"{m.name}: {m.help}" for m in _ALL if not m.internal)


def object_store_modes() -> list[str]:
  """The modes whose --workdir may be a gs:// URL."""
  return [m.name for m in _ALL if m.object_store and not m.internal]
