"""experiments/recipe_claims.py runs end to end as a user runs it, writes one section per claim
with a generated verdict, and leaves the other sections of RESULTS.md untouched."""

import subprocess
import sys

from tests.helpers import REPO

OTHER = "<!-- BEGIN other -->\n## Another experiment\n\nkept as is\n<!-- END other -->\n"
SECTIONS = ("claim_ensemble", "claim_ema", "claim_bigger_early_stopped")


def test_recipe_claims_quick_writes_three_verdicts(tmp_path):
  results = tmp_path / "RESULTS.md"
  results.write_text("# Results\n\n" + OTHER)
  args = [sys.executable, "-m", "experiments.recipe_claims", "--quick", "--seeds=1",
          "--epochs=1", "--members=2", f"--workdir={tmp_path / 'runs'}",
          f"--results={results}"]
  r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  text = results.read_text()
  assert text.startswith("# Results\n\n" + OTHER), "another section must be left untouched"
  for name in SECTIONS:
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    section = text[text.index(begin):text.index(end)]
    assert "Smoke run (`--quick`)" in section
    assert "python -m experiments.recipe_claims --quick" in section
    assert "Wall time:" in section and "Machine:" in section and "Date:" in section
    verdicts = [l for l in section.splitlines() if l.startswith("Claim '")]
    assert len(verdicts) == 1, section
    assert ("**reproduces**" in verdicts[0]) != ("**does not reproduce**" in verdicts[0])
