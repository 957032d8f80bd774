"""Models written the way the JAX ecosystem writes them, not the way jrecipe's own are written.

Each class is in the style of a widely copied codebase (written here, not copied): Flax's NNX
MNIST example (Dropout without rngs, rngs passed at call time, BatchNorm), Flax's Linen LM1B /
WMT decoders (kernels boxed by `nn.with_logical_partitioning`), Flax's ImageNet ResNet
(BatchNorm with a hard-coded `axis_name='batch'`), big_vision's ViT (a zero-initialised
`head`, the head inside a wrapper), a mixed-precision model (float32 compute under a float64
output), a model returning `(logits, extras)`, and an LM1B-style decoder that shifts its
inputs right itself. Below each class is its *adapter*: the factory a config names with
`model.name='tests.foreign_models:<factory>'`, as short as the contract in
docs/your_model.md allows. tests/test_foreign_models.py runs every one through every mode.

Three planted bugs ride along (`causal_leak`, `bn_batch_stats_at_eval`, `batch_mixing`
switches), each caught by the check made for it.
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx


# --- Flax NNX, official MNIST style: Dropout without rngs, rngs at call time, BatchNorm --------

class NNXCNN(nnx.Module):
  """A small CNN: Conv -> BatchNorm -> ReLU -> avg-pool -> Dropout -> Linear."""

  def __init__(self, num_classes: int, width: int = 8, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, width, kernel_size=(3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(width, rngs=rngs)
    self.dropout = nnx.Dropout(rate=0.1)
    self.linear = nnx.Linear(width * 4 * 4, num_classes, rngs=rngs)

  def __call__(self, x, rngs: nnx.Rngs | None = None):
    x = nnx.relu(self.bn(self.conv(x)))
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = self.dropout(x.reshape(x.shape[0], -1), rngs=rngs)
    return self.linear(x)


def nnx_cnn(spec, width: int = 8):
  return NNXCNN(spec.num_classes, width, rngs=nnx.Rngs(0))


class NNXBatchStatsAtEval(NNXCNN):
  """Planted bug: BatchNorm normalises with the batch's statistics in eval mode too."""

  def __call__(self, x, rngs: nnx.Rngs | None = None):
    x = nnx.relu(self.bn(self.conv(x), use_running_average=False))
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = self.dropout(x.reshape(x.shape[0], -1), rngs=rngs)
    return self.linear(x)


def nnx_bn_batch_stats_at_eval(spec, width: int = 8):
  return NNXBatchStatsAtEval(spec.num_classes, width, rngs=nnx.Rngs(0))


# --- Linen, LM1B/WMT style: every kernel boxed with logical axis names -----------------------

class PartitionedMLP(nn.Module):
  """Two Dense layers whose kernels carry logical axes ('embed', 'mlp', 'vocab')."""

  num_classes: int
  hidden: int = 32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
                 name="wi")(x)
    x = nn.relu(x)
    return nn.Dense(self.num_classes, name="wo",
                    kernel_init=nn.with_logical_partitioning(init, ("mlp", "vocab")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)))(x)


def partitioned_mlp(spec, width: int = 32):  # not `hidden`: digits_mlp's model has that field
  return PartitionedMLP(spec.num_classes, width)


# --- mixed precision: float32 compute, output cast back to the input's dtype -----------------

class Float32Inside(nn.Module):
  """Computes in float32 whatever the input's precision, returns the input's dtype."""

  num_classes: int

  @nn.compact
  def __call__(self, x):
    h = x.reshape((x.shape[0], -1)).astype(jnp.float32)
    h = nn.relu(nn.Dense(64, dtype=jnp.float32, param_dtype=jnp.float32)(h))
    out = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32)(h)
    return out.astype(x.dtype)


def float32_inside(spec):
  return Float32Inside(spec.num_classes)


# --- a model returning (logits, extras) --------------------------------------------------------

class WithExtras(nn.Module):
  """Returns the logits and a dict of extras (features for a probe, an auxiliary score)."""

  num_classes: int
  batch_mixing: bool = False  # planted bug: a flatten that mixes examples of the batch

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.batch_mixing:  # the batch axis moved last before the flatten: rows mix examples
      x = jnp.transpose(x, (1, 2, 3, 0)).reshape((x.shape[0], -1))
    else:
      x = x.reshape((x.shape[0], -1))
    features = nn.relu(nn.Dense(32)(x))
    features = nn.Dropout(0.1, deterministic=not train)(features)
    return nn.Dense(self.num_classes)(features), {"features": features}


def with_extras(spec):
  return WithExtras(spec.num_classes)


