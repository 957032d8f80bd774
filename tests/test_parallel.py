"""Data parallelism: mesh and pmap on 1, 4 and 8 forced host devices match a single device."""

import json
import os
import subprocess
import sys

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
