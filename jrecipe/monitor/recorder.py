"""`Monitor`: what the training loop records for babysitting, at the config's cadence.

The loop stays in charge (CLU style: the loop calls the monitor, nothing calls the loop):
- `at_init(host_state)`: parameter overview (printed, DIR/monitor/params_at_init.json), a
  probe at step 0, first-layer filters and predictions before any update;
- `due(step)`: whether the step ending at `step` computed per-leaf norms (the step's
  `lax.cond`, same cadence); they go to `log_step` (split 'monitor': norms and
  update/weight ratios);
- `probe_due(step)` / `probe(step, state)`: activation and gradient histograms, dead and
  saturated fractions (split 'probe'; TensorBoard histograms; DIR/monitor/histograms.jsonl);
- `after_eval(step, epoch, state)`: prediction dynamics on a fixed test batch (every
  evaluation, DIR/monitor/predictions.jsonl) and, every `images_every_epochs`, the
  first-layer filter grid and a predictions frame (PNG and TensorBoard image);
- `finish()`: DIR/diagnoses.json (logged), DIR/monitor/prediction_dynamics.png, report.html.
Values come back to the host only in these calls; between cadence steps nothing is synced.
Only process 0 computes the probe and writes files; every process runs the same step.
"""

import json
import logging
import math
import os

import jax
import numpy as np

from jrecipe import storage
from jrecipe.monitor import images, overview, probe as probe_lib
from jrecipe.train.step import expand_monitor, leaf_names
from jrecipe.train.writer import read_jsonl

log = logging.getLogger("jrecipe")


def truncate_jsonl(path: str, max_step=None) -> None:
  """Drops records after `max_step` (a resumed run), or the whole file (max_step None)."""
  if not storage.exists(path):
    return
  if max_step is None:
    storage.remove(path)
    return
  kept = []
  with storage.open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        break
      if r.get("step", 0) <= max_step:
        kept.append(line if line.endswith("\n") else line + "\n")
  tmp = path + ".tmp"
  with storage.open(tmp, "w") as f:
    f.writelines(kept)
  storage.replace(tmp, path)


