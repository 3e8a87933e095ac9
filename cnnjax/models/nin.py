"""Network in Network (Lin et al. 2013, arXiv:1312.4400) in the d2l form the notes follow."""

from __future__ import annotations

import jax
from flax import nnx

from cnnjax import nn
from cnnjax.models._blocks import (
    Stack,
    check_images,
    check_model_args,
    conv_init,
    eval_flag,
    scale_width,
)


def nin_block(in_features: int, out_features: int, kernel_size: int, strides: int, padding: int, *, rngs: nnx.Rngs):
    """An "mlpconv" block: a ``kernel_size`` conv then two 1x1 convs, each followed by ReLU.

    ``x: (N, H, W, in_features)`` -> ``(N, H', W', out_features)`` with
    ``H' = floor((H + 2*padding - kernel_size) / strides) + 1``.

    >>> import jax.numpy as jnp
    >>> nin_block(3, 8, 3, 1, 1, rngs=nnx.Rngs(0))(jnp.ones((1, 6, 6, 3))).shape
    (1, 6, 6, 8)
    """

    def conv(i, k, s, p):
        return nn.Conv(i, out_features, (k, k), s, padding=p, kernel_init=conv_init, rngs=rngs)

    return Stack(
        conv(in_features, kernel_size, strides, padding),
        jax.nn.relu,
        conv(out_features, 1, 1, 0),
        jax.nn.relu,
        conv(out_features, 1, 1, 0),
        jax.nn.relu,
    )


class NiN(nnx.Module):
    """NiN: mlpconv blocks and max-pools, no dense layers; global average pooling reads the classes.

    Layers (d2l): block(11x11/4 -> 96), max-pool 3/2, block(5x5 -> 256, padding 2), max-pool
    3/2, block(3x3 -> 384, padding 1), max-pool 3/2, dropout, block(3x3 -> ``num_classes``,
    padding 1), global average pooling. As in d2l and the paper's Caffe model, the last block ends
    in ReLU too, so the logits are >= 0. ImageNet-size inputs are 224x224.

    ``small_input=True`` (28x28 or 32x32) makes the first block 3x3, stride 1, padding 1.
    ``width_multiplier`` scales the three hidden blocks' widths.

    ``x: (N, H, W, in_features)`` NHWC -> ``(N, num_classes)`` logits. Dropout is active in
    training mode, the mode a new model starts in: ``model.eval()`` / ``model.train()`` switch it,
    ``model(x, train=...)`` overrides it for one call.

    >>> import jax.numpy as jnp
    >>> model = nnx.eval_shape(lambda: NiN(small_input=True, rngs=nnx.Rngs(0)))  # abstract: no weights
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
        dropout_rate: float = 0.5,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        op = "NiN"
        num_classes, in_features, width_multiplier, dropout_rate = check_model_args(
            op, num_classes, in_features, width_multiplier, dropout_rate
        )
        c1, c2, c3 = (scale_width(c, width_multiplier) for c in (96, 256, 384))
        stem = (3, 1, 1) if small_input else (11, 4, 0)
        self.in_features = in_features
        self.features = Stack(
            nin_block(in_features, c1, *stem, rngs=rngs),
            nn.MaxPool((3, 3), 2),
            nin_block(c1, c2, 5, 1, 2, rngs=rngs),
            nn.MaxPool((3, 3), 2),
            nin_block(c2, c3, 3, 1, 1, rngs=rngs),
            nn.MaxPool((3, 3), 2),
        )
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.classifier = nin_block(c3, num_classes, 3, 1, 1, rngs=rngs)
        self.pool = nn.GlobalAvgPool()
        nn.set_impl(self, impl)

    def __call__(self, x, train: bool | None = None):
        check_images(x, self.in_features, "NiN")
        x = self.dropout(self.features(x), deterministic=eval_flag(train))
        return self.pool(self.classifier(x))
