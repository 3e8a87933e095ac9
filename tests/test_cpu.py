"""cnnjax._cpu: every XLA:CPU schedule equals its formula, and falls back to it past its limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnnjax import _cpu, backprop
from cnnjax._canon import ConvGeometry, Layout, canonicalize_tuple, pool_geometry
from cnnjax.convolution import conv, depthwise_conv
from cnnjax.pooling import avg_pool, max_pool


def assert_close(actual, expected, rtol=2e-5):
    """float32 agreement, scaled by the reference's magnitude."""
    expected = np.asarray(expected, np.float64)
    atol = rtol * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# Products of more than _cpu._SLAB_SIZE elements are summed in slabs before the reduction; odd
# sizes leave a short last slab, padded with zeros. A smaller slab size makes these (and CI)
# small: 16 slabs, 3 along the batch and 5 of 13 rows (the last one short) along the height. The
# taps' slab sums are joined (padded to one shape) up to _cpu._JOIN_SIZE elements: all nine taps,
# each alone (built in halves), or groups of four (13,104-element slabs; the last group alone).
@pytest.mark.parametrize(
    "layout, groups, cig, cog, strides, join",
    [
        ("NHWC", 16, 1, 1, 1, 1 << 20),
        ("NHWC", 8, 1, 2, 2, 1 << 12),
        ("NCHW", 16, 1, 1, 1, 60_000),
        ("NCHW", 8, 2, 1, 2, 1 << 20),
    ],
)
def test_depthwise_kernel_grad_in_slabs_equals_autodiff(layout, groups, cig, cog, strides, join, monkeypatch):
    monkeypatch.setattr(_cpu, "_SLAB_SIZE", 1 << 12)
    monkeypatch.setattr(_cpu, "_JOIN_SIZE", join)
    jax.clear_caches()  # programs compiled with the default slab size
    lay = Layout(layout == "NHWC", 2)
    rng = np.random.default_rng(groups + cig + cog + strides)
    x = jnp.asarray(rng.normal(size=lay.shape(3 * strides**2, (61, 63), groups * cig)), jnp.float32)
    kshape = (3, 3, cig, groups * cog) if lay.channels_last else (groups * cog, cig, 3, 3)
    kernel = jnp.asarray(rng.normal(size=kshape), jnp.float32)
    geometry = {"strides": (strides,) * 2, "padding": 1, "feature_group_count": groups, "layout": layout}
    y, vjp = jax.vjp(lambda x, k: conv(x, k, **geometry, impl="lax"), x, kernel)
    assert y.size * cig > _cpu._SLAB_TERMS * _cpu._SLAB_SIZE  # the slab path, all 16 slabs
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    dx_ref, dk_ref = vjp(dy)
    y_closed, vjp_closed = jax.vjp(lambda x, k: conv(x, k, **geometry, impl="auto"), x, kernel)
    dx, dk = vjp_closed(dy)
    assert_close(y_closed, y)
    assert_close(dx, dx_ref)
    assert_close(dk, dk_ref, rtol=1e-4)  # sums of 6,000 products in another order


