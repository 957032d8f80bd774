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

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from jrecipe.errors import UserError
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


def build_model(model_config: Any, spec: DataSpec, *, bn_axis_name: Optional[str] = None) -> Model:
  """Builds the model a config names, adapted to jrecipe's pure-apply contract.

  Recipe step: "don't be a hero": pick a registered model you cannot get wrong ('linear',
  'mlp', 'cnn', 'resnet18', ...) before writing your own; your own plugs in the same way
  through an import path.

  Args:
    model_config: a ConfigDict with `name` (a registered name or 'package.module:factory')
      and the factory's fields, passed as keyword arguments (so `--config.model.hidden=...`
      works). A bare name string is also accepted.
    spec: the dataset's `DataSpec`; it fixes the input shape and the output size
      (`output_dim`).
    bn_axis_name: the pmap axis name over which BatchNorm averages batch statistics, or None.

  Returns:
    A `jrecipe.types.Model`. Its `widen(factor)` rebuilds the model with its width fields
    multiplied (None when the model has no width to scale).

  Raises:
    UserError: unknown name, a field the factory does not accept, or a factory result that
      is neither a Linen module, an NNX module nor a Model.
  """
  _register_builtin_models()
  name, fields = config_fields(model_config, "model")
  factory = MODELS.get(name)
  if not callable(factory):
    raise UserError(f"The model {name!r} is not callable: a model factory must be "
                    "`factory(spec, bn_axis_name, **fields)`.")
  full_fields = check_fields(name, factory, fields)
  out = factory(spec, bn_axis_name, **fields)
  if isinstance(out, Model):
    model = out if out.name != "model" else dataclasses.replace(out, name=name)
  elif isinstance(out, nn.Module):
    model = from_linen(out, name, example_input=example_input(spec))
  elif _is_nnx_module(out):
    model = from_nnx(out, name)
  else:
    raise UserError(f"The model factory {name!r} returned {type(out).__name__}; expected a "
                    "flax.linen.Module, a flax.nnx.Module or a jrecipe.types.Model.")
  widen_kwargs = getattr(factory, "widen_kwargs", None)
  if model.widen is None and widen_kwargs is not None:
    def widen(factor: float) -> Model:
      wider = widen_kwargs(dict(full_fields), factor)
      return build_model({"name": name, **wider}, spec, bn_axis_name=bn_axis_name)
    model = dataclasses.replace(model, widen=widen)
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


def _check_rngs(name: str, train: bool, has_dropout: bool, rngs: Optional[dict]):
  if train and has_dropout and not (rngs and "dropout" in rngs):
    raise UserError(
        f"The model {name!r} uses dropout, so apply(..., train=True) needs a dropout key: "
        "pass rngs={'dropout': key} (e.g. jax.random.fold_in(rng, step)).")


def _linen_takes_train(module: nn.Module) -> bool:
  try:
    return "train" in inspect.signature(module.__call__).parameters
  except (TypeError, ValueError):
    return False


def _guess_linen_dropout(module: nn.Module) -> bool:
  for f in dataclasses.fields(module):
    value = getattr(module, f.name, None)
    named_like_rate = "dropout" in f.name or f.name == "rate" or f.name.endswith("_rate")
    if named_like_rate and isinstance(value, (int, float)) and not isinstance(value, bool):
      if value > 0:
        return True
  return False


