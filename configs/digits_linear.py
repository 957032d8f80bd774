"""The dumb baseline: a linear softmax classifier on the 8x8 digits ('don't be a hero').

    jrecipe --config=configs/digits_linear.py --workdir=/tmp/jrecipe/digits_linear

Expect about 96% test accuracy after 40 epochs (measured: 95.9%); every later model must beat it.
"""

from jrecipe.config_base import base_config
from jrecipe.config.variants import check_variant


def get_config(variant: str = ""):
  check_variant(variant, ("smoke",), "digits_linear.py")
  c = base_config()
  c.data.name = "digits"
  c.model.name = "linear"
  c.optimizer.learning_rate = 3e-3
  c.num_epochs = 40
  if variant == "smoke":
    c.num_epochs = 2
    c.progress = False
  return c
