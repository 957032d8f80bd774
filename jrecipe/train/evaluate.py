"""Exact evaluation of whole splits: 'evaluate on the whole (large) test set' (recipe stage 2).

Sums over the real examples of every batch (the last one padded and masked), divided once at the
end by the exact count; on several hosts each host evaluates its slice of every batch and the
sums are reduced across devices. Used by training (every epoch, and at the end), the benchmark
and the ensemble modes.
"""

import math

import jax
import jax.numpy as jnp

from jrecipe import losses
from jrecipe.data import pipeline
from jrecipe.train import parallel
from jrecipe.train import step as step_lib


class Evaluator:
  """`evaluator(variables, split) -> {'loss', 'accuracy', ..., 'count'}` for one Experiment.

  Args:
    exp: the Experiment (its data, model and loss).
    placement: where the variables live and how the eval step is compiled.
  """

  def __init__(self, exp, placement: parallel.Placement):
    self.exp = exp
    self.placement = placement
    self.fn = placement.compile_eval(
        step_lib.make_eval_step(exp.model, exp.loss, axis_name=placement.axis_name))

  def batch_size(self, split: str) -> int:
    """The global evaluation batch: config.eval_batch_size, a multiple of the device count."""
    n = self.placement.global_devices
    size = min(self.exp.config.eval_batch_size, len(self.exp.data.arrays[split]["y"]))
    return int(math.ceil(size / n) * n)

  def __call__(self, variables, split: str) -> dict[str, float]:
    total = None
    for batch in pipeline.eval_batches(self.exp.data, split, batch_size=self.batch_size(split),
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
      sums = self.fn(variables, self.placement.put_batch(batch))
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    host = self.placement.metrics_to_host(total)
    count = float(host.pop("count"))
    out = {k: float(v) / count for k, v in host.items()}
    out["count"] = int(round(count))
    out.update(losses.derived_metrics(out, self.exp.spec, self.exp.loss))
    return out
