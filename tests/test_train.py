"""cnnjax.train: the pure steps' values, the recipe's optax pieces, fit's learning, determinism and
bit-for-bit resume (recipe included), the metrics log, checkpoint errors, 4-device data
parallelism and 2 processes equal to 1 (subprocesses), and the command line."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from cnnjax.train import (
    CheckpointError,
    History,
    Recipe,
    TrainError,
    cross_entropy,
    evaluate,
    fit,
    init_train_state,
    learning_rate_schedule,
    main,
    make_eval_step,
    make_optimizer,
    make_train_step,
)
from cnnjax.train import cli as cli_module
from cnnjax.train import loop as loop_module
from cnnjax.train.data import ArraySource, load_digits
from cnnjax.train.pipeline import eval_batches

EPOCHS = 3
BATCH = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(nnx.Module):
    """conv -> BatchNorm -> ReLU -> dropout -> linear on 8x8 digits: parameters, batch statistics
    and an RNG stream, every kind of state ``fit`` carries and checkpoints."""

    def __init__(self, features: int = 4, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, features, (3, 3), use_bias=False, rngs=rngs)  # a bias before BN only adds noise
        self.norm = nnx.BatchNorm(features, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(features * 64, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.norm(self.conv(x)))
        return self.head(self.dropout(x.reshape(len(x), -1)))


def tiny_data():
    (x, y), (x_test, y_test) = load_digits(size=8)
    return (x[:320], y[:320]), (x_test[:70], y_test[:70])


def run_tiny(init_seed: int = 0, **kwargs):
    """A short TinyNet fit; returns (model, history)."""
    model = TinyNet(rngs=nnx.Rngs(init_seed))
    train, test = tiny_data()
    options = {"epochs": EPOCHS, "batch_size": BATCH, "progress": False, **kwargs}
    return model, fit(model, optax.adam(1e-2), train, test, **options)


def state_arrays(model: nnx.Module) -> list[np.ndarray]:
    """Every variable of ``model`` (PRNG keys as their raw data) as NumPy arrays."""

    def to_numpy(leaf):
        return np.asarray(jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf)

    return [to_numpy(leaf) for leaf in jax.tree.leaves(nnx.state(model))]


def assert_same_state(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted checkpointed run: (state arrays, history, checkpoint dir, model)."""
    directory = tmp_path_factory.mktemp("reference") / "checkpoints"
    model, history = run_tiny(checkpoint_dir=directory)
    return state_arrays(model), history, directory, model


def test_train_step_is_one_optax_update():
    """One SGD step on a linear model: W - lr * d(mean cross-entropy)/dW, computed by hand."""
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(1))
    w0, b0 = np.array(model.kernel[...]), np.array(model.bias[...])  # copies: a NumPy view would block donation
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 0, 1])
    graphdef, state = init_train_state(model, optax.sgd(0.5))
    old_kernel = state.params["kernel"].get_value()
    state, metrics = make_train_step(graphdef, optax.sgd(0.5))(state, x, y)

    def loss(w, b):
        return cross_entropy(x @ w + b, y).mean()

    grad_w, grad_b = jax.grad(loss, argnums=(0, 1))(w0, b0)
    np.testing.assert_allclose(state.params["kernel"][...], w0 - 0.5 * grad_w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.params["bias"][...], b0 - 0.5 * grad_b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metrics["loss"], loss(w0, b0), rtol=1e-6)
    assert int(metrics["correct"]) == int(np.sum(np.argmax(x @ w0 + b0, axis=1) == y))
    assert old_kernel.is_deleted()  # the state is donated


def tiny_params():
    return init_train_state(TinyNet(rngs=nnx.Rngs(0)), optax.sgd(0.1))[1].params


def some_grads(params, scale: float = 1.0):
    """Distinct, deterministic gradients: a ramp per parameter."""
    return jax.tree.map(lambda p: scale * jnp.linspace(-1.0, 1.0, p.size, dtype=p.dtype).reshape(p.shape), params)


def run_updates(optimizer, params, steps: int = 3) -> list:
    state, updates = optimizer.init(params), []
    for k in range(steps):
        update, state = optimizer.update(some_grads(params, k + 1.0), state, params)
        updates.append(update)
        params = optax.apply_updates(params, update)
    return [np.asarray(leaf) for leaf in jax.tree.leaves(updates)]


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("adam", optax.adam(3e-3)),
        ("sgd", optax.sgd(3e-3)),
        ("momentum", optax.sgd(3e-3, momentum=0.9)),
        ("adamw", optax.adamw(3e-3, weight_decay=1e-4, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))),
    ],
)
def test_make_optimizer_is_the_optax_optimizer(name, reference):
    """Bit for bit: make_optimizer composes what optax.adam / sgd / adamw compose."""
    params = tiny_params()
    for ours, theirs in zip(
        run_updates(make_optimizer(name, 3e-3), params), run_updates(reference, params), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)


