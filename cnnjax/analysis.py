"""Parameter, FLOP and receptive-field accounting: the notes' counts, and a per-layer ``summary``.

Counts are per example, as the study notes count them (docs/analysis.md). Conventions:

- FLOPs follow the notes' count (docs/analysis.md): a multiply and an add are one FLOP each; a sum
  of ``n`` products costs ``n`` multiplies and ``n - 1`` adds, plus one add for a bias.
- MACs are multiply-accumulates (the notes' ``Calculations(MAC)``), the unit of most published
  model costs ("ResNet-50: 4.1 GFLOPs" counts MACs). With a bias, FLOPs = 2 * MACs.
- Size arguments (``kernel_size``, ``output_size``, ``window``, ``input_size``) are an int or
  one int per spatial dim. An int is broadcast to the rank of the other size argument, and to
  2-D (the notes' ``k x k`` kernel on an ``H x W`` map) when every size is an int.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import jax
from flax import nnx

from cnnjax import nn
from cnnjax._canon import canonicalize_padding, canonicalize_tuple, padding_pairs
from cnnjax.shapes import adaptive_pool_bins, check_positive, receptive_field

__all__ = [
    "ACTIVATION_FLOPS",
    "LayerRow",
    "Summary",
    "activation_flops",
    "adaptive_pool_flops",
    "batch_norm_flops",
    "conv_flops",
    "conv_macs",
    "conv_params",
    "count_params",
    "dense_flops",
    "dense_macs",
    "dense_params",
    "global_pool_flops",
    "pool_flops",
    "summary",
]

# docs/analysis.md: ReLU is one comparison per element, sigmoid four operations.
ACTIVATION_FLOPS = {"relu": 1, "sigmoid": 4}
"""FLOPs per element of each activation :func:`activation_flops` knows."""


# --- closed-form counts -----------------------------------------------------------------------


def _sizes(op: str, **sizes) -> list[tuple[int, ...]]:
    """Canonicalize size arguments to tuples of one common rank (see the module docstring)."""
    ranks = {len(v) for v in sizes.values() if isinstance(v, Sequence)}
    if len(ranks) > 1:
        raise ValueError(f"{op}: size arguments {sizes} must have the same number of spatial dims")
    rank = ranks.pop() if ranks else 2
    return [canonicalize_tuple(value, rank, name, op) for name, value in sizes.items()]


def _channels_per_group(in_channels, out_channels, groups, op: str) -> tuple[int, int]:
    """``(C_in // groups, C_out)`` after checking that ``groups`` divides both channel counts."""
    c_in = check_positive(in_channels, "in_channels", op)
    c_out = check_positive(out_channels, "out_channels", op)
    g = check_positive(groups, "groups", op)
    for name, value in (("in_channels", c_in), ("out_channels", c_out)):
        if value % g:
            raise ValueError(f"{op}: groups={g} must divide {name}={value}")
    return c_in // g, c_out


def conv_params(in_channels: int, out_channels: int, kernel_size, bias: bool = True, groups: int = 1) -> int:
    """Trainable parameters of a conv layer: ``K*(C_in/g)*C_out + C_out`` (``K`` = prod of kernel dims).

    docs/analysis.md: ``(k^2*C_in + 1)*C_out`` with bias, ``k^2*C_in*C_out`` without;
    with ``groups`` each output channel sees ``C_in/g`` inputs. Independent of the input size.

    >>> conv_params(3, 64, 3), conv_params(3, 64, (3, 3), bias=False), conv_params(32, 32, 3, groups=32)
    (1792, 1728, 320)
    """
    op = "conv_params"
    c_in, c_out = _channels_per_group(in_channels, out_channels, groups, op)
    (kernel,) = _sizes(op, kernel_size=kernel_size)
    return math.prod(kernel) * c_in * c_out + (c_out if bias else 0)


def conv_macs(in_channels: int, out_channels: int, kernel_size, output_size, groups: int = 1) -> int:
    """Multiply-accumulates of a conv layer: ``K*(C_in/g)*H*W*C_out`` per example.

    docs/analysis.md: ``Calculations(MAC) = I*J*M*N*K*L`` (kernel ``I x J``, output
    ``M x N``, ``K`` inputs, ``L`` outputs); with ``groups`` each output sees ``C_in/g`` inputs.
    Taps that fall on zero padding are counted (they are multiplied; XLA's cost model skips them).
    The note's compute-to-parameter ratio ``CPR = MACs / params = H*W`` (no bias) follows.

    >>> conv_macs(3, 64, 3, 300), conv_macs(3, 64, 3, 300) // conv_params(3, 64, 3, bias=False)
    (155520000, 90000)
    """
    op = "conv_macs"
    c_in, c_out = _channels_per_group(in_channels, out_channels, groups, op)
    kernel, out = _sizes(op, kernel_size=kernel_size, output_size=output_size)
    return math.prod(kernel) * c_in * math.prod(out) * c_out


def conv_flops(
    in_channels: int, out_channels: int, kernel_size, output_size, bias: bool = True, groups: int = 1
) -> int:
    """FLOPs of a conv layer per example: ``(2*C_in/g*K - 1)*H*W*C_out``, or ``2*C_in/g*K*H*W*C_out`` with bias.

    docs/analysis.md: each output is ``C_in/g*K`` multiplies and ``C_in/g*K - 1`` adds,
    plus one add for the bias; ``K`` = prod of kernel dims, ``H*W`` = prod of output dims. That is
    ``2 * conv_macs - H*W*C_out`` without bias. A depthwise conv is ``groups = in_channels``.

    >>> conv_flops(1, 1, 3, 3, bias=False), conv_flops(1, 1, 3, 3)
    (153, 162)
    """
    op = "conv_flops"
    _, c_out = _channels_per_group(in_channels, out_channels, groups, op)
    kernel, out = _sizes(op, kernel_size=kernel_size, output_size=output_size)
    outputs = math.prod(out) * c_out
    return 2 * conv_macs(in_channels, out_channels, kernel, out, groups) - (0 if bias else outputs)


def dense_params(in_features: int, out_features: int, bias: bool = True) -> int:
    """Trainable parameters of a fully connected layer: ``I*O + O`` with bias, ``I*O`` without.

    The study notes write ``I*O + 1`` with bias: a slip, there is one bias per
    output, so ``O`` of them (``torch.nn.Linear(I, O)`` and ``nnx.Linear`` hold ``I*O + O``).

    >>> dense_params(400, 120), dense_params(400, 120, bias=False)
    (48120, 48000)
    """
    op = "dense_params"
    i = check_positive(in_features, "in_features", op)
    o = check_positive(out_features, "out_features", op)
    return i * o + (o if bias else 0)


def dense_macs(in_features: int, out_features: int) -> int:
    """Multiply-accumulates of a fully connected layer: ``I*O`` (docs/analysis.md: ``Calculations(MAC) = V*D``, ``CPR = 1``).

    >>> dense_macs(400, 120)
    48000
    """
    op = "dense_macs"
    return check_positive(in_features, "in_features", op) * check_positive(out_features, "out_features", op)


def dense_flops(in_features: int, out_features: int, bias: bool = True) -> int:
    """FLOPs of a fully connected layer: ``(2I - 1)*O``, or ``2I*O`` with bias (docs/analysis.md).

    >>> dense_flops(400, 120, bias=False), dense_flops(400, 120)
    (95880, 96000)
    """
    o = check_positive(out_features, "out_features", "dense_flops")
    return 2 * dense_macs(in_features, out_features) - (0 if bias else o)


def pool_flops(window, output_size, channels: int) -> int:
    """FLOPs of a pooling layer: ``K*H_out*W_out*C`` (``K`` = prod of window dims), one per window tap.

    docs/analysis.md: ``k^2*H_out*W_out*C_out`` (``C_out = C_in``). The same for max, average
    and LP pools. XLA counts ``K - 1`` per window (a reduction of ``K`` values).

    >>> pool_flops(2, 14, 6), pool_flops((3, 3), (56, 56), 64)
    (4704, 1806336)
    """
    op = "pool_flops"
    window, out = _sizes(op, window=window, output_size=output_size)
    return math.prod(window) * math.prod(out) * check_positive(channels, "channels", op)


def global_pool_flops(input_size, channels: int) -> int:
    """FLOPs of a global pool: ``H_in*W_in*C_in``, one per input value (docs/analysis.md).

    >>> global_pool_flops(7, 2048)
    100352
    """
    op = "global_pool_flops"
    (size,) = _sizes(op, input_size=input_size)
    return math.prod(size) * check_positive(channels, "channels", op)


def adaptive_pool_flops(input_size, output_size, channels: int) -> int:
    """FLOPs of an adaptive pool: one per tap of PyTorch's bins, summed over the bins.

    Bin ``i`` of a dim of length ``L`` with ``o`` bins covers ``[floor(i*L/o), ceil((i+1)*L/o))``;
    the count is ``C * prod over dims of sum_i |bin_i|``. It equals ``pool_flops(L/o, o, C)`` when
    ``o`` divides ``L`` and ``global_pool_flops(L, C)`` when ``o = 1``.

    >>> adaptive_pool_flops((5,), (3,), 1), adaptive_pool_flops(4, 2, 1), pool_flops(2, 2, 1)
    (7, 16, 16)
    """
    op = "adaptive_pool_flops"
    size, out = _sizes(op, input_size=input_size, output_size=output_size)
    taps = math.prod(
        sum(end - start for start, end in adaptive_pool_bins(n, o)) for n, o in zip(size, out, strict=True)
    )
    return taps * check_positive(channels, "channels", op)


def activation_flops(kind: str, size) -> int:
    """FLOPs of an elementwise activation over ``size`` values (an int, or a shape to multiply out).

    docs/analysis.md: ``relu`` costs 1 per element (a comparison), ``sigmoid`` 4
    (negate, exp, add, divide); see :data:`ACTIVATION_FLOPS`.

    >>> activation_flops("relu", (28, 28, 6)), activation_flops("sigmoid", 10)
    (4704, 40)
    """
    op = "activation_flops"
    if kind not in ACTIVATION_FLOPS:
        raise ValueError(f"{op}: kind={kind!r} is not one of {tuple(ACTIVATION_FLOPS)}")
    count = math.prod(size) if isinstance(size, Sequence) else size
    return ACTIVATION_FLOPS[kind] * check_positive(count, "size", op)


def batch_norm_flops(size) -> int:
    """FLOPs of an inference-mode batch norm over ``size`` values: 2 per element.

    The notes give no count; this is the folded form ``y = a*x + b`` (one multiply, one add per
    element, the mean/variance/scale/shift folded into ``a`` and ``b``), as ptflops counts it.

    >>> batch_norm_flops((56, 56, 64))
    401408
    """
    count = math.prod(size) if isinstance(size, Sequence) else size
    return 2 * check_positive(count, "size", "batch_norm_flops")


def count_params(model_or_pytree) -> int:
    """Number of trainable parameters: the sizes of the ``nnx.Param`` leaves.

    Of an ``nnx.Module``, or of a pytree: in one holding nnx Variables (an ``nnx.State``) only
    ``nnx.Param`` leaves count (not ``nnx.BatchStat`` running statistics nor RNG state); a plain
    pytree of arrays (e.g. a params dict) counts every leaf.

    >>> count_params(nnx.Linear(400, 120, rngs=nnx.Rngs(0))), count_params({"w": jax.numpy.ones((3, 4))})
    (48120, 12)
    """
    tree = nnx.state(model_or_pytree, nnx.Param) if isinstance(model_or_pytree, nnx.Module) else model_or_pytree
    leaves = jax.tree.leaves(tree, is_leaf=lambda leaf: isinstance(leaf, nnx.Variable))
    return sum(
        math.prod(leaf.shape) for leaf in leaves if isinstance(leaf, nnx.Param) or not isinstance(leaf, nnx.Variable)
    )


# --- per-layer accounting for summary ---------------------------------------------------------

_PASSTHROUGH = "passthrough"  # a layer that keeps its input's receptive field (batch norm, 1x1 dense)


@dataclasses.dataclass(frozen=True)
class _LayerCost:
    """What one recorded call costs, and its window geometry per spatial dim.

    ``windows``: ``(kernel, stride, lo_padding, dilation)`` per spatial dim for a conv or pool;
    ``_PASSTHROUGH`` for layers that do not change the receptive field; ``None`` where no
    receptive field is defined (dense layers on flat inputs, transposed convs, uneven adaptive bins).
    """

    flops: int
    macs: int = 0
    windows: tuple[tuple[int, int, int, int], ...] | str | None = None


def _windows(op: str, sizes, window, strides, padding, dilation) -> tuple[tuple[int, int, int, int], ...]:
    """Canonical ``(kernel, stride, lo, dilation)`` per dim, exactly as the functional ops resolve them."""
    rank = len(sizes)
    window = canonicalize_tuple(window, rank, "window", op)
    strides = window if strides is None else canonicalize_tuple(strides, rank, "strides", op)
    dilation = canonicalize_tuple(dilation, rank, "dilation", op)
    pairs = padding_pairs(canonicalize_padding(padding, rank, op), sizes, window, strides, dilation, op)
    return tuple((k, s, lo, d) for k, s, (lo, _), d in zip(window, strides, pairs, dilation, strict=True))


def _whole_input(sizes) -> tuple[tuple[int, int, int, int], ...]:
    """One window over the whole input: global pools, SPP's coarsest level."""
    return tuple((n, n, 0, 1) for n in sizes)


def _conv_cost(m: nn.Conv, x, y) -> _LayerCost:
    rank = len(x) - 2
    dilated_input = canonicalize_tuple(m.input_dilation, rank, "input_dilation", "summary") != (1,) * rank
    return _LayerCost(
        conv_flops(x[-1], y[-1], m.kernel_size, y[1:-1], m.use_bias, m.feature_group_count),
        conv_macs(x[-1], y[-1], m.kernel_size, y[1:-1], m.feature_group_count),
        None if dilated_input else _windows("summary", x[1:-1], m.kernel_size, m.strides, m.padding, m.kernel_dilation),
    )


def _conv_transpose_cost(m: nn.ConvTranspose, x, y) -> _LayerCost:
    # Counted as the forward conv it is the adjoint of (C_out -> C_in, output = this input).
    return _LayerCost(
        conv_flops(y[-1], x[-1], m.kernel_size, x[1:-1], m.use_bias, m.feature_group_count),
        conv_macs(y[-1], x[-1], m.kernel_size, x[1:-1], m.feature_group_count),
    )


def _depthwise_cost(m: nn.DepthwiseConv, x, y) -> _LayerCost:
    return _LayerCost(
        conv_flops(x[-1], y[-1], m.kernel_size, y[1:-1], m.use_bias, groups=x[-1]),
        conv_macs(x[-1], y[-1], m.kernel_size, y[1:-1], groups=x[-1]),
        _windows("summary", x[1:-1], m.kernel_size, m.strides, m.padding, m.kernel_dilation),
    )


def _separable_cost(m: nn.SeparableConv, x, y) -> _LayerCost:
    # docs/analysis.md: the depthwise part plus the 1x1 part (one bias, after it).
    mid, point = x[-1] * m.depth_multiplier, (1,) * len(m.kernel_size)
    return _LayerCost(
        conv_flops(x[-1], mid, m.kernel_size, y[1:-1], False, groups=x[-1])
        + conv_flops(mid, y[-1], point, y[1:-1], m.use_bias),
        conv_macs(x[-1], mid, m.kernel_size, y[1:-1], groups=x[-1]) + conv_macs(mid, y[-1], point, y[1:-1]),
        _windows("summary", x[1:-1], m.kernel_size, m.strides, m.padding, m.kernel_dilation),
    )


def _pool_cost(m, x, y) -> _LayerCost:
    windows = _windows("summary", x[1:-1], m.window_shape, m.strides, m.padding, getattr(m, "window_dilation", 1))
    return _LayerCost(pool_flops(tuple(k for k, _, _, _ in windows), y[1:-1], y[-1]), windows=windows)


def _global_pool_cost(m, x, y) -> _LayerCost:
    return _LayerCost(global_pool_flops(x[1:-1], x[-1]), windows=_whole_input(x[1:-1]))


def _adaptive_pool_cost(m, x, y) -> _LayerCost:
    sizes, out = x[1:-1], y[1:-1]
    even = all(n % o == 0 for n, o in zip(sizes, out, strict=True))
    windows = tuple((n // o, n // o, 0, 1) for n, o in zip(sizes, out, strict=True)) if even else None
    return _LayerCost(adaptive_pool_flops(sizes, out, x[-1]), windows=windows)


def _spatial_pyramid_cost(m: nn.SpatialPyramidPool, x, y) -> _LayerCost:
    sizes = x[1:-1]
    flops = sum(adaptive_pool_flops(sizes, (level,) * len(sizes), x[-1]) for level in m.levels)
    return _LayerCost(flops, windows=_whole_input(sizes))


def _linear_cost(m: nnx.Linear, x, y) -> _LayerCost:
    positions = math.prod(x[1:-1])
    return _LayerCost(
        dense_flops(m.in_features, m.out_features, m.use_bias) * positions,
        dense_macs(m.in_features, m.out_features) * positions,
        _PASSTHROUGH if len(x) > 2 else None,
    )


def _batch_norm_cost(m: nnx.BatchNorm, x, y) -> _LayerCost:
    return _LayerCost(batch_norm_flops(x[1:]), windows=_PASSTHROUGH)


_COSTS: dict[type, Callable] = {
    nn.Conv: _conv_cost,
    nn.ConvTranspose: _conv_transpose_cost,
    nn.DepthwiseConv: _depthwise_cost,
    nn.SeparableConv: _separable_cost,
    nn.MaxPool: _pool_cost,
    nn.AvgPool: _pool_cost,
    nn.LPPool: _pool_cost,
    nn.GlobalAvgPool: _global_pool_cost,
    nn.GlobalMaxPool: _global_pool_cost,
    nn.AdaptiveAvgPool: _adaptive_pool_cost,
    nn.AdaptiveMaxPool: _adaptive_pool_cost,
    nn.SpatialPyramidPool: _spatial_pyramid_cost,
    nnx.Linear: _linear_cost,
    nnx.BatchNorm: _batch_norm_cost,
}


def _counted_layers(module) -> dict[str, nnx.Module]:
    """The layers ``summary`` records, by the names it prints: their attribute paths in ``module``
    (``"features.0"``), or the class name for a module that is itself one layer."""
    return {
        ".".join(map(str, path)) or type(m).__name__: m for path, m in nnx.iter_modules(module) if _cost_function(m)
    }


def _cost_function(layer) -> Callable | None:
    """The cost rule of the layer's class, or of its nearest base class (subclasses of the layers); ``None``
    for modules that are not counted layers (containers, activations, a model's own blocks)."""
    return next((_COSTS[cls] for cls in type(layer).__mro__ if cls in _COSTS), None)


@contextlib.contextmanager
def _recording_calls(layers, record: Callable):
    """Within the block, every call ``layer(x, ...)`` of one of ``layers`` also calls ``record(layer, x, y)``.

    Calls are intercepted from the outside, as ``flax.nnx.tabulate`` does: for the block, the classes
    of ``layers`` have their ``__call__`` replaced by a wrapper, and restored after; the layers know
    nothing of it. The patch is process-wide while it lasts, but only calls of ``layers`` (by
    identity) are recorded, each once, also when a subclass's ``__call__`` calls its base's.
    """
    recorded = {id(layer) for layer in layers}
    running: set[int] = set()

    def wrap(call: Callable) -> Callable:
        @functools.wraps(call)
        def wrapper(self, x, *args, **kwargs):
            if id(self) not in recorded or id(self) in running:
                return call(self, x, *args, **kwargs)
            running.add(id(self))
            try:
                y = call(self, x, *args, **kwargs)
            finally:
                running.discard(id(self))
            record(self, x, y)
            return y

        return wrapper

    classes = {type(layer) for layer in layers}
    own_calls = {cls: cls.__dict__.get("__call__") for cls in classes}
    try:
        for cls in classes:
            cls.__call__ = wrap(cls.__call__)
        yield
    finally:
        for cls, call in own_calls.items():
            if call is None:
                del cls.__call__
            else:
                cls.__call__ = call


class _FieldTracker:
    """Which chain of conv/pool windows feeds each traced array (the rule is in ``summary``'s docstring).

    A chain is one tuple of ``(kernel, stride, lo, dilation)`` windows per spatial dim, from the
    model input. Arrays are kept alive alongside their chains so that ``id`` stays unique.
    """

    def __init__(self, x):
        rank = len(x.shape) - 2
        self._known = {id(x): (x, ((),) * rank)}
        self._frontier = [(x, ((),) * rank)]

    @staticmethod
    def size(chain) -> int:
        return math.prod(receptive_field(dim).size for dim in chain)

    def input_chain(self, x):
        """The chain feeding ``x``: its own if it was seen, else the largest of unconsumed outputs
        of the same shape, else of the same spatial size (a concatenation); ``None`` if none."""
        if id(x) in self._known:
            self._frontier = [(a, c) for a, c in self._frontier if a is not x]
            return self._known[id(x)][1]
        same_shape = [(a, c) for a, c in self._frontier if a.shape == x.shape]
        same_spatial = [
            (a, c) for a, c in self._frontier if len(a.shape) == len(x.shape) and a.shape[1:-1] == x.shape[1:-1]
        ]
        candidates = same_shape or same_spatial
        if not candidates:
            return None
        chain = max(reversed(candidates), key=lambda item: self.size(item[1]))[1]  # ties: the newest
        self._frontier = [(a, c) for a, c in self._frontier if all(a is not b for b, _ in candidates)]
        self._known[id(x)] = (x, chain)
        return chain

    def output(self, y, chain) -> None:
        if chain is not None:
            self._known[id(y)] = (y, chain)
            self._frontier.append((y, chain))


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One recorded layer call. ``flops``/``macs`` are per example; ``receptive_field``, ``jump``
    and ``start`` (the centre of the first output's field, in input pixels, which may be negative
    with padding) have one entry per spatial dim (``None`` for layers that are not conv or pool,
    or where the field is not defined)."""

    name: str
    type: str
    output_shape: tuple[int, ...]
    params: int
    flops: int
    macs: int
    receptive_field: tuple[int, ...] | None
    jump: tuple[int, ...] | None
    start: tuple[float, ...] | None = None


def _per_dim(values) -> str:
    if values is None:
        return "-"
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


@dataclasses.dataclass(frozen=True)
class Summary:
    """The result of :func:`summary`: ``rows``, totals, and a text table as ``str(summary)``."""

    input_shape: tuple[int, ...]
    rows: list[LayerRow]
    total_params: int
    total_flops: int
    total_macs: int

    HEADER: ClassVar[str] = (
        "FLOPs per example, the study notes' count: a multiply and an add are one FLOP each "
        "(conv (2*C_in/g*K - 1)*H*W*C_out, + H*W*C_out with bias; pools one per window tap; "
        "batch norm 2 per value; activations not counted).\n"
        "MACs: multiply-accumulates of conv and dense layers, the unit of most published costs. "
        "RF: receptive field in input pixels; Jump: input pixels between adjacent outputs."
    )

    def __str__(self) -> str:
        head = ("Layer", "Type", "Output shape", "Params", "FLOPs", "MACs", "RF", "Jump")
        body = [
            (
                r.name,
                r.type,
                str(r.output_shape),
                f"{r.params:,}",
                f"{r.flops:,}",
                f"{r.macs:,}",
                _per_dim(r.receptive_field),
                _per_dim(r.jump),
            )
            for r in self.rows
        ]
        total = ("Total", "", "", f"{self.total_params:,}", f"{self.total_flops:,}", f"{self.total_macs:,}", "", "")
        widths = [max(len(line[i]) for line in (head, *body, total)) for i in range(len(head))]
        numeric = {3, 4, 5, 6, 7}

        def fmt(line) -> str:
            return "  ".join(
                c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )

        rule = "-" * len(fmt(head))
        lines = [f"summary of a model on input {self.input_shape}", self.HEADER, rule, fmt(head), rule]
        lines += [fmt(line) for line in body] + [rule, fmt(total)]
        return "\n".join(line.rstrip() for line in lines)


def summary(model, x, *args, **kwargs) -> Summary:
    """Per-layer table of ``model(x, *args, **kwargs)``: output shape, params, FLOPs, MACs, receptive field, jump.

    ``x``: an array or ``jax.ShapeDtypeStruct`` ``(N, *spatial, C)``. A copy of the model, in
    evaluation mode (``.eval()``: BatchNorm on running statistics, no dropout), is traced once
    with ``jax.eval_shape``: nothing is computed and ``model`` is not modified (it may itself be
    abstract, from ``nnx.eval_shape``). The trace records every call of the model's
    :mod:`cnnjax.nn` layers, ``nnx.Linear`` and ``nnx.BatchNorm`` layers (and their subclasses), in
    call order, intercepted from the outside as ``flax.nnx.tabulate`` does (the layers hold no
    hook); rows are named by their attribute path in the model (``"features.0"``). FLOPs and MACs are per example (see the module docstring and
    ``Summary.HEADER``); activations, dropout and elementwise adds are not layers and are not
    counted. ``total_params`` is :func:`count_params` of the model (every ``nnx.Param`` once);
    ``total_flops``/``total_macs`` sum the rows.

    Receptive field and jump (per spatial dim, docs/geometry.md: ``RF_prev = (RF - 1)*stride +
    d*(k - 1) + 1`` via :func:`cnnjax.shapes.receptive_field`) are composed along the data flow:
    a layer's input is the output of an earlier recorded layer when it is that very array;
    otherwise (it went through an activation, a residual add or a concatenation) it is taken to
    be the unconsumed earlier output of the same shape with the largest field, or, failing that,
    the largest of those with the same spatial size (a channel concatenation of branches, whose
    field is the largest branch's). So a residual block's output has its main path's field, an
    Inception block's output its widest branch's, and a DenseNet layer's input the newest
    layer's. Global and pyramid pools cover the whole input; transposed convs and adaptive pools
    with uneven bins have no single field (``None``).

    >>> model = nnx.Sequential(nn.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0)), nn.MaxPool((2, 2)))
    >>> s = summary(model, jax.ShapeDtypeStruct((1, 8, 8, 1), "float32"))
    >>> [(r.name, r.output_shape, r.params, r.flops, r.receptive_field) for r in s.rows]
    [('layers.0', (1, 8, 8, 4), 40, 4608, (3, 3)), ('layers.1', (1, 4, 4, 4), 0, 256, (4, 4))]
    """
    graphdef, state = nnx.split(model)
    rows: list[LayerRow] = []

    def forward(state, x):
        module = nnx.merge(graphdef, state)
        module.eval()  # inference costs; a training-mode BatchNorm would also slow the trace down
        layers = _counted_layers(module)
        names = {id(m): name for name, m in layers.items()}
        tracker = _FieldTracker(x)

        def record(layer, layer_x, layer_y):
            cost = _cost_function(layer)(layer, layer_x.shape, layer_y.shape)
            chain = tracker.input_chain(layer_x) if cost.windows is not None else None
            if chain is not None and cost.windows != _PASSTHROUGH:
                chain = tuple((*dim, window) for dim, window in zip(chain, cost.windows, strict=True))
            tracker.output(layer_y, chain)
            fields = None if chain is None or cost.windows == _PASSTHROUGH else [receptive_field(d) for d in chain]
            rows.append(
                LayerRow(
                    name=names[id(layer)],
                    type=type(layer).__name__,
                    output_shape=tuple(layer_y.shape),
                    params=count_params(layer),
                    flops=cost.flops,
                    macs=cost.macs,
                    receptive_field=None if fields is None else tuple(f.size for f in fields),
                    jump=None if fields is None else tuple(f.jump for f in fields),
                    start=None if fields is None else tuple(f.start for f in fields),
                )
            )

        with _recording_calls(list(layers.values()), record):
            module(x, *args, **kwargs)

    jax.eval_shape(forward, state, x)
    return Summary(
        input_shape=tuple(x.shape),
        rows=rows,
        total_params=count_params(model),
        total_flops=sum(r.flops for r in rows),
        total_macs=sum(r.macs for r in rows),
    )
