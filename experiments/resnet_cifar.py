"""ResNet-18 with the small-input stem (3x3 conv, no max-pool) on CIFAR-10, for GPU machines.

Run on a GPU with the extracted python batches (``cifar-10-batches-py``, or the directory holding
it) in ``--data-dir``; writes the training curves as a PNG and, with ``--checkpoint-dir``, a
checkpoint per epoch (add ``--resume`` to continue an interrupted run):

    python experiments/resnet_cifar.py --data-dir ~/data/cifar10 --epochs 30 --out resnet_cifar.png

Smoke test on CPU (a few steps of the full-size model on random data, no dataset needed):

    python experiments/resnet_cifar.py --smoke --out resnet_smoke.png

Recipe: images standardized per channel with the training set's mean and std, SGD with Nesterov
momentum 0.9, weight decay 5e-4 and a cosine learning-rate decay from ``--lr`` over the whole
run, batch 128. ``fit`` applies no data augmentation (random crops and flips usually add a few
points of accuracy on CIFAR-10). Every visible GPU is used (data parallel); ``--batch-size`` must
be a multiple of their number.
"""

from __future__ import annotations

import argparse

import numpy as np
import optax
from flax import nnx

from cnnjax.models import resnet18
from cnnjax.train import fit, plot_history
from cnnjax.train.data import load_cifar10

SMOKE_TRAIN, SMOKE_TEST, SMOKE_BATCH = 64, 32, 16


def random_cifar(seed: int):
    """Random CIFAR-shaped data for ``--smoke``: 64 train and 32 test 32x32x3 images."""
    rng = np.random.default_rng(seed)

    def split(n):
        return rng.random((n, 32, 32, 3), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32)

    return split(SMOKE_TRAIN), split(SMOKE_TEST)


def standardize(train, test):
    """Per-channel ``(x - mean) / std`` with the training set's statistics."""
    mean, std = train[0].mean(axis=(0, 1, 2)), train[0].std(axis=(0, 1, 2))
    return ((train[0] - mean) / std, train[1]), ((test[0] - mean) / std, test[1])


def sgd_cosine(lr: float, weight_decay: float, total_steps: int) -> optax.GradientTransformation:
    """SGD, Nesterov momentum 0.9, L2 weight decay, learning rate ``lr`` cosine-decayed to 0."""
    schedule = optax.cosine_decay_schedule(lr, total_steps)
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=0.9, nesterov=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="CIFAR-10 python batches (required unless --smoke)")
    parser.add_argument("--smoke", action="store_true", help="a few steps on random data (CPU check)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", default="resnet_cifar.png", help="PNG of the training curves")
    args = parser.parse_args()
    if args.smoke:
        train, test = random_cifar(args.seed)
        args.epochs, args.batch_size = 1, SMOKE_BATCH
    elif args.data_dir is None:
        parser.error("--data-dir is required (or --smoke)")
    else:
        train, test = load_cifar10(args.data_dir)
    train, test = standardize(train, test)

    model = resnet18(num_classes=10, in_features=3, small_input=True, rngs=nnx.Rngs(args.seed))
    optimizer = sgd_cosine(args.lr, args.weight_decay, args.epochs * (len(train[0]) // args.batch_size))
    history = fit(
        model,
        optimizer,
        train,
        test,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
    )
    print(history)
    plot_history(history, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
