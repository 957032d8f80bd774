"""The one training loop every mode uses: `Trainer(parts, placement).run(state, hooks=...)`.

A small object in the style of nanodo's Trainer and CLU's periodic actions: it owns the step's
parts (model, loss, optimizer, augmentation), the one compiled pure step (through a
`Placement`), the initial state and the batch source, and `run` is a short visible loop:

    for each step:  state, metrics = step(state, put(next(batches)));  hook.after_step(loop, metrics)

Everything else a mode needs is a hook (`jrecipe.train.hooks`): logging, evaluation, patience,
checkpoints, babysitting, preemption, progress. `--mode=train` runs it with every hook; the check
battery, lr_find, distillation, ablations, search trials, the benchmark and the multi-device
tests run the same Trainer with other hooks, so every mode measures exactly the step that trains.

Recipe stage 2 ('end-to-end skeleton'): 'fix the random seed': every random stream of a run is
derived from the one config seed by name (`seeds`), and batches are a pure function of
(seed, global step), so a run resumed at step k continues bit for bit.
"""

import collections
import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
import numpy as np

from jrecipe.errors import RunFailure
from jrecipe.train import parallel
from jrecipe.train import step as step_lib
from jrecipe.train.state import TrainState, create_state


def seeds(seed: int) -> dict[str, jax.Array]:
  """Every random stream of a run, derived from the one config.seed by name."""
  key = jax.random.PRNGKey(seed)
  return {"init": jax.random.fold_in(key, 0), "train": jax.random.fold_in(key, 1)}


class Hook:
  """One job the loop does besides stepping (CLU's periodic actions, with three moments).

  `begin(loop)` before the first step, `after_step(loop, metrics)` after every step (a hook
  decides its own cadence; `metrics` stay on the device until a hook reads them), `end(loop)`
  once the loop stops (also after a failure: `loop.failure` is set). A hook may replace
  `loop.state`, and ask the loop to stop (`loop.stop(reason)`) or fail (`loop.fail(message)`).
  A hook that keeps state across a resume has a `name` and `state_dict()` /
  `load_state_dict()`; the checkpoint hook saves those dicts inside the checkpoint.
  """

  name: Optional[str] = None

  def begin(self, loop: "Loop") -> None:
    del loop

  def after_step(self, loop: "Loop", metrics: dict) -> None:
    del loop, metrics

  def end(self, loop: "Loop") -> None:
    del loop


@dataclasses.dataclass
class Loop:
  """What the hooks of one `Trainer.run` see and may change.

  Attributes:
    trainer: the Trainer running.
    state: the current (device) TrainState; a hook may replace it (reduce-on-plateau does).
    step: optimizer steps taken so far (the global step, counted from the run's start).
    start_step, end_step: where this run started and where it ends.
    steps_per_epoch: for `epoch` and `epoch_end` (None: no epochs).
    stop_reason: set by `stop`: the loop ends after the current step's hooks.
    failure: set by `fail`: the remaining hooks of this step are skipped, every hook's `end`
      runs, and `run` raises RunFailure with this message.
    preempted: set by the preemption hook (a stop that must be resumable).
    last_eval: the validation metrics of the latest evaluation (set by the evaluation hook).
    t_start, t_first, t_end: wall-clock start, end of the first step (compile included) and
      end of the loop (the hooks' `end` included).
  """

  trainer: "Trainer"
  state: Any
  step: int
  start_step: int
  end_step: int
  steps_per_epoch: Optional[int] = None
  stop_reason: Optional[str] = None
  failure: Optional[str] = None
  preempted: bool = False
  last_eval: Optional[dict] = None
  t_start: float = 0.0
  t_first: Optional[float] = None
  t_end: Optional[float] = None

  @property
  def epoch(self) -> float:
    return self.step / self.steps_per_epoch if self.steps_per_epoch else 0.0

  @property
  def epoch_end(self) -> bool:
    """The step just taken completes an epoch (or the run)."""
    spe = self.steps_per_epoch
    return bool(spe) and (self.step % spe == 0 or self.step == self.end_step)

  @property
  def last_step(self) -> bool:
    return self.step == self.end_step

  @property
  def stopping(self) -> bool:
    """The loop ends after this step: its last step, or a stop was asked for."""
    return self.last_step or self.stop_reason is not None

  def stop(self, reason: str) -> None:
    if self.stop_reason is None:
      self.stop_reason = reason

  def fail(self, message: str) -> None:
    self.failure = message


