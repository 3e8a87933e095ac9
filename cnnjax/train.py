"""Training: pure jitted train/eval steps, the ``fit`` loop, checkpoints, data parallelism, CLI.

The loop keeps an NNX model as ``(graphdef, TrainState)``: the graph definition is static and the
state (parameters, the other model variables such as batch statistics and RNG counters, and the
optax state) is a pytree that every jitted step takes and returns, donating the old one. The
loss is softmax cross-entropy on integer labels, averaged over the batch (notes 002, "training
loop": forward, loss, backprop, update with the batch-averaged gradient).

Data parallelism: ``fit`` builds a 1-D ``Mesh`` over every visible device (axis ``"data"``),
shards each batch along its first axis (``NamedSharding(mesh, P("data"))``) and replicates the
state (``P()``); XLA inserts the gradient all-reduce. With one device this changes nothing. On
several hosts, start every process with ``jax.distributed.initialize()`` before any other JAX
call (the command line's ``--distributed``): it detects SLURM, Open MPI, Kubernetes and Cloud
TPU clusters by itself, elsewhere pass ``--coordinator-address HOST:PORT --num-processes N
--process-id I`` to each process. Every process then loads the same data and runs the same
``fit``; ``jax.devices()`` spans all hosts and only process 0 prints.

Command line (``cnnjax-train`` or ``python -m cnnjax.train``); the defaults train LeNet-5 on the
embedded digits::

    cnnjax-train
    cnnjax-train --model resnet18 --dataset cifar10 --data-dir ~/data --epochs 30 --lr 1e-3 \\
        --checkpoint-dir runs/resnet --resume --plot runs/resnet.png
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
from cnnjax.data import batches, load_cifar10, load_digits, load_fashion_mnist, load_mnist, num_batches
from cnnjax.shapes import check_positive

DATA_AXIS = "data"
# The command line's defaults: LeNet-5 on the digits reaches ~99% test accuracy with them.
DEFAULT_EPOCHS = 15
DEFAULT_BATCH_SIZE = 16
DEFAULT_LR = 3e-3
CHECKPOINTS_KEPT = 2
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
OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "momentum": functools.partial(optax.sgd, momentum=0.9),
}
DATASETS: dict[str, Callable[..., Any]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
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


def cross_entropy(logits, labels):
    """Softmax cross-entropy with integer labels, one value per example.

    ``logits: (N, num_classes)``, ``labels: (N,)`` int -> ``(N,)``:
    ``logsumexp(logits) - logits[label]``.

    >>> cross_entropy(jnp.zeros((1, 4)), jnp.array([2]))  # log(4) for uniform logits
    Array([1.3862944], dtype=float32)
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """Split ``model`` into its static graph definition and a fresh :class:`TrainState`.

    >>> graphdef, state = init_train_state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), optax.sgd(0.1))
    >>> state.params["kernel"].shape
    (2, 3)
    """
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState(params, model_state, optimizer.init(params))


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, mesh: Mesh | None = None):
    """The pure train step ``train_step(state, x, y) -> (state, metrics)``, jitted, donating ``state``.

    ``x: (B, ...)`` a batch for the model in ``graphdef`` (built in training mode), ``y: (B,)``
    int labels. ``metrics``: ``loss`` (the batch-mean cross-entropy) and ``correct`` (how many
    argmax predictions equal ``y``). With a ``mesh``, ``x`` and ``y`` are sharded along the
    mesh's ``"data"`` axis and the state is replicated.

    >>> graphdef, state = init_train_state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), optax.sgd(0.1))
    >>> step = make_train_step(graphdef, optax.sgd(0.1))
    >>> state, metrics = step(state, jnp.ones((4, 2)), jnp.array([0, 1, 2, 0]))
    >>> sorted(metrics), int(metrics["correct"]) <= 4
    (['correct', 'loss'], True)
    """

    def train_step(state: TrainState, x, y):
        def loss_fn(params):
            # copy=True: fresh variables in the grad trace, so BatchNorm may update its statistics
            model = nnx.merge(graphdef, params, state.model_state, copy=True)
            logits = model(x)
            _, _, model_state = nnx.split(model, nnx.Param, ...)
            return cross_entropy(logits, y).mean(), (logits, model_state)

        (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == y)
        return TrainState(params, model_state, opt_state), {"loss": loss, "correct": correct}

    return jax.jit(train_step, donate_argnums=0, **_shardings(mesh, n_batch_args=2))


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh | None = None):
    """The pure eval step ``eval_step(state, x, y, mask) -> metrics``, jitted.

    ``x: (B, ...)``, ``y: (B,)``, ``mask: (B,)`` (1 for real examples, 0 for padding) ->
    ``loss`` (the cross-entropy summed over the real examples) and ``correct`` (their count of
    right predictions). ``graphdef`` should be the model's in eval mode (running batch
    statistics, no dropout); the state is not changed.

    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> graphdef, state = init_train_state(model, optax.sgd(0.1))
    >>> metrics = make_eval_step(graphdef)(state, jnp.ones((2, 2)), jnp.array([0, 1]), jnp.array([1.0, 0.0]))
    >>> float(metrics["loss"]) == float(cross_entropy(model(jnp.ones((1, 2))), jnp.array([0]))[0])
    True
    """

    def eval_step(state: TrainState, x, y, mask):
        logits = nnx.merge(graphdef, state.params, state.model_state)(x)
        correct = (jnp.argmax(logits, axis=-1) == y).astype(mask.dtype)
        return {"loss": jnp.sum(cross_entropy(logits, y) * mask), "correct": jnp.sum(correct * mask)}

    return jax.jit(eval_step, **_shardings(mesh, n_batch_args=3))


