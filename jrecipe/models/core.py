"""The model registry and the adapters that turn Linen or NNX modules into a `types.Model`.

Every model in jrecipe is used through three pure functions (`init`, `apply`,
`apply_with_state`; see `jrecipe.types.Model`), whatever Flax API it was written with.
`build_model` resolves a config's `model.name` (a registered name or a
'package.module:Name' import path), checks the config's other fields against the
factory's keyword arguments, and adapts what the factory returns.
"""

import dataclasses
import importlib
import inspect
import math
import sys
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from jrecipe.errors import UserError
from jrecipe.models import contract
from jrecipe.registry import Registry
from jrecipe.types import DataSpec, Model

MODELS = Registry("model")

# Factory arguments that come from jrecipe, not from the config.
_RESERVED = ("spec", "bn_axis_name")


def register_model(name: str, *, widen: Optional[Callable[[dict, float], dict]] = None,
                   widen_fields: tuple = ()) -> Callable:
  """Registers a model factory `factory(spec, bn_axis_name, **fields)` under `name`.

  Args:
    name: the name a config uses in `model.name`.
    widen: optional `widen(fields, factor) -> fields`: the config fields of a wider variant.
    widen_fields: shorthand for `widen`: these fields (ints, floats or tuples of ints) are
      multiplied by the factor.

  Returns:
    A decorator that registers the factory and returns it unchanged.
  """
  def deco(factory):
    if widen is not None:
      factory.widen_kwargs = widen
    elif widen_fields:
      factory.widen_kwargs = lambda kw, f: {
          **kw, **{k: scale_width(kw[k], f) for k in widen_fields}}
    return MODELS.register(name)(factory)
  return deco


def scale_width(value: Any, factor: float) -> Any:
  """Multiplies a width (int, float, or tuple/list of ints) by `factor`; ints stay ints >= 1."""
  if isinstance(value, (tuple, list)):
    return tuple(scale_width(v, factor) for v in value)
  if isinstance(value, bool):
    return value
  if isinstance(value, int):
    return max(1, int(round(value * factor)))
  return value * factor


def output_dim(spec: DataSpec) -> int:
  """The size of a model's last layer for `spec`.

  Classification and sequence tasks: `spec.num_classes` (the vocabulary for sequences).
  Regression: the product of `spec.target_shape` when the spec has one, otherwise
  `spec.num_classes` when it is set, otherwise 1 (a scalar target; the model outputs [B, 1]).
  """
  if spec.task in ("classification", "sequence"):
    if not spec.num_classes:
      raise UserError(f"Dataset {spec.name!r} is a {spec.task} task but has no num_classes.")
    return int(spec.num_classes)
  target_shape = getattr(spec, "target_shape", None)
  if target_shape is not None:
    return int(math.prod(target_shape))
  return int(spec.num_classes) if spec.num_classes else 1


def example_input(spec: DataSpec, batch: int = 2) -> jax.Array:
  """Zeros shaped like a batch of `spec`'s inputs: int32 tokens for 'sequence', else float32."""
  dtype = getattr(spec, "input_dtype", None)
  if dtype is None:
    dtype = jnp.int32 if spec.task == "sequence" else jnp.float32
  return jnp.zeros((batch,) + tuple(spec.input_shape), dtype)


def config_fields(config: Any, kind: str) -> tuple[str, dict]:
  """Splits a component config (ConfigDict, mapping or bare name) into (name, other fields)."""
  if isinstance(config, str):
    return config, {}
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise UserError(f"The {kind} config must be a ConfigDict with a 'name', got {config!r}.")
  fields = dict(config)
  name = fields.pop("name", None)
  if not name:
    raise UserError(f"The {kind} config has no 'name'; fields given: {sorted(fields)}.")
  return name, fields


