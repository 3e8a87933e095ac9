"""Every JAX transform through cnnjax's primitives, with default arguments, agrees with ``impl="lax"``.

In the style of jax's ``tests/lax_autodiff_test.py``: for each op (conv, conv_transpose,
depthwise_conv, max_pool, avg_pool), geometry drawn at random with hypothesis, every transform of
the default ``impl="auto"`` (on CPU: the primitives lowered to ``cnnjax._cpu``'s schedules) and of
``impl="closed_form"`` (the formulas) is compared with JAX's own autodiff of lax (``impl="lax"``);
then the same for ``LeNet5`` and ``resnet18(small_input=True)``. Finite differences use
``cnnjax.testing``'s strategies and ``check_op``, as a user's property test would. Sharding,
``shard_map`` and ``jax.export`` run in a subprocess with 4 CPU devices.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import budget
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from abstract_models import abstract
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from cnnjax import avg_pool as avg_pool_op
from cnnjax import conv, conv_transpose, depthwise_conv, max_pool, models, nn
from cnnjax.testing import check_op, conv_geometries, pool_geometries

IMPLS = ("auto", "closed_form")
OPS = ("conv", "conv_transpose", "depthwise_conv", "max_pool", "avg_pool")


def assert_close(actual, expected, rtol=2e-5):
    """Agreement scaled by the reference's magnitude (``rtol`` per dtype)."""
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def assert_trees_close(actual, expected, rtol=2e-5):
    jax.tree.map(functools.partial(assert_close, rtol=rtol), actual, expected)


