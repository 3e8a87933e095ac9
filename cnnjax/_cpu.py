"""XLA:CPU schedules of the notes' formulas: how cnnjax's primitives are lowered on CPU.

Every function here computes exactly what its formula in :mod:`cnnjax.backprop` computes, in a
form measured faster on XLA:CPU (``experiments/bench_backprop.py``; the comments give each
measurement, on the project's 2-core x86 VM, jax 0.10.2). :mod:`cnnjax._primitives` registers the
entry points at the bottom (``correlate``, ``input_grad``, ``kernel_grad``, ``window_max``,
``window_argmax``, ``window_max_gather``, ``window_max_scatter``, ``window_sum_transpose``) as the CPU lowerings of its primitives for
``impl="auto"``. Which schedule an entry point takes is one pure function of the geometry and
the operands' shapes and dtypes, :func:`plan`, whose thresholds are the fields of :class:`Limits`:

======================== =================================== ========================= ===========================
tactic (``Plan.tactic``) when it applies                     its limit (``Limits``)    what it gains, measured
======================== =================================== ========================= ===========================
``formula`` (any op)     outside every limit below; not      ``unrolled_taps`` 25,     compile time: a 13x13
                         float32; symbolic or zero sizes     ``unrolled_groups`` 32    depthwise jit(grad) 16-26 s
                                                                                       unrolled, 0.3 s as formula
correlate ``matmul``     ungrouped 1x1                       -                         2-6x (32x56x56x64 -> 256)
correlate ``conv``       ungrouped, C_in > 1                 -                         (XLA's convolution)
correlate ``per_group``  grouped, C_in/G > 8                 ``unrolled_group_channels`` 8 groups of 32: 4.7x
correlate ``per_tap``    grouped with C_in/G <= 8, or C_in 1 ``unrolled_group_channels`` depthwise 8x112x112x32: 35x
input_grad ``folded``    ungrouped, C_in < 8, stride 1 on    ``fold_below_channels``   LeNet-5's layers: 1.7-3x
                         the axes not folded
input_grad ``phases``    the rest: one conv per stride phase stride phases <= 25       ResNet 7x7/2 stem: 5x
kernel_grad ``per_tap``  depthwise, <= 9 taps                ``unrolled_kernel_grad_   depthwise 8x112x112x32:
                                                             taps``, ``slab_*``,       1.7x over per group
                                                             ``join_size``
kernel_grad ``tap_loop`` depthwise, > 9 taps                 -                         5x5 compiles 1.6x faster,
                                                                                       runs 1.7x slower
kernel_grad ``matmul``   1x1 kernel                          -                         6-10x
kernel_grad              grouped: one correlation per group  ``unrolled_groups``       32 groups of 4: 370x
``per_group``
kernel_grad ``chunks``   dense: one correlation per batch    ``kernel_grad_*``         32x56x56x64 -> 64: 2.8x
                         chunk of about 1024 positions
window_max ``fold``      max and min pools, ids, gradients   ``unrolled_taps``         3x3/2 on 8x112x112x64,
                                                                                       forward+backward: 2.8x
window_sum_transpose     sum and avg pool gradients, written ``unrolled_taps``         no scatter
``write_back``           back per output phase
======================== =================================== ========================= ===========================

Gains are against XLA:CPU running the plain formula, on the project's 2-core x86 VM with jax
0.10.2. Measured with ``experiments/bench_backprop.py`` and ``experiments/bench_compile.py``; the comment
above each schedule gives the measurement in full. Windows are read as one strided slice per tap;
gradients are written back per output phase, the same decomposition as the conv input gradient
(``_overlap_add``). Tests call :func:`plan` to see which schedule a geometry takes, and pass
``limits=`` to an entry point to run a schedule past its default limits.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax import backprop
from cnnjax._canon import ConvGeometry, Layout, PoolGeometry
from cnnjax.shapes import conv_output_size


@dataclasses.dataclass(frozen=True)
class Limits:
    """Every threshold of the schedules (the table above; each field's measurement is in the
    comment above the schedule that reads it)."""

    unrolled_taps: int = 25  # window taps (and stride phases) past which the formula runs
    unrolled_groups: int = 32  # groups past which a per-group schedule gives way to the formula
    unrolled_group_channels: int = 8  # input channels per group up to which a grouped conv is per tap
    fold_below_channels: int = 8  # input channels below which the input gradient folds taps
    unrolled_kernel_grad_taps: int = 9  # taps up to which a depthwise kernel gradient is unrolled
    kernel_grad_chunk_positions: int = 1024  # output positions per batch chunk of a kernel gradient
    kernel_grad_unchunked_bytes: int = 1 << 20  # inputs smaller than this are not chunked
    kernel_grad_max_chunks: int = 32
    slab_terms: int = 16  # slabs per product in ``_sum_all_but``
    slab_size: int = 1 << 16  # elements per slab
    join_size: int = 1 << 19  # elements of slab sums joined into one reduction


LIMITS = Limits()


class Plan(NamedTuple):
    """The schedule :func:`plan` chose: a tactic of the table above, and for the kernel gradient's
    ``"chunks"`` the images per batch chunk."""

    tactic: str
    chunk: int = 0


_OPS = ("correlate", "input_grad", "kernel_grad", "window_max", "window_sum_transpose")


def plan(op: str, g, *operands, limits: Limits = LIMITS) -> Plan:
    """Which schedule ``op`` takes on ``operands`` (arrays or ``jax.ShapeDtypeStruct``) with geometry
    ``g`` (a :class:`~cnnjax._canon.ConvGeometry`, or a :class:`~cnnjax._canon.PoolGeometry` for the
    pools): a pure function of the geometry, the shapes and the dtypes.

    ``op`` and its operands: ``"correlate"`` ``(x, kernel)``, ``"input_grad"`` ``(dy, kernel)``,
    ``"kernel_grad"`` ``(x, dy)``, ``"window_max"`` ``(x,)`` (the max and min pools' forward, max
    ids and gradient), ``"window_sum_transpose"`` ``(dy,)``.

    >>> import jax
    >>> from cnnjax._canon import ConvGeometry, Layout
    >>> g = ConvGeometry(Layout(True, 2), (28, 28), (5, 5), (1, 1), ((0, 0), (0, 0)), (1, 1))
    >>> plan("input_grad", g, jax.ShapeDtypeStruct((8, 24, 24, 6), "float32"), jax.ShapeDtypeStruct((5, 5, 1, 6), "float32"))
    Plan(tactic='folded', chunk=0)
    """
    if op not in _OPS:
        raise ValueError(f"plan: op must be one of {_OPS}, got {op!r}")
    if not _scheduled(*operands):
        return Plan("formula")
    taps = math.prod(g.window)
    if op in ("window_max", "window_sum_transpose"):
        if taps > limits.unrolled_taps:
            return Plan("formula")
        return Plan("fold" if op == "window_max" else "write_back")
    if op == "kernel_grad":
        x, dy = operands
        cig, cog = (g.layout.channels(a.shape) // g.groups for a in (x, dy))
    else:
        cig, cog = _channels(operands[1], g)
    depthwise = _depthwise(g.groups, cig, cog)
    fits = taps <= limits.unrolled_taps and not (g.groups > 1 and not depthwise and g.groups > limits.unrolled_groups)
    if op == "correlate":
        return Plan(_correlate_tactic(g.groups, cig, g.window, limits) if fits else "formula")
    if op == "input_grad":
        folded = _folded(g.groups, cig, g.strides, limits)
        per_tap = g.groups > 1 or cog == 1 or folded
        if (per_tap and not fits) or math.prod(g.strides) > limits.unrolled_taps:
            return Plan("formula")
        return Plan("folded" if folded else "phases")
    if depthwise:
        if not fits:
            return Plan("formula")
        return Plan("tap_loop" if taps > limits.unrolled_kernel_grad_taps else "per_tap")
    if g.groups > limits.unrolled_groups:
        return Plan("formula")
    if taps == 1:
        return Plan("matmul")
    if g.groups > 1:
        return Plan("per_group")
    batch, positions = x.shape[0], math.prod(g.layout.spatial(dy.shape))
    chunk = max(-(-limits.kernel_grad_chunk_positions // positions), -(-batch // limits.kernel_grad_max_chunks))
    if math.prod(x.shape) * np.dtype(x.dtype).itemsize < limits.kernel_grad_unchunked_bytes:
        chunk = batch
    return Plan("chunks", chunk)


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


def _pad_to(x, shape):
    """``x`` padded with zeros at the end of each axis to ``shape``."""
    pads = [(0, n - m, 0) for n, m in zip(shape, x.shape, strict=True)]
    return lax.pad(x, jnp.zeros((), x.dtype), pads) if any(map(any, pads)) else x


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
# instead as an elementwise sum of a few slabs of each product (along the leading summed axes),
# it is one loop per product that reads the operands once and writes a sixteenth of it, and only
# that is reduced (the same layer: 1.6 MiB, no faults, 1.4 ms). A product is cut into no more
# slabs than keep each at most ``Limits.slab_size`` elements (256 KiB of float32).
#
# XLA:CPU's compile time is LLVM's, and grows with the slices and products in each loop. Each
# tap's slab sum built ``_in_halves`` (two loops per tap, the slices twice) made the first
# ``jit(grad)`` of an 8x40x40x16 3x3 depthwise conv compile in 2.3-2.9 s (lax: 0.3 s). Joined
# along the minor axis instead, up to ``Limits.join_size`` elements of slab sums per join (which also
# keeps them a buffer of their own), they are one loop per tap and one reduction per join:
# 1.3-1.4 s. Forward+backward of the eight layers measured ran in 0.6-1.14x the time (8x40x40x16:
# 0.72-1.08; NCHW 8x32x56x56: 0.61-0.66; 8x112x112x32, whose taps join in pairs: 1.12, twice)
# and compiled 1.2-4x faster (docs/performance.md#compile-time). Each tap's slab sum is padded to
# one shape once: padding each slab instead (a bounds test per slab and element) ran 1.1-1.5x slower.


def _sum_all_but(products, shape, keep, limits: Limits):
    """Each product's sum over every axis not in ``keep``, as an array ``(len(products), prod of
    the kept sizes)``, kept axes in order. A product is ``(block, its shape)``, at most ``shape``
    along each axis, and ``block(start, limit)`` is its part ``[start, limit)``. First each
    product's elementwise sum of up to ``limits.slab_terms`` slabs of at most about ``limits.slab_size``
    elements along the leading summed axes (the first two that are not the minor axis; short slabs
    are padded with zeros); then these, joined along the minor axis in groups of up to
    ``limits.join_size`` elements (a group of one built ``_in_halves``), are reduced."""
    rank = len(shape)
    summed = [i for i in range(rank) if i not in keep]
    counts, left = {}, min(limits.slab_terms, -(-math.prod(shape) // limits.slab_size))
    for axis in [i for i in summed if i < rank - 1][:2]:
        counts[axis] = min(shape[axis], left)
        left //= counts[axis]
    slab = [-(-n // counts.get(axis, 1)) for axis, n in enumerate(shape)]

    def slab_sum(block, size, lo: int, hi: int):
        """The sum of one product's slabs over ``lo:hi`` of the minor axis."""
        terms = []
        for index in itertools.product(*map(range, counts.values())):
            start, limit = [0] * rank, list(size)
            for axis, j in zip(counts, index, strict=True):
                start[axis], limit[axis] = j * slab[axis], min((j + 1) * slab[axis], size[axis])
            if all(b < e for b, e in zip(start, limit, strict=True)):
                term = lax.slice_in_dim(block(start, limit), lo, hi, axis=-1)
                terms.append(_pad_to(term, [slab[a] if a in counts else n for a, n in enumerate(term.shape)]))
        while len(terms) > 1:  # a balanced tree of adds
            terms = [functools.reduce(jnp.add, terms[i : i + 2]) for i in range(0, len(terms), 2)]
        return terms[0]

    def reduced(sums, n: int):
        """``sums``, ``n`` slab sums joined along the minor axis, reduced: ``(n, kept sizes)``."""
        sums = sums.reshape(*sums.shape[:-1], n, sums.shape[-1] // n)  # the products on an axis of their own
        kept = [axis if axis < rank - 1 else rank for axis in keep]  # the minor axis moved past it
        sums = jnp.sum(sums, axis=tuple(a for a in range(rank + 1) if a != rank - 1 and a not in kept))
        return jnp.moveaxis(sums, sum(a < rank - 1 for a in kept), 0).reshape(n, -1)

    def joined(group):
        """The group's slab sums, joined along the minor axis (padded with zeros to one shape; a
        lone one's built ``_in_halves``), reduced."""
        if len(group) == 1:
            return reduced(_in_halves(functools.partial(slab_sum, *group[0]), group[0][1][-1]), 1)
        common = [max(size[axis] for _, size in group) for axis in range(rank)]
        parts = [slab_sum(block, size, 0, size[-1]) for block, size in group]
        parts = [_pad_to(p, [n if a in counts else common[a] for a, n in enumerate(p.shape)]) for p in parts]
        return reduced(jnp.concatenate(parts, axis=-1), len(parts))

    per_join = max(1, limits.join_size // math.prod(slab))
    return jnp.concatenate([joined(products[i : i + per_join]) for i in range(0, len(products), per_join)])


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
def _correlate_tactic(groups: int, cig: int, window, limits: Limits) -> str:
    """How ``_correlate`` computes a correlation (the table's correlate rows)."""
    if groups == 1 and math.prod(window) == 1:
        return "matmul"
    if groups == 1 and cig > 1:
        return "conv"
    return "per_group" if cig > limits.unrolled_group_channels else "per_tap"


def _depthwise(groups: int, cig: int, cog: int) -> bool:
    """Grouped convs with one input or one output channel per group."""
    return groups > 1 and min(cig, cog) == 1


def _per_group(fn, groups: int, a, a_axis: int, b, b_axis: int, out_axis: int, **geometry):
    """A grouped conv as ``groups`` dense ones: ``fn(a_g, b_g, groups=1, **geometry)`` on each
    group's slices of ``a`` and ``b`` (split along the given axes), concatenated along ``out_axis``."""
    pieces = zip(jnp.split(a, groups, a_axis), jnp.split(b, groups, b_axis), strict=True)
    return jnp.concatenate([fn(ai, bi, groups=1, **geometry) for ai, bi in pieces], out_axis)


def _correlate(
    x, kernel, strides, padding, dilation, groups, layout: Layout, precision, limits: Limits, buffered: bool = True
):
    """Zero-padded cross-correlation, the conv layer's forward (docs/convolutions.md: ``Y = X (*) K``).

    ``buffered=False`` lets XLA fuse per-tap products into what consumes them (the phases of an
    input gradient, interleaved into one array)."""
    window = _kernel_window(kernel.shape, layout)
    tactic = _correlate_tactic(groups, kernel.shape[layout.kernel_in_axis], window, limits)
    if tactic == "matmul":
        # One tap (1x1): Y = X_s W, a matrix product over channels; on CPU 2-6x faster than
        # XLA's convolution (32x56x56x64 -> 256: 38 vs 74 ms forward, 12 vs 71 ms input gradient).
        (xs,) = _tap_slices(_pad_spatial(x, padding, 0, layout), window, strides, dilation, layout)
        weights = (
            kernel.reshape(kernel.shape[layout.kernel_in_axis], -1)
            if layout.channels_last
            else kernel.reshape(-1, kernel.shape[layout.kernel_in_axis]).T
        )
        y = lax.dot_general(xs, weights, (((layout.channel_axis,), (0,)), ((), ())), precision=precision)
        return jnp.moveaxis(y, -1, layout.channel_axis)
    if tactic == "conv":
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=strides,
            padding=padding,
            rhs_dilation=dilation,
            dimension_numbers=layout.dimension_numbers,
            precision=precision,
        )
    if tactic == "per_group":
        geometry = {"strides": strides, "padding": padding, "dilation": dilation, "layout": layout, "limits": limits}
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
            w = weights[:, i].reshape(*(1,) * c, weights.shape[0], weights.shape[2], *trailing)
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


def _folds(cin: int, n: int) -> int:
    """How many trailing spatial axes ``_folded_input_grad`` folds: all with one input channel."""
    return n if cin == 1 else 1


def _folded(groups: int, cin: int, strides, limits: Limits) -> bool:
    """Whether ``_conv_input_grad`` folds taps into channels: ungrouped, few input channels, and
    stride 1 along the axes not folded."""
    n = len(strides)
    return groups == 1 and cin < limits.fold_below_channels and all(s == 1 for s in strides[: n - _folds(cin, n)])


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


def _conv_input_grad(
    dy, kernel, input_spatial, strides, padding, dilation, groups, layout: Layout, precision, limits: Limits
):
    """docs/backprop.md, conv backprop: ``delta_l = pad(dilate(delta_{l+1}, s)) (*) rot180(W)``, in/out swapped.

    Per input phase ``r``: the taps ``a`` with ``r + lo - a*d = 0 (mod s)``, rotated 180 degrees,
    form a kernel of dilation ``d / gcd(s, d)`` that is correlated with ``delta`` at stride 1.

    Ungrouped convs of few input channels fold the taps of the last axis (of every axis, with one
    channel) into the channels instead (``_folded_input_grad``)."""
    window = _kernel_window(kernel.shape, layout)
    if _folded(groups, kernel.shape[layout.kernel_in_axis], strides, limits):
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
                limits,
                buffered=math.prod(strides) == 1,  # one phase: the gradient itself
            )
        )
    return _interleave(phases, strides, input_spatial, layout)


