"""Zoo models written the way Flax's and big_vision's official examples write them.

The bugs a user plants in code like this, not in jrecipe's own MLP (each `bug=''` is the
correct twin):
- `flax_resnet`: Flax's examples/imagenet/models.py (a `dtype` field every layer gets,
  `partial(nn.BatchNorm, use_running_average=not train, axis_name='batch')`, zero-initialised
  residual scales), two stages;
- `bv_vit`: big_vision's models/vit.py (a patch Conv, 2-D sin-cos position embedding, an
  encoder returning `(x, out)`, global average pooling, `head_zeroinit=True`), one block;
- `lm1b_decoder`: Flax's examples/lm1b/models.py (a `TransformerConfig` dataclass holding the
  dtype, `shift_right` inside the model, `nn.combine_masks` of a padding and a causal mask),
  plugged in with `model.shifts_inputs=True`.
"""

import dataclasses
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jrecipe.zoo.models import _known

RESNET_BUGS = ("bn_frozen_layer", "pool_view_mixes_batch")
VIT_BUGS = ("fixed_dropout_key", "softmax_head")
LM1B_BUGS = ("pad_mask_on_real_token",)


class _Block(nn.Module):
  filters: int
  conv: Any
  norm: Any
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(x)))
    y = self.norm(scale_init=nn.initializers.zeros_init())(self.conv(self.filters, (3, 3))(y))
    if x.shape != y.shape:
      x = self.norm(name="norm_proj")(self.conv(self.filters, (1, 1), self.strides,
                                                name="conv_proj")(x))
    return nn.relu(x + y)


class FlaxResNet(nn.Module):
  num_classes: int
  num_filters: int = 8
  dtype: Any = jnp.float32
  bug: str = ""

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=self.dtype, axis_name="batch")
    frozen = self.bug == "bn_frozen_layer"  # use_running_average=True written into one norm
    x = conv(self.num_filters, (3, 3), name="conv_init")(x)
    x = nn.relu((partial(norm, use_running_average=True) if frozen else norm)(name="bn_init")(x))
    for i in range(2):
      x = _Block(self.num_filters * 2**i, conv, norm, (2, 2) if i else (1, 1))(x)
    n, h, w, c = x.shape
    if self.bug == "pool_view_mixes_batch":  # a reshape where a transpose was meant
      x = x.reshape(h * w, n, c).mean(0)
    else:
      x = jnp.mean(x, axis=(1, 2))
    return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype)(x), self.dtype)


def flax_resnet(spec, bug: str = ""):
  return FlaxResNet(spec.num_classes, bug=_known(bug, RESNET_BUGS, "flax_resnet"))


def _posemb_sincos_2d(h, w, width, temperature=10_000.0):
  y, x = jnp.mgrid[:h, :w]
  omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4 - 1))
  y, x = jnp.einsum("m,d->md", y.flatten(), omega), jnp.einsum("m,d->md", x.flatten(), omega)
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)[None]


class _Drop(nn.Module):
  """nn.Dropout, or (the bug) a mask drawn from PRNGKey(0) at every step."""
  rate: float
  fixed_key: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if not self.fixed_key:
      return nn.Dropout(self.rate)(x, deterministic)
    if deterministic:
      return x
    keep = jax.random.bernoulli(jax.random.PRNGKey(0), 1.0 - self.rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.rate), 0.0)


class _Encoder1DBlock(nn.Module):
  dropout: float
  fixed_key: bool

  @nn.compact
  def __call__(self, x, deterministic=True):
    out = {}
    y = nn.LayerNorm()(x)
    y = out["sa"] = nn.MultiHeadDotProductAttention(
        num_heads=2, kernel_init=nn.initializers.xavier_uniform(),
        deterministic=deterministic)(y, y)
    x = out["+sa"] = x + _Drop(self.dropout, self.fixed_key)(y, deterministic)
    y = nn.Dense(4 * x.shape[-1], kernel_init=nn.initializers.xavier_uniform())(nn.LayerNorm()(x))
    y = nn.Dense(x.shape[-1])(_Drop(self.dropout, self.fixed_key)(nn.gelu(y), deterministic))
    x = out["+mlp"] = x + _Drop(self.dropout, self.fixed_key)(y, deterministic)
    return x, out


