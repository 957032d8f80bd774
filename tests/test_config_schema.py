"""The config schema: one declaration per field, and everything generated from it.

Each field has a type, a default that passes its own check and a one-line doc; each field is
read somewhere in jrecipe/ (a static scan, shown to catch a field nothing reads);
`base_config()` is exactly the defaults jrecipe had before the schema; docs/config.md is what
the schema generates; and every value that used to be accepted silently (issue 19, item 8) is
now a UserError naming the field (exit status 2 at the entry point).
"""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

from jrecipe import validate
from jrecipe.cli_config import load_config_with_overrides
from jrecipe.config import base, reference, schema
from jrecipe.config.fields import Field
from jrecipe.config_base import base_config, from_json
from jrecipe.errors import UserError
from tests.helpers import REPO

DIGITS = "configs/digits_mlp.py"
PACKAGE = pathlib.Path(REPO) / "jrecipe"

# base_config() as it was written by hand before the schema (jrecipe/config_base.py), less
# eval_splits (removed: nothing read it). Values and types must stay exactly these.
FROZEN_DEFAULTS = {'ablate': {'kind': 'add', 'metric': 'accuracy', 'seeds': 3, 'variants': ()},
     'batch_size': 128,
     'checkpoint': {'every_epochs': 1, 'keep_best': 2},
     'checks': {'batch_size': 32,
                'budget_steps': 150,
                'gradcheck_burnin_steps': 20,
                'gradcheck_examples': 4,
                'only': '',
                'overfit_examples': 10,
                'overfit_steps': 500,
                'skip': ''},
     'data': {'augment': {'crop_mode': 'reflect', 'fn': '', 'hflip': False, 'random_crop': 0},
              'context_length': 0,
              'data_dir': '',
              'downsample': 0,
              'memory_budget_mb': 4096,
              'name': 'digits',
              'normalize': True,
              'pipeline': 'auto',
              'stream_inspect_sample': 20000,
              'stream_prefetch': 4,
              'stream_row_cache_mb': 1024,
              'stream_threads': 2,
              'stream_workers': 0,
              'train_subset': 0},
     'debug_nans': False,
     'early_stopping_patience': 0,
     'ema_decay': 0.999,
     'ensemble': {'alpha': 0.5,
                  'combine': 'prob',
                  'distill_lr': 0.001,
                  'distill_steps': 0,
                  'k': 5,
                  'members': '',
                  'source': 'runs',
                  'split': 'test',
                  'steps': '',
                  'temperature': 4.0},
     'eval_batch_size': 1000,
     'init_bias': True,
     'init_from': '',
     'init_from_allow_partial': False,
     'init_from_checkpoint': 'latest',
     'init_from_freeze': False,
     'init_from_skip': '',
     'inspect': {'descending': True,
                 'filter': '',
                 'label_neighbors': 10,
                 'max_shift': 1,
                 'mistakes': 'auto',
                 'near_dup_neighbors': 8,
                 'near_dup_threshold': 0.985,
                 'outlier_k': 8,
                 'samples_per_class': 10,
                 'sort_by': '',
                 'split': 'test',
                 'top_k': 32,
                 'value_range': ()},
     'l2': 0.0,
     'label': {'num_examples': 50, 'scale': 0, 'second_pass': 0, 'split': 'test'},
     'log_every_steps': 50,
     'loss': {'name': 'softmax_xent'},
     'lr_find': {'max_lr': 10.0, 'min_lr': 1e-07, 'smoothing': 0.1, 'steps': 200, 'stop_factor': 4.0},
     'model': {'name': 'mlp'},
     'momentum_schedule': {'decay_steps': 0,
                           'end': 0.99,
                           'name': 'constant',
                           'start': 0.5,
                           'unit': 'epochs'},
     'monitor': {'enabled': True,
                 'every_steps': 100,
                 'images_every_epochs': 0,
                 'prediction_examples': 16,
                 'probe_every_steps': 200,
                 'probe_examples': 256,
                 'ratio_high': 0.01,
                 'ratio_low': 0.0001,
                 'report': True,
                 'report_loss_scale': 'both',
                 'step_losses': True},
     'num_epochs': 20.0,
     'optimizer': {'b1': 0.9,
                   'b2': 0.999,
                   'eps': 1e-08,
                   'grad_clip_norm': 0.0,
                   'learning_rate': 0.0003,
                   'momentum': 0.9,
                   'name': 'adam',
                   'rms_decay': 0.9,
                   'weight_decay': 0.0},
     'parallel': {'cpu_devices': 0, 'distributed': False, 'mode': 'mesh', 'num_devices': 0},
     'plateau': {'enabled': False, 'factor': 0.5, 'min_scale': 0.001, 'patience': 2},
     'precision': 'float32',
     'profile': {'peak_tflops': 0.0, 'steps': ''},
     'progress': True,
     'schedule': {'boundaries': (),
                  'decay_factor': 0.1,
                  'decay_rate': 0.0,
                  'decay_steps': 0,
                  'end_value': 0.0,
                  'every': 0,
                  'name': 'constant',
                  'unit': 'epochs',
                  'warmup': 0},
     'search': {'edge_fraction': 0.1,
                'explode_factor': 3.0,
                'fixed': '',
                'heartbeat_seconds': 5,
                'keep_top': 5,
                'max_retries': 2,
                'metric': 'accuracy',
                'monitor_trials': False,
                'pruner': 'none',
                'sampler': 'random',
                'scientific': '',
                'scientific_bins': 5,
                'space': '',
                'stages': '20x1',
                'storage': '',
                'stuck_seconds': 300.0,
                'study_name': '',
                'workers': 1},
     'seed': 0}


