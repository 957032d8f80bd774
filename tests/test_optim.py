"""jrecipe.optim: schedules against closed forms, optimizers on a quadratic, plateau scaling."""

import json
import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jrecipe import optim
from jrecipe.train import patience
from jrecipe.errors import UserError

SPE = 10  # steps per epoch in these tests
TOTAL = 100


def sched(cfg, base=1.0, spe=SPE, total=TOTAL):
  return optim.make_schedule(ml_collections.ConfigDict(cfg), base, steps_per_epoch=spe,
                             total_steps=total)


def values(fn, steps):
  return np.asarray(fn(jnp.asarray(steps)), np.float64)


def ramp(t, w):
  return np.minimum(1.0, (np.asarray(t) + 1.0) / w) if w else np.ones(np.shape(t))


T = np.array([0, 1, 4, 9, 10, 19, 20, 25, 49, 50, 51, 99, 100, 150])
# (unit, warmup in that unit, warm-up steps) -- the same schedules stated in steps and epochs.
UNITS = [('steps', 0, 0), ('epochs', 0, 0), ('steps', 5, 5), ('epochs', 0.5, 5)]


def in_unit(unit, steps):
  return steps / SPE if unit == 'epochs' else steps


@pytest.mark.parametrize('unit,warmup,w', UNITS)
def test_constant(unit, warmup, w):
  fn = sched({'name': 'constant', 'unit': unit, 'warmup': warmup}, base=0.3)
  np.testing.assert_allclose(values(fn, T), 0.3 * ramp(T, w), rtol=1e-6)


@pytest.mark.parametrize('unit,warmup,w', UNITS)
def test_step_boundaries(unit, warmup, w):
  fn = sched({'name': 'step', 'unit': unit, 'warmup': warmup,
              'boundaries': (in_unit(unit, 20), in_unit(unit, 50)), 'decay_factor': 0.1})
  expected = 0.1 ** ((T >= 20).astype(float) + (T >= 50)) * ramp(T, w)
  np.testing.assert_allclose(values(fn, T), expected, rtol=1e-6)


def test_step_boundaries_in_epochs_land_on_epoch_starts():
  fn = sched({'name': 'step', 'unit': 'epochs', 'boundaries': (3, 7), 'decay_factor': 0.5},
             spe=13, total=200)
  for b, before, after in ((3, 1.0, 0.5), (7, 0.5, 0.25)):
    assert float(fn(b * 13 - 1)) == before and float(fn(b * 13)) == after


@pytest.mark.parametrize('unit,warmup,w', UNITS)
def test_step_every(unit, warmup, w):
  # CS231n: 'halve the learning rate every 3 epochs'.
  fn = sched({'name': 'step', 'unit': unit, 'warmup': warmup, 'every': in_unit(unit, 30),
              'decay_factor': 0.5}, base=2.0)
  np.testing.assert_allclose(values(fn, T), 2.0 * 0.5 ** (T // 30) * ramp(T, w), rtol=1e-6)


@pytest.mark.parametrize('unit,warmup,w', UNITS)
def test_exponential_and_inverse_time(unit, warmup, w):
  k = 0.3 if unit == 'epochs' else 0.03  # the same decay per step
  t_units = in_unit(unit, T.astype(float))
  exp_fn = sched({'name': 'exponential', 'unit': unit, 'warmup': warmup, 'decay_rate': k}, 0.5)
  np.testing.assert_allclose(values(exp_fn, T), 0.5 * np.exp(-k * t_units) * ramp(T, w),
                             rtol=1e-5)
  inv_fn = sched({'name': 'inverse_time', 'unit': unit, 'warmup': warmup, 'decay_rate': k}, 0.5)
  np.testing.assert_allclose(values(inv_fn, T), 0.5 / (1 + k * t_units) * ramp(T, w), rtol=1e-5)


@pytest.mark.parametrize('unit,warmup,w', UNITS)
def test_cosine(unit, warmup, w):
  fn = sched({'name': 'cosine', 'unit': unit, 'warmup': warmup, 'end_value': 0.1,
              'decay_steps': in_unit(unit, 60)})
  p = np.minimum(T / 60, 1)
  expected = (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * p))) * ramp(T, w)
  np.testing.assert_allclose(values(fn, T), expected, rtol=1e-5, atol=1e-7)
  if not w:  # the same curve as optax's (alpha is the final fraction there too)
    ref = optax.cosine_decay_schedule(1.0, 60, alpha=0.1)
    np.testing.assert_allclose(values(fn, T), values(ref, T), rtol=1e-5)


