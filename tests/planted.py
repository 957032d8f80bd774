"""Planted bugs, importable by path (`tests.planted:Name`) the way users plug in their code."""

import jax
import jax.numpy as jnp


def naive_xent(outputs, labels):
  """Cross-entropy as -log(softmax): the classic log-of-zero bug once a probability underflows."""
  p = jax.nn.softmax(outputs)
  return -jnp.log(jnp.take_along_axis(p, labels[:, None], axis=1)[:, 0])
