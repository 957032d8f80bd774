"""Tests of jrecipe.data: fixed splits, loading, batches, eval coverage, augmentation."""

import functools
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from jrecipe.data import builders, pipeline, reading
from jrecipe.data.indexing import IndexBatches, ShuffledIndexBatches
from jrecipe.errors import UserError
import jrecipe.data as D


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One TFDS data_dir for the session: each builder runs once (mnist5k takes ~3 s)."""
  return str(tmp_path_factory.mktemp("tfds"))


def _cfg(data_dir, name="digits", **kw):
  cfg = dict(name=name, data_dir=data_dir, normalize=True, train_subset=0, downsample=0)
  cfg.update(kw)
  return cfg


@pytest.fixture(scope="session")
def digits(data_dir):
  return D.load_dataset(_cfg(data_dir))


@pytest.fixture(scope="session")
def mnist(data_dir):
  return D.load_dataset(_cfg(data_dir, "mnist5k"))


def test_config_dict_accepted(data_dir, digits):
  import ml_collections
  ds = D.load_dataset(ml_collections.ConfigDict(_cfg(data_dir)))
  assert ds.spec == digits.spec


def test_digits_splits_and_ranges(digits):
  spec = digits.spec
  assert spec.splits == {"train": 1257, "validation": 270, "test": 270}
  assert spec.task == "classification" and spec.num_classes == 10
  assert spec.input_shape == (8, 8, 1) and spec.value_range == (0.0, 16.0)
  ids = np.concatenate([digits.arrays[s]["id"] for s in pipeline.SPLITS])
  assert np.array_equal(np.sort(ids), np.arange(1797))  # disjoint and complete
  for s in pipeline.SPLITS:
    raw = digits.raw[s]
    assert raw["x"].dtype == np.uint8 and raw["x"].shape[1:] == (8, 8, 1)
    assert raw["x"].min() == 0 and raw["x"].max() == 16
    assert np.array_equal(raw["id"], digits.arrays[s]["id"])
    assert digits.arrays[s]["x"].dtype == np.float32 and digits.arrays[s]["y"].dtype == np.int32
  # stratified: each class's share of validation is within one example of proportional
  all_y = np.concatenate([digits.arrays[s]["y"] for s in pipeline.SPLITS])
  counts = np.bincount(all_y, minlength=10)
  val = np.bincount(digits.arrays["validation"]["y"], minlength=10)
  assert np.all(np.abs(val - 270 * counts / 1797) < 1)
  # labels are the source's labels and the stored order is the fixed split's order
  from sklearn.datasets import load_digits
  src = load_digits()
  train = digits.raw["train"]
  assert np.array_equal(train["y"], src.target[train["id"]])
  assert np.array_equal(train["x"][..., 0], src.images[train["id"]].astype(np.uint8))
  expected = builders.stratified_split(src.target, {"validation": 270, "test": 270})
  for s in pipeline.SPLITS:
    assert np.array_equal(digits.arrays[s]["id"], expected[s])


def test_mnist5k_splits_and_ranges(mnist):
  spec = mnist.spec
  assert spec.splits == {"train": 4000, "validation": 500, "test": 500}
  assert spec.input_shape == (28, 28, 1) and spec.value_range == (0.0, 255.0)
  per_split = {s: np.bincount(mnist.arrays[s]["y"], minlength=10) for s in pipeline.SPLITS}
  assert list(per_split["train"]) == [400] * 10
  assert list(per_split["validation"]) == [50] * 10 and list(per_split["test"]) == [50] * 10
  ids = np.concatenate([mnist.arrays[s]["id"] for s in pipeline.SPLITS])
  assert np.array_equal(np.sort(ids), np.arange(5000))
  assert mnist.raw["train"]["x"].dtype == np.uint8
  # the source is sorted by label: the stored training order must not be
  assert len(set(mnist.arrays["train"]["y"][:50].tolist())) > 5


def test_digits_seq_is_shifted_digits(data_dir, digits):
  seq = D.load_dataset(_cfg(data_dir, "digits_seq"))
  spec = seq.spec
  assert (spec.task, spec.num_classes, spec.time_axis, spec.sees_current) == (
      "sequence", 17, 1, True)
  assert spec.input_shape == (63,) and spec.splits == digits.spec.splits
  assert spec.mean == 0.0 and spec.std == 1.0  # token ids are never normalised
  for s in pipeline.SPLITS:
    a = seq.arrays[s]
    assert a["x"].dtype == np.int32 and a["y"].dtype == np.int32 and a["y"].shape[1:] == (63,)
    assert np.array_equal(a["y"][:, :-1], a["x"][:, 1:])  # targets are inputs shifted by one
    assert np.array_equal(a["id"], digits.arrays[s]["id"])
    pixels = digits.raw[s]["x"].reshape(-1, 64).astype(np.int32)
    assert np.array_equal(a["x"], pixels[:, :63]) and np.array_equal(a["y"], pixels[:, 1:])
    assert a["x"].min() >= 0 and a["x"].max() <= 16


def test_fast_reader_matches_tfds_decoding(data_dir, digits):
  builder = builders.prepare("digits", data_dir)
  source = builder.as_data_source()["validation"]
  fast = reading.read_fast(source, builder.info.features)
  slow = reading.read_generic(source, ("image", "label", "id"))
  for k in ("image", "label", "id"):
    assert np.array_equal(fast[k], slow[k]) and fast[k].dtype == slow[k].dtype


def test_load_twice_identical_and_read_only(data_dir, digits):
  again = D.load_dataset(_cfg(data_dir))
  assert again.arrays["train"]["x"] is digits.arrays["train"]["x"]  # per-process cache
  with pytest.raises(ValueError):
    again.arrays["train"]["x"][0] = 1.0
  D.clear_cache()
  reread = D.load_dataset(_cfg(data_dir))
  assert reread.spec == digits.spec
  for s in pipeline.SPLITS:
    for k in ("x", "y", "id"):
      assert np.array_equal(reread.arrays[s][k], digits.arrays[s][k])


def test_normalize_uses_train_statistics(data_dir, digits):
  train_raw = digits.raw["train"]["x"].astype(np.float64)
  assert np.isclose(digits.spec.mean, train_raw.mean()) and np.isclose(
      digits.spec.std, train_raw.std())
  x = digits.arrays["train"]["x"]
  assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-5
  plain = D.load_dataset(_cfg(data_dir, normalize=False))
  assert plain.spec.mean == 0.0 and plain.spec.std == 1.0
  assert np.array_equal(plain.arrays["test"]["x"], digits.raw["test"]["x"].astype(np.float32))


def test_train_subset_and_downsample(data_dir, digits, mnist):
  sub = D.load_dataset(_cfg(data_dir, train_subset=100))
  assert sub.spec.splits["train"] == 100 and sub.spec.mean == digits.spec.mean
  assert np.array_equal(sub.arrays["train"]["id"], digits.arrays["train"]["id"][:100])
  small = D.load_dataset(_cfg(data_dir, "mnist5k", downsample=4, normalize=False))
  assert small.spec.input_shape == (7, 7, 1)
  assert small.raw["train"]["x"].shape[1:] == (28, 28, 1)  # raw keeps the stored images
  expected = mnist.raw["train"]["x"][:2, :4, :4, 0].astype(np.float64).mean()
  assert np.isclose(small.arrays["train"]["x"][:2, 0, 0, 0].mean(), expected)
  with pytest.raises(UserError, match="Valid factors: 2, 4, 7, 14, 28"):
    D.load_dataset(_cfg(data_dir, "mnist5k", downsample=3))
  with pytest.raises(UserError, match="exceeds the 1257 training examples"):
    D.load_dataset(_cfg(data_dir, train_subset=5000))
  with pytest.raises(UserError, match="sequence"):
    D.load_dataset(_cfg(data_dir, "digits_seq", downsample=2))
  with pytest.raises(UserError, match="integer >= 0"):
    D.load_dataset(_cfg(data_dir, train_subset=-1))


def test_unknown_names_raise_user_error(data_dir, digits):
  with pytest.raises(UserError, match="digits, mnist5k, digits_seq"):
    D.load_dataset(_cfg(data_dir, "cifar11"))
  with pytest.raises(UserError, match="Valid splits: train, validation, test"):
    D.eval_batches(digits, "dev", batch_size=8)
  with pytest.raises(UserError, match="tfds build mnist"):
    D.load_dataset(_cfg(data_dir, "tfds:mnist"))  # not prepared: no download is attempted


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches_seeded_resumable(digits):
  spe = D.steps_per_epoch(digits, 128)
  assert spe == 1257 // 128
  a = _take(D.train_batches(digits, batch_size=128, seed=3), 2 * spe + 3)
  b = _take(D.train_batches(digits, batch_size=128, seed=3), 2 * spe + 3)
  c = _take(D.train_batches(digits, batch_size=128, seed=4), 2)
  for u, v in zip(a, b):
    assert np.array_equal(u["x"], v["x"]) and np.array_equal(u["y"], v["y"])
  assert not np.array_equal(a[0]["y"], c[0]["y"])
  assert a[0]["x"].shape == (128, 8, 8, 1) and a[0]["y"].shape == (128,)
  # resuming at step k (mid-epoch and across the epoch boundary) gives step k of a fresh run
  for k in (5, spe - 1, spe + 2):
    resumed = _take(D.train_batches(digits, batch_size=128, seed=3, start_step=k), 3)
    for j, batch in enumerate(resumed):
      assert np.array_equal(batch["x"], a[k + j]["x"]) and np.array_equal(batch["y"], a[k + j]["y"])
  # each batch is a gather of the training arrays at the grain index batch of its step
  index = ShuffledIndexBatches(1257, 128, 3)
  assert np.array_equal(a[spe + 1]["y"], digits.arrays["train"]["y"][index[spe + 1]])


def test_new_epoch_reshuffles():
  index = ShuffledIndexBatches(100, 32, seed=0)
  e0 = np.concatenate([index[s] for s in range(3)])
  e1 = np.concatenate([index[s] for s in range(3, 6)])
  assert len(set(e0)) == 96 and len(set(e1)) == 96  # no repeats within an epoch
  assert not np.array_equal(e0, e1)
  assert np.array_equal(np.sort(index.permutation(1)), np.arange(100))
  assert not np.array_equal(ShuffledIndexBatches(100, 32, seed=1)[0], index[0])
  assert not np.array_equal(ShuffledIndexBatches(100, 32, seed=1)[0], index[3])  # not seed+epoch


def test_grain_index_batches_are_the_loops_order():
  """`ShuffledIndexBatches` is a grain MapDataset with the order of the loop's `IndexBatches`:
  it composes with `.map` and resumes from a grain iterator state."""
  import grain
  plain = IndexBatches(100, 32, seed=4)
  ds = ShuffledIndexBatches(100, 32, seed=4)
  assert isinstance(ds, grain.MapDataset) and not isinstance(plain, grain.MapDataset)
  for s in (0, 2, 3, 50):
    assert np.array_equal(ds[s], plain[s])
  assert np.array_equal(ds.map(lambda i: i + 1000)[5], plain[5] + 1000)
  assert np.array_equal(ds[2:6][1], plain[3])
  it = iter(ds.to_iter_dataset())
  next(it)
  state = it.get_state()
  second, third = next(it), next(it)
  it.set_state(state)
  assert np.array_equal(next(it), second) and np.array_equal(second, plain[1])
  assert np.array_equal(third, plain[2])
  import pickle  # grain's worker processes pickle their dataset
  assert np.array_equal(pickle.loads(pickle.dumps(ds))[7], plain[7])


def test_train_batches_host_slices(digits):
  (glob,) = _take(D.train_batches(digits, batch_size=64, seed=1, start_step=7), 1)
  parts = [_take(D.train_batches(digits, batch_size=64, seed=1, start_step=7, process_index=p,
                                 process_count=2), 1)[0] for p in range(2)]
  assert parts[0]["x"].shape[0] == 32
  for k in ("x", "y"):
    assert np.array_equal(np.concatenate([p[k] for p in parts]), glob[k])
  with pytest.raises(UserError, match="not divisible"):
    D.train_batches(digits, batch_size=63, seed=0, process_count=2)


def test_batch_size_errors(data_dir, digits):
  sub = D.load_dataset(_cfg(data_dir, train_subset=10))
  assert D.steps_per_epoch(sub, 10) == 1
  with pytest.raises(UserError, match="larger than the 10 training examples"):
    D.steps_per_epoch(sub, 16)
  with pytest.raises(UserError, match="larger than the 10 training examples"):
    D.train_batches(sub, batch_size=16, seed=0)
  with pytest.raises(UserError, match="non-negative"):
    D.train_batches(digits, batch_size=16, seed=-1)


@pytest.mark.parametrize("batch_size,procs", [(128, 1), (7, 1), (1000, 1), (64, 2), (270, 2)])
def test_eval_covers_every_example_once(digits, batch_size, procs):
  n = digits.spec.splits["test"]
  per_proc = [list(D.eval_batches(digits, "test", batch_size=batch_size, process_index=p,
                                  process_count=procs)) for p in range(procs)]
  assert all(len(b) == -(-n // batch_size) for b in per_proc)
  ids, xs = [], []
  for step in zip(*per_proc):
    batch = {k: np.concatenate([b[k] for b in step]) for k in step[0]}
    assert batch["mask"].dtype == np.float32 and batch["x"].shape[0] == batch_size
    keep = batch["mask"] == 1
    ids.append(batch["id"][keep])
    xs.append(batch["x"][keep])
  assert np.array_equal(np.concatenate(ids), digits.arrays["test"]["id"])  # in order, once each
  assert np.array_equal(np.concatenate(xs), digits.arrays["test"]["x"])


def test_augment(digits):
  import jax
  import jax.numpy as jnp
  x = jnp.asarray(digits.arrays["train"]["x"][:64])
  rng = jax.random.PRNGKey(0)
  off = dict(random_crop=0, hflip=False)
  assert D.augment(x, rng, off) is x
  flip = jax.jit(functools.partial(D.augment, aug_config=dict(random_crop=0, hflip=True)))
  out = np.asarray(flip(x, rng))
  xn = np.asarray(x)
  flipped = np.all(out == xn[:, :, ::-1, :], axis=(1, 2, 3))
  same = np.all(out == xn, axis=(1, 2, 3))
  assert np.all(flipped | same) and 10 < flipped.sum() < 54
  assert np.array_equal(out, np.asarray(flip(x, rng)))  # deterministic given rng
  crop = D.augment(x, rng, dict(random_crop=2, hflip=False))
  assert crop.shape == x.shape and not np.array_equal(np.asarray(crop), xn)
  padded = np.pad(xn, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
  windows = [padded[:, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
  assert all(any(np.array_equal(np.asarray(crop)[b], w[b]) for w in windows) for b in range(64))
  seq = jnp.zeros((4, 63), jnp.int32)
  assert D.augment(seq, rng, dict(random_crop=2, hflip=True)) is seq


def test_tfds_prefix_reads_prepared_datasets(data_dir, digits, tmp_path):
  via_tfds = D.load_dataset(_cfg(data_dir, "tfds:digits"))
  assert via_tfds.spec.splits == digits.spec.splits
  assert np.array_equal(via_tfds.arrays["train"]["x"], digits.arrays["train"]["x"])
  # a dataset with encoded images and no validation split: the last 10% of train
  import tensorflow_datasets as tfds
  png = _png_bytes(np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 16)

  class JrecipeTestImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # see builders._Builder

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(4, 4, 1)),
          "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(30), "test": self._generate_examples(5)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": png, "label": i % 2}

  JrecipeTestImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  ds = D.load_dataset(_cfg(str(tmp_path), "tfds:jrecipe_test_images"))
  assert ds.spec.splits == {"train": 27, "validation": 3, "test": 5}
  assert np.array_equal(ds.arrays["validation"]["id"], [27, 28, 29])
  assert ds.raw["train"]["x"].shape == (27, 4, 4, 1) and ds.spec.value_range == (0.0, 240.0)


def _png_bytes(image):
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image[..., 0]).save(buf, format="PNG")
  return buf.getvalue()


def test_concurrent_first_build_waits_for_lock(tmp_path):
  """A second builder waits on the lock, then reuses the finished dataset (no double build)."""
  data_dir = str(tmp_path)
  result = {}
  with builders._file_lock(f"{data_dir}/.digits.lock"):
    worker = threading.Thread(
        target=lambda: result.update(b=builders.prepare("digits", data_dir)))
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive()  # blocked on the lock held here
  worker.join(60)
  assert result["b"].info.splits["train"].num_examples == 1257


def test_input_pipeline_is_cheap(digits):
  it = D.train_batches(digits, batch_size=128, seed=0)
  _take(it, 20)
  t = time.perf_counter()
  _take(it, 500)
  per_batch = (time.perf_counter() - t) / 500
  assert per_batch < 5e-4, f"{per_batch * 1e6:.0f} us per batch: per-example Python work?"


def test_store_copy_equals_tfds_read_and_needs_no_tfds(data_dir, digits):
  """Warm start-up (issue 9): after one read through TFDS, a new process reads the numpy copy
  of the same splits and meta, without importing tensorflow_datasets."""
  from jrecipe.data import store
  for name in ("digits", "digits_seq"):
    D.load_dataset(_cfg(data_dir, name))  # a read through TFDS leaves the copy
    copy = store.load(name, data_dir)
    assert copy is not None
    os.environ[store.ENV] = "0"
    try:
      meta, splits = reading.read_builtin(name, data_dir)  # through TFDS
    finally:
      del os.environ[store.ENV]
    assert copy[0] == meta
    for s in pipeline.SPLITS:
      for k in ("x", "y", "id"):
        assert copy[1][s][k].dtype == splits[s][k].dtype
        assert np.array_equal(copy[1][s][k], splits[s][k])
  code = ("import sys; from jrecipe.data import pipeline; "
          f"ds = pipeline.load_dataset({{'name': 'digits', 'data_dir': {data_dir!r}}}); "
          "print(ds.spec.splits['train'], 'tensorflow_datasets' in sys.modules)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["1257", "False"]


def test_store_copy_is_dropped_when_tfds_files_change_or_it_is_damaged(data_dir, digits,
                                                                       tmp_path):
  from jrecipe.data import store
  mine = str(tmp_path / "data")
  shutil.copytree(os.path.join(data_dir, "digits"), os.path.join(mine, "digits"))
  first = reading.read_builtin("digits", mine)
  assert store.load("digits", mine) is not None
  assert os.stat(store.path("digits", mine)).st_mode & 0o777 == 0o644  # readable by others
  # the TFDS files changed (a rebuild): the copy no longer matches and is not used
  record = next(p for p in (tmp_path / "data" / "digits" / store.BUILDER_VERSION).iterdir()
                if "train" in p.name)
  os.utime(record, ns=(record.stat().st_atime_ns, record.stat().st_mtime_ns + 10**9))
  assert store.load("digits", mine) is None
  again = reading.read_builtin("digits", mine)  # read through TFDS, copy rewritten
  assert np.array_equal(again[1]["train"]["x"], first[1]["train"]["x"])
  assert store.load("digits", mine) is not None
  # a damaged copy is ignored, and TFDS is read instead
  with open(store.path("digits", mine), "wb") as f:
    f.write(b"not an npz file")
  assert store.load("digits", mine) is None
  D.clear_cache()
  ds = D.load_dataset(_cfg(mine))
  assert np.array_equal(ds.arrays["test"]["y"], digits.arrays["test"]["y"])
  # a data_dir where the copy cannot be written: no error, no temporary file left
  shutil.rmtree(os.path.join(mine, store.DIRNAME))
  open(os.path.join(mine, store.DIRNAME), "w").close()  # a file where the directory goes
  store.save("digits", mine, first[0], first[1])
  assert store.load("digits", mine) is None
  assert sorted(os.listdir(mine)) == sorted([store.DIRNAME, "digits"])
