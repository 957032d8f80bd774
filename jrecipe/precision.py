"""Mixed precision: `--config.precision=bfloat16` (or 'float16', or the default 'float32').

The policy every serious accelerator run uses, applied to any model through the model
contract (docs/performance.md, 'Mixed precision'):

- parameters, optimizer state, batch statistics and the EMA stay float32 (the train state is
  the same pytree whatever the precision, so checkpoints, init_from and the monitor see
  float32 arrays);
- at apply time the floating parameters ('params' only) and floating inputs are cast to the
  compute dtype, so every layer that follows its inputs' dtype (Flax's default `dtype=None`
  in Linen and NNX, `jnp` code) runs its activations and matrix products in it; gradients
  flow back through the casts into float32;
- the model's floating outputs are cast back to float32, so the loss, the metrics and the
  evaluation sums are float32;
- 'float16' adds dynamic loss scaling (`dynamic_loss_scale`): float16's range (max 65504,
  smallest normal 6e-5) overflows or flushes gradients without it; bfloat16 has float32's
  range and needs none.

A model that hard-codes float32 (`nn.Dense(..., dtype=jnp.float32)`, `x.astype(jnp.float32)`)
keeps those layers in float32: `build_model` traces the model once and logs a warning naming
how many of its matrix products stay float32 (`matmul_dtypes`). Such a model should leave
`dtype` at None (follow the input) or read its dtype from its inputs. A Linen model's own
top-level float32 `dtype` field (Flax's examples thread it to every layer, and set it for half
precision) is set to the compute dtype by `build_model` (`models.dtype_fields.with_compute_dtype`).

Recipe stage 6 ('squeeze out the juice'): the same model, trained faster on the same
hardware; the gradient check (stage 2's CS231n check) still runs its float64 reference on the
full-precision model (`full_precision`).
"""

import dataclasses
import logging
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jrecipe.errors import UserError
from jrecipe.types import Model

PRECISIONS = ("float32", "bfloat16", "float16")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision Training"; the schedule of
# jmp.DynamicLossScale and torch.amp.GradScaler): start at 2**15, halve on an overflow step
# (which is skipped), double after this many finite steps in a row; never below 1.
LOSS_SCALE_INIT = 2.0 ** 15
LOSS_SCALE_PERIOD = 2000
LOSS_SCALE_FACTOR = 2.0
LOSS_SCALE_MIN = 1.0

log = logging.getLogger("jrecipe")


def compute_dtype(precision: str):
  """The jnp dtype of a `precision` name; a UserError names the valid ones."""
  if precision not in _DTYPES:
    raise UserError(f"precision={precision!r} is not a precision jrecipe knows: use one of "
                    f"{', '.join(PRECISIONS)} ('float32', the default, computes everything in "
                    "float32; the others keep parameters in float32 and compute in 16 bits).")
  return _DTYPES[precision]


