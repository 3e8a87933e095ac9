"""Training: pure jitted train/eval steps, the ``fit`` loop, the recipe, checkpoints, data
parallelism over devices and processes, CLI.

The loop keeps an NNX model as ``(graphdef, TrainState)``: the graph definition is static and the
state (parameters, the other model variables such as batch statistics and RNG counters, and the
optax state) is a pytree that every jitted step takes and returns, donating the old one. The
loss is softmax cross-entropy on integer labels, averaged over the batch (notes 002, "training
loop": forward, loss, backprop, update with the batch-averaged gradient), optionally against
smoothed labels.

Data reaches the steps one way, whatever the dataset: :mod:`cnnjax.pipeline` (Grain) yields this
process's rows of every global batch, and ``jax.make_array_from_process_local_data`` assembles
the global batch, sharded along the first axis of a 1-D ``Mesh`` over every device of every
process (axis ``"data"``, ``NamedSharding(mesh, P("data"))``); the state is replicated
(``P()``) and XLA inserts the gradient all-reduce. With one device this changes nothing.

Several processes (one per host, or several on one machine): start every process with
``jax.distributed.initialize()`` before any other JAX call (the command line's
``--distributed``): it detects SLURM, Open MPI, Kubernetes and Cloud TPU clusters by itself,
elsewhere pass ``--coordinator-address HOST:PORT --num-processes N --process-id I`` to each
process. Each process then reads only its rows of every batch (its shard), ``jax.devices()``
spans all processes, and only process 0 prints and writes the metrics log; orbax writes the
checkpoints from process 0 and every process restores them. A run gives the same result for any
number of processes with the same global batch and device count (tested with 2 processes of 2
CPU devices against 1 process of 4).

Command line (``cnnjax-train`` or ``python -m cnnjax.train``); the defaults train LeNet-5 on the
embedded digits::

    cnnjax-train
    cnnjax-train --model resnet18 --dataset cifar10 --data-dir ~/data --epochs 30 --lr 1e-3 \\
        --checkpoint-dir runs/resnet --resume --plot runs/resnet.png
    cnnjax-train --model resnet50 --dataset imagefolder --data-dir ~/imagenet --image-size 224 \\
        --augment random-resized-crop --optimizer momentum --lr 0.1 --schedule cosine --warmup-epochs 5 \\
        --weight-decay 1e-4 --label-smoothing 0.1 --dtype bfloat16 --batch-size 256 --log-dir runs/r50
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gc
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from cnnjax import models
from cnnjax.data import (
    ArraySource,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_imagefolder,
    load_mnist,
    num_batches,
)
from cnnjax.pipeline import AUGMENTATIONS, run_batches
from cnnjax.shapes import check_positive

DATA_AXIS = "data"
# The command line's defaults: LeNet-5 on the digits reaches ~99% test accuracy with them.
DEFAULT_EPOCHS = 15
DEFAULT_BATCH_SIZE = 16
DEFAULT_LR = 3e-3
DEFAULT_IMAGE_SIZE = {"digits": 28, "imagefolder": 224}
CHECKPOINTS_KEPT = 2
DISPATCH_AHEAD = 8  # train steps queued on the devices before the loop waits: bounds the batches held there, and
# leaves the devices work while a loaded host schedules the loop again
_PROGRESS_EVERY = 10  # steps between progress-bar refreshes (each one waits for the device)


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
# Each optimizer as optax composes it, without the final learning-rate scale that
# make_optimizer adds: optax.adam(lr) is chain(scale_by_adam(), scale_by_learning_rate(lr)),
# optax.sgd(lr, momentum=0.9) is chain(trace(0.9), scale_by_learning_rate(lr)).
OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": optax.scale_by_adam,
    "adamw": optax.scale_by_adam,
    "sgd": optax.identity,
    "momentum": functools.partial(optax.trace, decay=0.9),
}
DEFAULT_WEIGHT_DECAY = {"adamw": 1e-4}  # optax.adamw's default; the other optimizers: none
SCHEDULES = ("constant", "cosine", "step")
STEP_DECAYS = (0.5, 0.75)  # "step": the learning rate is multiplied by 0.1 at these fractions of the run
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DATASETS: dict[str, Callable[..., Any]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "imagefolder": load_imagefolder,
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be resumed from (or must not be written to)."""


class TrainState(NamedTuple):
    """Everything a train step reads and writes: one pytree, donated to every step."""

    params: nnx.State  # the model's ``nnx.Param`` variables
    model_state: nnx.State  # every other model variable: batch statistics, RNG stream state
    opt_state: optax.OptState


