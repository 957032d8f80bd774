"""A small causal Transformer predicting the next byte of the Python standard library's source.

    jrecipe --config=configs/stdlib_bytes_transformer.py --workdir=/tmp/jrecipe/stdlib_bytes

Byte-level language modelling on real text that every Python installation ships (dataset
'stdlib_bytes', jrecipe/data/text.py: 734 .py files, 12.1 MB on CPython 3.11.7, split by file).
Windows of 128 bytes; at each position the model predicts the next byte (vocabulary 256),
read through the streaming pipeline (data.pipeline='stream').

Expect about 2.7 bits per byte on the test files after 0.2 epochs (481 steps of 32 windows,
Adam 1e-3), against 4.70 for the unigram baseline (byte frequencies of the training files,
metadata.json's unigram_bits_per_byte) and 8 for uniform bytes. Measured, seed 0, CPython
3.11.7: test loss 1.867 nats per byte = 2.694 bits per byte, next-byte accuracy 50.4%
(validation 2.602 bits per byte vs 4.710 unigram; EMA 2.686 test); 12.4 minutes of wall time on
2 cores shared with other jobs (3.6 min user + 1.4 min system CPU). `--mode=check`: 15 pass,
0 fail, 1 warn (gradient_check, explained in docs/text.md).
Smoke variant: `--config=configs/stdlib_bytes_transformer.py:smoke` (one block of width 64 on
64-byte windows of stdlib_bytes_small, 512 training windows, one epoch).
"""

from jrecipe.config_base import base_config
from jrecipe.config.variants import check_variant


def get_config(variant: str = ""):
  check_variant(variant, ("smoke",), "stdlib_bytes_transformer.py")
  c = base_config()
  c.data.name = "stdlib_bytes"
  c.data.context_length = 128
  c.data.normalize = False  # token ids are never normalised; the config says so
  # Through the streaming pipeline (docs/streaming.md): the same batches as in memory, bit for
  # bit, read from the ArrayRecord files (and their decoded copy) instead of a 100 MB array.
  c.data.pipeline = "stream"
  c.model.name = "transformer"
  c.model.num_layers = 2
  c.model.dim = 128
  c.model.heads = 4
  c.model.dropout = 0.0
  c.optimizer.learning_rate = 1e-3
  c.optimizer.grad_clip_norm = 1.0
  c.batch_size = 32
  c.eval_batch_size = 256
  c.num_epochs = 0.2
  if variant == "smoke":
    c.data.name = "stdlib_bytes_small"
    c.data.context_length = 64
    c.data.train_subset = 512
    c.model.num_layers = 1
    c.model.dim = 64
    c.num_epochs = 1
    c.progress = False
  return c
