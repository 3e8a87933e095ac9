"""cnnjax.pooling: hand-computed values, NumPy references, tie rules, transforms, dtypes, errors."""

import functools
import itertools
import math

import budget
import jax
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax import numpy as jnp
from jax.test_util import check_grads

from cnnjax.pooling import (
    adaptive_avg_pool,
    adaptive_max_pool,
    adaptive_max_pool_with_indices,
    avg_pool,
    global_avg_pool,
    global_max_pool,
    lp_pool,
    max_pool,
    max_pool_with_indices,
    max_unpool,
    min_pool,
    spatial_pyramid_pool,
    sum_pool,
)
from cnnjax.shapes import pool_output_size, resolve_padding

ARANGE_4X4 = jnp.arange(16.0).reshape(1, 4, 4, 1)


def _line(values, dtype=jnp.float32):
    """A 1-D NWC input (1, n, 1)."""
    return jnp.asarray(values, dtype).reshape(1, -1, 1)


def _flat(y):
    return np.asarray(y).reshape(-1)


# --- NumPy references (NCHW, one plane at a time) ---------------------------------------------


def _window_positions(sizes, window, strides, pads, dilation, ceil_mode):
    """For each output index, the in-input positions of its window taps in scan order (None: padding)."""
    out = [
        pool_output_size(n, w, s, p, d, ceil_mode)
        for n, w, s, p, d in zip(sizes, window, strides, pads, dilation, strict=True)
    ]
    for index in itertools.product(*map(range, out)):
        taps = []
        for offset in itertools.product(*map(range, window)):
            pos = tuple(
                i * s - lo + o * d for i, s, (lo, _), o, d in zip(index, strides, pads, offset, dilation, strict=True)
            )
            padded_end = [n + hi for n, (_, hi) in zip(sizes, pads, strict=True)]
            if any(p >= e for p, e in zip(pos, padded_end, strict=True)):
                continue  # ceil_mode overhang past the padding: no tap at all
            inside = all(0 <= p < n for p, n in zip(pos, sizes, strict=True))
            taps.append(pos if inside else None)
        yield index, taps


def _reference_pool(x, reduce, fill, window, strides, pads, dilation=None, ceil_mode=False):
    """``reduce`` over each window of the (N, C, *spatial) array ``x`` padded with ``fill``."""
    sizes = x.shape[2:]
    dilation = dilation or (1,) * len(sizes)
    positions = list(_window_positions(sizes, window, strides, pads, dilation, ceil_mode))
    out_shape = tuple(max(i[d] for i, _ in positions) + 1 for d in range(len(sizes)))
    y = np.zeros(x.shape[:2] + out_shape, x.dtype)
    for n, c in np.ndindex(*x.shape[:2]):
        for index, taps in positions:
            y[(n, c, *index)] = reduce([fill if t is None else x[(n, c, *t)] for t in taps])
    return y


def _reference_first_max_grad(x, dy, window, strides, pads, dilation=None, ceil_mode=False, lowest=True):
    """Each output's gradient to the first extreme of its window in scan order (XLA's rule)."""
    sizes = x.shape[2:]
    dilation = dilation or (1,) * len(sizes)
    better = np.greater if lowest else np.less
    dx = np.zeros_like(x)
    for n, c in np.ndindex(*x.shape[:2]):
        for index, taps in _window_positions(sizes, window, strides, pads, dilation, ceil_mode):
            best = None
            for t in taps:
                if t is not None and (best is None or better(x[(n, c, *t)], x[(n, c, *best)])):
                    best = t
            dx[(n, c, *best)] += dy[(n, c, *index)]
    return dx


# --- hand-computed values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "pool,expected",
    [
        (max_pool, [[5, 7], [13, 15]]),
        (min_pool, [[0, 2], [8, 10]]),
        (sum_pool, [[10, 18], [42, 50]]),
        (avg_pool, [[2.5, 4.5], [10.5, 12.5]]),
        (functools.partial(lp_pool, p=1), [[10, 18], [42, 50]]),
    ],
)
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_arange_2x2_pools(pool, expected, layout):
    y = pool(ARANGE_4X4.reshape((1, 1, 4, 4) if layout == "NCHW" else (1, 4, 4, 1)), window_shape=2, layout=layout)
    np.testing.assert_allclose(y.reshape(2, 2), expected)


def test_strides_default_to_window_and_overlap_otherwise():
    np.testing.assert_array_equal(max_pool(ARANGE_4X4, 3)[0, ..., 0], [[10]])
    np.testing.assert_array_equal(max_pool(ARANGE_4X4, 3, 1)[0, ..., 0], [[10, 11], [14, 15]])
    np.testing.assert_array_equal(max_pool(ARANGE_4X4, (2, 3), (2, 1))[0, ..., 0], [[6, 7], [14, 15]])


@pytest.mark.parametrize(
    "padding,expected_max,expected_sum",
    [
        ("VALID", [1, 2, 3], [1, 3, 5]),
        ("SAME", [1, 2, 3, 3], [1, 3, 5, 3]),  # (0, 1): the extra pixel at the end
        ("same_lower", [0, 1, 2, 3], [0, 1, 3, 5]),  # (1, 0): at the start, as in the notes
        ("FULL", [0, 1, 2, 3, 3], [0, 1, 3, 5, 3]),
        (1, [0, 1, 2, 3, 3], [0, 1, 3, 5, 3]),
        ([(0, 1)], [1, 2, 3, 3], [1, 3, 5, 3]),
        ([(1, 0)], [0, 1, 2, 3], [0, 1, 3, 5]),
    ],
)
def test_padding_forms(padding, expected_max, expected_sum):
    """Window 2, stride 1 over [0, 1, 2, 3]: max pads with -inf, sum with 0."""
    x = _line([0, 1, 2, 3])
    np.testing.assert_array_equal(_flat(max_pool(x, 2, 1, padding, layout="NWC")), expected_max)
    np.testing.assert_array_equal(_flat(sum_pool(x, 2, 1, padding, layout="NWC")), expected_sum)


