"""The zoo's models: Flax Linen (the Flax examples' style) and NNX (the NNX guides' style),
each with a `bug` field that plants one silent bug; `bug=''` is the correct twin.

Each factory follows jrecipe's model contract (docs/your_model.md): `factory(spec, bug='')`,
so a zoo entry is `model.name='jrecipe.zoo.models:<factory>'` and `model.bug='<name>'`, the
way a user plugs in their own model. The bugs are the ones the published fault taxonomies
collect (jrecipe/zoo/entries.py names the class of each).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from jrecipe.errors import UserError


def _known(bug: str, valid: tuple, factory: str) -> str:
  if bug and bug not in valid:
    raise UserError(f"model.bug={bug!r} is not a bug {factory} can plant. Valid: "
                    f"{', '.join(valid)}, or '' for the correct twin.")
  return bug


def tanh_with_rule(scale=1.0, sign=1.0):
  """tanh whose backward rule is multiplied by sign * scale ((1, 1) is the correct rule): the
  planted wrong gradient of a hand-written custom_vjp, shared by the zoo and the tests."""
  @jax.custom_vjp
  def act(x):
    return jnp.tanh(x)

  def fwd(x):
    y = jnp.tanh(x)
    return y, y

  def bwd(y, g):
    return (sign * scale * g * (1.0 - y * y),)

  act.defvjp(fwd, bwd)
  return act


_tanh_wrong_vjp = tanh_with_rule(1.05)  # the planted rule: 5% too large

MLP_BUGS = ("batch_mixing_reshape", "softmax_output", "tanh_output", "missing_nonlinearity",
            "dropout_at_eval", "frozen_layer", "zero_init", "huge_init", "ignores_input",
            "fixed_dropout_key", "wrong_custom_vjp", "detached_output")


class LinenMLP(nn.Module):
  """Flatten -> Dense -> act -> Dense -> act -> Dropout -> Dense head (Flax example style)."""

  num_classes: int
  bug: str = ""
  hidden: int = 64
  dropout: float = 0.2

  @nn.compact
  def __call__(self, x, train: bool = False):
    bug = self.bug
    x = x.reshape((x.shape[0], -1))
    if bug == "ignores_input":  # the model reads a zeros placeholder instead of its input
      x = jnp.zeros_like(x)
    init = {"zero_init": nn.initializers.zeros,
            "huge_init": nn.initializers.normal(10.0)}.get(bug, nn.linear.default_kernel_init)
    act = (lambda h: h) if bug == "missing_nonlinearity" else (
        _tanh_wrong_vjp if bug == "wrong_custom_vjp" else nn.relu)
    h = act(nn.Dense(self.hidden, kernel_init=init)(x))
    if bug == "batch_mixing_reshape":  # view vs transpose: (features, batch) then .T
      h = h.reshape((h.shape[1], h.shape[0])).T
    if bug == "frozen_layer":  # a stop_gradient meant for a target network
      h = jax.lax.stop_gradient(h)
    h = act(nn.Dense(self.hidden, kernel_init=init)(h))
    if bug == "fixed_dropout_key" and train:  # the mask drawn from one constant key
      keep = jax.random.bernoulli(jax.random.PRNGKey(0), 1 - self.dropout, h.shape)
      h = jnp.where(keep, h / (1 - self.dropout), 0.0)
    else:
      h = nn.Dropout(self.dropout, deterministic=not (train or bug == "dropout_at_eval"))(h)
    out = nn.Dense(self.num_classes, name="head")(h)
    if bug == "detached_output":
      out = jax.lax.stop_gradient(out)
    if bug == "softmax_output":  # probabilities into a loss that applies log_softmax
      out = nn.softmax(out)
    if bug == "tanh_output":  # a bounded activation on the logits
      out = jnp.tanh(out)
    return out


def linen_mlp(spec, bug: str = "", hidden: int = 64):
  return LinenMLP(spec.num_classes, bug=_known(bug, MLP_BUGS, "linen_mlp"), hidden=hidden)


linen_mlp.widen_fields = ("hidden",)  # capacity_decreases_loss doubles it


BN_BUGS = ("stats_never_update",)


class LinenBNMLP(nn.Module):
  """Dense -> BatchNorm -> ReLU -> Dense head, `use_running_average=not train` (Flax style)."""

  num_classes: int
  bug: str = ""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(64)(x.reshape((x.shape[0], -1)))
    running = not train  # (Linen refuses batch statistics at eval loudly: the NNX bug below)
    momentum = 1.0 if self.bug == "stats_never_update" else 0.9  # 1.0: PyTorch's 0 confused
    h = nn.relu(nn.BatchNorm(use_running_average=running, momentum=momentum)(h))
    return nn.Dense(self.num_classes, name="head")(h)


def linen_bn_mlp(spec, bug: str = ""):
  return LinenBNMLP(spec.num_classes, bug=_known(bug, BN_BUGS, "linen_bn_mlp"))


CNN_BUGS = ("flatten_mixes_batch", "pool_over_batch")


class LinenCNN(nn.Module):
  """The Flax MNIST example's CNN, shrunk for 8x8 digits."""

  num_classes: int
  bug: str = ""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    if self.bug == "pool_over_batch":  # a 'global average' over axis 0 (the batch)
      x = x - x.mean(axis=0, keepdims=True)
    if self.bug == "flatten_mixes_batch":  # NCHW habits: flatten with the batch last
      x = jnp.transpose(x, (1, 2, 3, 0)).reshape((x.shape[0], -1))
    else:
      x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(self.num_classes, name="head")(x)


