"""Pooling on ``lax.reduce_window``: max/min/sum/average/LP, global, adaptive, SPP, indices/unpool.

Every op takes batched inputs, ``layout="NHWC"`` or ``"NCHW"`` (1 to 3 spatial dims), and in
``NCHW`` agrees numerically with the matching ``torch.nn.functional`` call. Pooling has no
parameters and acts on each channel separately (notes 000, "Pooling in Multi-Channel
Convolution").

Geometry is canonicalized once per call (``_pool_geometry``): output sizes follow PyTorch's rule
(:func:`cnnjax.shapes.pool_output_size`), and ``ceil_mode`` is implemented by padding the high
side until the last window ends, so the reduce_window itself is always a plain VALID reduction
over an explicitly padded input. Max pools pad with ``-inf`` (the dtype's minimum for integers),
so padding never wins; sum and average pools pad with zeros.

Gradients of max/min pools go to the first extreme element of each window in scan order
(row-major over the window): the notes' "max id" (notes 002, pooling backprop), XLA's
``select_and_scatter`` rule and PyTorch's recorded index. The private reduction cores take
canonical, hashable geometry and are jitted with it static, so an eager call compiles one
program per geometry rather than one per primitive.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
from collections.abc import Sequence

import jax
import numpy as np
from jax import lax
from jax import numpy as jnp

from cnnjax import backprop
from cnnjax._canon import Layout, canonicalize_padding, canonicalize_tuple, layout_of, padding_pairs, require_float
from cnnjax.shapes import check_positive, pool_output_size, pool_window_counts

__all__ = [
    "adaptive_avg_pool",
    "adaptive_max_pool",
    "avg_pool",
    "global_avg_pool",
    "global_max_pool",
    "lp_pool",
    "max_pool",
    "max_pool_with_indices",
    "max_unpool",
    "min_pool",
    "spatial_pyramid_pool",
    "sum_pool",
]

SPP_MODES = ("max", "avg")
_GEOMETRY = ("window_shape", "strides", "padding", "window_dilation", "layout")


# --- boundary checks and geometry ------------------------------------------------------------


def _require_real(x, op: str) -> None:
    """Raise ``TypeError`` unless ``x`` holds real numbers (integers or floats), as max/min/sum need."""
    dtype = jnp.result_type(x)
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"{op}: x must have an integer or floating dtype, got dtype {np.dtype(dtype).name}")


@dataclasses.dataclass(frozen=True)
class _PoolGeometry:
    """Canonical pooling geometry: every field a tuple with one entry per spatial dim."""

    layout: Layout
    sizes: tuple[int, ...]
    window_shape: tuple[int, ...]
    strides: tuple[int, ...]
    window_dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    out: tuple[int, ...]

    @property
    def reduce_padding(self) -> tuple[tuple[int, int], ...]:
        """Padding under which a reduce_window yields exactly ``out`` windows.

        The user's padding where it already gives ``out`` windows (then the program is the bare
        ``lax.reduce_window`` a user would write); otherwise (``ceil_mode``'s overhang, or a high
        pad that a window would start in) the high side ends at the last window.
        """
        pairs = []
        for n, w, s, d, (lo, hi), o in zip(
            self.sizes, self.window_shape, self.strides, self.window_dilation, self.padding, self.out, strict=True
        ):
            span = d * (w - 1) + 1
            if (n + lo + hi - span) // s + 1 != o:
                hi = max((o - 1) * s + span - n - lo, 0)
            pairs.append((lo, hi))
        return tuple(pairs)

    def core_args(self, *, dilated: bool = True) -> dict:
        """Keyword arguments of the reduction cores (and of ``cnnjax.backprop``'s closed forms)."""
        args = {
            "window_shape": self.window_shape,
            "strides": self.strides,
            "padding": self.reduce_padding,
            "layout": self.layout,
        }
        if dilated:
            args["window_dilation"] = self.window_dilation
        return args


def _pool_geometry(x, window_shape, strides, padding, window_dilation, ceil_mode, layout, op) -> _PoolGeometry:
    """Canonicalize a pooling call once; raises ``ValueError`` if an output size would be < 1."""
    layout = layout_of(x, layout, op)
    rank = layout.spatial_rank
    sizes = layout.spatial(jnp.shape(x))
    window = canonicalize_tuple(window_shape, rank, "window_shape", op)
    strides = window if strides is None else canonicalize_tuple(strides, rank, "strides", op)
    dilation = canonicalize_tuple(window_dilation, rank, "window_dilation", op)
    pads = padding_pairs(canonicalize_padding(padding, rank, op), sizes, window, strides, dilation, op)
    for dim, (n, w, d, (lo, hi)) in enumerate(zip(sizes, window, dilation, pads, strict=True)):
        if n + lo + hi < d * (w - 1) + 1:
            raise ValueError(
                f"{op}: window_shape={window} with window_dilation={dilation} spans {d * (w - 1) + 1} along "
                f"spatial dim {dim}, more than the padded input {n + lo + hi} (size {n}, padding ({lo}, {hi})); "
                f"the output would be empty"
            )
    out = tuple(
        pool_output_size(n, w, s, pair, d, bool(ceil_mode))
        for n, w, s, pair, d in zip(sizes, window, strides, pads, dilation, strict=True)
    )
    return _PoolGeometry(layout, sizes, window, strides, dilation, pads, out)


def _extreme_value(dtype, lowest: bool):
    """The identity of max (``lowest``) or min: ``-inf``/``inf``, or the integer dtype's min/max."""
    if jnp.issubdtype(dtype, jnp.floating):
        return np.array(-np.inf if lowest else np.inf, dtype)
    info = jnp.iinfo(dtype)
    return np.array(info.min if lowest else info.max, dtype)


# --- reduction cores (canonical arguments) ---------------------------------------------------


def _window_taps(x, pad_value, *, window_shape, strides, padding, window_dilation, layout):
    """One strided slice of the padded input per window offset, in scan (row-major) order.

    Tap ``k`` holds, for every output, the input element under the window's ``k``-th position:
    reducing the taps elementwise equals a reduce_window, and stays differentiable where JAX's
    dilated reduce_window max/min is not.
    """
    xp = lax.pad(x, jnp.asarray(pad_value, x.dtype), layout.window([(lo, hi, 0) for lo, hi in padding], (0, 0, 0)))
    padded = layout.spatial(xp.shape)
    out = [
        (m - d * (w - 1) - 1) // s + 1
        for m, w, s, d in zip(padded, window_shape, strides, window_dilation, strict=True)
    ]
    batch, channels = xp.shape[0], layout.channels(xp.shape)
    taps = []
    for offset in itertools.product(*(range(w) for w in window_shape)):
        start = [o * d for o, d in zip(offset, window_dilation, strict=True)]
        limit = [b + (m - 1) * s + 1 for b, m, s in zip(start, out, strides, strict=True)]
        taps.append(
            lax.slice(xp, layout.window(start, 0), layout.shape(batch, limit, channels), layout.window(strides))
        )
    return taps


def _first_best(taps, beats):
    """Fold taps ``(value, *payload)`` keeping the first tap in scan order that no later one beats.

    Only a strictly better value (or a NaN, which propagates as in lax.max) replaces the
    current one, so ties go to the first tap: XLA's select rule for the max-pool gradient
    and PyTorch's recorded index. ``jnp.where`` routes the whole gradient to the kept tap.
    """
    best = taps[0]
    for tap in taps[1:]:
        take = beats(tap[0], best[0]) | jnp.isnan(tap[0])
        best = tuple(jnp.where(take, new, old) for new, old in zip(tap, best, strict=True))
    return best


@functools.partial(jax.jit, static_argnames=("take_max", *_GEOMETRY))
def _extreme_pool(x, take_max: bool, *, window_shape, strides, padding, window_dilation, layout):
    """Max (``take_max``) or min over windows of ``x`` padded with that reduction's identity."""
    init = _extreme_value(x.dtype, lowest=take_max)
    if all(d == 1 for d in window_dilation):
        return lax.reduce_window(
            x,
            init,
            lax.max if take_max else lax.min,
            layout.window(window_shape),
            layout.window(strides),
            layout.window(padding, (0, 0)),
        )
    # JAX has no JVP for a dilated reduce_window max/min: fold strided slices instead.
    taps = _window_taps(
        x,
        init,
        window_shape=window_shape,
        strides=strides,
        padding=padding,
        window_dilation=window_dilation,
        layout=layout,
    )
    return _first_best([(tap,) for tap in taps], lax.gt if take_max else lax.lt)[0]


def _max_pool_core(x, *, window_shape, strides, padding, window_dilation, layout):
    """Max over windows of ``x`` padded with ``-inf`` (the dtype's min for ints); canonical args."""
    return _extreme_pool(
        x,
        True,
        window_shape=window_shape,
        strides=strides,
        padding=padding,
        window_dilation=window_dilation,
        layout=layout,
    )


def _min_pool_core(x, *, window_shape, strides, padding, window_dilation, layout):
    """Min over windows of ``x`` padded with ``inf`` (the dtype's max for ints); canonical args."""
    return _extreme_pool(
        x,
        False,
        window_shape=window_shape,
        strides=strides,
        padding=padding,
        window_dilation=window_dilation,
        layout=layout,
    )


@functools.partial(jax.jit, static_argnames=_GEOMETRY)
def _sum_pool_core(x, *, window_shape, strides, padding, layout, window_dilation=None):
    """Sum over windows of ``x`` padded with zeros; canonical args (``None`` dilation = 1)."""
    return lax.reduce_window(
        x,
        np.array(0, x.dtype),
        lax.add,
        layout.window(window_shape),
        layout.window(strides),
        layout.window(padding, (0, 0)),
        window_dilation=None if window_dilation is None else layout.window(window_dilation),
    )


def _windowed(reduction: str, x, vjp, op: str, geometry: _PoolGeometry):
    """Max or sum pool through its reduce_window core, or through the notes' closed-form VJP
    (``cnnjax.backprop``) when ``vjp`` resolves to ``"closed_form"``."""
    closed_form = backprop.resolve_vjp(vjp, op) == "closed_form"
    if reduction == "max":
        args = geometry.core_args()
        return backprop.max_pool_closed_form(x, **args) if closed_form else _max_pool_core(x, **args)
    args = geometry.core_args(dilated=False)
    return backprop.sum_pool_closed_form(x, **args) if closed_form else _sum_pool_core(x, **args)


def _avg_divisor(geometry: _PoolGeometry, count_include_pad: bool) -> np.ndarray:
    """PyTorch's average-pool divisor for every output, shaped to broadcast against it.

    Per dim, the window taps inside the padded input (``count_include_pad``) or inside the
    input; never the ``ceil_mode`` overhang past the padding. A window with no such tap sums
    to 0 and gets divisor 1, giving 0 as PyTorch does. The per-dim counts multiply because
    windows are boxes.
    """
    divisor = np.ones(())
    for n, w, s, pair, o in zip(
        geometry.sizes, geometry.window_shape, geometry.strides, geometry.padding, geometry.out, strict=True
    ):
        divisor = np.multiply.outer(divisor, pool_window_counts(n, w, s, pair, o, count_include_pad))
    return divisor.reshape(geometry.layout.shape(1, geometry.out, 1))


def _average(x, geometry: _PoolGeometry, count_include_pad: bool, divisor_override: int | None, vjp, op: str):
    """Window sums of ``x`` divided elementwise as PyTorch's ``avg_pool`` does."""
    total = _windowed("sum", x, vjp, op, geometry)
    divisor = _avg_divisor(geometry, count_include_pad) if divisor_override is None else divisor_override
    return total / jnp.asarray(divisor, x.dtype)


# --- windowed pools ---------------------------------------------------------------------------


def max_pool(
    x,
    window_shape,
    strides=None,
    padding="VALID",
    *,
    window_dilation=1,
    ceil_mode: bool = False,
    layout: str = "NHWC",
    impl: str = "auto",
):
    """Max over each window; PyTorch's ``max_pool1d/2d/3d`` in ``NCHW``.

    ``x: (N, *spatial, C)`` (or ``(N, C, *spatial)``) -> ``(N, *out, C)`` with, per dim,
    ``out = floor_or_ceil((n + lo + hi - d*(w-1) - 1) / s) + 1`` (:func:`cnnjax.shapes.pool_output_size`;
    with ``ceil_mode`` a window that starts inside the input or left padding counts even when it
    hangs over the end). ``strides=None`` means strides = window. Padding is ``-inf`` (the dtype's
    minimum for integers), so it never wins (a window lying wholly in padding, which needs more
    padding than PyTorch allows, gives ``-inf``); integer inputs stay integers. Ties send the gradient
    to the first maximum in scan order (XLA's rule), also with ``window_dilation > 1``, which
    is built from strided slices because JAX cannot differentiate a dilated reduce_window max.
    ``vjp``: ``"auto"``, ``"xla"`` (JAX autodiff) or ``"closed_form"`` (:mod:`cnnjax.backprop`).

    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> max_pool(x, 2)[0, ..., 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
    """
    op = "max_pool"
    x = jnp.asarray(x)
    _require_real(x, op)
    geometry = _pool_geometry(x, window_shape, strides, padding, window_dilation, ceil_mode, layout, op)
    return _windowed("max", x, {"lax": "xla"}.get(impl, impl), op, geometry)


def min_pool(
    x,
    window_shape,
    strides=None,
    padding="VALID",
    *,
    window_dilation=1,
    ceil_mode: bool = False,
    layout="NHWC",
    impl: str = "auto",
):
    """Min over each window; geometry exactly as :func:`max_pool`.

    ``x: (N, *spatial, C)`` -> ``(N, *out, C)``, ``out`` as :func:`max_pool`. Padding is ``inf``
    (the dtype's maximum for integers), so it never wins; ties send the gradient to the first
    minimum in scan order.

    >>> min_pool(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, ..., 0]
    Array([[ 0.,  2.],
           [ 8., 10.]], dtype=float32)
    """
    op = "min_pool"
    x = jnp.asarray(x)
    _require_real(x, op)
    geometry = _pool_geometry(x, window_shape, strides, padding, window_dilation, ceil_mode, layout, op)
    return _min_pool_core(x, **geometry.core_args())


def sum_pool(
    x,
    window_shape,
    strides=None,
    padding="VALID",
    *,
    window_dilation=1,
    ceil_mode: bool = False,
    layout="NHWC",
    impl: str = "auto",
):
    """Sum over each window, padding with zeros; geometry exactly as :func:`max_pool`.

    ``x: (N, *spatial, C)`` -> ``(N, *out, C)``, ``out`` as :func:`max_pool`. Integer inputs
    sum in their own dtype (as lax does, wrapping on overflow).

    >>> sum_pool(jnp.arange(16).reshape(1, 4, 4, 1), 2)[0, ..., 0]
    Array([[10, 18],
           [42, 50]], dtype=int32)
    """
    op = "sum_pool"
    x = jnp.asarray(x)
    _require_real(x, op)
    geometry = _pool_geometry(x, window_shape, strides, padding, window_dilation, ceil_mode, layout, op)
    return _sum_pool_core(x, **geometry.core_args())


def avg_pool(
    x,
    window_shape,
    strides=None,
    padding="VALID",
    *,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    layout: str = "NHWC",
    impl: str = "auto",
):
    """Mean over each window, exactly PyTorch's ``avg_pool1d/2d/3d`` in ``NCHW``.

    ``x: (N, *spatial, C)`` float -> ``(N, *out, C)``, ``out`` as :func:`max_pool`. Padding is
    zeros. The divisor is, per window, the number of taps inside the padded input
    (``count_include_pad=True``) or inside the input (``False``), never counting the
    ``ceil_mode`` overhang past the padding; ``divisor_override`` (an int >= 1) replaces it.
    A window lying wholly in padding gives 0 (PyTorch's convention). ``vjp`` as :func:`max_pool`
    (the closed form is for the window sum; the division is elementwise).

    >>> avg_pool(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, ..., 0]
    Array([[ 2.5,  4.5],
           [10.5, 12.5]], dtype=float32)
    """
    op = "avg_pool"
    x = jnp.asarray(x)
    require_float(x, op)
    if divisor_override is not None:
        divisor_override = check_positive(divisor_override, "divisor_override", op)
    geometry = _pool_geometry(x, window_shape, strides, padding, 1, ceil_mode, layout, op)
    return _average(x, geometry, bool(count_include_pad), divisor_override, {"lax": "xla"}.get(impl, impl), op)


def lp_pool(
    x,
    p,
    window_shape,
    strides=None,
    padding="VALID",
    *,
    ceil_mode: bool = False,
    layout: str = "NHWC",
    impl: str = "auto",
):
    """Power-average pooling ``(sum_window x**p) ** (1/p)``, exactly PyTorch's ``lp_pool1d/2d/3d``.

    ``x: (N, *spatial, C)`` float -> ``(N, *out, C)``, ``out`` as :func:`max_pool` (PyTorch's
    ``lp_pool`` has no padding argument; here zero padding adds nothing to the sum). PyTorch's
    definition is kept literally, ``(avg_pool(x**p) * prod(window_shape)) ** (1/p)``, so:
    ``x**p`` takes no absolute value (``p=1`` is the plain window sum, and an odd ``p`` with a
    negative window sum gives NaN); with ``ceil_mode`` an overhanging window's sum is scaled by
    ``window size / taps inside``; the gradient is 0 where the window sum is 0. ``p=inf`` is the
    max of ``|x|``, as in PyTorch. ``p`` must be > 0.

    >>> lp_pool(jnp.full((1, 4, 4, 1), 3.0), 2, 2)[0, ..., 0]
    Array([[6., 6.],
           [6., 6.]], dtype=float32)
    """
    op = "lp_pool"
    x = jnp.asarray(x)
    require_float(x, op)
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p > 0:
        raise ValueError(f"{op}: p={p!r} must be a number > 0 (or inf)")
    geometry = _pool_geometry(x, window_shape, strides, padding, 1, ceil_mode, layout, op)
    if math.isinf(p):
        return _max_pool_core(jnp.abs(x), **geometry.core_args())
    total = _average(x**p, geometry, True, None, "auto", op) * math.prod(geometry.window_shape)
    nonzero = total != 0
    # PyTorch's sign(s) * relu(|s|) makes the gradient 0 where s == 0; the double where does the same.
    return jnp.where(nonzero, jnp.where(nonzero, total, 1) ** (1.0 / p), 0)


# --- global, adaptive and pyramid pools -------------------------------------------------------


def _whole_window(x, layout, op) -> _PoolGeometry:
    """One window covering every spatial position."""
    layout = layout_of(x, layout, op)
    sizes = layout.spatial(jnp.shape(x))
    ones = (1,) * layout.spatial_rank
    return _PoolGeometry(layout, sizes, sizes, sizes, ones, ((0, 0),) * layout.spatial_rank, ones)


def global_max_pool(x, keepdims: bool = False, layout: str = "NHWC", *, impl: str = "auto"):
    """Max over all spatial positions of each channel.

    ``x: (N, *spatial, C)`` -> ``(N, C)``, or ``(N, 1, ..., 1, C)`` with ``keepdims``. Equals
    :func:`max_pool` with the window covering the whole map, gradient tie rule included.

    >>> global_max_pool(jnp.arange(8.0).reshape(1, 2, 2, 2))
    Array([[6., 7.]], dtype=float32)
    """
    op = "global_max_pool"
    x = jnp.asarray(x)
    _require_real(x, op)
    geometry = _whole_window(x, layout, op)
    y = _max_pool_core(x, **geometry.core_args())
    return y if keepdims else jnp.squeeze(y, geometry.layout.spatial_axes)


def global_avg_pool(x, keepdims: bool = False, layout: str = "NHWC", *, impl: str = "auto"):
    """Mean over all spatial positions of each channel (notes 002: a ``7x7x1000`` map -> ``1x1x1000``).

    ``x: (N, *spatial, C)`` float -> ``(N, C)``, or ``(N, 1, ..., 1, C)`` with ``keepdims``.

    >>> global_avg_pool(jnp.arange(8.0).reshape(1, 2, 2, 2))
    Array([[3., 4.]], dtype=float32)
    """
    op = "global_avg_pool"
    x = jnp.asarray(x)
    require_float(x, op)
    axes = _whole_window(x, layout, op).layout.spatial_axes
    return jnp.mean(x, axis=axes, keepdims=keepdims)


def _adaptive_bins(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's adaptive bins: bin ``i`` is ``[floor(i*size/out), ceil((i+1)*size/out))``."""
    i = np.arange(out)
    return (i * size) // out, -(-(i + 1) * size // out)


@functools.partial(jax.jit, static_argnames=("axis", "size", "out", "take_max"))
def _adaptive_axis(x, axis: int, size: int, out: int, take_max: bool):
    """Adaptive max or mean along one axis, through a ``(out, size)`` bin-membership mask."""
    start, end = _adaptive_bins(size, out)
    position = np.arange(size)
    inside = (position >= start[:, None]) & (position < end[:, None])
    x = jnp.moveaxis(x, axis, -1)[..., None, :]
    if take_max:
        masked = jnp.where(inside, x, _extreme_value(x.dtype, lowest=True))
        # argmax picks the first maximum (or NaN) of each bin: scan order, as the window pools do.
        first = jnp.argmax(masked, axis=-1, keepdims=True) == position
        y = jnp.sum(jnp.where(first, masked, 0), axis=-1, dtype=x.dtype)
    else:
        y = jnp.sum(jnp.where(inside, x, 0), axis=-1) / jnp.asarray(end - start, x.dtype)
    return jnp.moveaxis(y, -1, axis)


def _adaptive_pool(x, output_size, layout, take_max: bool, op: str):
    """Adaptive max or mean over PyTorch's bins (``None`` in ``output_size`` keeps that size)."""
    layout = layout_of(x, layout, op)
    rank = layout.spatial_rank
    sizes = layout.spatial(x.shape)
    if isinstance(output_size, Sequence) and len(output_size) == rank:
        output_size = [n if o is None else o for n, o in zip(sizes, output_size, strict=True)]
    out = canonicalize_tuple(output_size, rank, "output_size", op)
    if all(n % o == 0 for n, o in zip(sizes, out, strict=True)):
        window = tuple(n // o for n, o in zip(sizes, out, strict=True))
        geometry = _PoolGeometry(layout, sizes, window, window, (1,) * rank, ((0, 0),) * rank, out)
        if take_max:
            return _max_pool_core(x, **geometry.core_args())
        return _sum_pool_core(x, **geometry.core_args()) / math.prod(window)
    # Bins are boxes, so the pool is separable; the last axis goes first so that ties resolve
    # to the first element in row-major order, as a reduce_window would.
    for axis, n, o in reversed(list(zip(layout.spatial_axes, sizes, out, strict=True))):
        x = _adaptive_axis(x, axis, n, o, take_max)
    return x


def adaptive_max_pool(x, output_size, layout: str = "NHWC", *, impl: str = "auto"):
    """Max over PyTorch's adaptive bins; ``adaptive_max_pool1d/2d/3d`` in ``NCHW``.

    ``x: (N, *spatial, C)`` -> ``(N, *output_size, C)``. Along a dim of length ``L`` with
    ``o`` outputs, bin ``i`` covers ``[floor(i*L/o), ceil((i+1)*L/o))``: bins may overlap and
    always cover the input (unlike notes 002's SPP rule ``win = ceil(L/o), stride = floor(L/o)``,
    which can give the wrong count). ``output_size``: an int, or one entry per spatial dim
    (``None`` keeps that dim's size). Integer inputs stay integers.

    >>> adaptive_max_pool(jnp.arange(5.0).reshape(1, 5, 1), 3, layout="NWC")[0, :, 0]
    Array([1., 3., 4.], dtype=float32)
    """
    op = "adaptive_max_pool"
    x = jnp.asarray(x)
    _require_real(x, op)
    return _adaptive_pool(x, output_size, layout, True, op)


def adaptive_avg_pool(x, output_size, layout: str = "NHWC", *, impl: str = "auto"):
    """Mean over PyTorch's adaptive bins; ``adaptive_avg_pool1d/2d/3d`` in ``NCHW``.

    ``x: (N, *spatial, C)`` float -> ``(N, *output_size, C)``, bins as :func:`adaptive_max_pool`.

    >>> adaptive_avg_pool(jnp.arange(5.0).reshape(1, 5, 1), 3, layout="NWC")[0, :, 0]
    Array([0.5, 2. , 3.5], dtype=float32)
    """
    op = "adaptive_avg_pool"
    x = jnp.asarray(x)
    require_float(x, op)
    return _adaptive_pool(x, output_size, layout, False, op)


def spatial_pyramid_pool(x, levels=(1, 2, 4), mode: str = "max", layout: str = "NHWC", *, impl: str = "auto"):
    """Spatial pyramid pooling (notes 002, SPPNet: He et al. 2014, arXiv:1406.4729).

    ``x: (N, *spatial, C)`` -> ``(N, C * sum(l**rank for l in levels))``: for each level ``l``,
    :func:`adaptive_max_pool` (``mode="max"``) or :func:`adaptive_avg_pool` (``"avg"``) to
    ``(l,) * rank`` bins, flattened in the layout's order (NHWC: ``(l, l, C)``; NCHW:
    ``(C, l, l)``), concatenated level by level. Any input size gives the same length.

    >>> spatial_pyramid_pool(jnp.ones((2, 13, 13, 3)), (1, 2)).shape
    (2, 15)
    """
    op = "spatial_pyramid_pool"
    if mode not in SPP_MODES:
        raise ValueError(f"{op}: mode={mode!r} is not one of {SPP_MODES}")
    if not isinstance(levels, Sequence) or not levels:
        raise TypeError(f"{op}: levels must be a non-empty sequence of ints, got {levels!r}")
    pool = adaptive_max_pool if mode == "max" else adaptive_avg_pool
    x = jnp.asarray(x)
    levels = [canonicalize_tuple(level, 1, "levels", op)[0] for level in levels]
    return jnp.concatenate([pool(x, level, layout).reshape(x.shape[0], -1) for level in levels], axis=1)


# --- indices and unpooling --------------------------------------------------------------------


def max_pool_with_indices(
    x,
    window_shape,
    strides=None,
    padding="VALID",
    *,
    window_dilation=1,
    ceil_mode: bool = False,
    layout="NHWC",
    impl: str = "auto",
):
    """:func:`max_pool` plus where each maximum came from, as PyTorch's ``return_indices=True``.

    ``x: (N, *spatial, C)`` -> ``(values, indices)``, both ``(N, *out, C)`` (``out`` as
    :func:`max_pool`). ``indices`` (int32) are flat into each input plane: ``w`` in 1-D,
    ``h*W + w`` in 2-D, ``(d*H + h)*W + w`` in 3-D; ties pick the first maximum in scan order,
    and a window lying wholly in padding gives index -1. ``values`` equal :func:`max_pool`'s,
    gradient included; the indices are integers (no gradient). Feed both to :func:`max_unpool`.

    >>> values, indices = max_pool_with_indices(jnp.array([[[3.0], [1.0], [2.0], [5.0]]]), 2, layout="NWC")
    >>> values[0, :, 0], indices[0, :, 0]
    (Array([3., 5.], dtype=float32), Array([0, 3], dtype=int32))
    """
    op = "max_pool_with_indices"
    x = jnp.asarray(x)
    _require_real(x, op)
    return _max_with_indices(
        x, _pool_geometry(x, window_shape, strides, padding, window_dilation, ceil_mode, layout, op)
    )


@functools.partial(jax.jit, static_argnames="geometry")
def _max_with_indices(x, geometry: _PoolGeometry):
    """Fold the window taps of ``x`` and of its flat in-plane positions together."""
    plane = jnp.arange(math.prod(geometry.sizes), dtype=jnp.int32).reshape(geometry.layout.shape(1, geometry.sizes, 1))
    args = geometry.core_args()
    value_taps = _window_taps(x, _extreme_value(x.dtype, lowest=True), **args)
    index_taps = _window_taps(jnp.broadcast_to(plane, x.shape), -1, **args)
    return _first_best(list(zip(value_taps, index_taps, strict=True)), lax.gt)


def max_unpool(values, indices, output_size, layout: str = "NHWC"):
    """Scatter pooled maxima back to their positions; PyTorch's ``max_unpool1d/2d/3d``.

    ``values``, ``indices: (N, *pooled, C)`` (from :func:`max_pool_with_indices`) ->
    ``(N, *output_size, C)``, zero except ``out[n, ..., c].flat[indices[n, ..., c]] = values[n, ..., c]``.
    ``output_size``: the spatial size of the pooled input (an int, one int per spatial dim, or
    a full array shape). Indices outside ``[0, prod(output_size))`` are dropped (PyTorch raises;
    a jitted function cannot inspect them).

    >>> max_unpool(jnp.array([[[3.0], [5.0]]]), jnp.array([[[0], [3]]]), 4, layout="NWC")[0, :, 0]
    Array([3., 0., 0., 5.], dtype=float32)
    """
    op = "max_unpool"
    values, indices = jnp.asarray(values), jnp.asarray(indices)
    layout = layout_of(values, layout, op, "values")
    if indices.shape != values.shape:
        raise ValueError(f"{op}: indices shape {indices.shape} must equal values shape {values.shape}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"{op}: indices must have an integer dtype, got dtype {np.dtype(indices.dtype).name}")
    rank = layout.spatial_rank
    if isinstance(output_size, Sequence) and len(output_size) == rank + 2:
        output_size = layout.spatial(output_size)
    out = canonicalize_tuple(output_size, rank, "output_size", op)
    return _unpool(values, indices, out=out, layout=layout)


@functools.partial(jax.jit, static_argnames=("out", "layout"))
def _unpool(values, indices, *, out: tuple[int, ...], layout: Layout):
    """Scatter each (batch, channel) plane of ``values`` to its flat ``indices`` in a zero plane of size ``out``."""
    batch, channels, size = values.shape[0], layout.channels(values.shape), math.prod(out)

    def planes(a):
        return jnp.moveaxis(a, layout.channel_axis, 1).reshape(batch * channels, -1)

    flat = planes(indices)
    flat = jnp.where((flat >= 0) & (flat < size), flat, size)
    scattered = _scatter_rows(planes(values), flat, size)
    return jnp.moveaxis(scattered.reshape(batch, channels, *out), 1, layout.channel_axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scatter_rows(values, flat, size: int):
    """``out[r, flat[r, j]] = values[r, j]`` into zero rows of length ``size``; index ``size`` is dropped."""
    rows = jnp.arange(values.shape[0])[:, None]
    return jnp.zeros((values.shape[0], size), values.dtype).at[rows, flat].set(values, mode="drop")


def _scatter_rows_fwd(values, flat, size):
    return _scatter_rows(values, flat, size), flat


def _scatter_rows_bwd(size, flat, cotangent):
    # PyTorch's max_unpool backward, a gather: every pooled value gets the gradient at its
    # position, also where overlapping windows share one (a scatter's autodiff would pick one).
    return jnp.take_along_axis(cotangent, flat, axis=1, mode="fill", fill_value=0), None


_scatter_rows.defvjp(_scatter_rows_fwd, _scatter_rows_bwd)
