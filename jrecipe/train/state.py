"""The train state: one flax struct dataclass that holds everything a step changes.

Checkpointed whole, so a resumed run continues bit-identically.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything the pure train step reads and writes.

  Attributes:
    step: number of optimizer steps taken (int32 scalar).
    params: model parameters.
    opt_state: the optax optimizer state.
    model_state: mutable model collections, e.g. {'batch_stats': ...}, or {}.
    ema_params: exponential moving average of params ({} when config.ema_decay == 0).
    rng: the run's base PRNG key (raw uint32[2]); per-step randomness is fold_in(rng, step).
    lr_scale: multiplies every update: reduce-on-plateau writes it between epochs.
    bad_step: the first step whose loss or gradient was not finite, or -1. The step that
      found it left params untouched, so the state stays the last good one.
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  model_state: PyTree
  ema_params: PyTree
  rng: jax.Array
  lr_scale: jax.Array
  bad_step: jax.Array


def create_state(variables: dict, tx, rng: jax.Array, *, ema: bool) -> TrainState:
  """A fresh TrainState from model variables ({'params': ..., 'batch_stats': ...}).

  One jitted function: run eagerly, the optimizer's init compiles (or, warm, loads from the
  persistent cache) one small executable per distinct leaf shape and operation, a visible
  part of a warm start (docs/performance.md).
  """
  try:
    fn = _create_fn(tx, bool(ema))
  except TypeError:  # an unhashable optimizer object: jit it uncached
    fn = _create_fn.__wrapped__(tx, bool(ema))
  return fn(variables, rng)


@functools.lru_cache(maxsize=8)
def _create_fn(tx, ema: bool):
  return jax.jit(lambda variables, rng: _create(variables, tx, rng, ema=ema))


def _create(variables: dict, tx, rng: jax.Array, *, ema: bool) -> TrainState:
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      model_state=model_state,
      ema_params=jax.tree.map(jnp.array, params) if ema else {},
      rng=rng,
      lr_scale=jnp.ones((), jnp.float32),
      bad_step=-jnp.ones((), jnp.int32),
  )


def variables_of(state: TrainState, *, ema: bool = False) -> dict:
  """The model variables (raw or EMA params plus mutable state) for `model.apply`."""
  params = state.ema_params if ema else state.params
  return {"params": params, **state.model_state}


def param_count(params: PyTree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))