# The correlation form of the kernel gradient is memory-bound in XLA's CPU convolution when it
# contracts over many positions at once; summing it over batch chunks of about 1024 output
# positions is 1.5-3x faster on large inputs (32x56x56x64 -> 64, 3x3: 33 ms in one-image chunks
# vs 92 ms in one piece; 8x224x224x3 -> 64, 7x7/2: 72 vs 184 ms). Inputs under 1 MiB stay in one
# piece (chunking LeNet's first layer doubles its time), and there are at most 32 chunks, to bound
# the compiled program (``Limits.kernel_grad_*``).
def _conv_kernel_grad(x, dy, g: ConvGeometry, precision, limits: Limits):
    """docs/backprop.md, conv backprop: ``dW[a] = sum_{n, x} delta[n, x] * X_pad[n, x*s + a*d]``.

    Three forms of the one formula: depthwise convs take a product and a sum per tap; a one-tap
    (1x1) kernel is one matrix product ``X^T delta``; otherwise the notes' ``dW = delta (*) a_{l-1}``,
    a correlation of the input with ``delta``, summed over batch chunks (grouped convs: one
    correlation per group). Which one: :func:`plan`."""
    p = plan("kernel_grad", g, x, dy, limits=limits)
    geometry = (g.window, g.strides, g.padding, g.dilation, g.groups, g.layout)
    if p.tactic in ("per_tap", "tap_loop"):
        return _depthwise_kernel_grad(x, dy, *geometry, looped=p.tactic == "tap_loop", limits=limits)
    if p.tactic == "matmul":
        return _pointwise_kernel_grad(x, dy, *geometry, precision)
    if p.tactic == "per_group":
        c, dense = g.layout.channel_axis, dataclasses.replace(g, groups=1)
        parts = zip(jnp.split(x, g.groups, c), jnp.split(dy, g.groups, c), strict=True)
        return jnp.concatenate(
            [_conv_kernel_grad(xi, dyi, dense, precision, limits) for xi, dyi in parts], g.layout.kernel_out_axis
        )
    chunk, batch = p.chunk, x.shape[0]
    parts = [backprop.kernel_grad(x[i : i + chunk], dy[i : i + chunk], g, precision) for i in range(0, batch, chunk)]
    return functools.reduce(jnp.add, parts)


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


