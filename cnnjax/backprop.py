"""The notes' closed-form gradients (docs/backprop.md), as code.

Two layers, one formula each:

- **The formulas** (``correlate``, ``input_grad``, ``kernel_grad``, ``window_sum``,
  ``window_sum_transpose``, ``window_argmax``, ``tap_gather``, ``tap_scatter``) take canonical
  geometry (:class:`cnnjax._canon.ConvGeometry` / :class:`~cnnjax._canon.PoolGeometry`) and are one
  or two lax calls that read as the note. They are what cnnjax's primitives compute
  (:mod:`cnnjax._primitives`): the conv is bilinear and its two transposes are the input- and
  kernel-gradient formulas; sum pooling is linear with the overlap-add as its transpose; max
  pooling records each window's "max id" and its derivative gathers the tangent there, whose
  transpose scatters the gradient back. On CPU the primitives run measured schedules of the same
  formulas (:mod:`cnnjax._cpu`).
- **The public gradient functions** (``conv_input_grad``, ``conv_kernel_grad``,
  ``conv_bias_grad``, ``max_pool_grad``, ``avg_pool_grad``, ``dense_grads``,
  ``dense_backward``) validate user arguments and call the formulas. Each returns what
  ``jax.vjp`` of the matching forward op returns (to float tolerance), but is written from the
  notes, never by calling ``jax.vjp`` or ``jax.grad``.

``impl`` (every conv and pooling op, layer and zoo model takes it) says how an op is computed
and differentiated:

- ``"auto"`` (default): the op is a cnnjax primitive whose derivative rules are these formulas,
  so every JAX transform works, identically on every backend (``grad``, ``jvp``, ``jacfwd``,
  ``hessian``, ``vmap``, ``shard_map``, ``jax.export`` ...); on CPU it is lowered to the
  measured schedules of :mod:`cnnjax._cpu`, elsewhere to the formulas;
- ``"closed_form"``: the same primitives, lowered to the formulas on every platform;
- ``"lax"``: plain ``lax`` calls and JAX's own autodiff, no cnnjax primitive in the jaxpr.

Values agree to float tolerance whatever ``impl`` is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from jax import lax

# lax's max-pool gradient primitive (lax exports no select_and_scatter; pyproject pins the JAX range)
from jax._src.lax.windowed_reductions import _select_and_scatter

from cnnjax._canon import (
    ConvGeometry,
    Layout,
    PoolGeometry,
    conv_geometry,
    layout_of,
    pool_geometry,
    require_float,
    with_batch_axis,
    without_batch_axis,
)
from cnnjax.shapes import pool_window_counts

__all__ = [
    "avg_pool_grad",
    "conv_bias_grad",
    "conv_input_grad",
    "conv_kernel_grad",
    "dense_backward",
    "dense_grads",
    "max_pool_grad",
]

SELECTS = ("max", "min")


# ---------------------------------------------------------------------------------------------
# Convolution (docs/backprop.md): the forward correlation and its two transposes.


def correlate(x, kernel, g: ConvGeometry, precision=None):
    """docs/convolutions.md, a conv layer's forward: ``Y = X (*) K``, zero-padded, strided, dilated, grouped.

    ``x: (N, *input_spatial, C_in)`` (or channels first), ``kernel``: HWIO (or OIHW) ->
    ``(N, *output_spatial, C_out)``.
    """
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=g.strides,
        padding=g.padding,
        rhs_dilation=g.dilation,
        dimension_numbers=g.layout.dimension_numbers,
        feature_group_count=g.groups,
        precision=precision,
    )


def _spec_transpose(spec: tuple[int, ...]) -> tuple[int, ...]:
    """A conv operand's dimension spec with its first two entries (batch/feature, out/in) swapped."""
    return (spec[1], spec[0], *spec[2:])