def batch_mixing(spec):
  return WithExtras(spec.num_classes, batch_mixing=True)


# --- big_vision style: zero-initialised head, and a head nested inside a wrapper ---------------

class ZeroHeadMLP(nn.Module):
  """An MLP whose head starts at exactly zero (big_vision's `head_zeroinit=True`)."""

  num_classes: int
  width: int = 32

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(self.width)(x.reshape((x.shape[0], -1))))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)


def zero_head(spec, width: int = 32):
  return ZeroHeadMLP(spec.num_classes, width)


class ZeroHeadDropout(nn.Module):
  """The zero head with dropout before it; `fixed_key` plants a mask drawn from PRNGKey(0)."""

  num_classes: int
  fixed_key: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.gelu(nn.Dense(32)(x.reshape((x.shape[0], -1))))
    if self.fixed_key and train:
      h = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(0), 0.9, h.shape), h / 0.9, 0.0)
    else:
      h = nn.Dropout(0.1, deterministic=not train)(h)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(h)


def zero_head_dropout(spec, fixed_key: bool = False):
  return ZeroHeadDropout(spec.num_classes, fixed_key)


class Encoder(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.Dense(self.width)(x.reshape((x.shape[0], -1))))
    return nn.gelu(nn.Dense(self.width)(x))


class ClassifierHead(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes, name="out")(nn.LayerNorm(name="pre_logits_norm")(x))


class Wrapped(nn.Module):
  """Someone's encoder with a classifier attached: the final Dense sits at classifier/out."""

  num_classes: int
  width: int = 32

  def setup(self):
    self.encoder = Encoder(self.width)
    self.classifier = ClassifierHead(self.num_classes)

  def __call__(self, x):
    return self.classifier(self.encoder(x))


def nested_head(spec, width: int = 32):
  return Wrapped(spec.num_classes, width)


# --- Flax ImageNet style: BatchNorm with a hard-coded axis name -------------------------------

class ResNetBlock(nn.Module):
  filters: int
  norm: type

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(nn.Conv(self.filters, (3, 3), use_bias=False)(x)))
    y = self.norm(scale_init=nn.initializers.zeros)(nn.Conv(self.filters, (3, 3),
                                                            use_bias=False)(y))
    return nn.relu(x + y)


class TinyResNet(nn.Module):
  num_classes: int
  width: int = 8
  inverted: bool = False  # planted: use_running_average=train, batch statistics in eval
  frozen: bool = False  # planted: use_running_average=True written into the block's norms

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, use_running_average=train if self.inverted else
                             not train, momentum=0.9, epsilon=1e-5, axis_name="batch")
    x = nn.relu(norm()(nn.Conv(self.width, (3, 3), use_bias=False, name="conv_init")(x)))
    block_norm = functools.partial(norm, use_running_average=True) if self.frozen else norm
    x = ResNetBlock(self.width, block_norm)(x)
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # 8x8 digits: keep some of the layout
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def tiny_resnet(spec, width: int = 8):
  return TinyResNet(spec.num_classes, width)


def bn_inverted(spec):
  return TinyResNet(spec.num_classes, inverted=True)


def bn_frozen(spec):
  return TinyResNet(spec.num_classes, frozen=True)


# --- LM1B style: a decoder that shifts its inputs right itself ---------------------------------

class ShiftingDecoder(nn.Module):
  """Predicts token t from tokens < t: inputs are shifted right inside the model."""

  vocab: int
  dim: int = 32
  max_len: int = 128
  causal_leak: bool = False  # planted bug: the mask lets position t see position t+1

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    t = tokens.shape[1]
    shifted = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    h = nn.Embed(self.vocab, self.dim)(shifted)
    h = h + self.param("pos_embedding", nn.initializers.normal(0.02), (self.max_len, self.dim))[:t]
    mask = nn.make_causal_mask(shifted)
    if self.causal_leak:
      mask = jnp.tril(jnp.ones((t, t), bool), k=1)[None, None]
    h = h + nn.SelfAttention(num_heads=2, qkv_features=self.dim, deterministic=True)(
        nn.LayerNorm()(h), mask=mask)
    h = h + nn.Dense(self.dim)(nn.gelu(nn.Dense(2 * self.dim)(nn.LayerNorm()(h))))
    return nn.Dense(self.vocab, name="logits")(nn.LayerNorm()(h))


def shifting_decoder(spec, dim: int = 32):
  return ShiftingDecoder(spec.num_classes, dim)


def leaky_decoder(spec, dim: int = 32):
  return ShiftingDecoder(spec.num_classes, dim, causal_leak=True)
