"""`jrecipe --config=configs/<name>.py --workdir=DIR [--mode=train] [--config.x=y ...]`.

The entry point parses flags, turns a person's mistakes into one paragraph and exit
status 2, and hands the resolved config to one mode (jrecipe/modes.py). The work is in
importable functions.
"""

import contextlib
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from jrecipe import modes
from jrecipe.errors import RunFailure, UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file: a Python file with get_config().",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory of the run (created if missing).")
flags.DEFINE_string("mode", "train", f"What to do. {modes.describe()}.")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume a work directory whose config.json differs from --config in "
                  "compatible fields (optimizer, schedule, l2, augmentation, ...; never the "
                  "model, data, loss, batch size or seed): docs/failures.md.")
flags.DEFINE_bool("new_study", False,
                  "--mode=search: move the directory's study to old_studies/ and start anew.")
flags.DEFINE_string("compilation_cache", None,
                    "Directory of JAX's persistent compilation cache ('none' disables it); "
                    "default $JRECIPE_CACHE_DIR/jax_cache or ~/.cache/jrecipe/jax_cache.")


INTERRUPTED = ("interrupted (Ctrl-C): stopped at once. What was committed is intact (a run's "
               "checkpoints, a search's finished trials): rerunning the same command resumes.")


def _fail(message: str, code: int = 2):
  sys.stderr.write(f"jrecipe: error: {message}\n")
  sys.exit(code)


def _setup_logging():
  """jrecipe's own messages at INFO on stderr; the libraries' chatter (orbax, absl) at WARNING."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  logger = logging.getLogger("jrecipe")
  logger.setLevel(logging.INFO)
  logger.propagate = False
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("jrecipe: %(message)s"))
    logger.addHandler(handler)


def _lock_workdir(held: contextlib.ExitStack, mode: modes.Mode, workdir: str,
                  distributed: bool, early: bool) -> None:
  """Takes the work directory's lock for a mode that writes a run, before it writes anything.

  One process: `early`, before JAX is even imported, so a second process on the same
  directory exits 2 within about a second. Several: after `jax.distributed.initialize()`
  (the process index is known only then), and only process 0 takes it.
  """
  if not mode.locks_workdir or early == distributed:
    return
  from jrecipe.train import workdir as workdir_lib
  enabled = True
  if distributed:
    import jax
    enabled = jax.process_index() == 0
  held.enter_context(workdir_lib.locked(workdir, enabled=enabled))


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors are a paragraph and exit status 2, not a usage dump."""
  from jrecipe import config_errors
  from jrecipe import cli_config
  try:
    kept, new, file_model = cli_config.split_model_fields(argv)  # your factory's own fields
    if len(kept) != len(argv):
      sys.argv = kept  # the config flag reads its overrides from sys.argv
    rest = FLAGS(kept)
    if FLAGS["config"].present:
      _ = FLAGS.config.seed  # the config file loads lazily: load it here, inside the try
      cli_config.apply_model_fields(FLAGS.config, new, file_model, argv)
    return rest
  except flags.Error as e:
    _fail(config_errors.explain(e, argv))
  except (KeyError, AttributeError, TypeError, ValueError, OSError, ImportError,
          SyntaxError) as e:
    _fail(config_errors.explain(e, argv))


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}: every option is a --flag (e.g. --config.seed=1).")
  mode = modes.MODES.get(FLAGS.mode)
  if mode is None:
    _fail(f"unknown --mode={FLAGS.mode!r}. Valid modes: {', '.join(modes.user_modes())}.")
  if FLAGS.workdir is None or (FLAGS.config is None and mode.needs_config):
    _fail("--config and --workdir are required, e.g. "
          "`jrecipe --config=configs/digits_mlp.py --workdir=/tmp/digits`.")
  _setup_logging()
  options = modes.ModeOptions(allow_config_change=FLAGS.allow_config_change,
                              new_study=FLAGS.new_study)
  return execute(mode, FLAGS.config, FLAGS.workdir, options,
                 compilation_cache=FLAGS.compilation_cache, supervise=True)


def _completed(config):
  """The validated config with every field present: a section replaced by a partial dict
  literal (`--config.parallel={}`) takes the schema's defaults for the fields it lacks, so
  that every module reads fields as attributes (it used to be an AttributeError traceback)."""
  from jrecipe.config.base import from_json
  full = from_json(config.to_dict())
  full.lock()
  return full