@st.composite
def cases(draw, ops=OPS):
    """``(op name, geometry kwargs, input shapes)`` of a small problem, NHWC or NCHW, 1-D or 2-D."""
    op = draw(st.sampled_from(ops))
    rank = draw(st.integers(1, 2))
    layout = draw(st.sampled_from([("NWC", "NHWC"), ("NCW", "NCHW")]))[rank - 1]  # a name fixes the rank
    window = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    padding = draw(st.sampled_from(["VALID", "SAME", 1]))
    sizes = tuple(k + draw(st.integers(0, 3)) for k in window)
    batch = draw(st.integers(1, 2))
    if op in ("max_pool", "avg_pool"):
        padding = draw(st.sampled_from(["VALID", 0, 1])) if all(k >= 2 for k in window) else 0
        return (
            op,
            {"window_shape": window, "strides": strides, "padding": padding, "layout": layout},
            [_shape(layout, batch, sizes, 2)],
        )
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    sizes = tuple(d * (k - 1) + 1 + draw(st.integers(0, 3)) for k, d in zip(window, dilation, strict=True))
    geometry = {"strides": strides, "padding": padding, "kernel_dilation": dilation, "layout": layout}
    if op == "depthwise_conv":
        c = draw(st.integers(1, 3))
        kernel = _kernel(layout, window, 1, c * draw(st.integers(1, 2)))
        return op, geometry, [_shape(layout, batch, sizes, c), kernel]
    groups = draw(st.sampled_from([1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    geometry["feature_group_count"] = groups
    if op == "conv_transpose":  # the forward conv's kernel: maps c_out channels to c_in
        if padding == "SAME":
            geometry["padding"] = 0
        return op, geometry, [_shape(layout, batch, sizes, c_in), _kernel(layout, window, c_out // groups, c_in)]
    return op, geometry, [_shape(layout, batch, sizes, c_in), _kernel(layout, window, c_in // groups, c_out)]


def _shape(layout, batch, sizes, channels):
    return (batch, *sizes, channels) if layout.endswith("C") else (batch, channels, *sizes)


def _kernel(layout, window, c_in, c_out):
    return (*window, c_in, c_out) if layout.endswith("C") else (c_out, c_in, *window)


def op_fn(op: str, geometry: dict, impl: str):
    """The op with ``geometry`` bound, as a function of its array inputs."""
    fn = {
        "conv": conv,
        "conv_transpose": conv_transpose,
        "depthwise_conv": depthwise_conv,
        "max_pool": max_pool,
        "avg_pool": avg_pool_op,
    }[op]
    return functools.partial(fn, **geometry, impl=impl)


def inputs(shapes, dtype=jnp.float32, seed=0, distinct=False):
    """Random inputs; ``distinct`` values (no ties) where a max pool's derivative is compared."""
    rng = np.random.default_rng(seed)
    if distinct:
        return [jnp.asarray(rng.permutation(np.prod(s)).reshape(s) / np.prod(s) - 0.5, dtype) for s in shapes]
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def scalar_loss(f):
    return lambda *args: jnp.sum(jnp.sin(f(*args)))


# ---------------------------------------------------------------------------------------------
# First order, both modes.


def first_order(f, args, tangents):
    """grad, vjp, jvp and linearize of ``f`` at ``args``, in one jitted program."""

    @jax.jit
    def run(args, tangents):
        grad = jax.grad(scalar_loss(f), tuple(range(len(args))))(*args)
        y, pullback = jax.vjp(f, *args)
        _, f_lin = jax.linearize(f, *args)
        return grad, y, pullback(jnp.cos(y)), jax.jvp(f, args, tangents), f_lin(*tangents)

    return run(args, tangents)


@settings(max_examples=budget.examples(8))
@given(cases(), st.sampled_from(IMPLS))
def test_grad_vjp_jvp_linearize(case, impl):
    op, geometry, shapes = case
    args, tangents = inputs(shapes, distinct=op == "max_pool"), inputs(shapes, seed=1)
    got = first_order(op_fn(op, geometry, impl), args, tangents)
    assert_trees_close(got, first_order(op_fn(op, geometry, "lax"), args, tangents))


@settings(max_examples=budget.examples(5))
@given(cases(), st.sampled_from(IMPLS))
def test_jacfwd_jacrev(case, impl):
    op, geometry, shapes = case
    args = inputs(shapes, distinct=op == "max_pool")

    def jacobians(f):
        return jax.jit(lambda *a: (jax.jacfwd(f)(*a), jax.jacrev(f)(*a)))(*args)

    assert_trees_close(jacobians(op_fn(op, geometry, impl)), jacobians(op_fn(op, geometry, "lax")))


# ---------------------------------------------------------------------------------------------
# Higher order: hessian, forward-over-reverse, reverse-over-reverse, third-order reverse.


def higher_order(f, args):
    """hessian, forward-over-reverse and third-order reverse of ``sum(sin(f))``, jitted."""
    loss = scalar_loss(f)

    def third_order(*a):  # d/dx of sum((d/dx of sum(sin(d loss/dx)))^2): reverse over reverse over reverse
        first = jax.grad(loss)
        second = jax.grad(lambda *b: jnp.sum(jnp.sin(first(*b))))
        return jax.grad(lambda *b: jnp.sum(second(*b) ** 2))(*a)

    return jax.jit(lambda *a: (jax.hessian(loss)(*a), jax.jacfwd(jax.grad(loss))(*a), third_order(*a)))(*args)


@settings(max_examples=budget.examples(5))
@given(cases(), st.sampled_from(IMPLS))
def test_higher_order(case, impl):
    op, geometry, shapes = case
    args = inputs(shapes, distinct=op == "max_pool")
    assert_trees_close(
        higher_order(op_fn(op, geometry, impl), args), higher_order(op_fn(op, geometry, "lax"), args), 1e-4
    )


@settings(max_examples=budget.examples(6))
@given(
    st.one_of(
        conv_geometries(rank=1),
        conv_geometries(rank=2, transposed=True),
        pool_geometries("max", rank=2),
        pool_geometries("avg", rank=1),
    ),
    st.sampled_from(IMPLS),
)
def test_check_grads_second_order_both_modes(geometry, impl):
    """``cnnjax.testing.check_op``: finite differences to second order in both modes, and ``impl="lax"``'s
    values and derivatives, at geometries with the edge cases (batch 0, unbatched, ceil_mode, ...)."""
    check_op(functools.partial(geometry.function, impl=impl), geometry, reference="lax")


def test_check_grads_in_float64():
    """Default arguments (in float64 the CPU schedules step aside for the formulas)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.permutation(1 * 5 * 6 * 3).reshape(1, 5, 6, 3) / 90.0, jnp.float64)
        kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float64)
        check_grads(jax.jit(functools.partial(conv, strides=2, padding=1)), (x, kernel), 2, ("fwd", "rev"))
        check_grads(jax.jit(functools.partial(max_pool, window_shape=3, strides=2, padding=1)), (x,), 2, ("fwd", "rev"))


# ---------------------------------------------------------------------------------------------
# vmap, checkpoint, scan, eval_shape, make_jaxpr, and other dtypes.


def vmapped(f, x, kernel):
    """Per-example kernel gradients, stacked kernels, both operands batched, and a batched
    gradient in both operands (vmap of the transposes), in one jitted program."""

    @jax.jit
    def run(x, kernel):
        per_example = jax.vmap(jax.grad(lambda k, xi: jnp.sum(jnp.sin(f(xi[None], k)))), in_axes=(None, 0))(kernel, x)
        kernels = jnp.stack([kernel, 2 * kernel, -kernel])
        both = jnp.stack([x, 0.5 * x, x + 1])
        grads = jax.vmap(jax.grad(scalar_loss(f), (0, 1)))(both, kernels)
        return per_example, jax.vmap(f, in_axes=(None, 0))(x, kernels), jax.vmap(f)(both, kernels), grads

    return run(x, kernel)


@settings(max_examples=budget.examples(6))
@given(cases(ops=("conv", "conv_transpose", "depthwise_conv")), st.sampled_from(IMPLS))
def test_vmap_per_example_gradients_and_stacked_kernels(case, impl):
    op, geometry, shapes = case
    x, kernel = inputs(shapes)
    got = vmapped(op_fn(op, geometry, impl), x, kernel)
    assert_trees_close(got, vmapped(op_fn(op, geometry, "lax"), x, kernel), rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_checkpoint_scan_eval_shape_make_jaxpr(op, impl):
    _, geometry, shapes = _fixed_case(op)
    args = inputs(shapes, distinct=op == "max_pool")
    f, ref = op_fn(op, geometry, impl), op_fn(op, geometry, "lax")
    argnums = tuple(range(len(args)))
    remat = jax.grad(scalar_loss(jax.checkpoint(f)), argnums)(*args)
    assert_trees_close(remat, jax.grad(scalar_loss(ref), argnums)(*args))
    assert jax.eval_shape(f, *args) == jax.eval_shape(ref, *args)
    assert "cnnjax_" in str(jax.make_jaxpr(jax.grad(scalar_loss(f), argnums))(*args))
    assert "cnnjax_" not in str(jax.make_jaxpr(jax.grad(scalar_loss(ref), argnums))(*args))


@pytest.mark.parametrize("impl", IMPLS)
def test_scan_over_layers(impl):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    kernels = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 4)) * 0.3, jnp.float32)

    def net(impl):
        def layer(h, kernel):
            h = jnp.tanh(conv(h, kernel, padding="SAME", impl=impl))
            return max_pool(h, 3, 1, 1, impl=impl) + avg_pool_op(h, 3, 1, 1, impl=impl), None

        return lambda x, kernels: jnp.sum(jax.lax.scan(layer, x, kernels)[0] ** 2)

    assert_trees_close(jax.grad(net(impl), (0, 1))(x, kernels), jax.grad(net("lax"), (0, 1))(x, kernels), rtol=1e-4)


@pytest.mark.parametrize("dtype, rtol", [(jnp.bfloat16, 5e-2), (jnp.float16, 1e-2)])
@pytest.mark.parametrize("op", OPS)
def test_low_precision_agrees_with_lax(op, dtype, rtol):
    _, geometry, shapes = _fixed_case(op)
    args = inputs(shapes, dtype=dtype, distinct=op == "max_pool")
    f, ref = op_fn(op, geometry, "auto"), op_fn(op, geometry, "lax")
    argnums = tuple(range(len(args)))
    y = f(*args)
    assert y.dtype == dtype
    assert_close(y, ref(*args), rtol)
    grads, grads_ref = (
        jax.grad(lambda *a, g=g: jnp.sum(g(*a).astype(jnp.float32) ** 2), argnums)(*args) for g in (f, ref)
    )
    for g, r in zip(grads, grads_ref, strict=True):
        assert g.dtype == dtype
        assert_close(g, r, rtol)


def _fixed_case(op):
    """One hand-picked case per op (hypothesis draws the rest above)."""
    if op in ("max_pool", "avg_pool"):
        return op, {"window_shape": 3, "strides": 2, "padding": 1, "layout": "NHWC"}, [(2, 7, 6, 3)]
    geometry = {"strides": 2, "padding": 1, "kernel_dilation": (1, 2), "layout": "NCHW"}
    if op == "depthwise_conv":
        return op, geometry, [(2, 3, 7, 8), (6, 1, 3, 3)]
    if op == "conv_transpose":
        return op, geometry | {"feature_group_count": 2}, [(2, 4, 4, 5), (4, 3, 3, 3)]
    return op, geometry | {"feature_group_count": 2}, [(2, 4, 7, 8), (6, 2, 3, 3)]


# ---------------------------------------------------------------------------------------------
# A batch of 0: empty outputs, zero gradients, through every op and every zoo model.


@pytest.mark.parametrize("impl", ["lax", *IMPLS])
@pytest.mark.parametrize("op", OPS)
def test_empty_batch(op, impl):
    _, geometry, shapes = _fixed_case(op)
    shapes = [(0, *shapes[0][1:]), *shapes[1:]]
    args = inputs(shapes)
    f = op_fn(op, geometry, impl)
    y = f(*args)
    assert y.shape[0] == 0 and y.shape == jax.eval_shape(op_fn(op, geometry, "lax"), *args).shape
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), tuple(range(len(args)))))(*args)
    for g, a in zip(grads, args, strict=True):
        assert g.shape == a.shape and not np.any(np.asarray(g))


ZOO = {
    "LeNet5": lambda **kw: models.LeNet5(**kw),
    "AlexNet": lambda **kw: models.AlexNet(small_input=True, width_multiplier=0.125, hidden_features=16, **kw),
    "vgg11": lambda **kw: models.vgg11(small_input=True, width_multiplier=0.125, hidden_features=16, **kw),
    "NiN": lambda **kw: models.NiN(small_input=True, width_multiplier=0.125, **kw),
    "GoogLeNet": lambda **kw: models.GoogLeNet(small_input=True, width_multiplier=0.125, **kw),
    "resnet18": lambda **kw: models.resnet18(small_input=True, width_multiplier=0.125, **kw),
    "resnet50": lambda **kw: models.resnet50(small_input=True, width_multiplier=0.125, **kw),
    "densenet121": lambda **kw: models.densenet121(small_input=True, width_multiplier=0.125, **kw),
    "MobileNetV1": lambda **kw: models.MobileNetV1(small_input=True, width_multiplier=0.125, **kw),
}


def _empty_batch_step(model, x):
    """Logits and parameter gradients of ``sum(logits)`` on an empty batch, in training mode."""
    return nnx.value_and_grad(lambda m: jnp.sum(m(x)))(model)[1], model(x)


def _traced_empty_batch_step(model, x):
    """The jaxpr of :func:`_empty_batch_step` (traced only: no weights, no compilation) and the
    shapes of its gradients and logits."""
    graphdef, state = nnx.split(model)
    return jax.make_jaxpr(lambda state, x: _empty_batch_step(nnx.merge(graphdef, state), x), return_shape=True)(
        state, x
    )


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.slow
def test_every_zoo_model_traces_an_empty_batch_and_takes_impl_to_every_layer(name):
    """Every zoo model, in training mode (batch statistics, dropout), traces forward and backward
    on an empty batch to empty logits, through cnnjax's primitives; with ``impl="lax"`` on the
    constructor, no cnnjax primitive is left in the jaxpr."""
    size, channels = (28, 1) if name == "LeNet5" else (32, 3)
    x = jnp.zeros((0, size, size, channels))
    model = abstract(ZOO[name])
    jaxpr, (grads, logits) = _traced_empty_batch_step(model, x)
    assert logits.shape == (0, 10)
    assert jax.tree.map(lambda g: g.shape, grads) == jax.tree.map(lambda p: p.shape, nnx.state(model, nnx.Param))
    assert "cnnjax_" in str(jaxpr)
    assert "cnnjax_" not in str(_traced_empty_batch_step(abstract(ZOO[name], impl="lax"), x)[0])


@pytest.mark.parametrize("name", ["LeNet5", "resnet18"])
def test_empty_batch_gives_zero_gradients_and_keeps_running_statistics(name):
    """Run, compiled: zero gradients, and running statistics left alone, as PyTorch does."""
    model = built(name)
    size, channels = (28, 1) if name == "LeNet5" else (32, 3)
    before = nnx.state(model, nnx.BatchStat)
    grads, logits = nnx.jit(_empty_batch_step)(model, jnp.zeros((0, size, size, channels)))
    assert logits.shape == (0, 10)
    assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
    assert_trees_close(nnx.state(model, nnx.BatchStat), before)


# ---------------------------------------------------------------------------------------------
# Models: LeNet5 and resnet18(small_input=True) with default arguments.


def _model_loss(model):
    graphdef, state = nnx.split(model)

    def loss(params, x):
        return jnp.sum(jax.nn.log_softmax(nnx.merge(graphdef, params)(x)) ** 2)

    return loss, state


MODEL_INPUTS = {"LeNet5": (2, 28, 28, 1), "resnet18": (2, 8, 8, 3)}


@functools.cache
def _built(name: str):
    return nnx.split(ZOO[name](rngs=nnx.Rngs(0)))


def built(name: str):
    """A fresh copy of the zoo model ``name`` (its weights built once per test process)."""
    return nnx.merge(*_built(name))


def _model_transforms(model, x, every: bool):
    """grad, forward-over-reverse (an HVP) and jvp of a model in eval mode, in one jitted
    program; with ``every``, also reverse-over-reverse, linearize and jacfwd of grad."""
    model.eval()
    loss, params = _model_loss(model)

    @jax.jit
    def run(params, x):
        v = jax.tree.map(lambda p: jnp.ones_like(p) * 1e-2, params)
        grad = jax.grad(loss)(params, x)
        _, hvp = jax.jvp(lambda p: jax.grad(loss)(p, x), (params,), (v,))
        tangent = jax.jvp(lambda x: loss(params, x), (x,), (jnp.ones_like(x),))[1]
        if not every:
            return grad, hvp, tangent
        _, rev_rev = jax.vjp(lambda p: jax.grad(loss)(p, x), params)
        _, lin = jax.linearize(lambda x: loss(params, x), x)
        second = jax.jacfwd(jax.grad(lambda s: loss(params, x * s)))(1.0)
        return grad, hvp, tangent, rev_rev(grad), lin(jnp.ones_like(x)), second

    return run(params, x)


@pytest.mark.parametrize("name", sorted(MODEL_INPUTS))
def test_models_in_every_mode(name):
    x = jnp.asarray(np.random.default_rng(0).normal(size=MODEL_INPUTS[name]), jnp.float32)
    every = name == "LeNet5"  # resnet18's second-order checks are check_grads' below
    got = _model_transforms(built(name), x, every)
    assert_trees_close(got, _model_transforms(nn.set_impl(built(name), "lax"), x, every), 2e-4)


@pytest.mark.parametrize("name", sorted(MODEL_INPUTS))
@pytest.mark.slow
def test_models_check_grads_in_both_modes(name):
    """In float64 (small ``eps``: finite differences must not cross a ReLU's kink)."""
    shape = MODEL_INPUTS[name]
    model = built(name)
    model.eval()
    graphdef, state = nnx.split(model)
    with jax.enable_x64(True):
        state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state)
        x = jnp.asarray(np.random.default_rng(1).normal(size=(1, *shape[1:])), jnp.float64)
        check_grads(jax.jit(lambda x: nnx.merge(graphdef, state)(x)), (x,), order=2, modes=("fwd", "rev"), eps=1e-5)


# ---------------------------------------------------------------------------------------------
# Sharding: a jitted step with a NamedSharding batch over 4 devices, shard_map with the default
# check_vma, and jax.export with a symbolic batch (forward and gradient); in a subprocess.

SHARDED_SCRIPT = textwrap.dedent(
    """
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from jax import export
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flax import nnx
    from cnnjax import conv, conv_transpose, depthwise_conv, max_pool, avg_pool, models

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 9, 9, 4)), jnp.float32)
    ops = {
        "conv": (functools.partial(conv, strides=2, padding=1, feature_group_count=2), (3, 3, 2, 6)),
        "conv_transpose": (functools.partial(conv_transpose, strides=2, padding=1), (4, 4, 3, 4)),
        "depthwise_conv": (functools.partial(depthwise_conv, padding="SAME"), (3, 3, 1, 8)),
        "max_pool": (lambda x, k: max_pool(x, 3, 2, 1) * jnp.sum(k), ()),
        "avg_pool": (lambda x, k: avg_pool(x, 3, 2, 1) * jnp.sum(k), ()),
    }
    batch = NamedSharding(mesh, P("data"))
    for name, (op, kshape) in ops.items():
        kernel = jnp.asarray(rng.normal(size=kshape), jnp.float32)
        for f in (op,):  # default arguments: impl="auto"
            loss = lambda x, k, f=f: jnp.sum(jnp.sin(f(x, k)))
            want = jax.grad(loss, (0, 1))(x, kernel)
            got = jax.jit(jax.grad(loss, (0, 1)))(jax.device_put(x, batch), kernel)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)
            # with check_vma, the gradient of the replicated kernel comes back summed over shards
            per_shard = jax.grad(loss, (0, 1))
            sm = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P("data"), P()), out_specs=(P("data"), P())))
            got = sm(jax.device_put(x, batch), kernel)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)
            b = export.symbolic_shape("b")[0]
            spec = (jax.ShapeDtypeStruct((b, *x.shape[1:]), x.dtype), jax.ShapeDtypeStruct(kernel.shape, kernel.dtype))
            for fn in (f, jax.grad(loss, (0, 1))):
                exported = export.export(jax.jit(fn))(*spec)
                for n in (1, 3):
                    out = exported.call(x[:n], kernel)
                    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), out, jax.jit(fn)(x[:n], kernel))
        print("ok", name)
    model = models.LeNet5(rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    images = jnp.asarray(rng.normal(size=(8, 28, 28, 1)), jnp.float32)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)
    want = jax.grad(loss)(params, images)
    got = jax.jit(jax.grad(loss))(params, jax.device_put(images, batch))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)
    print("ok LeNet5")
    """
)


@pytest.mark.slow
def test_sharding_shard_map_and_export_on_4_devices():
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == [w for op in (*OPS, "LeNet5") for w in ("ok", op)]