# A depthwise kernel gradient's per-tap slab sums are most of its compile time, which grows with
# the taps. Past ``Limits.unrolled_kernel_grad_taps`` taps they run in a ``fori_loop`` over the
# taps, one body compiled once, reading each tap through a dynamic slice of a padded copy: a 5x5
# layer's jit(grad) (both arguments) compiled in 2.1 s against 3.3 s unrolled (8x40x40x16; 8x112x112x32:
# 2.8 against 4.6 s) and ran 1.6-1.8x slower (8.2 against 4.5 ms; 185 against 117 ms, same run),
# still far faster than XLA's grouped-conv kernel gradient.


def _depthwise_kernel_grad(
    x, dy, window, strides, padding, dilation, groups, layout: Layout, *, looped: bool, limits: Limits
):
    """Per tap ``a``: ``dW[a] = sum_{n, x} X_pad[n, x*s + a*d] * delta[n, x]`` within each group
    (one input or one output channel per group: the product broadcasts the one over the other),
    unrolled over the taps, or ``looped`` over them."""
    cig, cog = layout.channels(x.shape) // groups, layout.channels(dy.shape) // groups
    c, split = layout.channel_axis, not cig == cog == 1  # no split: a size-1 axis costs XLA a copy per tap
    spatial = tuple(a + (split and a > c) for a in layout.spatial_axes)  # in the product
    keep = (c, c + 1) if split else (c,)

    def product(xs, dys):
        if split:
            return _split_channels(xs, groups, layout)[0] * _split_channels(dys, groups, layout)[0]
        return xs * dys

    def product_shape(count):
        shape = list(layout.shape(x.shape[0], count, groups * max(cig, cog)))
        shape[c : c + 1] = [groups, max(cig, cog)] if split else shape[c : c + 1]
        return shape

    def cut(v, start, limit):
        """``v`` (batch, space and channels) cut to the product's ``[start, limit)`` in batch and space."""
        lo, hi = [0] * v.ndim, list(v.shape)
        lo[0], hi[0] = start[0], limit[0]
        for axis, a in zip(layout.spatial_axes, spatial, strict=True):
            lo[axis], hi[axis] = start[a], limit[a]
        return lax.slice(v, lo, hi)

    out = layout.spatial(dy.shape)
    shape, taps = product_shape(out), math.prod(window)
    if looped:
        xp = _pad_spatial(x, padding, 0, layout)
        offsets = jnp.asarray([[a * d for a, d in zip(tap, dilation, strict=True)] for tap in _taps(window)])

        def tap_grad(t, grads):
            start, sizes = [0] * x.ndim, list(xp.shape)
            for i, (axis, o, s) in enumerate(zip(layout.spatial_axes, out, strides, strict=True)):
                start[axis], sizes[axis] = offsets[t, i], (o - 1) * s + 1
            xs = _strided_slice(lax.dynamic_slice(xp, start, sizes), [0] * len(out), out, strides, layout)

            def block(start, limit):
                return product(cut(xs, start, limit), cut(dy, start, limit))

            return lax.dynamic_update_slice_in_dim(grads, _sum_all_but([(block, shape)], shape, keep, limits), t, 0)

        grads = jnp.zeros((taps, groups * cig * cog), jnp.result_type(x, dy))
        grads = lax.fori_loop(0, taps, tap_grad, grads)
        return _kernel_from_groups(grads.reshape(*window, groups, cig, cog), layout)

    products, met = [], []  # the taps that meet some input, and their products
    for tap in _taps(window):
        spans = _tap_overlap(tap, layout.spatial(x.shape), out, strides, padding, dilation)
        met.append(spans is not None)
        if spans is None:  # the tap only ever meets padding
            continue
        first, count, x_first = zip(*spans, strict=True)
        # the tap's inputs and the outputs they meet, without padding
        xs = _strided_slice(x, x_first, count, strides, layout)
        dys = _strided_slice(dy, first, count, (1,) * len(count), layout)

        def block(start, limit, xs=xs, dys=dys):
            """The products of the outputs ``[start, limit)`` (batch and space)."""
            return product(cut(xs, start, limit), cut(dys, start, limit))

        products.append((block, product_shape(count)))
    sums = iter(_sum_all_but(products, shape, keep, limits) if products else ())
    grads = [next(sums) if m else jnp.zeros(groups * cig * cog, jnp.result_type(x, dy)) for m in met]
    return _kernel_from_groups(jnp.stack(grads).reshape(*window, groups, cig, cog), layout)


