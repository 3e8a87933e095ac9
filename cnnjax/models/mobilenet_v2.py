"""MobileNet v2 (Sandler et al. 2018, arXiv:1801.04381): inverted residuals and linear bottlenecks."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
from flax import nnx

from cnnjax import nn
from cnnjax.models._blocks import (
    ConvBN,
    Stack,
    check_images,
    check_model_args,
    conv_bn,
    conv_init,
    eval_flag,
    scale_width,
)
from cnnjax.shapes import check_positive

# (expansion t, output channels c, repeats n, first stride s) per stage, the paper's Table 2.
INVERTED_RESIDUALS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nnx.Module):
    """Expand (1x1 conv-BN-ReLU6, skipped when ``expand_ratio == 1``) -> 3x3 depthwise conv-BN-ReLU6
    (with the stride) -> linear 1x1 conv-BN, plus the input when ``strides == 1`` and the channel
    counts agree. The inner width is ``round(in_features * expand_ratio)``; convs have no bias.

    ``x: (N, H, W, in_features)`` -> ``(N, ceil(H / strides), ceil(W / strides), out_features)``.

    >>> import jax.numpy as jnp
    >>> InvertedResidual(4, 8, 2, expand_ratio=6, rngs=nnx.Rngs(0))(jnp.ones((1, 6, 6, 4)), train=False).shape
    (1, 3, 3, 8)
    """

    def __init__(self, in_features: int, out_features: int, strides: int, *, expand_ratio: int, rngs: nnx.Rngs):
        hidden = round(in_features * check_positive(expand_ratio, "expand_ratio", "InvertedResidual"))
        expand = [conv_bn(in_features, hidden, (1, 1), activation=jax.nn.relu6, rngs=rngs)] if expand_ratio != 1 else []
        depthwise = nn.DepthwiseConv(
            hidden, (3, 3), strides, padding=1, use_bias=False, kernel_init=conv_init, rngs=rngs
        )
        self.layers = Stack(
            *expand,
            ConvBN(depthwise, activation=jax.nn.relu6, rngs=rngs),
            conv_bn(hidden, out_features, (1, 1), activation=None, rngs=rngs),
        )
        self.residual = strides == 1 and in_features == out_features

    def __call__(self, x, train: bool | None = None):
        y = self.layers(x, train)
        return x + y if self.residual else y


class MobileNetV2(nnx.Module):
    """MobileNet v2 as torchvision builds it: conv 3x3/2 -> 32 (BN, ReLU6), the stages of
    ``inverted_residual_setting`` (rows ``(t, c, n, s)``: ``n`` :class:`InvertedResidual` blocks of
    expansion ``t`` and ``c`` outputs, the first with stride ``s``), conv 1x1 -> 1280 (BN, ReLU6),
    global average pooling, dropout and a Linear layer. ``mobilenet_v2`` (the paper's Table 2) has
    torchvision's 3,504,872 trainable parameters for 1000 classes.

    ``small_input=True`` (28x28 or 32x32) makes the first conv stride 1, leaving a 2x2 map at
    the end. ``width_multiplier`` scales every layer's channels but the last conv's 1280, which
    only grows (``width_multiplier > 1``), as in the paper.

    ``x: (N, H, W, in_features)`` NHWC -> ``(N, num_classes)`` logits. BatchNorm uses batch
    statistics and updates its running averages (``nnx.BatchStat``), and Dropout is active, in
    training mode, the mode a new model starts in: ``model.eval()`` / ``model.train()`` switch it,
    ``model(x, train=...)`` overrides it for one call.

    >>> import jax, jax.numpy as jnp
    >>> model = nnx.eval_shape(lambda: mobilenet_v2(num_classes=1000, rngs=nnx.Rngs(0)))  # abstract: no weights
    >>> sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    3504872
    >>> nnx.eval_shape(lambda m, x: m(x, train=False), model, jnp.zeros((1, 224, 224, 3))).shape
    (1, 1000)
    """

    def __init__(
        self,
        *,
        inverted_residual_setting: Sequence[tuple[int, int, int, int]] = INVERTED_RESIDUALS,
        num_classes: int = 10,
        in_features: int = 3,
        small_input: bool = False,
        width_multiplier: float = 1.0,
        dropout_rate: float = 0.2,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        op = "MobileNetV2"
        num_classes, in_features, width_multiplier, dropout_rate = check_model_args(
            op, num_classes, in_features, width_multiplier, dropout_rate
        )
        if not inverted_residual_setting or any(len(row) != 4 for row in inverted_residual_setting):
            raise ValueError(
                f"MobileNetV2: inverted_residual_setting={inverted_residual_setting!r} must list one or more "
                "(expand_ratio, channels, repeats, stride) rows"
            )
        features = scale_width(32, width_multiplier)
        layers = [
            conv_bn(
                in_features, features, (3, 3), 1 if small_input else 2, padding=1, activation=jax.nn.relu6, rngs=rngs
            )
        ]
        for expand_ratio, channels, repeats, strides in inverted_residual_setting:
            out = scale_width(check_positive(channels, "channels", op), width_multiplier)
            for j in range(check_positive(repeats, "repeats", op)):
                stride = check_positive(strides, "stride", op) if j == 0 else 1
                layers.append(InvertedResidual(features, out, stride, expand_ratio=expand_ratio, rngs=rngs))
                features = out
        last = scale_width(1280, max(1.0, width_multiplier))
        layers.append(conv_bn(features, last, (1, 1), activation=jax.nn.relu6, rngs=rngs))
        self.in_features, self.small_input, self.width_multiplier = in_features, small_input, width_multiplier
        self.features = Stack(*layers)
        self.pool = nn.GlobalAvgPool()
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.classifier = nnx.Linear(last, num_classes, kernel_init=nnx.initializers.normal(0.01), rngs=rngs)
        nn.set_impl(self, impl)

    def __call__(self, x, train: bool | None = None):
        check_images(x, self.in_features, "MobileNetV2")
        x = self.pool(self.features(x, train))
        return self.classifier(self.dropout(x, deterministic=eval_flag(train)))


mobilenet_v2 = functools.partial(MobileNetV2, inverted_residual_setting=INVERTED_RESIDUALS)
"""MobileNet v2 (torchvision's ``mobilenet_v2``; 3,504,872 parameters at 1000 classes)."""
