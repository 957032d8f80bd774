"""Planted bugs for 'use backprop to chart dependencies': batch mixing and causal leaks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jrecipe.checks.dependencies import (batch_independence, causal_dependency,
                                         causal_skip_reason)
from jrecipe.types import DataSpec


def linen_apply(module):
  """A Model.apply for a Linen module taking `train` (BatchNorm updates discarded)."""
  def apply(variables, x, train=False, rngs=None):
    mutable = [k for k in variables if k != "params"] if train else False
    if mutable:
      return module.apply(variables, x, train=train, rngs=rngs, mutable=mutable)[0]
    return module.apply(variables, x, train=train, rngs=rngs)
  return apply


class MLP(nn.Module):
  mix_batch: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(6)(x)
    if self.mix_batch:  # the view-vs-transpose bug: reshape where a transpose was meant
      h = h.reshape(h.shape[1], h.shape[0]).T
    h = nn.Dropout(0.5, deterministic=not train)(jnp.tanh(h))
    return nn.Dense(3)(h)


class BNNet(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.BatchNorm(use_running_average=not train)(nn.Dense(6)(x))
    return nn.Dense(3)(nn.relu(h))


class Attention(nn.Module):
  """One causal self-attention layer; `k` is jnp.tril's diagonal offset (0 is correct)."""
  k: int = 0
  vocab: int = 0  # > 0: integer token inputs through an embedding
  shift: bool = False  # shift inputs right by one: output t sees only inputs < t
  pad_id: int = -1  # >= 0: LM1B's padding mask too (query and key tokens != pad_id)

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Embed(self.vocab, 8)(x) if self.vocab else nn.Dense(8)(x)
    if self.shift:
      h = jnp.concatenate([jnp.zeros_like(h[:, :1]), h[:, :-1]], axis=1)
    t = h.shape[1]
    q, k, v = nn.Dense(8)(h), nn.Dense(8)(h), nn.Dense(8)(h)
    s = jnp.einsum("btd,bsd->bts", q, k) / jnp.sqrt(8.0)
    mask = jnp.tril(jnp.ones((t, t), bool), k=self.k)
    if self.pad_id >= 0:
      real = x != self.pad_id
      mask = mask & real[:, :, None] & real[:, None, :]
    w = jax.nn.softmax(jnp.where(mask, s, -1e9), axis=-1)
    return nn.Dense(5)(jnp.einsum("bts,bsd->btd", w, v) + h)


def _build(module, x):
  return module, linen_apply(module), jax.jit(module.init)(jax.random.key(0), x)


RNG = np.random.default_rng(0)  # numpy data: no compilations for drawing test inputs


@pytest.fixture(scope="module")
def x_flat():
  return jnp.asarray(RNG.normal(size=(6, 4)), jnp.float32)


@pytest.fixture(scope="module")
def x_seq():
  return jnp.asarray(RNG.normal(size=(2, 6, 3)), jnp.float32)


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(RNG.integers(0, 11, size=(2, 6)), jnp.int32)


def test_batch_independence_passes_correct_mlp_with_dropout(x_flat, tmp_path):
  _, apply, variables = _build(MLP(), x_flat)
  r = batch_independence(apply, variables, x_flat, artifacts_dir=str(tmp_path))
  assert r.name == "batch_independence" and r.status == "pass", r.message
  assert r.value == 0.0 and r.expected == 0.0
  assert r.artifacts and os.path.exists(r.artifacts[0])
  assert r.artifacts[0].endswith("batch_dependency.png")
  assert set(r.details["modes"]) == {"eval", "train"}


def test_batch_independence_catches_reshape_that_mixes_the_batch(x_flat):
  _, apply, variables = _build(MLP(mix_batch=True), x_flat)
  r = batch_independence(apply, variables, x_flat)
  assert r.status == "fail", r.message
  assert "eval mode" in r.message and "reshape" in r.message
  assert r.value > 1e-3 and r.artifacts == []


def test_batchnorm_couples_train_mode_only(x_flat):
  _, apply, variables = _build(BNNet(), x_flat)
  r = batch_independence(apply, variables, x_flat, has_batchnorm=True)
  assert r.status == "pass", r.message  # legitimate: no false alarm on a correct BN model
  assert "BatchNorm" in r.message
  assert r.details["modes"]["eval"]["max_rel_offdiag"] == 0.0
  assert r.details["modes"]["train"]["max_rel_offdiag"] > 1e-3
  # Not declared as BatchNorm: train-mode coupling is a bug.
  assert batch_independence(apply, variables, x_flat).status == "fail"


