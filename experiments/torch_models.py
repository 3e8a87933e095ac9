"""PyTorch twins of cnnjax's LeNet-5 and ResNets, for side-by-side timings (``experiments/bench_training.py``).

Each has exactly the trainable-parameter count of its cnnjax model (the benchmark asserts it):

- ``LeNet5``: ``cnnjax.models.LeNet5`` (docs/models.md: sigmoid and average pooling, 28x28 inputs,
  61,706 parameters). It flattens NCHW maps where cnnjax flattens NHWC ones: the same layer
  sizes, another order of the 400 features, which a timing does not see.
- ``resnet18`` / ``resnet50``: ``cnnjax.models.resnet18/50`` (torchvision's ResNet v1.5: the
  bottleneck's stride on its 3x3 conv, a 1x1 conv + BatchNorm shortcut where the shape changes).
  ``small_input=True`` is cnnjax's CIFAR stem: one 3x3 stride-1 conv, no max-pool.

Inputs are NCHW, as everywhere in PyTorch; pass ``channels_last`` tensors for the NHWC memory
layout. Not an import of torchvision, which is not a dependency.

    >>> import torch
    >>> sum(p.numel() for p in resnet18(num_classes=10, small_input=True).parameters())
    11173962
"""

from __future__ import annotations

import functools

from torch import nn


class LeNet5(nn.Sequential):
    """``(N, in_features, 28, 28)`` -> ``(N, num_classes)`` logits; layers as ``cnnjax.models.LeNet5``."""

    def __init__(self, num_classes: int = 10, in_features: int = 1):
        super().__init__(
            nn.Conv2d(in_features, 6, 5, padding=2),
            nn.Sigmoid(),
            nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.Sigmoid(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.Sigmoid(),
            nn.Linear(120, 84),
            nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )


def _conv_bn(in_features: int, out_features: int, kernel_size: int, stride: int = 1, relu: bool = True):
    """A bias-free conv (PyTorch padding ``kernel_size // 2``), BatchNorm, then optional ReLU."""
    layers = [
        nn.Conv2d(in_features, out_features, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_features),
    ]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class _Residual(nn.Module):
    """``relu(residual(x) + shortcut(x))``; the shortcut is a 1x1 conv-BN when the shape changes."""

    expansion = 1

    def __init__(self, residual: nn.Module, in_features: int, out_features: int, stride: int):
        super().__init__()
        self.residual = residual
        changes_shape = stride != 1 or in_features != out_features
        self.shortcut = _conv_bn(in_features, out_features, 1, stride, relu=False) if changes_shape else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.residual(x) + self.shortcut(x))


class BasicBlock(_Residual):
    """Two 3x3 conv-BN layers (ResNet-18/34)."""

    def __init__(self, in_features: int, features: int, stride: int = 1):
        residual = nn.Sequential(
            _conv_bn(in_features, features, 3, stride), _conv_bn(features, features, 3, relu=False)
        )
        super().__init__(residual, in_features, features, stride)


class Bottleneck(_Residual):
    """1x1 -> 3x3 (with the stride, v1.5) -> 1x1 conv-BN layers, ``4 * features`` outputs (ResNet-50)."""

    expansion = 4

    def __init__(self, in_features: int, features: int, stride: int = 1):
        out_features = features * self.expansion
        residual = nn.Sequential(
            _conv_bn(in_features, features, 1),
            _conv_bn(features, features, 3, stride),
            _conv_bn(features, out_features, 1, relu=False),
        )
        super().__init__(residual, in_features, out_features, stride)


class ResNet(nn.Sequential):
    """``(N, in_features, H, W)`` -> ``(N, num_classes)``; stem, four stages, global average pool, Linear."""

    def __init__(
        self,
        stage_sizes,
        block: type[_Residual],
        num_classes: int = 1000,
        in_features: int = 3,
        small_input: bool = False,
    ):
        if small_input:
            stem = [_conv_bn(in_features, 64, 3)]
        else:
            stem = [_conv_bn(in_features, 64, 7, 2), nn.MaxPool2d(3, 2, 1)]
        blocks, features = [], 64
        for i, size in enumerate(stage_sizes):
            width = 64 * 2**i
            for j in range(size):
                blocks.append(block(features, width, 2 if i > 0 and j == 0 else 1))
                features = width * block.expansion
        super().__init__(*stem, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features, num_classes))


resnet18 = functools.partial(ResNet, (2, 2, 2, 2), BasicBlock)
resnet50 = functools.partial(ResNet, (3, 4, 6, 3), Bottleneck)
