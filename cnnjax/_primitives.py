"""cnnjax's primitives: the notes' closed forms as JAX primitives, the way lax defines its conv.

Each conv and pooling op with ``impl="auto"`` or ``"closed_form"`` binds one of these, whose
derivative rules are the notes' formulas (:mod:`cnnjax.backprop`); every JAX transform follows
from them, on every backend:

- ``cnnjax_conv(x, kernel)`` is bilinear; its transposes are ``cnnjax_conv_input_grad`` (with
  respect to ``x``) and ``cnnjax_conv_kernel_grad`` (``kernel``). Those two are bilinear as well,
  and the three are each other's transposes, so derivatives of any order stay among them;
- ``cnnjax_window_sum(x)`` is linear, its transpose the overlap-add ``cnnjax_window_sum_transpose``
  (and back);
- ``cnnjax_window_argmax(x) -> (y, tap)`` gives each window's maximum and "max id"; its JVP
  gathers the tangent at the max id (``cnnjax_tap_gather``), whose transpose scatters the
  gradient back (``cnnjax_tap_scatter``), and back.

Every primitive takes its canonical geometry (:class:`cnnjax._canon.ConvGeometry` /
:class:`~cnnjax._canon.PoolGeometry`) as a parameter, has a batching rule (a vmapped axis is
folded into the batch, or for a batched kernel into the groups, as lax folds its conv), and is
lowered to the formula on every platform, or on CPU with ``impl="auto"`` to the measured
schedules of :mod:`cnnjax._cpu`. The choice is made when the program is lowered for a platform,
never when it is traced. Every use of ``jax.interpreters`` lives in this file (their API changes
between JAX releases; ``pyproject.toml`` pins the range tested).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from cnnjax import _cpu, backprop
from cnnjax._canon import ConvGeometry, PoolGeometry

# ---------------------------------------------------------------------------------------------
# Binding: eager evaluation, and operands that vary over the same shard_map axes.


@functools.cache
def _compiled(primitive: Primitive, params: tuple):
    return jax.jit(functools.partial(primitive.bind, **dict(params)))


def _primitive(name: str, multiple_results: bool = False) -> Primitive:
    """A primitive evaluated eagerly by compiling it alone (once per parameters and shapes)."""
    primitive = Primitive(f"cnnjax_{name}")
    primitive.multiple_results = multiple_results
    primitive.def_impl(lambda *args, **params: _compiled(primitive, tuple(params.items()))(*args))
    return primitive


def _bind(primitive: Primitive, *args, **params):
    """``primitive.bind``, with every operand cast to vary over the union of the operands'
    ``shard_map`` axes first (what lax's own ops do), so ``check_vma`` types the result."""
    vmas = [jax.typeof(a).mat.varying for a in args]
    union = frozenset().union(*vmas)
    args = [
        jax.lax.pcast(a, tuple(union - v), to="varying") if union - v else a for a, v in zip(args, vmas, strict=True)
    ]
    return primitive.bind(*args, **params)


def _aval(like, shape, dtype=None):
    """An abstract value like ``like`` (its sharding and varying axes) with another shape/dtype."""
    return like.update(shape=tuple(shape), dtype=like.dtype if dtype is None else dtype, weak_type=False)


def _lowerings(primitive: Primitive, formula, schedule=None) -> None:
    """Lower ``primitive`` to ``formula`` everywhere and, if given, to the CPU ``schedule`` when
    its ``impl`` parameter is ``"auto"``. Both take the operands, the geometry and the other
    parameters by name (``precision``, ``select``)."""

    def plain(*args, geometry, impl, **params):
        return formula(*args, geometry, **params)

    mlir.register_lowering(primitive, mlir.lower_fun(plain, primitive.multiple_results))
    if schedule is not None:

        def cpu(*args, geometry, impl, **params):
            return (schedule if impl == "auto" else formula)(*args, geometry, **params)

        mlir.register_lowering(primitive, mlir.lower_fun(cpu, primitive.multiple_results), platform="cpu")


# ---------------------------------------------------------------------------------------------
# Batching helpers: a vmapped axis moved to the front, then merged into another axis (outermost).


def _front(a, dim, size: int):
    """``a`` with its vmapped axis ``dim`` first; an unbatched ``a`` (``dim is None``) broadcast."""
    return jnp.broadcast_to(a, (size, *a.shape)) if dim is None else jnp.moveaxis(a, dim, 0)


def _merge(a, axis: int):
    """Merge the leading (vmapped) axis of ``a`` into ``axis`` of the rest, as its outer part."""
    a = jnp.moveaxis(a, 0, axis)
    return a.reshape(*a.shape[:axis], a.shape[axis] * a.shape[axis + 1], *a.shape[axis + 2 :])


def _split(a, axis: int, size: int):
    """Inverse of ``_merge``: split ``size`` off ``axis`` and move it to the front."""
    a = a.reshape(*a.shape[:axis], size, a.shape[axis] // size, *a.shape[axis + 1 :])
    return jnp.moveaxis(a, axis, 0)


def _size(args, dims) -> int:
    return next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)


# ---------------------------------------------------------------------------------------------
# Convolution: conv, its input gradient and its kernel gradient, each other's transposes.

conv_p = _primitive("conv")
conv_input_grad_p = _primitive("conv_input_grad")
conv_kernel_grad_p = _primitive("conv_kernel_grad")


def conv(x, kernel, geometry: ConvGeometry, precision, impl: str):
    """notes 001: ``Y = X (*) K`` (:func:`cnnjax.backprop.correlate`)."""
    return _bind(conv_p, x, kernel, geometry=geometry, precision=precision, impl=impl)


def conv_input_grad(dy, kernel, geometry: ConvGeometry, precision, impl: str):
    """notes 002: ``pad(dilate(dy, s)) (*) rot180(W)`` (:func:`cnnjax.backprop.input_grad`)."""
    return _bind(conv_input_grad_p, dy, kernel, geometry=geometry, precision=precision, impl=impl)


def conv_kernel_grad(x, dy, geometry: ConvGeometry, precision, impl: str):
    """notes 002: ``dW = delta (*) X`` (:func:`cnnjax.backprop.kernel_grad`)."""
    return _bind(conv_kernel_grad_p, x, dy, geometry=geometry, precision=precision, impl=impl)


@conv_p.def_abstract_eval
def _conv_abstract(x, kernel, *, geometry, precision, impl):
    layout = geometry.layout
    return _aval(x, layout.shape(x.shape[0], geometry.output_spatial, kernel.shape[layout.kernel_out_axis]))


@conv_input_grad_p.def_abstract_eval
def _conv_input_grad_abstract(dy, kernel, *, geometry, precision, impl):
    layout = geometry.layout
    c_in = kernel.shape[layout.kernel_in_axis] * geometry.groups
    return _aval(dy, layout.shape(dy.shape[0], geometry.input_spatial, c_in))


@conv_kernel_grad_p.def_abstract_eval
def _conv_kernel_grad_abstract(x, dy, *, geometry, precision, impl):
    layout = geometry.layout
    return _aval(x, backprop.kernel_shape(geometry, layout.channels(x.shape), layout.channels(dy.shape)))


# conv(x, K) is bilinear: d/dx <ct, conv(x, K)> = input_grad(ct, K), d/dK = kernel_grad(x, ct).
ad.defbilinear(
    conv_p,
    lambda ct, x, kernel, **params: conv_input_grad(ct, kernel, **params),
    lambda ct, x, kernel, **params: conv_kernel_grad(x, ct, **params),
)
# input_grad(dy, K) = conv(., K)^T dy: d/ddy <ct, .> = conv(ct, K), d/dK = kernel_grad(ct, dy).
ad.defbilinear(
    conv_input_grad_p,
    lambda ct, dy, kernel, **params: conv(ct, kernel, **params),
    lambda ct, dy, kernel, **params: conv_kernel_grad(ct, dy, **params),
)
# <ct, kernel_grad(x, dy)> = <conv(x, ct), dy>: d/dx = input_grad(dy, ct), d/ddy = conv(x, ct).
ad.defbilinear(
    conv_kernel_grad_p,
    lambda ct, x, dy, **params: conv_input_grad(dy, ct, **params),
    lambda ct, x, dy, **params: conv(x, ct, **params),
)


def _conv_batcher(bind):
    """Batching rule of a conv primitive ``bind(data, kernel, geometry, ...)`` (conv or input
    gradient): a vmapped axis of the data alone folds into the batch; a vmapped kernel folds
    (with the data, broadcast if unbatched) into the groups, the vmapped index outermost."""

    def rule(args, dims, *, geometry, precision, impl):
        (data, kernel), (d_dim, k_dim) = args, dims
        size, layout = _size(args, dims), geometry.layout
        if k_dim is None:
            out = bind(_merge(_front(data, d_dim, size), 0), kernel, geometry, precision, impl)
            return _split(out, 0, size), 0
        data = _merge(_front(data, d_dim, size), layout.channel_axis)
        kernel = _merge(_front(kernel, k_dim, size), layout.kernel_out_axis)
        grouped = dataclasses.replace(geometry, groups=size * geometry.groups)
        return _split(bind(data, kernel, grouped, precision, impl), layout.channel_axis, size), 0

    return rule


batching.primitive_batchers[conv_p] = _conv_batcher(conv)
batching.primitive_batchers[conv_input_grad_p] = _conv_batcher(conv_input_grad)


def _conv_kernel_grad_batcher(args, dims, *, geometry, precision, impl):
    """The kernel gradient sums over the batch, so vmapped operands fold into the groups."""
    size, layout = _size(args, dims), geometry.layout
    x, dy = (_merge(_front(a, d, size), layout.channel_axis) for a, d in zip(args, dims, strict=True))
    grouped = dataclasses.replace(geometry, groups=size * geometry.groups)
    return _split(conv_kernel_grad(x, dy, grouped, precision, impl), layout.kernel_out_axis, size), 0


batching.primitive_batchers[conv_kernel_grad_p] = _conv_kernel_grad_batcher

_lowerings(conv_p, backprop.correlate, _cpu.correlate)
_lowerings(conv_input_grad_p, backprop.input_grad, _cpu.input_grad)
_lowerings(conv_kernel_grad_p, backprop.kernel_grad, _cpu.kernel_grad)


# ---------------------------------------------------------------------------------------------
# Pooling: window sums and their overlap-add; window arg-max, its gather and its scatter.

window_sum_p = _primitive("window_sum")
window_sum_transpose_p = _primitive("window_sum_transpose")
window_argmax_p = _primitive("window_argmax", multiple_results=True)
tap_gather_p = _primitive("tap_gather")
tap_scatter_p = _primitive("tap_scatter")


def window_sum(x, geometry: PoolGeometry, impl: str):
    """Sum pooling (:func:`cnnjax.backprop.window_sum`)."""
    return _bind(window_sum_p, x, geometry=geometry, impl=impl)


def window_sum_transpose(dy, geometry: PoolGeometry, impl: str):
    """notes 002, mean pooling's backprop (:func:`cnnjax.backprop.window_sum_transpose`)."""
    return _bind(window_sum_transpose_p, dy, geometry=geometry, impl=impl)


def window_argmax(x, geometry: PoolGeometry, select: str, impl: str):
    """Max (min) pooling and each window's max id (:func:`cnnjax.backprop.window_argmax`)."""
    return _bind(window_argmax_p, x, geometry=geometry, select=select, impl=impl)


def tap_gather(t, tap, geometry: PoolGeometry, impl: str):
    """``t`` at each window's max id (:func:`cnnjax.backprop.tap_gather`)."""
    return _bind(tap_gather_p, t, tap, geometry=geometry, impl=impl)


def tap_scatter(dy, tap, geometry: PoolGeometry, impl: str):
    """notes 002, max pooling's backprop (:func:`cnnjax.backprop.tap_scatter`)."""
    return _bind(tap_scatter_p, dy, tap, geometry=geometry, impl=impl)


def _pooled(a, geometry: PoolGeometry, spatial, dtype=None):
    return _aval(a, geometry.layout.shape(a.shape[0], spatial, geometry.layout.channels(a.shape)), dtype)


window_sum_p.def_abstract_eval(lambda x, *, geometry, impl: _pooled(x, geometry, geometry.out))
window_sum_transpose_p.def_abstract_eval(lambda dy, *, geometry, impl: _pooled(dy, geometry, geometry.input_spatial))
window_argmax_p.def_abstract_eval(
    lambda x, *, geometry, select, impl: [
        _pooled(x, geometry, geometry.out),
        _pooled(x, geometry, geometry.out, backprop.tap_dtype(geometry)),
    ]
)
tap_gather_p.def_abstract_eval(lambda t, tap, *, geometry, impl: _aval(tap, tap.shape, t.dtype))
tap_scatter_p.def_abstract_eval(lambda dy, tap, *, geometry, impl: _pooled(dy, geometry, geometry.input_spatial))

ad.deflinear2(window_sum_p, lambda ct, x, **params: [window_sum_transpose(ct, **params)])
ad.deflinear2(window_sum_transpose_p, lambda ct, dy, **params: [window_sum(ct, **params)])


def _argmax_jvp(primals, tangents, *, geometry, select, impl):
    """The max id is piecewise constant in ``x``; the maximum's tangent is ``x``'s tangent there."""
    (x,), (x_dot,) = primals, tangents
    y, tap = window_argmax(x, geometry, select, impl)
    if type(x_dot) is ad.Zero:
        y_dot = ad.Zero(jax.typeof(y).to_tangent_aval())
    else:
        y_dot = tap_gather(x_dot, tap, geometry, impl)
    return (y, tap), (y_dot, ad.Zero(jax.typeof(tap).to_tangent_aval()))


ad.primitive_jvps[window_argmax_p] = _argmax_jvp


def _linear_in_first(primitive: Primitive, transpose) -> None:
    """``primitive(a, tap)`` is linear in ``a`` (``tap`` is an integer constant); its transpose
    with respect to ``a`` is ``transpose(ct, tap, ...)``."""

    def jvp(primals, tangents, **params):
        (a, tap), (a_dot, _) = primals, tangents
        out = _bind(primitive, a, tap, **params)
        if type(a_dot) is ad.Zero:
            return out, ad.Zero(jax.typeof(out).to_tangent_aval())
        return out, _bind(primitive, a_dot, tap, **params)

    def transpose_rule(ct, a, tap, **params):
        if type(ct) is ad.Zero:
            return [ad.Zero(a.aval.to_ct_aval()), None]
        return [transpose(ct, tap, **params), None]

    ad.primitive_jvps[primitive] = jvp
    ad.primitive_transposes[primitive] = transpose_rule


_linear_in_first(tap_gather_p, tap_scatter)
_linear_in_first(tap_scatter_p, tap_gather)


def _pool_batcher(bind, multiple_results: bool = False):
    """Pooling acts on each example alone: every vmapped axis folds into the batch."""

    def rule(args, dims, **params):
        size = _size(args, dims)
        out = bind(*(_merge(_front(a, d, size), 0) for a, d in zip(args, dims, strict=True)), **params)
        if multiple_results:
            return [_split(o, 0, size) for o in out], [0] * len(out)
        return _split(out, 0, size), 0

    return rule


batching.primitive_batchers[window_sum_p] = _pool_batcher(window_sum)
batching.primitive_batchers[window_sum_transpose_p] = _pool_batcher(window_sum_transpose)
batching.primitive_batchers[window_argmax_p] = _pool_batcher(window_argmax, multiple_results=True)
batching.primitive_batchers[tap_gather_p] = _pool_batcher(tap_gather)
batching.primitive_batchers[tap_scatter_p] = _pool_batcher(tap_scatter)

_lowerings(window_sum_p, backprop.window_sum)
_lowerings(window_sum_transpose_p, backprop.window_sum_transpose, _cpu.window_sum_transpose)
_lowerings(window_argmax_p, backprop.window_argmax, _cpu.window_argmax)
_lowerings(tap_gather_p, backprop.tap_gather)
_lowerings(tap_scatter_p, backprop.tap_scatter, _cpu.tap_scatter)
