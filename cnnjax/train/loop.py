"""``fit``: the training loop over the steps, the pipeline, checkpoints and reports.

Data reaches the steps one way, whatever the dataset: :mod:`cnnjax.train.pipeline` (Grain)
yields this process's rows of every global batch, and ``jax.make_array_from_process_local_data``
assembles the global batch, sharded along the first axis of a 1-D ``Mesh`` over every device of
every process (axis ``"data"``, ``NamedSharding(mesh, P("data"))``); the state is replicated
(``P()``) and XLA inserts the gradient all-reduce. With one device this changes nothing.
"""

from __future__ import annotations

import collections
import gc
import itertools
import time

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cnnjax.shapes import check_positive
from cnnjax.train import checkpoint
from cnnjax.train.data import ArraySource, num_batches
from cnnjax.train.errors import TrainError
from cnnjax.train.pipeline import AUGMENTATIONS, run_batches
from cnnjax.train.recipe import Recipe
from cnnjax.train.report import History, MetricsLog, Report
from cnnjax.train.steps import (
    DATA_AXIS,
    DTYPES,
    TrainState,
    global_batch,
    init_train_state,
    make_eval_step,
    make_train_step,
    to_float,
)

__all__ = ["evaluate", "fit"]

DISPATCH_AHEAD = 8  # train steps queued on the devices before the loop waits: bounds the batches held there, and
# leaves the devices work while a loaded host schedules the loop again
_PROGRESS_EVERY = 10  # steps between progress-bar refreshes (each one waits for the device)
_DEFAULT_CHOICES = {"augment": "none", "dtype": "float32", "label_smoothing": 0.0}


