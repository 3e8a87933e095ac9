"""cnnjax's primitives: the notes' closed forms as JAX primitives, the way lax defines its conv.

Each conv and pooling op with ``impl="auto"`` or ``"closed_form"`` binds one of these, whose
derivative rules are the notes' formulas (:mod:`cnnjax.backprop`); every JAX transform follows
from them, on every backend:

- ``cnnjax_conv(x, kernel)`` is bilinear; its transposes are ``cnnjax_conv_input_grad`` (with
  respect to ``x``) and ``cnnjax_conv_kernel_grad`` (``kernel``). Those two are bilinear as well,
  and the three are each other's transposes, so derivatives of any order stay among them;
- ``cnnjax_window_sum(x)`` is linear, its transpose the overlap-add ``cnnjax_window_sum_transpose``
  (and back);
- ``cnnjax_window_max(x)`` gives each window's maximum (minimum); its JVP gathers the tangent at
  each window's "max id" (``cnnjax_window_max_gather(t, x)``), whose transpose scatters the
  gradient back there (``cnnjax_window_max_scatter(dy, x)``), and back: lax's
  ``select_and_gather_add`` / ``select_and_scatter_add`` pair. ``cnnjax_window_argmax(x)`` gives
  the max ids themselves (integers, no derivative) for ``max_pool_with_indices``.

Every primitive takes its canonical geometry (:class:`cnnjax._canon.ConvGeometry` /
:class:`~cnnjax._canon.PoolGeometry`) as a parameter and has a batching rule (a vmapped axis is
folded into the batch, or for a batched kernel into the groups, as lax folds its conv). It is
lowered, when the program is lowered for a platform (never when it is traced):

- on every platform but CPU, to lax's own program for the same computation (the formulas of
  :mod:`cnnjax.backprop` are written as lax's transpose rules: kernels in/out-swapped by
  dimension numbers, ``select_and_scatter`` for max pooling's gradient), so GPU and TPU run what
  lax and Flax would (``tests/test_lowering.py``);
- on CPU, with ``impl="auto"``, to the measured schedules of :mod:`cnnjax._cpu`, with
  ``"closed_form"`` to the formulas.

Evaluated outside any trace, a primitive compiles alone; under ``jax.disable_jit()`` it runs its
formula op by op. :func:`as_lax` replaces every primitive of a function by its formula, for tools
that interpret jaxprs. Every use of ``jax.interpreters`` lives in this file (their API changes
between JAX releases; ``pyproject.toml`` pins the range tested).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from cnnjax import _cpu, backprop
from cnnjax._canon import ConvGeometry, PoolGeometry

# ---------------------------------------------------------------------------------------------
# Binding: eager evaluation, and operands that vary over the same shard_map axes.


# Each primitive's plain formula, as its lowering rule takes it: the eager evaluation under
# ``jax.disable_jit()`` and what :func:`as_lax` puts in its place.
_FORMULAS: dict[Primitive, Callable] = {}


@functools.cache
def _compiled(primitive: Primitive, params: tuple):
    return jax.jit(functools.partial(primitive.bind, **dict(params)))


def _evaluate(primitive: Primitive, *args, **params):
    """A primitive's eager evaluation: compiled alone (once per parameters and shapes, lowered for
    the platform like any program), or under ``jax.disable_jit()``, where a ``jax.jit`` would
    bind the primitive again, its formula op by op."""
    if jax.config.jax_disable_jit:
        return _FORMULAS[primitive](*args, **params)
    return _compiled(primitive, tuple(params.items()))(*args)


def _primitive(name: str) -> Primitive:
    primitive = Primitive(f"cnnjax_{name}")
    primitive.def_impl(functools.partial(_evaluate, primitive))
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


def _lowerings(primitive: Primitive, formula, schedule=None, accelerators=None, gpu=None) -> None:
    """Lower ``primitive`` to ``formula`` (``accelerators``, if given, on every platform but CPU;
    ``gpu``, if given, on CUDA and ROCm) and, if given, to the CPU ``schedule`` when its ``impl``
    parameter is ``"auto"``. Each takes the operands, the geometry and the other parameters by
    name (``precision``, ``select``). Off CPU the lowering is lax's own program for the same
    derivative, so on GPU and TPU a primitive compiles to what lax would run."""

    def rule(fn):
        def lower(*args, geometry, impl, **params):
            return fn(*args, geometry, **params)

        return mlir.lower_fun(lower, multiple_results=False)

    def cpu(*args, geometry, impl, **params):
        return (schedule if impl == "auto" and schedule is not None else formula)(*args, geometry, **params)

    _FORMULAS[primitive] = lambda *args, geometry, impl, **params: formula(*args, geometry, **params)
    mlir.register_lowering(primitive, rule(accelerators or formula))
    mlir.register_lowering(primitive, mlir.lower_fun(cpu, multiple_results=False), platform="cpu")
    if gpu is not None:
        mlir.register_lowering(primitive, rule(gpu), platform="gpu")


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
    """docs/convolutions.md: ``Y = X (*) K`` (:func:`cnnjax.backprop.correlate`)."""
    return _bind(conv_p, x, kernel, geometry=geometry, precision=precision, impl=impl)


def conv_input_grad(dy, kernel, geometry: ConvGeometry, precision, impl: str):
    """docs/backprop.md: ``pad(dilate(dy, s)) (*) rot180(W)`` (:func:`cnnjax.backprop.input_grad`)."""
    return _bind(conv_input_grad_p, dy, kernel, geometry=geometry, precision=precision, impl=impl)


def conv_kernel_grad(x, dy, geometry: ConvGeometry, precision, impl: str, transposed: bool = False):
    """docs/backprop.md: ``dW = delta (*) X`` (:func:`cnnjax.backprop.kernel_grad`)."""
    return _bind(conv_kernel_grad_p, x, dy, geometry=geometry, precision=precision, impl=impl, transposed=transposed)


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
def _conv_kernel_grad_abstract(x, dy, *, geometry, precision, impl, transposed):
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
    lambda ct, dy, kernel, **params: conv_kernel_grad(ct, dy, **params, transposed=True),
)
# <ct, kernel_grad(x, dy)> = <conv(x, ct), dy>: d/dx = input_grad(dy, ct), d/ddy = conv(x, ct).
ad.defbilinear(
    conv_kernel_grad_p,
    lambda ct, x, dy, transposed, **params: conv_input_grad(dy, ct, **params),
    lambda ct, x, dy, transposed, **params: conv(x, ct, **params),
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


def _conv_kernel_grad_batcher(args, dims, *, geometry, precision, impl, transposed):
    """The kernel gradient sums over the batch, so vmapped operands fold into the groups."""
    size, layout = _size(args, dims), geometry.layout
    x, dy = (_merge(_front(a, d, size), layout.channel_axis) for a, d in zip(args, dims, strict=True))
    grouped = dataclasses.replace(geometry, groups=size * geometry.groups)
    return _split(conv_kernel_grad(x, dy, grouped, precision, impl, transposed), layout.kernel_out_axis, size), 0


batching.primitive_batchers[conv_kernel_grad_p] = _conv_kernel_grad_batcher

_lowerings(conv_p, backprop.correlate, _cpu.correlate)
_lowerings(conv_input_grad_p, backprop.input_grad, _cpu.input_grad)


def _ignoring_transposed(formula):
    """A kernel-gradient rule that computes the same whichever factorization lax would use."""

    def rule(x, dy, g, precision, transposed):
        return formula(x, dy, g, precision)

    return rule


def _lax_kernel_grad(x, dy, g, precision, transposed):
    """Lax's program for the kernel gradient: a conv's, or a transposed conv's (``transposed``)."""
    return (backprop.transposed_kernel_grad if transposed else backprop.kernel_grad)(x, dy, g, precision)


