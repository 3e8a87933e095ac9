"""Tests for ``cnnjax.testing``: the strategies draw only valid calls, with their edge cases, and
``check_op`` passes cnnjax's ops (dogfood: every conv and pool op, against finite differences and
``impl="lax"``) and fails a wrong function with a one-line report."""

from __future__ import annotations

import functools
import sys

import budget
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnjax import conv, max_pool, shapes
from cnnjax.testing import POOL_KINDS, Geometry, arrays_for, check_op, conv_geometries, pool_geometries

ALL_GEOMETRIES = st.one_of(
    conv_geometries(),
    conv_geometries(transposed=True),
    conv_geometries(depthwise=True, transposed=True),
    *[pool_geometries(kind) for kind in POOL_KINDS],
)


def _spatial(geometry: Geometry, shape):
    channels_last = geometry.kwargs["layout"].endswith("C")
    rank = len(geometry.kwargs["layout"]) - 2
    return tuple(shape[-rank - 1 : -1] if channels_last else shape[-rank:])


def _expected_sizes(geometry: Geometry) -> tuple[int, ...]:
    """Output sizes by cnnjax.shapes' formulas, per spatial dim."""
    kw, sizes = geometry.kwargs, _spatial(geometry, geometry.shapes[0])
    rank = len(sizes)
    per_dim = lambda p, i: p if isinstance(p, str | int) else p[i]
    if geometry.op.endswith("_pool"):
        window, strides = kw["window_shape"], kw["strides"] or kw["window_shape"]
        dilation = kw.get("window_dilation", (1,) * rank)
        return tuple(
            shapes.pool_output_size(n, window[i], strides[i], per_dim(kw["padding"], i), dilation[i], kw["ceil_mode"])
            for i, n in enumerate(sizes)
        )
    layout = kw["layout"]
    window = geometry.shapes[1][:rank] if layout.endswith("C") else geometry.shapes[1][2:]
    if geometry.op == "conv_transpose":
        return tuple(
            shapes.conv_transpose_output_size(
                n,
                window[i],
                kw["strides"][i],
                per_dim(kw["padding"], i),
                kw["output_padding"][i],
                kw["kernel_dilation"][i],
            )
            for i, n in enumerate(sizes)
        )
    return tuple(
        shapes.conv_output_size(n, window[i], kw["strides"][i], per_dim(kw["padding"], i), kw["kernel_dilation"][i])
        for i, n in enumerate(sizes)
    )


@settings(max_examples=budget.examples(150))
@given(ALL_GEOMETRIES)
def test_every_drawn_call_is_valid_and_has_the_shapes_modules_output_size(geometry):
    out = jax.eval_shape(lambda *a: geometry.function(*a, **geometry.kwargs), *arrays_for(geometry))
    assert _spatial(geometry, out.shape) == _expected_sizes(geometry)
    assert len(out.shape) == len(geometry.shapes[0])  # unbatched stays unbatched


def test_edge_cases_are_drawn():
    seen = set()

    @settings(max_examples=300, database=None)  # a property of the strategies: not scaled
    @given(ALL_GEOMETRIES)
    def collect(g):
        kw, x = g.kwargs, g.shapes[0]
        rank = len(kw["layout"]) - 2
        seen.add(("op", g.op))
        seen.add(("rank", rank))
        seen.add(("layout", kw["layout"][1] == "C"))
        seen.add(("batch", "unbatched" if len(x) == rank + 1 else min(x[0], 1)))
        if isinstance(kw["padding"], str):
            seen.add(("padding", kw["padding"]))
        if "conv" in g.op:
            window = g.shapes[1][:rank] if kw["layout"].endswith("C") else g.shapes[1][2:]
            seen.add(("stride > window", any(s > k for s, k in zip(kw["strides"], window, strict=True))))
            seen.add(
                ("even kernel with SAME", any(k % 2 == 0 for k in window) and str(kw["padding"]).startswith("SAME"))
            )
            seen.add(("dilation", max(kw["kernel_dilation"]) > 1))
            seen.add(("groups", kw.get("feature_group_count", 1) > 1))
        if kw.get("ceil_mode"):
            no_ceil = _expected_sizes(Geometry(g.op, g.shapes, {**kw, "ceil_mode": False}))
            seen.add(("ceil_mode hangs", no_ceil != _expected_sizes(g)))

    collect()
    wanted = {("op", f"{kind}_pool") for kind in POOL_KINDS} | {
        ("op", "conv"),
        ("op", "depthwise_conv"),
        ("op", "conv_transpose"),
        *[("rank", r) for r in (1, 2, 3)],
        ("layout", True),
        ("layout", False),
        *[("batch", b) for b in (0, 1, "unbatched")],
        *[("padding", p) for p in ("VALID", "SAME", "SAME_LOWER", "FULL")],
        *[
            (case, True)
            for case in ("stride > window", "even kernel with SAME", "dilation", "groups", "ceil_mode hangs")
        ],
    }
    assert wanted <= seen, wanted - seen