class BigVisionViT(nn.Module):
  num_classes: int
  width: int = 32
  dropout: float = 0.1
  head_zeroinit: bool = True
  bug: str = ""

  @nn.compact
  def __call__(self, image, *, train=False):
    out = {}
    x = out["stem"] = nn.Conv(self.width, (2, 2), strides=(2, 2), padding="VALID",
                              name="embedding")(image)
    n, h, w, c = x.shape
    x = jnp.reshape(x, [n, h * w, c]) + _posemb_sincos_2d(h, w, c)
    x, out["encoder"] = _Encoder1DBlock(self.dropout, self.bug == "fixed_dropout_key",
                                        name="encoderblock_0")(x, deterministic=not train)
    x = out["pre_logits"] = jnp.mean(nn.LayerNorm(name="encoder_norm")(x), axis=1)
    kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
    x = out["logits"] = nn.Dense(self.num_classes, name="head", **kw)(x)
    if self.bug == "softmax_head":
      x = out["logits"] = nn.softmax(x)
    return x, out


def bv_vit(spec, bug: str = ""):
  return BigVisionViT(spec.num_classes, bug=_known(bug, VIT_BUGS, "bv_vit"))


@dataclasses.dataclass(unsafe_hash=True)
class TransformerConfig:
  vocab_size: int
  max_len: int
  dtype: Any = jnp.float32
  emb_dim: int = 32
  num_heads: int = 4
  mlp_dim: int = 64
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.normal(stddev=1e-6)
  pad_mask: bool = False


def shift_right(x, axis=1):
  pad_widths = [(0, 0)] * len(x.shape)
  pad_widths[axis] = (1, 0)
  padded = jnp.pad(x, pad_widths, mode="constant", constant_values=x.dtype.type(0))
  return jax.lax.dynamic_slice_in_dim(padded, 0, padded.shape[axis] - 1, axis)


def _sinusoidal(max_len, d_feature, max_scale=10000.0):
  pe = np.zeros((max_len, d_feature), dtype=np.float32)
  position = np.arange(0, max_len)[:, np.newaxis]
  div_term = np.exp(np.arange(0, d_feature // 2) * -np.log(max_scale) / (d_feature // 2 - 1))
  pe[:, :d_feature // 2] = np.sin(position * div_term)
  pe[:, d_feature // 2: 2 * (d_feature // 2)] = np.cos(position * div_term)
  return jnp.array(pe[np.newaxis])


class LM1BDecoder(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs):
    cfg = self.config
    mask = nn.make_causal_mask(inputs, dtype=cfg.dtype)
    if cfg.pad_mask:  # LM1B's padding mask: id 0 is padding there, a real token here
      mask = nn.combine_masks(nn.make_attention_mask(inputs > 0, inputs > 0, dtype=cfg.dtype),
                              mask)
    y = nn.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=nn.initializers.normal(1.0))(
        shift_right(inputs.astype("int32")))
    y = (y + _sinusoidal(cfg.max_len, cfg.emb_dim)[:, :y.shape[1]]).astype(cfg.dtype)
    x = nn.SelfAttention(num_heads=cfg.num_heads, dtype=cfg.dtype, qkv_features=cfg.emb_dim,
                         kernel_init=cfg.kernel_init, bias_init=cfg.bias_init, use_bias=False,
                         deterministic=True)(nn.LayerNorm(dtype=cfg.dtype)(y), mask) + y
    z = nn.Dense(cfg.mlp_dim, dtype=cfg.dtype, kernel_init=cfg.kernel_init,
                 bias_init=cfg.bias_init)(nn.LayerNorm(dtype=cfg.dtype)(x))
    z = nn.Dense(cfg.emb_dim, dtype=cfg.dtype, kernel_init=cfg.kernel_init,
                 bias_init=cfg.bias_init)(nn.relu(z))
    y = nn.LayerNorm(dtype=cfg.dtype, name="encoderdecoder_norm")(x + z)
    return nn.Dense(cfg.vocab_size, dtype=cfg.dtype, kernel_init=cfg.kernel_init,
                    bias_init=cfg.bias_init, name="logitdense")(y)


def lm1b_decoder(spec, bug: str = ""):
  return LM1BDecoder(TransformerConfig(
      spec.num_classes, spec.input_shape[0] + 2,
      pad_mask=_known(bug, LM1B_BUGS, "lm1b_decoder") == "pad_mask_on_real_token"))
