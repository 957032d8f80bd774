"""The byte-level text corpus (stdlib_bytes) and what a language model needs from jrecipe:
a deterministic TFDS build split by file, next-byte targets, per-token loss, accuracy and bits
per byte, a smoke run that learns, and causal_dependency on a look-ahead mask planted in a
transformer reading this data."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jrecipe import losses
from jrecipe.checks.dependencies import causal_dependency
from jrecipe.cli_config import load_config_with_overrides
from jrecipe.data import builders, text
from jrecipe.data import dataset as D
from jrecipe.errors import UserError
from jrecipe.models.sequence import DecoderBlock
from jrecipe.train import loop
from jrecipe.types import DataSpec
from tests.helpers import REPO, run_cli

LONG = 1024  # few, long windows: the small corpus builds in about a second


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
  """stdlib_bytes_small built twice, into two fresh data_dirs."""
  out = []
  for i in range(2):
    d = str(tmp_path_factory.mktemp(f"text{i}"))
    b = builders.prepare("stdlib_bytes_small", d, builders.stdlib_bytes_config(LONG))
    out.append((d, b))
  return out


def test_build_is_deterministic_and_records_the_corpus(two_builds):
  (d1, b1), (d2, b2) = two_builds
  m1, m2 = dict(b1.info.metadata), dict(b2.info.metadata)
  assert m1["content_sha256"] == m2["content_sha256"] and len(m1["content_sha256"]) == 64
  assert m1["python"].endswith(".".join(map(str, __import__("sys").version_info[:3])))
  assert m1 == m2
  for split in ("train", "validation", "test"):
    a = [b.as_data_source()[split] for b in (b1, b2)]
    assert len(a[0]) == len(a[1]) == m1["windows"][split] > 0
    for k in (0, len(a[0]) - 1):
      assert np.array_equal(a[0][k]["tokens"], a[1][k]["tokens"])
  # metadata.json on disk, in TFDS's standard layout beside the ArrayRecord shards
  root = os.path.join(d1, "stdlib_bytes_small", f"ctx{LONG}", "1.0.0")
  with open(os.path.join(root, "metadata.json")) as f:
    assert json.load(f)["content_sha256"] == m1["content_sha256"]
  assert os.path.exists(os.path.join(
      root, "stdlib_bytes_small-train.array_record-00000-of-00001"))


def test_splits_are_disjoint_by_file_and_windows_are_the_files_bytes(two_builds):
  _, b = two_builds[0]
  meta = b.info.metadata
  files = meta["files"]
  sets = {s: set(v) for s, v in files.items()}
  assert not (sets["train"] & sets["validation"] or sets["train"] & sets["test"]
              or sets["validation"] & sets["test"])
  every = text.split_files(text.corpus_files())
  for split, names in files.items():
    assert names == every[split][::16] and names == sorted(names)
    assert all(text.split_of(n) == split for n in names)
  everything = [n for v in every.values() for n in v]
  assert not any(n.startswith(("test/", "site-packages/")) or "/test/" in n
                 or os.path.basename(n).startswith("test_") for n in everything)
  assert "os.py" in everything and "json/__init__.py" in everything
  # The windows are exactly the split's files, read straight from disk, in order: window k
  # holds bytes [k * L, k * L + L] of the concatenation (stride L, one byte of overlap).
  root = meta["stdlib_root"]
  stream = b"".join(open(os.path.join(root, n), "rb").read() for n in files["validation"])
  src = b.as_data_source()["validation"]
  ids = []
  for k in range(len(src)):
    i = int(src[k]["id"])
    ids.append(i)
    assert bytes(src[k]["tokens"]) == stream[i * LONG:i * LONG + LONG + 1]
  assert sorted(ids) == list(range((len(stream) - 1) // LONG))
  assert ids != sorted(ids)  # stored in a fixed random order: train_subset is a random sample


def test_dataset_gives_next_byte_targets_and_rejects_bad_fields(two_builds):
  d, _ = two_builds[0]
  ds = D.load_dataset(dict(name="stdlib_bytes_small", data_dir=d, context_length=LONG))
  spec = ds.spec
  assert (spec.task, spec.num_classes, spec.input_shape, spec.token_bytes) == (
      "sequence", 256, (LONG,), 1.0)
  assert spec.class_names[ord("a")] == "a" and spec.class_names[0] == "\\x00"
  x, y = ds.arrays["train"]["x"], ds.arrays["train"]["y"]
  assert x.dtype == y.dtype == np.int32
  assert np.array_equal(x[:, 1:], y[:, :-1])  # y[t] = x[t + 1]
  order = np.argsort(ds.arrays["train"]["id"])  # back to the byte stream's order
  # stride L: a window's last target is the next window's first input
  assert np.array_equal(y[order][:-1, -1], x[order][1:, 0])
  with pytest.raises(UserError, match="context_length"):
    D.load_dataset(dict(name="digits", data_dir=d, context_length=64))
  with pytest.raises(UserError, match="integer >= 2"):
    D.load_dataset(dict(name="stdlib_bytes_small", data_dir=d, context_length=1))


def test_per_token_loss_accuracy_and_bits_per_byte_by_hand():
  spec = DataSpec(name="t", task="sequence", input_shape=(2,), num_classes=3, class_names=None,
                  value_range=(0, 2), splits={}, time_axis=1, token_bytes=1.0)
  loss = losses.build_loss("softmax_xent", spec)
  logits = jnp.array([[[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]]])  # one example, T = 2
  labels = jnp.array([[1, 0]])
  # position 0: uniform, -ln(1/3); position 1: p(0) = 2 / (2 + 1 + 1) = 1/2, -ln(1/2)
  want = (math.log(3.0) + math.log(2.0)) / 2
  assert float(loss.per_example(logits, labels)[0]) == pytest.approx(want, rel=1e-6)
  # argmax: position 0 ties -> class 0 (wrong), position 1 -> class 0 (right)
  assert float(loss.correct(logits, labels)[0]) == pytest.approx(0.5)
  assert losses.derived_metrics({"loss": want}, spec, loss) == {
      "bits_per_byte": pytest.approx(want / math.log(2.0))}
  two_byte = DataSpec(**{**spec.__dict__, "token_bytes": 2.0})
  assert losses.derived_metrics({"loss": want}, two_byte, loss)["bits_per_byte"] == (
      pytest.approx(want / math.log(2.0) / 2))
  assert losses.derived_metrics({"loss": want}, DataSpec(**{**spec.__dict__,
                                                           "token_bytes": None}), loss) == {}
  assert loss.chance(256) == pytest.approx(math.log(256))


def test_unigram_baseline_is_the_smoothed_train_frequencies():
  train = np.array([0, 0, 0, 1], np.uint8)
  # add-one over 256 byte values: p(0) = 4 / 260, p(1) = 2 / 260
  assert text.unigram_bits(train, np.array([0, 1], np.uint8)) == pytest.approx(
      -(math.log2(4 / 260) + math.log2(2 / 260)) / 2)


def test_smoke_config_learns_below_chance(tmp_path):
  path = os.path.join(REPO, "configs", "stdlib_bytes_transformer.py") + ":smoke"
  config = load_config_with_overrides(path, ["--config.monitor.enabled=False",
                                             "--config.ema_decay=0.0"])
  assert D.load_dataset(config.data).stream is not None  # the config reads through streaming
  summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
  test = summary["test"]
  assert test["loss"] < math.log(256) - 1.0  # well below chance ln 256 = 5.55 nats per byte
  assert test["bits_per_byte"] == pytest.approx(test["loss"] / math.log(2.0), rel=1e-6)
  assert test["bits_per_byte"] < 8.0


class _LookAhead(nn.Module):
  """jrecipe's decoder block under a causal mask shifted by `offset` (1: sees one step ahead)."""

  offset: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    t = x.shape[1]
    h = nn.Embed(256, 32)(x) + self.param("pos", nn.initializers.normal(0.02), (t, 32))
    mask = jnp.tril(jnp.ones((t, t), bool), k=self.offset)[None, None]
    h = DecoderBlock(32, 2, name="block")(h, mask, train)
    return nn.Dense(256, name="head")(nn.LayerNorm()(h))