def _write_back(parts, input_spatial, window, strides, padding, dilation, layout: Layout):
    """Window values ``parts[a]`` (one per tap) added back onto the input, padding dropped."""
    padded = tuple(n + lo + hi for n, (lo, hi) in zip(input_spatial, padding, strict=True))
    dxp = _overlap_add(parts, padded, window, strides, dilation, layout)
    return _pad_spatial(dxp, [(-lo, -hi) for lo, hi in padding], 0, layout)


def _sum_pool_grad(dy, w: PoolGeometry):
    """docs/backprop.md, mean pooling: every input of a window receives the window's gradient (the
    mean's divisor is applied to ``dy`` first): ``dx[a*d + j*s] += dy[j]`` over taps ``a``."""
    parts = [dy] * math.prod(w.window)
    return _write_back(parts, w.input_spatial, w.window, w.strides, w.reduce_padding, w.dilation, w.layout)


def _first_real_taps(w: PoolGeometry) -> dict[int, np.ndarray]:
    """For each tap ``t > 0`` that is the first non-padding tap of some window, where: a boolean
    mask over the outputs, shaped to broadcast against them. Static: it depends on the geometry
    only."""
    first_real = {}
    shape = w.layout.shape(1, w.out, 1)
    seen = np.zeros(shape, bool)
    for t, tap in enumerate(_taps(w.window)):
        inside = np.ones((), bool)
        for a, s, d, (lo, _), n, o in zip(
            tap, w.strides, w.dilation, w.reduce_padding, w.input_spatial, w.out, strict=True
        ):
            position = np.arange(o) * s + a * d - lo
            inside = np.multiply.outer(inside, (position >= 0) & (position < n))
        inside = inside.reshape(shape)
        if t > 0 and (inside & ~seen).any():
            first_real[t] = inside & ~seen
        seen |= inside
    return first_real


