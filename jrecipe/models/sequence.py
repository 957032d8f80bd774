"""Sequence models: `transformer` (a small causal decoder) and `rnn` (LSTM or GRU).

Inputs are int32 tokens [B, T] (embedded) or float features [B, T] / [B, T, F] (projected).
For 'sequence' tasks the output is [B, T, C] logits; for other tasks the last time step's
output [B, C]. Output t never depends on inputs after t; when `spec.sees_current` is False
it does not depend on input t either (inputs are shifted right by one step).
"""

from typing import Optional

import jax.numpy as jnp
from flax import linen as nn

from jrecipe.errors import UserError
from jrecipe.models.core import output_dim, register_model
from jrecipe.models.linen_adapter import from_linen
from jrecipe.models.linear import as_float
from jrecipe.models.mlp import check_rate


class Embed(nn.Module):
  """Tokens -> nn.Embed; float inputs -> Dense projection. Named 'embed' either way."""

  vocab_size: Optional[int]
  dim: int

  @nn.compact
  def __call__(self, x):
    if jnp.issubdtype(x.dtype, jnp.integer):
      if self.vocab_size is None:
        raise UserError("Integer token inputs need a vocabulary size (spec.num_classes).")
      return nn.Embed(self.vocab_size, self.dim, name="tokens")(x)
    x = as_float(x)
    return nn.Dense(self.dim, name="features")(x[..., None] if x.ndim == 2 else x)


def shift_right(h):
  """[B, T, D] -> [B, T, D] with step t holding step t-1 (zeros at t=0)."""
  return jnp.pad(h[:, :-1], ((0, 0), (1, 0), (0, 0)))


class DecoderBlock(nn.Module):
  """Pre-LayerNorm block: causal self-attention, then a 4x MLP, each with a residual."""

  dim: int
  heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, mask, train: bool = False):
    y = nn.LayerNorm(name="ln_attn")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, qkv_features=self.dim, dropout_rate=self.dropout,
        deterministic=not train, name="attn")(y, y, mask=mask)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(name="ln_mlp")(x)
    y = nn.Dense(self.dim, name="mlp_out")(nn.gelu(nn.Dense(4 * self.dim, name="mlp_in")(y)))
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class Transformer(nn.Module):
  """Embedding + learned positions, `num_layers` causal blocks, LayerNorm, Dense 'head'."""

  vocab_size: Optional[int]
  num_outputs: int
  max_len: int
  num_layers: int = 2
  dim: int = 64
  heads: int = 4
  dropout: float = 0.0
  sees_current: bool = True
  per_step: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = Embed(self.vocab_size, self.dim, name="embed")(x)
    if not self.sees_current:
      h = shift_right(h)
    steps = h.shape[1]
    if steps > self.max_len:
      raise UserError(f"Sequence length {steps} exceeds the transformer's max_len {self.max_len}.")
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (self.max_len, self.dim))
    h = nn.Dropout(self.dropout, deterministic=not train)(h + pos[:steps])
    mask = nn.make_causal_mask(jnp.ones(h.shape[:2], jnp.int32))
    for i in range(self.num_layers):
      h = DecoderBlock(self.dim, self.heads, self.dropout, name=f"block_{i}")(h, mask, train)
    h = nn.LayerNorm(name="ln_final")(h)
    if not self.per_step:
      h = h[:, -1]
    # Small head weights (GPT-2 style normal(0.02)): at init the head bias (log token
    # priors) sets the predictions instead of random logits ('init well').
    return nn.Dense(self.num_outputs, kernel_init=nn.initializers.normal(0.02), name="head")(h)


CELLS = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}


class RNN(nn.Module):
  """Embedding, `num_layers` recurrent layers (nn.RNN over time), Dense 'head'."""

  vocab_size: Optional[int]
  num_outputs: int
  hidden: int = 128
  cell: str = "lstm"
  num_layers: int = 1
  dropout: float = 0.0
  sees_current: bool = True
  per_step: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = Embed(self.vocab_size, self.hidden, name="embed")(x)
    if not self.sees_current:
      h = shift_right(h)
    for i in range(self.num_layers):
      h = nn.RNN(CELLS[self.cell](self.hidden), name=f"rnn_{i}")(h)
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    if not self.per_step:
      h = h[:, -1]
    # Small head weights (GPT-2 style normal(0.02)): at init the head bias (log token
    # priors) sets the predictions instead of random logits ('init well').
    return nn.Dense(self.num_outputs, kernel_init=nn.initializers.normal(0.02), name="head")(h)