def test_cosine_whole_run_and_alpha_synonym():
  fn = sched({'name': 'cosine', 'alpha': 0.2})  # decay_steps 0 = total_steps
  np.testing.assert_allclose(values(fn, [0, 50, 100, 120]), [1.0, 0.6, 0.2, 0.2], rtol=1e-5)


@pytest.mark.parametrize('unit', ['steps', 'epochs'])
def test_warmup_cosine_starts_decay_after_warmup(unit):
  fn = sched({'name': 'warmup_cosine', 'unit': unit, 'warmup': in_unit(unit, 10),
              'end_value': 0.0}, base=0.4)
  expected = 0.4 * 0.5 * (1 + np.cos(np.pi * np.clip((T - 10) / 90, 0, 1))) * ramp(T, 10)
  np.testing.assert_allclose(values(fn, T), expected, rtol=1e-5, atol=1e-7)
  assert float(fn(9)) == pytest.approx(0.4) and float(fn(10)) == pytest.approx(0.4)
  after = T[T >= 10]  # after warm-up it is optax's warmup_cosine_decay_schedule
  ref = optax.warmup_cosine_decay_schedule(0.0, 0.4, 10, 100, end_value=0.0)
  np.testing.assert_allclose(values(fn, after), values(ref, after), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('unit,warmup,w', UNITS)
def test_linear(unit, warmup, w):
  fn = sched({'name': 'linear', 'unit': unit, 'warmup': warmup, 'end_value': 0.5,
              'decay_steps': in_unit(unit, 40)}, base=2.0)
  expected = 2.0 * (1 - 0.5 * np.minimum(T / 40, 1)) * ramp(T, w)
  np.testing.assert_allclose(values(fn, T), expected, rtol=1e-6)


OPTAX_TWINS = [  # (jrecipe schedule in steps, the optax schedule it adapts)
    ({'name': 'step', 'boundaries': (20, 50), 'decay_factor': 0.1},
     optax.piecewise_constant_schedule(1.0, {20: 0.1, 50: 0.1})),
    ({'name': 'step', 'every': 30, 'decay_factor': 0.5},
     optax.exponential_decay(1.0, 30, 0.5, staircase=True)),
    ({'name': 'exponential', 'decay_rate': 0.03},
     optax.exponential_decay(1.0, 1, math.exp(-0.03))),
    ({'name': 'cosine', 'end_value': 0.1, 'decay_steps': 60},
     optax.cosine_decay_schedule(1.0, 60, alpha=0.1)),
    ({'name': 'linear', 'end_value': 0.25, 'decay_steps': 40}, optax.linear_schedule(1.0, 0.25, 40)),
    ({'name': 'constant'}, optax.constant_schedule(1.0)),
]


@pytest.mark.parametrize('cfg,ref', OPTAX_TWINS)
def test_named_schedules_are_optax_schedules(cfg, ref):
  fn = sched(dict(cfg, unit='steps'))
  np.testing.assert_allclose(values(fn, T), values(ref, T), rtol=1e-6, atol=1e-7)


def test_missing_fields_take_the_base_config_defaults():
  from jrecipe.config_base import base_config
  base = base_config().schedule
  partial = sched({'name': 'step', 'boundaries': (2, 5)})  # no unit: the base config's
  full = sched(dict(base.to_dict(), name='step', boundaries=(2, 5)))
  np.testing.assert_array_equal(values(partial, T), values(full, T))
  # alpha, optax's name for the end fraction, may be given beside the default end_value.
  fn = sched({'name': 'cosine', 'end_value': 0.0, 'alpha': 0.2})
  assert float(fn(TOTAL)) == pytest.approx(0.2)


def test_schedule_table():
  fn = sched({'name': 'linear', 'end_value': 0.0})
  steps, vals = optim.schedule_table(fn, TOTAL, n=11)
  np.testing.assert_array_equal(steps, np.round(np.linspace(0, 99, 11)))
  np.testing.assert_allclose(vals, 1 - steps / 100, rtol=1e-6, atol=1e-7)
  steps, vals = optim.schedule_table(lambda s: 0.5 if s < 3 else 0.25, 6)  # not vectorised
  np.testing.assert_allclose(vals, [0.5, 0.5, 0.5, 0.25, 0.25, 0.25])


def quadratic(p):
  return 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * (p['w'] - jnp.array([1.0, -2.0])) ** 2)


