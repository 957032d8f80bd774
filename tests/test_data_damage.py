"""A damaged data file (flipped bytes, a truncated copy) is one paragraph naming the file and
exit 1, in memory and streamed, with nothing written into a new work directory and a run's
checkpoints untouched; once the file is restored, the same command resumes and finishes."""

import os
import shutil

import pytest

from jrecipe.data import damage, dataset, stream_synthetic
from jrecipe.train import loop
from tests.helpers import read_json, run_cli, tiny_config

TRAIN_FILE = "synthetic_images/damage/1.0.0/synthetic_images-train.array_record-00000-of-00001"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  name = stream_synthetic.prepare(d, config_name="damage", num_train=1200, num_test=300,
                                  shape=(8, 8, 1))
  return d, name


def _damaged_copy(src, dst, how):
  shutil.copytree(src, dst)
  path = os.path.join(dst, TRAIN_FILE)
  if how == "truncated":
    os.truncate(path, os.path.getsize(path) // 2)
  else:
    with open(path, "r+b") as f:
      data = bytearray(f.read())
      for off in (len(data) // 3, len(data) // 2):
        data[off] ^= 0xFF
      f.seek(0)
      f.write(bytes(data))
  return path


def _args(d, name, wd, pipeline, epochs=1):
  return ["--config=configs/digits_mlp.py", f"--workdir={wd}", f"--config.data.name=tfds:{name}",
          f"--config.data.data_dir={d}", f"--config.data.pipeline={pipeline}",
          f"--config.num_epochs={epochs}", "--config.progress=False"]


@pytest.mark.parametrize("pipeline, how", [("stream", "flipped"), ("memory", "truncated")])
def test_a_damaged_data_file_is_one_paragraph_naming_it_and_writes_nothing(prepared, tmp_path,
                                                                            pipeline, how):
  d, name = prepared
  bad = str(tmp_path / "bad")
  path = _damaged_copy(d, bad, how)
  wd = tmp_path / "run"
  p = run_cli(_args(bad, name, wd, pipeline))
  assert p.returncode == 1, p.stderr[-2000:]
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  [line] = [ln for ln in p.stderr.splitlines() if ln.startswith("jrecipe: error:")]
  assert path in line and "its bytes are damaged" in line and "Riegeli" in line, line
  assert not wd.exists()


def test_a_run_whose_data_is_damaged_keeps_its_checkpoint_and_resumes_once_restored(prepared,
                                                                                     tmp_path):
  d, name = prepared
  good = str(tmp_path / "data")
  shutil.copytree(d, good)
  wd = str(tmp_path / "run")
  cfg = tiny_config(**{"data.name": f"tfds:{name}", "data.data_dir": good,
                       "data.pipeline": "stream", "num_epochs": 1})
  loop.train_and_evaluate(cfg, wd)
  ckpts = sorted(os.listdir(os.path.join(wd, "checkpoints")))
  manifest = read_json(os.path.join(wd, "checkpoints", ckpts[-1], "jrecipe_manifest.json"))
  shutil.move(good, good + ".orig")
  _damaged_copy(good + ".orig", good, "flipped")
  cfg.num_epochs = 2  # leave it training: a resumable change
  dataset.clear_cache()  # as a new process would: no dataset read before
  with pytest.raises(damage.DataDamaged, match="its bytes are damaged"):
    loop.train_and_evaluate(cfg, wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ckpts
  assert read_json(os.path.join(wd, "checkpoints", ckpts[-1],
                                "jrecipe_manifest.json")) == manifest
  shutil.rmtree(good)
  shutil.move(good + ".orig", good)
  dataset.clear_cache()
  summary = loop.train_and_evaluate(cfg, wd)
  assert summary["test"]["count"] == 300
  steps = [int(c) for c in os.listdir(os.path.join(wd, "checkpoints")) if c.isdigit()]
  assert max(steps) == 2 * max(int(c) for c in ckpts if c.isdigit())  # resumed: epoch 2


def test_only_a_readers_report_of_damaged_bytes_counts_as_damage():
  assert damage.is_damage(RuntimeError("Corrupted Riegeli/records file: chunk header hash "
                                       "mismatch"))
  wrapped = ValueError("batch failed")
  wrapped.__cause__ = RuntimeError("riegeli: Failed to read RiegeliPostscript")
  assert damage.is_damage(wrapped)
  assert not damage.is_damage(RuntimeError("CUDA out of memory"))
  assert not damage.is_damage(KeyError("image"))
  with pytest.raises(KeyError):
    with damage.reading_records(files=["f"]):
      raise KeyError("image")