def _sequence_layout(spec, name):
  if not spec.input_shape:
    raise UserError(f"The model {name!r} needs inputs with a time axis; dataset {spec.name!r} "
                    f"has input_shape {spec.input_shape}.")
  vocab = spec.num_classes if spec.task == "sequence" else None
  return vocab, spec.task == "sequence"


@register_model("transformer", widen=lambda kw, f: {
    **kw, "dim": kw["heads"] * max(1, int(round(kw["dim"] * f / kw["heads"])))})
def transformer(spec, bn_axis_name, num_layers=2, dim=64, heads=4, dropout=0.0, max_len=None):
  """A small causal Transformer decoder (GPT-style, pre-LayerNorm) for next-token prediction.

  Recipe step: "don't be a hero": a minimal decoder whose causality jrecipe can check.

  Args:
    spec: the dataset spec; inputs [T] tokens (vocabulary spec.num_classes) or float [T(, F)].
    bn_axis_name: unused (LayerNorm only).
    num_layers: decoder blocks.
    dim: model width; must be divisible by `heads`. `widen` multiplies it (keeping it a
      multiple of `heads`).
    heads: attention heads.
    dropout: dropout on embeddings, attention weights and residual branches (train only).
    max_len: number of learned positions; None means the dataset's sequence length.

  Returns:
    A Model wrapping the `Transformer` Linen module: logits [B, T, C] for 'sequence'
    tasks, [B, C] otherwise.
  """
  del bn_axis_name
  vocab, per_step = _sequence_layout(spec, "transformer")
  if not (isinstance(dim, int) and isinstance(heads, int) and heads > 0 and dim % heads == 0):
    raise UserError(f"transformer dim ({dim!r}) must be a positive multiple of heads ({heads!r}).")
  if not (isinstance(num_layers, int) and num_layers >= 0):
    raise UserError(f"num_layers must be a non-negative int, got {num_layers!r}.")
  module = Transformer(vocab_size=vocab, num_outputs=output_dim(spec),
                       max_len=int(max_len or spec.input_shape[0]), num_layers=num_layers,
                       dim=dim, heads=heads, dropout=check_rate(dropout, "dropout"),
                       sees_current=spec.sees_current, per_step=per_step)
  return from_linen(module, "transformer", has_dropout=module.dropout > 0, has_batchnorm=False)


@register_model("rnn", widen_fields=("hidden",))
def rnn(spec, bn_axis_name, hidden=128, cell="lstm", num_layers=1, dropout=0.0):
  """A recurrent network (LSTM or GRU cells run over time by nn.RNN).

  Args:
    spec: the dataset spec; inputs [T] tokens or float [T(, F)].
    bn_axis_name: unused.
    hidden: state size (also the embedding size). `widen` multiplies it.
    cell: 'lstm' or 'gru'.
    num_layers: stacked recurrent layers.
    dropout: dropout after each recurrent layer (train only).

  Returns:
    A Model wrapping the `RNN` Linen module: logits [B, T, C] for 'sequence' tasks,
    [B, C] otherwise.
  """
  del bn_axis_name
  vocab, per_step = _sequence_layout(spec, "rnn")
  if cell not in CELLS:
    raise UserError(f"Unknown rnn cell {cell!r}; valid: {', '.join(CELLS)}.")
  if not (isinstance(hidden, int) and hidden > 0 and isinstance(num_layers, int)
          and num_layers >= 1):
    raise UserError(f"rnn needs a positive int hidden and num_layers >= 1, got {hidden!r}, "
                    f"{num_layers!r}.")
  module = RNN(vocab_size=vocab, num_outputs=output_dim(spec), hidden=hidden, cell=cell,
               num_layers=num_layers, dropout=check_rate(dropout, "dropout"),
               sees_current=spec.sees_current, per_step=per_step)
  return from_linen(module, "rnn", has_dropout=module.dropout > 0, has_batchnorm=False)