# Past _MAX_UNROLLED_KERNEL_GRAD_TAPS taps the depthwise kernel gradient loops over the taps
# (a dynamic slice of a padded copy per tap): every padding, stride and dilation, one or several
# channels per group, both layouts, and taps that meet only padding.
@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NWC"])
@pytest.mark.parametrize(
    "cig, cog, strides, padding, dilation",
    [(1, 1, 1, "SAME", 1), (1, 2, 2, ((3, 1), (0, 2)), 1), (2, 1, (1, 2), 1, 2), (1, 1, 3, ((6, 6), (6, 6)), 1)],
)
def test_depthwise_kernel_grad_looped_over_taps_equals_autodiff(layout, cig, cog, strides, padding, dilation):
    rank = len(layout) - 2
    lay = Layout(layout.endswith("C"), rank)
    window, size = ((4, 5), (9, 10)) if rank == 2 else ((11,), (24,))
    assert np.prod(window) > _cpu._MAX_UNROLLED_KERNEL_GRAD_TAPS  # the loop runs
    padding = padding[:rank] if isinstance(padding, tuple) else padding
    strides = strides[:rank] if isinstance(strides, tuple) else strides
    rng = np.random.default_rng(cig + 2 * cog)
    groups = 3
    x = jnp.asarray(rng.normal(size=lay.shape(2, size, groups * cig)), jnp.float32)
    kshape = (*window, cig, groups * cog) if lay.channels_last else (groups * cog, cig, *window)
    kernel = jnp.asarray(rng.normal(size=kshape), jnp.float32)
    geometry = {"strides": strides, "padding": padding, "kernel_dilation": dilation, "feature_group_count": groups}
    y, vjp = jax.vjp(lambda x, k: conv(x, k, **geometry, layout=layout, impl="lax"), x, kernel)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    _, vjp_auto = jax.vjp(lambda x, k: conv(x, k, **geometry, layout=layout, impl="auto"), x, kernel)
    assert_close(vjp_auto(dy)[1], vjp(dy)[1])


# Few input channels: the input gradient folds the last axis's taps (every axis's, with one
# channel) into the channels; the leading axes need stride 1, else the phase form runs.
@pytest.mark.parametrize("layout", ["NWC", "NCW", "NHWC", "NCHW", "NDHWC", "NCDHW"])
@pytest.mark.parametrize("cin, strides, dilation", [(1, 2, 1), (3, 1, 2), (3, "last", 1), (5, 2, 1)])
def test_conv_input_grad_with_few_input_channels_equals_autodiff(layout, cin, strides, dilation):
    rank = len(layout) - 2
    lay = Layout(layout.endswith("C"), rank)
    strides = (1,) * (rank - 1) + (2,) if strides == "last" else strides  # stride 2 on the folded axis
    rng = np.random.default_rng(cin * rank)
    x = jnp.asarray(rng.normal(size=lay.shape(2, (9, 8, 7)[:rank], cin)), jnp.float32)
    window = (3, 2, 3)[:rank]
    kernel = jnp.asarray(rng.normal(size=(*window, cin, 4) if lay.channels_last else (4, cin, *window)), jnp.float32)
    geometry = {"strides": strides, "padding": ((1, 2),) * rank, "kernel_dilation": dilation, "layout": layout}
    y, vjp = jax.vjp(lambda x: conv(x, kernel, **geometry, impl="lax"), x)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    g = ConvGeometry(
        lay,
        lay.spatial(x.shape),
        window,
        canonicalize_tuple(strides, rank, "strides", "test"),
        ((1, 2),) * rank,
        (dilation,) * rank,
    )
    assert_close(jax.jit(lambda dy, k: _cpu.input_grad(dy, k, g))(dy, kernel), vjp(dy)[0])


