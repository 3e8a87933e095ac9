"""Convolutions: conv, its adjoint, and the notes' variants.

Every op takes channels-last inputs (``layout=None``, or ``"NWC"``/``"NHWC"``/``"NDHWC"``;
kernels HWIO, Flax's) or channels-first ones (``"NCW"``/``"NCHW"``/``"NCDHW"``; kernels OIHW,
PyTorch's), for 1 to 3 spatial dims: the kernel's rank minus 2. Inputs are batched,
``(N, *spatial, C)``, or unbatched, ``(*spatial, C)``, whose results have no batch axis
(:func:`cnnjax._canon.layout_of`, the rank rule). Arguments are canonicalized once at the top of
each public function (``cnnjax._canon``), where every check happens; all output-size arithmetic
is ``cnnjax.shapes``'s. Past the checks, ``conv`` and ``conv_transpose`` each run one jitted core
(so an eager call compiles once, not op by op): with ``impl="lax"`` one
``lax.conv_general_dilated`` and JAX's autodiff, otherwise one cnnjax primitive whose
derivatives are the notes' closed forms (:mod:`cnnjax.backprop`, :mod:`cnnjax._primitives`).

Conv layers compute cross-correlation (docs/convolutions.md: ``Y[i, j] = sum_ab X[i+a, j+b] K[a, b]``);
``convolve2d`` is the true convolution, with the kernel flipped (docs/convolutions.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax import lax
from jax import numpy as jnp

from cnnjax import _primitives, backprop
from cnnjax._canon import (
    ConvGeometry,
    Layout,
    canonicalize_padding,
    canonicalize_tuple,
    check_impl,
    conv_geometry,
    kernel_doc,
    layout_of,
    padding_pairs,
    per_dim,
    with_batch_axis,
    without_batch_axis,
)
from cnnjax.shapes import check_positive, conv_output_size, conv_transpose_output_size

__all__ = [
    "conv",
    "conv_transpose",
    "convolve2d",
    "corr2d",
    "depthwise_conv",
    "rank1_factors",
    "separable_conv",
    "spatially_separable_conv",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_JNP_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}
# scipy's "same" keeps the full output from index (k-1)//2: with the flipped kernel that is SAME_LOWER
_CONVOLVE_PADDING = {"valid": "VALID", "same": "SAME_LOWER", "full": "FULL"}


# --- boundary checks -------------------------------------------------------------------------


def _operands(x, kernel):
    """Both operands as arrays of their common dtype (lax needs one dtype; ints stay ints)."""
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    dtype = jnp.result_type(x, kernel)
    return x.astype(dtype), kernel.astype(dtype)


def _input(op: str, x, kernel, layout):
    """The rank rule (:func:`cnnjax._canon.layout_of`) for an input and the kernel that fixes its
    spatial rank: ``(x with a batch axis, Layout, batched)``."""
    layout, batched = layout_of(x.shape, layout, op, kernel_shape=kernel.shape)
    return with_batch_axis(x, batched), layout, batched


def _check_kernel_rank(op: str, name: str, kernel, layout: Layout) -> None:
    """A second kernel (pointwise, row/column) must have the rank of the first."""
    if kernel.ndim != layout.spatial_rank + 2:
        raise ValueError(
            f"{op}: {name} must have rank {layout.spatial_rank + 2} ({kernel_doc(layout)}), got shape {kernel.shape}"
        )


def _canonical_bias(op: str, bias, c_out: int, dtype):
    """``None`` or a ``(C_out,)`` array of the conv's ``dtype``; any other shape is an error (no
    silent broadcast). PyTorch requires the input's dtype; here a bias is cast to it when the cast
    stays within its kind (NumPy's ``same_kind``: ints to floats, float64 to float32), so the
    result always has the dtype of ``x`` and ``kernel``; a float bias on an integer conv or a
    complex one on a real conv raises ``TypeError``."""
    if bias is None:
        return None
    bias = jnp.asarray(bias)
    if bias.shape != (c_out,):
        raise ValueError(f"{op}: bias must have shape (C_out,) = ({c_out},), got shape {bias.shape}")
    if not np.can_cast(bias.dtype, dtype, casting="same_kind"):
        raise TypeError(
            f"{op}: bias of dtype {np.dtype(bias.dtype).name} cannot be added to a conv of dtype "
            f"{np.dtype(dtype).name} (x and kernel) without changing its kind; cast it first"
        )
    return bias.astype(dtype)


def _add_bias(y, bias, layout: Layout):
    """``y + bias`` with the ``(C_out,)`` bias broadcast along the layout's channel axis."""
    if bias is None:
        return y
    return y + jnp.reshape(bias, layout.shape(1, (1,) * layout.spatial_rank, -1))


def _window(kernel, layout: Layout) -> tuple[int, ...]:
    return tuple(kernel.shape[a] for a in layout.kernel_spatial_axes)


def _check_padding_mode(op: str, padding_mode) -> None:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{op}: padding_mode={padding_mode!r} is not one of {PADDING_MODES}")


def _check_padding_limits(op: str, sizes, pairs, padding_mode: str) -> None:
    """PyTorch's limits for the non-zero padding modes: reflect pads < size, circular <= size."""
    for dim, (n, (lo, hi)) in enumerate(zip(sizes, pairs, strict=True)):
        if padding_mode == "reflect" and max(lo, hi) >= n:
            raise ValueError(
                f"{op}: padding_mode='reflect' needs padding < input size, got padding=({lo}, {hi}) "
                f"for size {n} along spatial dim {dim}"
            )
        if padding_mode == "circular" and max(lo, hi) > n:
            raise ValueError(
                f"{op}: padding_mode='circular' needs padding <= input size, got padding=({lo}, {hi}) "
                f"for size {n} along spatial dim {dim}"
            )


# --- public ops ------------------------------------------------------------------------------


def conv(
    x,
    kernel,
    bias=None,
    *,
    strides=1,
    padding="VALID",
    kernel_dilation=1,
    input_dilation=1,
    feature_group_count=1,
    padding_mode="zeros",
    layout=None,
    precision=None,
    impl="auto",
):
    """N-D cross-correlation (a conv layer's forward pass), 1 to 3 spatial dims.

    Args:
      x: ``(N, *spatial, C_in)`` (channels-last) or ``(N, C_in, *spatial)`` (channels-first), or
        the same without ``N`` (unbatched: the result has no batch axis either).
      kernel: ``(*window, C_in // G, C_out)`` (HWIO) or ``(C_out, C_in // G, *window)`` (OIHW),
        ``G = feature_group_count``; ``C_in`` and ``C_out`` must be multiples of ``G``. Its rank
        minus 2 is the number of spatial dims.
      bias: ``None`` or ``(C_out,)``, added to every output position; cast to the dtype of ``x``
        and ``kernel`` (``TypeError`` if that changes its kind, e.g. complex to real).
      strides, kernel_dilation, input_dilation: int or one int per spatial dim, each >= 1.
        ``input_dilation=s`` inserts ``s - 1`` zeros between input pixels (docs/convolutions.md's
        transposed-conv view): padded in before the primitive on CPU, lax's ``lhs_dilation``
        elsewhere (docs/backprop.md, "On every backend and tool").
      padding: ``"VALID"``, ``"SAME"`` (odd extra pixel at the end), ``"SAME_LOWER"`` (at the
        start, the notes' convention), ``"FULL"`` (``d*(k-1)`` per side), an int, one int per
        dim, or ``(lo, hi)`` pairs. Strings are resolved on the input-dilated size
        ``(n-1)*input_dilation + 1``.
      padding_mode: ``"zeros"``, or ``"reflect"``/``"replicate"``/``"circular"``, which pad
        ``x`` explicitly (``jnp.pad``) and then run a VALID conv, like PyTorch (with
        PyTorch's limits: reflect pads < size, circular pads <= size; not combinable with
        ``input_dilation > 1``).
      layout: ``None`` (channels-last, the default) or a name: ``"NWC"``, ``"NHWC"``, ``"NDHWC"``
        (channels-last), ``"NCW"``, ``"NCHW"``, ``"NCDHW"`` (channels-first), whose spatial rank
        must be the kernel's.
      precision: passed to ``lax.conv_general_dilated``.
      impl: ``"auto"`` (default), ``"closed_form"`` or ``"lax"``: how it is computed and
        differentiated (:mod:`cnnjax.backprop`); values agree whatever it is.

    Integer operands compute in their (common) dtype, as lax does.

    Returns:
      ``(N, *out, C_out)`` or ``(N, C_out, *out)`` (without ``N`` for an unbatched ``x``), per dim
      ``out = floor((n' + lo + hi - d*(k-1) - 1) / s) + 1`` (docs/geometry.md) with
      ``n' = (n-1)*input_dilation + 1``.

    >>> x = jnp.arange(9.0).reshape(1, 1, 3, 3)
    >>> conv(x, jnp.array([[[[0.0, 1.0], [2.0, 3.0]]]]), jnp.array([1.0]), layout="NCHW")[0, 0]
    Array([[20., 26.],
           [38., 44.]], dtype=float32)
    >>> conv(jnp.ones((5, 5, 1)), jnp.ones((3, 3, 1, 2))).shape  # unbatched (H, W, C)
    (3, 3, 2)
    """
    op = "conv"
    x, kernel = _operands(x, kernel)
    x, layout, batched = _input(op, x, kernel, layout)
    impl = check_impl(impl, op)
    rank = layout.spatial_rank
    input_dilation = canonicalize_tuple(input_dilation, rank, "input_dilation", op)
    _check_padding_mode(op, padding_mode)
    # padding strings are resolved on the input-dilated size (n-1)*input_dilation + 1
    dilated_shape = layout.shape(
        x.shape[0],
        [(n - 1) * d + 1 for n, d in zip(layout.spatial(x.shape), input_dilation, strict=True)],
        layout.channels(x.shape),
    )
    geometry = conv_geometry(
        op, dilated_shape, kernel.shape, layout, strides, padding, kernel_dilation, feature_group_count
    )
    bias = _canonical_bias(op, bias, kernel.shape[layout.kernel_out_axis], x.dtype)
    if padding_mode != "zeros":
        if input_dilation != (1,) * rank:
            raise NotImplementedError(
                f"{op}: padding_mode={padding_mode!r} with input_dilation={input_dilation} is not supported"
            )
        _check_padding_limits(op, geometry.input_spatial, geometry.padding, padding_mode)
    y = _conv_core(
        x,
        kernel,
        bias,
        geometry=geometry,
        input_dilation=input_dilation,
        padding_mode=padding_mode,
        precision=precision,
        impl=impl,
    )
    return without_batch_axis(y, batched)


@functools.partial(jax.jit, static_argnames=("geometry", "input_dilation", "padding_mode", "precision", "impl"))
def _conv_core(x, kernel, bias, *, geometry: ConvGeometry, input_dilation, padding_mode, precision, impl):
    """``conv`` past its checks; jitted so an eager call compiles once."""
    layout = geometry.layout
    if padding_mode != "zeros":
        widths = [(0, 0)] * x.ndim
        for axis, pair in zip(layout.spatial_axes, geometry.padding, strict=True):
            widths[axis] = pair
        x = jnp.pad(x, widths, mode=_JNP_PAD_MODES[padding_mode])
        geometry = dataclasses.replace(
            geometry, input_spatial=layout.spatial(x.shape), padding=((0, 0),) * layout.spatial_rank
        )

    def lax_conv(x, kernel):
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=geometry.strides,
            padding=geometry.padding,
            lhs_dilation=input_dilation,
            rhs_dilation=geometry.dilation,
            dimension_numbers=layout.dimension_numbers,
            feature_group_count=geometry.groups,
            precision=precision,
        )

    def primitive_conv(x, kernel):
        if any(d > 1 for d in input_dilation):  # docs/convolutions.md: insert d - 1 zeros between the inputs
            x = lax.pad(x, jnp.zeros((), x.dtype), layout.window([(0, 0, d - 1) for d in input_dilation], (0, 0, 0)))
        return _primitives.conv(x, kernel, geometry, precision, impl)

    if impl == "lax":
        y = lax_conv(x, kernel)
    elif any(d > 1 for d in input_dilation):
        # The primitives' formulas with input dilation are lax's transpose rules for lhs_dilation:
        # off CPU, lax's own conv and its gradients; on CPU, the zeros padded in, then the schedules.
        y = lax.platform_dependent(x, kernel, cpu=primitive_conv, default=lax_conv)
    else:
        y = primitive_conv(x, kernel)
    return _add_bias(y, bias, layout)


