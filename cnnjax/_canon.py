"""Canonicalize user arguments once, at the boundary of every public op.

Past these helpers every value is a tuple of ints, a ``Layout`` or a tuple of ``(lo, hi)``
pairs; nothing below re-parses user input. Errors name the op, the argument, the rule and
the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.shapes import PADDING_STRINGS, check_positive, conv_output_size, pool_output_size, resolve_padding

IMPLS = ("auto", "closed_form", "lax")
_SPATIAL_LETTERS = {1: "W", 2: "HW", 3: "DHW"}
# name -> (channels_last, spatial rank): every name fixes its rank ("NHWC" is 2-D, "NWC" 1-D)
_NAMED_LAYOUTS = {
    "NWC": (True, 1),
    "NHWC": (True, 2),
    "NDHWC": (True, 3),
    "NCW": (False, 1),
    "NCHW": (False, 2),
    "NCDHW": (False, 3),
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the channel axis is, and how many spatial dims there are (of a batched array).

    Built by :func:`layout_of` from a layout name (``"NWC"`` .. ``"NCDHW"``, each naming its
    spatial rank) or ``None`` (channels-last) and the call's spatial rank.
    """

    channels_last: bool
    spatial_rank: int

    @property
    def lhs(self) -> str:
        sp = _SPATIAL_LETTERS[self.spatial_rank]
        return f"N{sp}C" if self.channels_last else f"NC{sp}"

    @property
    def rhs(self) -> str:
        sp = _SPATIAL_LETTERS[self.spatial_rank]
        return f"{sp}IO" if self.channels_last else f"OI{sp}"

    @property
    def dimension_numbers(self) -> tuple[str, str, str]:
        return (self.lhs, self.rhs, self.lhs)

    @property
    def channel_axis(self) -> int:
        return self.spatial_rank + 1 if self.channels_last else 1

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        first = 1 if self.channels_last else 2
        return tuple(range(first, first + self.spatial_rank))

    @property
    def kernel_spatial_axes(self) -> tuple[int, ...]:
        return tuple(range(self.spatial_rank)) if self.channels_last else tuple(range(2, 2 + self.spatial_rank))

    @property
    def kernel_in_axis(self) -> int:
        return self.spatial_rank if self.channels_last else 1

    @property
    def kernel_out_axis(self) -> int:
        return self.spatial_rank + 1 if self.channels_last else 0

    def spatial(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape[a] for a in self.spatial_axes)

    def channels(self, shape: Sequence[int]) -> int:
        return shape[self.channel_axis]

    def shape(self, batch: int, spatial: Sequence[int], channels: int) -> tuple[int, ...]:
        """Array shape ``(N, *spatial, C)`` or ``(N, C, *spatial)``."""
        if self.channels_last:
            return (batch, *spatial, channels)
        return (batch, channels, *spatial)

    def window(self, spatial: Sequence[int], fill: int = 1) -> tuple[int, ...]:
        """A full-rank window/stride tuple with ``fill`` on the batch and channel axes."""
        if self.channels_last:
            return (fill, *spatial, fill)
        return (fill, fill, *spatial)

    def doc(self, batched: bool = True) -> str:
        """The shape an input has in this layout, in letters: ``"(N, H, W, C)"``, ``"(C, H, W)"``."""
        letters = self.lhs if batched else self.lhs[1:]
        return f"({', '.join(letters)})"


def named_rank(layout, op: str) -> tuple[bool, int | None]:
    """``(channels_last, spatial rank or None)`` of a layout argument: a name (any case) or ``None``."""
    if layout is None:
        return True, None
    if not isinstance(layout, str) or layout.upper() not in _NAMED_LAYOUTS:
        raise ValueError(f"{op}: layout={layout!r} is not one of {tuple(_NAMED_LAYOUTS)} or None")
    return _NAMED_LAYOUTS[layout.upper()]


