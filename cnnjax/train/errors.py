"""The errors a training run reports to its user: what it was given cannot be used.

The command line prints a :class:`TrainError` (or an ``OSError`` from reading a file) as one
line and exits; any other exception is a bug and keeps its traceback. Each is a ``ValueError``,
so code that catches ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "DataError", "TrainError"]


class TrainError(ValueError):
    """An argument of a run that cannot be used (``fit``'s options, a :class:`~cnnjax.train.Recipe`)."""


class DataError(TrainError):
    """A dataset file or folder that is corrupt, or does not hold what its reader expects."""


class CheckpointError(TrainError):
    """A checkpoint directory that cannot be resumed from (or must not be written to)."""