_lowerings(
    conv_kernel_grad_p,
    _ignoring_transposed(backprop.kernel_grad),
    _ignoring_transposed(_cpu.kernel_grad),
    _lax_kernel_grad,
)


# ---------------------------------------------------------------------------------------------
# Pooling: window sums and their overlap-add; window maxima, the tangent gathered at each
# window's max id and the gradient scattered back there (lax's select_and_gather/scatter pair),
# and the max ids themselves (max_pool_with_indices).

window_sum_p = _primitive("window_sum")
window_sum_transpose_p = _primitive("window_sum_transpose")
window_max_p = _primitive("window_max")
window_max_gather_p = _primitive("window_max_gather")
window_max_scatter_p = _primitive("window_max_scatter")
window_argmax_p = _primitive("window_argmax")


def window_sum(x, geometry: PoolGeometry, impl: str):
    """Sum pooling (:func:`cnnjax.backprop.window_sum`)."""
    return _bind(window_sum_p, x, geometry=geometry, impl=impl)


def window_sum_transpose(dy, geometry: PoolGeometry, impl: str):
    """Mean pooling's backprop (:func:`cnnjax.backprop.window_sum_transpose`)."""
    return _bind(window_sum_transpose_p, dy, geometry=geometry, impl=impl)


def window_max(x, geometry: PoolGeometry, select: str, impl: str):
    """Max (min) pooling (:func:`cnnjax.backprop.window_max`)."""
    return _bind(window_max_p, x, geometry=geometry, select=select, impl=impl)


