"""The pictures of docs/visualize.md, with ``cnnjax.train.visualize``: LeNet-5 trained on the embedded digits
(its conv1 filters, conv2's feature maps of a test digit, conv2's effective receptive field, a
saliency map) and a randomly initialized ResNet-18 at 224x224 (the ERF of a unit of its third stage).

Run (CPU, about a minute; writes the PNGs into docs/):

    python experiments/visualize_docs.py --out docs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from cnnjax.models import LeNet5, resnet18
from cnnjax.train import fit, visualize
from cnnjax.train.cli import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR
from cnnjax.train.data import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--out", default="docs", help="folder to write the PNGs into")
    args = parser.parse_args()
    out = Path(args.out)

    train, test = load_digits()
    lenet = LeNet5(rngs=nnx.Rngs(0))
    fit(lenet, optax.adam(DEFAULT_LR), train, test, epochs=args.epochs, batch_size=DEFAULT_BATCH_SIZE, progress=False)
    digits = test[0][:64]
    written = [
        visualize.filters(lenet, "conv1").save(out / "visualize_lenet_filters.png", dpi=70),
        visualize.feature_maps(lenet, digits[:1], "conv2").save(out / "visualize_lenet_maps.png", dpi=70),
        visualize.effective_receptive_field(lenet, digits, "conv2").save(out / "visualize_lenet_erf.png", dpi=60),
        visualize.saliency(lenet, digits[:1]).save(out / "visualize_lenet_saliency.png", dpi=60),
    ]
    model = resnet18(num_classes=1000, rngs=nnx.Rngs(0))
    images = np.asarray(jax.random.normal(jax.random.key(0), (4, 224, 224, 3)))
    erf = visualize.effective_receptive_field(model, images, "features.layers.6.residual.layers.1.conv")
    written.append(erf.save(out / "visualize_resnet18_erf.png", dpi=60))
    for path in written:
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
