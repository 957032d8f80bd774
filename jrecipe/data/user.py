"""Your own data in one short file: a function returning numpy arrays per split.

`config.data.name = 'mypkg.data:load'` names a function `load() -> dict` (docs/your_data.md):

    {'train': (x, y), 'validation': (x, y), 'test': (x, y),   # numpy arrays, x [N, ...]
     'num_classes': 10,                                        # None for regression
     'task': 'classification',                                 # or 'regression', 'sequence'
     'class_names': ('zero', ...)}                             # optional

Every split has as many labels as inputs, and the same example shape; labels are integers in
[0, num_classes) for classification and sequences ([N, T]: one next token per input step),
floats for regression. The arrays then go through the same path as jrecipe's own datasets
(normalisation, train_subset, downsample, stable ids), so every mode sees them alike.
"""

from typing import Any

import numpy as np

from jrecipe.data.reading import SPLITS
from jrecipe.errors import UserError

TASKS = ("classification", "regression", "sequence")


def _bad(name: str, problem: str) -> UserError:
  return UserError(
      f"The data function {name!r} returned {problem}. It must return a dict with 'train', "
      "'validation' and 'test' each an (x, y) pair of numpy arrays with as many labels as "
      "inputs and one example shape, plus 'num_classes' (None for regression) and 'task' "
      f"({', '.join(TASKS)}); see docs/your_data.md.")


def _split(name: str, out: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
  pair = out.get(split)
  if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
    raise _bad(name, f"no (x, y) pair for the {split!r} split (got {type(pair).__name__})")
  x, y = np.asarray(pair[0]), np.asarray(pair[1])
  if x.ndim < 2 or len(x) != len(y) or len(x) == 0:
    raise _bad(name, f"mismatched {split!r} arrays: x {x.shape} and y {y.shape} (x needs a "
               "leading example axis and one label per example)")
  return x, y


def read_user(name: str) -> tuple[dict, dict]:
  """(meta, splits as stored) from the user's data function `name` ('pkg.module:function')."""
  from jrecipe.registry import import_path
  fn = import_path(name, "data function")
  out = fn()
  if not isinstance(out, dict):
    raise _bad(name, f"a {type(out).__name__}, not a dict")
  task = out.get("task", "classification")
  if task not in TASKS:
    raise _bad(name, f"task={task!r}")
  pairs = {s: _split(name, out, s) for s in SPLITS}
  shapes = {s: x.shape[1:] for s, (x, _) in pairs.items()}
  if len(set(shapes.values())) > 1:
    raise _bad(name, f"splits whose examples differ in shape: {shapes}")
  num_classes = out.get("num_classes")
  if task != "regression":
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
      raise _bad(name, f"num_classes={num_classes!r} for a {task} task (an int >= 2)")
    for s, (_, y) in pairs.items():
      if not np.issubdtype(y.dtype, np.integer):
        raise _bad(name, f"{s!r} labels of dtype {y.dtype} for a {task} task (integers)")
  splits, start = {}, 0
  for s, (x, y) in pairs.items():  # ids unique over all splits, stable across runs
    splits[s] = {"x": x, "y": y, "id": np.arange(start, start + len(x), dtype=np.int64)}
    start += len(x)
  names = out.get("class_names")
  meta = dict(task=task, num_classes=int(num_classes) if num_classes else None,
              class_names=tuple(names) if names is not None else None,
              time_axis=1 if task == "sequence" else None, sees_current=True)
  return meta, splits


def is_user_data(name: Any) -> bool:
  """Whether a data name is an import path to the user's own data function."""
  return isinstance(name, str) and ":" in name and not name.startswith("tfds:")