@pytest.mark.parametrize(
    "pool,args,kwargs",
    [
        (max_pool, (2, 1, [2]), {}),  # the first and last windows lie wholly in the padding
        (sum_pool, (2, 2, [(0, 2)]), {}),  # floor mode keeps a window starting in the right padding
        (avg_pool, (2, 50, 4), {}),  # PyTorch's avg_pool1d error sample: its only window is padding
        (max_pool_with_indices, (2, 1, 2), {"window_dilation": 5}),  # taps -2, 3 skip over the input
    ],
)
def test_padding_that_leaves_a_window_without_input_raises(pool, args, kwargs):
    """Every window must hold an input element (PyTorch caps padding at half the window for the
    same reason, more strictly: cnnjax takes any padding that keeps every window real)."""
    with pytest.raises(ValueError, match=r"leaves window \d+ with no input element, only padding"):
        pool(_line([0.0, 1.0, 2.0, 3.0]), *args, **kwargs)


def test_padding_never_wins_the_max_or_min():
    x = -1.0 - ARANGE_4X4
    y = max_pool(x, 3, 1, 1)
    assert np.all(np.isfinite(y)) and np.all(y < 0)
    np.testing.assert_array_equal(min_pool(-x, 3, 1, 1), -y)
    ints = jnp.full((1, 3, 3, 1), -100, jnp.int8)
    np.testing.assert_array_equal(max_pool(ints, 3, 1, "SAME"), ints)
    np.testing.assert_array_equal(min_pool(-ints, 3, 1, "SAME"), -ints)


def test_window_dilation_values():
    x = _line(range(7))
    np.testing.assert_array_equal(_flat(max_pool(x, 2, 1, window_dilation=3)), [3, 4, 5, 6])
    np.testing.assert_array_equal(_flat(min_pool(x, 2, 1, window_dilation=3)), [0, 1, 2, 3])
    np.testing.assert_array_equal(_flat(sum_pool(x, 2, 1, window_dilation=3)), [3, 5, 7, 9])


def _lax_dilated_mean(x, window, strides, pads, dilation, count_include_pad):
    """lax's reduce_window sums over the dilated windows (NHWC), divided by the taps counted as
    PyTorch counts them: inside the padded input, or inside the input."""
    dims, steps, rates = (1, *window, 1), (1, *strides, 1), (1, *dilation, 1)
    padding = ((0, 0), *pads, (0, 0))
    window_sum = functools.partial(
        jax.lax.reduce_window,
        init_value=0.0,
        computation=jax.lax.add,
        window_dimensions=dims,
        window_strides=steps,
        window_dilation=rates,
    )
    ones = jnp.ones_like(x)
    count = (
        window_sum(jnp.pad(ones, padding, constant_values=1), padding="VALID")
        if count_include_pad
        else window_sum(ones, padding=padding)
    )
    return window_sum(x, padding=padding) / count


DILATED_MEANS = [
    # (window, strides, padding pairs, dilation)
    ((2, 2), (1, 1), ((0, 0), (0, 0)), (2, 2)),
    ((3, 2), (2, 1), ((2, 1), (1, 1)), (2, 3)),
    ((2, 3), (3, 2), ((1, 1), (0, 2)), (3, 1)),
]


@pytest.mark.parametrize(("window", "strides", "pads", "dilation"), DILATED_MEANS)
@pytest.mark.parametrize("impl", ["auto", "closed_form", "lax"])
def test_avg_and_lp_pool_window_dilation_match_lax(window, strides, pads, dilation, impl):
    """``window_dilation`` (ONNX's ``dilations`` on AveragePool and LpPool) against lax's dilated
    ``reduce_window``: values and gradients, both divisors, and NCHW equal to NHWC."""
    x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, (2, 9, 10, 3)), jnp.float32)
    common = {"window_dilation": dilation, "impl": impl}
    for count_include_pad in (True, False):

        def ours(x, count_include_pad=count_include_pad):
            return avg_pool(x, window, strides, pads, count_include_pad=count_include_pad, **common)

        def reference(x, count_include_pad=count_include_pad):
            return _lax_dilated_mean(x, window, strides, pads, dilation, count_include_pad)

        np.testing.assert_allclose(ours(x), reference(x), rtol=1e-5)
        np.testing.assert_allclose(
            jax.grad(lambda x: jnp.sum(jnp.sin(ours(x))))(x),
            jax.grad(lambda x: jnp.sum(jnp.sin(reference(x))))(x),
            rtol=1e-5,
            atol=1e-6,
        )
    nchw = avg_pool(x.transpose(0, 3, 1, 2), window, strides, pads, layout="NCHW", **common)
    np.testing.assert_allclose(nchw.transpose(0, 2, 3, 1), avg_pool(x, window, strides, pads, **common), rtol=1e-6)
    window_size = math.prod(window)

    def lp_reference(x):
        return (_lax_dilated_mean(x**2, window, strides, pads, dilation, True) * window_size) ** 0.5

    lp = functools.partial(lp_pool, p=2, window_shape=window, strides=strides, padding=pads, **common)
    np.testing.assert_allclose(lp(x), lp_reference(x), rtol=1e-5)
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(lp(x)))(x), jax.grad(lambda x: jnp.sum(lp_reference(x)))(x), rtol=1e-5, atol=1e-6
    )


