"""Note 001's edge detection, end to end (notes/001_9ffafabebafa9c6f, sections 1.3 and 1.4).

Run: ``python experiments/edge_detection.py`` (add ``--plot edges.png`` for a figure).

1. A 6x8 image, white (1) with a black (0) band in columns 2 to 5.
2. Cross-correlated with ``K = [[1, -1]]`` it gives 1 and -1 where the colour changes
   (columns 1 and 5 of the 6x7 output) and 0 elsewhere.
3. On the transposed image the same kernel sees no horizontal change: all zeros.
4. Learning ``K`` back from ``(X, Y)``: a (1, 2) kernel, no bias, small random start, 20 steps of
   gradient descent with learning rate 3e-2 on the summed squared error, printing the loss every
   2 steps; the learned kernel ends close to ``[1, -1]``.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from jax import numpy as jnp

from cnnjax.convolution import conv, corr2d

EDGE_KERNEL = jnp.array([[1.0, -1.0]])
LEARNING_RATE = 3e-2
STEPS = 20


def edge_image():
    """The note's ``(6, 8)`` image: ones, with columns 2..5 set to 0."""
    return jnp.ones((6, 8)).at[:, 2:6].set(0.0)


def learn_kernel(x, y, *, steps=STEPS, learning_rate=LEARNING_RATE, seed=0, log_every=2, log=print):
    """Fit a ``(1, 2)`` kernel (no bias) so that ``corr2d(x, kernel) ~ y``, as docs/convolutions.md does.

    The start is uniform in ``[-0.07, 0.07]`` (MXNet's default init, which the note used); each
    step takes the gradient of ``sum((conv(x, kernel) - y)**2)`` and moves ``learning_rate``
    against it. Returns ``(kernel, losses)``, the loss recorded before each update.
    """
    x, y = x[None, None], y[None, None]  # NCHW with batch and channel 1, like the note

    def loss_fn(kernel):
        return jnp.sum((conv(x, kernel[None, None], layout="NCHW") - y) ** 2)

    step = jax.jit(jax.value_and_grad(loss_fn))
    kernel = jax.random.uniform(jax.random.key(seed), (1, 2), minval=-0.07, maxval=0.07)
    losses = []
    for i in range(steps):
        loss, grad = step(kernel)
        kernel = kernel - learning_rate * grad
        losses.append(float(loss))
        if log is not None and (i + 1) % log_every == 0:
            log(f"batch {i + 1:2d}, loss {float(loss):.3f}")
    return kernel, losses


def plot(path, x, y, learned) -> None:
    """Save image, target and the learned kernel's output side by side as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = (("image X", x), ("target corr2d(X, [1, -1])", y), ("learned kernel's output", learned))
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for ax, (title, data) in zip(axes, panels, strict=True):
        ax.imshow(np.asarray(data), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="PATH", help="save a PNG of image, target and learned output")
    args = parser.parse_args(argv)
    with np.printoptions(precision=4, suppress=True):
        x = edge_image()
        y = corr2d(x, EDGE_KERNEL)
        print("image X (6x8):", np.asarray(x), sep="\n")
        print("corr2d(X, [[1, -1]]) (6x7): 1 and -1 at the edges", np.asarray(y), sep="\n")
        print(
            "corr2d(X.T, [[1, -1]]) (8x5): the kernel only sees vertical edges",
            np.asarray(corr2d(x.T, EDGE_KERNEL)),
            sep="\n",
        )

        print(f"learning K from (X, Y): {STEPS} steps, lr {LEARNING_RATE}, squared error, no bias")
        kernel, _ = learn_kernel(x, y)
        print("learned kernel:", np.asarray(kernel))
        if args.plot:
            plot(args.plot, x, y, corr2d(x, kernel))
            print(f"figure saved to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
