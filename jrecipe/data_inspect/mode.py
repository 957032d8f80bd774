"""`--mode=inspect`: 'become one with the data' (recipe stage 1), and the model's mistakes.

    jrecipe --mode=inspect --config=configs/<name>.py --workdir=DIR \\
        [--config.inspect.sort_by=std --config.inspect.filter='label==3']

Writes DIR/inspect/: summary.json (class counts and imbalance per split, bad labels, exact and
near duplicates within and across splits, corrupt records, statistics, likely label errors),
examples.csv (one row per example: split, id, label, statistics, flags), PNG grids (images
only) and, with a filter or sort_by, selection.csv and selection.png. When DIR holds a
trained run's checkpoint (or with inspect.mistakes=on): mistakes.json, confusion.png and the
mistake grids (see `jrecipe.data_inspect.after_training`). Prints a few lines, numbers first.

The dataset is loaded through the dataset layer (`jrecipe.data.pipeline.load_dataset`), not
through `experiment.build`: build refuses labels outside the declared classes, and finding
those is this mode's job. Inspection looks at the inputs as stored (`Dataset.raw`).
"""

import ast
import logging
import os

from jrecipe import validate
from jrecipe.errors import UserError
from jrecipe.sections import complete

log = logging.getLogger("jrecipe")


def inspect_settings(config) -> dict:
  """The `config.inspect` fields, validated (UserError if not), before any data is loaded.

  Types and ranges come from the schema (`jrecipe.config.schema.INSPECT`); a field missing
  from a partial section takes its schema default. Checked here beyond that: value_range is
  () or (min, max), and the filter parses as an expression.
  """
  validate.check_fields(config, "inspect")
  s = dict(complete(config.get("inspect"), "inspect").items())
  vr = tuple(s["value_range"])
  if vr and (len(vr) != 2 or vr[0] > vr[1]):
    raise UserError(f"config.inspect.value_range={s['value_range']!r} must be () or "
                    "(min, max) with min <= max, e.g. '(0,255)'.")
  s["value_range"] = vr or None
  if s["filter"].strip():
    try:  # fail before any data is loaded; column names are checked once the table exists
      ast.parse(s["filter"].strip(), mode="eval")
    except SyntaxError as e:
      from jrecipe.data_inspect.table import EXAMPLES
      raise UserError(
          f"The inspect filter {s['filter']!r} does not parse ({e.msg}): it must be a Python "
          f"expression over the columns of examples.csv, e.g. {EXAMPLES}.") from e
  return s


def run_mode(config, workdir: str, options=None) -> int:
  """Inspects the config's dataset (and DIR's trained model) and writes DIR/inspect/."""
  del options  # this mode takes no command-line options (jrecipe.modes.ModeOptions)
  from jrecipe import experiment
  from jrecipe.data_inspect import after_training, core, report
  s = inspect_settings(config)
  data = experiment.build_data(config)
  spec = data.spec
  if s["split"] not in data.raw:
    raise UserError(f"config.inspect.split={s['split']!r} is not a split of {spec.name!r}. "
                    f"Valid splits: {', '.join(data.raw)}.")
  # 'auto' shows mistakes where they exist: a trained classifier (on: asked for, so refused
  # with the reason when the run cannot have any).
  want_mistakes = s["mistakes"] == "on" or (
      s["mistakes"] == "auto" and spec.task == "classification"
      and after_training.has_checkpoint(workdir))
  if want_mistakes and not after_training.has_checkpoint(workdir):
    raise UserError(f"--config.inspect.mistakes=on, but {workdir} holds no checkpoint: train "
                    "it first (jrecipe --mode=train) or use mistakes=auto/off.")
  from jrecipe.data_inspect.table import check_names
  image = core.stats_lib.is_image(data.raw["train"]["x"].shape[1:], spec.task)
  raw, streamed = {k: data.raw[k] for k in data.raw}, None
  if data.stream is not None:  # bounded memory: jrecipe.data.stream_inspect
    from jrecipe.data import stream_inspect
    raw, sampled = stream_inspect.sample(data, int(config.seed),
                                         int(config.data.stream_inspect_sample))
    streamed = {"sample": {"seed": int(config.seed), "splits": sampled, "note": (
        "a streamed dataset: exact duplicates are over every example (exact_duplicates_all); "
        "every other finding is on this seeded sample")},
        "exact_duplicates_all": stream_inspect.exact_duplicates(data, s["top_k"])}
  check_names(s["filter"], s["sort_by"], core.table_columns(
      spec.task, image, spec.num_classes, core.will_rank_label_errors(
          spec.task, spec.num_classes, s["label_neighbors"], len(raw["train"]["y"]))))
  findings = core.inspect_splits(
      raw, task=spec.task, num_classes=spec.num_classes,
      class_names=spec.class_names, value_range=s["value_range"] or spec.value_range,
      near_dup_threshold=float(s["near_dup_threshold"]), neighbors=s["near_dup_neighbors"],
      max_shift=s["max_shift"], label_neighbors=s["label_neighbors"], top_k=s["top_k"],
      seed=int(config.seed), name=spec.name)
  if s["value_range"] is None:
    findings.summary["value_range_declared"] = False
  if streamed is not None:
    findings.summary["streamed"] = streamed
  analysis = None
  if want_mistakes:
    analysis = after_training.analyze_run(workdir, split=s["split"], top_k=s["top_k"])
  outdir = os.path.join(workdir, "inspect")
  summary = report.write_findings(
      findings, outdir, filter_expr=s["filter"], sort_by=s["sort_by"],
      descending=s["descending"], top_k=s["top_k"], outlier_k=s["outlier_k"],
      samples_per_class=s["samples_per_class"], seed=int(config.seed))
  lines = report.console_lines(summary)
  if streamed is not None:
    e, k = streamed["exact_duplicates_all"], streamed["sample"]["splits"]
    sampled = ", ".join(f"{name} {v['sampled']} of {v['of']}" for name, v in k.items())
    lines.append(f"Streamed: exact duplicates over all {e['examples_hashed']} examples: "
                 f"{e['groups']} groups {e['across_splits'] or ''}; the rest on a seeded "
                 f"sample ({sampled})")
  if analysis is not None:
    after_training.write_mistakes(analysis, outdir, image=findings.image, top_k=s["top_k"])
    r = analysis["result"]
    pairs = ", ".join(f"{p['label']}->{p['predicted']} x{p['count']}"
                      for p in r["most_confused"][:3])
    lines.append(f"{r['errors']} mistakes on {r['split']} ({100 * r['accuracy']:.2f}% accurate, "
                 f"step {r['step']}); most confused: {pairs or 'none'}; "
                 f"{r['likely_label_errors']['count']} likely label errors in the held-out "
                 "splits")
  files = sorted(os.listdir(outdir))
  lines.append(f"Wrote {outdir}/: {', '.join(f for f in files if '.tmp' not in f)}")
  print("\n".join(lines), flush=True)
  return 0
