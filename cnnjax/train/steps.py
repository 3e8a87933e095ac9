"""The pure train and eval steps: one jitted function each, over ``(graphdef, TrainState)``.

The loop keeps an NNX model as ``(graphdef, TrainState)``: the graph definition is static and the
state (parameters, the other model variables such as batch statistics and RNG counters, and the
optax state) is a pytree that every jitted step takes and returns, donating the old one. The
loss is softmax cross-entropy on integer labels, averaged over the batch (the training loop of
docs/training.md: forward, loss, backprop, update with the batch-averaged gradient), optionally
against smoothed labels. With a ``Mesh``, batches are split along its ``"data"`` axis and the
state is replicated; XLA inserts the gradient all-reduce.

Steps are cached per ``(graphdef, optimizer, mesh, options)``: a second run of one model
structure with one optimizer calls the step it compiled before.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "TrainState",
    "cross_entropy",
    "global_batch",
    "init_train_state",
    "make_eval_step",
    "make_train_step",
    "to_float",
]

DATA_AXIS = "data"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_STEPS_CACHED = 8  # compiled steps kept per kind (train, eval): each holds its executable


class TrainState(NamedTuple):
    """Everything a train step reads and writes: one pytree, donated to every step."""

    params: nnx.State  # the model's ``nnx.Param`` variables
    model_state: nnx.State  # every other model variable: batch statistics, RNG stream state
    opt_state: optax.OptState


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


@functools.lru_cache(maxsize=_STEPS_CACHED)
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
    along the mesh's ``"data"`` axis and the state is replicated. The same arguments return the
    same jitted function (cached), so its compilations are reused.

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
        # optax's own arithmetic (Adam's bias correction, decay ** count) mixes float and int: it
        # traces with JAX's standard promotion, so a user's strict mode still trains.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == y)
        return TrainState(params, model_state, opt_state), {"loss": loss, "correct": correct}

    return jax.jit(train_step, donate_argnums=0, **_shardings(mesh, n_batch_args=2))


@functools.lru_cache(maxsize=_STEPS_CACHED)
def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh | None = None, *, dtype: str = "float32"):
    """The pure eval step ``eval_step(state, x, y, mask) -> metrics``, jitted (and cached as
    :func:`make_train_step`).

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


def global_batch(mesh: Mesh, *rows: np.ndarray) -> tuple[jax.Array, ...]:
    """The global batch arrays, sharded on ``"data"``, from this process's (equal) share of the
    rows of each; one process: a single batched ``device_put``."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(DATA_AXIS)), rows)


def to_float(x) -> float:
    """A replicated device scalar as a Python float (process-local read, works on multi-host)."""
    return float(np.asarray(x.addressable_data(0)))
