"""Pieces the model zoo shares: width scaling, input checks, the train/eval flag, conv-BN-activation.

Every model takes NHWC images and follows Flax NNX's mode convention: ``model.train()`` /
``model.eval()`` set the ``use_running_average`` and ``deterministic`` flags of its BatchNorm and
Dropout layers, and ``model(x, train=...)`` overrides them for one call (``train=None`` keeps the
modules' mode). :func:`eval_flag` turns ``train`` into the flag those layers take.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cnnjax import nn
from cnnjax.shapes import check_positive

# ImageNet's per-channel (RGB) mean and std: torchvision's ImageNet weights expect (x - mean) / std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# He (Kaiming) normal with fan-out, the init torchvision gives ResNet, VGG and MobileNet v2 convs.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def scale_width(features: int, width_multiplier: float) -> int:
    """``features * width_multiplier`` rounded to the nearest int, at least 1."""
    return max(1, round(features * width_multiplier))


def check_images(x, in_features: int, op: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a batch of NHWC images with ``in_features`` channels.

    Reads ``x.shape`` in Python, a symbolic batch included (``jax.export``, ``jax2onnx``, which
    replaces ``jnp.shape`` by a traced op while it converts)."""
    shape = x.shape if hasattr(x, "shape") else jnp.shape(x)
    if len(shape) != 4 or shape[-1] != in_features:
        raise ValueError(f"{op}: x must be NHWC images (N, H, W, {in_features}), got shape {shape}")


def check_model_args(
    op: str, num_classes: int, in_features: int, width_multiplier: float = 1.0, dropout_rate: float = 0.0
) -> tuple[int, int, float, float]:
    """Validate the arguments the zoo's models share; return them as
    ``(num_classes, in_features, width_multiplier, dropout_rate)``.

    Raises ``ValueError`` unless the two counts are positive ints, ``width_multiplier > 0`` and
    ``0 <= dropout_rate < 1``."""
    if not width_multiplier > 0:
        raise ValueError(f"{op}: width_multiplier={width_multiplier!r} must be > 0")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"{op}: dropout_rate={dropout_rate!r} must be in [0, 1)")
    return (
        check_positive(num_classes, "num_classes", op),
        check_positive(in_features, "in_features", op),
        float(width_multiplier),
        float(dropout_rate),
    )


