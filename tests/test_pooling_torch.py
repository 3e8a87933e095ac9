"""cnnjax.pooling against torch.nn.functional, in NCHW, on seeded random geometry.

Each op family has 40 seeded cases over 1-D, 2-D and 3-D, comparing values and (where defined)
input gradients; every other case also checks that the NHWC result is the NCHW one transposed.
Each case is one jitted program, to keep compiles (the bulk of the run time) few. PyTorch's limits
(padding at most half the window, no padding for lp_pool, no dilation/ceil_mode before
max_unpool) are used only to pick cases PyTorch accepts.
"""

import math

import budget
import jax
import numpy as np
import pytest
from jax import numpy as jnp

from cnnjax.pooling import (
    adaptive_avg_pool,
    adaptive_max_pool,
    avg_pool,
    lp_pool,
    max_pool,
    max_pool_with_indices,
    max_unpool,
)
from cnnjax.shapes import pool_output_size

torch = pytest.importorskip("torch", reason="PyTorch is the reference for these tests")
F = torch.nn.functional

CASES = len(budget.seeds(40))
MAX_SIZE = {1: 10, 2: 7, 3: 5}
RTOL, ATOL = 1e-5, 1e-5


def _torch_fn(name: str, rank: int):
    return getattr(F, f"{name}{rank}d")


def _names(ndim: int) -> tuple[str, str]:
    """The channels-first and channels-last layout names of a batched input of rank ``ndim``."""
    return ("NCW", "NCHW", "NCDHW")[ndim - 3], ("NWC", "NHWC", "NDHWC")[ndim - 3]


def _outputs(fn, a, layout):
    out = fn(a, layout)
    return out if isinstance(out, tuple) else (out,)


def _pairing(outputs, cotangents):
    """``sum_i <outputs_i, cotangents_i>`` over the float outputs: its gradient is their joint VJP."""
    return sum((o * c).sum() for o, c in zip(outputs, cotangents, strict=True) if c is not None)


def _ours(fn, x, cotangents=None, nhwc=True):
    """One jitted call of ``fn(x, layout)`` (an array or a tuple of them): the NCHW outputs, the
    NHWC outputs transposed back to NCHW (if ``nhwc``) and, given cotangents, the NCHW input
    gradient of ``_pairing``. One compile per case keeps the file fast."""

    def run(a, cts):
        first, last = _names(a.ndim)
        outputs = _outputs(fn, jnp.moveaxis(a, 1, -1), last) if nhwc else ()
        nhwc_outputs = tuple(jnp.moveaxis(t, -1, 1) for t in outputs)
        grad = None if cts is None else jax.grad(lambda b: _pairing(_outputs(fn, b, first), cts))(a)
        return _outputs(fn, a, first), nhwc_outputs, grad

    return jax.jit(run)(jnp.asarray(x), cotangents)


def _check(fn, x, torch_fn, rng, *, grad=True, nhwc=True):
    """``fn`` (cnnjax, NCHW) equals ``torch_fn`` output by output; with ``nhwc``, ``fn`` in NHWC
    equals the NCHW result transposed; and the input gradients agree for random cotangents on
    the outputs that ``grad`` selects (a bool, or one bool per output; integer outputs never)."""
    shapes = jax.eval_shape(lambda a: _outputs(fn, a, _names(a.ndim)[0]), jnp.asarray(x))
    selected = grad if isinstance(grad, tuple) else (grad,) * len(shapes)
    cotangents = tuple(
        rng.standard_normal(s.shape).astype(np.float32) if g and jnp.issubdtype(s.dtype, jnp.floating) else None
        for s, g in zip(shapes, selected, strict=True)
    )
    differentiate = any(c is not None for c in cotangents)
    ys, ys_nhwc, dx = _ours(fn, x, cotangents if differentiate else None, nhwc)
    xt = torch.tensor(x, requires_grad=differentiate)
    expected = torch_fn(xt)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for y, e in zip(ys, expected, strict=True):
        np.testing.assert_allclose(y, e.detach().numpy(), rtol=RTOL, atol=ATOL, equal_nan=True)
    if nhwc:
        for y_nhwc, y in zip(ys_nhwc, ys, strict=True):
            np.testing.assert_allclose(y_nhwc, y, rtol=RTOL, atol=ATOL, equal_nan=True)
    if differentiate:
        _pairing(expected, [None if c is None else torch.tensor(c) for c in cotangents]).backward()
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=RTOL, atol=ATOL)


