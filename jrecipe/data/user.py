"""Your own data in one short file, named by import path (docs/your_data.md).

Recipe step served: 'Become one with the data' on your data, read whole into the same
in-memory arrays as jrecipe's own datasets, so every mode (train, check, inspect, report)
sees exactly what the model sees. `config.data.name = 'mypkg.data:NAME'` names one of:

1. A function `load() -> dict` returning numpy arrays per split:

       {'train': (x, y), 'validation': (x, y), 'test': (x, y),   # numpy arrays, x [N, ...]
        'num_classes': 10,                                        # None for regression
        'task': 'classification',                                 # or 'regression', 'sequence'
        'class_names': ('zero', ...)}                             # optional

   A split may instead be a random-access data source (grain's protocol: anything but a
   tuple or list with `__len__` and `__getitem__`, e.g. `grain.MapDataset.source(
   ArrayRecordDataSource(paths)).map(parse)`) whose elements are `(x, y)` pairs or dicts
   (a tuple or list is always the split's (x, y) pair); a dict's input and label are
   `out['keys']` (e.g. `('image', 'label')`), else the first of `DICT_KEYS` it holds. Its
   elements are read once, in order, into arrays.
2. A TFDS builder class (a `tfds.core.GeneratorBasedBuilder` subclass): prepared into
   `data.data_dir` in the array_record format on first use (no TensorFlow needed), then read
   by random access. Input and label are its `supervised_keys` (else as for a dict); a
   `ClassLabel` label gives the classes, float labels a regression, integer `[T]` labels a
   sequence task; no 'validation' split: the last 10% of 'train'.

Every split has as many labels as inputs, and the same example shape; labels are integers in
[0, num_classes) for classification and sequences ([N, T]: one next token per input step),
floats for regression. The arrays then go through the same path as jrecipe's own datasets
(normalisation, train_subset, downsample, stable ids). Data larger than `MEMORY_FRACTION` of
the available memory is refused before it is read (the streaming path is for that).
"""

import inspect
import os
from typing import Any

import numpy as np

from jrecipe.data import damage
from jrecipe.data.reading import SPLITS
from jrecipe.errors import UserError

TASKS = ("classification", "regression", "sequence")
# (input, label) keys tried, in order, on a dict element without out['keys'] or supervised_keys.
DICT_KEYS = (("image", "label"), ("x", "y"), ("inputs", "targets"))
# The in-memory path reads a source whole: refuse one whose arrays would take more than this
# fraction of the memory available now (other copies, normalised, come on top).
MEMORY_FRACTION = 0.5


def _bad(name: str, problem: str) -> UserError:
  return UserError(
      f"The data {name!r} gave {problem}. A data function must return a dict with 'train', "
      "'validation' and 'test' each an (x, y) pair of numpy arrays (or a random-access source "
      "of (x, y) pairs or dicts) with as many labels as inputs and one example shape, plus "
      f"'num_classes' (None for regression) and 'task' ({', '.join(TASKS)}); see "
      "docs/your_data.md.")


def _available_bytes() -> int:
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):  # not POSIX: no limit known
    return 1 << 62


def _pair_of(name: str, element: Any, keys: Any, where: str) -> tuple:
  """(x, y) of one source element: a pair, or a dict read at `keys` (or `DICT_KEYS`)."""
  if isinstance(element, dict):
    for k in ([tuple(keys)] if keys else DICT_KEYS):
      if all(key in element for key in k):
        return np.asarray(element[k[0]]), np.asarray(element[k[1]])
    raise _bad(name, f"{where} a dict with keys {sorted(element)}, none of which are the input "
               f"and label keys {list(keys) if keys else list(DICT_KEYS)} (set 'keys': "
               "('input_key', 'label_key') in the returned dict)")
  if isinstance(element, (tuple, list)) and len(element) == 2:
    return np.asarray(element[0]), np.asarray(element[1])
  raise _bad(name, f"{where} a {type(element).__name__}, not an (x, y) pair or a dict")


