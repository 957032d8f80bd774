"""Distil an ensemble into one network (Hinton et al. 2015, 'dark knowledge').

Recipe: 'Ensembles (about +2% on anything; distill into one net if test time is limited)'.

The teacher is the ensemble's averaged class probabilities on the train split, p_T (as from
`evaluate.ensemble_predict(members, train_x)`). Its logits are taken as log p_T (softmax(log p)
= p, so this is exact for the mean of probabilities). The student minimises

  alpha * T^2 * KL(softmax(log p_T / T) || softmax(z / T)) + (1 - alpha) * CE(z, hard labels)

(the T^2 keeps the soft term's gradient scale independent of T), with optax Adam, through the
same Trainer and step as training (the objective is a `Loss` on (label, teacher) pairs), on
the train split in jrecipe's batch order (a fresh permutation per epoch from the seed).
"""

import dataclasses
import itertools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jrecipe.data.indexing import IndexBatches
from jrecipe.errors import UserError
from jrecipe.train.state import variables_of
from jrecipe.train.step import StepParts
from jrecipe.train.trainer import Hook, Trainer
from jrecipe.types import Loss


def _softened_kl(teacher_logp: jax.Array, student_out: jax.Array, temperature: float):
  """Per-example KL(softmax(teacher_logp / T) || softmax(student / T)), summed over classes.

  Sequences ([B, T, C]) average over time steps inside each example.
  """
  t_logp = jax.nn.log_softmax(teacher_logp / temperature, axis=-1)
  s_logp = jax.nn.log_softmax(student_out / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
  return kl.reshape(kl.shape[0], -1).mean(axis=1)


def _hard_ce(student_out, labels):
  ce = optax.softmax_cross_entropy_with_integer_labels(student_out, labels)
  return ce.reshape(ce.shape[0], -1).mean(axis=1)


def distill_loss(student_out, teacher_logp, labels, *, temperature: float, alpha: float):
  """Mean over the batch of alpha T^2 KL_T + (1 - alpha) CE; also returns (kl, ce)."""
  kl = _softened_kl(teacher_logp, student_out, temperature).mean()
  ce = _hard_ce(student_out, labels).mean()
  return alpha * temperature ** 2 * kl + (1.0 - alpha) * ce, (kl, ce)


def _distill_loss(loss: Loss, temperature: float, alpha: float) -> Loss:
  """The distillation objective as a `Loss` on labels (hard labels, teacher log-probabilities).

  So the student trains through the same Trainer and step as every other run.
  """

  def per_example(outputs, labels):
    y, t_logp = labels
    out = outputs.astype(jnp.float32)
    kl = _softened_kl(t_logp, out, temperature)
    return alpha * temperature ** 2 * kl + (1.0 - alpha) * _hard_ce(out, y)

  def correct(outputs, labels):
    return loss.correct(outputs, labels[0])

  return dataclasses.replace(loss, name=f"distill({loss.name})", per_example=per_example,
                             correct=correct if loss.correct is not None else None)


class _LastLoss(Hook):
  """Keeps the last step's training loss (read once, at the end)."""

  loss = float("nan")

  def after_step(self, loop, metrics: dict) -> None:
    if loop.last_step:
      self.loss = float(loop.trainer.placement.metrics_to_host(metrics["loss"]))


def teacher_kl(student_exp, variables, teacher_probs: np.ndarray, *, temperature: float,
               split: str = "train", batch_size: int = 512) -> float:
  """Mean softened KL(teacher || student) at `temperature` over a whole split."""
  x = student_exp.data.arrays[split]["x"]
  t_logp = _teacher_logp(teacher_probs)
  fn = jax.jit(lambda v, xb, tb: _softened_kl(
      tb, student_exp.model.apply(v, xb, train=False).astype(jnp.float32), temperature).sum())
  total = 0.0
  for s in range(0, len(x), batch_size):
    total += float(fn(variables, x[s:s + batch_size], t_logp[s:s + batch_size]))
  return total / len(x)


def _teacher_logp(probs: np.ndarray) -> np.ndarray:
  p = np.asarray(probs, np.float64)
  return np.log(np.clip(p, 1e-12, None)).astype(np.float32)


def distill(student_exp, teacher_probs_train: np.ndarray, *, temperature: float = 4.0,
            alpha: float = 0.5, steps: int = 500, lr: float = 1e-3, seed: int = 0,
            batch_size: Optional[int] = None, init_variables: Any = None,
            reference: Optional[dict] = None, eval_split: str = "test") -> dict:
  """Trains a student on the ensemble's soft targets; returns its variables and metrics.

  Args:
    student_exp: the student's `Experiment` (any model on the ensemble's dataset).
    teacher_probs_train: the ensemble's probabilities [N_train, (T,) C] on the train split,
      rows in the order of `student_exp.data.arrays['train']`.
    temperature: T; high T (e.g. 10) exposes the teacher's small probabilities.
    alpha: weight of the soft term (1 - alpha on the hard labels).
    steps, lr, seed, batch_size: Adam steps, learning rate, init and shuffling seed, batch
      size (default: the student config's batch_size).
    init_variables: start from these variables instead of a fresh init.
    reference: an `evaluate_ensemble` result on `eval_split` (for the comparison fields).

  Returns:
    {'variables', 'student': {'accuracy', 'nll'} on eval_split, 'kl_to_teacher':
     {'init', 'final'} (softened, train split), 'final_loss', the budget ('steps',
     'batch_size', 'examples' = steps x batch size, on 'train_split'), and with `reference`:
     'ensemble', 'best_member', 'student_minus_best' and 'student_minus_ensemble' (accuracy)}.
  """
  from jrecipe.ensemble.evaluate import member_outputs, _metrics
  from jrecipe.ensemble.members import Member
  if student_exp.spec.task not in ("classification", "sequence"):
    raise UserError("Distillation needs a classification (or sequence) dataset.")
  if not (temperature > 0 and 0.0 <= alpha <= 1.0 and int(steps) >= 0 and lr > 0):
    raise UserError(f"distill: need temperature > 0, 0 <= alpha <= 1, steps >= 0 and lr > 0; "
                    f"got T={temperature}, alpha={alpha}, steps={steps}, lr={lr}.")
  train = student_exp.data.arrays["train"]
  x, y = train["x"], np.asarray(train["y"]).astype(np.int32)
  t_logp = _teacher_logp(teacher_probs_train)
  c = student_exp.spec.num_classes
  if t_logp.shape != tuple(y.shape) + (c,):
    raise UserError(f"teacher_probs_train has shape {t_logp.shape}; the train split needs "
                    f"{tuple(y.shape) + (c,)} (examples in train order, {c} classes).")
  n = len(x)
  bs = int(min(batch_size or student_exp.config.batch_size, n))
  key = jax.random.PRNGKey(seed)
  variables = init_variables if init_variables is not None else student_exp.init_variables(
      jax.random.fold_in(key, 0))
  trainer = Trainer(StepParts(student_exp.model, _distill_loss(student_exp.loss, temperature,
                                                               alpha), optax.adam(lr)),
                    experiment=student_exp)
  kl_init = teacher_kl(student_exp, variables, teacher_probs_train, temperature=temperature)
  order = IndexBatches(n, bs, seed)
  batches = ({"x": x[idx], "y": (y[idx], t_logp[idx])} for idx in map(np.sort, map(
      order.__getitem__, itertools.count())))
  state = trainer.to_device(trainer.state_from(variables, jax.random.fold_in(key, 1)))
  metrics = _LastLoss()
  loop = trainer.run(state, num_steps=int(steps), batches=batches, hooks=[metrics])
  variables = variables_of(trainer.to_host(loop.state))
  loss = metrics.loss
  kl_final = teacher_kl(student_exp, variables, teacher_probs_train, temperature=temperature)

  student = Member(name="student", model=student_exp.model, variables=variables,
                   spec=student_exp.spec,
                   data=student_exp.data, loss=student_exp.loss)
  out = member_outputs(student, student_exp.data.arrays[eval_split]["x"],
                       outputs="logp").astype(np.float64)
  metrics = _metrics(out, student_exp.data.arrays[eval_split]["y"])
  result = {"variables": variables, "student": metrics, "split": eval_split,
            "kl_to_teacher": {"init": kl_init, "final": kl_final},
            "final_loss": float(loss), "temperature": float(temperature), "alpha": float(alpha),
            "steps": int(steps), "batch_size": bs, "examples": int(steps) * bs,
            "train_split": "train"}
  if reference is not None:
    result["ensemble"] = dict(reference["ensemble"])
    result["best_member"] = dict(reference["best_member"])
    result["student_minus_ensemble"] = metrics["accuracy"] - reference["ensemble"]["accuracy"]
    result["student_minus_best"] = metrics["accuracy"] - reference["best_member"]["accuracy"]
  return result