def _transpose_kernel_doc(layout: Layout) -> str:
    if layout.channels_last:
        return "(*window, C_out // groups, C_in)"
    return "(C_in, C_out // groups, *window)"


def _conv_transpose_channels(op: str, x, kernel, layout: Layout, groups: int) -> int:
    """Check the forward conv's kernel against ``x`` (its forward output); return ``C_out``."""
    c_in = layout.channels(x.shape)
    k_forward_out = kernel.shape[layout.kernel_out_axis]
    if c_in % groups:
        raise ValueError(f"{op}: feature_group_count={groups} must divide C_in={c_in} (x shape {x.shape})")
    if k_forward_out != c_in:
        raise ValueError(
            f"{op}: kernel axis {layout.kernel_out_axis} has size {k_forward_out} but x has C_in={c_in}; the kernel "
            f"is the forward conv's, {_transpose_kernel_doc(layout)} in layout {layout.lhs}, got shape {kernel.shape}"
        )
    return kernel.shape[layout.kernel_in_axis] * groups


def conv_transpose(
    x,
    kernel,
    bias=None,
    *,
    strides=1,
    padding=0,
    output_padding=0,
    kernel_dilation=1,
    feature_group_count=1,
    layout=None,
    precision=None,
    impl="auto",
):
    """Transposed convolution: the exact adjoint of ``conv`` with the same kernel and geometry.

    ``conv_transpose(dy, w, strides=s, padding=p, ...)`` equals the VJP of
    ``conv(., w, strides=s, padding=p, ...)`` at ``dy`` whenever the shapes agree. Computed as in
    docs/convolutions.md: insert ``s - 1`` zeros between the inputs (lax's input dilation), pad each
    side by ``d*(k-1) - lo`` / ``d*(k-1) - hi + output_padding`` (negative pads crop), and run a
    stride-1 conv with the kernel flipped and its in/out channels swapped per group (Dumoulin &
    Visin 2016, arXiv:1603.07285, section 4).

    Args:
      x: ``(N, *spatial, C_in)`` (channels-last) or ``(N, C_in, *spatial)`` (channels-first), or
        unbatched, without ``N``.
      kernel: the forward conv's kernel, ``(*window, C_out // G, C_in)`` (HWIO) channels-last, or
        PyTorch's ConvTranspose weight ``(C_in, C_out // G, *window)`` channels-first;
        ``G = feature_group_count`` must divide ``C_in``. Its rank minus 2 is the spatial rank.
      bias: ``None`` or ``(C_out,)``, cast as in ``conv``.
      strides, kernel_dilation: int or one int per spatial dim, each >= 1.
      padding: the forward conv's padding: an int, one int per dim, ``(lo, hi)`` pairs,
        ``"VALID"``, ``"FULL"``, or ``"SAME"``/``"SAME_LOWER"`` (resolved on a forward input of
        ``n*s`` pixels, so the output is ``n*s`` long).
      output_padding: int or one int per dim, added to the high side (PyTorch's); must be
        smaller than the stride or the dilation.
      layout, precision: as in ``conv``.
      impl: ``"auto"`` (default), ``"closed_form"`` or ``"lax"``, as in ``conv``. With a cnnjax
        primitive this is the notes' conv input gradient (its derivatives: ``conv(dy, kernel)``
        and the conv kernel gradient with input ``dy`` and delta ``x``); with ``"lax"`` the
        input-dilated conv above and JAX's autodiff.

    Returns:
      ``(N, *out, C_out)`` or ``(N, C_out, *out)`` (without ``N`` for an unbatched ``x``), per dim
      ``out = (n-1)*s - lo - hi + d*(k-1) + 1 + output_padding`` (``n*s + output_padding`` for SAME).
      In ``NCHW`` this equals ``torch.nn.functional.conv_transpose{1,2,3}d(x, w, b, stride,
      padding, output_padding, groups, dilation)``.

    >>> y = conv_transpose(jnp.ones((1, 2, 1)), jnp.array([[[1.0]], [[10.0]]]), strides=2, layout="NWC")
    >>> y[0, :, 0]
    Array([ 1., 10.,  1., 10.], dtype=float32)
    """
    op = "conv_transpose"
    x, kernel = _operands(x, kernel)
    x, layout, batched = _input(op, x, kernel, layout)
    groups = check_positive(feature_group_count, "feature_group_count", op)
    c_out = _conv_transpose_channels(op, x, kernel, layout, groups)
    bias = _canonical_bias(op, bias, c_out, x.dtype)
    rank = layout.spatial_rank
    strides = canonicalize_tuple(strides, rank, "strides", op)
    kernel_dilation = canonicalize_tuple(kernel_dilation, rank, "kernel_dilation", op)
    output_padding = canonicalize_tuple(output_padding, rank, "output_padding", op, minimum=0)
    padding = canonicalize_padding(padding, rank, op)
    impl = check_impl(impl, op)
    window = _window(kernel, layout)
    sizes = layout.spatial(x.shape)
    forward_sizes = tuple(n * s for n, s in zip(sizes, strides, strict=True))
    pairs = padding_pairs(padding, forward_sizes, window, strides, kernel_dilation, op)
    per_dim_padding = (padding,) * rank if isinstance(padding, str) else pairs
    out_sizes = per_dim(
        op, conv_transpose_output_size, sizes, window, strides, per_dim_padding, output_padding, kernel_dilation
    )
    # The forward conv this is the adjoint of maps the output's m pixels to x's n with pads
    # (lo, hi') fitting exactly, m + lo + hi' = (n-1)*s + d*(k-1) + 1: hi' = hi - output_padding,
    # written through m so that SAME pads clipped at 0 (d*(k-1) + 1 < s) still give m = n*s.
    forward_pairs = tuple(
        (lo, (n - 1) * s + d * (k - 1) + 1 - m - lo)
        for n, k, s, d, (lo, _), m in zip(sizes, window, strides, kernel_dilation, pairs, out_sizes, strict=True)
    )
    geometry = ConvGeometry(layout, out_sizes, window, strides, forward_pairs, kernel_dilation, groups)
    y = _conv_transpose_core(x, kernel, bias, geometry=geometry, precision=precision, impl=impl)
    return without_batch_axis(y, batched)