@dataclasses.dataclass
class History:
    """Per-epoch metrics of a :func:`fit` run; ``str(history)`` is a table.

    Test lists stay empty when ``fit`` had no ``eval_data``. ``epoch_time`` (seconds, training
    and evaluation) is left out of ``==``: two runs are equal when their metrics are.

    >>> print(History([0.5], [0.875], [0.25], [0.9375], [1.5]))
    epoch  train loss  train acc  test loss  test acc  time (s)
        1      0.5000     87.50%     0.2500    93.75%      1.50
    """

    train_loss: list[float] = dataclasses.field(default_factory=list)
    train_accuracy: list[float] = dataclasses.field(default_factory=list)
    test_loss: list[float] = dataclasses.field(default_factory=list)
    test_accuracy: list[float] = dataclasses.field(default_factory=list)
    epoch_time: list[float] = dataclasses.field(default_factory=list, compare=False)

    def __str__(self) -> str:
        lines = ["epoch  train loss  train acc  test loss  test acc  time (s)"]
        for i, (loss, acc, seconds) in enumerate(
            zip(self.train_loss, self.train_accuracy, self.epoch_time, strict=True)
        ):
            if i < len(self.test_loss):
                test = f"{self.test_loss[i]:9.4f}  {self.test_accuracy[i]:8.2%}"
            else:
                test = f"{'-':>9}  {'-':>8}"
            lines.append(f"{i + 1:5d}  {loss:10.4f}  {acc:9.2%}  {test}  {seconds:8.2f}")
        return "\n".join(lines)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Softmax cross-entropy with integer labels, one value per example.

    ``logits: (N, num_classes)``, ``labels: (N,)`` int -> ``(N,)``: ``logsumexp(logits) -
    logits[label]``; with ``label_smoothing = a`` the target is ``(1 - a) * one_hot(label) + a /
    num_classes`` (``optax.smooth_labels``; Szegedy et al. 2016, section 7).

    >>> cross_entropy(jnp.zeros((1, 4)), jnp.array([2]))  # log(4) for uniform logits
    Array([1.3862944], dtype=float32)
    """
    if label_smoothing == 0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """Split ``model`` into its static graph definition and a fresh :class:`TrainState`.

    >>> graphdef, state = init_train_state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), optax.sgd(0.1))
    >>> state.params["kernel"].shape
    (2, 3)
    """
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState(params, model_state, optimizer.init(params))


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    *,
    label_smoothing: float = 0.0,
    dtype: str = "float32",
):
    """The pure train step ``train_step(state, x, y) -> (state, metrics)``, jitted, donating ``state``.

    ``x: (B, ...)`` a batch for the model in ``graphdef`` (built in training mode), ``y: (B,)``
    int labels. ``metrics``: ``loss`` (the batch-mean :func:`cross_entropy`, with
    ``label_smoothing``) and ``correct`` (how many argmax predictions equal ``y``). ``dtype``
    (``"float32"`` or ``"bfloat16"``) is the compute dtype: the forward and backward passes run
    on ``x`` and floating parameters cast to it, the loss in float32, and the gradients,
    parameters and optimizer state stay float32. With a ``mesh``, ``x`` and ``y`` are sharded
    along the mesh's ``"data"`` axis and the state is replicated.

    >>> graphdef, state = init_train_state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), optax.sgd(0.1))
    >>> step = make_train_step(graphdef, optax.sgd(0.1))
    >>> state, metrics = step(state, jnp.ones((4, 2)), jnp.array([0, 1, 2, 0]))
    >>> sorted(metrics), int(metrics["correct"]) <= 4
    (['correct', 'loss'], True)
    """
    compute = DTYPES[dtype]

    def train_step(state: TrainState, x, y):
        def loss_fn(params):
            # copy=True: fresh variables in the grad trace, so BatchNorm may update its statistics
            model = nnx.merge(graphdef, _cast(params, compute), state.model_state, copy=True)
            logits = model(x.astype(compute)).astype(jnp.float32)
            _, _, model_state = nnx.split(model, nnx.Param, ...)
            return cross_entropy(logits, y, label_smoothing).mean(), (logits, model_state)

        (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == y)
        return TrainState(params, model_state, opt_state), {"loss": loss, "correct": correct}

    return jax.jit(train_step, donate_argnums=0, **_shardings(mesh, n_batch_args=2))


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh | None = None, *, dtype: str = "float32"):
    """The pure eval step ``eval_step(state, x, y, mask) -> metrics``, jitted.

    ``x: (B, ...)``, ``y: (B,)``, ``mask: (B,)`` (1 for real examples, 0 for padding) ->
    ``loss`` (the cross-entropy, without label smoothing, summed over the real examples),
    ``correct`` (their count of right predictions) and ``count`` (``sum(mask)``). ``graphdef``
    should be the model's in eval mode (running batch statistics, no dropout); ``dtype`` is the
    compute dtype (:func:`make_train_step`); the state is not changed.

    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> graphdef, state = init_train_state(model, optax.sgd(0.1))
    >>> metrics = make_eval_step(graphdef)(state, jnp.ones((2, 2)), jnp.array([0, 1]), jnp.array([1.0, 0.0]))
    >>> float(metrics["loss"]) == float(cross_entropy(model(jnp.ones((1, 2))), jnp.array([0]))[0])
    True
    """
    compute = DTYPES[dtype]

    def eval_step(state: TrainState, x, y, mask):
        model = nnx.merge(graphdef, _cast(state.params, compute), state.model_state)
        logits = model(x.astype(compute)).astype(jnp.float32)
        correct = (jnp.argmax(logits, axis=-1) == y).astype(mask.dtype)
        return {
            "loss": jnp.sum(cross_entropy(logits, y) * mask),
            "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask),
        }

    return jax.jit(eval_step, **_shardings(mesh, n_batch_args=3))


def _cast(params, dtype):
    """The floating parameters in the compute ``dtype`` (a no-op for float32)."""
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def _shardings(mesh: Mesh | None, n_batch_args: int) -> dict:
    """``jax.jit`` shardings: the state and outputs replicated, batch arguments split on ``"data"``."""
    if mesh is None:
        return {}
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
    return {"in_shardings": (replicated,) + (split,) * n_batch_args, "out_shardings": replicated}


def learning_rate_schedule(
    learning_rate: float, *, schedule: str, warmup_epochs: int, epochs: int, steps_per_epoch: int
) -> optax.ScalarOrSchedule:
    """The learning rate of every step, as optax schedules compose it.

    ``warmup_epochs`` of linear warm-up from 0 (Goyal et al. 2017), then ``"constant"``;
    ``"cosine"`` decay to 0 at the end of the run (Loshchilov & Hutter 2017,
    ``optax.warmup_cosine_decay_schedule``); or ``"step"``: times 0.1 at each of the
    ``STEP_DECAYS`` fractions of the epochs (He et al. 2016). Without warm-up, ``"constant"``
    is the plain float ``learning_rate``.

    >>> rate = learning_rate_schedule(0.1, schedule="step", warmup_epochs=1, epochs=4, steps_per_epoch=10)
    >>> [round(float(rate(step)), 4) for step in (0, 5, 10, 19, 20, 30, 39)]
    [0.0, 0.05, 0.1, 0.1, 0.01, 0.001, 0.001]
    """
    warmup, total = warmup_epochs * steps_per_epoch, epochs * steps_per_epoch
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, total)
    if schedule == "constant" and warmup == 0:
        return learning_rate
    if schedule == "constant":
        after = optax.constant_schedule(learning_rate)
    else:
        boundaries = {round(f * epochs) * steps_per_epoch - warmup: 0.1 for f in STEP_DECAYS}
        after = optax.piecewise_constant_schedule(learning_rate, boundaries)
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup), after], [warmup])


def make_optimizer(name: str, learning_rate, *, weight_decay: float | None = None) -> optax.GradientTransformation:
    """The optimizer ``name`` (``OPTIMIZERS``) with a learning rate or schedule and decoupled
    weight decay: ``chain(OPTIMIZERS[name](), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``, optax.adamw's composition.

    Every step moves each decayed weight by ``-learning_rate(step) * weight_decay * w``, apart
    from the gradient's adaptive scaling (Loshchilov & Hutter 2019; optax's and PyTorch's
    ``AdamW`` convention). Only weights with more than one dimension (convolution and dense
    kernels) decay; biases and normalization scales and offsets do not. ``weight_decay=None``:
    ``DEFAULT_WEIGHT_DECAY`` (``1e-4`` for ``"adamw"``, 0 for the others). Without decay,
    ``make_optimizer("adam", lr)`` is ``optax.adam(lr)``.

    >>> params = {"kernel": jnp.ones((1, 1)), "bias": jnp.ones(1)}
    >>> optimizer = make_optimizer("sgd", 0.5, weight_decay=0.1)
    >>> updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    >>> round(float(updates["kernel"][0, 0]), 6), float(updates["bias"][0]) == 0  # -0.5 * 0.1 * 1, no decay
    (-0.05, True)
    """
    weight_decay = DEFAULT_WEIGHT_DECAY.get(name, 0.0) if weight_decay is None else weight_decay
    parts = [OPTIMIZERS[name]()]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=_decayed))
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


def _decayed(params):
    """The weight-decay mask: kernels decay, 1-D parameters (biases, norm scales and offsets) do not."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def fit(
    model: nnx.Module,
    optimizer,
    train_data,
    eval_data,
    *,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    checkpoint_dir=None,
    resume: bool = False,
    progress: bool = True,
    learning_rate: float | None = None,
    schedule: str = "constant",
    warmup_epochs: int = 0,
    weight_decay: float | None = None,
    augment: str = "none",
    label_smoothing: float = 0.0,
    dtype: str = "float32",
    workers: int = 0,
    log_dir=None,
) -> History:
    """Train the NNX ``model`` in place; return its :class:`History`.

    Args:
        model: any NNX classifier ``(B, H, W, C) -> (B, num_classes)`` logits, e.g. from
            :mod:`cnnjax.models`. It is put in training mode (``model.train()``) for the train
            steps and in eval mode for evaluation, and is left in eval mode with the final state.
        optimizer: an optax ``GradientTransformation``, used as given (it carries its own
            learning rate), or the name of one in ``OPTIMIZERS``, built by :func:`make_optimizer`
            with ``learning_rate``, ``schedule``, ``warmup_epochs`` and ``weight_decay``.
        train_data, eval_data: ``(x, y)`` pairs of arrays, ``x: (N, H, W, C)`` float in
            ``[0, 1]``, ``y: (N,)`` int labels, or sources such as the :class:`cnnjax.data.ImageFolder`
            pair of :func:`cnnjax.data.load_imagefolder`. ``eval_data`` may be ``None`` (no test
            metrics). Both go through :mod:`cnnjax.pipeline`.
        epochs: the run's total number of epochs, counting those a resumed run restores.
        batch_size: examples per step (the global batch), a multiple of the number of devices.
            Each epoch visits the training set in an order drawn from ``(seed, epoch)``
            (:func:`cnnjax.data.epoch_order`) and drops the last ``N mod batch_size`` examples
            (other ones in the next epoch), so every step has one shape. Evaluation sees every
            example: its last batch is padded and the padding masked out.
        seed: the data order and augmentation draws. Parameter init and dropout randomness come
            from the model's own ``nnx.Rngs`` (seed them when building it, as the command line
            does with ``--seed``); the RNG streams are part of the model state, so checkpoints
            save them.
        checkpoint_dir: save a checkpoint (orbax) after every epoch as
            ``checkpoint_dir/epoch_<k>``: model state, optimizer state, history, ``seed``,
            ``batch_size`` and the recipe options that differ from their defaults. Orbax writes
            into a temporary directory and renames it when complete, so the previous checkpoint
            is never touched before the new one exists; the last ``CHECKPOINTS_KEPT`` are kept.
            Without ``resume`` the directory must hold no checkpoints (nothing is overwritten).
        resume: continue from the last checkpoint in ``checkpoint_dir`` (start afresh if there is
            none). The resumed run ends bit-for-bit where an uninterrupted one would. A corrupt,
            incomplete or mismatched checkpoint raises :class:`CheckpointError` naming its path.
        progress: on a terminal, a progress bar per epoch (running loss, images/s) and a line
            per epoch; when stdout is not a terminal, only the lines; then a summary line.
        learning_rate, schedule, warmup_epochs: for an optimizer given by name, the peak
            learning rate and its :func:`learning_rate_schedule` (``SCHEDULES``).
        weight_decay: for an optimizer given by name, decoupled weight decay on kernels only
            (:func:`make_optimizer`); ``None``: the optimizer's default.
        augment: ``AUGMENTATIONS``: ``"flip-crop"`` (pad 4, random crop, horizontal flip: CIFAR
            size) or ``"random-resized-crop"`` (and flip: ImageNet size), drawn per example
            (:mod:`cnnjax.pipeline`); training batches only.
        label_smoothing: the train loss's label smoothing (:func:`cross_entropy`), in ``[0, 1)``.
        dtype: the compute dtype, ``"float32"`` or ``"bfloat16"`` (:func:`make_train_step`).
        workers: decoding processes of the pipeline (0: read in this process; the in-memory
            datasets need none).
        log_dir: on process 0, append one JSON object per epoch to ``log_dir/metrics.jsonl``:
            ``epoch``, ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy``
            (``null`` without ``eval_data``), ``learning_rate`` (of the epoch's last step;
            ``null`` for a ``GradientTransformation``), ``images_per_second`` (training),
            ``epoch_time`` (seconds, training and evaluation) and ``wall_time`` (Unix time).
            A fresh run starts the file anew; a resumed one keeps the lines of the epochs it
            restores.

    Every visible device of every process is used (see the module docstring); with one device
    the results are exactly reproducible for a given seed. The defaults of the recipe options
    reproduce the plain loop.

    >>> from cnnjax.data import load_digits
    >>> (x, y), test = load_digits(size=8)
    >>> model = nnx.Sequential(lambda x: x.reshape(len(x), -1), nnx.Linear(64, 10, rngs=nnx.Rngs(0)))
    >>> history = fit(model, "adam", (x, y), test, epochs=2, batch_size=64, learning_rate=1e-2, progress=False)
    >>> history.test_accuracy[-1] > 0.8
    True
    """
    op = "fit"
    epochs = check_positive(epochs, "epochs", op)
    batch_size = check_positive(batch_size, "batch_size", op)
    seed = check_positive(seed, "seed", op, minimum=0)
    warmup_epochs = check_positive(warmup_epochs, "warmup_epochs", op, minimum=0)
    workers = check_positive(workers, "workers", op, minimum=0)
    recipe = _check_recipe(optimizer, learning_rate, schedule, warmup_epochs, epochs, weight_decay)
    recipe |= _check_choices(augment=augment, dtype=dtype, label_smoothing=label_smoothing)
    train_source = _source(train_data, "train_data")
    eval_source = None if eval_data is None else _source(eval_data, "eval_data")
    if resume and checkpoint_dir is None:
        raise ValueError(f"{op}: resume=True needs a checkpoint_dir")
    mesh = Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
    if batch_size % mesh.size:
        raise ValueError(
            f"{op}: batch_size={batch_size} must be a multiple of the {mesh.size} devices it is split over"
        )
    steps = num_batches(len(train_source), batch_size, drop_remainder=True)
    if steps == 0:
        raise ValueError(f"{op}: batch_size={batch_size} exceeds the {len(train_source)} training examples")
    rate = None
    if isinstance(optimizer, str):
        rate = learning_rate_schedule(
            learning_rate, schedule=schedule, warmup_epochs=warmup_epochs, epochs=epochs, steps_per_epoch=steps
        )
        optimizer = make_optimizer(optimizer, rate, weight_decay=weight_decay)

    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    graphdef, state = init_train_state(model, optimizer)
    # A copy: the steps donate their input, and the model's own arrays must outlive an interruption.
    state = jax.device_put(state, NamedSharding(mesh, P()), may_alias=False)
    manager = None if checkpoint_dir is None else _checkpoint_manager(checkpoint_dir)
    run = {"seed": seed, "batch_size": batch_size, **recipe}
    train_step = make_train_step(graphdef, optimizer, mesh, label_smoothing=label_smoothing, dtype=dtype)
    eval_step = make_eval_step(eval_graphdef, mesh, dtype=dtype)
    report = _Report(progress, epochs, steps)
    stream = None
    start = time.perf_counter()
    try:
        history = History()
        if manager is not None:
            state, history = (
                _restore(manager, state, run, epochs) if resume else (state, _require_no_checkpoints(manager))
            )
        first = len(history.train_loss)
        log = _MetricsLog(log_dir, first) if log_dir is not None and jax.process_index() == 0 else None
        if first < epochs:
            stream = iter(
                run_batches(
                    train_source,
                    eval_source,
                    batch_size,
                    seed=seed,
                    epochs=epochs,
                    first_epoch=first,
                    augment=augment,
                    workers=workers,
                )
            )
        for epoch in range(first, epochs):
            epoch_start = time.perf_counter()
            epoch_batches = itertools.islice(stream, steps)
            state, loss, accuracy = _train_epoch(train_step, state, epoch_batches, mesh, report.bar(epoch))
            images_per_s = steps * batch_size / (time.perf_counter() - epoch_start)
            history.train_loss.append(loss)
            history.train_accuracy.append(accuracy)
            if eval_source is not None:
                eval_steps = num_batches(len(eval_source), batch_size, drop_remainder=False)
                loss, accuracy = evaluate(eval_step, state, itertools.islice(stream, eval_steps), mesh)
                history.test_loss.append(loss)
                history.test_accuracy.append(accuracy)
            history.epoch_time.append(time.perf_counter() - epoch_start)
            if log is not None:
                log.write(history, None if rate is None else _rate_at(rate, (epoch + 1) * steps - 1), images_per_s)
            if manager is not None:
                _save(manager, epoch + 1, state, history, run)
            report.epoch(history, images_per_s)
        report.summary(history, time.perf_counter() - start)
    finally:
        if stream is not None:
            stream.close()
            del stream
            if workers:
                gc.collect()  # grain's worker iterator sits in reference cycles that hold shared memory
        nnx.update(model, state.params, state.model_state)
        model.eval()
        if manager is not None:
            manager.close()
    return history


