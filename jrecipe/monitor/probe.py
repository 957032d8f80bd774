"""Per-layer activation and gradient statistics on one fixed batch (CS231n 'babysitting').

One jitted function of (params, model state, x, y): a forward pass in eval mode with Flax's
`capture_intermediates` (the output of every layer that owns a kernel, i.e. the
pre-activation of the non-linearity that follows it) and the gradient of the mean data loss
with respect to every parameter leaf. Everything is reduced on the device to a few numbers
per layer (a 30-bin histogram, mean, std, min, max, the fraction of dead ReLUs or of
saturated tanh/sigmoid units), so only a few kilobytes come back to the host.

Dead ReLU: a unit (a feature, or a conv channel) whose pre-activation is <= 0 for every
example (and position) of the batch: it passes no gradient at all. Saturated unit: a tanh
output beyond +-0.99 (|pre-activation| > 2.65) or a sigmoid output outside [0.01, 0.99]
(|pre-activation| > 4.6): its local gradient is below 2% of the maximum.
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp

from jrecipe.train.step import leaf_names

BINS = 30
# |pre-activation| beyond which the unit counts as saturated.
SATURATION = {"tanh": math.atanh(0.99), "sigmoid": math.log(0.99 / 0.01)}
UNIT_ACTIVATIONS = ("relu", "tanh", "sigmoid")
HEAD = "head"


def activation_of(config) -> Optional[str]:
  """The non-linearity that follows each hidden layer, when jrecipe knows it.

  'mlp'-style models name it in `model.activation`; the 'cnn' uses ReLU. Other models (or an
  unknown activation) get histograms only, no dead/saturated fractions.
  """
  act = config.model.get("activation", None) if hasattr(config.model, "get") else None
  if act is None and config.model.name == "cnn":
    act = "relu"
  return act if act in UNIT_ACTIVATIONS else None


def _stats(a: jax.Array) -> dict:
  a = a.astype(jnp.float32)
  lo, hi = jnp.min(a), jnp.max(a)
  hi = jnp.where(hi > lo, hi, lo + 1e-6)
  edges = jnp.linspace(lo, hi, BINS + 1)
  # bincount of the bin index: much cheaper to trace and run than jnp.histogram's search
  idx = jnp.clip(jnp.floor((a.ravel() - lo) / (hi - lo) * BINS), 0, BINS - 1).astype(jnp.int32)
  counts = jnp.bincount(idx, length=BINS)
  return {"min": lo, "max": hi, "mean": jnp.mean(a), "std": jnp.std(a),
          "num": jnp.asarray(a.size, jnp.float32), "sum": jnp.sum(a),
          "sum_squares": jnp.sum(jnp.square(a)), "edges": edges, "counts": counts}


def _unit_stats(a: jax.Array, activation: Optional[str]) -> dict:
  if activation == "relu":
    axes = tuple(range(a.ndim - 1))  # every axis but the features/channels
    return {"dead_fraction": jnp.mean(jnp.all(a <= 0, axis=axes).astype(jnp.float32))}
  if activation in SATURATION:
    return {"saturated_fraction": jnp.mean((jnp.abs(a) > SATURATION[activation]).astype(
        jnp.float32))}
  return {}


def _layer_name(path) -> Optional[str]:
  keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  if "__call__" not in keys:
    return None
  return "/".join(keys[:keys.index("__call__")]) or None


def make_probe(model, loss, activation: Optional[str]):
  """`probe(params, model_state, x, y) -> {'loss', 'activations': {...}, 'gradients': {...}}`.

  Args:
    model: the experiment's `jrecipe.types.Model`; layer activations need `model.module`
      (a Linen module); without one only gradient statistics are computed.
    loss: the experiment's Loss.
    activation: 'relu', 'tanh', 'sigmoid' or None (see `activation_of`).

  Returns:
    A jitted function; per layer and per leaf a dict of device scalars and the histogram.
  """
  module = model.module

  def forward_intermediates(variables, x):
    kw = {"capture_intermediates": True, "mutable": ["intermediates"]}
    try:
      _, st = module.apply(variables, x, train=False, **kw)
    except TypeError:
      _, st = module.apply(variables, x, **kw)
    return st["intermediates"]

  def probe(params, model_state, x, y):
    def data_loss(p):
      out = model.apply({"params": p, **model_state}, x, False, None)
      return jnp.mean(loss.per_example(out, y))

    value, grads = jax.value_and_grad(data_loss)(params)
    names = leaf_names(params)
    gradients = {n: _stats(g) for n, g in zip(names, jax.tree.leaves(grads))}
    activations = {}
    if module is not None and hasattr(module, "apply"):
      layers = {n.rsplit("/", 1)[0] for n in names if n.endswith("kernel") and "/" in n}
      inter = forward_intermediates({"params": params, **model_state}, x)
      for path, a in jax.tree_util.tree_flatten_with_path(inter)[0]:
        layer = _layer_name(path)
        if layer in layers and layer not in activations:
          s = _stats(a)
          if layer.split("/")[-1] != HEAD:
            s.update(_unit_stats(a, activation))
          activations[layer] = s
    return {"loss": value, "activations": activations, "gradients": gradients}

  return jax.jit(probe)