@functools.partial(jax.jit, static_argnames=("geometry", "precision", "impl"))
def _conv_transpose_core(x, kernel, bias, *, geometry: ConvGeometry, precision, impl):
    """``conv_transpose`` past its checks (jitted): the input gradient of the forward conv of
    ``geometry`` (exact-fit pads), as a lax formula or a cnnjax primitive."""
    if impl == "lax":
        y = backprop.input_grad(x, kernel, geometry, precision)
    else:
        y = _primitives.conv_input_grad(x, kernel, geometry, precision, impl)
    return _add_bias(y, bias, geometry.layout)


def _check_2d(op: str, **arrays) -> None:
    for name, a in arrays.items():
        if a.ndim != 2:
            raise ValueError(f"{op}: {name} must be a 2-D array, got shape {a.shape}")


def _plane_conv(x, k, padding, impl):
    """A 2-D array correlated with a 2-D kernel, through ``conv`` as one NCHW plane."""
    return conv(x[None, None], k[None, None], padding=padding, layout="NCHW", impl=impl)[0, 0]


def corr2d(x, k, *, impl="auto"):
    """2-D cross-correlation of one plane with one kernel, valid mode (docs/convolutions.md's ``corr2d``).

    ``Y[i, j] = sum_{a, b} x[i + a, j + b] * k[a, b]``.

    Args:
      x: ``(H, W)``; k: ``(kh, kw)``, at most as large as ``x``. Integers stay integers.
      impl: as in ``conv``.

    Returns:
      ``(H - kh + 1, W - kw + 1)``.

    >>> corr2d(jnp.arange(9).reshape(3, 3), jnp.array([[0, 1], [2, 3]]))
    Array([[19, 25],
           [37, 43]], dtype=int32)
    """
    op = "corr2d"
    x, k = _operands(x, k)
    _check_2d(op, x=x, k=k)
    per_dim(op, conv_output_size, x.shape, k.shape)
    return _plane_conv(x, k, "VALID", impl)


def convolve2d(x, k, mode="valid", *, impl="auto"):
    """True 2-D convolution (kernel flipped), equal to ``scipy.signal.convolve2d(x, k, mode)``.

    ``Y[i, j] = sum_{a, b} x[i - a, j - b] * k[a, b]`` with zeros outside ``x`` (scipy's default
    ``boundary="fill", fillvalue=0``; other boundaries are not offered). As in scipy, ``"valid"``
    needs one array at least as large as the other in every dim and swaps them when ``k`` is
    the larger (convolution commutes); ``"same"`` is the centre of the ``"full"`` output, from
    index ``((kh - 1) // 2, (kw - 1) // 2)``.

    Args:
      x: ``(H, W)``; k: ``(kh, kw)``; mode: ``"valid"``, ``"same"`` or ``"full"``; impl: as in
        ``conv``.

    Returns:
      ``"valid"``: ``(|H - kh| + 1, |W - kw| + 1)``; ``"same"``: ``(H, W)``;
      ``"full"``: ``(H + kh - 1, W + kw - 1)``.

    >>> convolve2d(jnp.array([[1, 2, 3]]), jnp.array([[1, -1]]), mode="full")
    Array([[ 1,  1,  1, -3]], dtype=int32)
    """
    op = "convolve2d"
    x, k = _operands(x, k)
    _check_2d(op, x=x, k=k)
    if mode not in _CONVOLVE_PADDING:
        raise ValueError(f"{op}: mode={mode!r} is not one of {tuple(_CONVOLVE_PADDING)}")
    if mode == "valid":
        x_covers_k = all(a >= b for a, b in zip(x.shape, k.shape, strict=True))
        k_covers_x = all(b >= a for a, b in zip(x.shape, k.shape, strict=True))
        if not (x_covers_k or k_covers_x):
            raise ValueError(
                f"{op}: in mode 'valid' one of x {x.shape} and k {k.shape} must be at least as large as the other "
                "in every dimension"
            )
        if not x_covers_k:
            x, k = k, x
    return _plane_conv(x, jnp.flip(k), _CONVOLVE_PADDING[mode], impl)


