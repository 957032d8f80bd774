"""The per-example table: filter and sort along any axis, write it as CSV.

Recipe stage 1: 'write code to search, filter and sort by whatever you can think of'. The
table is a dict of equal-length numpy columns (no pandas needed). Filters are small Python
expressions over column names, parsed with `ast` and evaluated vectorised over the columns;
only comparisons, `and`/`or`/`not`, `&`/`|`/`~`, arithmetic, `abs()`, numbers and strings
are allowed (no names other than columns, no calls other than abs, no attributes).

    rows = select(table, "label == 3 and std < 5", sort_by="std", descending=True)
"""

import ast
import csv
import os
from typing import Optional

import numpy as np

from jrecipe.errors import UserError

_CMP = {ast.Eq: np.equal, ast.NotEq: np.not_equal, ast.Lt: np.less, ast.LtE: np.less_equal,
        ast.Gt: np.greater, ast.GtE: np.greater_equal}
_BIN = {ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply, ast.Div: np.true_divide,
        ast.Mod: np.mod, ast.Pow: np.power, ast.BitAnd: np.logical_and,
        ast.BitOr: np.logical_or}
EXAMPLES = "label==3, std<2 and split=='train', near_dup or exact_dup, abs(mean-5)>2"


def _bad(expr: str, why: str, columns) -> UserError:
  return UserError(
      f"The inspect filter {expr!r} is not valid: {why}. A filter is a Python expression over "
      f"the table's columns ({', '.join(columns)}) with comparisons, and/or/not, arithmetic and "
      f"abs(), e.g. {EXAMPLES}.")


def evaluate_filter(table: dict, expr: str) -> np.ndarray:
  """Boolean [N] mask of the rows where `expr` holds; UserError if it does not parse or names
  an unknown column."""
  columns = list(table)
  n = len(next(iter(table.values()))) if table else 0
  try:
    tree = ast.parse(expr.strip(), mode="eval")
  except SyntaxError as e:
    raise _bad(expr, f"it does not parse ({e.msg})", columns) from e

  def ev(node):
    if isinstance(node, ast.Expression):
      return ev(node.body)
    if isinstance(node, ast.BoolOp):
      vals = [np.asarray(ev(v), bool) for v in node.values]
      fn = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
      out = vals[0]
      for v in vals[1:]:
        out = fn(out, v)
      return out
    if isinstance(node, ast.UnaryOp):
      v = ev(node.operand)
      if isinstance(node.op, (ast.Not, ast.Invert)):
        return np.logical_not(np.asarray(v, bool))
      if isinstance(node.op, ast.USub):
        return -np.asarray(v)
      if isinstance(node.op, ast.UAdd):
        return v
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
      left, right = ev(node.left), ev(node.right)
      if isinstance(node.op, (ast.BitAnd, ast.BitOr)):
        left, right = np.asarray(left, bool), np.asarray(right, bool)
      with np.errstate(all="ignore"):
        return _BIN[type(node.op)](left, right)
    if isinstance(node, ast.Compare):
      out, left = np.ones(n, bool), ev(node.left)
      for op, comp in zip(node.ops, node.comparators):
        right = ev(comp)
        if isinstance(op, (ast.In, ast.NotIn)):  # 'near' in flags: substring test
          if not isinstance(left, str) or np.asarray(right).dtype.kind not in "OUS":
            raise _bad(expr, "'in' tests a text column for a substring, e.g. 'leak' in flags",
                       columns)
          hit = np.char.find(np.asarray(right, dtype=str), left) >= 0
          out = out & (hit if isinstance(op, ast.In) else ~hit)
        elif type(op) in _CMP:
          try:
            out = out & np.asarray(_CMP[type(op)](left, right), bool)
          except TypeError as e:  # str vs number (numpy >= 2 raises UFuncNoLoopError)
            raise _bad(expr, f"cannot compare {ast.unparse(node)} ({e})", columns) from e
        else:
          raise _bad(expr, f"the operator in {ast.unparse(node)!r} is not allowed", columns)
        left = right
      return out
    if isinstance(node, ast.Name):
      if node.id not in table:
        raise _bad(expr, f"there is no column {node.id!r}", columns)
      return table[node.id]
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
      return node.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "abs"
        and len(node.args) == 1 and not node.keywords):
      return np.abs(ev(node.args[0]))
    raise _bad(expr, f"{ast.unparse(node)!r} is not allowed", columns)

  try:
    mask = ev(tree)
  except UserError:
    raise
  except (TypeError, ValueError) as e:
    raise _bad(expr, str(e), columns) from e
  mask = np.asarray(mask)
  if mask.shape == ():  # a constant expression ('True'): every or no row
    mask = np.full(n, bool(mask))
  if mask.shape != (n,):
    raise _bad(expr, "it does not give one true/false value per example", columns)
  if mask.dtype != bool:
    raise _bad(expr, f"it gives {mask.dtype} values, not true/false (add a comparison)",
               columns)
  return mask


