"""cnnjax.backprop: the notes' closed-form gradients equal JAX's autodiff (and PyTorch's).

Each formula is checked through the public gradient functions and through the primitives that
use it as a derivative rule (the public ops with ``impl="closed_form"``: the formulas, and
``impl="auto"``: on CPU the schedules of ``cnnjax._cpu``), against JAX's autodiff of lax.
"""

import functools
import itertools

import budget
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads

from cnnjax._canon import Layout
from cnnjax._cpu import LIMITS
from cnnjax.backprop import (
    avg_pool_grad,
    conv_bias_grad,
    conv_input_grad,
    conv_kernel_grad,
    dense_backward,
    dense_grads,
    max_pool_grad,
)
from cnnjax.convolution import conv, conv_transpose
from cnnjax.pooling import avg_pool, max_pool, sum_pool
from cnnjax.shapes import resolve_padding

CLOSED_FORMS = ("auto", "closed_form")  # the impls that bind cnnjax's primitives


def assert_close(actual, expected, rtol=2e-5):
    """float32 agreement, scaled by the reference's magnitude."""
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# Strategies: random geometry (rank, layout, window, strides, dilation, every padding form).


def paddings(rank):
    return st.one_of(
        st.sampled_from(["VALID", "SAME", "SAME_LOWER", "FULL"]),
        st.integers(0, 2),
        st.lists(st.integers(0, 2), min_size=rank, max_size=rank).map(tuple),
        st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=rank, max_size=rank).map(tuple),
    )


def pad_pair(padding, i, n, k, s, d):
    """The (lo, hi) of spatial dim ``i`` for any accepted padding form."""
    if isinstance(padding, tuple):
        padding = padding[i]
    return resolve_padding(padding, n, k, s, d)


