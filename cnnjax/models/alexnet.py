"""AlexNet (Krizhevsky et al. 2012) in torchvision's single-tower form."""

from __future__ import annotations

import jax
from flax import nnx

from cnnjax import nn
from cnnjax.models._blocks import (
    Stack,
    check_images,
    check_model_args,
    conv_init,
    flatten,
    pooled_mlp_head,
    scale_width,
)
from cnnjax.shapes import check_positive


class AlexNet(nnx.Module):
    """AlexNet with torchvision's layer sizes ("One weird trick", arXiv:1404.5997).

    Features: conv 11x11/4 -> 64 (padding 2), max-pool 3/2, conv 5x5 -> 192 (padding 2),
    max-pool 3/2, conv 3x3 -> 384, 256, 256 (padding 1), max-pool 3/2, each conv followed by
    ReLU. Then adaptive average pooling to 6x6 and the classifier
    ``(Linear 4096 -> ReLU -> Dropout) x 2 -> Linear num_classes``: 61,100,840 trainable
    parameters for ``num_classes=1000``, as torchvision's ``alexnet``. ImageNet inputs are
    224x224 (at least 63x63).

    ``small_input=True`` (28x28 or 32x32 images) makes the first conv 3x3, stride 1, padding 1,
    and pools the last feature map to 1x1 instead of 6x6, so the classifier reads
    ``256 * width_multiplier`` features. ``width_multiplier`` scales every conv's channels,
    ``hidden_features`` the two hidden Linear layers.

    ``x: (N, H, W, in_features)`` NHWC -> ``(N, num_classes)`` logits. Dropout is active in
    training mode, the mode a new model starts in (as in PyTorch and NNX): ``model.eval()`` /
    ``model.train()`` switch it, ``model(x, train=...)`` overrides it for one call.

    Shapes and counts need no weights (``nnx.eval_shape`` builds an abstract model):

    >>> import jax, jax.numpy as jnp
    >>> model = nnx.eval_shape(lambda: AlexNet(num_classes=1000, rngs=nnx.Rngs(0)))
    >>> sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    61100840
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
        hidden_features: int = 4096,
        dropout_rate: float = 0.5,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        op = "AlexNet"
        num_classes, in_features, width_multiplier, dropout_rate = check_model_args(
            op, num_classes, in_features, width_multiplier, dropout_rate
        )
        hidden_features = check_positive(hidden_features, "hidden_features", op)
        c1, c2, c3, c4, c5 = (scale_width(c, width_multiplier) for c in (64, 192, 384, 256, 256))

        def conv(i, o, k, s=1, p=0):
            return nn.Conv(i, o, (k, k), s, padding=p, kernel_init=conv_init, rngs=rngs)

        stem = conv(in_features, c1, 3, 1, 1) if small_input else conv(in_features, c1, 11, 4, 2)
        self.in_features, self.small_input, self.width_multiplier = in_features, small_input, width_multiplier
        self.hidden_features = hidden_features
        self.features = Stack(
            stem,
            jax.nn.relu,
            nn.MaxPool((3, 3), 2),
            conv(c1, c2, 5, p=2),
            jax.nn.relu,
            nn.MaxPool((3, 3), 2),
            conv(c2, c3, 3, p=1),
            jax.nn.relu,
            conv(c3, c4, 3, p=1),
            jax.nn.relu,
            conv(c4, c5, 3, p=1),
            jax.nn.relu,
            nn.MaxPool((3, 3), 2),
        )
        pooled = 1 if small_input else 6
        self.pool, self.classifier = pooled_mlp_head(
            c5, pooled, hidden_features, num_classes, dropout_rate=dropout_rate, rngs=rngs
        )
        nn.set_impl(self, impl)

    def __call__(self, x, train: bool | None = None):
        check_images(x, self.in_features, "AlexNet")
        x = self.pool(self.features(x))
        return self.classifier(flatten(x), train)