def evaluate(eval_step, state: TrainState, eval_batches, mesh: Mesh) -> tuple[float, float]:
    """Mean loss and accuracy of ``eval_step`` (:func:`make_eval_step`) over ``eval_batches``.

    ``eval_batches``: this process's ``(x, y, mask)`` rows of every global batch
    (:func:`cnnjax.pipeline.run_batches`) -> ``(sum of losses / n, correct / n)``, ``n`` the
    number of real (unmasked) examples.

    >>> from cnnjax.data import ArraySource
    >>> from cnnjax.pipeline import eval_batches
    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> graphdef, state = init_train_state(model, optax.sgd(0.1))
    >>> mesh = Mesh(np.asarray(jax.devices()[:1]), (DATA_AXIS,))
    >>> x, y = np.ones((5, 2), np.float32), np.zeros(5, np.int32)
    >>> loss, accuracy = evaluate(make_eval_step(graphdef, mesh), state, eval_batches(ArraySource(x, y), 4), mesh)
    >>> bool(np.isclose(loss, float(cross_entropy(model(x[:1]), y[:1])[0])))
    True
    """
    loss = correct = count = 0
    for batch in eval_batches:
        metrics = eval_step(state, *_global_batch(mesh, *batch))
        loss, correct, count = loss + metrics["loss"], correct + metrics["correct"], count + metrics["count"]
    count = _to_float(count)
    return _to_float(loss) / count, _to_float(correct) / count


