"""`resnet18`, `resnet50`: the Flax ImageNet example's ResNets with a CIFAR or ImageNet stem."""

import functools
from typing import Any, Callable, Optional, Sequence

import jax.numpy as jnp
from flax import linen as nn

from jrecipe.errors import UserError
from jrecipe.models.cnn import channels_last, conv_layout
from jrecipe.models.core import output_dim, register_model
from jrecipe.models.linen_adapter import from_linen
from jrecipe.models.linear import require_not_sequence
from jrecipe.models.mlp import check_rate

ModuleDef = Any


class ResNetBlock(nn.Module):
  """Basic block: two 3x3 convs; the last BatchNorm starts at zero scale (identity block)."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: tuple
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x):
    n = x.ndim - 2
    residual = x
    y = self.conv(self.filters, (3,) * n, self.strides)(x)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters, (3,) * n)(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1,) * n, self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class BottleneckResNetBlock(nn.Module):
  """Bottleneck block: 1x1, 3x3 (strided), 1x1 to 4x filters."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: tuple
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x):
    n = x.ndim - 2
    residual = x
    y = self.act(self.norm()(self.conv(self.filters, (1,) * n)(x)))
    y = self.act(self.norm()(self.conv(self.filters, (3,) * n, self.strides)(y)))
    y = self.conv(self.filters * 4, (1,) * n)(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1,) * n, self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  """ResNet v1.5: stem, four stages (widths width * 1, 2, 4, 8), global mean pool, 'head'.

  BatchNorm uses batch statistics in train mode (averaged over `bn_axis_name` under pmap)
  and running averages in eval mode. Spatial dropout ('dropout2d_i') follows each stage.
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_outputs: int
  width: int = 64
  stem: str = "cifar"
  dropout2d: float = 0.0
  bn_axis_name: Optional[str] = None
  add_channel: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = channels_last(x, self.add_channel)
    n = x.ndim - 2
    spatial = tuple(range(1, n + 1))
    conv = functools.partial(nn.Conv, use_bias=False, padding="SAME")
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, axis_name=self.bn_axis_name)
    if self.stem == "imagenet":
      x = conv(self.width, (7,) * n, (2,) * n, padding=[(3, 3)] * n, name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
      x = nn.max_pool(x, (3,) * n, strides=(2,) * n, padding=((1, 1),) * n)
    else:
      x = conv(self.width, (3,) * n, name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x))
    for i, block_count in enumerate(self.stage_sizes):
      for j in range(block_count):
        strides = (2,) * n if i > 0 and j == 0 else (1,) * n
        x = self.block_cls(self.width * 2 ** i, conv=conv, norm=norm, strides=strides,
                           name=f"stage{i + 1}_block{j + 1}")(x)
      x = nn.Dropout(self.dropout2d, broadcast_dims=spatial, deterministic=not train,
                     name=f"dropout2d_{i}")(x)
    x = jnp.mean(x, axis=spatial)
    return nn.Dense(self.num_outputs, name="head")(x)


STEMS = ("cifar", "imagenet")


def _resnet(spec, bn_axis_name, stage_sizes, block_cls, name, width, stem, dropout2d):
  require_not_sequence(spec, name)
  add_channel, _ = conv_layout(spec)
  if stem not in STEMS:
    raise UserError(f"Unknown stem {stem!r} for {name}; valid: {', '.join(STEMS)}.")
  if not (isinstance(width, int) and width > 0):
    raise UserError(f"width (base filters) must be a positive int, got {width!r}.")
  module = ResNet(stage_sizes=tuple(stage_sizes), block_cls=block_cls,
                  num_outputs=output_dim(spec), width=width, stem=stem,
                  dropout2d=check_rate(dropout2d, "dropout2d"), bn_axis_name=bn_axis_name,
                  add_channel=add_channel)
  return from_linen(module, name, has_dropout=module.dropout2d > 0, has_batchnorm=True)


@register_model("resnet18", widen_fields=("width",))
def resnet18(spec, bn_axis_name, width=64, stem="cifar", dropout2d=0.0):
  """ResNet-18 (basic blocks [2, 2, 2, 2]) with BatchNorm.

  Recipe step: "don't be a hero": for images, copy ResNet-50/18 from a paper that worked.

  Args:
    spec: the dataset spec; inputs (H, W, C), (H, W) or (L,).
    bn_axis_name: pmap axis for cross-device BatchNorm statistics, or None.
    width: base filters (64 in the paper; tiny values such as 4 for tests). `widen`
      multiplies it.
    stem: 'cifar' (3x3 conv, no max pool: for 32x32 and smaller) or 'imagenet'
      (7x7 stride-2 conv + 3x3 stride-2 max pool).
    dropout2d: spatial dropout rate after each stage (train mode only).

  Returns:
    A Model wrapping the `ResNet` Linen module.
  """
  return _resnet(spec, bn_axis_name, (2, 2, 2, 2), ResNetBlock, "resnet18", width, stem, dropout2d)


@register_model("resnet50", widen_fields=("width",))
def resnet50(spec, bn_axis_name, width=64, stem="cifar", dropout2d=0.0):
  """ResNet-50 (bottleneck blocks [3, 4, 6, 3]) with BatchNorm; fields as for `resnet18`."""
  return _resnet(spec, bn_axis_name, (3, 4, 6, 3), BottleneckResNetBlock, "resnet50", width, stem,
                 dropout2d)
