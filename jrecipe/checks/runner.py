"""`jrecipe --mode=check`: the recipe's sanity battery on exactly the model, data and loss a
config trains, with a verdict per check, `checks.json`, and exit status 1 on any failure.

Every check is a plain function in `jrecipe.checks`; this module only feeds them the
Experiment's pieces (built once, so compiled functions are shared between checks) and
collects the results.
"""

import logging
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jrecipe import experiment as experiment_lib
from jrecipe import optim
from jrecipe.checks import data as data_checks
from jrecipe.checks import dependencies, gradcheck, outputs, schedule, training
from jrecipe.checks.base import CHECK_NAMES, CheckResult
from jrecipe.data import pipeline
from jrecipe.errors import UserError
from jrecipe.train import step as step_lib
from jrecipe.train.trainer import Trainer, seeds
from jrecipe.train.writer import write_json_atomic

log = logging.getLogger("jrecipe")


def parse_names(text: str, field: str) -> list[str]:
  """'a,b' -> ['a', 'b'], each a known check name (UserError otherwise)."""
  names = [n.strip() for n in (text or "").split(",") if n.strip()]
  bad = [n for n in names if n not in CHECK_NAMES]
  if bad:
    raise UserError(f"Unknown check name(s) {', '.join(bad)} in config.checks.{field}. "
                    f"Valid checks: {', '.join(CHECK_NAMES)}.")
  return names


def _constant_rate_tx(exp):
  """The configured optimizer at a constant rate: short check runs must not inherit a decay."""
  c = exp.config
  if c.optimizer.name == "lbfgs":
    opt = ml_collections.ConfigDict(c.optimizer.to_dict())
    opt.name, opt.learning_rate = "adam", 1e-3
  else:
    opt = c.optimizer
  sched = ml_collections.ConfigDict({"name": "constant", "unit": "steps"})
  mom = ml_collections.ConfigDict({"name": "constant"})
  return optim.make_optimizer(opt, sched, mom, steps_per_epoch=exp.steps_per_epoch,
                              total_steps=exp.total_steps)


