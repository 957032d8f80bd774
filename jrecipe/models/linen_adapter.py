"""A Flax Linen module as a `jrecipe.types.Model`: init, pure apply, and the styles it adapts.

Adapted without asking the user to change the module (docs/your_model.md):
  * `train`: passed when `__call__` takes it; every non-'params' collection is mutable in
    train mode ('batch_stats').
  * boxed parameters (`nn.with_logical_partitioning`, `nn.Partitioned`, the LM1B / WMT
    style): `init` returns them unboxed (`nn.meta.unbox`), so every reader of the parameters
    (optimizer, monitor, checks, checkpoints) sees plain arrays.
  * a BatchNorm with a hard-coded `axis_name` (Flax's ImageNet example: 'batch'): a name the
    run does not bind (one device, or a device mesh where jit already sees the global batch)
    is bound to a size-1 `jax.vmap` axis around the call, so `pmean` over it is the identity
    and the statistics are those of the whole batch the call sees. Under `parallel.mode=pmap`
    jrecipe's own device axis is named 'batch' (jrecipe.train.parallel.AXIS) and is left
    alone, so the statistics are averaged over devices as the module intends.
"""

import dataclasses
import inspect
import re
from typing import Callable, Optional

import flax
import jax
from flax import linen as nn

from jrecipe.errors import UserError
from jrecipe.models.core import check_rngs, fast_random
from jrecipe.types import Model

_UNBOUND = re.compile(r"unbound axis name: ([A-Za-z_][\w]*)")
_MAX_AXES = 4  # more hard-coded axis names than this is not a BatchNorm: let the error show


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


def _is_bound(name: str) -> bool:
  try:
    jax.lax.axis_index(name)
    return True
  except NameError:
    return False


def bind_axes(fn: Callable, names: tuple) -> Callable:
  """`fn(variables, x, *rest)` with each axis name in `names` bound by a size-1 vmap over x.

  Why: a collective over a named axis (BatchNorm's `pmean`) needs the name bound; over a
  vmap axis of size 1 it is the identity, so the call computes what it computes unbound.
  Names already bound where it is traced (a caller bound them around it) stay as they are.
  """
  if not names:
    return fn

  def bound(variables, x, *rest):
    inner = fn
    todo = tuple(n for n in names if not _is_bound(n))
    for name in todo:
      inner = jax.vmap(inner, in_axes=(None, 0) + (None,) * len(rest), axis_name=name)
      x = x[None]
    out = inner(variables, x, *rest)
    for _ in todo:
      out = jax.tree.map(lambda a: a[0], out)
    return out

  return bound


def unbound_axes(trace: Callable, bound: tuple = ()) -> tuple:
  """The axis names `trace(extra_names)` fails on as unbound, found by tracing (no compute).

  Args:
    trace: `trace(names)` evaluates the model abstractly with `names` bound (`bind_axes`).
    bound: names the run binds itself (its pmap axis): never rebound here.

  Returns:
    The names to bind, in the order they were met ((): none).
  """
  names: tuple = ()
  for _ in range(_MAX_AXES):
    try:
      trace(names)
      return names
    except NameError as e:
      m = _UNBOUND.search(str(e))
      if m is None or m.group(1) in names or m.group(1) in bound:
        raise
      names += (m.group(1),)
  return names


def _init_fn(module, mode) -> Callable:
  """`init(rng, x) -> variables` in eval mode, parameters unboxed."""
  return lambda rng, x: dict(nn.meta.unbox(module.init({"params": rng}, x, **mode(False))))


