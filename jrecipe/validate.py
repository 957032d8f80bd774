"""One validation pass over a config, and one over the built Experiment, before anything runs.

Why a single pass: a bad value otherwise surfaces wherever it is first used (a division by
zero at step 50, an OverflowError from `int(round(inf))`, a NaN learning rate that trains
silently), often after the work directory was written. `validate_config` runs first thing in
`experiment.build` and turns every malformed field into a UserError that names the field, the
value and the valid range. `validate_experiment` runs once the data, model and loss exist and
checks what only they can tell: labels inside [0, num_classes) in every split, and a model
whose output shape is what the loss expects for this dataset (one `jax.eval_shape`, no
compilation, no FLOPs).

Fields that other layers already validate with good messages (optimizer hyperparameters and
schedules in `jrecipe.optim`, data fields in `jrecipe.data.pipeline`, model fields in each
model factory) are left to them; this module covers the top-level numbers and whatever would
otherwise fail late or silently.
"""

import math
import re
import traceback
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from jrecipe.errors import UserError
from jrecipe.optim import UNITS

_MISSING = object()
_IDENT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
MAX_SEED = 2**32 - 1  # jax.random.PRNGKey keeps 32 bits: larger seeds collide with smaller ones
MAX_STEPS = 2**31 - 1  # the step counter and schedules count in int32
EVAL_SPLITS = ("train", "validation", "test")


# --- reading fields ------------------------------------------------------------------------

