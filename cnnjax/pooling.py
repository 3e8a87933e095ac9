"""Pooling on ``lax.reduce_window``: max/min/sum/average/LP, global, adaptive, SPP, indices/unpool.

Every op takes channels-last inputs (``layout=None``, or ``"NWC"``/``"NHWC"``/``"NDHWC"``) or
channels-first ones (``"NCW"``/``"NCHW"``/``"NCDHW"``, where it agrees numerically with the
matching ``torch.nn.functional`` call), for 1 to 3 spatial dims: the length of a
``window_shape``/``output_size`` sequence, else the rank the layout names, else the input's rank
minus 2. Inputs are batched, ``(N, *spatial, C)``, or unbatched, ``(*spatial, C)``, whose results
have no batch axis (:func:`cnnjax._canon.layout_of`, the rank rule). Pooling has no parameters
and acts on each channel separately (docs/pooling.md).

Geometry is canonicalized once per call (:func:`cnnjax._canon.pool_geometry`): output sizes
follow PyTorch's rule (:func:`cnnjax.shapes.pool_output_size`), and ``ceil_mode`` is implemented
by padding the high side until the last window ends, so the window reduction itself is always a
plain VALID reduction over an explicitly padded input. Every window must hold at least one input
element (padding that leaves a window only padding raises ``ValueError``). Max pools pad with
``-inf`` (the dtype's minimum for integers) and padding never wins, not even a tie against a real
``-inf``; sum and average pools pad with zeros.

Gradients of max/min pools go to the first extreme element of each window in scan order
(row-major over the window): the notes' "max id" (docs/backprop.md), XLA's
``select_and_scatter`` rule and PyTorch's recorded index. ``impl`` (:mod:`cnnjax.backprop`) picks
cnnjax's primitives (``"auto"``, ``"closed_form"``) or ``lax.reduce_window`` and JAX's autodiff
(``"lax"``). The private cores take canonical, hashable geometry and are jitted with it static,
so an eager call compiles one program per geometry rather than one per primitive.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import jax
import numpy as np
from jax import lax
from jax import numpy as jnp

from cnnjax import _primitives, backprop
from cnnjax._canon import (
    Layout,
    PoolGeometry,
    canonicalize_tuple,
    check_impl,
    layout_of,
    pool_geometry,
    require_float,
    with_batch_axis,
    without_batch_axis,
)

__all__ = [
    "adaptive_avg_pool",
    "adaptive_max_pool",
    "adaptive_max_pool_with_indices",
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


# --- boundary checks and geometry ------------------------------------------------------------


def _require_real(x, op: str) -> None:
    """Raise ``TypeError`` unless ``x`` holds real numbers (integers or floats), as max/min/sum need."""
    dtype = jnp.result_type(x)
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"{op}: x must have an integer or floating dtype, got dtype {np.dtype(dtype).name}")


def _input(op: str, x, layout, per_dim=None, arg: str = "x"):
    """The rank rule (:func:`cnnjax._canon.layout_of`; ``per_dim``: ``(name, value)`` of a
    ``window_shape``/``output_size``): ``(x with a batch axis, Layout, batched)``."""
    layout, batched = layout_of(np.shape(x), layout, op, per_dim=per_dim, arg=arg)
    return with_batch_axis(x, batched), layout, batched


def _windowed(
    op: str, reduce, x, window_shape, strides, padding, window_dilation, ceil_mode, layout, impl, require=None
):
    """Every windowed pool's boundary, once: ``x``'s dtype (``require``, default real) and ``impl``
    checked, the rank rule applied and the geometry canonicalized (:func:`_geometry`); then
    ``reduce(x, geometry=..., impl=...)`` on the batched input, its result without an added batch axis."""
    x = jnp.asarray(x)
    (require or _require_real)(x, op)
    impl = check_impl(impl, op)
    x, geometry, batched = _geometry(x, window_shape, strides, padding, window_dilation, ceil_mode, layout, op)
    return without_batch_axis(reduce(x, geometry=geometry, impl=impl), batched)


def _geometry(x, window_shape, strides, padding, window_dilation, ceil_mode, layout, op):
    """A windowed pool's boundary: ``(x with a batch axis, PoolGeometry, batched)``."""
    x, layout, batched = _input(op, x, layout, ("window_shape", window_shape))
    geometry = pool_geometry(op, x.shape, layout, window_shape, strides, padding, window_dilation, ceil_mode)
    return x, geometry, batched


