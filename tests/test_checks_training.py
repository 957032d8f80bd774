"""The training-based sanity checks: a correct model passes, each planted bug is caught.

Tiny hand-written Linen models wrapped as `jrecipe.types.Model` and a softmax cross-entropy
(`tests.planted.linen_model`, `xent_loss`), on 256 scikit-learn digits: nothing here
depends on jrecipe's model or loss registries. One optimizer object and one model object are
shared by module fixtures, so the checks reuse one compiled train step (compile time
dominates on a small CPU).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jrecipe.checks import baselines, determinism, fitting, init, overfit, regularization
from jrecipe.train import trainer as trainer_lib
from jrecipe.types import Loss
from tests.planted import linen_model, xent_loss

N = 256


class MLP(nn.Module):
  """Flatten, one hidden ReLU layer, Dense 'head'; optional planted bugs."""
  hidden: int = 32
  num_outputs: int = 10
  init_scale: float = 1.0
  dropout: float = 0.0
  bug: str = ""  # '', 'zero_input', 'noise_input', 'stop_gradient'

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.bug == "zero_input":
      x = x * 0.0
    elif self.bug == "noise_input":
      # Fixed pseudo-noise in place of the input (cheaper to compile than jax.random).
      x = jnp.sin(jnp.arange(x.size, dtype=x.dtype) * 12.9898).reshape(x.shape) * 43.7 % 1.0
    init = nn.initializers.variance_scaling(self.init_scale ** 2, "fan_in", "truncated_normal")
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, kernel_init=init)(x))
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    out = nn.Dense(self.num_outputs, kernel_init=init, name="head")(x)
    if self.bug == "stop_gradient":
      out = jax.lax.stop_gradient(out)
    return out


def svm_loss() -> Loss:
  def per_example(s, y):
    correct = jnp.take_along_axis(s, y[:, None], axis=-1)
    margins = jnp.maximum(0.0, s - correct + 1.0)
    return jnp.sum(margins, -1) - 1.0
  return Loss("multiclass_svm", per_example, "scores", lambda c, t: float(c - 1),
              lambda o: jnp.argmax(o, -1), None)


def set_bias(variables, bias):
  params = dict(variables["params"])
  params["head"] = {**params["head"], "bias": jnp.asarray(bias, jnp.float32)}
  return {**variables, "params": params}


@pytest.fixture(scope="module")
def data():
  from sklearn.datasets import load_digits
  d = load_digits()
  rs = np.random.RandomState(0)
  idx = rs.permutation(len(d.target))
  x = d.images[idx].astype(np.float32)[..., None] / 16.0
  x = (x - x.mean()) / x.std()
  y = d.target[idx].astype(np.int32)
  return x[:N], y[:N], x[N:2 * N], y[N:2 * N]


@pytest.fixture(scope="module")
def loss():
  return xent_loss()


@pytest.fixture(scope="module")
def tx():
  return optax.adam(1e-2)


@pytest.fixture(scope="module")
def mlp():
  return linen_model(MLP(), widen=lambda f: linen_model(MLP(hidden=int(32 * f))))


@pytest.fixture(scope="module")
def mlp_vars(mlp, data):
  return mlp.init(jax.random.PRNGKey(0), data[0][:2])


# ---------------------------------------------------------------- the shared trainer

def test_fit_is_deterministic_decreases_and_compiles_once(mlp, loss, tx, mlp_vars, data):
  x, y = data[:2]
  v1, l1 = fitting.fit(mlp, loss, mlp_vars, x, y, tx=tx, steps=20, rng=0)
  n_cached = len(trainer_lib._cache)
  v2, l2 = fitting.fit(mlp, loss, mlp_vars, np.zeros_like(x), y, tx=tx, steps=20, rng=0)
  assert len(trainer_lib._cache) == n_cached  # zeroed inputs reuse the compiled step
  v3, l3 = fitting.fit(mlp, loss, mlp_vars, x, y, tx=tx, steps=20, rng=0)
  assert l1.shape == (20,) and l1[-1] < 0.5 * l1[0]
  np.testing.assert_array_equal(l1, l3)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v3)))
  assert not np.array_equal(l1, l2)


# ---------------------------------------------------------------- seed_determinism

@pytest.fixture(scope="module")
def train_fn(mlp, loss, tx, data):
  x, y = data[:2]

  def run(seed):
    v = mlp.init(jax.random.PRNGKey(seed), x[:2])
    v, _ = fitting.fit(mlp, loss, v, x, y, tx=tx, steps=5, rng=seed)
    return v["params"]
  return run


def test_seed_determinism_passes(train_fn):
  r = determinism.seed_determinism(train_fn)
  assert r.status == "pass", r.message
  assert "seed" in r.message


def test_seed_determinism_unseeded_noise_fails(train_fn):
  def noisy(seed):
    p = train_fn(seed)
    rng = np.random.default_rng()  # the planted bug: an unseeded random source
    return jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(a.dtype) * 1e-3, p)
  r = determinism.seed_determinism(noisy)
  assert r.status == "fail"
  assert "Dense_0" in r.value and "fix the random seed" in r.message.lower()


def test_seed_determinism_ignored_seed_warns(train_fn):
  r = determinism.seed_determinism(lambda seed: train_fn(0))
  assert r.status == "warn", r.message


# ---------------------------------------------------------------- loss_at_init

def test_loss_at_init_passes_near_ln_c(mlp, loss, mlp_vars, data):
  r = init.loss_at_init(mlp, loss, mlp_vars, data[0], data[1], num_classes=10)
  assert r.status == "pass", r.message
  assert abs(r.details["reference"] - np.log(10)) < 1e-5
  assert abs(r.value - np.log(10)) < 0.15 * np.log(10)


def test_loss_at_init_huge_init_scale_fails(mlp, loss, mlp_vars, data):
  # Kernels x100 is exactly MLP(init_scale=100) (the scale multiplies the kernel draws), and
  # reuses the compiled functions of `mlp`.
  v = {"params": jax.tree_util.tree_map_with_path(
      lambda p, a: a * 100.0 if "kernel" in jax.tree_util.keystr(p) else a,
      mlp_vars["params"])}
  r = init.loss_at_init(mlp, loss, v, data[0], data[1], num_classes=10)
  assert r.status == "fail", r.message
  assert r.value > 10 * np.log(10)
  assert "init scale" in r.message


def test_loss_at_init_registry_mlp_init_scale_100_fails(loss, data):
  from jrecipe.models import build_model
  from jrecipe.types import DataSpec
  spec = DataSpec(name="digits", task="classification", input_shape=(8, 8, 1), num_classes=10,
                  class_names=None, value_range=(0.0, 16.0), splits={"train": N})
  results = {}
  for scale in (1.0, 100.0):
    model = build_model({"name": "mlp", "hidden": (32,), "init_scale": scale}, spec)
    v = model.init(jax.random.PRNGKey(0), data[0][:2])
    results[scale] = init.loss_at_init(model, loss, v, data[0], data[1], num_classes=10)
  assert results[1.0].status == "pass", results[1.0].message
  assert results[100.0].status == "fail", results[100.0].message


def test_loss_at_init_uses_the_head_bias_as_reference(mlp, loss, mlp_vars, data):
  freq = np.bincount(data[1], minlength=10) / len(data[1])
  v = set_bias(mlp_vars, np.log(freq) - np.log(freq).mean())
  r = init.loss_at_init(mlp, loss, v, data[0], data[1], num_classes=10)
  assert r.status == "pass", r.message
  assert r.details["head_bias_set"]


# ---------------------------------------------------------------- init_bias

@pytest.fixture(scope="module")
def imbalanced():
  rs = np.random.RandomState(1)
  x = rs.randn(N, 8, 8, 1).astype(np.float32)
  y = (rs.rand(N) < 0.1).astype(np.int32)  # 90/10
  model = linen_model(MLP(num_outputs=2))
  v = model.init(jax.random.PRNGKey(0), x[:2])
  return model, v, x, y


def test_init_bias_imbalanced_lowers_the_init_loss(imbalanced, loss):
  model, v, x, y = imbalanced
  freq = np.bincount(y, minlength=2) / len(y)
  v_with = set_bias(v, np.log(freq) - np.log(freq).mean())
  r = init.init_bias(model, loss, v, v_with, x, y, num_classes=2)
  assert r.status == "pass", r.message
  assert r.details["loss_with"] < r.details["loss_without"] - 0.2
  assert r.details["tv_with"] < 0.05 < r.details["tv_without"]


def test_init_bias_not_set_on_imbalanced_data_warns(imbalanced, loss):
  model, v, x, y = imbalanced
  r = init.init_bias(model, loss, v, v, x, y, num_classes=2)
  assert r.status == "warn", r.message


def test_init_bias_wrong_bias_fails(imbalanced, loss):
  model, v, x, y = imbalanced
  freq = np.bincount(y, minlength=2) / len(y)
  wrong = set_bias(v, -(np.log(freq) - np.log(freq).mean()))  # priors reversed
  r = init.init_bias(model, loss, v, wrong, x, y, num_classes=2)
  assert r.status == "fail", r.message


def test_init_bias_balanced_passes_nearly_equal(mlp, loss, mlp_vars, data):
  freq = np.bincount(data[1], minlength=10) / len(data[1])
  v_with = set_bias(mlp_vars, np.log(freq) - np.log(freq).mean())
  r = init.init_bias(mlp, loss, mlp_vars, v_with, data[0], data[1], num_classes=10)
  assert r.status == "pass", r.message
  assert "nearly equal" in r.message


def test_init_bias_skips_svm(mlp, mlp_vars, data):
  r = init.init_bias(mlp, svm_loss(), mlp_vars, mlp_vars, data[0], data[1], num_classes=10)
  assert r.status == "skip"


# ---------------------------------------------------------------- regularization

def test_regularization_increases_loss(mlp, loss, tx, mlp_vars, data):
  r = regularization.regularization_increases_loss(mlp, loss, mlp_vars, data[0], data[1], tx=tx,
                                             steps=30, rng=0, train_strength=1e-1)
  assert r.status == "pass", r.message
  t = r.value
  assert all(b > a for a, b in zip(t, t[1:]))
  d = r.details
  assert d["trained_data_loss_with"] > d["trained_data_loss_without"]
  assert d["trained_penalty_with"] < d["trained_penalty_without"]


def test_regularization_wrong_sign_fails(mlp, loss, mlp_vars, data):
  r = regularization.regularization_increases_loss(mlp, loss, mlp_vars, data[0], data[1],
                                             strengths=(0.0, -1e-3, -1e-1))
  assert r.status == "fail", r.message


# ---------------------------------------------------------------- input-independent baseline

def test_input_independent_baseline_mlp_passes(mlp, loss, tx, mlp_vars, data):
  x, y, xv, yv = data
  r = baselines.input_independent_baseline(mlp, loss, mlp_vars, x, y, tx=tx, steps=30, rng=0,
                                          x_val=xv, y_val=yv)
  assert r.status == "pass", r.message
  assert r.details["evaluated_on"] == "held-out"
  assert r.details["accuracy_real"] > r.details["accuracy_zero"] + 0.3


@pytest.mark.parametrize("shuffled", [True, False])
def test_input_independent_baseline_labels_shuffled_apart_from_inputs_fail(shuffled, mlp, loss,
                                                                           mlp_vars):
  """The planted bug: training labels permuted apart from their inputs. Its held-out accuracy
  (12% against 7.5% for the zero-input model) passes the accuracy rule by chance, so only the
  label-shuffled control catches it: the given labels are learnt no faster than shuffled ones.
  The twin (the labels as they are) passes with the same data, budget and optimizer."""
  from sklearn.datasets import load_digits
  d = load_digits()
  idx = np.random.RandomState(0).permutation(len(d.target))
  x = d.images[idx].astype(np.float32)[..., None] / 16.0
  x, y = (x - x.mean()) / x.std(), d.target[idx].astype(np.int32)
  yt = np.random.default_rng(2).permutation(y[:1200]) if shuffled else y[:1200]
  r = baselines.input_independent_baseline(mlp, loss, mlp_vars, x[:1200], yt,
                                          tx=optax.adam(1e-3), steps=60, rng=0,
                                          x_val=x[1200:], y_val=y[1200:], batch_size=128)
  dd = r.details
  if not shuffled:
    assert r.status == "pass" and dd["decided_by"] == "loss", r.message
    return
  assert r.status == "fail", r.message
  assert dd["accuracy_real"] >= dd["accuracy_zero"] + dd["accuracy_margin"]  # the rule alone
  assert dd["train_loss_end_real"] > dd["train_loss_end_shuffled"] - dd["control_margin"], dd
  assert dd["control_steps"] == 60  # never ahead at the 50-step mark: the whole budget
  assert "learnt no faster than the same labels shuffled" in r.message


@pytest.mark.parametrize("held_out_shifted", [True, False])
def test_held_out_labels_that_do_not_fit_their_inputs_are_named_not_an_unused_input(
    held_out_shifted, mlp, loss, mlp_vars):
  """The planted bug: the held-out labels one class off ((y + 1) % 10, another class map in
  that split only). The model learns the training split (and faster than shuffled labels),
  yet scores zero held-out accuracy: the message names the held-out split, not 'the model
  is not using its input'. The twin (the held-out labels as they are) passes."""
  from sklearn.datasets import load_digits
  d = load_digits()
  idx = np.random.RandomState(0).permutation(len(d.target))
  x = d.images[idx].astype(np.float32)[..., None] / 16.0
  x, y = (x - x.mean()) / x.std(), d.target[idx].astype(np.int32)
  yv = (y[1200:] + 1) % 10 if held_out_shifted else y[1200:]
  r = baselines.input_independent_baseline(mlp, loss, mlp_vars, x[:1200], y[:1200],
                                          tx=optax.adam(1e-3), steps=60, rng=0,
                                          x_val=x[1200:], y_val=yv, batch_size=128)
  if not held_out_shifted:
    assert r.status == "pass", r.message
    return
  dd = r.details
  assert r.status == "fail" and dd["failure"] == "held_out", r.message
  assert dd["train_accuracy_real"] > dd["train_accuracy_zero"] + 0.5, dd
  assert dd["train_loss_end_real"] < dd["train_loss_end_shuffled"] - dd["control_margin"], dd
  assert "learnt the training split, yet predicts the held-out split" in r.message
  assert "not using its input" not in r.message