def _groups_into_in(kernel, groups: int, spec: tuple[int, ...]):
    """A grouped kernel's groups moved from its output-channel axis into its input-channel axis
    (outermost), so that the in/out-swapped kernel is grouped the same way: lax's
    ``_conv_general_dilated_transpose_lhs``. ``spec``: the kernel's (out, in, *spatial) axes."""
    out_axis, in_axis = spec[0], spec[1]
    shape = list(kernel.shape)
    shape[out_axis : out_axis + 1] = [groups, shape[out_axis] // groups]
    split = lax.reshape(kernel, shape)
    # the groups axis sits at out_axis; put it just before the input-channel axis and merge
    order = [i for i in range(split.ndim) if i != out_axis]
    order.insert(in_axis, out_axis)
    merged = list(kernel.shape)
    merged[in_axis] *= groups
    merged[out_axis] //= groups
    return lax.reshape(split, merged, order)


def input_grad(dy, kernel, g: ConvGeometry, precision=None):
    """docs/backprop.md, conv backprop: ``delta_l = pad(dilate(delta_{l+1}, s)) (*) rot180(W)``, in/out
    channels swapped: ``dy`` dilated by the stride (lax's input dilation), padded
    ``d*(k-1) - lo`` before and ``n + lo - 1 - (o-1)*s`` after (negative pads crop), correlated
    with the kernel rotated 180 degrees (reversed along its window axes) whose input and output
    channels swap roles through the dimension numbers rather than by moving data (with groups,
    the groups move from the output into the input channels first). The same program as lax's
    own transpose rule (``jax._src.lax.convolution._conv_general_dilated_transpose_lhs``).
    ``dy: (N, *output_spatial, C_out)`` -> ``(N, *input_spatial, C_in)``; also the transposed conv.
    """
    lhs_spec, rhs_spec, out_spec = lax.conv_dimension_numbers(dy.shape, kernel.shape, g.layout.dimension_numbers)
    if g.groups > 1:
        kernel = _groups_into_in(kernel, g.groups, rhs_spec)
    pads = tuple(
        (d * (k - 1) - lo, n + lo - 1 - (o - 1) * s)
        for n, o, k, s, d, (lo, _) in zip(
            g.input_spatial, g.output_spatial, g.window, g.strides, g.dilation, g.padding, strict=True
        )
    )
    return lax.conv_general_dilated(
        dy,
        lax.rev(kernel, rhs_spec[2:]),
        window_strides=(1,) * len(pads),
        padding=pads,
        lhs_dilation=g.strides,
        rhs_dilation=g.dilation,
        dimension_numbers=lax.ConvDimensionNumbers(out_spec, _spec_transpose(rhs_spec), lhs_spec),
        feature_group_count=g.groups,
        precision=precision,
    )


def kernel_shape(g: ConvGeometry, c_in: int, c_out: int) -> tuple[int, ...]:
    """HWIO ``(*window, C_in // G, C_out)`` or OIHW ``(C_out, C_in // G, *window)``."""
    if g.layout.channels_last:
        return (*g.window, c_in // g.groups, c_out)
    return (c_out, c_in // g.groups, *g.window)


def kernel_grad(x, dy, g: ConvGeometry, precision=None):
    """docs/backprop.md, conv backprop: ``dW = delta (*) a_{l-1}``, i.e.
    ``dW[a] = sum_{n, x} delta[n, x] * X_pad[n, x*s + a*d]``: a correlation of the input with
    ``delta`` (dilated by the stride) as the kernel, the batch the contracted channel axis and
    the kernel dilation the output stride; groups become batch groups.
    ``x: (N, *input_spatial, C_in)``, ``dy: (N, *output_spatial, C_out)`` -> the kernel's shape.
    """
    layout = g.layout
    shape = kernel_shape(g, layout.channels(x.shape), layout.channels(dy.shape))
    if x.shape[0] == 0:  # an empty sum (a zero-size conv operand is degenerate in XLA)
        return jnp.zeros(shape, jnp.result_type(x, dy))
    # lax's transpose rule (``_conv_general_dilated_transpose_rhs``): batch and feature swap roles
    lhs_spec, rhs_spec, out_spec = lax.conv_dimension_numbers(x.shape, shape, layout.dimension_numbers)
    numbers = lax.ConvDimensionNumbers(_spec_transpose(lhs_spec), _spec_transpose(out_spec), _spec_transpose(rhs_spec))
    # the high pad that fits exactly k output taps: (k-1)*d + (o-1)*s + 1 = n + lo + hi
    pads = tuple(
        (lo, (k - 1) * d + (o - 1) * s + 1 - n - lo)
        for n, o, k, s, d, (lo, _) in zip(
            g.input_spatial, g.output_spatial, g.window, g.strides, g.dilation, g.padding, strict=True
        )
    )
    return lax.conv_general_dilated(
        x,
        dy,
        window_strides=g.dilation,
        padding=pads,
        lhs_dilation=(1,) * len(pads),
        rhs_dilation=g.strides,
        dimension_numbers=numbers,
        batch_group_count=g.groups,
        precision=precision,
    )


def _groups_into_out(kernel, groups: int, spec: tuple[int, ...]):
    """The inverse of :func:`_groups_into_in`."""
    out_axis, in_axis = spec[0], spec[1]
    shape = list(kernel.shape)
    shape[in_axis : in_axis + 1] = [groups, shape[in_axis] // groups]
    split = lax.reshape(kernel, shape)
    groups_axis = in_axis
    order = [i for i in range(split.ndim) if i != groups_axis]
    order.insert(out_axis, groups_axis)
    merged = list(kernel.shape)
    merged[in_axis] //= groups
    merged[out_axis] *= groups
    return lax.reshape(split, merged, order)


def transposed_kernel_grad(x, dy, g: ConvGeometry, precision=None):
    """:func:`kernel_grad` written as lax writes the kernel gradient of a transposed conv, the
    transpose of :func:`input_grad`'s correlation with respect to its reversed kernel: ``dy``
    dilated by the stride, correlated with ``x`` as the kernel, then reversed (and, with groups,
    the groups moved back into the output channels). The same values as :func:`kernel_grad`
    (``x``: the transposed conv's cotangent, ``dy``: its input)."""
    layout = g.layout
    shape = kernel_shape(g, layout.channels(x.shape), layout.channels(dy.shape))
    if x.shape[0] == 0:
        return jnp.zeros(shape, jnp.result_type(x, dy))
    lhs_spec, rhs_spec, out_spec = lax.conv_dimension_numbers(x.shape, shape, layout.dimension_numbers)
    pads = tuple(
        (d * (k - 1) - lo, n - (o - 1) * s - 1 + lo)
        for n, o, k, s, d, (lo, _) in zip(
            g.input_spatial, g.output_spatial, g.window, g.strides, g.dilation, g.padding, strict=True
        )
    )
    reversed_grad = lax.conv_general_dilated(
        dy,
        x,
        window_strides=g.dilation,
        padding=pads,
        lhs_dilation=g.strides,
        rhs_dilation=(1,) * len(pads),
        dimension_numbers=lax.ConvDimensionNumbers(_spec_transpose(out_spec), _spec_transpose(lhs_spec), rhs_spec),
        batch_group_count=g.groups,
        precision=precision,
    )
    grad = lax.rev(reversed_grad, rhs_spec[2:])
    return _groups_into_out(grad, g.groups, rhs_spec) if g.groups > 1 else grad


# ---------------------------------------------------------------------------------------------
# Pooling (docs/backprop.md): sum (mean) pooling copies each gradient over its window; max pooling
# records each window's max id and routes the gradient there.


def lowest(dtype, select: str = "max"):
    """The pad value that never wins: ``-inf``/``inf`` (``select`` ``"max"``/``"min"``), or the
    integer dtype's minimum/maximum."""
    if jnp.issubdtype(dtype, jnp.inexact):
        return np.array(-np.inf if select == "max" else np.inf, dtype)
    info = jnp.iinfo(dtype)
    return np.array(info.min if select == "max" else info.max, dtype)


def _pad(a, w: PoolGeometry, value):
    """``a`` padded with ``value`` by ``w.reduce_padding`` (the padded plane)."""
    return lax.pad(
        a, np.asarray(value, a.dtype), w.layout.window([(lo, hi, 0) for lo, hi in w.reduce_padding], (0, 0, 0))
    )


def _crop(a, w: PoolGeometry):
    """The padded plane ``a`` cropped back to the input (the inverse of :func:`_pad`)."""
    return lax.pad(a, np.zeros((), a.dtype), w.layout.window([(-lo, -hi, 0) for lo, hi in w.reduce_padding], (0, 0, 0)))


def window_sum(x, w: PoolGeometry):
    """Sum over every window of ``x`` zero-padded by ``w.reduce_padding``:
    ``(N, *input_spatial, C)`` -> ``(N, *out, C)``."""
    return lax.reduce_window(
        x,
        np.array(0, x.dtype),
        lax.add,
        w.layout.window(w.window),
        w.layout.window(w.strides),
        w.layout.window(w.reduce_padding, (0, 0)),
        window_dilation=w.layout.window(w.dilation),
    )


def window_sum_transpose(dy, w: PoolGeometry):
    """docs/backprop.md, mean pooling: every input of a window receives the window's gradient (the
    divisor is applied to ``dy`` first): ``dx[j*s + a*d - lo] += dy[j]`` over taps ``a``.

    ``dy`` dilated by the stride and padded ``d*(k-1) - lo`` before and ``n + lo - (o-1)*s - 1``
    after (negative pads crop), so that a stride-1 window sum over it lands on the input: lax's
    own transpose of a window sum (``_reduce_window_sum_transpose_rule``).
    ``(N, *out, C)`` -> ``(N, *input_spatial, C)``.
    """
    pads = [
        (d * (k - 1) - lo, n + lo - (o - 1) * s - 1, s - 1)
        for n, (lo, _), k, s, d, o in zip(
            w.input_spatial, w.reduce_padding, w.window, w.strides, w.dilation, w.out, strict=True
        )
    ]
    dyp = lax.pad(dy, np.array(0, dy.dtype), w.layout.window(pads, (0, 0, 0)))
    return lax.reduce_window(
        dyp,
        np.array(0, dy.dtype),
        lax.add,
        w.layout.window(w.window),
        (1,) * dy.ndim,
        "VALID",
        window_dilation=w.layout.window(w.dilation),
    )


def window_max(x, w: PoolGeometry, select: str = "max"):
    """Max pooling's forward (``select="min"``: min pooling): one ``lax.reduce_window`` over ``x``
    padded with the value that never wins (:func:`lowest`). ``(N, *input_spatial, C)`` ->
    ``(N, *out, C)``."""
    return lax.reduce_window(
        x,
        lowest(x.dtype, select),
        lax.max if select == "max" else lax.min,
        w.layout.window(w.window),
        w.layout.window(w.strides),
        w.layout.window(w.reduce_padding, (0, 0)),
        window_dilation=w.layout.window(w.dilation),
    )


def window_max_scatter(dy, x, w: PoolGeometry, select: str = "max"):
    """docs/backprop.md, max pooling backprop: each output's gradient goes to its window's max id (the
    first maximum in scan order, never padding; :func:`window_argmax`), the other inputs get 0
    (:func:`tap_scatter`). ``dy: (N, *out, C)``, ``x: (N, *input_spatial, C)`` ->
    ``(N, *input_spatial, C)``.
    """
    return tap_scatter(dy, window_argmax(x, w, select)[1], w)


def select_and_scatter_max(dy, x, w: PoolGeometry, select: str = "max", *, expand_padding: bool = False):
    """:func:`window_max_scatter` as lax's own program for it: one ``select_and_scatter`` over
    ``x`` with a select that keeps the current tap on ties and a NaN once met (a NaN wins, as in
    ``lax.max``). Ties go to the earlier tap where XLA visits a window's taps in scan order
    (XLA:GPU's and XLA:TPU's window loops); XLA:CPU's rewrite into a window reduction does not
    keep that order, so the CPU lowerings use :func:`window_max_scatter`.

    The pool's padding is the op's own, which XLA never selects; with ``expand_padding`` (XLA:GPU,
    which crashes on a padded ``select_and_scatter``, as lax's lowering notes) ``x`` is padded
    with :func:`lowest` first and the result cropped, as lax does there, and a real ``-inf``
    (``inf`` for ``"min"``) is raised to the lowest finite value, so that padding still never
    wins: the one difference left is a window holding a real ``-inf`` before a real
    ``-finfo.max``, whose gradient then goes to the ``-inf``. With window dilation, which
    ``select_and_scatter`` lacks (and lax has no gradient), :func:`window_max_scatter`.
    """
    if any(d != 1 for d in w.dilation):
        return window_max_scatter(dy, x, w, select)
    beats_or_ties = lax.ge if select == "max" else lax.le

    def keeps_current(a, b):
        return beats_or_ties(a, b) | lax.ne(a, a)

    padding, shape = w.reduce_padding, x.shape
    if expand_padding:
        edge = lowest(x.dtype, select)
        finite = np.array(jnp.finfo(x.dtype).min if select == "max" else jnp.finfo(x.dtype).max, x.dtype)
        x = _pad(jnp.where(x == edge, finite, x), w, edge)
        padding = tuple((0, 0) for _ in padding)
    dx = _select_and_scatter(
        x,
        keeps_current,
        w.layout.window(w.window),
        w.layout.window(w.strides),
        w.layout.window(padding, (0, 0)),
        dy,
        np.array(0, dy.dtype),
        lax.add,
    )
    if not expand_padding:
        return dx
    starts = w.layout.window([lo for lo, _ in w.reduce_padding], 0)
    return lax.slice(dx, starts, tuple(a + n for a, n in zip(starts, shape, strict=True)))


def window_max_gather(t, x, w: PoolGeometry, select: str = "max"):
    """Max pooling's derivative (its JVP): each output takes the tangent ``t`` at its window's
    max id (:func:`window_argmax`, :func:`tap_gather`). ``t``, ``x: (N, *input_spatial, C)`` ->
    ``(N, *out, C)``."""
    return tap_gather(t, window_argmax(x, w, select)[1], w)


def tap_dtype(w: PoolGeometry):
    """The smallest unsigned integer dtype that numbers a window's taps."""
    return np.min_scalar_type(max(math.prod(w.window) - 1, 0))


def _padded_positions(w: PoolGeometry):
    """Row-major positions in the padded plane, shaped to broadcast over batch and channels, the
    padding's offset by the plane size: ordered by them, a real element comes before padding."""
    padded = w.padded_spatial
    position = np.arange(math.prod(padded), dtype=np.int64).reshape(padded)
    inside = np.zeros(padded, bool)
    inside[tuple(slice(lo, lo + n) for n, (lo, _) in zip(w.input_spatial, w.reduce_padding, strict=True))] = True
    position = position + np.where(inside, 0, position.size)
    dtype = np.int32 if 2 * position.size < 2**31 else np.int64
    return position.astype(dtype).reshape(w.layout.shape(1, padded, 1))


def _output_index(w: PoolGeometry, dim: int) -> np.ndarray:
    """The output index along spatial ``dim``, shaped to broadcast over an output array."""
    shape = [1] * len(w.out)
    shape[dim] = w.out[dim]
    return np.arange(w.out[dim], dtype=np.int32).reshape(w.layout.shape(1, shape, 1))


def tap_offsets(tap, w: PoolGeometry) -> list:
    """Per spatial dim, where each output's tap ``tap`` (scan-order number) lies in the padded
    input: ``j_i*s_i + a_i*d_i`` for output ``j`` and window offset ``a``."""
    offsets, radix = [], math.prod(w.window)
    tap = jnp.asarray(tap).astype(np.int32)
    for dim, (k, s, d) in enumerate(zip(w.window, w.strides, w.dilation, strict=True)):
        radix //= k
        offsets.append(_output_index(w, dim) * s + (tap // radix) % k * d)
    return offsets


def _padded_flat_position(tap, w: PoolGeometry):
    """Each output's tap ``tap`` as a row-major position in the padded plane (``tap``'s shape)."""
    position, plane_stride = 0, math.prod(w.padded_spatial)
    for offset, m in zip(tap_offsets(tap, w), w.padded_spatial, strict=True):
        plane_stride //= m
        position = position + offset * plane_stride
    return jnp.broadcast_to(position, jnp.shape(tap))


def window_argmax(x, w: PoolGeometry, select: str = "max"):
    """docs/backprop.md, max pooling: each window's maximum and its "max id", the scan-order number of
    the first tap that holds it (``select="min"``: minimum). Padding never wins, not even a tie
    against a real ``-inf``; a NaN wins and propagates, as in ``lax.max``.

    One variadic window reduction over (value, position in the padded plane) pairs: the larger
    value wins, ties go to the smaller position (the earlier tap), padding's positions are
    offset past the plane's so that it loses every tie. ``(N, *input_spatial, C)`` ->
    ``((N, *out, C) values, (N, *out, C) taps of dtype tap_dtype(w))``.
    """
    positions = _padded_positions(w)
    xp = _pad(x, w, lowest(x.dtype, select))
    beats = lax.gt if select == "max" else lax.lt

    def first(a, b):
        (va, ka), (vb, kb) = a, b
        take_a = beats(va, vb) | ((va == vb) & (ka < kb)) | ((va != va) & ((vb == vb) | (ka < kb)))
        return lax.select(take_a, va, vb), lax.select(take_a, ka, kb)

    keys = jnp.broadcast_to(positions, xp.shape)
    best, key = lax.reduce_window(
        (xp, keys),
        (lowest(x.dtype, select), np.array(np.iinfo(positions.dtype).max, positions.dtype)),
        first,
        w.layout.window(w.window),
        w.layout.window(w.strides),
        "VALID",
        window_dilation=w.layout.window(w.dilation),
    )
    plane = math.prod(w.padded_spatial)
    position = jnp.where(key >= plane, key - plane, key)
    tap, radix, plane_stride = 0, math.prod(w.window), plane
    for dim, (k, s, d, m) in enumerate(zip(w.window, w.strides, w.dilation, w.padded_spatial, strict=True)):
        radix //= k
        plane_stride //= m
        a = ((position // plane_stride) % m - _output_index(w, dim) * s) // d
        tap = tap + a * radix
    return best, tap.astype(tap_dtype(w))


def _plane(a, layout: Layout):
    """``(N, *spatial, C)`` -> ``(N, prod(spatial), C)`` (or ``(N, C, prod)``); the flat axis."""
    first = layout.spatial_axes[0]
    return a.reshape(
        *a.shape[:first], math.prod(layout.spatial(a.shape)), *a.shape[first + layout.spatial_rank :]
    ), first


def tap_gather(t, tap, w: PoolGeometry):
    """The derivative of max pooling (its JVP): each output takes the tangent ``t`` at its
    window's max id ``tap``. ``t: (N, *input_spatial, C)`` -> ``(N, *out, C)``."""
    flat, axis = _plane(_pad(t, w, 0), w.layout)
    index, _ = _plane(_padded_flat_position(tap, w), w.layout)
    return jnp.take_along_axis(flat, index, axis=axis).reshape(tap.shape)


def tap_scatter(dy, tap, w: PoolGeometry):
    """docs/backprop.md, max pooling backprop: each output's gradient goes to its window's max id, the
    other inputs get 0 (the transpose of :func:`tap_gather`).
    ``dy: (N, *out, C)`` -> ``(N, *input_spatial, C)``."""
    layout = w.layout
    padded_shape = layout.shape(dy.shape[0], w.padded_spatial, layout.channels(dy.shape))
    flat, axis = _plane(jnp.zeros(padded_shape, dy.dtype), layout)
    index, _ = _plane(_padded_flat_position(tap, w), layout)
    values, _ = _plane(dy, layout)
    where = [lax.broadcasted_iota(np.int32, index.shape, i) for i in range(index.ndim)]
    where[axis] = index
    return _crop(flat.at[tuple(where)].add(values).reshape(padded_shape), w)


def window_divisor(w: PoolGeometry, count_include_pad: bool) -> np.ndarray:
    """PyTorch's average-pool divisor for every output, shaped to broadcast against it.

    Per dim, the window taps (dilated) inside the padded input (``count_include_pad``) or inside
    the input; never the ``ceil_mode`` overhang past the padding. A window with no such tap sums
    to 0 and gets divisor 1, giving 0 as PyTorch does. The per-dim counts multiply because
    windows are boxes.
    """
    divisor = np.ones(())
    for n, k, s, pair, o, d in zip(w.input_spatial, w.window, w.strides, w.padding, w.out, w.dilation, strict=True):
        divisor = np.multiply.outer(divisor, pool_window_counts(n, k, s, pair, o, count_include_pad, d))
    return divisor.reshape(w.layout.shape(1, w.out, 1))


# ---------------------------------------------------------------------------------------------
# Public closed-form gradients: user-level arguments, canonicalized once here.


def _check_output(op: str, forward: str, dy, expected) -> None:
    if tuple(jnp.shape(dy)) != tuple(expected):
        raise ValueError(
            f"{op}: dy has shape {tuple(jnp.shape(dy))}, but the forward {forward}'s output has shape {expected}"
        )


def _input_shape(op: str, input_shape, like, batched: bool) -> tuple[int, ...]:
    """The forward input's shape: of ``like``'s rank (``dy``'s), batched like it."""
    input_shape = tuple(input_shape)
    if len(input_shape) != jnp.ndim(like):
        raise ValueError(f"{op}: input_shape must have rank {jnp.ndim(like)} (dy's), got {input_shape}")
    return input_shape if batched else (1, *input_shape)


def conv_input_grad(
    dy,
    kernel,
    input_shape,
    *,
    strides=1,
    padding="VALID",
    kernel_dilation=1,
    feature_group_count=1,
    layout=None,
    precision=None,
):
    """Gradient of ``conv(x, kernel, ...)`` with respect to ``x`` (docs/backprop.md, conv backprop).

    ``delta_l = pad(dilate(delta_{l+1}, s)) (*) rot180(W)`` with the kernel's input and output
    channels swapped (:func:`input_grad`).

    dy: ``(N, *out, C_out)`` (channels-last) or ``(N, C_out, *out)`` (channels-first), or unbatched
    without ``N``, with ``out = floor((n + lo + hi - d*(k-1) - 1) / s) + 1``; kernel: HWIO
    ``(*window, C_in/G, C_out)`` or OIHW ``(C_out, C_in/G, *window)`` (its rank minus 2 is the
    spatial rank, as in ``conv``); input_shape: the forward input's shape (batched like ``dy``).
    Returns: an array of ``input_shape``, what ``jax.vjp`` of the forward conv returns for ``x``.

    >>> dy = jnp.ones((1, 2, 2, 1))
    >>> conv_input_grad(dy, jnp.ones((2, 2, 1, 1)), (1, 3, 3, 1))[0, :, :, 0].tolist()
    [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]
    """
    op = "conv_input_grad"
    require_float(dy, op, "dy")
    require_float(kernel, op, "kernel")
    lay, batched = layout_of(jnp.shape(dy), layout, op, kernel_shape=jnp.shape(kernel), arg="dy")
    input_shape = _input_shape(op, input_shape, dy, batched)
    dy = with_batch_axis(jnp.asarray(dy), batched)
    g = conv_geometry(op, input_shape, jnp.shape(kernel), lay, strides, padding, kernel_dilation, feature_group_count)
    _check_output(op, "conv", dy, lay.shape(input_shape[0], g.output_spatial, jnp.shape(kernel)[lay.kernel_out_axis]))
    dtype = jnp.result_type(dy, kernel)
    return without_batch_axis(input_grad(dy.astype(dtype), jnp.asarray(kernel, dtype), g, precision), batched)


def conv_kernel_grad(
    x,
    dy,
    kernel_shape,
    *,
    strides=1,
    padding="VALID",
    kernel_dilation=1,
    feature_group_count=1,
    layout=None,
    precision=None,
):
    """Gradient of ``conv(x, kernel, ...)`` with respect to ``kernel`` (docs/backprop.md, conv backprop).

    ``dW[a, b] = sum_{n, x, y} delta[n, x, y] * X_pad[n, x*s + a*d, y*s + b*d]``: one contraction
    over batch and space per kernel tap, grouped channels contracted within their group
    (:func:`kernel_grad`).

    x: ``(N, *spatial, C_in)`` (channels-last) or ``(N, C_in, *spatial)``, or unbatched without
    ``N``; dy: the forward output's shape, ``out = floor((n + lo + hi - d*(k-1) - 1) / s) + 1``;
    kernel_shape: HWIO ``(*window, C_in/G, C_out)`` or OIHW ``(C_out, C_in/G, *window)`` (its rank
    minus 2 is the spatial rank). Returns: an array of ``kernel_shape``.

    >>> x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    >>> conv_kernel_grad(x, jnp.ones((1, 2, 2, 1)), (2, 2, 1, 1))[:, :, 0, 0].tolist()
    [[8.0, 12.0], [20.0, 24.0]]
    """
    op = "conv_kernel_grad"
    require_float(x, op)
    require_float(dy, op, "dy")
    kernel_shape = tuple(kernel_shape)
    lay, batched = layout_of(jnp.shape(x), layout, op, kernel_shape=kernel_shape, kernel_arg="kernel_shape")
    if jnp.ndim(dy) != jnp.ndim(x):
        raise ValueError(f"{op}: dy must have the rank of x ({jnp.ndim(x)}), got shape {jnp.shape(dy)}")
    x, dy = with_batch_axis(jnp.asarray(x), batched), with_batch_axis(jnp.asarray(dy), batched)
    g = conv_geometry(op, x.shape, kernel_shape, lay, strides, padding, kernel_dilation, feature_group_count)
    _check_output(op, "conv", dy, lay.shape(x.shape[0], g.output_spatial, kernel_shape[lay.kernel_out_axis]))
    dtype = jnp.result_type(x, dy)
    return kernel_grad(x.astype(dtype), dy.astype(dtype), g, precision)


def conv_bias_grad(dy, layout=None):
    """Gradient of a conv's bias: ``db = sum delta`` over batch and space (docs/backprop.md, ``db = delta``).

    dy: ``(N, *out, C_out)`` (channels-last) or ``(N, C_out, *out)``; unbatched (without ``N``)
    when ``layout`` names the spatial rank (else the rank is ``dy.ndim - 2``). Returns: ``(C_out,)``.

    >>> conv_bias_grad(jnp.ones((2, 3, 3, 4))).tolist()
    [18.0, 18.0, 18.0, 18.0]
    """
    op = "conv_bias_grad"
    require_float(dy, op, "dy")
    lay, batched = layout_of(jnp.shape(dy), layout, op, arg="dy")
    return jnp.sum(with_batch_axis(jnp.asarray(dy), batched), axis=(0, *lay.spatial_axes))


def max_pool_grad(x, dy, window_shape, strides=None, padding="VALID", *, window_dilation=1, layout=None):
    """Gradient of ``max_pool(x, ...)`` (docs/backprop.md, max pooling: route it to the max id).

    Each output's gradient goes to its window's arg-max, the first maximum in scan (row-major)
    order on ties, as XLA does; padding never receives gradient, not even against a real
    ``-inf`` (:func:`window_max_scatter`).

    x: ``(N, *spatial, C)`` (channels-last) or ``(N, C, *spatial)``, or unbatched without ``N``
    (spatial rank as in ``max_pool``); dy: ``(N, *out, C)`` with
    ``out = floor((n + lo + hi - d*(w-1) - 1) / s) + 1``. Returns: ``x``'s shape.

    >>> x = jnp.array([[[1.0], [3.0], [2.0], [2.0]]])
    >>> max_pool_grad(x, jnp.array([[[10.0], [20.0]]]), 2, layout="NWC")[0, :, 0].tolist()
    [0.0, 10.0, 20.0, 0.0]
    """
    op = "max_pool_grad"
    require_float(x, op)
    require_float(dy, op, "dy")
    lay, batched = layout_of(jnp.shape(x), layout, op, per_dim=("window_shape", window_shape))
    if jnp.ndim(dy) != jnp.ndim(x):
        raise ValueError(f"{op}: dy must have the rank of x ({jnp.ndim(x)}), got shape {jnp.shape(dy)}")
    x, dy = with_batch_axis(jnp.asarray(x), batched), with_batch_axis(jnp.asarray(dy), batched)
    w = pool_geometry(op, x.shape, lay, window_shape, strides, padding, window_dilation, False)
    _check_output(op, "pool", dy, lay.shape(x.shape[0], w.out, lay.channels(x.shape)))
    dtype = jnp.result_type(x, dy)
    return without_batch_axis(window_max_scatter(dy.astype(dtype), x.astype(dtype), w), batched)


def avg_pool_grad(dy, input_shape, window_shape, strides=None, padding="VALID", *, count_include_pad=True, layout=None):
    """Gradient of ``avg_pool(x, ...)`` (docs/backprop.md, mean pooling: split it evenly over the window).

    Each output's gradient is divided by its divisor and copied to every input of its window:
    the window size, or with ``count_include_pad=False`` the number of non-padding inputs in it
    (PyTorch's ``avg_pool`` semantics; :func:`window_sum_transpose`).

    dy: ``(N, *out, C)`` (channels-last) or ``(N, C, *out)``, or unbatched without ``N`` (spatial
    rank as in ``avg_pool``), with ``out = floor((n + lo + hi - w) / s) + 1``; input_shape: the
    forward input's shape (batched like ``dy``). Returns: an array of ``input_shape``.

    >>> avg_pool_grad(jnp.array([[[4.0], [8.0]]]), (1, 4, 1), 2, layout="NWC")[0, :, 0].tolist()
    [2.0, 2.0, 4.0, 4.0]
    """
    op = "avg_pool_grad"
    require_float(dy, op, "dy")
    lay, batched = layout_of(jnp.shape(dy), layout, op, per_dim=("window_shape", window_shape), arg="dy")
    input_shape = _input_shape(op, input_shape, dy, batched)
    dy = with_batch_axis(jnp.asarray(dy), batched)
    w = pool_geometry(op, input_shape, lay, window_shape, strides, padding, 1, False)
    _check_output(op, "pool", dy, lay.shape(input_shape[0], w.out, lay.channels(input_shape)))
    dx = window_sum_transpose(dy / jnp.asarray(window_divisor(w, bool(count_include_pad)), dy.dtype), w)
    return without_batch_axis(dx, batched)


# ---------------------------------------------------------------------------------------------
# Fully connected layers (docs/backprop.md).


def dense_grads(a_prev, w, delta):
    """One dense layer ``z = a_prev @ w + b``: ``(dW, db, delta @ w.T)`` (docs/backprop.md).

    The notes' column-vector ``dW = delta a^T``, ``db = delta``, ``W^T delta`` in Flax's
    ``(in, out)`` kernel layout; leading batch axes are summed, as ``jax.vjp`` of the batched
    layer does (the notes' SGD then divides by the batch size). The third result still lacks
    the previous layer's ``sigma'(z)`` factor.

    a_prev: ``(..., in)``; w: ``(in, out)``; delta: ``dC/dz``, ``(..., out)``.
    Returns: ``dW (in, out)``, ``db (out,)``, ``delta_prev (..., in)``.

    >>> dw, db, back = dense_grads(jnp.array([[1.0, 2.0]]), jnp.ones((2, 3)), jnp.array([[1.0, 0.0, -1.0]]))
    >>> dw.tolist(), db.tolist(), back.tolist()
    ([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0]], [1.0, 0.0, -1.0], [[0.0, 0.0]])
    """
    op = "dense_grads"
    for name, value in (("a_prev", a_prev), ("w", w), ("delta", delta)):
        require_float(value, op, name)
    if jnp.ndim(w) != 2:
        raise ValueError(f"{op}: w must be an (in, out) matrix, got shape {jnp.shape(w)}")
    n_in, n_out = jnp.shape(w)
    if (
        jnp.shape(a_prev)[-1:] != (n_in,)
        or jnp.shape(delta)[-1:] != (n_out,)
        or jnp.shape(a_prev)[:-1] != jnp.shape(delta)[:-1]
    ):
        raise ValueError(
            f"{op}: a_prev {jnp.shape(a_prev)} and delta {jnp.shape(delta)} must be (..., {n_in}) and (..., {n_out})"
        )
    batch = tuple(range(jnp.ndim(delta) - 1))
    dw = jnp.tensordot(a_prev, delta, axes=(batch, batch))
    return dw, jnp.sum(delta, axis=batch), delta @ jnp.swapaxes(w, 0, 1)


def dense_backward(layer_inputs, weights, pre_activations, delta, activation_derivative: Callable):
    """Backprop through a stack of dense layers ``z_l = a_{l-1} @ W_l + b_l``, ``a_l = sigma(z_l)``.

    Follows docs/backprop.md: ``delta_l = (delta_{l+1} W_{l+1}^T) * sigma'(z_l)`` from the last layer's
    ``delta_L = dC/dz_L`` down, with ``dW_l``, ``db_l`` from ``dense_grads``.

    layer_inputs: ``a_0 .. a_{L-1}``, each ``(..., in_l)``; weights: ``W_1 .. W_L``, ``(in_l, out_l)``;
    pre_activations: the hidden ``z_1 .. z_{L-1}``; delta: ``delta_L``, ``(..., out_L)``;
    activation_derivative: ``sigma'``, applied elementwise to each hidden ``z_l``.
    Returns: ``(grads, delta_in)``: ``grads[l] = (dW, db)`` per layer, in order, and
    ``delta_in = dC/da_0`` (to continue into the layers before the stack).

    >>> import jax
    >>> sigmoid_prime = lambda z: jax.nn.sigmoid(z) * (1 - jax.nn.sigmoid(z))
    >>> a0, w1, w2 = jnp.ones((1, 2)), jnp.ones((2, 2)), jnp.ones((2, 1))
    >>> z1 = a0 @ w1
    >>> grads, delta_in = dense_backward([a0, jax.nn.sigmoid(z1)], [w1, w2], [z1], jnp.ones((1, 1)), sigmoid_prime)
    >>> [dw.shape for dw, _ in grads], delta_in.shape
    ([(2, 2), (2, 1)], (1, 2))
    """
    op = "dense_backward"
    if not (len(layer_inputs) == len(weights) == len(pre_activations) + 1):
        raise ValueError(
            f"{op}: need one input and one weight per layer and one pre-activation per hidden layer, got "
            f"{len(layer_inputs)} inputs, {len(weights)} weights, {len(pre_activations)} pre-activations"
        )
    grads = []
    for layer in reversed(range(len(weights))):
        dw, db, back = dense_grads(layer_inputs[layer], weights[layer], delta)
        grads.append((dw, db))
        delta = back * activation_derivative(pre_activations[layer - 1]) if layer else back
    return grads[::-1], delta
