"""--mode=search (recipe stage 5, 'Tune'): the space, sampling, stages, the edge-of-range
warning, requeueing, and the master with two real workers on one SQLite study, a worker killed
mid-trial and a master killed and resumed."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jrecipe.errors import UserError
from jrecipe.search import space as space_lib, study as study_lib
from tests.helpers import REPO, tiny_config

SPACE = "optimizer.learning_rate=loguniform(1e-4,1e-1); l2=loguniform(1e-6,1e-2); " \
        "model.dropout=uniform(0,0.5); batch_size=logint(16,256); model.hidden=choice((16,),(32,))"


def _config(**kw):
  c = tiny_config(**kw)
  return c


# --- the space -------------------------------------------------------------------------------


def test_parse_space_reads_every_kind():
  params = {p.field: p for p in space_lib.parse_space(SPACE, _config())}
  assert params["optimizer.learning_rate"].kind == "loguniform" and params[
      "optimizer.learning_rate"].log
  assert (params["l2"].low, params["l2"].high) == (1e-6, 1e-2)
  assert params["model.dropout"].kind == "uniform" and not params["model.dropout"].log
  assert params["batch_size"].distribution().log and params["batch_size"].kind == "logint"
  assert params["model.hidden"].choices == ((16,), (32,))
  assert params["model.hidden"].to_value("(32,)") == (32,)


@pytest.mark.parametrize("bad, words", [
    ("optimizer.learnin_rate=loguniform(1e-4,1e-1)", ["learnin_rate", "learning_rate"]),
    ("optimizer.learning_rate=logarithmic(1e-4,1e-1)", ["not understood", "Valid forms"]),
    ("optimizer.learning_rate=loguniform(0,1e-1)", ["low > 0"]),
    ("optimizer.learning_rate=loguniform(1e-1,1e-4)", ["low < high"]),
    ("optimizer.learning_rate=loguniform(1e-4)", ["two numbers"]),
    ("optimizer.learning_rate=uniform(a,b)", ["not Python literals"]),
    ("batch_size=loguniform(16,256)", ["batch_size", "int()"]),
    ("optimizer.name=uniform(0,1)", ["optimizer.name", "choice()"]),
    ("optimizer=uniform(0,1)", ["section"]),
    ("search.workers=int(1,4)", ["cannot search"]),
    ("l2=uniform(0,1); l2=uniform(0,2)", ["twice"]),
    ("batch_size=choice(32,'big')", ["'big'", "batch_size"]),
    ("", ["empty"]),
])
def test_bad_space_is_a_user_error_naming_the_entry(bad, words):
  with pytest.raises(UserError) as e:
    space_lib.parse_space(bad, _config())
  for w in words:
    assert w in str(e.value), str(e.value)


def test_stages():
  assert space_lib.parse_stages("30x0.5, 10x3,5X10") == [
      space_lib.Stage(30, 0.5), space_lib.Stage(10, 3.0), space_lib.Stage(5, 10.0)]
  for bad in ("", "0x1", "10x0", "ten x 1", "10x-1", "10"):
    with pytest.raises(UserError, match="TRIALSxEPOCHS|empty"):
      space_lib.parse_stages(bad)


def decade_counts(values, low_exp, high_exp):
  return np.histogram(np.log10(values), bins=np.arange(low_exp, high_exp + 1))[0]


def covers_decades_evenly(values, low_exp, high_exp) -> bool:
  """Chi-square test of equal counts per decade (p > 0.001)."""
  from scipy import stats
  counts = decade_counts(values, low_exp, high_exp)
  return stats.chisquare(counts).pvalue > 1e-3 and counts.sum() == len(values)


def test_loguniform_covers_its_decades_evenly():
  import optuna
  study_lib.quiet_optuna()
  dist = optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)
  study = optuna.create_study(sampler=study_lib.make_sampler("random", 0, 0))
  values = [study.ask({"lr": dist}).params["lr"] for _ in range(2000)]
  assert min(values) >= 1e-5 and max(values) <= 1e-1
  counts = decade_counts(values, -5, -1)
  assert covers_decades_evenly(values, -5, -1), counts
  assert counts.min() > 400  # each of the 4 decades gets about 500 of 2000
  # The check catches the classic mistake: uniform on a linear scale puts 90% in the top decade.
  linear = np.random.default_rng(0).uniform(1e-5, 1e-1, 2000)
  assert not covers_decades_evenly(linear, -5, -1)
  # Integers on a log scale (widths, batch sizes): as many in [16,64) as in [64,256].
  rng = np.random.default_rng(1)
  ints = [study_lib.sample_value(rng, optuna.distributions.IntDistribution(16, 256, log=True))
          for _ in range(2000)]
  low = sum(v < 64 for v in ints)
  assert abs(low - 1000) < 120, low
  # TPE's random start-up and the number-seeded sampler: the same trial number, the same point.
  again = optuna.create_study(sampler=study_lib.make_sampler("random", 0, 0))
  assert [again.ask({"lr": dist}).params["lr"] for _ in range(5)] == values[:5]


def test_narrow_shrinks_around_the_best_trials():
  params = space_lib.parse_space(SPACE, _config())
  top = [{"optimizer.learning_rate": 1e-3, "l2": 1e-5, "model.dropout": 0.1, "batch_size": 32,
          "model.hidden": (32,)},
         {"optimizer.learning_rate": 3e-3, "l2": 3e-5, "model.dropout": 0.2, "batch_size": 64,
          "model.hidden": (32,)}]
  new = {p.field: p for p in space_lib.narrow(params, top)}
  old = {p.field: p for p in params}
  for f in ("optimizer.learning_rate", "l2", "model.dropout", "batch_size"):
    assert old[f].low <= new[f].low <= min(t[f] for t in top)
    assert max(t[f] for t in top) <= new[f].high <= old[f].high
    assert new[f].high - new[f].low < old[f].high - old[f].low
    assert new[f].kind == old[f].kind
  lr = new["optimizer.learning_rate"]
  assert 1e-4 < lr.low < 1e-3 < 3e-3 < lr.high < 1e-1  # padded in log units
  assert isinstance(new["batch_size"].low, int)
  assert new["model.hidden"].choices == ((32,),)
  assert space_lib.narrow(params, []) == params  # every trial diverged: ranges unchanged


def test_edge_of_range_warning():
  params = space_lib.parse_space("optimizer.learning_rate=loguniform(1e-4,1e-1); "
                                 "model.dropout=uniform(0,0.5)", _config())
  w = space_lib.edge_warnings(params, {"optimizer.learning_rate": 0.09, "model.dropout": 0.2})
  assert len(w) == 1 and "upper edge" in w[0] and "missing better settings" in w[0]
  assert "optimizer.learning_rate" in w[0]
  w = space_lib.edge_warnings(params, {"optimizer.learning_rate": 3e-3, "model.dropout": 0.01})
  assert len(w) == 1 and "model.dropout" in w[0] and "lower edge" in w[0]
  # Clean: 1e-3 is a third of the way up on the log scale (though 1% of it on a linear one).
  assert space_lib.edge_warnings(params, {"optimizer.learning_rate": 1e-3,
                                          "model.dropout": 0.25}) == []


def _fake_search(tmp_path, space, stages="4x1", **kw):
  c = _config()
  c.search.space = space
  c.search.stages = stages
  for k, v in kw.items():
    c.search[k] = v
  return study_lib.Search(c, str(tmp_path / "search"))


def _tell(search, k, value_of):
  """Finishes trials of stage k without training: value_of(config values) -> value."""
  import optuna
  st = search.study(k)
  params = search.stage_params(k)
  for _ in range(search.stages[k].trials):
    t = st.ask({p.field: p.distribution() for p in params})
    v = value_of(search.config_values(t.params, params))
    if v is None:
      t.set_user_attr("status", "diverged")
      st.tell(t, state=optuna.trial.TrialState.PRUNED)
    else:
      st.tell(t, v)


def test_summary_warns_in_search_json_and_plots(tmp_path):
  from jrecipe.search import summary
  # Accuracy grows with the learning rate: the best trial sits at the top of the range.
  s = _fake_search(tmp_path, "optimizer.learning_rate=loguniform(1e-4,1e-1); "
                   "model.hidden=choice((16,),(32,))", stages="12x1,4x2")
  _tell(s, 0, lambda v: None if v["optimizer.learning_rate"] < 2e-4 else
        0.5 + 0.05 * math.log10(v["optimizer.learning_rate"]))
  assert s.current().index == 1
  narrowed = s.stage_params(1)[0]
  best_lr = s.config_values(s.top_trials(0)[0].params, s.params)["optimizer.learning_rate"]
  assert 1e-4 < narrowed.low < best_lr < narrowed.high <= 1e-1
  _tell(s, 1, lambda v: 0.5 + 0.05 * math.log10(v["optimizer.learning_rate"]))
  assert s.current() is None
  out = summary.summarize(s)
  data = json.loads((tmp_path / "search" / "search.json").read_text())
  assert data["warnings"] == out["warnings"]
  assert len(data["warnings"]) == 1 and "upper edge" in data["warnings"][0]
  assert data["best"]["stage"] == 2 and data["counts"]["complete"] >= 12
  assert data["stages"][1]["space"][0]["low"] > 1e-4
  rows = (tmp_path / "search" / "search.csv").read_text().splitlines()
  assert rows[0].startswith("stage,trial,status,value,optimizer.learning_rate")
  values = [float(r.split(",")[3]) for r in rows[1:] if r.split(",")[2] == "complete"]
  assert values == sorted(values, reverse=True)  # sortable table, best first
  for f in ("optimizer.learning_rate.png", "model.hidden.png"):
    assert (tmp_path / "search" / "search" / f).stat().st_size > 1000

  # Clean: the optimum in the middle of the range gives no warning.
  s2 = _fake_search(tmp_path / "b", "optimizer.learning_rate=loguniform(1e-4,1e-1)", "12x1")
  _tell(s2, 0, lambda v: 1 - abs(math.log10(v["optimizer.learning_rate"]) + 2.5))
  assert summary.summarize(s2)["warnings"] == []


def test_killed_trial_is_requeued_with_the_same_params(tmp_path):
  s = _fake_search(tmp_path, "optimizer.learning_rate=loguniform(1e-4,1e-1)", "3x1",
                   max_retries=1)
  st = s.study(0)
  dists = {p.field: p.distribution() for p in s.stage_params(0)}
  t = st.ask(dists)
  assert s.status(0).running == 1
  retry = study_lib.fail_and_requeue(st, t.number, "worker killed")
  status = s.status(0)
  assert (status.done, status.running, status.waiting) == (0, 0, 1) and status.can_ask
  t2 = st.ask(dists)
  assert t2.number == retry and t2.params == t.params
  assert st.trials[t.number].user_attrs["status"] == "killed"
  # Retries are bounded: the second death of the same point is not requeued again.
  assert study_lib.fail_and_requeue(st, t2.number, "killed again") is None
  assert s.status(0).waiting == 0
  # A finished trial cannot be failed by a late master: nothing changes.
  t3 = st.ask(dists)
  st.tell(t3, 0.5)
  assert study_lib.fail_and_requeue(st, t3.number, "late") is None
  assert study_lib.trial_status(st.trials[t3.number]) == "complete"


def test_tpe_sampler_runs_a_staged_study(tmp_path):
  import optuna
  s = _fake_search(tmp_path, "optimizer.learning_rate=loguniform(1e-4,1e-1); "
                   "model.hidden=choice((16,),(32,))", stages="12x1,3x1", sampler="tpe")
  assert isinstance(s.study(0).sampler, optuna.samplers.TPESampler)
  _tell(s, 0, lambda v: -abs(math.log10(v["optimizer.learning_rate"]) + 2.5))
  _tell(s, 1, lambda v: -abs(math.log10(v["optimizer.learning_rate"]) + 2.5))
  assert s.current() is None and len(s.top_trials(1)) == 3


def test_master_refuses_a_bad_space_before_writing_anything(tmp_path):
  from jrecipe.search import mode
  c = _config()
  c.search.space = "optimizer.learning_rate=loguniform(0,1)"
  with pytest.raises(UserError, match="low > 0"):
    mode.run_mode(c, str(tmp_path / "search"))
  c.search.space = "optimizer.learning_rate=loguniform(1e-4,1)"
  c.search.workers = 0
  with pytest.raises(UserError, match="search.workers"):
    mode.run_mode(c, str(tmp_path / "search2"))
  assert not (tmp_path / "search").exists() and not (tmp_path / "search2").exists()


def test_bad_storage_and_sampler_are_user_errors(tmp_path):
  with pytest.raises(UserError, match="not a usable database URL"):
    _fake_search(tmp_path, "l2=uniform(0,1)", storage="nosuchdb://x")
  with pytest.raises(UserError, match="sampler"):
    _fake_search(tmp_path, "l2=uniform(0,1)", sampler="grid")


@pytest.mark.parametrize("how", ["truncated", "overwritten", "flipped"])
def test_a_damaged_study_database_is_one_paragraph_and_left_as_it_was(tmp_path, how):
  """SQLite keeps no checksums: a truncated or overwritten study.db made Optuna's first query
  a traceback, and flipped bytes in its pages' structure were read and written to with exit 0
  (measured); each is now a RunFailure naming the file, found by SQLite's own quick_check. A
  byte flipped inside a stored value is not structural and stays undetectable (no checksums)."""
  import optuna
  from jrecipe.errors import RunFailure
  from jrecipe.search import study as study_lib
  db = tmp_path / "study.db"
  url = f"sqlite:///{db}"
  st = optuna.create_study(storage=study_lib.open_storage(url), study_name="s")
  for i in range(40):
    st.add_trial(optuna.trial.create_trial(params={"x": float(i)}, value=float(i),
                                           distributions={"x": optuna.distributions.
                                                          FloatDistribution(0, 100)}))
  data = bytearray(db.read_bytes())
  if how == "truncated":
    data = data[:4096]
  elif how == "overwritten":
    data = bytearray(np.random.default_rng(0).integers(0, 256, len(data), np.uint8).tobytes())
  else:
    for off in range(4096, len(data), 4096):  # each later page's b-tree type byte
      data[off] ^= 0xFF
  db.write_bytes(bytes(data))
  with pytest.raises(RunFailure, match=r"study.db is damaged .*--new_study"):
    study_lib.open_storage(url)
  assert db.read_bytes() == bytes(data)


# --- the master and its workers (real processes, one SQLite study) ------------------------

MASTER_ARGS = [
    "--config=configs/digits_mlp.py", "--config.model.hidden=(16,)", "--config.batch_size=64",
    "--config.search.space=optimizer.learning_rate=loguniform(1e-3,3e-2); "
    "model.hidden=choice((16,),(32,))",
    "--config.search.workers=2", "--config.search.heartbeat_seconds=1",
    "--config.checkpoint.every_epochs=1"]


def _master(workdir, stages, extra=()):
  return [sys.executable, "-m", "jrecipe", "--mode=search", f"--workdir={workdir}",
          *MASTER_ARGS, f"--config.search.stages={stages}", *extra]


def _trials(url, name, k):
  """The trials of stage k of the study of the search directory `name` (its study.json)."""
  import optuna
  study_lib.quiet_optuna()
  if url.startswith("sqlite:///") and not os.path.exists(url[len("sqlite:///"):]):
    return []
  binding = os.path.join(os.path.dirname(url[len("sqlite:///"):]), "study.json")
  if not os.path.exists(binding):
    return []
  with open(binding) as f:
    name = json.load(f)["study"]
  try:
    storage = study_lib.open_storage(url)  # retries a first contact racing the master's
    return optuna.load_study(study_name=f"{name}.stage{k}", storage=storage).get_trials()
  except KeyError:  # the stage's study does not exist yet
    return []


def _epochs_logged(path):
  """The last epoch in a trial's metrics.jsonl while it trains; None before training or after it."""
  try:
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.endswith("\n")]
  except OSError:
    return None
  if not rows or any(r.get("split", "").startswith("final") for r in rows):
    return None
  return max(float(r.get("epoch", 0)) for r in rows)