def _detect(module, name, mode, example_input, has_dropout, has_batchnorm, bind_unbound,
            bound):
  """(has_dropout, has_batchnorm, axis names to bind) by abstract evaluation.

  The names are looked for in a train-mode and an eval-mode call: a BatchNorm that
  normalises with the batch in eval mode (`use_running_average=train`, inverted) meets its
  `axis_name` in eval mode only (Flax leaves it out at init), and `eval_mode` then measures
  the dependence, instead of the model failing to build.
  """
  init = _init_fn(module, mode)

  def trace(names, rngs):
    shapes = jax.eval_shape(bind_axes(init, names), jax.random.key(0), example_input)
    mutable = [k for k in shapes if k != "params"] or False

    def train_call(v, x, rngs):
      return module.apply(v, x, rngs=rngs, mutable=mutable, **mode(True))

    def eval_call(v, x):  # a dropout key even here: dropout at eval is eval_mode's finding
      return module.apply(v, x, rngs={"dropout": jax.random.key(1)}, **mode(False))

    jax.eval_shape(bind_axes(train_call, names), shapes, example_input, rngs)
    try:
      jax.eval_shape(bind_axes(eval_call, names), shapes, example_input)
    except flax.errors.ModifyScopeVariableError as e:
      raise UserError(
          f"The model {name!r} changes its state in eval mode (train=False): "
          f"{' '.join(str(e).split('(https')[0].split())} jrecipe evaluates (and the battery "
          "checks) with the state read-only, so in eval mode a BatchNorm must normalise with "
          "its running averages: `use_running_average=not train` as in Flax's examples, not "
          "`use_running_average=train` (inverted) or a constant False."
      ) from None
    return shapes

  names = ()
  if bind_unbound:
    names = unbound_axes(lambda n: trace(n, {"dropout": jax.random.key(0)}), bound)
  if has_batchnorm is None:
    has_batchnorm = "batch_stats" in jax.eval_shape(bind_axes(init, names), jax.random.key(0),
                                                    example_input)
  if has_dropout is None:
    try:
      trace(names, {})
      has_dropout = False
    except flax.errors.InvalidRngError:
      has_dropout = True
  return has_dropout, has_batchnorm, names


def from_linen(module: nn.Module, name: str, *, has_dropout: Optional[bool] = None,
               has_batchnorm: Optional[bool] = None, widen: Optional[Callable] = None,
               example_input: Optional[jax.Array] = None, bind_unbound: bool = False,
               bound_axes: tuple = ()) -> Model:
  """Adapts a Linen module to the pure-apply `Model` contract.

  The module is called as `module(x, train=train)` when its `__call__` takes `train`, else
  `module(x)`. In train mode every non-'params' collection (e.g. 'batch_stats') is mutable:
  `apply` discards the update, `apply_with_state` returns it. `init` is jitted (eager Linen
  init costs seconds on this machine), initialises in eval mode (no dropout key needed) and
  returns plain arrays (boxed, logically partitioned parameters unboxed). Both trace their
  random draws with the non-partitionable threefry (see `fast_random`).

  Args:
    module: the Linen module.
    name: registry name or import path, for messages.
    has_dropout: whether train mode draws from the 'dropout' rng. None: detected by tracing
      with `example_input` (shape only, no compute), or guessed from positive fields whose
      name contains 'dropout' or is 'rate' / '*_rate' when no example is given.
    has_batchnorm: whether the model keeps 'batch_stats'. None: detected from
      `example_input`, else False (apply still handles 'batch_stats' whenever present).
    widen: optional `widen(factor) -> Model`.
    example_input: an example batch (e.g. `example_input(spec)`) used only for detection.
    bind_unbound: bind the axis names the module's collectives use and the run does not
      (a hard-coded BatchNorm `axis_name`; see the module docstring). Needs `example_input`.
    bound_axes: the axis names the run binds itself (its pmap axis name, if any).

  Returns:
    A `jrecipe.types.Model` with `module` set to `module`.
  """
  takes_train = _linen_takes_train(module)

  def mode(train):
    return {"train": train} if takes_train else {}

  names = ()
  if example_input is not None and (has_dropout is None or has_batchnorm is None
                                    or bind_unbound):
    has_dropout, has_batchnorm, names = _detect(module, name, mode, example_input, has_dropout,
                                                has_batchnorm, bind_unbound,
                                                tuple(a for a in bound_axes if a))
  if has_dropout is None:
    has_dropout = _guess_linen_dropout(module)
  has_batchnorm = bool(has_batchnorm)

  @fast_random
  @jax.jit
  def init(rng, x):
    return bind_axes(_init_fn(module, mode), names)(rng, x)

  def call(variables, x, train, rngs, mutable):
    if not mutable:
      return module.apply(variables, x, rngs=rngs, **mode(train)), {}
    out, state = module.apply(variables, x, rngs=rngs, mutable=mutable, **mode(train))
    return out, dict(nn.meta.unbox(state))

  @fast_random
  def apply_with_state(variables, x, train=False, rngs=None):
    check_rngs(name, train, has_dropout, rngs)
    mutable = [k for k in variables if k != "params"] if train else []
    if not names:
      return call(variables, x, train, rngs, mutable)
    return bind_axes(lambda v, xx: call(v, xx, train, rngs, mutable), names)(variables, x)

  def apply(variables, x, train=False, rngs=None):
    return apply_with_state(variables, x, train, rngs)[0]

  return Model(init=init, apply=apply, apply_with_state=apply_with_state, name=name,
               module=module, has_dropout=has_dropout, has_batchnorm=has_batchnorm, widen=widen,
               axis_names=names)