def accepted_fields(factory: Callable, reserved: tuple = _RESERVED) -> Optional[dict]:
  """The factory's keyword fields and their defaults; None when it takes **kwargs."""
  try:
    params = inspect.signature(factory).parameters
  except (TypeError, ValueError):
    return None
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return None
  return {n: p.default for n, p in params.items()
          if n not in reserved and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_fields(name: str, factory: Callable, fields: dict, kind: str = "model",
                 reserved: tuple = _RESERVED) -> dict:
  """Raises a UserError naming the accepted fields when `fields` has one the factory lacks.

  Returns:
    The fields merged over the factory's defaults (what the factory will actually use).
  """
  accepted = accepted_fields(factory, reserved)
  if accepted is None:
    return dict(fields)
  unknown = sorted(set(fields) - set(accepted))
  if unknown:
    shown = ", ".join(f"{k}={v!r}" if v is not inspect.Parameter.empty else k
                      for k, v in accepted.items()) or "(none)"
    raise UserError(
        f"The {kind} {name!r} does not accept the field(s) {unknown}. "
        f"Accepted fields (with defaults): {shown}.")
  defaults = {k: v for k, v in accepted.items() if v is not inspect.Parameter.empty}
  return {**defaults, **fields}


def build_model(model_config: Any, spec: DataSpec, *, bn_axis_name: Optional[str] = None,
                precision: str = "float32") -> Model:
  """Builds the model a config names, adapted to jrecipe's pure-apply contract.

  Recipe step: "don't be a hero": pick a registered model you cannot get wrong ('linear',
  'mlp', 'cnn', 'resnet18', ...) before writing your own; your own plugs in the same way
  through an import path (the contract: docs/your_model.md).

  Args:
    model_config: a ConfigDict with `name` (a registered name or 'package.module:factory'),
      the factory's fields, passed as keyword arguments (so `--config.model.hidden=...`
      works), and the adapter fields jrecipe reads itself (`jrecipe.models.contract`). A
      bare name string is also accepted.
    spec: the dataset's `DataSpec`; it fixes the input shape and the output size
      (`output_dim`).
    bn_axis_name: the pmap axis name over which BatchNorm averages batch statistics, or None.
    precision: the config's `precision`: 'float32', or 'bfloat16' / 'float16' to compute in
      16 bits with float32 parameters (`jrecipe.precision.apply_policy`).

  Returns:
    A `jrecipe.types.Model`: its `head` is the path of the final layer's bias, its
    `widen(factor)` rebuilds the model with its width fields multiplied (None when the model
    has no width to scale).

  Raises:
    UserError: unknown name, a field the factory does not accept, or a factory result that
      is neither a Linen module, an NNX module nor a Model.
  """
  _register_builtin_models()
  name, fields = config_fields(model_config, "model")
  fields, adapter = contract.pop_adapter_fields(fields)
  factory = MODELS.get(name)
  if not callable(factory):
    raise UserError(f"The model {name!r} is not callable: a model factory must be "
                    "`factory(spec, **fields)` (see docs/your_model.md).")
  fields = contract.drop_inherited(name, factory, fields, adapter.get("inherited"))
  full_fields = check_fields(name, factory, fields, reserved=_RESERVED + ("rngs",))
  # Building probes the model once (shapes, the head): setup, not the loop, whose every copy
  # stays explicit even under jax.transfer_guard('disallow') (tests/test_parallel.py).
  with jax.transfer_guard("allow"):
    model = _adapt(name, factory, spec, bn_axis_name, fields, precision)
    model = _outputs_and_head(model, spec, adapter)
    model = _with_precision(model, spec, precision)
  widen_kwargs = getattr(factory, "widen_kwargs", None)
  scaled = contract.width_fields(adapter, factory)
  if scaled:
    widen_kwargs = contract.widen_from_fields(scaled)
  if widen_kwargs is not None and (model.widen is None or scaled):
    kept = {k: v for k, v in adapter.items() if k != "inherited"}

    def widen(factor: float) -> Model:
      wider = widen_kwargs(dict(full_fields), factor)
      return build_model({"name": name, **wider, **kept}, spec, bn_axis_name=bn_axis_name,
                         precision=precision)
    model = dataclasses.replace(model, widen=widen)
  return model


def _adapt(name: str, factory: Callable, spec: DataSpec, bn_axis_name: Optional[str],
           fields: dict, precision: str = "float32") -> Model:
  """What the factory returns (Linen, NNX, Model), or its NNX constructor, as a Model; under
  a 16-bit precision a Linen module's own float32 `dtype` field is set to it (Flax style)."""
  from jrecipe.models import linen_adapter, nnx_adapter
  params = inspect.signature(factory).parameters if callable(factory) else {}
  if "rngs" in params:  # an NNX constructor: each init draws from the run's key
    return nnx_adapter.from_nnx(
        lambda rngs: contract.call_factory(factory, spec, bn_axis_name, fields, rngs=rngs), name)
  out = contract.call_factory(factory, spec, bn_axis_name, fields)
  if isinstance(out, Model):
    return out if out.name != "model" else dataclasses.replace(out, name=name)
  if isinstance(out, nn.Module):
    if precision != "float32":
      from jrecipe import precision as precision_lib
      from jrecipe.models import dtype_fields
      out, set_ = dtype_fields.with_compute_dtype(out, precision_lib.compute_dtype(precision))
      if set_:
        precision_lib.log.info("model %r: %s set to %s for precision=%s (the field Flax's "
                               "examples set for half precision).", name, ", ".join(set_),
                               precision, precision)
    return linen_adapter.from_linen(out, name, example_input=example_input(spec),
                                    bind_unbound=True, bound_axes=(bn_axis_name,))
  if _is_nnx_module(out):
    def make(rngs):  # the factory again, its nnx.Rngs(<seed>) folded into the init key
      with nnx_adapter.seeded_rngs(rngs.params()):
        return contract.call_factory(factory, spec, bn_axis_name, fields)
    return nnx_adapter.from_nnx(make, name, built=out)
  raise UserError(f"The model factory {name!r} returned {type(out).__name__}; expected a "
                  "flax.linen.Module, a flax.nnx.Module or a jrecipe.types.Model.")


def _outputs_and_head(model: Model, spec: DataSpec, adapter: dict) -> Model:
  """The output selector / self-shift adapter where needed, and the head's bias path."""
  x = example_input(spec)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  # A dropout key even in eval mode: a model that (wrongly) drops out at eval is the battery's
  # eval_mode finding, not a reason to refuse the build.
  probe = jax.eval_shape(lambda v, k: model.apply(v, x, rngs={"dropout": k}), shapes,
                         jax.random.key(1))
  if contract.needs_wrap(probe, adapter):
    model = contract.wrap_outputs(model, output=adapter.get("output"),
                                  shifts_inputs=bool(adapter.get("shifts_inputs")))
  if model.head is not None:
    return model
  if contract.leaf(shapes.get("params", {}), ("head", "bias")) is not None:
    return dataclasses.replace(model, head=("head", "bias"))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  return dataclasses.replace(model, head=contract.find_head(model, variables, x))


def _with_precision(model: Model, spec: DataSpec, precision: str) -> Model:
  """The precision policy around `model`, with a warning if it hard-codes float32 layers."""
  from jrecipe import precision as precision_lib
  model = precision_lib.apply_policy(model, precision)
  if model.full_precision is not None:
    x = example_input(spec)
    precision_lib.check_policy(model, precision, jax.eval_shape(model.init, jax.random.key(0), x),
                               x)
  return model


def _register_builtin_models():
  importlib.import_module("jrecipe.models")


def fast_random(fn: Callable) -> Callable:
  """Traces `fn` with `jax.threefry_partitionable(False)`.

  Why: on this stack's CPU backend (jax 0.10.2, where partitionable is the default), XLA
  compile time grows superlinearly with the number of partitionable threefry draws of rank-4
  shapes such as conv kernels (several times slower to compile: docs/performance.md). Init
  and dropout masks draw many times, so the model's own draws use
  the non-partitionable threefry. The flag is read at trace time, so this also holds when a
  caller jits `init` or `apply`. Results are still a deterministic function of the key;
  they differ from the partitionable stream.
  """
  def wrapped(*args, **kwargs):
    with jax.threefry_partitionable(False):
      return fn(*args, **kwargs)
  wrapped.__name__ = getattr(fn, "__name__", "wrapped")
  wrapped.__doc__ = getattr(fn, "__doc__", None)
  return wrapped


def _is_nnx_module(obj) -> bool:
  """isinstance(obj, flax.nnx.Module) without importing flax.nnx (an NNX object implies it)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(obj, nnx.Module)


def check_rngs(name: str, train: bool, has_dropout: bool, rngs: Optional[dict]):
  """Raises a UserError when a model with dropout is applied in train mode without a key."""
  if train and has_dropout and not (rngs and "dropout" in rngs):
    raise UserError(
        f"The model {name!r} uses dropout, so apply(..., train=True) needs a dropout key: "
        "pass rngs={'dropout': key} (e.g. jax.random.fold_in(rng, step)).")