def _check_depthwise_kernel(op: str, name: str, x, kernel, layout: Layout) -> None:
    c_in = layout.channels(x.shape)
    if kernel.shape[layout.kernel_in_axis] != 1 or kernel.shape[layout.kernel_out_axis] % c_in:
        shape_doc = "(*window, 1, C_in * multiplier)" if layout.channels_last else "(C_in * multiplier, 1, *window)"
        raise ValueError(
            f"{op}: {name} must be {shape_doc} in layout {layout.lhs} with C_in={c_in}, got shape {kernel.shape}"
        )


def depthwise_conv(
    x,
    kernel,
    bias=None,
    *,
    strides=1,
    padding="VALID",
    kernel_dilation=1,
    padding_mode="zeros",
    layout=None,
    precision=None,
    impl="auto",
):
    """Depthwise conv: each input channel correlated with its own ``multiplier`` filters (docs/convolutions.md).

    ``conv`` with ``feature_group_count = C_in``; output channel ``c * multiplier + m`` comes from
    input channel ``c`` (PyTorch's ``Conv2d(groups=C_in)`` and Flax's ordering).

    Args:
      x: ``(N, *spatial, C_in)`` or ``(N, C_in, *spatial)``, or unbatched, without ``N``.
      kernel: ``(*window, 1, C_in * multiplier)`` (channels-last) or
        ``(C_in * multiplier, 1, *window)`` (channels-first).
      bias: ``None`` or ``(C_in * multiplier,)``.
      strides, padding, kernel_dilation, padding_mode, layout, precision, impl: as in ``conv``.

    Returns:
      ``(N, *out, C_in * multiplier)`` (or channels first; without ``N`` for an unbatched ``x``),
      ``out`` as in ``conv``.

    >>> x = jnp.stack([jnp.ones((1, 3)), 2 * jnp.ones((1, 3))], axis=-1)[None]
    >>> depthwise_conv(x, jnp.ones((1, 2, 1, 2)))[0, 0]
    Array([[2., 4.],
           [2., 4.]], dtype=float32)
    """
    op = "depthwise_conv"
    x, kernel = _operands(x, kernel)
    x, layout, batched = _input(op, x, kernel, layout)
    _check_depthwise_kernel(op, "kernel", x, kernel, layout)
    y = conv(
        x,
        kernel,
        bias,
        strides=strides,
        padding=padding,
        kernel_dilation=kernel_dilation,
        feature_group_count=layout.channels(x.shape),
        padding_mode=padding_mode,
        layout=layout.lhs,
        precision=precision,
        impl=impl,
    )
    return without_batch_axis(y, batched)