def test_weight_decay_is_decoupled_and_skips_biases_and_norm_parameters():
    """With zero gradients an SGD step is -lr * wd * w on kernels, 0 on the conv-free 1-D
    parameters: the BatchNorm scale and offset and the head's bias."""
    params = tiny_params()
    optimizer = make_optimizer("sgd", 0.5, weight_decay=0.1)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    decayed = {
        "/".join(str(k.key) for k in path if hasattr(k, "key")): bool(np.any(np.asarray(u)))
        for path, u in jax.tree_util.tree_leaves_with_path(updates)
    }
    assert decayed == {
        "conv/kernel": True,
        "head/kernel": True,
        "head/bias": False,
        "norm/bias": False,
        "norm/scale": False,
    }
    np.testing.assert_allclose(updates["head"]["kernel"][...], -0.05 * params["head"]["kernel"][...], rtol=1e-6)


def test_learning_rate_schedules():
    """Values at chosen steps, 10 steps per epoch."""

    def rates(steps, **kwargs):
        rate = learning_rate_schedule(0.1, steps_per_epoch=10, **kwargs)
        return [round(float(rate(step)), 6) for step in steps]

    assert learning_rate_schedule(0.1, schedule="constant", warmup_epochs=0, epochs=5, steps_per_epoch=10) == 0.1
    assert rates([0, 10, 20, 49], schedule="constant", warmup_epochs=2, epochs=5) == [0.0, 0.05, 0.1, 0.1]
    # cosine after 1 warm-up epoch over the remaining 40 steps: 0.1 * (1 + cos(pi * t / 40)) / 2
    assert rates([0, 5, 10, 30, 50], schedule="cosine", warmup_epochs=1, epochs=5) == [0.0, 0.05, 0.1, 0.05, 0.0]
    assert rates([0, 39, 40, 59, 60, 79], schedule="step", warmup_epochs=0, epochs=8) == [
        0.1,
        0.1,
        0.01,
        0.01,
        0.001,
        0.001,
    ]


def test_label_smoothing_cross_entropy():
    """Against (1 - a) * one_hot + a / K targets and a float64 log-softmax."""
    logits = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    labels = np.array([1, 0])
    a = 0.3
    targets = (1 - a) * np.eye(3)[labels] + a / 3
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -(targets * log_softmax).sum(axis=1)
    got = cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), label_smoothing=a)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(
        cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels)), -log_softmax[[0, 1], labels], rtol=1e-6
    )


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state():
    (x, y), _ = tiny_data()
    x, y = x[:32], y[:32]
    losses = {}
    for dtype in ("float32", "bfloat16"):
        graphdef, state = init_train_state(TinyNet(rngs=nnx.Rngs(0)), optax.adam(1e-2))
        step = make_train_step(graphdef, optax.adam(1e-2), dtype=dtype)
        hlo = step.lower(state, x, y).as_text()
        convolutions = [line for line in hlo.splitlines() if "convolution" in line]
        assert convolutions and all(("bf16" in line) == (dtype == "bfloat16") for line in convolutions)
        state, metrics = step(state, x, y)
        losses[dtype] = float(metrics["loss"])
        floating = [
            leaf
            for leaf in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(leaf.dtype, jnp.floating)
        ]
        assert floating and all(leaf.dtype == jnp.float32 for leaf in floating)
    assert losses["bfloat16"] != losses["float32"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)


def test_evaluate_sees_every_example_once():
    """5 examples in batches of 4: the padded 3 of the last batch are masked out."""
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(2))
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 3])
    graphdef, state = init_train_state(model, optax.sgd(0.1))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    loss, accuracy = evaluate(make_eval_step(graphdef, mesh), state, eval_batches(ArraySource(x, y), 4), mesh)
    logits = model(x)
    np.testing.assert_allclose(loss, cross_entropy(logits, y).mean(), rtol=1e-6)
    assert accuracy == np.mean(np.argmax(logits, axis=1) == y)