def _input(rng, rank, sizes, ties=False):
    """A float32 (N, C, *sizes) input; with ``ties``, small integers so windows hold equal maxima."""
    shape = (2, 3, *sizes)
    x = rng.integers(0, 3, shape) if ties else rng.standard_normal(shape)
    return x.astype(np.float32)


def _window_cases(seed, *, dilated, ceil):
    """Seeded valid pooling geometries: (rank, sizes, window, strides, padding, dilation, ceil_mode, seed)."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < CASES:
        rank = len(cases) % 3 + 1
        sizes = tuple(int(v) for v in rng.integers(2, MAX_SIZE[rank] + 1, rank))
        window = tuple(int(v) for v in rng.integers(1, 4, rank))
        strides = tuple(int(v) for v in rng.integers(1, 4, rank))
        dilation = tuple(int(v) for v in rng.integers(1, 3, rank)) if dilated else (1,) * rank
        padding = tuple(int(rng.integers(0, w // 2 + 1)) for w in window)  # torch: pad <= window / 2
        ceil_mode = bool(ceil and rng.integers(2))
        try:
            for n, w, s, p, d in zip(sizes, window, strides, padding, dilation, strict=True):
                pool_output_size(n, w, s, p, d, ceil_mode)
        except ValueError:
            continue
        cases.append((rank, sizes, window, strides, padding, dilation, ceil_mode, int(rng.integers(2**31))))
    return cases


def _params(cases, name=lambda i, c: f"{c[0]}d-{i}"):
    """``(case, nhwc)`` test parameters: every other case also runs in NHWC (the rank cycles
    with period 3, so every rank does), which keeps compiles down."""
    return [pytest.param(c, i % 2 == 0, id=name(i, c)) for i, c in enumerate(cases)]


MAX_CASES = _window_cases(0, dilated=True, ceil=True)
AVG_CASES = _window_cases(1, dilated=False, ceil=True)
UNPOOL_CASES = _window_cases(2, dilated=False, ceil=False)


@pytest.mark.parametrize("case,nhwc", _params(MAX_CASES))
def test_max_pool_and_indices_match_torch(case, nhwc):
    """Values and indices of max_pool and max_pool_with_indices, and max_pool's gradient; with
    integer-valued inputs (ties) both pick the first maximum in scan order, on the reduce_window
    path and on the dilated strided-slice path (test_pooling checks max_pool_with_indices'
    gradient against max_pool's rule)."""
    rank, sizes, window, strides, padding, dilation, ceil_mode, seed = case
    rng = np.random.default_rng(seed)
    geometry = {"window_dilation": dilation, "ceil_mode": ceil_mode}

    def ours(a, layout):
        return (
            max_pool(a, window, strides, padding, layout=layout, **geometry),
            *max_pool_with_indices(a, window, strides, padding, layout=layout, **geometry),
        )

    def theirs(a):
        values, indices = _torch_fn("max_pool", rank)(
            a, window, strides, padding, dilation, ceil_mode, return_indices=True
        )
        return values, values, indices

    _check(ours, _input(rng, rank, sizes, ties=seed % 2 == 0), theirs, rng, grad=(True, False, False), nhwc=nhwc)


@pytest.mark.parametrize("case,nhwc", _params(AVG_CASES))
def test_avg_pool_matches_torch(case, nhwc):
    rank, sizes, window, strides, padding, _, ceil_mode, seed = case
    rng = np.random.default_rng(seed)
    x = _input(rng, rank, sizes)
    count_include_pad = bool(seed % 2)
    # torch's avg_pool1d has no divisor_override.
    divisor_override = None if rank == 1 or seed % 3 else int(seed % 5 + 1)
    torch_extra = {} if rank == 1 else {"divisor_override": divisor_override}
    options = {"ceil_mode": ceil_mode, "count_include_pad": count_include_pad}
    _check(
        lambda a, layout: avg_pool(
            a, window, strides, padding, divisor_override=divisor_override, layout=layout, **options
        ),
        x,
        lambda a: _torch_fn("avg_pool", rank)(a, window, strides, padding, **options, **torch_extra),
        rng,
        nhwc=nhwc,
    )


def _adaptive_cases(seed):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(CASES):
        rank = i % 3 + 1
        sizes = tuple(int(v) for v in rng.integers(1, MAX_SIZE[rank] + 1, rank))
        if i % 4 == 0:  # dividing sizes: the reduce_window path
            out = tuple(int(rng.choice([o for o in range(1, n + 1) if n % o == 0])) for n in sizes)
        else:  # bins of uneven size, some overlapping, some outputs larger than the input
            out = tuple(int(rng.integers(1, n + 3)) for n in sizes)
        cases.append((rank, sizes, out, int(rng.integers(2**31))))
    return cases


ADAPTIVE_CASES = _adaptive_cases(3)


@pytest.mark.parametrize("case,nhwc", _params(ADAPTIVE_CASES, lambda i, c: f"{c[0]}d-{c[1]}->{c[2]}"))
def test_adaptive_pools_match_torch(case, nhwc):
    rank, sizes, out, seed = case
    rng = np.random.default_rng(seed)
    _check(
        lambda a, layout: (adaptive_max_pool(a, out, layout), adaptive_avg_pool(a, out, layout)),
        _input(rng, rank, sizes, ties=seed % 2 == 0),
        lambda a: (_torch_fn("adaptive_max_pool", rank)(a, out), _torch_fn("adaptive_avg_pool", rank)(a, out)),
        rng,
        nhwc=nhwc,
    )


def _lp_cases(seed):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(CASES):
        rank = i % 3 + 1
        sizes = tuple(int(v) for v in rng.integers(2, MAX_SIZE[rank] + 1, rank))
        window = tuple(int(rng.integers(1, n + 1)) for n in sizes)
        strides = None if rng.integers(3) == 0 else tuple(int(v) for v in rng.integers(1, 4, rank))
        p = [1, 2, 3, 1.5, math.inf][i % 5]
        cases.append((rank, sizes, window, strides, p, bool(rng.integers(2)), int(rng.integers(2**31))))
    return cases


LP_CASES = _lp_cases(4)


@pytest.mark.parametrize("case,nhwc", _params(LP_CASES, lambda i, c: f"{c[0]}d-p{c[4]}-{i}"))
def test_lp_pool_matches_torch(case, nhwc):
    """Signed inputs: p=1 sums them, odd or fractional p give NaN where a window sum is negative
    (no absolute value, as in torch); with ceil_mode the overhang is rescaled as torch does."""
    rank, sizes, window, strides, p, ceil_mode, seed = case
    rng = np.random.default_rng(seed)
    _check(
        lambda a, layout: lp_pool(a, p, window, strides, ceil_mode=ceil_mode, layout=layout),
        _input(rng, rank, sizes),
        # torch's lp_pool1d multiplies by kernel_size itself, so it needs an int there.
        lambda a: _torch_fn("lp_pool", rank)(a, p, window[0] if rank == 1 else window, strides, ceil_mode),
        rng,
        grad=False,
        nhwc=nhwc,
    )


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_lp_pool_gradient_matches_torch(p, rank):
    """Non-negative inputs with all-zero windows, where both define the gradient as 0."""
    rng = np.random.default_rng(10 * p + rank)
    x = np.abs(_input(rng, rank, (5,) * rank))
    x[..., :2] = 0.0
    _check(
        lambda a, layout: lp_pool(a, p, 2, ceil_mode=True, layout=layout),
        x,
        lambda a: _torch_fn("lp_pool", rank)(a, p, 2, None, True),
        rng,
    )


@pytest.mark.parametrize("case,nhwc", _params(UNPOOL_CASES))
def test_max_unpool_matches_torch(case, nhwc):
    """max_unpool(max_pool_with_indices(x)) equals torch's unpooling of its own pooling, gradient included."""
    rank, sizes, window, strides, padding, _, _, seed = case
    rng = np.random.default_rng(seed)

    def ours(a, layout):
        return max_unpool(*max_pool_with_indices(a, window, strides, padding, layout=layout), sizes, layout)

    def theirs(a):
        values, indices = _torch_fn("max_pool", rank)(a, window, strides, padding, return_indices=True)
        return _torch_fn("max_unpool", rank)(values, indices, window, strides, padding, output_size=sizes)

    _check(ours, _input(rng, rank, sizes), theirs, rng, nhwc=nhwc)