def opt_cfg(**kw):
  return ml_collections.ConfigDict(dict({'name': 'adam', 'learning_rate': 0.1}, **kw))


def make(opt, sched_cfg=None, mom=None, spe=SPE, total=TOTAL):
  return optim.make_optimizer(opt, sched_cfg, mom, steps_per_epoch=spe, total_steps=total)


def step_once(tx, opt, params, state):
  value, grads = jax.value_and_grad(quadratic)(params)
  extra = {'value': value, 'grad': grads, 'value_fn': quadratic}
  updates, state = tx.update(grads, state, params, **(extra if optim.needs_value_fn(opt) else {}))
  return optax.apply_updates(params, updates), state


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_each_optimizer_reduces_a_quadratic(name):
  opt = opt_cfg(name=name, learning_rate=1.0 if name == 'lbfgs' else 0.1)
  tx = make(opt)
  params = {'w': jnp.zeros(2)}
  new_params, state = step_once(tx, opt, params, tx.init(params))
  assert float(quadratic(new_params)) < float(quadratic(params))
  assert set(state.hyperparams) >= {'learning_rate'}
  assert optim.needs_value_fn(opt) == (name == 'lbfgs')


def test_lbfgs_solves_the_quadratic_full_batch():
  opt = opt_cfg(name='lbfgs', learning_rate=1.0)
  tx = make(opt)
  params = {'w': jnp.zeros(2)}
  state = tx.init(params)
  for _ in range(6):
    params, state = step_once(tx, opt, params, state)
  np.testing.assert_allclose(params['w'], [1.0, -2.0], atol=1e-5)


def test_adamw_decays_weight_matrices_only_and_custom_import_path():
  """Recipe stage 4: AdamW's decay acts on the kernel, not on the bias or a norm scale (nor a
  2-D leaf named bias), the rule of the L2 penalty."""
  tx = make(opt_cfg(name='adamw', learning_rate=0.1, weight_decay=0.5))
  params = {'dense': {'kernel': jnp.array([[2.0, -4.0]]), 'bias': jnp.array([1.0, 3.0])},
            'norm': {'scale': jnp.array([1.5])}, 'attn': {'bias': jnp.ones((2, 2))}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates['dense']['kernel'], -0.1 * 0.5 * params['dense']['kernel'],
                             rtol=1e-6)
  for leaf in (updates['dense']['bias'], updates['norm']['scale'], updates['attn']['bias']):
    np.testing.assert_array_equal(leaf, 0.0)
  params = {'w': jnp.array([2.0, -4.0])}
  tx = make(opt_cfg(name='optax:sgd', learning_rate=0.5))  # your own factory(learning_rate)
  updates, _ = tx.update({'w': jnp.ones(2)}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], [-0.5, -0.5])


def run_updates(tx, params, grads, n):
  """n jitted updates; returns the learning rate read before each update and the updates."""
  @jax.jit
  def update(state):
    lr = optim.current_learning_rate(state)
    updates, state = tx.update(grads, state, params)
    return lr, updates, state
  state, lrs, ups = tx.init(params), [], []
  for _ in range(n):
    lr, updates, state = update(state)
    lrs.append(float(lr))
    ups.append(np.asarray(updates['w']))
  return np.array(lrs), ups, state


def test_current_learning_rate_is_the_rate_each_step_applies():
  sched_cfg = {'name': 'step', 'unit': 'steps', 'boundaries': (3,), 'warmup': 2}
  tx = make(opt_cfg(name='sgd', learning_rate=1.0), sched_cfg)
  params, grads = {'w': jnp.zeros(2)}, {'w': jnp.ones(2)}
  lrs, ups, state = run_updates(tx, params, grads, 6)
  np.testing.assert_allclose(lrs, [0.5, 1, 1, 0.1, 0.1, 0.1], rtol=1e-6)
  np.testing.assert_allclose([u[0] for u in ups], -lrs, rtol=1e-6)  # sgd: update = -lr * g
  assert float(optim.current_learning_rate(state)) == pytest.approx(0.1)
  # Found through wrappers too (e.g. a chain around the optimizer).
  assert float(optim.current_learning_rate((optax.EmptyState(), state))) == pytest.approx(0.1)