# --- reduction cores (canonical arguments) ---------------------------------------------------


@functools.partial(jax.jit, static_argnames=("geometry", "select", "impl"))
def _extreme(x, geometry: PoolGeometry, select: str, impl: str):
    """Max (``select="max"``) or min over windows of ``x``; padding never wins."""
    if impl != "lax":
        return _primitives.window_max(x, geometry, select, impl)
    if any(d != 1 for d in geometry.dilation):
        # JAX has no derivative for a dilated reduce_window max/min: gather at the arg-max instead.
        return backprop.tap_gather(x, backprop.window_argmax(lax.stop_gradient(x), geometry, select)[1], geometry)
    if any(lo or hi for lo, hi in geometry.reduce_padding) and jnp.issubdtype(x.dtype, jnp.floating):
        return _padded_reduce_window(x, geometry, select)
    return backprop.window_max(x, geometry, select)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _padded_reduce_window(x, geometry: PoolGeometry, select: str):
    """:func:`cnnjax.backprop.window_max` (its forward program, unchanged) whose derivative goes to each window's
    first extreme real element: JAX's own rule can pick the ``-inf`` padding over a real ``-inf``
    there, and the gradient is lost. The tangent is a plain ``lax`` gather at the arg-max."""
    return backprop.window_max(x, geometry, select)


@_padded_reduce_window.defjvp
def _padded_reduce_window_jvp(geometry, select, primals, tangents):
    (x,), (t,) = primals, tangents
    tap = backprop.window_argmax(lax.stop_gradient(x), geometry, select)[1]
    return _padded_reduce_window(x, geometry, select), backprop.tap_gather(t, tap, geometry)


@functools.partial(jax.jit, static_argnames=("geometry", "impl"))
def _window_sum(x, geometry: PoolGeometry, impl: str):
    """Sum over windows of ``x`` padded with zeros."""
    if impl == "lax":
        return backprop.window_sum(x, geometry)
    return _primitives.window_sum(x, geometry, impl)


def _average(x, geometry: PoolGeometry, count_include_pad: bool, divisor_override: int | None, impl: str):
    """Window sums of ``x`` divided elementwise as PyTorch's ``avg_pool`` does."""
    total = _window_sum(x, geometry, impl)
    divisor = backprop.window_divisor(geometry, count_include_pad) if divisor_override is None else divisor_override
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
    layout: str | None = None,
    impl: str = "auto",
):
    """Max over each window; PyTorch's ``max_pool1d/2d/3d`` in channels-first layouts.

    ``x: (N, *spatial, C)`` (or ``(N, C, *spatial)``; or either without ``N``, unbatched) ->
    ``(N, *out, C)`` (the same layout and batching) with, per dim,
    ``out = floor_or_ceil((n + lo + hi - d*(w-1) - 1) / s) + 1`` (:func:`cnnjax.shapes.pool_output_size`;
    with ``ceil_mode`` a window that starts inside the input or left padding counts even when it
    hangs over the end). The spatial rank is ``len(window_shape)`` for a sequence, else the rank
    ``layout`` names, else ``x.ndim - 2``. ``strides=None`` means strides = window. Every window
    must hold an input element (``ValueError`` otherwise). Padding is ``-inf`` (the dtype's
    minimum for integers) and never wins, not even a tie against a real ``-inf``: the value, the
    gradient and the index then go to the window's first real element, as in PyTorch; integer
    inputs stay integers. Ties send the gradient to the first maximum in scan order (XLA's and
    PyTorch's rule), also with ``window_dilation > 1``. ``impl``: ``"auto"``, ``"closed_form"`` or
    ``"lax"`` (:mod:`cnnjax.backprop`; with ``"lax"``, the bare ``lax.reduce_window`` and JAX's
    autodiff of it where nothing is padded; with padding, the same forward whose derivative is a
    gather at each window's arg-max, so that padding never takes the gradient).

    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> max_pool(x, 2)[0, ..., 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
    >>> max_pool(jnp.arange(16.0).reshape(1, 4, 4), (2, 2), layout="NCHW")  # unbatched (C, H, W)
    Array([[[ 5.,  7.],
            [13., 15.]]], dtype=float32)
    """
    reduce = functools.partial(_extreme, select="max")
    return _windowed("max_pool", reduce, x, window_shape, strides, padding, window_dilation, ceil_mode, layout, impl)


