"""Use backprop to chart dependencies: which outputs depend on which inputs.

Karpathy's recipe, stage 2 ("use backprop to chart dependencies"): set the loss to the sum
of the outputs of example i and backpropagate; the gradient must be nonzero only on input i.
A nonzero gradient on another example means the model mixes the batch (the classic bug is a
`view`/`reshape` where a `transpose` was meant). The same trick charts autoregressive models:
output t may depend only on inputs 1..t (or 1..t-1).

Both checks build a dependency matrix and save it as a heatmap:
- `batch_independence`: BxB, entry (i, j) = how much output i depends on input j.
- `causal_dependency`: TxT for one example, entry (s, t) = how much output s depends on
  input t.

Float inputs are differentiated with `jax.vjp` (entry = L2 norm of the gradient of the summed
outputs w.r.t. that input slice). Integer inputs (token ids) cannot be differentiated, so
they are charted by perturbation instead: each input slice is replaced by other token ids
(taken from the batch itself, so they are valid ids) and the entry is the largest absolute
change of the outputs. All perturbed batches run in one vmapped call together with the
unperturbed one, so the comparison is between lanes of the same computation.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jrecipe.checks import plots
from jrecipe.checks.base import CheckResult, artifact_path, verdict
from jrecipe.checks.registry import register_check

REL_TOL = 1e-6
_TINY = 1e-30


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def _alt_tokens(tokens: jax.Array, lo, hi, vocab_size: Optional[int]) -> jax.Array:
  """Other valid token ids, elementwise different from `tokens`.

  With `vocab_size`: (token + 1) mod vocab_size. Otherwise ids seen in the batch: the
  largest id for every token that is not the largest, the smallest for the others (all ids
  equal and no vocabulary known: 0 <-> 1).
  """
  if vocab_size:
    return (tokens + 1) % vocab_size
  if lo == hi:
    return jnp.where(tokens == 0, 1, 0).astype(tokens.dtype)
  return jnp.where(tokens == hi, lo, hi).astype(tokens.dtype)


def _leaves_with_batch(out, batch: int) -> list:
  return [o for o in jax.tree.leaves(out) if jnp.ndim(o) >= 1 and o.shape[0] == batch]


def _plot(path: Optional[str], matrices, **kw) -> tuple[list, dict]:
  """Draws a heatmap; a failure to draw is recorded, never fatal."""
  if path is None:
    return [], {}
  try:
    plots.heatmap(path, matrices, **kw)
    return [path], {}
  except Exception as e:  # pylint: disable=broad-except
    return [], {"plot_error": f"{type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------
# Batch independence.


def _batch_matrix_grad(fn: Callable, x: jax.Array) -> jax.Array:
  """D[i, j] = || d sum(outputs[i]) / d x[j] ||_2 (one vjp, vmapped over the B cotangents)."""
  out, vjp_fn = jax.vjp(fn, x)
  b = x.shape[0]

  def cotangent(i):
    def one(o):
      sel = (jnp.arange(o.shape[0]) == i).reshape((-1,) + (1,) * (o.ndim - 1))
      return jnp.broadcast_to(sel, o.shape).astype(o.dtype)
    return jax.tree.map(one, out)

  (g,) = jax.vmap(vjp_fn)(jax.vmap(cotangent)(jnp.arange(b)))
  g = g.reshape(b, b, -1).astype(jnp.float32)
  return jnp.sqrt(jnp.sum(jnp.square(g), axis=-1))


def _per_example_change(a, b, batch: int) -> jax.Array:
  """Largest |a - b| per example over every output leaf: [B]."""
  diffs = [jnp.max(jnp.abs(x - y).reshape(batch, -1).astype(jnp.float32), axis=1)
           for x, y in zip(_leaves_with_batch(a, batch), _leaves_with_batch(b, batch))]
  return jnp.max(jnp.stack(diffs), axis=0)


def _batch_matrix_perturb(fn: Callable, x: jax.Array, alt: jax.Array) -> jax.Array:
  """D[i, j] = max |change of outputs[i]| when input j is replaced by `alt[j]`."""
  b = x.shape[0]
  lanes = [x] + [x.at[j].set(alt[j]) for j in range(b)]
  outs = jax.vmap(fn)(jnp.stack(lanes))
  ref = jax.tree.map(lambda o: o[0], outs)
  cols = [_per_example_change(jax.tree.map(lambda o, j=j: o[j + 1], outs), ref, b)
          for j in range(b)]
  return jnp.stack(cols, axis=1)  # [i (output), j (input)]


def batch_independence(apply: Callable, variables: Any, x: jax.Array, *,
                       rngs: Optional[dict] = None, has_batchnorm: bool = False,
                       artifacts_dir: Optional[str] = None, max_examples: int = 8,
                       tol: float = REL_TOL, vocab_size: Optional[int] = None) -> CheckResult:
  """Checks that output i of a batch depends on input i only (eval and train mode).

  Recipe step: "use backprop to chart dependencies" (Karpathy, stage 2): the gradient of
  sum(outputs[i]) must be nonzero only on input i. Catches a reshape/view that crosses the
  batch axis where a transpose was meant, and normalisations over the batch.

  The BxB matrix D[i, j] (norm of d sum(out_i) / d x_j for float inputs; largest output
  change under a token perturbation for integer inputs) is computed in eval mode and in
  train mode (dropout with fixed `rngs`, so the mask is a constant). Off-diagonal entries
  are measured relative to the largest diagonal entry.

  Args:
    apply: `apply(variables, x, train=..., rngs=...) -> outputs` (a `Model.apply`); outputs
      (or each leaf of an output pytree) must have the batch as leading axis.
    variables: the model's variables.
    x: a batch of inputs [B, ...]; only the first `max_examples` are used.
    rngs: rngs for train mode (default {'dropout': jax.random.key(0)}).
    has_batchnorm: the model uses BatchNorm: train-mode coupling is then expected (warn).
    artifacts_dir: where to write `batch_dependency.png` (None: no files).
    max_examples: batch size used (4 to 8 is plenty; the cost grows as B^2).
    tol: largest relative off-diagonal dependency accepted.
    vocab_size: for integer inputs, the vocabulary (perturbed ids stay below it); by
      default ids seen in the batch are used.

  Returns:
    CheckResult 'batch_independence': value = max relative off-diagonal dependency over
    both modes, expected 0. Fail on eval-mode coupling (or train-mode coupling without
    BatchNorm); warn on train-mode coupling with BatchNorm or when outputs do not depend on
    inputs at all; skip when the batch has fewer than 2 examples.
  """
  x = jnp.asarray(x)
  if x.ndim == 0 or x.shape[0] < 2:
    return verdict("batch_independence")("skip", "batch_independence needs a batch of at least "
                                         f"2 examples; got inputs of shape {tuple(x.shape)}.")
  x = x[:max_examples]
  b = x.shape[0]
  train_rngs = rngs if rngs is not None else {"dropout": jax.random.key(0)}
  method = "gradient" if _is_float(x) else "perturbation"
  alt = None if method == "gradient" else _alt_tokens(x, int(jnp.min(x)), int(jnp.max(x)),
                                                      vocab_size)
  modes, errors = _batch_matrices(apply, variables, x, train_rngs, method, alt)
  if "eval" in errors:
    return verdict("batch_independence", expected=0.0, details={"errors": errors})(
        "fail", f"{_BATCH_STEP}: the model could not be differentiated in eval mode "
        f"({errors['eval']}).")
  stats, rel_mats = _offdiagonal_stats(modes)
  artifacts, plot_info = _plot(
      artifact_path(artifacts_dir, "batch_dependency.png"), rel_mats,
      title=f"dependency of output i on input j ({method}, relative to max diagonal)",
      xlabel="input example j", ylabel="output example i")
  details = {"method": method, "batch": b, "tol": tol, "modes": stats,
             "matrices": {m: d.tolist() for m, d in modes.items()}, "errors": errors,
             **plot_info}
  value = max(s["max_rel_offdiag"] for s in stats.values())
  result = verdict("batch_independence", value=value, expected=0.0, details=details,
                   artifacts=artifacts)
  passed = (f"each of {b} outputs depends only on its own input in eval and train mode (max "
            f"relative off-diagonal {value:.2g}, {method}).")
  return _batch_verdict(result, stats, errors, has_batchnorm=has_batchnorm, tol=tol,
                        passed=passed)


_BATCH_STEP = "batch_independence (use backprop to chart dependencies)"


def _batch_matrices(apply, variables, x, train_rngs, method, alt) -> tuple[dict, dict]:
  """({'eval': D, 'train': D} as float64 numpy, {mode: error}) for batch_independence."""

  def compute(train, v, xx, rr, aa):
    fn = lambda z: apply(v, z, train=train, rngs=rr)
    if method == "gradient":
      return _batch_matrix_grad(fn, xx)
    return _batch_matrix_perturb(fn, xx, aa)

  # Both modes in one compilation; per mode again only to attribute an error.
  both = lambda v, xx, rr, aa: (compute(False, v, xx, None, aa), compute(True, v, xx, rr, aa))
  modes, errors = {}, {}
  try:
    d_eval, d_train = jax.jit(both)(variables, x, train_rngs, alt)
    return {"eval": np.asarray(d_eval, np.float64),
            "train": np.asarray(d_train, np.float64)}, errors
  except Exception:  # pylint: disable=broad-except
    pass
  for mode, train, r in (("eval", False, None), ("train", True, train_rngs)):
    try:
      d = jax.jit(lambda v, xx, rr, aa, t=train: compute(t, v, xx, rr, aa))(
          variables, x, r, alt)
      modes[mode] = np.asarray(d, np.float64)
    except Exception as e:  # pylint: disable=broad-except
      errors[mode] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  return modes, errors


def _offdiagonal_stats(modes: dict) -> tuple[dict, dict]:
  """Per mode: the largest off-diagonal entry relative to the largest diagonal one, the worst
  (output, input) pair, and the matrix relative to its diagonal (for the picture)."""
  stats, rel_mats = {}, {}
  for mode, d in modes.items():
    off_mask = ~np.eye(d.shape[0], dtype=bool)
    diag = float(np.max(np.diag(d)))
    off = float(np.max(d[off_mask]))
    if diag > 0:
      rel = off / diag
    else:
      rel = 0.0 if off == 0 else float("inf")
    i, j = np.unravel_index(np.argmax(np.where(off_mask, d, -1.0)), d.shape)
    stats[mode] = {"max_rel_offdiag": rel, "max_diag": diag, "max_offdiag": off,
                   "worst_pair": (int(i), int(j))}
    rel_mats[f"{mode} mode"] = d / max(diag, _TINY)
  return stats, rel_mats


def _batch_verdict(result, stats: dict, errors: dict, *, has_batchnorm: bool, tol: float,
                   passed: str) -> CheckResult:
  """batch_independence's rules (see its docstring) on the per-mode statistics."""
  ev, tr = stats["eval"], stats.get("train")
  if ev["max_rel_offdiag"] > tol:
    i, j = ev["worst_pair"]
    return result("fail", f"{_BATCH_STEP}: in eval mode output {i} depends on input {j} "
                  f"(relative {ev['max_rel_offdiag']:.2g} > {tol:g}): the model mixes examples "
                  "of the batch: a reshape/transpose that crosses the batch axis (view vs "
                  "transpose), or a mean/normalisation over axis 0?")
  if "train" in errors:
    return result("warn", f"{_BATCH_STEP}: eval mode is independent, but train mode could not "
                  f"be differentiated ({errors['train']}): does train mode need other rngs?")
  if tr["max_rel_offdiag"] > tol:
    i, j = tr["worst_pair"]
    if has_batchnorm:
      # A pass, not a warn: every correct BatchNorm model couples its training batch.
      return result("pass", f"{_BATCH_STEP}: eval mode is independent; in train mode output "
                    f"{i} depends on input {j} (relative {tr['max_rel_offdiag']:.2g}), as "
                    "BatchNorm's batch statistics legitimately couple a batch in training "
                    "(smaller batches mean more coupling).")
    return result("fail", f"{_BATCH_STEP}: in train mode output {i} depends on input {j} "
                  f"(relative {tr['max_rel_offdiag']:.2g} > {tol:g}) although eval mode is "
                  "independent and the model declares no BatchNorm: a train-only layer that "
                  "mixes the batch (batch statistics, a reshape on a train-only path, dropout "
                  "drawn per batch?)")
  if ev["max_diag"] == 0:
    return result("warn", f"{_BATCH_STEP}: no output depends on any input (all gradients "
                  "zero): a model that ignores its inputs, a stop_gradient, or integer/argmax "
                  "outputs?")
  return result("pass", f"{_BATCH_STEP}: {passed}")