def fit(
    model: nnx.Module,
    optimizer: optax.GradientTransformation | Recipe,
    train_data,
    eval_data,
    *,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    checkpoint_dir=None,
    resume: bool = False,
    progress: bool = True,
    augment: str = "none",
    label_smoothing: float = 0.0,
    dtype: str = "float32",
    workers: int = 0,
    log_dir=None,
) -> History:
    """Train the NNX ``model`` in place; return its :class:`~cnnjax.train.report.History`.

    Args:
        model: any NNX classifier ``(B, H, W, C) -> (B, num_classes)`` logits, e.g. from
            :mod:`cnnjax.models`. It is put in training mode (``model.train()``) for the train
            steps and in eval mode for evaluation, and is left in eval mode with the final state.
        optimizer: an optax ``GradientTransformation``, used as given (it carries its own
            learning rate), or a :class:`~cnnjax.train.recipe.Recipe` (an optimizer by name with
            its learning-rate schedule and weight decay), built for this run's length. The
            compiled steps are cached per model structure and optimizer: a second ``fit`` of one
            model with the same optimizer object (or an equal recipe) does not recompile.
        train_data, eval_data: ``(x, y)`` pairs of arrays, ``x: (N, H, W, C)`` float in
            ``[0, 1]``, ``y: (N,)`` int labels, or sources such as the
            :class:`~cnnjax.train.data.ImageFolder` pair of
            :func:`~cnnjax.train.data.load_imagefolder`. ``eval_data`` may be ``None`` (no test
            metrics). Both go through :mod:`cnnjax.train.pipeline`.
        epochs: the run's total number of epochs, counting those a resumed run restores.
        batch_size: examples per step (the global batch), a multiple of the number of devices.
            Each epoch visits the training set in an order drawn from ``(seed, epoch)``
            (:func:`~cnnjax.train.data.epoch_order`) and drops the last ``N mod batch_size``
            examples (other ones in the next epoch), so every step has one shape. Evaluation sees
            every example: its last batch is padded and the padding masked out.
        seed: the data order and augmentation draws. Parameter init and dropout randomness come
            from the model's own ``nnx.Rngs`` (seed them when building it, as the command line
            does with ``--seed``); the RNG streams are part of the model state, so checkpoints
            save them.
        checkpoint_dir: save a checkpoint (orbax, :mod:`cnnjax.train.checkpoint`) after every
            epoch as ``checkpoint_dir/epoch_<k>``; the last ``CHECKPOINTS_KEPT`` are kept.
            Without ``resume`` the directory must hold no checkpoints (nothing is overwritten).
        resume: continue from the last checkpoint in ``checkpoint_dir`` (start afresh if there is
            none). The resumed run ends bit-for-bit where an uninterrupted one would. A corrupt,
            incomplete or mismatched checkpoint raises
            :class:`~cnnjax.train.errors.CheckpointError` naming its path.
        progress: on a terminal, a progress bar per epoch (running loss, images/s) and a line
            per epoch; when stdout is not a terminal, only the lines; then a summary line.
        augment: ``AUGMENTATIONS``: ``"flip-crop"`` (pad 4, random crop, horizontal flip: CIFAR
            size) or ``"random-resized-crop"`` (and flip: ImageNet size), drawn per example
            (:mod:`cnnjax.train.pipeline`); training batches only.
        label_smoothing: the train loss's label smoothing
            (:func:`~cnnjax.train.steps.cross_entropy`), in ``[0, 1)``.
        dtype: the compute dtype, ``"float32"`` or ``"bfloat16"``
            (:func:`~cnnjax.train.steps.make_train_step`).
        workers: decoding processes of the pipeline (0: read in this process; the in-memory
            datasets need none).
        log_dir: on process 0, append one JSON object per epoch to ``log_dir/metrics.jsonl``:
            ``epoch``, ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy``
            (``null`` without ``eval_data``), ``learning_rate`` (of the epoch's last step;
            ``null`` for a ``GradientTransformation``), ``images_per_second`` (training),
            ``epoch_time`` (seconds, training and evaluation) and ``wall_time`` (Unix time).
            A fresh run starts the file anew; a resumed one keeps the lines of the epochs it
            restores.

    Arguments that cannot be used raise :class:`~cnnjax.train.errors.TrainError` (a
    ``ValueError``), a wrong type ``TypeError``. Every visible device of every process is used
    (:mod:`cnnjax.train`); with one device the results are exactly reproducible for a given seed.

    >>> from cnnjax.train.data import load_digits
    >>> (x, y), test = load_digits(size=8)
    >>> model = nnx.Sequential(lambda x: x.reshape(len(x), -1), nnx.Linear(64, 10, rngs=nnx.Rngs(0)))
    >>> history = fit(model, Recipe("adam", 1e-2), (x, y), test, epochs=2, batch_size=64, progress=False)
    >>> history.test_accuracy[-1] > 0.8
    True
    """
    op = "fit"
    epochs = check_positive(epochs, "epochs", op)
    batch_size = check_positive(batch_size, "batch_size", op)
    seed = check_positive(seed, "seed", op, minimum=0)
    workers = check_positive(workers, "workers", op, minimum=0)
    choices = _check_choices(augment=augment, dtype=dtype, label_smoothing=label_smoothing)
    if not isinstance(optimizer, (Recipe, optax.GradientTransformation)):
        raise TypeError(
            f"{op}: optimizer must be an optax GradientTransformation or a cnnjax.train.Recipe, got "
            f"{type(optimizer).__name__}"
            + (f" (for a name, pass Recipe({optimizer!r}, learning_rate))" if isinstance(optimizer, str) else "")
        )
    train_source = _source(train_data, "train_data")
    eval_source = None if eval_data is None else _source(eval_data, "eval_data")
    if resume and checkpoint_dir is None:
        raise TrainError(f"{op}: resume=True needs a checkpoint_dir")
    mesh = Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
    if batch_size % mesh.size:
        raise TrainError(
            f"{op}: batch_size={batch_size} must be a multiple of the {mesh.size} devices it is split over"
        )
    steps = num_batches(len(train_source), batch_size, drop_remainder=True)
    if steps == 0:
        raise TrainError(f"{op}: batch_size={batch_size} exceeds the {len(train_source)} training examples")
    run = {"seed": seed, "batch_size": batch_size, **choices}
    rate = None
    if isinstance(optimizer, Recipe):
        run |= {"recipe": optimizer.checkpointed(epochs)}
        optimizer, rate = optimizer.build(epochs=epochs, steps_per_epoch=steps)

    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    graphdef, state = init_train_state(model, optimizer)
    # A copy: the steps donate their input, and the model's own arrays must outlive an interruption.
    state = jax.device_put(state, NamedSharding(mesh, P()), may_alias=False)
    checkpoints = None if checkpoint_dir is None else checkpoint.manager(checkpoint_dir)
    train_step = make_train_step(graphdef, optimizer, mesh, label_smoothing=label_smoothing, dtype=dtype)
    eval_step = make_eval_step(eval_graphdef, mesh, dtype=dtype)
    report = Report(progress, epochs, steps)
    stream = None
    start = time.perf_counter()
    try:
        history = History()
        if checkpoints is not None:
            state, history = (
                checkpoint.restore(checkpoints, state, run, epochs)
                if resume
                else (state, checkpoint.require_none(checkpoints))
            )
        first = len(history.train_loss)
        log = MetricsLog(log_dir, first) if log_dir is not None and jax.process_index() == 0 else None
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
            if checkpoints is not None:
                checkpoint.save(checkpoints, epoch + 1, state, history, run)
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
        if checkpoints is not None:
            checkpoints.close()
    return history


