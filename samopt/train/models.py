"""Models for the recipes and benchmarks, written here (torchvision is not a dependency).

- :func:`resnet18` / :func:`resnet34`: the CIFAR ResNets of the Sparse SAM code
  (3x3 stem with stride 1, no max-pool, four stages of basic blocks, global average
  pool; He et al., CVPR 2016, arXiv:1512.03385): 11.17M parameters for ResNet-18
  with 10 classes.
- :func:`small_cnn`: a two-block CNN with BatchNorm for CPU runs on 28x28 images.

Example::

    model = resnet18(num_classes=10)             # CIFAR-10
    model = small_cnn(in_channels=1)             # Fashion-MNIST
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ResNet", "resnet18", "resnet34", "small_cnn"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet of basic blocks: ``blocks`` per stage, widths ``width * (1, 2, 4, 8)``."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for i, n in enumerate(blocks):
            planes = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """CIFAR ResNet-18 (11.17M parameters at 10 classes, width 64)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width)


def resnet34(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """CIFAR ResNet-34 (21.28M parameters at 10 classes, width 64)."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels, width)


def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Sequential:
    """Two conv-BN-ReLU-maxpool blocks and a linear head, for 28x28 inputs (about 50k parameters at width 32)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 7 * 7, num_classes),
    )