def min_pool(
    x,
    window_shape,
    strides=None,
    padding="VALID",
    *,
    window_dilation=1,
    ceil_mode: bool = False,
    layout: str | None = None,
    impl: str = "auto",
):
    """Min over each window; geometry and ranks exactly as :func:`max_pool`.

    ``x: (N, *spatial, C)`` -> ``(N, *out, C)`` (unbatched: without ``N``), ``out`` as :func:`max_pool`. Padding is ``inf``
    (the dtype's maximum for integers) and never wins; ties send the gradient to the first
    minimum in scan order. ``impl`` as :func:`max_pool`.

    >>> min_pool(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, ..., 0]
    Array([[ 0.,  2.],
           [ 8., 10.]], dtype=float32)
    """
    reduce = functools.partial(_extreme, select="min")
    return _windowed("min_pool", reduce, x, window_shape, strides, padding, window_dilation, ceil_mode, layout, impl)


def sum_pool(
    x,
    window_shape,
    strides=None,
    padding="VALID",
    *,
    window_dilation=1,
    ceil_mode: bool = False,
    layout: str | None = None,
    impl: str = "auto",
):
    """Sum over each window, padding with zeros; geometry and ranks exactly as :func:`max_pool`.

    ``x: (N, *spatial, C)`` -> ``(N, *out, C)`` (unbatched: without ``N``), ``out`` as :func:`max_pool`. Integer inputs
    sum in their own dtype (as lax does, wrapping on overflow). ``impl`` as :func:`max_pool`.

    >>> sum_pool(jnp.arange(16).reshape(1, 4, 4, 1), 2)[0, ..., 0]
    Array([[10, 18],
           [42, 50]], dtype=int32)
    """
    return _windowed(
        "sum_pool", _window_sum, x, window_shape, strides, padding, window_dilation, ceil_mode, layout, impl
    )


def avg_pool(
    x,
    window_shape,
    strides=None,
    padding="VALID",
    *,
    window_dilation=1,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
    layout: str | None = None,
    impl: str = "auto",
):
    """Mean over each window, exactly PyTorch's ``avg_pool1d/2d/3d`` in channels-first layouts.

    ``x: (N, *spatial, C)`` float -> ``(N, *out, C)`` (unbatched: without ``N``), ``out`` and
    ranks as :func:`max_pool`. Padding is zeros. The divisor is, per window, the number of taps
    inside the padded input (``count_include_pad=True``) or inside the input (``False``), never
    counting the ``ceil_mode`` overhang past the padding; ``divisor_override``, any nonzero int
    (negative ones too, as in PyTorch), replaces it. ``window_dilation`` spaces the taps as in
    :func:`max_pool` (ONNX's ``AveragePool`` ``dilations``; PyTorch has none), and the divisor
    counts the dilated taps. ``impl`` as :func:`max_pool` (the primitive is the window sum; the
    division is elementwise).

    >>> avg_pool(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, ..., 0]
    Array([[ 2.5,  4.5],
           [10.5, 12.5]], dtype=float32)
    """
    op = "avg_pool"
    if divisor_override is not None:
        if isinstance(divisor_override, bool) or not hasattr(divisor_override, "__index__"):
            raise TypeError(f"{op}: divisor_override must be an int, got {divisor_override!r}")
        divisor_override = int(divisor_override.__index__())
        if divisor_override == 0:
            raise ValueError(f"{op}: divisor_override=0 must be a nonzero int")

    def reduce(x, geometry, impl):
        return _average(x, geometry, bool(count_include_pad), divisor_override, impl)

    return _windowed(
        op, reduce, x, window_shape, strides, padding, window_dilation, ceil_mode, layout, impl, require_float
    )


