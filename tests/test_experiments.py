"""experiments/: the learning-rate sweep (recipe stage 5 'Tune') runs end to end as a user runs
it, and owns only its own section of RESULTS.md."""

import subprocess
import sys

from tests.helpers import REPO

OTHER = "<!-- BEGIN other -->\n## Another experiment\n\nkept as is\n<!-- END other -->\n"


def _sweep(workdir, results):
  args = [sys.executable, "-m", "experiments.lr_sweep", "--quick", "--rates=1e-3,1e-2",
          "--seeds=1", "--epochs=1", f"--workdir={workdir}", f"--results={results}"]
  r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  return results.read_text()


def test_lr_sweep_writes_and_replaces_only_its_section(tmp_path):
  results = tmp_path / "RESULTS.md"
  results.write_text("# Results\n\n" + OTHER)
  first = _sweep(tmp_path / "runs", results)
  second = _sweep(tmp_path / "runs", results)
  for text in (first, second):
    assert text.count("<!-- BEGIN lr_sweep -->") == 1
    assert text.count("<!-- END lr_sweep -->") == 1
    assert text.index("<!-- BEGIN lr_sweep -->") < text.index("<!-- END lr_sweep -->")
    assert OTHER in text, "another experiment's section must be left untouched"
    section = text[text.index("<!-- BEGIN lr_sweep -->"):]
    rows = [l for l in section.splitlines() if l.startswith("| adam |")]
    assert [r.split("|")[2].strip() for r in rows] == ["1e-3", "1e-2"]
    assert sum("**best**" in r for r in rows) == 1
    assert "Claim 'Adam at 3e-4 is safe'" in section and "not tested" in section
    assert "python -m experiments.lr_sweep --quick" in section
  assert second.startswith("# Results\n\n" + OTHER)

  # A missing file is created with the header saying it is generated.
  from experiments import lr_sweep
  fresh = tmp_path / "new" / "RESULTS.md"
  lr_sweep.write_section(str(fresh), "x", "<!-- BEGIN x -->\nhello\n<!-- END x -->\n")
  text = fresh.read_text()
  assert text.startswith(lr_sweep.RESULTS_HEADER) and "do not edit" in text