def _train_epoch(train_step, state: TrainState, epoch_batches, mesh: Mesh, bar) -> tuple[TrainState, float, float]:
    loss = correct = 0
    seen = 0
    start = time.perf_counter()
    queued = collections.deque()
    for step, (x, y) in enumerate(epoch_batches, start=1):
        state, metrics = train_step(state, *_global_batch(mesh, x, y))
        loss, correct, seen = loss + metrics["loss"], correct + metrics["correct"], seen + len(x) * jax.process_count()
        queued.append(metrics["loss"])
        if len(queued) > DISPATCH_AHEAD:
            queued.popleft().block_until_ready()
        if bar is not None and (step % _PROGRESS_EVERY == 0 or step == bar.total):
            images_per_s = seen / (time.perf_counter() - start)
            bar.set_postfix_str(f"loss {_to_float(loss) / step:.4f}, {images_per_s:.0f} img/s", refresh=False)
            bar.update(step - bar.n)
    if bar is not None:
        bar.close()
    return state, _to_float(loss) / step, _to_float(correct) / seen


def _global_batch(mesh: Mesh, *rows: np.ndarray) -> tuple[jax.Array, ...]:
    """The global batch arrays, sharded on ``"data"``, from this process's (equal) share of the
    rows of each; one process: a single batched ``device_put``."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(DATA_AXIS)), rows)


def _to_float(x) -> float:
    """A replicated device scalar as a Python float (process-local read, works on multi-host)."""
    return float(np.asarray(x.addressable_data(0)))


def _source(data, name: str):
    """``data`` as a pipeline source: an ``(x, y)`` pair of arrays (checked) or a source itself."""
    if hasattr(data, "read") and hasattr(data, "__len__"):
        source = data
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"fit: {name} labels must be a 1-D integer array, got {y.dtype} of shape {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"fit: {name} holds {len(x)} images but {len(y)} labels")
        source = ArraySource(x, y)
    else:
        raise TypeError(f"fit: {name} must be an (x, y) pair of arrays or an ImageFolder, got {type(data).__name__}")
    if len(source) == 0:
        raise ValueError(f"fit: {name} holds no examples")
    return source


def _rate_at(rate: optax.ScalarOrSchedule, step: int) -> float:
    return float(rate(step)) if callable(rate) else float(rate)


def _check_recipe(optimizer, learning_rate, schedule, warmup_epochs: int, epochs: int, weight_decay) -> dict:
    """Check ``fit``'s optimizer options; return those a checkpoint records (the non-default ones)."""
    op = "fit"
    if schedule not in SCHEDULES:
        raise ValueError(f"{op}: schedule={schedule!r} must be one of {', '.join(SCHEDULES)}")
    if warmup_epochs and warmup_epochs >= epochs:
        raise ValueError(f"{op}: warmup_epochs={warmup_epochs} must be less than epochs={epochs}")
    if weight_decay is not None and not (_is_number(weight_decay) and 0 <= weight_decay < math.inf):
        raise ValueError(f"{op}: weight_decay={weight_decay!r} must be a finite number >= 0")
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"{op}: optimizer={optimizer!r} must be one of {', '.join(sorted(OPTIMIZERS))}")
        if not (_is_number(learning_rate) and 0 < learning_rate < math.inf):
            raise ValueError(
                f"{op}: optimizer={optimizer!r} needs learning_rate, a finite number > 0, got {learning_rate!r}"
            )
        recipe = {"schedule": schedule, "epochs": epochs} if schedule != "constant" else {}
        recipe |= {"warmup_epochs": warmup_epochs} if warmup_epochs else {}
        return recipe | ({"weight_decay": weight_decay} if weight_decay is not None else {})
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"{op}: optimizer must be an optax GradientTransformation or a name in OPTIMIZERS, got {type(optimizer).__name__}"
        )
    options = {"learning_rate": learning_rate, "schedule": schedule, "warmup_epochs": warmup_epochs}
    defaults = {"learning_rate": None, "schedule": "constant", "warmup_epochs": 0}
    for name, value in (options | {"weight_decay": weight_decay}).items():
        if value != defaults.get(name):
            raise ValueError(
                f"{op}: {name}={value!r} needs the optimizer by name (e.g. 'adam'); "
                "a GradientTransformation carries its own learning rate and decay"
            )
    return {}


