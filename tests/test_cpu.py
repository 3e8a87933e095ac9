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


def _geometry(lay, x_shape, window, strides, padding, dilation=1, groups=1):
    rank = lay.spatial_rank
    pads = padding if isinstance(padding, tuple) else ((padding, padding),) * rank
    tup = lambda v, name: canonicalize_tuple(v, rank, name, "test")
    return ConvGeometry(lay, lay.spatial(x_shape), window, tup(strides, "strides"), pads, tup(dilation, "d"), groups)


# Products of more than Limits.slab_size elements are summed in slabs before the reduction; odd
# sizes leave a short last slab, padded with zeros. A smaller slab size makes these (and CI)
# small: 16 slabs, 3 along the batch and 5 of 13 rows (the last one short) along the height. The
# taps' slab sums are joined (padded to one shape) up to Limits.join_size elements: all nine taps,
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
def test_depthwise_kernel_grad_in_slabs_equals_autodiff(layout, groups, cig, cog, strides, join):
    limits = _cpu.Limits(slab_size=1 << 12, join_size=join)
    lay = Layout(layout == "NHWC", 2)
    rng = np.random.default_rng(groups + cig + cog + strides)
    x = jnp.asarray(rng.normal(size=lay.shape(3 * strides**2, (61, 63), groups * cig)), jnp.float32)
    kshape = (3, 3, cig, groups * cog) if lay.channels_last else (groups * cog, cig, 3, 3)
    kernel = jnp.asarray(rng.normal(size=kshape), jnp.float32)
    geometry = {"strides": (strides,) * 2, "padding": 1, "feature_group_count": groups, "layout": layout}
    y, vjp = jax.vjp(lambda k: conv(x, k, **geometry, impl="lax"), kernel)
    assert y.size * cig > limits.slab_terms * limits.slab_size  # the slab path, all 16 slabs
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    g = _geometry(lay, x.shape, (3, 3), strides, 1, groups=groups)
    assert _cpu.plan("kernel_grad", g, x, dy, limits=limits).tactic == "per_tap"
    dk = jax.jit(lambda x, dy: _cpu.kernel_grad(x, dy, g, limits=limits))(x, dy)
    assert_close(dk, vjp(dy)[0], rtol=1e-4)  # sums of 6,000 products in another order


# Past Limits.unrolled_kernel_grad_taps taps the depthwise kernel gradient loops over the taps
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
    g = _geometry(lay, x.shape, window, strides, 0, dilation, groups)  # the plan does not read padding
    assert _cpu.plan("kernel_grad", g, x, dy).tactic == "tap_loop"  # the loop runs
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
    lay = Layout(True, 2)
    x, f32 = jax.ShapeDtypeStruct((1, 16, 16, 4), "float32"), jax.ShapeDtypeStruct
    for window, tactic in [((9, 9), "formula"), ((3, 3), "per_tap")]:  # 81 taps > Limits.unrolled_taps
        g = _geometry(lay, x.shape, window, 1, window[0] // 2, groups=4)
        assert _cpu.plan("correlate", g, x, f32((*window, 1, 4), "float32")).tactic == tactic
    for window, tactic in [(9, "formula"), (3, "fold")]:
        w = pool_geometry("test", x.shape, lay, window, 1, window // 2, 1, False)
        assert _cpu.plan("window_max", w, x).tactic == tactic
    # and the lowering follows the plan
    hlo = _hlo(lambda x, k: depthwise_conv(x, k, padding="SAME"), jnp.ones(x.shape), jnp.ones((9, 9, 1, 4)))
    assert hlo.count("convolution(") == 1
    assert "reduce_window" in _hlo(lambda x: max_pool(x, 9, 1, 4), jnp.ones(x.shape))


# A dense conv's gradients are not unrolled over the taps (batch chunks for the kernel, stride
# phases for the input), so ResNet's 7x7/2 stem keeps both schedules past Limits.unrolled_taps
# (XLA's own gradients of that stem: 4-5x slower).
def test_dense_conv_grads_keep_their_schedules_past_the_tap_limit():
    limits = _cpu.Limits(kernel_grad_unchunked_bytes=0, kernel_grad_chunk_positions=1)  # one image per chunk
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(4, 20, 20, 8)), jnp.float32)  # 8 channels: not folded
    k = jnp.asarray(rng.normal(size=(7, 7, 8, 5)), jnp.float32)  # 49 taps > Limits.unrolled_taps
    y, vjp = jax.vjp(lambda x, k: conv(x, k, strides=2, padding=3, impl="lax"), x, k)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    g = _geometry(Layout(True, 2), x.shape, (7, 7), 2, 3)
    assert _cpu.plan("kernel_grad", g, x, dy, limits=limits) == _cpu.Plan("chunks", 1)
    assert _cpu.plan("kernel_grad", g, x, dy) == _cpu.Plan("chunks", 4)  # under 1 MiB: one piece
    assert _cpu.plan("input_grad", g, dy, k).tactic == "phases"
    dx_ref, dk_ref = vjp(dy)
    assert_close(jax.jit(lambda dy, k: _cpu.input_grad(dy, k, g))(dy, k), dx_ref)
    dk = jax.jit(lambda x, dy: _cpu.kernel_grad(x, dy, g, limits=limits))
    assert_close(dk(x, dy), dk_ref)
    assert _hlo(lambda x, dy: _cpu.kernel_grad(x, dy, g, limits=limits), x, dy).count("convolution(") == 4


def test_plans_of_the_table():
    lay, f32 = Layout(True, 2), lambda *shape: jax.ShapeDtypeStruct(shape, "float32")
    g1 = _geometry(lay, (8, 28, 28, 1), (5, 5), 1, 0)
    assert _cpu.plan("correlate", g1, f32(8, 28, 28, 1), f32(5, 5, 1, 6)).tactic == "per_tap"  # one channel
    assert _cpu.plan("input_grad", g1, f32(8, 24, 24, 6), f32(5, 5, 1, 6)).tactic == "folded"
    dense = _geometry(lay, (8, 14, 14, 16), (1, 1), 1, 0)
    assert _cpu.plan("correlate", dense, f32(8, 14, 14, 16), f32(1, 1, 16, 32)).tactic == "matmul"
    assert _cpu.plan("kernel_grad", dense, f32(8, 14, 14, 16), f32(8, 14, 14, 32)).tactic == "matmul"
    grouped = _geometry(lay, (8, 14, 14, 64), (3, 3), 1, 1, groups=2)
    assert _cpu.plan("correlate", grouped, f32(8, 14, 14, 64), f32(3, 3, 32, 64)).tactic == "per_group"
    assert _cpu.plan("kernel_grad", grouped, f32(8, 14, 14, 64), f32(8, 14, 14, 64)).tactic == "per_group"
    w = pool_geometry("test", (8, 14, 14, 4), lay, 2, 2, 0, 1, False)
    assert _cpu.plan("window_sum_transpose", w, f32(8, 7, 7, 4)).tactic == "write_back"
    with pytest.raises(ValueError, match="plan: op must be one of"):
        _cpu.plan("conv", g1, f32(8, 28, 28, 1), f32(5, 5, 1, 6))


def test_schedules_only_take_float32():
    g = _geometry(Layout(True, 2), (1, 8, 8, 4), (3, 3), 1, 1, groups=4)
    x, k = jnp.ones((1, 8, 8, 4), jnp.bfloat16), jnp.ones((3, 3, 1, 4), jnp.bfloat16)
    assert _cpu.plan("correlate", g, x, k).tactic == "formula"
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