def test_batch_independence_token_inputs_by_perturbation(tokens, attn_tokens):
  r = batch_independence(linen_apply(Attention(vocab=11)), attn_tokens, tokens)
  assert r.status == "pass", r.message
  assert r.details["method"] == "perturbation"


@pytest.fixture(scope="module")
def attn_float(x_seq):
  """Weights shared by the float-input attention variants (same weights, different masks)."""
  return jax.jit(Attention().init)(jax.random.key(0), x_seq)


@pytest.fixture(scope="module")
def attn_tokens(tokens):
  return jax.jit(Attention(vocab=11).init)(jax.random.key(0), tokens)


def test_causal_correct_mask_passes_float_inputs(x_seq, attn_float, tmp_path):
  r = causal_dependency(linen_apply(Attention(k=0)), attn_float, x_seq,
                        artifacts_dir=str(tmp_path))
  assert r.name == "causal_dependency" and r.status == "pass", r.message
  assert r.details["method"] == "gradient"
  assert r.artifacts and r.artifacts[0].endswith("causal_dependency.png")
  assert os.path.exists(r.artifacts[0])


def test_causal_mask_off_by_one_fails_float_inputs(x_seq, attn_float):
  r = causal_dependency(linen_apply(Attention(k=1)), attn_float, x_seq)
  assert r.status == "fail", r.message
  assert r.details["first_offending"] == {"output": 0, "input": 1}
  assert "off by one" in r.message


def test_causal_tokens_by_perturbation(tokens, attn_tokens):
  r = causal_dependency(linen_apply(Attention(k=0, vocab=11)), attn_tokens, tokens)
  assert r.status == "pass", r.message
  assert r.details["method"] == "perturbation"
  r = causal_dependency(linen_apply(Attention(k=1, vocab=11)), attn_tokens, tokens,
                        vocab_size=11)
  assert r.status == "fail", r.message
  assert r.details["first_offending"] == {"output": 0, "input": 1}


def test_causal_sees_current(x_seq, attn_float):
  r = causal_dependency(linen_apply(Attention(k=0)), attn_float, x_seq, sees_current=False)
  assert r.status == "fail", r.message
  assert r.details["first_offending"] == {"output": 0, "input": 0}
  shifted = linen_apply(Attention(k=0, shift=True))
  assert causal_dependency(shifted, attn_float, x_seq, sees_current=False).status == "pass"
  # Next-token data (sees_current=True) and a model that shifts its inputs right itself (LM1B
  # without model.shifts_inputs): output t never sees token t, two tokens ahead. A fail.
  r = causal_dependency(shifted, attn_float, x_seq, sees_current=True)
  assert r.status == "fail" and "model.shifts_inputs=True" in r.message, r.message


def test_causal_skips_non_sequences(x_flat):
  _, apply, variables = _build(MLP(), x_flat)
  r = causal_dependency(apply, variables, x_flat)
  assert r.status == "skip", r.message  # outputs [B, 3] have no time axis of length 4
  assert causal_dependency(apply, variables, x_flat[0]).status == "skip"
  spec = DataSpec("digits", "classification", (64,), 10, None, (0, 16), {"train": 1})
  assert "sequence" in causal_skip_reason(spec)
  seq = DataSpec("chars", "sequence", (6,), 11, None, (0, 10), {"train": 1}, time_axis=1)
  assert causal_skip_reason(seq) is None


def test_causal_padding_mask_on_a_real_token_is_named(attn_tokens):
  """LM1B's `make_attention_mask(inputs > 0, inputs > 0)` on data where id 0 is a real token:
  the rows at id 0 are masked entirely and a fully masked row attends everywhere. The fail
  names the id; an off-by-one mask (every row looks ahead) does not get the hint."""
  tokens = jnp.asarray([[3, 0, 5, 7, 0, 2], [1, 4, 0, 6, 8, 9]], jnp.int32)
  r = causal_dependency(linen_apply(Attention(vocab=11, pad_id=0)), attn_tokens, tokens,
                        vocab_size=11)
  assert r.status == "fail", r.message
  assert "100% of the outputs that look ahead are at input token id 0" in r.message, r.message
  assert causal_dependency(linen_apply(Attention(vocab=11, pad_id=10)), attn_tokens, tokens,
                           vocab_size=11).status == "pass"
  r = causal_dependency(linen_apply(Attention(k=1, vocab=11)), attn_tokens, tokens,
                        vocab_size=11)
  assert r.status == "fail" and "padding" not in r.message.split("allowed:")[1], r.message