def _check_choices(*, augment: str, dtype: str, label_smoothing: float) -> dict:
    """Check ``fit``'s data and loss options; return the non-default ones (a checkpoint records them)."""
    op = "fit"
    if augment not in AUGMENTATIONS:
        raise ValueError(f"{op}: augment={augment!r} must be one of {', '.join(AUGMENTATIONS)}")
    if dtype not in DTYPES:
        raise ValueError(f"{op}: dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    if not (_is_number(label_smoothing) and 0 <= label_smoothing < 1):
        raise ValueError(f"{op}: label_smoothing={label_smoothing!r} must be a number in [0, 1)")
    options = {"augment": augment, "dtype": dtype, "label_smoothing": label_smoothing}
    defaults = {"augment": "none", "dtype": "float32", "label_smoothing": 0.0}
    return {name: value for name, value in options.items() if value != defaults[name]}


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


class _MetricsLog:
    """``directory/metrics.jsonl``, one JSON object per epoch (see :func:`fit`'s ``log_dir``)."""

    def __init__(self, directory, first_epoch: int):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(os.fspath(directory), "metrics.jsonl")
        kept = []
        if first_epoch and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if _logged_epoch(line) <= first_epoch]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, history: History, learning_rate: float | None, images_per_s: float) -> None:
        k = len(history.train_loss)
        record = {
            "epoch": k,
            "train_loss": history.train_loss[-1],
            "train_accuracy": history.train_accuracy[-1],
            "test_loss": history.test_loss[-1] if history.test_loss else None,
            "test_accuracy": history.test_accuracy[-1] if history.test_accuracy else None,
            "learning_rate": learning_rate,
            "images_per_second": images_per_s,
            "epoch_time": history.epoch_time[-1],
            "wall_time": time.time(),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _logged_epoch(line: str) -> float:
    """The epoch of a metrics line; a damaged line (an interrupted write) counts as past every epoch."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, TypeError, KeyError):
        return math.inf


class _Report:
    """What ``fit`` prints: nothing without ``progress`` or off process 0; else a tqdm bar per
    epoch on a terminal, and on any stdout one line per epoch and a summary line."""

    def __init__(self, progress: bool, epochs: int, steps: int):
        self.enabled = progress and jax.process_index() == 0
        self.bars = self.enabled and sys.stdout.isatty()
        self.epochs, self.steps = epochs, steps

    def bar(self, epoch: int) -> tqdm | None:
        if not self.bars:
            return None
        return tqdm(
            total=self.steps, desc=f"epoch {epoch + 1}/{self.epochs}", unit="step", leave=False, file=sys.stdout
        )

    def epoch(self, history: History, images_per_s: float) -> None:
        if not self.enabled:
            return
        k, seconds = len(history.train_loss), history.epoch_time[-1]
        line = f"epoch {k:>{len(str(self.epochs))}}/{self.epochs}: train loss {history.train_loss[-1]:.4f} acc {history.train_accuracy[-1]:.2%}"
        if history.test_loss:
            line += f" | test loss {history.test_loss[-1]:.4f} acc {history.test_accuracy[-1]:.2%}"
        print(f"{line} | {seconds:.1f} s, train {images_per_s:.0f} img/s", flush=True)

    def summary(self, history: History, seconds: float) -> None:
        if not self.enabled:
            return
        kind, accuracy = ("test", history.test_accuracy) if history.test_accuracy else ("train", history.train_accuracy)
        epochs = f"{len(accuracy)} epoch{'s' if len(accuracy) != 1 else ''}"
        print(f"done: {epochs}, final {kind} accuracy {accuracy[-1]:.2%}, {seconds:.1f} s in this run", flush=True)


def _checkpoint_manager(directory) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=CHECKPOINTS_KEPT, step_prefix="epoch", enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options)


def _checkpoint_path(manager: ocp.CheckpointManager, epoch: int) -> str:
    return os.path.join(os.fspath(manager.directory), f"epoch_{epoch}")


def _save(manager: ocp.CheckpointManager, epoch: int, state: TrainState, history: History, run: dict) -> None:
    meta = {"run": run, "history": dataclasses.asdict(history)}
    manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def _require_no_checkpoints(manager: ocp.CheckpointManager) -> History:
    if manager.all_steps():
        raise CheckpointError(
            f"fit: {manager.directory} already holds checkpoints (epochs {list(manager.all_steps())}); "
            "pass resume=True to continue from them, or use an empty checkpoint_dir"
        )
    return History()


def _restore(manager: ocp.CheckpointManager, state: TrainState, run: dict, epochs: int) -> tuple[TrainState, History]:
    """The state and history of the newest checkpoint, restored with ``state``'s structure and sharding."""
    epoch = manager.latest_step()
    if epoch is None:
        return state, History()
    path = _checkpoint_path(manager, epoch)
    older = [e for e in manager.all_steps() if e < epoch]
    hint = f"; delete it to resume from {_checkpoint_path(manager, max(older))}" if older else ""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    try:
        restored = manager.restore(epoch, args=args)
        saved_run, history = restored.meta["run"], History(**restored.meta["history"])
    except Exception as e:  # orbax/tensorstore raise many types on damaged files; all mean the same here
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        raise CheckpointError(
            f"fit: cannot restore checkpoint {path}: it is corrupt, incomplete, or from another model or optimizer ({reason}){hint}"
        ) from e
    if len(history.train_loss) != epoch:
        raise CheckpointError(
            f"fit: checkpoint {path} records {len(history.train_loss)} epochs of history, expected {epoch}{hint}"
        )
    if saved_run != run:
        raise CheckpointError(
            f"fit: checkpoint {path} was written with {saved_run}, this run has {run}; resuming would not reproduce the run"
        )
    if epoch > epochs:
        raise CheckpointError(f"fit: checkpoint {path} is past epochs={epochs} (epochs counts the whole run)")
    return restored.state, history


def draw_history(history: History, loss_axes, accuracy_axes) -> None:
    """Draw the per-epoch loss and accuracy curves of ``history`` on two matplotlib axes."""
    from matplotlib.ticker import MaxNLocator

    epochs = range(1, len(history.train_loss) + 1)
    for kind in ("train", "test"):
        if getattr(history, f"{kind}_loss"):
            loss_axes.plot(epochs, getattr(history, f"{kind}_loss"), marker=".", label=kind)
            accuracy_axes.plot(epochs, getattr(history, f"{kind}_accuracy"), marker=".", label=kind)
    for axes, name in ((loss_axes, "cross-entropy loss"), (accuracy_axes, "accuracy")):
        axes.set_xlabel("epoch")
        axes.set_ylabel(name)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()


def plot_history(history: History, path) -> None:
    """Write ``history``'s loss and accuracy curves to ``path`` (PNG, matplotlib, no display)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.5), layout="constrained")
    draw_history(history, *figure.subplots(1, 2))
    figure.savefig(path, dpi=120)


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
    """Run ``cnnjax-train``: parse ``argv``, load the data, build the model, :func:`fit`, report.

    Bad arguments and unreadable data or checkpoints end the program with a one-line message on
    stderr (exit status 2 for arguments, 1 for data and checkpoints), never a traceback. With
    several processes only process 0 prints: the others' standard output goes to ``os.devnull``.
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
    if args.warmup_epochs and args.warmup_epochs >= args.epochs:
        parser.error(f"--warmup-epochs {args.warmup_epochs} must be less than --epochs {args.epochs}")
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
            args.optimizer,
            train_data,
            test_data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            checkpoint_dir=args.checkpoint_dir,
            resume=args.resume,
            progress=args.progress,
            learning_rate=args.lr,
            schedule=args.schedule,
            warmup_epochs=args.warmup_epochs,
            weight_decay=args.weight_decay,
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
    except (OSError, ValueError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
