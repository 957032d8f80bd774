"""Run in a subprocess with forced host devices: mesh and pmap steps equal a single device.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_equivalence.py
Prints one JSON line: {mode/devices: max abs difference of params after 5 steps}.
"""

import json
import sys

import jax
import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
    __import__("os").path.abspath(__file__))))

from jrecipe import experiment  # noqa: E402
from jrecipe.train import parallel  # noqa: E402
from jrecipe.train.trainer import Hook, Trainer  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

STEPS = 5


class _Losses(Hook):
  """Every step's loss on the host (the test compares them across placements)."""

  def __init__(self):
    self.losses = []

  def after_step(self, loop, metrics):
    self.losses.append(float(loop.trainer.placement.metrics_to_host(metrics)["loss"]))


def run(mode: str, n: int):
  """STEPS steps of the Trainer on `n` devices placed by `mode`: (host state, losses)."""
  cfg = tiny_config(batch_size=64, ema_decay=0.9)
  placement = parallel.make_placement(mode, n)
  exp = experiment.build(cfg, bn_axis_name=placement.axis_name)
  trainer = Trainer.from_experiment(exp, placement)
  losses = _Losses()
  loop = trainer.run(trainer.to_device(trainer.initial_state()), num_steps=STEPS,
                     hooks=[losses])
  return trainer.to_host(loop.state), losses.losses


def main():
  assert jax.device_count() >= 8, jax.devices()
  ref, ref_losses = run("single", 1)
  out = {}
  for mode, n in (("mesh", 1), ("pmap", 1), ("mesh", 4), ("pmap", 4), ("mesh", 8), ("pmap", 8)):
    host, losses = run(mode, n)
    diffs = [np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
             for a, b in zip(jax.tree.leaves((ref.params, ref.ema_params)),
                             jax.tree.leaves((host.params, host.ema_params)))]
    out[f"{mode}/{n}"] = {"param_diff": float(max(diffs)),
                          "loss_diff": float(np.max(np.abs(np.subtract(losses, ref_losses))))}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
