"""experiments/random_vs_grid.py (recipe stage 5, 'Tune': Bergstra and Bengio): the grid and
the random points, the verdict computed from planted numbers, and a miniature run that writes
only its own section of RESULTS.md."""

import math

import pytest

from experiments import random_vs_grid as rvg
from tests.helpers import tiny_config

LR, L2 = (1e-5, 1e-1), (1e-8, 1e-5)
OTHER = "<!-- BEGIN other -->\n## Another experiment\n\nkept as is\n<!-- END other -->\n"


def test_grid_tries_k_learning_rates_and_random_tries_budget():
  grid = rvg.grid_points(9, LR, L2)
  assert len(grid) == 9 and len({p[rvg.IMPORTANT] for p in grid}) == 3
  lrs = sorted({p[rvg.IMPORTANT] for p in grid})
  assert lrs[1] == pytest.approx(1e-3)  # cell centres in log space: 10^-4.33, 10^-3, 10^-1.67
  assert math.log10(lrs[0]) == pytest.approx(-5 + 2 / 3)
  rnd = rvg.random_points(9, LR, L2, seed=0)
  assert len({p[rvg.IMPORTANT] for p in rnd}) == 9
  assert all(LR[0] <= p[rvg.IMPORTANT] <= LR[1] and L2[0] <= p[rvg.UNIMPORTANT] <= L2[1]
             for p in rnd)
  assert rnd == rvg.random_points(9, LR, L2, seed=0) != rvg.random_points(9, LR, L2, seed=1)
  with pytest.raises(ValueError, match="square"):
    rvg.grid_points(8, LR, L2)


def _records(grid_best, random_best, l2_matters=False):
  """Planted results: per seed, the grid's and random search's trials (val accuracy)."""
  recs = []
  for seed, (g, r) in enumerate(zip(grid_best, random_best)):
    for i, p in enumerate(rvg.grid_points(4, LR, L2)):
      lr_good = p[rvg.IMPORTANT] > 1e-3
      acc = g if lr_good else 0.5
      if l2_matters and p[rvg.UNIMPORTANT] > 1e-6:
        acc -= 0.45
      recs.append({"method": "grid", "trial": i, "seed": seed, **p, "val_acc": acc,
                   "test_acc": acc, "val_count": 270, "status": "ok", "seconds": 1.0})
    for i, p in enumerate(rvg.random_points(4, LR, L2, seed)):
      acc = r if i == 0 else 0.5
      recs.append({"method": "random", "trial": i, "seed": seed, **p, "val_acc": acc,
                   "test_acc": acc, "val_count": 270, "status": "ok", "seconds": 1.0})
  return recs


def test_verdict_follows_the_numbers():
  win = rvg.verdict(_records([0.95, 0.95, 0.96], [0.97, 0.98, 0.97]))
  assert "**reproduces**" in win[0] and "wins 3" in win[0]
  assert "has one important and one unimportant" in win[1]
  lose = rvg.verdict(_records([0.97, 0.98, 0.97], [0.95, 0.95, 0.96]))
  assert "**does not reproduce**" in lose[0] and "wins 0" in lose[0]
  tie = rvg.verdict(_records([0.97, 0.97], [0.97, 0.971]))
  assert "**inconclusive**" in tie[0]
  # A space where the 'unimportant' parameter matters is called out.
  bad = rvg.verdict(_records([0.95], [0.97], l2_matters=True))
  assert "does NOT have" in bad[1]


@pytest.mark.slow
def test_miniature_run_writes_its_section(tmp_path):
  c = tiny_config()
  recs = rvg.run(c, budget=4, seeds=1, epochs=0.2, workdir=str(tmp_path / "runs"),
                 lr_range=(1e-4, 1e-1), l2_range=L2, log=lambda s: None)
  assert len(recs) == 8 and {r["method"] for r in recs} == {"grid", "random"}
  assert all(r["val_acc"] is not None or r["status"] == "diverged" for r in recs)
  meta = {"command": "python -m experiments.random_vs_grid --quick", "quick": True,
          "epochs": 0.2, "budget": 4, "lr_range": (1e-4, 1e-1), "l2_range": L2,
          "date": "today", "machine": "test", "wall": "1 s", "job": "tiny"}
  results = tmp_path / "RESULTS.md"
  results.write_text("# Results\n\n" + OTHER)
  for _ in range(2):
    rvg.write_section(str(results), rvg.SECTION, rvg.render_section(recs, meta))
  text = results.read_text()
  assert text.count("<!-- BEGIN random_vs_grid -->") == 1 and OTHER in text
  section = text[text.index("<!-- BEGIN random_vs_grid -->"):]
  assert "Smoke run" in section and "| grid |" in section and "| random |" in section
  assert "Claim 'random search beats grid search" in section