@st.composite
def geometries(draw, max_size=6):
    """(rank, layout, window, strides, dilation, padding, spatial sizes) with every output >= 1."""
    rank = draw(st.integers(1, 3))
    top = 3 if rank < 3 else 2  # 3-D cases compile many taps and phases: keep them small
    window = tuple(draw(st.integers(1, top)) for _ in range(rank))
    strides = tuple(draw(st.integers(1, top)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    padding = draw(paddings(rank))
    sizes = []
    for i, (k, d) in enumerate(zip(window, dilation, strict=True)):
        extent = d * (k - 1) + 1
        if isinstance(padding, str):
            smallest = extent if padding == "VALID" else 1
        else:
            lo, hi = pad_pair(padding, i, extent, k, 1, d)
            smallest = max(extent - lo - hi, 1)
        sizes.append(smallest + draw(st.integers(0, max_size - 2 if rank < 3 else 2)))
    layout = Layout(draw(st.booleans()), rank)
    return layout, window, strides, dilation, padding, tuple(sizes)


def windows_hold_input(sizes, window, strides, pairs, dilation):
    """Whether every window (floor mode) holds an input element: the pools raise otherwise."""
    for n, k, s, (lo, hi), d in zip(sizes, window, strides, pairs, dilation, strict=True):
        for j in range((n + lo + hi - d * (k - 1) - 1) // s + 1):
            if not any(0 <= j * s + a * d - lo < n for a in range(k)):
                return False
    return True


def named(layout: str, rank: int) -> str:
    """``"NHWC"``/``"NCHW"`` as the layout name of ``rank`` spatial dims."""
    return Layout(layout == "NHWC", rank).lhs


def resolved_pairs(padding, sizes, window, strides, dilation):
    return tuple(
        pad_pair(padding, i, n, k, s, d)
        for i, (n, k, s, d) in enumerate(zip(sizes, window, strides, dilation, strict=True))
    )


def lax_conv(x, kernel, strides, pairs, dilation, groups, layout):
    return lax.conv_general_dilated(
        x,
        kernel,
        strides,
        pairs,
        rhs_dilation=dilation,
        dimension_numbers=layout.dimension_numbers,
        feature_group_count=groups,
    )


def pool_padding(x, pairs, layout):
    full = [(0, 0)] * x.ndim
    for axis, pair in zip(layout.spatial_axes, pairs, strict=True):
        full[axis] = pair
    return full


def lax_max_pool(x, window, strides, pairs, dilation, layout):
    return lax.reduce_window(
        x,
        -jnp.inf,
        lax.max,
        layout.window(window),
        layout.window(strides),
        pool_padding(x, pairs, layout),
        window_dilation=layout.window(dilation),
    )


def lax_sum_pool(x, window, strides, pairs, layout):
    return lax.reduce_window(
        x, 0.0, lax.add, layout.window(window), layout.window(strides), pool_padding(x, pairs, layout)
    )


# ---------------------------------------------------------------------------------------------
# Convolution: closed forms == jax.vjp of lax.conv_general_dilated.

# (groups, C_in per group, C_out per group): each takes a different path through the closed forms
CONV_KINDS = {
    "dense": (1, 2, 3),
    "one_input_channel": (1, 1, 3),  # per-tap products, like a depthwise conv
    "grouped": (2, 2, 3),
    "grouped_one_output": (2, 2, 1),
    # more input channels per group than the per-tap products take: one dense conv per group
    # (forward here; the input gradient, whose kernel swaps in and out, in the second)
    "grouped_wide_in": (2, LIMITS.unrolled_group_channels + 1, 2),
    "grouped_wide_out": (2, 2, LIMITS.unrolled_group_channels + 1),
    "depthwise": (3, 1, 1),
    "depthwise_multiplier": (2, 1, 2),
}


@settings(max_examples=budget.examples(50))
@given(geometries(), st.sampled_from(sorted(CONV_KINDS)), st.integers(0, 2**16))
def test_conv_grads_equal_autodiff(geometry, kind, seed):
    layout, window, strides, dilation, padding, sizes = geometry
    groups, cig, cog = CONV_KINDS[kind]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=layout.shape(2, sizes, groups * cig)), jnp.float32)
    kshape = (*window, cig, groups * cog) if layout.channels_last else (groups * cog, cig, *window)
    kernel = jnp.asarray(rng.normal(size=kshape), jnp.float32)
    pairs = resolved_pairs(padding, sizes, window, strides, dilation)
    reference = functools.partial(
        lax_conv, strides=strides, pairs=pairs, dilation=dilation, groups=groups, layout=layout
    )
    dy = jnp.asarray(rng.normal(size=jax.eval_shape(reference, x, kernel).shape), jnp.float32)
    geometry_args = {
        "strides": strides,
        "padding": padding,
        "kernel_dilation": dilation,
        "feature_group_count": groups,
        "layout": layout.lhs,
    }

    @jax.jit
    def run(x, kernel, dy):
        y, vjp = jax.vjp(reference, x, kernel)
        closed = [jax.vjp(functools.partial(conv, **geometry_args, impl=impl), x, kernel) for impl in CLOSED_FORMS]
        dx = conv_input_grad(dy, kernel, x.shape, **geometry_args)
        dk = conv_kernel_grad(x, dy, kernel.shape, **geometry_args)
        return (y, *vjp(dy)), [(y_closed, *vjp_closed(dy)) for y_closed, vjp_closed in closed], (dx, dk)

    (y, dx_ref, dk_ref), closed, (dx, dk) = run(x, kernel, dy)
    for y_closed, dx_closed, dk_closed in closed:
        assert_close(y_closed, y)
        for actual in (dx, dx_closed):
            assert actual.shape == x.shape
            assert_close(actual, dx_ref)
        for actual in (dk, dk_closed):
            assert actual.shape == kernel.shape
            assert_close(actual, dk_ref)


def test_conv_bias_grad_of_a_large_array():
    dy = jnp.asarray(np.random.default_rng(0).normal(size=(5, 33, 35, 16)), jnp.float32)
    assert_close(conv_bias_grad(dy), np.asarray(dy, np.float64).sum(axis=(0, 1, 2)), rtol=1e-4)


def test_conv_whose_taps_meet_only_padding_is_zero():
    # one input position, kernel 1, stride 2, padding 1: output 0 reads x[-1], output 1 reads x[1]
    x, kernel = jnp.ones((1, 1, 2)), jnp.ones((1, 1, 2))
    for impl in ("lax", *CLOSED_FORMS):
        y, pullback = jax.vjp(
            lambda x, k, impl=impl: conv(x, k, strides=2, padding=1, feature_group_count=2, layout="NWC", impl=impl),
            x,
            kernel,
        )
        dx, dk = pullback(jnp.ones_like(y))
        assert y.shape == (1, 2, 2) and not np.any(y) and not np.any(dx) and not np.any(dk)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_conv_bias_grad_sums_batch_and_space(layout):
    dy = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
    channel = 3 if layout == "NHWC" else 1
    shape = [1, 1, 1, 1]
    shape[channel] = dy.shape[channel]
    _, vjp = jax.vjp(lambda b: jnp.zeros_like(dy) + b.reshape(shape), jnp.zeros(dy.shape[channel]))
    assert_close(conv_bias_grad(dy, layout), vjp(dy)[0])


def test_conv_input_grad_hand_example_stride_two():
    # 1-D, k=2, s=2: x[2j], x[2j+1] feed y[j] with weights w0, w1, so dx interleaves dy*w0, dy*w1.
    dx = conv_input_grad(
        jnp.array([[[1.0], [10.0]]]), jnp.array([[[2.0]], [[3.0]]]), (1, 5, 1), strides=2, layout="NWC"
    )
    np.testing.assert_array_equal(dx[0, :, 0], [2.0, 3.0, 20.0, 30.0, 0.0])


# ---------------------------------------------------------------------------------------------
# Pooling.


def numpy_max_pool_grad(x, dy, window, strides, pairs, dilation, layout):
    """Reference: loop over outputs, route dy to the first max of the window in scan order."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    if not layout.channels_last:
        x, dy = np.moveaxis(x, 1, -1), np.moveaxis(dy, 1, -1)
    xp = np.pad(x, ((0, 0), *pairs, (0, 0)), constant_values=-np.inf)
    dxp = np.zeros_like(xp)
    taps = list(itertools.product(*(range(k) for k in window)))
    for out in np.ndindex(*dy.shape[1:-1]):
        where = [tuple(o * s + a * d for o, s, a, d in zip(out, strides, tap, dilation, strict=True)) for tap in taps]
        values = np.stack([xp[(slice(None), *w)] for w in where], axis=-1)  # (N, C, taps)
        first = np.argmax(values, axis=-1)  # np.argmax returns the first maximum
        for t, w in enumerate(where):
            dxp[(slice(None), *w)] += np.where(first == t, dy[(slice(None), *out)], 0.0)
    dx = dxp[(slice(None), *(slice(lo, lo + n) for (lo, _), n in zip(pairs, x.shape[1:-1], strict=True)))]
    return dx if layout.channels_last else np.moveaxis(dx, -1, 1)


@settings(max_examples=budget.examples(40))
@given(geometries(), st.booleans(), st.integers(0, 2**16))
def test_max_pool_grad_routes_to_first_max(geometry, strided, seed):
    layout, window, strides, dilation, padding, sizes = geometry
    strides = strides if strided else None
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(0, 3, size=layout.shape(2, sizes, 2)), jnp.float32)  # many ties
    step = window if strides is None else strides
    pairs = resolved_pairs(padding, sizes, window, step, dilation)
    assume(windows_hold_input(sizes, window, step, pairs, dilation))
    forward = functools.partial(
        lax_max_pool, window=window, strides=step, pairs=pairs, dilation=dilation, layout=layout
    )
    dy = jnp.asarray(rng.normal(size=jax.eval_shape(forward, x).shape), jnp.float32)
    name = layout.lhs

    @jax.jit
    def run(x, dy):
        closed = [
            jax.vjp(
                lambda x, i=impl: max_pool(x, window, strides, padding, window_dilation=dilation, layout=name, impl=i),
                x,
            )
            for impl in CLOSED_FORMS
        ]
        dx = max_pool_grad(x, dy, window, strides, padding, window_dilation=dilation, layout=name)
        return forward(x), [(y_closed, vjp_closed(dy)[0]) for y_closed, vjp_closed in closed], dx

    y, closed, dx = run(x, dy)
    expected = numpy_max_pool_grad(x, dy, window, step, pairs, dilation, layout)
    assert_close(dx, expected)
    for y_closed, dx_closed in closed:
        np.testing.assert_array_equal(y_closed, y)
        assert_close(dx_closed, expected)
    if all(d == 1 for d in dilation):  # jax.vjp of reduce_window max has no window dilation
        assert_close(dx, jax.jit(lambda x, dy: jax.vjp(forward, x)[1](dy)[0])(x, dy))


@pytest.mark.parametrize("window, strides", [((2, 2), (1, 1)), ((2, 2), (2, 2)), ((3, 3), (2, 2)), ((2, 3), (1, 2))])
def test_max_pool_ties_follow_xla_first_in_scan_order(window, strides):
    x = jnp.ones((1, 5, 6, 1))  # every window is all-equal
    layout = Layout(True, 2)
    forward = functools.partial(
        lax_max_pool, window=window, strides=strides, pairs=((0, 0), (0, 0)), dilation=(1, 1), layout=layout
    )
    y, vjp = jax.vjp(forward, x)
    dy = jnp.arange(1.0, y.size + 1).reshape(y.shape)
    expected = np.zeros((5, 6))
    for i, j in np.ndindex(y.shape[1:3]):  # the first element of each window is its top-left corner
        expected[i * strides[0], j * strides[1]] += dy[0, i, j, 0]
    np.testing.assert_array_equal(vjp(dy)[0][0, :, :, 0], expected)
    np.testing.assert_array_equal(max_pool_grad(x, dy, window, strides)[0, :, :, 0], expected)


@settings(max_examples=budget.examples(30))
@given(geometries(), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_avg_and_sum_pool_grads_equal_autodiff(geometry, strided, count_include_pad, seed):
    layout, window, strides, _, padding, sizes = geometry
    strides = strides if strided else None
    step = window if strides is None else strides
    ones = (1,) * layout.spatial_rank
    pairs = resolved_pairs(padding, sizes, window, step, ones)  # sizes drawn for a dilated window also fit this one
    assume(windows_hold_input(sizes, window, step, pairs, ones))
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=layout.shape(2, sizes, 3)), jnp.float32)
    total = functools.partial(lax_sum_pool, window=window, strides=step, pairs=pairs, layout=layout)
    divisor = np.prod(window) if count_include_pad else total(jnp.ones_like(x))

    def average(x):
        return total(x) / divisor

    dy = jnp.asarray(rng.normal(size=jax.eval_shape(total, x).shape), jnp.float32)
    name = layout.lhs

    @jax.jit
    def run(x, dy):
        closed = [
            jax.vjp(lambda x, i=impl: sum_pool(x, window, strides, padding, layout=name, impl=i), x)
            for impl in CLOSED_FORMS
        ]
        y, vjp = jax.vjp(total, x)
        dx_avg = avg_pool_grad(
            dy,
            x.shape,
            window,
            strides,
            padding,
            count_include_pad=count_include_pad,
            layout=name,
        )
        closed = [(y_closed, vjp_closed(dy)[0]) for y_closed, vjp_closed in closed]
        return y, closed, vjp(dy)[0], jax.vjp(average, x)[1](dy)[0], dx_avg

    y, closed, dx_sum, dx_avg_ref, dx_avg = run(x, dy)
    for y_closed, dx_sum_closed in closed:
        assert_close(y_closed, y)
        assert_close(dx_sum_closed, dx_sum)
    assert_close(dx_avg, dx_avg_ref)


# ---------------------------------------------------------------------------------------------
# Higher order: the rules are the primitives' own, so both modes work to any order.


@pytest.mark.parametrize("impl", CLOSED_FORMS)
def test_check_grads_conv_second_order(impl):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 6, 4)))
    kernel = jnp.asarray(rng.normal(size=(3, 2, 4, 4)) * 0.5)
    for groups in (1, 2):
        f = functools.partial(
            conv,
            strides=(2, 1),
            padding=((1, 1), (0, 1)),
            kernel_dilation=(1, 2),
            feature_group_count=groups,
            impl=impl,
        )
        k = kernel[:, :, : 4 // groups, :]
        check_grads(f, (x, k), order=2, modes=["fwd", "rev"], eps=1e-2, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("impl", CLOSED_FORMS)
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_check_grads_pools_second_order(layout, impl):
    lay = Layout(layout == "NHWC", 2)
    x = jnp.asarray(np.random.default_rng(1).permutation(2 * 5 * 5 * 3).reshape(lay.shape(2, (5, 5), 3)) / 7.0)
    geometry = {"window_shape": (2, 3), "strides": (2, 1), "padding": ((1, 0), (0, 1)), "layout": layout, "impl": impl}
    for pool in (max_pool, sum_pool):
        # inputs are 1/7 apart: eps never moves a max
        check_grads(functools.partial(pool, **geometry), (x,), order=2, modes=["fwd", "rev"], eps=1e-2)


def test_closed_form_gradients_are_differentiable_in_both_modes():
    """The public gradient functions support fwd and rev mode, order 2."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(1, 5, 4, 2)))
    kernel = jnp.asarray(rng.normal(size=(2, 2, 2, 3)))
    dy = jnp.asarray(rng.normal(size=(1, 2, 3, 3)))
    args = {"strides": (2, 1), "padding": "VALID"}
    input_grad = jax.jit(lambda dy, k: conv_input_grad(dy, k, x.shape, **args))
    kernel_grad = jax.jit(lambda x, dy: conv_kernel_grad(x, dy, kernel.shape, **args))
    pool_grad = jax.jit(lambda dy: avg_pool_grad(dy, x.shape, 2, 1, "SAME", count_include_pad=False))
    check_grads(input_grad, (dy, kernel), order=2, modes=["fwd", "rev"], eps=1e-2)
    check_grads(kernel_grad, (x, dy), order=2, modes=["fwd", "rev"], eps=1e-2)
    check_grads(pool_grad, (jnp.asarray(rng.normal(size=(1, 5, 4, 2))),), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize("impl", CLOSED_FORMS)
def test_second_derivative_matches_autodiff(impl):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 2, 6, 6)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 2, 3, 3)), jnp.float32)
    geometry = {"strides": 2, "padding": 1, "layout": "NCHW"}

    def loss(conv_fn, x, kernel):
        return jnp.sum(jnp.tanh(conv_fn(x, kernel)) ** 2)

    def outer(impl):  # d/dkernel of |d loss / dx|^2: reverse over reverse
        conv_fn = functools.partial(conv, **geometry, impl=impl)
        return jax.grad(lambda k: jnp.sum(jax.grad(loss, argnums=1)(conv_fn, x, k) ** 2))(kernel)

    assert_close(outer(impl), outer("lax"), rtol=1e-4)


