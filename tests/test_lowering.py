"""Off CPU, cnnjax's primitives compile to lax's own programs.

Every conv and pooling op under ``impl="auto"`` and ``"closed_form"`` is lowered with
``jax.export`` for ``"cuda"``, ``"rocm"`` and ``"tpu"`` (no device needed), forward and forward +
backward, and its heavy StableHLO ops (convolutions with all their attributes, window reductions,
``select_and_scatter``, scatters, gathers, pads, reverses, transposes, with their operand and
result types) must equal those of the same computation written with plain ``lax`` and
differentiated by JAX. Elementwise work (bias adds, the average's division, casts) is not compared.
The CPU lowerings are the measured schedules (``tests/test_cpu.py``, ``tests/test_hlo.py``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _bench import vjp_fn
from jax import lax

import cnnjax

PLATFORMS = ("cuda", "rocm", "tpu")
HEAVY = ("convolution", "reduce_window", "select_and_scatter", "scatter", "gather", "pad", "reverse", "transpose")
_OP = re.compile(r'(?:"stablehlo\.(\w+)"|stablehlo\.(\w+))')
_SSA = re.compile(r"%[\w#.]+")

NHWC, NCHW = ("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW")
NWC, NDHWC = ("NWC", "WIO", "NWC"), ("NDHWC", "DHWIO", "NDHWC")


def heavy_ops(fn: Callable, args, platform: str) -> collections.Counter:
    """The heavy ops of ``fn``'s StableHLO for ``platform``: each op's line without SSA names and
    locations (its attributes and types), counted. A ``reverse`` of a ``reverse`` along the same
    dims (lax's transpose of a transposed conv reverses the reversed kernel back) is the
    identity, as XLA's simplifier makes it: the outer one is not counted; nor is a pad by nothing."""
    text = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
    found, reverses = collections.Counter(), {}
    for line in text.splitlines():
        if "func.func" in line:  # SSA names restart in every function
            reverses = {}
        match = _OP.search(line)
        if not (match and (match.group(1) or match.group(2)) in HEAVY and "=" in line.split("stablehlo.")[0]):
            continue
        result, op = (part.strip() for part in line.split("=", 1))
        op = re.sub(r"\s*loc\(.*?\)\s*$", "", op)
        reversed_operand = re.match(r"stablehlo\.reverse (%[\w#.]+), dims = (\[.*?\])", op)
        if reversed_operand:
            reverses[result] = (reversed_operand.group(1), reversed_operand.group(2))
            inner = reverses.get(reversed_operand.group(1))
            if inner and inner[1] == reversed_operand.group(2):
                continue
        if re.match(
            r"stablehlo\.pad %[\w#.]+, %[\w#.]+, low = \[[0, ]*\], high = \[[0, ]*\], interior = \[[0, ]*\]", op
        ):
            continue  # a pad by nothing (lax's window-sum transpose at stride 1 and no padding)
        found[_SSA.sub("%", op)] += 1
    return +found


@dataclasses.dataclass(frozen=True)
class Case:
    """A cnnjax call (taking ``impl=``) and the plain-lax call that computes the same thing."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    cnnjax_fn: Callable
    lax_fn: Callable
    # ops (by name) that lax's program may hold beyond cnnjax's: identities lax builds and XLA folds
    lax_identities: tuple[str, ...] = ()

    def arrays(self):
        rng = np.random.default_rng(0)
        return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in self.shapes]


def _conv(dn, strides=1, padding="VALID", rhs_dilation=None, groups=1, lhs_dilation=None):
    def fn(x, k):
        rank = x.ndim - 2
        pads = padding if isinstance(padding, str) else ((padding, padding),) * rank
        return lax.conv_general_dilated(
            x,
            k,
            (strides,) * rank if isinstance(strides, int) else strides,
            pads,
            lhs_dilation=None if lhs_dilation is None else (lhs_dilation,) * rank,
            rhs_dilation=None if rhs_dilation is None else (rhs_dilation,) * rank,
            dimension_numbers=dn,
            feature_group_count=groups,
        )

    return fn


def _lax_transpose(dn, input_shape, **conv):
    """The adjoint of a lax conv with respect to its input (what ``conv_transpose`` is)."""

    def fn(x, k):
        zeros = jnp.zeros(input_shape, x.dtype)
        return jax.vjp(lambda u: _conv(dn, **conv)(u, k), zeros)[1](x)[0]

    return fn


def _window(x, layout, sizes, fill=1):
    spatial = [i for i, c in enumerate(layout) if c not in "NC"]
    full = [fill] * x.ndim
    for axis, size in zip(spatial, sizes, strict=True):
        full[axis] = size
    return tuple(full)


def _lax_max(layout, window, strides, pads, select="max"):
    def fn(x):
        padding = _window(x, layout, pads, (0, 0))
        init, op = (-jnp.inf, lax.max) if select == "max" else (jnp.inf, lax.min)
        return lax.reduce_window(x, init, op, _window(x, layout, window), _window(x, layout, strides), padding)

    return fn


def _lax_mean(layout, window, strides, pads, divisor=None):
    def fn(x):
        padding = _window(x, layout, pads, (0, 0))
        total = lax.reduce_window(x, 0.0, lax.add, _window(x, layout, window), _window(x, layout, strides), padding)
        return total / (float(np.prod(window)) if divisor is None else divisor)

    return fn


CONV = [
    Case(
        "conv NHWC 3x3 SAME + bias",
        ((2, 7, 7, 3), (3, 3, 3, 4), (4,)),
        lambda x, k, b, impl: cnnjax.conv(x, k, b, padding="SAME", impl=impl),
        lambda x, k, b: _conv(NHWC, padding="SAME")(x, k) + b.reshape(1, 1, 1, -1),
    ),
    Case(
        "conv NCHW 5x5/2 pad 2 dilation 2",
        ((2, 3, 12, 12), (4, 3, 5, 5)),
        lambda x, k, impl: cnnjax.conv(x, k, strides=2, padding=2, kernel_dilation=2, layout="NCHW", impl=impl),
        _conv(NCHW, 2, 2, 2),
    ),
    Case(
        "conv NCHW 3x3/2 pad 1 input dilation 2",
        ((2, 3, 6, 6), (4, 3, 3, 3)),
        lambda x, k, impl: cnnjax.conv(x, k, strides=2, padding=1, input_dilation=2, layout="NCHW", impl=impl),
        _conv(NCHW, 2, 1, lhs_dilation=2),
    ),
    Case(
        "conv NWC k3/3 VALID",
        ((2, 11, 3), (3, 3, 5)),
        lambda x, k, impl: cnnjax.conv(x, k, strides=3, impl=impl),
        _conv(NWC, 3),
    ),
    Case(
        "conv NDHWC 3x3x3 strides (1, 2, 2) pad 1",
        ((1, 5, 6, 6, 2), (3, 3, 3, 2, 3)),
        lambda x, k, impl: cnnjax.conv(x, k, strides=(1, 2, 2), padding=1, impl=impl),
        _conv(NDHWC, (1, 2, 2), 1),
    ),
    Case(
        "conv NCHW groups 2 stride 2 pad 1",
        ((2, 4, 7, 7), (6, 2, 3, 3)),
        lambda x, k, impl: cnnjax.conv(x, k, strides=2, padding=1, feature_group_count=2, layout="NCHW", impl=impl),
        _conv(NCHW, 2, 1, groups=2),
    ),
    Case(
        "depthwise NHWC 3x3 pad 1 multiplier 2",
        ((2, 6, 6, 4), (3, 3, 1, 8)),
        lambda x, k, impl: cnnjax.depthwise_conv(x, k, padding=1, impl=impl),
        _conv(NHWC, 1, 1, groups=4),
    ),
    Case(
        "separable NHWC 3x3/2 SAME",
        ((2, 8, 8, 4), (3, 3, 1, 4), (1, 1, 4, 6)),
        lambda x, d, p, impl: cnnjax.separable_conv(x, d, p, strides=2, padding="SAME", impl=impl),
        lambda x, d, p: _conv(NHWC)(_conv(NHWC, 2, "SAME", groups=4)(x, d), p),
    ),
    Case(
        "conv_transpose NHWC 4x4/2 pad 1",
        ((2, 5, 5, 6), (4, 4, 3, 6)),
        lambda x, k, impl: cnnjax.conv_transpose(x, k, strides=2, padding=1, impl=impl),
        _lax_transpose(NHWC, (2, 10, 10, 3), strides=2, padding=1),
    ),
    Case(
        "conv_transpose NCHW 3x3/2 groups 2",
        ((2, 4, 4, 4), (4, 3, 3, 3)),
        lambda x, k, impl: cnnjax.conv_transpose(x, k, strides=2, feature_group_count=2, layout="NCHW", impl=impl),
        _lax_transpose(NCHW, (2, 6, 9, 9), strides=2, groups=2),
        # lax's input gradient regroups and reverses its regrouped, reversed kernel back (an
        # identity); cnnjax's runs the same convolution on the kernel as it is
        lax_identities=("transpose", "reverse"),
    ),
]

POOL = [
    Case(
        "max_pool NHWC 2x2",
        ((2, 8, 8, 3),),
        lambda x, impl: cnnjax.max_pool(x, 2, impl=impl),
        _lax_max("NHWC", (2, 2), (2, 2), ((0, 0),) * 2),
    ),
    Case(
        "max_pool NHWC 3x3/2 pad 1",
        ((2, 9, 9, 3),),
        lambda x, impl: cnnjax.max_pool(x, 3, 2, 1, impl=impl),
        _lax_max("NHWC", (3, 3), (2, 2), ((1, 1),) * 2),
    ),
    Case(
        "max_pool NCHW 3x3/2 pad 1 ceil_mode",
        ((2, 3, 8, 8),),
        lambda x, impl: cnnjax.max_pool(x, 3, 2, 1, ceil_mode=True, layout="NCHW", impl=impl),
        _lax_max("NCHW", (3, 3), (2, 2), ((1, 2),) * 2),
    ),
    Case(
        "max_pool NWC 3/1 SAME",
        ((2, 9, 3),),
        lambda x, impl: cnnjax.max_pool(x, 3, 1, "SAME", impl=impl),
        _lax_max("NWC", (3,), (1,), ((1, 1),)),
    ),
    Case(
        "min_pool NDHWC 2x2x2",
        ((1, 4, 4, 4, 2),),
        lambda x, impl: cnnjax.min_pool(x, 2, impl=impl),
        _lax_max("NDHWC", (2, 2, 2), (2, 2, 2), ((0, 0),) * 3, "min"),
    ),
    Case(
        "avg_pool NHWC 2x2",
        ((2, 8, 8, 3),),
        lambda x, impl: cnnjax.avg_pool(x, 2, impl=impl),
        _lax_mean("NHWC", (2, 2), (2, 2), ((0, 0),) * 2),
    ),
    Case(
        "avg_pool NCHW 3x3/2 pad 1",
        ((2, 3, 7, 7),),
        lambda x, impl: cnnjax.avg_pool(x, 3, 2, 1, layout="NCHW", impl=impl),
        _lax_mean("NCHW", (3, 3), (2, 2), ((1, 1),) * 2),
    ),
    Case(
        "avg_pool NHWC 3x3/2 pad 1 ceil_mode, count_include_pad=False",
        ((2, 8, 8, 3),),
        lambda x, impl: cnnjax.avg_pool(x, 3, 2, 1, ceil_mode=True, count_include_pad=False, impl=impl),
        _lax_mean(
            "NHWC",
            (3, 3),
            (2, 2),
            ((1, 2),) * 2,
            divisor=np.multiply.outer([2.0, 3, 3, 3, 1], [2.0, 3, 3, 3, 1])[None, :, :, None],
        ),
    ),
    Case(
        "avg_pool NWC 3/1 SAME",
        ((2, 9, 3),),
        lambda x, impl: cnnjax.avg_pool(x, 3, 1, "SAME", impl=impl),
        _lax_mean("NWC", (3,), (1,), ((1, 1),)),
    ),
]


def _cases():
    for case in CONV + POOL:
        for impl in ("auto", "closed_form"):
            yield pytest.param(case, impl, id=f"{case.name}, {impl}")


def _inputs(case: Case, kind: str):
    args = case.arrays()
    if kind == "forward":
        return args
    return args, jnp.ones(jax.eval_shape(case.lax_fn, *args).shape, jnp.float32)


def _with_vjp(fn: Callable, kind: str) -> Callable:
    return fn if kind == "forward" else vjp_fn(fn)


@functools.cache
def _lax_heavy_ops(case: Case, platform: str, kind: str) -> collections.Counter:
    """lax's program, lowered once for both impls' cases."""
    return heavy_ops(_with_vjp(case.lax_fn, kind), _inputs(case, kind), platform)


@pytest.mark.parametrize(("case", "impl"), _cases())
def test_off_cpu_programs_are_lax_programs(case, impl):
    args = case.arrays()
    ours = functools.partial(case.cnnjax_fn, impl=impl)
    np.testing.assert_allclose(ours(*args), case.lax_fn(*args), rtol=1e-5, atol=1e-5)
    for platform in PLATFORMS:
        for kind in ("forward", "forward + backward"):
            got = heavy_ops(_with_vjp(ours, kind), _inputs(case, kind), platform)
            want = collections.Counter(_lax_heavy_ops(case, platform, kind))
            surplus = want - got
            want -= collections.Counter(
                {
                    op: n
                    for op, n in surplus.items()
                    if op.split()[0].strip('"')[len("stablehlo.") :] in case.lax_identities
                }
            )
            assert got == want, f"{platform} {kind}: only cnnjax {got - want}, only lax {want - got}"