def test_momentum_schedule_values_and_use():
  mom = {'name': 'linear', 'start': 0.5, 'end': 0.99, 'unit': 'epochs', 'decay_steps': 1}
  tx = make(opt_cfg(name='momentum', learning_rate=1.0), None, mom, spe=4)
  params, grads = {'w': jnp.zeros(1)}, {'w': jnp.ones(1)}
  state = tx.init(params)
  mus, ups = [], []
  for _ in range(6):
    mus.append(float(state.hyperparams['momentum']))
    updates, state = tx.update(grads, state, params)
    ups.append(float(updates['w'][0]))
  expected_mu = 0.5 + 0.49 * np.minimum(np.arange(6) / 4, 1)
  np.testing.assert_allclose(mus, expected_mu, rtol=1e-6)
  # Heavy ball with a constant gradient: v_k = mu_k v_{k-1} + g, update = -lr v_k.
  v, expected_up = 0.0, []
  for mu in expected_mu:
    v = mu * v + 1.0
    expected_up.append(-v)
  np.testing.assert_allclose(ups, expected_up, rtol=1e-5)


def test_constant_momentum_uses_optimizer_momentum():
  # The base config keeps start/end in a 'constant' momentum schedule: they are ignored.
  mom = {'name': 'constant', 'start': 0.5, 'end': 0.99}
  tx = make(opt_cfg(name='nesterov', momentum=0.8), None, mom)
  state = tx.init({'w': jnp.zeros(1)})
  assert float(state.hyperparams['momentum']) == pytest.approx(0.8)


def test_momentum_starting_at_zero():
  mom = {'name': 'linear', 'start': 0.0, 'end': 0.9, 'unit': 'steps', 'decay_steps': 10}
  tx = make(opt_cfg(name='momentum'), None, mom)
  _, _, state = run_updates(tx, {'w': jnp.zeros(1)}, {'w': jnp.ones(1)}, 5)
  assert float(state.hyperparams['momentum']) == pytest.approx(0.45)


def test_grad_clipping_caps_the_global_norm():
  tx = make(opt_cfg(name='sgd', learning_rate=1.0, grad_clip_norm=1.0))
  params = {'a': jnp.zeros(2), 'b': jnp.zeros(1)}
  big = {'a': jnp.array([3.0, 0.0]), 'b': jnp.array([4.0])}  # global norm 5
  updates, _ = tx.update(big, tx.init(params), params)
  assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-6)
  np.testing.assert_allclose(updates['a'], [-0.6, 0.0], rtol=1e-6)
  small = {'a': jnp.array([0.3, 0.0]), 'b': jnp.array([0.4])}
  updates, _ = tx.update(small, tx.init(params), params)
  np.testing.assert_allclose(updates['b'], [-0.4], rtol=1e-6)


def test_base_config_defaults_build():
  from jrecipe.config_base import base_config
  c = base_config()
  tx = make(c.optimizer, c.schedule, c.momentum_schedule)
  state = tx.init({'w': jnp.zeros(3)})
  assert float(optim.current_learning_rate(state)) == pytest.approx(3e-4)


def test_plateau_scaler_reduces_after_patience_and_round_trips():
  s = patience.PlateauScaler(factor=0.5, patience=2, min_scale=0.2)
  assert [s.update(x) for x in (1.0, 0.9, 0.95, 0.92)] == [1.0, 1.0, 1.0, 0.5]
  assert s.update(0.8) == 0.5  # an improvement resets the count
  assert [s.update(x) for x in (0.8, float('nan'))] == [0.5, 0.25]
  assert [s.update(0.9) for _ in range(4)] == [0.25, 0.2, 0.2, 0.2]  # floor at min_scale
  # 0.8 * (1 - 1e-4) is the bar: a tiny improvement does not count.
  t = patience.PlateauScaler(patience=1)
  assert [t.update(x) for x in (0.8, 0.79999)] == [1.0, 0.5]

  a = patience.PlateauScaler(factor=0.5, patience=3)
  for x in (1.0, 0.9, 0.95, 0.96):
    a.update(x)
  b = patience.PlateauScaler(factor=0.5, patience=3)
  b.load_state_dict(json.loads(json.dumps(a.state_dict())))
  more = (0.97, 0.85, 0.9, 0.9, 0.9, 0.7)
  assert [a.update(x) for x in more] == [b.update(x) for x in more]
  assert a.state_dict() == b.state_dict() and a.num_reductions == 2
  json.dumps(patience.PlateauScaler().state_dict())  # fresh state (no best yet) is JSON too


