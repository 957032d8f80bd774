"""A small causal Transformer predicting each next pixel of the 8x8 digits (17 intensity tokens).

    jrecipe --config=configs/digits_seq_transformer.py --workdir=/tmp/jrecipe/digits_seq

An autoregressive task on real offline data: input token t is pixel t, the target is pixel
t+1. Expect a next-pixel test accuracy around 60% (chance is about 40%: most pixels are 0)
and a test loss well below ln(17)=2.83 after 20 epochs.
"""

from jrecipe.config_base import base_config
from jrecipe.config.variants import check_variant


def get_config(variant: str = ""):
  check_variant(variant, ("smoke",), "digits_seq_transformer.py")
  c = base_config()
  c.data.name = "digits_seq"
  c.data.normalize = False
  c.model.name = "transformer"
  c.model.num_layers = 2
  c.model.dim = 64
  c.model.heads = 4
  c.model.dropout = 0.0
  c.optimizer.learning_rate = 1e-3
  c.num_epochs = 20
  c.batch_size = 64
  if variant == "smoke":
    c.num_epochs = 1
    c.progress = False
  return c
