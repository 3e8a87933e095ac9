"""The application: datasets, the input pipeline, the training recipe and loop, checkpoints,
reports, and the ``cnnjax-train`` / ``cnnjax-predict`` command lines (the ``[train]`` extra).

Modules, each one concern: :mod:`~cnnjax.train.data` (dataset readers and batching),
:mod:`~cnnjax.train.pipeline` (Grain), :mod:`~cnnjax.train.recipe` (optimizer, schedule, weight
decay as data), :mod:`~cnnjax.train.steps` (the jitted train and eval steps),
:mod:`~cnnjax.train.checkpoint` (orbax), :mod:`~cnnjax.train.loop` (:func:`fit`),
:mod:`~cnnjax.train.report` (history, progress, metrics log, plots), :mod:`~cnnjax.train.errors`,
:mod:`~cnnjax.train.cli`, :mod:`~cnnjax.train.predict` and :mod:`~cnnjax.train.visualize`. The
library (``cnnjax``, ``cnnjax.nn``, ``cnnjax.models``, ``cnnjax.analysis``) never imports them.

Several processes (one per host, or several on one machine): start every process with
``jax.distributed.initialize()`` before any other JAX call (the command line's
``--distributed``): it detects SLURM, Open MPI, Kubernetes and Cloud TPU clusters by itself,
elsewhere pass ``--coordinator-address HOST:PORT --num-processes N --process-id I`` to each
process. Each process then reads only its rows of every batch (its shard), ``jax.devices()``
spans all processes, and only process 0 prints and writes the metrics log; orbax writes the
checkpoints from process 0 and every process restores them. A run gives the same result for any
number of processes with the same global batch and device count (tested with 2 processes of 2
CPU devices against 1 process of 4).
"""

from cnnjax.train.cli import main
from cnnjax.train.errors import CheckpointError, DataError, TrainError
from cnnjax.train.loop import evaluate, fit
from cnnjax.train.recipe import Recipe, learning_rate_schedule, make_optimizer
from cnnjax.train.report import History, draw_history, plot_history
from cnnjax.train.steps import (
    TrainState,
    cross_entropy,
    init_train_state,
    make_eval_step,
    make_train_step,
)

__all__ = [
    "CheckpointError",
    "DataError",
    "History",
    "Recipe",
    "TrainError",
    "TrainState",
    "cross_entropy",
    "draw_history",
    "evaluate",
    "fit",
    "init_train_state",
    "learning_rate_schedule",
    "main",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "plot_history",
]
