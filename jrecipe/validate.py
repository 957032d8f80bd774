"""One validation pass over a config, and one over the built Experiment, before anything runs.

Why a single pass: a bad value otherwise surfaces wherever it is first used (a division by
zero at step 50, an OverflowError from `int(round(inf))`, a NaN learning rate that trains
silently), often after the work directory was written. `validate_config` runs first thing in
`experiment.build` and turns every malformed field into a UserError that names the field, the
value and the valid range. `validate_experiment` runs once the data, model and loss exist and
checks what only they can tell: labels inside [0, num_classes) in every split, and a model
whose output shape is what the loss expects for this dataset (one `jax.eval_shape`, no
compilation, no FLOPs).

Every field's type, range or choices is declared once, in `jrecipe.config.schema`, and
checked here in one generic pass (`check_fields`); what needs more than one field or more than
a range stays here (finite numbers and NUL characters anywhere, import-path names, dropout-like
model rates, the device count). What depends on the schedule or the data (a 'step' schedule's
boundaries, a crop larger than the image) is checked where it is used (`jrecipe.optim`,
`jrecipe.data`), and model fields by each model factory.
"""

import difflib
import math
import os
import re
import traceback
from collections.abc import Mapping
from typing import Any

import numpy as np

from jrecipe import storage
from jrecipe.config import schema
from jrecipe.config.fields import is_number
from jrecipe.errors import UserError

_IDENT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
MAX_STEPS = 2**31 - 1  # the step counter and schedules count in int32


# --- reading fields ------------------------------------------------------------------------

def _fail(dotted: str, value: Any, must: str, why: str = "") -> UserError:
  msg = f"config.{dotted} is {value!r}; it must be {must}."
  return UserError(f"{msg} {why}".strip())


def _is_section(v: Any) -> bool:
  return isinstance(v, Mapping) or hasattr(v, "to_dict")


def _leaves(node: Any, prefix: str = ""):
  """(dotted path, value) of every leaf of a ConfigDict / mapping (tuples are leaves)."""
  items = node.items() if hasattr(node, "items") else ()
  for k, v in items:
    path = f"{prefix}{k}"
    if _is_section(v):
      yield from _leaves(v, path + ".")
    else:
      yield path, v


def _flat_values(v):
  if isinstance(v, (tuple, list)):
    for x in v:
      yield from _flat_values(x)
  else:
    yield v


def _in_open_section(dotted: str) -> bool:
  parts = dotted.split(".")
  return any(schema.is_open(".".join(parts[:i])) for i in range(1, len(parts)))


def _not_a_field(dotted: str) -> UserError:
  """A leaf the schema does not declare: removed, a section given a value, or unknown."""
  if dotted in schema.REMOVED:
    return UserError(f"config.{dotted} was removed from jrecipe; {schema.REMOVED[dotted]}.")
  if dotted in schema.SECTION_PATHS:
    names = [n for p, _ in schema.fields() if p.startswith(dotted + ".")
             for n in [p[len(dotted) + 1:]] if "." not in n]
    return UserError(f"config.{dotted} must be a section (with the fields {', '.join(names)}), "
                     "not a value.")
  parent, _, name = dotted.rpartition(".")
  siblings = sorted(p[len(parent) + 1:] if parent else p for p in
                    list(schema.FIELDS) + list(schema.SECTION_PATHS)
                    if p.rpartition(".")[0] == parent)
  msg = f"config.{dotted} is not a field jrecipe reads"
  close = difflib.get_close_matches(name, siblings, n=1)
  if close:
    msg += f" (did you mean {close[0]!r}?)"
  where = f"config.{parent}" if parent else "the config"
  return UserError(f"{msg}. Valid fields of {where}: {', '.join(siblings)}. A section replaced "
                   "by a dict literal must use these names; see docs/config.md.")