def test_fit_learns_and_updates_model_in_place(reference):
    state, history, _, model = reference
    assert len(history.train_loss) == len(history.test_accuracy) == len(history.epoch_time) == EPOCHS
    assert history.train_loss[-1] < 0.5 * history.train_loss[0]
    assert history.test_accuracy[-1] > 0.7
    initial = state_arrays(TinyNet(rngs=nnx.Rngs(0)))
    assert not np.array_equal(initial[0], state[0])  # trained in place
    assert model.norm.use_running_average and model.dropout.deterministic  # left in eval mode
    _, (x_test, y_test) = tiny_data()
    logits = model(x_test)
    np.testing.assert_allclose(cross_entropy(logits, y_test).mean(), history.test_loss[-1], rtol=1e-5)
    assert np.mean(np.argmax(logits, axis=1) == y_test) == pytest.approx(history.test_accuracy[-1])


def test_fit_is_deterministic_and_resume_without_checkpoints_starts_afresh(reference, tmp_path):
    """Same seeds, same bits; ``resume=True`` over an empty directory is an ordinary run."""
    model, history = run_tiny(checkpoint_dir=tmp_path / "new", resume=True)
    assert_same_state(state_arrays(model), reference[0])
    assert history == reference[1]


def test_history_table_and_equality():
    history = History([2.0, 1.0], [0.25, 0.5], [1.5, 0.75], [0.3, 0.6], [3.0, 1.0])
    lines = str(history).splitlines()
    assert lines[0].split() == ["epoch", "train", "loss", "train", "acc", "test", "loss", "test", "acc", "time", "(s)"]
    assert lines[2].split() == ["2", "1.0000", "50.00%", "0.7500", "60.00%", "1.00"]
    assert history == History([2.0, 1.0], [0.25, 0.5], [1.5, 0.75], [0.3, 0.6], [9.0, 9.0])
    assert str(History([1.0], [0.5], [], [], [2.0])).splitlines()[1].split() == [
        "1",
        "1.0000",
        "50.00%",
        "-",
        "-",
        "2.00",
    ]


def test_progress_lines_without_a_terminal(capsys):
    run_tiny(epochs=2, progress=True)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 3 and "\r" not in out
    assert re.match(
        r"epoch 1/2: train loss \d\.\d{4} acc [\d.]+% \| test loss \d\.\d{4} acc [\d.]+% \| [\d.]+ s, train \d+ img/s$",
        lines[0],
    )
    assert lines[1].startswith("epoch 2/2: ")
    assert lines[2].startswith("done: 2 epochs, final test accuracy")


def test_progress_bar_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(loop_module, "_PROGRESS_EVERY", 2)
    run_tiny(epochs=1, progress=True)
    out = capsys.readouterr().out
    assert "epoch 1/1:" in out and "step" in out and re.search(r"loss \d\.\d{4}, \d+ img/s", out)


@pytest.mark.parametrize("interrupt_after", [1, 2])
def test_resume_after_interruption_is_bit_for_bit(reference, tmp_path, monkeypatch, capsys, interrupt_after):
    """Stop a 3-epoch run as epoch k+1 begins; a fresh process-like resume (a model built from
    another seed) must end with exactly the uninterrupted run's variables and history."""
    directory = tmp_path / "checkpoints"
    train_epoch, calls = loop_module._train_epoch, []

    def interrupted(*args):
        if len(calls) == interrupt_after:
            raise KeyboardInterrupt
        calls.append(1)
        return train_epoch(*args)

    monkeypatch.setattr(loop_module, "_train_epoch", interrupted)
    model = TinyNet(rngs=nnx.Rngs(0))
    train, test = tiny_data()
    with pytest.raises(KeyboardInterrupt):
        fit(
            model,
            optax.adam(1e-2),
            train,
            test,
            epochs=EPOCHS,
            batch_size=BATCH,
            checkpoint_dir=directory,
            progress=False,
        )
    assert sorted(os.listdir(directory)) == [
        f"epoch_{k}" for k in range(max(1, interrupt_after - 1), interrupt_after + 1)
    ]
    assert model(test[0]).shape == (70, 10)  # the interrupted model holds the last completed epoch
    monkeypatch.setattr(loop_module, "_train_epoch", train_epoch)

    resumed, history = run_tiny(init_seed=7, checkpoint_dir=directory, resume=True)
    assert capsys.readouterr().out == ""  # progress=False prints nothing
    assert_same_state(state_arrays(resumed), reference[0])
    assert history == reference[1]


RECIPE = Recipe("adam", 1e-2, schedule="cosine", warmup_epochs=1, weight_decay=1e-3)
CHOICES = {"augment": "flip-crop", "label_smoothing": 0.1}


def run_recipe(init_seed: int = 0, **kwargs):
    """run_tiny with a Recipe and the data and loss options."""
    model = TinyNet(rngs=nnx.Rngs(init_seed))
    train, test = tiny_data()
    options = {"epochs": EPOCHS, "batch_size": BATCH, "progress": False, **CHOICES, **kwargs}
    return model, fit(model, RECIPE, train, test, **options)


