"""Pretrained initialisation: `--config.init_from=RUN_DIR` (or a checkpoint directory).

Recipe stage 4 ('regularise': "use a pretrained network if you can", and CS231n's transfer
learning): start this run's parameters from another run's trained ones. Parameters are
matched by name and shape; every parameter of this model ends up in exactly one group of the
report: restored, skipped (and why: missing in the source, shape mismatch, or an
`init_from_skip` pattern), which stay freshly initialised (typically the head), drawn from
the run's seed with the source's identity folded in (`fresh_key`), never the source's own
initial draw. A source
that would leave most of the model fresh is an error unless `init_from_allow_partial`.

`restore_into(exp, variables)` is called by `jrecipe.train.trainer.Trainer.initial_state`;
`freeze_mask(config, params)` is used by `Experiment.optimizer()` when `init_from_freeze`
is set, so restored parameters receive exactly zero updates.

Sources accepted by `init_from`:
  * a run work directory (has `checkpoints/`): the checkpoint chosen by
    `init_from_checkpoint` ('latest', 'best' by validation loss, or a step number);
  * one checkpoint step directory (`RUN/checkpoints/400`) or its `state` item directory.
The raw parameters (not the EMA copy) and the mutable model state (BatchNorm statistics)
of the source are used.
"""

import logging
import os
import re
import zlib
from typing import Any, Optional

import jax
import numpy as np

from jrecipe.errors import UserError
from jrecipe.train.writer import write_json_atomic

log = logging.getLogger("jrecipe")

REPORT_FILE = "init_from.json"
_CACHE: dict[str, dict] = {}  # state item path -> {'params': ..., 'model_state': ...}


def _get(config, key: str, default: Any) -> Any:
  v = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  return default if v is None else v


def resolve_source(path: str, which: Any = "latest") -> tuple[str, Optional[int]]:
  """(the orbax `state` item directory, its step or None) for an `init_from` value.

  Raises:
    UserError: the path does not exist, holds no checkpoint, or lacks the asked step.
  """
  which = str(which).strip() or "latest"
  src = os.path.abspath(os.path.expanduser(str(path)))
  valid = ("Valid values: a jrecipe run work directory (one that holds checkpoints/), one of "
           "its checkpoint directories (RUN/checkpoints/<step>), or that step's 'state' "
           "directory.")
  if not os.path.isdir(src):
    raise UserError(f"init_from={path!r} does not exist or is not a directory. {valid}")
  if os.path.isdir(os.path.join(src, "checkpoints")):
    from jrecipe.train.checkpoint import Checkpointer
    ckpt = Checkpointer(src, read_only=True)
    try:
      steps = ckpt.steps()
      if not steps:
        raise UserError(f"init_from={path!r} is a run directory without a finished checkpoint: "
                        "train it first (jrecipe --mode=train), or point at another run.")
      if which == "latest":
        step = steps[-1]
      elif which == "best":
        step = ckpt.best_step()
        if step is None:
          step = steps[-1]
          log.warning("init_from: %s has no validation losses stored; using its latest "
                      "checkpoint (step %d) instead of the best.", src, step)
      else:
        try:
          step = int(which)
        except ValueError:
          raise UserError(f"init_from_checkpoint={which!r} is not valid: use 'latest', 'best' "
                          f"or a step number (this run has steps {steps}).") from None
        if step not in steps:
          raise UserError(f"init_from_checkpoint={step}: the run {src} has no checkpoint at "
                          f"that step; it has steps {steps}.")
    finally:
      ckpt.manager.close()
    return os.path.join(src, "checkpoints", str(step), "state"), int(step)
  if os.path.isdir(os.path.join(src, "state")):
    step = int(os.path.basename(src)) if os.path.basename(src).isdigit() else None
    return os.path.join(src, "state"), step
  if os.path.exists(os.path.join(src, "_METADATA")) or os.path.exists(
      os.path.join(src, "_sharding")):
    parent = os.path.basename(os.path.dirname(src))
    return src, int(parent) if parent.isdigit() else None
  raise UserError(f"init_from={path!r} holds no jrecipe checkpoint (no checkpoints/, state/ "
                  f"or orbax metadata in it). {valid}")


def load_source(state_dir: str) -> dict:
  """{'params': nested dict, 'model_state': nested dict} of a checkpoint (cached per path)."""
  if state_dir not in _CACHE:
    import orbax.checkpoint as ocp
    _check_intact(state_dir)
    try:
      restored = ocp.StandardCheckpointer().restore(state_dir)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign checkpoint is bad input here
      raise UserError(f"Could not read the checkpoint {state_dir} given by init_from: "
                      f"{str(e).splitlines()[0][:300] if str(e) else type(e).__name__}. "
                      "Point init_from at a finished jrecipe run or checkpoint.") from e
    if not isinstance(restored, dict) or "params" not in restored:
      raise UserError(f"The checkpoint {state_dir} given by init_from is not a jrecipe train "
                      "state (it has no 'params').")
    _CACHE[state_dir] = {"params": jax.device_get(restored["params"]),
                         "model_state": jax.device_get(restored.get("model_state") or {})}
  return _CACHE[state_dir]