def check_fields(config: Any, prefix: str = "") -> dict:
  """The schema's pass over every field present in `config` (or in its section `prefix`).

  Each leaf must be a declared field (a model section's own fields excepted: its factory
  checks them) whose value has the field's type and lies in its range or choices. A field
  that is absent (a section replaced by a partial dict literal) is not checked: its reader
  takes the schema default.

  Args:
    config: a ConfigDict or nested mapping.
    prefix: only the fields under this section path ('inspect'); '' = all.

  Returns:
    {dotted path: value} of every leaf checked, for the checks that combine fields.

  Raises:
    UserError: naming the first bad field, its value and the valid values.
  """
  node = config
  for part in (p for p in prefix.split(".") if p):
    node = node.get(part, {}) if hasattr(node, "get") else {}
  values = {}
  for dotted, value in _leaves(node, f"{prefix}." if prefix else ""):
    values[dotted] = value
    if _in_open_section(dotted):
      continue
    f = schema.FIELDS.get(dotted)
    if f is None:
      raise _not_a_field(dotted)
    must = f.problem(value)
    if must is not None:
      raise _fail(dotted, value, must, f.why)
  return values


# --- the config pass -----------------------------------------------------------------------

def validate_config(config: Any) -> None:
  """Raises a UserError for the first malformed field of `config`; returns None if all is well.

  Runs in `experiment.build` before the data is loaded, so nothing heavy has happened and
  nothing has been written when a message comes back. Types, ranges and choices come from
  `jrecipe.config.schema`; the checks below them need more than one field or more than a
  range.
  """
  for path, value in _leaves(config):
    for x in _flat_values(value):
      if isinstance(x, (float, np.floating)) and not math.isfinite(float(x)):
        raise UserError(f"config.{path} is {value!r}: every number in a config must be finite "
                        "(nan and inf are never a valid setting).")
      if isinstance(x, str) and "\0" in x:
        raise UserError(f"config.{path} contains a NUL character; names and paths cannot.")
  values = check_fields(config)
  for section in ("model", "loss", "optimizer"):
    _import_path_form(values, f"{section}.name")
  _model_rates(values)
  _data_dir(values)
  low, high = values.get("monitor.ratio_low"), values.get("monitor.ratio_high")
  if low is not None and high is not None and not low < high:
    raise UserError(f"config.monitor.ratio_low is {low!r} and config.monitor.ratio_high is "
                    f"{high!r}: ratio_low must be below ratio_high (the healthy band of the "
                    "update/weight ratio, e.g. 1e-4 to 1e-2).")
  _parallel(values)
  from jrecipe.profile import parse_steps  # 'START:END', refused before anything is written
  parse_steps(values.get("profile.steps", ""))


def _import_path_form(values: dict, dotted: str) -> None:
  """'package.module:Name' names must be importable-looking before anything imports them."""
  if dotted not in values:
    return
  name = values[dotted]
  if not isinstance(name, str) or not name:
    raise _fail(dotted, name, "a non-empty string: a registered name or an import path "
                "'package.module:Name'")
  if ":" not in name:
    return  # registered names get their own message (with the valid ones) from the registry
  module, _, attr = name.partition(":")
  if not (_IDENT_PATH.match(module) and _IDENT_PATH.match(attr)):
    raise _fail(dotted, name, "a registered name or an import path 'package.module:Name' "
                "(dotted Python identifiers on both sides of the colon)")


def _data_dir(values: dict) -> None:
  """data.data_dir, when set, is a directory or can be created as one (datasets are prepared
  into it on first use): a path that is a file, or lies under one, is refused now."""
  path = values.get("data.data_dir")
  if not isinstance(path, str) or not path:
    return
  if "://" in path:
    from jrecipe import storage
    problem = storage.scheme_problem(path)
    if problem:
      raise _fail("data.data_dir", path, "a local or mounted directory, a gs://BUCKET/PATH "
                  "URL, or '' for the default", problem)
    storage.check_bucket(path, f"config.data.data_dir={path}")  # before anything is written
    return
  probe = os.path.abspath(os.path.expanduser(path))
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    where = "is a file" if probe == os.path.abspath(os.path.expanduser(path)) else \
        f"lies under {probe}, a file"
    raise _fail("data.data_dir", path, "a directory (created if missing) or '' for the default",
                f"This path {where}: datasets are prepared into the directory on first use.")


