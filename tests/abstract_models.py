"""Abstract zoo models for the tests: ``nnx.eval_shape`` builds, made linear in the model's depth.

jax 0.10's tracers answer a ``.sharding`` lookup with an ``AttributeError`` whose message walks
the whole trace so far (``_origin_msg``), and flax 0.12's RNG streams look ``.sharding`` up at
every draw, so an abstract build is quadratic in the number of parameters: 20 s for
DenseNet-201, 2.5 s without the message. :func:`abstract` skips the message while it builds.

    >>> import jax
    >>> from cnnjax.models import densenet121
    >>> sum(p.size for p in jax.tree.leaves(nnx.state(abstract(densenet121, num_classes=1000), nnx.Param)))
    7978856
"""

from __future__ import annotations

import contextlib

import jax
from flax import nnx
from jax._src.interpreters import partial_eval


def make_rngs(seed: int = 0) -> nnx.Rngs:
    """ "rbg" keys: their initializers compile about four times faster on CPU than threefry's."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@contextlib.contextmanager
def _without_tracer_origin_messages():
    tracer = getattr(partial_eval, "DynamicJaxprTracer", None)
    if tracer is None or not hasattr(tracer, "_origin_msg"):  # another jax: nothing to skip
        yield
        return
    original = tracer._origin_msg
    tracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        tracer._origin_msg = original


def abstract(constructor, **kwargs):
    """The model with ``jax.ShapeDtypeStruct`` leaves: shapes only, nothing allocated or compiled."""
    with _without_tracer_origin_messages():
        return nnx.eval_shape(lambda: constructor(rngs=make_rngs(), **kwargs))
