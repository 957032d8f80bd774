"""After training: the model's mistakes on a split, from a run's newest checkpoint.

Recipe stage 1 closes with 'look at your network's mispredictions': the highest-loss and the
confidently mispredicted examples (given label vs predicted label and probability), the
confusion matrix and the most confused pairs, and likely label errors ranked by the
model's OUT-OF-SAMPLE confidence: the trained network's predictions on the held-out splits
(validation, test), which it never trained on. Training-set predictions are never used for
label errors (a network that memorised a wrong label agrees with it); the train split's
label errors come from the leave-one-out nearest-neighbour vote of `inspect_splits`.
"""

import os

import numpy as np

from jrecipe.errors import UserError
from jrecipe.data_inspect import grids
from jrecipe.data_inspect import mistakes as mistakes_lib
from jrecipe.train.writer import write_json_atomic

HELD_OUT = ("validation", "test")


def has_checkpoint(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _refs(split, ids, y, rows, extra):
  out = []
  for r in rows:
    item = {"split": split, "id": int(ids[r]), "label": int(y[r])}
    for k, v in extra.items():
      item[k] = v[r].item() if hasattr(v[r], "item") else v[r]
    out.append(item)
  return out


def analyze_run(workdir: str, *, split: str = "test", top_k: int = 32) -> dict:
  """The mistakes of the run in `workdir` (its newest checkpoint) on `split`.

  Returns:
    {'result': the JSON-able mistakes summary, 'images': {split: raw inputs}, 'rows': lists
     of rows for the grids, 'class_names'}.

  Raises:
    UserError: not a run directory, no checkpoint, unknown split, not a classification task.
  """
  from jrecipe.ensemble import evaluate, members as members_lib
  if not has_checkpoint(workdir):
    raise UserError(f"{workdir} holds no checkpoint, so there are no model mistakes to show: "
                    "train it first (jrecipe --mode=train --workdir=...) or set "
                    "--config.inspect.mistakes=off (or auto).")
  config = members_lib.load_run_config(workdir)
  from jrecipe.data import pipeline
  spec = pipeline.load_dataset(config.data, seed=int(config.get("seed", 0))).spec
  if spec.task != "classification":
    raise UserError(f"Model mistakes are shown for classification; the run in {workdir} is a "
                    f"{spec.task} task. Use --config.inspect.mistakes=off.")
  member = members_lib.from_runs([workdir])[0]
  data = member.data
  if split not in data.arrays:
    raise UserError(f"inspect.split={split!r} is not a split of {spec.name!r}. Valid splits: "
                    f"{', '.join(data.arrays)}.")
  import jax
  import jax.numpy as jnp

  def predict(s):
    logits = evaluate.member_outputs(member, data.arrays[s]["x"], outputs="logits")
    y = data.arrays[s]["y"]
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)
    losses = np.asarray(jax.jit(member.loss.per_example)(jnp.asarray(logits), jnp.asarray(y)))
    return probs, losses

  probs, losses = predict(split)
  y = np.asarray(data.arrays[split]["y"])
  ids = np.asarray(data.arrays[split]["id"])
  m = mistakes_lib.find_mistakes(probs, y, losses, top_k=top_k)
  extra = {"predicted": m["predicted"], "p_predicted": m["p_predicted"], "p_label": m["p_label"],
           "loss": m["loss"]}
  result = {
      "workdir": os.path.abspath(workdir), "step": member.step, "split": split,
      "count": int(len(y)), "accuracy": m["accuracy"], "errors": m["errors"],
      "highest_loss": _refs(split, ids, y, m["highest_loss"], extra),
      "confident_mistakes": _refs(split, ids, y, m["confident_mistakes"], extra),
      "confusion_matrix": m["confusion"].tolist(),
      "confusion_axes": "rows: given label, columns: predicted label",
      "most_confused": m["most_confused"],
  }
  # Likely label errors from the network's out-of-sample predictions.
  label_rows = {}
  found = []
  for s in HELD_OUT:
    if s not in data.arrays or not len(data.arrays[s]["y"]):
      continue
    p, _ = (probs, losses) if s == split else predict(s)
    ys = np.asarray(data.arrays[s]["y"])
    r = mistakes_lib.likely_label_errors(p, ys)
    label_rows[s] = r["rows"]
    for i, row in enumerate(r["rows"]):
      found.append({"split": s, "id": int(data.arrays[s]["id"][row]), "label": int(ys[row]),
                    "suggested": int(r["suggested"][i]), "p_label": float(r["p_given"][i]),
                    "p_suggested": float(r["p_suggested"][i]), "margin": float(r["margin"][i])})
  found.sort(key=lambda d: -d["margin"])
  result["likely_label_errors"] = {
      "source": "the trained model's predictions on the held-out splits "
                f"({', '.join(label_rows)}): out-of-sample; the train split's candidates are "
                "in summary.json (leave-one-out nearest-neighbour vote), never from the "
                "network's training-set predictions",
      "method": "confident learning (per-class thresholds = mean p_j over examples labelled "
                "j), ranked by p_suggested - p_label",
      "count": len(found), "examples": found[:top_k]}
  return {"result": result, "raw": {s: data.raw[s]["x"] for s in data.raw},
          "ids": {s: data.arrays[s]["id"] for s in data.arrays},
          "labels": {s: np.asarray(data.arrays[s]["y"]) for s in data.arrays}, "m": m,
          "label_rows": label_rows, "class_names": spec.class_names,
          "value_range": spec.value_range, "image_shape": data.raw[split]["x"].shape[1:]}