def _max_pool_argmax(x, w: PoolGeometry, select: str):
    """Window maxima (``select="min"``: minima) of the padded ``x`` and each window's "max id": the
    scan-order index of the first tap holding the maximum. Padding never wins: the padding value
    loses every strict comparison, and the first real tap of a window whose earlier taps are all
    padding replaces them whatever its value (``_first_real_taps``), so a real ``-inf`` beats
    padding."""
    layout = w.layout
    xp = _pad_spatial(x, w.reduce_padding, backprop.lowest(x.dtype, select), layout)
    taps = _tap_slices(xp, w.window, w.strides, w.dilation, layout)
    first_real = _first_real_taps(w)
    beats = lax.gt if select == "max" else lax.lt

    def fold(lo: int, hi: int):
        part = [lax.slice_in_dim(xs, lo, hi, axis=-1) for xs in taps]
        best, index = part[0], jnp.zeros(part[0].shape, backprop.tap_dtype(w))
        for t, xs in enumerate(part[1:], 1):
            # strictly better: a tie keeps the earlier tap; the first NaN wins and stays, as in lax.max
            later = beats(xs, best) | ((xs != xs) & (best == best))
            if t in first_real:
                mask = first_real[t]
                later = later | (mask[..., lo:hi] if mask.shape[-1] > 1 else mask)
            index = jnp.where(later, jnp.asarray(t, index.dtype), index)
            best = jnp.where(later, xs, best)
        return best, index

    return _in_halves(fold, taps[0].shape[-1])


