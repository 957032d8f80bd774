"""--mode=search against a real PostgreSQL server: two workers on one study (the many-machine
setup, on loopback). `.ci/run` starts a server and sets JRECIPE_TEST_POSTGRES_URL; without it
the fixture starts a throwaway server from the installed binaries (initdb, pg_ctl). If neither
is possible the test fails and says how to fix it: it never skips silently."""

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from jrecipe.search import study as study_lib
from tests.helpers import REPO

ENV_URL = "JRECIPE_TEST_POSTGRES_URL"


def _pg_bin(name: str):
  found = shutil.which(name)
  if found:
    return found
  for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
    if os.path.exists(os.path.join(d, name)):
      return os.path.join(d, name)
  return None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
  """A PostgreSQL URL: $JRECIPE_TEST_POSTGRES_URL, or a throwaway server started here."""
  if os.environ.get(ENV_URL):
    yield os.environ[ENV_URL]
    return
  initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
  if not (initdb and pg_ctl):
    pytest.fail(f"No PostgreSQL server for the search tests: {ENV_URL} is not set and initdb/"
                "pg_ctl are not installed. Run the suite through .ci/run (it installs and starts "
                "one), or `apt-get install -y postgresql`, or set "
                f"{ENV_URL}=postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE.")
  root = os.geteuid() == 0
  prefix = ["runuser", "-u", "postgres", "--"] if root else []  # postgres refuses root
  base = tempfile.mkdtemp(prefix="jrecipe-pg-")
  if root:
    shutil.chown(base, "postgres", "postgres")
  data, port = os.path.join(base, "data"), _free_port()
  run = lambda cmd: subprocess.run(prefix + cmd, capture_output=True, text=True,  # noqa: E731
                                   timeout=120, cwd=base)
  r = run([initdb, "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8"])
  if r.returncode:
    pytest.fail(f"initdb failed: {r.stderr[-2000:]}")
  r = run([pg_ctl, "-D", data, "-l", os.path.join(base, "log"), "-w", "-o",
           f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"])
  if r.returncode:
    path = os.path.join(base, "log")
    log = open(path).read() if os.path.exists(path) else ""
    pytest.fail(f"pg_ctl start failed: {r.stderr[-1000:]} {log[-1500:]}")
  try:
    r = run([_pg_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U",
             "postgres", "jrecipe_test"])
    assert r.returncode == 0, r.stderr
    yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/jrecipe_test"
  finally:
    run([pg_ctl, "-D", data, "-m", "fast", "-w", "stop"])
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_one_postgres_study(tmp_path, postgres_url):
  import optuna
  name = f"pg_{uuid.uuid4().hex[:8]}"  # a fresh study on a shared CI database
  d = tmp_path / name
  cmd = [sys.executable, "-m", "jrecipe", "--mode=search", f"--workdir={d}",
         "--config=configs/digits_mlp.py", "--config.model.hidden=(16,)",
         "--config.batch_size=64",
         "--config.search.space=optimizer.learning_rate=loguniform(1e-3,3e-2)",
         "--config.search.stages=4x0.3", "--config.search.workers=2",
         f"--config.search.storage={postgres_url}"]
  t0 = time.time()
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert not (d / "study.db").exists()  # the study lives in PostgreSQL, not in DIR
  study_lib.quiet_optuna()
  import json
  study = json.loads((d / "study.json").read_text())["study"]  # bound to DIR, not its name
  assert study != name
  trials = optuna.load_study(study_name=f"{study}.stage1", storage=postgres_url).get_trials()
  complete = [t for t in trials if t.state.name == "COMPLETE"]
  assert len(complete) == 4, [(t.number, t.state.name, t.user_attrs) for t in trials]
  assert sorted(t.number for t in complete) == sorted({t.number for t in complete})
  workers = {t.user_attrs["worker"] for t in complete}
  assert len(workers) == 2, workers  # both workers took trials from the one study...
  spans = sorted((t.datetime_start, t.datetime_complete, t.user_attrs["worker"])
                 for t in complete)
  assert any(a[2] != b[2] and b[0] < a[1] for a, b in zip(spans, spans[1:])), spans  # ...at once
  names = os.listdir(d / "trials")
  for t in complete:
    assert f"{t.value:.4f}_stage1_trial{t.number:04d}" in names
  data = json.loads((d / "search.json").read_text())
  assert data["storage"].startswith("postgresql+psycopg://") and data["counts"]["complete"] == 4
  assert time.time() - t0 < 300
