"""The Trainer's loop and each hook alone: what each one does, at which step, and nothing else."""

import os
import signal

import numpy as np
import pytest

from jrecipe import experiment
from jrecipe.errors import RunFailure
from jrecipe.train import hooks as hooks_lib
from jrecipe.train import patience
from jrecipe.train.trainer import ArrayBatches, Hook, Trainer
from tests.helpers import tiny_config


class FakeWriter:
  def __init__(self):
    self.rows = []

  def write(self, step, record, *, split="train", epoch=None, tensorboard=True):
    self.rows.append((split, int(step), dict(record)))

  def splits(self, split):
    return [(s, r) for sp, s, r in self.rows if sp == split]


class Recorder(Hook):
  def __init__(self, stop_at=None, fail_at=None):
    self.calls, self.stop_at, self.fail_at = [], stop_at, fail_at

  def begin(self, loop):
    self.calls.append(("begin", loop.step))

  def after_step(self, loop, metrics):
    self.calls.append(("step", loop.step))
    if loop.step == self.stop_at:
      loop.stop("asked")
    if loop.step == self.fail_at:
      loop.fail("planted failure")

  def end(self, loop):
    self.calls.append(("end", loop.step))


@pytest.fixture(scope="module")
def trainer():
  exp = experiment.build(tiny_config(num_epochs=1))  # 19 steps per epoch
  return Trainer.from_experiment(exp)


def _state(trainer):
  return trainer.to_device(trainer.initial_state())


def test_run_calls_hooks_in_order_and_stops_when_asked(trainer):
  rec, after = Recorder(stop_at=3), Recorder()
  loop = trainer.run(_state(trainer), num_steps=10, hooks=[rec, after])
  assert loop.step == 3 and loop.stop_reason == "asked"
  assert rec.calls == [("begin", 0), ("step", 1), ("step", 2), ("step", 3), ("end", 3)]
  assert after.calls == rec.calls  # a stop lets the rest of that step's hooks run
  assert int(trainer.to_host(loop.state).step) == 3


def test_a_failure_skips_the_rest_of_the_step_runs_every_end_and_raises(trainer):
  rec, after = Recorder(fail_at=2), Recorder()
  with pytest.raises(RunFailure, match="planted failure"):
    trainer.run(_state(trainer), num_steps=10, hooks=[rec, after])
  assert ("step", 2) not in after.calls and after.calls[-1] == ("end", 2)


def test_start_step_and_batches_follow_the_global_step(trainer):
  """Running 4 steps then 3 from step 4 equals 7 steps at once (batches by global step)."""
  a = trainer.run(_state(trainer), num_steps=7)
  b = trainer.run(_state(trainer), num_steps=4)
  b = trainer.run(b.state, start_step=4, end_step=7)
  ha, hb = trainer.to_host(a.state), trainer.to_host(b.state)
  for x, y in zip(np.asarray(ha.params["head"]["kernel"]), np.asarray(hb.params["head"]["kernel"])):
    np.testing.assert_array_equal(x, y)


def test_array_batches_are_a_function_of_the_seed_and_step():
  x = np.arange(40, dtype=np.float32).reshape(20, 2)
  a = ArrayBatches({"x": x}, 5, seed=3)
  b = ArrayBatches({"x": x * 0}, 5, seed=3)
  first = [next(a)["x"] for _ in range(3)]
  assert all(len(f) == 5 and len(set(f[:, 0])) == 5 for f in first)
  zeros = [next(b) for _ in range(3)]
  assert all(z["x"].shape == (5, 2) for z in zeros)
  c = ArrayBatches({"x": x}, 5, seed=4)
  assert not np.array_equal(next(c)["x"], first[0])
  assert next(ArrayBatches({"x": x}, None, seed=0))["x"] is not None  # full batch


def test_metric_logger_logs_at_cadence_and_epoch_end_and_fails_on_nonfinite(trainer):
  writer = FakeWriter()
  logger = hooks_lib.MetricLogger(writer, log_every=5, step_losses=True)
  trainer.run(_state(trainer), num_steps=19, hooks=[logger])
  assert [s for s, _ in writer.splits("train")] == [5, 10, 15, 19]
  assert [s for s, _ in writer.splits("train_epoch")] == [19]
  steps = writer.splits("train_steps")
  assert [r["first_step"] for _, r in steps] == [1, 6, 11, 16]
  assert sum(len(r["loss"]) for _, r in steps) == 19
  epoch = writer.splits("train_epoch")[0][1]["loss"]
  assert epoch == pytest.approx(np.mean(sum((r["loss"] for _, r in steps), [])), rel=1e-5)

  bad = trainer.to_host(_state(trainer)).replace(bad_step=np.int32(2))
  failing = hooks_lib.MetricLogger(FakeWriter(), log_every=1,
                                   on_nonfinite=lambda loop, s: f"bad at {s}")
  with pytest.raises(RunFailure, match="bad at 2"):
    trainer.run(trainer.to_device(bad), num_steps=3, hooks=[failing])


