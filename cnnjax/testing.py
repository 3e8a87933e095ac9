"""Property tests for convolution and pooling code: hypothesis strategies of valid calls, and ``check_op``.

A custom layer is checked against finite differences and against cnnjax's own op at every
geometry hypothesis draws (``docs/testing.md``)::

    @given(conv_geometries(rank=2))
    def test_my_conv(geometry):
        check_op(my_conv, geometry, reference="lax")

``conv_geometries`` and ``pool_geometries`` draw :class:`Geometry` values: one cnnjax op, the
shapes of its array arguments and its keyword arguments, valid by the rules of
:mod:`cnnjax.shapes` (every output size >= 1, every pooling window holding an input element).
Edge cases are weighted in: stride larger than the window, dilation, even kernels with ``"SAME"``
and ``"SAME_LOWER"``, asymmetric ``(lo, hi)`` pads, ``ceil_mode``'s hanging window, groups,
depthwise multipliers, a batch of 0 and unbatched inputs. Sizes stay small (at most 9 pixels
per dim, 4 in 3-D) so that a property test compiles quickly.

Importing this module does not need hypothesis; calling a strategy does (``ImportError``
naming it otherwise). :func:`arrays_for` and :func:`check_op` need only JAX.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from cnnjax import convolution, pooling
from cnnjax._canon import _NAMED_LAYOUTS, IMPLS, _first_empty_window
from cnnjax.shapes import conv_output_size, conv_transpose_output_size, pool_output_size, resolve_padding

__all__ = [
    "CONV_OPS",
    "POOL_KINDS",
    "TOLERANCES",
    "Geometry",
    "arrays_for",
    "check_op",
    "conv_geometries",
    "pool_geometries",
]

CONV_OPS = {
    "conv": convolution.conv,
    "depthwise_conv": convolution.depthwise_conv,
    "conv_transpose": convolution.conv_transpose,
}
"""The conv ops :func:`conv_geometries` draws calls of, by name."""

POOL_KINDS = {
    "max": pooling.max_pool,
    "min": pooling.min_pool,
    "sum": pooling.sum_pool,
    "avg": pooling.avg_pool,
    "lp": pooling.lp_pool,
}
"""The ``kind`` values of :func:`pool_geometries` and the pool each one calls."""

TOLERANCES = {
    # dtype name: (relative tolerance against a reference, scaled by its largest magnitude;
    #              finite differences' (eps, atol = rtol), or None where they are meaningless)
    "float64": (1e-9, (1e-4, 1e-5)),
    "float32": (1e-4, (1e-2, 5e-2)),
    "float16": (1e-2, None),
    "bfloat16": (5e-2, None),
}
"""Per-dtype tolerances of :func:`check_op`: ``dtype name -> (reference rtol, (FD eps, FD tolerance) or None)``."""

_MAX_POOL_SPACING = 0.05  # distinct max/min pool inputs differ by more than 2 finite-difference steps


@dataclasses.dataclass(frozen=True)
class Geometry:
    """One valid call of a cnnjax op: ``op(*arrays of shapes, **kwargs)``.

    ``op``: the op's name (``"conv"``, ``"depthwise_conv"``, ``"conv_transpose"``, or a pool:
    ``"max_pool"``, ``"min_pool"``, ``"sum_pool"``, ``"avg_pool"``, ``"lp_pool"``); ``shapes``: the
    array arguments' shapes, ``(x,)`` or ``(x, kernel)``, in ``kwargs["layout"]``; ``kwargs``: the
    geometry keywords in cnnjax's vocabulary (``strides``, ``padding``, ``kernel_dilation``, ...).
    ``str(geometry)`` is the call on one line; :attr:`function` is the cnnjax op itself.

    >>> g = Geometry("max_pool", ((1, 4, 4, 2),), {"window_shape": (2, 2), "layout": "NHWC"})
    >>> print(g)
    max_pool(x: (1, 4, 4, 2), window_shape=(2, 2), layout='NHWC')
    >>> g.function(jnp.ones(g.shapes[0]), **g.kwargs).shape
    (1, 2, 2, 2)
    """

    op: str
    shapes: tuple[tuple[int, ...], ...]
    kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def function(self) -> Callable:
        """The cnnjax op this geometry calls (``cnnjax.conv``, ``cnnjax.max_pool``, ...)."""
        return {**CONV_OPS, **{f"{kind}_pool": fn for kind, fn in POOL_KINDS.items()}}[self.op]

    def __str__(self) -> str:
        arrays = [f"{name}: {shape}" for name, shape in zip(("x", "kernel"), self.shapes, strict=False)]
        return f"{self.op}({', '.join([*arrays, *(f'{k}={v!r}' for k, v in self.kwargs.items())])})"


def _hypothesis(caller: str):
    """hypothesis's ``strategies`` module, or an ``ImportError`` naming it and ``caller``."""
    try:
        from hypothesis import strategies
    except ImportError as err:
        raise ImportError(
            f"cnnjax.testing.{caller} needs hypothesis, which is not installed: pip install hypothesis"
        ) from err
    return strategies


