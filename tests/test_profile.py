"""Profiling (`config.profile.steps`, jrecipe/profile.py): a real jax.profiler trace in the
work directory, the step's FLOPs from XLA's cost analysis and MFU against a peak."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import pytest

from jrecipe import profile
from jrecipe.errors import UserError
from jrecipe.train import loop
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("profiled"))
  c = tiny_config(**{"profile.steps": "3:8", "monitor.enabled": False})
  loop.train_and_evaluate(c, wd)
  return wd


def test_trace_lands_in_the_workdir_for_tensorboard_and_perfetto(profiled):
  runs = glob.glob(os.path.join(profiled, "profile", "plugins", "profile", "*"))
  assert len(runs) == 1
  names = os.listdir(runs[0])
  assert any(n.endswith(".xplane.pb") for n in names), names
  assert "perfetto_trace.json.gz" in names
  assert all(os.path.getsize(os.path.join(runs[0], n)) > 0 for n in names)


def test_summary_has_step_times_flops_and_mfu(profiled):
  with open(os.path.join(profiled, "profile", "summary.json")) as f:
    s = json.load(f)
  assert s["steps"] == [4, 8] and len(s["step_seconds"]) == 5
  assert all(t > 0 for t in s["step_seconds"])
  # The MLP 64-32-10 at batch 64: forward 2*64*(64*32+32*10) FLOPs, backward about twice that.
  forward = 2 * 64 * (64 * 32 + 32 * 10)
  assert 2 * forward < s["flops_per_step"] < 10 * forward
  assert 0 < s["mfu"] <= 1 and s["peak_tflops"] > 0
  assert s["peak_source"].startswith("measured float32 matmul peak")
  records = [json.loads(l) for l in open(os.path.join(profiled, "metrics.jsonl"))]
  [rec] = [r for r in records if r["split"] == "profile"]
  assert rec["step"] == 8 and rec["mfu"] == s["mfu"]
  assert rec["step_seconds"] == s["step_seconds"]  # the log carries every traced step's time


def test_flops_of_a_known_matmul():
  f = jax.jit(lambda a, b: a @ b)
  a = jnp.ones((64, 32))
  assert profile.step_flops(f, a, jnp.ones((32, 16))) == 2 * 64 * 32 * 16


def test_peak_table_and_override():
  assert profile.table_peak("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989.4
  assert profile.table_peak("NVIDIA H100 PCIe", "bfloat16")[0] == 756.0
  assert profile.table_peak("TPU v5 lite", "float32")[0] == 197.0  # bf16 passes
  assert profile.table_peak("cpu", "float32") is None
  assert profile.device_peak("float32", 123.0) == (123.0, "config.profile.peak_tflops")


@pytest.mark.parametrize("bad", ["5", "8:3", "a:b", "-1:4", "1:2:3"])
def test_bad_steps_are_refused_before_training(bad, tmp_path):
  with pytest.raises(UserError, match="START:END"):
    loop.train_and_evaluate(tiny_config(**{"profile.steps": bad}), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "config.json")


PER_DEVICE = """
import json, sys
sys.path.insert(0, {repo!r})
from tests.helpers import tiny_config
from jrecipe import experiment, profile
from jrecipe.train import parallel
from jrecipe.train.trainer import Trainer
exp = experiment.build(tiny_config())
out = {{}}
for mode, n in (("single", 1), ("mesh", 2)):
  tr = Trainer.from_experiment(exp, parallel.make_placement(mode, n))
  state = tr.to_device(tr.initial_state())
  out[mode] = profile.step_flops(tr.step, state, tr.placement.put_batch(next(tr.batches(0))))
print(json.dumps(out))
"""


def test_flops_are_one_devices_program_under_a_mesh():
  """So MFU divides by one device's peak: a 2-device mesh step counts about half the FLOPs."""
  import subprocess
  import sys
  from tests.helpers import REPO
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  r = subprocess.run([sys.executable, "-c", PER_DEVICE.format(repo=REPO)], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  flops = json.loads(r.stdout.strip().splitlines()[-1])
  assert 0.45 < flops["mesh"] / flops["single"] < 0.6, flops