def _shardings(mesh: Mesh | None, n_batch_args: int) -> dict:
    """``jax.jit`` shardings: the state and outputs replicated, batch arguments split on ``"data"``."""
    if mesh is None:
        return {}
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
    return {"in_shardings": (replicated,) + (split,) * n_batch_args, "out_shardings": replicated}


def fit(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    train_data,
    eval_data,
    *,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    checkpoint_dir=None,
    resume: bool = False,
    progress: bool = True,
) -> History:
    """Train the NNX ``model`` in place with the optax ``optimizer``; return its :class:`History`.

    Args:
        model: any NNX classifier ``(B, ...) -> (B, num_classes)`` logits, e.g. from
            :mod:`cnnjax.models`. It is put in training mode (``model.train()``) for the train
            steps and in eval mode for evaluation, and is left in eval mode with the final state.
        train_data, eval_data: ``(x, y)`` pairs of arrays, ``x: (N, ...)``, ``y: (N,)`` int
            labels. ``eval_data`` may be ``None`` (no test metrics).
        epochs: the run's total number of epochs, counting those a resumed run restores.
        batch_size: examples per step, a multiple of the number of devices. Each epoch visits
            the training set in an order drawn from ``(seed, epoch)`` (:func:`cnnjax.data.batches`)
            and drops the last ``N mod batch_size`` examples (other ones in the next epoch),
            so every step has one shape. Evaluation sees every example: its last batch is
            padded and the padding masked out.
        seed: the data order. Parameter init and dropout randomness come from the model's own
            ``nnx.Rngs`` (seed them when building it, as the command line does with ``--seed``);
            the RNG streams are part of the model state, so checkpoints save them.
        checkpoint_dir: save a checkpoint (orbax) after every epoch as
            ``checkpoint_dir/epoch_<k>``: model state, optimizer state, history, ``seed`` and
            ``batch_size``. Orbax writes into a temporary directory and renames it when complete,
            so the previous checkpoint is never touched before the new one exists; the last
            ``CHECKPOINTS_KEPT`` are kept. Without ``resume`` the directory must hold no
            checkpoints (nothing is overwritten).
        resume: continue from the last checkpoint in ``checkpoint_dir`` (start afresh if there is
            none). The resumed run ends bit-for-bit where an uninterrupted one would. A corrupt,
            incomplete or mismatched checkpoint raises :class:`CheckpointError` naming its path.
        progress: on a terminal, a progress bar per epoch (running loss, images/s) and a line
            per epoch; when stdout is not a terminal, only the lines; then a summary line.

    Every visible device is used (see the module docstring); with one device the results are
    exactly reproducible for a given seed.

    >>> from cnnjax.data import load_digits
    >>> (x, y), test = load_digits(size=8)
    >>> model = nnx.Sequential(lambda x: x.reshape(len(x), -1), nnx.Linear(64, 10, rngs=nnx.Rngs(0)))
    >>> history = fit(model, optax.adam(1e-2), (x, y), test, epochs=2, batch_size=64, progress=False)
    >>> history.test_accuracy[-1] > 0.8
    True
    """
    op = "fit"
    epochs = check_positive(epochs, "epochs", op)
    batch_size = check_positive(batch_size, "batch_size", op)
    seed = check_positive(seed, "seed", op, minimum=0)
    x_train, y_train = _examples(train_data, "train_data")
    evaluation = None if eval_data is None else _examples(eval_data, "eval_data")
    if resume and checkpoint_dir is None:
        raise ValueError(f"{op}: resume=True needs a checkpoint_dir")
    mesh = Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
    if batch_size % mesh.size:
        raise ValueError(
            f"{op}: batch_size={batch_size} must be a multiple of the {mesh.size} devices it is split over"
        )
    steps = num_batches(len(x_train), batch_size, drop_remainder=True)
    if steps == 0:
        raise ValueError(f"{op}: batch_size={batch_size} exceeds the {len(x_train)} training examples")

    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    graphdef, state = init_train_state(model, optimizer)
    # A copy: the steps donate their input, and the model's own arrays must outlive an interruption.
    state = jax.device_put(state, NamedSharding(mesh, P()), may_alias=False)
    manager = None if checkpoint_dir is None else _checkpoint_manager(checkpoint_dir)
    run = {"seed": seed, "batch_size": batch_size}
    train_step, eval_step = make_train_step(graphdef, optimizer, mesh), make_eval_step(eval_graphdef, mesh)
    report = _Report(progress, epochs, steps)
    start = time.perf_counter()
    try:
        history = History()
        if manager is not None:
            state, history = (
                _restore(manager, state, run, epochs) if resume else (state, _require_no_checkpoints(manager))
            )
        for epoch in range(len(history.train_loss), epochs):
            epoch_start = time.perf_counter()
            epoch_batches = batches(
                x_train, y_train, batch_size, shuffle=True, seed=seed, epoch=epoch, drop_remainder=True
            )
            state, loss, accuracy = _train_epoch(train_step, state, epoch_batches, mesh, report.bar(epoch))
            images_per_s = steps * batch_size / (time.perf_counter() - epoch_start)
            history.train_loss.append(loss)
            history.train_accuracy.append(accuracy)
            if evaluation is not None:
                loss, accuracy = evaluate(eval_step, state, *evaluation, batch_size, mesh)
                history.test_loss.append(loss)
                history.test_accuracy.append(accuracy)
            history.epoch_time.append(time.perf_counter() - epoch_start)
            if manager is not None:
                _save(manager, epoch + 1, state, history, run)
            report.epoch(history, images_per_s)
        report.summary(history, time.perf_counter() - start)
    finally:
        nnx.update(model, state.params, state.model_state)
        model.eval()
        if manager is not None:
            manager.close()
    return history