def read_log(directory) -> list[dict]:
    with open(directory / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_recipe_run_logs_every_epoch_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Augmentation, warm-up + cosine, weight decay and label smoothing: an interrupted and resumed
    run (a damaged log line past its checkpoint dropped) ends with the uninterrupted run's
    variables, history and log."""
    model, history = run_recipe(checkpoint_dir=tmp_path / "whole", log_dir=tmp_path / "whole_log")
    log = read_log(tmp_path / "whole_log")
    assert [line["epoch"] for line in log] == [1, 2, 3]
    assert [line["train_loss"] for line in log] == history.train_loss
    assert [line["test_accuracy"] for line in log] == history.test_accuracy
    steps = 320 // BATCH
    rate = learning_rate_schedule(1e-2, schedule="cosine", warmup_epochs=1, epochs=EPOCHS, steps_per_epoch=steps)
    assert [line["learning_rate"] for line in log] == pytest.approx([float(rate(k * steps - 1)) for k in (1, 2, 3)])
    assert all(line["images_per_second"] > 0 and line["epoch_time"] > 0 and line["wall_time"] > 1.7e9 for line in log)

    train_epoch, calls = loop_module._train_epoch, []

    def interrupted(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return train_epoch(*args)

    monkeypatch.setattr(loop_module, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(checkpoint_dir=tmp_path / "cut", log_dir=tmp_path / "cut_log")
    monkeypatch.setattr(loop_module, "_train_epoch", train_epoch)
    shutil.rmtree(tmp_path / "cut" / "epoch_2")  # as if the run had died while saving epoch 2
    with open(tmp_path / "cut_log" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')
    resumed, resumed_history = run_recipe(
        init_seed=9, checkpoint_dir=tmp_path / "cut", resume=True, log_dir=tmp_path / "cut_log"
    )
    assert_same_state(state_arrays(resumed), state_arrays(model))
    assert resumed_history == history
    strip = lambda lines: [
        {k: v for k, v in line.items() if k not in ("images_per_second", "epoch_time", "wall_time")} for line in lines
    ]
    assert strip(read_log(tmp_path / "cut_log")) == strip(log)


def test_checkpoints_keep_the_last_two(reference):
    assert sorted(os.listdir(reference[2])) == ["epoch_2", "epoch_3"]


def test_resume_of_a_finished_run_trains_nothing(reference, tmp_path):
    directory = shutil.copytree(reference[2], tmp_path / "done")
    model, history = run_tiny(init_seed=5, checkpoint_dir=directory, resume=True)
    assert_same_state(state_arrays(model), reference[0])
    assert history == reference[1]


def test_leftover_temporary_checkpoint_is_ignored(reference, tmp_path):
    """A crash while saving leaves orbax's temporary directory; the last complete checkpoint is used."""
    directory = shutil.copytree(reference[2], tmp_path / "ckpt")
    shutil.rmtree(directory / "epoch_3")
    os.makedirs(directory / "epoch_3.orbax-checkpoint-tmp-1234" / "state")
    model, history = run_tiny(init_seed=3, checkpoint_dir=directory, resume=True)
    assert history == reference[1]
    assert_same_state(state_arrays(model), reference[0])


def corrupt_checkpoint(path, case: str) -> None:
    if case == "truncated arrays":
        for root, _, files in os.walk(path / "state"):
            for name in files:
                if os.path.basename(root) == "d":
                    with open(os.path.join(root, name), "r+b") as f:
                        f.truncate(10)
    elif case == "missing metadata":
        os.remove(path / "meta" / "metadata")
    elif case == "garbage metadata":
        (path / "meta" / "metadata").write_text("{not json")
    elif case == "empty directory":
        shutil.rmtree(path)
        os.makedirs(path)
    elif case == "missing state":
        shutil.rmtree(path / "state")
    elif case == "wrong history length":
        meta = json.loads((path / "meta" / "metadata").read_text())
        meta["history"]["train_loss"].append(1.0)
        (path / "meta" / "metadata").write_text(json.dumps(meta))
    else:
        raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "truncated arrays",
        "missing metadata",
        "garbage metadata",
        "empty directory",
        "missing state",
        "wrong history length",
    ],
)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_is_a_clear_error(reference, tmp_path, case):
    directory = shutil.copytree(reference[2], tmp_path / "ckpt")
    corrupt_checkpoint(directory / "epoch_3", case)
    with pytest.raises(CheckpointError, match=re.escape(str(directory / "epoch_3"))) as info:
        run_tiny(checkpoint_dir=directory, resume=True)
    gc.collect()  # orbax leaves the other arrays' failed reads pending; reap them in this test
    assert f"delete it to resume from {directory / 'epoch_2'}" in str(info.value)
    assert sorted(os.listdir(directory)) == ["epoch_2", "epoch_3"]  # nothing deleted or overwritten


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": 1}, "was written with {'seed': 0, 'batch_size': 32}, this run has {'seed': 1, 'batch_size': 32}"),
        ({"batch_size": 16}, "this run has {'seed': 0, 'batch_size': 16}"),
        ({"epochs": 2}, "is past epochs=2"),
    ],
)
def test_resume_refuses_a_mismatched_run(reference, tmp_path, kwargs, message):
    directory = shutil.copytree(reference[2], tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        run_tiny(checkpoint_dir=directory, resume=True, **kwargs)


def test_resume_refuses_another_model(reference, tmp_path):
    directory = shutil.copytree(reference[2], tmp_path / "ckpt")
    train, test = tiny_data()
    with pytest.raises(CheckpointError, match="from another model or optimizer"):
        fit(
            TinyNet(8, rngs=nnx.Rngs(0)),
            optax.adam(1e-2),
            train,
            test,
            epochs=3,
            batch_size=BATCH,
            checkpoint_dir=directory,
            resume=True,
        )


def test_existing_checkpoints_are_never_overwritten(reference, tmp_path):
    directory = shutil.copytree(reference[2], tmp_path / "ckpt")
    before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, files in os.walk(directory) for p in files}
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(epochs \[2, 3\]\); pass resume=True"):
        run_tiny(checkpoint_dir=directory)
    assert before == {p: os.path.getmtime(os.path.join(r, p)) for r, _, files in os.walk(directory) for p in files}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"epochs": 0}, ValueError, "fit: epochs=0 must be >= 1"),
        ({"batch_size": -4}, ValueError, "fit: batch_size=-4 must be >= 1"),
        ({"seed": -1}, ValueError, "fit: seed=-1 must be >= 0"),
        ({"batch_size": 321}, ValueError, "fit: batch_size=321 exceeds the 320 training examples"),
        ({"resume": True}, ValueError, "fit: resume=True needs a checkpoint_dir"),
        (
            {"train_data": np.zeros(3)},
            TypeError,
            "fit: train_data must be an (x, y) pair of arrays or an ImageFolder, got ndarray",
        ),
        (
            {"train_data": (np.zeros((3, 8, 8, 1)), np.zeros(3))},
            TypeError,
            "train_data labels must be a 1-D integer array",
        ),
        (
            {"eval_data": (np.zeros((3, 8, 8, 1)), np.zeros(2, int))},
            ValueError,
            "fit: eval_data holds 3 images but 2 labels",
        ),
        ({"eval_data": (np.zeros((0, 8, 8, 1)), np.zeros(0, int))}, ValueError, "fit: eval_data holds no examples"),
        ({"augment": "mixup"}, ValueError, "fit: augment='mixup' must be one of none, flip-crop, random-resized-crop"),
        ({"dtype": "float16"}, ValueError, "fit: dtype='float16' must be one of float32, bfloat16"),
        ({"label_smoothing": 1.0}, ValueError, "fit: label_smoothing=1.0 must be a number in [0, 1)"),
        ({"workers": -1}, ValueError, "fit: workers=-1 must be >= 0"),
        (
            {"optimizer": "adam"},
            TypeError,
            "fit: optimizer must be an optax GradientTransformation or a cnnjax.train.Recipe, got str (for a name, pass Recipe('adam', learning_rate))",
        ),
        (
            {"optimizer": optax.adam},
            TypeError,
            "fit: optimizer must be an optax GradientTransformation or a cnnjax.train.Recipe",
        ),
        (
            {"optimizer": Recipe("sgd", 0.1, warmup_epochs=1)},
            TrainError,
            "Recipe: warmup_epochs=1 must be less than epochs=1",
        ),
    ],
)
def test_fit_rejects_bad_arguments(kwargs, error, message):
    train, test = tiny_data()
    options = {"train_data": train, "eval_data": test, "epochs": 1, "batch_size": BATCH, **kwargs}
    optimizer = options.pop("optimizer", optax.adam(1e-2))
    with pytest.raises(error, match=re.escape(message)):
        fit(TinyNet(rngs=nnx.Rngs(0)), optimizer, options.pop("train_data"), options.pop("eval_data"), **options)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "lbfgs"}, "Recipe: optimizer='lbfgs' must be one of adam, adamw, momentum, sgd"),
        ({"learning_rate": 0}, "Recipe: learning_rate=0 must be a finite number > 0"),
        ({"schedule": "linear"}, "Recipe: schedule='linear' must be one of constant, cosine, step"),
        ({"warmup_epochs": -1}, "Recipe: warmup_epochs=-1 must be an integer >= 0"),
        ({"weight_decay": -0.1}, "Recipe: weight_decay=-0.1 must be a finite number >= 0"),
    ],
)
def test_recipe_rejects_bad_values(kwargs, message):
    with pytest.raises(TrainError, match=re.escape(message)):
        Recipe(**{"optimizer": "adam", "learning_rate": 1e-3, **kwargs})