def _model_rates(values: dict) -> None:
  """Every dropout-like model field (dropout, dropout2d, *_rate) is a probability in [0, 1)."""
  for dotted, v in values.items():
    section, _, k = dotted.rpartition(".")
    if section != "model" or not is_number(v):
      continue
    if ("dropout" in k or k == "rate" or k.endswith("_rate")) and not (
        math.isfinite(float(v)) and 0 <= float(v) < 1):
      raise _fail(dotted, v, "a finite number in [0, 1)",
                  "It is the probability of dropping a unit in training; 0 turns dropout off.")


def _backend_started() -> bool:
  from jrecipe import jax_private
  return jax_private.backends_are_initialized(False)  # unknown: do not risk starting it


def _parallel(values: dict) -> None:
  """A global batch that splits evenly over the devices, and no more devices than exist.

  The device count is read only when the JAX backend already exists: validation must never
  be what creates it (jax.distributed.initialize() and the CPU dispatch mode must come
  first; see jrecipe.runtime). Training creates its placement before building, so on that
  path the check always runs; `parallel.check_batch_divisible` repeats it there.
  """
  mode, batch = values.get("parallel.mode"), values.get("batch_size")
  if mode is None or batch is None or mode == "single" or not _backend_started():
    return
  import jax
  requested = int(values.get("parallel.num_devices", schema.default("parallel.num_devices")))
  available = len(jax.local_devices()) if mode == "pmap" else jax.device_count()
  if requested > available:
    raise _fail("parallel.num_devices", requested,
                f"at most {available}, the number of devices "
                f"{'on this host' if mode == 'pmap' else 'of this job'} (0 uses them all)")
  n = requested or available
  if mode == "pmap" and jax.process_count() > 1:
    n = jax.device_count()
  if batch % n:
    raise UserError(
        f"config.batch_size is {batch}, which does not split evenly over the {n} devices of "
        f"parallel.mode={mode!r}: it must be a multiple of {n} (e.g. {max(n, batch // n * n)}), "
        "or set parallel.num_devices.")


# --- the experiment pass -------------------------------------------------------------------

def validate_experiment(exp) -> None:
  """Checks the built Experiment's data and model against each other (UserError if not).

  Labels are checked on the loaded arrays of every split (cheap: one pass of min/max);
  the model's output shape with one abstract evaluation of init + apply on two training
  examples, and the loss on those outputs, so no XLA compilation happens here; then the
  memory the run needs, from the same abstract shapes, against this machine's
  (`jrecipe.memory.check_fits`: refused before anything is allocated).
  """
  check_labels(exp.data, exp.spec)
  check_output_shape(exp)
  _check_augment(exp)
  warn_long_warmup(exp)
  from jrecipe import memory
  memory.check_fits(exp)


def warn_long_warmup(exp) -> list[str]:
  """One warning line per schedule whose warm-up is at least the whole run (returned too).

  Recipe stage 3 ('do not trust learning rate decay defaults'): a warm-up of 2 epochs in a
  1-epoch run means the rate never reaches optimizer.learning_rate. A warning, not a refusal:
  a smoke variant shortens num_epochs and keeps the full run's schedule on purpose.
  """
  import logging
  out = []
  for section, target in (("schedule", "optimizer.learning_rate"),
                          ("momentum_schedule", "optimizer.momentum")):
    sched = exp.config.get(section)
    if sched is None or not hasattr(sched, "get"):
      continue
    warmup, unit = sched.get("warmup", 0), sched.get("unit", "epochs")
    if not is_number(warmup) or not warmup:
      continue
    steps = int(round(float(warmup) * (exp.steps_per_epoch if unit == "epochs" else 1)))
    if steps >= exp.total_steps:
      out.append(f"config.{section}.warmup is {warmup:g} {unit} ({steps} steps), at least the "
                 f"whole run ({exp.total_steps} steps): {target} is never reached (the last "
                 f"step uses {min(1.0, exp.total_steps / steps):.0%} of it). Shorten the "
                 "warm-up to a few percent of the run, or 0 for none.")
      logging.getLogger("jrecipe").warning(out[-1])
  return out


