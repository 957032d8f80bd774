"""`--mode=report`: one self-contained page from whatever a work directory holds.

The work directory here holds the files other modes write (checks.json with real check
artifacts, inspect/, human.json, ablation.json, lr_find.json, search.json, ensemble.json),
in shapes the report does not know field by field, plus a broken file: every section whose
data exists is on the page, images are embedded, nothing crashes.
"""

import json
import os
import re

import numpy as np
import pytest

from jrecipe.checks.base import CheckResult
from jrecipe.checks.plots import heatmap
from jrecipe.errors import UserError
from jrecipe.monitor.images import save_png
from jrecipe.report import html as report_html
from jrecipe.report import mode as report_mode
from jrecipe.report import svg
from tests.helpers import ReportPage, run_cli
from tests.test_monitor_rules import clean_losses, write_run


def dump(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def png(path, seed=0):
  return save_png(path, (np.random.default_rng(seed).random((8, 8, 3)) * 255).astype(np.uint8))


@pytest.fixture
def full_workdir(tmp_path):
  wd = write_run(tmp_path / "run", clean_losses(np.random.default_rng(0)),
                 config={"model": {"name": "mlp", "hidden": [64]}, "monitor": {}})
  dump(os.path.join(wd, "summary.json"),
       {"step": 300, "epoch": 10.0, "test": {"accuracy": 0.9632, "loss": 0.12, "count": 270}})
  os.makedirs(os.path.join(wd, "checks"))
  heat = heatmap(os.path.join(wd, "checks", "batch_independence.png"), np.eye(4),
                 title="dependencies")
  grad = CheckResult("gradient_check", "pass", 3e-9, "< 1e-6", "analytic matches numeric",
                     details={"table": [{"leaf": "['head']['kernel']", "shape": [64, 10],
                                         "max_rel_error": 3.1e-9}]})
  checks = [CheckResult("loss_at_init", "pass", 2.30, 2.3026, "loss at init matches chance"),
            CheckResult("batch_independence", "fail", 0.5, 0.0, "example 0 leaks into 1",
                        artifacts=[os.path.relpath(heat, wd)]), grad]
  dump(os.path.join(wd, "checks.json"), {"checks": [c.to_json() for c in checks],
                                         "summary": {"pass": 2, "fail": 1}})
  dump(os.path.join(wd, "inspect", "summary.json"),
       {"classes": {"0": 120, "1": 131}, "duplicates": [[3, 17]], "nested": {"a": {"b": [1, 2]}},
        "plot": "inspect/counts.png"})
  png(os.path.join(wd, "inspect", "counts.png"))
  dump(os.path.join(wd, "inspect", "mistakes.json"), [{"id": 5, "label": 3, "pred": 8}])
  with open(os.path.join(wd, "inspect", "broken.json"), "w") as f:
    f.write("{not json")
  dump(os.path.join(wd, "human.json"), {"accuracy": 0.9811, "ci95": [0.95, 0.99], "n": 53,
                                        "split": "test"})
  dump(os.path.join(wd, "ablation.json"), {"rows": [{"change": "no augmentation",
                                                     "val_loss": 0.31}], "baseline": 0.29})
  dump(os.path.join(wd, "lr_find.json"), {"suggested": 3e-3, "lrs": [1e-5, 1e-3, 1e-1]})
  png(os.path.join(wd, "lr_find.png"), 1)
  dump(os.path.join(wd, "search.json"), [{"trial": 0, "lr": 1e-3, "val_loss": 0.2}, 7, None])
  png(os.path.join(wd, "search", "parallel.png"), 2)
  dump(os.path.join(wd, "ensemble.json"), {"members": 3, "accuracy": 0.975})
  return wd


def parse(path):
  page = ReportPage()
  text = open(path, encoding="utf-8").read()
  page.feed(text)
  page.close()
  return page, text


def test_every_section_with_data_is_on_the_page(full_workdir):
  assert report_mode.run_mode(None, full_workdir) == 0
  page, text = parse(os.path.join(full_workdir, "report.html"))
  assert page.sections == ["summary", "diagnoses", "curves", "checks", "inspect", "lr_find",
                           "search", "ablation", "ensemble", "human", "config"]
  # checks/*.png, inspect/counts.png (twice: referenced from summary.json too), lr_find.png,
  # search/parallel.png: all embedded, nothing fetched
  assert len(page.images) >= 5 and not page.external
  assert all(s.startswith("data:image/png;base64,") for s in page.images)
  assert page.svgs >= 2  # loss (linear and log), accuracy
  assert "98.11%" in text and "0.9632" in text  # the human baseline, the model's result
  assert "95% Wilson interval 95.0 to 99.0" in text
  assert "max_rel_error" in text and "3.1e-09" in text  # the gradient-check table
  assert "example 0 leaks into 1" in text and "class=fail" in text
  assert "could not be rendered" in text and "JSONDecodeError" in text  # broken file, no crash
  assert "no augmentation" in text and "duplicates" in text
  assert os.path.exists(os.path.join(full_workdir, "diagnoses.json"))


def test_loss_scale_option(full_workdir):
  report_html.write_report(full_workdir, loss_scale="log")
  _, text = parse(os.path.join(full_workdir, "report.html"))
  assert "(log scale)" in text and "id=s-log" not in text
  report_html.write_report(full_workdir)  # default 'both': a linear/log toggle, no script
  _, text = parse(os.path.join(full_workdir, "report.html"))
  assert "id=s-log" in text and "<script" not in text


def test_generic_renderer_never_crashes_on_odd_shapes():
  odd = {"a": [[1, 2], {"x": None}], "b": float("nan"), "c": [{"k": 1}, {"j": [1] * 50}],
         "d": "<script>alert(1)</script>", "e": {"f": {"g": {"h": {"i": {"j": {"k": 1}}}}}}}
  out = report_html.generic(odd)
  assert "<script>" not in out and "&lt;script&gt;" in out
  assert "nan" in out


def test_svg_chart_handles_log_scale_and_empty_series():
  assert svg.line_chart([{"label": "x", "x": [], "y": []}]) is None
  chart = svg.line_chart([{"label": "loss", "x": [0, 1, 2], "y": [2.3, 0.1, 0.0]}], logy=True)
  assert chart.startswith("<svg") and chart.count("<circle") == 2  # the zero is dropped
  assert svg.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_a_constant_series_plots_flat_with_readable_ticks():
  """A constant 1e-3 learning rate read back through float32 (its 8th digit varies) is a flat
  line on a +-10% range, not four spikes over a range of rounding noise with equal labels."""
  import re
  import numpy as np
  lr = np.float32(1e-3) * np.ones(40, np.float32)
  lr[[5, 17, 23, 31]] = np.nextafter(np.float32(1e-3), np.float32(1))  # float32 rounding noise
  for logy in (False, True):
    chart = svg.line_chart([{"label": "lr", "x": np.arange(40), "y": lr}], logy=logy)
    labels = re.findall(r'text-anchor="end">([^<]+)<', chart)
    assert len(labels) >= 2 and len(set(labels)) == len(labels), (logy, labels)
    ys = [float(v) for v in re.findall(r'<circle cx="[\d.]+" cy="([\d.]+)"', chart)]
    assert max(ys) - min(ys) < 1.0, (logy, "a flat line, not spikes")


def test_bad_workdirs_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    report_mode.run_mode(None, str(tmp_path / "missing"))
  with pytest.raises(UserError, match="nothing to report"):
    report_mode.run_mode(None, str(tmp_path))
  assert not os.path.exists(tmp_path / "report.html")


@pytest.mark.slow
def test_cli_rebuilds_the_report_without_a_config(full_workdir, tmp_path):
  os.remove(os.path.join(full_workdir, "checks.json"))
  res = run_cli(["--mode=report", f"--workdir={full_workdir}"])
  assert res.returncode == 0, res.stderr
  assert "report.html" in res.stdout
  page, _ = parse(os.path.join(full_workdir, "report.html"))
  assert "checks" in page.sections  # checks/*.png alone still make the section
  res = run_cli(["--mode=report", f"--workdir={tmp_path / 'nope'}"])
  assert res.returncode == 2 and "does not exist" in res.stderr


# --- issue 22: designed pages for search, ensemble and ablation directories ----------------


def _page_dirs(tmp_path):
  """A search, an ensemble and an ablation directory as their modes write them (no training
  of their own: no metrics.jsonl)."""
  from tests.test_search import _fake_search, _tell
  from jrecipe.search import summary
  s = _fake_search(tmp_path, "optimizer.learning_rate=loguniform(1e-5,1e-1); "
                   "model.hidden=choice((16,),(32,))", "12x1,20x1")
  _tell(s, 0, lambda v: 0.9 - 0.1 * abs(np.log10(v["optimizer.learning_rate"]) + 3.5))
  _tell(s, 1, lambda v: 0.5 + 0.01 * np.log10(v["optimizer.learning_rate"]))
  summary.summarize(s, events=[{"time": 1796000000.5, "trial": 3, "study": "x.stage1",
                                "event": "worker pid 12 exited with status -9",
                                "requeued_as": 13}])
  ens = tmp_path / "ens"
  member = {"accuracy": 0.9593, "ci95": [0.93, 0.976], "nll": 0.14, "steps": 45,
            "examples": 2880}
  dump(str(ens / "ensemble.json"), {
      "source": "runs", "split": "test", "combine": "prob", "count": 270, "num_members": 2,
      "members": [{"name": "s0@45", **member}, {"name": "s1@45", **member, "accuracy": 0.9667}],
      "ensemble": {"accuracy": 0.9741, "ci95": [0.95, 0.987], "nll": 0.1},
      "best_member": {"name": "s0@45", "accuracy": 0.9593, "chosen_on": "validation"},
      "gain_points": 1.48,
      "distill": {"steps": 400, "examples": 25600, "run_dir": "/r/ens/student",
                  "student": {"accuracy": 0.9630, "ci95": [0.933, 0.98], "nll": 0.13}}})
  abl = tmp_path / "abl"
  dump(str(abl / "ablation.json"), {
      "kind": "add", "metric": "accuracy", "unit": "points", "seeds": 2,
      "base": {"mean": 96.3, "std": 0.0},
      "variants": [{"name": "no_ema", "overrides": {"ema_decay": 0.0}, "mean": 97.04, "std": 0.0,
                    "effect": 0.74, "se": 0.0, "interval": [0.0, 1.48], "direction": "better",
                    "size": None, "verdict": "no verdict",
                    "text": "expected better, got no change beyond noise; no verdict: fewer "
                            "than 3 seeds"}]})
  return {"search": s.workdir, "ensemble": str(ens), "ablation": str(abl)}


def test_search_ensemble_and_ablation_pages_are_designed_not_raw(tmp_path):
  dirs = _page_dirs(tmp_path)
  for kind, wd in dirs.items():
    assert report_mode.run_mode(None, wd) == 0
    page, text = parse(os.path.join(wd, "report.html"))
    assert kind in page.sections and "diagnoses" not in page.sections, page.sections
    assert "looks healthy" not in text and "look healthy" not in text  # no training here
    shown = re.sub(r"data:[^\"']+", "", text)  # the page's own text, not its images
    assert "e+09" not in shown and "e+0" not in shown  # readable numbers
    assert not page.external
  _, text = parse(os.path.join(dirs["search"], "report.html"))
  assert "2026-" in text and "Trials, best first" in text and "stage 2" in text  # a warning
  assert "the best of the longest budget" in text
  _, text = parse(os.path.join(dirs["ensemble"], "report.html"))
  assert "95% interval (Wilson)" in text and "96.3" in text and "25,600" in text
  assert "chosen on the validation split" in text
  _, text = parse(os.path.join(dirs["ablation"], "report.html"))
  assert "no verdict" in text and "[+0.00, +1.48]" in text