def from_linen(module: nn.Module, name: str, *, has_dropout: Optional[bool] = None,
               has_batchnorm: Optional[bool] = None, widen: Optional[Callable] = None,
               example_input: Optional[jax.Array] = None) -> Model:
  """Adapts a Linen module to the pure-apply `Model` contract.

  The module is called as `module(x, train=train)` when its `__call__` takes `train`, else
  `module(x)`. In train mode every non-'params' collection (e.g. 'batch_stats') is mutable:
  `apply` discards the update, `apply_with_state` returns it. `init` is jitted (eager Linen
  init costs seconds on this machine) and initialises in eval mode, so it needs no dropout key.
  Both trace their random draws with the non-partitionable threefry (see `fast_random`).

  Args:
    module: the Linen module; its last Dense should be named 'head' (where the training core
      sets the final bias from class priors or the target mean).
    name: registry name or import path, for messages.
    has_dropout: whether train mode draws from the 'dropout' rng. None: detected by tracing
      with `example_input` (shape only, no compute), or guessed from positive fields whose
      name contains 'dropout' or is 'rate' / '*_rate' when no example is given.
    has_batchnorm: whether the model keeps 'batch_stats'. None: detected from
      `example_input`, else False (apply still handles 'batch_stats' whenever present).
    widen: optional `widen(factor) -> Model`.
    example_input: an example batch (e.g. `example_input(spec)`) used only for detection.

  Returns:
    A `jrecipe.types.Model` with `module` set to `module`.
  """
  takes_train = _linen_takes_train(module)

  def mode(train):
    return {"train": train} if takes_train else {}

  if example_input is not None and (has_dropout is None or has_batchnorm is None):
    shapes = jax.eval_shape(lambda x: module.init({"params": jax.random.key(0)}, x, **mode(False)),
                            example_input)
    if has_batchnorm is None:
      has_batchnorm = "batch_stats" in shapes
    if has_dropout is None:
      mutable = [k for k in shapes if k != "params"] or False
      try:
        jax.eval_shape(lambda v, x: module.apply(v, x, rngs={}, mutable=mutable, **mode(True)),
                       shapes, example_input)
        has_dropout = False
      except flax.errors.InvalidRngError:
        has_dropout = True
  if has_dropout is None:
    has_dropout = _guess_linen_dropout(module)
  has_batchnorm = bool(has_batchnorm)

  @fast_random
  @jax.jit
  def init(rng, x):
    return dict(module.init({"params": rng}, x, **mode(False)))

  @fast_random
  def apply_with_state(variables, x, train=False, rngs=None):
    _check_rngs(name, train, has_dropout, rngs)
    mutable = [k for k in variables if k != "params"] if train else []
    if not mutable:
      return module.apply(variables, x, rngs=rngs, **mode(train)), {}
    out, state = module.apply(variables, x, rngs=rngs, mutable=mutable, **mode(train))
    return out, dict(state)

  def apply(variables, x, train=False, rngs=None):
    return apply_with_state(variables, x, train, rngs)[0]

  return Model(init=init, apply=apply, apply_with_state=apply_with_state, name=name,
               module=module, has_dropout=has_dropout, has_batchnorm=has_batchnorm, widen=widen)


