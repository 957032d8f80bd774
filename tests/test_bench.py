"""jrecipe.bench: a miniature of the benchmark (a few steps), its figures and its skips."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import framework as bench
from bench import runners
from tests.helpers import REPO


@pytest.fixture(scope="module")
def worker():
  """jrecipe's loop (in memory and streamed) and the hand-written loop on the digits MLP."""
  return bench.Worker("digits_mlp", ["jrecipe", "stream", "hand"], 0.0)


def test_round_times_every_runner(worker):
  r = worker.round(3)
  assert set(r) == {"jrecipe", "stream", "hand"}
  assert worker.built["stream"]["exp"].data.stream is not None
  for steps_per_s, cpu_per_step in r.values():
    assert steps_per_s > 0 and cpu_per_step > 0
  info = worker.info
  assert info["devices"] >= 1 and info["batch_size"] == 128
  assert info["runners"]["hand"]["flops"] > 1e6  # XLA's count for one step


@pytest.mark.slow
def test_time_to_target_trains_from_scratch(worker):
  """Both loops reach 97% test accuracy on digits within the epoch budget."""
  out = worker.time_to_target()
  for k in ("jrecipe", "stream", "hand"):
    assert out[k]["seconds"] is not None and out[k]["seconds"] > 0, out
    assert out[k]["accuracy"] >= 0.97
  # A target that cannot be reached is reported as such, not as a time.
  r = dict(worker.built["hand"])
  miss = runners.time_to_target(r, worker.exp.steps_per_epoch, target=1.01, max_epochs=1)
  assert miss["seconds"] is None and "not reached" in miss["note"]


def test_torch_runner_skipped_with_a_note_when_absent(monkeypatch):
  monkeypatch.setattr(bench, "torch_available", lambda: False)
  w = bench.Worker("digits_mlp", ["torch"], 0.0)
  assert not w.built
  assert any("torch is not installed" in n for n in w.info["notes"])


@pytest.mark.parametrize("name", ["digits_mlp", "mnist5k_cnn"])
def test_torch_twin_has_the_same_parameters(name):
  """The PyTorch model is the same network: the same parameter count as the Flax one."""
  import jax
  from jrecipe import experiment
  from jrecipe.train.state import param_count
  config = runners.load_config(name)
  config.data.train_subset = 256
  exp = experiment.build(config)
  flax_n = param_count(exp.init_variables(jax.random.PRNGKey(0))["params"])
  r = runners.torch_runner(exp, config, probe_threads=False)  # it runs one step itself
  twin = sum(p.numel() for p in r["model"]().parameters())
  assert twin == flax_n, (twin, flax_n)


def test_matmul_peak_is_positive():
  peak = bench.matmul_peak_gflops(n=256, repeats=2)
  assert peak["wall"] > 0 and peak["cpu"] > 0


@pytest.mark.slow
def test_cli_writes_json(tmp_path):
  """`python -m jrecipe.bench` end to end, miniature: two JAX worker processes (1 and 2
  devices) and PyTorch in a third, alternating rounds; the paired split speedup; PyTorch's
  figures paired with each JAX worker; a mode that fails skipped with a note."""
  out = tmp_path / "bench.json"
  r = subprocess.run(
      [sys.executable, "-m", "jrecipe.bench", "--workloads=digits_mlp", "--devices=1,2",
       "--rounds=2", "--steps=2", "--runners=jrecipe,hand,torch", "--notime_to_target",
       "--startup_repeats=0", "--end_to_end=no_such_mode", "--norecord", f"--json={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert r.returncode == 0, r.stderr[-3000:]
  data = json.loads(out.read_text())
  assert data["machine"]["cores"] >= 1 and data["machine"]["matmul_peak_gflops"]["cpu"] > 0
  by_devices = {w["devices"]: w for w in data["workloads"]}
  assert set(by_devices) == {1, 2}, data["workloads"]
  one = by_devices[1]
  assert one["auto_choice"] is True  # the digits MLP stays on one device
  for k in ("jrecipe", "hand"):
    assert one["runners"][k]["steps_per_s"]["median"] > 0
    assert one["runners"][k]["fraction_of_peak"]["wall"] > 0
  assert np.isfinite(one["ratios"]["jrecipe/hand"]["median"])
  # PyTorch ran once per round in its own process: the same figures beside both workers,
  # its best thread count probed there, and ratios against it in each.
  two = by_devices[2]
  assert one["runners"]["torch"]["steps_per_s"] == two["runners"]["torch"]["steps_per_s"]
  assert one["runners"]["torch"]["threads"] in (1, data["machine"]["cores"])
  for w in (one, two):
    assert np.isfinite(w["ratios"]["jrecipe/torch"]["median"])
  # The fraction of peak uses one step's FLOPs on one device for both workers.
  assert one["runners"]["hand"]["flops"] == two["runners"]["hand"]["flops"]
  assert by_devices[2]["split_speedup"]["jrecipe"]["median"] > 0
  e2e = data["end_to_end"][0]
  assert e2e["exit_status"] == 2 and "skipped" in e2e["note"]
  assert "ratio jrecipe/hand" in r.stdout
