"""Data parallelism: mesh and pmap on 1, 4 and 8 forced host devices match a single device."""

import json
import os
import subprocess
import sys

import pytest

from jrecipe.train import parallel

from tests.helpers import REPO


def test_mesh_and_pmap_match_single_device():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "multidevice_equivalence.py")],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  # one device: the same numbers as plain jit
  assert out["mesh/1"]["param_diff"] < 1e-6, out
  assert out["pmap/1"]["param_diff"] < 1e-6, out
  for key in ("mesh/4", "pmap/4", "mesh/8", "pmap/8"):
    assert out[key]["param_diff"] < 1e-5, (key, out)
    assert out[key]["loss_diff"] < 1e-5, (key, out)


# --- explicit placement: no implicit host -> device copies in the training loop -----------
GUARDED_RUN = """
import json, sys, tempfile
sys.path.insert(0, {repo!r})
import jax
from jrecipe.train import loop, parallel
from jrecipe.train.trainer import Trainer
from tests.helpers import tiny_config

# Setup before the loop (PRNG keys from the seed, parameter init) makes its own small
# transfers; the guard covers everything from there on: placement, every step, metrics,
# evaluation, checkpoints, the final test evaluation.
_init = Trainer.initial_state
def init_unguarded(*a, **k):
  with jax.transfer_guard("allow"):
    return _init(*a, **k)
Trainer.initial_state = init_unguarded
def run(mode):
  cfg = tiny_config(num_epochs=1, ema_decay=0.9, log_every_steps=3,
                    **{{"parallel.mode": mode, "plateau.enabled": True,
                       "checkpoint.every_epochs": 1}})
  with tempfile.TemporaryDirectory() as wd:
    try:
      with jax.transfer_guard("disallow"):
        s = loop.train_and_evaluate(cfg, wd)
      return s["test"]["accuracy"]
    except Exception as e:
      return "error: " + str(e).splitlines()[0][:200]
out = {{mode: run(mode) for mode in ("single", "mesh", "pmap")}}
# Planted: the old behaviour, numpy batches handed to the jitted step implicitly.
parallel.Placement.put_batch = lambda self, batch: batch
planted = run("mesh")
print(json.dumps({{"devices": jax.device_count(), "runs": out, "planted": planted}}))
"""


def _guarded() -> dict:
  env = dict(os.environ, JRECIPE_NUM_CPU_DEVICES="2")
  env.pop("XLA_FLAGS", None)
  code = ("from jrecipe.train import parallel; parallel.prefer_sync_cpu_dispatch(); "
          "import jax; jax.config.update('jax_num_cpu_devices', 2); "
          + GUARDED_RUN.format(repo=REPO))
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_training_loop_runs_under_transfer_guard_disallow():
  """Every host -> device copy of the loop is explicit (Placement.put_batch / put_state),
  split over two devices by mesh and pmap, and on one ('single'), with the monitor
  (babysitting) at its defaults. Implicit numpy batches (planted) are refused."""
  out = _guarded()
  assert out["devices"] == 2
  for mode, acc in out["runs"].items():
    assert isinstance(acc, float) and acc > 0.3, (mode, acc)
  assert "Disallowed host-to-device transfer" in out["planted"], out["planted"]


@pytest.mark.parametrize("mode", ["single", "mesh", "pmap"])
def test_explicit_device_put_matches_jax_device_put(mode, monkeypatch):
  """The fast explicit path gives what `jax.device_put` gives, and falls back to it."""
  import jax
  import numpy as np
  placement = parallel.make_placement(mode, 1)
  batch = {"x": np.arange(24, dtype=np.float32).reshape(4, 6), "y": np.arange(4, dtype=np.int32)}
  fast = placement.put_batch(batch)
  sharding = placement._sharding(replicated=False)
  ref = jax.device_put(jax.tree.map(lambda x: x.reshape(fast["x"].shape[:1] + (-1,) + x.shape[1:])
                                    if mode == "pmap" else x, batch), sharding)
  for k in batch:
    assert isinstance(fast[k], jax.Array) and fast[k].sharding == ref[k].sharding
    assert fast[k].dtype == batch[k].dtype
    np.testing.assert_array_equal(np.asarray(fast[k]).reshape(batch[k].shape), batch[k])
  # States: 0-d leaves (the step counter) stay 0-d, broadcast (stride-0) leaves are copied.
  state = {"step": np.zeros((), np.int32), "w": np.arange(6, dtype=np.float32).reshape(2, 3),
           "b": np.broadcast_to(np.float32(2), (4,)), "lr": np.float32(0.5)}
  placed = placement.put_state(state)
  for k, v in placement.host_state(placed).items():
    lead = (1,) if mode == "pmap" else ()
    assert placed[k].shape == lead + np.shape(state[k]), k
    np.testing.assert_array_equal(v, state[k])
  monkeypatch.setattr(parallel, "_FAST_PUT", False)  # as if the private API had moved
  slow = placement.put_batch(batch)
  np.testing.assert_array_equal(np.asarray(slow["x"]).reshape(4, 6), batch["x"])
  with jax.transfer_guard("disallow"):
    placement.put_batch(batch)  # explicit either way
