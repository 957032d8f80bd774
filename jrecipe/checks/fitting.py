"""The checks' short runs and measurements: `fit`, `fit_metrics` and `evaluate`.

Recipe stage 2's baselines ('input-independent baseline', 'overfit one batch', 'verify
decreasing training loss') train a model for a few dozen steps. They run the very Trainer and
compiled step that training runs (`jrecipe.train.trainer.Trainer` through `cached_trainer`,
one compiled step per distinct model, loss, optimizer, augmentation and L2 strength), on
minibatches of in-memory arrays (`ArrayBatches`). Compile time dominates short runs on a small
CPU: build the model, loss and optimizer once and pass the same objects, and every check that
trains them shares one compiled step (the real- and zeroed-input runs of the baseline too).

How outputs are measured (`evaluate`): models without BatchNorm run in eval mode (dropout
off); models with BatchNorm run in train mode, with batch statistics, because the running
averages of a short run (or of an initialisation) are not yet the statistics of the data.
"""

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jrecipe.train.state import variables_of
from jrecipe.train.step import StepParts
from jrecipe.train.trainer import ArrayBatches, Hook, cached_trainer
from jrecipe.types import Loss, Model

_METRICS = ("loss", "total_loss", "accuracy")


def as_key(rng: Any) -> jax.Array:
  """An int seed or a PRNG key -> a raw uint32[2] key."""
  if isinstance(rng, (int, np.integer)):
    return jax.random.PRNGKey(int(rng))
  return rng


def _seed_of(rng: Any) -> int:
  """The int seed of the minibatch order: the seed itself, or drawn from a key's bits."""
  if isinstance(rng, (int, np.integer)):
    return int(rng)
  data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  return int(np.asarray(data, np.uint32).ravel()[-1])


class _Collect(Hook):
  """Keeps every step's losses and accuracy on the device; read once when the run ends."""

  def __init__(self):
    self.metrics = []

  def after_step(self, loop, metrics):
    del loop
    self.metrics.append({k: metrics[k] for k in _METRICS if k in metrics})


class _StopWhen(Hook):
  """Every `every` steps (not at the last one), asks `decided(variables, losses)` (the data
  losses of the steps so far, numpy) and stops the run when it answers True: a check whose
  verdict is already reached trains no further."""

  def __init__(self, decided: Callable[[dict, np.ndarray], bool], every: int,
               collect: _Collect):
    self.decided, self.every, self.collect = decided, max(1, int(every)), collect

  def after_step(self, loop, metrics):
    del metrics
    if loop.step % self.every or loop.last_step:
      return
    losses = np.asarray(jax.device_get([m["loss"] for m in self.collect.metrics]), np.float64)
    if self.decided(variables_of(loop.state), losses):
      loop.stop("decided")


def fit_metrics(model: Model, loss: Loss, variables: dict, x, y, *, tx, steps: int, rng,
                l2: float = 0.0, batch_size: Optional[int] = None,
                augment: Optional[Callable] = None,
                stop_when: Optional[Callable[[dict, np.ndarray], bool]] = None,
                check_every: int = 50) -> tuple[dict, dict]:
  """`fit`, returning every per-step metric: (variables, {'loss', 'total_loss', 'accuracy'}).

  Same arguments as `fit`. The metrics are numpy arrays of one value per step taken; 'accuracy'
  is present when the loss has `correct`. 'bad_step' (an int, -1 when none) is the first step
  whose loss or gradient was not finite (that step and later bad ones left params as they
  were). 'steps' is the number of steps taken: `steps`, or fewer when `stop_when` (see `fit`)
  ended the run early.
  """
  shared = getattr(_SHARED, "runs", None) if stop_when is None else None
  if shared is None:
    return _fit_metrics(model, loss, variables, x, y, tx=tx, steps=steps, rng=rng, l2=l2,
                        batch_size=batch_size, augment=augment, stop_when=stop_when,
                        check_every=check_every)
  held = (model.apply_with_state, loss.per_example, loss.correct, tx, augment, variables, x, y)
  key = (tuple(id(o) for o in held), float(l2), _rng_key(rng), batch_size)
  runs = [r for r in shared.get(key, ()) if all(a is b for a, b in zip(r[0], held))]
  hit = next((r for r in runs if r[1] == steps), None)
  if hit is not None:
    return _fresh(hit[2]), _copied(hit[3])
  # The longest stored run shorter than this one, continued from its state (exact: the
  # batches and keys of step t depend only on t).
  start = max((r for r in runs if r[1] < steps and r[4] is not None), key=lambda r: r[1],
              default=None)
  stored = shared.setdefault(key, [])

  def keep(step, state, metrics, done):
    # A kept state is a copy: the next step donates (deletes) the loop's own buffers.
    small = sum(a.nbytes for a in jax.tree.leaves(state)) <= _SNAPSHOT_BYTES
    snap = jax.tree.map(jnp.copy, state) if small and step in _SHARED.snapshots else None
    if done or snap is not None:
      kept = variables_of(snap) if snap is not None else _fresh(variables_of(state))
      stored.append((held, step, kept, _copied(metrics), snap))

  return _fit_metrics(model, loss, variables, x, y, tx=tx, steps=steps, rng=rng, l2=l2,
                      batch_size=batch_size, augment=augment, stop_when=None,
                      check_every=check_every, start=start and (start[1], start[4], start[3]),
                      keep=keep)