# A padded per-tap conv is its interior (slices of x) padded with zeros, with each border strip
# correlated from its own few padded input rows and written over that; without padding, or with
# no interior, it is one sum over a padded copy. Every form equals XLA's convolution.
@pytest.mark.parametrize("layout", ["NWC", "NCW", "NHWC", "NCHW", "NDHWC", "NCDHW"])
@pytest.mark.parametrize(
    "groups, cig, cog, strides, padding, dilation",
    [
        (4, 1, 1, 1, ((1, 1),), 1),  # depthwise "same"
        (4, 1, 2, 2, ((2, 1),), 1),  # channel multiplier, stride, uneven padding
        (2, 2, 1, 1, ((3, 0),), 2),  # two channels per group, dilation, one-sided padding
        (1, 1, 3, 2, ((1, 2),), 1),  # one input channel (LeNet's first layer)
        (3, 1, 1, 1, ((-1, 2),), 1),  # a crop on one side, padding on the other
        (3, 1, 1, 1, ((0, 0),), 1),  # no border: built in halves
        (3, 1, 1, 1, ((4, 4),), 5),  # no interior: the dilated window is wider than x
        (3, 1, 1, 3, ((0, 3),), 1),  # a border strip that reads only padding
    ],
)
def test_unrolled_correlate_equals_xla(layout, groups, cig, cog, strides, padding, dilation):
    rank = len(layout) - 2
    lay = Layout(layout.endswith("C"), rank)
    rng = np.random.default_rng(groups * cig * cog + rank)
    x = jnp.asarray(rng.normal(size=lay.shape(2, (9, 8, 7)[:rank], groups * cig)), jnp.float32)
    window = (3, 2, 3)[:rank]
    kshape = (*window, cig, groups * cog) if lay.channels_last else (groups * cog, cig, *window)
    kernel = jnp.asarray(rng.normal(size=kshape), jnp.float32)
    geometry = ((strides,) * rank, padding * rank, (dilation,) * rank, groups, lay)
    expected = lax.conv_general_dilated(
        x,
        kernel,
        geometry[0],
        geometry[1],
        rhs_dilation=geometry[2],
        dimension_numbers=lay.dimension_numbers,
        feature_group_count=groups,
        precision="highest",
    )
    for buffered in (True, False):
        assert_close(
            jax.jit(lambda x, k, b=buffered: _cpu._unrolled_correlate(x, k, *geometry, b))(x, kernel), expected
        )


def test_in_halves_survives_xla():
    # the concatenate that makes XLA write a result to memory must not be optimized away
    hlo = jax.jit(lambda a: jnp.sum(_cpu._in_halves(lambda lo, hi: jnp.sin(a[:, lo:hi]), 64) ** 2))
    assert "concatenate" in hlo.lower(jnp.ones((64, 64))).compile().as_text()


# ---------------------------------------------------------------------------------------------
# Max pooling: padding never wins, not even a tie against a real -inf.


@pytest.mark.parametrize("impl", ["auto", "closed_form"])
@pytest.mark.parametrize("layout", ["NWC", "NCW", "NHWC", "NCHW"])
def test_padding_never_wins_a_tie_against_minus_inf(layout, impl):
    rank = len(layout) - 2
    lay = Layout(layout.endswith("C"), rank)
    x = jnp.full(lay.shape(1, (4,) * rank, 2), -jnp.inf)
    y, pullback = jax.vjp(lambda x: max_pool(x, 3, 2, 1, layout=layout, impl=impl), x)
    assert np.all(np.isneginf(y))
    dx = pullback(jnp.ones_like(y))[0]
    # every gradient reaches a real element: the first real one of each window
    assert float(jnp.sum(dx)) == y.size
    # windows start at -1 and 1 along each dim: their first real elements are 0 and 1
    expected = np.zeros((4,) * rank)
    for j in np.ndindex(*(2,) * rank):
        expected[tuple(max(2 * i - 1, 0) for i in j)] += 1
    got = dx[0, ..., 0] if lay.channels_last else dx[0, 0]
    np.testing.assert_array_equal(got, expected)


def test_first_real_taps_are_static_and_sparse():
    g = pool_geometry("test", (1, 5, 5, 1), Layout(True, 2), 3, 2, 1, 1, False)
    masks = _cpu._first_real_taps(g)
    assert sorted(masks) == [1, 3, 4]  # (-1,-1) is padding for output (0, 0): its first real tap is (0, 0)
    assert masks[4][0, 0, 0, 0] and not masks[4][0, 1, 1, 0]


# ---------------------------------------------------------------------------------------------
# Limits: past them, the plain formula (compile time bounded, symbolic and empty batches).


def _hlo(f, *args):
    return jax.jit(f).lower(*args).as_text()