class Battery:
  """The pieces every check shares, built once from an Experiment."""

  def __init__(self, exp: experiment_lib.Experiment, artifacts_dir: Optional[str]):
    self.exp = exp
    self.c = exp.config
    self.artifacts_dir = artifacts_dir
    self.model, self.loss, self.spec = exp.model, exp.loss, exp.spec
    self.rngs = seeds(self.c.seed)
    self.variables = exp.init_variables(self.rngs["init"])
    self.variables_plain = exp.init_variables(self.rngs["init"], init_bias=False)
    self.tx = _constant_rate_tx(exp)
    train = exp.data.arrays["train"]
    rs = np.random.default_rng(self.c.seed)
    n = min(len(train["y"]), max(self.c.batch_size, 256))
    idx = np.sort(rs.choice(len(train["y"]), size=n, replace=False))
    self.x, self.y = train["x"][idx], train["y"][idx]
    val = exp.data.arrays.get("validation", train)
    m = min(len(val["y"]), 512)
    self.x_val, self.y_val = val["x"][:m], val["y"][:m]
    self.steps = int(self.c.checks.budget_steps)
    self.batch_size = min(int(self.c.checks.batch_size) or self.c.batch_size, n)
    self.augment = exp.augment_fn()
    self.vocab = self.spec.num_classes if self.spec.task == "sequence" else None

  def data_before_net(self):
    batch = next(pipeline.train_batches(self.exp.data, batch_size=self.c.batch_size,
                                        seed=self.c.seed))
    x = batch["x"]
    if self.augment is not None:
      k_aug, _ = step_lib.step_rngs(self.rngs["train"], jnp.int32(0))
      x = np.asarray(self.augment(jnp.asarray(x), k_aug))
    return data_checks.data_before_net(x, batch["y"], spec=self.spec,
                                       artifacts_dir=self.artifacts_dir)

  def seed_determinism(self):
    exp, c = self.exp, self.c
    trainer = Trainer.from_experiment(exp, ema_decay=0.0)
    n_steps = min(5, exp.total_steps)

    def train_fn(seed):
      state = trainer.to_device(trainer.initial_state(seed))
      loop = trainer.run(state, num_steps=n_steps, batches=trainer.batches(0, seed=seed))
      return trainer.to_host(loop.state).params

    return training.seed_determinism(train_fn, seed=c.seed)

  def loss_at_init(self):
    return training.loss_at_init(self.model, self.loss, self.variables, self.x_val, self.y_val,
                                 num_classes=self.spec.num_classes)

  def init_bias(self):
    return training.init_bias(self.model, self.loss, self.variables_plain, self.variables,
                              self.x, self.y, num_classes=self.spec.num_classes)

  def logits_not_probabilities(self):
    return outputs.logits_not_probabilities(self.model.apply, self.variables, self.x_val[:64],
                                            expects=self.loss.expects)

  def regularization_increases_loss(self):
    return training.regularization_increases_loss(
        self.model, self.loss, self.variables, self.x, self.y, tx=self.tx,
        steps=max(self.steps // 3, 10), rng=self.c.seed, batch_size=self.batch_size)

  def input_independent_baseline(self):
    return training.input_independent_baseline(
        self.model, self.loss, self.variables, self.x, self.y, tx=self.tx, steps=self.steps,
        rng=self.c.seed, x_val=self.x_val, y_val=self.y_val, batch_size=self.batch_size)

  def overfit_one_batch(self):
    k = int(self.c.checks.overfit_examples)
    return training.overfit_one_batch(
        self.model, self.loss, self.variables, self.x[:k], self.y[:k], tx=self.tx,
        steps=int(self.c.checks.overfit_steps), rng=self.c.seed, max_examples=20,
        artifacts_dir=self.artifacts_dir)

  def capacity_decreases_loss(self):
    return training.capacity_decreases_loss(
        self.model, self.loss, self.variables, self.x, self.y, tx=self.tx, steps=self.steps,
        rng=self.c.seed, batch_size=self.batch_size)

  def batch_independence(self):
    _, k_drop = step_lib.step_rngs(self.rngs["train"], jnp.int32(0))
    return dependencies.batch_independence(
        self.model.apply, self.burned_in, self.x_val[:8], rngs={"dropout": k_drop},
        has_batchnorm=self.model.has_batchnorm, artifacts_dir=self.artifacts_dir,
        vocab_size=self.vocab)

  def causal_dependency(self):
    reason = dependencies.causal_skip_reason(self.spec)
    if reason:
      return CheckResult("causal_dependency", "skip", message=reason)
    return dependencies.causal_dependency(
        self.model.apply, self.burned_in, self.x_val[:4], time_axis=self.spec.time_axis,
        sees_current=self.spec.sees_current, artifacts_dir=self.artifacts_dir,
        vocab_size=self.vocab)

  @property
  def burned_in(self) -> dict:
    """Variables after a short burn-in: 'a characteristic mode, not at init' (CS231n).

    Dependencies and gradients are charted here rather than at init, where a zero-initialised
    head (a legitimate choice) would hide every dependency behind zero gradients.
    """
    if not hasattr(self, "_burned"):
      burn = int(self.c.checks.gradcheck_burnin_steps)
      self._burned = self.variables
      if burn:
        self._burned, _ = training.fit(self.model, self.loss, self.variables, self.x, self.y,
                                       tx=self.tx, steps=burn, rng=self.c.seed,
                                       batch_size=self.batch_size)
    return self._burned

  def gradient_check(self):
    burn = int(self.c.checks.gradcheck_burnin_steps)
    variables = self.burned_in
    _, k_drop = step_lib.step_rngs(self.rngs["train"], jnp.int32(burn))
    batch = {"x": self.x, "y": self.y}
    return gradcheck.gradient_check_model(
        self.model, self.loss, variables, batch, l2=self.c.l2 or 1e-3, rng=k_drop,
        max_examples=int(self.c.checks.gradcheck_examples), artifacts_dir=self.artifacts_dir)

  def eval_mode(self):
    _, k_drop = step_lib.step_rngs(self.rngs["train"], jnp.int32(0))
    return outputs.eval_mode(self.model.apply, self.variables, self.x_val[:8],
                             rngs={"dropout": k_drop})

  def lr_schedule(self):
    c, exp = self.c, self.exp
    sched_fn = optim.make_schedule(c.schedule, c.optimizer.learning_rate,
                                   steps_per_epoch=exp.steps_per_epoch,
                                   total_steps=exp.total_steps)
    boundaries = None
    if c.schedule.name == "step" and c.schedule.boundaries:
      mult = exp.steps_per_epoch if c.schedule.unit == "epochs" else 1
      boundaries = [int(round(b * mult)) for b in c.schedule.boundaries]
    return schedule.lr_schedule(sched_fn, total_steps=exp.total_steps,
                                steps_per_epoch=exp.steps_per_epoch,
                                peak=c.optimizer.learning_rate, boundaries_steps=boundaries,
                                artifacts_dir=self.artifacts_dir)


def run_battery(exp: experiment_lib.Experiment, *, workdir: Optional[str] = None,
                only: Sequence[str] = (), skip: Sequence[str] = (),
                on_result: Optional[Callable[[CheckResult], None]] = None) -> list[CheckResult]:
  """Runs the battery (or `only` those checks, minus `skip`) on an Experiment.

  Args:
    exp: from `jrecipe.experiment.build(config)`.
    workdir: where artifacts go (`workdir/checks/*.png`, paths reported relative to
      workdir); None writes no files.
    only, skip: check names (see `jrecipe.checks.CHECK_NAMES`).
    on_result: called with each result as soon as it is known (the console table).

  Returns:
    One CheckResult per check run, in the battery's order. A check that raises is reported
    as a fail carrying the error, and the battery goes on.
  """
  artifacts_dir = os.path.join(workdir, "checks") if workdir else None
  battery = Battery(exp, artifacts_dir)
  names = [n for n in CHECK_NAMES if (not only or n in only) and n not in skip]
  results = []
  for name in names:
    t0 = time.perf_counter()
    try:
      result = getattr(battery, name)()
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001 - a crashing check is a finding, not a crash
      log.debug("check %s raised", name, exc_info=True)
      result = CheckResult(name, "fail", None, None,
                           f"the check could not run on this model: {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:300] if str(e) else ''}")
    result.details["seconds"] = round(time.perf_counter() - t0, 3)
    if workdir:
      result.artifacts = [os.path.relpath(p, workdir) if os.path.isabs(p) else p
                          for p in result.artifacts]
    results.append(result)
    if on_result:
      on_result(result)
  return results


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return "[" + ", ".join(_fmt(x) for x in v[:3]) + ("..." if len(v) > 3 else "") + "]"
  s = str(v)
  return s if len(s) <= 18 else s[:17] + "…"


def format_row(r: CheckResult) -> str:
  return (f"{r.name:<30} {r.status.upper():<5} {_fmt(r.value):>12} {_fmt(r.expected):>12}  "
          f"{r.message}")


def human_baseline(workdir: str) -> Optional[dict]:
  """Human accuracy (DIR/human.json, from --mode=label) beside the model's, or None.

  The model's accuracy on the same split comes from DIR/summary.json when this work
  directory also holds a finished training run. Recipe: compare with your own accuracy.
  """
  import json
  path = os.path.join(workdir, "human.json")
  try:
    with open(path) as f:
      human = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(human, dict) or human.get("accuracy") is None:
    return None
  split = human.get("split", "test")
  out = {"split": split, "human_accuracy": human["accuracy"], "human_ci95": human.get("ci95"),
         "n": human.get("n"), "model_accuracy": None}
  try:
    with open(os.path.join(workdir, "summary.json")) as f:
      out["model_accuracy"] = json.load(f).get(split, {}).get("accuracy")
  except (OSError, ValueError, AttributeError):
    pass
  lo, hi = (out["human_ci95"] or [float("nan")] * 2)[:2]
  line = (f"Human baseline on {split}: {100 * out['human_accuracy']:.1f}% (95% CI "
          f"{100 * lo:.1f}-{100 * hi:.1f}%, n={out['n']}, from human.json)")
  if out["model_accuracy"] is not None:
    line += f"; model: {100 * out['model_accuracy']:.1f}% (summary.json)"
  out["line"] = line
  return out


def run_mode(config: ml_collections.ConfigDict, workdir: str, options=None) -> int:
  """The `--mode=check` entry: table on stdout, `workdir/checks.json`, exit 1 on a fail."""
  del options  # this mode takes no command-line options (jrecipe.modes.ModeOptions)
  only = parse_names(config.checks.only, "only")
  skip = parse_names(config.checks.skip, "skip")
  exp = experiment_lib.build(config)
  os.makedirs(workdir, exist_ok=True)
  print(f"{'check':<30} {'status':<5} {'value':>12} {'expected':>12}  explanation", flush=True)
  t0 = time.perf_counter()
  results = run_battery(exp, workdir=workdir, only=only, skip=skip,
                        on_result=lambda r: print(format_row(r), flush=True))
  counts = {s: sum(r.status == s for r in results) for s in ("pass", "warn", "fail", "skip")}
  elapsed = time.perf_counter() - t0
  human = human_baseline(workdir)
  write_json_atomic(os.path.join(workdir, "checks.json"), {
      "checks": [r.to_json() for r in results], "summary": counts,
      "seconds": round(elapsed, 2), **({"human_baseline": human} if human else {})})
  print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['warn']} warned, "
        f"{counts['skip']} skipped in {elapsed:.1f} s; details in "
        f"{os.path.join(workdir, 'checks.json')}", flush=True)
  if human:
    print(human["line"], flush=True)
  return 1 if counts["fail"] else 0
