"""Flax NNX modules over cnnjax's functional ops: NHWC inputs, parameters ``kernel``/``bias``.

Every module is thin: ``__init__`` creates parameters, ``__call__`` calls one functional op from
:mod:`cnnjax.convolution` or :mod:`cnnjax.pooling` and nothing else. Every layer takes ``impl``
(:mod:`cnnjax.backprop`), which :func:`set_impl` sets on every layer of a model at once. Inputs are
channels-last, ``(*batch, *spatial, C)`` with 1 to 3 spatial dims and, as ``flax.nnx.Conv`` takes
them, any number of leading batch axes: none (unbatched), one, or several, folded into one for the
functional op (:func:`_over_batch_axes`) and unfolded in the result. The number of spatial dims is
fixed by ``kernel_size`` (conv layers), by a ``window_shape``/``output_size`` sequence (pools);
where no argument fixes it (an int ``window_shape`` or ``output_size``, the global and pyramid
pools) every axis but the first and the last is spatial: exactly one batch axis, as in the
functional ops. The functional op validates the rest.

``Conv`` takes the arguments ``flax.nnx.Conv`` takes for the options they share, with the same
meaning and defaults (kernel ``(*kernel_size, in_features // feature_group_count, out_features)``,
LeCun-normal kernel, zero bias, ``padding="SAME"``), so one can replace the other and, with the
same parameters, both give the same output. As in Flax, an int ``kernel_size`` means a 1-D kernel
``(k,)``: write ``(3, 3)`` for a 2-D one. ``strides``, ``input_dilation`` and ``kernel_dilation``
take ``None`` for 1, and ``padding`` Flax's ``"CIRCULAR"``, ``"REFLECT"`` and (1-D) ``"CAUSAL"``
with Flax's meaning (:func:`cnnjax._canon.flax_padding`: the pads Flax applies, then a VALID conv).
Beyond Flax: ``padding`` also takes PyTorch-style ints and ``"SAME_LOWER"``/``"FULL"``, and
``padding_mode`` (``"reflect"``, ``"replicate"``, ``"circular"``) pads any explicit padding so, as
PyTorch's ``padding_mode``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from cnnjax._canon import canonicalize_padding, canonicalize_tuple, check_impl, flax_padding
from cnnjax.convolution import conv, conv_transpose, depthwise_conv, separable_conv
from cnnjax.pooling import (
    adaptive_avg_pool,
    adaptive_max_pool,
    avg_pool,
    global_avg_pool,
    global_max_pool,
    lp_pool,
    max_pool,
    spatial_pyramid_pool,
)
from cnnjax.shapes import check_positive

__all__ = [
    "AdaptiveAvgPool",
    "AdaptiveMaxPool",
    "AvgPool",
    "Conv",
    "ConvTranspose",
    "DepthwiseConv",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "LPPool",
    "MaxPool",
    "SeparableConv",
    "SpatialPyramidPool",
    "set_impl",
]

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


def _over_batch_axes(x, rank: int | None, call: Callable):
    """``call(x)`` with the leading batch axes of ``x``, ``(*batch, *spatial, C)`` with ``rank``
    spatial dims, folded into one and unfolded in the result, as ``flax.nnx.Conv`` does. An input
    with at most one batch axis, or any input when ``rank`` is ``None`` (no argument fixes it),
    goes to ``call`` as it is: the functional ops take unbatched inputs themselves."""
    if rank is None or jnp.ndim(x) <= rank + 2:
        return call(x)
    x = jnp.asarray(x)
    batch = x.shape[: x.ndim - rank - 1]
    y = call(jnp.reshape(x, (math.prod(batch), *x.shape[len(batch) :])))
    return y.reshape(*batch, *y.shape[1:])


def _apply(layer, rank: int | None, op: Callable, x, *args, **kwargs):
    """``op(x, *args, **kwargs, impl=layer.impl)`` over the leading batch axes of ``x`` (:func:`_over_batch_axes`)."""
    return _over_batch_axes(x, rank, lambda x: op(x, *args, impl=layer.impl, **kwargs))


def _conv_geometry(op: str, rank: int, strides, padding, **dilations) -> tuple:
    """A conv layer's geometry canonicalized once, at construction (``cnnjax._canon``): ``strides``
    and each of ``dilations`` (by name) a tuple of ``rank`` ints >= 1 (``None`` means 1, as in
    ``flax.nnx.Conv``), ``padding`` a string or ``rank`` ``(lo, hi)`` pairs."""
    return (
        canonicalize_tuple(1 if strides is None else strides, rank, "strides", op),
        canonicalize_padding(padding, rank, op),
        *(canonicalize_tuple(1 if value is None else value, rank, name, op) for name, value in dilations.items()),
    )


def _padded_conv_geometry(op: str, kernel_size, strides, padding, padding_mode, **dilations) -> tuple:
    """:func:`_conv_geometry` for the layers with a ``padding_mode``, Flax's padding strings
    (``"CIRCULAR"``, ``"REFLECT"``, ``"CAUSAL"``: :func:`cnnjax._canon.flax_padding`) included;
    returns ``(strides, padding, padding_mode, *dilations)``."""
    kernel_dilation = dilations["kernel_dilation"]
    kernel_dilation = canonicalize_tuple(
        1 if kernel_dilation is None else kernel_dilation, len(kernel_size), "kernel_dilation", op
    )
    padding, padding_mode = flax_padding(padding, padding_mode, kernel_size, kernel_dilation, op)
    strides, padding, *dilations = _conv_geometry(op, len(kernel_size), strides, padding, **dilations)
    return strides, padding, padding_mode, *dilations


def _pool_geometry(op: str, window_shape, strides, padding, window_dilation=1) -> tuple:
    """A pool layer's ``(window_shape, strides, padding, window_dilation)`` canonicalized once, at
    construction, when a ``window_shape`` sequence fixes the spatial rank (``strides=None`` stays:
    it means the window). An int ``window_shape`` leaves the rank to the input: the ints are
    checked here and broadcast by the functional op."""
    rank = _window_rank(window_shape)
    if rank is None:
        ints = [("window_shape", window_shape), ("strides", strides), ("window_dilation", window_dilation)]
        for name, value in ints:
            if value is not None and not isinstance(value, Sequence):
                check_positive(value, name, op)
        return window_shape, strides, padding, window_dilation
    return (
        canonicalize_tuple(window_shape, rank, "window_shape", op),
        None if strides is None else canonicalize_tuple(strides, rank, "strides", op),
        canonicalize_padding(padding, rank, op),
        canonicalize_tuple(window_dilation, rank, "window_dilation", op),
    )


def _window_rank(value) -> int | None:
    """The spatial rank a pool layer's ``window_shape``/``output_size`` fixes: its length if a sequence."""
    return len(value) if isinstance(value, Sequence) and not isinstance(value, str) else None


