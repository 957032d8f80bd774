"""The default main job: an MLP (64-256-256-10) on scikit-learn's 8x8 digits, Adam 1e-3.

    jrecipe --config=configs/digits_mlp.py --workdir=/tmp/jrecipe/digits_mlp

Expect about 97-98% test accuracy after 40 epochs (about 400 steps at batch 128, a few
seconds of training on a 2-core CPU). Smoke variant: `--config=configs/digits_mlp.py:smoke`.
"""

from jrecipe.config_base import base_config
from jrecipe.config.variants import check_variant


def get_config(variant: str = ""):
  check_variant(variant, ("smoke",), "digits_mlp.py")
  c = base_config()
  c.data.name = "digits"
  c.model.name = "mlp"
  c.model.hidden = (256, 256)
  c.model.activation = "relu"
  c.model.dropout = 0.0
  c.model.init_scale = 1.0
  c.optimizer.learning_rate = 1e-3
  c.num_epochs = 40
  c.batch_size = 128
  c.checkpoint.every_epochs = 10  # an epoch is only 9 steps here
  if variant == "smoke":
    c.num_epochs = 2
    c.progress = False
  return c
