"""Your own TFDS builder class as data (`data.name='mypkg.data:MyBuilder'`, docs/your_data.md).

Recipe step served: 'Become one with the data'. The builder is prepared into `data.data_dir`
in the array_record format on first use (under the same lock as jrecipe's own builders: two
processes never build at once), without TensorFlow, and read whole by random access into the
dict a data function returns (`jrecipe.data.user`), so the splits are validated alike. TFDS
keeps a prepared version: bump the builder's VERSION when its examples change. TFDS writes the
examples in an order shuffled by their keys unless the DatasetInfo says
`disable_shuffling=True` (train_subset takes the first N of that order).
"""

import numpy as np

from jrecipe.errors import UserError


def _prepared(name: str, cls: type, data_dir: str):
  """The builder of `cls` prepared (array_record) in data_dir; UserError if it cannot be."""
  from jrecipe.data import builders

  def make(where):
    try:
      return cls(data_dir=where, file_format="array_record")
    except Exception as e:  # a builder that fails to construct: its own bug or arguments
      raise UserError(f"The TFDS builder {name!r} could not be constructed with data_dir="
                      f"{where!r} and file_format='array_record': {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}. It must be a "
                      "tfds.core.GeneratorBasedBuilder subclass taking TFDS's constructor "
                      "arguments; see docs/your_data.md.") from e

  return builders.prepare_builder(make, data_dir, f".{cls.name}.lock",
                                  f"the TFDS builder {name!r}")


def _keys(name: str, builder) -> tuple:
  from jrecipe.data.user import DICT_KEYS
  features = builder.info.features
  supervised = builder.info.supervised_keys
  if supervised and len(supervised) == 2 and all(isinstance(k, str) for k in supervised):
    return tuple(supervised)
  for keys in DICT_KEYS:
    if all(k in features for k in keys):
      return keys
  raise UserError(f"The TFDS builder {name!r} has features {sorted(features.keys())} and no "
                  "supervised_keys: set supervised_keys=('input', 'label') in its DatasetInfo, "
                  f"or name them one of {list(DICT_KEYS)}.")


def _task(label, y: np.ndarray) -> dict:
  """task, num_classes and class_names from the label feature and its values."""
  import tensorflow_datasets as tfds
  if isinstance(label, tfds.features.ClassLabel):
    return {"task": "classification", "num_classes": label.num_classes,
            "class_names": tuple(label.names)}
  if np.issubdtype(y.dtype, np.floating):
    return {"task": "regression", "num_classes": None}
  return {"task": "sequence" if y.ndim == 2 else "classification",
          "num_classes": int(y.max()) + 1 if y.size else 0}


def builder_output(name: str, cls: type, data_dir: str) -> dict:
  """The splits of the builder class `cls`, as the dict a data function returns."""
  from jrecipe.data import reading
  with reading.whole(_prepared(name, cls, data_dir)) as builder:
    try:
      sources = builder.as_data_source()
    except Exception as e:  # e.g. prepared there earlier as tfrecord
      raise UserError(f"The TFDS builder {name!r} is prepared in {builder.data_path} but cannot "
                      f"be read by random access ({type(e).__name__}): it must be prepared with "
                      "file_format='array_record' (delete that directory to rebuild it).") from e
    if "train" not in sources or "test" not in sources:
      raise UserError(f"The TFDS builder {name!r} has splits {sorted(sources)}; jrecipe needs "
                      "'train' and 'test' (and uses 'validation' when present, else the last "
                      "10% of 'train').")
    features = builder.info.features
    keys = _keys(name, builder)
    splits = {}
    for split in [s for s in reading.SPLITS if s in sources]:
      cols = reading._read_split(sources[split], features, keys, split, name)
      splits[split] = {"x": cols[keys[0]], "y": cols[keys[1]]}
  splits = reading._carve_validation(name, splits)
  y = np.concatenate([d["y"] for d in splits.values()])
  return {**{s: (d["x"], d["y"]) for s, d in splits.items()}, **_task(features[keys[1]], y)}
