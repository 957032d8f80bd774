"""The gradient check on a jrecipe Model and Loss, ReLU kinks from Linen, and the battery's
registered `gradient_check` (CS231n gradient checks, in a characteristic mode)."""

import contextlib
import inspect
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from jrecipe.checks.base import CheckResult
from jrecipe.checks.gradcheck.check import gradient_check
from jrecipe.checks.gradcheck.measure import float64, to_f64
from jrecipe.checks.registry import register_check
from jrecipe.models.dtype_fields import float64_layers
from jrecipe.train.step import l2_penalty


def _takes_train(module: nn.Module) -> bool:
  try:
    return "train" in inspect.signature(module.__call__).parameters
  except (TypeError, ValueError):
    return False


def relu_pattern(apply: Any, variables: Any, x: jax.Array, *, train: bool = False,
                 rngs: Optional[dict] = None) -> dict:
  """The sign pattern (> 0) of the output of every Linen module called by a model.

  Recipe step: CS231n gradient checks, "kinks": track the winners of each max. For a ReLU
  the winner is the sign of its input, i.e. of the preceding Dense/Conv/BatchNorm output;
  parameter values with the same pattern lie on the same linear piece. Use it as the
  `kink_fn` of `gradient_check`:
  `kink_fn=lambda p: relu_pattern(apply, {**variables, 'params': p}, x)`.

  Every Linen module's `__call__` output is recorded with `flax.linen.intercept_methods`
  while the model runs, so the model runs exactly as in the loss (same adapter, same
  dropout stream) and any apply built on Linen works, not only a bare module.

  Limits (pass your own `kink_fn` when they matter): only module outputs are seen, so a ReLU
  applied to a tensor that no module returns (after a residual addition, `x * 2`) is caught
  only through the module outputs that feed it; max-pooling winners (`nn.max_pool` is a
  function), hinge-loss margins and `abs` are not tracked; outputs of modules inside lifted
  transforms (nn.scan, nn.remat, nn.vmap, RNN cells) are skipped; sign flips of outputs
  that feed no ReLU (a tanh layer, the logits) count as kinks too, which only excuses the
  rare coordinate whose pre-activation crosses zero within +-h. NNX models are not seen.

  Args:
    apply: the model's pure apply `apply(variables, x, train=..., rngs=...)` (a
      `jrecipe.types.Model` or its `.apply` also work), or a bare Linen module (called
      with `train` when its `__call__` takes it; BatchNorm updates discarded).
    variables: the model's variables ({'params': ..., maybe 'batch_stats': ...}).
    x: the batch.
    train: the mode (the same as the loss being checked).
    rngs: rngs for train mode (the same dropout key as the loss being checked).

  Returns:
    {'<module path>:<k>': boolean array} for the k-th call of each module (jit-able).
  """
  names = getattr(apply, "axis_names", ())
  if names:  # record inside the axes the model binds, so its module outputs are visible
    from jrecipe.models.linen_adapter import bind_axes
    return bind_axes(lambda v, xx: _relu_pattern(apply, v, xx, train, rngs), names)(
        variables, x)
  return _relu_pattern(apply, variables, x, train, rngs)


def _relu_pattern(apply: Any, variables: Any, x: jax.Array, train: bool,
                  rngs: Optional[dict]) -> dict:
  """`relu_pattern` once the model's axis names are bound."""
  records = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      path = "/".join(str(p) for p in (getattr(context.module, "path", None) or ()))
      records.append((path or type(context.module).__name__, out))
    return out

  with nn.intercept_methods(interceptor):
    if isinstance(apply, nn.Module):
      kw = {"train": train} if _takes_train(apply) else {}
      mutable = [k for k in variables if k != "params"] if train else False
      result = apply.apply(variables, x, rngs=rngs, mutable=mutable, **kw)
    else:
      fn = apply.apply if callable(getattr(apply, "apply", None)) else apply
      result = fn(variables, x, train=train, rngs=rngs)
  # Values recorded inside a lifted transform (nn.scan, nn.remat, ...) belong to that
  # transform's trace, not ours: keep only values of the trace the model's output lives in.
  top = next(iter(jax.tree.leaves(result)), None)
  top_trace = getattr(top, "_trace", None) if isinstance(top, jax.core.Tracer) else None

  def visible(leaf):
    if not isinstance(leaf, jax.core.Tracer):
      return not isinstance(top, jax.core.Tracer)
    return top_trace is not None and getattr(leaf, "_trace", None) is top_trace

  pattern, counts = {}, {}
  for path, out in records:
    for leaf in jax.tree.leaves(out):
      if not (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)):
        continue
      if not visible(leaf):
        continue
      k = counts[path] = counts.get(path, -1) + 1
      pattern[f"{path}:{k}"] = leaf > 0
  return pattern