# ---------------------------------------------------------------------------------------------
# Causal dependency.


def causal_skip_reason(spec: Any) -> Optional[str]:
  """Why `causal_dependency` does not apply to a dataset, or None when it does.

  Recipe step: "use backprop to chart dependencies ... same for autoregressive models".

  Args:
    spec: a `jrecipe.types.DataSpec` (anything with `task`, `time_axis`, `name`).

  Returns:
    A one-line reason to skip (not a sequence task, no time axis), or None.
  """
  task = getattr(spec, "task", None)
  name = getattr(spec, "name", "?")
  if task != "sequence":
    return (f"dataset {name!r} is a {task!r} task: causal dependencies only apply to "
            "sequence (autoregressive) models.")
  if getattr(spec, "time_axis", None) is None:
    return f"dataset {name!r} is a sequence task without a time_axis in its DataSpec."
  return None


skip_reason = causal_skip_reason


def _causal_matrix_grad(fn: Callable, xm: jax.Array, example: int) -> jax.Array:
  """D[s, t] = || d sum(outputs[example, s]) / d x[example, t] || (time on axis 1)."""
  out, vjp_fn = jax.vjp(fn, xm)
  b, t_len = xm.shape[0], xm.shape[1]

  def cotangent(s):
    def one(o):
      sel = (jnp.arange(b)[:, None] == example) & (jnp.arange(t_len)[None, :] == s)
      sel = sel.reshape(sel.shape + (1,) * (o.ndim - 2))
      return jnp.broadcast_to(sel, o.shape).astype(o.dtype)
    return jax.tree.map(one, out)

  (g,) = jax.vmap(vjp_fn)(jax.vmap(cotangent)(jnp.arange(t_len)))  # [s, B, t, ...]
  g = g[:, example].reshape(t_len, t_len, -1).astype(jnp.float32)
  return jnp.sqrt(jnp.sum(jnp.square(g), axis=-1))


