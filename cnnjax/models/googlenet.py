"""GoogLeNet / Inception v1 (Szegedy et al. 2014, arXiv:1409.4842) as torchvision builds it."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from cnnjax import nn
from cnnjax.models._blocks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConvBN,
    Stack,
    check_images,
    check_model_args,
    conv_bn,
    eval_flag,
    scale_width,
)

# (1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection) per Inception module, the paper's
# Table 1, grouped into the stages that max-pools separate (3a-3b, 4a-4e, 5a-5b).
_STAGES = (
    ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64)),
    (
        (192, 96, 208, 16, 48, 64),
        (160, 112, 224, 24, 64, 64),
        (128, 128, 256, 24, 64, 64),
        (112, 144, 288, 32, 64, 64),
        (256, 160, 320, 32, 128, 128),
    ),
    ((256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128)),
)


def basic_conv(in_features: int, out_features: int, kernel_size: int, strides: int = 1, *, rngs: nnx.Rngs) -> ConvBN:
    """torchvision's ``BasicConv2d``: a square conv without bias (padding ``kernel_size // 2``),
    BatchNorm with eps 0.001, ReLU.

    ``x: (N, H, W, in_features)`` -> ``(N, ceil(H / strides), ceil(W / strides), out_features)``
    for odd ``kernel_size``.

    >>> basic_conv(3, 8, 3, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 7, 7, 3)), train=False).shape
    (1, 4, 4, 8)
    """
    k = kernel_size
    return conv_bn(in_features, out_features, (k, k), strides, padding=k // 2, epsilon=1e-3, rngs=rngs)


class Inception(nnx.Module):
    """Four parallel branches concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 3x3; pool -> 1x1.

    ``features = (c1, c3_reduce, c3, c5_reduce, c5, pool_proj)``; the max-pool is 3x3, stride 1,
    padding 1. The third branch is 3x3 where the paper has 5x5: torchvision's known quirk
    (pytorch/vision issue 906), kept so the parameter count is torchvision's. Every conv is
    conv (no bias) -> BatchNorm (eps 0.001) -> ReLU.

    ``x: (N, H, W, in_features)`` -> ``(N, H, W, c1 + c3 + c5 + pool_proj)``.

    >>> block = Inception(8, (2, 2, 4, 2, 4, 2), rngs=nnx.Rngs(0))
    >>> block(jnp.ones((1, 5, 5, 8)), train=False).shape
    (1, 5, 5, 12)
    """

    def __init__(self, in_features: int, features: tuple[int, int, int, int, int, int], *, rngs: nnx.Rngs):
        c1, c3_reduce, c3, c5_reduce, c5, pool_proj = features
        self.branches = nnx.List(
            [
                basic_conv(in_features, c1, 1, rngs=rngs),
                Stack(basic_conv(in_features, c3_reduce, 1, rngs=rngs), basic_conv(c3_reduce, c3, 3, rngs=rngs)),
                Stack(basic_conv(in_features, c5_reduce, 1, rngs=rngs), basic_conv(c5_reduce, c5, 3, rngs=rngs)),
                Stack(nn.MaxPool((3, 3), 1, 1, ceil_mode=True), basic_conv(in_features, pool_proj, 1, rngs=rngs)),
            ]
        )
        self.out_features = c1 + c3 + c5 + pool_proj

    def __call__(self, x, train: bool | None = None):
        return jnp.concatenate([branch(x, train) for branch in self.branches], axis=-1)


class GoogLeNet(nnx.Module):
    """GoogLeNet without the auxiliary heads, torchvision's ``googlenet(aux_logits=False)``.

    Stem: conv 7x7/2 -> 64 (padding 3), max-pool 3/2, conv 1x1 -> 64, conv 3x3 -> 192 (padding 1),
    max-pool 3/2; then Inception 3a-3b, max-pool 3/2, 4a-4e, max-pool 2/2, 5a-5b (all pools
    ``ceil_mode``), global average pooling, dropout and a Linear layer: 6,624,904 trainable
    parameters for 1000 classes and 224x224 inputs, as torchvision. Every conv is
    conv (no bias) -> BatchNorm (eps 0.001) -> ReLU.

    ``small_input=True`` (28x28 or 32x32) replaces the stem with one conv 3x3 -> 192, stride 1
    (as CIFAR versions do), so the Inception stages run at 32, 16 and 8 pixels.
    ``width_multiplier`` scales every conv's channels.

    ``transform_input=True`` (3 input channels) maps images normalized with ImageNet's mean and
    std to the ``(x - 0.5) / 0.5`` normalization, channel ``c``:
    ``x * (std_c / 0.5) + (mean_c - 0.5) / 0.5``, as torchvision's ``transform_input``, which its
    ``googlenet(weights=...)`` turns on: its pretrained weights need it.

    ``x: (N, H, W, in_features)`` NHWC -> ``(N, num_classes)`` logits. BatchNorm uses batch
    statistics and updates its running averages (``nnx.BatchStat``), and Dropout is active, in
    training mode, the mode a new model starts in: ``model.eval()`` / ``model.train()`` switch it,
    ``model(x, train=...)`` overrides it for one call.

    >>> import jax
    >>> model = nnx.eval_shape(lambda: GoogLeNet(num_classes=1000, rngs=nnx.Rngs(0)))  # abstract: no weights
    >>> sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    6624904
    >>> nnx.eval_shape(lambda m, x: m(x, train=False), model, jnp.zeros((1, 224, 224, 3))).shape
    (1, 1000)
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_features: int = 3,
        small_input: bool = False,
        width_multiplier: float = 1.0,
        dropout_rate: float = 0.2,
        transform_input: bool = False,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        op = "GoogLeNet"
        num_classes, in_features, width_multiplier, dropout_rate = check_model_args(
            op, num_classes, in_features, width_multiplier, dropout_rate
        )
        if transform_input and in_features != 3:
            raise ValueError(f"GoogLeNet: transform_input=True needs in_features=3 (RGB), got {in_features}")
        c64, c192 = scale_width(64, width_multiplier), scale_width(192, width_multiplier)

        def pool(k):
            return nn.MaxPool((k, k), 2, ceil_mode=True)

        if small_input:
            layers = [basic_conv(in_features, c192, 3, rngs=rngs)]
        else:
            layers = [
                basic_conv(in_features, c64, 7, 2, rngs=rngs),
                pool(3),
                basic_conv(c64, c64, 1, rngs=rngs),
                basic_conv(c64, c192, 3, rngs=rngs),
                pool(3),
            ]
        features = c192
        for stage, next_pool in zip(_STAGES, (pool(3), pool(2), None), strict=True):
            for config in stage:
                layers.append(Inception(features, tuple(scale_width(c, width_multiplier) for c in config), rngs=rngs))
                features = layers[-1].out_features
            if next_pool is not None:
                layers.append(next_pool)
        self.in_features, self.small_input, self.width_multiplier = in_features, small_input, width_multiplier
        self.transform_input = transform_input
        self.features = Stack(*layers)
        self.pool = nn.GlobalAvgPool()
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.fc = nnx.Linear(features, num_classes, rngs=rngs)
        nn.set_impl(self, impl)

    def __call__(self, x, train: bool | None = None):
        check_images(x, self.in_features, "GoogLeNet")
        if self.transform_input:
            std, mean = (jnp.asarray(v, x.dtype).reshape(1, 1, 1, 3) for v in (IMAGENET_STD, IMAGENET_MEAN))
            x = x * (std / 0.5) + (mean - 0.5) / 0.5
        x = self.pool(self.features(x, train))
        return self.fc(self.dropout(x, deterministic=eval_flag(train)))