class Trainer:
  """The step's parts, the compiled step, states and batches, and `run(state, hooks)`.

  Build it with `Trainer.from_experiment(exp, placement)` for a config's run, or
  `Trainer(parts)` around any model, loss and optimizer (the check battery's short runs).

  Args:
    parts: what the pure step is built from (`jrecipe.train.step.StepParts`).
    placement: where state and batches live and how the step is compiled; default one device.
    experiment: the Experiment (needed for `initial_state`, `batches` and `evaluate`).
    extra_metrics: composed into the step (e.g. the monitor's per-leaf norms).
  """

  def __init__(self, parts: step_lib.StepParts, placement: Optional[parallel.Placement] = None,
               *, experiment: Any = None, extra_metrics: Optional[Callable] = None):
    self.parts = parts
    self.placement = placement or parallel.make_placement("single")
    self.exp = experiment
    self.extra_metrics = extra_metrics
    self._step = None

  @classmethod
  def from_experiment(cls, exp, placement: Optional[parallel.Placement] = None, *,
                      extra_metrics: Optional[Callable] = None, **changes) -> "Trainer":
    """The Trainer of `exp`'s config; `changes` replace step parts (tx, l2, model, ...)."""
    parts = step_lib.StepParts(model=exp.model, loss=exp.loss, tx=exp.optimizer(),
                               augment=exp.augment_fn(), l2=float(exp.config.l2),
                               ema_decay=float(exp.config.ema_decay))
    if changes:
      parts = dataclasses.replace(parts, **changes)
    return cls(parts, placement, experiment=exp, extra_metrics=extra_metrics)

  def with_parts(self, **changes) -> "Trainer":
    """A Trainer on the same placement and experiment with some step parts replaced."""
    return Trainer(dataclasses.replace(self.parts, **changes), self.placement,
                   experiment=self.exp, extra_metrics=self.extra_metrics)

  # --- the step -------------------------------------------------------------------------
  @property
  def step(self) -> Callable:
    """The compiled pure step `(state, device batch) -> (state, metrics)`, built once."""
    if self._step is None:
      fn = step_lib.make_train_step(self.parts, axis_name=self.placement.axis_name,
                                    extra_metrics=self.extra_metrics)
      self._step = self.placement.compile_train(fn)
    return self._step

  def loss_fn(self) -> Callable:
    """The step's loss function (for diagnosis of a bad step: same parts, no optimizer)."""
    return step_lib.make_loss_fn(self.parts)

  # --- states ---------------------------------------------------------------------------
  def state_from(self, variables: dict, rng: jax.Array) -> TrainState:
    """A fresh host TrainState around `variables` (an EMA copy when parts keep one)."""
    state = create_state(variables, self.parts.tx, rng, ema=self.parts.ema_decay > 0)
    return jax.device_get(state)

  def initial_state(self, seed: Optional[int] = None) -> TrainState:
    """The run's initial host state: 'init well' (head bias from the data if configured),
    then `init_from` (a pretrained source), from the seed's 'init' and 'train' streams."""
    exp = self._need_experiment("initial_state")
    rngs = seeds(exp.config.seed if seed is None else seed)
    variables = exp.init_variables(rngs["init"])
    if exp.config.get("init_from"):  # 'pretrained initialisation' (jrecipe/train/init_from.py)
      from jrecipe.train import init_from
      variables = init_from.restore_into(exp, variables)
    return self.state_from(variables, rngs["train"])

  def to_device(self, host_state: Any) -> Any:
    return self.placement.put_state(host_state)

  def to_host(self, state: Any) -> Any:
    return self.placement.host_state(state)

  # --- batches --------------------------------------------------------------------------
  def batches(self, start_step: int = 0, seed: Optional[int] = None,
              batch_size: Optional[int] = None) -> Iterator[dict]:
    """This process's host batches of the experiment's training split from `start_step`."""
    exp = self._need_experiment("batches")
    from jrecipe.data import pipeline
    return pipeline.train_batches(
        exp.data, batch_size=batch_size or exp.config.batch_size,
        seed=exp.config.seed if seed is None else seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())

  # --- the loop -------------------------------------------------------------------------
  def run(self, state: Any, *, num_steps: Optional[int] = None, start_step: int = 0,
          end_step: Optional[int] = None, batches: Optional[Iterable[dict]] = None,
          hooks: Sequence[Hook] = (), steps_per_epoch: Optional[int] = None) -> Loop:
    """Steps `state` (on the devices) from `start_step` to `end_step` (or `num_steps` more).

    Args:
      state: a device TrainState (`to_device(initial_state())`, or a restored one).
      num_steps, end_step: how far to go (exactly one of them).
      start_step: the global step `state` is at (batches start there).
      batches: host batches (default: `batches(start_step)` of the experiment).
      hooks: run in this order at each moment (see `Hook`).
      steps_per_epoch: for the hooks' epochs (default: the experiment's).

    Returns:
      The `Loop`: final state, step, stop reason, timings.

    Raises:
      RunFailure: a hook failed the run (e.g. a non-finite loss), after every hook's `end`.
    """
    if (num_steps is None) == (end_step is None):
      raise ValueError("Trainer.run needs exactly one of num_steps and end_step.")
    end = int(end_step if end_step is not None else start_step + num_steps)
    if steps_per_epoch is None and self.exp is not None:
      steps_per_epoch = self.exp.steps_per_epoch
    loop = Loop(self, state, int(start_step), int(start_step), end, steps_per_epoch)
    it = parallel.prefetch(batches if batches is not None else self.batches(start_step),
                           self.placement.put_batch)  # the next batches already on device
    step_fn = self.step
    for h in hooks:
      h.begin(loop)
    loop.t_start = time.perf_counter()
    while loop.step < end and loop.stop_reason is None and loop.failure is None:
      loop.state, metrics = step_fn(loop.state, next(it))
      loop.step += 1
      if loop.t_first is None:
        jax.block_until_ready(metrics)
        loop.t_first = time.perf_counter()
      for h in hooks:
        h.after_step(loop, metrics)
        if loop.failure is not None:
          break
    for h in hooks:
      h.end(loop)
    loop.t_end = time.perf_counter()
    if loop.failure is not None:
      raise RunFailure(loop.failure)
    return loop

  def _need_experiment(self, what: str):
    if self.exp is None:
      raise ValueError(f"Trainer.{what} needs an experiment: build the Trainer with "
                       "Trainer.from_experiment(exp).")
    return self.exp


