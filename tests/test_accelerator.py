"""The accelerator tests: train, check, kill-and-resume, a mesh over every local device, and
bfloat16, on whatever backend JAX finds (`pytest -m accelerator`; bench/accelerator.sh runs
them on a GPU). On this CPU they run too, small, so they cannot rot. The data are CIFAR-10
shaped and synthetic (bench/accelerator_data.py): no download, no dataset package needed."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrecipe import experiment, precision
from jrecipe.config_base import base_config
from jrecipe.train import parallel
from jrecipe.train.trainer import Hook, Trainer
from tests.helpers import REPO, load_params, set_fields

pytestmark = pytest.mark.accelerator
DATA = "bench.accelerator_data:cifar_shaped"


@pytest.fixture(autouse=True)
def _small_data(monkeypatch):
  monkeypatch.setenv("JRECIPE_BENCH_TRAIN", "512")


def accel_config(model="resnet18", **overrides):
  c = base_config()
  c.data.name = DATA
  c.model.name = model
  if model == "resnet18":
    c.model.width = 4
  else:
    c.model.hidden = (32,)
  c.batch_size, c.eval_batch_size, c.num_epochs = 32, 256, 2
  c.optimizer.learning_rate = 3e-3
  c.progress, c.monitor.enabled, c.ema_decay = False, False, 0.0
  return set_fields(c, overrides)


class _Losses(Hook):
  def __init__(self):
    self.losses = []

  def after_step(self, loop, metrics):
    self.losses.append(metrics["loss"])


def test_bfloat16_resnet_trains_and_computes_in_bfloat16_here():
  """One compile of the ResNet step: bf16 in what was traced and in what this backend's
  compiler kept, float32 state and loss, and a loss that goes down on learnable data."""
  exp = experiment.build(accel_config(precision="bfloat16"))
  trainer = Trainer.from_experiment(exp, parallel.make_placement("mesh"))
  state = trainer.to_device(trainer.initial_state())
  batch = trainer.placement.put_batch(next(trainer.batches(0)))
  variables = {"params": state.params, **state.model_state}
  assert set(precision.matmul_dtypes(exp.model, variables, batch["x"])) == {"bfloat16"}
  assert "bf16" in trainer.step.lower(state, batch).compile().as_text()
  hook = _Losses()
  run = trainer.run(state, num_steps=exp.total_steps, hooks=[hook])
  losses = [float(x) for x in jax.device_get(hook.losses)]
  assert {x.dtype for x in hook.losses} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(run.state.params)} == {jnp.dtype(jnp.float32)}
  assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4]), losses
  print("backend", jax.default_backend(), jax.devices()[0].device_kind, losses[-1])


def test_check_battery_on_this_backend():
  from jrecipe.checks.runner import run_battery
  # Adam at 3e-4: at 3e-3 the 20 burn-in steps fit the 4 checked examples (these classes
  # separate easily) and leave gradients of 1e-9, which the gradient check rightly distrusts.
  exp = experiment.build(accel_config("mlp", **{"checks.overfit_steps": 200,
                                                "optimizer.learning_rate": 3e-4}))
  rows = {r.name: r for r in run_battery(
      exp, only=("loss_at_init", "overfit_one_batch", "gradient_check"))}
  for name, row in rows.items():
    assert row.status == "pass", (name, row.message)


def test_mesh_over_every_local_device_matches_one_device():
  exp = experiment.build(accel_config("mlp"))
  params = {}
  for mode in ("mesh", "single"):
    placement = parallel.make_placement(mode)
    trainer = Trainer.from_experiment(exp, placement)
    run = trainer.run(trainer.to_device(trainer.initial_state()), num_steps=5)
    params[mode] = trainer.to_host(run.state).params
    if mode == "mesh":
      assert placement.global_devices == jax.device_count()
  for a, b in zip(jax.tree.leaves(params["mesh"]), jax.tree.leaves(params["single"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_sigkill_and_resume_is_bit_identical(tmp_path):
  args = ["-m", "jrecipe", "--config=configs/digits_mlp.py", f"--config.data.name={DATA}",
          "--config.model.hidden=(32,)", "--config.num_epochs=40", "--config.batch_size=64",
          "--config.progress=False", "--config.checkpoint.every_epochs=1"]
  env = dict(os.environ, JRECIPE_BENCH_TRAIN="512",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true"))
  ref = str(tmp_path / "ref")
  r = subprocess.run([sys.executable, *args, f"--workdir={ref}"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  wd = str(tmp_path / "killed")
  p = subprocess.Popen([sys.executable, *args, f"--workdir={wd}"], cwd=REPO, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckdir = os.path.join(wd, "checkpoints")
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.isdir(ckdir) and len(os.listdir(ckdir)) >= 2):
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert not os.path.exists(os.path.join(wd, "summary.json")), "killed after the end"
  r = subprocess.run([sys.executable, *args, f"--workdir={wd}"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "Resuming from the checkpoint" in r.stderr
  a, b = load_params(ref), load_params(wd)
  assert all(np.array_equal(a[k], b[k]) for k in a)
