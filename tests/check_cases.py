"""One planted bug and one correct twin for every registered check: the table the suite enforces.

`CASES[name] = (bug, twin)`: each a function of the shared `Kit` returning the check's
CheckResult; tests/test_check_registry.py asserts that the keys are exactly the registry's
names, that every bug FAILS and that every twin PASSES. A check is run through its registered
function on a `CheckContext` (with the planted model swapped in) wherever the context can
hold the bug; checks that read the Experiment itself (its pipeline, its schedule, its seeded
Trainer) or whose bug lives in their arguments are called directly on small arrays.

The planted models are tests/planted.py's (`_MLP` with switches, `_BadVjpMLP`,
`_OffByOneCausal`): the same bugs the battery tests on whole configs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jrecipe.checks import registry
from jrecipe.checks.context import CheckContext
from jrecipe.checks.data import data_before_net, split_leakage
from jrecipe.checks.splits import splits_match
from jrecipe.checks.dependencies import causal_dependency
from jrecipe.checks.determinism import seed_determinism
from jrecipe.checks.fitting import fit
from jrecipe.checks.init import copy_head_bias, init_bias
from jrecipe.checks.regularization import regularization_increases_loss
from jrecipe.checks.schedule import lr_schedule
from jrecipe.types import DataSpec
from tests import planted

N = 256
_MLP = planted._MLP  # pylint: disable=protected-access
SPEC = DataSpec(name="digits", task="classification", input_shape=(8, 8, 1), num_classes=10,
                class_names=None, value_range=(0.0, 16.0), splits={"train": N})


def mlp(**bug):
  """tests.planted's MLP (dropout 0.5 in train mode) as a Model, with one planted bug."""
  return planted.linen_model(_MLP(10, **bug), has_dropout=True)


@dataclasses.dataclass
class Kit:
  """What every case shares: one context on 256 digits, and its pieces."""

  ctx: CheckContext
  x: np.ndarray
  y: np.ndarray

  def run(self, name: str, **changes):
    """The registered check `name` on the shared context with `changes` planted."""
    return registry.get(name).fn(dataclasses.replace(self.ctx, **changes))


def make_kit() -> Kit:
  """The shared context (built once per test module: compiled steps are keyed on its objects)."""
  from sklearn.datasets import load_digits
  d = load_digits()
  idx = np.random.RandomState(0).permutation(len(d.target))
  x = d.images[idx].astype(np.float32)[..., None] / 16.0
  x = (x - x.mean()) / x.std()
  y = d.target[idx].astype(np.int32)
  wide = lambda f: planted.linen_model(_MLP(10, hidden=int(32 * f)), has_dropout=True)
  model = planted.linen_model(_MLP(10), has_dropout=True, widen=wide)
  variables = model.init(jax.random.PRNGKey(0), x[:2])
  config = ml_collections.ConfigDict({
      "seed": 0, "l2": 0.0, "batch_size": 64,
      "checks": {"overfit_examples": 10, "overfit_steps": 150, "gradcheck_burnin_steps": 0,
                 "gradcheck_examples": 8}})
  ctx = CheckContext(config=config, model=model, loss=planted.xent_loss(), spec=SPEC,
                     variables=variables, variables_plain=variables, tx=optax.adam(1e-2),
                     x=x[:N], y=y[:N], x_val=x[N:2 * N], y_val=y[N:2 * N], steps=30,
                     batch_size=64, rngs={"init": jax.random.PRNGKey(1),
                                          "train": jax.random.PRNGKey(2)})
  return Kit(ctx, x[:N], y[:N])


# ---------------------------------------------------------------- the cases

def _scaled_kernels(variables, factor):
  return {**variables, "params": jax.tree_util.tree_map_with_path(
      lambda p, a: a * factor if "kernel" in jax.tree_util.keystr(p) else a,
      variables["params"])}


def _imbalanced(kit, reverse_priors: bool):
  """init_bias on 90/10 labels, the head bias set to the log priors (or their reverse)."""
  rs = np.random.RandomState(1)
  x = rs.randn(N, 8, 8, 1).astype(np.float32)
  y = (rs.rand(N) < 0.1).astype(np.int32)
  model = planted.linen_model(_MLP(2))
  v = model.init(jax.random.PRNGKey(0), x[:2])
  freq = np.bincount(y, minlength=2) / len(y)
  bias = np.log(freq) - np.log(freq).mean()
  v_with = copy_head_bias(v, -bias if reverse_priors else bias)
  return init_bias(model, kit.ctx.loss, v, v_with, x, y, num_classes=2)


