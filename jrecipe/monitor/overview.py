"""The parameter overview at initialisation: 'fail fast and loudly' before a single step.

Every leaf's name, shape, size, mean and std, and the total count: a wrong shape, a
zero-initialised kernel or a std 100x too large is visible before training starts.
"""

import numpy as np

from jrecipe.train.step import leaf_names


def parameter_overview(params) -> dict:
  """{'leaves': [{name, shape, size, mean, std}, ...], 'total': int} of a params pytree."""
  import jax
  leaves = []
  for name, x in zip(leaf_names(params), jax.tree.leaves(params)):
    a = np.asarray(x, np.float64)
    leaves.append({"name": name, "shape": list(a.shape), "size": int(a.size),
                   "mean": float(a.mean()) if a.size else 0.0,
                   "std": float(a.std()) if a.size else 0.0})
  return {"leaves": leaves, "total": int(sum(r["size"] for r in leaves))}


def format_overview(overview: dict) -> str:
  """The overview as a fixed-width table (printed at init)."""
  rows = [f"{'parameter':<40} {'shape':<18} {'size':>10} {'mean':>10} {'std':>10}"]
  for r in overview["leaves"]:
    rows.append(f"{r['name']:<40} {str(tuple(r['shape'])):<18} {r['size']:>10,} "
                f"{r['mean']:>10.4f} {r['std']:>10.4f}")
  rows.append(f"{'total':<40} {'':<18} {overview['total']:>10,}")
  return "\n".join(rows)