def _check_intact(state_dir: str) -> None:
  """A jrecipe checkpoint (one with a manifest) is checked against its SHA-256 manifest before
  orbax reads it: a changed byte in a data file was read back as changed weights, and damage
  orbax does notice surfaced as tensorstore's DATA_LOSS text followed by orbax's event-loop
  tracebacks at exit (measured)."""
  from jrecipe.train import integrity
  step_dir = os.path.dirname(os.path.normpath(state_dir))
  if integrity.read_manifest(step_dir) is None:
    return  # not written by jrecipe (or its manifest is gone): orbax's own errors apply
  why = integrity.problem(step_dir)
  if why:
    run = os.path.dirname(step_dir)
    others = sorted(int(n) for n in os.listdir(run) if n.isdigit()
                    and os.path.join(run, n) != step_dir) if os.path.isdir(run) else []
    other = (f", or initialise from another of the run's checkpoints (init_from_checkpoint="
             f"STEP; the run also has steps {others})" if others else "")
    raise UserError(f"The checkpoint {step_dir} given by init_from is damaged ({why}): its "
                    "bytes are not the ones its run wrote, so the parameters read from it would "
                    f"not be the trained ones. Restore it from a copy{other}.")


def _flat(tree, prefix: str) -> dict[str, Any]:
  """{'params/conv_0/kernel': leaf} for a nested dict of arrays (or shape structs)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    out["/".join([prefix, *keys])] = leaf
  return out


def _source_flat(source: dict) -> dict[str, Any]:
  flat = _flat(source["params"], "params")
  for coll, tree in (source.get("model_state") or {}).items():
    flat.update(_flat(tree, coll))
  return flat


def skip_patterns(config) -> list[re.Pattern]:
  """The compiled `init_from_skip` regexes (UserError on an invalid one)."""
  text = _get(config, "init_from_skip", "")
  items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)
           if str(p).strip()]
  out = []
  for p in items:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise UserError(f"init_from_skip pattern {p!r} is not a valid regular expression ({e}). "
                      "Give comma-separated regexes matched against parameter paths such as "
                      "'params/head/kernel', e.g. --config.init_from_skip=head.") from e
  return out


def plan(target_flat: dict[str, Any], source_flat: dict[str, Any],
         patterns: list[re.Pattern]) -> dict[str, dict]:
  """What happens to each target leaf: {'path': {'action', 'reason', 'shape', 'size'}}.

  `action` is 'restored' or 'fresh'; a fresh leaf's `reason` is 'pattern' (an
  init_from_skip pattern matched), 'missing' (no such name in the source) or
  'shape mismatch' (the shapes differ; `source_shape` says how).
  """
  out = {}
  for path, leaf in target_flat.items():
    shape = tuple(int(d) for d in np.shape(leaf))
    entry = {"shape": list(shape), "size": int(np.prod(shape, dtype=np.int64))}
    match = next((p.pattern for p in patterns if p.search(path)), None)
    if match is not None:
      entry.update(action="fresh", reason="pattern", pattern=match)
    elif path not in source_flat:
      entry.update(action="fresh", reason="missing")
    elif tuple(np.shape(source_flat[path])) != shape:
      entry.update(action="fresh", reason="shape mismatch",
                   source_shape=[int(d) for d in np.shape(source_flat[path])])
    else:
      entry.update(action="restored")
    out[path] = entry
  return out


def _summary(entries: dict[str, dict], source_flat: dict, src: str, step, patterns) -> dict:
  params = {k: v for k, v in entries.items() if k.startswith("params/")}
  restored = [k for k, v in entries.items() if v["action"] == "restored"]
  n_total = sum(v["size"] for v in params.values())
  n_restored = sum(v["size"] for v in params.values() if v["action"] == "restored")
  skipped = {reason: [k for k, v in entries.items() if v.get("reason") == reason]
             for reason in ("pattern", "missing", "shape mismatch")}
  return {
      "source": src, "step": step, "skip_patterns": [p.pattern for p in patterns],
      "restored": restored,
      "skipped": {k: v for k, v in skipped.items()},
      "fresh": [k for k, v in entries.items() if v["action"] == "fresh"],
      "unused_in_source": sorted(set(source_flat) - set(entries)),
      "restored_params": int(n_restored), "total_params": int(n_total),
      "restored_fraction": float(n_restored / n_total) if n_total else 0.0,
      "leaves": entries,
  }


def _describe(report: dict) -> str:
  sk = report["skipped"]
  parts = [f"{len(report['restored'])} leaves restored ({report['restored_params']:,} of "
           f"{report['total_params']:,} parameters, {100 * report['restored_fraction']:.1f}%)"]
  for reason, label in (("pattern", "skipped by init_from_skip"), ("missing", "missing in "
                        "the source"), ("shape mismatch", "with a shape mismatch")):
    if sk[reason]:
      shown = ", ".join(sk[reason][:6]) + (" ..." if len(sk[reason]) > 6 else "")
      parts.append(f"{len(sk[reason])} {label} ({shown})")
  return "; ".join(parts)


def make_report(config, target_variables: dict) -> tuple[dict, dict]:
  """(report, source flat dict) for restoring `config.init_from` into `target_variables`."""
  src, step = resolve_source(config.init_from, _get(config, "init_from_checkpoint", "latest"))
  source_flat = _source_flat(load_source(src))
  target_flat = {}
  for coll, tree in target_variables.items():
    target_flat.update(_flat(tree, coll))
  patterns = skip_patterns(config)
  report = _summary(plan(target_flat, source_flat, patterns), source_flat, src, step, patterns)
  return report, source_flat


def _require_mostly_restored(config, report: dict) -> None:
  if report["restored_fraction"] < 0.5 and not _get(config, "init_from_allow_partial", False):
    raise UserError(
        f"init_from={config.init_from!r} would leave most of this model freshly initialised: "
        f"{_describe(report)}. Check that the source run trained the same architecture "
        "(parameter names and shapes must match), or pass "
        "--config.init_from_allow_partial=True to accept it.")


def check(exp, config=None) -> dict:
  """Validates `init_from` against the model's shapes without initialising it; the report.

  Called by `experiment.build` before anything is written, so a bad source (missing, unreadable, mostly mismatched) costs no work
  directory. Raises UserError as `restore_into` would.
  """
  config = config or exp.config
  shapes = jax.eval_shape(exp.model.init, jax.random.PRNGKey(0), exp.sample_input())
  report, _ = make_report(config, shapes)
  _require_mostly_restored(config, report)
  return report


def restore_into(exp, variables: dict) -> dict:
  """`variables` with every leaf of `exp.config.init_from` that matches by name and shape.

  Called once at state creation (a resumed run then overwrites the state from its own
  checkpoint). The report is logged; `experiment.build` keeps the same report as
  `exp.init_from_report`, which training writes to DIR/init_from.json (`write_report`).

  Raises:
    UserError: the source cannot be read, or fewer than half of this model's parameters
      would be restored and `init_from_allow_partial` is not set.
  """
  config = exp.config
  report, source_flat = make_report(config, variables)
  _require_mostly_restored(config, report)
  leaves = report["leaves"]
  fresh = variables
  if report["fresh"]:  # a new draw: the seed's own would replay the source's initial head
    fresh = exp.init_variables(fresh_key(int(_get(config, "seed", 0)), report))

  def pick(coll):
    def fn(path, leaf):
      keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
      name = "/".join([coll, *keys])
      if leaves.get(name, {}).get("action") == "restored":
        return np.asarray(source_flat[name], dtype=np.asarray(leaf).dtype)
      return leaf
    return fn

  out = {coll: jax.tree_util.tree_map_with_path(pick(coll), tree)
         for coll, tree in fresh.items()}
  log.info("init_from %s (step %s): %s.", report["source"], report["step"], _describe(report))
  return out


def fresh_key(seed: int, report: dict) -> jax.Array:
  """The stream of the parameters init_from leaves fresh: the run's init stream with the
  source's identity (its checkpoint path and step) folded in.

  A run with the source's own seed would otherwise redraw exactly the source's initial
  values for a skipped head, the head its trained body was fitted to: it would start at the
  pretrained loss and every transfer comparison would be wrong. The fold-in keeps the draw
  repeatable (same seed and source, same values) and distinct from any run's own init.
  """
  from jrecipe.train.trainer import seeds
  identity = f"init_from:{report['source']}@{report['step']}".encode()
  return jax.random.fold_in(seeds(seed)["init"], zlib.crc32(identity))


def write_report(workdir: str, report: dict) -> str:
  """Writes `report` to `workdir/init_from.json` atomically; returns the path."""
  path = os.path.join(workdir, REPORT_FILE)
  write_json_atomic(path, report)
  return path


def freeze_mask(config, params) -> Any:
  """A tree of bools like `params`: True where init_from restores the leaf (to freeze).

  Depends only on names and shapes, so optax can call it on traced update trees.
  """
  src, _ = resolve_source(config.init_from, _get(config, "init_from_checkpoint", "latest"))
  source_flat = _source_flat(load_source(src))
  patterns = skip_patterns(config)

  def fn(path, leaf):
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    name = "/".join(["params", *keys])
    entry = plan({name: leaf}, source_flat, patterns)[name]
    return entry["action"] == "restored"

  return jax.tree_util.tree_map_with_path(fn, params)
