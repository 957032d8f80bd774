"""Times `jrecipe --mode=inspect` end to end: mnist5k and a 60,000-example synthetic 28x28 set.

    python bench/inspect_speed.py [--rounds=3] [--skip_synthetic] [--data_dir=/tmp/...]

Each measurement is a fresh `python -m jrecipe --mode=inspect` process (start-up, data
loading, every finding, every file written, as a user runs it); its wall time and its peak
resident memory (ru_maxrss of that child, from os.wait4) are printed per round, then the
median. Targets (issue 4): mnist5k <= 30 s; 60,000 synthetic images <= 3 min in bounded
memory.

The synthetic set is written once as a TFDS ArrayRecord dataset `jrecipe_synth60k` (50,000
train / 5,000 validation / 5,000 test, uint8 28x28x1, 10 classes) into --data_dir and read
through `--config.data.name=tfds:jrecipe_synth60k`, the path any TFDS dataset takes. Each class
is 6 random stroke prototypes; an example is one of them moved by up to 3 pixels, with two
random blobs and Gaussian noise (sigma 20): varied enough that near duplicates are rare.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = "jrecipe_synth60k"
SPLITS = {"train": 50_000, "validation": 5_000, "test": 5_000}


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """n uint8 [28, 28, 1] images and int labels (vectorised; see the module docstring)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
  protos = np.zeros((10, 6, 28, 28), np.float32)
  prng = np.random.default_rng(12345)  # the same prototypes for every split
  for c in range(10):
    for p in range(6):
      for _ in range(3):  # three strokes: blobs along a line
        (y0, x0), (y1, x1) = prng.uniform(6, 22, (2, 2))
        for t in np.linspace(0, 1, 8):
          cy, cx = y0 + t * (y1 - y0), x0 + t * (x1 - x0)
          protos[c, p] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 3.0)
  protos = 255 * protos / protos.max(axis=(2, 3), keepdims=True)
  labels = rng.integers(0, 10, n)
  out = np.empty((n, 28, 28, 1), np.uint8)
  for s in range(0, n, 5000):
    k = min(5000, n - s)
    lab = labels[s:s + k]
    img = protos[lab, rng.integers(0, 6, k)]
    dy, dx = rng.integers(-3, 4, (2, k))
    for i in range(k):  # cheap per-example roll (5,000 at a time)
      img[i] = np.roll(img[i], (dy[i], dx[i]), axis=(0, 1))
    cy, cx = rng.uniform(4, 24, (2, k, 2))
    blobs = np.exp(-((yy[None, None] - cy[..., None, None]) ** 2
                     + (xx[None, None] - cx[..., None, None]) ** 2) / 4.0).sum(axis=1)
    img = img * rng.uniform(0.7, 1.0, (k, 1, 1)) + 120 * blobs
    img += rng.normal(0, 20, img.shape)
    out[s:s + k, ..., 0] = np.clip(img, 0, 255).astype(np.uint8)
  return out, labels


def prepare_synthetic(data_dir: str) -> None:
  """Writes the synthetic set into data_dir once (TFDS ArrayRecord, raw-bytes tensors)."""
  import tensorflow_datasets as tfds
  from etils import epath
  from jrecipe.data import builders

  class JrecipeSynth60k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    code_path = epath.Path(builders.__file__)  # see jrecipe.data.builders._Builder

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                   features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8,
                                        encoding=tfds.features.Encoding.BYTES),
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in SPLITS}

    def _generate_examples(self, split):
      x, y = synthetic_images(SPLITS[split], seed=list(SPLITS).index(split))
      for i in range(len(x)):
        yield i, {"image": x[i], "label": int(y[i])}

  builder = JrecipeSynth60k(data_dir=data_dir, file_format="array_record")
  if not (builder.data_path / "dataset_info.json").exists():
    t = time.perf_counter()
    builder.download_and_prepare()
    print(f"prepared {SYNTH} in {data_dir} in {time.perf_counter() - t:.1f} s", flush=True)


def time_inspect_rss(args: list[str]) -> tuple[float, float, float, str]:
  """(wall seconds, CPU seconds, peak RSS in MB, stdout) of one `python -m jrecipe
  --mode=inspect` run; CPU time (user + system, all threads) and RSS are the child's own
  rusage, from os.wait4. On a shared machine the CPU time moves much less than the wall time."""
  with tempfile.TemporaryDirectory() as workdir:
    cmd = [sys.executable, "-m", "jrecipe", "--mode=inspect", f"--workdir={workdir}", *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
      t = time.perf_counter()
      proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True)
      _, status, usage = os.wait4(proc.pid, 0)
      wall = time.perf_counter() - t
      proc.returncode = os.waitstatus_to_exitcode(status)
      out.seek(0)
      err.seek(0)
      text, error = out.read(), err.read()
  if proc.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{error}")
  return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0, text


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--skip_synthetic", action="store_true")
  p.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "jrecipe_bench_data"))
  a = p.parse_args()
  cases = [("mnist5k", ["--config=configs/mnist5k_cnn.py"], 30.0)]
  if not a.skip_synthetic:
    prepare_synthetic(a.data_dir)
    cases.append((f"{SYNTH} (60,000)", ["--config=configs/mnist5k_cnn.py",
                                        f"--config.data.name=tfds:{SYNTH}",
                                        f"--config.data.data_dir={a.data_dir}"], 180.0))
  print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
  results = {name: [] for name, _, _ in cases}
  for r in range(a.rounds):  # interleaved rounds: both cases see the same machine load
    for name, args, _ in cases:
      wall, cpu, rss, out = time_inspect_rss(args)
      results[name].append((wall, cpu, rss))
      print(f"round {r}: {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {rss:.0f} MB, "
            f"load average {os.getloadavg()[0]:.1f}", flush=True)
      if r == 0:
        print("  " + "\n  ".join(out.strip().splitlines()[:4]), flush=True)
  for name, _, target in cases:
    walls = [w for w, _, _ in results[name]]
    cpus = [c for _, c, _ in results[name]]
    rss = max(m for _, _, m in results[name])
    print(f"{name}: wall median {statistics.median(walls):.1f} s (min {min(walls):.1f}, max "
          f"{max(walls):.1f}), CPU median {statistics.median(cpus):.1f} s, over {len(walls)} "
          f"rounds; peak RSS {rss:.0f} MB; target <= {target:.0f} s wall: "
          f"{'met' if statistics.median(walls) <= target else 'MISSED'} (median), "
          f"{'met' if min(walls) <= target else 'MISSED'} (best round)")
  print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