def lp_pool(
    x,
    p,
    window_shape,
    strides=None,
    padding="VALID",
    *,
    window_dilation=1,
    ceil_mode: bool = False,
    layout: str | None = None,
    impl: str = "auto",
):
    """Power-average pooling ``(sum_window x**p) ** (1/p)``, exactly PyTorch's ``lp_pool1d/2d/3d``.

    ``x: (N, *spatial, C)`` float -> ``(N, *out, C)`` (unbatched: without ``N``), ``out`` and
    ranks as :func:`max_pool` (PyTorch's
    ``lp_pool`` has no padding argument; here zero padding adds nothing to the sum). PyTorch's
    definition is kept literally, ``(avg_pool(x**p) * prod(window_shape)) ** (1/p)``, so:
    ``x**p`` takes no absolute value (``p=1`` is the plain window sum, and an odd ``p`` with a
    negative window sum gives NaN); with ``ceil_mode`` an overhanging window's sum is scaled by
    ``window size / taps inside``; the gradient is 0 where the window sum is 0. ``p=inf`` is the
    max of ``|x|``, as in PyTorch. ``p`` must be > 0. ``window_dilation`` spaces the taps as in
    :func:`max_pool` (ONNX's ``LpPool`` ``dilations``). ``impl`` as :func:`max_pool`.

    >>> lp_pool(jnp.full((1, 4, 4, 1), 3.0), 2, 2)[0, ..., 0]
    Array([[6., 6.],
           [6., 6.]], dtype=float32)
    """
    op = "lp_pool"
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p > 0:
        raise ValueError(f"{op}: p={p!r} must be a number > 0 (or inf)")
    reduce = functools.partial(_lp, p=p)
    return _windowed(
        op, reduce, x, window_shape, strides, padding, window_dilation, ceil_mode, layout, impl, require_float
    )


def _lp(x, p, geometry: PoolGeometry, impl: str):
    """:func:`lp_pool` past its checks."""
    if math.isinf(p):
        return _extreme(jnp.abs(x), geometry, "max", impl)
    total = _average(x**p, geometry, True, None, impl) * math.prod(geometry.window)
    nonzero = total != 0
    # PyTorch's sign(s) * relu(|s|) makes the gradient 0 where s == 0; the double where does the same.
    return jnp.where(nonzero, jnp.where(nonzero, total, 1) ** (1.0 / p), 0)


# --- global, adaptive and pyramid pools -------------------------------------------------------


def _whole_window(x, layout, op):
    """One window covering every spatial position: ``(x with a batch axis, PoolGeometry, batched)``."""
    x, layout, batched = _input(op, x, layout)
    sizes = layout.spatial(x.shape)
    ones = (1,) * layout.spatial_rank
    return x, PoolGeometry(layout, sizes, sizes, sizes, ((0, 0),) * layout.spatial_rank, ones, ones), batched