def _same(a, b, path=""):
  """Equal values of identical types, recursively (1 == 1.0 == True would hide a change)."""
  assert type(a) is type(b), (path, a, b)
  if isinstance(a, dict):
    assert sorted(a) == sorted(b), (path, sorted(set(a) ^ set(b)))
    for k in a:
      _same(a[k], b[k], f"{path}.{k}")
  elif isinstance(a, tuple):
    assert len(a) == len(b), (path, a, b)
    for x, y in zip(a, b):
      _same(x, y, path)
  else:
    assert a == b, (path, a, b)


def test_base_config_is_the_frozen_defaults():
  _same(base_config().to_dict(), FROZEN_DEFAULTS)
  assert isinstance(base_config().schedule.boundaries, tuple)
  assert base_config() is not base_config()  # a fresh config each call: configs edit theirs


# --- (a) every field is fully declared ------------------------------------------------------

def test_every_field_has_a_type_a_valid_default_and_one_doc_line():
  assert len(schema.FIELDS) == sum(len(s.fields) for s in schema.SECTIONS)  # no path twice
  for dotted, f in schema.fields():
    assert isinstance(f, Field), dotted
    assert f.types and all(t in (bool, int, float, str, tuple) for t in f.types), dotted
    assert f.doc.strip() and "\n" not in f.doc and len(f.doc) < 200, dotted
    assert f.problem(f.default) is None, (dotted, f.default, f.problem(f.default))
    if f.valid_choices() is not None:  # 'module:NAME' choices resolve to non-empty names
      assert f.valid_choices() and all(isinstance(c, str) for c in f.valid_choices()), dotted
    if tuple in f.types:
      assert f.item in (int, float, str), dotted
  for s in schema.SECTIONS:
    assert s.doc.strip(), s.path


# --- (b) every field is read somewhere in jrecipe/ ------------------------------------------

# Validation and the schema itself mention every field: they do not count as reading it.
NOT_READERS = ("config/", "validate.py", "config_base.py")


def _code(path: pathlib.Path) -> str:
  """A module's code without docstrings, comments and import lines (they are not reads)."""
  source = path.read_text()
  lines = source.splitlines()
  for node in ast.walk(ast.parse(source)):
    if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)):
      for i in range(node.lineno - 1, node.end_lineno):
        lines[i] = ""
  code = []
  for line in lines:
    if re.match(r"\s*(from|import)\s", line):
      continue
    code.append(re.sub(r"\s#\s.*$", "", line))
  return "\n".join(code)