def layout_of(shape, layout, op: str, *, kernel_shape=None, kernel_arg: str = "kernel", per_dim=None, arg: str = "x"):
    """The rank rule (docs/conventions.md, Layouts): ``(Layout, batched)`` of an input.

    The spatial rank comes from, first to last: ``kernel_shape`` (its rank minus 2, conv ops);
    ``per_dim = (name, value)`` when ``value`` is a sequence (a pool's ``window_shape`` or
    ``output_size``: its length); the rank ``layout`` names (``"NHWC"``: 2); otherwise the input's
    rank minus 2. An input of rank ``spatial + 2`` is batched, of rank ``spatial + 1`` unbatched
    (the op adds the batch axis at its boundary and drops it from the result); any other rank, or
    a layout that names another rank than the kernel or sequence, raises ``ValueError`` naming the
    shapes expected. ``layout=None`` is channels-last.

    >>> layout_of((3, 8, 8), "NCHW", "max_pool")
    (Layout(channels_last=False, spatial_rank=2), False)
    >>> layout_of((1, 8, 8, 3), None, "conv", kernel_shape=(3, 3, 3, 16))
    (Layout(channels_last=True, spatial_rank=2), True)
    """
    shape = tuple(shape)
    channels_last, named = named_rank(layout, op)
    rank, source = None, ""
    if kernel_shape is not None:
        kernel_shape = tuple(kernel_shape)
        rank, source = len(kernel_shape) - 2, f"{kernel_arg} of shape {kernel_shape}"
        if not 1 <= rank <= 3:
            raise ValueError(
                f"{op}: {kernel_arg} must have rank 3 to 5 (1 to 3 spatial dims and two channel axes), "
                f"got shape {kernel_shape}"
            )
        reason = f"a {rank}-D {kernel_arg}"
    elif per_dim is not None and isinstance(per_dim[1], Sequence) and not isinstance(per_dim[1], str):
        name, value = per_dim
        rank, source = len(value), f"{name}={tuple(value)!r}"
        if not 1 <= rank <= 3:
            raise ValueError(f"{op}: {source} must have one entry per spatial dim, 1 to 3")
        reason = source
    if rank is not None and named is not None and named != rank:
        raise ValueError(f"{op}: layout={layout!r} names {named} spatial dims, but {source} has {rank}")
    if rank is None and named is not None:
        rank, reason = named, f"layout {layout!r}"
    elif rank is None:
        rank = len(shape) - 2
        if not 1 <= rank <= 3:
            raise ValueError(
                f"{op}: {arg} must be batched with 1 to 3 spatial dims, (N, W, C) to (N, D, H, W, C), when no "
                f"kernel, window_shape/output_size sequence or layout name gives the spatial rank; got shape {shape}"
            )
    lay = Layout(channels_last, rank)
    if len(shape) not in (rank + 1, rank + 2):
        raise ValueError(f"{op}: {arg} must be {lay.doc()} or {lay.doc(batched=False)} for {reason}, got shape {shape}")
    return lay, len(shape) == rank + 2


def with_batch_axis(x, batched: bool):
    """``x`` batched: as it is, or with a batch axis of 1 added in front (an unbatched input)."""
    return x if batched else x[None]


def without_batch_axis(y, batched: bool):
    """Undo :func:`with_batch_axis` on an op's result (an array or a tuple of arrays)."""
    return y if batched else jax.tree.map(lambda a: a[0], y)


def canonicalize_tuple(value, n: int, name: str, op: str, minimum: int = 1) -> tuple[int, ...]:
    """An int or a length-``n`` sequence of ints -> a length-``n`` tuple of ints >= ``minimum``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"{op}: {name}={tuple(value)!r} must have one entry per spatial dim ({n})")
        return tuple(check_positive(v, name, op, minimum) for v in value)
    return (check_positive(value, name, op, minimum),) * n


def canonicalize_padding(padding, n: int, op: str):
    """A padding string (upper-cased) or a tuple of ``n`` ``(lo, hi)`` pairs.

    Accepts a string, an int (every side), a flat sequence of ``n`` ints (one per dim) or a
    sequence of ``n`` ``(lo, hi)`` pairs. A flat sequence always means one int per dim.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in PADDING_STRINGS:
            raise ValueError(f"{op}: padding={padding!r} is not one of {PADDING_STRINGS}, an int or (lo, hi) pairs")
        return "SAME" if mode == "SAME_UPPER" else mode
    if isinstance(padding, Sequence):
        if len(padding) != n:
            raise ValueError(f"{op}: padding={padding!r} must have one entry per spatial dim ({n})")
        if all(isinstance(p, Sequence) for p in padding):
            if any(len(p) != 2 for p in padding):
                raise ValueError(f"{op}: padding={padding!r} must hold (lo, hi) pairs")
            return tuple(resolve_padding(tuple(p), 1, 1, op=op) for p in padding)
        return tuple(resolve_padding(p, 1, 1, op=op) for p in padding)
    p = resolve_padding(padding, 1, 1, op=op)
    return (p,) * n


FLAX_PADDING_STRINGS = ("CIRCULAR", "REFLECT", "CAUSAL")