def _max_pool_grad(dy, index, w: PoolGeometry):
    """docs/backprop.md, max pooling: each output's gradient goes to its recorded max id, the rest get 0."""
    parts = [jnp.where(index == t, dy, jnp.zeros_like(dy)) for t in range(math.prod(w.window))]
    return _write_back(parts, w.input_spatial, w.window, w.strides, w.reduce_padding, w.dilation, w.layout)


# ---------------------------------------------------------------------------------------------
# Entry points (the CPU lowerings): the schedule :func:`plan` chooses, or the plain formula.

# Unrolled schedules emit a few operations per window tap (per phase, per slab, per border
# strip), and XLA's compile time grows with them: a 13x13 depthwise conv's first jit(grad) took
# 16-26 s unrolled against 0.3 s for lax's convolution, a 7x7 max pool 11-20 s. Past
# ``Limits.unrolled_taps`` and ``Limits.unrolled_groups`` the plain formulas run instead
# (experiments/bench_compile.py measures both). A dense conv's gradients are not unrolled over the
# taps (a correlation per batch chunk, at most 32; an XLA convolution per stride phase) unless its
# input gradient folds taps into channels: they keep their schedules past them (ResNet's 7x7/2
# stem, 8x224x224x3 -> 64, forward+backward on the Zen 3 host: 934 ms with XLA's gradients, 185-191
# ms scheduled).