def _kernel_size(kernel_size, op: str) -> tuple[int, ...]:
    """Flax's rule: an int is a 1-D kernel ``(k,)``, a sequence gives one size per spatial dim."""
    if isinstance(kernel_size, Sequence) and not isinstance(kernel_size, str):
        if not 1 <= len(kernel_size) <= 3:
            raise ValueError(f"{op}: kernel_size={tuple(kernel_size)!r} must have 1 to 3 entries")
        return tuple(check_positive(k, "kernel_size", op) for k in kernel_size)
    return (check_positive(kernel_size, "kernel_size", op),)


def _group_count(in_features: int, out_features: int, feature_group_count: int, op: str) -> int:
    """Check that the group count divides both feature counts; return it as an int."""
    in_features = check_positive(in_features, "in_features", op)
    out_features = check_positive(out_features, "out_features", op)
    groups = check_positive(feature_group_count, "feature_group_count", op)
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if value % groups:
            raise ValueError(f"{op}: feature_group_count={groups} must divide {name}={value}")
    return groups


def _bias(use_bias: bool, bias_init, rngs: nnx.Rngs, features: int, param_dtype):
    """A ``(features,)`` ``nnx.Param`` named by the caller, or ``None`` without bias."""
    if use_bias:
        return nnx.Param(bias_init(rngs.params(), (features,), param_dtype))
    return nnx.data(None)


def _params(module, x, *params):
    """The input and the parameters' values, promoted to ``module.dtype`` as Flax does."""
    values = tuple(None if p is None else p[...] for p in params)
    return promote_dtype((x, *values), dtype=module.dtype)