def check_labels(data, spec) -> None:
  """Every split's labels lie in [0, num_classes) (classification, sequence) or are finite.

  Labels not held in memory (a streamed sequence dataset) are checked from the class counts
  of the opening pass, which already refused negative or non-integer ones."""
  for split, arrays in data.arrays.items():
    counts = (getattr(data, "label_counts", None) or {}).get(split)
    if counts is not None:
      c = int(spec.num_classes or 0)
      counts = np.asarray(counts)
      if counts[c:].any():
        _labels_out_of_range(split, spec, int(counts[c:].sum()), np.flatnonzero(counts[c:]) + c)
      continue
    y = np.asarray(arrays["y"])
    if not y.size:
      continue
    if spec.task == "regression":
      if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y)):
        n = int(np.sum(~np.isfinite(y)))
        raise UserError(f"The {split!r} split of dataset {spec.name!r} has {n} non-finite "
                        "regression targets (nan or inf): every target must be a finite number. "
                        "Fix or drop those examples.")
      continue
    c = int(spec.num_classes or 0)
    if not np.issubdtype(y.dtype, np.integer):
      raise UserError(f"The {split!r} split of dataset {spec.name!r} has labels of dtype "
                      f"{y.dtype}; a {spec.task} task needs integer class ids in [0, {c - 1}].")
    bad = (y < 0) | (y >= c)
    if bad.any():
      _labels_out_of_range(split, spec, int(bad.sum()), np.unique(y[bad]))


def _labels_out_of_range(split: str, spec, count: int, values) -> None:
  """Raises the one paragraph for `count` labels of `split` outside [0, num_classes)."""
  c = int(spec.num_classes or 0)
  shown = ", ".join(str(int(v)) for v in values[:8]) + (", ..." if len(values) > 8 else "")
  raise UserError(
      f"The {split!r} split of dataset {spec.name!r} has {count} labels outside the valid "
      f"range [0, {c - 1}] for its {c} classes (bad values: {shown}). Labels must be class "
      "ids 0..num_classes-1: fix the labels, or the dataset's num_classes.")


def expected_output_shape(spec, labels_shape: tuple) -> tuple:
  """The output shape the loss needs for labels of `labels_shape` (for the message)."""
  if spec.task in ("classification", "sequence"):
    return tuple(labels_shape) + (int(spec.num_classes),)
  return tuple(labels_shape) if len(labels_shape) > 1 else (labels_shape[0], 1)


def _origin(e: BaseException) -> str:
  """'file:line in fn' of the innermost frame outside site-packages (where to look)."""
  frames = traceback.extract_tb(e.__traceback__)
  mine = [f for f in frames if "site-packages" not in f.filename] or frames
  if not mine:
    return ""
  f = mine[-1]
  return f" (raised at {f.filename}:{f.lineno} in {f.name})"


def describe_exception(e: BaseException) -> str:
  first = (str(e).strip().splitlines() or [""])[0][:300]
  return f"{type(e).__name__}: {first}{_origin(e)}"


