"""``cnnjax-train``: the command line over :func:`~cnnjax.train.fit`.

The defaults train LeNet-5 on the embedded digits::

    cnnjax-train
    cnnjax-train --model resnet18 --dataset cifar10 --data-dir ~/data --epochs 30 --lr 1e-3 \\
        --checkpoint-dir runs/resnet --resume --plot runs/resnet.png
    cnnjax-train --model resnet50 --dataset imagefolder --data-dir ~/imagenet --image-size 224 \\
        --augment random-resized-crop --optimizer momentum --lr 0.1 --schedule cosine --warmup-epochs 5 \\
        --weight-decay 1e-4 --label-smoothing 0.1 --dtype bfloat16 --batch-size 256 --log-dir runs/r50

(also ``python -m cnnjax.train``). Several processes: ``--distributed``, or
``--coordinator-address HOST:PORT --num-processes N --process-id I`` (:mod:`cnnjax.train`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from cnnjax import models
from cnnjax.train.data import load_cifar10, load_digits, load_fashion_mnist, load_imagefolder, load_mnist
from cnnjax.train.errors import TrainError
from cnnjax.train.loop import fit
from cnnjax.train.pipeline import AUGMENTATIONS
from cnnjax.train.recipe import OPTIMIZERS, SCHEDULES, Recipe
from cnnjax.train.report import plot_history
from cnnjax.train.steps import DTYPES

__all__ = ["main"]

# The command line's defaults: LeNet-5 on the digits reaches ~99% test accuracy with them.
DEFAULT_EPOCHS = 15
DEFAULT_BATCH_SIZE = 16
DEFAULT_LR = 3e-3
DEFAULT_IMAGE_SIZE = {"digits": 28, "imagefolder": 224}


def _small_input(constructor: Callable[..., nnx.Module]) -> Callable[..., nnx.Module]:
    """Adapt a zoo constructor to the registry's call: the 28x28/32x32 stem, any input size."""

    def build(*, num_classes: int, in_features: int, input_size: int, rngs: nnx.Rngs) -> nnx.Module:
        del input_size  # the small-input stems end in global pooling
        return constructor(num_classes=num_classes, in_features=in_features, small_input=True, rngs=rngs)

    return build


# Every constructor takes ``num_classes``, ``in_features``, ``input_size`` and ``rngs``.
MODELS: dict[str, Callable[..., nnx.Module]] = {
    "lenet5": models.LeNet5,
    "alexnet": _small_input(models.AlexNet),
    "vgg11": _small_input(models.vgg11),
    "vgg16": _small_input(models.vgg16),
    "nin": _small_input(models.NiN),
    "googlenet": _small_input(models.GoogLeNet),
    "resnet18": _small_input(models.resnet18),
    "resnet34": _small_input(models.resnet34),
    "resnet50": _small_input(models.resnet50),
    "densenet121": _small_input(models.densenet121),
    "mobilenet_v1": _small_input(models.MobileNetV1),
}
DATASETS: dict[str, Callable[..., Any]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "imagefolder": load_imagefolder,
}


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An ``argparse`` type: an integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> Callable[[str], float]:
    """An ``argparse`` type: a finite number in the interval from ``low`` to ``high``."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a number in {left}{low}, {high}{right}, got {text!r}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """``argparse`` with one-line errors: ``prog: error: message (see --help)``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> _Parser:
    parser = _Parser(
        prog="cnnjax-train",
        description="Train a cnnjax model zoo classifier. Defaults: LeNet-5 on scikit-learn's embedded digits.",
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="lenet5", help="architecture (default: %(default)s)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="digits", help="dataset (default: %(default)s)")
    parser.add_argument(
        "--data-dir", help="directory with the dataset's files (all but digits; imagefolder: DIR/train, DIR/val)"
    )
    parser.add_argument(
        "--image-size",
        type=_int_at_least(1),
        help="image side for digits (default 28) and imagefolder (default 224)",
    )
    parser.add_argument(
        "--workers",
        type=_int_at_least(0),
        help="decoding processes (default: 0 for in-memory datasets, min(8, CPUs) for imagefolder)",
    )
    parser.add_argument(
        "--epochs", type=_int_at_least(1), default=DEFAULT_EPOCHS, help="total epochs (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=DEFAULT_BATCH_SIZE,
        help="examples per step, over all devices and processes (default: %(default)s)",
    )
    parser.add_argument(
        "--lr", type=_positive_float, default=DEFAULT_LR, help="peak learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--optimizer", choices=sorted(OPTIMIZERS), default="adam", help="optax optimizer (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=_int_at_least(0), default=0, help="model init and data order (default: %(default)s)"
    )
    recipe = parser.add_argument_group("training recipe")
    recipe.add_argument(
        "--augment", choices=AUGMENTATIONS, default="none", help="training augmentation (default: %(default)s)"
    )
    recipe.add_argument(
        "--schedule", choices=SCHEDULES, default="constant", help="learning-rate schedule (default: %(default)s)"
    )
    recipe.add_argument(
        "--warmup-epochs", type=_int_at_least(0), default=0, help="linear warm-up from 0 (default: %(default)s)"
    )
    recipe.add_argument(
        "--weight-decay",
        type=_float_in(0, math.inf),
        help="decoupled weight decay, kernels only (default: 1e-4 for adamw, else 0)",
    )
    recipe.add_argument(
        "--label-smoothing", type=_float_in(0, 1), default=0.0, help="label smoothing (default: %(default)s)"
    )
    recipe.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default: %(default)s)"
    )
    output = parser.add_argument_group("output")
    output.add_argument("--checkpoint-dir", help="save a checkpoint here after every epoch")
    output.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    output.add_argument("--log-dir", help="append one JSON line per epoch to DIR/metrics.jsonl")
    output.add_argument("--plot", metavar="PATH", help="write the training curves to this PNG")
    output.add_argument("--no-progress", dest="progress", action="store_false", help="print nothing while training")
    multi_host = parser.add_argument_group("several processes (see the module docstring)")
    multi_host.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    multi_host.add_argument(
        "--coordinator-address", metavar="HOST:PORT", help="process 0's address (implies --distributed)"
    )
    multi_host.add_argument(
        "--num-processes", type=_int_at_least(1), help="number of processes (implies --distributed)"
    )
    multi_host.add_argument("--process-id", type=_int_at_least(0), help="this process's index (implies --distributed)")
    return parser