class ArrayBatches:
  """Endless random minibatches of in-memory arrays: the check battery's short runs.

  The minibatch of step t is drawn without replacement from a generator seeded with
  (seed, t), so the same seed gives the same batches whatever the arrays hold (the real and
  zeroed inputs of the input-independent baseline see the same examples).

  Args:
    arrays: {'x': [N, ...], 'y': [N, ...]} (any dict of equal-length arrays).
    batch_size: examples per step; None or >= N: the whole set every step.
    seed: int.
    start: the step of the first batch (a run continued from a state at that step).
  """

  def __init__(self, arrays: dict, batch_size: Optional[int], seed: int, start: int = 0):
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self.n = len(next(iter(self.arrays.values())))
    self.batch_size = batch_size if batch_size and batch_size < self.n else None
    self.seed = int(seed)
    self.t = int(start)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    t, self.t = self.t, self.t + 1
    if self.batch_size is None:
      return self.arrays
    rng = np.random.default_rng([self.seed, t])
    idx = np.sort(rng.choice(self.n, size=self.batch_size, replace=False))
    return {k: v[idx] for k, v in self.arrays.items()}


_CACHE_SIZE = 64
_cache: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


def cached_trainer(parts: step_lib.StepParts) -> Trainer:
  """One single-device Trainer (one compiled step) per distinct `parts`, kept (LRU).

  Compile time dominates the checks' short runs on a small CPU: the real- and zero-input
  runs of the baseline, every seed of a determinism run and every check training the same
  model with the same optimizer object share one compiled step. Parts are the same when
  their functions and optimizer are the same objects (and l2, EMA decay are equal), so
  build those once and pass the same objects; Model copies sharing functions share a step.
  """
  key = (id(parts.model.apply_with_state), id(parts.loss.per_example), id(parts.loss.correct),
         id(parts.tx), id(parts.augment), float(parts.l2), float(parts.ema_decay))
  hit = _cache.get(key)
  if hit is not None:
    _cache.move_to_end(key)
    return hit[1]
  trainer = Trainer(parts)
  _cache[key] = (parts, trainer)  # holding the parts keeps their ids from being reused
  while len(_cache) > _CACHE_SIZE:
    _cache.popitem(last=False)
  return trainer


def clear_cache() -> None:
  """Drops every Trainer (and compiled step) `cached_trainer` keeps."""
  _cache.clear()
