"""config -> Experiment: the dataset, model, loss and optimizer every mode shares.

A mode (train, check, ...) never builds its own model or data pipeline; it asks `build(config)`
for them, so a check runs on exactly the model, data and loss it trains. Modes that need only
the data (inspect, label) ask `build_data(config)`. An Experiment is frozen: built once, never
changed afterwards (a variant is `dataclasses.replace(exp, ...)`).
"""

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jrecipe import losses as losses_lib
from jrecipe import models as models_lib
from jrecipe import optim
from jrecipe import precision
from jrecipe import validate
from jrecipe.data import pipeline
from jrecipe.errors import UserError
from jrecipe.types import DataSpec, Loss, Model


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything built from a config, and nothing run yet.

  Attributes:
    config: the resolved ConfigDict.
    data: the loaded dataset (`jrecipe.data.pipeline.Dataset`: arrays per split + spec).
    spec: the dataset's `DataSpec`.
    model: the model as pure functions (`jrecipe.types.Model`).
    loss: the data loss (`jrecipe.types.Loss`).
    steps_per_epoch, total_steps: durations in steps (epochs are converted here, once).
    init_from_report: with `config.init_from`, what the source restores, skips and leaves
      fresh (checked at build time, before anything is written); else None.
  """

  config: ml_collections.ConfigDict
  data: Any
  spec: DataSpec
  model: Model
  loss: Loss
  steps_per_epoch: int
  total_steps: int
  init_from_report: Optional[dict] = None

  def optimizer(self, config: Optional[ml_collections.ConfigDict] = None):
    """The optax transformation for `config` (default: this experiment's).

    With `init_from` and `init_from_freeze` ('use a pretrained network', recipe stage 4),
    the parameters restored from the source get exactly zero updates (an optax mask after
    the optimizer, so weight decay and momentum cannot move them either); the others train.
    """
    c = config or self.config
    tx = optim.make_optimizer(c.optimizer, c.schedule, c.momentum_schedule,
                              steps_per_epoch=self.steps_per_epoch,
                              total_steps=self.total_steps)
    if not (c.get("init_from") and c.get("init_from_freeze", False)):
      return precision.wrap_optimizer(tx, c.precision)
    from jrecipe.train import init_from
    if optim.needs_value_fn(c.optimizer):
      raise UserError(f"init_from_freeze does not work with optimizer {c.optimizer.name!r}: its "
                      "line search would move the frozen parameters. Use adam or sgd to "
                      "fine-tune with frozen layers.")
    import optax
    return precision.wrap_optimizer(optax.chain(tx, optax.masked(
        optax.set_to_zero(), functools.partial(init_from.freeze_mask, c))), c.precision)

  def augment_fn(self) -> Optional[Callable]:
    """`augment(x, rng) -> x` for the train step, or None when augmentation is off.

    With your own `data.augment.fn` (`fn(x, y, rng) -> (x, y)`, docs/your_data.md) the
    result also takes the labels: `augment(x, rng, y) -> (x, y)` (`takes_labels` is True),
    and `augment(x, rng)` still returns the augmented inputs alone (for pictures and checks).
    """
    aug = self.config.data.get("augment")  # a data section replaced by a dict may lack it
    builtin = None
    if aug is not None and (aug.get("random_crop", 0) or aug.get("hflip", False)):
      builtin = functools.partial(_augment, aug_config=aug)
    user_path = aug.get("fn", "") if aug is not None else ""
    if not user_path:
      return builtin
    from jrecipe.registry import import_path
    return with_labels(builtin, import_path(user_path, "augmentation function"))

  def sample_input(self, n: int = 2) -> np.ndarray:
    return self.data.arrays["train"]["x"][:n]

  def init_variables(self, rng: jax.Array, *, init_bias: Optional[bool] = None) -> dict:
    """Model variables at initialisation, with the head bias set from the data if asked.

    'Init well' (recipe stage 2): with `config.init_bias`, the final layer's bias starts at
    the log class priors (softmax classification and sequences) or at the target mean
    (regression), which removes the 'hockey stick' of the first iterations.
    """
    variables = jax.jit(self.model.init)(rng, self.sample_input())
    use = self.config.init_bias if init_bias is None else init_bias
    if use:
      variables = set_head_bias(variables, self.head_bias(), self.model.head_path)
    return variables

  def head_bias(self) -> Optional[np.ndarray]:
    """The data-derived final-layer bias for this loss, or None where it does not apply."""
    y = self.data.arrays["train"]["y"]
    if self.loss.expects == "logits" and self.spec.num_classes:
      counts = self.data.class_counts("train", self.spec.num_classes)
      priors = (counts + 1.0) / (counts.sum() + self.spec.num_classes)  # add-one smoothing
      log_p = np.log(priors)
      return (log_p - log_p.mean()).astype(np.float32)
    if self.loss.expects == "values":
      return np.asarray(np.mean(y, axis=0), np.float32).reshape(-1)
    return None


def set_head_bias(variables: dict, bias: Optional[np.ndarray],
                  path: tuple = ("head", "bias")) -> dict:
  """Returns variables with the head's bias (params at `path`) replaced by `bias`.

  `path` is the model's `head_path` (found by `jrecipe.models.contract.find_head` wherever
  the final layer sits); nothing changes when there is no such leaf or its shape differs.
  """
  from jrecipe.models.contract import leaf, with_leaf
  if bias is None:
    return variables
  current = leaf(variables["params"], path)
  if current is None or np.shape(current) != np.shape(bias):
    return variables
  params = with_leaf(variables["params"], path, jnp.asarray(bias, current.dtype))
  return {**variables, "params": params}


def with_labels(builtin: Optional[Callable], user: Callable) -> Callable:
  """`augment(x, rng, y=None)`: the built-in crop/flip on x, then `user(x, y, rng)`.

  Called without labels (a check drawing the augmented batch) the user's function sees
  zero labels and only its inputs are returned.
  """
  def augment(x, rng, y=None):
    k_builtin, k_user = jax.random.split(rng)
    if builtin is not None:
      x = builtin(x, k_builtin)
    labels = y if y is not None else jnp.zeros((x.shape[0],), jnp.int32)
    x_new, y_new = user(x, labels, k_user)
    return x_new if y is None else (x_new, y_new)

  augment.takes_labels = True
  return augment


def check_augment(exp: "Experiment") -> None:
  """Traces your own augmentation on a train batch: it must keep shapes and dtypes (or exit 2).

  Why: a function that crops to another size or turns labels into floats fails (or silently
  broadcasts) inside the compiled step; a paragraph now names what changed.
  """
  fn = exp.augment_fn()
  if not getattr(fn, "takes_labels", False):
    return
  train = exp.data.arrays["train"]
  x, y = jnp.asarray(train["x"][:2]), jnp.asarray(train["y"][:2])
  path = exp.config.data.augment.fn
  try:
    x2, y2 = jax.eval_shape(fn, x, jax.random.key(0), y)
  except Exception as e:  # noqa: BLE001 - the user's code: a paragraph, not a traceback
    raise UserError(f"The augmentation data.augment.fn={path!r} fails on a train batch of "
                    f"inputs {x.shape} {x.dtype} and labels {y.shape} {y.dtype}: "
                    f"{validate.describe_exception(e)}. It must be fn(x, y, rng) -> (x, y) "
                    "in jax.numpy (see docs/your_data.md).") from e
  for what, before, after in (("inputs", x, x2), ("labels", y, y2)):
    if before.shape != after.shape or before.dtype != after.dtype:
      raise UserError(f"The augmentation data.augment.fn={path!r} changes the {what} from "
                      f"{before.shape} {before.dtype} to {after.shape} {after.dtype}: it must "
                      "return inputs and labels of the shapes and dtypes it was given (crop "
                      "back to size, keep integer labels); see docs/your_data.md.")


def _augment(x, rng, aug_config):
  return pipeline.augment(x, rng, aug_config)


def durations(config, num_train: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps): the one place epochs become steps."""
  if config.batch_size <= 0:
    raise UserError(f"batch_size must be positive, got {config.batch_size}.")
  if config.batch_size > num_train:
    raise UserError(
        f"batch_size={config.batch_size} is larger than the train split ({num_train} "
        "examples): lower batch_size (for full-batch L-BFGS set it to the split size).")
  spe = max(num_train // config.batch_size, 1)
  if not config.num_epochs > 0 or not np.isfinite(config.num_epochs):
    raise UserError(f"num_epochs must be a finite number > 0, got {config.num_epochs}.")
  total = int(round(spe * config.num_epochs))
  if total < 1:
    raise UserError(f"num_epochs={config.num_epochs:g} is less than one step ({spe} steps per "
                    f"epoch at batch_size={config.batch_size}): use at least {1 / spe:.3g}.")
  if total > validate.MAX_STEPS:
    raise UserError(f"num_epochs={config.num_epochs:g} is {total} steps, more than the "
                    f"{validate.MAX_STEPS} an int32 step counter holds: lower num_epochs.")
  return spe, total


def build(config: ml_collections.ConfigDict, *, bn_axis_name: Optional[str] = None) -> Experiment:
  """Builds the Experiment a config describes; raises UserError on any bad name or value.

  Order matters: the config's own fields are validated before the data is loaded, and the
  data, model and loss against each other (labels in range, output shape) before the
  optimizer, so a bad input costs no compile and writes nothing.
  """
  validate.validate_config(config)
  data = pipeline.load_dataset(config.data, seed=config.seed)
  spec = data.spec
  with _bad_input("model", config.model):
    model = models_lib.build_model(config.model, spec, bn_axis_name=bn_axis_name,
                                   precision=config.precision)
  with _bad_input("loss", config.loss):
    loss = losses_lib.build_loss(config.loss, spec)
  if spec.task == "regression" and loss.expects != "values":
    raise UserError(f"Loss {loss.name!r} is for classification but dataset {spec.name!r} is a "
                    "regression task: use loss.name='l2' or 'huber'.")
  if spec.task != "regression" and loss.expects == "values":
    raise UserError(f"Loss {loss.name!r} is for regression but dataset {spec.name!r} is a "
                    f"{spec.task} task: use 'softmax_xent' or 'multiclass_svm'.")
  num_train = len(data.arrays["train"]["y"])
  spe, total = durations(config, num_train)
  exp = Experiment(config=config, data=data, spec=spec, model=model, loss=loss,
                   steps_per_epoch=spe, total_steps=total)
  validate_experiment(exp)
  check_augment(exp)
  if config.get("init_from"):  # a bad source fails here, before any file is written
    from jrecipe.train import init_from
    exp = dataclasses.replace(exp, init_from_report=init_from.check(exp, config))
  with _bad_input("optimizer", None):
    exp.optimizer()  # validates optimizer/schedule fields now, before anything is written
  return exp


def build_data(config: ml_collections.ConfigDict):
  """The dataset a config names, for modes that need only the data (inspect, label).

  The same validation of the config's fields as `build`, then the same loader, so the data a
  person inspects or labels is exactly the data the model trains on.
  """
  validate.validate_config(config)
  return pipeline.load_dataset(config.data, seed=config.seed)


def validate_experiment(exp: Experiment) -> None:
  """Labels in [0, num_classes) in every split, and model outputs the loss can take.

  Public so that a caller who edits `exp` (another dataset's arrays, a swapped model) can
  re-run the checks `build` ran; see `jrecipe.validate.validate_experiment`.
  """
  validate.validate_experiment(exp)


@contextlib.contextmanager
def _bad_input(kind: str, section: Any):
  """Turns a factory's own exception (a bad field value for it) into a UserError.

  Why: factories receive whatever the config holds (a dict override can put a string where
  an int belongs); an AssertionError or TypeError from inside Flax then means 'this field
  value is invalid', and a traceback would hide which field. UserErrors pass unchanged.
  `section` is the config section shown in the message (None: name the sections only).
  """
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - see the docstring
    if section is None:
      where = "config.optimizer, config.schedule and config.momentum_schedule"
    else:
      fields = section.to_dict() if hasattr(section, "to_dict") else section
      where = f"config.{kind} = {fields!r}"
    raise UserError(f"Building the {kind} from {where} failed: "
                    f"{validate.describe_exception(e)}. Check the {kind}'s fields and their "
                    "values (and, for your own code, the factory).") from e
