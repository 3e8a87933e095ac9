"""VGG (Simonyan & Zisserman 2014, arXiv:1409.1556): stacks of 3x3 convs between max-pools."""

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
    conv_init,
    flatten,
    pooled_mlp_head,
    scale_width,
)
from cnnjax.shapes import check_positive


class VGG(nnx.Module):
    """VGG: for each stage, 3x3 convs (padding 1, ReLU) with the stage's widths, then max-pool 2/2.

    ``stage_features`` lists each stage's conv widths (the presets ``vgg11``, ``vgg13``,
    ``vgg16``, ``vgg19`` are the paper's configurations A, B, D, E); ``batch_norm=True`` puts a
    BatchNorm between each conv (which keeps its bias) and its ReLU, as torchvision's ``_bn``
    variants (presets ``vgg11_bn`` ... ``vgg19_bn``). After the convs: adaptive average pooling to
    7x7 and the classifier ``(Linear 4096 -> ReLU -> Dropout) x 2 -> Linear num_classes``, as
    torchvision's ``VGG`` (224x224 inputs, at least 32x32). Trainable parameters for 1000 classes,
    torchvision's: ``vgg11`` 132,863,336, ``vgg13`` 133,047,848, ``vgg16`` 138,357,544,
    ``vgg19`` 143,667,240; ``_bn``: 132,868,840, 133,053,736, 138,365,992, 143,678,248.

    ``small_input=True`` (28x28 or 32x32 images) keeps the convs but pools with ``"SAME"``
    padding (``ceil(n / 2)``, so five pools take 28 down to 1 as well as 32) and averages the last
    map to 1x1, so the classifier reads the last stage's width. ``width_multiplier`` scales every
    conv, ``hidden_features`` the two hidden Linear layers.

    ``x: (N, H, W, in_features)`` NHWC -> ``(N, num_classes)`` logits. Dropout is active in
    training mode, the mode a new model starts in: ``model.eval()`` / ``model.train()`` switch it,
    ``model(x, train=...)`` overrides it for one call.

    >>> import jax, jax.numpy as jnp
    >>> model = nnx.eval_shape(lambda: vgg16(num_classes=1000, rngs=nnx.Rngs(0)))  # abstract: no weights
    >>> sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    138357544
    >>> model = nnx.eval_shape(lambda: vgg11(small_input=True, rngs=nnx.Rngs(0)))
    >>> nnx.eval_shape(lambda m, x: m(x, train=False), model, jnp.zeros((2, 28, 28, 3))).shape
    (2, 10)
    """

    def __init__(
        self,
        *,
        stage_features: Sequence[Sequence[int]],
        num_classes: int = 10,
        in_features: int = 3,
        small_input: bool = False,
        width_multiplier: float = 1.0,
        hidden_features: int = 4096,
        dropout_rate: float = 0.5,
        batch_norm: bool = False,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        op = "VGG"
        num_classes, in_features, width_multiplier, dropout_rate = check_model_args(
            op, num_classes, in_features, width_multiplier, dropout_rate
        )
        hidden_features = check_positive(hidden_features, "hidden_features", op)
        if not stage_features or not all(stage_features):
            raise ValueError(f"VGG: stage_features={stage_features!r} must list one or more non-empty stages")
        layers, features = [], in_features
        for stage in stage_features:
            for width in stage:
                out = scale_width(check_positive(width, "stage_features", op), width_multiplier)
                conv = nn.Conv(features, out, (3, 3), padding=1, kernel_init=conv_init, rngs=rngs)
                layers += [ConvBN(conv, rngs=rngs)] if batch_norm else [conv, jax.nn.relu]
                features = out
            layers.append(nn.MaxPool((2, 2), 2, "SAME" if small_input else "VALID"))
        pooled = 1 if small_input else 7
        self.in_features, self.small_input, self.width_multiplier = in_features, small_input, width_multiplier
        self.hidden_features = hidden_features
        self.features = Stack(*layers)
        self.pool, self.classifier = pooled_mlp_head(
            features, pooled, hidden_features, num_classes, dropout_rate=dropout_rate, rngs=rngs
        )
        nn.set_impl(self, impl)

    def __call__(self, x, train: bool | None = None):
        check_images(x, self.in_features, "VGG")
        x = self.pool(self.features(x, train))
        return self.classifier(flatten(x), train)


# Configurations "A" (11 weight layers), "B" (13), "D" (16) and "E" (19) of the paper's Table 1.
_A = ((64,), (128,), (256, 256), (512, 512), (512, 512))
_B = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))
_D = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
_E = ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)
vgg11 = functools.partial(VGG, stage_features=_A)
"""VGG-11, configuration A (torchvision's ``vgg11``; 132,863,336 parameters at 1000 classes)."""
vgg13 = functools.partial(VGG, stage_features=_B)
"""VGG-13, configuration B (torchvision's ``vgg13``; 133,047,848 parameters at 1000 classes)."""
vgg16 = functools.partial(VGG, stage_features=_D)
"""VGG-16, configuration D (torchvision's ``vgg16``; 138,357,544 parameters at 1000 classes)."""
vgg19 = functools.partial(VGG, stage_features=_E)
"""VGG-19, configuration E (torchvision's ``vgg19``; 143,667,240 parameters at 1000 classes)."""
vgg11_bn = functools.partial(VGG, stage_features=_A, batch_norm=True)
"""VGG-11 with batch norm (torchvision's ``vgg11_bn``; 132,868,840 parameters at 1000 classes)."""
vgg13_bn = functools.partial(VGG, stage_features=_B, batch_norm=True)
"""VGG-13 with batch norm (torchvision's ``vgg13_bn``; 133,053,736 parameters at 1000 classes)."""
vgg16_bn = functools.partial(VGG, stage_features=_D, batch_norm=True)
"""VGG-16 with batch norm (torchvision's ``vgg16_bn``; 138,365,992 parameters at 1000 classes)."""
vgg19_bn = functools.partial(VGG, stage_features=_E, batch_norm=True)
"""VGG-19 with batch norm (torchvision's ``vgg19_bn``; 143,678,248 parameters at 1000 classes)."""
