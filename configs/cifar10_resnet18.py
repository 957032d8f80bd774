"""ResNet-18 (CIFAR stem) on CIFAR-10 through TFDS, for users who have the data prepared.

    jrecipe --config=configs/cifar10_resnet18.py --workdir=/tmp/jrecipe/cifar10_resnet18 \
        --config.data.data_dir=~/tensorflow_datasets

Needs CIFAR-10 prepared as ArrayRecord in data_dir (`tfds build cifar10
--file_format=array_record` on a machine with TensorFlow). Expect about 93% test accuracy after
60 epochs of SGD with Nesterov momentum, cosine decay and random crop + flip augmentation.
Smoke variant that runs offline here: `--config=configs/cifar10_resnet18.py:smoke` trains the
same architecture (width 4) for one epoch on 512 mnist5k images downsampled to 14x14.
"""

from jrecipe.config_base import base_config
from jrecipe.config.variants import check_variant


def get_config(variant: str = ""):
  check_variant(variant, ("smoke",), "cifar10_resnet18.py")
  c = base_config()
  c.data.name = "tfds:cifar10"
  c.data.augment.random_crop = 4
  c.data.augment.hflip = True
  c.model.name = "resnet18"
  c.model.stem = "cifar"
  c.model.width = 64
  c.model.dropout2d = 0.0
  c.optimizer.name = "nesterov"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.schedule.name = "cosine"
  c.schedule.unit = "epochs"
  c.schedule.warmup = 2
  c.l2 = 5e-4
  c.num_epochs = 60
  c.batch_size = 128
  if variant == "smoke":
    c.data.name = "mnist5k"
    c.data.train_subset = 512
    c.data.augment.random_crop = 2
    c.data.augment.hflip = False
    c.data.downsample = 2
    c.model.width = 4
    c.num_epochs = 1
    c.batch_size = 64
    c.optimizer.learning_rate = 0.05
    c.progress = False
  return c
