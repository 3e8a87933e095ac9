"""cnnjax under JAX's strict modes, as Equinox and many research codebases run:
``jax_numpy_rank_promotion="raise"`` and ``jax_numpy_dtype_promotion="strict"``.

Each case relied on implicit rank or dtype promotion inside cnnjax: the few-channel CPU schedule
(depthwise convs, a 1-channel input, grouped convs), adaptive pools whose bins differ in size, the
max-pool index arithmetic in float64, GoogLeNet's input transform, and a training step with
optax's Adam. Each runs jitted, forward and backward, under both modes, and equals the result
under JAX's default modes.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cnnjax
from cnnjax import models, nn
from cnnjax.train.steps import init_train_state, make_train_step

X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)), jnp.float32)


@contextlib.contextmanager
def strict():
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        yield


OPS = {  # name: fn(x, impl)
    "depthwise_conv": lambda x, impl: cnnjax.depthwise_conv(x, jnp.ones((3, 3, 1, 4)) / 9, padding="SAME", impl=impl),
    "conv, 1 input channel": lambda x, impl: cnnjax.conv(x[..., :1], jnp.ones((3, 3, 1, 8)) / 9, padding=1, impl=impl),
    "grouped conv": lambda x, impl: cnnjax.conv(
        x, jnp.ones((3, 3, 2, 6)) / 9, strides=2, padding=1, feature_group_count=2, impl=impl
    ),
    "adaptive_avg_pool": lambda x, impl: cnnjax.adaptive_avg_pool(x, (3, 5), impl=impl),
    "adaptive_max_pool": lambda x, impl: cnnjax.adaptive_max_pool(x, 3, impl=impl),
    "adaptive_max_pool_with_indices": lambda x, impl: cnnjax.adaptive_max_pool_with_indices(x, (3, 3), impl=impl)[0],
    "max_pool": lambda x, impl: cnnjax.max_pool(x, 3, 2, 1, ceil_mode=True, impl=impl),
    "avg_pool": lambda x, impl: cnnjax.avg_pool(x, 3, 2, 1, count_include_pad=False, impl=impl),
    "nn.Conv, 1 input channel": lambda x, impl: nn.Conv(1, 8, (3, 3), impl=impl, rngs=nnx.Rngs(0))(x[..., :1]),
}


def _values(fn, x):
    return fn(x), jax.grad(lambda x: jnp.sum(jnp.sin(fn(x))))(x)


def _assert_close(got, want):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)


@pytest.mark.parametrize("impl", ["auto", "closed_form", "lax"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_ops_and_gradients_under_strict_modes(name, impl):
    run = jax.jit(functools.partial(_values, functools.partial(OPS[name], impl=impl)))
    want = run(X)
    with strict():
        got = jax.jit(functools.partial(_values, functools.partial(OPS[name], impl=impl)))(X)
    _assert_close(got, want)


def test_max_pool_indices_in_float64_under_strict_modes():
    with jax.enable_x64(True):
        x = jnp.asarray(X, jnp.float64)
        fn = functools.partial(cnnjax.max_pool, window_shape=3, strides=2, padding=1)
        want = jax.jit(functools.partial(_values, fn))(x)
        with strict():
            got = jax.jit(functools.partial(_values, fn))(x)
    _assert_close(got, want)


def test_googlenet_input_transform_traces_under_strict_modes():
    """Promotion errors are raised while tracing: ``eval_shape`` of the whole model shows there are none."""
    model = nnx.eval_shape(
        lambda: models.GoogLeNet(small_input=True, width_multiplier=1 / 64, transform_input=True, rngs=nnx.Rngs(0))
    )
    with strict():
        logits = nnx.eval_shape(lambda m, x: m(x, train=True), model, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert logits.shape == (2, 10)


def test_an_adam_training_step_under_strict_modes():
    """cnnjax.train's step with optax's Adam (whose bias correction mixes float and int) trains a
    LeNet-5 under strict modes to the same loss and parameters."""
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 28, 28, 1)), jnp.float32)
    y = np.array([1, 2, 3, 4], np.int32)
    results = []
    for mode in (contextlib.nullcontext, strict):
        with mode():
            graphdef, state = init_train_state(models.LeNet5(rngs=nnx.Rngs(0)), optax.adam(1e-3))
            state, metrics = make_train_step(graphdef, optax.adam(1e-3))(state, x, y)
            results.append([np.asarray(a) for a in (metrics["loss"], *jax.tree.leaves(state.params))])
    _assert_close(*results)