def test_a_second_fit_of_the_same_model_and_optimizer_does_not_recompile():
    """The steps are cached per model structure and optimizer: a second fit (another model of the
    same structure, the same optimizer object or an equal recipe) traces nothing."""
    traces = []
    listener = lambda event, duration, **kwargs: traces.append(event) if event.endswith("trace_duration") else None
    train, test = tiny_data()
    for optimizer in (optax.adam(1e-2), Recipe("momentum", 0.1, schedule="cosine")):
        options = {"epochs": 1, "batch_size": BATCH, "progress": False}
        fit(TinyNet(rngs=nnx.Rngs(0)), optimizer, train, test, **options)
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            fit(TinyNet(rngs=nnx.Rngs(1)), optimizer, train, test, **options)
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        assert traces == [], traces


def data_parallel_run():
    """What the 4-device subprocess and this process both run; BatchNorm statistics and dropout
    masks are over the global batch, so the sharded run equals the single-device one."""
    return run_tiny(epochs=2)


_DEVICES_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
import test_train as t
assert jax.device_count() == 4, jax.devices()
model, history = t.data_parallel_run()
kernel = model.conv.kernel[...]
assert kernel.sharding.mesh.size == 4 and kernel.sharding.is_fully_replicated, kernel.sharding
np.savez({out!r}, *t.state_arrays(model), history=np.array([history.train_loss, history.test_loss]))
try:
    t.run_tiny(epochs=1, batch_size=6)