@pytest.mark.parametrize("impl", CLOSED_FORMS)
def test_closed_form_composes_with_jit_and_vmap(impl):
    rng = np.random.default_rng(4)
    xs = jnp.asarray(rng.normal(size=(3, 2, 7, 2)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 2, 4)), jnp.float32)

    def per_example(impl):
        conv_fn = functools.partial(conv, strides=2, padding=1, impl=impl)
        return jax.jit(jax.vmap(jax.grad(lambda x, k: jnp.sum(jnp.sin(conv_fn(x, k))), argnums=1), in_axes=(0, None)))

    assert_close(per_example(impl)(xs, kernel), per_example("lax")(xs, kernel))


# ---------------------------------------------------------------------------------------------
# Through the public ops: conv(..., impl=...), max_pool/avg_pool(..., impl=...).


@pytest.mark.parametrize("seed", budget.seeds(8))
@pytest.mark.parametrize("impl", CLOSED_FORMS)
def test_public_conv_impls_agree(seed, impl):
    rng = np.random.default_rng(300 + seed)
    rank = int(rng.integers(1, 3))
    layout = named(str(rng.choice(["NHWC", "NCHW"])), rank)
    groups = int(rng.choice([1, 2, 4]))
    c_in, c_out = 4, 4 * int(rng.integers(1, 3))
    window = tuple(int(v) for v in rng.integers(1, 4, rank))
    strides = tuple(int(v) for v in rng.integers(1, 3, rank))
    dilation = tuple(int(v) for v in rng.integers(1, 3, rank))
    padding = [int(rng.integers(0, 2)), "SAME", "SAME_LOWER", "VALID"][seed % 4]
    padding_mode = "reflect" if seed % 3 == 0 and padding == 1 else "zeros"
    sizes = tuple(d * (k - 1) + 2 + int(rng.integers(0, 4)) for k, d in zip(window, dilation, strict=True))
    x_shape = (2, *sizes, c_in) if layout.endswith("C") else (2, c_in, *sizes)
    k_shape = (*window, c_in // groups, c_out) if layout.endswith("C") else (c_out, c_in // groups, *window)
    x, kernel = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x_shape, k_shape))
    bias = jnp.asarray(rng.normal(size=(c_out,)), jnp.float32)

    def grads(impl):
        def loss(x, kernel, bias):
            y = conv(
                x,
                kernel,
                bias,
                strides=strides,
                padding=padding,
                kernel_dilation=dilation,
                feature_group_count=groups,
                padding_mode=padding_mode,
                layout=layout,
                impl=impl,
            )
            return jnp.sum(jnp.sin(y))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, kernel, bias)

    (value, got), (want_value, want) = grads(impl), grads("lax")
    assert_close(value, want_value)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, rtol=1e-4)