def test_metric_logger_state_carries_unlogged_steps_across_a_resume(trainer):
  w1, w2 = FakeWriter(), FakeWriter()
  one = hooks_lib.MetricLogger(w1, log_every=5)
  saved = {}

  class Save(Hook):  # what the checkpoint hook does at a stop
    def after_step(self, loop, metrics):
      if loop.step == 7:
        saved.update(one.state_dict())
        loop.preempted = True
        loop.stop("preempted")

  loop = trainer.run(_state(trainer), num_steps=19, hooks=[one, Save()])  # 6-7 pending
  assert [s for s, _ in w1.splits("train")] == [5]  # a preempted stop logs no extra row
  assert len(saved["carried"]) == 2 and saved["epoch_n"] == 5
  two = hooks_lib.MetricLogger(w2, log_every=5)
  two.load_state_dict(saved)
  loop.step = 10  # the resumed run's next log step, with nothing new pending
  two.flush(loop)
  assert [s for s, _ in w2.splits("train")] == [10]
  assert two.epoch_n == 7


def test_epoch_evaluation_at_init_and_each_epoch_end(trainer):
  writer, seen = FakeWriter(), []

  def evaluator(variables, split):
    seen.append(split)
    return {"loss": 1.0, "accuracy": 0.5, "count": 10}

  hook = hooks_lib.EpochEvaluation(evaluator, writer, ema=False, at_init=2.3)
  loop = trainer.run(_state(trainer), num_steps=19, hooks=[hook], steps_per_epoch=10)
  assert [(sp, s) for sp, s, _ in writer.rows] == [("validation", 0), ("validation", 10),
                                                   ("validation", 19)]
  assert writer.rows[0][2]["expected_loss_at_init"] == 2.3
  assert loop.last_eval["loss"] == 1.0


class _FakeEval(Hook):
  def __init__(self, losses):
    self.losses = iter(losses)

  def after_step(self, loop, metrics):
    if loop.epoch_end:
      loop.last_eval = {"loss": next(self.losses)}


def test_patience_hook_stops_and_scales_the_rate(trainer):
  plateau = patience.PlateauScaler(factor=0.5, patience=1)
  hook = hooks_lib.PatienceHook(patience.EarlyStopping(2), plateau)
  loop = trainer.run(_state(trainer), num_steps=50, steps_per_epoch=2,
                     hooks=[_FakeEval([1.0, 0.9, 0.95, 0.96, 0.5]), hook])
  assert loop.step == 8 and "did not improve for 2 epochs" in loop.stop_reason
  assert float(trainer.to_host(loop.state).lr_scale) == 0.25
  restored = hooks_lib.PatienceHook(patience.EarlyStopping(2),
                                    patience.PlateauScaler(factor=0.5, patience=1))
  restored.load_state_dict(hook.state_dict())
  assert restored.state_dict() == hook.state_dict()


class FakeCheckpointer:
  def __init__(self):
    self.saved = []

  def save(self, step, state, meta, val_loss=None):
    self.saved.append((step, meta, val_loss))

  def wait(self):
    pass


def test_checkpoint_hook_saves_at_cadence_and_on_stop_with_hook_states(trainer):
  ckpt, stateful = FakeCheckpointer(), hooks_lib.PatienceHook(patience.EarlyStopping(3))
  hook = hooks_lib.CheckpointHook(ckpt, every_epochs=2, stateful=[stateful])
  trainer.run(_state(trainer), num_steps=9, steps_per_epoch=2,
              hooks=[_FakeEval([3.0, 2.0, 1.0, 0.5, 0.4]), Recorder(stop_at=7), hook])
  assert [s for s, _, _ in ckpt.saved] == [4, 7]  # epoch 2, then the stop
  assert ckpt.saved[0][2] == 2.0 and ckpt.saved[1][2] is None  # no evaluation at step 7
  assert ckpt.saved[0][1]["patience"] == {"early_stopping": {"best": None, "bad_epochs": 0}}


def test_preemption_hook_turns_sigterm_into_a_stop(trainer):
  class Term(Hook):
    def after_step(self, loop, metrics):
      if loop.step == 2:
        os.kill(os.getpid(), signal.SIGTERM)

  before = signal.getsignal(signal.SIGTERM)
  loop = trainer.run(_state(trainer), num_steps=10, hooks=[hooks_lib.Preemption(), Term()])
  assert loop.preempted and loop.step == 3 and "SIGTERM" in loop.stop_reason
  assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored
