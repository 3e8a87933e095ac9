"""Integer geometry of convolution and pooling: output sizes, SAME pads, receptive fields.

Pure Python ints, no JAX. Every function works on one spatial dimension; callers map it over
dimensions. Formulas follow the study notes (docs/index.md) and PyTorch where they agree.

Padding for one dimension is one of ``"VALID"``, ``"SAME"`` (= ``"SAME_UPPER"``, the odd extra
pixel at the end, as XLA/TF/PyTorch), ``"SAME_LOWER"`` (extra pixel at the start, the notes'
convention), ``"FULL"`` (``dilation*(k-1)`` each side), an int ``p`` (``p`` on both sides) or a
``(lo, hi)`` pair.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

PADDING_STRINGS = ("VALID", "SAME", "SAME_UPPER", "SAME_LOWER", "FULL")
"""The padding strings every op accepts (case-insensitive); ints and ``(lo, hi)`` pairs too."""

__all__ = [
    "PADDING_STRINGS",
    "ReceptiveField",
    "adaptive_pool_bins",
    "check_positive",
    "conv_output_size",
    "conv_transpose_output_size",
    "pool_output_size",
    "pool_window_counts",
    "receptive_field",
    "resolve_padding",
    "same_padding",
]


def check_positive(value, name: str, op: str, minimum: int = 1) -> int:
    """Return ``value`` as an int, raising ``ValueError`` if it is below ``minimum``."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    value = int(value.__index__())
    if value < minimum:
        raise ValueError(f"{op}: {name}={value} must be >= {minimum}")
    return value