@pytest.mark.parametrize("seed", budget.seeds(16))
@pytest.mark.parametrize("impl", CLOSED_FORMS)
def test_public_conv_transpose_impls_agree(seed, impl):
    # conv_transpose with a cnnjax primitive is the conv input-gradient primitive; its transposes
    # are conv (input) and the conv kernel-gradient primitive (kernel): values and both gradients
    # must equal JAX's autodiff of the input-dilated conv (impl="lax").
    rng = np.random.default_rng(500 + seed)
    rank = int(rng.integers(1, 3))
    layout = named(str(rng.choice(["NHWC", "NCHW"])), rank)
    groups = int(rng.choice([1, 2]))
    c_in, c_out = 2 * groups, groups * int(rng.integers(1, 3))
    window = tuple(int(v) for v in rng.integers(1, 5, rank))
    strides = tuple(int(v) for v in rng.integers(1, 4, rank))
    dilation = tuple(int(v) for v in rng.integers(1, 3, rank))
    output_padding = tuple(int(rng.integers(0, max(s, d))) for s, d in zip(strides, dilation, strict=True))
    padding = [
        int(rng.integers(0, 3)),
        tuple((int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(rank)),
        "SAME",
        "VALID",
    ][seed % 4]
    sizes = tuple(int(v) for v in rng.integers(2, 5, rank))
    x_shape = (2, *sizes, c_in) if layout.endswith("C") else (2, c_in, *sizes)
    k_shape = (*window, c_out // groups, c_in) if layout.endswith("C") else (c_in, c_out // groups, *window)
    x, kernel = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x_shape, k_shape))
    geometry = {
        "strides": strides,
        "padding": padding,
        "output_padding": output_padding,
        "kernel_dilation": dilation,
        "feature_group_count": groups,
        "layout": layout,
    }

    want, want_vjp = jax.vjp(functools.partial(conv_transpose, **geometry, impl="lax"), x, kernel)
    got, got_vjp = jax.vjp(functools.partial(conv_transpose, **geometry, impl=impl), x, kernel)
    assert got.shape == want.shape
    assert_close(got, want, rtol=1e-4)
    cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    for g, w in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
        assert_close(g, w, rtol=1e-4)


