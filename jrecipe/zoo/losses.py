"""The zoo's losses: a user's `loss(outputs, labels) -> per-example losses` (docs/config.md,
`loss.name='jrecipe.zoo.losses:<name>'`), one correct (`xent`) and one per planted bug.

Written the way users write them: `optax` and `jax.nn` calls on logits and integer labels.
"""

import jax
import jax.numpy as jnp
import optax


def xent(logits, labels):
  """The correct twin: softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _onehot_xent(logits, targets, axis=-1):
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=axis), axis=-1)


def mean_over_classes(logits, labels):
  """Mean over the class axis where the sum belongs: every loss divided by C."""
  onehot = jax.nn.one_hot(labels, logits.shape[-1])
  return -jnp.mean(onehot * jax.nn.log_softmax(logits), axis=-1)


def summed_over_batch(logits, labels):
  """A loss 'summed over the batch' by scaling each example by the batch size."""
  return xent(logits, labels) * logits.shape[0]


def log_softmax_over_batch(logits, labels):
  """log_softmax over axis 0 (the batch) instead of the classes."""
  return _onehot_xent(logits, jax.nn.one_hot(labels, logits.shape[-1]), axis=0)


def labels_off_by_one(logits, labels):
  """one_hot(labels - 1): class 0 gets an all-zero target, every other class its neighbour."""
  return _onehot_xent(logits, jax.nn.one_hot(labels - 1, logits.shape[-1]))


def mse_on_logits(logits, labels):
  """A regression loss on the logits of a classifier (the wrong loss for the task)."""
  return jnp.mean(jnp.square(logits - jax.nn.one_hot(labels, logits.shape[-1])), axis=-1)


def negated(logits, labels):
  """The minus sign dropped: log-likelihood maximised as a loss... minimised."""
  return -xent(logits, labels)


def softmax_inside_loss(logits, labels):
  """softmax before a loss that applies log_softmax itself (softmax applied twice)."""
  return xent(jax.nn.softmax(logits), labels)


def smoothing_of_one(logits, labels):
  """optax.smooth_labels with alpha=1.0 (meant 0.1): every target is uniform."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), 1.0)
  return optax.softmax_cross_entropy(logits, targets)