def _wait(cond, timeout, what, proc=None):
  t0 = time.time()
  while time.time() - t0 < timeout:
    v = cond()  # before the liveness check: a condition met just before the master exited counts
    if v:
      return v
    assert proc is None or proc.poll() is None, f"the master exited ({proc.returncode})"
    time.sleep(0.3)
  raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_master_workers_kill_and_resume(tmp_path):
  d = tmp_path / "srch"
  url = f"sqlite:///{d}/study.db"
  # stage-1 trials long enough (a few seconds each on an idle CI machine, where 10 epochs took
  # 1-2 s and the master finished its search before the test saw the requeue), and enough of
  # them, to be caught running
  stages = "8x30,2x0.5"
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  log = open(tmp_path / "master1.log", "w")
  master = subprocess.Popen(_master(d, stages), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
  try:
    # 1. A worker killed mid-trial (training has started: its metrics.jsonl exists).
    def running_with_metrics():
      done = [t for t in _trials(url, "srch", 1) if t.state.name == "COMPLETE"]
      for t in _trials(url, "srch", 1):
        if t.state.name == "RUNNING" and done and "dir" in t.user_attrs:
          # read after the snapshot: training has started and has most of its 30 epochs to go
          epochs = _epochs_logged(os.path.join(t.user_attrs["dir"], "metrics.jsonl"))
          if epochs is not None and epochs < 15:
            return t
      return None
    # The snapshot that names the victim is a database read old (a second or more on a loaded
    # machine): its trial may have completed before the kill lands, and the worker dies between
    # trials with nothing to requeue. Such a missed kill is retried on another running trial.
    for _ in range(4):
      victim = _wait(running_with_metrics, 150, "a running trial after a complete one", master)
      os.kill(int(victim.user_attrs["worker"].split(":")[1]), signal.SIGKILL)

      def requeued():
        ts = _trials(url, "srch", 1)
        if ts[victim.number].state.name == "COMPLETE":
          return ("missed",)
        retry = [t for t in ts if t.user_attrs.get("retry_of") == victim.number]
        return retry and ts[victim.number].state.name == "FAIL" and ("requeued", retry[0])
      outcome = _wait(requeued, 60, "the killed trial to be failed and requeued", master)
      if outcome[0] == "requeued":
        retry = outcome[1]
        break
    else:
      raise AssertionError("four kills in a row landed after their trial had completed")

    # 2. The master killed (its workers finish their trial, see it gone, and stop).
    done_before = {t.number: t.datetime_complete for t in _trials(url, "srch", 1)
                   if t.state.name == "COMPLETE"}
    master.kill()
    master.wait()
    time.sleep(0.5)
  finally:
    if master.poll() is None:
      master.kill()
    log.close()
  # The workers of the dead master stop after their current trial.
  _wait(lambda: not [t for t in _trials(url, "srch", 1) + _trials(url, "srch", 2)
                     if t.state.name == "RUNNING"], 90, "the orphaned workers' trials")

  # 3. Resume: the same command finishes the study.
  r = subprocess.run(_master(d, stages), cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  s1, s2 = _trials(url, "srch", 1), _trials(url, "srch", 2)
  for ts, budget in ((s1, 8), (s2, 2)):
    done = [t for t in ts if study_lib.trial_status(t) in study_lib.DONE_STATUSES]
    assert len(done) == budget, [(t.number, study_lib.trial_status(t)) for t in ts]
    assert not [t for t in ts if t.state.name in ("RUNNING", "WAITING")]
  # Nothing finished was lost or repeated.
  for n, end in done_before.items():
    assert s1[n].state.name == "COMPLETE" and s1[n].datetime_complete == end
  complete = [t for t in s1 if t.state.name == "COMPLETE"]
  points = [tuple(sorted(t.params.items())) for t in complete]
  assert len(set(points)) == len(points)
  assert s1[victim.number].user_attrs["status"] == "killed"
  # The killed point completes: its retry, or, when the retry itself lost its worker or its
  # heartbeat around the master's kill (FAIL, requeued: jrecipe.search.study), a retry of it.
  last = s1[retry.number]
  while last.state.name != "COMPLETE":
    nxt = [t for t in s1 if t.user_attrs.get("retry_of") == last.number]
    assert last.state.name == "FAIL" and nxt, (last.number, last.state.name, last.user_attrs)
    last = nxt[0]
  assert last.params == victim.params
  # Two workers ran concurrently on the one SQLite study: their active periods (first trial's
  # start to last trial's end, the killed trial included) overlap. (Completed trials of two
  # workers need not overlap: a replacement worker's start-up can outlast a short trial.)
  periods: dict = {}
  for t in s1 + s2:
    if not (t.datetime_start and t.datetime_complete and "worker" in t.user_attrs):
      continue
    a, b = periods.get(t.user_attrs["worker"], (t.datetime_start, t.datetime_complete))
    periods[t.user_attrs["worker"]] = (min(a, t.datetime_start), max(b, t.datetime_complete))
  spans = sorted(periods.values())
  assert len(spans) >= 2 and any(b[0] < a[1] for a, b in zip(spans, spans[1:])), periods
  # Trial directories: the metric in the name, `ls` sorts them; the killed one is marked.
  names = sorted(os.listdir(d / "trials"))
  for t in complete:
    name = f"{t.value:.4f}_stage1_trial{t.number:04d}"
    assert name in names
    assert (d / "trials" / name / "summary.json").exists()
    assert (d / "trials" / name / "checkpoints").is_dir()
  assert f"killed_stage1_trial{victim.number:04d}" in names
  # Stage 2 searched inside the stage-1 ranges, narrowed around its best trials.
  data = json.loads((d / "search.json").read_text())
  lr1, lr2 = data["stages"][0]["space"][0], data["stages"][1]["space"][0]
  assert lr1["low"] <= lr2["low"] < lr2["high"] <= lr1["high"]
  assert (lr2["low"], lr2["high"]) != (lr1["low"], lr1["high"])
  assert [e["requeued_as"] for e in data["events"] if e["trial"] == victim.number] == [
      retry.number]
  assert (d / "search.csv").exists() and (d / "search" / "optimizer.learning_rate.png").exists()
  # The ensemble reads the search directory (source=search) as before.
  from jrecipe.ensemble import members
  ranked = members.rank_trials(str(d))
  assert len(ranked) == 10 and ranked[0][1] == max(t.value for t in complete + [
      t for t in s2 if t.state.name == "COMPLETE"])


def test_watcher_flags_an_exploding_loss(tmp_path):
  from jrecipe.search.worker import _Watcher, trial_dir_name

  def watch(train_losses):
    d = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    lines = [{"step": 0, "split": "validation", "loss": 2.3}]
    lines += [{"step": 5 * (i + 1), "split": "train", "loss": v}
              for i, v in enumerate(train_losses)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    w = _Watcher(storage=None, trial_id=0, trial_dir=str(d), explode_factor=3.0, heartbeat=1e9,
                 can_signal=False)
    w._check_explosion()
    return w.exploded
  assert watch([2.0, 1.5, 0.9]) is None  # clean: a falling loss
  assert watch([2.0, 2.5, 6.8]) is None  # up, but below 3 x 2.3
  msg = watch([2.0, 7.5, 40.0])  # planted: 7.5 > 6.9
  assert msg and "step 10" in msg and "3 x the loss at init" in msg
  assert trial_dir_name("complete", 0, 7, 0.98148) == "0.9815_stage1_trial0007"
  assert trial_dir_name("diverged", 1, 12) == "diverged_stage2_trial0012"


@pytest.mark.slow
def test_a_diverging_trial_is_recorded_as_diverged(tmp_path):
  """A worker in this process: a learning rate far too high diverges; recorded, not counted
  as a result, and its directory says so."""
  from jrecipe.search.worker import Worker
  c = _config(num_epochs=1)
  c.search.space = "optimizer.learning_rate=loguniform(1e3,1e4)"
  c.search.stages = "1x1"
  w = Worker(c, str(tmp_path / "search"))
  assert w.run() == 1
  t = w.search.study(0).trials[0]
  assert t.state.name == "PRUNED" and t.user_attrs["status"] == "diverged", t.user_attrs
  assert os.listdir(tmp_path / "search" / "trials") == ["diverged_stage1_trial0000"]
  assert w.search.current() is None  # a diverged trial counts towards the stage's budget


@pytest.mark.parametrize("on_disk", ["running", "scored"])
def test_a_worker_killed_while_recording_its_result_leaves_a_killed_directory(tmp_path,
                                                                              on_disk):
  """A worker killed after naming its trial's result (user attr 'dir' = the scored name,
  status 'complete') but before telling Optuna: the master fails and requeues the trial, and its
  directory, scored or still 'running_', becomes 'killed_...' (a scored name would claim a
  result the study does not hold)."""
  import socket
  from jrecipe.search.mode import Master
  c = _config()
  c.search.space = "optimizer.learning_rate=loguniform(1e-4,1e-1)"
  c.search.stages = "2x1"
  c.search.workers = 1
  master = Master(c, str(tmp_path / "search"))
  study = master.search.study(0)
  trial = study.ask()
  trials = tmp_path / "search" / "trials"
  scored = trials / f"0.7148_stage1_trial{trial.number:04d}"
  running = trials / f"running_stage1_trial{trial.number:04d}"
  (scored if on_disk == "scored" else running).mkdir(parents=True)
  pid = 4_000_000  # no such process: only the study's record names it
  for key, value in (("worker", f"{socket.gethostname()}:{pid}"), ("stage", 1),
                     ("dir", str(scored)), ("status", "complete")):
    trial.set_user_attr(key, value)
  master._requeue_worker(pid, "worker killed")
  assert sorted(os.listdir(trials)) == [f"killed_stage1_trial{trial.number:04d}"]
  now = study.get_trials()
  assert now[trial.number].state.name == "FAIL"
  assert now[trial.number].user_attrs["status"] == "killed"
  assert [t.user_attrs.get("retry_of") for t in now if t.state.name == "WAITING"] == [
      trial.number]


# --- issue 22: a study bound to its space, paths on disk, honest edges and best -------------


def test_a_changed_space_is_refused_and_a_new_study_starts_clean(tmp_path):
  """A rerun with another range resumes nothing: UserError (exit 2) naming each difference,
  search_config.json untouched; the explicit new-study request moves the old study aside."""
  from jrecipe.search import mode
  d = tmp_path / "search"
  c = _config()
  c.search.space = "optimizer.learning_rate=loguniform(1e-4,1e-1)"
  c.search.stages = "3x1"
  master = mode.Master(c, str(d))
  _tell(master.search, 0, lambda v: 0.5)
  old_name = master.search.name
  (d / "trials" / "0.5000_stage1_trial0000").mkdir(parents=True)
  saved = (d / "search_config.json").read_bytes()
  binding = json.loads((d / "study.json").read_text())
  assert binding["study"] == old_name and binding["fingerprint"]["seed"] == c.seed
  assert master.search.study(0).user_attrs["fingerprint"] == binding["fingerprint"]

  c2 = _config()
  c2.search.space = "optimizer.learning_rate=loguniform(1e-3,3e-2)"
  c2.search.stages = "3x1,2x2"
  with pytest.raises(UserError) as e:
    mode.Master(c2, str(d))
  msg = str(e.value)
  assert "optimizer.learning_rate=loguniform(0.0001, 0.1)" in msg  # old
  assert "optimizer.learning_rate=loguniform(0.001, 0.03)" in msg  # new
  assert "stages" in msg and "--new_study" in msg
  assert (d / "search_config.json").read_bytes() == saved  # a refused rerun writes nothing
  from tests.helpers import run_cli
  r = run_cli(["--mode=search", "--config=configs/digits_mlp.py", f"--workdir={d}",
               "--config.search.space=optimizer.learning_rate=loguniform(1e-3,3e-2)",
               "--config.search.stages=3x1"])
  assert r.returncode == 2 and "--new_study" in r.stderr and "loguniform(0.001, 0.03)" in \
      r.stderr, r.stderr[-2000:]
  assert (d / "search_config.json").read_bytes() == saved
  # The same config resumes its own study.
  assert mode.Master(c, str(d)).search.status(0).done == 3

  fresh = mode.Master(c2, str(d), new_study=True)
  assert fresh.search.name != old_name and fresh.search.status(0).done == 0
  assert not (d / "trials").exists() or not os.listdir(d / "trials")
  moved = d / "old_studies" / old_name
  assert (moved / "trials" / "0.5000_stage1_trial0000").is_dir()
  assert (moved / "study.json").exists() and (moved / "search_config.json").exists()
  assert json.loads((d / "study.json").read_text())["fingerprint"]["stages"] == [
      [3, 1.0], [2, 2.0]]


def test_a_renamed_search_directory_resumes_its_own_study(tmp_path):
  c = _config()
  c.search.space = "optimizer.learning_rate=loguniform(1e-4,1e-1)"
  c.search.stages = "2x1"
  s = study_lib.Search(c, str(tmp_path / "a"))
  _tell(s, 0, lambda v: 0.5)
  name = s.name
  os.rename(tmp_path / "a", tmp_path / "b")
  again = study_lib.Search(c, str(tmp_path / "b"))
  assert again.name == name and again.current() is None  # nothing to rerun
  assert name not in ("a", "b")  # not the directory's name


def test_a_killed_trial_is_recorded_at_its_path_on_disk(tmp_path):
  import socket
  from jrecipe.search import summary
  from jrecipe.search.mode import Master
  c = _config()
  c.search.space = "optimizer.learning_rate=loguniform(1e-4,1e-1)"
  c.search.stages = "2x1"
  master = Master(c, str(tmp_path / "search"))
  trial = master.search.study(0).ask()
  running = tmp_path / "search" / "trials" / f"running_stage1_trial{trial.number:04d}"
  running.mkdir(parents=True)
  pid = 4_000_001
  for key, value in (("worker", f"{socket.gethostname()}:{pid}"), ("stage", 1),
                     ("dir", str(running))):
    trial.set_user_attr(key, value)
  master._requeue_worker(pid, "worker killed")
  rows = {r["number"]: r for r in summary.trial_rows(master.search)}
  killed = tmp_path / "search" / "trials" / f"killed_stage1_trial{trial.number:04d}"
  assert rows[trial.number]["status"] == "killed"
  assert rows[trial.number]["dir"] == str(killed) and killed.is_dir()
  out = summary.summarize(master.search)
  assert [t["dir"] for t in out["trials"] if t["number"] == trial.number] == [str(killed)]
  csv_text = (tmp_path / "search" / "search.csv").read_text()
  assert killed.name in csv_text and "running_" not in csv_text


def test_edges_of_every_stage_and_the_best_at_equal_budget(tmp_path):
  """Stage 1 (short, noisy) points at 3e-4; stage 2 (the same budget) wants larger rates
  than its narrowed range allows. The warning must see stage 2's edge, and the best trial
  is the better stage-1 one, reported with its stage and budget."""
  from jrecipe.search import summary
  s = _fake_search(tmp_path, "optimizer.learning_rate=loguniform(1e-5,1e-1)", "12x1,20x1")
  _tell(s, 0, lambda v: 0.9 - 0.1 * abs(math.log10(v["optimizer.learning_rate"]) + 3.5))
  narrowed = s.stage_params(1)[0]
  assert 1e-5 < narrowed.low and narrowed.high < 2e-2  # inside: no edge of the original
  _tell(s, 1, lambda v: 0.5 + 0.01 * math.log10(v["optimizer.learning_rate"]))
  out = summary.summarize(s)
  best = out["best"]
  assert best["stage"] == 1 and best["value"] > 0.85 and best["epochs"] == 1.0
  assert out["best_budget_epochs"] == 1.0
  stage2 = [w for w in out["warnings"] if "stage 2" in w]
  assert len(stage2) == 1 and "upper edge" in stage2[0] and "optimizer.learning_rate" in stage2[0]
  assert not [w for w in out["warnings"] if "every stage" in w]

  # Every stage's best at its upper edge: the narrowing chased the optimum to the border.
  s2 = _fake_search(tmp_path / "b", "optimizer.learning_rate=loguniform(1e-5,1e-1)", "12x1,20x2")
  _tell(s2, 0, lambda v: 0.5 + 0.05 * math.log10(v["optimizer.learning_rate"]))
  _tell(s2, 1, lambda v: 0.6 + 0.05 * math.log10(v["optimizer.learning_rate"]))
  out2 = summary.summarize(s2)
  assert out2["best"]["stage"] == 2 and out2["best_budget_epochs"] == 2.0
  every = [w for w in out2["warnings"] if "every stage" in w]
  assert len(every) == 1 and "upper edge" in every[0]


def test_search_mode_passes_the_new_study_option(tmp_path, monkeypatch):
  from jrecipe import modes
  from jrecipe.search import mode
  seen = {}

  class Stop(Exception):
    pass

  def fake_master(config, workdir, new_study=False):
    seen["new_study"] = new_study
    raise Stop()
  monkeypatch.setattr(mode, "Master", fake_master)
  with pytest.raises(Stop):
    mode.run_mode(_config(), str(tmp_path), modes.ModeOptions(new_study=True))
  assert seen == {"new_study": True}