def check_names(expr: str, sort_by: str, columns: list) -> None:
  """UserError if the filter does not parse or names a column not in `columns`, or if
  sort_by is not a column: run before any work (the table's columns are known in advance)."""
  if expr and expr.strip():
    try:
      tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
      raise _bad(expr, f"it does not parse ({e.msg})", columns) from e
    calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for n in ast.walk(tree):
      if isinstance(n, ast.Call) and not (isinstance(n.func, ast.Name) and n.func.id == "abs"):
        raise _bad(expr, f"{ast.unparse(n)!r} is not allowed (the only function is abs)",
                   columns)
    for node in ast.walk(tree):
      if isinstance(node, ast.Name) and id(node) not in calls and node.id not in columns:
        raise _bad(expr, f"there is no column {node.id!r}", columns)
  if sort_by and sort_by not in columns:
    raise UserError(f"inspect.sort_by={sort_by!r} is not a column of the table. Valid "
                    f"columns: {', '.join(columns)}.")


def select(table: dict, filter_expr: str = "", sort_by: str = "",
           descending: bool = False) -> np.ndarray:
  """Row indices of `table` where `filter_expr` holds, ordered by column `sort_by`.

  Args:
    table: column name -> [N] array.
    filter_expr: '' (all rows) or an expression, see `evaluate_filter`.
    sort_by: '' (table order) or a column name; NaN sorts last either way.
    descending: largest first.

  Returns:
    int64 row indices.
  """
  n = len(next(iter(table.values()))) if table else 0
  rows = np.arange(n)
  if filter_expr and filter_expr.strip():
    rows = rows[evaluate_filter(table, filter_expr)]
  if sort_by:
    if sort_by not in table:
      raise UserError(f"inspect.sort_by={sort_by!r} is not a column of the table. Valid "
                      f"columns: {', '.join(table)}.")
    col = np.asarray(table[sort_by])[rows]
    if col.dtype.kind in "fiub":
      key = col.astype(np.float64)
      key = np.where(np.isnan(key), np.inf, -key if descending else key)
      rows = rows[np.argsort(key, kind="stable")]
    else:
      order = np.argsort(col.astype(str), kind="stable")
      rows = rows[order[::-1] if descending else order]
  return rows.astype(np.int64)


def _fmt(v) -> str:
  if isinstance(v, (float, np.floating)):
    return "" if np.isnan(v) else f"{float(v):.6g}"
  if isinstance(v, (bool, np.bool_)):
    return str(int(v))
  return str(v)


def write_csv(path: str, table: dict, rows: Optional[np.ndarray] = None) -> None:
  """Writes the table (or the given rows, in that order) as CSV, atomically."""
  cols = list(table)
  n = len(next(iter(table.values()))) if table else 0
  rows = np.arange(n) if rows is None else rows
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for s in range(0, len(rows), 8192):  # in chunks: bounded memory on large tables
      data = [np.asarray(table[c])[rows[s:s + 8192]].tolist() for c in cols]
      w.writerows(zip(*[[_fmt(v) for v in col] for col in data]))
  os.replace(tmp, path)


def read_csv(path: str) -> dict:
  """A table written by `write_csv`, numeric columns as float64 (empty cells NaN)."""
  with open(path, newline="") as f:
    r = csv.reader(f)
    header = next(r)
    values = list(zip(*r)) or [()] * len(header)
  out = {}
  for name, col in zip(header, values):
    try:
      out[name] = np.array([float(v) if v != "" else np.nan for v in col], np.float64)
    except ValueError:
      out[name] = np.array(col, dtype=object)
  return out