def read_source(name: str, split: str, source: Any, keys: Any = None) -> tuple:
  """(x, y) arrays of every element of a random-access source, in order.

  Raises:
    UserError: elements of different shapes or dtypes, an element that is neither a pair
      nor a dict with the keys, or arrays larger than `MEMORY_FRACTION` of free memory.
  """
  with damage.reading_records(source, split=split, dataset=name):
    return _read_all(name, split, source, keys)


def _read_all(name: str, split: str, source: Any, keys: Any) -> tuple:
  n = len(source)
  if n == 0:
    raise _bad(name, f"an empty {split!r} source")
  x0, y0 = _pair_of(name, source[0], keys, f"a {split!r} source whose element 0 is")
  need = n * (x0.nbytes + y0.nbytes)
  if need > MEMORY_FRACTION * _available_bytes():
    raise _bad(name, f"a {split!r} source of {n} examples, about {need / 2**20:,.0f} MiB, more "
               f"than {MEMORY_FRACTION:.0%} of the memory available now; the in-memory path "
               "reads every split whole (use fewer examples here, or the streaming input path "
               "for data larger than memory)")
  xs, ys = np.empty((n, *x0.shape), x0.dtype), np.empty((n, *y0.shape), y0.dtype)
  xs[0], ys[0] = x0, y0
  for i in range(1, n):
    x, y = _pair_of(name, source[i], keys, f"a {split!r} source whose element {i} is")
    if x.shape != x0.shape or y.shape != y0.shape:
      raise _bad(name, f"a {split!r} source returning mismatched shapes: element {i} has x "
                 f"{x.shape} and y {y.shape}, element 0 has x {x0.shape} and y {y0.shape} "
                 "(the in-memory path needs one shape per example)")
    xs[i], ys[i] = x, y
  return xs, ys


def _split(name: str, out: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
  pair = out.get(split)
  if not isinstance(pair, (tuple, list)) and hasattr(pair, "__len__") and hasattr(
      pair, "__getitem__"):
    pair = read_source(name, split, pair, out.get("keys"))
  if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
    raise _bad(name, f"no (x, y) pair or source for the {split!r} split (got "
               f"{type(pair).__name__})")
  x, y = np.asarray(pair[0]), np.asarray(pair[1])
  if x.ndim < 2 or len(x) != len(y) or len(x) == 0:
    raise _bad(name, f"mismatched {split!r} arrays: x {x.shape} and y {y.shape} (x needs a "
               "leading example axis and one label per example)")
  return x, y


def _is_builder_class(obj: Any) -> bool:
  if not inspect.isclass(obj):
    return False
  import tensorflow_datasets as tfds
  return issubclass(obj, tfds.core.DatasetBuilder)


def _call(name: str, obj: Any, data_dir: str) -> Any:
  """What the import path names, as the dict a data function returns."""
  if _is_builder_class(obj):
    from jrecipe.data import user_tfds
    return user_tfds.builder_output(name, obj, data_dir)
  if inspect.isclass(obj) or not callable(obj):
    what = "a class but not a TFDS builder" if inspect.isclass(obj) else (
        f"an object of type {type(obj).__name__}")
    raise UserError(f"The data {name!r} is {what}: data.name must name a function returning "
                    "the splits, or a TFDS builder class (a tfds.core.GeneratorBasedBuilder "
                    "subclass); see docs/your_data.md.")
  return obj()


def read_user(name: str, data_dir: str = "") -> tuple[dict, dict]:
  """(meta, splits as stored) from the user's data `name` ('pkg.module:Name').

  Args:
    name: the import path of a data function or a TFDS builder class (module docstring).
    data_dir: where a TFDS builder is prepared (jrecipe's resolved `data.data_dir`).
  """
  from jrecipe.registry import import_path
  out = _call(name, import_path(name, "data function or TFDS builder"), data_dir)
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
  """Whether a data name is an import path to the user's own data (function or builder)."""
  return isinstance(name, str) and ":" in name and not name.startswith("tfds:")
