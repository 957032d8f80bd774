"""The model contract's adapter fields: what jrecipe does around a factory (docs/your_model.md).

A config's model section holds the factory's own keyword fields and a few fields jrecipe reads
itself, never passed to the factory (`ADAPTER_FIELDS`):

    model.output        which output is the prediction when the model returns a tuple / dict
                        (an index or a key; default: element 0 of a tuple, 'logits' of a dict)
    model.shifts_inputs True for a sequence model that shifts its inputs right itself (the
                        LM1B style, trained on `loss(model(tokens), tokens)`): jrecipe feeds it
                        the inputs with one pad step appended and drops its first output, so
                        output t predicts target t from inputs <= t
    model.width_field   the factory field (or fields, comma-separated) that sets its width:
                        the capacity check's wider model multiplies it
    model.inherited     set by the command line when `--config.model.name` replaces the config
                        file's model: the file's other model fields, passed to the new factory
                        only where it declares them (jrecipe.cli_config)

The factory itself receives the DataSpec first, then `bn_axis_name` and `rngs` only if it
declares them, then its fields (`call_factory`).
"""

import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jrecipe.errors import UserError

ADAPTER_FIELDS = ("output", "shifts_inputs", "width_field", "inherited")


def _params_of(factory: Callable) -> Optional[dict]:
  try:
    return dict(inspect.signature(factory).parameters)
  except (TypeError, ValueError):
    return None


def declares(factory: Callable, arg: str) -> bool:
  """Whether `factory` takes the keyword `arg` (by name, or through **kwargs)."""
  params = _params_of(factory)
  if params is None:
    return False
  return arg in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def call_factory(factory: Callable, spec: Any, bn_axis_name: Optional[str], fields: dict,
                 rngs: Any = None) -> Any:
  """`factory(spec, [bn_axis_name=...], [rngs=...], **fields)`: only what it declares.

  jrecipe's own factories take `(spec, bn_axis_name, ...)` positionally; that still works,
  since the second positional parameter is then named `bn_axis_name`.
  """
  extra = {}
  if declares(factory, "bn_axis_name"):
    extra["bn_axis_name"] = bn_axis_name
  if rngs is not None:
    extra["rngs"] = rngs
  return factory(spec, **extra, **fields)


def pop_adapter_fields(fields: dict) -> tuple[dict, dict]:
  """(the factory's fields, the adapter fields) of a model section."""
  own = {k: v for k, v in fields.items() if k not in ADAPTER_FIELDS}
  adapter = {k: fields[k] for k in ADAPTER_FIELDS if k in fields}
  return own, adapter


def _fits(value: Any, param: inspect.Parameter) -> bool:
  """Whether an inherited value suits a factory parameter's annotation and default.

  Only plain types are compared (int, float, bool, str, tuple, ...): an int fits a float, a
  bool fits only a bool; a default of None and annotations such as Optional[...] or
  Sequence[int] accept anything.
  """
  def fits(kind) -> bool:
    if not isinstance(kind, type) or kind is object:
      return True
    if kind is float:
      return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
      return isinstance(value, int) and not isinstance(value, bool)
    if kind in (tuple, list):
      return isinstance(value, (tuple, list))
    return isinstance(value, kind)

  default = param.default
  if default is not param.empty and default is not None and not fits(type(default)):
    return False
  return param.annotation is param.empty or fits(param.annotation)


def drop_inherited(name: str, factory: Callable, fields: dict, inherited) -> dict:
  """`fields` without the inherited ones (see the module docstring) the factory lacks, or
  declares with another type (the config file's `width=1.0`, a float multiplier, is not
  passed to a factory's `width: int = 32`: it keeps its own default)."""
  params = _params_of(factory)
  if not inherited or params is None or any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return fields
  dropped = sorted(k for k in inherited if k in fields and k not in params)
  mismatched = sorted(k for k in inherited if k in fields and k in params
                      and not _fits(fields[k], params[k]))
  import logging
  log = logging.getLogger("jrecipe")
  if dropped:
    log.info("model %r does not declare %s (set by the config file for its own model): not "
             "passed.", name, ", ".join(dropped))
  for k in mismatched:
    log.info("model %r declares %s; the config file's %s=%r (for its own model) does not fit "
             "it: not passed (set --config.model.%s to change it).", name, params[k], k,
             fields[k], k)
  return {k: v for k, v in fields.items() if k not in dropped and k not in mismatched}


def select_output(out: Any, selector: Any, name: str) -> Any:
  """The prediction among a model's outputs (an array, a tuple or a dict).

  Args:
    out: what the model returned.
    selector: `model.output`: an index or a key, or None for the default (element 0 of a
      tuple or list, 'logits' of a dict).
    name: the model's name, for messages.
  """
  if isinstance(out, (tuple, list)):
    key = 0 if selector is None else selector
    if not isinstance(key, int) or not -len(out) <= key < len(out):
      raise UserError(f"The model {name!r} returns a tuple of {len(out)} outputs, and "
                      f"model.output={selector!r} does not index it: set model.output to the "
                      f"position of the logits (0..{len(out) - 1}).")
    return out[key]
  if isinstance(out, dict):
    key = "logits" if selector is None else selector
    if key not in out:
      raise UserError(f"The model {name!r} returns a dict with keys {sorted(out)}: set "
                      f"model.output to the key of the prediction (now {key!r}).")
    return out[key]
  return out