def flax_padding(padding, padding_mode: str, kernel_size, kernel_dilation, op: str):
    """``flax.nnx.Conv``'s padding strings as ``(padding, padding_mode)``; other paddings unchanged.

    ``"CIRCULAR"`` / ``"REFLECT"``: ``((k' - 1) // 2, k' // 2)`` per dim, ``k' = d*(k-1) + 1``, with
    ``padding_mode`` ``"circular"`` / ``"reflect"`` (Flax pads so, then runs a VALID conv: at
    stride 1 the output keeps the input's size). ``"CAUSAL"`` (1-D only): ``(d*(k-1), 0)`` zeros,
    each output sees only its position and the ones before. ``padding_mode`` must then be
    ``"zeros"``: the string already says how to pad.

    >>> flax_padding("CIRCULAR", "zeros", (4, 3), (1, 2), "Conv")
    (((1, 2), (2, 2)), 'circular')
    >>> flax_padding("causal", "zeros", (3,), (2,), "Conv")
    (((4, 0),), 'zeros')
    """
    if not (isinstance(padding, str) and padding.upper() in FLAX_PADDING_STRINGS):
        return padding, padding_mode
    mode = padding.upper()
    if padding_mode != "zeros":
        raise ValueError(
            f"{op}: padding={padding!r} says how to pad; it takes padding_mode='zeros', got {padding_mode!r}"
        )
    spans = [d * (k - 1) + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
    if mode == "CAUSAL":
        if len(spans) != 1:
            raise ValueError(f"{op}: padding='CAUSAL' is for 1-D convolutions, got kernel_size={tuple(kernel_size)}")
        return ((spans[0] - 1, 0),), "zeros"
    return tuple(((k - 1) // 2, k // 2) for k in spans), {"CIRCULAR": "circular", "REFLECT": "reflect"}[mode]


def padding_pairs(padding, sizes, window, strides, dilation, op: str) -> tuple[tuple[int, int], ...]:
    """Resolve canonical padding to explicit ``(lo, hi)`` pairs for these input sizes."""
    if isinstance(padding, str):
        return tuple(
            resolve_padding(padding, n, k, s, d, op)
            for n, k, s, d in zip(sizes, window, strides, dilation, strict=True)
        )
    return padding


def require_float(x, op: str, arg: str = "x") -> None:
    """Raise ``TypeError`` unless ``x`` has a floating (or complex) dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"{op}: {arg} must be floating point, got dtype {np.dtype(dtype).name}")


def check_impl(impl, op: str) -> str:
    """Return ``impl`` if it is one of ``IMPLS`` (see ``cnnjax.backprop``); else raise ``ValueError``."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {IMPLS}")
    return impl


# --- canonical geometry: the static description every op, formula and primitive shares --------


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Everything spatial about one convolution, canonical and hashable.

    The input's spatial sizes, the kernel window, strides, explicit ``(lo, hi)`` pads (a negative
    ``hi`` crops: the exact-fit pads of a transposed conv's forward), kernel dilation, group
    count and layout. The notes' three conv maps share it: the forward (``input_spatial`` ->
    ``output_spatial``), its input gradient (the transposed conv, back) and its kernel gradient.
    """

    layout: Layout
    input_spatial: tuple[int, ...]
    window: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int = 1

    @property
    def output_spatial(self) -> tuple[int, ...]:
        """Per dim ``floor((n + lo + hi - d*(k-1) - 1) / s) + 1`` (docs/geometry.md)."""
        return tuple(
            conv_output_size(n + lo + hi, k, s, 0, d)
            for n, k, s, (lo, hi), d in zip(
                self.input_spatial, self.window, self.strides, self.padding, self.dilation, strict=True
            )
        )


@dataclasses.dataclass(frozen=True)
class PoolGeometry:
    """Everything spatial about one pooling call, canonical and hashable.

    ``padding`` is the caller's ``(lo, hi)`` pads and ``out`` PyTorch's output sizes (with
    ``ceil_mode``); ``reduce_padding`` is what a reduce_window needs to give exactly ``out``
    windows.
    """

    layout: Layout
    input_spatial: tuple[int, ...]
    window: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    out: tuple[int, ...]

    @property
    def reduce_padding(self) -> tuple[tuple[int, int], ...]:
        """Padding under which a reduce_window yields exactly ``out`` windows.

        The caller's padding where it already gives ``out`` windows (then the program is the bare
        ``lax.reduce_window`` a user would write); otherwise (``ceil_mode``'s overhang, or a high
        pad that a window would start in) the high side ends at the last window.
        """
        pairs = []
        for n, w, s, d, (lo, hi), o in zip(
            self.input_spatial, self.window, self.strides, self.dilation, self.padding, self.out, strict=True
        ):
            span = d * (w - 1) + 1
            if (n + lo + hi - span) // s + 1 != o:
                hi = max((o - 1) * s + span - n - lo, 0)
            pairs.append((lo, hi))
        return tuple(pairs)

    @property
    def padded_spatial(self) -> tuple[int, ...]:
        """The input's spatial sizes with ``reduce_padding`` added."""
        return tuple(n + lo + hi for n, (lo, hi) in zip(self.input_spatial, self.reduce_padding, strict=True))