except ValueError as e:
    print(e)
"""


@pytest.mark.slow
def test_four_devices_equal_one_device(tmp_path):
    out = str(tmp_path / "four.npz")
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    script = _DEVICES_SCRIPT.format(tests=os.path.dirname(__file__), out=out)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fit: batch_size=6 must be a multiple of the 4 devices it is split over" in result.stdout
    assert jax.device_count() == 1
    model, history = data_parallel_run()
    four = np.load(out)
    for i, array in enumerate(state_arrays(model)):
        np.testing.assert_allclose(four[f"arr_{i}"], array, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(four["history"], [history.train_loss, history.test_loss], rtol=1e-5)


_CLI_SCRIPT = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from cnnjax.train import main
sys.exit(main(sys.argv[1:]))
"""
# LeNet-5 on 12x12 digits with most of the recipe, 44 steps of 32 per epoch.
MULTI_PROCESS_RUN = [
    "--image-size",
    "12",
    "--batch-size",
    "32",
    "--optimizer",
    "momentum",
    "--lr",
    "0.3",
    "--weight-decay",
    "1e-3",
    "--augment",
    "flip-crop",
    "--label-smoothing",
    "0.1",
    "--seed",
    "5",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(argv: list[str], *, processes: int, devices: int, timeout: float = 600) -> list[tuple[int, str, str]]:
    """``cnnjax-train argv`` in ``processes`` CPU processes of ``devices`` devices each, joined on
    127.0.0.1; returns each one's (exit status, stdout, stderr). Every process ends by itself
    or is killed at the timeout."""
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    command = [sys.executable, "-c", _CLI_SCRIPT, *argv]
    commands = [command]
    if processes > 1:
        cluster = ["--coordinator-address", f"127.0.0.1:{free_port()}", "--num-processes", str(processes)]
        commands = [[*command, *cluster, "--process-id", str(i)] for i in range(processes)]
    running = [
        subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for process in running:
            out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((process.returncode, out, err))
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def restored_state(checkpoints) -> list[np.ndarray]:
    """The variables of the last checkpoint in ``checkpoints``, restored in this 1-device process
    by a resumed fit that has no epoch left to train."""
    model = cli_module.MODELS["lenet5"](num_classes=10, in_features=1, input_size=12, rngs=nnx.Rngs(0))
    options = {"augment": "flip-crop", "label_smoothing": 0.1}
    train, _ = load_digits(12)
    fit(
        model,
        Recipe("momentum", 0.3, weight_decay=1e-3),
        train,
        None,
        epochs=2,
        batch_size=32,
        seed=5,
        checkpoint_dir=checkpoints,
        resume=True,
        progress=False,
        **options,
    )
    return state_arrays(model)


@pytest.mark.slow
def test_two_processes_equal_one_process_of_four_devices_and_resume_across_processes(tmp_path):
    """2 processes x 2 CPU devices (gloo), 1 epoch, then resumed by 2 new processes for a second:
    the same metrics and parameters as 1 process x 4 devices for 2 epochs, and process 1 prints
    nothing."""
    two, one = tmp_path / "two", tmp_path / "one"
    printed = ""  # by process 0 of both two-process runs
    for epochs, resume in (("1", []), ("2", ["--resume"])):
        argv = [
            *MULTI_PROCESS_RUN,
            "--epochs",
            epochs,
            "--checkpoint-dir",
            str(two / "ckpt"),
            "--log-dir",
            str(two),
            *resume,
        ]
        (status0, out0, err0), (status1, out1, err1) = run_cli(argv, processes=2, devices=2)
        assert status0 == 0 and status1 == 0, err0 + err1
        assert out1 == "" and err1 == ""  # process 1 prints nothing
        printed += out0
    argv = [*MULTI_PROCESS_RUN, "--epochs", "2", "--checkpoint-dir", str(one / "ckpt"), "--log-dir", str(one)]
    [(status, out, err)] = run_cli(argv, processes=1, devices=4)
    assert status == 0 and "done: 2 epochs" in out, err
    assert re.search(r"^epoch 1/1: .*^done: 1 epoch, .*^epoch 2/2: .*^done: 2 epochs, ", printed, re.M | re.S)
    logs = {name: read_log(path) for name, path in (("two", two), ("one", one))}
    assert [line["epoch"] for line in logs["two"]] == [line["epoch"] for line in logs["one"]] == [1, 2]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate"):
        np.testing.assert_allclose([x[key] for x in logs["two"]], [x[key] for x in logs["one"]], rtol=1e-5)
    initial = state_arrays(cli_module.MODELS["lenet5"](num_classes=10, in_features=1, input_size=12, rngs=nnx.Rngs(5)))
    final = restored_state(two / "ckpt")
    assert not np.allclose(final[0], initial[0])  # trained
    for a, b in zip(final, restored_state(one / "ckpt"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lenet5", "resnet18"])  # the two ways a registry entry is built
def test_model_registry_builds_for_small_images(name):
    assert {"lenet5", "resnet18", "vgg11", "mobilenet_v1"} <= set(cli_module.MODELS)
    build = cli_module.MODELS[name]
    model = nnx.eval_shape(lambda: build(num_classes=10, in_features=3, input_size=32, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    logits = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(jnp.zeros((2, 32, 32, 3))), state)
    assert logits.shape == (2, 10)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nope"], "argument --model: invalid choice: 'nope'"),
        (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
        (["--optimizer", "lbfgs"], "argument --optimizer: invalid choice: 'lbfgs'"),
        (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got '0'"),
        (["--epochs", "-3"], "argument --epochs: must be an integer >= 1, got '-3'"),
        (["--epochs", "ten"], "argument --epochs: must be an integer >= 1, got 'ten'"),
        (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
        (["--lr", "0"], "argument --lr: must be a positive number, got '0'"),
        (["--lr", "nan"], "argument --lr: must be a positive number, got 'nan'"),
        (["--seed", "-1"], "argument --seed: must be an integer >= 0"),
        (["--dataset", "mnist"], "--dataset mnist needs --data-dir"),
        (["--dataset", "cifar10", "--data-dir", "/no/such/dir"], "--data-dir /no/such/dir is not a directory"),
        (["--resume"], "--resume needs --checkpoint-dir"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--augment", "cutout"], "argument --augment: invalid choice: 'cutout'"),
        (["--schedule", "linear"], "argument --schedule: invalid choice: 'linear'"),
        (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
        (["--label-smoothing", "1"], "argument --label-smoothing: must be a number in [0, 1), got '1'"),
        (["--weight-decay", "-1"], "argument --weight-decay: must be a number in [0, inf), got '-1'"),
        (["--weight-decay", "inf"], "argument --weight-decay: must be a number in [0, inf), got 'inf'"),
        (["--warmup-epochs", "-1"], "argument --warmup-epochs: must be an integer >= 0"),
        (["--warmup-epochs", "15"], "warmup_epochs=15 must be less than epochs=15"),
        (["--workers", "-1"], "argument --workers: must be an integer >= 0"),
        (["--image-size", "0"], "argument --image-size: must be an integer >= 1"),
        (["--dataset", "imagefolder"], "--dataset imagefolder needs --data-dir"),
        (
            ["--dataset", "mnist", "--data-dir", "/", "--image-size", "32"],
            "--image-size applies to --dataset digits or imagefolder, not mnist",
        ),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("cnnjax-train: error: ")
    assert message in captured.err


def write_image_tree(root, classes=("a", "b"), n_train=12, n_val=4, size=12) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
                    root / split / name / f"{i}.png"
                )


def test_cli_unusable_data_or_checkpoints_exit_1_with_one_line(capsys, tmp_path, reference):
    write_image_tree(tmp_path / "empty_class")
    (tmp_path / "empty_class" / "train" / "c").mkdir()
    (tmp_path / "empty_class" / "val" / "c").mkdir()
    write_image_tree(tmp_path / "other_classes")
    (tmp_path / "other_classes" / "val" / "b").rename(tmp_path / "other_classes" / "val" / "z")
    cases = [
        (
            ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "empty_class")],
            f"ImageFolder: class folder {tmp_path / 'empty_class' / 'train' / 'c'} holds no image",
        ),
        (
            ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "other_classes")],
            "differ from those of " + str(tmp_path / "other_classes" / "train") + ": missing ['b'], extra ['z']",
        ),
        (
            ["--dataset", "mnist", "--data-dir", str(tmp_path)],
            "load_mnist: " + str(tmp_path / "train-images-idx3-ubyte") + " not found",
        ),
        (["--checkpoint-dir", str(reference[2])], "already holds checkpoints"),
        (
            ["--checkpoint-dir", str(reference[2]), "--resume"],
            "cannot restore checkpoint " + str(reference[2] / "epoch_3"),
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("cnnjax-train: error: ") and message in err


@pytest.mark.slow
def test_cli_default_run_reaches_97_percent_then_resumes(tmp_path, capsys):
    """The README's command (defaults: LeNet-5 on the digits, 15 epochs) with a plot and
    checkpoints, in a subprocess with XLA's default flags (as a user runs it: 15 epochs run longer
    than they compile); then one more epoch resumed in-process."""
    plot, checkpoints = tmp_path / "curves.png", tmp_path / "ckpt"
    command = [sys.executable, "-m", "cnnjax.train", "--plot", str(plot), "--checkpoint-dir", str(checkpoints)]
    env = {**os.environ, "XLA_FLAGS": os.environ.get("CNNJAX_TEST_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 17 and lines[0].startswith("epoch  1/15: train loss") and lines[14].startswith("epoch 15/15:")
    accuracy = float(re.match(r"done: 15 epochs, final test accuracy ([\d.]+)%", lines[15]).group(1))
    assert accuracy >= 97.0
    assert lines[16] == f"wrote {plot}"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(checkpoints)) == ["epoch_14", "epoch_15"]

    assert main(["--epochs", "16", "--checkpoint-dir", str(checkpoints), "--resume"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("epoch 16/16: ") and lines[1].startswith("done: 16 epochs")
    assert sorted(os.listdir(checkpoints)) == ["epoch_15", "epoch_16"]


@pytest.mark.slow
def test_cli_imagefolder_streams_with_a_worker_and_stops_on_an_unreadable_image(tmp_path, capsys):
    """LeNet-5 on a 2-class folder of 12x12 grayscale PNGs decoded by a Grain worker process, with
    the recipe flags; then a damaged image ends the run: exit 1, its path and the reason."""
    write_image_tree(tmp_path / "data")
    argv = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--image-size", "12", "--workers", "1"]
    argv += ["--epochs", "2", "--batch-size", "8", "--augment", "random-resized-crop", "--schedule", "step"]
    argv += ["--warmup-epochs", "1", "--label-smoothing", "0.1", "--log-dir", str(tmp_path / "log")]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2", "done"]
    assert [line["epoch"] for line in read_log(tmp_path / "log")] == [1, 2]
    bad = tmp_path / "data" / "train" / "b" / "3.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cnnjax-train: error: ImageFolder: cannot read {bad}: ")


def test_cli_lets_a_bug_raise(monkeypatch):
    """Only what the user gave (TrainError, OSError) becomes one line; a bug keeps its traceback."""

    def broken(*args, **kwargs):
        raise ValueError("a bug, not the user's")

    monkeypatch.setattr(cli_module, "fit", broken)
    with pytest.raises(ValueError, match="a bug, not the user's"):
        main(["--epochs", "1", "--no-progress"])


def test_cli_subprocess_error_has_no_traceback():
    command = [sys.executable, "-m", "cnnjax.train", "--epochs", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "cnnjax-train: error: argument --epochs: must be an integer >= 1, got '0' (see --help)\n"
