"""A small causal Transformer predicting the next byte of the Python standard library's source.

    jrecipe --config=configs/stdlib_bytes_transformer.py --workdir=/tmp/jrecipe/stdlib_bytes

Byte-level language modelling on real text that every Python installation ships (dataset
'stdlib_bytes', jrecipe/data/text.py: 734 .py files, 12.1 MB on CPython 3.11.7, split by file).
Windows of 128 bytes; at each position the model predicts the next byte (vocabulary 256).
RESULT
Smoke variant: `--config=configs/stdlib_bytes_transformer.py:smoke` (a narrower model on 64-byte
windows, a few hundred training windows).
"""

from jrecipe.config_base import base_config
from jrecipe.config.variants import check_variant


def get_config(variant: str = ""):
  check_variant(variant, ("smoke",), "stdlib_bytes_transformer.py")
  c = base_config()
  c.data.name = "stdlib_bytes"
  c.data.context_length = 128
  c.data.normalize = False  # token ids are never normalised; say so
  c.model.name = "transformer"
  c.model.num_layers = 2
  c.model.dim = 128
  c.model.heads = 4
  c.model.dropout = 0.0
  c.optimizer.learning_rate = 1e-3
  c.optimizer.grad_clip_norm = 1.0
  c.batch_size = 32
  c.eval_batch_size = 256
  c.num_epochs = 0.25
  if variant == "smoke":
    c.data.name = "stdlib_bytes_small"
    c.data.context_length = 64
    c.data.train_subset = 512
    c.model.num_layers = 1
    c.model.dim = 64
    c.num_epochs = 1
    c.progress = False
  return c