def _read_patterns(dotted: str) -> list:
  """The ways code reads a field: `.name` (not assigned), `["name"]`, `.get("name"`,
  `getattr(x, "name"`, a reader call's first argument `f("name", ...)`, or the dotted path."""
  section, _, name = dotted.rpartition(".")
  n, q = re.escape(name), "[\"']"
  pats = [rf"\.{n}\b(?!\s*=[^=])", rf"\[\s*{q}{n}{q}\s*\]", rf"\.get\(\s*{q}{n}{q}",
          rf"getattr\([^()]*?,\s*{q}{n}{q}", rf"\w\(\s*{q}{n}{q}\s*[,)]",
          rf"\w\([^()]*?,\s*{q}{n}{q}\s*,"]
  if section:
    pats.append(q + re.escape(dotted) + q)
  return [re.compile(p) for p in pats]


def unread_fields(dotted_paths) -> list[str]:
  """The fields of `dotted_paths` that no module of jrecipe/ (but the schema's) reads."""
  texts = [_code(p) for p in sorted(PACKAGE.rglob("*.py"))
           if not p.relative_to(PACKAGE).as_posix().startswith(NOT_READERS)]
  return [d for d in dotted_paths
          if not any(p.search(t) for p in _read_patterns(d) for t in texts)]


def test_every_field_is_read_somewhere():
  assert unread_fields(schema.FIELDS) == []


def test_the_scan_reports_a_field_nothing_reads():
  # eval_splits was validated but never read: the scan is what would have caught it.
  assert unread_fields(["monitor.never_read_anywhere", "never_read_top", "eval_splits",
                        "inspect.top_k", "label.scale"]) == [
                            "monitor.never_read_anywhere", "never_read_top", "eval_splits"]


# --- (c) generated docs ---------------------------------------------------------------------

def test_docs_config_md_is_the_generated_reference():
  with open(os.path.join(REPO, "docs", "config.md")) as f:
    committed = f.read()
  assert committed == reference.markdown(), (
      "docs/config.md is stale: run `python -m jrecipe.config.reference > docs/config.md`")
  for dotted in schema.FIELDS:
    assert f"| `{dotted}` |" in committed, dotted


# --- from_json: config.json of an older jrecipe ---------------------------------------------

def test_from_json_fills_missing_fields_and_drops_removed_ones():
  old = base_config().to_dict()
  old = {**old, "eval_splits": ["validation"],
         "monitor": {k: v for k, v in old["monitor"].items() if k != "report_loss_scale"},
         "model": {"name": "mlp", "hidden": [256, 256]}}
  del old["label"]
  c = from_json(old)
  assert "eval_splits" not in c and c.monitor.report_loss_scale == "both"
  assert c.label.num_examples == schema.default("label.num_examples")
  assert c.model.to_dict() == {"name": "mlp", "hidden": (256, 256)}  # the factory's fields only
  validate.validate_config(c)


# --- values that were accepted silently or failed late are refused up front -----------------

def _refused(overrides, *needles):
  with pytest.raises(UserError) as e:
    validate.validate_config(load_config_with_overrides(DIGITS, overrides))
  msg = str(e.value)
  assert "\n" not in msg
  for n in needles:
    assert n in msg, (n, msg)
  return msg


