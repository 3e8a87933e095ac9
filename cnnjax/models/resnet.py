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
    return conv_bn(in_features, out_features, (1, 1), strides, activation=None, rngs=rngs)


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

    def __init__(
        self,
        in_features: int,
        features: int,
        strides: int = 1,
        *,
        groups: int = 1,
        base_width: int = 64,
        rngs: nnx.Rngs,
    ):
        if groups != 1 or base_width != 64:
            raise ValueError(
                f"BasicBlock: groups={groups} and base_width={base_width} must be 1 and 64 "
                "(grouped and wide ResNets use Bottleneck blocks)"
            )
        self.residual = Stack(
            conv_bn(in_features, features, (3, 3), strides, padding=1, rngs=rngs),
            conv_bn(features, features, (3, 3), padding=1, activation=None, rngs=rngs),
        )
        self.shortcut = _shortcut(in_features, features, strides, rngs)


class Bottleneck(_ResidualBlock):
    """1x1 -> 3x3 (carrying the stride, torchvision's v1.5) -> 1x1 conv-BN layers plus the shortcut,
    then ReLU (ResNet-50 and deeper). Outputs ``4 * features`` channels.

    The inner width is ``int(features * base_width / 64) * groups`` and the 3x3 conv has ``groups``
    groups, as torchvision: ResNeXt (arXiv:1611.05431) is ``groups=32, base_width=4`` (or 8), the
    wide ResNet-50-2 ``base_width=128`` (arXiv:1605.07146).

    ``x: (N, H, W, in_features)`` -> ``(N, ceil(H / strides), ceil(W / strides), 4 * features)``.

    >>> import jax.numpy as jnp
    >>> Bottleneck(4, 2, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 6, 6, 4)), train=False).shape
    (1, 3, 3, 8)
    >>> Bottleneck(4, 4, groups=2, base_width=32, rngs=nnx.Rngs(0)).residual.layers[1].conv.kernel.shape
    (3, 3, 2, 4)
    """

    expansion = 4

    def __init__(
        self,
        in_features: int,
        features: int,
        strides: int = 1,
        *,
        groups: int = 1,
        base_width: int = 64,
        rngs: nnx.Rngs,
    ):
        groups = check_positive(groups, "groups", "Bottleneck")
        width = int(features * check_positive(base_width, "base_width", "Bottleneck") / 64) * groups
        out_features = features * self.expansion
        self.residual = Stack(
            conv_bn(in_features, width, (1, 1), rngs=rngs),
            conv_bn(width, width, (3, 3), strides, padding=1, feature_group_count=groups, rngs=rngs),
            conv_bn(width, out_features, (1, 1), activation=None, rngs=rngs),
        )
        self.shortcut = _shortcut(in_features, out_features, strides, rngs)


class ResNet(nnx.Module):
    """ResNet: a stem, four stages of residual ``block``s, global average pooling, a Linear layer.

    Stem: conv 7x7/2 -> 64 (padding 3), BatchNorm, ReLU, max-pool 3/2 (padding 1). Stage ``i``
    has ``stage_sizes[i]`` blocks of width ``64 * 2**i`` (times ``block.expansion`` outputs);
    stages after the first halve the size in their first block. Convs have no bias and are
    followed by BatchNorm (momentum 0.1 in PyTorch's terms, eps 1e-5); kernels are He-normal
    (fan-out), as torchvision. ``groups`` and ``width_per_group`` reach the :class:`Bottleneck`
    blocks (ResNeXt, wide ResNet). For 1000 classes the presets have torchvision's trainable
    parameter counts: ``resnet18`` 11,689,512, ``resnet34`` 21,797,672, ``resnet50`` 25,557,032,
    ``resnet101`` 44,549,160, ``resnet152`` 60,192,808, ``resnext50_32x4d`` 25,028,904,
    ``resnext101_32x8d`` 88,791,336, ``wide_resnet50_2`` 68,883,240.

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
        groups: int = 1,
        width_per_group: int = 64,
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
                strides = 2 if i > 0 and j == 0 else 1
                layers.append(block(features, width, strides, groups=groups, base_width=width_per_group, rngs=rngs))
                features = width * block.expansion
        self.in_features, self.small_input, self.width_multiplier = in_features, small_input, width_multiplier
        self.stage_sizes = tuple(stage_sizes)
        self.features = Stack(*layers)
        self.pool = nn.GlobalAvgPool()
        self.fc = nnx.Linear(features, num_classes, rngs=rngs)
        nn.set_impl(self, impl)

    def __call__(self, x, train: bool | None = None):
        check_images(x, self.in_features, "ResNet")
        return self.fc(self.pool(self.features(x, train)))


resnet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
"""ResNet-18 (torchvision's ``resnet18``; 11,689,512 parameters at 1000 classes)."""
resnet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock)
"""ResNet-34 (torchvision's ``resnet34``; 21,797,672 parameters at 1000 classes)."""
resnet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)
"""ResNet-50 v1.5 (torchvision's ``resnet50``; 25,557,032 parameters at 1000 classes)."""
resnet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block=Bottleneck)
"""ResNet-101 (torchvision's ``resnet101``; 44,549,160 parameters at 1000 classes)."""
resnet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block=Bottleneck)
"""ResNet-152 (torchvision's ``resnet152``; 60,192,808 parameters at 1000 classes)."""
resnext50_32x4d = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck, groups=32, width_per_group=4)
"""ResNeXt-50 32x4d (torchvision's ``resnext50_32x4d``; 25,028,904 parameters at 1000 classes)."""
resnext101_32x8d = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block=Bottleneck, groups=32, width_per_group=8)
"""ResNeXt-101 32x8d (torchvision's ``resnext101_32x8d``; 88,791,336 parameters at 1000 classes)."""
wide_resnet50_2 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck, width_per_group=128)
"""Wide ResNet-50-2 (torchvision's ``wide_resnet50_2``; 68,883,240 parameters at 1000 classes)."""
