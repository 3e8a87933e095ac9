"""LeNet-5 as in the study notes (docs/models.md): sigmoid activations and average pooling, 28x28 inputs."""

from __future__ import annotations

import jax
from flax import nnx

from cnnjax import nn
from cnnjax.models._blocks import check_images, check_model_args, flatten
from cnnjax.shapes import check_positive, conv_output_size, pool_output_size

# docs/layers.md, Xavier for conv: U(+-sqrt(6 / (k_h*k_w*(C_in + C_out)))); jax's xavier_uniform uses
# fan_in = k_h*k_w*C_in and fan_out = k_h*k_w*C_out on HWIO kernels, which is that bound.
_xavier = nnx.initializers.xavier_uniform()


class LeNet5(nnx.Module):
    """LeNet-5 (LeCun et al. 1998) in the notes' (d2l's) form: sigmoid and average pooling.

    Layers (docs/models.md): conv 5x5 -> 6 (padding 2), sigmoid, avg-pool 2; conv 5x5 -> 16, sigmoid,
    avg-pool 2; dense 120, sigmoid; dense 84, sigmoid; dense ``num_classes``. Padding 2 lets a
    28x28 digit play the role of the original 32x32 input. Kernels use the notes' Xavier-uniform
    init, biases start at zero.

    ``x: (N, input_size, input_size, in_features)`` NHWC -> ``(N, num_classes)`` logits. The
    flattened size is ``16 * s * s`` with ``s = floor((floor(input_size / 2) - 4) / 2)`` (5 for
    28x28, 6 for 32x32), hence ``input_size`` in the constructor. LeNet has no BatchNorm or
    Dropout: ``train`` is accepted for the zoo's common ``model(x, train=...)`` call and changes
    nothing. 61,706 trainable parameters for the default 28x28x1, 10 classes.

    >>> import jax.numpy as jnp
    >>> model = LeNet5(rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
    """

    def __init__(
        self, *, num_classes: int = 10, in_features: int = 1, input_size: int = 28, impl: str = "auto", rngs: nnx.Rngs
    ):
        num_classes, in_features, _, _ = check_model_args("LeNet5", num_classes, in_features)
        input_size = check_positive(input_size, "input_size", "LeNet5")
        side = input_size
        try:
            for padding in (2, 0):  # conv 5x5 (padding 2, then none), then avg-pool 2/2
                side = pool_output_size(conv_output_size(side, 5, padding=padding), 2)
        except ValueError as err:
            raise ValueError(
                f"LeNet5: input_size={input_size} is too small for its two conv + pool stages ({err})"
            ) from None
        self.in_features = in_features
        self.conv1 = nn.Conv(in_features, 6, (5, 5), padding=2, kernel_init=_xavier, rngs=rngs)
        self.conv2 = nn.Conv(6, 16, (5, 5), padding="VALID", kernel_init=_xavier, rngs=rngs)
        self.pool = nn.AvgPool((2, 2))
        self.fc1 = nnx.Linear(16 * side * side, 120, kernel_init=_xavier, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, kernel_init=_xavier, rngs=rngs)
        self.fc3 = nnx.Linear(84, num_classes, kernel_init=_xavier, rngs=rngs)
        nn.set_impl(self, impl)

    def __call__(self, x, train: bool | None = None):
        check_images(x, self.in_features, "LeNet5")
        x = self.pool(jax.nn.sigmoid(self.conv1(x)))
        x = self.pool(jax.nn.sigmoid(self.conv2(x)))
        x = flatten(x)
        x = jax.nn.sigmoid(self.fc1(x))
        x = jax.nn.sigmoid(self.fc2(x))
        return self.fc3(x)
