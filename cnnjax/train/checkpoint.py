"""Orbax checkpoints of a run: one per epoch, ``DIR/epoch_<k>``, and the checks of a resume.

A checkpoint holds the :class:`~cnnjax.train.steps.TrainState` (model state and optimizer
state), the :class:`~cnnjax.train.report.History` so far and the run's record (``seed``,
``batch_size`` and what changes the run's numbers: the recipe and the non-default options).
Orbax writes into a temporary directory and renames it when complete, so the previous
checkpoint is never touched before the new one exists. On several processes orbax writes from
process 0 and every process restores.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import orbax.checkpoint as ocp

from cnnjax.train.errors import CheckpointError
from cnnjax.train.report import History
from cnnjax.train.steps import TrainState

CHECKPOINTS_KEPT = 2


def manager(directory) -> ocp.CheckpointManager:
    """An orbax manager of ``directory``'s ``epoch_<k>`` checkpoints, keeping the last ``CHECKPOINTS_KEPT``."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=CHECKPOINTS_KEPT, step_prefix="epoch", enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options)


def _path(checkpoints: ocp.CheckpointManager, epoch: int) -> str:
    return os.path.join(os.fspath(checkpoints.directory), f"epoch_{epoch}")


def save(checkpoints: ocp.CheckpointManager, epoch: int, state: TrainState, history: History, run: dict) -> None:
    """Write epoch ``epoch``'s checkpoint: ``state``, ``history`` and the run's record."""
    meta = {"run": run, "history": dataclasses.asdict(history)}
    checkpoints.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def require_none(checkpoints: ocp.CheckpointManager) -> History:
    """A fresh run's empty history; :class:`CheckpointError` if the directory holds checkpoints."""
    if checkpoints.all_steps():
        raise CheckpointError(
            f"fit: {checkpoints.directory} already holds checkpoints (epochs {list(checkpoints.all_steps())}); "
            "pass resume=True to continue from them, or use an empty checkpoint_dir"
        )
    return History()


def restore(
    checkpoints: ocp.CheckpointManager, state: TrainState, run: dict, epochs: int
) -> tuple[TrainState, History]:
    """The state and history of the newest checkpoint, restored with ``state``'s structure and
    sharding (``state`` itself and an empty history where there is none). A corrupt checkpoint,
    or one of another run (``run`` differs) or past ``epochs``, raises :class:`CheckpointError`
    naming its path."""
    epoch = checkpoints.latest_step()
    if epoch is None:
        return state, History()
    path = _path(checkpoints, epoch)
    older = [e for e in checkpoints.all_steps() if e < epoch]
    hint = f"; delete it to resume from {_path(checkpoints, max(older))}" if older else ""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    try:
        restored = checkpoints.restore(epoch, args=args)
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