@pytest.mark.parametrize("seed", budget.seeds(8))
@pytest.mark.parametrize("impl", CLOSED_FORMS)
def test_public_pool_impls_agree(seed, impl):
    rng = np.random.default_rng(400 + seed)
    rank = int(rng.integers(1, 4))
    layout = named(str(rng.choice(["NHWC", "NCHW"])), rank)
    window = tuple(int(v) for v in rng.integers(1, 4, rank))
    strides = tuple(int(v) for v in rng.integers(1, 3, rank))
    padding = tuple(int(rng.integers(0, k // 2 + 1)) for k in window)
    ceil_mode, count_include_pad = bool(rng.integers(2)), bool(rng.integers(2))
    sizes = tuple(k + int(rng.integers(0, 4)) for k in window)
    shape = (2, *sizes, 3) if layout.endswith("C") else (2, 3, *sizes)
    x = jnp.asarray(rng.integers(0, 4, size=shape), jnp.float32)  # ties

    def grads(impl):
        def loss(x):
            high = max_pool(x, window, strides, padding, ceil_mode=ceil_mode, layout=layout, impl=impl)
            mean = avg_pool(
                x,
                window,
                strides,
                padding,
                ceil_mode=ceil_mode,
                count_include_pad=count_include_pad,
                layout=layout,
                impl=impl,
            )
            return jnp.sum(jnp.sin(high)) + jnp.sum(jnp.cos(mean))

        return jax.jit(jax.value_and_grad(loss))(x)

    (value, got), (want_value, want) = grads(impl), grads("lax")
    assert_close(value, want_value)
    assert_close(got, want)


@pytest.mark.parametrize("impl", CLOSED_FORMS)
def test_check_grads_public_ops_second_order(impl):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(2, 5, 6, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 4)) * 0.5, jnp.float32)
    closed_conv = functools.partial(conv, strides=2, padding="SAME", feature_group_count=2, impl=impl)
    check_grads(closed_conv, (x, kernel), order=2, modes=["fwd", "rev"], eps=1e-2, atol=3e-2, rtol=3e-2)
    for padding, output_padding in ((1, 1), ("SAME", 0)):
        closed_transpose = functools.partial(
            conv_transpose, strides=2, padding=padding, output_padding=output_padding, impl=impl
        )
        check_grads(closed_transpose, (x, kernel), order=2, modes=["fwd", "rev"], eps=1e-2, atol=3e-2, rtol=3e-2)
    distinct = jnp.asarray(rng.permutation(2 * 5 * 6 * 4).reshape(2, 5, 6, 4) / 9.0, jnp.float32)
    for pool in (max_pool, avg_pool):
        closed = functools.partial(pool, window_shape=3, strides=2, padding=1, ceil_mode=True, impl=impl)
        check_grads(closed, (distinct,), order=2, modes=["fwd", "rev"], eps=1e-2, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("impl", ["lax", *CLOSED_FORMS])
def test_forward_mode_through_conv(impl):
    x, kernel = jnp.ones((1, 4, 4, 1)), jnp.ones((2, 2, 1, 1))
    _, tangent = jax.jvp(lambda x: conv(x, kernel, impl=impl), (x,), (x,))
    assert_close(tangent, conv(x, kernel))


# ---------------------------------------------------------------------------------------------
# Dense layers (notes 002, 全连接层).


def test_dense_grads_equal_autodiff():
    rng = np.random.default_rng(5)
    a, w, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((4, 3), (3, 2), (2,)))
    delta = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
    _, vjp = jax.vjp(lambda a, w, b: a @ w + b, a, w, b)
    da, dw, db = vjp(delta)
    got_dw, got_db, got_back = dense_grads(a, w, delta)
    for got, want in ((got_dw, dw), (got_db, db), (got_back, da)):
        assert_close(got, want)


def test_dense_backward_equals_grad_of_mlp():
    rng = np.random.default_rng(6)
    sizes = (5, 4, 3, 2)
    ws = [jnp.asarray(rng.normal(size=(i, o)), jnp.float32) for i, o in itertools.pairwise(sizes)]
    bs = [jnp.asarray(rng.normal(size=(o,)), jnp.float32) for o in sizes[1:]]
    x = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)

    def loss(params, x):
        a = x
        for w, b in params:
            a = jax.nn.sigmoid(a @ w + b)
        return 0.5 * jnp.sum((a - target) ** 2)

    params = list(zip(ws, bs, strict=True))
    want, want_x = jax.grad(loss, argnums=(0, 1))(params, x)
    inputs, zs, a = [], [], x
    for w, b in params:
        inputs.append(a)
        zs.append(a @ w + b)
        a = jax.nn.sigmoid(zs[-1])

    def sigmoid_prime(z):
        return jax.nn.sigmoid(z) * (1 - jax.nn.sigmoid(z))

    delta = (a - target) * sigmoid_prime(zs[-1])  # notes 002: delta_L = (a_L - y) * sigma'(z_L)
    grads, delta_in = dense_backward(inputs, ws, zs[:-1], delta, sigmoid_prime)
    for (dw, db), (want_w, want_b) in zip(grads, want, strict=True):
        assert_close(dw, want_w)
        assert_close(db, want_b)
    assert_close(delta_in, want_x)


