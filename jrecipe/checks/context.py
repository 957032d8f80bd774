"""What every battery check sees: `CheckContext`, built once from an Experiment.

The context holds exactly the model, loss, data and optimizer the config trains, so a check
measures the run that trains; being built once, its objects (model, loss, optimizer) are
shared by every check, and so are the compiled steps keyed on them
(`jrecipe.train.trainer.cached_trainer`).
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jrecipe import optim
from jrecipe.train import step as step_lib
from jrecipe.train.trainer import seeds
from jrecipe.types import DataSpec, Loss, Model


def constant_rate_tx(exp) -> optax.GradientTransformation:
  """The configured optimizer at a constant rate: short check runs must not inherit a decay.

  L-BFGS (a line search per step) becomes Adam at 1e-3: the checks' short runs on random
  minibatches are not what a full-batch quasi-Newton method is for.
  """
  c = exp.config
  if c.optimizer.name == "lbfgs":
    opt = ml_collections.ConfigDict(c.optimizer.to_dict())
    opt.name, opt.learning_rate = "adam", 1e-3
  else:
    opt = c.optimizer
  sched = ml_collections.ConfigDict({"name": "constant", "unit": "steps"})
  mom = ml_collections.ConfigDict({"name": "constant"})
  return optim.make_optimizer(opt, sched, mom, steps_per_epoch=exp.steps_per_epoch,
                              total_steps=exp.total_steps)


@dataclasses.dataclass
class CheckContext:
  """The pieces every check shares.

  Attributes:
    config: the run's config (checks read `config.checks.*`, `seed`, `l2`, ...).
    model, loss, spec: the experiment's model, data loss and DataSpec.
    variables: initial variables as training starts ('init well' bias included).
    variables_plain: the same draw without the data-derived head bias.
    tx: the configured optimizer at a constant rate (`constant_rate_tx`).
    x, y: a sample of the training split (at least one batch, up to 256 examples).
    x_val, y_val: up to 512 validation examples (training ones without a validation split).
    steps: the short runs' budget (config.checks.budget_steps).
    batch_size: their batch size.
    augment: the experiment's `augment(x, rng) -> x`, or None.
    vocab: the vocabulary of token inputs (sequence tasks), else None.
    artifacts_dir: where checks write their pictures (None: no files).
    rngs: the run's named random streams ('init', 'train'; `jrecipe.train.trainer.seeds`).
    exp: the Experiment (None for a context built by hand, e.g. in tests).
  """

  config: Any
  model: Model
  loss: Loss
  spec: DataSpec
  variables: dict
  variables_plain: dict
  tx: optax.GradientTransformation
  x: np.ndarray
  y: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  steps: int
  batch_size: int
  augment: Optional[Callable] = None
  vocab: Optional[int] = None
  artifacts_dir: Optional[str] = None
  rngs: dict = dataclasses.field(default_factory=dict)
  exp: Any = None

  @classmethod
  def from_experiment(cls, exp, artifacts_dir: Optional[str] = None) -> "CheckContext":
    """The context of `exp` (from `jrecipe.experiment.build(config)`)."""
    c = exp.config
    rngs = seeds(c.seed)
    train = exp.data.arrays["train"]
    rs = np.random.default_rng(c.seed)
    n = min(len(train["y"]), max(c.batch_size, 256))
    idx = np.sort(rs.choice(len(train["y"]), size=n, replace=False))
    val = exp.data.arrays.get("validation", train)
    m = min(len(val["y"]), 512)
    spec = exp.spec
    return cls(
        config=c, model=exp.model, loss=exp.loss, spec=spec,
        variables=exp.init_variables(rngs["init"]),
        variables_plain=exp.init_variables(rngs["init"], init_bias=False),
        tx=constant_rate_tx(exp), x=train["x"][idx], y=train["y"][idx],
        x_val=val["x"][:m], y_val=val["y"][:m], steps=int(c.checks.budget_steps),
        batch_size=min(int(c.checks.batch_size) or c.batch_size, n),
        augment=exp.augment_fn(), vocab=spec.num_classes if spec.task == "sequence" else None,
        artifacts_dir=artifacts_dir, rngs=rngs, exp=exp)

  @property
  def seed(self) -> int:
    return int(self.config.seed)

  def step_keys(self, step: int) -> tuple[jax.Array, jax.Array]:
    """(augmentation key, dropout key) the train step uses at `step`."""
    return step_lib.step_rngs(self.rngs["train"], jnp.int32(step))

  @functools.cached_property
  def burned_in(self) -> dict:
    """Variables after a short burn-in: 'a characteristic mode, not at init' (CS231n).

    Dependencies and gradients are charted here rather than at init, where a zero-initialised
    head (a legitimate choice) would hide every dependency behind zero gradients.
    """
    from jrecipe.checks import fitting
    burn = int(self.config.checks.gradcheck_burnin_steps)
    if not burn:
      return self.variables
    trained, _ = fitting.fit(self.model, self.loss, self.variables, self.x, self.y, tx=self.tx,
                             steps=burn, rng=self.seed, batch_size=self.batch_size)
    return trained

  @functools.cached_property
  def probed(self) -> tuple[dict, str]:
    """(variables, note): where the checks that look at outputs 'at init' look.

    The initial variables, unless at init every example gets the same eval outputs (a
    zero-initialised head, big_vision's `head_zeroinit`, a legitimate choice, plus the 'init
    well' bias): that hides dropout, batch and input dependence alike, so `eval_mode`,
    `nonlinearity`, `logits_not_probabilities` and `dropout_varies` then measure the
    burned-in variables, and `note` (for their messages) says so.
    """
    burn = int(self.config.checks.gradcheck_burnin_steps)
    if not burn:
      return self.variables, ""
    try:
      out = self.model.apply(self.variables, jnp.asarray(self.x_val[:8]), False,
                             {"dropout": self.step_keys(0)[1]})
      leaves = [np.asarray(a, np.float64) for a in jax.tree.leaves(out)]
    except Exception:  # pylint: disable=broad-except  (eval_mode reports a failing eval)
      return self.variables, ""
    if not all(a.ndim and a.size and np.max(np.ptp(a, axis=0)) <= 1e-6 * max(
        1.0, float(np.max(np.abs(a)))) for a in leaves):
      return self.variables, ""
    return self.burned_in, (f"measured after the {burn}-step burn-in, since at init every "
                            "example gets the same outputs: a zero-initialised head")


def noted(result, note: str):
  """`result` with `note` (from `CheckContext.probed`) appended to its message."""
  if note:
    result.message = f"{result.message.rstrip('.')} ({note})."
    result.details["variables"] = "burned_in"
  return result