@pytest.mark.parametrize("override, needles", [
    ("monitor.every_steps=-1", ["config.monitor.every_steps", "-1", ">= 0"]),
    ("monitor.probe_examples=0", ["config.monitor.probe_examples", ">= 1"]),
    ("monitor.probe_every_steps=-5", ["config.monitor.probe_every_steps", ">= 0"]),
    ("monitor.images_every_epochs=-1", ["config.monitor.images_every_epochs", ">= 0"]),
    ("monitor.prediction_examples=-1", ["config.monitor.prediction_examples", ">= 0"]),
    ("monitor.ratio_low=0", ["config.monitor.ratio_low", "(0, inf)"]),
    ("monitor.report_loss_scale=cubic", ["config.monitor.report_loss_scale", "'linear', 'log'"]),
    ("search.metric=f1", ["config.search.metric", "'f1'", "'accuracy', 'loss'"]),
    ("search.workers=0", ["config.search.workers", ">= 1"]),
    ("search.keep_top=0", ["config.search.keep_top", ">= 1"]),
    ("search.edge_fraction=0.7", ["config.search.edge_fraction", "[0, 0.5]"]),
    ("search.max_retries=-1", ["config.search.max_retries", ">= 0"]),
    ("search.stuck_seconds=0", ["config.search.stuck_seconds", "(0, inf)"]),
    ("search.explode_factor=-3", ["config.search.explode_factor", "(0, inf)"]),
    ("lr_find.min_lr=0", ["config.lr_find.min_lr", "(0, inf)"]),
    ("lr_find.steps=5", ["config.lr_find.steps", ">= 20"]),
    ("lr_find.smoothing=1.0", ["config.lr_find.smoothing", "(0, 1)"]),
    ("inspect.top_k=0", ["config.inspect.top_k", ">= 1"]),
    ("inspect.outlier_k=0", ["config.inspect.outlier_k", ">= 1"]),
    ("inspect.near_dup_threshold=1.5", ["config.inspect.near_dup_threshold", "[-1, 1]"]),
    ("inspect.max_shift=-1", ["config.inspect.max_shift", ">= 0"]),
    ("inspect.label_neighbors=-1", ["config.inspect.label_neighbors", ">= 0"]),
    ("inspect.mistakes=maybe", ["config.inspect.mistakes", "'auto', 'on', 'off'"]),
    ("inspect.value_range=('a','b')", ["config.inspect.value_range", "tuple of numbers"]),
    ("label.num_examples=0", ["config.label.num_examples", "at least 1"]),
    ("label.second_pass=-2", ["config.label.second_pass", ">= -1"]),
    ("label.scale=-1", ["config.label.scale", ">= 0"]),
    ("ensemble.source=folder", ["config.ensemble.source", "'runs', 'checkpoints'"]),
    ("ensemble.combine=mean", ["config.ensemble.combine", "'prob', 'logit'"]),
    ("ensemble.split=dev", ["config.ensemble.split", "'train', 'validation', 'test'"]),
    ("ensemble.k=0", ["config.ensemble.k", ">= 1"]),
    ("ensemble.distill_steps=-1", ["config.ensemble.distill_steps", ">= 0"]),
    ("ensemble.temperature=0", ["config.ensemble.temperature", "(0, inf)"]),
    ("ensemble.alpha=2", ["config.ensemble.alpha", "[0, 1]"]),
    ("ablate.kind=swap", ["config.ablate.kind", "'add', 'remove'"]),
    ("ablate.seeds=0", ["config.ablate.seeds", ">= 1"]),
    ("ablate.metric=f1", ["config.ablate.metric", "'accuracy', 'loss'"]),
    ("data.train_subset=-1", ["config.data.train_subset", ">= 0"]),
    ("data.downsample=-2", ["config.data.downsample", ">= 0"]),
    ("optimizer.eps=0", ["config.optimizer.eps", "(0, inf)"]),
    ("optimizer.weight_decay=-1", ["config.optimizer.weight_decay", "[0, inf)"]),
    ("schedule.warmup=-1", ["config.schedule.warmup", "[0, inf)"]),
    ("schedule.boundaries=(1,'x')", ["config.schedule.boundaries", "tuple of numbers"]),
    ("momentum_schedule.end=1.0", ["config.momentum_schedule.end", "[0, 1)"]),
    ("checkpoint.keep_best=-1", ["config.checkpoint.keep_best", ">= 0"]),
    ("parallel.cpu_devices=-1", ["config.parallel.cpu_devices", ">= 0"]),
    ("checks.gradcheck_burnin_steps=-1", ["config.checks.gradcheck_burnin_steps", ">= 0"]),
])
def test_newly_refused_value_names_the_field_and_the_valid_values(override, needles):
  _refused([override], *needles)