def _causal_matrix_perturb(fn: Callable, xm: jax.Array, example: int,
                           alt: jax.Array) -> jax.Array:
  """D[s, t] = max |change of outputs[example, s]| when token(s) t become `alt[t]`."""
  t_len = xm.shape[1]
  lanes = [xm] + [xm.at[example, t].set(alt[t]) for t in range(t_len)]
  outs = jax.vmap(fn)(jnp.stack(lanes))  # leaves [1 + T, B, T, ...]
  cols = []
  for o in jax.tree.leaves(outs):
    d = jnp.abs(o[1:, example] - o[0, example][None]).astype(jnp.float32)  # [t, s, ...]
    cols.append(jnp.max(d.reshape(t_len, t_len, -1), axis=-1))
  return jnp.max(jnp.stack(cols), axis=0).T  # [s, t]


def causal_dependency(apply: Callable, variables: Any, x: jax.Array, *, time_axis: int = 1,
                      sees_current: bool = True, artifacts_dir: Optional[str] = None,
                      example: int = 0, tol: float = REL_TOL,
                      vocab_size: Optional[int] = None) -> CheckResult:
  """Checks that output s of a sequence model depends only on inputs t <= s (t < s).

  Recipe step: "use backprop to chart dependencies": for autoregressive models output t
  must depend only on inputs 1..t (next-token prediction where input t is token t) or
  1..t-1 (`sees_current=False`). Catches a causal mask off by one (`jnp.tril(..., k=1)`),
  a missing mask, or a shift applied on the wrong side.

  Builds the TxT matrix D[s, t] for one example in eval mode: for float inputs by
  backpropagating sum(outputs[example, s]); for integer token inputs (not differentiable)
  by a finite change: token t is replaced by another id and D[s, t] is the largest change
  of output s (zero means exactly unchanged). The batch context is kept (the perturbed
  example stays in its batch). Entries are relative to the largest allowed dependency.

  Args:
    apply: `apply(variables, x, train=False, rngs=None) -> outputs`, outputs [B, T, ...]
      with time on the same axis as the inputs (each leaf of an output pytree that has it).
    variables: the model's variables.
    x: inputs [B, T, ...] (float features or int token ids) with time on `time_axis`.
    time_axis: the time axis of inputs and outputs (`DataSpec.time_axis`).
    sees_current: whether output t may depend on input t (`DataSpec.sees_current`).
    artifacts_dir: where to write `causal_dependency.png` (None: no files).
    example: which example of the batch is charted.
    tol: largest relative dependency on a forbidden input accepted (float noise).
    vocab_size: for token inputs, the vocabulary size (perturbed ids stay below it); by
      default ids seen in the batch are used.

  Returns:
    CheckResult 'causal_dependency': value = max relative dependency of an output on a
    forbidden (future) input, expected 0. Fail names the first offending (output, input)
    pair, or says when no output depends on its current input although `sees_current` (it
    predicts two tokens ahead); warn when no output depends on any input; skip without time.
  """
  skip = verdict("causal_dependency")
  x = jnp.asarray(x)
  if x.ndim < 2 or not -x.ndim <= time_axis < x.ndim or time_axis % x.ndim == 0:
    return skip("skip", f"{_CAUSAL_STEP}: inputs of shape {tuple(x.shape)} have no time axis "
                f"{time_axis} besides the batch axis; not a sequence model.")
  time_axis = time_axis % x.ndim
  b, t_len = x.shape[0], x.shape[time_axis]
  if t_len < 2:
    return skip("skip", f"{_CAUSAL_STEP}: sequences of length {t_len}: nothing to chart.")
  example = example if 0 <= example < b else 0
  try:
    out_shape = jax.eval_shape(lambda v, xx: apply(v, xx, train=False, rngs=None), variables, x)
  except Exception as e:  # pylint: disable=broad-except
    return skip("fail", f"{_CAUSAL_STEP}: the eval apply raised {type(e).__name__}: {e}")
  leaves = jax.tree.leaves(out_shape)
  if not any(len(o.shape) > time_axis and o.shape[0] == b and o.shape[time_axis] == t_len
             for o in leaves):
    return skip("skip", f"{_CAUSAL_STEP}: outputs {[tuple(o.shape) for o in leaves]} have no "
                f"time axis {time_axis} of length {t_len} (a sequence-to-one model?): nothing "
                "to chart.")
  method = "gradient" if _is_float(x) else "perturbation"
  d = _causal_matrix(apply, variables, x, time_axis, example, method, vocab_size)
  forbidden = np.triu(np.ones((t_len, t_len), bool), k=1 if sees_current else 0)
  allowed_max = float(np.max(d[~forbidden])) if np.any(~forbidden) else 0.0
  scale = allowed_max if allowed_max > 0 else max(float(np.max(d)), _TINY)
  rel = d / scale
  value = float(np.max(rel[forbidden])) if np.any(forbidden) else 0.0
  artifacts, plot_info = _plot(
      artifact_path(artifacts_dir, "causal_dependency.png"), {f"example {example}": rel},
      title=f"dependency of output s on input t ({method}, relative); allowed: t "
            f"{'<=' if sees_current else '<'} s (left of the red line)",
      xlabel="input position t", ylabel="output position s",
      boundary=0 if sees_current else -1)
  details = {"method": method, "example": example, "time_axis": time_axis,
             "sees_current": sees_current, "tol": tol, "matrix": d.tolist(),
             "scale": scale, **plot_info}
  result = verdict("causal_dependency", value=value, expected=0.0, details=details,
                   artifacts=artifacts)
  tokens = (np.asarray(jnp.moveaxis(x, time_axis, 1)[example]) if method == "perturbation"
            else None)
  return _causal_verdict(result, d, rel, forbidden, tol=tol, sees_current=sees_current,
                         method=method, value=value, tokens=tokens)