class Conv(nnx.Module):
    """Convolution (cross-correlation), a drop-in for ``flax.nnx.Conv``, calling :func:`cnnjax.convolution.conv`.

    ``x: (*batch, *spatial, in_features)`` -> ``(*batch, *out, out_features)`` with, per spatial
    dim, ``out = floor((n + lo + hi - d*(k-1) - 1) / s) + 1`` (``"SAME"``: ``ceil(n / s)``);
    ``len(kernel_size)`` spatial dims and any number of leading batch axes, none included, as
    ``flax.nnx.Conv``.
    Parameters: ``kernel`` ``(*kernel_size, in_features // feature_group_count, out_features)``
    (HWIO) and ``bias`` ``(out_features,)``. ``impl`` (``"auto"``,
    ``"closed_form"``, ``"lax"``) says how it is computed and differentiated (:mod:`cnnjax.backprop`).

    >>> layer = Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer(jnp.ones((2, 16, 16, 3))).shape
    ((3, 3, 3, 8), (2, 16, 16, 8))
    >>> layer(jnp.ones((16, 16, 3))).shape, layer(jnp.ones((4, 2, 16, 16, 3))).shape
    ((16, 16, 8), (4, 2, 16, 16, 8))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] | None = 1,
        *,
        padding="SAME",
        input_dilation: int | Sequence[int] | None = 1,
        kernel_dilation: int | Sequence[int] | None = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        padding_mode: str = "zeros",
        dtype=None,
        param_dtype=jnp.float32,
        precision=None,
        kernel_init=default_kernel_init,
        bias_init=default_bias_init,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        op = "Conv"
        self.kernel_size = _kernel_size(kernel_size, op)
        self.feature_group_count = _group_count(in_features, out_features, feature_group_count, op)
        self.in_features, self.out_features = in_features, out_features
        kernel_shape = (*self.kernel_size, in_features // self.feature_group_count, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, param_dtype))
        self.bias = _bias(use_bias, bias_init, rngs, out_features, param_dtype)
        self.strides, self.padding, self.padding_mode, self.kernel_dilation, self.input_dilation = (
            _padded_conv_geometry(
                op,
                self.kernel_size,
                strides,
                padding,
                padding_mode,
                kernel_dilation=kernel_dilation,
                input_dilation=input_dilation,
            )
        )
        self.use_bias, self.dtype, self.param_dtype = use_bias, dtype, param_dtype
        self.precision, self.impl = precision, check_impl(impl, op)

    def __call__(self, x):
        x, kernel, bias = _params(self, x, self.kernel, self.bias)
        return _apply(
            self,
            len(self.kernel_size),
            conv,
            x,
            kernel,
            bias,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            input_dilation=self.input_dilation,
            feature_group_count=self.feature_group_count,
            padding_mode=self.padding_mode,
            precision=self.precision,
        )


class ConvTranspose(nnx.Module):
    """Transposed convolution, the adjoint of :class:`Conv`, calling :func:`cnnjax.convolution.conv_transpose`.

    ``x: (*batch, *spatial, in_features)`` -> ``(*batch, *out, out_features)`` (batch axes as
    :class:`Conv`) with, per spatial dim, ``out = (n-1)*s - lo - hi + d*(k-1) + 1 + output_padding`` (``"SAME"``: ``n*s``;
    ``"VALID"``: ``(n-1)*s + d*(k-1) + 1``). It computes exactly PyTorch's ``ConvTranspose``:
    ``padding=p`` (an int) and ``output_padding`` mean what they mean there.

    Parameters: ``kernel`` ``(*kernel_size, out_features // feature_group_count, in_features)``,
    the kernel of the forward :class:`Conv` it is the gradient of
    (:func:`cnnjax.init.from_torch_conv` converts a PyTorch ``ConvTranspose`` weight to it), and
    ``bias`` ``(out_features,)``. Unlike ``flax.nnx.ConvTranspose``, whose kernel is
    ``(*kernel_size, in_features, out_features)`` and which by default dilates the input without
    flipping the kernel, this module is the true adjoint (like Flax's ``transpose_kernel=True``),
    supports groups, and its ``padding`` follows PyTorch rather than ``lax.conv_transpose``. The
    default init is LeCun-normal on this kernel, i.e. fan-in
    ``prod(kernel_size) * out_features // groups``, the fan PyTorch uses for ``ConvTranspose``.
    ``impl`` as :class:`Conv`.

    >>> layer = ConvTranspose(8, 3, (4, 4), 2, padding=1, rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer(jnp.ones((2, 5, 5, 8))).shape
    ((4, 4, 3, 8), (2, 10, 10, 3))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        *,
        padding="SAME",
        output_padding: int | Sequence[int] = 0,
        kernel_dilation: int | Sequence[int] = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        precision=None,
        kernel_init=default_kernel_init,
        bias_init=default_bias_init,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        op = "ConvTranspose"
        self.kernel_size = _kernel_size(kernel_size, op)
        self.feature_group_count = _group_count(in_features, out_features, feature_group_count, op)
        self.in_features, self.out_features = in_features, out_features
        kernel_shape = (*self.kernel_size, out_features // self.feature_group_count, in_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, param_dtype))
        self.bias = _bias(use_bias, bias_init, rngs, out_features, param_dtype)
        rank = len(self.kernel_size)
        self.strides, self.padding, self.kernel_dilation = _conv_geometry(
            op, rank, strides, padding, kernel_dilation=kernel_dilation
        )
        self.output_padding = canonicalize_tuple(output_padding, rank, "output_padding", op, minimum=0)
        self.use_bias, self.dtype, self.param_dtype = use_bias, dtype, param_dtype
        self.precision, self.impl = precision, check_impl(impl, op)

    def __call__(self, x):
        x, kernel, bias = _params(self, x, self.kernel, self.bias)
        return _apply(
            self,
            len(self.kernel_size),
            conv_transpose,
            x,
            kernel,
            bias,
            strides=self.strides,
            padding=self.padding,
            output_padding=self.output_padding,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
            precision=self.precision,
        )


class DepthwiseConv(nnx.Module):
    """Depthwise convolution (one filter bank per channel), calling :func:`cnnjax.convolution.depthwise_conv`.

    ``x: (*batch, *spatial, in_features)`` -> ``(*batch, *out, in_features * depth_multiplier)``,
    sizes and batch axes as :class:`Conv`. Parameters: ``kernel`` ``(*kernel_size, 1, in_features * depth_multiplier)``
    (output channel ``c*m + j`` reads input channel ``c``, as Keras and PyTorch's
    ``groups=in_channels``) and ``bias``.

    >>> layer = DepthwiseConv(4, (3, 3), depth_multiplier=2, rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer(jnp.ones((1, 6, 6, 4))).shape
    ((3, 3, 1, 8), (1, 6, 6, 8))
    """

    def __init__(
        self,
        in_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        *,
        depth_multiplier: int = 1,
        padding="SAME",
        kernel_dilation: int | Sequence[int] = 1,
        use_bias: bool = True,
        padding_mode: str = "zeros",
        dtype=None,
        param_dtype=jnp.float32,
        precision=None,
        kernel_init=default_kernel_init,
        bias_init=default_bias_init,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        op = "DepthwiseConv"
        self.kernel_size = _kernel_size(kernel_size, op)
        self.in_features = check_positive(in_features, "in_features", op)
        self.depth_multiplier = check_positive(depth_multiplier, "depth_multiplier", op)
        self.out_features = self.in_features * self.depth_multiplier
        kernel_shape = (*self.kernel_size, 1, self.out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, param_dtype))
        self.bias = _bias(use_bias, bias_init, rngs, self.out_features, param_dtype)
        self.strides, self.padding, self.padding_mode, self.kernel_dilation = _padded_conv_geometry(
            op, self.kernel_size, strides, padding, padding_mode, kernel_dilation=kernel_dilation
        )
        self.use_bias, self.dtype = use_bias, dtype
        self.param_dtype, self.precision, self.impl = param_dtype, precision, check_impl(impl, op)

    def __call__(self, x):
        x, kernel, bias = _params(self, x, self.kernel, self.bias)
        return _apply(
            self,
            len(self.kernel_size),
            depthwise_conv,
            x,
            kernel,
            bias,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            padding_mode=self.padding_mode,
            precision=self.precision,
        )


class SeparableConv(nnx.Module):
    """Depthwise-separable convolution (depthwise, then 1x1), calling :func:`cnnjax.convolution.separable_conv`.

    ``x: (*batch, *spatial, in_features)`` -> ``(*batch, *out, out_features)``, sizes and batch axes as :class:`Conv`
    (the stride and padding belong to the depthwise step). Parameters: ``depthwise_kernel``
    ``(*kernel_size, 1, in_features * depth_multiplier)``, ``pointwise_kernel``
    ``(1, ..., 1, in_features * depth_multiplier, out_features)`` and ``bias`` ``(out_features,)``
    (Keras's ``SeparableConv2D``: one bias, after the pointwise step).

    >>> layer = SeparableConv(4, 8, (3, 3), rngs=nnx.Rngs(0))
    >>> layer.depthwise_kernel.shape, layer.pointwise_kernel.shape, layer(jnp.ones((1, 6, 6, 4))).shape
    ((3, 3, 1, 4), (1, 1, 4, 8), (1, 6, 6, 8))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        *,
        depth_multiplier: int = 1,
        padding="SAME",
        kernel_dilation: int | Sequence[int] = 1,
        use_bias: bool = True,
        padding_mode: str = "zeros",
        dtype=None,
        param_dtype=jnp.float32,
        precision=None,
        depthwise_init=default_kernel_init,
        pointwise_init=default_kernel_init,
        bias_init=default_bias_init,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        op = "SeparableConv"
        self.kernel_size = _kernel_size(kernel_size, op)
        self.in_features = check_positive(in_features, "in_features", op)
        self.out_features = check_positive(out_features, "out_features", op)
        self.depth_multiplier = check_positive(depth_multiplier, "depth_multiplier", op)
        mid = self.in_features * self.depth_multiplier
        ones = (1,) * len(self.kernel_size)
        self.depthwise_kernel = nnx.Param(depthwise_init(rngs.params(), (*self.kernel_size, 1, mid), param_dtype))
        self.pointwise_kernel = nnx.Param(pointwise_init(rngs.params(), (*ones, mid, out_features), param_dtype))
        self.bias = _bias(use_bias, bias_init, rngs, out_features, param_dtype)
        self.strides, self.padding, self.padding_mode, self.kernel_dilation = _padded_conv_geometry(
            op, self.kernel_size, strides, padding, padding_mode, kernel_dilation=kernel_dilation
        )
        self.use_bias, self.dtype = use_bias, dtype
        self.param_dtype, self.precision, self.impl = param_dtype, precision, check_impl(impl, op)

    def __call__(self, x):
        x, depthwise, pointwise, bias = _params(self, x, self.depthwise_kernel, self.pointwise_kernel, self.bias)
        return _apply(
            self,
            len(self.kernel_size),
            separable_conv,
            x,
            depthwise,
            pointwise,
            bias,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            padding_mode=self.padding_mode,
            precision=self.precision,
        )


class MaxPool(nnx.Module):
    """Max pooling, calling :func:`cnnjax.pooling.max_pool`; no parameters.

    ``x: (*batch, *spatial, C)`` -> ``(*batch, *out, C)``, ``out`` by PyTorch's pooling rule
    (:func:`cnnjax.shapes.pool_output_size`). A ``window_shape`` sequence fixes the number of
    spatial dims (its length), so ``x`` may have any number of leading batch axes, or none; an
    int ``window_shape`` pools every spatial dim of an input with exactly one batch axis,
    ``(N, *spatial, C)``, whose rank then says how many there are (as :func:`cnnjax.max_pool`
    does). ``strides=None`` means strides = window (PyTorch's default; Flax's ``nnx.max_pool``
    uses 1). Padding never wins the max.

    >>> MaxPool((2, 2))(jnp.arange(16.0).reshape(1, 4, 4, 1))[0, ..., 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
    """

    def __init__(
        self,
        window_shape: int | Sequence[int],
        strides: int | Sequence[int] | None = None,
        padding="VALID",
        *,
        window_dilation: int | Sequence[int] = 1,
        ceil_mode: bool = False,
        impl: str = "auto",
    ):
        self.window_shape, self.strides, self.padding, self.window_dilation = _pool_geometry(
            "MaxPool", window_shape, strides, padding, window_dilation
        )
        self.ceil_mode, self.impl = ceil_mode, check_impl(impl, "MaxPool")

    def __call__(self, x):
        return _apply(
            self,
            _window_rank(self.window_shape),
            max_pool,
            x,
            self.window_shape,
            self.strides,
            self.padding,
            window_dilation=self.window_dilation,
            ceil_mode=self.ceil_mode,
        )


class AvgPool(nnx.Module):
    """Average pooling, calling :func:`cnnjax.pooling.avg_pool`; no parameters.

    ``x: (*batch, *spatial, C)`` -> ``(*batch, *out, C)``, sizes and ranks (an int or a sequence
    ``window_shape``) as :class:`MaxPool`. Padding counts as zeros in the mean when
    ``count_include_pad`` (PyTorch's default), and ``divisor_override`` replaces the divisor,
    both as in PyTorch.

    >>> AvgPool(2)(jnp.arange(16.0).reshape(1, 4, 4, 1))[0, ..., 0]
    Array([[ 2.5,  4.5],
           [10.5, 12.5]], dtype=float32)
    """

    def __init__(
        self,
        window_shape: int | Sequence[int],
        strides: int | Sequence[int] | None = None,
        padding="VALID",
        *,
        window_dilation: int | Sequence[int] = 1,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
        impl: str = "auto",
    ):
        self.window_shape, self.strides, self.padding, self.window_dilation = _pool_geometry(
            "AvgPool", window_shape, strides, padding, window_dilation
        )
        self.ceil_mode, self.count_include_pad, self.divisor_override = ceil_mode, count_include_pad, divisor_override
        self.impl = check_impl(impl, "AvgPool")

    def __call__(self, x):
        return _apply(
            self,
            _window_rank(self.window_shape),
            avg_pool,
            x,
            self.window_shape,
            self.strides,
            self.padding,
            window_dilation=self.window_dilation,
            ceil_mode=self.ceil_mode,
            count_include_pad=self.count_include_pad,
            divisor_override=self.divisor_override,
        )


class LPPool(nnx.Module):
    """Power-average (LP) pooling ``(sum x^p)^(1/p)`` over each window, calling :func:`cnnjax.pooling.lp_pool`.

    ``x: (*batch, *spatial, C)`` -> ``(*batch, *out, C)``, sizes and ranks as :class:`MaxPool`;
    PyTorch's ``LPPool2d(norm_type=p, ...)``.

    >>> LPPool(2, 2)(jnp.full((1, 4, 4, 1), 3.0))[0, ..., 0]
    Array([[6., 6.],
           [6., 6.]], dtype=float32)
    """

    def __init__(
        self,
        p: float,
        window_shape: int | Sequence[int],
        strides: int | Sequence[int] | None = None,
        padding="VALID",
        *,
        window_dilation: int | Sequence[int] = 1,
        ceil_mode: bool = False,
        impl: str = "auto",
    ):
        self.p = p
        self.window_shape, self.strides, self.padding, self.window_dilation = _pool_geometry(
            "LPPool", window_shape, strides, padding, window_dilation
        )
        self.ceil_mode, self.impl = ceil_mode, check_impl(impl, "LPPool")

    def __call__(self, x):
        return _apply(
            self,
            _window_rank(self.window_shape),
            lp_pool,
            x,
            self.p,
            self.window_shape,
            self.strides,
            self.padding,
            window_dilation=self.window_dilation,
            ceil_mode=self.ceil_mode,
        )


class GlobalAvgPool(nnx.Module):
    """Mean over all spatial dims, calling :func:`cnnjax.pooling.global_avg_pool`.

    ``x: (N, *spatial, C)`` (exactly one batch axis: nothing fixes the spatial rank) -> ``(N, C)``,
    or ``(N, 1, ..., 1, C)`` with ``keepdims``.

    >>> GlobalAvgPool()(jnp.arange(8.0).reshape(1, 2, 2, 2))
    Array([[3., 4.]], dtype=float32)
    """

    def __init__(self, keepdims: bool = False, *, impl: str = "auto"):
        self.keepdims, self.impl = keepdims, impl

    def __call__(self, x):
        return global_avg_pool(x, keepdims=self.keepdims, impl=self.impl)


class GlobalMaxPool(nnx.Module):
    """Max over all spatial dims, calling :func:`cnnjax.pooling.global_max_pool`.

    ``x: (N, *spatial, C)`` (exactly one batch axis: nothing fixes the spatial rank) -> ``(N, C)``,
    or ``(N, 1, ..., 1, C)`` with ``keepdims``.

    >>> GlobalMaxPool()(jnp.arange(8.0).reshape(1, 2, 2, 2))
    Array([[6., 7.]], dtype=float32)
    """

    def __init__(self, keepdims: bool = False, *, impl: str = "auto"):
        self.keepdims, self.impl = keepdims, impl

    def __call__(self, x):
        return global_max_pool(x, keepdims=self.keepdims, impl=self.impl)


class AdaptiveAvgPool(nnx.Module):
    """Average over PyTorch's adaptive bins, calling :func:`cnnjax.pooling.adaptive_avg_pool`.

    ``x: (*batch, *spatial, C)`` -> ``(*batch, *output_size, C)``; bin ``i`` of a dim of length
    ``L`` covers ``[floor(i*L/o), ceil((i+1)*L/o))``. An ``output_size`` sequence fixes the number
    of spatial dims (any number of batch axes); an int needs exactly one batch axis, as
    :class:`MaxPool`'s ``window_shape``.

    >>> AdaptiveAvgPool((1, 2))(jnp.arange(8.0).reshape(1, 2, 4, 1))[0, ..., 0]
    Array([[2.5, 4.5]], dtype=float32)
    """

    def __init__(self, output_size: int | Sequence[int], *, impl: str = "auto"):
        self.output_size = tuple(output_size) if _window_rank(output_size) else output_size
        self.impl = check_impl(impl, "AdaptiveAvgPool")

    def __call__(self, x):
        return _apply(self, _window_rank(self.output_size), adaptive_avg_pool, x, self.output_size)


class AdaptiveMaxPool(nnx.Module):
    """Max over PyTorch's adaptive bins, calling :func:`cnnjax.pooling.adaptive_max_pool`.

    ``x: (*batch, *spatial, C)`` -> ``(*batch, *output_size, C)``, bins and ranks as
    :class:`AdaptiveAvgPool`.

    >>> AdaptiveMaxPool((1, 2))(jnp.arange(8.0).reshape(1, 2, 4, 1))[0, ..., 0]
    Array([[5., 7.]], dtype=float32)
    """

    def __init__(self, output_size: int | Sequence[int], *, impl: str = "auto"):
        self.output_size = tuple(output_size) if _window_rank(output_size) else output_size
        self.impl = check_impl(impl, "AdaptiveMaxPool")

    def __call__(self, x):
        return _apply(self, _window_rank(self.output_size), adaptive_max_pool, x, self.output_size)


class SpatialPyramidPool(nnx.Module):
    """Spatial pyramid pooling, calling :func:`cnnjax.pooling.spatial_pyramid_pool`.

    ``x: (N, *spatial, C)`` (exactly one batch axis) -> ``(N, C * sum(l**rank for l in levels))``: for each level an
    adaptive ``mode`` (``"max"`` or ``"avg"``) pool to ``(l, ..., l)``, flattened in
    ``(l, ..., l, C)`` order, concatenated.

    >>> SpatialPyramidPool((1, 2))(jnp.ones((2, 13, 13, 3))).shape
    (2, 15)
    """

    def __init__(self, levels: Sequence[int] = (1, 2, 4), mode: str = "max", *, impl: str = "auto"):
        self.levels, self.mode, self.impl = levels, mode, impl

    def __call__(self, x):
        return spatial_pyramid_pool(x, self.levels, self.mode, impl=self.impl)


def set_impl(module: nnx.Module, impl: str) -> nnx.Module:
    """Make every cnnjax layer inside ``module`` (``module`` included) compute with ``impl``.

    ``impl`` is ``"auto"``, ``"closed_form"`` or ``"lax"`` (:mod:`cnnjax.backprop` says what each
    means). The zoo models call this with their own ``impl`` argument, so one flag reaches every
    layer; it also switches an existing model. Returns ``module``, changed in place.

    >>> block = nnx.Sequential(Conv(1, 2, (3, 3), rngs=nnx.Rngs(0)), MaxPool(2))
    >>> [layer.impl for layer in set_impl(block, "lax").layers]
    ['lax', 'lax']
    """
    impl = check_impl(impl, "set_impl")
    for _, node in nnx.iter_graph(module):
        if isinstance(node, _LAYERS):
            node.impl = impl
    return module


_LAYERS = (
    AdaptiveAvgPool,
    AdaptiveMaxPool,
    AvgPool,
    Conv,
    ConvTranspose,
    DepthwiseConv,
    GlobalAvgPool,
    GlobalMaxPool,
    LPPool,
    MaxPool,
    SeparableConv,
    SpatialPyramidPool,
)