def global_max_pool(x, keepdims: bool = False, layout: str | None = None, *, impl: str = "auto"):
    """Max over all spatial positions of each channel.

    ``x: (N, *spatial, C)`` -> ``(N, C)``, or ``(N, 1, ..., 1, C)`` with ``keepdims``; unbatched
    (``layout`` must then name the rank, e.g. ``"NHWC"``) without ``N``. Equals :func:`max_pool`
    with the window covering the whole map, gradient tie rule and ``impl`` included.

    >>> global_max_pool(jnp.arange(8.0).reshape(1, 2, 2, 2))
    Array([[6., 7.]], dtype=float32)
    """
    op = "global_max_pool"
    x = jnp.asarray(x)
    _require_real(x, op)
    impl = check_impl(impl, op)
    x, geometry, batched = _whole_window(x, layout, op)
    y = _extreme(x, geometry, "max", impl)
    return without_batch_axis(y if keepdims else jnp.squeeze(y, geometry.layout.spatial_axes), batched)


def global_avg_pool(x, keepdims: bool = False, layout: str | None = None, *, impl: str = "auto"):
    """Mean over all spatial positions of each channel (docs/pooling.md: a ``7x7x1000`` map -> ``1x1x1000``).

    ``x: (N, *spatial, C)`` float -> ``(N, C)``, or ``(N, 1, ..., 1, C)`` with ``keepdims``;
    unbatched as :func:`global_max_pool`. A mean whatever ``impl`` is (its autodiff is the notes'
    rule: every input gets ``dy / size``).

    >>> global_avg_pool(jnp.arange(8.0).reshape(1, 2, 2, 2))
    Array([[3., 4.]], dtype=float32)
    """
    op = "global_avg_pool"
    x = jnp.asarray(x)
    require_float(x, op)
    check_impl(impl, op)
    x, geometry, batched = _whole_window(x, layout, op)
    return without_batch_axis(jnp.mean(x, axis=geometry.layout.spatial_axes, keepdims=keepdims), batched)


