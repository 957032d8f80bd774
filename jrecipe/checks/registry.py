"""The check registry: every battery check is one function registered by name.

In the style of big_vision's registries: a check is added by decorating one function of the
shared `CheckContext`,

    @register_check("overfit_one_batch", stage="overfit", needs=("loss_at_init",))
    def check_overfit_one_batch(ctx) -> CheckResult: ...

in the module of its recipe stage; names are resolved from `config.checks.only` and
`config.checks.skip`; a name registered twice is refused. Each check records the checks it
depends on: `needs` are its preconditions (when one of them fails, this check's verdict may
be a consequence of it: the graph root-cause reporting reads), `after` only orders it. The
battery runs checks in recipe-stage order (`STAGES`), and never before a check it depends on.
docs/checks.md draws the graph.
"""

import dataclasses
import importlib
from typing import Callable, Iterable, Optional, Sequence

from jrecipe.errors import UserError

# The recipe's stages, in the order the battery runs them (Karpathy's recipe and CS231n's
# sanity checks; see docs/checks.md for which check serves which step).
STAGES = ("data", "skeleton", "init", "baselines", "overfit", "regularize", "dependencies",
          "gradients", "evaluation", "schedule")

# The modules that hold the battery's checks; importing them registers the checks.
CHECK_MODULES = (
    "jrecipe.checks.data",
    "jrecipe.checks.splits",
    "jrecipe.checks.determinism",
    "jrecipe.checks.init",
    "jrecipe.checks.outputs",
    "jrecipe.checks.baselines",
    "jrecipe.checks.overfit",
    "jrecipe.checks.regularization",
    "jrecipe.checks.dependencies",
    "jrecipe.checks.gradcheck.model",
    "jrecipe.checks.schedule",
    "jrecipe.checks.stochastic",
    "jrecipe.checks.optimizer",
)


@dataclasses.dataclass(frozen=True)
class RegisteredCheck:
  """One battery check.

  Attributes:
    name: the stable name (config.checks.only/skip, checks.json, the console table).
    fn: `fn(ctx: CheckContext) -> CheckResult`.
    stage: the recipe stage it serves (one of STAGES).
    needs: checks whose failure this check's verdict may be a consequence of.
    after: checks it must run after, without depending on their verdict.
    index: registration order (ties within a stage keep it).
  """

  name: str
  fn: Callable
  stage: str
  needs: tuple = ()
  after: tuple = ()
  index: int = 0

  @property
  def depends_on(self) -> tuple:
    return tuple(dict.fromkeys(self.needs + self.after))


_REGISTRY: dict[str, RegisteredCheck] = {}


def register_check(name: str, *, stage: str, needs: Sequence[str] = (),
                   after: Sequence[str] = ()) -> Callable:
  """Decorator registering `fn(ctx) -> CheckResult` as the battery check `name`.

  Recipe: every check serves one step of the recipe (`stage`); see docs/checks.md,
  "Adding a check", for the planted-bug case and correct twin the test suite then demands.

  Args:
    name: the check's stable name; registering a name twice raises ValueError.
    stage: one of STAGES.
    needs: names of the checks that are its preconditions.
    after: names of checks it runs after (ordering only).

  Returns:
    The decorator; it returns `fn` unchanged.
  """
  if stage not in STAGES:
    raise ValueError(f"register_check({name!r}): stage {stage!r} is not one of {STAGES}.")

  def decorate(fn: Callable) -> Callable:
    old = _REGISTRY.get(name)
    if old is not None:
      raise ValueError(
          f"register_check: a check named {name!r} is already registered (by "
          f"{old.fn.__module__}.{old.fn.__qualname__}); check names must be unique, choose "
          "another name for "
          f"{fn.__module__}.{fn.__qualname__}.")
    _REGISTRY[name] = RegisteredCheck(name, fn, stage, tuple(needs), tuple(after),
                                      len(_REGISTRY))
    return fn

  return decorate


def unregister(name: str) -> None:
  """Removes a check (tests that register a throwaway check clean up with it)."""
  _REGISTRY.pop(name, None)


def load_all() -> None:
  """Imports every module in CHECK_MODULES, registering the battery's checks."""
  for module in CHECK_MODULES:
    importlib.import_module(module)


def registered() -> dict[str, RegisteredCheck]:
  """Every registered check by name, in the battery's run order."""
  load_all()
  return {c.name: c for c in _ordered(_REGISTRY.values())}


def check_names() -> tuple:
  """The names of the battery's checks, in the order the battery runs them."""
  return tuple(registered())


def get(name: str) -> RegisteredCheck:
  """The registered check `name` (UserError listing the valid names otherwise)."""
  checks = registered()
  if name not in checks:
    raise UserError(f"Unknown check {name!r}. Valid checks: {', '.join(checks)}.")
  return checks[name]


def graph() -> dict[str, dict]:
  """{name: {'stage', 'needs', 'after'}}: the dependency graph docs/checks.md draws."""
  return {n: {"stage": c.stage, "needs": list(c.needs), "after": list(c.after)}
          for n, c in registered().items()}


def _ordered(checks: Iterable[RegisteredCheck]) -> list[RegisteredCheck]:
  """Topological order of the dependency graph; ties by (stage, registration order).

  Raises ValueError on a dependency that names no registered check, or on a cycle.
  """
  pending = {c.name: c for c in checks}
  for c in pending.values():
    unknown = [d for d in c.depends_on if d not in pending]
    if unknown:
      raise ValueError(f"check {c.name!r} depends on unregistered check(s) {unknown}; "
                       f"registered: {sorted(pending)}.")
  done: list[RegisteredCheck] = []
  placed: set = set()
  while pending:
    ready = [c for c in pending.values() if all(d in placed for d in c.depends_on)]
    if not ready:
      raise ValueError(f"the checks {sorted(pending)} depend on each other in a cycle.")
    first = min(ready, key=lambda c: (STAGES.index(c.stage), c.index))
    done.append(first)
    placed.add(first.name)
    del pending[first.name]
  return done


def parse_names(text: Optional[str], field: str) -> list[str]:
  """'a,b' (config.checks.<field>) -> ['a', 'b'], each a registered check name.

  Raises:
    UserError: naming the unknown names, the config field and every valid name.
  """
  valid = check_names()
  names = [n.strip() for n in (text or "").split(",") if n.strip()]
  bad = [n for n in names if n not in valid]
  if bad:
    raise UserError(f"Unknown check name(s) {', '.join(bad)} in config.checks.{field}. "
                    f"Valid checks: {', '.join(valid)}.")
  return names


def resolve(only: Sequence[str] = (), skip: Sequence[str] = ()) -> list[RegisteredCheck]:
  """The checks to run for `only` (all when empty) minus `skip`, in run order.

  Raises:
    UserError: a name in `only` or `skip` that is not registered (listing the valid ones).
  """
  checks = registered()
  bad = [n for n in list(only) + list(skip) if n not in checks]
  if bad:
    raise UserError(f"Unknown check name(s) {', '.join(bad)} in config.checks.only/skip. "
                    f"Valid checks: {', '.join(checks)}.")
  return [c for n, c in checks.items() if (not only or n in only) and n not in skip]
