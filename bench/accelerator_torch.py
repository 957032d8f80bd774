"""PyTorch twin of jrecipe's `resnet18` (CIFAR stem) for bench/accelerator.py.

The same network as jrecipe/models/resnet.py with stem='cifar': 3x3 conv (no bias) + BN +
ReLU, no max pool, four stages of two basic blocks (widths w, 2w, 4w, 8w; stride 2 on the
first 3x3 conv of stages 2-4, a 1x1 projection where the shape changes), the last BN of each
block starting at zero scale, global mean pool, a linear head. Written here rather than taken
from torchvision so that the CPU's reduced run needs no torchvision and the two models match
layer for layer (torchvision's resnet18 has the ImageNet stem).
"""

from torch import nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
    nn.init.zeros_(self.bn2.weight)
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.proj is None else self.proj(x)))


class ResNet18(nn.Module):
  """ResNet-18 with the CIFAR stem; `width` base filters (64 in the paper)."""

  def __init__(self, num_classes: int = 10, width: int = 64, channels: int = 3):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False),
                              nn.BatchNorm2d(width, momentum=0.1, eps=1e-5), nn.ReLU())
    blocks, cin = [], width
    for i in range(4):
      cout = width * 2 ** i
      for j in range(2):
        blocks.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.blocks(self.stem(x))
    return self.head(x.mean(dim=(2, 3)))