def _adaptive_bins(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's adaptive bins: bin ``i`` is ``[floor(i*size/out), ceil((i+1)*size/out))``."""
    i = np.arange(out)
    return (i * size) // out, -(-(i + 1) * size // out)


@functools.partial(jax.jit, static_argnames=("axis", "size", "out", "take_max"))
def _adaptive_axis(x, index, axis: int, size: int, out: int, take_max: bool):
    """Adaptive max or mean along one axis, through a ``(out, size)`` bin-membership mask.

    For the max, also ``index`` (``None``, or the flat input position of each element of ``x``)
    at each bin's maximum: the first in scan order (or the first NaN), always inside the bin,
    also when all its values are ``-inf``.
    """
    start, end = _adaptive_bins(size, out)
    x = jnp.moveaxis(x, axis, -1)[..., None, :]
    lead = (1,) * (x.ndim - 2)  # the mask, bin sizes and positions take x's rank (no rank promotion)
    position = np.arange(size).reshape(*lead, 1, size)
    inside = (position >= start.reshape(*lead, out, 1)) & (position < end.reshape(*lead, out, 1))
    if not take_max:
        y = jnp.sum(jnp.where(inside, x, 0), axis=-1) / jnp.asarray((end - start).reshape(*lead, out), x.dtype)
        return jnp.moveaxis(y, -1, axis), None
    masked = jnp.where(inside, x, backprop.lowest(x.dtype))
    best = lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
    hit = inside & ((masked == best) | (jnp.isnan(masked) & jnp.isnan(best)))
    first = jnp.argmax(hit, axis=-1)[..., None] == position  # argmax: the first True
    y = jnp.moveaxis(jnp.sum(jnp.where(first, x, 0), axis=-1, dtype=x.dtype), -1, axis)
    if index is not None:
        index = jnp.moveaxis(
            jnp.sum(jnp.where(first, jnp.moveaxis(index, axis, -1)[..., None, :], 0), axis=-1), -1, axis
        )
    return y, index


def _adaptive_pool(x, output_size, layout, take_max: bool, impl: str, op: str, with_indices: bool = False):
    """Adaptive max or mean over PyTorch's bins (``None`` in ``output_size`` keeps that size);
    with ``with_indices``, ``(values, indices)`` as :func:`max_pool_with_indices`.

    Bins of one size (the size divides evenly) are a window pool, through ``impl``; otherwise a
    bin-membership mask per axis, whatever ``impl`` is (plain jnp, whose autodiff routes each
    gradient to its bin's arg-max or spreads it over the bin: the notes' rules)."""
    x, layout, batched = _input(op, x, layout, ("output_size", output_size))
    impl = check_impl(impl, op)
    rank = layout.spatial_rank
    sizes = layout.spatial(x.shape)
    if isinstance(output_size, Sequence) and not isinstance(output_size, str):
        output_size = [n if o is None else o for n, o in zip(sizes, output_size, strict=True)]
    out = canonicalize_tuple(output_size, rank, "output_size", op)
    if all(n % o == 0 for n, o in zip(sizes, out, strict=True)):
        window = tuple(n // o for n, o in zip(sizes, out, strict=True))
        geometry = PoolGeometry(layout, sizes, window, window, ((0, 0),) * rank, (1,) * rank, out)
        if with_indices:
            y = _with_indices(x, geometry, impl)
        elif take_max:
            y = _extreme(x, geometry, "max", impl)
        else:
            y = _window_sum(x, geometry, impl) / math.prod(window)
        return without_batch_axis(y, batched)
    index = None
    if with_indices:
        plane = np.arange(math.prod(sizes), dtype=np.int32).reshape(layout.shape(1, sizes, 1))
        index = jnp.broadcast_to(plane, x.shape)
    # Bins are boxes, so the pool is separable; the last axis goes first so that ties resolve
    # to the first element in row-major order, as a reduce_window would.
    for axis, n, o in reversed(list(zip(layout.spatial_axes, sizes, out, strict=True))):
        x, index = _adaptive_axis(x, index, axis, n, o, take_max)
    return without_batch_axis((x, index) if with_indices else x, batched)


def adaptive_max_pool(x, output_size, layout: str | None = None, *, impl: str = "auto"):
    """Max over PyTorch's adaptive bins; ``adaptive_max_pool1d/2d/3d`` in channels-first layouts.

    ``x: (N, *spatial, C)`` -> ``(N, *output_size, C)`` (unbatched: without ``N``). Along a dim of
    length ``L`` with ``o`` outputs, bin ``i`` covers ``[floor(i*L/o), ceil((i+1)*L/o))``: bins may
    overlap and always cover the input (unlike the notes' SPP rule in docs/pooling.md, ``win = ceil(L/o),
    stride = floor(L/o)``, which can give the wrong count). ``output_size``: an int, or one entry
    per spatial dim (``None`` keeps that dim's size), whose length is then the spatial rank (an
    int: the rank ``layout`` names, else ``x.ndim - 2``). Integer inputs stay integers. The
    gradient goes to each bin's first maximum in scan order. ``impl`` as :func:`max_pool` where
    the bins are windows of one size.

    >>> adaptive_max_pool(jnp.arange(5.0).reshape(1, 5, 1), 3, layout="NWC")[0, :, 0]
    Array([1., 3., 4.], dtype=float32)
    """
    op = "adaptive_max_pool"
    x = jnp.asarray(x)
    _require_real(x, op)
    return _adaptive_pool(x, output_size, layout, True, impl, op)


def adaptive_max_pool_with_indices(x, output_size, layout: str | None = None, *, impl: str = "auto"):
    """:func:`adaptive_max_pool` plus where each maximum came from, as PyTorch's ``return_indices=True``.

    ``x: (N, *spatial, C)`` -> ``(values, indices)``, both ``(N, *output_size, C)`` (unbatched:
    without ``N``). ``values`` equal :func:`adaptive_max_pool`'s, gradient included; ``indices``
    (int32, no gradient) are flat into each input plane as :func:`max_pool_with_indices`'s: the
    position of each bin's first maximum in scan order (PyTorch's
    ``adaptive_max_pool{1,2,3}d(..., return_indices=True)``).

    >>> values, indices = adaptive_max_pool_with_indices(jnp.array([[[1.0], [3.0], [2.0], [0.0], [5.0]]]), 3)
    >>> values[0, :, 0], indices[0, :, 0]
    (Array([3., 3., 5.], dtype=float32), Array([1, 1, 4], dtype=int32))
    """
    op = "adaptive_max_pool_with_indices"
    x = jnp.asarray(x)
    _require_real(x, op)
    return _adaptive_pool(x, output_size, layout, True, impl, op, with_indices=True)


def adaptive_avg_pool(x, output_size, layout: str | None = None, *, impl: str = "auto"):
    """Mean over PyTorch's adaptive bins; ``adaptive_avg_pool1d/2d/3d`` in channels-first layouts.

    ``x: (N, *spatial, C)`` float -> ``(N, *output_size, C)`` (unbatched: without ``N``), bins
    and ranks as :func:`adaptive_max_pool`.

    >>> adaptive_avg_pool(jnp.arange(5.0).reshape(1, 5, 1), 3, layout="NWC")[0, :, 0]
    Array([0.5, 2. , 3.5], dtype=float32)
    """
    op = "adaptive_avg_pool"
    x = jnp.asarray(x)
    require_float(x, op)
    return _adaptive_pool(x, output_size, layout, False, impl, op)


def spatial_pyramid_pool(x, levels=(1, 2, 4), mode: str = "max", layout: str | None = None, *, impl: str = "auto"):
    """Spatial pyramid pooling (docs/pooling.md, SPPNet: He et al. 2014, arXiv:1406.4729).

    ``x: (N, *spatial, C)`` -> ``(N, C * sum(l**rank for l in levels))`` (unbatched, with a
    ``layout`` naming the rank: ``(C * sum(...),)``): for each level ``l``,
    :func:`adaptive_max_pool` (``mode="max"``) or :func:`adaptive_avg_pool` (``"avg"``) to
    ``(l,) * rank`` bins, flattened in the layout's order (channels-last: ``(l, l, C)``;
    channels-first: ``(C, l, l)``), concatenated level by level. Any input size gives the same
    length. ``impl`` as :func:`adaptive_max_pool`.

    >>> spatial_pyramid_pool(jnp.ones((2, 13, 13, 3)), (1, 2)).shape
    (2, 15)
    """
    op = "spatial_pyramid_pool"
    if mode not in SPP_MODES:
        raise ValueError(f"{op}: mode={mode!r} is not one of {SPP_MODES}")
    if not isinstance(levels, Sequence) or not levels:
        raise TypeError(f"{op}: levels must be a non-empty sequence of ints, got {levels!r}")
    pool = adaptive_max_pool if mode == "max" else adaptive_avg_pool
    x, layout, batched = _input(op, jnp.asarray(x), layout)
    levels = [canonicalize_tuple(level, 1, "levels", op)[0] for level in levels]
    pooled = [pool(x, level, layout.lhs, impl=impl) for level in levels]
    y = jnp.concatenate([p.reshape(p.shape[0], math.prod(p.shape[1:])) for p in pooled], axis=1)
    return without_batch_axis(y, batched)


# --- indices and unpooling --------------------------------------------------------------------


def max_pool_with_indices(
    x,
    window_shape,
    strides=None,
    padding="VALID",
    *,
    window_dilation=1,
    ceil_mode: bool = False,
    layout: str | None = None,
    impl: str = "auto",
):
    """:func:`max_pool` plus where each maximum came from, as PyTorch's ``return_indices=True``.

    ``x: (N, *spatial, C)`` -> ``(values, indices)``, both ``(N, *out, C)`` (unbatched: without
    ``N``; ``out`` and ranks as :func:`max_pool`). ``indices`` (int32) are flat into each input
    plane: ``w`` in 1-D, ``h*W + w`` in 2-D, ``(d*H + h)*W + w`` in 3-D; ties pick the first
    maximum in scan order, and padding never wins (a window of ``-inf`` values points at its
    first real element). ``values`` equal :func:`max_pool`'s, gradient included; the indices are
    integers (no gradient). Feed both to :func:`max_unpool`.

    >>> values, indices = max_pool_with_indices(jnp.array([[[3.0], [1.0], [2.0], [5.0]]]), 2, layout="NWC")
    >>> values[0, :, 0], indices[0, :, 0]
    (Array([3., 5.], dtype=float32), Array([0, 3], dtype=int32))
    """
    op = "max_pool_with_indices"
    return _windowed(op, _with_indices, x, window_shape, strides, padding, window_dilation, ceil_mode, layout, impl)


@functools.partial(jax.jit, static_argnames=("geometry", "impl"))
def _with_indices(x, geometry: PoolGeometry, impl: str):
    """The window maxima and, from each window's max id, its flat position in the input plane
    (every window holds an input element and padding never wins, so it lies inside)."""
    if impl == "lax":
        values, tap = _extreme(x, geometry, "max", impl), backprop.window_argmax(lax.stop_gradient(x), geometry)[1]
    else:
        values, tap = (
            _primitives.window_max(x, geometry, "max", impl),
            _primitives.window_argmax(x, geometry, "max", impl),
        )
    index, plane_stride = 0, math.prod(geometry.input_spatial)
    for a, n, (lo, _) in zip(
        backprop.tap_offsets(tap, geometry), geometry.input_spatial, geometry.padding, strict=True
    ):
        plane_stride //= n
        index = index + (a - lo) * plane_stride
    return values, index.astype(jnp.int32)


def max_unpool(values, indices, output_size, layout: str | None = None):
    """Scatter pooled maxima back to their positions; PyTorch's ``max_unpool1d/2d/3d``.

    ``values``, ``indices: (N, *pooled, C)`` (from :func:`max_pool_with_indices`; unbatched:
    without ``N``) -> ``(N, *output_size, C)``, zero except
    ``out[n, ..., c].flat[indices[n, ..., c]] = values[n, ..., c]``. ``output_size``: the spatial
    size of the pooled input, an int or one int per spatial dim (whose number is then the spatial
    rank), or the pooled input's whole shape (``values.ndim`` entries). Indices outside
    ``[0, prod(output_size))`` are dropped (PyTorch raises; a jitted function cannot inspect them).

    >>> max_unpool(jnp.array([[[3.0], [5.0]]]), jnp.array([[[0], [3]]]), 4, layout="NWC")[0, :, 0]
    Array([3., 0., 0., 5.], dtype=float32)
    """
    op = "max_unpool"
    values, indices = jnp.asarray(values), jnp.asarray(indices)
    if indices.shape != values.shape:
        raise ValueError(f"{op}: indices shape {indices.shape} must equal values shape {values.shape}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"{op}: indices must have an integer dtype, got dtype {np.dtype(indices.dtype).name}")
    whole_shape = isinstance(output_size, Sequence) and len(output_size) == values.ndim
    per_dim = None if whole_shape else ("output_size", output_size)
    values, layout, batched = _input(op, values, layout, per_dim, arg="values")
    indices = with_batch_axis(indices, batched)
    if whole_shape:
        output_size = layout.spatial(tuple(output_size) if batched else (1, *output_size))
    out = canonicalize_tuple(output_size, layout.spatial_rank, "output_size", op)
    return without_batch_axis(_unpool(values, indices, out=out, layout=layout), batched)


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