def per_dim(op: str, size_fn, *columns) -> tuple[int, ...]:
    """``size_fn`` (a ``cnnjax.shapes`` rule) per spatial dim, its errors re-raised under ``op``."""
    out = []
    for dim, args in enumerate(zip(*columns, strict=True)):
        try:
            out.append(size_fn(*args))
        except ValueError as err:
            raise ValueError(f"{op}: along spatial dim {dim}: {err}") from None
    return tuple(out)


def kernel_doc(layout: Layout) -> str:
    return f"{layout.rhs} (kernel for layout {layout.lhs})"


def conv_geometry(
    op: str, x_shape, kernel_shape, layout: Layout, strides, padding, kernel_dilation, feature_group_count
) -> ConvGeometry:
    """Check a forward kernel ``(.., C_in // groups, C_out)`` against a batched input of ``x_shape``
    (both of ``layout``'s rank, :func:`layout_of`) and canonicalize the rest; raises ``ValueError``
    naming ``op`` and the offending value."""
    x_shape, kernel_shape = tuple(x_shape), tuple(kernel_shape)
    rank = layout.spatial_rank
    groups = check_positive(feature_group_count, "feature_group_count", op)
    c_in = layout.channels(x_shape)
    k_in, c_out = kernel_shape[layout.kernel_in_axis], kernel_shape[layout.kernel_out_axis]
    if c_in % groups:
        raise ValueError(f"{op}: feature_group_count={groups} must divide C_in={c_in} (x shape {x_shape})")
    if k_in * groups != c_in:
        raise ValueError(
            f"{op}: kernel has {k_in} input channels but x has C_in={c_in} and feature_group_count={groups}, "
            f"so the kernel needs C_in // feature_group_count = {c_in // groups}; kernel shape {kernel_shape} "
            f"is {kernel_doc(layout)}"
        )
    if c_out % groups:
        raise ValueError(f"{op}: feature_group_count={groups} must divide C_out={c_out} (kernel shape {kernel_shape})")
    strides = canonicalize_tuple(strides, rank, "strides", op)
    dilation = canonicalize_tuple(kernel_dilation, rank, "kernel_dilation", op)
    window = tuple(kernel_shape[a] for a in layout.kernel_spatial_axes)
    sizes = layout.spatial(x_shape)
    pairs = padding_pairs(canonicalize_padding(padding, rank, op), sizes, window, strides, dilation, op)
    per_dim(op, conv_output_size, sizes, window, strides, pairs, dilation)
    return ConvGeometry(layout, sizes, window, strides, pairs, dilation, groups)


def _first_empty_window(n: int, w: int, s: int, d: int, lo: int, out: int) -> int | None:
    """The first of ``out`` windows (taps ``j*s + a*d - lo``, ``a < w``) with no tap inside
    ``[0, n)``, or ``None``. Taps ``d <= n`` apart cannot skip over the input, so then only a
    window wholly in the left padding (the first) or the right padding (the last) can be empty."""
    for j in range(out) if d > n else (0, out - 1):
        start = j * s - lo
        first = -(start // d) if start < 0 else 0  # the first tap at or after position 0
        if first >= w or start + first * d >= n:
            return j
    return None


def pool_geometry(op: str, x_shape, layout: Layout, window_shape, strides, padding, window_dilation, ceil_mode):
    """Canonicalize a pooling call once (``strides=None`` means the window, PyTorch/d2l).

    Raises ``ValueError`` if an output size would be < 1, or if a window would hold no input
    element, only padding (PyTorch refuses such padding too: it caps it at half the window).
    """
    rank = layout.spatial_rank
    sizes = layout.spatial(x_shape)
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
    for dim, (n, w, s, d, (lo, hi), o) in enumerate(zip(sizes, window, strides, dilation, pads, out, strict=True)):
        j = _first_empty_window(n, w, s, d, lo, o)
        if j is not None:
            raise ValueError(
                f"{op}: padding ({lo}, {hi}) along spatial dim {dim} (size {n}) leaves window {j} with no input "
                f"element, only padding (window_shape={window}, strides={strides}, window_dilation={dilation}); "
                f"every window must hold at least one"
            )
    return PoolGeometry(layout, sizes, window, strides, pads, dilation, out)