def test_the_label_shuffled_control_stops_once_the_given_labels_are_ahead(mlp, loss, mlp_vars):
  """The control compares the two training curves every 50 steps and stops at the first
  mark where the given labels are already learnt faster (the pass is reached); the verdict
  and the numbers are those of the curves up to that step."""
  from sklearn.datasets import load_digits
  from jrecipe.checks import fitting
  d = load_digits()
  x = (d.images[:600].astype(np.float32)[..., None] / 16.0 - 0.3) / 0.4
  y = d.target[:600].astype(np.int32)
  args = dict(tx=optax.adam(1e-3), steps=120, rng=0, batch_size=64)
  _, curve = fitting.fit(mlp, loss, mlp_vars, x, y, **args)
  details = {}
  learnt, text = baselines._shuffled_control(mlp, loss, mlp_vars, x, y, curve, details, **args)
  assert learnt and details["control_steps"] == 50, details
  assert "after 50 steps" in text
  assert details["train_loss_end_real"] == pytest.approx(float(np.mean(curve[45:50])))


def test_the_battery_trains_an_identical_short_run_once(mlp, loss, tx, mlp_vars, data,
                                                      monkeypatch):
  """Inside `shared_runs` (the battery), a `fit` identical to an earlier one (the baseline's
  real-input run is the capacity check's base run) returns that result without training;
  any different argument trains; outside it every call trains. The results are the ones a
  fresh run gives, bit for bit."""
  from jrecipe.checks import fitting
  from jrecipe.train import trainer as trainer_lib
  runs = []
  real = trainer_lib.Trainer.run
  monkeypatch.setattr(trainer_lib.Trainer, "run",
                      lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
  x, y = data[0], data[1]
  args = dict(tx=tx, steps=12, rng=0, batch_size=32)
  fresh_v, fresh_curve = fitting.fit(mlp, loss, mlp_vars, x, y, **args)
  with fitting.shared_runs():
    v1, c1 = fitting.fit(mlp, loss, mlp_vars, x, y, **args)
    v2, c2 = fitting.fit(mlp, loss, mlp_vars, x, y, **args)
    assert len(runs) == 2  # the fresh run and the first shared one
    fitting.fit(mlp, loss, mlp_vars, x.copy(), y, **args)  # another array: trains
    fitting.fit(mlp, loss, mlp_vars, x, y, **{**args, "steps": 13})
    assert len(runs) == 4
  fitting.fit(mlp, loss, mlp_vars, x, y, **args)
  assert len(runs) == 5
  assert np.array_equal(c1, fresh_curve) and np.array_equal(c2, fresh_curve)
  for a, b in zip(jax.tree.leaves(v2), jax.tree.leaves(fresh_v)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  with fitting.shared_runs():  # a caller's changes to its result do not reach the next caller
    v3, c3 = fitting.fit(mlp, loss, mlp_vars, x, y, **args)
    c3[0], v3["params"] = -1.0, None
    v4, c4 = fitting.fit(mlp, loss, mlp_vars, x, y, **args)
  assert np.array_equal(c4, fresh_curve) and v4["params"] is not None


def test_a_longer_shared_run_continues_a_kept_shorter_one_bit_for_bit(mlp, loss, tx, mlp_vars,
                                                                     data, monkeypatch):
  """With `snapshots`, a shared run keeps its state at those steps; a later run that asks for
  more steps continues the longest kept one (from that step) instead of starting again, and
  a shorter one at a kept step is a hit. Every result equals a fresh run's bit for bit (the
  battery: burn-in 5 -> baseline 12, regularization 8 is a prefix of the baseline)."""
  from jrecipe.checks import fitting
  from jrecipe.train import trainer as trainer_lib
  x, y = data[0], data[1]
  args = dict(tx=tx, rng=0, batch_size=32)
  fresh = {n: fitting.fit_metrics(mlp, loss, mlp_vars, x, y, steps=n, **args)
           for n in (5, 8, 12)}
  starts = []
  real = trainer_lib.Trainer.run
  monkeypatch.setattr(trainer_lib.Trainer, "run", lambda self, state, **k: starts.append(
      (k.get("start_step", 0), k.get("num_steps"))) or real(self, state, **k))
  with fitting.shared_runs(snapshots=(5, 8)):
    got = {5: fitting.fit_metrics(mlp, loss, mlp_vars, x, y, steps=5, **args),
           12: fitting.fit_metrics(mlp, loss, mlp_vars, x, y, steps=12, **args),
           8: fitting.fit_metrics(mlp, loss, mlp_vars, x, y, steps=8, **args)}
  assert starts == [(0, 5), (5, 7)]  # 12 continued from 5; 8 was kept on the way
  for n, (v, m) in got.items():
    fv, fm = fresh[n]
    assert m["steps"] == n and m["bad_step"] == fm["bad_step"]
    assert np.array_equal(m["loss"], fm["loss"]) and np.array_equal(m["accuracy"],
                                                                    fm["accuracy"])
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(fv)):
      assert np.array_equal(np.asarray(a), np.asarray(b)), n


# The planted-bug models have the parameters of MLP(), so they reuse `mlp_vars` (no init).


@pytest.fixture(scope="module")
def stop_gradient_model():
  return linen_model(MLP(bug="stop_gradient"))


@pytest.mark.parametrize("bug", ["zero_input", "noise_input"])
def test_input_independent_baseline_input_replaced_inside_model_fails(bug, loss, tx, mlp_vars,
                                                                      data):
  model = linen_model(MLP(bug=bug))
  x, y, xv, yv = data
  r = baselines.input_independent_baseline(model, loss, mlp_vars, x, y, tx=tx, steps=30, rng=0,
                                          x_val=xv, y_val=yv)
  assert r.status == "fail", r.message
  assert "not using its input" in r.message


# ---------------------------------------------------------------- overfit one batch

def test_overfit_one_batch_passes_with_plot(mlp, loss, tx, mlp_vars, data, tmp_path):
  r = overfit.overfit_one_batch(mlp, loss, mlp_vars, data[0][:10], data[1][:10], tx=tx,
                                 steps=150, rng=0, artifacts_dir=str(tmp_path))
  assert r.status == "pass", r.message
  assert r.details["accuracy"] == 1.0 and r.value <= r.details["threshold"]
  # Memorised by the 50-step mark: the run stops there instead of training 150 steps.
  assert r.details["steps_taken"] == 50 and "in 50 of 150 steps" in r.message, r.message
  assert r.artifacts and os.path.getsize(r.artifacts[0]) > 1000
  assert r.artifacts[0].endswith("overfit_one_batch.png")


def test_overfit_one_batch_unlearnable_batch_fails(mlp, loss, tx, mlp_vars, data):
  x = np.repeat(data[0][:1], 10, axis=0)  # the same input ten times...
  y = np.arange(10, dtype=np.int32)  # ...with ten different labels
  r = overfit.overfit_one_batch(mlp, loss, mlp_vars, x, y, tx=tx, steps=150, rng=0)
  assert r.status == "fail", r.message
  assert r.details["steps_taken"] == 150  # never memorised: the whole budget, no early stop


def test_overfit_one_batch_detached_output_fails(stop_gradient_model, loss, tx, mlp_vars,
                                                 data):
  r = overfit.overfit_one_batch(stop_gradient_model, loss, mlp_vars, data[0][:10],
                                 data[1][:10], tx=tx, steps=150, rng=0)
  assert r.status == "fail", r.message
  assert "detached" in r.message


def test_overfit_one_batch_turns_dropout_off(loss, tx, mlp_vars, data):
  model = linen_model(MLP(dropout=0.5))
  assert model.has_dropout
  r = overfit.overfit_one_batch(model, loss, mlp_vars, data[0][:10], data[1][:10], tx=tx,
                                 steps=150, rng=0)
  assert r.status == "pass", r.message
  assert r.details["dropout_disabled"]


# ---------------------------------------------------------------- capacity

def test_capacity_wider_goes_lower(mlp, loss, tx, mlp_vars, data):
  r = overfit.capacity_decreases_loss(mlp, loss, mlp_vars, data[0], data[1], tx=tx,
                                       steps=30, rng=0, factor=4)
  assert r.status == "pass", r.message
  assert r.details["wide_final_loss"] < r.details["final_loss"] < r.details["init_loss"]


def test_capacity_loss_not_decreasing_fails(stop_gradient_model, loss, tx, mlp_vars, data):
  # The overfit test's batch shape: the compiled step of the detached model is reused.
  r = overfit.capacity_decreases_loss(stop_gradient_model, loss, mlp_vars, data[0][:10],
                                       data[1][:10], tx=tx, steps=30, rng=0)
  assert r.status == "fail", r.message
  assert "not going down" in r.message


def test_capacity_skips_without_widen(mlp, loss, tx, mlp_vars, data):
  model = dataclasses.replace(mlp, widen=None)  # same functions: same compiled step
  r = overfit.capacity_decreases_loss(model, loss, mlp_vars, data[0][:10], data[1][:10],
                                       tx=tx, steps=30, rng=0)
  assert r.status == "skip", r.message


@pytest.mark.parametrize("frozen,pretrained,status", [
    (False, False, "pass"), (True, False, "fail"), (True, True, "warn")])
def test_state_updates_finds_one_batchnorm_that_never_learns(loss, tx, data, frozen,
                                                             pretrained, status):
  """'Careful with BN': `use_running_average=True` written into one BatchNorm of two: the
  whole state still moves, yet that layer normalises with mean 0 / variance 1 forever. A fail
  naming it; a warn when the parameters come from init_from (frozen on purpose?)."""
  from jrecipe.checks.stochastic import state_updates
  from tests.planted import _TwoBNMLP, linen_bn_model  # pylint: disable=protected-access
  x, y = data[0][:256], data[1][:256]
  model = linen_bn_model(_TwoBNMLP(10, frozen=frozen))
  variables = model.init(jax.random.PRNGKey(0), x[:2])
  r = state_updates(model, loss, variables, x, y, tx=tx, steps=3, rng=0, batch_size=32,
                    pretrained=pretrained)
  assert r.status == status, r.message
  if frozen:
    assert r.details["frozen_layers"] == ["batch_stats/bn2"]
    assert "1 of 2 layers: batch_stats/bn2" in r.message
    assert "use_running_average=True" in r.message


def test_the_baseline_extends_its_budget_while_the_loss_still_falls():
  """A correct model that has not started using its input within the budget (20 steps of
  Adam 5e-4 here; an LM1B-style decoder within 150 on digit sequences) gets x2, then x4
  while its training loss is still falling, and passes; an input-ignoring model still fails."""
  from jrecipe.checks.baselines import check_input_independent_baseline
  from tests import check_cases, planted
  kit = check_cases.make_kit()
  ctx = dataclasses.replace(kit.ctx, steps=20, tx=optax.adam(5e-4))
  with fitting.shared_runs(snapshots=(20, 40)):
    r = check_input_independent_baseline(ctx)
  assert r.status == "pass", r.message
  assert r.details["budget_extended_from"] == 20 and "after 40 steps" in r.message
  assert "budget_steps=20 extended to 40 while the training loss" in r.message
  mlp_cls = planted._MLP  # pylint: disable=protected-access
  blind = planted.linen_model(mlp_cls(10, zero_input=True), has_dropout=True)
  ctx = dataclasses.replace(ctx, model=blind, variables=blind.init(jax.random.PRNGKey(0),
                                                                   kit.x[:2]))
  with fitting.shared_runs(snapshots=(20, 40)):
    r = check_input_independent_baseline(ctx)
  assert r.status == "fail" and "not using its input" in r.message, r.message


def test_overfit_almost_there_is_measured_again_with_more_steps():
  """An 'almost there' warn (100% accuracy, loss not yet at the threshold: 100 steps of Adam
  1e-3 here, Flax's ImageNet ResNet in 500) is re-measured with x2 then x4 the steps; a model
  that passes within its budget is not extended."""
  from jrecipe.checks.overfit import check_overfit_one_batch
  from tests import check_cases
  kit = check_cases.make_kit()
  cfg = kit.ctx.config.copy_and_resolve_references()
  cfg.checks.overfit_steps = 100
  ctx = dataclasses.replace(kit.ctx, config=cfg, tx=optax.adam(1e-3))
  r = check_overfit_one_batch(ctx)
  assert r.status == "pass", r.message
  assert r.details["budget_extended_from"] == 100 and "in 200 steps" in r.message, r.message
  assert "overfit_steps=100 extended to 200" in r.message
  cfg.checks.overfit_steps = 400  # passes within its own budget: no extension
  r = check_overfit_one_batch(dataclasses.replace(ctx, config=cfg))
  assert r.status == "pass" and "budget_extended_from" not in r.details, r.message


def bce_plain(outputs, labels):
  """A sigmoid cross-entropy on one-hot labels: C ln 2 at zero logits, not ln C."""
  return jnp.sum(optax.sigmoid_binary_cross_entropy(
      outputs, jax.nn.one_hot(labels, outputs.shape[-1])), -1)


def bce_factory(spec):
  return Loss(name="bce", per_example=bce_plain, expects="logits",
              chance=lambda c, t: c * np.log(2.0), predict=lambda o: jnp.argmax(o, -1))


def test_loss_at_init_tells_a_loss_of_another_kind_how_to_declare_its_chance(mlp, mlp_vars,
                                                                            data):
  """A user's plain loss function is taken for a softmax cross-entropy: a sigmoid BCE given
  that way fails loss_at_init, and the message names the factory form; given as a factory
  with its own chance (C ln 2) that is its reference, and no fail."""
  from jrecipe.losses import build_loss
  from jrecipe.types import DataSpec
  spec = DataSpec("digits", "classification", (8, 8, 1), 10, None, (0, 16), {})
  x, y = data[0][:256], data[1][:256]
  plain = build_loss("tests.test_checks_training:bce_plain", spec)
  r = init.loss_at_init(mlp, plain, mlp_vars, x, y, num_classes=10)
  assert r.status == "fail" and "Your own loss" in r.message and "chance" in r.message, r.message
  declared = build_loss("tests.test_checks_training:bce_factory", spec)
  r = init.loss_at_init(mlp, declared, mlp_vars, x, y, num_classes=10)
  assert r.status != "fail" and "vs 6.931 expected" in r.message, r.message  # 10 ln 2
  r = init.loss_at_init(mlp, xent_loss(), mlp_vars, x, y, num_classes=10)
  assert "Your own loss" not in r.message