def window_max_gather(t, x, geometry: PoolGeometry, select: str, impl: str):
    """``t`` at each window's max id in ``x`` (:func:`cnnjax.backprop.window_max_gather`)."""
    return _bind(window_max_gather_p, t, x, geometry=geometry, select=select, impl=impl)


def window_max_scatter(dy, x, geometry: PoolGeometry, select: str, impl: str):
    """Max pooling's backprop (:func:`cnnjax.backprop.window_max_scatter`)."""
    return _bind(window_max_scatter_p, dy, x, geometry=geometry, select=select, impl=impl)


def window_argmax(x, geometry: PoolGeometry, select: str, impl: str):
    """Each window's max id, an integer without derivative (:func:`cnnjax.backprop.window_argmax`)."""
    return _bind(window_argmax_p, x, geometry=geometry, select=select, impl=impl)


def _pooled(a, geometry: PoolGeometry, spatial, dtype=None):
    return _aval(a, geometry.layout.shape(a.shape[0], spatial, geometry.layout.channels(a.shape)), dtype)


window_sum_p.def_abstract_eval(lambda x, *, geometry, impl: _pooled(x, geometry, geometry.out))
window_sum_transpose_p.def_abstract_eval(lambda dy, *, geometry, impl: _pooled(dy, geometry, geometry.input_spatial))
window_max_p.def_abstract_eval(lambda x, **params: _pooled(x, params["geometry"], params["geometry"].out))
window_max_gather_p.def_abstract_eval(lambda t, x, **params: _pooled(t, params["geometry"], params["geometry"].out))
window_max_scatter_p.def_abstract_eval(
    lambda dy, x, **params: _pooled(dy, params["geometry"], params["geometry"].input_spatial)
)
window_argmax_p.def_abstract_eval(
    lambda x, **params: _pooled(x, params["geometry"], params["geometry"].out, backprop.tap_dtype(params["geometry"]))
)

ad.deflinear2(window_sum_p, lambda ct, x, **params: [window_sum_transpose(ct, **params)])
ad.deflinear2(window_sum_transpose_p, lambda ct, dy, **params: [window_sum(ct, **params)])


def _max_jvp(primals, tangents, **params):
    """The max id is piecewise constant in ``x``; the maximum's tangent is ``x``'s tangent there."""
    (x,), (x_dot,) = primals, tangents
    y = window_max(x, **params)
    if type(x_dot) is ad.Zero:
        return y, ad.Zero(jax.typeof(y).to_tangent_aval())
    return y, window_max_gather(x_dot, x, **params)


def _argmax_jvp(primals, tangents, **params):
    tap = window_argmax(primals[0], **params)
    return tap, ad.Zero(jax.typeof(tap).to_tangent_aval())


ad.primitive_jvps[window_max_p] = _max_jvp
ad.primitive_jvps[window_argmax_p] = _argmax_jvp


