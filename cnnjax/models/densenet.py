"""DenseNet (Huang et al. 2016, arXiv:1608.06993) as torchvision builds it (DenseNet-BC)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cnnjax import nn
from cnnjax.models._blocks import (
    Stack,
    batch_norm,
    check_images,
    check_model_args,
    conv_bn,
    conv_init,
    eval_flag,
    scale_width,
)
from cnnjax.shapes import check_positive


class NormReLUConv(nnx.Module):
    """Pre-activation unit: BatchNorm -> ReLU -> bias-free conv (``padding = kernel_size // 2``).

    ``x: (N, H, W, in_features)`` -> ``(N, H, W, out_features)``.

    >>> NormReLUConv(4, 8, 3, rngs=nnx.Rngs(0))(jnp.ones((1, 5, 5, 4)), train=False).shape
    (1, 5, 5, 8)
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, rngs: nnx.Rngs):
        k = kernel_size
        self.norm = batch_norm(in_features, rngs=rngs)
        self.conv = nn.Conv(
            in_features, out_features, (k, k), padding=k // 2, use_bias=False, kernel_init=conv_init, rngs=rngs
        )

    def __call__(self, x, train: bool | None = None):
        return self.conv(jax.nn.relu(self.norm(x, eval_flag(train))))


class DenseLayer(nnx.Module):
    """Bottleneck layer: 1x1 -> ``bn_size * growth_rate``, 3x3 -> ``growth_rate``, both pre-activated,
    its output concatenated after its input.

    ``x: (N, H, W, C)`` -> ``(N, H, W, C + growth_rate)``.

    >>> DenseLayer(4, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 5, 5, 4)), train=False).shape
    (1, 5, 5, 6)
    """

    def __init__(self, in_features: int, growth_rate: int, *, bn_size: int = 4, rngs: nnx.Rngs):
        self.layers = Stack(
            NormReLUConv(in_features, bn_size * growth_rate, 1, rngs=rngs),
            NormReLUConv(bn_size * growth_rate, growth_rate, 3, rngs=rngs),
        )

    def __call__(self, x, train: bool | None = None):
        return jnp.concatenate([x, self.layers(x, train)], axis=-1)


def transition(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> Stack:
    """Between dense blocks: pre-activated 1x1 conv to ``out_features``, then average-pool 2/2.

    ``x: (N, H, W, in_features)`` -> ``(N, floor(H / 2), floor(W / 2), out_features)``.

    >>> transition(4, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 5, 5, 4)), train=False).shape
    (1, 2, 2, 2)
    """
    return Stack(NormReLUConv(in_features, out_features, 1, rngs=rngs), nn.AvgPool((2, 2), 2))


class DenseNet(nnx.Module):
    """DenseNet-BC: a stem, dense blocks of ``stage_sizes[i]`` layers joined by transitions that halve
    the channels and the size, a final BatchNorm + ReLU, global average pooling, a Linear layer.

    Stem: conv 7x7/2 -> ``num_init_features`` (padding 3), BatchNorm, ReLU, max-pool 3/2
    (padding 1). Each dense layer adds ``growth_rate`` channels. The defaults are DenseNet-121
    (``densenet121``). Trainable parameters for 1000 classes, as torchvision: ``densenet121``
    7,978,856, ``densenet161`` 28,681,000, ``densenet169`` 14,149,480, ``densenet201`` 20,013,928.

    ``small_input=True`` (28x28 or 32x32) makes the stem one 3x3 conv, stride 1, without the
    max-pool. ``width_multiplier`` scales ``growth_rate`` and ``num_init_features``.

    ``x: (N, H, W, in_features)`` NHWC -> ``(N, num_classes)`` logits. BatchNorm uses batch
    statistics and updates its running averages (``nnx.BatchStat``) in training mode, the mode a
    new model starts in; ``model.eval()`` / ``model.train()`` switch it, and
    ``model(x, train=...)`` overrides it for one call.

    >>> model = DenseNet(stage_sizes=(1, 1), growth_rate=4, num_init_features=8, small_input=True, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 28, 28, 3)), train=False).shape
    (2, 10)
    >>> model.eval()  # running statistics from now on; model.train() switches back
    >>> model(jnp.zeros((2, 28, 28, 3))).shape
    (2, 10)
    """

    def __init__(
        self,
        *,
        stage_sizes: Sequence[int] = (6, 12, 24, 16),
        growth_rate: int = 32,
        num_init_features: int = 64,
        bn_size: int = 4,
        num_classes: int = 10,
        in_features: int = 3,
        small_input: bool = False,
        width_multiplier: float = 1.0,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        op = "DenseNet"
        num_classes, in_features, width_multiplier, _ = check_model_args(op, num_classes, in_features, width_multiplier)
        bn_size = check_positive(bn_size, "bn_size", op)
        growth_rate = scale_width(check_positive(growth_rate, "growth_rate", op), width_multiplier)
        features = scale_width(check_positive(num_init_features, "num_init_features", op), width_multiplier)
        if not stage_sizes:
            raise ValueError(f"DenseNet: stage_sizes={stage_sizes!r} must list one or more dense blocks")
        if small_input:
            layers = [conv_bn(in_features, features, (3, 3), padding=1, rngs=rngs)]
        else:
            layers = [conv_bn(in_features, features, (7, 7), 2, padding=3, rngs=rngs), nn.MaxPool((3, 3), 2, 1)]
        for i, size in enumerate(stage_sizes):
            for _ in range(check_positive(size, "stage_sizes", op)):
                layers.append(DenseLayer(features, growth_rate, bn_size=bn_size, rngs=rngs))
                features += growth_rate
            if i < len(stage_sizes) - 1:
                layers.append(transition(features, features // 2, rngs=rngs))
                features //= 2
        self.in_features, self.small_input, self.width_multiplier = in_features, small_input, width_multiplier
        self.features = Stack(*layers)
        self.norm = batch_norm(features, rngs=rngs)
        self.pool = nn.GlobalAvgPool()
        self.classifier = nnx.Linear(features, num_classes, rngs=rngs)
        nn.set_impl(self, impl)

    def __call__(self, x, train: bool | None = None):
        check_images(x, self.in_features, "DenseNet")
        x = jax.nn.relu(self.norm(self.features(x, train), eval_flag(train)))
        return self.classifier(self.pool(x))


densenet121 = functools.partial(DenseNet, stage_sizes=(6, 12, 24, 16), growth_rate=32, num_init_features=64)
"""DenseNet-121 (torchvision's ``densenet121``; 7,978,856 parameters at 1000 classes)."""
densenet161 = functools.partial(DenseNet, stage_sizes=(6, 12, 36, 24), growth_rate=48, num_init_features=96)
"""DenseNet-161 (torchvision's ``densenet161``; 28,681,000 parameters at 1000 classes)."""
densenet169 = functools.partial(DenseNet, stage_sizes=(6, 12, 32, 32), growth_rate=32, num_init_features=64)
"""DenseNet-169 (torchvision's ``densenet169``; 14,149,480 parameters at 1000 classes)."""
densenet201 = functools.partial(DenseNet, stage_sizes=(6, 12, 48, 32), growth_rate=32, num_init_features=64)
"""DenseNet-201 (torchvision's ``densenet201``; 20,013,928 parameters at 1000 classes)."""
