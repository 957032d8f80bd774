"""The streaming pipeline on a dataset larger than the memory it may use.

    python bench/stream_memory.py [--gb=4.2] [--steps=300] [--tmp_root=/tmp]

1. Generates a seeded image dataset of at least --gb GB (28x28x1 uint8 images, mnist5k's
   shape) as ArrayRecord through a real TFDS builder (`jrecipe.data.stream_synthetic`), in a
   temporary directory, in a process of its own (which, without TensorFlow, holds the split
   in memory while TFDS writes it: see `_generate`).
2. In another process (whose peak RSS is the figure), builds the mnist5k CNN config on it with
   data.pipeline='stream' and measures, one after the other:
     - the input pipeline alone: examples/s of this process's batches, nothing stepping;
     - the training step alone: examples/s of the compiled step on one batch already on the
       device (the same batch every step);
     - training through the pipeline for --steps steps (`Trainer.run`, as every mode runs
       it), and the fraction of that wall time spent waiting for the next batch.
3. Prints the dataset's size on disk and every figure, deletes the directory, and ends with
   the line `dataset_mb=<int> peak_rss_mb=<int> input_bound_fraction=<float>`.

Targets (docs/streaming.md): peak RSS at most a quarter of the size on disk, input-bound
fraction at most 5%, the pipeline alone at least 3x faster than the step.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

flags.DEFINE_float("gb", 4.2, "Size of the generated dataset on disk, in GB (10^9 bytes).")
flags.DEFINE_integer("steps", 300, "Training steps timed through the streaming pipeline.")
flags.DEFINE_integer("batches", 300, "Batches timed for the pipeline alone and the step alone.")
flags.DEFINE_string("tmp_root", tempfile.gettempdir(), "Where the temporary dataset goes.")
flags.DEFINE_string("child", "", "Internal: 'generate' or 'train'.")
flags.DEFINE_string("data_dir", "", "Internal: the dataset directory.")
flags.DEFINE_integer("num_train", 0, "Internal: training examples to generate.")
FLAGS = flags.FLAGS

CONFIG = "bench"
SHAPE = (28, 28, 1)
RECORD_BYTES = 28 * 28 + 30  # an image's bytes plus the tf.train.Example framing (measured)


def _generate():
  # TFDS's writer buffers a split's serialized records in memory up to 1 GB and then spills
  # them to disk through tf.io.gfile, which needs TensorFlow (not installed: shared/STACK.md).
  # This process (not the one measured) holds the whole split instead: about 1.5x its size.
  from tensorflow_datasets.core import shuffle
  shuffle.MAX_MEM_BUFFER_SIZE = 1 << 40
  from jrecipe.data import stream_synthetic
  stream_synthetic.prepare(FLAGS.data_dir, config_name=CONFIG, num_train=FLAGS.num_train,
                           num_validation=2000, num_test=2000, shape=SHAPE)


class _Timed:
  """Wraps a batch iterator: the seconds spent waiting in `next`."""

  def __init__(self, it):
    self.it, self.wait = it, 0.0

  def __iter__(self):
    return self

  def __next__(self):
    t = time.perf_counter()
    b = next(self.it)
    self.wait += time.perf_counter() - t
    return b


def _train():
  import resource

  import jax
  from bench.runners import load_config
  from jrecipe import experiment
  from jrecipe.train.trainer import Trainer
  cfg = load_config("mnist5k_cnn")
  cfg.data.name = f"tfds:synthetic_images/{CONFIG}"
  cfg.data.data_dir = FLAGS.data_dir
  cfg.data.pipeline = "stream"
  cfg.num_epochs = 0.1
  t0 = time.perf_counter()
  exp = experiment.build(cfg)
  open_s = time.perf_counter() - t0
  trainer = Trainer.from_experiment(exp)
  bs, n = cfg.batch_size, FLAGS.batches
  it = trainer.batches(0)
  for _ in range(10):
    next(it)
  t = time.perf_counter()
  for _ in range(n):
    next(it)
  pipeline_eps = n * bs / (time.perf_counter() - t)
  state = trainer.to_device(trainer.initial_state())
  batch = trainer.placement.put_batch(next(it))
  step = trainer.step
  for _ in range(5):  # compile and warm up
    state, m = step(state, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(n):
    state, m = step(state, batch)
  jax.block_until_ready((state, m))
  step_eps = n * bs / (time.perf_counter() - t)
  del it
  timed = _Timed(trainer.batches(10))
  state = trainer.run(state, start_step=10, num_steps=10, batches=timed).state  # warm up
  timed.wait = 0.0
  t = time.perf_counter()
  loop = trainer.run(state, start_step=20, num_steps=FLAGS.steps, batches=timed)
  jax.block_until_ready(loop.state)
  wall = time.perf_counter() - t
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
  print(json.dumps({"open_seconds": open_s, "train_examples": exp.spec.splits["train"],
                    "pipeline_examples_per_s": pipeline_eps, "step_examples_per_s": step_eps,
                    "train_examples_per_s": FLAGS.steps * bs / wall,
                    "input_bound_fraction": timed.wait / wall, "peak_rss_mb": peak,
                    "devices": trainer.placement.global_devices}))


def _child(kind, data_dir, **extra):
  args = [sys.executable, os.path.abspath(__file__), f"--child={kind}", f"--data_dir={data_dir}",
          *[f"--{k}={v}" for k, v in extra.items()]]
  t = time.perf_counter()
  r = subprocess.run(args, capture_output=True, text=True)
  if r.returncode:
    raise SystemExit(f"the {kind} process failed:\n{r.stderr[-4000:]}")
  return r.stdout, time.perf_counter() - t


def _disk_bytes(root):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def main(argv):
  del argv
  if FLAGS.child == "generate":
    return _generate()
  if FLAGS.child == "train":
    return _train()
  tmp = tempfile.mkdtemp(prefix="jrecipe_stream_bench_", dir=FLAGS.tmp_root)
  try:
    num_train = int(FLAGS.gb * 1e9 / RECORD_BYTES)
    _, gen_s = _child("generate", tmp, num_train=num_train)
    size = _disk_bytes(tmp)
    print(f"dataset: {num_train:,} training images 28x28x1 (+2,000 validation, 2,000 test) as "
          f"ArrayRecord through a TFDS builder, {size / 2**20:,.0f} MB on disk, generated in "
          f"{gen_s:.0f} s")
    out, train_s = _child("train", tmp, steps=FLAGS.steps, batches=FLAGS.batches)
    r = json.loads(out.strip().splitlines()[-1])
    print(f"training process ({r['devices']} device(s), mnist5k CNN, batch 128): opened the "
          f"streamed dataset in {r['open_seconds']:.1f} s (one bounded pass: labels, "
          f"statistics), {train_s:.0f} s in all")
    print(f"input pipeline alone:   {r['pipeline_examples_per_s']:,.0f} examples/s")
    print(f"training step alone:    {r['step_examples_per_s']:,.0f} examples/s "
          f"(pipeline/step = {r['pipeline_examples_per_s'] / r['step_examples_per_s']:.1f}x)")
    print(f"training, streamed:     {r['train_examples_per_s']:,.0f} examples/s over "
          f"{FLAGS.steps} steps, {r['input_bound_fraction']:.2%} of the time waiting for input")
    print(f"peak RSS of the training process: {r['peak_rss_mb']:,.0f} MB "
          f"({r['peak_rss_mb'] * 2**20 / size:.1%} of the dataset's size on disk)")
    print(f"dataset_mb={size / 2**20:.0f} peak_rss_mb={r['peak_rss_mb']:.0f} "
          f"input_bound_fraction={r['input_bound_fraction']:.4f}")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