def _setup_processes(runtime, distributed: bool, config, mode: str) -> None:
  """`runtime.setup_processes`, with JAX's refusal to find a job to join (a ValueError from
  `jax.distributed.initialize`, e.g. no coordinator address) as the user's error it is."""
  try:
    runtime.setup_processes(distributed, config, mode)
  except ValueError as e:
    if not distributed:
      raise
    raise UserError(
        "--config.parallel.distributed=True, but JAX found no multi-host job to join: "
        f"{(str(e).splitlines() or [''])[0][:200].rstrip('.')}. Set $JRECIPE_COORDINATOR (host:port of "
        "process 0), $JRECIPE_NUM_PROCESSES and $JRECIPE_PROCESS_ID, or launch under a "
        "scheduler JAX detects (Slurm, Open MPI, a Cloud TPU pod); on one machine leave "
        "parallel.distributed False.") from e


def _check_remote_workdir(mode: modes.Mode, workdir: str) -> None:
  """A gs:// --workdir: a scheme jrecipe knows, and a mode that writes through jrecipe.storage."""
  from jrecipe import storage
  if not storage.is_remote(workdir):
    return
  problem = storage.scheme_problem(workdir)
  if problem:
    _fail(f"--workdir={workdir}: {problem}")
  if not mode.object_store:
    _fail(f"--mode={mode.name} keeps local files in its work directory (a study database, "
          f"worker processes, or runs it trains side by side), so --workdir={workdir} cannot be "
          f"a gs:// URL for it. gs:// work directories work with --mode="
          f"{', '.join(modes.object_store_modes())}; for this mode use a local directory, or "
          "the bucket mounted with Cloud Storage FUSE.")


def execute(mode: modes.Mode, config, workdir: str, options: modes.ModeOptions, *,
            compilation_cache: str | None = None, start_runtime: bool = True,
            supervise: bool = False) -> int:
  """Everything the entry point does once the flags are parsed: the work directory's lock,
  validation of the config before any file or device is touched, the process set-up, the
  mode. A mistake is one paragraph on stderr and exit 2 (SystemExit), a run failure exit 1.

  `start_runtime=False` skips `runtime.setup_processes` and the compilation cache, which a
  process does once, before the backend exists (tests call this many times in one process).
  `supervise=True` (the command line): a distributed run trains in a child process whose
  abort by JAX, when the coordinator dies, becomes one jrecipe line (`train.supervisor`).
  """
  if not str(workdir).strip():
    _fail("--workdir is empty: pass the run's directory, e.g. --workdir=/tmp/digits (it is "
          "created if missing).")
  _check_remote_workdir(mode, workdir)
  parallel = config.get("parallel") if config is not None else None
  distributed = bool(parallel.get("distributed", False)) if hasattr(parallel, "get") else False
  if distributed and not mode.multihost:
    _fail(f"--mode={mode.name} runs on one host: drop --config.parallel.distributed.")
  from jrecipe.train import peers, supervisor
  if distributed and supervise and start_runtime:
    if not supervisor.supervised():
      return supervisor.supervise()
    supervisor.die_with_parent()
  watchdog, result = None, 0
  with contextlib.ExitStack() as held:
    try:
      _lock_workdir(held, mode, workdir, distributed, early=True)
      if config is not None:  # every mode, before any file or device is touched
        from jrecipe import validate
        validate.validate_config(config)
        config = _completed(config)
      from jrecipe import runtime
      run_mode = mode.load()
      if start_runtime:
        # First: nothing may create the JAX backend before jax.distributed.initialize().
        _setup_processes(runtime, distributed, config, mode.name)
        runtime.enable_compilation_cache(compilation_cache)
      _lock_workdir(held, mode, workdir, distributed, early=False)
      watchdog = peers.start_watchdog() if distributed else None  # a dead peer: exit, named
      result = run_mode(config, workdir, options)
      if watchdog is not None:
        watchdog.finish()
    except KeyboardInterrupt:  # training: a second Ctrl-C (the first stops with a checkpoint)
      _fail(INTERRUPTED, 130)
    except UserError as e:
      _fail(str(e), 2)
    except RunFailure as e:
      _fail(str(e), 1)
    except OSError as e:  # a full disk or failing storage under config.json, metrics, ...
      from jrecipe.train import workdir as workdir_lib
      message = workdir_lib.storage_failure(e, workdir)
      if message is None:
        raise
      _fail(message, 1)
    except Exception as e:  # noqa: BLE001 - only a peer's loss is explained; others re-raised
      if not (distributed and peers.is_peer_error(e)):
        raise
      _fail(peers.explain_peer_error(watchdog, e), 1)
  return int(result) if isinstance(result, int) else 0


def run():
  """Console-script entry point (a Ctrl-C during start-up, before `execute`: one line, 130)."""
  try:
    app.run(main, flags_parser=parse_flags)
  except KeyboardInterrupt:
    _fail(INTERRUPTED, 130)


if __name__ == "__main__":
  run()