def _get(config: Any, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    if node is None or not hasattr(node, "get"):
      return _MISSING
    node = node.get(part, _MISSING)
    if node is _MISSING:
      return _MISSING
  return node


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
  return _is_int(v) or isinstance(v, (float, np.floating))


def _fail(dotted: str, value: Any, must: str, why: str = "") -> UserError:
  msg = f"config.{dotted} is {value!r}; it must be {must}."
  return UserError(f"{msg} {why}".strip())


def _int(config, dotted: str, lo: int, hi: Optional[int] = None, why: str = "") -> None:
  """An integer field in [lo, hi] (absent fields are not checked: old configs lack some)."""
  v = _get(config, dotted)
  if v is _MISSING:
    return
  rng = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
  if not _is_int(v) or v < lo or (hi is not None and v > hi):
    raise _fail(dotted, v, rng, why)


def _num(config, dotted: str, lo: float, hi: float = math.inf, *, lo_open=False, hi_open=False,
         why: str = "") -> None:
  """A finite number in the interval; the message spells the interval in bracket notation."""
  v = _get(config, dotted)
  if v is _MISSING:
    return
  left = f"{'(' if lo_open else '['}{lo:g}"
  right = "inf)" if hi == math.inf else f"{hi:g}{')' if hi_open else ']'}"
  ok = _is_number(v) and math.isfinite(float(v))
  if ok:
    x = float(v)
    ok = (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
  if not ok:
    raise _fail(dotted, v, f"a finite number in {left}, {right}", why)


def _bool(config, dotted: str) -> None:
  v = _get(config, dotted)
  if v is not _MISSING and not isinstance(v, (bool, np.bool_)):
    raise _fail(dotted, v, "True or False")


def _choice(config, dotted: str, valid, why: str = "") -> None:
  v = _get(config, dotted)
  if v is not _MISSING and v not in tuple(valid):
    raise _fail(dotted, v, f"one of {', '.join(repr(x) for x in valid)}", why)


def _leaves(node: Any, prefix: str = ""):
  """(dotted path, value) of every leaf of a ConfigDict / mapping (tuples are leaves)."""
  items = node.items() if hasattr(node, "items") else ()
  for k, v in items:
    path = f"{prefix}{k}"
    if isinstance(v, Mapping) or hasattr(v, "to_dict"):
      yield from _leaves(v, path + ".")
    else:
      yield path, v


def _flat_values(v):
  if isinstance(v, (tuple, list)):
    for x in v:
      yield from _flat_values(x)
  else:
    yield v


# --- the config pass -----------------------------------------------------------------------

def validate_config(config: Any) -> None:
  """Raises a UserError for the first malformed field of `config`; returns None if all is well.

  Runs in `experiment.build` before the data is loaded, so nothing heavy has happened and
  nothing has been written when a message comes back.
  """
  for path, value in _leaves(config):
    for x in _flat_values(value):
      if isinstance(x, (float, np.floating)) and not math.isfinite(float(x)):
        raise UserError(f"config.{path} is {value!r}: every number in a config must be finite "
                        "(nan and inf are never a valid setting).")
      if isinstance(x, str) and "\0" in x:
        raise UserError(f"config.{path} contains a NUL character; names and paths cannot.")

  _int(config, "seed", 0, MAX_SEED,
       "jax.random.PRNGKey keeps 32 bits, so larger seeds would silently equal smaller ones.")
  _int(config, "batch_size", 1, why="It is the global batch, split over every device.")
  _int(config, "eval_batch_size", 1, why="It is the number of examples per evaluation batch.")
  _num(config, "num_epochs", 0, lo_open=True,
       why="It may be fractional (0.5 = half an epoch); to continue a run, raise it.")
  _num(config, "l2", 0, why="It is the L2 strength added to the loss; 0 turns it off.")
  _num(config, "ema_decay", 0, 1, hi_open=True,
       why="It is the decay of the parameters' moving average (e.g. 0.999); 0 turns it off.")
  _int(config, "early_stopping_patience", 0,
       why="It counts epochs without validation improvement; 0 turns early stopping off.")
  _int(config, "log_every_steps", 1)
  for name in ("init_bias", "debug_nans", "progress"):
    _bool(config, name)
  splits = _get(config, "eval_splits")
  if splits is not _MISSING:
    if isinstance(splits, str) or not all(isinstance(s, str) and s in EVAL_SPLITS
                                          for s in _flat_values(splits)):
      raise _fail("eval_splits", splits, f"a tuple of split names from {', '.join(EVAL_SPLITS)}")

  for section in ("model", "loss", "optimizer"):
    _import_path_form(config, f"{section}.name")
  _model_rates(config)
  _num(config, "optimizer.learning_rate", 0, lo_open=True,
       why="A rate of 0 never moves the parameters; try 1e-3 for Adam, 0.1 for SGD.")
  for section in ("schedule", "momentum_schedule"):
    _choice(config, f"{section}.unit", UNITS,
            why=f"It is the unit of {section}'s durations (warmup, boundaries, decay_steps).")

  augment = _get(config, "data.augment")
  if augment is not _MISSING and not hasattr(augment, "get"):
    raise _fail("data.augment", augment, "a section with random_crop and hflip")
  _int(config, "data.augment.random_crop", 0, why="It is the padding in pixels; 0 turns it off.")
  _bool(config, "data.augment.hflip")

  _int(config, "checkpoint.every_epochs", 0,
       why="0 saves only at the end (and on preemption).")
  _int(config, "checkpoint.keep_best", 0)

  _num(config, "plateau.factor", 0, 1, lo_open=True, hi_open=True,
       why="It multiplies the learning rate at each plateau (0.5 halves it).")
  _int(config, "plateau.patience", 1, why="It is a number of epochs.")
  _num(config, "plateau.min_scale", 0, 1, lo_open=True)
  _bool(config, "plateau.enabled")

  for name in ("budget_steps", "batch_size", "overfit_examples", "overfit_steps",
               "gradcheck_examples"):
    _int(config, f"checks.{name}", 1)
  _int(config, "checks.gradcheck_burnin_steps", 0)

  _parallel(config)


def _import_path_form(config, dotted: str) -> None:
  """'package.module:Name' names must be importable-looking before anything imports them."""
  name = _get(config, dotted)
  if name is _MISSING:
    return
  if not isinstance(name, str) or not name:
    raise _fail(dotted, name, "a non-empty string: a registered name or an import path "
                "'package.module:Name'")
  if ":" not in name:
    return  # registered names get their own message (with the valid ones) from the registry
  module, _, attr = name.partition(":")
  if not (_IDENT_PATH.match(module) and _IDENT_PATH.match(attr)):
    raise _fail(dotted, name, "a registered name or an import path 'package.module:Name' "
                "(dotted Python identifiers on both sides of the colon)")


def _model_rates(config) -> None:
  """Every dropout-like model field (dropout, dropout2d, *_rate) is a probability in [0, 1)."""
  model = _get(config, "model")
  if model is _MISSING or not hasattr(model, "items"):
    return
  for k, v in model.items():
    if ("dropout" in k or k == "rate" or k.endswith("_rate")) and _is_number(v):
      _num(config, f"model.{k}", 0, 1, hi_open=True,
           why="It is the probability of dropping a unit in training; 0 turns dropout off.")


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # private API moved: do not risk starting it
    return False


def _parallel(config) -> None:
  """parallel.* fields, and a global batch that splits evenly over the devices.

  The device count is read only when the JAX backend already exists: validation must never
  be what creates it (jax.distributed.initialize() and the CPU dispatch mode must come
  first; see jrecipe.runtime). Training creates its placement before building, so on that
  path the check always runs; `parallel.check_batch_divisible` repeats it there.
  """
  from jrecipe.train import parallel
  _choice(config, "parallel.mode", parallel.MODES)
  _int(config, "parallel.num_devices", 0, why="0 uses every device.")
  _bool(config, "parallel.distributed")
  mode, batch = _get(config, "parallel.mode"), _get(config, "batch_size")
  if mode is _MISSING or batch is _MISSING or mode == "single" or not _backend_started():
    return
  import jax
  requested = _get(config, "parallel.num_devices")
  requested = 0 if requested is _MISSING else int(requested)
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
  examples, and the loss on those outputs, so no XLA compilation happens here.
  """
  check_labels(exp.data, exp.spec)
  check_output_shape(exp)
  _check_augment(exp)


def check_labels(data, spec) -> None:
  """Every split's labels lie in [0, num_classes) (classification, sequence) or are finite."""
  for split, arrays in data.arrays.items():
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
      values = np.unique(y[bad])
      shown = ", ".join(str(int(v)) for v in values[:8]) + (", ..." if len(values) > 8 else "")
      raise UserError(
          f"The {split!r} split of dataset {spec.name!r} has {int(bad.sum())} labels outside "
          f"the valid range [0, {c - 1}] for its {c} classes (bad values: {shown}). Labels "
          "must be class ids 0..num_classes-1: fix the labels, or the dataset's num_classes.")


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
