"""Measuring for the gradient check: float64, the flat parameter vector, centred differences.

CS231n, "gradient checks": the analytic gradient of a loss against the centred difference
(f(x+h) - f(x-h)) / 2h on sampled coordinates of every parameter leaf, in double precision,
with the kinks (ReLU sign patterns) crossed between x+h and x-h recorded. Nothing here
decides: `jrecipe.checks.gradcheck.rules` turns the numbers into a verdict.
"""

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import jax.test_util  # pylint: disable=unused-import
import numpy as np

ROUNDOFF_FACTOR = 100.0  # |g| below 100 ulp(f) / h cannot be resolved by a centred difference


@contextlib.contextmanager
def float64():
  """Context in which JAX computes in float64; restores the previous setting on exit.

  Recipe step: CS231n gradient checks, "use double precision".
  """
  with jax.enable_x64(True):
    yield


def to_f64(tree):
  """Floating leaves as float64 host arrays (no per-leaf device kernels); others unchanged."""
  def cast(v):
    if isinstance(v, (jax.Array, np.ndarray, np.generic, float)):
      dtype = getattr(v, "dtype", np.dtype(float))
      if jnp.issubdtype(dtype, jnp.floating):
        return np.asarray(v, np.float64)
    return v
  return jax.tree.map(cast, tree)


def _leaf_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/") or "(root)"


def _patterns_differ(p, q) -> jax.Array:
  diffs = [jnp.any(a != b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q))]
  return jnp.any(jnp.stack(diffs)) if diffs else jnp.array(False)


def flat_loss(loss_fn: Callable, rebuild: Callable) -> Callable:
  """`f(theta, args)`: the scalar loss as a function of the flat parameter vector."""
  def f(theta, args):
    return jnp.reshape(loss_fn(rebuild(theta), *args), ())
  return f


def make_runner(loss_fn: Callable, rebuild: Callable, kink_fn: Optional[Callable]):
  """jit(theta, idx, h, args) -> (analytic[idx], f(x+h), f(x-h), kinked, (x+h)-(x-h)).

  One compilation; the coordinates run sequentially (lax.map) so memory stays at one
  forward pass whatever their number.
  """
  f = flat_loss(loss_fn, rebuild)

  @jax.jit
  def run(theta, idx, h, args):
    analytic = jax.grad(f)(theta, args)[idx]

    def one(i):
      plus, minus = theta.at[i].add(h), theta.at[i].add(-h)
      kinked = (_patterns_differ(kink_fn(rebuild(plus), *args), kink_fn(rebuild(minus), *args))
                if kink_fn is not None else jnp.array(False))
      return f(plus, args), f(minus, args), kinked, plus[i] - minus[i]

    fp, fm, kinked, step = jax.lax.map(one, idx)
    return analytic, fp, fm, kinked, step

  return run


def run_numbers(run, theta, idx, h, args):
  """(analytic, centred difference, kinked, resolution) per sampled coordinate, as numpy.

  `resolution` is the smallest gradient the centred difference resolves at this h.
  """
  a, fp, fm, k, step = run(theta, idx, jnp.asarray(h, jnp.float64), args)
  a, fp, fm, step = (np.asarray(v, np.float64) for v in (a, fp, fm, step))
  # Smallest gradient the centred difference resolves: float64 roundoff in f(x+-h) / h.
  resolution = ROUNDOFF_FACTOR * np.finfo(np.float64).eps * np.maximum(
      np.maximum(np.abs(fp), np.abs(fm)), np.finfo(np.float64).tiny) / h
  # Centred difference over the step actually taken ((x+h) - (x-h) is 2h up to rounding).
  return a, (fp - fm) / step, np.asarray(k, bool), resolution


KINKS_CROSSED = "kinks crossed by its direction"  # in the outcome: the failure is explained


def _direction_kinks(kink_flat: Callable, theta: np.ndarray, args, eps: float) -> int:
  """How many tracked kink 'winners' (ReLU signs) differ between theta +- eps * u, with u the
  direction check_grads draws (`jax.test_util.check_vjp`: RandomState(0).randn, one draw of
  theta's shape)."""
  u = np.random.RandomState(0).randn(*np.shape(theta))
  plus = kink_flat(jnp.asarray(theta + eps * u), args)
  minus = kink_flat(jnp.asarray(theta - eps * u), args)
  return int(sum(np.sum(np.asarray(a) != np.asarray(b))
                 for a, b in zip(jax.tree.leaves(plus), jax.tree.leaves(minus))))


def check_grads_outcome(f_flat: Callable, theta: np.ndarray, args,
                        kink_fn: Optional[Callable] = None,
                        rebuild: Optional[Callable] = None) -> str:
  """jax.test_util.check_grads on the flat parameter vector (one leaf: few eager kernels).

  Its default float64 step (1e-4 on every parameter at once) often crosses ReLU kinks; on a
  failure it is retried with smaller steps ("try other h"): a wrong rule fails at every step.
  When it fails at every step and `kink_fn(params, *args) -> pattern` is given (params =
  `rebuild(theta)`, the flat vector itself without `rebuild`), the kinks its
  own direction crosses at the smallest step are counted: a step on every parameter at once
  moves every pre-activation of a transformer's MLP (tens of thousands of ReLUs), and a
  crossed kink explains the failure (CS231n: 'kinks'), which the outcome then says.
  """
  fn = jax.jit(lambda th: f_flat(th, args))
  first = None
  for eps in (None, 1e-5, 1e-6):
    try:
      jax.test_util.check_grads(fn, (jnp.asarray(theta),), order=1, modes=("rev",), eps=eps)
      if first is None:
        return "passed"
      return (f"passed at eps={eps:g} (failed at the default eps: kinks or curvature crossed "
              f"by its step on all parameters at once: {first})")
    except AssertionError as e:
      lines = [l.strip() for l in str(e).splitlines() if l.strip()]
      text = " ".join(l for l in lines if "difference" in l or "ACTUAL" in l or "DESIRED" in l)
      first = first or text[:200]
    except Exception as e:  # pylint: disable=broad-except
      return f"error: {type(e).__name__}: {str(e)[:200]}"
  crossed = 0
  if kink_fn is not None:
    kink_flat = jax.jit(lambda th, a: kink_fn(rebuild(th) if rebuild else th, *a))
    crossed = _direction_kinks(kink_flat, theta, args, 1e-6)
  if crossed:
    return (f"failed at eps=default, 1e-05 and 1e-06, {crossed} {KINKS_CROSSED} at eps=1e-06 "
            f"(tracked ReLU signs): {first}")
  return f"failed at eps=default, 1e-05 and 1e-06: {first}"


