"""A damaged data file is one paragraph, not a reader's traceback.

ArrayRecord files (riegeli) hash every chunk, so a flipped byte, a truncated copy or a file
overwritten mid-transfer is detected when the chunk is read: array_record raises
`RuntimeError: Corrupted Riegeli/records file: chunk header hash mismatch ...` (measured: three
flipped bytes of a 576 KiB training file), deep inside the opening scan of a streamed split or
in a training step's batch read, with nothing that names the file. Every read of records in
jrecipe goes through `reading_records`, which turns such an error into `DataDamaged` (exit 1)
naming the file, the split and what to do. Any other exception passes through unchanged.
"""

import contextlib
from typing import Iterable, Optional

from jrecipe.errors import RunFailure

# Substrings of the errors array_record, riegeli and protobuf raise for damaged bytes.
_SIGNS = ("corrupted", "riegeli", "hash mismatch", "checksum", "truncated", "unexpected end",
          "error parsing message", "failed to parse", "invalid chunk")


class DataDamaged(RunFailure):
  """A data file whose bytes are damaged: exit 1 (the run failed; what it wrote is intact)."""


def is_damage(error: BaseException) -> bool:
  """Whether `error` (or an error it was raised from) is a reader's report of damaged bytes."""
  seen = 0
  while error is not None and seen < 8:
    if isinstance(error, DataDamaged):
      return True
    name = type(error).__name__
    if name == "DecodeError" or (isinstance(error, (RuntimeError, OSError, ValueError)) and any(
        s in str(error).lower() for s in _SIGNS)):
      return True
    error, seen = error.__cause__ or error.__context__, seen + 1
  return False


def message(error: BaseException, *, files: Iterable[str] = (), split: Optional[str] = None,
            dataset: Optional[str] = None) -> str:
  """The paragraph for a damaged data file."""
  files = [str(f) for f in files]
  where = (f"the data file {files[0]}" if len(files) == 1 else
           f"one of the data files {', '.join(files[:4])}{' ...' if len(files) > 4 else ''}"
           if files else "a data file")
  of = " of ".join(p for p in (f"split {split!r}" if split else "",
                               f"dataset {dataset!r}" if dataset else "") if p)
  reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
  return (f"Reading {where}{f' ({of})' if of else ''} failed: its bytes are damaged (the "
          f"reader says: {reason}). Nothing jrecipe wrote is affected: checkpoints up to the last "
          "committed step are intact. Restore the file from its source, or prepare the dataset "
          "again (for a TFDS builder: delete its prepared directory and rerun, jrecipe prepares "
          "it on first use; for a TFDS dataset: `tfds build NAME --file_format=array_record`), "
          "then rerun the same command: it resumes.")


@contextlib.contextmanager
def reading_records(source=None, *, files: Iterable[str] = (), split: Optional[str] = None,
                    dataset: Optional[str] = None):
  """Reads inside this block that fail on damaged bytes raise `DataDamaged` naming the files
  (`files`, else those of an ArrayRecord `source`, found through its `_paths`)."""
  try:
    yield
  except DataDamaged:
    raise
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless it is damage)
    if not is_damage(e):
      raise
    files = list(files) or list(source_files(source))
    raise DataDamaged(message(e, files=files, split=split, dataset=dataset)) from e


def source_files(source) -> list:
  """The files an ArrayRecord data source (or a TFDS / grain wrapper around one) reads."""
  for _ in range(4):
    if source is None:
      return []
    paths = getattr(source, "_paths", None)
    if paths:
      return [str(p) for p in paths]
    source = getattr(source, "data_source", None) or getattr(source, "_data_source", None)
  return []