def evaluate(eval_step, state: TrainState, eval_batches, mesh: Mesh) -> tuple[float, float]:
    """Mean loss and accuracy of ``eval_step`` (:func:`~cnnjax.train.steps.make_eval_step`) over ``eval_batches``.

    ``eval_batches``: this process's ``(x, y, mask)`` rows of every global batch
    (:func:`~cnnjax.train.pipeline.run_batches`) -> ``(sum of losses / n, correct / n)``, ``n``
    the number of real (unmasked) examples.

    >>> import optax
    >>> from cnnjax.train.data import ArraySource
    >>> from cnnjax.train.pipeline import eval_batches
    >>> from cnnjax.train.steps import cross_entropy
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
        metrics = eval_step(state, *global_batch(mesh, *batch))
        loss, correct, count = loss + metrics["loss"], correct + metrics["correct"], count + metrics["count"]
    count = to_float(count)
    return to_float(loss) / count, to_float(correct) / count


def _train_epoch(train_step, state: TrainState, epoch_batches, mesh: Mesh, bar) -> tuple[TrainState, float, float]:
    loss = correct = 0
    seen = 0
    start = time.perf_counter()
    queued = collections.deque()
    for step, (x, y) in enumerate(epoch_batches, start=1):
        state, metrics = train_step(state, *global_batch(mesh, x, y))
        loss, correct, seen = loss + metrics["loss"], correct + metrics["correct"], seen + len(x) * jax.process_count()
        queued.append(metrics["loss"])
        if len(queued) > DISPATCH_AHEAD:
            queued.popleft().block_until_ready()
        if bar is not None and (step % _PROGRESS_EVERY == 0 or step == bar.total):
            images_per_s = seen / (time.perf_counter() - start)
            bar.set_postfix_str(f"loss {to_float(loss) / step:.4f}, {images_per_s:.0f} img/s", refresh=False)
            bar.update(step - bar.n)
    if bar is not None:
        bar.close()
    return state, to_float(loss) / step, to_float(correct) / seen


def _source(data, name: str):
    """``data`` as a pipeline source: an ``(x, y)`` pair of arrays (checked) or a source itself."""
    if hasattr(data, "read") and hasattr(data, "__len__"):
        source = data
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"fit: {name} labels must be a 1-D integer array, got {y.dtype} of shape {y.shape}")
        if len(x) != len(y):
            raise TrainError(f"fit: {name} holds {len(x)} images but {len(y)} labels")
        source = ArraySource(x, y)
    else:
        raise TypeError(f"fit: {name} must be an (x, y) pair of arrays or an ImageFolder, got {type(data).__name__}")
    if len(source) == 0:
        raise TrainError(f"fit: {name} holds no examples")
    return source


def _rate_at(rate: optax.ScalarOrSchedule, step: int) -> float:
    return float(rate(step)) if callable(rate) else float(rate)


def _check_choices(*, augment: str, dtype: str, label_smoothing: float) -> dict:
    """Check ``fit``'s data and loss options; return the non-default ones (a checkpoint records them)."""
    op = "fit"
    if augment not in AUGMENTATIONS:
        raise TrainError(f"{op}: augment={augment!r} must be one of {', '.join(AUGMENTATIONS)}")
    if dtype not in DTYPES:
        raise TrainError(f"{op}: dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    number = isinstance(label_smoothing, (int, float, np.number)) and not isinstance(label_smoothing, bool)
    if not (number and 0 <= label_smoothing < 1):
        raise TrainError(f"{op}: label_smoothing={label_smoothing!r} must be a number in [0, 1)")
    options = {"augment": augment, "dtype": dtype, "label_smoothing": label_smoothing}
    return {name: value for name, value in options.items() if value != _DEFAULT_CHOICES[name]}