def test_ceil_mode_keeps_windows_starting_inside():
    x = _line(range(5))
    np.testing.assert_array_equal(_flat(max_pool(x, 2)), [1, 3])
    np.testing.assert_array_equal(_flat(max_pool(x, 2, ceil_mode=True)), [1, 3, 4])
    np.testing.assert_allclose(_flat(avg_pool(x, 2, ceil_mode=True)), [0.5, 2.5, 4.0])  # overhang not counted
    # PyTorch's rule: with ceil_mode no window may start in the right padding, so here ceil_mode
    # gives fewer windows than floor mode, whose third window would lie wholly in the padding.
    with pytest.raises(ValueError, match="leaves window 2 with no input element"):
        max_pool(_line(range(4)), 2, 2, [(0, 2)])
    np.testing.assert_array_equal(_flat(max_pool(_line(range(4)), 2, 2, [(0, 2)], ceil_mode=True)), [1, 3])


@pytest.mark.parametrize(
    "count_include_pad,expected",
    [(True, [1.0, 3.0, 5.0, 13 / 3]), (False, [1.5, 3.0, 5.0, 6.5])],
)
def test_avg_pool_divisor_with_padding_and_ceil_mode(count_include_pad, expected):
    """x = 1..7, window 3, stride 2, padding 1, ceil_mode: the last window [6, 7, pad] divides by 3
    when padding counts (the pad counts, the overhang would not) and by 2 when it does not."""
    y = avg_pool(_line(range(1, 8)), 3, 2, 1, ceil_mode=True, count_include_pad=count_include_pad, layout="NWC")
    np.testing.assert_allclose(_flat(y), expected, rtol=1e-6)


def test_avg_pool_divisor_override():
    np.testing.assert_allclose(avg_pool(ARANGE_4X4, 2, divisor_override=2)[0, ..., 0], [[5, 9], [21, 25]])
    # Any nonzero int, as in PyTorch: a negative divisor flips the sign.
    np.testing.assert_allclose(avg_pool(ARANGE_4X4, 2, divisor_override=-4)[0, ..., 0], [[-2.5, -4.5], [-10.5, -12.5]])


def test_lp_pool_values():
    x = _line([3.0, 4.0, -1.0, 1.0])
    np.testing.assert_allclose(_flat(lp_pool(x, 2, 2)), [5.0, math.sqrt(2.0)], rtol=1e-6)
    np.testing.assert_allclose(_flat(lp_pool(x, 1, 2)), [7.0, 0.0])  # no abs: PyTorch's definition
    np.testing.assert_allclose(_flat(lp_pool(x, math.inf, 2)), [4.0, 1.0])
    assert np.isnan(lp_pool(_line([-2.0, 1.0]), 3, 2)[0, 0, 0])  # negative sum, p=3
    # The gradient is 0 where a window sums to 0 (PyTorch's convention), not NaN.
    grad = jax.grad(lambda a: lp_pool(a, 2, 2).sum())(_line([0.0, 0.0, 3.0, 4.0]))
    np.testing.assert_allclose(_flat(grad), [0.0, 0.0, 0.6, 0.8], rtol=1e-6)


# --- NumPy references -------------------------------------------------------------------------


def _pairs(padding, sizes, window, strides, dilation):
    """Any padding form as explicit (lo, hi) pairs, through cnnjax.shapes.resolve_padding."""
    per_dim = [padding] * len(sizes) if isinstance(padding, (str, int)) else padding
    return [resolve_padding(*args) for args in zip(per_dim, sizes, window, strides, dilation, strict=True)]


@st.composite
def _pool_geometry(draw):
    rank = draw(st.integers(1, 3))
    sizes = tuple(draw(st.integers(1, 6 if rank < 3 else 4)) for _ in range(rank))
    window = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    strides = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    padding = draw(
        st.one_of(
            st.sampled_from(["VALID", "SAME", "SAME_LOWER", "FULL"]),
            st.integers(0, 2),
            st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2)) for _ in range(rank)]),
        )
    )
    pads = _pairs(padding, sizes, window, strides, dilation)
    ceil_mode = draw(st.booleans())
    assume(_every_window_holds_input(sizes, window, strides, pads, dilation, ceil_mode))
    return sizes, window, strides, dilation, padding, pads, ceil_mode, draw(st.integers(0, 2**16))


def _every_window_holds_input(sizes, window, strides, pads, dilation, ceil_mode):
    """The geometry has windows and each holds an input element (else the pools raise)."""
    if any(n + lo + hi < d * (w - 1) + 1 for n, w, d, (lo, hi) in zip(sizes, window, dilation, pads, strict=True)):
        return False
    positions = _window_positions(sizes, window, strides, pads, dilation, ceil_mode)
    return all(any(t is not None for t in taps) for _, taps in positions)


@settings(max_examples=budget.examples(15))
@given(geometry=_pool_geometry(), dtype=st.sampled_from([np.float32, np.int32, np.int8]))
def test_sum_min_max_pool_match_numpy(geometry, dtype):
    """All padding forms, dilation and ceil_mode, floats and integers (computed in their dtype)."""
    sizes, window, strides, dilation, padding, pads, ceil_mode, seed = geometry
    x = np.random.default_rng(seed).integers(-4, 5, (2, 2, *sizes)).astype(dtype)  # int8 sums fit
    lowest, highest = (-np.inf, np.inf) if dtype == np.float32 else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    geometry = {
        "strides": strides,
        "padding": padding,
        "window_dilation": dilation,
        "ceil_mode": ceil_mode,
        "layout": _named("NCHW", len(sizes)),
    }

    @jax.jit
    def pools(a):
        return sum_pool(a, window, **geometry), min_pool(a, window, **geometry), max_pool(a, window, **geometry)

    for y, reduce, fill in zip(pools(x), [np.sum, np.min, np.max], [0, highest, lowest], strict=True):
        expected = _reference_pool(
            x, lambda v, r=reduce: r(np.array(v, dtype)), fill, window, strides, pads, dilation, ceil_mode
        )
        assert y.dtype == dtype
        np.testing.assert_array_equal(y, expected)