def _layout_and_rank(caller: str, rank, layout) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The ranks and layout names a strategy may draw, after checking ``rank`` and ``layout``."""
    if layout is not None and layout not in _NAMED_LAYOUTS:
        raise ValueError(f"{caller}: layout={layout!r} is not one of {tuple(_NAMED_LAYOUTS)} or None")
    if rank is not None and (isinstance(rank, bool) or rank not in (1, 2, 3)):
        raise ValueError(f"{caller}: rank={rank!r} must be 1, 2, 3 or None")
    if layout is not None and rank is not None and _NAMED_LAYOUTS[layout][1] != rank:
        raise ValueError(f"{caller}: layout={layout!r} is {_NAMED_LAYOUTS[layout][1]}-D, but rank={rank}")
    if layout is not None:
        return (_NAMED_LAYOUTS[layout][1],), (layout,)
    ranks = (2, 1, 2, 3) if rank is None else (rank,)  # 3-D drawn least: its programs compile slowest
    return ranks, tuple(_NAMED_LAYOUTS)


def _draw_layout(draw, st, ranks, layouts) -> tuple[int, str]:
    rank = draw(st.sampled_from(ranks))
    return rank, draw(st.sampled_from([name for name in layouts if _NAMED_LAYOUTS[name][1] == rank]))


def _draw_padding(draw, st, rank: int, limit: int, strings):
    """One padding form, each form equally likely: a string, an int, one int per dim, or ``(lo, hi)``
    pairs, with ints ``<= limit``."""
    form = draw(st.sampled_from((*strings, "int", "per dim", "pairs")))
    pad = st.integers(0, limit)
    if form == "int":
        return draw(pad)
    if form == "per dim":
        return draw(st.tuples(*[pad] * rank))
    if form == "pairs":
        return draw(st.tuples(*[st.tuples(pad, pad)] * rank))
    return form


def _smallest_size(fits: Callable[[int], bool], largest: int) -> int | None:
    """The smallest input size in ``1..largest`` that ``fits`` (by cnnjax.shapes' rules), or ``None``."""
    return next((n for n in range(1, largest + 1) if fits(n)), None)


def _raises_nothing(fn: Callable, *args) -> bool:
    try:
        fn(*args)
    except ValueError:
        return False
    return True


def _draw_batch(draw, st):
    """A batch size, ``0`` (empty) or ``None`` (unbatched: no batch axis)."""
    return draw(st.sampled_from((1, 2, 0, None)))


def _array_shape(layout: str, batch, sizes, channels: int) -> tuple[int, ...]:
    body = (*sizes, channels) if _NAMED_LAYOUTS[layout][0] else (channels, *sizes)
    return body if batch is None else (batch, *body)


def _kernel_shape(layout: str, window, c_in: int, c_out: int) -> tuple[int, ...]:
    return (*window, c_in, c_out) if _NAMED_LAYOUTS[layout][0] else (c_out, c_in, *window)


def conv_geometries(rank=None, layout=None, depthwise=None, transposed=False):
    """A hypothesis strategy of valid conv calls: :class:`Geometry` values with ``shapes == (x, kernel)``.

    ``rank``: the spatial rank (1, 2 or 3; ``None``: any, 3-D drawn least often); ``layout``: one
    layout name (``"NHWC"``, ``"NCW"``, ...; ``None``: channels-last and channels-first alike; a
    name fixes the rank). ``depthwise``: ``True`` draws only depthwise calls (``depthwise_conv``,
    or with ``transposed`` a ``conv_transpose`` with ``feature_group_count = C_in``), ``False``
    only others, ``None`` both. ``transposed``: ``conv_transpose`` calls (with ``output_padding``)
    instead of forward ones. Kernels follow the layout (HWIO channels-last, OIHW channels-first;
    a transposed call's is the forward conv's). Raises ``ImportError`` without hypothesis.

    >>> from hypothesis import given
    >>> @given(conv_geometries(rank=2, layout="NCHW"))
    ... def test(geometry):
    ...     assert geometry.op == "conv" or geometry.op == "depthwise_conv"
    ...     assert len(geometry.shapes[1]) == 4 and geometry.kwargs["layout"] == "NCHW"
    >>> test()
    """
    caller = "conv_geometries"
    st = _hypothesis(caller)
    ranks, layouts = _layout_and_rank(caller, rank, layout)
    if depthwise is not None and not isinstance(depthwise, bool):
        raise TypeError(f"{caller}: depthwise={depthwise!r} must be a bool or None")
    if not isinstance(transposed, bool):
        raise TypeError(f"{caller}: transposed={transposed!r} must be a bool")

    @st.composite
    def geometries(draw):
        rank, name = _draw_layout(draw, st, ranks, layouts)
        largest = 4 if rank == 3 else 9
        window = draw(st.tuples(*[st.integers(1, 4 if rank < 3 else 3)] * rank))
        strides = draw(st.tuples(*[st.integers(1, 4)] * rank))  # 3 and 4 exceed small windows
        dilation = draw(st.tuples(*[st.sampled_from((1, 2, 1))] * rank))
        padding = _draw_padding(draw, st, rank, 2, ("VALID", "SAME", "SAME_LOWER", "FULL"))
        is_depthwise = draw(st.booleans()) if depthwise is None else depthwise
        kwargs = {"strides": strides, "padding": padding, "kernel_dilation": dilation}
        if transposed:
            output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(strides, dilation, strict=True))
            kwargs["output_padding"] = output_padding

            def fits(n, dim):
                pad = padding if isinstance(padding, str | int) else padding[dim]
                k, s, d, extra = window[dim], strides[dim], dilation[dim], output_padding[dim]
                return _raises_nothing(conv_transpose_output_size, n, k, s, pad, extra, d)
        else:

            def fits(n, dim):
                pad = padding if isinstance(padding, str | int) else padding[dim]
                return _raises_nothing(conv_output_size, n, window[dim], strides[dim], pad, dilation[dim])

        smallest = [_smallest_size(functools.partial(fits, dim=dim), largest) for dim in range(rank)]
        if None in smallest:  # a padding that crops every input this small: draw again
            return draw(geometries())
        sizes = tuple(draw(st.integers(n, min(n + 3, largest))) for n in smallest)
        batch = _draw_batch(draw, st)
        if is_depthwise:
            channels, multiplier = draw(st.integers(1, 3)), draw(st.integers(1, 2))
            x = _array_shape(name, batch, sizes, channels)
            if transposed:  # the forward conv's kernel: C_in * multiplier -> C_in, in C_in groups
                kwargs["feature_group_count"] = channels
                kernel = _kernel_shape(name, window, multiplier, channels)
                return Geometry("conv_transpose", (x, kernel), {**kwargs, "layout": name})
            return Geometry(
                "depthwise_conv", (x, _kernel_shape(name, window, 1, channels * multiplier)), {**kwargs, "layout": name}
            )
        groups = draw(st.sampled_from((1, 2, 1, 3)))
        c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
        kwargs["feature_group_count"] = groups
        x = _array_shape(name, batch, sizes, c_in)
        if transposed:  # the forward conv's kernel maps c_out channels to c_in
            return Geometry(
                "conv_transpose", (x, _kernel_shape(name, window, c_out // groups, c_in)), {**kwargs, "layout": name}
            )
        return Geometry("conv", (x, _kernel_shape(name, window, c_in // groups, c_out)), {**kwargs, "layout": name})

    return geometries()


def pool_geometries(kind="max", *, rank=None, layout=None):
    """A hypothesis strategy of valid pooling calls: :class:`Geometry` values with ``shapes == (x,)``.

    ``kind``: ``"max"``, ``"min"``, ``"sum"``, ``"avg"`` or ``"lp"`` (:data:`POOL_KINDS`); ``rank``
    and ``layout`` as in :func:`conv_geometries`. Each call has ``window_shape``, ``strides`` (at
    times larger than the window, or ``None``: the window), ``padding`` (``"VALID"``, ``"SAME"``,
    or pads of at most half the dilated window, PyTorch's limit) and ``ceil_mode``; max, min and
    sum pools add ``window_dilation``, ``"avg"`` adds ``count_include_pad`` and at times
    ``divisor_override``, ``"lp"`` adds ``p`` in ``(1, 2, 3)``. Every output size is >= 1 and
    every window holds an input element (what the pools require). Raises ``ImportError`` without
    hypothesis.

    >>> from hypothesis import given
    >>> @given(pool_geometries("avg", rank=1))
    ... def test(geometry):
    ...     assert geometry.op == "avg_pool" and len(geometry.kwargs["window_shape"]) == 1
    >>> test()
    """
    caller = "pool_geometries"
    if kind not in POOL_KINDS:
        raise ValueError(f"{caller}: kind={kind!r} is not one of {tuple(POOL_KINDS)}")
    st = _hypothesis(caller)
    ranks, layouts = _layout_and_rank(caller, rank, layout)

    @st.composite
    def geometries(draw):
        rank, name = _draw_layout(draw, st, ranks, layouts)
        largest = 4 if rank == 3 else 9
        window = draw(st.tuples(*[st.integers(1, 3)] * rank))
        strides = draw(st.one_of(st.none(), st.tuples(*[st.integers(1, 4)] * rank)))
        dilation = (
            draw(st.tuples(*[st.sampled_from((1, 2, 1))] * rank)) if kind in ("max", "min", "sum") else (1,) * rank
        )
        half = min((d * (w - 1)) // 2 for w, d in zip(window, dilation, strict=True))
        padding = _draw_padding(draw, st, rank, half, ("VALID", "SAME"))
        ceil_mode = draw(st.booleans())
        steps = window if strides is None else strides

        def fits(n, dim):
            k, s, d = window[dim], steps[dim], dilation[dim]
            pad = padding if isinstance(padding, int) else padding if isinstance(padding, str) else padding[dim]
            if not _raises_nothing(pool_output_size, n, k, s, pad, d, ceil_mode):
                return False
            lo, _ = resolve_padding(pad, n, k, s, d)
            return _first_empty_window(n, k, s, d, lo, pool_output_size(n, k, s, pad, d, ceil_mode)) is None

        smallest = [_smallest_size(functools.partial(fits, dim=dim), largest) for dim in range(rank)]
        if None in smallest:
            return draw(geometries())
        sizes = []
        for dim, n in enumerate(
            smallest
        ):  # sizes between that fail (a dilated window skipping the input): the smallest
            size = draw(st.integers(n, min(n + 3, largest)))
            sizes.append(size if fits(size, dim) else n)
        x = _array_shape(name, _draw_batch(draw, st), sizes, draw(st.integers(1, 2)))
        kwargs = {"window_shape": window, "strides": strides, "padding": padding, "ceil_mode": ceil_mode}
        if kind in ("max", "min", "sum"):
            kwargs["window_dilation"] = dilation
        if kind == "avg":
            kwargs["count_include_pad"] = draw(st.booleans())
            kwargs["divisor_override"] = draw(st.sampled_from((None, None, 3)))
        if kind == "lp":
            kwargs = {"p": draw(st.sampled_from((2, 1, 3))), **kwargs}
        return Geometry(f"{kind}_pool", (x,), {**kwargs, "layout": name})

    return geometries()


def arrays_for(geometry: Geometry, dtype=jnp.float32, *, seed: int = 0) -> tuple[jax.Array, ...]:
    """Arrays of ``geometry.shapes`` in ``dtype``, deterministic in ``seed``.

    Floats are standard normal, except: max and min pool inputs are distinct values
    ``0.05`` apart (no ties, so finite differences and arg-maxes are well defined), and LP pool
    inputs lie in ``[0.5, 1.5]`` (``x**p`` of a negative window sum is NaN for odd ``p``, as in
    PyTorch). Integer dtypes get integers in ``[-4, 4]``.

    >>> g = Geometry("conv", ((2, 5, 5, 3), (3, 3, 3, 4)), {"layout": "NHWC"})
    >>> [a.shape for a in arrays_for(g, jnp.float32)]
    [(2, 5, 5, 3), (3, 3, 3, 4)]
    """
    if not isinstance(geometry, Geometry):
        raise TypeError(f"arrays_for: geometry must be a cnnjax.testing.Geometry, got {type(geometry).__name__}")
    rng = np.random.default_rng(seed)
    arrays = []
    for shape in geometry.shapes:
        size = int(np.prod(shape))
        if jnp.issubdtype(dtype, jnp.integer):
            values = rng.integers(-4, 5, shape)
        elif geometry.op in ("max_pool", "min_pool"):
            values = (rng.permutation(size).reshape(shape) - size / 2) * _MAX_POOL_SPACING
        elif geometry.op == "lp_pool":
            values = rng.uniform(0.5, 1.5, shape)
        else:
            values = rng.normal(size=shape)
        arrays.append(jnp.asarray(values, dtype))
    return tuple(arrays)


def _derivatives(f: Callable, args, mode: str, order: int, seed: int) -> list:
    """``f(*args)`` and its directional derivatives up to ``order``: forward mode, ``d^k f . t``
    (the same random tangents ``t``); reverse mode, the VJP of a random cotangent, then the VJP of
    that with the tangents as cotangent (reverse over reverse)."""
    rng = np.random.default_rng(seed)
    random_like = lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype)
    tangents = tuple(random_like(a) for a in args)
    cotangent = jax.tree.map(random_like, jax.eval_shape(f, *args))
    tower, g = [f], f
    for k in range(order):
        if mode == "fwd":
            g = functools.partial(lambda g, *a: jax.jvp(g, a, tangents)[1], g)
        else:
            g = functools.partial(lambda g, ct, *a: jax.vjp(g, *a)[1](ct), g, cotangent if k == 0 else tangents)
        tower.append(g)
    return jax.jit(lambda *a: [h(*a) for h in tower])(*args)


def _assert_close(actual, expected, rtol: float) -> None:
    """``actual`` equals ``expected`` within ``rtol`` times the larger of 1 and ``expected``'s largest magnitude."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        e = np.asarray(e, np.float64)
        atol = rtol * max(1.0, float(np.max(np.abs(e), initial=0.0)))
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol)


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "Mismatch" in line or "Max absolute" in line), lines[0] if lines else "")


def check_op(fn, *args, reference=None, modes=("fwd", "rev"), order: int = 2, dtypes=None, seed: int = 0) -> None:
    """Check ``fn`` against finite differences and, given a ``reference``, against that: values and derivatives.

    ``args``: the arrays to call ``fn`` with, or one :class:`Geometry` (from a strategy), for
    which ``fn(*arrays_for(geometry, dtype), **geometry.kwargs)`` is checked. Derivatives are
    taken with respect to every floating argument (others are held fixed); ``fn`` returns a float
    array or a pytree of them.

    - Finite differences: ``jax.test_util.check_grads(fn, args, order, modes)`` with
      :data:`TOLERANCES`' step and tolerance for the dtype (float32 and float64 only: a
      finite difference in float16 or bfloat16 measures rounding).
    - ``reference``: an ``impl`` name (``"lax"``, ``"closed_form"``, ``"auto"``) or a function.
      A name means cnnjax's own op with that ``impl`` for a geometry, else ``fn(..., impl=name)``.
      Its values and its derivatives in each mode up to ``order`` (forward: ``d^k f . t`` for
      random tangents; reverse: VJPs of random cotangents, reverse over reverse) must equal
      ``fn``'s within the dtype's ``rtol``, scaled by the reference's largest magnitude. In float16
      and bfloat16 without a reference, ``fn`` on the float32 arguments is the reference.
    - ``dtypes``: the dtypes to check in, each in turn (the floating arguments cast to each);
      ``None``: the arguments' own, or float32 for a geometry.

    A failure raises ``AssertionError`` whose message is one line naming the check, the dtype
    and the geometry (or the argument shapes), e.g. ``check_op: my_conv: reverse-mode order 2
    differs from the reference in float32 at conv(x: (2, 5, 5, 3), ...): Max absolute
    difference ...``; the full report is its ``__cause__``. ``ValueError``/``TypeError`` for bad
    ``modes``, ``order``, ``reference`` or ``dtypes``.

    >>> import cnnjax
    >>> x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4)) / 9
    >>> check_op(lambda x, w, impl="auto": cnnjax.conv(x, w, padding=1, impl=impl), x, w, reference="lax")
    >>> check_op(lambda x: x**2, jnp.array([1.0, 2.0]), reference=lambda x: 2 * x)
    Traceback (most recent call last):
    ...
    AssertionError: check_op: <lambda>: values differ from the reference in float32 at args of shapes ((2,),): ...
    """
    op = "check_op"
    if not callable(fn):
        raise TypeError(f"{op}: fn must be callable, got {type(fn).__name__}")
    if isinstance(modes, str) or not modes or not set(modes) <= {"fwd", "rev"}:
        raise ValueError(f"{op}: modes={modes!r} must be a non-empty sequence of 'fwd' and 'rev'")
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"{op}: order={order!r} must be an int >= 0")
    if isinstance(reference, str) and reference not in IMPLS:
        raise ValueError(f"{op}: reference={reference!r} is not an impl name {IMPLS}, a function or None")
    if reference is not None and not isinstance(reference, str) and not callable(reference):
        raise TypeError(f"{op}: reference must be an impl name, a function or None, got {type(reference).__name__}")
    geometry = args[0] if len(args) == 1 and isinstance(args[0], Geometry) else None
    if geometry is None and not args:
        raise TypeError(f"{op}: no arguments to call fn with (give arrays or one Geometry)")
    if dtypes is None:
        dtypes = (jnp.float32,) if geometry is not None else (None,)
    elif any(jnp.dtype(d).name not in TOLERANCES for d in dtypes):
        raise ValueError(f"{op}: dtypes={dtypes!r} must be floating dtypes among {tuple(TOLERANCES)}")
    name = getattr(fn, "__name__", type(fn).__name__)
    where = str(geometry) if geometry is not None else f"args of shapes {tuple(jnp.shape(a) for a in args)}"

    if geometry is not None:
        kwargs = geometry.kwargs
        ref = geometry.function if isinstance(reference, str) else reference
    else:
        kwargs = {}
        ref = fn if isinstance(reference, str) else reference
    ref_kwargs = {**kwargs, "impl": reference} if isinstance(reference, str) else kwargs
    for dtype in dtypes:
        if geometry is not None:
            values = arrays_for(geometry, dtype, seed=seed)
        else:
            values = tuple(_cast(jnp.asarray(a), dtype) for a in args)
        floating = [i for i, a in enumerate(values) if jnp.issubdtype(a.dtype, jnp.floating)]
        dtype_name = values[floating[0]].dtype.name if floating else values[0].dtype.name
        rtol, finite_differences = TOLERANCES.get(dtype_name, TOLERANCES["float32"])
        order_here = order if floating else 0
        f, primals = _of_floats(fn, kwargs, values, floating), tuple(values[i] for i in floating)
        label = f"{op}: {name}: {{}} in {dtype_name} at {where}: {{}}"
        if finite_differences is not None and order_here:
            eps, tol = finite_differences
            try:
                check_grads(jax.jit(f), primals, order, tuple(modes), atol=tol, rtol=tol, eps=eps)
            except AssertionError as err:
                check = f"{'/'.join(modes)}-mode derivatives up to order {order} differ from finite differences"
                raise AssertionError(label.format(check, _first_line(err))) from err
        if ref is not None:
            g, ref_primals = _of_floats(ref, ref_kwargs, values, floating), primals
        elif finite_differences is None:  # half precision: fn on float32 arguments, cast back
            upcast = [_cast(a, jnp.float32) for a in values]
            g = _of_floats(_cast_result(fn, dtype_name), kwargs, upcast, floating)
            ref_primals = tuple(upcast[i] for i in floating)
        else:
            continue
        for mode in modes:
            ours = _derivatives(f, primals, mode, order_here, seed)
            theirs = _derivatives(g, ref_primals, mode, order_here, seed)
            for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                try:
                    _assert_close(a, b, rtol)
                except AssertionError as err:
                    what = (
                        "values differ"
                        if k == 0
                        else f"{'forward' if mode == 'fwd' else 'reverse'}-mode order {k} differs"
                    )
                    raise AssertionError(label.format(f"{what} from the reference", _first_line(err))) from err


def _cast(a, dtype):
    """``a`` in ``dtype`` if it is floating and ``dtype`` is given; else ``a``."""
    return a.astype(dtype) if dtype is not None and jnp.issubdtype(a.dtype, jnp.floating) else a


def _cast_result(fn: Callable, dtype_name: str) -> Callable:
    return lambda *a, **kw: jax.tree.map(lambda y: y.astype(dtype_name), fn(*a, **kw))


def _of_floats(fn: Callable, kwargs: dict, values, floating) -> Callable:
    """``fn(*values, **kwargs)`` as a function of the floating values (indices ``floating``) alone."""

    def of_floats(*floats):
        full = list(values)
        for i, a in zip(floating, floats, strict=True):
            full[i] = a
        return fn(*full, **kwargs)

    return of_floats