def separable_conv(
    x,
    depthwise_kernel,
    pointwise_kernel,
    bias=None,
    *,
    strides=1,
    padding="VALID",
    kernel_dilation=1,
    padding_mode="zeros",
    layout=None,
    precision=None,
    impl="auto",
):
    """Depthwise-separable conv (docs/convolutions.md, Keras's ``SeparableConv``): depthwise, then 1x1.

    The geometry (strides, padding, dilation) belongs to the depthwise step; the bias is added
    once, after the pointwise step.

    Args:
      x: ``(N, *spatial, C_in)`` or ``(N, C_in, *spatial)``, or unbatched, without ``N``.
      depthwise_kernel: as ``depthwise_conv``'s kernel, ``C_mid = C_in * multiplier`` outputs;
        it fixes the spatial rank.
      pointwise_kernel: ``(1, .., 1, C_mid, C_out)`` (channels-last) or ``(C_out, C_mid, 1, .., 1)``.
      bias: ``None`` or ``(C_out,)``.

    Returns:
      ``(N, *out, C_out)`` (or channels first; without ``N`` for an unbatched ``x``), ``out`` as in
      ``conv``.

    >>> x = jnp.ones((1, 3, 3, 2))
    >>> separable_conv(x, jnp.ones((2, 2, 1, 2)), jnp.ones((1, 1, 2, 1)), jnp.array([0.5]))[0, :, :, 0]
    Array([[8.5, 8.5],
           [8.5, 8.5]], dtype=float32)
    """
    op = "separable_conv"
    x, depthwise_kernel = _operands(x, depthwise_kernel)
    pointwise_kernel = jnp.asarray(pointwise_kernel)
    x, layout, batched = _input(op, x, depthwise_kernel, layout)
    _check_depthwise_kernel(op, "depthwise_kernel", x, depthwise_kernel, layout)
    _check_kernel_rank(op, "pointwise_kernel", pointwise_kernel, layout)
    c_mid = depthwise_kernel.shape[layout.kernel_out_axis]
    if any(k != 1 for k in _window(pointwise_kernel, layout)) or (
        pointwise_kernel.shape[layout.kernel_in_axis] != c_mid
    ):
        raise ValueError(
            f"{op}: pointwise_kernel must be a 1x1 kernel ({kernel_doc(layout)}) with C_mid={c_mid} "
            f"input channels (the depthwise outputs), got shape {pointwise_kernel.shape}"
        )
    y = depthwise_conv(
        x,
        depthwise_kernel,
        strides=strides,
        padding=padding,
        kernel_dilation=kernel_dilation,
        padding_mode=padding_mode,
        layout=layout.lhs,
        precision=precision,
        impl=impl,
    )
    y = conv(y, pointwise_kernel, bias, layout=layout.lhs, precision=precision, impl=impl)
    return without_batch_axis(y, batched)