def write_mistakes(analysis: dict, outdir: str, *, image: bool, top_k: int = 32) -> list[str]:
  """Writes mistakes.json and (images) the mistake grids and confusion.png; returns paths."""
  os.makedirs(outdir, exist_ok=True)
  r = analysis["result"]
  m = analysis["m"]
  split = r["split"]
  raw = analysis["raw"]
  vr = analysis["value_range"]
  c = m["confusion"].shape[0]
  names = analysis["class_names"] or tuple(str(i) for i in range(c))
  files = []
  files.append(grids.save_matrix(
      os.path.join(outdir, "confusion.png"), m["confusion"], labels=[str(n) for n in names],
      xlabel="predicted", ylabel="given label",
      title=f"Confusion matrix, {split} ({r['errors']} errors of {r['count']}, step {r['step']})"))
  if image:
    def tile(x):
      return x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x

    def draw(name, rows, title):
      rows = list(rows)[:top_k]
      if not rows:
        return
      tiles, caps = [], []
      for start in range(0, len(rows), 8):
        chunk = rows[start:start + 8]
        tiles.append([tile(raw[split][i]) for i in chunk])
        caps.append([f"y{int(lab)}->{int(m['predicted'][i])} p{m['p_predicted'][i]:.2f}"
                     for i, lab in zip(chunk, _labels(analysis, split, chunk))])
      files.append(grids.save_grid(os.path.join(outdir, name), tiles, caps, value_range=vr,
                                   title=title))
    draw("mistakes_highest_loss.png", m["highest_loss"],
         f"Highest loss on {split}: given label -> predicted (probability)")
    draw("mistakes_confident.png", m["confident_mistakes"],
         f"Confidently mispredicted on {split}: given label -> predicted (probability)")
    rows, caps = [], []
    for d in r["likely_label_errors"]["examples"]:
      s = d["split"]
      i = int(np.flatnonzero(analysis["ids"][s] == d["id"])[0])
      rows.append(tile(raw[s][i]))
      caps.append(f"{s[:4]}:{d['id']} y{d['label']}->{d['suggested']} p{d['p_suggested']:.2f}")
    if rows:
      files.append(grids.save_grid(
          os.path.join(outdir, "mistakes_label_errors.png"),
          [rows[i:i + 8] for i in range(0, len(rows), 8)],
          [caps[i:i + 8] for i in range(0, len(caps), 8)], value_range=vr,
          title="Likely label errors (held-out predictions of the trained model): "
                "given -> suggested"))
  r["files"] = [os.path.basename(p) for p in files if p] + ["mistakes.json"]
  write_json_atomic(os.path.join(outdir, "mistakes.json"), r)
  return files


def _labels(analysis, split, rows):
  return [analysis["labels"][split][i] for i in rows]