def _train_fn(kit, unseeded_noise: bool):
  """seed_determinism's train_fn: 5 steps from the seed's init (plus unseeded noise)."""
  ctx = kit.ctx

  def run(seed):
    v = ctx.model.init(jax.random.PRNGKey(seed), kit.x[:2])
    v, _ = fit(ctx.model, ctx.loss, v, kit.x, kit.y, tx=ctx.tx, steps=5, rng=seed)
    if unseeded_noise:  # the planted bug: a random source outside the seed
      noise = np.random.default_rng()
      return jax.tree.map(lambda a: a + noise.normal(size=a.shape).astype(a.dtype) * 1e-3,
                          v["params"])
    return v["params"]

  return seed_determinism(run, seed=0)


def _causal(off_by_one: bool):
  """One self-attention layer over 6 tokens; the planted mask lets position t see t+1."""
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 8, (4, 6)), jnp.int32)
  module = planted._OffByOneCausal(8, off_by_one=off_by_one)  # pylint: disable=protected-access
  variables = module.init(jax.random.PRNGKey(0), tokens)
  apply = lambda v, x, train=False, rngs=None: module.apply(v, x, train=train, rngs=rngs)
  return causal_dependency(apply, variables, tokens, time_axis=1, sees_current=True,
                           vocab_size=8)


def _gradient_check_bug(kit):
  model = planted.linen_model(planted._BadVjpMLP(10))  # pylint: disable=protected-access
  return kit.run("gradient_check", model=model,
                 variables=model.init(jax.random.PRNGKey(0), kit.x[:2]))


def _schedule(decay_rate: float):
  """360 steps of 36 per epoch; a decay of `decay_rate` per step reaches ~0 within 10%."""
  fn = optax.exponential_decay(1e-3, transition_steps=1, decay_rate=decay_rate)
  return lr_schedule(fn, total_steps=360, steps_per_epoch=36, peak=1e-3)


def _crop(pad=1, hflip=False, fixed_key=False):
  """jrecipe's augmentation (crop of `pad` pixels, optional flip); fixed_key plants a key that
  never changes."""
  from jrecipe.data.augmentation import augment
  cfg = {"random_crop": pad, "hflip": hflip}
  if fixed_key:
    return lambda x, rng: augment(x, jax.random.PRNGKey(0), cfg)
  return lambda x, rng: augment(x, rng, cfg)


def _state_updates(kit, drop_state: bool):
  model = planted.linen_bn_model(planted._BNMLP(10), drop_state=drop_state)  # pylint: disable=protected-access
  return kit.run("state_updates", model=model,
                 variables=model.init(jax.random.PRNGKey(0), kit.x[:2]))


def _nonlinearity(kit, bug):
  from jrecipe.zoo.models import LinenMLP
  model = planted.linen_model(LinenMLP(10, bug=bug), has_dropout=True)
  return kit.run("nonlinearity", model=model,
                 variables=model.init(jax.random.PRNGKey(0), kit.x[:2]))


_KERNELS = lambda p: jax.tree.map(lambda a: a.ndim > 1, p)


def _optimizer_probe(kit, name, tx):
  """effective_schedule / weight_decay on the kit's parameters over a 360-step run."""
  from jrecipe.checks import optimizer as opt_checks
  kw = {"steps_per_epoch": 36} if name == "effective_schedule" else {}
  return getattr(opt_checks, name)(tx, kit.ctx.variables["params"], total_steps=360, **kw)