_SHARED = threading.local()
_SNAPSHOT_BYTES = 256 << 20  # a train state kept for a later, longer run: at most 256 MB


@contextlib.contextmanager
def shared_runs(snapshots: tuple = ()) -> Iterator[None]:
  """Within it, a `fit` / `fit_metrics` call identical to an earlier one (the same model,
  loss and optimizer objects, the same variables and data arrays, steps, rng, l2, batch size,
  augmentation) returns that run's result instead of training again, and a call that only
  asks for more steps continues the longest shorter one from its kept state. Every run's result
  is kept; its train state is kept at the step counts in `snapshots` (the battery's shorter
  budgets: the gradient check's burn-in and the regularization run are prefixes of the
  baseline's run), each state at most 256 MB. The battery runs in it: the input-independent
  baseline's real-input run is the capacity check's base run. Exact, because a run is a pure
  function of those arguments and the batches and keys of step t depend only on t
  (bit-identical on rerun, which `seed_determinism` checks; tested against fresh runs)."""
  before = getattr(_SHARED, "runs", None), getattr(_SHARED, "snapshots", frozenset())
  _SHARED.runs, _SHARED.snapshots = {}, frozenset(int(s) for s in snapshots)
  try:
    yield
  finally:
    _SHARED.runs, _SHARED.snapshots = before


def _fresh(variables: dict) -> dict:
  """New containers around the same (immutable) arrays: a caller may rebind entries."""
  return jax.tree.map(lambda a: a, variables)


def _copied(metrics: dict) -> dict:
  """The metrics with their arrays copied: a caller may change its own."""
  return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in metrics.items()}


def _rng_key(rng: Any):
  if isinstance(rng, (int, np.integer)):
    return ("seed", int(rng))
  data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  return ("key", np.asarray(data).tobytes())


class _Keep(Hook):
  """Hands the state and the metrics so far to `keep(step, state, metrics, done)` after each
  step in `at` and once at the end (a shared run's stored result)."""

  def __init__(self, keep: Callable, at: frozenset, collect: _Collect, metrics_of: Callable):
    self.keep, self.at, self.collect, self.metrics_of = keep, at, collect, metrics_of

  def after_step(self, loop, metrics):
    del metrics
    if loop.step in self.at and not loop.last_step:
      self.keep(loop.step, loop.state, self.metrics_of(self.collect.metrics, loop.state), False)

  def end(self, loop):
    if loop.failure is None:
      self.keep(loop.step, loop.state, self.metrics_of(self.collect.metrics, loop.state), True)


def _fit_metrics(model: Model, loss: Loss, variables: dict, x, y, *, tx, steps: int, rng,
                 l2: float, batch_size: Optional[int], augment: Optional[Callable],
                 stop_when: Optional[Callable], check_every: int,
                 start: Optional[tuple] = None, keep: Optional[Callable] = None):
  """The run; `start` = (step, state, metrics) continues a kept run from that state."""
  trainer = cached_trainer(StepParts(model, loss, tx, augment=augment, l2=float(l2)))
  first, prefix = 0, []
  if start is None:
    state = trainer.to_device(trainer.state_from(variables, as_key(rng)))
  else:
    first, state, before = start
    state = jax.tree.map(jnp.copy, state)  # the step donates its input; the kept one stays
    prefix = [{k: before[k][i] for k in _METRICS if k in before} for i in range(first)]
  collect = _Collect()
  collect.metrics = list(prefix)
  batches = ArrayBatches({"x": x, "y": y}, batch_size, _seed_of(rng), start=first)

  def metrics_of(collected, state):
    host = jax.device_get(collected)
    out = {k: np.array([m[k] for m in host], np.float64) for k in _METRICS
           if host and k in host[0]}
    if not host:
      out = {"loss": np.zeros((0,)), "total_loss": np.zeros((0,))}
    out["bad_step"] = int(state.bad_step)
    out["steps"] = len(host)
    return out

  hooks = [collect] + ([_StopWhen(stop_when, check_every, collect)] if stop_when else [])
  if keep is not None:
    hooks.append(_Keep(keep, _SHARED.snapshots, collect, metrics_of))
  loop = trainer.run(state, start_step=first, num_steps=int(steps) - first, batches=batches,
                     hooks=hooks)
  return variables_of(loop.state), metrics_of(collect.metrics, loop.state)