@settings(max_examples=budget.examples(10))
@given(geometry=_pool_geometry())
def test_avg_pool_matches_numpy(geometry):
    """Asymmetric padding too (PyTorch has only symmetric): the divisor counts taps inside [-lo, n + hi)."""
    sizes, window, strides, _, padding, _, ceil_mode, seed = geometry
    pads = _pairs(padding, sizes, window, strides, (1,) * len(sizes))  # avg_pool has no dilation
    assume(_every_window_holds_input(sizes, window, strides, pads, (1,) * len(sizes), ceil_mode))
    x = np.random.default_rng(seed).standard_normal((1, 2, *sizes)).astype(np.float32)
    for count_include_pad in (True, False):
        y = avg_pool(
            x,
            window,
            strides,
            padding,
            ceil_mode=ceil_mode,
            count_include_pad=count_include_pad,
            layout=_named("NCHW", len(sizes)),
        )
        hi_end = [n + hi for n, (_, hi) in zip(sizes, pads, strict=True)]
        expected = np.zeros(y.shape, np.float64)
        for index, taps in _window_positions(sizes, window, strides, pads, (1,) * len(sizes), ceil_mode):
            starts = [i * s - lo for i, s, (lo, _) in zip(index, strides, pads, strict=True)]
            inside = [t for t in taps if t is not None]
            boxes = [min(b + w, e) - b for b, w, e in zip(starts, window, hi_end, strict=True)]
            divisor = math.prod(boxes) if count_include_pad else len(inside)
            for n, c in np.ndindex(1, 2):
                total = sum(float(x[(n, c, *t)]) for t in inside)
                expected[(n, c, *index)] = total / max(divisor, 1)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


# --- gradient tie rule ------------------------------------------------------------------------


@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, "SAME"])
@pytest.mark.parametrize("pool", ["max", "min", "with_indices"])
def test_max_pool_gradient_goes_to_first_extreme_in_scan_order(pool, padding, dilation):
    """Integer-valued inputs (many ties), overlapping windows: the gradient goes to the first
    extreme of each window in row-major scan order, XLA's rule, on the reduce_window path
    (dilation 1) and on the strided-slice path (dilation 2) alike."""
    rng = np.random.default_rng(7)
    x = rng.integers(0, 3, (1, 2, 6, 5)).astype(np.float32)
    window, strides = (3, 2), (1, 2)
    geometry = {"padding": padding, "window_dilation": dilation, "layout": "NCHW"}
    if pool == "max":
        fn = functools.partial(max_pool, window_shape=window, strides=strides, **geometry)
    elif pool == "min":
        fn = functools.partial(min_pool, window_shape=window, strides=strides, **geometry)
    else:
        fn = lambda a: max_pool_with_indices(a, window, strides, **geometry)[0]
    dy = rng.standard_normal(jax.eval_shape(fn, x).shape).astype(np.float32)
    dx = jax.jit(lambda a, c: jax.vjp(fn, a)[1](c)[0])(x, dy)
    pads = _pairs(padding, x.shape[2:], window, strides, (dilation,) * 2)
    expected = _reference_first_max_grad(x, dy, window, strides, pads, (dilation,) * 2, lowest=pool != "min")
    np.testing.assert_allclose(dx, expected, rtol=1e-6)