CASES = {
    "data_before_net": (
        lambda kit: data_before_net(kit.x, kit.y + 1, spec=SPEC),  # 1-based labels
        lambda kit: data_before_net(kit.x, kit.y, spec=SPEC)),
    "split_leakage": (  # 20 test examples concatenated into train
        lambda kit: split_leakage({"train": {"x": np.concatenate([kit.x[:200], kit.x[200:220]])},
                                   "test": {"x": kit.x[200:]}}),
        lambda kit: split_leakage({"train": {"x": kit.x[:200]}, "test": {"x": kit.x[200:]}})),
    "splits_match": (  # the test images read transposed
        lambda kit: splits_match({"train": {"x": kit.x[:160], "y": kit.y[:160]},
                                  "test": {"x": kit.x[160:].transpose(0, 2, 1, 3),
                                           "y": kit.y[160:]}}, spec=SPEC),
        lambda kit: splits_match({"train": {"x": kit.x[:160], "y": kit.y[:160]},
                                  "test": {"x": kit.x[160:], "y": kit.y[160:]}}, spec=SPEC)),
    "seed_determinism": (
        lambda kit: _train_fn(kit, unseeded_noise=True),
        lambda kit: _train_fn(kit, unseeded_noise=False)),
    "loss_at_init": (
        lambda kit: kit.run("loss_at_init",
                            variables=_scaled_kernels(kit.ctx.variables, 100.0)),
        lambda kit: kit.run("loss_at_init")),
    "init_bias": (
        lambda kit: _imbalanced(kit, reverse_priors=True),
        lambda kit: _imbalanced(kit, reverse_priors=False)),
    "logits_not_probabilities": (
        lambda kit: kit.run("logits_not_probabilities", model=mlp(softmax_out=True)),
        lambda kit: kit.run("logits_not_probabilities")),
    "nonlinearity": (  # no activation between the zoo MLP's Dense layers
        lambda kit: _nonlinearity(kit, "missing_nonlinearity"),
        lambda kit: _nonlinearity(kit, "")),
    "input_independent_baseline": (
        lambda kit: kit.run("input_independent_baseline", model=mlp(zero_input=True)),
        lambda kit: kit.run("input_independent_baseline")),
    "overfit_one_batch": (
        lambda kit: kit.run("overfit_one_batch", model=mlp(detach_output=True)),
        lambda kit: kit.run("overfit_one_batch")),
    "capacity_decreases_loss": (
        lambda kit: kit.run("capacity_decreases_loss", model=mlp(detach_output=True)),
        lambda kit: kit.run("capacity_decreases_loss")),
    "regularization_increases_loss": (  # the penalty's sign flipped
        lambda kit: regularization_increases_loss(
            kit.ctx.model, kit.ctx.loss, kit.ctx.variables, kit.x, kit.y,
            strengths=(0.0, -1e-3, -1e-1)),
        lambda kit: kit.run("regularization_increases_loss")),
    "batch_independence": (
        lambda kit: kit.run("batch_independence", model=mlp(mix_batch=True)),
        lambda kit: kit.run("batch_independence")),
    "causal_dependency": (
        lambda kit: _causal(off_by_one=True),
        lambda kit: _causal(off_by_one=False)),
    "gradient_check": (
        _gradient_check_bug,
        lambda kit: kit.run("gradient_check")),
    "eval_mode": (
        lambda kit: kit.run("eval_mode", model=mlp(dropout_in_eval=True)),
        lambda kit: kit.run("eval_mode")),
    "lr_schedule": (
        lambda kit: _schedule(decay_rate=0.5),
        lambda kit: _schedule(decay_rate=1.0)),
    "dropout_varies": (
        lambda kit: kit.run("dropout_varies", model=mlp(fixed_dropout_key=True)),
        lambda kit: kit.run("dropout_varies")),
    "augmentation_varies": (
        lambda kit: kit.run("augmentation_varies", augment=_crop(fixed_key=True)),
        lambda kit: kit.run("augmentation_varies", augment=_crop())),
    "augmentation_keeps_labels": (  # a horizontal flip of digits against a 1-pixel crop
        lambda kit: kit.run("augmentation_keeps_labels", augment=_crop(pad=0, hflip=True)),
        lambda kit: kit.run("augmentation_keeps_labels", augment=_crop())),
    "state_updates": (
        lambda kit: _state_updates(kit, drop_state=True),
        lambda kit: _state_updates(kit, drop_state=False)),
    "effective_schedule": (  # a decay inside the user's own optimizer, gone within 10%
        lambda kit: _optimizer_probe(kit, "effective_schedule", optax.adam(
            optax.exponential_decay(1e-3, transition_steps=1, decay_rate=0.5))),
        lambda kit: _optimizer_probe(kit, "effective_schedule", optax.adam(1e-3))),
    "weight_decay": (  # a decay of the wrong sign against AdamW on the weight matrices only
        lambda kit: _optimizer_probe(kit, "weight_decay",
                                     optax.adamw(1e-3, weight_decay=-0.1)),
        lambda kit: _optimizer_probe(kit, "weight_decay", optax.adamw(
            1e-3, weight_decay=1e-2, mask=_KERNELS))),
}

# Checks whose correct twin is legitimately inapplicable here ('skip' accepted), with why.
TWIN_MAY_SKIP: dict = {}
