"""What a run reports: its :class:`History`, the printed lines and progress bars, the metrics
log (``metrics.jsonl``) and the training-curve plot."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import jax
from tqdm import tqdm

__all__ = ["History", "draw_history", "plot_history"]


@dataclasses.dataclass
class History:
    """Per-epoch metrics of a :func:`~cnnjax.train.fit` run; ``str(history)`` is a table.

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


class MetricsLog:
    """``directory/metrics.jsonl``, one JSON object per epoch (see :func:`~cnnjax.train.fit`'s ``log_dir``)."""

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
        """Append the last epoch of ``history`` with its learning rate and training speed."""
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


class Report:
    """What ``fit`` prints: nothing without ``progress`` or off process 0; else a tqdm bar per
    epoch on a terminal, and on any stdout one line per epoch and a summary line."""

    def __init__(self, progress: bool, epochs: int, steps: int):
        self.enabled = progress and jax.process_index() == 0
        self.bars = self.enabled and sys.stdout.isatty()
        self.epochs, self.steps = epochs, steps

    def bar(self, epoch: int) -> tqdm | None:
        """A progress bar for ``epoch`` (0-based) on a terminal, else ``None``."""
        if not self.bars:
            return None
        return tqdm(
            total=self.steps, desc=f"epoch {epoch + 1}/{self.epochs}", unit="step", leave=False, file=sys.stdout
        )

    def epoch(self, history: History, images_per_s: float) -> None:
        """Print the line of the last epoch of ``history``."""
        if not self.enabled:
            return
        k, seconds = len(history.train_loss), history.epoch_time[-1]
        line = f"epoch {k:>{len(str(self.epochs))}}/{self.epochs}: train loss {history.train_loss[-1]:.4f} acc {history.train_accuracy[-1]:.2%}"
        if history.test_loss:
            line += f" | test loss {history.test_loss[-1]:.4f} acc {history.test_accuracy[-1]:.2%}"
        print(f"{line} | {seconds:.1f} s, train {images_per_s:.0f} img/s", flush=True)

    def summary(self, history: History, seconds: float) -> None:
        """Print the run's last line: epochs, final accuracy and the run's time."""
        if not self.enabled:
            return
        kind, accuracy = ("test", history.test_accuracy) if history.test_accuracy else ("train", history.train_accuracy)
        epochs = f"{len(accuracy)} epoch{'s' if len(accuracy) != 1 else ''}"
        print(f"done: {epochs}, final {kind} accuracy {accuracy[-1]:.2%}, {seconds:.1f} s in this run", flush=True)


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
