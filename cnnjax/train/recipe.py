"""The training recipe as data: an optimizer by name, its learning-rate schedule and weight decay.

A :class:`Recipe` is what the command line builds from its flags and what :func:`cnnjax.train.fit`
takes in place of an optax ``GradientTransformation``; ``fit`` turns it into one with
:meth:`Recipe.build` once the run's length is known. Building is cached, so two runs of one
recipe use one optimizer and share their compiled train step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import numpy as np
import optax

from cnnjax.train.errors import TrainError

__all__ = ["Recipe", "learning_rate_schedule", "make_optimizer"]

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


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An optimizer by name with its learning rate, schedule and decoupled weight decay.

    Attributes:
        optimizer: a name in ``OPTIMIZERS`` (``"adam"``, ``"adamw"``, ``"sgd"``, ``"momentum"``).
        learning_rate: the peak learning rate, a finite number > 0.
        schedule: ``"constant"``, ``"cosine"`` or ``"step"`` (:func:`learning_rate_schedule`).
        warmup_epochs: epochs of linear warm-up from 0; fewer than the run's epochs.
        weight_decay: decoupled weight decay on kernels only (:func:`make_optimizer`); ``None``:
            the optimizer's default (``DEFAULT_WEIGHT_DECAY``).

    Bad values raise :class:`~cnnjax.train.errors.TrainError` (a ``ValueError``) when the recipe
    is made; ``warmup_epochs`` is checked against the run's epochs by :meth:`build`.

    >>> Recipe("momentum", 0.1, schedule="cosine", warmup_epochs=5)
    Recipe(optimizer='momentum', learning_rate=0.1, schedule='cosine', warmup_epochs=5, weight_decay=None)
    """

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_epochs: int = 0
    weight_decay: float | None = None

    def __post_init__(self):
        op = "Recipe"
        if self.optimizer not in OPTIMIZERS:
            raise TrainError(f"{op}: optimizer={self.optimizer!r} must be one of {', '.join(sorted(OPTIMIZERS))}")
        if not (_is_number(self.learning_rate) and 0 < self.learning_rate < math.inf):
            raise TrainError(f"{op}: learning_rate={self.learning_rate!r} must be a finite number > 0")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"{op}: schedule={self.schedule!r} must be one of {', '.join(SCHEDULES)}")
        if not (isinstance(self.warmup_epochs, (int, np.integer)) and self.warmup_epochs >= 0):
            raise TrainError(f"{op}: warmup_epochs={self.warmup_epochs!r} must be an integer >= 0")
        if self.weight_decay is not None and not (_is_number(self.weight_decay) and 0 <= self.weight_decay < math.inf):
            raise TrainError(f"{op}: weight_decay={self.weight_decay!r} must be a finite number >= 0")

    def build(
        self, *, epochs: int, steps_per_epoch: int
    ) -> tuple[optax.GradientTransformation, optax.ScalarOrSchedule]:
        """``(optimizer, learning-rate schedule)`` for a run of ``epochs`` epochs of
        ``steps_per_epoch`` steps; the same arguments give the same (cached) optimizer.

        >>> optimizer, rate = Recipe("sgd", 0.5, warmup_epochs=1).build(epochs=2, steps_per_epoch=4)
        >>> [float(rate(step)) for step in (0, 2, 4)]
        [0.0, 0.25, 0.5]
        """
        if self.warmup_epochs and self.warmup_epochs >= epochs:
            raise TrainError(f"Recipe: warmup_epochs={self.warmup_epochs} must be less than epochs={epochs}")
        return _build(self, epochs, steps_per_epoch)

    def checkpointed(self, epochs: int) -> dict:
        """What a checkpoint records of this recipe: the options that change the run's numbers."""
        record = dataclasses.asdict(self)
        return record | {"epochs": epochs} if self.schedule != "constant" else record


@functools.lru_cache(maxsize=16)
def _build(recipe: Recipe, epochs: int, steps_per_epoch: int):
    rate = learning_rate_schedule(
        recipe.learning_rate,
        schedule=recipe.schedule,
        warmup_epochs=recipe.warmup_epochs,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
    )
    return make_optimizer(recipe.optimizer, rate, weight_decay=recipe.weight_decay), rate


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

    >>> params = {"kernel": jax.numpy.ones((1, 1)), "bias": jax.numpy.ones(1)}
    >>> optimizer = make_optimizer("sgd", 0.5, weight_decay=0.1)
    >>> updates, _ = optimizer.update(jax.tree.map(jax.numpy.zeros_like, params), optimizer.init(params), params)
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
