"""MobileNet v1 (Howard et al. 2017, arXiv:1704.04861): depthwise-separable convolutions."""

from __future__ import annotations

from flax import nnx

from cnnjax import nn
from cnnjax.models._blocks import (
    ConvBN,
    Stack,
    check_images,
    check_model_args,
    conv_bn,
    eval_flag,
    scale_width,
)

# He normal with fan-in 9: each depthwise output reads 9 inputs, so this keeps the activations'
# scale (torchvision's fan-out, 9 * C, would shrink them by the channel count at every block).
_depthwise_init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")

# (output channels, stride) of the 13 depthwise-separable blocks, the paper's Table 1.
_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    *((512, 1),) * 5,
    (1024, 2),
    (1024, 1),
)


def depthwise_separable(in_features: int, out_features: int, strides: int = 1, *, rngs: nnx.Rngs) -> Stack:
    """3x3 depthwise conv (padding 1, ``strides``) -> BN -> ReLU -> 1x1 conv -> BN -> ReLU.

    Parameters: ``9 * C_in`` + ``C_in * C_out`` weights (no biases) and two BatchNorms, against
    ``9 * C_in * C_out`` for a full 3x3 conv (docs/convolutions.md).
    ``x: (N, H, W, in_features)`` -> ``(N, ceil(H / strides), ceil(W / strides), out_features)``.

    >>> import jax.numpy as jnp
    >>> depthwise_separable(4, 8, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 6, 6, 4)), train=False).shape
    (1, 3, 3, 8)
    """
    depthwise = nn.DepthwiseConv(
        in_features, (3, 3), strides, padding=1, use_bias=False, kernel_init=_depthwise_init, rngs=rngs
    )
    return Stack(ConvBN(depthwise, rngs=rngs), conv_bn(in_features, out_features, (1, 1), rngs=rngs))


class MobileNetV1(nnx.Module):
    """MobileNet v1: conv 3x3/2 -> 32, 13 depthwise-separable blocks, global average pooling, dropout,
    a Linear layer. Every conv is bias-free and followed by BatchNorm and ReLU.

    ``width_multiplier`` is the paper's alpha (every layer's channels times alpha). With
    ``alpha = 1`` and 1000 classes: 4,231,976 trainable parameters (the paper's 4.2 million;
    Keras's ``MobileNet`` has the same layers, with a 1x1 conv for the Linear layer).

    ``small_input=True`` (28x28 or 32x32) makes the first conv stride 1, so the blocks' four
    stride-2 steps leave a 2x2 map.

    ``x: (N, H, W, in_features)`` NHWC -> ``(N, num_classes)`` logits. BatchNorm uses batch
    statistics and updates its running averages (``nnx.BatchStat``), and Dropout is active, in
    training mode, the mode a new model starts in: ``model.eval()`` / ``model.train()`` switch it,
    ``model(x, train=...)`` overrides it for one call.

    >>> import jax, jax.numpy as jnp
    >>> model = nnx.eval_shape(lambda: MobileNetV1(num_classes=1000, rngs=nnx.Rngs(0)))  # abstract: no weights
    >>> sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    4231976
    >>> model = nnx.eval_shape(lambda: MobileNetV1(small_input=True, width_multiplier=0.25, rngs=nnx.Rngs(0)))
    >>> nnx.eval_shape(lambda m, x: m(x, train=False), model, jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_features: int = 3,
        small_input: bool = False,
        width_multiplier: float = 1.0,
        dropout_rate: float = 0.0,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        op = "MobileNetV1"
        num_classes, in_features, width_multiplier, dropout_rate = check_model_args(
            op, num_classes, in_features, width_multiplier, dropout_rate
        )
        features = scale_width(32, width_multiplier)
        layers = [conv_bn(in_features, features, (3, 3), 1 if small_input else 2, padding=1, rngs=rngs)]
        for out, strides in _BLOCKS:
            out = scale_width(out, width_multiplier)
            layers.append(depthwise_separable(features, out, strides, rngs=rngs))
            features = out
        self.in_features = in_features
        self.features = Stack(*layers)
        self.pool = nn.GlobalAvgPool()
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.fc = nnx.Linear(features, num_classes, rngs=rngs)
        nn.set_impl(self, impl)

    def __call__(self, x, train: bool | None = None):
        check_images(x, self.in_features, "MobileNetV1")
        x = self.pool(self.features(x, train))
        return self.fc(self.dropout(x, deterministic=eval_flag(train)))