def test_update_ratio_band_must_be_ordered():
  _refused(["monitor.ratio_low=0.1", "monitor.ratio_high=0.01"], "ratio_low", "ratio_high")


def test_a_section_dict_literal_with_an_unknown_field_is_refused():
  # ml_collections replaces the whole section, so the lock does not see the made-up key.
  _refused(["--config.inspect={'top_k': 3, 'topk': 4}"], "config.inspect.topk",
           "did you mean 'top_k'", "Valid fields of config.inspect")
  config = load_config_with_overrides(DIGITS, ["--config.inspect={'top_k': 3}"])
  validate.validate_config(config)  # a partial section is fine: missing fields keep defaults
  from jrecipe.data_inspect.mode import inspect_settings
  assert inspect_settings(config)["top_k"] == 3
  assert inspect_settings(config)["outlier_k"] == schema.default("inspect.outlier_k")


def test_removed_field_is_refused_with_the_reason():
  c = base_config()
  c.eval_splits = ("validation", "test")  # what a config file written for older jrecipe does
  with pytest.raises(UserError, match=r"config\.eval_splits was removed.*validation split "
                                      "every epoch"):
    validate.validate_config(c)
  with pytest.raises(UserError, match=r"eval_splits.*was removed"):
    load_config_with_overrides(DIGITS, ["eval_splits=('validation',)"])


def test_a_value_for_a_section_or_a_top_level_typo_is_refused():
  c = base_config()
  with c.data.ignore_type():
    c.data.augment = 3
  with pytest.raises(UserError, match=r"config\.data\.augment must be a section.*random_crop"):
    validate.validate_config(c)
  c = base_config()
  c.batchsize = 64
  with pytest.raises(UserError, match=r"config\.batchsize is not a field.*'batch_size'"):
    validate.validate_config(c)


def test_model_fields_beyond_name_belong_to_the_factory():
  c = base_config()
  c.model = ml_collections.ConfigDict({"name": "mlp", "hidden": (8,), "anything": 1})
  validate.validate_config(c)  # the factory, not the schema, checks its own fields
  assert schema.is_open("model") and not schema.is_open("data")


def test_bad_monitor_cadence_exits_2_writing_nothing(tmp_path):
  # Issue 19: monitor.every_steps=-1 used to fail late and leave files in the work directory.
  wd = tmp_path / "wd"
  r = subprocess.run([sys.executable, "-m", "jrecipe", f"--config={DIGITS}:smoke",
                      "--config.monitor.every_steps=-1", f"--workdir={wd}"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("jrecipe: error: config.monitor.every_steps is -1"), r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert not wd.exists() or not any(wd.iterdir())


def test_defaults_dict_is_what_base_config_holds():
  assert base.defaults_dict() == base_config().to_dict()


def test_a_run_written_before_a_schema_change_still_resumes(tmp_path):
  """A config.json from before a field was added (crop_mode) or removed (eval_splits) is the
  same experiment: resuming it is not refused; a real change (the seed) still is."""
  from jrecipe.cli_config import load_config_with_overrides
  from jrecipe.errors import UserError
  from jrecipe.train import workdir
  config = load_config_with_overrides(os.path.join(REPO, "configs", "digits_mlp.py:smoke"), [])
  old = workdir.config_dict(config)
  old["eval_splits"] = ["validation"]
  del old["data"]["augment"]["crop_mode"]
  path = tmp_path / "config.json"
  path.write_text(json.dumps(old))
  workdir.prepare(str(tmp_path), config, allow_config_change=False)
  old["seed"] = 5
  path.write_text(json.dumps(old))
  with pytest.raises(UserError, match="changed: seed"):
    workdir.prepare(str(tmp_path), config, allow_config_change=False)
