"""ResNet (He et al. 2015, arXiv:1512.03385) as torchvision builds it (ResNet v1.5)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
from flax import nnx

from cnnjax import nn
from cnnjax.models._blocks import (
    Stack,
    check_images,
    check_model_args,
    conv_bn,
    scale_width,
)
from cnnjax.shapes import check_positive


def _shortcut(in_features: int, out_features: int, strides: int, rngs: nnx.Rngs):
    """Identity when the shapes agree, else a 1x1 conv with ``strides`` and BatchNorm (option B)."""
    if strides == 1 and in_features == out_features:
        return nnx.data(None)
    return conv_bn(in_features, out_features, (1, 1), strides, relu=False, rngs=rngs)


class _ResidualBlock(nnx.Module):
    """``relu(residual(x) + shortcut(x))``; subclasses build ``residual`` and ``shortcut``."""

    def __call__(self, x, train: bool | None = None):
        shortcut = x if self.shortcut is None else self.shortcut(x, train)
        return jax.nn.relu(self.residual(x, train) + shortcut)


class BasicBlock(_ResidualBlock):
    """Two 3x3 conv-BN layers plus the shortcut, then ReLU (ResNet-18/34).

    ``x: (N, H, W, in_features)`` -> ``(N, ceil(H / strides), ceil(W / strides), features)``.

    >>> import jax.numpy as jnp
    >>> BasicBlock(4, 8, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 6, 6, 4)), train=False).shape
    (1, 3, 3, 8)
    """

    expansion = 1

    def __init__(self, in_features: int, features: int, strides: int = 1, *, rngs: nnx.Rngs):
        self.residual = Stack(
            conv_bn(in_features, features, (3, 3), strides, padding=1, rngs=rngs),
            conv_bn(features, features, (3, 3), padding=1, relu=False, rngs=rngs),
        )
        self.shortcut = _shortcut(in_features, features, strides, rngs)


class Bottleneck(_ResidualBlock):
    """1x1 -> 3x3 (carrying the stride, torchvision's v1.5) -> 1x1 conv-BN layers plus the shortcut,
    then ReLU (ResNet-50 and deeper). Outputs ``4 * features`` channels.

    ``x: (N, H, W, in_features)`` -> ``(N, ceil(H / strides), ceil(W / strides), 4 * features)``.

    >>> import jax.numpy as jnp
    >>> Bottleneck(4, 2, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 6, 6, 4)), train=False).shape
    (1, 3, 3, 8)
    """

    expansion = 4

    def __init__(self, in_features: int, features: int, strides: int = 1, *, rngs: nnx.Rngs):
        out_features = features * self.expansion
        self.residual = Stack(
            conv_bn(in_features, features, (1, 1), rngs=rngs),
            conv_bn(features, features, (3, 3), strides, padding=1, rngs=rngs),
            conv_bn(features, out_features, (1, 1), relu=False, rngs=rngs),
        )
        self.shortcut = _shortcut(in_features, out_features, strides, rngs)


class ResNet(nnx.Module):
    """ResNet: a stem, four stages of residual ``block``s, global average pooling, a Linear layer.

    Stem: conv 7x7/2 -> 64 (padding 3), BatchNorm, ReLU, max-pool 3/2 (padding 1). Stage ``i``
    has ``stage_sizes[i]`` blocks of width ``64 * 2**i`` (times ``block.expansion`` outputs);
    stages after the first halve the size in their first block. Convs have no bias and are
    followed by BatchNorm (momentum 0.1 in PyTorch's terms, eps 1e-5); kernels are He-normal
    (fan-out), as torchvision. ``resnet18``, ``resnet34``, ``resnet50`` have torchvision's
    11,689,512, 21,797,672 and 25,557,032 trainable parameters for 1000 classes.

    ``small_input=True`` (28x28 or 32x32, CIFAR-style) makes the stem one 3x3 conv, stride 1,
    without the max-pool. ``width_multiplier`` scales every conv's channels (64 -> ``64 * m``).

    ``x: (N, H, W, in_features)`` NHWC -> ``(N, num_classes)`` logits. BatchNorm uses batch
    statistics and updates its running averages (``nnx.BatchStat``) in training mode, the mode a
    new model starts in; ``model.eval()`` / ``model.train()`` switch it, and
    ``model(x, train=...)`` overrides it for one call.

    >>> import jax.numpy as jnp
    >>> model = nnx.eval_shape(lambda: resnet50(num_classes=1000, rngs=nnx.Rngs(0)))  # abstract: no weights
    >>> sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    25557032
    >>> model = ResNet(stage_sizes=(1, 1), block=BasicBlock, small_input=True, width_multiplier=0.125, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 32, 32, 3)), train=False).shape
    (2, 10)
    """

    def __init__(
        self,
        *,
        stage_sizes: Sequence[int],
        block: type[BasicBlock] | type[Bottleneck],
        num_classes: int = 10,
        in_features: int = 3,
        small_input: bool = False,
        width_multiplier: float = 1.0,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        op = "ResNet"
        num_classes, in_features, width_multiplier, _ = check_model_args(op, num_classes, in_features, width_multiplier)
        if not stage_sizes:
            raise ValueError(f"ResNet: stage_sizes={stage_sizes!r} must list one or more stages")
        features = scale_width(64, width_multiplier)
        if small_input:
            layers = [conv_bn(in_features, features, (3, 3), padding=1, rngs=rngs)]
        else:
            layers = [conv_bn(in_features, features, (7, 7), 2, padding=3, rngs=rngs), nn.MaxPool((3, 3), 2, 1)]
        for i, size in enumerate(stage_sizes):
            width = scale_width(64 * 2**i, width_multiplier)
            for j in range(check_positive(size, "stage_sizes", op)):
                layers.append(block(features, width, 2 if i > 0 and j == 0 else 1, rngs=rngs))
                features = width * block.expansion
        self.in_features = in_features
        self.features = Stack(*layers)
        self.pool = nn.GlobalAvgPool()
        self.fc = nnx.Linear(features, num_classes, rngs=rngs)
        nn.set_impl(self, impl)

    def __call__(self, x, train: bool | None = None):
        check_images(x, self.in_features, "ResNet")
        return self.fc(self.pool(self.features(x, train)))


resnet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
resnet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
resnet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
