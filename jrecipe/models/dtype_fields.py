"""Compute-dtype fields of a user's model: raised to float64 for the gradient check, or set
to the 16-bit compute dtype for `config.precision` (`with_compute_dtype`, at the end).

Recipe step: CS231n gradient checks ("use double precision"). Flax's own examples give their
modules a `dtype` field (ImageNet's ResNet: `dtype: Any = jnp.float32`, passed to every Conv,
BatchNorm and Dense; LM1B/WMT: `config.dtype` in a `TransformerConfig` dataclass), and Flax's
layers then compute in that dtype whatever their inputs: traced from float64 parameters, the
loss of such a model is float32 and a float64 gradient check measures float32 rounding.

`float64_layers()` makes every `dtype` field below float64 read float64 while the model is
traced inside it, the way a user would pass `dtype=jnp.float64`:
- Linen: an interceptor (`flax.linen.intercept_methods`) sets the field on the bound module
  for the duration of each of its method calls (children built inside inherit it), and
  replaces a dataclass field that itself holds `dtype` (LM1B's `config`) by a copy;
- NNX: `raise_nnx(module)` sets the same fields on the merged copy the adapter calls
  (`jrecipe.models.nnx_adapter`), never on the user's template.
Casts written in the code (`x.astype(jnp.float32)`) are not touched: the gradient check still
reports those as inconclusive.
"""

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

FIELD = "dtype"  # the compute-dtype field of Flax's layers and of the examples' configs
_RAISED: contextvars.ContextVar = contextvars.ContextVar("jrecipe_float64_layers", default=None)


def _dtype(value: Any):
  """The numpy dtype `value` names (jnp.float32, 'bfloat16', ...), or None."""
  if value is None or isinstance(value, bool):
    return None
  try:
    return np.dtype(value)
  except TypeError:
    return None


def _low(value: Any) -> bool:
  """Whether `value` names a floating dtype below float64."""
  dtype = _dtype(value)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 8


def _is_float32(value: Any) -> bool:
  return _dtype(value) == np.float32


def _retyped(obj: Any, match, dtype) -> dict:
  """{attribute: new value}: `obj`'s dtype field, and each dataclass field holding one (LM1B's
  `config`, as a replaced copy), whose dtype `match`es, set to `dtype`."""
  out = {FIELD: dtype} if match(getattr(obj, FIELD, None)) else {}
  for f in dataclasses.fields(obj) if dataclasses.is_dataclass(obj) else ():
    value = getattr(obj, f.name, None)
    if (dataclasses.is_dataclass(value) and not isinstance(value, (type, nn.Module))
        and any(g.name == FIELD for g in dataclasses.fields(value))
        and match(getattr(value, FIELD))):
      out[f.name] = dataclasses.replace(value, **{FIELD: dtype})
  return out


def _raised_fields(obj: Any) -> dict:
  """{attribute: its float64 value} for `obj`'s dtype field and configs holding one."""
  return _retyped(obj, _low, jnp.float64)


def _names(obj: Any, raised: dict) -> list:
  """'ResNet.dtype', 'Decoder.config.dtype': the fields `raised` replaces, for messages."""
  cls = type(obj).__name__
  return [f"{cls}.{n}" if n == FIELD else f"{cls}.{n}.{FIELD}" for n in raised]


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  raised = _raised_fields(module)
  if not raised:
    return next_fun(*args, **kwargs)
  record = _RAISED.get()
  if record is not None:
    record.update(_names(module, raised))
  saved = {name: getattr(module, name) for name in raised}
  for name, value in raised.items():
    object.__setattr__(module, name, value)
  try:
    return next_fun(*args, **kwargs)
  finally:
    for name, value in saved.items():
      object.__setattr__(module, name, value)


@contextlib.contextmanager
def float64_layers() -> Iterator[set]:
  """While active, models traced compute in float64 where a `dtype` field said less.

  Yields the set of the fields raised, as 'Class.dtype' (filled as models are traced).
  """
  raised: set = set()
  token = _RAISED.set(raised)
  try:
    with nn.intercept_methods(_interceptor):
      yield raised
  finally:
    _RAISED.reset(token)


def raise_nnx(module: Any) -> None:
  """Inside `float64_layers`, sets the dtype fields of an NNX module graph to float64."""
  record = _RAISED.get()
  if record is None:
    return
  from flax import nnx
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Module):
      raised = _raised_fields(node)
      record.update(_names(node, raised))
      for name, value in raised.items():
        setattr(node, name, value)


def with_compute_dtype(module: nn.Module, dtype) -> tuple:
  """(`module` with its own float32 `dtype` field, or its config's, set to `dtype`; the fields
  set, as 'ResNet.dtype').

  `config.precision=bfloat16` for a model written like Flax's examples: their top-level
  `dtype` is what the user sets for half precision (ImageNet's `half_precision` flag makes it
  bfloat16), and every layer receives it. Only the module's own field is set, not its
  layers' literal `dtype=jnp.float32` (a head kept in float32 on purpose stays so, and the
  policy's warning names it).
  """
  changes = _retyped(module, _is_float32, dtype)
  if not changes:
    return module, []
  return module.clone(**changes), _names(module, changes)