@pytest.mark.parametrize(
    ("strategy", "op"),
    [
        (conv_geometries(rank=1, depthwise=False), "conv"),
        (conv_geometries(layout="NCHW", depthwise=True), "depthwise_conv"),
        (conv_geometries(rank=2, transposed=True), "conv_transpose"),
        (pool_geometries("lp", layout="NWC"), "lp_pool"),
    ],
)
def test_arguments_restrict_what_is_drawn(strategy, op):
    @settings(max_examples=budget.examples(10), database=None)
    @given(strategy)
    def check(g):
        assert g.op == op
        assert len(g.shapes[0]) - 1 in (len(g.kwargs["layout"]) - 2, len(g.kwargs["layout"]) - 1)

    check()


# Dogfood: every op, from the strategies, against finite differences and impl="lax" (few, small examples).


@settings(max_examples=budget.examples(4))
@given(st.one_of(conv_geometries(rank=3), conv_geometries(rank=2, depthwise=True, transposed=True)))
def test_check_op_passes_the_conv_ops(geometry):  # 1-D and 2-D: tests/test_transforms.py
    check_op(functools.partial(geometry.function, impl="auto"), geometry, reference="lax")


@settings(max_examples=budget.examples(4))
@given(st.one_of(*[pool_geometries(kind, rank=2) for kind in POOL_KINDS]))
def test_check_op_passes_the_pools(geometry):
    check_op(functools.partial(geometry.function, impl="closed_form"), geometry, reference="lax", order=1)


@settings(max_examples=budget.examples(2))
@given(conv_geometries(rank=2, layout="NHWC"))
def test_check_op_in_half_precision_against_the_reference(geometry):
    check_op(geometry.function, geometry, reference="lax", dtypes=(jnp.bfloat16, jnp.float16), order=1)


def test_check_op_in_float64_with_a_function_reference():
    with jax.enable_x64(True):
        x, w = (
            jnp.asarray(np.random.default_rng(i).normal(size=s)) for i, s in enumerate([(1, 6, 6, 2), (3, 3, 2, 3)])
        )
        check_op(
            lambda x, w: conv(x, w, padding="SAME"), x, w, reference=lambda x, w: conv(x, w, padding=1, impl="lax")
        )


def test_a_wrong_gradient_fails_with_the_geometry_in_one_line():
    @jax.custom_vjp
    def pool(x):
        return max_pool(x, (2, 2), layout="NHWC")

    pool.defvjp(lambda x: (pool(x), x), lambda x, dy: (2 * jnp.ones_like(x),))  # a wrong gradient
    geometry = Geometry("max_pool", ((1, 4, 4, 1),), {"window_shape": (2, 2), "layout": "NHWC"})
    wrong = lambda x, window_shape, layout: pool(x)
    with pytest.raises(AssertionError) as info:
        check_op(wrong, geometry, modes=("rev",), order=1)
    message = str(info.value)
    assert "\n" not in message and str(geometry) in message and "finite differences" in message
    assert message.startswith("check_op: <lambda>: rev-mode derivatives up to order 1")


def test_a_wrong_value_fails_against_the_reference():
    geometry = Geometry("conv", ((2, 5, 5, 3), (3, 3, 3, 4)), {"strides": 2, "layout": "NHWC"})
    with pytest.raises(AssertionError, match=r"values differ from the reference in float32 at conv\(x: \(2, 5, 5, 3\)"):
        check_op(lambda x, w, **kw: 1.01 * conv(x, w, **kw), geometry, reference="lax", order=0)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: conv_geometries(rank=2, layout="NCW"),
            ValueError,
            r"conv_geometries: layout='NCW' is 1-D, but rank=2",
        ),
        (lambda: conv_geometries(rank=4), ValueError, r"conv_geometries: rank=4 must be 1, 2, 3 or None"),
        (lambda: conv_geometries(depthwise="yes"), TypeError, r"conv_geometries: depthwise='yes' must be a bool"),
        (lambda: pool_geometries("median"), ValueError, r"pool_geometries: kind='median' is not one of"),
        (lambda: check_op(jnp.sin, jnp.ones(2), modes=("back",)), ValueError, r"check_op: modes=\('back',\)"),
        (lambda: check_op(jnp.sin, jnp.ones(2), order=-1), ValueError, r"check_op: order=-1 must be an int >= 0"),
        (lambda: check_op(jnp.sin, jnp.ones(2), reference="torch"), ValueError, r"check_op: reference='torch'"),
        (lambda: check_op(jnp.sin, jnp.ones(2), dtypes=(jnp.int32,)), ValueError, r"check_op: dtypes="),
        (lambda: arrays_for({"op": "conv"}, jnp.float32), TypeError, r"arrays_for: geometry must be"),
    ],
)
def test_bad_arguments_name_the_function_argument_and_value(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_importing_needs_no_hypothesis_and_the_strategies_say_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(ImportError, match=r"cnnjax.testing.pool_geometries needs hypothesis"):
        pool_geometries()
    check_op(jnp.sin, jnp.array([0.5, 1.0]), reference=jnp.sin)  # the checks need only JAX