def _scheduled(*arrays) -> bool:
    """Whether the measured schedules apply: float32 operands of concrete, nonzero sizes."""
    return all(a.dtype == np.float32 and all(isinstance(d, int) and d > 0 for d in a.shape) for a in arrays)


def _channels(kernel, g: ConvGeometry) -> tuple[int, int]:
    """``(C_in // G, C_out // G)`` of a forward kernel."""
    return kernel.shape[g.layout.kernel_in_axis], kernel.shape[g.layout.kernel_out_axis] // g.groups


def correlate(x, kernel, g: ConvGeometry, precision=None, limits: Limits = LIMITS):
    """:func:`cnnjax.backprop.correlate`, scheduled (``_correlate``)."""
    if plan("correlate", g, x, kernel, limits=limits).tactic == "formula":
        return backprop.correlate(x, kernel, g, precision)
    return _correlate(x, kernel, g.strides, g.padding, g.dilation, g.groups, g.layout, precision, limits)


def input_grad(dy, kernel, g: ConvGeometry, precision=None, limits: Limits = LIMITS):
    """:func:`cnnjax.backprop.input_grad`, scheduled per stride phase (``_conv_input_grad``). A
    dense conv's phases are XLA convolutions, not unrolled over the taps, unless it folds taps into
    channels or has one output channel; it keeps its schedule at any window size."""
    if plan("input_grad", g, dy, kernel, limits=limits).tactic == "formula":
        return backprop.input_grad(dy, kernel, g, precision)
    geometry = (g.input_spatial, g.strides, g.padding, g.dilation, g.groups, g.layout)
    return _conv_input_grad(dy, kernel, *geometry, precision, limits).astype(dy.dtype)