def wrap_outputs(model, *, output: Any = None, shifts_inputs: bool = False):
  """`model` with its apply functions selecting the prediction and, for a self-shifting
  sequence model, realigned so that output t predicts target t (module docstring)."""
  import dataclasses
  inner = model.apply_with_state

  def apply_with_state(variables, x, train=False, rngs=None):
    if shifts_inputs:
      x = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
    out, state = inner(variables, x, train, rngs)
    out = select_output(out, output, model.name)
    return (out[:, 1:] if shifts_inputs else out), state

  def apply(variables, x, train=False, rngs=None):
    return apply_with_state(variables, x, train, rngs)[0]

  return dataclasses.replace(model, apply=apply, apply_with_state=apply_with_state)


def needs_wrap(out_shapes: Any, adapter: dict) -> bool:
  """Whether the outputs (abstract) or the adapter fields call for `wrap_outputs`."""
  return (isinstance(out_shapes, (tuple, list, dict)) or adapter.get("output") is not None
          or bool(adapter.get("shifts_inputs")))


def leaf(params: Any, path: tuple) -> Any:
  """params[path[0]][path[1]]...; None when a key is missing."""
  node = params
  for key in path:
    if not hasattr(node, "get") or key not in node:
      return None
    node = node[key]
  return node


def with_leaf(params: Any, path: tuple, value: Any) -> dict:
  """A copy of the nested dict `params` with the leaf at `path` replaced."""
  if not path:
    return value
  new = dict(params)
  new[path[0]] = with_leaf(params[path[0]], path[1:], value)
  return new


def _candidates(params: Any, width: int) -> list:
  """Paths of the parameter vectors of length `width` (a final bias has that shape)."""
  out = []
  for path, v in jax.tree_util.tree_flatten_with_path(params)[0]:
    if np.shape(v) == (width,) and jnp.issubdtype(np.asarray(v).dtype, jnp.floating):
      out.append(tuple(getattr(k, "key", getattr(k, "name", k)) for k in path))
  return out


def find_head(model, variables: dict, x: jax.Array) -> Optional[tuple]:
  """The path of the final layer's bias in params: the vector the outputs add unchanged.

  'Init well' sets that bias from the data, wherever the head sits (params['head'], a
  wrapper's classifier/out, NNX's linear). A bias b is the head's when outputs(b + t) =
  outputs(b) + t for every example: the Jacobian-vector product with a tangent on b alone is
  t broadcast over the batch (and time). Measured with one jvp per candidate of the output
  width, in eval mode; `('head', 'bias')` is taken without measuring.

  Returns:
    The path as a tuple of keys, or None when no parameter vector passes (no bias on the
    last layer, or a normalisation after it).
  """
  params = variables["params"]
  out = jax.eval_shape(lambda v: model.apply(v, x), variables)
  if not hasattr(out, "shape") or not out.shape:
    return None
  width = out.shape[-1]
  found = _candidates(params, width)
  if ("head", "bias") in found:
    return ("head", "bias")
  if not found:
    return None
  t = jnp.asarray(np.random.default_rng(0).normal(size=width), jnp.float32)

  @jax.jit
  def response(p, hot):
    tangent = jax.tree.map(jnp.zeros_like, p)
    for k, path in enumerate(found):
      tangent = with_leaf(tangent, path, (hot[k] * t).astype(leaf(p, path).dtype))
    _, dout = jax.jvp(lambda q: model.apply({**variables, "params": q}, x), (p,), (tangent,))
    return jnp.max(jnp.abs(dout - t.astype(dout.dtype)))

  hits = [path for k, path in enumerate(found)
          if float(response(params, jnp.eye(len(found))[k])) <= 1e-5 * float(jnp.max(abs(t)))]
  return hits[-1] if hits else None


def widen_from_fields(fields_to_scale: tuple) -> Callable:
  """`widen_kwargs(fields, factor)` multiplying the named width fields (`scale_width`)."""
  from jrecipe.models.core import scale_width

  def widen_kwargs(kw: dict, factor: float) -> dict:
    missing = [k for k in fields_to_scale if k not in kw]
    if missing:
      raise UserError(f"model.width_field names {missing}, which the factory neither takes "
                      "with a default nor gets from the config.")
    return {**kw, **{k: scale_width(kw[k], factor) for k in fields_to_scale}}
  return widen_kwargs


def width_fields(adapter: dict, factory: Callable) -> tuple:
  """The width fields from `model.width_field`, else the factory's `widen_fields` attribute."""
  spec = adapter.get("width_field") or getattr(factory, "widen_fields", ())
  if isinstance(spec, str):
    spec = tuple(s.strip() for s in spec.split(",") if s.strip())
  return tuple(spec)
