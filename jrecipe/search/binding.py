"""A search directory is bound to one study: its name and its fingerprint (recipe stage 5).

A study's trials were drawn from one space, over one set of stages, scored on one metric by
one sampler from one seed. Resuming it with any of these changed would report trials drawn
from the old space as if they came from the new one, so the fingerprint of those settings is
stored twice: in `DIR/study.json` (with the study's name) and in the user attributes of each
stage's Optuna study. A rerun whose fingerprint differs is refused (a UserError naming each
difference); `--new_study` moves the old study's files to `DIR/old_studies/<name>/` and starts
a study under a new name, so old and new trials never share `trials/`.

The study's name is drawn once (`search-<8 hex digits>`) and kept in `DIR/study.json`, so it
does not depend on the directory's name: a renamed or copied directory resumes its own study.
"""

import datetime
import json
import os
import uuid
from typing import Any, Optional

from jrecipe.errors import UserError

BINDING_FILE = "study.json"
OLD_STUDIES = "old_studies"
# What a new study moves aside: everything the old study wrote into the directory.
STUDY_FILES = ("trials", "search.json", "search.csv", "search", "workers", "search_config.json",
               "study.db", BINDING_FILE)


def _param_text(p) -> str:
  """'field=kind(low, high)' with full precision (a changed 7th digit is still a change)."""
  if p.kind == "choice":
    return f"{p.field}=choice({', '.join(repr(c) for c in p.choices)})"
  return f"{p.field}={p.kind}({p.low!r}, {p.high!r})"


def fingerprint(config, params, stages) -> dict[str, Any]:
  """What a study's trials depend on: space, stages, metric, sampler, keep_top, seed, pruner."""
  s = config.search
  out = {"space": [_param_text(p) for p in params],
         "stages": [[int(st.trials), float(st.epochs)] for st in stages],
         "metric": str(s.metric), "sampler": str(s.sampler), "keep_top": int(s.keep_top),
         "seed": int(config.seed)}
  if str(s.get("pruner", "none")) != "none":  # absent when off: older studies still resume
    out["pruner"] = str(s.pruner)
  return out


def differences(old: dict, new: dict) -> list[str]:
  """One line per differing fingerprint field: 'space: [old] -> [new]'."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if json.loads(json.dumps(a)) != json.loads(json.dumps(b)):
      out.append(f"{key}: {_show(a)} (this study) -> {_show(b)} (now)")
  return out


def _show(v) -> str:
  if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
    return "; ".join(v)
  if isinstance(v, list) and v and all(isinstance(x, list) for x in v):
    return ",".join(f"{t}x{e:g}" for t, e in v)
  return repr(v)


def refuse(workdir: str, name: str, old: dict, new: dict) -> None:
  """Raises the UserError of a rerun whose fingerprint differs from the study's."""
  lines = "\n  ".join(differences(old, new))
  raise UserError(
      f"The search directory {workdir} holds the study {name!r}, whose trials were drawn "
      f"with other settings:\n  {lines}\nResuming it would report the old trials as results "
      "of the new settings. To keep the old study, use another --workdir; to start a clean "
      "study here, rerun with --new_study (the old study's trials and files move to "
      f"{os.path.join(workdir, OLD_STUDIES, name)}/).")


def read(workdir: str) -> Optional[dict]:
  """DIR/study.json ({'study', 'fingerprint', 'created'}), or None."""
  try:
    with open(os.path.join(workdir, BINDING_FILE)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UserError(f"{os.path.join(workdir, BINDING_FILE)} cannot be read ({e}): it binds "
                    "the directory to its study. Restore it, or rerun with --new_study.") from e


def new_name() -> str:
  """A study name that does not depend on the directory's name."""
  return f"search-{uuid.uuid4().hex[:8]}"


def write_once(workdir: str, name: str, fp: dict) -> dict:
  """Writes DIR/study.json unless another process did first; returns the file's content."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, BINDING_FILE)
  data = {"study": name, "fingerprint": fp,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  try:
    os.link(tmp, path)  # atomic and exclusive: two workers starting at once agree on one name
  except FileExistsError:
    pass
  finally:
    os.remove(tmp)
  return read(workdir)


def move_aside(workdir: str, sqlite_in_dir: bool) -> Optional[str]:
  """Moves the current study's files to DIR/old_studies/<name>/; returns that directory.

  The study database moves too when it is the directory's own SQLite file; a study in a
  shared database stays there under its old name (the new study gets a new one).
  """
  binding = read(workdir)
  present = [f for f in STUDY_FILES if os.path.exists(os.path.join(workdir, f))
             and (f != "study.db" or sqlite_in_dir)]
  if not present:
    return None
  name = (binding or {}).get("study") or datetime.datetime.now().strftime("study-%Y%m%d-%H%M%S")
  dest = os.path.join(workdir, OLD_STUDIES, name)
  n = 1
  while os.path.exists(dest):
    n += 1
    dest = os.path.join(workdir, OLD_STUDIES, f"{name}.{n}")
  os.makedirs(dest)
  for f in present:
    os.replace(os.path.join(workdir, f), os.path.join(dest, f))
  return dest