def _cast_floating(tree: Any, dtype) -> Any:
  def cast(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
      return jnp.asarray(x).astype(dtype)
    return x
  return jax.tree.map(cast, tree)


def _like(tree: Any, reference: Any) -> Any:
  """`tree` with each floating leaf cast to the dtype of the same leaf of `reference`."""
  try:
    return jax.tree.map(lambda x, r: x.astype(r.dtype) if jnp.issubdtype(
        jnp.result_type(x), jnp.floating) and x.dtype != r.dtype else x, tree, reference)
  except ValueError:  # a new collection the reference lacks: leave it as computed
    return tree


def apply_policy(model: Model, precision: str) -> Model:
  """`model` computing in `precision` under the policy of the module docstring.

  Args:
    model: a `jrecipe.types.Model` (jrecipe's own, or a user's Linen / NNX model adapted).
    precision: 'float32' (returns `model` unchanged), 'bfloat16' or 'float16'.

  Returns:
    A Model with the same `init` (float32 parameters) whose `apply` and
    `apply_with_state` cast parameters and inputs down and outputs back to float32; its
    `full_precision` is `model`.
  """
  dtype = compute_dtype(precision)
  if dtype == jnp.float32:
    return model
  inner = model.apply_with_state

  def apply_with_state(variables, x, train=False, rngs=None):
    low = {**variables, "params": _cast_floating(variables["params"], dtype)}
    out, new_state = inner(low, _cast_floating(x, dtype), train, rngs)
    kept = {k: v for k, v in variables.items() if k != "params"}
    return _cast_floating(out, jnp.float32), _like(new_state, kept)

  def apply(variables, x, train=False, rngs=None):
    return apply_with_state(variables, x, train, rngs)[0]

  return dataclasses.replace(model, apply=apply, apply_with_state=apply_with_state,
                             full_precision=model)


def full_precision(model: Model) -> Model:
  """The float32 model under a mixed-precision one (the model itself when it is float32)."""
  return getattr(model, "full_precision", None) or model


def matmul_dtypes(model: Model, variables: Any, x: Any) -> dict:
  """{dtype name: count} of the model's matrix products and convolutions in eval mode.

  Traced, not run (`jax.make_jaxpr`): what XLA is asked to compute, including products
  inside scans, conds and custom rules. The probe behind the warning of `check_policy` and
  the tests that activations really are bfloat16.
  """
  closed = jax.make_jaxpr(lambda v, xx: model.apply(v, xx))(variables, x)
  counts: dict = {}
  _count_products(closed.jaxpr, counts)
  return counts


def _count_products(jaxpr, counts: dict) -> None:
  # The gradient check's walk over nested jaxprs, counting instead of collecting.
  from jrecipe.checks.gradcheck.measure import _COMPUTE_OPS, _sub_jaxprs
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _COMPUTE_OPS:
      for v in eqn.outvars:
        counts[str(v.aval.dtype)] = counts.get(str(v.aval.dtype), 0) + 1
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        _count_products(sub, counts)


def check_policy(model: Model, precision: str, variables: Any, x: Any) -> dict:
  """Logs a warning when a model computes some of its products above `precision`.

  Returns `matmul_dtypes` (empty for float32, which is not probed).
  """
  if compute_dtype(precision) == jnp.float32:
    return {}
  counts = matmul_dtypes(model, variables, x)
  above = {d: n for d, n in counts.items() if d != precision}
  if above:
    total = sum(counts.values())
    log.warning(
        "precision=%s: model %r computes %d of its %d matrix products/convolutions in %s. "
        "A layer with a hard-coded dtype (nn.Dense(..., dtype=jnp.float32)) or an "
        "astype(float32) inside the model keeps them there: leave dtype at None (follow the "
        "input) so the policy applies (docs/performance.md, 'Mixed precision').", precision,
        model.name, sum(above.values()), total, "/".join(sorted(above)))
  return counts


# --- float16: dynamic loss scaling --------------------------------------------------------

class LossScaleState(NamedTuple):
  """The optimizer state of `dynamic_loss_scale`: the scale, its finite-step count, the inner
  optimizer's state."""

  scale: jax.Array
  good_steps: jax.Array
  inner: Any


def dynamic_loss_scale(tx: optax.GradientTransformation, *, init_scale: float = LOSS_SCALE_INIT,
                       period: int = LOSS_SCALE_PERIOD) -> optax.GradientTransformationExtraArgs:
  """`tx` with a dynamic loss scale kept in its state (float16 training).

  The train step (jrecipe.train.step) reads the scale (`loss_scale`), multiplies the loss by
  it before differentiating and divides the gradients by it. This transformation's `update`
  runs only on finite steps: it applies `tx` and doubles the scale after `period` finite
  steps in a row. An overflow step (non-finite gradients while the scale is above 1) is
  skipped by the step, which halves the scale (`on_overflow`); it is not a divergence.
  """
  def init(params):
    return LossScaleState(jnp.asarray(init_scale, jnp.float32), jnp.zeros((), jnp.int32),
                          tx.init(params))

  def update(updates, state, params=None, **extra):
    if isinstance(tx, optax.GradientTransformationExtraArgs):
      updates, inner = tx.update(updates, state.inner, params, **extra)
    else:
      updates, inner = tx.update(updates, state.inner, params)
    good = state.good_steps + 1
    grow = good >= period
    scale = jnp.where(grow, state.scale * LOSS_SCALE_FACTOR, state.scale)
    return updates, LossScaleState(scale, jnp.where(grow, 0, good), inner)

  return optax.GradientTransformationExtraArgs(init, update)


def loss_scale(opt_state: Any) -> Optional[jax.Array]:
  """The dynamic loss scale of an optimizer state, or None when it has none."""
  return opt_state.scale if isinstance(opt_state, LossScaleState) else None


def on_overflow(opt_state: LossScaleState) -> LossScaleState:
  """The state after an overflow step: the scale halved (not below 1), the count reset."""
  return opt_state._replace(
      scale=jnp.maximum(opt_state.scale / LOSS_SCALE_FACTOR, LOSS_SCALE_MIN),
      good_steps=jnp.zeros((), jnp.int32))


def wrap_optimizer(tx: optax.GradientTransformation, precision: str):
  """`tx` with dynamic loss scaling for 'float16'; `tx` itself otherwise."""
  return dynamic_loss_scale(tx) if compute_dtype(precision) == jnp.float16 else tx
