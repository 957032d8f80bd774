"""The check rules the planted-bug zoo (jrecipe/zoo) made: each with its bug and correct twin,
and both sides of their thresholds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jrecipe.checks import data as data_checks
from jrecipe.checks import optimizer as opt_checks

PARAMS = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
          "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}


def _schedule(tx, **kw):
  return opt_checks.effective_schedule(tx, PARAMS, total_steps=100, steps_per_epoch=10, **kw)


def test_effective_schedule_fails_a_frozen_layer_and_passes_it_when_frozen_on_purpose():
  labels = lambda p: {k: jax.tree.map(lambda _: "frozen" if k == "Dense_0" else "train", v)
                      for k, v in p.items()}
  frozen = optax.multi_transform({"train": optax.adam(1e-3), "frozen": optax.set_to_zero()},
                                 labels)
  bad = _schedule(frozen)
  assert bad.status == "fail" and "never updated" in bad.message, bad.message
  assert sorted(bad.details["frozen_leaves"]) == ["['Dense_0']['bias']", "['Dense_0']['kernel']"]
  assert _schedule(frozen, frozen_ok=True).status == "pass"  # config.init_from_freeze
  assert _schedule(optax.adam(1e-3)).status == "pass"


def test_effective_schedule_fails_gradient_ascent():
  bad = _schedule(optax.chain(optax.scale_by_adam(), optax.scale(1e-3)))
  assert bad.status == "fail" and "UP the gradient" in bad.message, bad.message
  good = _schedule(optax.chain(optax.scale_by_adam(), optax.scale(-1e-3)))
  assert good.status == "pass", good.message


def test_split_leakage_both_sides_of_its_threshold():
  x = np.random.RandomState(0).randn(400, 5).astype(np.float32)
  train, test = x[:300], x[300:]  # 100 test examples: fail above 1 copy (1%)
  arrays = lambda k: {"train": {"x": np.concatenate([train, test[:k]])}, "test": {"x": test}}
  assert data_checks.split_leakage(arrays(0)).status == "pass"
  assert data_checks.split_leakage(arrays(1)).status == "warn"  # 1% is inside
  over = data_checks.split_leakage(arrays(2))
  assert over.status == "fail" and "leaked" in over.message
  assert over.details["copies_in_train"]["test"] == [2, 100]
