"""`cnn`: the Flax MNIST example's ConvNet, with width and (spatial) dropout options."""

from flax import linen as nn

from jrecipe.errors import UserError
from jrecipe.models.core import output_dim, register_model
from jrecipe.models.linen_adapter import from_linen
from jrecipe.models.linear import as_float, require_not_sequence
from jrecipe.models.mlp import check_rate


def channels_last(x, add_channel: bool):
  """Floating [B, *spatial, C]: adds a channel axis to [B, L] or [B, H, W] inputs."""
  x = as_float(x)
  return x[..., None] if add_channel else x


def conv_layout(spec):
  """(add_channel, number of spatial dims) for `spec.input_shape`.

  (L,) is a 1-D signal, (H, W) a grayscale image (both get a channel axis); (H, W, C) and
  higher are used as they are, the last axis being channels.
  """
  rank = len(spec.input_shape)
  if rank == 0:
    raise UserError(f"Dataset {spec.name!r} has scalar inputs; a convolution needs an axis.")
  add_channel = rank <= 2
  return add_channel, rank if add_channel else rank - 1


def avg_pool2(x, n: int):
  """Average pool over 2 x ... x 2 windows with stride 2 and SAME padding, on n spatial axes.

  Where every spatial size is even, the windows tile the input: the pool is a reshape and a
  mean, equal to `nn.avg_pool` (tested), and its gradient is a broadcast. `nn.avg_pool`'s
  reduce_window has a pad + reduce_window gradient, measurably slower on CPU for the CNN's
  bias, ReLU and pooling (`python bench/cnn_budget.py`; docs/performance.md). Odd sizes
  (7 -> 4 with SAME padding) use `nn.avg_pool`.
  """
  spatial = x.shape[1:1 + n]
  if any(d % 2 for d in spatial):
    return nn.avg_pool(x, (2,) * n, strides=(2,) * n, padding="SAME")
  shape = [x.shape[0]]
  for d in spatial:
    shape += [d // 2, 2]
  return x.reshape(shape + list(x.shape[1 + n:])).mean(axis=tuple(2 + 2 * i for i in range(n)))


class CNN(nn.Module):
  """Conv(32) relu avgpool2, Conv(64) relu avgpool2, Dense(256) relu, Dense 'head'.

  Spatial dropout ('dropout2d_i', whole feature maps: the mask is broadcast over the spatial
  axes) follows each conv's activation; dense dropout follows Dense(256). Both train only.
  """

  num_outputs: int
  width: float = 1.0
  dropout: float = 0.0
  dropout2d: float = 0.0
  add_channel: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = channels_last(x, self.add_channel)
    n = x.ndim - 2
    spatial = tuple(range(1, n + 1))
    for i, features in enumerate((32, 64)):
      x = nn.Conv(max(1, int(round(features * self.width))), (3,) * n, padding="SAME",
                  name=f"conv_{i}")(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout2d, broadcast_dims=spatial, deterministic=not train,
                     name=f"dropout2d_{i}")(x)
      x = avg_pool2(x, n)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(max(1, int(round(256 * self.width))), name="dense")(x))
    x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
    return nn.Dense(self.num_outputs, name="head")(x)


@register_model("cnn", widen_fields=("width",))
def cnn(spec, bn_axis_name, width=1.0, dropout=0.0, dropout2d=0.0):
  """The Flax MNIST example's small ConvNet (2-D images, or 1-D signals with 1-D convs).

  Recipe step: "don't be a hero": copy the simplest architecture known to work for images.

  Args:
    spec: the dataset spec; inputs (H, W, C), (H, W) or (L,).
    bn_axis_name: unused (no BatchNorm).
    width: multiplies every layer's width (32, 64, 256). `widen` multiplies it.
    dropout: dropout rate after the Dense(256) layer.
    dropout2d: spatial dropout rate after each conv (whole feature maps, train mode only).

  Returns:
    A Model wrapping the `CNN` Linen module.
  """
  del bn_axis_name
  require_not_sequence(spec, "cnn")
  add_channel, _ = conv_layout(spec)
  if not float(width) > 0:
    raise UserError(f"width must be positive, got {width!r}.")
  module = CNN(num_outputs=output_dim(spec), width=float(width),
               dropout=check_rate(dropout, "dropout"),
               dropout2d=check_rate(dropout2d, "dropout2d"), add_channel=add_channel)
  return from_linen(module, "cnn", has_dropout=module.dropout > 0 or module.dropout2d > 0,
                    has_batchnorm=False)
