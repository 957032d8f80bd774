"""Soak test of the failure paths: random SIGKILLs (and some SIGTERMs) and random checkpoint
damage on real `python -m jrecipe` runs, each compared with an uninterrupted run.

    python -m bench.soak --kills=50 --corruptions=50 --workdir_damage=20 [--seed=0] [--out=DIR]

Runs digits_mlp and a small mnist5k CNN (issue 19's acceptance). A kill trial starts a run,
interrupts it at a random moment (start-up, a step, an evaluation, a checkpoint write or the
deletion of an old one) one to three times, then lets it finish. A corruption trial copies a
finished run, damages its newest checkpoint (1-64 bytes changed at random offsets in a random
file of its manifest, a truncated file, a removed manifest or item), and reruns it. A workdir
trial damages one of a finished run's own files instead (a line of metrics.jsonl, config.json,
summary, diagnoses, the monitor's files, TensorBoard's events) and reruns it. Kills are SIGKILL,
with some SIGTERMs and Ctrl-Cs (SIGINT). It prints
counts: kills, runs whose final parameters are bit-identical to the uninterrupted run, runs
with duplicated or missing metric rows, damaged checkpoints loaded silently (the rerun
resumed from the damaged step), damaged runs that finished, and wrong exit statuses.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small settings: the machine this runs on may have 2 cores shared with other work.
CONFIGS = {
    "digits_mlp": ["--config=configs/digits_mlp.py", "--config.model.hidden=(32,)",
                   "--config.num_epochs=6", "--config.batch_size=64",
                   "--config.checkpoint.every_epochs=1", "--config.checkpoint.keep_best=2",
                   "--config.log_every_steps=7", "--config.progress=False"],
    "mnist5k_cnn": ["--config=configs/mnist5k_cnn.py", "--config.data.train_subset=512",
                    "--config.num_epochs=3", "--config.batch_size=64",
                    "--config.checkpoint.every_epochs=1", "--config.checkpoint.keep_best=2",
                    "--config.log_every_steps=3", "--config.progress=False"],
}


def _run(args, workdir, timeout=600):
  return subprocess.run([sys.executable, "-m", "jrecipe", *args, f"--workdir={workdir}"],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout)


def final_params(workdir) -> dict:
  """{path: array} of the newest checkpoint's parameters (read with orbax, no jrecipe code)."""
  import jax
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               item_names=("state", "meta"),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  out = mngr.restore(mngr.latest_step(),
                     args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  flat = jax.tree_util.tree_flatten_with_path(out["state"]["params"])[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def rows(workdir) -> list:
  out = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      out.append((r["split"], r["step"]))
  return sorted(out)


def _same(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


class Soak:
  """The trials and their counts."""

  def __init__(self, out: str, seed: int):
    self.out, self.rng = out, np.random.default_rng(seed)
    self.refs: dict = {}
    self.counts = {k: 0 for k in (
        "kills", "sigterms", "kill_runs", "kill_runs_bit_identical", "runs_rows_wrong",
        "corruption_trials", "damage_detected", "silent_damaged_loads",
        "damaged_runs_finished_identical", "workdir_damage_trials", "workdir_damage_handled",
        "sigints", "wrong_exit_status")}
    self.failures: list = []

  def reference(self, name: str):
    """(workdir, params, rows, seconds) of the uninterrupted run of `name`."""
    if name not in self.refs:
      wd = os.path.join(self.out, f"ref_{name}")
      shutil.rmtree(wd, ignore_errors=True)
      t0 = time.time()
      r = _run(CONFIGS[name], wd)
      if r.returncode:
        raise SystemExit(f"reference run of {name} failed:\n{r.stderr[-3000:]}")
      self.refs[name] = (wd, final_params(wd), rows(wd), time.time() - t0)
    return self.refs[name]

  def _check(self, name, wd, trial) -> bool:
    _, params, ref_rows, _ = self.reference(name)
    same = _same(final_params(wd), params)
    if rows(wd) != ref_rows:
      self.counts["runs_rows_wrong"] += 1
      self.failures.append(f"{trial}: metric rows differ")
    if not same:
      self.failures.append(f"{trial}: final parameters differ")
    return same

  def kill_trial(self, name: str, i: int) -> None:
    _, _, _, seconds = self.reference(name)
    wd = os.path.join(self.out, f"kill_{name}_{i}")
    shutil.rmtree(wd, ignore_errors=True)
    for _ in range(int(self.rng.integers(1, 4))):
      p = subprocess.Popen([sys.executable, "-m", "jrecipe", *CONFIGS[name], f"--workdir={wd}"],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      time.sleep(float(self.rng.uniform(0.3, 0.8 * seconds)))
      u = self.rng.random()
      sig = signal.SIGTERM if u < 0.1 else signal.SIGINT if u < 0.2 else signal.SIGKILL
      p.send_signal(sig)
      _, err = p.communicate(timeout=600)
      if p.returncode == 0:
        continue  # it finished before the signal
      # SIGTERM: 75 once the loop runs; before it (start-up) or after it (final evaluation)
      # the default action ends the process, which is also fine. SIGINT (Ctrl-C): 75 in the
      # loop, else one line and 130. Never a traceback.
      ok = {signal.SIGKILL: (-signal.SIGKILL,), signal.SIGTERM: (75, -signal.SIGTERM),
            signal.SIGINT: (75, 130, -signal.SIGINT)}[sig]
      if p.returncode not in ok or "Traceback" in err:
        self.counts["wrong_exit_status"] += 1
        with open(os.path.join(self.out, f"kill_{name}_{i}.stderr"), "w") as f:
          f.write(err)
        self.failures.append(f"kill {name} {i}: exit {p.returncode}: {err[-500:]}")
      self.counts[{signal.SIGKILL: "kills", signal.SIGTERM: "sigterms",
                   signal.SIGINT: "sigints"}[sig]] += 1
    r = _run(CONFIGS[name], wd)
    self.counts["kill_runs"] += 1
    with open(os.path.join(self.out, f"kill_{name}_{i}.rerun.stderr"), "w") as f:
      f.write(r.stderr)
    if r.returncode:
      self.counts["wrong_exit_status"] += 1
      self.failures.append(f"kill {name} {i}: rerun exit {r.returncode}: {r.stderr[-800:]}")
      return
    ok = self._check(name, wd, f"kill {name} {i}")
    self.counts["kill_runs_bit_identical"] += ok
    if ok:  # a failing trial's directory stays for a look
      shutil.rmtree(wd, ignore_errors=True)

  def _damage(self, step_dir: str) -> str:
    from jrecipe.train import integrity
    files = sorted(integrity.read_manifest(step_dir)["files"])
    kind = self.rng.choice(["bytes"] * 6 + ["truncate", "manifest", "item"])
    if kind == "manifest":
      os.remove(os.path.join(step_dir, integrity.MANIFEST))
      return kind
    if kind == "item":
      shutil.rmtree(os.path.join(step_dir, str(self.rng.choice(["state", "meta"]))))
      return kind
    path = os.path.join(step_dir, files[int(self.rng.integers(len(files)))])
    data = bytearray(open(path, "rb").read())
    if kind == "truncate" or not data:
      os.truncate(path, len(data) // 2)
      return f"truncate {os.path.relpath(path, step_dir)}"
    n = min(len(data), int(self.rng.integers(1, 65)))
    for off in self.rng.choice(len(data), size=n, replace=False):
      data[off] ^= int(self.rng.integers(1, 256))
    with open(path, "wb") as f:
      f.write(bytes(data))
    return f"{n} bytes of {os.path.relpath(path, step_dir)}"

  def _damage_file(self, wd: str) -> tuple[str, str, object]:
    """Damages one of the run's own files other than its checkpoints: (what, kind, the
    metrics row lost or None). metrics.jsonl: one line inside the file (not the last: a torn
    last line is a kill's normal leftover) garbled; config.json: truncated or overwritten;
    the rest (summary, diagnoses, the monitor's JSON lines, TensorBoard's events): truncated or
    bytes changed."""
    kind = str(self.rng.choice(["metrics"] * 3 + ["config"] * 2 + ["other"] * 2))
    if kind == "metrics":
      path = os.path.join(wd, "metrics.jsonl")
      lines = open(path).readlines()
      k = int(self.rng.integers(0, len(lines) - 1))
      r = json.loads(lines[k])
      lines[k] = lines[k][:int(self.rng.integers(1, len(lines[k]) - 1))] + "\x00garbage\n"
      with open(path, "w") as f:
        f.writelines(lines)
      lost = None if str(r["split"]).startswith("final_") else (r["split"], r["step"])
      return f"metrics.jsonl line {k + 1}", kind, lost
    if kind == "config":
      path = os.path.join(wd, "config.json")
    else:
      candidates = [os.path.join(d, f) for d, _, fs in os.walk(wd) for f in fs
                    if "checkpoints" not in d and f not in ("metrics.jsonl", "config.json")
                    and not f.endswith((".png", ".html", ".svg"))]
      path = str(self.rng.choice(sorted(candidates)))
    data = bytearray(open(path, "rb").read())
    if self.rng.random() < 0.5 or len(data) < 2:
      os.truncate(path, int(self.rng.integers(0, max(1, len(data)))))
      return f"truncated {os.path.relpath(path, wd)}", kind, None
    for off in self.rng.choice(len(data), size=min(len(data), 16), replace=False):
      data[off] ^= int(self.rng.integers(1, 256))
    with open(path, "wb") as f:
      f.write(bytes(data))
    return f"16 bytes of {os.path.relpath(path, wd)}", kind, None

  def workdir_trial(self, name: str, i: int) -> None:
    """A finished run with one of its own files damaged, rerun: exit 0, no traceback, the
    parameters untouched, every metric row kept except a damaged one (with a .damaged copy)."""
    ref_wd, params, ref_rows, _ = self.reference(name)
    wd = os.path.join(self.out, f"workdir_{name}_{i}")
    shutil.rmtree(wd, ignore_errors=True)
    shutil.copytree(ref_wd, wd)
    what, kind, lost = self._damage_file(wd)
    self.counts["workdir_damage_trials"] += 1
    r = _run(CONFIGS[name], wd)
    trial = f"workdir {name} {i} ({what})"
    if r.returncode or "Traceback" in r.stderr:
      self.counts["wrong_exit_status"] += 1
      self.failures.append(f"{trial}: rerun exit {r.returncode}: {r.stderr[-800:]}")
      return
    want = sorted(x for x in ref_rows if x != lost) if lost else ref_rows
    problems = []
    if rows(wd) != want:
      problems.append("metric rows differ")
    if not _same(final_params(wd), params):
      problems.append("final parameters differ")
    if kind in ("metrics", "config") and not os.path.exists(
        os.path.join(wd, ("metrics.jsonl" if kind == "metrics" else "config.json") + ".damaged")):
      problems.append("no .damaged copy kept")
    if kind == "config" and json.load(open(os.path.join(wd, "config.json"))) != json.load(
        open(os.path.join(ref_wd, "config.json"))):
      problems.append("config.json is not the run's")
    self.failures += [f"{trial}: {p}" for p in problems]
    self.counts["workdir_damage_handled"] += not problems
    if not problems:
      shutil.rmtree(wd, ignore_errors=True)

  def corruption_trial(self, name: str, i: int) -> None:
    ref_wd, _, _, _ = self.reference(name)
    wd = os.path.join(self.out, f"corrupt_{name}_{i}")
    shutil.rmtree(wd, ignore_errors=True)
    shutil.copytree(ref_wd, wd)
    ckdir = os.path.join(wd, "checkpoints")
    newest = max(int(n) for n in os.listdir(ckdir) if n.isdigit())
    what = self._damage(os.path.join(ckdir, str(newest)))
    self.counts["corruption_trials"] += 1
    r = _run(CONFIGS[name], wd)
    with open(os.path.join(self.out, f"corrupt_{name}_{i}.stderr"), "w") as f:
      f.write(r.stderr)
    trial = f"corrupt {name} {i} ({what})"
    moved = os.path.isdir(os.path.join(ckdir, "damaged", str(newest)))
    self.counts["damage_detected"] += moved
    if f"Resuming from the checkpoint at step {newest} " in r.stderr or not moved:
      self.counts["silent_damaged_loads"] += 1
      self.failures.append(f"{trial}: the damaged step was not set aside")
    if r.returncode:
      self.counts["wrong_exit_status"] += 1
      self.failures.append(f"{trial}: rerun exit {r.returncode}: {r.stderr[-800:]}")
      return
    ok = self._check(name, wd, trial)
    self.counts["damaged_runs_finished_identical"] += ok
    if ok:
      shutil.rmtree(wd, ignore_errors=True)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--kills", type=int, default=50,
                  help="SIGKILLs to send (kill trials of 1-3 signals each, until that many)")
  ap.add_argument("--corruptions", type=int, default=50)
  ap.add_argument("--workdir_damage", type=int, default=20,
                  help="trials damaging one of a finished run's own files (not checkpoints)")
  ap.add_argument("--cnn_share", type=float, default=0.25,
                  help="fraction of the trials on the mnist5k CNN (the rest: digits_mlp)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="/tmp/jrecipe_soak")
  a = ap.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's read-only notes, per trial
  soak = Soak(a.out, a.seed)
  t0 = time.time()
  n = 0

  def trial(run, i):
    nonlocal n
    n += 1
    run("mnist5k_cnn" if soak.rng.random() < a.cnn_share else "digits_mlp", i)
    print(f"[trial {n}, {time.time() - t0:.0f} s] {json.dumps(soak.counts)}", flush=True)

  i = 0
  while soak.counts["kills"] < a.kills and i < 3 * a.kills:  # until that many SIGKILLs
    trial(soak.kill_trial, i)
    i += 1
  for i in range(a.corruptions):
    trial(soak.corruption_trial, i)
  for i in range(a.workdir_damage):
    trial(soak.workdir_trial, i)
  print(json.dumps({**soak.counts, "seconds": round(time.time() - t0),
                    "failures": soak.failures}, indent=1))
  return 1 if soak.failures else 0


if __name__ == "__main__":
  sys.exit(main())
