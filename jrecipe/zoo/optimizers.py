"""The zoo's optimizers: a user's `factory(learning_rate) -> optax.GradientTransformation`
(`optimizer.name='jrecipe.zoo.optimizers:<name>'`), one correct (`adam`) and one per bug.

Each is an optax chain as users write them; the planted mistake is in the chain itself, where
jrecipe's config cannot see it, so only a check that measures the optimizer catches it.
"""

import jax
import optax


def adam(learning_rate):
  """The correct twin."""
  return optax.adam(learning_rate)


def adamw_kernels(learning_rate):
  """The correct twin of the decay bugs: AdamW on the weight matrices only."""
  return optax.adamw(learning_rate, weight_decay=1e-4,
                     mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p))


def per_step_decay(learning_rate):
  """An exponential decay meant per epoch applied per step: gone within a few dozen steps."""
  return optax.adam(optax.exponential_decay(learning_rate, transition_steps=1, decay_rate=0.9))


def cosine_in_epochs(learning_rate):
  """A cosine whose decay_steps were given in epochs (20) to a schedule counting steps."""
  return optax.adam(optax.cosine_decay_schedule(learning_rate, decay_steps=20))


def warmup_longer_than_run(learning_rate):
  """A warm-up of 10,000 steps copied from a long run into a run of a few hundred."""
  return optax.adam(optax.linear_schedule(0.0, learning_rate, transition_steps=10_000))


def decay_after_adam(learning_rate):
  """add_decayed_weights after the learning rate: +wd*p added to the step, the weights grow."""
  return optax.chain(optax.adam(learning_rate), optax.add_decayed_weights(1e-2))


def adamw_decays_biases(learning_rate):
  """optax.adamw without a mask: biases and normalisation scales decayed too."""
  return optax.adamw(learning_rate, weight_decay=1e-2)


def decay_too_strong(learning_rate):
  """weight_decay=100 (a percentage read as a fraction): the weights decay to nothing."""
  return optax.adamw(learning_rate, weight_decay=100.0,
                     mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p))


def first_layer_frozen(learning_rate):
  """multi_transform meant to freeze a pretrained backbone freezes the first layer of a model
  trained from scratch: its gradients are never applied."""
  def labels(params):
    return {k: jax.tree.map(lambda _: "frozen" if k == "Dense_0" else "train", v)
            for k, v in params.items()}
  return optax.multi_transform({"train": optax.adam(learning_rate),
                                "frozen": optax.set_to_zero()}, labels)


def gradient_ascent(learning_rate):
  """scale(learning_rate) where scale(-learning_rate) belongs: every step climbs the loss."""
  return optax.chain(optax.scale_by_adam(), optax.scale(learning_rate))


def boundary_at_step_zero(learning_rate):
  """A step decay whose boundary dict says {0: 0.0} (meant {0.8 * steps: 0.1}): rate 0."""
  return optax.adam(optax.piecewise_constant_schedule(learning_rate, {0: 0.0}))


def learning_rate_far_too_high(learning_rate):
  """SGD at 10,000 x the configured rate (a rate in the wrong unit)."""
  return optax.sgd(learning_rate * 1e4)