# ---------------------------------------------------------------------------------------------
# PyTorch (NCHW), seeded random cases.


def jitted(fn, *static, **kwargs):
    """``fn`` with ``static`` leading shape arguments and keyword geometry bound, compiled once."""
    return jax.jit(lambda *arrays: fn(*arrays, *static, **kwargs))


@pytest.mark.parametrize("seed", budget.seeds(20))
def test_conv2d_grads_match_torch(seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(100 + seed)
    groups = int(rng.choice([1, 1, 2]))
    c_in, c_out = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
    k, s, d, p = (tuple(int(v) for v in rng.integers(lo, hi, 2)) for lo, hi in ((1, 4), (1, 3), (1, 3), (0, 2)))
    size = tuple(d_ * (k_ - 1) + 1 + int(rng.integers(0, 4)) for k_, d_ in zip(k, d, strict=True))
    x = rng.normal(size=(2, c_in, *size)).astype(np.float32)
    w = rng.normal(size=(c_out, c_in // groups, *k)).astype(np.float32)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    bt = torch.zeros(c_out, requires_grad=True)
    yt = torch.nn.functional.conv2d(xt, wt, bt, stride=s, padding=p, dilation=d, groups=groups)
    dy = rng.normal(size=tuple(yt.shape)).astype(np.float32)
    yt.backward(torch.tensor(dy))
    args = {"strides": s, "padding": p, "kernel_dilation": d, "feature_group_count": groups, "layout": "NCHW"}
    assert_close(jitted(conv_input_grad, x.shape, **args)(dy, w), xt.grad.numpy(), rtol=1e-4)
    assert_close(jitted(conv_kernel_grad, w.shape, **args)(x, dy), wt.grad.numpy(), rtol=1e-4)
    assert_close(conv_bias_grad(jnp.asarray(dy), "NCHW"), bt.grad.numpy(), rtol=1e-4)


@pytest.mark.parametrize("seed", budget.seeds(20))
def test_pool2d_grads_match_torch(seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(200 + seed)
    k = tuple(int(v) for v in rng.integers(1, 4, 2))
    s = tuple(int(v) for v in rng.integers(1, 4, 2))
    p = tuple(int(rng.integers(0, k_ // 2 + 1)) for k_ in k)  # PyTorch: pad <= window / 2
    size = tuple(k_ + int(rng.integers(0, 5)) for k_ in k)
    x = rng.integers(0, 3, size=(2, 3, *size)).astype(np.float32)  # ties: PyTorch also takes the first max
    count_include_pad = bool(rng.integers(2))
    xt = torch.tensor(x, requires_grad=True)
    y_max = torch.nn.functional.max_pool2d(xt, k, s, p)
    dy_max = rng.normal(size=tuple(y_max.shape)).astype(np.float32)
    (dx_max,) = torch.autograd.grad(y_max, xt, torch.tensor(dy_max))
    y_avg = torch.nn.functional.avg_pool2d(xt, k, s, p, count_include_pad=count_include_pad)
    dy_avg = rng.normal(size=tuple(y_avg.shape)).astype(np.float32)
    (dx_avg,) = torch.autograd.grad(y_avg, xt, torch.tensor(dy_avg))
    assert_close(jitted(max_pool_grad, k, s, p, layout="NCHW")(x, dy_max), dx_max.numpy())
    got = jitted(avg_pool_grad, x.shape, k, s, p, count_include_pad=count_include_pad, layout="NCHW")(dy_avg)
    assert_close(got, dx_avg.numpy())


# ---------------------------------------------------------------------------------------------
# Argument errors.


def test_errors_name_op_argument_and_value():
    x, kernel = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4))
    with pytest.raises(TypeError, match="conv_kernel_grad: x must be floating point, got dtype int32"):
        conv_kernel_grad(jnp.ones((1, 5, 5, 2), jnp.int32), jnp.ones((1, 3, 3, 4)), kernel.shape)
    with pytest.raises(TypeError, match="max_pool_grad: x must be floating point, got dtype int32"):
        max_pool_grad(jnp.ones((1, 4, 4, 1), jnp.int32), jnp.ones((1, 2, 2, 1)), 2)
    with pytest.raises(
        ValueError,
        match=r"conv_input_grad: dy has shape \(1, 5, 5, 4\), but the forward conv's output has shape \(1, 3, 3, 4\)",
    ):
        conv_input_grad(jnp.ones((1, 5, 5, 4)), kernel, x.shape)
    with pytest.raises(ValueError, match="feature_group_count=3 must divide C_in=2"):
        conv_input_grad(jnp.ones((1, 3, 3, 3)), jnp.ones((3, 3, 1, 3)), x.shape, feature_group_count=3)
    with pytest.raises(ValueError, match="conv_kernel_grad: strides=0 must be >= 1"):
        conv_kernel_grad(x, jnp.ones((1, 3, 3, 4)), kernel.shape, strides=0)
    with pytest.raises(
        ValueError,
        match=r"avg_pool_grad: dy has shape \(1, 3, 3, 1\), but the forward pool's output has shape \(1, 2, 2, 1\)",
    ):
        avg_pool_grad(jnp.ones((1, 3, 3, 1)), (1, 4, 4, 1), 2)
    with pytest.raises(ValueError, match="dense_grads: w must be an"):
        dense_grads(jnp.ones((2, 3)), jnp.ones((3,)), jnp.ones((2, 1)))