def gradient_check_model(model: Any, loss: Any, variables: Any, batch: dict, *, l2: float = 0.0,
                         rng: Optional[jax.Array] = None, h: float = 1e-5,
                         coords_per_leaf: int = 4, seed: int = 0,
                         kink_fn: Union[str, Callable, None] = "auto", max_examples: int = 8,
                         artifacts_dir: Optional[str] = None, raise_layers: bool = True,
                         **kwargs) -> CheckResult:
  """`gradient_check` for a jrecipe Model and Loss on (a few examples of) a batch.

  Recipe step: CS231n gradient checks, in a characteristic mode: call it after a short
  burn-in (the battery does), on few datapoints (at most `max_examples`), in train mode with
  randomness fixed (the same dropout key for f(x+h), f(x-h) and the analytic gradient),
  BatchNorm normalising with the batch statistics (as in training; the updated running
  statistics are discarded), data loss and L2 regularisation checked separately.

  Args:
    model: a `jrecipe.types.Model` (uses `apply_with_state` and, for kinks, `module`).
    loss: a `jrecipe.types.Loss`; the data loss is mean(loss.per_example(outputs, y)).
    variables: {'params': ..., maybe 'batch_stats': ...}.
    batch: {'x': inputs, 'y': labels} (other keys ignored).
    l2: the L2 strength; the regularisation loss l2 * l2_penalty(params) is checked when > 0.
    rng: the fixed dropout key (default jax.random.key(0)).
    h, coords_per_leaf: as in `gradient_check`.
    seed: seed of the coordinate sampling.
    kink_fn: 'auto' (`relu_pattern` through `model.apply` when the model wraps a Linen
      module, else none), None, or `kink_fn(params, x, y, state) -> pattern`.
    max_examples: examples of the batch used.
    artifacts_dir: where to write `gradient_check.png` (None: no files).
    raise_layers: trace the model under `jrecipe.models.dtype_fields.float64_layers`, so layers
      whose `dtype` field pins float32 or bfloat16 (Flax's ImageNet and LM1B examples)
      compute in float64 like the rest (said in the message); False: as written.
    **kwargs: passed to `gradient_check` (fail_above, warn_above, other_h, ...).

  Returns:
    The `gradient_check` CheckResult.
  """
  rngs = {"dropout": rng if rng is not None else jax.random.key(0)}
  x = jnp.asarray(batch["x"])[:max_examples]
  y = jnp.asarray(batch["y"])[:max_examples]
  state = {k: v for k, v in variables.items() if k != "params"}

  def data_loss(params, x, y, state):
    out, _ = model.apply_with_state({"params": params, **state}, x, True, rngs)
    return jnp.mean(loss.per_example(out, y))

  def reg_loss(params, x, y, state):
    del x, y, state
    return l2 * l2_penalty(params)

  if kink_fn == "auto":
    if isinstance(getattr(model, "module", None), nn.Module):
      def kink_fn(params, x, y, state):  # pylint: disable=function-redefined
        del y
        return relu_pattern(model, {"params": params, **state}, x, train=True, rngs=rngs)
    else:
      kink_fn = None
  with float64_layers() if raise_layers else contextlib.nullcontext(set()) as raised:
    result = gradient_check(data_loss, reg_loss if l2 else None, variables["params"], h=h,
                            coords_per_leaf=coords_per_leaf, rng=seed, kink_fn=kink_fn,
                            args=(x, y, state), artifacts_dir=artifacts_dir, **kwargs)
    low = result.details.get("loss_dtypes", {}).get("data", "float64") != "float64"
    if low:
      with float64():
        out = jax.eval_shape(
            lambda p, xx, st: model.apply_with_state({"params": p, **st}, xx, True, rngs)[0],
            to_f64(variables["params"]), to_f64(x), to_f64(state))
  if raised:
    result.message = result.message.rstrip(".") + (
        f"; the model pins a compute dtype below float64 ({', '.join(sorted(raised))}): "
        "checked with those fields set to float64, the same model and parameters otherwise.")
    result.details["raised_dtype_fields"] = sorted(raised)
  if low:
    dtypes = sorted({str(o.dtype) for o in jax.tree.leaves(out)})
    where = (f"the loss {getattr(loss, 'name', '')!r} casts the model's float64 outputs down "
             "(astype(float32) in per_example?)" if dtypes == ["float64"] else
             f"the model outputs {'/'.join(dtypes)} (dtype=float32 or astype(float32) in a layer?)")
    result.message += f"; {where}"
    result.details["output_dtypes"] = dtypes
  result.details["examples"] = int(x.shape[0])
  result.details["l2"] = float(l2)
  return result


@register_check("gradient_check", stage="gradients", needs=("loss_at_init",))
def check_gradient_check(ctx) -> CheckResult:
  """After the burn-in, train mode with the dropout key of the burn-in's next step."""
  from jrecipe.precision import full_precision
  burn = int(ctx.config.checks.gradcheck_burnin_steps)
  _, k_drop = ctx.step_keys(burn)
  model = full_precision(ctx.model)  # float64 whatever config.precision says
  result = gradient_check_model(
      model, ctx.loss, ctx.burned_in, {"x": ctx.x, "y": ctx.y}, l2=ctx.config.l2 or 1e-3,
      rng=k_drop, max_examples=int(ctx.config.checks.gradcheck_examples),
      artifacts_dir=ctx.artifacts_dir)
  if model is not ctx.model:
    result.message += (f"; precision={ctx.config.precision}: checked in float64 on the same "
                       "model without the 16-bit casts (the reference needs double precision)")
    result.details["precision"] = str(ctx.config.precision)
  return result