def fit(model: Model, loss: Loss, variables: dict, x, y, *, tx, steps: int, rng,
        l2: float = 0.0, batch_size: Optional[int] = None,
        augment: Optional[Callable] = None,
        stop_when: Optional[Callable[[dict, np.ndarray], bool]] = None,
        check_every: int = 50) -> tuple[dict, np.ndarray]:
  """Trains `steps` steps with the training Trainer's compiled step: the checks' short runs.

  Recipe: the short runs behind the stage-2 baselines ('input-independent baseline',
  'overfit one batch', 'verify decreasing training loss'). The step is the one
  `jrecipe.train.trainer.cached_trainer` compiles once per (model.apply_with_state, loss
  functions, tx, augment) identities and (l2) value (jit itself specialises on shapes), so
  repeated calls with the same objects never recompile; the per-step metrics stay on the
  device until the run ends.

  Args:
    model, loss: a `jrecipe.types.Model` and `jrecipe.types.Loss`. Train mode (dropout and
      BatchNorm batch statistics as the model defines them).
    variables: initial variables {'params': ..., optional 'batch_stats': ...}; not modified.
    x, y: the training arrays.
    tx: any optax GradientTransformation (a fresh optimizer state is made from it).
    steps: number of optimizer steps.
    rng: int seed or PRNG key: the train state's key (dropout, augmentation: the train step
      folds in the step number) and the seed of the minibatch order (`ArrayBatches`: the
      batch of step t is drawn from (seed, t), so the same rng gives the same batches,
      whatever the inputs hold).
    l2: L2 strength (0.5 * l2 * sum of squared kernels added to the optimised loss).
    batch_size: examples per step; None (or >= len(x)) trains on the full set every step.
    augment: `augment(x, rng) -> x` applied inside the step.
    stop_when: `stop_when(variables, losses) -> bool` (the data losses of the steps taken),
      asked every `check_every` steps: True ends the run there (a check stops training once
      its verdict is reached; never shared by `shared_runs`).

  Returns:
    (trained variables, data losses np.ndarray [steps taken]: the minibatch loss each step
    computed before its update, without the penalty).
  """
  variables, metrics = fit_metrics(model, loss, variables, x, y, tx=tx, steps=steps, rng=rng,
                                   l2=l2, batch_size=batch_size, augment=augment,
                                   stop_when=stop_when, check_every=check_every)
  return variables, metrics["loss"]


@functools.lru_cache(maxsize=64)
def _eval_fn(apply: Callable, per_example: Callable, correct: Optional[Callable],
             has_batchnorm: bool, has_dropout: bool) -> Callable:
  """Jitted `(variables, x, y, key) -> dict` of outputs, per-example losses and accuracy.

  Cached on the functions' identities (the cache holds them, so an id is never reused).
  """

  def run(variables, x, y, key):
    if has_batchnorm:
      outputs = apply(variables, x, True, {"dropout": key} if has_dropout else None)
    else:
      outputs = apply(variables, x, False, None)
    out = {"outputs": outputs, "per_example": per_example(outputs, y)}
    if correct is not None:
      out["correct"] = correct(outputs, y)
    return out

  return jax.jit(run)


def evaluate(model: Model, loss: Loss, variables: dict, x, y, *, rng=0) -> dict:
  """The data loss (no regularisation) of `variables` on (x, y), on the host.

  Eval mode for models without BatchNorm; train mode (batch statistics, and dropout drawn
  from `rng` when the model has both) for BatchNorm models (see the module docstring).

  Returns:
    {'loss': mean, 'se': standard error of the mean, 'accuracy': mean or None,
     'per_example': [B], 'outputs': model outputs}, numpy values.
  """
  fn = _eval_fn(model.apply, loss.per_example, loss.correct, bool(model.has_batchnorm),
                bool(model.has_dropout))
  out = jax.device_get(fn(variables, jnp.asarray(x), jnp.asarray(y), as_key(rng)))
  per_ex = np.asarray(out["per_example"], np.float64)
  n = max(per_ex.size, 1)
  return {
      "loss": float(np.mean(per_ex)),
      "se": float(np.std(per_ex) / np.sqrt(n)) if per_ex.size > 1 else 0.0,
      "accuracy": float(np.mean(out["correct"])) if "correct" in out else None,
      "per_example": per_ex,
      "outputs": np.asarray(out["outputs"]),
  }


@functools.lru_cache(maxsize=64)
def mean_loss_fn(per_example: Callable) -> Callable:
  """Jitted `(outputs, labels) -> mean per-example loss` (cached on the loss function)."""
  return jax.jit(lambda o, t: jnp.mean(per_example(o, t)))


_NO_DROPOUT: dict = {}


def without_dropout(model: Model) -> Model:
  """The model trained in eval mode (dropout off, BatchNorm running statistics).

  One wrapper per model (kept, with the model, so its functions keep their identity): every
  run of the wrapper shares one compiled step.
  """
  hit = _NO_DROPOUT.get(id(model.apply))
  if hit is not None and hit[0] is model.apply:
    return hit[1]

  def apply_with_state(variables, x, train=False, rngs=None):
    del train, rngs
    state = {k: v for k, v in variables.items() if k != "params"}
    return model.apply(variables, x, False, None), state

  def apply(variables, x, train=False, rngs=None):
    return apply_with_state(variables, x, train, rngs)[0]

  wrapped = Model(init=model.init, apply=apply, apply_with_state=apply_with_state,
                  name=f"{model.name} (dropout off)", module=model.module, has_dropout=False,
                  has_batchnorm=False, widen=None)
  _NO_DROPOUT[id(model.apply)] = (model.apply, wrapped)
  return wrapped