def test_large_windows_fall_back_to_the_formulas():
    x = jnp.ones((1, 16, 16, 4))
    big = jnp.ones((9, 9, 1, 4))  # 81 taps > _MAX_UNROLLED_TAPS
    small = jnp.ones((3, 3, 1, 4))
    assert _hlo(lambda x, k: depthwise_conv(x, k, padding="SAME"), x, big).count("convolution(") == 1
    assert _hlo(lambda x, k: depthwise_conv(x, k, padding="SAME"), x, small).count("convolution(") == 0
    assert "reduce_window" in _hlo(lambda x: max_pool(x, 9, 1, 4), x)
    assert "reduce_window" not in _hlo(lambda x: max_pool(x, 3, 1, 1), x)


# A dense conv's gradients are not unrolled over the taps (batch chunks for the kernel, stride
# phases for the input), so ResNet's 7x7/2 stem keeps both schedules past _MAX_UNROLLED_TAPS (XLA's
# own gradients of that stem: 4-5x slower).
def test_dense_conv_grads_keep_their_schedules_past_the_tap_limit(monkeypatch):
    monkeypatch.setattr(_cpu, "_KERNEL_GRAD_UNCHUNKED_BYTES", 0)
    monkeypatch.setattr(_cpu, "_KERNEL_GRAD_CHUNK_POSITIONS", 1)  # one image per chunk
    jax.clear_caches()
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(4, 20, 20, 8)), jnp.float32)  # 8 channels: not folded
    k = jnp.asarray(rng.normal(size=(7, 7, 8, 5)), jnp.float32)  # 49 taps > _MAX_UNROLLED_TAPS

    def grad(impl):
        return jax.grad(lambda x, k: jnp.sum(conv(x, k, strides=2, padding=3, impl=impl) ** 2), argnums=(0, 1))

    # the forward, a kernel gradient per image, an input gradient per stride phase
    assert _hlo(grad("auto"), x, k).count("convolution(") == 1 + 4 + 4
    assert _hlo(grad("lax"), x, k).count("convolution(") == 3
    for auto, lax_ in zip(jax.jit(grad("auto"))(x, k), jax.jit(grad("lax"))(x, k), strict=True):
        assert_close(auto, lax_)
    jax.clear_caches()  # programs compiled with the patched chunks


def test_schedules_only_take_float32():
    x, k = jnp.ones((1, 8, 8, 4), jnp.bfloat16), jnp.ones((3, 3, 1, 4), jnp.bfloat16)
    assert _hlo(lambda x, k: depthwise_conv(x, k, padding="SAME"), x, k).count("convolution(") == 1


@pytest.mark.parametrize("op", ["conv", "depthwise", "max_pool", "avg_pool"])
def test_empty_batch_gives_zero_gradients(op):
    x = jnp.ones((0, 6, 6, 4))
    if op == "conv":
        f = lambda x, k: conv(x, k, strides=2, padding=1)
        k = jnp.ones((3, 3, 4, 2))
    elif op == "depthwise":
        f = lambda x, k: depthwise_conv(x, k, padding=1)
        k = jnp.ones((3, 3, 1, 4))
    else:
        pool = max_pool if op == "max_pool" else avg_pool
        f = lambda x, k: pool(x, 3, 2, 1) * jnp.sum(k)
        k = jnp.ones(())
    y = f(x, k)
    assert y.shape[0] == 0
    dx, dk = jax.grad(lambda x, k: jnp.sum(f(x, k)), argnums=(0, 1))(x, k)
    assert dx.shape == x.shape and dk.shape == k.shape and not np.any(dk)


def test_kernel_grad_formula_of_an_empty_batch_is_zero():
    g = ConvGeometry(Layout(True, 2), (4, 4), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1))
    dk = backprop.kernel_grad(jnp.ones((0, 4, 4, 2)), jnp.ones((0, 4, 4, 3)), g)
    np.testing.assert_array_equal(dk, np.zeros((3, 3, 2, 3)))
