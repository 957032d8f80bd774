"""The report pages in a real browser: headless Chromium at 1400 px (issue 22).

Each kind of work directory (a training run holding every other mode's files, a search, an
ensemble, an ablation, a label session) gets its report.html rendered by Chromium with a
small measuring script injected into a copy of the page: the document must be no wider than
the window (no horizontal overflow: wide tables wrap or scroll inside their own box), and
the page must reference nothing outside itself. Skipped only when no Chromium is installed
(`.ci/run` installs Debian's `chromium` when it can).
"""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from jrecipe.label import mode as label_mode
from jrecipe.report import mode as report_mode
from tests.helpers import ReportPage
from tests.test_report import _page_dirs, dump, full_workdir  # noqa: F401 - a fixture

WIDTH = 1400
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine (apt-get "
                                "install chromium; .ci/run installs it as root)")
MEASURE = """<script>
window.addEventListener('load', function () {
  var w = window.innerWidth, over = [], main = document.querySelector('main');
  var edge = main ? main.getBoundingClientRect().right : w;
  document.querySelectorAll('body *').forEach(function (e) {
    for (var a = e.parentElement; a; a = a.parentElement)  // inside its own scroll box: fine
      if (['auto', 'scroll'].indexOf(getComputedStyle(a).overflowX) >= 0) return;
    var r = e.getBoundingClientRect();
    if (r.right > Math.min(w, edge) + 0.5 && over.length < 8)
      over.push(e.tagName + '.' + e.className + ' ' + Math.round(r.right) + ': ' +
                (e.textContent || '').slice(0, 60));
  });
  var p = document.createElement('pre');
  p.id = 'jr-measure';
  p.textContent = JSON.stringify({scrollWidth: document.documentElement.scrollWidth,
                                  innerWidth: w, over: over});
  document.body.appendChild(p);
});
</script>"""


def measure(page_path: str, tmp_dir: str) -> dict:
  """Chromium's layout of `page_path` at WIDTH px: scrollWidth, innerWidth, overflowing tags."""
  with open(page_path, encoding="utf-8") as f:
    text = f.read()
  probe = os.path.join(tmp_dir, "measure.html")
  with open(probe, "w", encoding="utf-8") as f:
    f.write(text.replace("</body>", MEASURE + "</body>"))
  res = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", f"--window-size={WIDTH},1000",
                        "--virtual-time-budget=5000", "--dump-dom", f"file://{probe}"],
                       capture_output=True, text=True, timeout=120)
  m = re.search(r'<pre id="jr-measure">(.*?)</pre>', res.stdout, re.S)
  assert m, f"Chromium rendered nothing (rc {res.returncode}): {res.stderr[-2000:]}"
  return json.loads(m.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


def _label_dir(tmp_path) -> str:
  """A label directory as --mode=label writes it: label_session.json and human.json."""
  wd = str(tmp_path / "label")
  os.makedirs(wd)
  y = np.arange(270) % 10
  ids = np.arange(270) + 1000
  items = label_mode.make_items(270, 15, 3, seed=0)
  rng = np.random.default_rng(1)
  answers = [{"label": int(y[it["index"]] if rng.random() < 0.8 else (y[it["index"]] + 1) % 10)}
             for it in items]
  answers[2] = {"skipped": True}
  session = {"dataset": "digits", "split": "test", "seed": 0, "num_examples": 15,
             "second_pass": 3, "items": items, "answers": answers}
  dump(os.path.join(wd, label_mode.SESSION_FILE), session)
  result = label_mode.compute_results(session, y, ids, [str(i) for i in range(10)])
  result["model_same_examples"] = {
      "split": "test", "step": 45, "n": result["n"], "human_correct": result["correct"],
      "human_accuracy": result["accuracy"], "human_ci95": result["ci95"], "model_correct": 9,
      "model_accuracy": 9 / result["n"], "model_ci95": label_mode.wilson(9, result["n"]),
      "both_right": 8, "only_human": 3, "only_model": 1, "both_wrong": 2,
      "model_accuracy_all": 0.9, "count_all": 270}
  dump(os.path.join(wd, label_mode.RESULT_FILE), result)
  return wd


def _wide_search(tmp_path) -> str:
  """A search of six fields, one a choice of long tuples: the widest trial table."""
  from jrecipe.search import summary
  from tests.test_search import _fake_search, _tell
  s = _fake_search(tmp_path / "wide", "optimizer.learning_rate=loguniform(1e-5,1e-1); "
                   "l2=loguniform(1e-7,1e-2); model.dropout=uniform(0,0.5); "
                   "batch_size=logint(16,256); optimizer.momentum=uniform(0.5,0.99); "
                   "model.hidden=choice((1024,1024,1024,1024),(2048,2048,2048,2048,2048))",
                   "6x1,3x2")
  _tell(s, 0, lambda v: 0.5 + 0.01 * np.log10(v["optimizer.learning_rate"]))
  _tell(s, 1, lambda v: 0.6 + 0.01 * v["model.dropout"])
  summary.summarize(s)
  return s.workdir


def test_every_report_page_fits_1400_px_with_nothing_external(tmp_path, full_workdir):  # noqa: F811
  dirs = {"train": full_workdir, **_page_dirs(tmp_path), "label": _label_dir(tmp_path),
          "wide search": _wide_search(tmp_path)}
  for kind, wd in dirs.items():
    assert report_mode.run_mode(None, wd) == 0
    path = os.path.join(wd, "report.html")
    page = ReportPage()
    with open(path, encoding="utf-8") as f:
      text = f.read()
    page.feed(text)
    assert not page.external, (kind, page.external)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), kind
    got = measure(path, str(tmp_path))
    assert got["innerWidth"] == WIDTH, got
    assert got["scrollWidth"] <= WIDTH, (kind, got)
    assert not got["over"], (kind, got)  # nothing sticks out of the page's column either


def test_the_measure_sees_an_overflowing_page(tmp_path):
  """The planted bug: a table wider than the window is caught."""
  path = str(tmp_path / "wide.html")
  with open(path, "w") as f:
    f.write("<!DOCTYPE html><html><body><table><tr><td>" + "x" * 400 +
            "</td></tr></table></body></html>")
  got = measure(path, str(tmp_path))
  assert got["scrollWidth"] > WIDTH and got["over"]