def _silence_stdout() -> None:
    """Point standard output, file descriptor 1, at ``os.devnull``: native libraries print there
    too (gloo announces its connections), and only process 0 prints. Errors still reach stderr."""
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run ``cnnjax-train``: parse ``argv``, load the data, build the model and its
    :class:`~cnnjax.train.recipe.Recipe`, :func:`~cnnjax.train.fit`, report.

    Bad arguments end the program with a one-line message on stderr and exit status 2; data
    and checkpoints that cannot be used (:class:`~cnnjax.train.errors.TrainError`, or an
    ``OSError`` reading a file) with one line and exit status 1. Anything else is a bug and
    keeps its traceback. With several processes only process 0 prints: the others' standard
    output goes to ``os.devnull``.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.dataset != "digits" and args.data_dir is None:
        parser.error(f"--dataset {args.dataset} needs --data-dir")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    if args.image_size is not None and args.dataset not in DEFAULT_IMAGE_SIZE:
        parser.error(f"--image-size applies to --dataset digits or imagefolder, not {args.dataset}")
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir")
    try:
        recipe = Recipe(args.optimizer, args.lr, args.schedule, args.warmup_epochs, args.weight_decay)
        recipe.build(epochs=args.epochs, steps_per_epoch=1)
    except TrainError as e:
        parser.error(str(e).removeprefix("Recipe: "))
    cluster = (args.coordinator_address, args.num_processes, args.process_id)
    if args.distributed or any(v is not None for v in cluster):
        jax.distributed.initialize(*cluster)
        if jax.process_index() != 0:
            _silence_stdout()

    try:
        image_size = args.image_size or DEFAULT_IMAGE_SIZE.get(args.dataset)
        if args.dataset == "imagefolder":
            train_data, test_data = load_imagefolder(args.data_dir, image_size)
            num_classes, in_features = len(train_data.classes), train_data.channels
            workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
        else:
            train_data, test_data = (
                load_digits(image_size) if args.dataset == "digits" else DATASETS[args.dataset](args.data_dir)
            )
            num_classes, in_features, image_size = 10, train_data[0].shape[-1], train_data[0].shape[1]
            workers = args.workers or 0
        model = MODELS[args.model](
            num_classes=num_classes, in_features=in_features, input_size=image_size, rngs=nnx.Rngs(args.seed)
        )
        history = fit(
            model,
            recipe,
            train_data,
            test_data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            checkpoint_dir=args.checkpoint_dir,
            resume=args.resume,
            progress=args.progress,
            augment=args.augment,
            label_smoothing=args.label_smoothing,
            dtype=args.dtype,
            workers=workers,
            log_dir=args.log_dir,
        )
        if args.plot is not None and jax.process_index() == 0:
            plot_history(history, args.plot)
            if args.progress:
                print(f"wrote {args.plot}")
    except (OSError, TrainError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    return 0