@pytest.mark.parametrize("offset, status", [(1, "fail"), (0, "pass")])
def test_causal_dependency_catches_a_mask_one_step_ahead_on_text(two_builds, offset, status):
  d, _ = two_builds[0]
  ds = D.load_dataset(dict(name="stdlib_bytes_small", data_dir=d, context_length=LONG))
  x = jnp.asarray(ds.arrays["validation"]["x"][:2, :48])
  module = _LookAhead(offset)
  variables = module.init(jax.random.key(0), x)
  r = causal_dependency(lambda v, z, train=False, rngs=None: module.apply(v, z), variables, x,
                        vocab_size=256)
  assert r.status == status, r.message
  if status == "fail":
    assert "off by one" in r.message and r.details["first_offending"]["input"] == (
        r.details["first_offending"]["output"] + 1)


def test_the_battery_passes_on_the_streamed_text_config(tmp_path):
  """--mode=check on the shipped text config's smoke variant, read through the streaming
  pipeline: the windows' causal structure, the loss at init (ln 256 or the head bias's byte
  frequencies) and the picture before the net, all pass (exit 0)."""
  wd = tmp_path / "wd"
  r = run_cli(["--mode=check", "--config=configs/stdlib_bytes_transformer.py:smoke",
               "--config.checks.only=data_before_net,loss_at_init,causal_dependency",
               f"--workdir={wd}"])
  assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
  checks = {c["name"]: c["status"] for c in json.load(open(wd / "checks.json"))["checks"]}
  assert checks == {"data_before_net": "pass", "loss_at_init": "pass",
                    "causal_dependency": "pass"}, checks