def flatten(x):
    """``(N, ...)`` -> ``(N, prod(...))``, also for an empty batch (where ``reshape(N, -1)`` fails).

    >>> flatten(jnp.zeros((0, 2, 3))).shape
    (0, 6)
    """
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def eval_flag(train: bool | None) -> bool | None:
    """The ``use_running_average`` / ``deterministic`` flag for ``train``; ``None`` keeps the mode."""
    return None if train is None else not train


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` that leaves an empty batch (and its running statistics) alone, as PyTorch
    does: the statistics of no examples are NaN and would overwrite the running averages.

    >>> norm = batch_norm(3, rngs=nnx.Rngs(0))
    >>> norm(jnp.zeros((0, 4, 4, 3))).shape, norm.mean[...].tolist()
    ((0, 4, 4, 3), [0.0, 0.0, 0.0])
    """

    def __call__(self, x, use_running_average: bool | None = None, **kwargs):
        if x.shape[0] == 0:
            return x
        return super().__call__(x, use_running_average, **kwargs)


def batch_norm(features: int, *, epsilon: float = 1e-5, rngs: nnx.Rngs) -> BatchNorm:
    """:class:`BatchNorm` with PyTorch's defaults: momentum 0.1 (Flax's 0.9), ``epsilon`` 1e-5.

    Running statistics are ``nnx.BatchStat``: ``mean <- 0.9 * mean + 0.1 * batch_mean`` in
    training mode. Flax updates the running variance with the biased batch variance, where
    PyTorch uses the unbiased one (a factor ``n / (n - 1)`` apart, ``n = N*H*W``).
    """
    return BatchNorm(features, momentum=0.9, epsilon=epsilon, rngs=rngs)


class ConvBN(nnx.Module):
    """A convolution module, batch norm, then ``activation`` (ReLU by default; ``None``: none).

    ``x: (N, H, W, C_in)`` -> ``(N, H', W', conv.out_features)`` with the conv's sizes. The
    three are one torchvision ``Conv2dNormActivation`` (``BasicConv2d`` in GoogLeNet).

    >>> block = conv_bn(3, 8, (3, 3), padding=1, rngs=nnx.Rngs(0))
    >>> block(jnp.ones((2, 5, 5, 3)), train=False).shape
    (2, 5, 5, 8)
    """

    def __init__(
        self,
        conv: nnx.Module,
        *,
        activation: Callable | None = jax.nn.relu,
        epsilon: float = 1e-5,
        rngs: nnx.Rngs,
    ):
        self.conv = conv
        self.norm = batch_norm(conv.out_features, epsilon=epsilon, rngs=rngs)
        self.activation = activation

    def __call__(self, x, train: bool | None = None):
        x = self.norm(self.conv(x), eval_flag(train))
        return x if self.activation is None else self.activation(x)


def conv_bn(
    in_features: int,
    out_features: int,
    kernel_size: Sequence[int],
    strides: int = 1,
    *,
    padding: int = 0,
    feature_group_count: int = 1,
    activation: Callable | None = jax.nn.relu,
    epsilon: float = 1e-5,
    rngs: nnx.Rngs,
) -> ConvBN:
    """:class:`ConvBN` over a bias-free ``cnnjax.nn.Conv`` with PyTorch-style int ``padding`` (and
    ``feature_group_count`` groups, PyTorch's ``groups``)."""
    conv = nn.Conv(
        in_features,
        out_features,
        kernel_size,
        strides,
        padding=padding,
        feature_group_count=feature_group_count,
        use_bias=False,
        kernel_init=conv_init,
        rngs=rngs,
    )
    return ConvBN(conv, activation=activation, epsilon=epsilon, rngs=rngs)


def takes_train(layer) -> bool:
    """Whether ``layer``'s call has a ``train`` parameter (the zoo's blocks do; pools do not)."""
    return "train" in inspect.signature(layer).parameters


class Stack(nnx.Module):
    """Apply ``layers`` in order, passing ``train`` to those that take it.

    A zoo block is called as ``layer(x, train)``; a pool or an activation function as
    ``layer(x)``. ``x`` -> the last layer's output.

    >>> stack = Stack(conv_bn(3, 4, (3, 3), padding=1, rngs=nnx.Rngs(0)), nn.MaxPool((2, 2)), jax.nn.relu)
    >>> stack(jnp.ones((1, 4, 4, 3)), train=False).shape
    (1, 2, 2, 4)
    """

    def __init__(self, *layers):
        self.layers = nnx.List(layers)
        self.takes_train = tuple(takes_train(layer) for layer in layers)

    def __call__(self, x, train: bool | None = None):
        for layer, with_train in zip(self.layers, self.takes_train, strict=True):
            x = layer(x, train) if with_train else layer(x)
        return x


class MLPHead(nnx.Module):
    """Classifier head ``(Linear -> ReLU -> Dropout) * len(hidden) -> Linear``.

    ``x: (N, in_features)`` -> ``(N, out_features)``. Dropout follows each hidden ReLU, as in
    the AlexNet paper and torchvision's VGG (torchvision's AlexNet puts it before each Linear).

    >>> head = MLPHead(4, (8, 8), 3, dropout_rate=0.5, rngs=nnx.Rngs(0))
    >>> head(jnp.ones((2, 4)), train=False).shape
    (2, 3)
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Sequence[int],
        out_features: int,
        *,
        dropout_rate: float,
        rngs: nnx.Rngs,
    ):
        sizes = (in_features, *hidden_features)
        self.hidden = nnx.List(nnx.Linear(i, o, rngs=rngs) for i, o in itertools.pairwise(sizes))
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.out = nnx.Linear(sizes[-1], out_features, rngs=rngs)

    def __call__(self, x, train: bool | None = None):
        for linear in self.hidden:
            x = self.dropout(jax.nn.relu(linear(x)), deterministic=eval_flag(train))
        return self.out(x)


def pooled_mlp_head(
    features: int, pooled: int, hidden_features: int, num_classes: int, *, dropout_rate: float, rngs: nnx.Rngs
) -> tuple[nn.AdaptiveAvgPool, MLPHead]:
    """AlexNet's and VGG's head, as torchvision's: ``(pool, classifier)``.

    ``pool`` averages the feature map to ``pooled x pooled`` (PyTorch's adaptive bins), and
    ``classifier`` is an :class:`MLPHead` with two hidden layers of ``hidden_features`` on the
    flattened map (``features * pooled * pooled`` inputs).

    >>> pool, classifier = pooled_mlp_head(8, 2, 16, 3, dropout_rate=0.5, rngs=nnx.Rngs(0))
    >>> classifier(flatten(pool(jnp.ones((1, 5, 5, 8)))), train=False).shape
    (1, 3)
    """
    classifier = MLPHead(
        features * pooled * pooled,
        (hidden_features, hidden_features),
        num_classes,
        dropout_rate=dropout_rate,
        rngs=rngs,
    )
    return nn.AdaptiveAvgPool((pooled, pooled)), classifier