class Monitor:
  """Babysitting instruments of one training run (see the module docstring).

  Args:
    exp: the Experiment.
    workdir: the run's work directory (files go to workdir/monitor/).
    writer: the run's MetricWriter (metrics.jsonl + TensorBoard).
    placement: the run's Placement (host copies of the replicated state).
    params: the run's (host) parameters: their leaf names label the per-leaf norms.
    primary: whether this is process 0 (the only one that writes).
    total_steps: steps of the whole run (the last step is always monitored).
    resume_step: the checkpoint step a resumed run starts from; None for a fresh run.
  """

  def __init__(self, exp, workdir, writer, placement, *, params, primary, total_steps,
               resume_step=None):
    self.exp = exp
    self.mc = exp.config.monitor
    self.workdir = workdir
    self.dir = os.path.join(workdir, "monitor")
    self.writer = writer
    self.placement = placement
    self.primary = primary
    self.total_steps = total_steps
    self.every = int(self.mc.every_steps)
    self.probe_every = int(self.mc.probe_every_steps)
    epochs = max(1, int(math.ceil(total_steps / max(exp.steps_per_epoch, 1))))
    self.images_every = int(self.mc.images_every_epochs) or max(1, int(round(epochs / 6)))
    self._probe = None
    self._predict = None
    self._pred_x = None
    self._pred_file = None
    self._pending_preds: list = []
    self._names = leaf_names(params)  # the order of the step's stacked norm vectors
    arrays = exp.data.arrays
    n = int(self.mc.probe_examples)
    self.probe_batch = {k: arrays["train"][k][:n] for k in ("x", "y")}
    split = "test" if "test" in arrays else "validation"
    m = int(self.mc.prediction_examples)
    self.pred_split = split
    self.pred_batch = ({k: arrays[split][k][:m] for k in ("x", "y", "id")}
                       if m > 0 and split in arrays else None)
    if primary:
      storage.makedirs(self.dir, exist_ok=True)
      for name in ("histograms.jsonl", "predictions.jsonl"):
        truncate_jsonl(os.path.join(self.dir, name), resume_step)

  # --- cadence ----------------------------------------------------------------------------
  def due(self, step: int) -> bool:
    """Whether the step that ends at `step` (1-based count) runs the monitored variant."""
    return self.every > 0 and (step % self.every == 0 or step == self.total_steps)

  def probe_due(self, step: int) -> bool:
    return self.primary and self.probe_every > 0 and step % self.probe_every == 0

  # --- recording ----------------------------------------------------------------------------
  def at_init(self, host_state, state) -> None:
    """Parameter overview (printed and saved), probe, filters and predictions at step 0.

    `host_state` is the initial state on the host, `state` the same placed on the devices.
    """
    if not self.primary:
      return
    ov = overview.parameter_overview(host_state.params)
    log.info("Parameter overview at init ('fail fast: a parameter overview at init'):\n%s",
             overview.format_overview(ov))
    from jrecipe.train.writer import write_json_atomic
    write_json_atomic(os.path.join(self.dir, "params_at_init.json"), ov)
    self._probe_host(0, host_state.params, host_state.model_state)
    self._images(0, 0.0, self._variables(state), filters=True, frames=True)

  def log_step(self, step: int, mon_metrics, epoch: float) -> None:
    """Writes a monitored step's norms and update/weight ratios (split 'monitor')."""
    host = self.placement.metrics_to_host(mon_metrics)
    rec = expand_monitor(host, self._names)
    for k in list(rec):
      if k.startswith("update_norm"):
        p = rec.get("param_norm" + k[len("update_norm"):])
        if p is not None:
          rec["update_ratio" + k[len("update_norm"):]] = rec[k] / p if p > 0 else float("nan")
    # TensorBoard: the ratios and the global norms; every per-leaf norm is in metrics.jsonl
    self.writer.write(step, rec, split="monitor", epoch=epoch,
                      tensorboard=lambda k: "/" not in k or k.startswith("update_ratio/"))

  def probe(self, step: int, state) -> None:
    """The probe on the current parameters (process 0 only)."""
    if not self.primary:
      return
    host = self.placement.host_state({"params": state.params, **state.model_state})
    self._probe_host(step, host.pop("params"), host)

  def after_eval(self, step: int, epoch: float, state, epoch_index: int, last: bool) -> None:
    """Prediction dynamics after every evaluation; filters every `images_every` epochs."""
    if not self.primary:
      return
    pictures = last or epoch_index % self.images_every == 0
    self._images(step, epoch, self._variables(state), filters=pictures, frames=pictures)

  def finish(self) -> list[dict]:
    """Diagnoses (DIR/diagnoses.json, logged), the dynamics picture, and report.html."""
    if not self.primary:
      return []
    self.writer.flush()
    self._flush_predictions()
    if self._pred_file is not None:
      self._pred_file.close()
      self._pred_file = None
    self._pending_preds: list = []
    from jrecipe.monitor import diagnose
    recs = read_jsonl(os.path.join(self.dir, "predictions.jsonl"))
    img = images.dynamics_image(recs)
    if img is not None:
      images.save_png(os.path.join(self.dir, "prediction_dynamics.png"), img)
    found = diagnose.write_diagnoses(self.workdir)
    for d in found:
      log.info("Diagnosis [%s] %s", d["id"], d["message"])
    if not found:
      log.info("Diagnoses: none of the babysitting rules fired (see diagnoses.json).")
    if self.mc.report:
      try:
        from jrecipe.report import html
        path = html.write_report(self.workdir)
        log.info("Report: %s", path)
      except OSError as e:
        from jrecipe.train import workdir as workdir_lib
        if e.errno in workdir_lib.STORAGE_ERRNOS:
          raise  # the storage refused the write: exit 1 with the one paragraph, not exit 0
        log.warning("Could not write report.html (%s: %s); rebuild it with --mode=report.",
                    type(e).__name__, e)
      except Exception as e:  # noqa: BLE001 - a report bug must not lose a finished run
        log.warning("Could not write report.html (%s: %s); rebuild it with --mode=report.",
                    type(e).__name__, e)
    return found

  # --- helpers ------------------------------------------------------------------------------
  def _flush_predictions(self):
    """Writes the pending evaluations' predictions to predictions.jsonl; returns the last."""
    if not self._pending_preds:
      return None
    outs = jax.device_get([o for _, _, o in self._pending_preds])
    if self._pred_file is None:
      self._pred_file = storage.open(os.path.join(self.dir, "predictions.jsonl"), "a", buffering=1)
    ids = np.asarray(self.pred_batch["id"]).tolist()
    for (step, epoch, _), out in zip(self._pending_preds, outs):
      rec = images.prediction_record(np.asarray(out), self.pred_batch["y"], self.exp.spec.task,
                                     self.exp.loss.expects)
      rec = {"step": step, "epoch": round(epoch, 6), "split": self.pred_split, "ids": ids, **rec}
      self._pred_file.write(json.dumps(rec) + "\n")
    self._pending_preds = []
    return rec

  def _variables(self, state) -> dict:
    """Model variables for predictions: the live (replicated) arrays when one process
    drives a mesh or a single device, else a host copy of the parameters (and BatchNorm
    statistics) only; the optimizer state and the EMA are never copied."""
    variables = {"params": state.params, **state.model_state}
    if self.placement.mode in ("mesh", "single") and jax.process_count() == 1:
      return variables
    return self.placement.host_state(variables)
  def _probe_host(self, step: int, params, model_state) -> None:
    if self._probe is None:
      self._probe = probe_lib.make_probe(self.exp.model, self.exp.loss,
                                         probe_lib.activation_of(self.exp.config))
    # explicit transfers both ways (the loop may run under jax.transfer_guard('disallow'))
    args = jax.device_put((params, model_state, self.probe_batch["x"], self.probe_batch["y"]))
    out = jax.device_get(self._probe(*args))
    epoch = step / self.exp.steps_per_epoch
    rec = {"loss": float(out["loss"])}
    hist = {"step": step, "epoch": round(epoch, 6), "activations": {}, "gradients": {}}
    for kind, prefix in (("activations", "act"), ("gradients", "grad")):
      for name, s in out[kind].items():
        rec[f"{prefix}_mean/{name}"] = float(s["mean"])
        rec[f"{prefix}_std/{name}"] = float(s["std"])
        for frac in ("dead_fraction", "saturated_fraction"):
          if frac in s:
            rec[f"{frac}/{name}"] = float(s[frac])
        edges = np.asarray(s["edges"], np.float64)
        counts = np.asarray(s["counts"], np.float64)
        hist[kind][name] = {"edges": [float(e) for e in edges],
                            "counts": [int(c) for c in counts]}
        self.writer.histogram_raw(
            f"{kind}/{name}", min=float(s["min"]), max=float(s["max"]), num=int(s["num"]),
            sum=float(s["sum"]), sum_squares=float(s["sum_squares"]), edges=edges.tolist(),
            counts=counts.tolist(), step=step)
    self.writer.write(step, rec, split="probe", epoch=epoch)
    with storage.open(os.path.join(self.dir, "histograms.jsonl"), "a") as f:
      f.write(json.dumps(hist) + "\n")

  def _images(self, step: int, epoch: float, variables, *, filters: bool,
              frames: bool) -> None:
    if filters:
      name, kernel = images.first_layer_kernel(variables["params"])
      if kernel is not None:  # only this leaf comes to the host
        img = images.filter_grid(np.asarray(jax.device_get(kernel)), self.exp.spec.input_shape)
        png = images.save_png(os.path.join(self.dir, "filters", f"step_{step:07d}.png"), img)
        self.writer.image_png("monitor/first_layer_weights", png, *img.shape[:2], step)
    if self.pred_batch is None:
      return
    if self._predict is None:
      model = self.exp.model
      self._predict = jax.jit(lambda v, x: model.apply(v, x, False, None))
    leaf = jax.tree.leaves(variables)[0]
    if isinstance(leaf, jax.Array):  # live parameters: put the batch beside them, once
      if self._pred_x is None:
        self._pred_x = jax.device_put(self.pred_batch["x"], leaf.sharding)
      args = (variables, self._pred_x)
    else:
      args = jax.device_put((variables, self.pred_batch["x"]))
    # dispatched now, read later: no host sync per evaluation (flushed with the next frame)
    self._pending_preds.append((int(step), float(epoch), self._predict(*args)))
    if frames:  # every evaluation is in predictions.jsonl; PNG frames at the image cadence
      rec = self._flush_predictions()
      img = images.prediction_image(rec)
      png = images.save_png(os.path.join(self.dir, "predictions", f"step_{step:07d}.png"), img)
      self.writer.image_png("monitor/predictions", png, *img.shape[:2], step)