def _linear_in_first(primitive: Primitive, transpose) -> None:
    """``primitive(a, x)`` is linear in ``a``; ``x`` only picks each window's max id, piecewise
    constant in ``x``, so it contributes no derivative (as in lax's ``select_and_gather_add``).
    Its transpose with respect to ``a`` is ``transpose(ct, x, ...)``."""

    def jvp(primals, tangents, **params):
        (a, x), (a_dot, _) = primals, tangents
        out = _bind(primitive, a, x, **params)
        if type(a_dot) is ad.Zero:
            return out, ad.Zero(jax.typeof(out).to_tangent_aval())
        return out, _bind(primitive, a_dot, x, **params)

    def transpose_rule(ct, a, x, **params):
        if type(ct) is ad.Zero:
            return [ad.Zero(a.aval.to_ct_aval()), None]
        return [transpose(ct, x, **params), None]

    ad.primitive_jvps[primitive] = jvp
    ad.primitive_transposes[primitive] = transpose_rule


_linear_in_first(window_max_gather_p, window_max_scatter)
_linear_in_first(window_max_scatter_p, window_max_gather)


def _pool_batcher(bind):
    """Pooling acts on each example alone: every vmapped axis folds into the batch."""

    def rule(args, dims, **params):
        size = _size(args, dims)
        out = bind(*(_merge(_front(a, d, size), 0) for a, d in zip(args, dims, strict=True)), **params)
        return _split(out, 0, size), 0

    return rule


batching.primitive_batchers[window_sum_p] = _pool_batcher(window_sum)
batching.primitive_batchers[window_sum_transpose_p] = _pool_batcher(window_sum_transpose)
batching.primitive_batchers[window_max_p] = _pool_batcher(window_max)
batching.primitive_batchers[window_max_gather_p] = _pool_batcher(window_max_gather)
batching.primitive_batchers[window_max_scatter_p] = _pool_batcher(window_max_scatter)
batching.primitive_batchers[window_argmax_p] = _pool_batcher(window_argmax)


def _max_ids(window_argmax_formula):
    """The max ids alone of a ``(maxima, max ids)`` formula."""

    def rule(x, g, select):
        return window_argmax_formula(jax.lax.stop_gradient(x), g, select)[1]

    return rule


_lowerings(window_sum_p, backprop.window_sum)
_lowerings(window_sum_transpose_p, backprop.window_sum_transpose, _cpu.window_sum_transpose)
_lowerings(window_max_p, backprop.window_max, _cpu.window_max)
_lowerings(window_max_gather_p, backprop.window_max_gather, _cpu.window_max_gather)
_lowerings(
    window_max_scatter_p,
    backprop.window_max_scatter,
    _cpu.window_max_scatter,
    backprop.select_and_scatter_max,
    functools.partial(backprop.select_and_scatter_max, expand_padding=True),
)
_lowerings(window_argmax_p, _max_ids(backprop.window_argmax), _max_ids(_cpu.window_argmax))


# ---------------------------------------------------------------------------------------------
# A lax view for tools that interpret jaxprs: every cnnjax primitive replaced by its formula.

# Call-like primitives whose one jaxpr takes the equation's operands as they are: inlined.
_INLINED = {"pjit", "jit", "closed_call", "core_call", "checkpoint", "remat", "custom_jvp_call", "custom_vjp_call"}


def _jaxprs(params: dict):
    """The (closed or open) jaxprs among an equation's parameters, also inside tuples."""
    for value in params.values():
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                yield item


def _has_cnnjax(jaxpr) -> bool:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return any(eqn.primitive in _FORMULAS or any(map(_has_cnnjax, _jaxprs(eqn.params))) for eqn in jaxpr.eqns)


def _lax_closed_jaxpr(closed):
    """``closed`` retraced with its cnnjax primitives replaced (same inputs and outputs)."""
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in closed.in_avals]
    return jax.make_jaxpr(lambda *args: _eval_lax(closed.jaxpr, closed.consts, *args))(*avals)


