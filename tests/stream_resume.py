"""Training runs on the streaming pipeline, in a subprocess: stopped, killed or resumed.

Usage: python tests/stream_resume.py WORKDIR [--stop-at S] [--kill-at S] [--pipeline P]
With XLA_FLAGS=--xla_force_host_platform_device_count=N the run is data-parallel over the N
devices (parallel.mode='mesh'); a resumed run may have another N (elastic resume). With
JRECIPE_COORDINATOR, JRECIPE_NUM_PROCESSES, JRECIPE_PROCESS_ID (and JRECIPE_NUM_CPU_DEVICES)
it is one process of a multi-process job on loopback (tests/test_multihost.py's launch).
  --stop-at S: stop after step S (the stop checkpoint is saved), as a preemption would.
  --kill-at S: SIGKILL this process after step S, once the first epoch's checkpoint (step 19)
               is committed: nothing after it is saved.
Prints one JSON line: {"step": ..., "devices": ...}.
"""

import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from jrecipe.train import loop as loop_lib  # noqa: E402
from jrecipe.train.trainer import Hook  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

FIRST_CHECKPOINT = 19  # 1257 digits // 64: the end of epoch 1


def config(pipeline: str = "stream"):
  """digits, a small MLP, 3 epochs of 19 steps, data-parallel over every local device."""
  return tiny_config(**{"num_epochs": 3, "data.pipeline": pipeline, "ema_decay": 0.9,
                        "parallel.mode": "mesh", "parallel.num_devices": jax.device_count()})


class _At(Hook):
  def __init__(self, step, action, workdir):
    self.at, self.action, self.workdir = step, action, workdir

  def after_step(self, loop, metrics):
    if loop.step != self.at:
      return
    if self.action == "stop":
      loop.stop("stream_resume --stop-at")
      return
    committed = os.path.join(self.workdir, "checkpoints", str(FIRST_CHECKPOINT))
    deadline = time.time() + 60
    while not os.path.isdir(committed) and time.time() < deadline:
      time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGKILL)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("workdir")
  p.add_argument("--stop-at", type=int)
  p.add_argument("--kill-at", type=int)
  p.add_argument("--pipeline", default="stream")
  a = p.parse_args()
  from jrecipe import runtime  # before the backend: devices, dispatch, joining a job
  runtime.setup_processes(bool(os.environ.get(runtime.ENV_COORDINATOR)))
  hooks = []
  if a.stop_at:
    hooks.append(_At(a.stop_at, "stop", a.workdir))
  if a.kill_at:
    hooks.append(_At(a.kill_at, "kill", a.workdir))
  summary = loop_lib.train_and_evaluate(config(a.pipeline), a.workdir, hooks=hooks,
                                        allow_config_change=True)
  print(json.dumps({"step": summary["step"], "devices": jax.device_count(),
                    "processes": jax.process_count()}))


if __name__ == "__main__":
  main()
