"""The notes' closed-form gradients (notes 002, 反向传播 and Pooling池化操作的反向梯度传播), as code.

Each function returns what ``jax.vjp`` of the matching forward op returns (to float tolerance),
but is written from the notes' formulas, never by calling ``jax.vjp`` or ``jax.grad``:

- conv input gradient: ``delta_l = pad(dilate(delta_{l+1}, s)) (*) rot180(W)``, the kernel's
  input and output channels swapped. The zeros that dilation by the stride inserts are skipped:
  input phase ``r`` (positions ``q*s + r``) meets only the kernel taps ``a`` with
  ``r + lo - a*d = 0 (mod s)``, so it is a stride-1 correlation of ``delta`` with those taps,
  rotated; the phases are then interleaved.
- conv kernel gradient: ``dW[a] = sum_{n, x} delta[n, x] * X_pad[n, x*s + a*d]``, i.e. the
  notes' ``dW = delta (*) a_{l-1}``: a correlation of the input with ``delta`` as the kernel.
- bias gradient: ``db = sum delta`` over batch and space.
- mean (sum) pooling: each output's gradient is split evenly over (copied to) its window.
- max pooling: each output's gradient goes to the "max id" recorded in the forward pass, the
  first maximum of the window in scan (row-major) order, which is XLA's and PyTorch's tie rule;
  no ``select_and_scatter``.
- dense layers: ``dW = a_{l-1}^T delta_l``, ``db = sum delta_l``,
  ``delta_l = (delta_{l+1} W_{l+1}^T) * sigma'(z_l)``.

Windows are read as one strided slice per tap; gradients are written back per output phase, the
same decomposition as the conv input gradient (``_overlap_add``).

``conv_closed_form``, ``conv_transpose_closed_form``, ``max_pool_closed_form`` and
``sum_pool_closed_form`` install these rules as a ``jax.custom_vjp`` for ``conv(...,
vjp="closed_form")``, ``conv_transpose(..., vjp="closed_form")`` and the pools; they take canonical
arguments (tuples, ``(lo, hi)`` pairs, a ``Layout``) from ``cnnjax.convolution`` and
``cnnjax.pooling``. The rules are built of differentiable ops, so reverse mode works to any order
(``jax.grad`` of ``jax.grad``). Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``)
through a ``custom_vjp`` raises JAX's ``TypeError`` ("can't apply forward-mode autodiff (jvp) to
a custom_vjp function"): use ``vjp="xla"`` there. The public gradient functions below are plain
functions and support both modes.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax._canon import Layout, canonicalize_padding, canonicalize_tuple, layout_of, padding_pairs, require_float
from cnnjax.shapes import check_positive, conv_output_size, pool_window_counts

__all__ = [
    "VJP_MODES",
    "avg_pool_grad",
    "conv_bias_grad",
    "conv_closed_form",
    "conv_input_grad",
    "conv_kernel_grad",
    "conv_transpose_closed_form",
    "dense_backward",
    "dense_grads",
    "max_pool_closed_form",
    "max_pool_grad",
    "resolve_vjp",
    "sum_pool_closed_form",
]

VJP_MODES = ("auto", "xla", "closed_form")

# What vjp="auto" means, per backend and op, from experiments/bench_backprop.py (README table).
# CPU (jax 0.10.2, 2 cores): forward+backward under the closed forms took 0.05-0.8x of JAX's
# autodiff time on most layers of the table (depthwise convs 0.05-0.1x, max pools 0.2x, 1x1 convs
# 0.3-0.4x, large 3x3 convs 0.4-0.7x, LeNet's 5x5 convs 0.3-0.8x) and 0.9-1.0x, the noise level,
# on the rest, which run the same XLA convolutions both ways; grouped convs (ResNeXt, 32 groups)
# about 10 ms against 1.5 s; conv_transpose 4x4/2 pad 1, 16x16x16x64 -> 32: 5 ms vs 75 ms
# (autodiff of the input-dilated conv). GPU/TPU: not measured (no such device was available when
# this was written), so JAX's autodiff until someone benchmarks them.
_AUTO = {
    "cpu": {
        "conv": "closed_form",
        "conv_transpose": "closed_form",
        "max_pool": "closed_form",
        "avg_pool": "closed_form",
        "sum_pool": "closed_form",
    },
    "gpu": {"conv": "xla", "conv_transpose": "xla", "max_pool": "xla", "avg_pool": "xla", "sum_pool": "xla"},
    "tpu": {"conv": "xla", "conv_transpose": "xla", "max_pool": "xla", "avg_pool": "xla", "sum_pool": "xla"},
}


def resolve_vjp(vjp, op: str) -> str:
    """Validate a ``vjp=`` flag; resolve ``"auto"`` for JAX's default backend.

    ``op`` names the op (``"conv"``, ``"conv_transpose"``, ``"max_pool"``, ``"avg_pool"``,
    ``"sum_pool"``); an op or a backend without a measured choice resolves to ``"xla"``.

    >>> resolve_vjp("xla", "conv"), resolve_vjp("closed_form", "max_pool")
    ('xla', 'closed_form')
    """
    if not isinstance(vjp, str) or vjp not in VJP_MODES:
        raise ValueError(f"{op}: vjp={vjp!r} is not one of {VJP_MODES}")
    if vjp != "auto":
        return vjp
    return _AUTO.get(jax.default_backend(), {}).get(op, "xla")


# ---------------------------------------------------------------------------------------------
# Plumbing shared by every rule: padding, one strided slice per window tap, kernel views, and the
# adjoint of reading windows (writing them back per output phase).


def _taps(window: Sequence[int]):
    """Window offsets in scan (row-major) order."""
    return itertools.product(*(range(k) for k in window))


def _pad_spatial(x, pairs, value, layout: Layout):
    """Pad (negative pads crop) the spatial axes by ``(lo, hi)`` pairs with ``value``."""
    x = jnp.asarray(x)
    config = [(0, 0, 0)] * x.ndim
    for axis, (lo, hi) in zip(layout.spatial_axes, pairs, strict=True):
        config[axis] = (lo, hi, 0)
    return lax.pad(x, jnp.asarray(value, x.dtype), config)


def _strided_slice(x, start, count, strides, layout: Layout):
    """``x[..., start + j*s, ...]`` for ``j < count`` along each spatial axis."""
    starts, limits, steps = [0] * x.ndim, list(x.shape), [1] * x.ndim
    for axis, b, c, s in zip(layout.spatial_axes, start, count, strides, strict=True):
        starts[axis], limits[axis], steps[axis] = b, b + (c - 1) * s + 1, s
    return lax.slice(x, starts, limits, steps)


def _tap_slices(xp, window, strides, dilation, layout: Layout, out=None):
    """For each window tap ``a`` in scan order, ``xp[..., a*d + j*s, ...]``: the input under tap
    ``a`` of every window (``out`` windows per dim; default: all that fit in ``xp``)."""
    if out is None:
        out = [
            conv_output_size(m, k, s, 0, d)
            for m, k, s, d in zip(layout.spatial(xp.shape), window, strides, dilation, strict=True)
        ]
    return [
        _strided_slice(xp, [a * d for a, d in zip(tap, dilation, strict=True)], out, strides, layout)
        for tap in _taps(window)
    ]


def _tap_overlap(tap, x_spatial, out_spatial, strides, padding, dilation):
    """For window tap ``a``, the outputs ``j`` whose input ``j*s + a*d - lo`` lies inside ``x``
    rather than in its zero padding: per dim ``(first output, count, first input)``; ``None`` if
    there are none (the tap's products are then all zero)."""
    spans = []
    for a, s, d, (lo, _), n, o in zip(tap, strides, dilation, padding, x_spatial, out_spatial, strict=True):
        offset = a * d - lo
        first = -(offset // s) if offset < 0 else 0  # ceil(-offset / s)
        count = min(o - 1, (n - 1 - offset) // s) - first + 1
        if count <= 0:
            return None
        spans.append((first, count, first * s + offset))
    return spans


def _split_channels(x, groups: int, layout: Layout):
    """View the channel axis ``c`` as ``(groups, C // groups)``; returns ``(array, c, spatial axes)``."""
    c = layout.channel_axis
    shape = (*x.shape[:c], groups, x.shape[c] // groups, *x.shape[c + 1 :])
    return x.reshape(shape), c, tuple(a + (a > c) for a in layout.spatial_axes)


def _merge_channels(x, layout: Layout):
    """Inverse of ``_split_channels``."""
    c = layout.channel_axis
    return x.reshape(*x.shape[:c], x.shape[c] * x.shape[c + 1], *x.shape[c + 2 :])


def _kernel_window(kernel_shape, layout: Layout) -> tuple[int, ...]:
    return tuple(kernel_shape[a] for a in layout.kernel_spatial_axes)


def _kernel_to_groups(kernel, groups: int, layout: Layout):
    """A layout kernel (HWIO or OIHW) as ``(*window, G, C_in/G, C_out/G)``."""
    n = layout.spatial_rank
    if layout.channels_last:
        *window, cig, cout = kernel.shape
        return jnp.moveaxis(kernel.reshape(*window, cig, groups, cout // groups), n, n + 1)
    cout, cig, *window = kernel.shape
    return jnp.transpose(kernel.reshape(groups, cout // groups, cig, *window), (*range(3, 3 + n), 0, 2, 1))


def _kernel_from_groups(kernel, layout: Layout):
    """Inverse of ``_kernel_to_groups``."""
    n = layout.spatial_rank
    *window, groups, cig, cog = kernel.shape
    if layout.channels_last:
        return jnp.moveaxis(kernel, n, n + 1).reshape(*window, cig, groups * cog)
    return jnp.transpose(kernel, (n, n + 2, n + 1, *range(n))).reshape(groups * cog, cig, *window)


def _interleave(phases, strides, size, layout: Layout):
    """``out[q*s + r] = phases[r][q]``, cropped to ``size``; ``phases`` in ``_taps(strides)`` order."""
    n = layout.spatial_rank
    first = phases[0]
    if len(phases) > 1:
        stacked = jnp.stack(phases).reshape(*strides, *first.shape)
        perm, shape = [], []
        for axis in range(first.ndim):
            perm.append(n + axis)
            shape.append(first.shape[axis])
            if axis in layout.spatial_axes:
                i = layout.spatial_axes.index(axis)
                perm.append(i)
                shape[-1] *= strides[i]
        first = jnp.transpose(stacked, perm).reshape(shape)
    return _strided_slice(first, (0,) * n, size, (1,) * n, layout)


def _phase_taps(r: int, k: int, s: int, d: int, lo: int) -> list[tuple[int, int]]:
    """Taps ``a`` that put input position ``j*s + a*d - lo`` in phase ``r`` (``= r mod s``), each
    with the shift ``e = (r + lo - a*d) / s`` from phase index ``q`` to window index ``j = q + e``."""
    return [(a, (r + lo - a * d) // s) for a in range(k) if (r + lo - a * d) % s == 0]


def _overlap_add(parts, size, window, strides, dilation, layout: Layout):
    """``out[a*d + j*s] += parts[a][j]`` over taps ``a`` (scan order), ``out`` of spatial ``size``:
    the adjoint of ``_tap_slices``. Per output phase ``r`` a sum of shifted parts, then interleaved."""
    count = [-(-m // s) for m, s in zip(size, strides, strict=True)]
    out = layout.spatial(parts[0].shape)
    by_tap = dict(zip(_taps(window), parts, strict=True))
    phases = []
    for r in _taps(strides):
        per_dim = [_phase_taps(ri, k, s, d, 0) for ri, k, s, d in zip(r, window, strides, dilation, strict=True)]
        shifted = [
            # phase[q] += parts[a][q + e], e <= 0: pad |e| in front
            _pad_spatial(
                by_tap[tuple(a for a, _ in combo)],
                [(-e, q - o + e) for (_, e), q, o in zip(combo, count, out, strict=True)],
                0,
                layout,
            )
            for combo in itertools.product(*per_dim)
        ]
        if shifted:
            phases.append(functools.reduce(jnp.add, shifted))
        else:
            phases.append(
                jnp.zeros(layout.shape(parts[0].shape[0], count, layout.channels(parts[0].shape)), parts[0].dtype)
            )
    return _interleave(phases, strides, size, layout)


# XLA:CPU hands big reductions to YNNPACK, which takes an elementwise product into the reduction
# but not the slices feeding it: a sum of shifted products (a depthwise kernel gradient, one per
# tap) materializes every shifted slice or product, 9x the input for a 3x3 kernel, and XLA's
# default (concurrency-optimized) schedule keeps them all alive at once, so the program's scratch
# memory passes glibc's 32 MiB mmap threshold and is page-faulted in afresh on every call
# (8x14x14x512 depthwise conv forward+backward: 34 MiB scratch, 8,400 faults, 10 ms). Written
# instead as an elementwise sum of a few slabs of the product (along the leading summed axes,
# built ``_in_halves``), it is one loop that reads the operands once and writes a sixteenth of the
# product, and only that is reduced (the same layer: 1.6 MiB, no faults, 1.4 ms).
_SLAB_TERMS = 16
_SLAB_MIN_SIZE = 1 << 16


def _sum_all_but(block, shape, keep):
    """Sum over every axis not in ``keep`` (kept in order) of an array of ``shape`` given by its
    blocks: ``block(start, limit)`` is its part ``[start, limit)``. First the elementwise sum of up
    to ``_SLAB_TERMS`` slabs along the leading summed axes (the first two that are not the minor
    axis; a short last slab is padded with zeros), built ``_in_halves``; then a reduction of that."""
    summed = tuple(i for i in range(len(shape)) if i not in keep)
    counts, left = {}, _SLAB_TERMS
    for axis in [i for i in summed if i < len(shape) - 1][:2]:
        counts[axis] = min(shape[axis], left)
        left //= counts[axis]
    if math.prod(shape) < _SLAB_MIN_SIZE or math.prod(counts.values()) == 1:
        return jnp.sum(block([0] * len(shape), list(shape)), axis=summed)
    sizes = {axis: -(-shape[axis] // k) for axis, k in counts.items()}

    def slab_sum(lo: int, hi: int):
        """The sum of the slabs over ``lo:hi`` of the minor axis."""
        terms = []
        for index in itertools.product(*map(range, counts.values())):
            start, limit, pads = [0] * len(shape), list(shape), [(0, 0, 0)] * len(shape)
            for (axis, size), j in zip(sizes.items(), index, strict=True):
                start[axis], limit[axis] = j * size, min((j + 1) * size, shape[axis])
                pads[axis] = (0, size - (limit[axis] - start[axis]), 0)
            if all(b < e for b, e in zip(start, limit, strict=True)):
                term = lax.slice_in_dim(block(start, limit), lo, hi, axis=-1)
                terms.append(lax.pad(term, jnp.zeros((), term.dtype), pads) if any(map(any, pads)) else term)
        while len(terms) > 1:  # a balanced tree of adds
            terms = [functools.reduce(jnp.add, terms[i : i + 2]) for i in range(0, len(terms), 2)]
        return terms[0]

    return jnp.sum(_in_halves(slab_sum, shape[-1]), axis=summed)


# ---------------------------------------------------------------------------------------------
# Convolution: forward correlation, input gradient, kernel gradient.


# XLA:CPU's grouped convolution is 5-50x slower than the same sums written another way; its
# kernel gradient up to 500x (8x28x28x128 -> 128, 3x3, 32 groups of 4: forward 14 ms, kernel
# gradient 1,650 ms). With few input channels per group the closed form's forward is one
# multiply-add per tap and input channel, fused into one loop (that layer: 1.3 ms; MobileNet's
# 8x112x112x32 depthwise: 70 -> 2 ms); with more, one dense conv per group (8 groups of 32: 7.5
# -> 1.6 ms). The kernel gradient is one dense correlation per group (1,650 -> 4.5 ms), or per-tap
# products for depthwise convs (8x112x112x32: 8.7 ms against 15 ms per group). Ungrouped convs
# of one input channel (LeNet's first layer) take the per-tap products too: XLA's convolution is
# slow on them (256x28x28x1 -> 6, 5x5: 10.2 ms against 2.5 ms).
_UNROLLED_MAX_GROUP_CHANNELS = 8


def _depthwise(groups: int, cig: int, cog: int) -> bool:
    """Grouped convs with one input or one output channel per group."""
    return groups > 1 and min(cig, cog) == 1


def _per_group(fn, groups: int, a, a_axis: int, b, b_axis: int, out_axis: int, **geometry):
    """A grouped conv as ``groups`` dense ones: ``fn(a_g, b_g, groups=1, **geometry)`` on each
    group's slices of ``a`` and ``b`` (split along the given axes), concatenated along ``out_axis``."""
    pieces = zip(jnp.split(a, groups, a_axis), jnp.split(b, groups, b_axis), strict=True)
    return jnp.concatenate([fn(ai, bi, groups=1, **geometry) for ai, bi in pieces], out_axis)


def _correlate(x, kernel, strides, padding, dilation, groups, layout: Layout, precision, buffered: bool = True):
    """Zero-padded cross-correlation, the conv layer's forward (notes 001: ``Y = X (*) K``).

    ``buffered=False`` lets XLA fuse per-tap products into what consumes them (the phases of an
    input gradient, interleaved into one array)."""
    window = _kernel_window(kernel.shape, layout)
    cig = kernel.shape[layout.kernel_in_axis]
    if groups == 1 and math.prod(window) == 1:
        # One tap (1x1): Y = X_s W, a matrix product over channels; on CPU 2-6x faster than
        # XLA's convolution (32x56x56x64 -> 256: 38 vs 74 ms forward, 12 vs 71 ms input gradient).
        (xs,) = _tap_slices(_pad_spatial(x, padding, 0, layout), window, strides, dilation, layout)
        weights = (
            kernel.reshape(kernel.shape[layout.kernel_in_axis], -1)
            if layout.channels_last
            else kernel.reshape(-1, cig).T
        )
        y = lax.dot_general(xs, weights, (((layout.channel_axis,), (0,)), ((), ())), precision=precision)
        return jnp.moveaxis(y, -1, layout.channel_axis)
    if groups == 1 and cig > 1:
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=strides,
            padding=padding,
            rhs_dilation=dilation,
            dimension_numbers=layout.dimension_numbers,
            precision=precision,
        )
    if cig > _UNROLLED_MAX_GROUP_CHANNELS:
        geometry = {"strides": strides, "padding": padding, "dilation": dilation, "layout": layout}
        c = layout.channel_axis
        return _per_group(_correlate, groups, x, c, kernel, layout.kernel_out_axis, c, **geometry, precision=precision)
    return _unrolled_correlate(x, kernel, strides, padding, dilation, groups, layout, buffered)


# XLA:CPU fuses elementwise work into every consumer, however much of it there is: per-tap
# products or an arg-max fold fused into a reduction (a batch norm's statistics, a loss) run in its
# serial reduction loop (8x112x112x32 depthwise conv then a sum of squares: about 100 ms against 2-3 ms),
# and fused into several consumers run once per consumer (max pool 3x3/2 forward+backward on
# 8x112x112x64: 34 ms against 12 ms). It does not fuse a concatenate along the minor axis into its
# consumers (it copies memory), so results built in two halves joined by one get buffers of their
# own. (Rewriting one element of a result with itself, an in-place dynamic update slice, also
# keeps it out of reductions, but XLA fuses that into elementwise consumers as a select, and the
# halves were as fast or faster in every case measured.)
def _in_halves(fn, size: int):
    """``fn(lo, hi)`` (an array or a tuple of arrays) over ``0:size/2`` and ``size/2:size`` of the
    minor (last) axis, joined along it; ``fn(0, size)`` if ``size < 2``."""
    if size < 2:
        return fn(0, size)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=-1), fn(0, size // 2), fn(size // 2, size))


def _tap_products(xp, taps, window, strides, dilation, groups, layout: Layout, lo: int = 0, hi: int | None = None):
    """``Y[x] = sum_{a, i} xp[x*s + a*d, i] K[a, i]`` within each group, ``xp`` already padded: one
    product per tap ``a`` and input channel ``i`` of the group, broadcast over the group's output
    channels; only the outputs ``lo:hi`` along the split axis: the groups, or the one group's output
    channels, if channels-last; else the last spatial axis."""
    cig = taps.shape[-2]
    c = layout.channel_axis
    trailing = (1,) * (xp.ndim - 1 - c)  # the weights broadcast over the axes after the channels
    terms = []
    for tap, xs in zip(_taps(window), _tap_slices(xp, window, strides, dilation, layout), strict=True):
        xsg = _split_channels(xs, groups, layout)[0]  # (.., G, C_in/G, ..)
        weights = taps[tap]  # (G, C_in/G, C_out/G)
        if not layout.channels_last:
            xsg = lax.slice_in_dim(xsg, lo, hi, axis=-1)
        elif groups > 1:
            xsg, weights = lax.slice_in_dim(xsg, lo, hi, axis=c), weights[lo:hi]
        else:
            weights = weights[..., lo:hi]
        for i in range(cig):
            w = weights[:, i].reshape(weights.shape[0], weights.shape[2], *trailing)
            terms.append(lax.slice_in_dim(xsg, i, i + 1, axis=c + 1) * w)
    return _merge_channels(functools.reduce(jnp.add, terms), layout)


def _interior(n: int, k: int, s: int, d: int, lo: int, out: int) -> tuple[int, int]:
    """The outputs ``[first, last)`` along one axis whose every tap ``j*s + a*d - lo`` lies in ``x``."""
    return max(0, -(-lo // s)), min(out, (n - 1 + lo - (k - 1) * d) // s + 1)


def _unrolled_correlate(x, kernel, strides, padding, dilation, groups, layout: Layout, buffered: bool = True):
    """The correlation as per-tap products (``_tap_products``).

    ``buffered`` (the default) keeps XLA from fusing the products into what consumes them and
    avoids a padded copy of ``x``: a padded conv is its interior (the outputs whose every tap lies
    inside ``x``: slices of ``x`` itself) padded with zeros, with its border strips, each from a
    padded copy of the few input rows it reads, written over that in place; an unpadded one is
    built ``_in_halves``. ``buffered=False`` is one sum over a padded copy, fused into its consumer.

    The padded copies were most of a depthwise layer's scratch memory, which XLA:CPU allocates per
    call (8x112x112x32, 3x3, forward+backward: 30.7 -> 8.2 MiB, 8.5 -> 6.7 ms); a padded copy read
    through fused pads instead is 2-4x slower to compute."""
    window = _kernel_window(kernel.shape, layout)
    taps = _kernel_to_groups(kernel, groups, layout)  # (*window, G, C_in/G, C_out/G)
    geometry = (window, strides, dilation, groups, layout)
    x_spatial = layout.spatial(x.shape)
    out = [
        conv_output_size(n + lo + hi, k, s, 0, d)
        for n, k, s, (lo, hi), d in zip(x_spatial, window, strides, padding, dilation, strict=True)
    ]
    inner = [
        _interior(n, k, s, d, lo, o)
        for n, k, s, d, (lo, _), o in zip(x_spatial, window, strides, dilation, padding, out, strict=True)
    ]
    bordered = any(first > 0 or last < o for (first, last), o in zip(inner, out, strict=True))
    if not buffered or not bordered or any(first >= last for first, last in inner):
        xp = _pad_spatial(x, padding, 0, layout)
        if not buffered:
            return _tap_products(xp, taps, *geometry)
        minor = out[-1] if not layout.channels_last else groups if groups > 1 else taps.shape[-1]
        return _in_halves(lambda lo, hi: _tap_products(xp, taps, *geometry, lo, hi), minor)

    def region(ranges):
        """The outputs ``[first, last)`` along each spatial axis, from the input rows they read
        (padded where those lie outside ``x``)."""
        xr, pads = x, []
        for axis, (first, last), n, k, s, d, (lo, _) in zip(
            layout.spatial_axes, ranges, x_spatial, window, strides, dilation, padding, strict=True
        ):
            start, end = first * s - lo, (last - 1) * s + (k - 1) * d - lo + 1
            if max(0, start) >= min(n, end):  # the strip reads only padding
                shape = layout.shape(x.shape[0], [b - a for a, b in ranges], groups * taps.shape[-1])
                return jnp.zeros(shape, jnp.result_type(x, taps))
            xr = lax.slice_in_dim(xr, max(0, start), min(n, end), axis=axis)
            pads.append((max(0, -start), max(0, end - n)))
        return _tap_products(_pad_spatial(xr, pads, 0, layout), taps, *geometry)

    y = _pad_spatial(region(inner), [(first, o - last) for (first, last), o in zip(inner, out, strict=True)], 0, layout)
    for i in range(len(out)):  # border strips: inside on the axes before i, outside on axis i
        for side in [(0, inner[i][0]), (inner[i][1], out[i])]:
            if side[0] < side[1]:
                ranges = [*inner[:i], side, *[(0, o) for o in out[i + 1 :]]]
                start = [0] * x.ndim
                for axis, (first, _) in zip(layout.spatial_axes, ranges, strict=True):
                    start[axis] = first
                y = lax.dynamic_update_slice(y, region(ranges), start)
    return y


# XLA:CPU's convolution is slow when it has few output channels, as the input gradient of a conv
# on few input channels has. Below a SIMD vector's width (8 floats) the taps of the last spatial
# axis are folded into the output channels (LeNet-5's second layer, 64x14x14x6 -> 16, 5x5: 0.95
# -> 0.56 ms; its training step 14.7 -> 11.5 ms), and with one input channel the taps of every
# axis, which leaves a matrix product (its first layer: 1.5 -> 0.5 ms).
_FOLD_BELOW_CHANNELS = 8


def _folds(cin: int, n: int) -> int:
    """How many trailing spatial axes ``_folded_input_grad`` folds: all with one input channel."""
    return n if cin == 1 else 1


def _folded_input_grad(dy, kernel, input_spatial, strides, padding, dilation, layout: Layout, precision):
    """The ungrouped conv input gradient ``delta_l = pad(dilate(delta, s)) (*) rot180(W)`` in two
    steps: a stride-1 correlation over the leading spatial axes in which each tap ``b`` of the
    folded trailing axes is a block of output channels (``Z_b = pad(delta) (*) rot180(W[..., b])``),
    then each ``Z_b`` added back at ``j*s + b*d`` along the folded axes (``_write_back``). The
    leading axes must have stride 1."""
    window = _kernel_window(kernel.shape, layout)
    cin, cout = kernel.shape[layout.kernel_in_axis], kernel.shape[layout.kernel_out_axis]
    n = layout.spatial_rank
    m = _folds(cin, n)
    lead, taps = window[: n - m], math.prod(window[n - m :])
    flipped = jnp.flip(kernel, layout.kernel_spatial_axes[: n - m])
    if layout.channels_last:  # (*lead, *fold, I, O) -> (*lead, O, *fold, I) -> (*lead, 1.., O, taps*I)
        order = (*range(n - m), n + 1, *range(n - m, n), n)
        folded = jnp.transpose(flipped, order).reshape(*lead, *(1,) * m, cout, taps * cin)
    else:  # (O, I, *lead, *fold) -> (*fold, I, O, *lead) -> (taps*I, O, *lead, 1..)
        order = (*range(2 + n - m, 2 + n), 1, 0, *range(2, 2 + n - m))
        folded = jnp.transpose(flipped, order).reshape(taps * cin, cout, *lead, *(1,) * m)
    if m == n:  # a matrix product over the output channels (XLA's 1x1 convolution is slower)
        weights = folded.reshape(cout, taps * cin) if layout.channels_last else folded.reshape(taps * cin, cout).T
        z = lax.dot_general(dy, weights, (((layout.channel_axis,), (0,)), ((), ())), precision=precision)
        blocks = [lax.slice_in_dim(z, b * cin, (b + 1) * cin, axis=-1) for b in range(taps)]  # (N, *sp, C_in)
        parts = [jnp.moveaxis(block, -1, layout.channel_axis) for block in blocks]
    else:
        full = [(d * (w - 1), d * (w - 1)) for w, d in zip(lead, dilation[: n - m], strict=True)]
        z = lax.conv_general_dilated(
            dy,
            folded,
            window_strides=(1,) * n,
            padding=(*full, *((0, 0),) * m),
            rhs_dilation=(*dilation[: n - m], *(1,) * m),
            dimension_numbers=layout.dimension_numbers,
            precision=precision,
        )
        zg, c, _ = _split_channels(z, taps, layout)  # (.., taps, C_in, ..)
        parts = [jnp.squeeze(lax.slice_in_dim(zg, b, b + 1, axis=c), c) for b in range(taps)]
    folded_window = (1,) * (n - m) + window[n - m :]
    folded_dilation = (1,) * (n - m) + dilation[n - m :]
    folded_strides = (1,) * (n - m) + strides[n - m :]
    return _write_back(parts, input_spatial, folded_window, folded_strides, padding, folded_dilation, layout)


def _conv_input_grad(dy, kernel, input_spatial, strides, padding, dilation, groups, layout: Layout, precision):
    """notes 002, conv backprop: ``delta_l = pad(dilate(delta_{l+1}, s)) (*) rot180(W)``, in/out swapped.

    Per input phase ``r``: the taps ``a`` with ``r + lo - a*d = 0 (mod s)``, rotated 180 degrees,
    form a kernel of dilation ``d / gcd(s, d)`` that is correlated with ``delta`` at stride 1.

    Ungrouped convs of few input channels fold the taps of the last axis (of every axis, with one
    channel) into the channels instead (``_folded_input_grad``)."""
    window = _kernel_window(kernel.shape, layout)
    cin, n = kernel.shape[layout.kernel_in_axis], layout.spatial_rank
    if groups == 1 and cin < _FOLD_BELOW_CHANNELS and all(s == 1 for s in strides[: n - _folds(cin, n)]):
        return _folded_input_grad(dy, kernel, input_spatial, strides, padding, dilation, layout, precision)
    swapped = _kernel_from_groups(jnp.swapaxes(_kernel_to_groups(kernel, groups, layout), -1, -2), layout)
    count = [-(-n // s) for n, s in zip(input_spatial, strides, strict=True)]
    out = layout.spatial(dy.shape)
    phases = []
    for r in _taps(strides):
        per_dim = [
            _phase_taps(ri, k, s, d, lo)
            for ri, k, s, d, (lo, _) in zip(r, window, strides, dilation, padding, strict=True)
        ]
        if not all(per_dim):  # no tap lands on this phase: its gradient is zero
            channels = kernel.shape[layout.kernel_in_axis] * groups
            phases.append(jnp.zeros(layout.shape(dy.shape[0], count, channels), dy.dtype))
            continue
        index, pads, phase_dilation = [slice(None)] * swapped.ndim, [], []
        for axis, taps, q, o, d, s in zip(
            layout.kernel_spatial_axes, per_dim, count, out, dilation, strides, strict=True
        ):
            step = taps[1][0] - taps[0][0] if len(taps) > 1 else s  # tap spacing s / gcd(s, d)
            first, last = taps[0][0], taps[-1][0]
            index[axis] = slice(last, first - 1 if first else None, -step)  # the phase's taps, rotated
            dd = d * step // s  # window-index gap between consecutive taps
            e_last = taps[-1][1]
            pads.append((-e_last, q - o + e_last + dd * (len(taps) - 1)))
            phase_dilation.append(dd)
        phase_kernel = swapped[tuple(index)]
        unit = (1,) * len(strides)
        phases.append(
            _correlate(
                dy,
                phase_kernel,
                unit,
                tuple(pads),
                tuple(phase_dilation),
                groups,
                layout,
                precision,
                buffered=math.prod(strides) == 1,  # one phase: the gradient itself
            )
        )
    return _interleave(phases, strides, input_spatial, layout)


# The correlation form of the kernel gradient is memory-bound in XLA's CPU convolution when it
# contracts over many positions at once; summing it over batch chunks of about 1024 output
# positions is 1.5-3x faster on large inputs (32x56x56x64 -> 64, 3x3: 33 ms in one-image chunks
# vs 92 ms in one piece; 8x224x224x3 -> 64, 7x7/2: 72 vs 184 ms). Inputs under 1 MiB stay in one
# piece (chunking LeNet's first layer doubles its time), and there are at most 32 chunks, to bound
# the compiled program.
_KERNEL_GRAD_CHUNK_POSITIONS = 1024
_KERNEL_GRAD_UNCHUNKED_BYTES = 1 << 20
_KERNEL_GRAD_MAX_CHUNKS = 32


def _conv_kernel_grad(x, dy, window, strides, padding, dilation, groups, layout: Layout, precision):
    """notes 002, conv backprop: ``dW[a] = sum_{n, x} delta[n, x] * X_pad[n, x*s + a*d]``.

    Three forms of the one formula: depthwise convs take a product and a sum per tap; a one-tap
    (1x1) kernel is one matrix product ``X^T delta``; otherwise the notes' ``dW = delta (*) a_{l-1}``,
    a correlation of the input with ``delta``, summed over batch chunks (grouped convs: one
    correlation per group)."""
    geometry = (window, strides, padding, dilation, groups, layout)
    if _depthwise(groups, layout.channels(x.shape) // groups, layout.channels(dy.shape) // groups):
        return _depthwise_kernel_grad(x, dy, *geometry)
    if math.prod(window) == 1:
        return _pointwise_kernel_grad(x, dy, *geometry, precision)
    if groups > 1:
        c = layout.channel_axis
        dense = {"window": window, "strides": strides, "padding": padding, "dilation": dilation, "layout": layout}
        return _per_group(_conv_kernel_grad, groups, x, c, dy, c, layout.kernel_out_axis, **dense, precision=precision)
    batch = x.shape[0]
    positions = math.prod(layout.spatial(dy.shape))
    chunk = max(-(-_KERNEL_GRAD_CHUNK_POSITIONS // positions), -(-batch // _KERNEL_GRAD_MAX_CHUNKS))
    if x.size * x.dtype.itemsize < _KERNEL_GRAD_UNCHUNKED_BYTES:
        chunk = batch
    parts = [
        _correlate_input_with_delta(x[i : i + chunk], dy[i : i + chunk], *geometry, precision)
        for i in range(0, batch, chunk)
    ]
    return functools.reduce(jnp.add, parts)


def _correlate_input_with_delta(x, dy, window, strides, padding, dilation, groups, layout: Layout, precision):
    """``dW = delta (*) X``: the batch is the contracted channel axis, ``delta`` (dilated by the
    stride) the kernel and the kernel dilation the output stride; groups become batch groups."""
    spatial = layout.lhs[1:-1] if layout.channels_last else layout.lhs[2:]
    if layout.channels_last:  # x (N, *sp, C): C is the conv's batch, N its feature
        numbers = (f"C{spatial}N", f"I{spatial}O", f"{spatial}NC")
    else:
        numbers = (f"CN{spatial}", f"IO{spatial}", f"CN{spatial}")
    # the high pad that fits exactly k output taps: (k-1)*d + (o-1)*s + 1 = n + lo + hi
    pads = tuple(
        (lo, (k - 1) * d + (o - 1) * s + 1 - n - lo)
        for n, o, k, s, d, (lo, _) in zip(
            layout.spatial(x.shape), layout.spatial(dy.shape), window, strides, dilation, padding, strict=True
        )
    )
    return lax.conv_general_dilated(
        x,
        dy,
        window_strides=dilation,
        padding=pads,
        rhs_dilation=strides,
        dimension_numbers=numbers,
        batch_group_count=groups,
        precision=precision,
    )


def _pointwise_kernel_grad(x, dy, window, strides, padding, dilation, groups, layout: Layout, precision):
    """One tap: ``dW = X_s^T delta``, a matrix product over batch and space (on CPU 6-10x faster
    than the correlation form, whose kernel would be all of ``delta``)."""
    (xs,) = _tap_slices(
        _pad_spatial(x, padding, 0, layout), window, strides, dilation, layout, layout.spatial(dy.shape)
    )
    xsg, g, xs_spatial = _split_channels(xs, groups, layout)
    dyg, _, dy_spatial = _split_channels(dy, groups, layout)
    grad = lax.dot_general(xsg, dyg, (((0, *xs_spatial), (0, *dy_spatial)), ((g,), (g,))), precision=precision)
    return _kernel_from_groups(grad.reshape(*window, *grad.shape), layout)


def _depthwise_kernel_grad(x, dy, window, strides, padding, dilation, groups, layout: Layout):
    """Per tap ``a``: ``dW[a] = sum_{n, x} X_pad[n, x*s + a*d] * delta[n, x]`` within each group
    (one input or one output channel per group: the product broadcasts the one over the other)."""
    cig, cog = layout.channels(x.shape) // groups, layout.channels(dy.shape) // groups
    c, split = layout.channel_axis, not cig == cog == 1  # no split: a size-1 axis costs XLA a copy per tap

    def product(xs, dys):
        if split:
            return _split_channels(xs, groups, layout)[0] * _split_channels(dys, groups, layout)[0]
        return xs * dys

    spatial = tuple(a + (split and a > c) for a in layout.spatial_axes)  # in the product
    grads = []
    for tap in _taps(window):
        spans = _tap_overlap(tap, layout.spatial(x.shape), layout.spatial(dy.shape), strides, padding, dilation)
        if spans is None:  # the tap only ever meets padding
            grads.append(jnp.zeros(groups * cig * cog, x.dtype))
            continue
        first, count, x_first = zip(*spans, strict=True)

        def block(start, limit, first=first, x_first=x_first):
            """The products of the outputs ``[start, limit)`` (batch and space)."""
            lo, hi = [start[a] for a in spatial], [limit[a] for a in spatial]
            size = [h - b for b, h in zip(lo, hi, strict=True)]
            xb, dyb = (lax.slice_in_dim(v, start[0], limit[0]) for v in (x, dy))
            xs = _strided_slice(
                xb, [f + b * s for f, b, s in zip(x_first, lo, strides, strict=True)], size, strides, layout
            )
            dys = _strided_slice(dyb, [f + b for f, b in zip(first, lo, strict=True)], size, (1,) * len(size), layout)
            return product(xs, dys)

        shape = list(layout.shape(x.shape[0], count, groups * max(cig, cog)))
        shape[c : c + 1] = [groups, max(cig, cog)] if split else shape[c : c + 1]
        grads.append(_sum_all_but(block, shape, (c, c + 1) if split else (c,)).reshape(-1))
    return _kernel_from_groups(jnp.stack(grads).reshape(*window, groups, cig, cog), layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _conv(x, kernel, strides, padding, dilation, groups, layout, precision):
    return _correlate(x, kernel, strides, padding, dilation, groups, layout, precision)


def _conv_fwd(x, kernel, strides, padding, dilation, groups, layout, precision):
    return _correlate(x, kernel, strides, padding, dilation, groups, layout, precision), (x, kernel)


def _conv_bwd(strides, padding, dilation, groups, layout, precision, residuals, dy):
    x, kernel = residuals
    geometry = (strides, padding, dilation, groups, layout, precision)
    dx = _conv_input_grad(dy, kernel, layout.spatial(x.shape), *geometry)
    dk = _conv_kernel_grad(x, dy, _kernel_window(kernel.shape, layout), *geometry)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_closed_form(
    x, kernel, *, strides, padding, kernel_dilation, feature_group_count, layout: Layout, precision=None
):
    """Zero-padded convolution whose VJP is the notes' closed form (canonical arguments).

    The value of ``lax.conv_general_dilated(x, kernel, strides, padding,
    rhs_dilation=kernel_dilation, dimension_numbers=layout.dimension_numbers,
    feature_group_count=feature_group_count, precision=precision)``; depthwise convolutions
    (one input or output channel per group) are computed as one multiply per tap, in full
    precision. ``strides``/``kernel_dilation``: tuples; ``padding``: ``(lo, hi)`` pairs;
    ``layout``: a ``cnnjax._canon.Layout``. Shapes as ``cnnjax.conv``.

    >>> from cnnjax._canon import Layout
    >>> x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    >>> y = conv_closed_form(x, jnp.ones((2, 2, 1, 1)), strides=(1, 1), padding=((0, 0), (0, 0)),
    ...                      kernel_dilation=(1, 1), feature_group_count=1, layout=Layout(True, 2))
    >>> y[0, :, :, 0].tolist()
    [[8.0, 12.0], [20.0, 24.0]]
    """
    padding = tuple(map(tuple, padding))
    return _conv(x, kernel, tuple(strides), padding, tuple(kernel_dilation), feature_group_count, layout, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7, 8))
def _conv_transpose(x, kernel, output_spatial, strides, padding, dilation, groups, layout, precision):
    return _conv_input_grad(x, kernel, output_spatial, strides, padding, dilation, groups, layout, precision)


def _conv_transpose_fwd(x, kernel, output_spatial, strides, padding, dilation, groups, layout, precision):
    y = _conv_input_grad(x, kernel, output_spatial, strides, padding, dilation, groups, layout, precision)
    return y, (x, kernel)


def _conv_transpose_bwd(output_spatial, strides, padding, dilation, groups, layout, precision, residuals, dy):
    # conv_transpose(x, W) = conv_input_grad(x, W) is bilinear and the adjoint of conv(., W): its
    # input gradient is conv(dy, W), and its kernel gradient the conv kernel gradient with the
    # roles swapped (input dy, delta x).
    x, kernel = residuals
    geometry = (strides, padding, dilation, groups, layout, precision)
    dx = _correlate(dy, kernel, *geometry)
    dk = _conv_kernel_grad(dy, x, _kernel_window(kernel.shape, layout), *geometry)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv_transpose.defvjp(_conv_transpose_fwd, _conv_transpose_bwd)


def conv_transpose_closed_form(
    x,
    kernel,
    *,
    output_spatial,
    strides,
    padding,
    kernel_dilation,
    feature_group_count,
    layout: Layout,
    precision=None,
):
    """Transposed convolution as the notes' conv input gradient, with a closed-form VJP.

    The VJP at ``x`` of ``conv(., kernel)`` over an input of spatial size ``output_spatial``
    (notes 002, 转置卷积), i.e. ``cnnjax.conv_transpose``'s value. Its own VJP, since the map
    is bilinear: ``dx = conv(dy, kernel)`` and ``dkernel`` = the conv kernel gradient with input
    ``dy`` and delta ``x``. All arguments describe the *forward* conv that maps an
    ``output_spatial`` (``m`` per dim) input to ``x`` (``n`` per dim): ``strides``/
    ``kernel_dilation`` tuples, ``padding`` ``(lo, hi)`` pairs that fit exactly,
    ``m + lo + hi = (n-1)*s + d*(k-1) + 1`` (``hi`` may be negative: a crop), ``layout`` a
    ``cnnjax._canon.Layout``; ``kernel`` is that conv's (HWIO/OIHW). Shapes as
    ``cnnjax.conv_transpose``.

    >>> from cnnjax._canon import Layout
    >>> y = conv_transpose_closed_form(jnp.ones((1, 2, 1)), jnp.array([[[1.0]], [[10.0]]]),
    ...     output_spatial=(4,), strides=(2,), padding=((0, 0),), kernel_dilation=(1,),
    ...     feature_group_count=1, layout=Layout(True, 1))
    >>> y[0, :, 0].tolist()
    [1.0, 10.0, 1.0, 10.0]
    """
    padding = tuple(map(tuple, padding))
    return _conv_transpose(
        x,
        kernel,
        tuple(output_spatial),
        tuple(strides),
        padding,
        tuple(kernel_dilation),
        feature_group_count,
        layout,
        precision,
    )


# ---------------------------------------------------------------------------------------------
# Pooling: sum (mean) pooling copies the gradient over the window, max pooling routes it to the max.


def _lowest(dtype):
    """The pad value that never wins a max: ``-inf`` for floats, the minimum for integers."""
    return -jnp.inf if jnp.issubdtype(dtype, jnp.inexact) else jnp.iinfo(dtype).min


def _write_back(parts, input_spatial, window, strides, padding, dilation, layout: Layout):
    """Window values ``parts[a]`` (one per tap) added back onto the input, padding dropped."""
    padded = tuple(n + lo + hi for n, (lo, hi) in zip(input_spatial, padding, strict=True))
    dxp = _overlap_add(parts, padded, window, strides, dilation, layout)
    return _pad_spatial(dxp, [(-lo, -hi) for lo, hi in padding], 0, layout)


def _sum_pool_grad(dy, input_spatial, window, strides, padding, layout: Layout):
    """notes 002, mean pooling: every input of a window receives the window's gradient (the
    mean's divisor is applied to ``dy`` first): ``dx[a + j*s] += dy[j]`` over taps ``a``."""
    dilation = (1,) * len(window)
    return _write_back([dy] * math.prod(window), input_spatial, window, strides, padding, dilation, layout)


def _max_pool_argmax(x, window, strides, padding, dilation, layout: Layout):
    """Window maxima of the ``-inf``-padded ``x`` and each window's "max id": the scan-order
    index of the first tap holding the maximum."""
    taps = _tap_slices(_pad_spatial(x, padding, _lowest(x.dtype), layout), window, strides, dilation, layout)

    def fold(lo: int, hi: int):
        part = [lax.slice_in_dim(xs, lo, hi, axis=-1) for xs in taps]
        best, index = part[0], jnp.zeros(part[0].shape, np.min_scalar_type(len(part) - 1))
        for t, xs in enumerate(part[1:], 1):
            # strictly greater: a tie keeps the earlier tap; a NaN wins and stays, as in lax.max
            later = (xs > best) | (xs != xs)
            index = jnp.where(later, jnp.asarray(t, index.dtype), index)
            best = jnp.where(later, xs, best)
        return best, index

    return _in_halves(fold, taps[0].shape[-1])


def _max_pool_grad(index, dy, input_spatial, window, strides, padding, dilation, layout: Layout):
    """notes 002, max pooling: each output's gradient goes to its recorded max id, the rest get 0."""
    parts = [jnp.where(index == t, dy, jnp.zeros_like(dy)) for t in range(math.prod(window))]
    return _write_back(parts, input_spatial, window, strides, padding, dilation, layout)


# The input's spatial size rides along as a static argument: the backward pass needs it (the
# output size does not determine it) and residuals must be arrays.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5, 6))
def _max_pool(x, input_spatial, window, strides, padding, dilation, layout):
    return _max_pool_argmax(x, window, strides, padding, dilation, layout)[0]


def _max_pool_fwd(x, input_spatial, window, strides, padding, dilation, layout):
    y, index = _max_pool_argmax(x, window, strides, padding, dilation, layout)
    return y, index


def _max_pool_bwd(input_spatial, window, strides, padding, dilation, layout, index, dy):
    return (_max_pool_grad(index, dy, input_spatial, window, strides, padding, dilation, layout),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _sum_pool(x, input_spatial, window, strides, padding, layout):
    full = [(0, 0)] * x.ndim
    for axis, pair in zip(layout.spatial_axes, padding, strict=True):
        full[axis] = pair
    return lax.reduce_window(x, jnp.asarray(0, x.dtype), lax.add, layout.window(window), layout.window(strides), full)


def _sum_pool_fwd(x, input_spatial, window, strides, padding, layout):
    return _sum_pool(x, input_spatial, window, strides, padding, layout), None


def _sum_pool_bwd(input_spatial, window, strides, padding, layout, _, dy):
    return (_sum_pool_grad(dy, input_spatial, window, strides, padding, layout),)


_sum_pool.defvjp(_sum_pool_fwd, _sum_pool_bwd)


def max_pool_closed_form(x, *, window_shape, strides, padding, window_dilation, layout: Layout):
    """Max pooling (padding is ``-inf``, it never wins) whose VJP is the notes' max-id rule.

    The value of ``lax.reduce_window(x, -inf, lax.max, ...)`` over the padded input (the dtype's
    minimum for integers). Canonical arguments: spatial tuples, ``(lo, hi)`` pairs, a ``Layout``.
    ``x: (N, *spatial, C)`` or ``(N, C, *spatial)`` -> ``out = floor((n + lo + hi - d*(w-1) - 1) / s) + 1``.

    >>> from cnnjax._canon import Layout
    >>> x = jnp.array([[[1.0], [3.0], [2.0], [2.0]]])
    >>> max_pool_closed_form(x, window_shape=(2,), strides=(2,), padding=((0, 0),),
    ...                      window_dilation=(1,), layout=Layout(True, 1))[0, :, 0].tolist()
    [3.0, 2.0]
    """
    geometry = (tuple(window_shape), tuple(strides), tuple(map(tuple, padding)), tuple(window_dilation), layout)
    return _max_pool(x, layout.spatial(jnp.shape(x)), *geometry)


def sum_pool_closed_form(x, *, window_shape, strides, padding, layout: Layout):
    """Sum pooling over the zero-padded input whose VJP copies each gradient over its window.

    Canonical arguments, as ``max_pool_closed_form``; average pooling is this divided by the
    window's divisor.

    >>> from cnnjax._canon import Layout
    >>> x = jnp.arange(4.0).reshape(1, 4, 1)
    >>> sum_pool_closed_form(x, window_shape=(2,), strides=(2,), padding=((0, 0),), layout=Layout(True, 1))[0, :, 0].tolist()
    [1.0, 5.0]
    """
    geometry = (tuple(window_shape), tuple(strides), tuple(map(tuple, padding)), layout)
    return _sum_pool(x, layout.spatial(jnp.shape(x)), *geometry)


# ---------------------------------------------------------------------------------------------
# Public closed-form gradients: user-level arguments, canonicalized once here.


def _conv_args(
    op, x_shape, kernel_shape, dy_shape, layout: Layout, strides, padding, kernel_dilation, feature_group_count
):
    """Check a conv's shapes against each other and return canonical geometry."""
    n = layout.spatial_rank
    if len(kernel_shape) != n + 2:
        raise ValueError(f"{op}: kernel must have rank {n + 2} for {n} spatial dims, got shape {tuple(kernel_shape)}")
    if len(x_shape) != n + 2:
        raise ValueError(f"{op}: input_shape must have rank {n + 2}, got {tuple(x_shape)}")
    groups = check_positive(feature_group_count, "feature_group_count", op)
    strides = canonicalize_tuple(strides, n, "strides", op)
    dilation = canonicalize_tuple(kernel_dilation, n, "kernel_dilation", op)
    window = _kernel_window(kernel_shape, layout)
    c_in, cig, c_out = (
        layout.channels(x_shape),
        kernel_shape[layout.kernel_in_axis],
        kernel_shape[layout.kernel_out_axis],
    )
    if c_in % groups or c_out % groups:
        raise ValueError(f"{op}: feature_group_count={groups} must divide C_in={c_in} and C_out={c_out}")
    if cig * groups != c_in:
        raise ValueError(
            f"{op}: kernel has {cig} input channels per group, but C_in={c_in} / feature_group_count={groups} = {c_in // groups}"
        )
    spatial = layout.spatial(x_shape)
    pairs = padding_pairs(canonicalize_padding(padding, n, op), spatial, window, strides, dilation, op)
    out = tuple(
        conv_output_size(m, k, s, p, d) for m, k, s, p, d in zip(spatial, window, strides, pairs, dilation, strict=True)
    )
    expected = layout.shape(x_shape[0], out, c_out)
    if tuple(dy_shape) != expected:
        raise ValueError(f"{op}: dy has shape {tuple(dy_shape)}, but the forward conv's output has shape {expected}")
    return strides, pairs, dilation, groups


def conv_input_grad(
    dy,
    kernel,
    input_shape,
    *,
    strides=1,
    padding="VALID",
    kernel_dilation=1,
    feature_group_count=1,
    layout="NHWC",
    precision=None,
):
    """Gradient of ``conv(x, kernel, ...)`` with respect to ``x`` (notes 002, conv backprop).

    ``delta_l = pad(dilate(delta_{l+1}, s)) (*) rot180(W)`` with the kernel's input and output
    channels swapped, computed per stride phase so that no inserted zeros are multiplied.

    dy: ``(N, *out, C_out)`` (NHWC) or ``(N, C_out, *out)`` (NCHW), with
    ``out = floor((n + lo + hi - d*(k-1) - 1) / s) + 1``; kernel: HWIO ``(*window, C_in/G, C_out)``
    or OIHW ``(C_out, C_in/G, *window)``; input_shape: the forward input's shape.
    Returns: an array of ``input_shape``, what ``jax.vjp`` of the forward conv returns for ``x``.

    >>> dy = jnp.ones((1, 2, 2, 1))
    >>> conv_input_grad(dy, jnp.ones((2, 2, 1, 1)), (1, 3, 3, 1))[0, :, :, 0].tolist()
    [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]
    """
    op = "conv_input_grad"
    lay = layout_of(dy, layout, op, "dy")
    require_float(dy, op, "dy")
    require_float(kernel, op, "kernel")
    input_shape = tuple(input_shape)
    geometry = _conv_args(
        op, input_shape, jnp.shape(kernel), jnp.shape(dy), lay, strides, padding, kernel_dilation, feature_group_count
    )
    dx = _conv_input_grad(dy, kernel, lay.spatial(input_shape), *geometry, lay, precision)
    return dx.astype(jnp.result_type(dy, kernel))


def conv_kernel_grad(
    x,
    dy,
    kernel_shape,
    *,
    strides=1,
    padding="VALID",
    kernel_dilation=1,
    feature_group_count=1,
    layout="NHWC",
    precision=None,
):
    """Gradient of ``conv(x, kernel, ...)`` with respect to ``kernel`` (notes 002, conv backprop).

    ``dW[a, b] = sum_{n, x, y} delta[n, x, y] * X_pad[n, x*s + a*d, y*s + b*d]``: one contraction
    over batch and space per kernel tap, grouped channels contracted within their group.

    x: ``(N, *spatial, C_in)`` (NHWC) or ``(N, C_in, *spatial)``; dy: the forward output's shape,
    ``out = floor((n + lo + hi - d*(k-1) - 1) / s) + 1``; kernel_shape: HWIO
    ``(*window, C_in/G, C_out)`` or OIHW ``(C_out, C_in/G, *window)``.
    Returns: an array of ``kernel_shape``.

    >>> x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    >>> conv_kernel_grad(x, jnp.ones((1, 2, 2, 1)), (2, 2, 1, 1))[:, :, 0, 0].tolist()
    [[8.0, 12.0], [20.0, 24.0]]
    """
    op = "conv_kernel_grad"
    lay = layout_of(x, layout, op)
    require_float(x, op)
    require_float(dy, op, "dy")
    kernel_shape = tuple(kernel_shape)
    geometry = _conv_args(
        op, jnp.shape(x), kernel_shape, jnp.shape(dy), lay, strides, padding, kernel_dilation, feature_group_count
    )
    dk = _conv_kernel_grad(x, dy, _kernel_window(kernel_shape, lay), *geometry, lay, precision)
    return dk.astype(jnp.result_type(x, dy))


def conv_bias_grad(dy, layout="NHWC"):
    """Gradient of a conv's bias: ``db = sum delta`` over batch and space (notes 002, ``db = delta``).

    dy: ``(N, *out, C_out)`` (NHWC) or ``(N, C_out, *out)``. Returns: ``(C_out,)``.

    >>> conv_bias_grad(jnp.ones((2, 3, 3, 4))).tolist()
    [18.0, 18.0, 18.0, 18.0]
    """
    op = "conv_bias_grad"
    lay = layout_of(dy, layout, op, "dy")
    require_float(dy, op, "dy")
    dy = jnp.asarray(dy)
    return _sum_all_but(lambda start, limit: lax.slice(dy, start, limit), dy.shape, (lay.channel_axis,))


def _pool_args(op, x_shape, dy_shape, layout: Layout, window_shape, strides, padding, window_dilation):
    """Canonical pooling geometry (``strides=None`` means the window), checked against ``dy``."""
    n = layout.spatial_rank
    window = canonicalize_tuple(window_shape, n, "window_shape", op)
    strides = window if strides is None else canonicalize_tuple(strides, n, "strides", op)
    dilation = canonicalize_tuple(window_dilation, n, "window_dilation", op)
    spatial = layout.spatial(x_shape)
    pairs = padding_pairs(canonicalize_padding(padding, n, op), spatial, window, strides, dilation, op)
    out = tuple(
        conv_output_size(m, k, s, p, d) for m, k, s, p, d in zip(spatial, window, strides, pairs, dilation, strict=True)
    )
    expected = layout.shape(x_shape[0], out, layout.channels(x_shape))
    if tuple(dy_shape) != expected:
        raise ValueError(f"{op}: dy has shape {tuple(dy_shape)}, but the forward pool's output has shape {expected}")
    return window, strides, pairs, dilation


def max_pool_grad(x, dy, window_shape, strides=None, padding="VALID", *, window_dilation=1, layout="NHWC"):
    """Gradient of ``max_pool(x, ...)`` (notes 002, max pooling: route it to the max id).

    Each output's gradient goes to its window's arg-max, the first maximum in scan (row-major)
    order on ties, as XLA does; padding is ``-inf`` and never receives gradient.

    x: ``(N, *spatial, C)`` (NHWC) or ``(N, C, *spatial)``; dy: ``(N, *out, C)`` with
    ``out = floor((n + lo + hi - d*(w-1) - 1) / s) + 1``. Returns: ``x``'s shape.

    >>> x = jnp.array([[[1.0], [3.0], [2.0], [2.0]]])
    >>> max_pool_grad(x, jnp.array([[[10.0], [20.0]]]), 2, layout="NWC")[0, :, 0].tolist()
    [0.0, 10.0, 20.0, 0.0]
    """
    op = "max_pool_grad"
    lay = layout_of(x, layout, op)
    require_float(x, op)
    require_float(dy, op, "dy")
    window, strides, pairs, dilation = _pool_args(
        op, jnp.shape(x), jnp.shape(dy), lay, window_shape, strides, padding, window_dilation
    )
    index = _max_pool_argmax(x, window, strides, pairs, dilation, lay)[1]
    dx = _max_pool_grad(index, dy, lay.spatial(x.shape), window, strides, pairs, dilation, lay)
    return dx.astype(jnp.result_type(x, dy))


def _valid_tap_counts(input_spatial, out_spatial, window, strides, padding, layout: Layout) -> np.ndarray:
    """Number of non-padding inputs in each output's window (at least 1), shaped like dy's spatial axes.

    A window entirely in the padding touches no input, so its divisor does not matter; it is 1."""
    counts = np.ones(())
    for n, o, k, s, pair in zip(input_spatial, out_spatial, window, strides, padding, strict=True):
        counts = np.multiply.outer(counts, pool_window_counts(n, k, s, pair, o, include_pad=False))
    return counts.reshape(layout.shape(1, out_spatial, 1))


def avg_pool_grad(
    dy, input_shape, window_shape, strides=None, padding="VALID", *, count_include_pad=True, layout="NHWC"
):
    """Gradient of ``avg_pool(x, ...)`` (notes 002, mean pooling: split it evenly over the window).

    Each output's gradient is divided by its divisor and copied to every input of its window:
    the window size, or with ``count_include_pad=False`` the number of non-padding inputs in it
    (PyTorch's ``avg_pool`` semantics).

    dy: ``(N, *out, C)`` (NHWC) or ``(N, C, *out)`` with ``out = floor((n + lo + hi - w) / s) + 1``;
    input_shape: the forward input's shape. Returns: an array of ``input_shape``.

    >>> avg_pool_grad(jnp.array([[[4.0], [8.0]]]), (1, 4, 1), 2, layout="NWC")[0, :, 0].tolist()
    [2.0, 2.0, 4.0, 4.0]
    """
    op = "avg_pool_grad"
    lay = layout_of(dy, layout, op, "dy")
    require_float(dy, op, "dy")
    input_shape = tuple(input_shape)
    if len(input_shape) != jnp.ndim(dy):
        raise ValueError(f"{op}: input_shape={input_shape} must have the rank of dy, {jnp.ndim(dy)}")
    window, strides, pairs, _ = _pool_args(op, input_shape, jnp.shape(dy), lay, window_shape, strides, padding, 1)
    spatial = lay.spatial(input_shape)
    divisor = (
        math.prod(window)
        if count_include_pad
        else _valid_tap_counts(spatial, lay.spatial(dy.shape), window, strides, pairs, lay)
    )
    return _sum_pool_grad(dy / divisor, spatial, window, strides, pairs, lay)


# ---------------------------------------------------------------------------------------------
# Fully connected layers (notes 002, 全连接层).


def dense_grads(a_prev, w, delta):
    """One dense layer ``z = a_prev @ w + b``: ``(dW, db, delta @ w.T)`` (notes 002).

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

    Follows notes 002: ``delta_l = (delta_{l+1} W_{l+1}^T) * sigma'(z_l)`` from the last layer's
    ``delta_L = dC/dz_L`` down, with ``dW_l``, ``db_l`` from ``dense_grads``.

    layer_inputs: ``a_0 .. a_{L-1}``, each ``(..., in_l)``; weights: ``W_1 .. W_L``, ``(in_l, out_l)``;
    pre_activations: the hidden ``z_1 .. z_{L-1}``; delta: ``delta_L``, ``(..., out_L)``;
    activation_derivative: ``sigma'``, applied elementwise to each hidden ``z_l``.
    Returns: ``(grads, delta_in)``: ``grads[l] = (dW, db)`` per layer, in order, and
    ``delta_in = dC/da_0`` (to continue into the layers before the stack).

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
