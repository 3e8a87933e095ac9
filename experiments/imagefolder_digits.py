"""The image-folder path end to end: the embedded digits written as PNG files into a temporary
``train/``/``val/`` tree, streamed by Grain worker processes (Pillow decoding), trained on with
the command line's LeNet-5 recipe, next to the same run on the in-memory digits.

Run (CPU, about a minute on 2 cores; prints one table):

    python experiments/imagefolder_digits.py
    python experiments/imagefolder_digits.py --workers 2 --epochs 15 --keep digits_folder

The folder holds the 1438 training and 359 test digits of :func:`cnnjax.train.data.load_digits`
(28x28, quantized to 8-bit grayscale PNGs) as ``train/<digit>/<index>.png`` and
``val/<digit>/<index>.png``; both runs train LeNet-5 with Adam (lr 3e-3), batch 16, seed 0, the
same data order. The two accuracies differ only through the 8-bit quantization of the PNGs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from flax import nnx
from PIL import Image

from cnnjax.models import LeNet5
from cnnjax.train import Recipe, fit
from cnnjax.train.cli import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR
from cnnjax.train.data import load_digits, load_imagefolder


def write_digits_folder(root: str, size: int = 28) -> tuple[int, int]:
    """Write the digits as ``root/{train,val}/<digit>/<index>.png``; return the two counts."""
    counts = []
    for split, (x, y) in zip(("train", "val"), load_digits(size), strict=True):
        for index, (image, label) in enumerate(zip(x, y, strict=True)):
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            pixels = np.rint(image[..., 0] * 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{index:04d}.png"))
        counts.append(len(x))
    return counts[0], counts[1]


def train_lenet(train, test, *, epochs: int, workers: int) -> tuple[float, float]:
    """The command line's LeNet-5 run; returns (final test accuracy, seconds)."""
    start = time.perf_counter()
    history = fit(
        LeNet5(rngs=nnx.Rngs(0)),
        Recipe("adam", DEFAULT_LR),
        train,
        test,
        epochs=epochs,
        batch_size=DEFAULT_BATCH_SIZE,
        workers=workers,
        progress=False,
    )
    return history.test_accuracy[-1], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--workers", type=int, default=2, help="Grain decoding processes for the folder run")
    parser.add_argument("--keep", metavar="DIR", help="write the folder here and keep it (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or scratch
        n_train, n_val = write_digits_folder(root)
        train, val = load_imagefolder(root, image_size=28)
        print(f"{root}: {n_train} train and {n_val} val PNGs, classes {', '.join(train.classes)}")
        rows = [
            ("in-memory digits", *train_lenet(*load_digits(), epochs=args.epochs, workers=0)),
            (
                f"imagefolder, {args.workers} workers",
                *train_lenet(train, val, epochs=args.epochs, workers=args.workers),
            ),
        ]
    print(f"{'path':<26}  test acc  seconds ({args.epochs} epochs, fit incl. compilation)")
    for name, accuracy, seconds in rows:
        print(f"{name:<26}  {accuracy:8.2%}  {seconds:7.1f}")


if __name__ == "__main__":
    main()