def evaluate(eval_step, state: TrainState, x, y, batch_size: int, mesh: Mesh) -> tuple[float, float]:
    """Mean loss and accuracy of ``eval_step`` (:func:`make_eval_step`) over every example of
    ``(x, y)``: batches of ``batch_size``, the last one zero-padded and masked.

    ``x: (N, ...)``, ``y: (N,)`` -> ``(sum of losses / N, correct / N)``.

    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> graphdef, state = init_train_state(model, optax.sgd(0.1))
    >>> mesh = Mesh(np.asarray(jax.devices()[:1]), (DATA_AXIS,))
    >>> x, y = np.ones((5, 2), np.float32), np.zeros(5, np.int32)
    >>> loss, accuracy = evaluate(make_eval_step(graphdef, mesh), state, x, y, 4, mesh)
    >>> bool(np.isclose(loss, float(cross_entropy(model(x[:1]), y[:1])[0])))
    True
    """
    split = NamedSharding(mesh, P(DATA_AXIS))
    loss = correct = 0
    for xb, yb in batches(x, y, batch_size):
        pad = batch_size - len(xb)
        mask = np.concatenate([np.ones(len(xb), np.float32), np.zeros(pad, np.float32)])
        xb, yb = (np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in (xb, yb))
        metrics = eval_step(state, *jax.device_put((xb, yb, mask), split))
        loss, correct = loss + metrics["loss"], correct + metrics["correct"]
    return _to_float(loss) / len(x), _to_float(correct) / len(x)


