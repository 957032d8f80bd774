"""A Flax NNX module as a `jrecipe.types.Model`: the functional split/merge pattern.

Adapted without asking the user to change the module (docs/your_model.md):
  * train/eval: `Module.train()` / `.eval()` (Dropout's `deterministic`, BatchNorm's
    `use_running_average`), and `train=` when `__call__` takes it.
  * randomness at call time (Flax's NNX MNIST example: `nnx.Dropout(rate)` without `rngs`,
    `model(x, rngs=rngs)`): when `__call__` takes `rngs`, train mode passes
    `nnx.Rngs(dropout=key)` with the step's dropout key; streams kept inside the module
    (`nnx.Dropout(rate, rngs=rngs)`) are reseeded from the same key.
  * a built module is honoured with the seed: `seeded_rngs(key)` re-runs the code that built
    it with every `nnx.Rngs(<int>)` it creates folded into the run's init key.
"""

import contextlib
import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from jrecipe.errors import UserError
from jrecipe.models import dtype_fields
from jrecipe.models.core import check_rngs, fast_random
from jrecipe.types import Model


@contextlib.contextmanager
def seeded_rngs(key: jax.Array):
  """Every `nnx.Rngs` built inside the context draws from `key` folded with its own seeds.

  Why: the official NNX style builds a module once with a literal seed (`nnx.Rngs(0)`);
  re-running that code here makes each run's seed (init key) give new weights, as a Linen
  `init(rng, x)` does, with no change to the user's code. Integer seeds are folded into
  `key`; a seed that is already a key is folded with `key`'s first word.
  """
  from flax.nnx import rnglib
  original = rnglib.Rngs.__init__

  def fold(seed):
    if isinstance(seed, (int, jnp.integer)) or (hasattr(seed, "dtype") and seed.shape == ()
                                                and jnp.issubdtype(seed.dtype, jnp.integer)):
      return jax.random.fold_in(key, seed)
    return seed

  def init(self, default=None, /, **streams):
    original(self, fold(default) if default is not None else None,
             **{k: fold(v) for k, v in streams.items()})

  rnglib.Rngs.__init__ = init
  try:
    yield
  finally:
    rnglib.Rngs.__init__ = original


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


def _require_key_path(module, name: str, has_dropout: bool, takes_rngs: bool) -> None:
  """A UserError when the module has dropout and no way to receive a dropout key."""
  from flax import nnx
  has_streams = any(isinstance(n, nnx.RngStream) for _, n in nnx.iter_graph(module))
  if has_dropout and not (has_streams or takes_rngs):
    raise UserError(f"The NNX model {name!r} has dropout but no way to receive a key: build "
                    "it with nnx.Dropout(rate, rngs=rngs), or let its __call__ take `rngs` "
                    "and pass them on (self.dropout(x, rngs=rngs)).")


def _merged(graphdef, templates: tuple, variables: dict, train: bool, has_batchnorm: bool):
  """A fresh module from the templates (params, stats, rest) and `variables`, in its mode."""
  from flax import nnx
  params_t, stats_t, rest_t = templates
  params = _copy_state(params_t)
  nnx.replace_by_pure_dict(params, variables["params"])
  stats = _copy_state(stats_t)
  if has_batchnorm:
    nnx.replace_by_pure_dict(stats, variables["batch_stats"])
  model = nnx.merge(graphdef, params, stats, _copy_state(rest_t))
  dtype_fields.raise_nnx(model)  # only inside the gradient check's float64_layers
  if train:
    model.train()
  else:
    model.eval()
  return model


def _call_kwargs(module) -> tuple[bool, bool]:
  """(whether `__call__` takes `rngs`, whether it takes `train`)."""
  try:
    params = inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return False, False
  return "rngs" in params, "train" in params


def from_nnx(graphdef_and_state_or_module: Any, name: str, *,
             widen: Optional[Callable] = None, built: Any = None) -> Model:
  """Adapts a Flax NNX module to the same pure-apply `Model` contract as Linen models.

  The module is split once into a graphdef and states (`nnx.split`); `apply` merges the
  graphdef with the given variables (`nnx.merge`), sets train/eval mode (see the module
  docstring), feeds it the dropout key (call-time `rngs`, or its own streams reseeded from
  `rngs['dropout']`), calls it, and splits the updated BatchNorm statistics back out. Every
  in-place update (BatchNorm's running averages, RNG counters) lands on the merged copy,
  never on the template, so the function stays pure under jit and grad.

  Variables are pure dicts so that Linen and NNX models look the same to the training
  core: `{'params': <nnx.State of nnx.Param as a pure dict>}` plus `'batch_stats'` (the
  nnx.BatchStat state) when the module has any.

  Args:
    graphdef_and_state_or_module: one of
      - an `nnx.Module` instance: `init(rng, x)` returns copies of its current weights
        (`jrecipe.models.build_model` re-runs a factory that returned one, so the seed
        still counts: see `seeded_rngs`);
      - a `(graphdef, state)` pair from `nnx.split(module)`: same as the instance;
      - a constructor `make(rngs: nnx.Rngs) -> nnx.Module` (e.g. a functools.partial of your
        class): `init(rng, x)` builds a fresh module from `nnx.Rngs(rng)` under jit, so each
        seed draws new weights (what ensembles and seed checks need).
      `x` in `init` is unused (NNX shapes are fixed at construction).
    name: registry name or import path, for messages.
    widen: optional `widen(factor) -> Model`.
    built: with a constructor, a module it already built (saves building a template).

  Returns:
    A `jrecipe.types.Model` with `module=None`.
  """
  from flax import nnx
  if built is not None and callable(graphdef_and_state_or_module):
    module, make = built, graphdef_and_state_or_module
  else:
    module, make = _nnx_module(graphdef_and_state_or_module, name)
  graphdef, params_t, stats_t, rest_t = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
  has_batchnorm = bool(jax.tree.leaves(stats_t))
  has_dropout = _nnx_has_dropout(module)
  takes_rngs, takes_train = _call_kwargs(module)
  _require_key_path(module, name, has_dropout, takes_rngs)

  def variables_of(params, stats):
    variables = {"params": nnx.to_pure_dict(params)}
    if has_batchnorm:
      variables["batch_stats"] = nnx.to_pure_dict(stats)
    return variables

  init = _nnx_init(make, variables_of, variables_of(params_t, stats_t))

  def merged(variables, train):
    return _merged(graphdef, (params_t, stats_t, rest_t), variables, train, has_batchnorm)

  @fast_random
  def apply_with_state(variables, x, train=False, rngs=None):
    check_rngs(name, train, has_dropout, rngs)
    model = merged(variables, train)
    kwargs = {"train": train} if takes_train else {}
    if train and rngs and "dropout" in rngs:
      key = _typed_key(rngs["dropout"])
      _reseed_streams(model, key)
      if takes_rngs:
        kwargs["rngs"] = nnx.Rngs(dropout=key)
    out = model(x, **kwargs)
    if not (train and has_batchnorm):
      return out, {}
    _, _, new_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return out, {"batch_stats": nnx.to_pure_dict(new_stats)}

  def apply(variables, x, train=False, rngs=None):
    return apply_with_state(variables, x, train, rngs)[0]

  return Model(init=init, apply=apply, apply_with_state=apply_with_state, name=name,
               module=None, has_dropout=has_dropout, has_batchnorm=has_batchnorm, widen=widen)
