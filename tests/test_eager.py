"""Eager mode (``jax.disable_jit()``), the lax view for jaxpr tools (``cnnjax.as_lax``), and the
edge cases of max pooling's gradient on every lowering of it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cnnjax
from cnnjax import backprop, models
from cnnjax._canon import layout_of, pool_geometry

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((2, 7, 7, 4)), jnp.float32)
K = jnp.asarray(RNG.standard_normal((3, 3, 2, 6)) * 0.3, jnp.float32)
DEPTHWISE = jnp.asarray(RNG.standard_normal((3, 3, 1, 4)), jnp.float32)

OPS = {
    "conv": lambda x, impl: cnnjax.conv(x, K, strides=2, padding=1, feature_group_count=2, impl=impl),
    "conv_transpose": lambda x, impl: cnnjax.conv_transpose(x, K[..., :4], strides=2, padding=1, impl=impl),
    "depthwise_conv": lambda x, impl: cnnjax.depthwise_conv(x, DEPTHWISE, padding="SAME", impl=impl),
    "max_pool": lambda x, impl: cnnjax.max_pool(x, 3, 2, 1, ceil_mode=True, impl=impl),
    "min_pool": lambda x, impl: cnnjax.min_pool(x, 2, impl=impl),
    "avg_pool": lambda x, impl: cnnjax.avg_pool(x, 3, 2, 1, count_include_pad=False, impl=impl),
    "max_pool_with_indices": lambda x, impl: cnnjax.max_pool_with_indices(x, 2, impl=impl)[0],
    "lp_pool": lambda x, impl: cnnjax.lp_pool(x, 2, 2, impl=impl),
    "adaptive_max_pool": lambda x, impl: cnnjax.adaptive_max_pool(x, 3, impl=impl),
}


def _loss(op, impl):
    return lambda x: jnp.sum(jnp.sin(OPS[op](x, impl)))


@pytest.mark.parametrize("impl", ["auto", "closed_form"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_and_gradient_runs_eagerly_and_equals_jit(op, impl):
    loss = _loss(op, impl)

    def values(x):  # the op, its gradient, a second-order gradient and a tangent
        second = jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2))(x)
        return OPS[op](x, impl), jax.grad(loss)(x), second, jax.jvp(lambda x: OPS[op](x, impl), (x,), (x,))[1]

    want = jax.jit(values)(X)
    with jax.disable_jit():
        got = values(X)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (lambda: models.LeNet5(rngs=nnx.Rngs(0)), (2, 28, 28, 1)),
        (lambda: models.resnet18(num_classes=10, small_input=True, rngs=nnx.Rngs(0)), (2, 32, 32, 3)),
    ],
    ids=["LeNet5", "resnet18"],
)
@pytest.mark.slow
def test_zoo_models_run_eagerly_and_through_as_lax(build, shape):
    model = build()
    model.eval()
    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    want = model(x)
    with jax.disable_jit():
        np.testing.assert_allclose(model(x), want, rtol=1e-4, atol=1e-4)
    lax_model = cnnjax.as_lax(model)
    np.testing.assert_allclose(jax.jit(lax_model)(x), want, rtol=1e-4, atol=1e-4)
    names = {eqn.primitive.name for eqn in jax.make_jaxpr(lax_model)(x).eqns}
    assert not {n for n in names if n.startswith("cnnjax_")}, names


def _primitive_names(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for item in value if isinstance(value, tuple) else (value,):
                inner = getattr(item, "jaxpr", item)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    names |= _primitive_names(inner)
    return names


@pytest.mark.parametrize("op", sorted(OPS))
def test_as_lax_leaves_only_lax_and_keeps_values_and_transforms(op):
    fn = functools.partial(OPS[op], impl="auto")
    lax_fn = cnnjax.as_lax(fn)
    assert not {
        n
        for n in _primitive_names(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(lax_fn(x))))(X).jaxpr)
        if n.startswith("cnnjax_")
    }
    np.testing.assert_allclose(lax_fn(X), fn(X), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(lax_fn(x)))))(X),
        jax.grad(_loss(op, "auto"))(X),
        rtol=1e-4,
        atol=1e-4,
    )
    batched = jnp.stack([X, 2 * X])
    np.testing.assert_allclose(jax.vmap(lax_fn)(batched), jax.vmap(fn)(batched), rtol=1e-5, atol=1e-5)


def test_as_lax_rewrites_control_flow_and_updates_batch_statistics():
    def scanned(x):
        return jax.lax.scan(lambda c, _: (cnnjax.max_pool(c, 3, 1, 1), None), x, length=2)[0]

    lax_fn = cnnjax.as_lax(scanned)
    assert not {n for n in _primitive_names(jax.make_jaxpr(lax_fn)(X).jaxpr) if n.startswith("cnnjax_")}
    np.testing.assert_allclose(lax_fn(X), scanned(X))
    model = models.resnet18(num_classes=10, small_input=True, rngs=nnx.Rngs(0))
    twin = nnx.clone(model)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 32, 32, 3)), jnp.float32)
    model(x)
    cnnjax.as_lax(twin)(x)
    for a, b in zip(
        jax.tree.leaves(nnx.state(model, nnx.BatchStat)), jax.tree.leaves(nnx.state(twin, nnx.BatchStat)), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_jaxpr_interpreter_reads_cnnjax_through_as_lax():
    """``jax.experimental.jet`` (Taylor mode) interprets jaxprs with rules for lax's primitives
    only: it refuses cnnjax's and runs the lax view."""
    from jax.experimental import jet

    fn = functools.partial(OPS["conv"], impl="auto")
    series = ([jnp.ones_like(X)],)
    with pytest.raises((KeyError, NotImplementedError), match="cnnjax_conv"):
        jet.jet(fn, (X,), series)
    primal, (first,) = jet.jet(cnnjax.as_lax(fn), (X,), series)
    np.testing.assert_allclose(primal, fn(X), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(first, jax.jvp(fn, (X,), (jnp.ones_like(X),))[1], rtol=1e-4, atol=1e-4)


# Max pooling's gradient: the CPU schedule, the plain formula and lax's select_and_scatter program
# (both ways it pads: the op's own padding, as on TPU, and expanded, as on GPU) agree on the edge
# cases cnnjax defines: padding never wins (not even against a real -inf), the first maximum in
# scan order wins a tie, a NaN wins.
EDGES = {
    "-inf windows beside padding": [-np.inf, -np.inf, 1.0, -np.inf, -np.inf, -np.inf, -np.inf],
    "ties": [2.0, 2.0, 2.0, 1.0, 2.0, 2.0, 0.0],
    "NaN": [np.nan, 2.0, np.nan, 3.0, 1.0, np.nan, 1.0],
    "signed zeros": [-0.0, 0.0, -0.0, 0.0, 0.0, -0.0, -0.0],
}


@pytest.mark.parametrize("select", ["max", "min"])
@pytest.mark.parametrize("values", list(EDGES.values()), ids=list(EDGES))
def test_max_pool_gradient_edge_cases_on_every_lowering(values, select):
    x = jnp.asarray(values if select == "max" else [-v for v in values], jnp.float32).reshape(1, -1, 1)
    layout, _ = layout_of(x.shape, "NWC", "max_pool")
    w = pool_geometry("max_pool", x.shape, layout, (3,), (1,), ((2, 1),), 1, True)
    dy = jnp.asarray(np.arange(1.0, 1.0 + w.out[0]), jnp.float32).reshape(1, -1, 1)
    want = backprop.window_max_scatter(dy, x, w, select)
    np.testing.assert_allclose(want.sum(), dy.sum())  # every gradient lands on a real element
    pool = cnnjax.max_pool if select == "max" else cnnjax.min_pool
    for impl in ("auto", "closed_form", "lax"):
        _, pullback = jax.vjp(lambda x, impl=impl: pool(x, 3, 1, ((2, 1),), ceil_mode=True, layout="NWC", impl=impl), x)
        np.testing.assert_array_equal(pullback(dy)[0], want, err_msg=impl)
    for expand in (False, True):
        got = jax.jit(functools.partial(backprop.select_and_scatter_max, w=w, select=select, expand_padding=expand))(
            dy, x
        )
        np.testing.assert_array_equal(got, want, err_msg=f"expand_padding={expand}")
