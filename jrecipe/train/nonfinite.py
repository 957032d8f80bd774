"""What the run says when a step's loss or gradient was not finite ('fail fast', big_vision style).

The step that saw it left the state untouched (the last good one), so the report recomputes that
step's loss and gradient on the same batch from the last good parameters, and names the step,
whether the batch itself holds non-finite inputs, and the first parameter leaf whose gradient
is not finite. With `config.debug_nans` it reruns the gradient under `jax_debug_nans` to name
the operation.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _batch_at(trainer, step: int) -> dict:
  """The batch of global step `step` (batches are a pure function of the seed and the step)."""
  return next(trainer.batches(start_step=step))


def report(trainer, good_state, bad_step: int, *, debug_nans: bool = False) -> str:
  """One paragraph about the non-finite step `bad_step` (good_state: the host state before it)."""
  batch = _batch_at(trainer, bad_step)
  parts = [f"Training stopped: the loss or a gradient was not finite at step {bad_step}."]
  if not all(np.all(np.isfinite(v)) for v in batch.values() if v.dtype.kind == "f"):
    parts.append("The batch itself contains non-finite inputs (see --mode=inspect).")
  loss_fn = trainer.loss_fn()
  (total, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      good_state.params, good_state.model_state, batch, good_state.rng, jnp.int32(bad_step))
  parts.append(f"Recomputed on that batch from the last good parameters: loss {float(total)!r}.")
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  bad = [jax.tree_util.keystr(p) for p, g in flat if not np.all(np.isfinite(g))]
  if bad:
    parts.append(f"First parameter leaf with a non-finite gradient: {bad[0]} "
                 f"({len(bad)} of {len(flat)} leaves).")
  parts.append("Likely causes: a learning rate too high (try 10x lower), a log of zero or a "
               "division by a value that reached zero in the model or loss, or bad inputs. "
               "The last good checkpoint is untouched; rerun with "
               "--config.debug_nans=True to name the operation (jax_debug_nans).")
  if debug_nans:
    parts.append(_debug_nans(trainer, good_state, bad_step, batch))
  return " ".join(parts)


def _debug_nans(trainer, good_state, bad_step: int, batch: dict) -> str:
  loss_fn = trainer.loss_fn()
  jax.config.update("jax_debug_nans", True)
  try:
    jax.grad(lambda p: loss_fn(p, good_state.model_state, batch, good_state.rng,
                               jnp.int32(bad_step))[0])(good_state.params)
    return "jax_debug_nans found no operation producing a NaN (an inf, perhaps)."
  except FloatingPointError as e:
    return f"jax_debug_nans: {str(e).splitlines()[0]}"
  finally:
    jax.config.update("jax_debug_nans", False)