def test_global_and_adaptive_max_gradient_tie_rule():
    x = jnp.ones((1, 3, 4, 1))
    first = np.zeros((1, 3, 4, 1))
    first[0, 0, 0, 0] = 1.0
    np.testing.assert_array_equal(jax.grad(lambda a: global_max_pool(a).sum())(x), first)
    np.testing.assert_array_equal(jax.grad(lambda a: adaptive_max_pool(a, 1).sum())(x), first)
    # Uneven bins (3 -> 2: rows [0, 2) and [1, 3)) take the separable path: still the first.
    grad = jax.grad(lambda a: adaptive_max_pool(a, (2, 1)).sum())(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_nan_propagates_on_both_max_paths():
    x = _line([1.0, np.nan, 3.0, 0.0, 2.0])
    for dilation in (1, 2):
        y = max_pool(x, 2, 1, window_dilation=dilation, layout="NWC")
        expected_nan = [True, True, False, False] if dilation == 1 else [False, True, False]
        np.testing.assert_array_equal(np.isnan(_flat(y)), expected_nan)


# --- global, adaptive, pyramid ----------------------------------------------------------------


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_global_pools(rank, layout, keepdims):
    x = np.random.default_rng(rank).standard_normal((2, 3) + (4,) * rank).astype(np.float32)
    axes = tuple(range(2, 2 + rank))
    if layout == "NHWC":
        x = np.moveaxis(x, 1, -1)
        axes = tuple(a - 1 for a in axes)
    layout = _named(layout, rank)
    np.testing.assert_array_equal(global_max_pool(x, keepdims, layout), x.max(axis=axes, keepdims=keepdims))
    np.testing.assert_allclose(
        global_avg_pool(x, keepdims, layout), x.mean(axis=axes, keepdims=keepdims), rtol=1e-6, atol=1e-6
    )
    # unbatched, with a layout naming the rank: the result has no batch axis
    np.testing.assert_array_equal(global_max_pool(x[1], keepdims, layout), x[1:].max(axis=axes, keepdims=keepdims)[0])


def _named(layout, rank):
    """The layout name of ``rank`` spatial dims with the channel order of ``"NHWC"``/``"NCHW"``."""
    return ("NWC", "NHWC", "NDHWC")[rank - 1] if layout == "NHWC" else ("NCW", "NCHW", "NCDHW")[rank - 1]


def _torch_bins(size, out):
    return [(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]


@pytest.mark.parametrize("size,out", [(5, 3), (5, 5), (5, 7), (6, 4), (7, 2), (13, 2), (13, 4), (8, 4), (1, 3), (9, 1)])
def test_adaptive_bins_values(size, out):
    """PyTorch's bins start = floor(i*L/o), end = ceil((i+1)*L/o), written out with math here."""
    x = np.random.default_rng(size * out).standard_normal(size).astype(np.float32)
    bins = _torch_bins(size, out)
    y_max, y_avg = jax.jit(lambda a: (adaptive_max_pool(a, out), adaptive_avg_pool(a, out)))(_line(x))
    np.testing.assert_array_equal(_flat(y_max), [x[a:b].max() for a, b in bins])
    np.testing.assert_allclose(_flat(y_avg), [x[a:b].mean() for a, b in bins], rtol=1e-6)


def test_adaptive_pool_2d_3d_against_numpy_and_none_keeps_size():
    x = np.random.default_rng(0).standard_normal((2, 5, 7, 3, 2)).astype(np.float32)
    out = (3, 7, 2)
    y_max = adaptive_max_pool(x, (3, None, 2))
    y_avg = adaptive_avg_pool(x, out, "NDHWC")
    for index in np.ndindex(*out):
        box = tuple(slice(*_torch_bins(n, o)[i]) for n, o, i in zip(x.shape[1:4], out, index, strict=True))
        np.testing.assert_array_equal(y_max[(slice(None), *index)], x[(slice(None), *box)].max(axis=(1, 2, 3)))
        np.testing.assert_allclose(y_avg[(slice(None), *index)], x[(slice(None), *box)].mean(axis=(1, 2, 3)), rtol=1e-5)


def test_adaptive_pool_dividing_sizes_equal_plain_pools():
    x = np.random.default_rng(1).standard_normal((1, 8, 6, 2)).astype(np.float32)
    np.testing.assert_array_equal(adaptive_max_pool(x, (4, 2)), max_pool(x, (2, 3)))
    np.testing.assert_allclose(adaptive_avg_pool(x, (4, 2)), avg_pool(x, (2, 3)), rtol=1e-6)


def test_spatial_pyramid_pool_order_nhwc_and_nchw():
    """NHWC flattens each level as (l, l, C), NCHW as (C, l, l); levels are concatenated in order."""
    x = np.random.default_rng(2).standard_normal((2, 4, 4, 3)).astype(np.float32)
    level1 = x.max(axis=(1, 2))  # (N, C)
    level2 = x.reshape(2, 2, 2, 2, 2, 3).max(axis=(2, 4))  # (N, 2, 2, C)
    y = spatial_pyramid_pool(x, (1, 2))
    np.testing.assert_array_equal(y, np.concatenate([level1, level2.reshape(2, -1)], axis=1))
    y_nchw = spatial_pyramid_pool(np.moveaxis(x, -1, 1), (1, 2), "max", "NCHW")
    np.testing.assert_array_equal(y_nchw, np.concatenate([level1, np.moveaxis(level2, -1, 1).reshape(2, -1)], axis=1))
    y_avg = spatial_pyramid_pool(x, (1, 2), mode="avg")
    np.testing.assert_allclose(y_avg[:, :3], x.mean(axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize(
    "shape,layout,expected", [((2, 9, 3), "NWC", 3 * (1 + 2 + 3)), ((2, 5, 6, 7, 3), "NDHWC", 3 * (1 + 8 + 27))]
)
def test_spatial_pyramid_pool_other_ranks(shape, layout, expected):
    assert spatial_pyramid_pool(jnp.ones(shape), (1, 2, 3), "avg", layout).shape == (2, expected)


# --- unbatched inputs and -inf windows (PyTorch parity, issue 16) -------------------------------


UNBATCHED_CALLS = {
    "max_pool": lambda x, lay: max_pool(x, 2, 1, 1, layout=lay),
    "avg_pool": lambda x, lay: avg_pool(x, 2, 1, 1, count_include_pad=False, layout=lay),
    "lp_pool": lambda x, lay: lp_pool(x, 2, 2, layout=lay),
    "max_pool_with_indices": lambda x, lay: max_pool_with_indices(x, 2, ceil_mode=True, layout=lay),
    "adaptive_avg_pool": lambda x, lay: adaptive_avg_pool(x, 2, lay),
    "adaptive_max_pool_with_indices": lambda x, lay: adaptive_max_pool_with_indices(x, 2, lay),
    "spatial_pyramid_pool": lambda x, lay: spatial_pyramid_pool(x, (1, 2), layout=lay),
}


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("name", sorted(UNBATCHED_CALLS))
def test_unbatched_input_equals_a_batch_of_one(name, layout):
    """``(H, W, C)`` / ``(C, H, W)`` with a layout naming the rank: the batched result without ``N``."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 3, 5, 5)))
    if layout == "NHWC":
        x = jnp.moveaxis(x, 1, -1)
    call = UNBATCHED_CALLS[name]
    batched, unbatched = call(x, layout), call(x[0], layout)
    for b, u in zip(jax.tree.leaves(batched), jax.tree.leaves(unbatched), strict=True):
        np.testing.assert_array_equal(u, b[0])


def test_window_shape_sequence_fixes_the_rank_of_an_unbatched_input():
    x = jnp.arange(16.0).reshape(4, 4, 1)  # (H, W, C): 2-D by window_shape=(2, 2)
    np.testing.assert_array_equal(max_pool(x, (2, 2))[..., 0], [[5.0, 7.0], [13.0, 15.0]])
    # the same array with an int window is (N, W, C): a 1-D pool
    np.testing.assert_array_equal(max_pool(x, 2)[..., 0], [[1.0, 3.0], [5.0, 7.0], [9.0, 11.0], [13.0, 15.0]])


@pytest.mark.parametrize("impl", ["auto", "closed_form", "lax"])
def test_minus_inf_windows_route_gradient_and_index_to_the_first_real_element(impl):
    """A window whose real elements are all ``-inf`` (with padding): as in PyTorch, the value is
    ``-inf`` and the gradient and the index go to its first real element, never to the padding."""
    x = jnp.array([[[-jnp.inf], [2.0], [-jnp.inf], [-jnp.inf]]])  # (N, W, C)
    values, indices = max_pool_with_indices(x, 2, 2, 1, layout="NWC", impl=impl)  # [pad, x0], [x1, x2], [x3, pad]
    np.testing.assert_array_equal(_flat(values), [-np.inf, 2.0, -np.inf])
    np.testing.assert_array_equal(_flat(indices), [0, 1, 3])
    grad = jax.grad(lambda a: jnp.sum(jnp.where(jnp.isinf(y := max_pool(a, 2, 2, 1, impl=impl)), 1.0, 2.0) * y))(x)
    np.testing.assert_array_equal(_flat(grad), [1.0, 2.0, 0.0, 1.0])
    grad_2d = jax.grad(lambda a: max_pool(a, 3, 1, 1, layout="NCHW", impl=impl)[0, 0, 0, 0])(
        jnp.full((1, 1, 2, 2), -jnp.inf)
    )
    np.testing.assert_array_equal(grad_2d[0, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_adaptive_max_pool_with_indices_hand_computed():
    """Bins [0, 2), [1, 4), [3, 5) of [1, 3, 3, 0, 5]: the first maximum of each (ties too)."""
    x = jnp.array([[1.0, 3.0, 3.0, 0.0, 5.0]])  # (C, W): unbatched
    values, indices = adaptive_max_pool_with_indices(x, 3, "NCW")
    np.testing.assert_array_equal(values, [[3.0, 3.0, 5.0]])
    np.testing.assert_array_equal(indices, [[1, 1, 4]])
    assert indices.dtype == jnp.int32
    grad = jax.grad(lambda a: adaptive_max_pool_with_indices(a, 3, "NCW")[0].sum())(x)
    np.testing.assert_array_equal(grad, [[0.0, 2.0, 0.0, 0.0, 1.0]])
    x2 = jnp.arange(12.0).reshape(1, 3, 4, 1)  # NHWC, bins of one size: the window-pool path
    np.testing.assert_array_equal(adaptive_max_pool_with_indices(x2, (1, 2))[1][0, ..., 0], [[9, 11]])


# --- indices and unpooling --------------------------------------------------------------------


def test_max_pool_with_indices_hand_computed():
    x = jnp.array([[[[1.0, 5.0, 2.0, 2.0], [3.0, 0.0, 2.0, 1.0], [9.0, 9.0, 0.0, 4.0]]]])  # NCHW, H=3, W=4
    values, indices = max_pool_with_indices(x, 2, layout="NCHW")
    np.testing.assert_array_equal(values, [[[[5.0, 2.0]]]])
    np.testing.assert_array_equal(indices, [[[[1, 2]]]])  # the tie 2, 2 at (0, 2), (0, 3): first
    values, indices = max_pool_with_indices(x, 2, 1, [(0, 1), (0, 0)], ceil_mode=True, layout="NCHW")
    np.testing.assert_array_equal(indices[0, 0], [[1, 1, 2], [8, 9, 11], [8, 9, 11]])
    assert indices.dtype == jnp.int32


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_max_unpool_round_trip(rank, layout):
    """Non-overlapping windows: unpooling keeps each window's max in place and zeros the rest,
    and (the input being positive) pooling that again gives the same values."""
    x = np.random.default_rng(rank).uniform(1.0, 2.0, (2, 3) + (4,) * rank).astype(np.float32)
    expected = np.zeros_like(x)
    for index in np.ndindex(*(2,) * rank):
        box = (slice(None), slice(None), *(slice(2 * i, 2 * i + 2) for i in index))
        block = x[box]
        keep = block == block.max(axis=tuple(range(2, 2 + rank)), keepdims=True)
        expected[box] = np.where(keep, block, 0)
    if layout == "NHWC":
        x, expected = np.moveaxis(x, 1, -1), np.moveaxis(expected, 1, -1)
    layout = _named(layout, rank)

    @jax.jit
    def round_trip(a):
        values, indices = max_pool_with_indices(a, 2, layout=layout)
        unpooled = max_unpool(values, indices, (4,) * rank, layout)
        full_shape = max_unpool(values, indices, a.shape, layout)  # a full array shape works too
        return values, unpooled, full_shape, max_pool(unpooled, 2, layout=layout)

    values, unpooled, full_shape, pooled_again = round_trip(x)
    np.testing.assert_array_equal(unpooled, expected)
    np.testing.assert_array_equal(full_shape, expected)
    np.testing.assert_array_equal(pooled_again, values)


def test_max_unpool_drops_out_of_range_indices_and_accepts_larger_outputs():
    values, indices = _line([3.0, 5.0, 7.0]), jnp.array([0, 4, -1]).reshape(1, 3, 1)
    np.testing.assert_array_equal(_flat(max_unpool(values, indices, 4, "NWC")), [3, 0, 0, 0])
    np.testing.assert_array_equal(_flat(max_unpool(values, indices, 6, "NWC")), [3, 0, 0, 0, 5, 0])


def test_max_unpool_gradient_is_a_gather():
    """Overlapping windows sharing a maximum both get its gradient (PyTorch's backward)."""
    values, indices = max_pool_with_indices(_line([0.0, 9.0, 1.0]), 2, 1, layout="NWC")
    np.testing.assert_array_equal(_flat(indices), [1, 1])
    dy = _line([0.0, 2.0, 0.0])
    _, pullback = jax.vjp(lambda v: max_unpool(v, indices, 3, "NWC"), values)
    np.testing.assert_array_equal(_flat(pullback(dy)[0]), [2.0, 2.0])


# --- transforms ---------------------------------------------------------------------------------

OPS = {
    "max_pool": lambda x: max_pool(x, 2, 1, 1),
    "max_pool_dilated": lambda x: max_pool(x, 2, 1, "SAME", window_dilation=2, ceil_mode=True),
    "min_pool": lambda x: min_pool(x, 2, 1, window_dilation=(1, 2)),
    "sum_pool": lambda x: sum_pool(x, (2, 3), 2, "SAME_LOWER", window_dilation=(2, 1)),
    "avg_pool": lambda x: avg_pool(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
    "lp_pool": lambda x: lp_pool(x, 2, 2, 1),
    "global_max_pool": global_max_pool,
    "global_avg_pool": global_avg_pool,
    "adaptive_max_pool": lambda x: adaptive_max_pool(x, (3, 2)),
    "adaptive_avg_pool": lambda x: adaptive_avg_pool(x, (3, 2)),
    "spatial_pyramid_pool": lambda x: spatial_pyramid_pool(x, (1, 2, 3), "avg"),
    "max_pool_with_indices": lambda x: max_pool_with_indices(x, 2, 1, 1, window_dilation=2)[0],
    "max_unpool": lambda x: max_unpool(*max_pool_with_indices(x, 2), (5, 4)),
}


@pytest.mark.parametrize("name", OPS)
def test_jit_vmap_grad(name):
    """Under jit: vmap over a leading axis equals a loop, and gradients match finite differences.
    (The other tests run the ops both eagerly, against NumPy, and jitted, against PyTorch.)"""
    op = jax.jit(OPS[name])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 4, 3)).astype(np.float32)) + 4.0
    stacked = jnp.stack([x, 2.0 * x])
    np.testing.assert_allclose(jax.jit(jax.vmap(op))(stacked), jnp.stack([op(x), op(2.0 * x)]), rtol=1e-6)
    check_grads(op, (x,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-3)


# --- dtypes -----------------------------------------------------------------------------------

INT_OPS = {
    "max_pool": lambda x: max_pool(x, 2, 1, 1),
    "min_pool": lambda x: min_pool(x, 2, 1, 1, window_dilation=2),
    "sum_pool": lambda x: sum_pool(x, 2, ceil_mode=True),
    "global_max_pool": global_max_pool,
    "adaptive_max_pool": lambda x: adaptive_max_pool(x, 3),
    "max_pool_with_indices": lambda x: max_pool_with_indices(x, 2, 1)[0],
}


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int32])
@pytest.mark.parametrize("name", INT_OPS)
def test_integer_inputs_stay_integers(name, dtype):
    x = np.random.default_rng(0).integers(0, 31, (1, 5, 5, 2))  # int8 window sums fit
    op = jax.jit(INT_OPS[name])
    y = op(jnp.asarray(x, dtype))
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, op(jnp.asarray(x, jnp.float32)))


@pytest.mark.parametrize(
    "name,op",
    [
        ("avg_pool", lambda x: avg_pool(x, 2)),
        ("lp_pool", lambda x: lp_pool(x, 2, 2)),
        ("adaptive_avg_pool", lambda x: adaptive_avg_pool(x, 2)),
        ("global_avg_pool", global_avg_pool),
        ("spatial_pyramid_pool", lambda x: spatial_pyramid_pool(x, mode="avg")),
    ],
)
def test_float_only_ops_reject_integers(name, op):
    with pytest.raises(TypeError, match=r"_pool: x must be floating point, got dtype int32"):
        op(jnp.ones((1, 4, 4, 1), jnp.int32))


@pytest.mark.parametrize("op", [max_pool, min_pool, sum_pool, max_pool_with_indices])
def test_reductions_reject_bool(op):
    with pytest.raises(TypeError, match=r": x must have an integer or floating dtype, got dtype bool"):
        op(jnp.ones((1, 4, 4, 1), bool), 2)


# --- impl flag --------------------------------------------------------------------------------


def test_impl_flag_is_validated():
    with pytest.raises(ValueError, match=r"max_pool: impl='fast' is not one of"):
        max_pool(ARANGE_4X4, 2, impl="fast")
    with pytest.raises(ValueError, match=r"avg_pool: impl='fast' is not one of"):
        avg_pool(ARANGE_4X4, 2, impl="fast")
    np.testing.assert_array_equal(max_pool(ARANGE_4X4, 2, impl="lax"), max_pool(ARANGE_4X4, 2))


@pytest.mark.parametrize("impl", ["auto", "closed_form"])
@pytest.mark.parametrize(
    "op",
    [
        lambda x, impl: max_pool(x, 3, 2, 1, window_dilation=(1, 2), ceil_mode=True, impl=impl),
        lambda x, impl: avg_pool(x, 3, 2, "SAME", ceil_mode=True, count_include_pad=False, impl=impl),
    ],
)
def test_closed_form_vjp_matches_lax(op, impl):
    x = jnp.asarray(np.random.default_rng(3).integers(0, 4, (2, 7, 6, 3)).astype(np.float32))
    y_lax, pull_lax = jax.vjp(lambda a: op(a, "lax"), x)
    y_closed, pull_closed = jax.vjp(lambda a: op(a, impl), x)
    np.testing.assert_allclose(y_closed, y_lax, rtol=1e-6)
    dy = jnp.asarray(np.random.default_rng(4).standard_normal(y_lax.shape).astype(np.float32))
    np.testing.assert_allclose(pull_closed(dy)[0], pull_lax(dy)[0], rtol=1e-5, atol=1e-6)


# --- errors -----------------------------------------------------------------------------------

X = jnp.ones((1, 4, 4, 1))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: max_pool(jnp.ones((4, 4)), 2), ValueError, r"max_pool: x must be batched .* got shape \(4, 4\)"),
        (lambda: avg_pool(jnp.ones((1, 1, 4, 4, 4, 4)), 2), ValueError, r"avg_pool: x must be batched"),
        (
            lambda: max_pool(jnp.ones((4,)), (2, 2)),
            ValueError,
            r"max_pool: x must be \(N, H, W, C\) or \(H, W, C\) for window_shape=\(2, 2\), got shape \(4,\)",
        ),
        (
            lambda: max_pool(jnp.ones((1, 4)), 2, layout="NCHW"),
            ValueError,
            r"max_pool: x must be \(N, C, H, W\) or \(C, H, W\) for layout 'NCHW', got shape \(1, 4\)",
        ),
        (lambda: max_pool(jnp.ones((1, 1, 4)), 2, layout="NCHW"), ValueError, r"spans 2 along spatial dim 0"),
        (
            lambda: max_pool(jnp.ones((1, 4, 1)), 2, layout="NHWC_"),
            ValueError,
            r"max_pool: layout='NHWC_' is not one of",
        ),
        (
            lambda: max_pool(X[0], 2, layout="NCDHW"),
            ValueError,
            r"max_pool: x must be \(N, C, D, H, W\) or \(C, D, H, W\)",
        ),
        (
            lambda: max_pool(X[0, 0], (2, 2, 2)),
            ValueError,
            r"max_pool: x must be \(N, D, H, W, C\) or \(D, H, W, C\) for window_shape=\(2, 2, 2\)",
        ),
        (
            lambda: max_pool(X, (2, 2), layout="NCW"),
            ValueError,
            r"max_pool: layout='NCW' names 1 spatial dims, but window_shape=\(2, 2\) has 2",
        ),
        (lambda: max_pool(X, 2, strides=(1, 1, 1)), ValueError, r"strides=\(1, 1, 1\) must have one entry per spatial"),
        (lambda: max_pool(X, 0), ValueError, r"max_pool: window_shape=0 must be >= 1"),
        (lambda: max_pool(X, 2.5), TypeError, r"max_pool: window_shape must be an int"),
        (lambda: min_pool(X, 2, 0), ValueError, r"min_pool: strides=0 must be >= 1"),
        (lambda: sum_pool(X, 2, window_dilation=(1, 0)), ValueError, r"sum_pool: window_dilation=0 must be >= 1"),
        (lambda: max_pool(X, 2, padding="HALF"), ValueError, r"max_pool: padding='HALF' is not one of"),
        (lambda: avg_pool(X, 2, padding=-1), ValueError, r"avg_pool: padding=-1 must be >= 0"),
        (
            lambda: avg_pool(X, 2, padding=[(1, 1, 1), (0, 0)]),
            ValueError,
            r"avg_pool: padding=.* must hold \(lo, hi\) pairs",
        ),
        (
            lambda: max_pool(X, 5),
            ValueError,
            r"max_pool: window_shape=\(5, 5\) .* spans 5 along spatial dim 0, more than the padded input 4 .*empty",
        ),
        (lambda: max_pool(X, 3, window_dilation=2), ValueError, r"max_pool: .* spans 5 along spatial dim 0"),
        (lambda: avg_pool(X, 2, divisor_override=0), ValueError, r"avg_pool: divisor_override=0 must be a nonzero int"),
        (lambda: avg_pool(X, 2, divisor_override=1.5), TypeError, r"avg_pool: divisor_override must be an int"),
        (lambda: lp_pool(X, 0, 2), ValueError, r"lp_pool: p=0 must be a number > 0"),
        (lambda: lp_pool(X, -1.5, 2), ValueError, r"lp_pool: p=-1.5 must be a number > 0"),
        (lambda: lp_pool(X, "2", 2), ValueError, r"lp_pool: p='2' must be a number > 0"),
        (lambda: global_max_pool(jnp.ones((4, 4))), ValueError, r"global_max_pool: x must be batched"),
        (lambda: global_avg_pool(X, layout="NWC"), ValueError, r"global_avg_pool: x must be \(N, W, C\) or \(W, C\)"),
        (lambda: adaptive_max_pool(X, 0), ValueError, r"adaptive_max_pool: output_size=0 must be >= 1"),
        (
            lambda: adaptive_avg_pool(X[0, 0], (2, 2, 2)),
            ValueError,
            r"adaptive_avg_pool: x must be \(N, D, H, W, C\) or \(D, H, W, C\) for output_size=\(2, 2, 2\)",
        ),
        (
            lambda: adaptive_max_pool_with_indices(X, (2, 2), "NCW"),
            ValueError,
            r"adaptive_max_pool_with_indices: layout='NCW' names 1 spatial dims, but output_size=\(2, 2\) has 2",
        ),
        (lambda: spatial_pyramid_pool(X, mode="sum"), ValueError, r"spatial_pyramid_pool: mode='sum' is not one of"),
        (lambda: spatial_pyramid_pool(X, 2), TypeError, r"spatial_pyramid_pool: levels must be a non-empty sequence"),
        (lambda: spatial_pyramid_pool(X, (1, 0)), ValueError, r"spatial_pyramid_pool: levels=0 must be >= 1"),
        (
            lambda: max_unpool(X, jnp.zeros((1, 4, 4, 2), int), 8),
            ValueError,
            r"max_unpool: indices shape \(1, 4, 4, 2\) must equal values shape \(1, 4, 4, 1\)",
        ),
        (lambda: max_unpool(X, X, 8), TypeError, r"max_unpool: indices must have an integer dtype, got dtype float32"),
        (lambda: max_unpool(X, jnp.zeros(X.shape, int), 0), ValueError, r"max_unpool: output_size=0 must be >= 1"),
        (
            lambda: max_unpool(X[0, 0], jnp.zeros(X.shape[2:], int), (8, 8, 8)),
            ValueError,
            r"max_unpool: values must be \(N, D, H, W, C\) or \(D, H, W, C\) for output_size=\(8, 8, 8\)",
        ),
        (
            lambda: max_unpool(jnp.ones((4, 4)), jnp.zeros((4, 4), int), 8),
            ValueError,
            r"max_unpool: values must be batched",
        ),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