def seed_generator(rng) -> np.random.Generator:
  """A numpy Generator for the coordinate sampling from a seed, a Generator or a JAX key."""
  if isinstance(rng, np.random.Generator):
    return rng
  if isinstance(rng, jax.Array):
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())
  return np.random.default_rng(0 if rng is None else rng)


@dataclasses.dataclass
class FlatParams:
  """The floating parameter leaves as one float64 vector, and the way back to the pytree.

  Attributes:
    theta: the flat vector (host float64).
    names, shapes, sizes, offsets: per floating leaf: path, shape, size, start in theta.
    rebuild: `rebuild(theta) -> params pytree` (jit-able; non-floating leaves as given).
  """

  theta: np.ndarray
  names: list
  shapes: list
  sizes: list
  offsets: np.ndarray
  rebuild: Callable


def flatten_params(params64: Any) -> Optional[FlatParams]:
  """The floating leaves of a float64 parameter pytree as a FlatParams, or None if none."""
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params64)
  leaves = [v for _, v in path_leaves]
  float_pos = [k for k, v in enumerate(leaves)
               if isinstance(v, np.ndarray) and v.dtype == np.float64 and v.size > 0]
  if not float_pos:
    return None
  shapes = [tuple(leaves[k].shape) for k in float_pos]
  sizes = [int(np.prod(s)) for s in shapes]
  offsets = np.cumsum([0] + sizes[:-1])

  def rebuild(th):
    new = list(leaves)
    for k, o, size, shape in zip(float_pos, offsets, sizes, shapes):
      new[k] = jnp.reshape(th[o:o + size], shape)
    return jax.tree_util.tree_unflatten(treedef, new)

  return FlatParams(theta=np.concatenate([np.ravel(leaves[k]) for k in float_pos]),
                    names=[_leaf_name(path_leaves[k][0]) for k in float_pos], shapes=shapes,
                    sizes=sizes, offsets=offsets, rebuild=rebuild)


def sample_coords(flat: FlatParams, coords_per_leaf: int, np_rng: np.random.Generator):
  """(leaf of each sampled coordinate, its index inside the leaf, its index in theta)."""
  leaf_of, local_idx = [], []
  for leaf, size in enumerate(flat.sizes):
    chosen = np.sort(np_rng.choice(size, size=min(coords_per_leaf, size), replace=False))
    leaf_of += [leaf] * len(chosen)
    local_idx += chosen.tolist()
  leaf_of, local_idx = np.asarray(leaf_of), np.asarray(local_idx)
  return leaf_of, local_idx, jnp.asarray(flat.offsets[leaf_of] + local_idx)


def trace_dtypes(losses: dict, flat: FlatParams, args64) -> tuple[dict, dict]:
  """({loss: dtype of the loss from float64 inputs}, {loss: error tracing it in float64}).

  Double precision end to end? A float32 cast in the model or loss defeats the check.
  """
  loss_dtypes, errors = {}, {}
  for which, (fn, kf) in losses.items():
    try:
      loss_dtypes[which] = str(jax.eval_shape(flat_loss(fn, flat.rebuild), flat.theta,
                                              args64).dtype)
      if kf is not None:
        jax.eval_shape(lambda th, a, kf=kf: kf(flat.rebuild(th), *a), flat.theta, args64)
    except Exception as e:  # pylint: disable=broad-except
      errors[which] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
  return loss_dtypes, errors


_COMPUTE_OPS = ("dot_general", "conv_general_dilated")  # where a model's precision is decided


def _sub_jaxprs(value):
  """The jaxprs inside an equation parameter (pjit, custom_vjp, scan, cond branches)."""
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _compute_dtypes(jaxpr, found: set) -> None:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _COMPUTE_OPS:
      found.update(str(v.aval.dtype) for v in eqn.outvars)
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        _compute_dtypes(sub, found)


def compute_dtypes(losses: dict, flat: FlatParams, args64) -> dict:
  """{loss: sorted dtypes of its matrix products and convolutions below float64}.

  Why: a model can compute in float32 (a `dtype=float32` layer, an `astype(float32)` at its
  input) and cast its output back to float64; the loss is then float64 while every gradient
  carries float32 rounding, which the float64 thresholds would call a wrong backward rule.
  The jaxpr of the loss traced from float64 inputs says what the products really run in.
  """
  out = {}
  for which, (fn, _) in losses.items():
    try:
      closed = jax.make_jaxpr(flat_loss(fn, flat.rebuild))(flat.theta, args64)
    except Exception:  # pylint: disable=broad-except  (trace_dtypes reports trace errors)
      continue
    found: set = set()
    _compute_dtypes(closed.jaxpr, found)
    low = sorted(d for d in found if d != "float64")
    if low:
      out[which] = low
  return out
