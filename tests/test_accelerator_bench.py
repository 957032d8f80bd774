"""bench/accelerator.sh in its reduced form on this CPU, so the GPU proof cannot rot: the
install step, the `accelerator` tests (one of them here), and the interleaved benchmark of
jrecipe, a hand-written jax.jit loop and PyTorch, all into one folder."""

import json
import os
import subprocess

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_reduced_accelerator_script_writes_every_figure(tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "out"
  env = dict(os.environ, JRECIPE_ACCEL_PYTEST_ARGS="-k mesh_over_every_local_device")
  r = subprocess.run(["bash", "bench/accelerator.sh", "--reduced", str(out)], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  for name in ("env.txt", "install.log", "pytest.log", "summary.txt", "results.json",
               "jrecipe.log", "hand.log", "torch.log"):
    assert (out / name).exists(), name
  assert "1 passed" in (out / "pytest.log").read_text()
  results = json.loads((out / "results.json").read_text())
  assert set(results["runners"]) == {"jrecipe", "hand", "torch"}
  assert results["flops_per_step"] > 0 and results["peak_tflops"] > 0
  for name, res in results["runners"].items():
    assert len(res["seconds"]) == results["rounds"], name
    assert res["images_per_s"]["median"] > 0, name
    assert 0 < res["mfu"]["median"] <= 1, name
  summary = (out / "summary.txt").read_text()
  assert "jrecipe/hand images/s" in summary and "jrecipe/torch images/s" in summary