def test_decay_that_misfits_the_run_is_logged(caplog):
  caplog.set_level(logging.WARNING)
  make(opt_cfg(), {'name': 'step', 'unit': 'epochs', 'boundaries': (30, 60)})
  assert 'never apply' in caplog.text and "Don't trust" in caplog.text
  caplog.clear()
  make(opt_cfg(), {'name': 'exponential', 'unit': 'epochs', 'decay_rate': 1.0})
  assert 'reaches' in caplog.text


BAD = [
    ({'name': 'adamm'}, None, None, 'sgd, momentum, nesterov'),
    (None, {'name': 'cosin'}, None, 'constant, step, exponential'),
    (None, {'name': 'step', 'unit': 'days', 'every': 1}, None, "'steps' or 'epochs'"),
    ({'learning_rate': -0.1}, None, None, 'learning_rate'),
    (None, {'name': 'exponential', 'decay_rate': -1.0}, None, 'decay_rate'),
    (None, {'name': 'exponential'}, None, 'k > 0'),
    (None, {'name': 'step', 'boundaries': (5, 3)}, None, 'strictly increasing'),
    (None, {'name': 'step', 'unit': 'epochs', 'boundaries': (1.0, 1.01)}, None, 'increasing'),
    (None, {'name': 'step'}, None, 'exactly one of'),
    (None, {'name': 'step', 'boundaries': (5,), 'decay_factor': -0.5}, None, 'decay_factor'),
    (None, {'name': 'warmup_cosine'}, None, 'warmup > 0'),
    (None, {'name': 'cosine', 'end_value': 0.1, 'alpha': 0.2}, None, 'disagree'),
    (None, {'warmup': -1}, None, 'warmup'),
    ({'name': 'adam', 'weight_decay': 1e-4}, None, None, 'config.l2'),
    ({'name': 'lbfgs'}, None, None, 'learning_rate=1.0'),
    ({'name': 'lbfgs', 'learning_rate': 1.0, 'grad_clip_norm': 1.0}, None, None, 'line search'),
    ({'name': 'adam'}, None, {'name': 'linear', 'end': 0.99}, "'momentum' and 'nesterov'"),
    ({'name': 'momentum', 'momentum': 1.0}, None, None, '[0, 1)'),
    ({'name': 'momentum'}, None, {'name': 'linear', 'start': 0.5, 'end': 1.2}, '[0, 1)'),
    ({'name': 'momentum'}, None, {'name': 'step', 'every': 1, 'decay_factor': 2.0}, '[0, 1)'),
    ({'grad_clip_norm': -1.0}, None, None, 'grad_clip_norm'),
]


@pytest.mark.parametrize('opt,sched_cfg,mom,words', BAD)
def test_bad_configs_raise_user_error(opt, sched_cfg, mom, words):
  opt = ml_collections.ConfigDict(dict({'name': 'adam', 'learning_rate': 0.1}, **(opt or {})))
  with pytest.raises(UserError, match=None) as e:
    make(opt, sched_cfg, mom)
  assert words in str(e.value)


def test_bad_run_lengths_and_plateau_arguments():
  with pytest.raises(UserError, match='steps_per_epoch'):
    optim.make_schedule({}, 1.0, steps_per_epoch=0, total_steps=10)
  for kw in ({'factor': 1.5}, {'patience': 0}, {'min_scale': 0.0}, {'threshold': -1.0}):
    with pytest.raises(UserError):
      patience.PlateauScaler(**kw)
  assert math.isclose(patience.PlateauScaler().update(1.0), 1.0)


def test_a_shipped_config_with_adamw_and_weight_decay_passes_the_weight_decay_check():
  """The battery's own weight_decay check (recipe stage 4) on digits_mlp with AdamW: the
  stock optimizer decays the kernels only, so it passes (optax.adamw without a mask failed)."""
  import os
  from jrecipe import experiment
  from jrecipe.checks.pytest_plugin import load_config
  from jrecipe.checks.runner import run_battery
  from tests.helpers import REPO
  cfg = load_config(os.path.join(REPO, 'configs', 'digits_mlp.py'))
  cfg.optimizer.name, cfg.optimizer.weight_decay = 'adamw', 1e-2
  [result] = run_battery(experiment.build(cfg), only=['weight_decay'])
  assert result.status == 'pass', result.message
  assert result.details['decayed_leaves'] and all(
      'kernel' in k for k in result.details['decayed_leaves']), result.details