_CAUSAL_STEP = "causal_dependency (use backprop to chart dependencies)"


def _causal_matrix(apply, variables, x, time_axis: int, example: int, method: str,
                   vocab_size: Optional[int]) -> np.ndarray:
  """D[s, t] for one example in eval mode (time moved to axis 1 and back around the model)."""
  b, t_len = x.shape[0], x.shape[time_axis]

  def to_model(xm):
    return jnp.moveaxis(xm, 1, time_axis)

  def from_model(out):
    def move(o):
      if jnp.ndim(o) > time_axis and o.shape[0] == b and o.shape[time_axis] == t_len:
        return jnp.moveaxis(o, time_axis, 1)
      return None
    return [m for m in (move(o) for o in jax.tree.leaves(out)) if m is not None]

  xm = jnp.moveaxis(x, time_axis, 1)
  alt = None if method == "gradient" else _alt_tokens(
      xm[example], int(jnp.min(x)), int(jnp.max(x)), vocab_size)

  def compute(v, xm, aa):
    fn = lambda z: from_model(apply(v, to_model(z), train=False, rngs=None))
    if method == "gradient":
      return _causal_matrix_grad(fn, xm, example)
    return _causal_matrix_perturb(fn, xm, example, aa)

  return np.asarray(jax.jit(compute)(variables, xm, alt), np.float64)