def check_output_shape(exp) -> None:
  """One `jax.eval_shape` of init + apply on a sample batch; the loss on those outputs.

  Why: a model whose last layer has the wrong width is otherwise found at the first train
  step (a shape error deep inside a jitted loss), or never (a user loss that indexes with
  take_along_axis silently clamps out-of-range labels).
  """
  import jax
  import jax.numpy as jnp
  x = exp.sample_input(2)
  y = np.asarray(exp.data.arrays["train"]["y"][:len(x)])
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  where = (f"the model {exp.model.name!r} on a sample batch of dataset {exp.spec.name!r} "
           f"(inputs {tuple(x.shape)} {x.dtype})")
  try:
    # A dropout key even in eval mode: a model that (wrongly) drops out at eval is the check
    # battery's eval_mode finding, not a reason to refuse the build.
    out = jax.eval_shape(lambda k, xb: exp.model.apply(exp.model.init(k, xb), xb,
                                                       rngs={"dropout": k}), key, x)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - the model's own code or its config fields
    raise UserError(f"Running {where} failed: {describe_exception(e)}. Check config.model's "
                    "fields and, for your own model, its code.") from e
  want = expected_output_shape(exp.spec, y.shape)
  task = (f"{exp.spec.task} with {exp.spec.num_classes} classes"
          if exp.spec.task != "regression" else f"regression with targets {tuple(y.shape[1:])}")
  if not hasattr(out, "shape"):
    raise UserError(f"{where[0].upper()}{where[1:]} returns {type(out).__name__}, not one array; "
                    f"the {exp.loss.name!r} loss expects outputs of shape {want} ({task}).")
  got = tuple(out.shape)
  if exp.spec.task == "regression":
    ok = int(np.prod(got)) == int(np.prod(want)) and got[:1] == want[:1]
  else:
    ok = got == want
  if not ok:
    raise UserError(
        f"The model {exp.model.name!r} outputs shape {got} for a batch of {len(x)} inputs of "
        f"shape {tuple(x.shape[1:])}, but the {exp.loss.name!r} loss expects {want} for dataset "
        f"{exp.spec.name!r} ({task}). Make the model's last layer emit "
        f"{want[-1]} values per {'time step' if exp.spec.task == 'sequence' else 'example'} "
        "(jrecipe.models.output_dim(spec) gives it).")
  try:
    losses = jax.eval_shape(exp.loss.per_example, out, y)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - the loss's own code or its config fields
    raise UserError(f"The loss {exp.loss.name!r} fails on outputs {got} and labels "
                    f"{tuple(y.shape)} {y.dtype} of dataset {exp.spec.name!r}: "
                    f"{describe_exception(e)}. Check config.loss and, for your own loss, its "
                    "code.") from e
  if tuple(getattr(losses, "shape", ())) != (len(x),):
    raise UserError(f"The loss {exp.loss.name!r} returns shape "
                    f"{tuple(getattr(losses, 'shape', ()))} for a batch of {len(x)}; a loss "
                    f"returns one value per example, shape ({len(x)},).")


def _check_augment(exp) -> None:
  """Traces the augmentation once so a bad crop/flip setting fails now, not in the train step."""
  fn = exp.augment_fn()
  if fn is None:
    return
  import jax
  import jax.numpy as jnp
  try:
    jax.eval_shape(fn, exp.sample_input(2), jax.ShapeDtypeStruct((2,), jnp.uint32))
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001
    raise UserError(f"config.data.augment does not apply to the images of dataset "
                    f"{exp.spec.name!r} (input shape {exp.spec.input_shape}): "
                    f"{describe_exception(e)}.") from e


# --- `--mode=validate` ---------------------------------------------------------------------

def run_mode(config: Any, workdir: str, options=None) -> int:
  """`--mode=validate`: every check `--mode=train` makes before its first step, then exit 0.

  The config's fields, the placement (devices, an evenly split batch), the data, model, loss
  and optimizer (`experiment.build`, including the memory estimate), and the work directory
  (writable; a run of another config in it is refused as a resume would be). Nothing is
  written and nothing is compiled: submit a long job only once this passes (recipe stage 2,
  'end-to-end skeleton': fail fast).

  Returns:
    0, after one line on stdout; a problem raises the UserError training would raise.
  """
  from jrecipe import experiment
  from jrecipe import memory
  from jrecipe.train import parallel
  from jrecipe.train import workdir as workdir_lib
  placement = parallel.make_placement(config.parallel.mode, config.parallel.num_devices)
  parallel.check_batch_divisible(config.batch_size, placement)
  exp = experiment.build(config, bn_axis_name=placement.axis_name)
  workdir_lib.check_writable(workdir)
  allow = bool(options and options.allow_config_change)
  workdir_lib.prepare(workdir, config, allow_config_change=allow, primary=False)
  est = memory.estimate(exp, devices=placement.num_devices)
  resumes = storage.exists(os.path.join(workdir, "config.json"))
  print(f"jrecipe: the config is valid: {exp.total_steps} steps ({exp.steps_per_epoch} per "
        f"epoch) on {placement.num_devices} device(s), about {memory.human(est.per_device)} "
        f"per device; {workdir} {'resumes' if resumes else 'starts a new run'}.", flush=True)
  return 0