def same_padding(n: int, kernel_size: int, stride: int = 1, dilation: int = 1, lower: bool = False) -> tuple[int, int]:
    """``(lo, hi)`` padding that makes the output ``ceil(n / stride)`` long.

    Total padding is ``max((ceil(n/s) - 1)*s + d*(k-1) + 1 - n, 0)``. With ``lower=False``
    (``"SAME"``) the odd extra pixel goes to the end (XLA, TF, PyTorch); with ``lower=True``
    (``"SAME_LOWER"``) it goes to the start (the notes put the extra row at the top).

    >>> same_padding(8, 4), same_padding(8, 4, lower=True)
    ((1, 2), (2, 1))
    """
    op = "same_padding"
    n = check_positive(n, "n", op)
    k = check_positive(kernel_size, "kernel_size", op)
    s = check_positive(stride, "stride", op)
    d = check_positive(dilation, "dilation", op)
    out = -(-n // s)
    total = max((out - 1) * s + d * (k - 1) + 1 - n, 0)
    small, big = total // 2, total - total // 2
    return (big, small) if lower else (small, big)


def resolve_padding(
    padding, n: int, kernel_size: int, stride: int = 1, dilation: int = 1, op: str = "padding"
) -> tuple[int, int]:
    """Explicit ``(lo, hi)`` for one dimension from any accepted padding form.

    >>> resolve_padding("FULL", 5, 3), resolve_padding(1, 5, 3), resolve_padding((0, 2), 5, 3)
    ((2, 2), (1, 1), (0, 2))
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return (0, 0)
        if mode in ("SAME", "SAME_UPPER", "SAME_LOWER"):
            return same_padding(n, kernel_size, stride, dilation, lower=mode == "SAME_LOWER")
        if mode == "FULL":
            full = dilation * (kernel_size - 1)
            return (full, full)
        raise ValueError(f"{op}: padding={padding!r} is not one of {PADDING_STRINGS}, an int or (lo, hi) pairs")
    if isinstance(padding, Sequence) and len(padding) == 2:
        lo, hi = padding
        return (check_positive(lo, "padding", op, 0), check_positive(hi, "padding", op, 0))
    if isinstance(padding, Sequence):
        raise ValueError(f"{op}: padding for one dimension must be an int or a (lo, hi) pair, got {padding!r}")
    p = check_positive(padding, "padding", op, 0)
    return (p, p)


def conv_output_size(n: int, kernel_size: int, stride: int = 1, padding=0, dilation: int = 1) -> int:
    """Output length of a convolution along one dimension.

    ``floor((n + lo + hi - dilation*(k-1) - 1) / stride) + 1`` (docs/geometry.md; with total padding
    ``p`` and no dilation this is the notes' ``floor((n + p - k + s) / s)``).

    >>> conv_output_size(8, 3, padding=1), conv_output_size(8, 3, stride=2, padding=1)
    (8, 4)
    """
    op = "conv_output_size"
    n = check_positive(n, "n", op)
    k = check_positive(kernel_size, "kernel_size", op)
    s = check_positive(stride, "stride", op)
    d = check_positive(dilation, "dilation", op)
    lo, hi = resolve_padding(padding, n, k, s, d, op)
    span = n + lo + hi - d * (k - 1)
    if span < 1:
        raise ValueError(
            f"{op}: dilated kernel_size={d * (k - 1) + 1} is larger than the padded input {n + lo + hi} "
            f"(n={n}, padding=({lo}, {hi}))"
        )
    return (span - 1) // s + 1


def conv_transpose_output_size(
    n: int, kernel_size: int, stride: int = 1, padding=0, output_padding: int = 0, dilation: int = 1
) -> int:
    """Output length of a transposed convolution along one dimension.

    ``(n-1)*s - lo - hi + d*(k-1) + 1 + output_padding``. ``"SAME"`` gives ``n*s`` (the adjoint
    of a SAME convolution on an input of length ``n*s``); ``"VALID"`` gives
    ``(n-1)*s + d*(k-1) + 1``.

    >>> conv_transpose_output_size(4, 4, 2, 1), conv_transpose_output_size(4, 3, 2, "SAME")
    (8, 8)
    """
    op = "conv_transpose_output_size"
    n = check_positive(n, "n", op)
    k = check_positive(kernel_size, "kernel_size", op)
    s = check_positive(stride, "stride", op)
    d = check_positive(dilation, "dilation", op)
    extra = check_positive(output_padding, "output_padding", op, 0)
    if extra >= max(s, d):
        raise ValueError(f"{op}: output_padding={extra} must be smaller than stride={s} or dilation={d}")
    if isinstance(padding, str) and padding.upper().startswith("SAME"):
        return n * s + extra
    lo, hi = resolve_padding(padding, n * s, k, s, d, op)
    out = (n - 1) * s - lo - hi + d * (k - 1) + 1 + extra
    if out < 1:
        raise ValueError(
            f"{op}: padding=({lo}, {hi}) leaves an output of size {out} < 1 (n={n}, kernel_size={k}, stride={s})"
        )
    return out


def pool_output_size(
    n: int, window: int, stride: int | None = None, padding=0, dilation: int = 1, ceil_mode: bool = False
) -> int:
    """Output length of a pooling window along one dimension, PyTorch's rule.

    ``stride=None`` means ``stride = window``. ``out = floor_or_ceil((n + lo + hi - d*(w-1) - 1)/s) + 1``;
    with ``ceil_mode`` the last window must start inside the input or the left padding
    (``(out-1)*s < n + lo``), else it is dropped.

    >>> pool_output_size(5, 2), pool_output_size(5, 2, ceil_mode=True), pool_output_size(13, 7, 6)
    (2, 3, 2)
    """
    op = "pool_output_size"
    n = check_positive(n, "n", op)
    w = check_positive(window, "window", op)
    s = w if stride is None else check_positive(stride, "stride", op)
    d = check_positive(dilation, "dilation", op)
    lo, hi = resolve_padding(padding, n, w, s, d, op)
    span = n + lo + hi - d * (w - 1)
    if span < 1:
        raise ValueError(
            f"{op}: dilated window={d * (w - 1) + 1} is larger than the padded input {n + lo + hi} (n={n}, padding=({lo}, {hi}))"
        )
    out = (-(-(span - 1) // s) if ceil_mode else (span - 1) // s) + 1
    if ceil_mode and (out - 1) * s >= n + lo:
        out -= 1
    return out


def adaptive_pool_bins(n: int, out: int) -> tuple[tuple[int, int], ...]:
    """PyTorch's adaptive-pool bins along one dimension: bin ``i`` is ``[floor(i*n/out), ceil((i+1)*n/out))``.

    Neighbouring bins overlap by one position where ``out`` does not divide ``n``.

    >>> adaptive_pool_bins(5, 3), adaptive_pool_bins(4, 2)
    (((0, 2), (1, 4), (3, 5)), ((0, 2), (2, 4)))
    """
    n = check_positive(n, "n", "adaptive_pool_bins")
    out = check_positive(out, "out", "adaptive_pool_bins")
    return tuple((i * n // out, -(-(i + 1) * n // out)) for i in range(out))


def pool_window_counts(
    n: int,
    window: int,
    stride: int,
    padding: tuple[int, int],
    out: int,
    include_pad: bool = True,
    dilation: int = 1,
) -> tuple[int, ...]:
    """Taps of each of the ``out`` windows along one dimension that PyTorch's average pool counts.

    Window ``i`` starts at ``i*stride - lo`` and has taps ``start + j*dilation``, ``j < window``;
    it counts those inside the padded input (``include_pad``, PyTorch's
    ``count_include_pad=True``) or inside the input, never the ``ceil_mode`` overhang past the
    padding. A window with no such tap counts 1 (it sums to 0).

    >>> pool_window_counts(5, 2, 2, (1, 0), 3), pool_window_counts(5, 2, 2, (1, 0), 3, include_pad=False)
    ((2, 2, 2), (1, 2, 2))
    >>> pool_window_counts(5, 2, 1, (1, 1), 5, include_pad=False, dilation=2)
    (1, 2, 2, 2, 1)
    """
    lo, hi = padding
    lower, upper = (-lo, n + hi) if include_pad else (0, n)
    starts = (i * stride - lo for i in range(out))
    return tuple(max(sum(lower <= start + j * dilation < upper for j in range(window)), 1) for start in starts)


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one output unit in input pixels.

    ``size``: field width; ``jump``: input distance between adjacent outputs (product of
    strides); ``start``: centre of the first output's field in input coordinates (pixel ``i``
    has centre ``i``; negative when it lies in the padding).
    """

    size: int
    jump: int
    start: float


def _layer_geometry(layer) -> tuple[int, int, int, int]:
    op = "receptive_field"
    if isinstance(layer, Mapping):
        unknown = set(layer) - {"kernel", "kernel_size", "stride", "padding", "dilation"}
        if unknown:
            raise TypeError(f"{op}: unknown layer keys {sorted(unknown)}")
        k = layer.get("kernel", layer.get("kernel_size"))
        if k is None:
            raise TypeError(f"{op}: layer {dict(layer)!r} has no 'kernel'")
        s, p, d = layer.get("stride", 1), layer.get("padding", 0), layer.get("dilation", 1)
    elif isinstance(layer, Sequence) and 2 <= len(layer) <= 4:
        k, s, p, d = (*layer, 0, 1)[:4] if len(layer) == 2 else (*layer, 1)[:4]
    else:
        raise TypeError(f"{op}: a layer is a dict or a tuple (kernel, stride[, padding[, dilation]]), got {layer!r}")
    k = check_positive(k, "kernel", op)
    s = check_positive(s, "stride", op)
    d = check_positive(d, "dilation", op)
    if isinstance(p, str):
        raise TypeError(f"{op}: padding must be an int or (lo, hi), got {p!r} (resolve SAME with same_padding first)")
    lo = resolve_padding(p, 1, k, s, d, op)[0]
    return k, s, lo, d


def receptive_field(layers) -> ReceptiveField:
    """Receptive field of the last layer of a chain of conv/pool layers.

    ``layers``: sequence of dicts (``kernel``, ``stride``, ``padding``, ``dilation``) or tuples
    ``(kernel, stride, padding=0, dilation=1)``. Size uses the notes' top-down rule
    ``RF_prev = (RF - 1)*stride + dilation*(kernel - 1) + 1`` (docs/geometry.md), starting from 1 at the
    last layer.

    >>> rf = receptive_field([(3, 1, 1), (3, 1, 1)])
    >>> rf.size, rf.jump, rf.start
    (5, 1, 0.0)
    """
    geometry = [_layer_geometry(layer) for layer in layers]
    size = 1
    for k, s, _, d in reversed(geometry):
        size = (size - 1) * s + d * (k - 1) + 1
    jump, start = 1, 0.0
    for k, s, lo, d in geometry:
        start += ((d * (k - 1)) / 2 - lo) * jump
        jump *= s
    return ReceptiveField(size=size, jump=jump, start=start)