def _eval_lax(jaxpr, consts, *args):
    """Evaluate ``jaxpr`` (under whatever traces the caller's transforms put around it), every
    cnnjax primitive as its plain-lax formula. A call (``jit``, ``checkpoint``, custom
    derivatives) holding one is inlined; control flow holding one (``scan``, ``cond``,
    ``while``) gets its jaxprs retraced."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        params = eqn.params
        if eqn.primitive in _FORMULAS:
            outs = [_FORMULAS[eqn.primitive](*invals, **params)]
        elif not any(map(_has_cnnjax, _jaxprs(params))):
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        elif eqn.primitive.name in _INLINED:
            (inner,) = _jaxprs(params)
            consts = inner.consts if isinstance(inner, jax.extend.core.ClosedJaxpr) else ()
            outs = _eval_lax(getattr(inner, "jaxpr", inner), consts, *invals)
        else:
            rewritten = {}
            for name, value in params.items():
                if isinstance(value, jax.extend.core.ClosedJaxpr):
                    rewritten[name] = _lax_closed_jaxpr(value)
                elif isinstance(value, tuple) and all(isinstance(v, jax.extend.core.ClosedJaxpr) for v in value):
                    rewritten[name] = tuple(_lax_closed_jaxpr(v) for v in value)
                elif isinstance(value, jax.extend.core.Jaxpr):
                    raise NotImplementedError(
                        f"as_lax: cnnjax primitives inside {eqn.primitive.name!r} cannot be replaced yet"
                    )
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params({**params, **rewritten}))
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, out in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jax.extend.core.DropVar):
                env[v] = out
    return [read(v) for v in jaxpr.outvars]


def as_lax(fn: Callable) -> Callable:
    """``fn`` with every cnnjax primitive replaced by its plain-lax formula, for tools that
    interpret jaxprs and know only JAX's own primitives (``jax2onnx``, quantizers,
    ``jax.experimental.jet``, custom interpreters).

    ``fn`` takes and returns pytrees of arrays (a function, a bound method, or an ``nnx.Module``,
    called with its parameters as they are). Each call traces ``fn`` to a jaxpr and evaluates
    it, every ``cnnjax_*`` equation as the lax formula it is lowered to off CPU (the program lax's
    own autodiff would run), so the result composes with every transform (``jit``, ``grad``,
    ``vmap``, ``jvp``) and its jaxpr holds lax's primitives alone. Values equal ``fn``'s to float
    tolerance. Inside a ``jit``, ``checkpoint`` or custom derivative that holds a cnnjax
    primitive, the call is inlined (its custom rule dropped for autodiff of the formula, the
    same derivative); ``scan``, ``cond`` and ``while`` bodies are retraced.

    >>> import jax, jax.numpy as jnp
    >>> from cnnjax import as_lax, max_pool
    >>> jaxpr = jax.make_jaxpr(as_lax(lambda x: max_pool(x, 2)))(jnp.ones((1, 4, 4, 1)))
    >>> sorted({e.primitive.name for e in jaxpr.eqns})
    ['reduce_window_max']
    """

    from flax import nnx  # an nnx model's state goes in and out, so updates (BatchNorm) stay arrays

    if isinstance(fn, nnx.Module):
        graphdef = nnx.graphdef(fn)

        def pure(state, *args, **kwargs):
            model = nnx.merge(graphdef, state)
            return model(*args, **kwargs), nnx.state(model)

        lax_pure = as_lax(pure)

        @functools.wraps(fn)
        def lax_model(*args, **kwargs):
            before = nnx.state(fn)
            out, after = lax_pure(before, *args, **kwargs)
            old = dict(nnx.to_flat_state(before))
            changed = [(path, v) for path, v in nnx.to_flat_state(after) if v.get_value() is not old[path].get_value()]
            if changed:  # only what the call updated (running statistics), as the model's own call does
                nnx.update(fn, nnx.from_flat_state(changed))
            return out

        return lax_model

    @functools.wraps(fn)
    def lax_only(*args, **kwargs):
        flat, tree = jax.tree.flatten((args, kwargs))

        def flat_fn(*leaves):
            inner_args, inner_kwargs = jax.tree.unflatten(tree, leaves)
            return fn(*inner_args, **inner_kwargs)

        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*flat)
        outs = _eval_lax(closed.jaxpr, closed.consts, *flat)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return lax_only
