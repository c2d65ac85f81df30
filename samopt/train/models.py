"""Models for the recipes and benchmarks, written here (torchvision is not a dependency).

- :func:`resnet18` / :func:`resnet34`: the CIFAR ResNets of the Sparse SAM code
  (3x3 stem with stride 1, no max-pool, four stages of basic blocks, global average
  pool; He et al., CVPR 2016, arXiv:1512.03385): 11.17M parameters for ResNet-18
  with 10 classes.
- :func:`resnet_small`: the same design at width 16 with one block per stage
  (0.31M parameters), for CPU runs.
- :func:`wrn28_10` / :func:`wrn16_4`: Wide ResNets (Zagoruyko and Komodakis, BMVC 2016,
  arXiv:1605.07146), pre-activation blocks, dropout 0 as in the Sparse SAM code:
  36.5M parameters for WRN-28-10 with 10 classes.
- :func:`resnet50`: the ImageNet ResNet-50 (7x7 stem, max-pool, bottleneck blocks with
  the stride on the 3x3 convolution, as torchvision's): 25.56M parameters.
- :func:`small_cnn`: a two-block CNN with BatchNorm for CPU runs on 28x28 images.

:func:`build` makes any of them by name (:data:`MODELS`).

Example::

    model = resnet18(num_classes=10)             # CIFAR-10
    model = build("wrn28-10", num_classes=100)   # CIFAR-100
    model = small_cnn(in_channels=1)             # Fashion-MNIST
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "MODELS",
    "ResNet",
    "WideResNet",
    "build",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet_small",
    "small_cnn",
    "wrn16_4",
    "wrn16_8",
    "wrn28_10",
]


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


def resnet_small(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """A CIFAR ResNet with one basic block per stage at width 16 (0.31M parameters at 10 classes), for CPU runs."""
    return ResNet((1, 1, 1, 1), num_classes, in_channels, width=16)


class WideBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, identity or 1x1 conv shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(torch.relu(self.bn2(self.conv1(out))))
        return out + skip


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: three stages of ``(depth - 4) / 6`` wide blocks of widths ``16 * widen * (1, 2, 4)``."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 (e.g. 16, 28, 40), got {depth}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        layers, in_planes = [], 16
        for i, planes in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for j in range(n):
                layers.append(WideBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def wrn28_10(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-28-10 (36.48M parameters at 10 classes)."""
    return WideResNet(28, 10, num_classes, in_channels)


def wrn16_4(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-16-4 (2.75M parameters at 10 classes)."""
    return WideResNet(16, 4, num_classes, in_channels)


def wrn16_8(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-16-8 (10.96M parameters at 10 classes): the model of GSAM's CIFAR-10 example (juntang-zhuang/GSAM)."""
    return WideResNet(16, 8, num_classes, in_channels)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BN; projection shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out_planes = 4 * planes
        self.body = nn.Sequential(
            nn.Conv2d(in_planes, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Sequential:
    """ImageNet ResNet-50 (25.56M parameters at 1000 classes), for 224x224 inputs."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]
    in_planes = 64
    for i, n in enumerate((3, 4, 6, 3)):
        planes = 64 * 2**i
        for j in range(n):
            layers.append(Bottleneck(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
            in_planes = 4 * planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_planes, num_classes)]
    return nn.Sequential(*layers)


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


#: Model constructors by name; each takes ``(num_classes, in_channels)``.
MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet-small": resnet_small,
    "wrn28-10": wrn28_10,
    "wrn16-4": wrn16_4,
    "wrn16-8": wrn16_8,
    "small-cnn": small_cnn,
}


def build(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The model ``name`` (a key of :data:`MODELS`) for ``num_classes`` classes and ``in_channels`` input channels."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes, in_channels)