def linen_cnn(spec, bug: str = ""):
  return LinenCNN(spec.num_classes, bug=_known(bug, CNN_BUGS, "linen_cnn"))


NNX_BUGS = ("batch_centering", "softmax_output", "dropout_at_eval", "fixed_dropout_rngs",
            "hidden_detached")


class NNXMLP(nnx.Module):
  """Linear -> ReLU -> Dropout -> Linear, in the NNX guides' style."""

  def __init__(self, din: int, dout: int, bug: str, rngs: nnx.Rngs):
    self.bug = bug
    self.linear1 = nnx.Linear(din, 64, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.linear2 = nnx.Linear(64, dout, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.linear1(x.reshape((x.shape[0], -1))))
    if self.bug == "hidden_detached":  # jax.lax.stop_gradient left from a debugging session
      h = jax.lax.stop_gradient(h)
    if self.bug == "batch_centering":  # 'normalise the features' over the batch axis
      h = h - h.mean(axis=0, keepdims=True)
    if self.bug == "dropout_at_eval":  # deterministic forced at the call: .eval() ignored
      h = self.dropout(h, deterministic=False)
    elif self.bug == "fixed_dropout_rngs":  # a fresh Rngs(0) at every call: one mask forever
      h = self.dropout(h, rngs=nnx.Rngs(dropout=0))
    else:
      h = self.dropout(h)
    out = self.linear2(h)
    return nnx.softmax(out) if self.bug == "softmax_output" else out


def nnx_mlp(spec, bug: str = ""):
  bug = _known(bug, NNX_BUGS, "nnx_mlp")
  return NNXMLP(int(np.prod(spec.input_shape)), spec.num_classes, bug, nnx.Rngs(0))


NNX_BN_BUGS = ("batch_stats_at_eval",)


class NNXBNMLP(nnx.Module):
  """Linear -> BatchNorm -> ReLU -> Linear in NNX; .train()/.eval() set the BatchNorm mode."""

  def __init__(self, din: int, dout: int, bug: str, rngs: nnx.Rngs):
    self.bug = bug
    self.linear1 = nnx.Linear(din, 64, rngs=rngs)
    self.bn = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
    self.linear2 = nnx.Linear(64, dout, rngs=rngs)

  def __call__(self, x):
    h = self.linear1(x.reshape((x.shape[0], -1)))
    if self.bug == "batch_stats_at_eval":  # forced at the call: .eval() is overridden
      h = self.bn(h, use_running_average=False)
    else:
      h = self.bn(h)
    return self.linear2(nnx.relu(h))


def nnx_bn_mlp(spec, bug: str = ""):
  return NNXBNMLP(int(np.prod(spec.input_shape)), spec.num_classes,
                  _known(bug, NNX_BN_BUGS, "nnx_bn_mlp"), nnx.Rngs(0))


SEQ_BUGS = ("causal_mask_one_ahead", "no_causal_mask")


class CausalLM(nn.Module):
  """Embed + positions -> one masked self-attention block -> head (next-token prediction)."""

  vocab: int
  length: int
  bug: str = ""

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    t = tokens.shape[1]
    h = nn.Embed(self.vocab, 32)(tokens) + self.param(
        "pos", nn.initializers.normal(0.02), (self.length, 32))[:t]
    k = 1 if self.bug == "causal_mask_one_ahead" else 0  # tril(k=1): t sees t+1
    mask = None if self.bug == "no_causal_mask" else nn.make_attention_mask(
        jnp.arange(t)[None], jnp.arange(t)[None], lambda q, kv: kv <= q + k)
    h = h + nn.SelfAttention(num_heads=2, qkv_features=32)(nn.LayerNorm()(h), mask=mask)
    h = h + nn.Dense(32)(nn.gelu(nn.Dense(64)(nn.LayerNorm()(h))))
    # GPT-2's small head init: the loss at init is ln V ('init well')
    return nn.Dense(self.vocab, kernel_init=nn.initializers.normal(0.02), name="head")(h)


def causal_lm(spec, bug: str = ""):
  return CausalLM(spec.num_classes, int(spec.input_shape[0]),
                  bug=_known(bug, SEQ_BUGS, "causal_lm"))