def kernel_grad(x, dy, g: ConvGeometry, precision=None, limits: Limits = LIMITS):
    """:func:`cnnjax.backprop.kernel_grad`, scheduled (``_conv_kernel_grad``). Only a depthwise
    conv's is unrolled over the taps; the others keep their schedule at any window size."""
    if plan("kernel_grad", g, x, dy, limits=limits).tactic == "formula":
        return backprop.kernel_grad(x, dy, g, precision)
    return _conv_kernel_grad(x, dy, g, precision, limits).astype(x.dtype)


def window_argmax(x, w: PoolGeometry, select: str = "max", limits: Limits = LIMITS):
    """:func:`cnnjax.backprop.window_argmax`, as one fold over the taps (``_max_pool_argmax``)."""
    if plan("window_max", w, x, limits=limits).tactic == "formula":
        return backprop.window_argmax(x, w, select)
    return _max_pool_argmax(x, w, select)


def window_max(x, w: PoolGeometry, select: str = "max", limits: Limits = LIMITS):
    """:func:`cnnjax.backprop.window_max`, as the fold over the taps that also records each max id
    (``_max_pool_argmax``; XLA drops the ids where nothing reads them, and computes the fold once
    where the gradient reads them too)."""
    if plan("window_max", w, x, limits=limits).tactic == "formula":
        return backprop.window_max(x, w, select)
    return _max_pool_argmax(x, w, select)[0]


def window_max_gather(t, x, w: PoolGeometry, select: str = "max", limits: Limits = LIMITS):
    """:func:`cnnjax.backprop.window_max_gather` at the max ids of ``_max_pool_argmax``."""
    return backprop.tap_gather(t, window_argmax(x, w, select, limits)[1], w)


def window_max_scatter(dy, x, w: PoolGeometry, select: str = "max", limits: Limits = LIMITS):
    """:func:`cnnjax.backprop.window_max_scatter`, written back per output phase from the max ids
    of ``_max_pool_argmax`` (``_max_pool_grad``)."""
    if plan("window_max", w, dy, x, limits=limits).tactic == "formula":
        return backprop.window_max_scatter(dy, x, w, select)
    return _max_pool_grad(dy, _max_pool_argmax(x, w, select)[1], w)


def window_sum_transpose(dy, w: PoolGeometry, limits: Limits = LIMITS):
    """:func:`cnnjax.backprop.window_sum_transpose`, written back per output phase (``_sum_pool_grad``)."""
    if plan("window_sum_transpose", w, dy, limits=limits).tactic == "formula":
        return backprop.window_sum_transpose(dy, w)
    return _sum_pool_grad(dy, w)