def _train_epoch(train_step, state: TrainState, epoch_batches, mesh: Mesh, bar) -> tuple[TrainState, float, float]:
    split = NamedSharding(mesh, P(DATA_AXIS))
    loss = correct = 0
    seen = 0
    start = time.perf_counter()
    for step, (x, y) in enumerate(epoch_batches, start=1):
        state, metrics = train_step(state, *jax.device_put((x, y), split))
        loss, correct, seen = loss + metrics["loss"], correct + metrics["correct"], seen + len(x)
        if bar is not None and (step % _PROGRESS_EVERY == 0 or step == bar.total):
            images_per_s = seen / (time.perf_counter() - start)
            bar.set_postfix_str(f"loss {_to_float(loss) / step:.4f}, {images_per_s:.0f} img/s", refresh=False)
            bar.update(step - bar.n)
    if bar is not None:
        bar.close()
    return state, _to_float(loss) / step, _to_float(correct) / seen


def _to_float(x) -> float:
    """A replicated device scalar as a Python float (process-local read, works on multi-host)."""
    return float(np.asarray(x.addressable_data(0)))


def _examples(data, name: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(f"fit: {name} must be an (x, y) pair of arrays, got {type(data).__name__}")
    x, y = np.asarray(data[0]), np.asarray(data[1])
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"fit: {name} labels must be a 1-D integer array, got {y.dtype} of shape {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"fit: {name} holds {len(x)} images but {len(y)} labels")
    return x, y


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
    parser.add_argument("--data-dir", help="directory with the dataset's files (all but digits)")
    parser.add_argument(
        "--epochs", type=_int_at_least(1), default=DEFAULT_EPOCHS, help="total epochs (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=DEFAULT_BATCH_SIZE,
        help="examples per step (default: %(default)s)",
    )
    parser.add_argument("--lr", type=_positive_float, default=DEFAULT_LR, help="learning rate (default: %(default)s)")
    parser.add_argument(
        "--optimizer", choices=sorted(OPTIMIZERS), default="adam", help="optax optimizer (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=_int_at_least(0), default=0, help="model init and data order (default: %(default)s)"
    )
    parser.add_argument("--checkpoint-dir", help="save a checkpoint here after every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    parser.add_argument("--plot", metavar="PATH", help="write the training curves to this PNG")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="print nothing while training")
    multi_host = parser.add_argument_group("multi-host (see the module docstring)")
    multi_host.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    multi_host.add_argument(
        "--coordinator-address", metavar="HOST:PORT", help="process 0's address (implies --distributed)"
    )
    multi_host.add_argument(
        "--num-processes", type=_int_at_least(1), help="number of processes (implies --distributed)"
    )
    multi_host.add_argument("--process-id", type=_int_at_least(0), help="this process's index (implies --distributed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``cnnjax-train``: parse ``argv``, load the data, build the model, :func:`fit`, report.

    Bad arguments and unreadable data or checkpoints end the program with a one-line message on
    stderr (exit status 2 for arguments, 1 for data and checkpoints), never a traceback.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.dataset != "digits" and args.data_dir is None:
        parser.error(f"--dataset {args.dataset} needs --data-dir")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir")
    cluster = (args.coordinator_address, args.num_processes, args.process_id)
    if args.distributed or any(v is not None for v in cluster):
        jax.distributed.initialize(*cluster)

    try:
        load = DATASETS[args.dataset]
        train_data, test_data = load() if args.dataset == "digits" else load(args.data_dir)
        x_train = train_data[0]
        model = MODELS[args.model](
            num_classes=10, in_features=x_train.shape[-1], input_size=x_train.shape[1], rngs=nnx.Rngs(args.seed)
        )
        history = fit(
            model,
            OPTIMIZERS[args.optimizer](args.lr),
            train_data,
            test_data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            checkpoint_dir=args.checkpoint_dir,
            resume=args.resume,
            progress=args.progress,
        )
        if args.plot is not None:
            plot_history(history, args.plot)
            if args.progress:
                print(f"wrote {args.plot}")
    except (OSError, ValueError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
