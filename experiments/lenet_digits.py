"""LeNet-5 (docs/models.md: sigmoid + average pooling) on scikit-learn's embedded digits: training
curves, the six first-layer 5x5 filters, and their feature maps for one test digit.

Run (CPU, well under a minute; writes one PNG):

    python experiments/lenet_digits.py --out lenet_digits.png

Training uses the command line's defaults (``cnnjax-train``): Adam, the same learning rate,
batch size and epochs, digits resized bilinearly to 28x28.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from flax import nnx
from matplotlib.figure import Figure

from cnnjax.models import LeNet5
from cnnjax.train import draw_history, fit
from cnnjax.train.cli import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR
from cnnjax.train.data import load_digits


def first_layer(model: LeNet5, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first conv's filters ``(6, 5, 5)`` and its activations ``sigmoid(conv1(image))``,
    ``(6, 28, 28)``, for one ``(28, 28, 1)`` image."""
    filters = np.moveaxis(np.asarray(model.conv1.kernel[...])[:, :, 0, :], -1, 0)
    maps = np.asarray(jax.nn.sigmoid(model.conv1(image[None])))[0]
    return filters, np.moveaxis(maps, -1, 0)


def figure(history, image, label, filters, maps) -> Figure:
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=(1.4, 1, 1))
    loss_axes, accuracy_axes, digit_axes = top.subplots(1, 3, width_ratios=(1, 1, 0.6))
    draw_history(history, loss_axes, accuracy_axes)
    accuracy_axes.set_title(f"final test accuracy {history.test_accuracy[-1]:.2%}")
    digit_axes.imshow(image[..., 0], cmap="gray")
    digit_axes.set_title(f"test digit (label {label})")
    digit_axes.axis("off")
    bound = np.abs(filters).max()
    for k, axes in enumerate(middle.subplots(1, len(filters))):
        axes.imshow(filters[k], cmap="RdBu_r", vmin=-bound, vmax=bound)
        axes.set_title(f"filter {k}")
        axes.axis("off")
    middle.suptitle("conv1 filters (5x5, red positive, blue negative)")
    for k, axes in enumerate(bottom.subplots(1, len(maps))):
        axes.imshow(maps[k], cmap="viridis", vmin=0, vmax=1)
        axes.set_title(f"map {k}")
        axes.axis("off")
    bottom.suptitle("feature maps sigmoid(conv1(digit)), 28x28")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="lenet_digits.png", help="PNG to write")
    args = parser.parse_args()

    train, test = load_digits()
    model = LeNet5(rngs=nnx.Rngs(args.seed))
    history = fit(
        model, optax.adam(DEFAULT_LR), train, test, epochs=args.epochs, batch_size=DEFAULT_BATCH_SIZE, seed=args.seed
    )
    image, label = test[0][0], int(test[1][0])
    figure(history, image, label, *first_layer(model, image)).savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
