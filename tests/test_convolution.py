"""Properties of cnnjax.convolution that need no PyTorch: adjointness, SciPy agreement, padding
conventions, input dilation, the separable variants, transformations, integers and errors."""

import functools
import re

import budget
import chex
import jax
import numpy as np
import pytest
import scipy.signal
from hypothesis import given
from hypothesis import strategies as st
from jax import numpy as jnp
from jax.test_util import check_grads

from cnnjax._canon import Layout
from cnnjax.convolution import (
    conv,
    conv_transpose,
    convolve2d,
    corr2d,
    depthwise_conv,
    rank1_factors,
    separable_conv,
    spatially_separable_conv,
)
from cnnjax.shapes import resolve_padding

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _forward_kernel_shape(layout, window, c_in_per_group, c_out):
    return (*window, c_in_per_group, c_out) if layout.channels_last else (c_out, c_in_per_group, *window)


def _vjp_case(seed):
    rng = np.random.default_rng(seed)
    rank = 1 + seed % 3
    layout = Layout(channels_last=(seed // 3) % 2 == 0, spatial_rank=rank)
    groups = int(rng.choice([1, 2, 3]))
    c_in, c_out = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
    window = tuple(int(k) for k in rng.integers(1, 4, rank))
    strides = tuple(int(s) for s in rng.integers(1, 4, rank))
    dilation = tuple(int(d) for d in rng.integers(1, 3, rank))
    padding = [
        "VALID",
        "SAME",
        "SAME_LOWER",
        "FULL",
        int(rng.integers(0, 3)),
        tuple((int(lo), int(hi)) for lo, hi in rng.integers(0, 3, (rank, 2))),
    ][seed % 6]
    if isinstance(padding, str) and padding.startswith("SAME"):
        # SAME's adjoint has n*s pixels: forward inputs that are multiples of the stride
        spatial = tuple(s * int(rng.integers(1, 4)) for s in strides)
    else:
        spatial = tuple(d * (k - 1) + int(rng.integers(1, 6)) for k, d in zip(window, dilation, strict=True))
    x = rng.standard_normal(layout.shape(2, spatial, c_in)).astype(np.float32)
    w = rng.standard_normal(_forward_kernel_shape(layout, window, c_in // groups, c_out)).astype(np.float32)
    geometry = {"strides": strides, "padding": padding, "kernel_dilation": dilation, "feature_group_count": groups}
    return x, w, layout, geometry, rng


@pytest.mark.parametrize("seed", budget.seeds(48))
def test_conv_transpose_is_the_vjp_of_conv(seed):
    x, w, layout, geometry, rng = _vjp_case(seed)
    # the reference is JAX's own autodiff of conv (impl="lax"), not cnnjax.backprop's rules
    y, pullback = jax.vjp(lambda x: conv(x, w, layout=layout.lhs, impl="lax", **geometry), x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    (expected,) = pullback(dy)
    padding = geometry["padding"]
    output_padding = 0
    if not (isinstance(padding, str) and padding.startswith("SAME")):
        # the rows the forward conv's stride skipped at the end come back as output_padding
        per_dim = padding if isinstance(padding, tuple) else (padding,) * layout.spatial_rank
        output_padding = tuple(
            (n + sum(resolve_padding(p, n, k, s, d)) - d * (k - 1) - 1) % s
            for n, k, s, d, p in zip(
                layout.spatial(x.shape),
                [w.shape[a] for a in layout.kernel_spatial_axes],
                geometry["strides"],
                geometry["kernel_dilation"],
                per_dim,
                strict=True,
            )
        )
    got = conv_transpose(dy, w, output_padding=output_padding, layout=layout.lhs, **geometry)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("x_shape", "k_shape"),
    [((5, 6), (2, 3)), ((4, 4), (5, 5)), ((3, 7), (3, 2)), ((6, 5), (1, 1)), ((2, 3), (4, 4)), ((4, 6), (4, 1))],
)
@pytest.mark.parametrize("mode", ["valid", "same", "full"])
@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_convolve2d_equals_scipy(x_shape, k_shape, mode, dtype):
    rng = np.random.default_rng(sum(x_shape) + sum(k_shape))
    x = rng.integers(-5, 6, x_shape).astype(dtype)
    k = rng.integers(-5, 6, k_shape).astype(dtype)
    got = convolve2d(x, k, mode=mode)
    expected = scipy.signal.convolve2d(x, k, mode=mode)
    assert got.shape == expected.shape
    assert got.dtype == dtype
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_corr2d_is_convolve2d_with_the_flipped_kernel():
    x = jnp.arange(20.0).reshape(4, 5)
    k = jnp.array([[1.0, 2.0, 0.5], [-1.0, 3.0, 4.0]])
    np.testing.assert_allclose(corr2d(x, k), convolve2d(x, k[::-1, ::-1]))
    np.testing.assert_allclose(corr2d(x, k), scipy.signal.correlate2d(x, k, mode="valid"))


def test_same_puts_the_extra_pixel_at_the_end_and_same_lower_at_the_start():
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1)
    k = jnp.array([1.0, 10.0]).reshape(2, 1, 1)
    # SAME pads (0, 1): the last window sees [4, 0]; SAME_LOWER pads (1, 0): the first sees [0, 1]
    np.testing.assert_allclose(conv(x, k, padding="SAME")[0, :, 0], [21.0, 32.0, 43.0, 4.0])
    np.testing.assert_allclose(conv(x, k, padding="SAME_LOWER")[0, :, 0], [10.0, 21.0, 32.0, 43.0])
    np.testing.assert_allclose(conv(x, k, padding="SAME_UPPER"), conv(x, k, padding=((0, 1),)))


@pytest.mark.parametrize("strides", [1, 2, 3])
@pytest.mark.parametrize("window", [(2, 4), (3, 3), (4, 1)])
def test_same_and_same_lower_equal_their_explicit_pairs(strides, window):
    rng = np.random.default_rng(strides)
    x = rng.standard_normal((1, 7, 6, 2)).astype(np.float32)
    w = rng.standard_normal((*window, 2, 3)).astype(np.float32)
    for padding, lower in (("SAME", False), ("SAME_LOWER", True)):
        pairs = [(0, 0)] * 2
        for dim, (n, k) in enumerate(zip((7, 6), window, strict=True)):
            total = max((-(-n // strides) - 1) * strides + k - n, 0)
            pairs[dim] = (total - total // 2, total // 2) if lower else (total // 2, total - total // 2)
        y = conv(x, w, strides=strides, padding=padding)
        assert y.shape[1:3] == (-(-7 // strides), -(-6 // strides))
        np.testing.assert_allclose(y, conv(x, w, strides=strides, padding=pairs), **TOL)


def test_full_padding_pads_dilation_times_k_minus_one_per_side():
    x = jnp.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    k = jnp.array([1.0, 10.0]).reshape(2, 1, 1)
    np.testing.assert_allclose(conv(x, k, padding="FULL")[0, :, 0], [10.0, 21.0, 32.0, 3.0])
    dilated = conv(x, k, padding="FULL", kernel_dilation=2)
    np.testing.assert_allclose(dilated, conv(x, k, padding=((2, 2),), kernel_dilation=2))
    np.testing.assert_allclose(dilated[0, :, 0], [10.0, 20.0, 31.0, 2.0, 3.0])


def _insert_zeros(x, dilation, spatial_axes):
    """Explicit zero insertion: ``dilation - 1`` zeros between neighbouring pixels."""
    for axis, d in zip(spatial_axes, dilation, strict=True):
        n = x.shape[axis]
        shape = list(x.shape)
        shape[axis] = (n - 1) * d + 1
        out = np.zeros(shape, x.dtype)
        index = [slice(None)] * x.ndim
        index[axis] = slice(None, None, d)
        out[tuple(index)] = x
        x = out
    return x


@pytest.mark.parametrize(
    ("layout", "input_dilation", "padding", "strides"),
    [
        ("NHWC", (2, 3), "VALID", 1),
        ("NHWC", 2, "SAME", 2),
        ("NCHW", (3, 1), ((1, 2), (0, 1)), (1, 2)),
        ("NCHW", 2, "FULL", 1),
        ("NWC", 3, 1, 2),
        ("NCDHW", (2, 1, 2), "SAME_LOWER", 1),
    ],
)
def test_input_dilation_equals_explicit_zero_insertion(layout, input_dilation, padding, strides):
    rng = np.random.default_rng(0)
    lay = Layout(layout.endswith("C"), len(layout) - 2)
    x = rng.standard_normal(lay.shape(2, (4,) * lay.spatial_rank, 3)).astype(np.float32)
    w = rng.standard_normal(_forward_kernel_shape(lay, (2,) * lay.spatial_rank, 3, 2)).astype(np.float32)
    dilation = (input_dilation,) * lay.spatial_rank if isinstance(input_dilation, int) else input_dilation
    expected = conv(_insert_zeros(x, dilation, lay.spatial_axes), w, strides=strides, padding=padding, layout=layout)
    got = conv(x, w, strides=strides, padding=padding, input_dilation=input_dilation, layout=layout)
    np.testing.assert_allclose(got, expected, **TOL)


def test_conv_transpose_equals_input_dilated_conv_with_flipped_kernel():
    """Dumoulin & Visin's relationship: stride-s transpose = s-dilated input, full pad, flipped kernel."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 4, 1)).astype(np.float32)
    w = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    expected = conv(x, w[::-1, ::-1], input_dilation=2, padding="FULL")
    np.testing.assert_allclose(conv_transpose(x, w, strides=2, padding="VALID"), expected, **TOL)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_depthwise_conv_is_one_conv_per_channel(layout):
    rng = np.random.default_rng(2)
    c, multiplier = 3, 2
    lay = Layout(layout == "NHWC", 2)
    x = rng.standard_normal(lay.shape(2, (6, 5), c)).astype(np.float32)
    w = rng.standard_normal(_forward_kernel_shape(lay, (3, 2), 1, c * multiplier)).astype(np.float32)
    b = rng.standard_normal(c * multiplier).astype(np.float32)
    got = depthwise_conv(x, w, b, strides=2, padding="SAME", kernel_dilation=(1, 2), layout=layout)
    per_channel = []
    for ch in range(c):
        x_c = np.take(x, [ch], axis=lay.channel_axis)
        w_c = np.take(w, range(ch * multiplier, (ch + 1) * multiplier), axis=lay.kernel_out_axis)
        per_channel.append(conv(x_c, w_c, strides=2, padding="SAME", kernel_dilation=(1, 2), layout=layout))
    expected = np.concatenate(per_channel, axis=lay.channel_axis) + b.reshape(lay.shape(1, (1, 1), -1))
    np.testing.assert_allclose(got, expected, **TOL)


def test_separable_conv_equals_conv_with_the_combined_kernel():
    rng = np.random.default_rng(3)
    c, multiplier, c_out = 2, 3, 4
    x = rng.standard_normal((2, 7, 6, c)).astype(np.float32)
    depthwise = rng.standard_normal((3, 3, 1, c * multiplier)).astype(np.float32)
    pointwise = rng.standard_normal((1, 1, c * multiplier, c_out)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    # K[h, w, i, o] = sum_m depthwise[h, w, 0, i*M + m] * pointwise[0, 0, i*M + m, o]
    combined = np.einsum(
        "hwim,imo->hwio",
        depthwise.reshape(3, 3, c, multiplier),
        pointwise.reshape(c, multiplier, c_out),
    )
    geometry = {"strides": (2, 1), "padding": "SAME", "kernel_dilation": (1, 2)}
    got = separable_conv(x, depthwise, pointwise, b, **geometry)
    np.testing.assert_allclose(got, conv(x, combined, b, **geometry), rtol=1e-4, atol=1e-4)
    two_steps = conv(depthwise_conv(x, depthwise, **geometry), pointwise, b)
    np.testing.assert_allclose(got, two_steps, **TOL)


@pytest.mark.parametrize(
    ("strides", "padding", "dilation", "layout"),
    [
        (1, "VALID", 1, "NHWC"),
        (2, "SAME", 1, "NHWC"),
        ((1, 2), "SAME_LOWER", (2, 1), "NCHW"),
        (1, "FULL", 2, "NHWC"),
        ((2, 3), ((1, 0), (2, 1)), 1, "NCHW"),
        (3, 1, (1, 2), "NHWC"),
    ],
)
def test_spatially_separable_conv_equals_conv_with_the_outer_product(strides, padding, dilation, layout):
    rng = np.random.default_rng(4)
    lay = Layout(layout == "NHWC", 2)
    c_in, c_mid, c_out = 2, 3, 2
    x = rng.standard_normal(lay.shape(1, (9, 8), c_in)).astype(np.float32)
    column = rng.standard_normal((3, c_in, c_mid)).astype(np.float32)
    row = rng.standard_normal((2, c_mid, c_out)).astype(np.float32)
    combined = np.einsum("him,wmo->hwio", column, row)
    b = rng.standard_normal(c_out).astype(np.float32)
    if lay.channels_last:
        column_kernel, row_kernel = column[:, None], row[None]
    else:
        column_kernel = np.transpose(column, (2, 1, 0))[..., None]
        row_kernel = np.transpose(row, (2, 1, 0))[:, :, None]
        combined = np.transpose(combined, (3, 2, 0, 1))
    geometry = {"strides": strides, "padding": padding, "kernel_dilation": dilation, "layout": layout}
    got = spatially_separable_conv(x, column_kernel, row_kernel, b, **geometry)
    np.testing.assert_allclose(got, conv(x, combined, b, **geometry), rtol=1e-4, atol=1e-4)


def test_spatially_separable_sobel_per_channel_equals_depthwise_sobel():
    sobel = jnp.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    column, row = rank1_factors(sobel)
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 3))
    expected = depthwise_conv(x, jnp.tile(sobel[:, :, None, None], (1, 1, 1, 3)), padding="SAME")
    got = spatially_separable_conv(
        x,
        jnp.tile(column.reshape(3, 1, 1, 1), (1, 1, 1, 3)),
        jnp.tile(row.reshape(1, 3, 1, 1), (1, 1, 1, 3)),
        padding="SAME",
        feature_group_count=3,
    )
    np.testing.assert_allclose(got, expected, **TOL)


@given(
    column=st.lists(st.integers(-9, 9), min_size=1, max_size=5),
    row=st.lists(st.integers(-9, 9), min_size=1, max_size=5),
)
def test_rank1_factors_round_trip(column, row):
    kernel = np.outer(column, row).astype(np.float32)
    c, r = rank1_factors(kernel)
    assert c.shape == (len(column),)
    assert r.shape == (len(row),)
    np.testing.assert_allclose(np.outer(c, r), kernel, rtol=1e-6, atol=1e-6)


def test_rank1_factors_sobel_is_exact_and_zero_kernel_gives_zeros():
    c, r = rank1_factors(np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]]))
    np.testing.assert_array_equal(c, [1.0, 2.0, 1.0])
    np.testing.assert_array_equal(r, [1.0, 0.0, -1.0])
    c, r = rank1_factors(np.zeros((2, 3)))
    np.testing.assert_array_equal(np.outer(c, r), np.zeros((2, 3)))


def test_rank1_factors_rejects_rank_2_and_tolerates_round_off():
    with pytest.raises(ValueError, match=r"rank1_factors: kernel_2d is not rank 1.*singular values"):
        rank1_factors(np.eye(3))
    nearly = np.outer([1.0, 2.0, 3.0], [0.5, -1.0]) + 1e-7
    c, r = rank1_factors(nearly)
    np.testing.assert_allclose(np.outer(c, r), nearly, atol=1e-6)
    with pytest.raises(ValueError, match="not rank 1"):
        rank1_factors(nearly + np.array([[0.0, 1e-3], [0.0, 0.0], [0.0, 0.0]]))


def _small_problem():
    key_x, key_w, key_b = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(key_x, (2, 6, 5, 3))
    w = jax.random.normal(key_w, (3, 2, 3, 4))
    b = jax.random.normal(key_b, (4,))
    return x, w, b


def test_conv_under_jit_traces_once_per_shape():
    x, w, b = _small_problem()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def jitted(x, w, b):
        return conv(x, w, b, strides=2, padding="SAME", kernel_dilation=(1, 2))

    np.testing.assert_allclose(jitted(x, w, b), conv(x, w, b, strides=2, padding="SAME", kernel_dilation=(1, 2)), **TOL)
    jitted(x + 1.0, w, b)


def _unbatched_cases():
    rng = np.random.default_rng(5)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return {
        "conv": (lambda x, lay: conv(x, arr(3, 3, 2, 4) if lay == "NHWC" else arr(4, 2, 3, 3), arr(4), layout=lay)),
        "conv_transpose": (
            lambda x, lay: conv_transpose(
                x, arr(2, 2, 3, 2) if lay == "NHWC" else arr(2, 3, 2, 2), strides=2, layout=lay
            )
        ),
        "depthwise_conv": (
            lambda x, lay: depthwise_conv(x, arr(3, 3, 1, 4) if lay == "NHWC" else arr(4, 1, 3, 3), layout=lay)
        ),
        "separable_conv": (
            lambda x, lay: separable_conv(
                x,
                arr(3, 3, 1, 2) if lay == "NHWC" else arr(2, 1, 3, 3),
                arr(1, 1, 2, 3) if lay == "NHWC" else arr(3, 2, 1, 1),
                layout=lay,
            )
        ),
        "spatially_separable_conv": (
            lambda x, lay: spatially_separable_conv(
                x,
                arr(3, 1, 2, 2) if lay == "NHWC" else arr(2, 2, 3, 1),
                arr(1, 3, 2, 3) if lay == "NHWC" else arr(3, 2, 1, 3),
                layout=lay,
            )
        ),
    }


@pytest.mark.parametrize("layout", [None, "NCHW"])
@pytest.mark.parametrize("name", sorted(_unbatched_cases()))
def test_unbatched_input_equals_a_batch_of_one(name, layout):
    """``(H, W, C)`` / ``(C, H, W)``: the kernel's rank says 2-D, so rank 3 is unbatched, as in
    PyTorch and ``flax.nnx.Conv``; the result has no batch axis."""
    lay = layout or "NHWC"
    x = jnp.asarray(
        np.random.default_rng(6).standard_normal((1, 6, 6, 2) if lay == "NHWC" else (1, 2, 6, 6)), jnp.float32
    )
    # each _unbatched_cases() draws the same kernels
    np.testing.assert_allclose(_unbatched_cases()[name](x[0], lay), _unbatched_cases()[name](x, lay)[0], **TOL)


def test_vmap_over_unbatched_inputs_and_over_kernels():
    x, w, b = _small_problem()
    np.testing.assert_allclose(
        jax.vmap(lambda xi: conv(xi, w, b, padding="SAME"))(x), conv(x, w, b, padding="SAME"), **TOL
    )
    per_example = jax.vmap(lambda xi: conv(xi[None], w, b, padding="SAME")[0])(x)
    np.testing.assert_allclose(per_example, conv(x, w, b, padding="SAME"), **TOL)
    kernels = jnp.stack([w, 2.0 * w])
    per_kernel = jax.vmap(lambda k: conv(x, k))(kernels)
    np.testing.assert_allclose(per_kernel[1], 2.0 * conv(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", ["auto", "lax", "closed_form"])
def test_conv_gradients_are_right_for_every_impl(impl):
    x, w, b = _small_problem()
    geometry = {"strides": (2, 1), "padding": "SAME", "kernel_dilation": (1, 2)}
    f = functools.partial(conv, impl=impl, **geometry)
    check_grads(f, (x, w, b), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)

    def loss(conv_fn):
        return jax.grad(lambda x, w, b: jnp.sum(jnp.sin(conv_fn(x, w, b))), argnums=(0, 1, 2))(x, w, b)

    reference = loss(functools.partial(conv, impl="lax", **geometry))
    for got, expected in zip(loss(f), reference, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_conv_transpose_gradients():
    x, _, _ = _small_problem()
    w = jax.random.normal(jax.random.key(8), (3, 3, 2, 3))
    f = functools.partial(conv_transpose, strides=2, padding=1, output_padding=1)
    check_grads(f, (x, w), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)


def _reference_conv_nchw(x, w):
    """Integer-exact valid cross-correlation, stride 1 (int64 einsum over sliding windows)."""
    kh, kw = w.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.int64), (kh, kw), axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", windows, w.astype(np.int64))


@pytest.mark.parametrize("impl", ["auto", "closed_form", "lax"])
def test_integer_conv_is_exact_in_the_input_dtype(impl):
    rng = np.random.default_rng(5)
    x = rng.integers(-1000, 1000, (2, 3, 6, 5)).astype(np.int32)
    w = rng.integers(-1000, 1000, (4, 3, 3, 2)).astype(np.int32)
    got = conv(x, w, jnp.arange(4, dtype=jnp.int32), layout="NCHW", impl=impl)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, _reference_conv_nchw(x, w) + np.arange(4).reshape(1, 4, 1, 1))
    nhwc = conv(np.moveaxis(x, 1, -1), np.transpose(w, (2, 3, 1, 0)), impl=impl)
    np.testing.assert_array_equal(nhwc, np.moveaxis(_reference_conv_nchw(x, w), 1, -1))


X4 = np.zeros((1, 5, 5, 4), np.float32)
W4 = np.zeros((3, 3, 4, 6), np.float32)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: conv(np.zeros((8,)), W4),
            ValueError,
            r"conv: x must be \(N, H, W, C\) or \(H, W, C\) for a 2-D kernel, got shape \(8,\)",
        ),
        (lambda: conv(np.zeros((1, 5, 5, 5, 5, 4)), W4), ValueError, r"or \(H, W, C\) for a 2-D kernel"),
        (lambda: conv(X4, W4[0]), ValueError, r"conv: x must be \(N, W, C\) or \(W, C\) for a 1-D kernel"),
        (lambda: conv(X4, W4[0, 0]), ValueError, "conv: kernel must have rank 3 to 5"),
        (lambda: conv(X4, W4, layout="NCW"), ValueError, "conv: layout='NCW' names 1 spatial dims, but kernel of"),
        (
            lambda: conv(X4.astype(np.int32), W4.astype(np.int32), np.zeros(6)),
            TypeError,
            "conv: bias of dtype float32 cannot be added to a conv of dtype int32",
        ),
        (lambda: conv(X4, W4, np.zeros(6, np.complex64)), TypeError, "bias of dtype complex64 cannot be added"),
        (lambda: conv(X4, np.zeros((3, 3, 3, 6))), ValueError, "kernel has 3 input channels but x has C_in=4"),
        (lambda: conv(X4, W4, feature_group_count=3), ValueError, "feature_group_count=3 must divide C_in=4"),
        (
            lambda: conv(X4, np.zeros((3, 3, 2, 5)), feature_group_count=2),
            ValueError,
            "feature_group_count=2 must divide C_out=5",
        ),
        (lambda: conv(X4, np.zeros((6, 3, 4, 6))), ValueError, "along spatial dim 0.*larger than the padded input 5"),
        (lambda: conv(X4, W4, kernel_dilation=3), ValueError, "along spatial dim 0.*dilated kernel_size=7"),
        (lambda: conv(X4, W4, strides=0), ValueError, "conv: strides=0 must be >= 1"),
        (lambda: conv(X4, W4, strides=(1, 0)), ValueError, "conv: strides=0 must be >= 1"),
        (lambda: conv(X4, W4, kernel_dilation=(0, 1)), ValueError, "conv: kernel_dilation=0 must be >= 1"),
        (lambda: conv(X4, W4, input_dilation=0), ValueError, "conv: input_dilation=0 must be >= 1"),
        (lambda: conv(X4, W4, strides=(1, 1, 1)), ValueError, "one entry per spatial dim"),
        (lambda: conv(X4, W4, padding="HALF"), ValueError, "conv: padding='HALF' is not one of"),
        (lambda: conv(X4, W4, padding=-1), ValueError, "padding=-1 must be >= 0"),
        (lambda: conv(X4, W4, padding_mode="mirror"), ValueError, "conv: padding_mode='mirror' is not one of"),
        (lambda: conv(X4, W4, layout="HWNC"), ValueError, "conv: layout='HWNC' is not one of"),
        (lambda: conv(X4, W4, impl="manual"), ValueError, "conv: impl='manual' is not one of"),
        (
            lambda: conv(X4, W4, np.zeros(5)),
            ValueError,
            r"conv: bias must have shape \(C_out,\) = \(6,\), got shape \(5,\)",
        ),
        (lambda: conv(X4, W4, np.zeros(1)), ValueError, r"bias must have shape \(C_out,\) = \(6,\), got shape \(1,\)"),
        (lambda: conv(X4, W4, np.zeros((1, 6))), ValueError, r"got shape \(1, 6\)"),
        (lambda: conv(X4, W4, feature_group_count=1.5), TypeError, "feature_group_count must be an int"),
        (
            lambda: conv(X4, W4, padding=5, padding_mode="reflect"),
            ValueError,
            r"padding_mode='reflect' needs padding < input size, got padding=\(5, 5\) for size 5",
        ),
        (lambda: conv(X4, W4, padding=6, padding_mode="circular"), ValueError, "needs padding <= input size"),
        (
            lambda: conv(X4, W4, padding=1, padding_mode="reflect", input_dilation=2),
            NotImplementedError,
            "padding_mode='reflect' with input_dilation",
        ),
        (lambda: conv_transpose(X4, W4), ValueError, "conv_transpose: kernel axis 3 has size 6 but x has C_in=4"),
        (
            lambda: conv_transpose(X4, np.zeros((3, 3, 2, 4)), feature_group_count=3),
            ValueError,
            "conv_transpose: feature_group_count=3 must divide C_in=4",
        ),
        (
            lambda: conv_transpose(X4, np.zeros((3, 3, 2, 4)), strides=2, output_padding=2),
            ValueError,
            "output_padding=2 must be smaller than stride=2 or dilation=1",
        ),
        (lambda: conv_transpose(X4, np.zeros((1, 1, 2, 4)), padding=3), ValueError, "output of size -1 < 1"),
        (
            lambda: conv_transpose(X4, np.zeros((3, 3, 2, 4)), np.zeros(4)),
            ValueError,
            r"bias must have shape \(C_out,\) = \(2,\)",
        ),
        (
            lambda: depthwise_conv(X4, np.zeros((3, 3, 4, 4))),
            ValueError,
            r"depthwise_conv: kernel must be \(\*window, 1, C_in \* multiplier\)",
        ),
        (lambda: depthwise_conv(X4, np.zeros((3, 3, 1, 6))), ValueError, "with C_in=4, got shape"),
        (
            lambda: separable_conv(X4, np.zeros((3, 3, 1, 8)), np.zeros((3, 3, 8, 2))),
            ValueError,
            "separable_conv: pointwise_kernel must be a 1x1 kernel",
        ),
        (lambda: separable_conv(X4, np.zeros((3, 3, 1, 8)), np.zeros((1, 1, 4, 2))), ValueError, "C_mid=8"),
        (
            lambda: spatially_separable_conv(X4, np.zeros((3, 3, 4, 4)), np.zeros((1, 3, 4, 4))),
            ValueError,
            r"column_kernel must have a \(kh, 1\) window",
        ),
        (
            lambda: spatially_separable_conv(X4, np.zeros((3, 1, 4, 4)), np.zeros((3, 1, 4, 4))),
            ValueError,
            r"row_kernel must have a \(1, kw\) window",
        ),
        (
            lambda: spatially_separable_conv(np.zeros((1, 5, 4)), np.zeros((3, 4, 4)), np.zeros((3, 4, 4))),
            ValueError,
            r"spatially_separable_conv: column_kernel must have rank 4 \(a 2-D kernel\)",
        ),
        (
            lambda: separable_conv(X4, np.zeros((3, 3, 1, 8)), np.zeros((1, 8, 2))),
            ValueError,
            r"separable_conv: pointwise_kernel must have rank 4",
        ),
        (lambda: corr2d(np.zeros((1, 3, 3)), np.zeros((2, 2))), ValueError, r"corr2d: x must be a 2-D array"),
        (lambda: corr2d(np.zeros((3, 3)), np.zeros((4, 2))), ValueError, "corr2d: along spatial dim 0"),
        (lambda: convolve2d(np.zeros((3, 3)), np.zeros((2, 2)), mode="SAME"), ValueError, "convolve2d: mode='SAME'"),
        (
            lambda: convolve2d(np.zeros((3, 5)), np.zeros((4, 2)), mode="valid"),
            ValueError,
            "must be at least as large as the other",
        ),
        (lambda: rank1_factors(np.zeros((3,))), ValueError, "rank1_factors: kernel_2d must be a 2-D array"),
    ],
)
def test_bad_input_raises_a_clear_error_before_lax(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_error_messages_name_op_argument_and_value():
    with pytest.raises(ValueError) as info:
        conv(X4, np.zeros((3, 3, 3, 6)))
    text = str(info.value)
    assert text.startswith("conv: ")
    assert all(part in text for part in ("C_in=4", "feature_group_count=1", "(3, 3, 3, 6)", "HWIO"))
    assert re.search(r"needs C_in // feature_group_count = 4", text)
