"""Root cause first: which failed check explains the others, read from the dependency graph.

One bug (dropout left on at eval, a model that cannot learn) makes many checks fail; the
user should read one cause, not nine verdicts. Each registered check names its
preconditions (`needs`, see `jrecipe.checks.registry`); a fail or warn of a check with a
failed precondition (transitively) is marked `consequence_of` the failed precondition that
is itself independent (a root), and the battery's table and checks.json open with one line
naming the most likely cause: the root failure that explains the most other verdicts (ties:
the earliest in run order, the most upstream), with its measured and expected values.
"""

from typing import Iterable, Optional

from jrecipe.checks.base import CheckResult


def ancestors(name: str, needs: dict) -> list[str]:
  """Every check `name` needs, transitively, nearest first (`needs`: {name: [needs]})."""
  seen: list[str] = []
  frontier = list(needs.get(name, ()))
  while frontier:
    n = frontier.pop(0)
    if n not in seen:
      seen.append(n)
      frontier.extend(needs.get(n, ()))
  return seen


def mark(result: CheckResult, done: dict, needs: dict) -> CheckResult:
  """Sets `result.consequence_of` from the results already known (`done`: {name: result}).

  Only a fail or a warn can be a consequence; it is attributed to the root (an independent
  failure) behind its failed preconditions, the nearest one first.
  """
  if result.status not in ("fail", "warn"):
    return result
  for n in ancestors(result.name, needs):
    dep = done.get(n)
    if dep is not None and dep.status == "fail":
      result.consequence_of = dep.consequence_of or dep.name
      return result
  return result


def root_cause(results: Iterable[CheckResult]) -> Optional[dict]:
  """The most likely cause among the independent failures, or None when nothing failed.

  Returns:
    {'check', 'value', 'expected', 'message', 'consequences': [names], 'other_roots':
    [names], 'line'}: 'line' is the sentence the table and checks.json start with.
  """
  results = list(results)
  roots = [r for r in results if r.status == "fail" and r.consequence_of is None]
  if not roots:
    return None
  explained = {r.name: [c.name for c in results if c.consequence_of == r.name] for r in roots}
  best = max(roots, key=lambda r: (len(explained[r.name]), -results.index(r)))
  others = [r.name for r in roots if r is not best]
  cons = explained[best.name]
  line = (f"Most likely cause: {best.name} failed (measured {_short(best.value)}, expected "
          f"{_short(best.expected)}): {best.message}")
  if cons:
    line += f" [{len(cons)} other verdict(s) follow from it: {', '.join(cons)}]"
  if others:
    line += f" [independent failure(s) too: {', '.join(others)}]"
  return {"check": best.name, "value": best.value, "expected": best.expected,
          "message": best.message, "consequences": cons, "other_roots": others, "line": line}


def _short(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(_short(x) for x in v[:4]) + (", ...]" if len(v) > 4 else "]")
  return "-" if v is None else str(v)