def _is_nnx_module(obj) -> bool:
  """isinstance(obj, flax.nnx.Module) without importing flax.nnx (an NNX object implies it)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(obj, nnx.Module)


def _nnx_has_dropout(module) -> bool:
  from flax import nnx
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Dropout) and node.rate > 0:
      return True
    if isinstance(node, nnx.MultiHeadAttention) and (node.dropout_rate or 0) > 0:
      return True
  return False


def _copy_state(state):
  # A fresh State with fresh Variables, so merging and calling never mutates the template.
  return jax.tree.map(lambda v: v, state)


def _typed_key(key):
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


def _nnx_module(obj: Any, name: str) -> tuple[Any, Optional[Callable]]:
  """(a module instance, its constructor or None) from what `from_nnx` accepts."""
  from flax import nnx
  if isinstance(obj, nnx.Module):
    return obj, None
  if isinstance(obj, tuple) and len(obj) >= 2 and isinstance(obj[0], nnx.GraphDef):
    return nnx.merge(*obj), None
  if not callable(obj):
    raise UserError(f"from_nnx({name!r}) needs an nnx.Module, a (graphdef, state) pair or a "
                    f"constructor make(rngs); got {type(obj).__name__}.")
  with jax.threefry_partitionable(False):
    module = obj(nnx.Rngs(0))
  if not isinstance(module, nnx.Module):
    raise UserError(f"The NNX constructor for {name!r} returned {type(module).__name__}, "
                    "not an nnx.Module.")
  return module, obj


def _nnx_init(make: Optional[Callable], variables_of: Callable, fixed: dict) -> Callable:
  """`init(rng, x)`: copies of `fixed` (a built module), or fresh weights from `make`."""
  from flax import nnx
  if make is None:
    def init(rng, x):
      del rng, x
      return jax.tree.map(jnp.copy, fixed)
    return init

  @fast_random
  @jax.jit
  def init_fresh(rng, x):
    del x
    _, params, stats, _ = nnx.split(make(nnx.Rngs(rng)), nnx.Param, nnx.BatchStat, ...)
    return variables_of(params, stats)

  return init_fresh


def _reseed_streams(model, key) -> None:
  """Every RNG stream of a merged NNX model restarts from fold_in(key, its index)."""
  from flax import nnx
  i = 0
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.RngStream):
      node.key.set_value(jax.random.fold_in(key, i))
      node.count.set_value(jnp.zeros(node.count.get_value().shape, jnp.uint32))
      i += 1


def from_nnx(graphdef_and_state_or_module: Any, name: str, *,
             widen: Optional[Callable] = None) -> Model:
  """Adapts a Flax NNX module to the same pure-apply `Model` contract as Linen models.

  The module is split once into a graphdef and states (`nnx.split`); `apply` merges the
  graphdef with the given variables (`nnx.merge`), sets train/eval mode with
  `Module.train()`/`.eval()` (Dropout's `deterministic`, BatchNorm's
  `use_running_average`), reseeds every RNG stream of the merged copy from
  `rngs['dropout']`, calls it, and splits the updated BatchNorm statistics back out.

  Variables are pure dicts so that Linen and NNX models look the same to the training
  core: `{'params': <nnx.State of nnx.Param as a pure dict>}` plus `'batch_stats'` (the
  nnx.BatchStat state) when the module has any. Other state (RNG keys and counts) stays
  inside the adapter and is reseeded on every call.

  Args:
    graphdef_and_state_or_module: one of
      - an `nnx.Module` instance: `init(rng, x)` returns copies of its current weights
        (rng is ignored: the weights were drawn when you built it);
      - a `(graphdef, state)` pair from `nnx.split(module)`: same as the instance;
      - a constructor `make(rngs: nnx.Rngs) -> nnx.Module` (e.g. a functools.partial of your
        class): `init(rng, x)` builds a fresh module from `nnx.Rngs(rng)` under jit, so each
        seed draws new weights (what ensembles and seed checks need).
      Modules with dropout must create `nnx.Dropout(rate, rngs=rngs)` so the stream lives in
      the module. `x` in `init` is unused (NNX shapes are fixed at construction).
    name: registry name or import path, for messages.
    widen: optional `widen(factor) -> Model`.

  Returns:
    A `jrecipe.types.Model` with `module=None`.
  """
  from flax import nnx
  module, make = _nnx_module(graphdef_and_state_or_module, name)
  graphdef, params_t, stats_t, rest_t = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
  has_batchnorm = bool(jax.tree.leaves(stats_t))
  has_dropout = _nnx_has_dropout(module)
  if has_dropout and not any(isinstance(n, nnx.RngStream) for _, n in nnx.iter_graph(module)):
    raise UserError(f"The NNX model {name!r} has dropout but no RNG stream: build it with "
                    "nnx.Dropout(rate, rngs=rngs) so jrecipe can feed it dropout keys.")

  def variables_of(params, stats):
    variables = {"params": nnx.to_pure_dict(params)}
    if has_batchnorm:
      variables["batch_stats"] = nnx.to_pure_dict(stats)
    return variables

  init = _nnx_init(make, variables_of, variables_of(params_t, stats_t))

  @fast_random
  def apply_with_state(variables, x, train=False, rngs=None):
    _check_rngs(name, train, has_dropout, rngs)
    params = _copy_state(params_t)
    nnx.replace_by_pure_dict(params, variables["params"])
    stats = _copy_state(stats_t)
    if has_batchnorm:
      nnx.replace_by_pure_dict(stats, variables["batch_stats"])
    model = nnx.merge(graphdef, params, stats, _copy_state(rest_t))
    if train:
      model.train()
    else:
      model.eval()
    if train and rngs and "dropout" in rngs:
      _reseed_streams(model, _typed_key(rngs["dropout"]))
    out = model(x)
    if not (train and has_batchnorm):
      return out, {}
    _, _, new_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return out, {"batch_stats": nnx.to_pure_dict(new_stats)}

  def apply(variables, x, train=False, rngs=None):
    return apply_with_state(variables, x, train, rngs)[0]

  return Model(init=init, apply=apply, apply_with_state=apply_with_state, name=name,
               module=None, has_dropout=has_dropout, has_batchnorm=has_batchnorm, widen=widen)