def _only_along(axis: int, values: tuple, neutral) -> tuple:
    """``values`` kept on spatial ``axis``, ``neutral`` on the others."""
    return tuple(v if a == axis else neutral for a, v in enumerate(values))


def spatially_separable_conv(
    x,
    column_kernel,
    row_kernel,
    bias=None,
    *,
    strides=1,
    padding="VALID",
    kernel_dilation=1,
    feature_group_count=1,
    layout=None,
    precision=None,
    impl="auto",
):
    """Spatially separable 2-D conv (docs/convolutions.md): a ``kh x 1`` conv, then a ``1 x kw`` conv.

    Each step takes its own axis's share of the geometry (strides, padding, dilation along H
    for the column step, along W for the row step), so for a rank-1 kernel
    ``K = outer(c, r)`` (see ``rank1_factors``) it equals ``conv`` with ``K``, at
    ``(kh + kw) / (kh * kw)`` of the multiplies. Both steps use ``feature_group_count``; the
    bias is added once, at the end.

    Args:
      x: ``(N, H, W, C_in)`` or ``(N, C_in, H, W)``, or unbatched, without ``N``.
      column_kernel: ``(kh, 1, C_in // G, C_mid)`` (channels-last) or ``(C_mid, C_in // G, kh, 1)``.
      row_kernel: ``(1, kw, C_mid // G, C_out)`` (channels-last) or ``(C_out, C_mid // G, 1, kw)``.
      bias: ``None`` or ``(C_out,)``.
      strides, padding, kernel_dilation, feature_group_count, layout, precision, impl: as in ``conv``
        (2-D only).

    Returns:
      ``(N, H_out, W_out, C_out)`` (or channels first; without ``N`` for an unbatched ``x``), the
      sizes of ``conv`` with a ``kh x kw`` kernel.

    >>> x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    >>> column, row = jnp.array([1.0, 2.0, 1.0]), jnp.array([1.0, 0.0, -1.0])
    >>> spatially_separable_conv(x, column.reshape(3, 1, 1, 1), row.reshape(1, 3, 1, 1))[0, :, :, 0]
    Array([[-8.]], dtype=float32)
    """
    op = "spatially_separable_conv"
    x, column_kernel = _operands(x, column_kernel)
    row_kernel = jnp.asarray(row_kernel)
    if column_kernel.ndim != 4:
        raise ValueError(f"{op}: column_kernel must have rank 4 (a 2-D kernel), got shape {column_kernel.shape}")
    x, layout, batched = _input(op, x, column_kernel, layout)
    for name, kernel, ones_axis in (("column_kernel", column_kernel, 1), ("row_kernel", row_kernel, 0)):
        _check_kernel_rank(op, name, kernel, layout)
        if _window(kernel, layout)[ones_axis] != 1:
            shape = "(kh, 1)" if ones_axis == 1 else "(1, kw)"
            raise ValueError(f"{op}: {name} must have a {shape} window, got shape {kernel.shape}")
    strides = canonicalize_tuple(strides, 2, "strides", op)
    kernel_dilation = canonicalize_tuple(kernel_dilation, 2, "kernel_dilation", op)
    padding = canonicalize_padding(padding, 2, op)
    common = {"feature_group_count": feature_group_count, "layout": layout.lhs, "precision": precision, "impl": impl}
    column_step, row_step = (
        {
            "strides": _only_along(axis, strides, 1),
            "kernel_dilation": _only_along(axis, kernel_dilation, 1),
            "padding": padding if isinstance(padding, str) else _only_along(axis, padding, (0, 0)),
        }
        for axis in (0, 1)
    )
    y = conv(x, column_kernel, **column_step, **common)
    return without_batch_axis(conv(y, row_kernel, bias, **row_step, **common), batched)