def _padding_hint(tokens: Optional[np.ndarray], bad: np.ndarray, forbidden: np.ndarray) -> str:
  """A look-ahead at every output at one token id, and mostly there (at s, or s+1 for a model
  shifting its own inputs), points at a padding mask on it: a fully masked row sees all."""
  if tokens is None or tokens.ndim != 1:
    return ""
  rows, could = np.any(bad, axis=1), np.any(forbidden, axis=1)  # the last row has no future
  for k in (0, 1):
    at = np.concatenate([tokens[k:len(rows) + k], np.full(k, -1, tokens.dtype)])[:len(rows)]
    ids, counts = np.unique(at[rows], return_counts=True)
    v, share = ids[np.argmax(counts)], np.max(counts) / max(np.sum(rows), 1)
    if share >= 0.8 and not np.any(at[could & ~rows] == v):
      return (f"; {share:.0%} of the outputs that look ahead are at input token id {v}, and "
              f"every output at id {v} does: a padding mask that treats id {v} as padding "
              "(`inputs > 0`, LM1B style) masks those attention rows entirely, and a fully "
              f"masked row attends to every position; is {v} a real token in this data?")
  return ""


def _causal_verdict(result, d, rel, forbidden, *, tol: float, sees_current: bool, method: str,
                    value: float, tokens: Optional[np.ndarray] = None) -> CheckResult:
  """causal_dependency's rules (see its docstring) on the relative dependency matrix."""
  t_len = d.shape[0]
  bad = forbidden & (rel > tol)
  allowed_txt = "t <= s" if sees_current else "t < s"
  if np.any(bad):
    s, t = (int(v) for v in np.argwhere(bad)[0])
    n_bad = int(np.sum(bad))
    reach = int(np.max(np.argwhere(bad) @ np.array([-1, 1])))  # max t - s over bad pairs
    if t_len > 2 and np.all(bad[forbidden]):
      cause = "no causal mask at all (or one that is ignored)?"
    elif reach == 0:
      cause = ("output t sees input t although sees_current=False: targets not shifted, or "
               "the mask should be strictly lower-triangular (tril k=-1)?")
    elif reach == 1 and sees_current:
      cause = "causal mask off by one (jnp.tril(..., k=1))? a shift on the wrong side?"
    else:
      cause = f"a look-ahead of up to {reach} positions: a wrong mask, shift or padding?"
    r = result("fail", f"{_CAUSAL_STEP}: output at position {s} depends on input at position "
               f"{t} (relative {rel[s, t]:.2g}; {n_bad} forbidden pairs), but only "
               f"{allowed_txt} is allowed: {cause}{_padding_hint(tokens, bad, forbidden)}")
    r.details["first_offending"] = {"output": s, "input": t}
    return r
  if np.max(d) == 0:
    return result("warn", f"{_CAUSAL_STEP}: no output depends on any input: a model that "
                  "ignores its inputs?")
  if sees_current and not np.any(np.diag(rel) > tol):
    return result("fail", f"{_CAUSAL_STEP}: no output depends on its own position's input "
                  "although sees_current=True (input t is token t, target t is token t+1), so "
                  "the model predicts token t+1 without seeing token t: a model that shifts its "
                  "inputs right itself (LM1B's shift_right: set model.shifts_inputs=True), or a "
                  "mask that hides the current token (tril k=-1, off by one the other way)?")
  return result("pass", f"{_CAUSAL_STEP}: over {t_len} positions every output depends only on "
                f"inputs {allowed_txt} (max relative forbidden dependency {value:.2g}, "
                f"{method}).")


@register_check("batch_independence", stage="dependencies", needs=("loss_at_init",))
def check_batch_independence(ctx) -> CheckResult:
  """Eight held-out examples on the burned-in variables, train mode with step 0's dropout."""
  _, k_drop = ctx.step_keys(0)
  return batch_independence(ctx.model.apply, ctx.burned_in, ctx.x_val[:8],
                            rngs={"dropout": k_drop}, has_batchnorm=ctx.model.has_batchnorm,
                            artifacts_dir=ctx.artifacts_dir, vocab_size=ctx.vocab)


@register_check("causal_dependency", stage="dependencies", needs=("loss_at_init",))
def check_causal_dependency(ctx) -> CheckResult:
  """Four held-out sequences on the burned-in variables (skipped for non-sequence tasks)."""
  reason = causal_skip_reason(ctx.spec)
  if reason:
    return verdict("causal_dependency")("skip", reason)
  return causal_dependency(ctx.model.apply, ctx.burned_in, ctx.x_val[:4],
                           time_axis=ctx.spec.time_axis, sees_current=ctx.spec.sees_current,
                           artifacts_dir=ctx.artifacts_dir, vocab_size=ctx.vocab)