def rank1_factors(kernel_2d, *, rtol=1e-5):
    """Split a separable (rank-1) 2-D kernel into ``(column, row)`` with ``outer(column, row) == kernel``.

    ``column`` is the kernel's largest-norm column and ``row`` the matching row divided by their
    shared entry, so integer-friendly kernels factor exactly (Sobel ->
    ``[1, 2, 1]``, ``[1, 0, -1]``). The kernel counts as rank 1 when
    ``max|kernel - outer(column, row)| <= rtol * max|kernel|`` (computed in float64); an
    all-zero kernel gives zero factors. Decides on values, so it is not traceable under ``jit``.

    Args:
      kernel_2d: ``(kh, kw)``.
      rtol: relative tolerance of the rank-1 test (default ``1e-5``, float32 round-off).

    Returns:
      ``(column, row)`` of shapes ``(kh,)`` and ``(kw,)`` in the kernel's floating dtype (the
      default float for integer kernels).

    Raises:
      ValueError: if the kernel is not 2-D or not rank 1 within ``rtol``.

    >>> rank1_factors(jnp.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]]))
    (Array([1., 2., 1.], dtype=float32), Array([ 1.,  0., -1.], dtype=float32))
    """
    op = "rank1_factors"
    kernel = jnp.asarray(kernel_2d)
    _check_2d(op, kernel_2d=kernel)
    dtype = jnp.result_type(kernel, 1.0)
    k = np.asarray(kernel, dtype=np.float64)
    scale = np.abs(k).max(initial=0.0)
    if scale == 0:
        return jnp.zeros(k.shape[0], dtype), jnp.zeros(k.shape[1], dtype)
    j = int(np.argmax(np.linalg.norm(k, axis=0)))
    i = int(np.argmax(np.abs(k[:, j])))
    column, row = k[:, j], k[i] / k[i, j]
    error = np.abs(k - np.outer(column, row)).max()
    if error > rtol * scale:
        singular_values = np.linalg.svd(k, compute_uv=False)
        raise ValueError(
            f"{op}: kernel_2d is not rank 1: max|kernel - outer(column, row)| = {error:.3g} > rtol * max|kernel| = "
            f"{rtol * scale:.3g} (rtol={rtol}); singular values {np.round(singular_values, 6).tolist()}"
        )
    return jnp.asarray(column, dtype), jnp.asarray(row, dtype)
