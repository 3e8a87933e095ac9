"""The wrappers cost nothing: cnnjax's conv, conv_transpose, max_pool and avg_pool compile to the
same optimized HLO as the bare lax call a user would write (names, metadata and schedule aside).

The regression guard of the overhead rows of ``experiments/bench_overhead.py``, without timing;
both compare programs with ``_bench.normalize_hlo``. Each forward is compiled under every
``impl=`` whose forward is meant to be lax's: ``"lax"`` (JAX's autodiff) always, and
``"closed_form"`` (cnnjax's primitives lowered to the notes' formulas) for convs and average
pools; ``"auto"`` (the primitives lowered to the CPU schedules) where the schedule's forward is
lax's too. Some schedules run another forward on purpose, faster on CPU than XLA's: grouped and
depthwise convs (per-tap products, or one dense conv per group), max pools (a fold of strided
slices that also records the arg-max) and transposed convs (the phase-decomposed conv input
gradient); the benchmark times those choices. Forward+backward is compared under ``"lax"``
only, since a closed-form backward is its own program by definition.

The bare equivalent of ``conv_transpose`` is ``lax.conv_transpose(..., transpose_kernel=True)``,
itself the ``lax.conv_general_dilated`` with lhs dilation on the flipped, in/out-swapped kernel
that cnnjax wraps, with PyTorch's padding ``p`` written as lax's ``k - 1 - p`` on the dilated input.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _bench import hlo_diff, normalize_hlo, vjp_fn
from jax import lax

from cnnjax.convolution import conv, conv_transpose
from cnnjax.pooling import avg_pool, max_pool

NHWC, NCHW = ("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW")
NWC, NDHWC = ("NWC", "WIO", "NWC"), ("NDHWC", "DHWIO", "NDHWC")
PAD_1 = ((1, 1), (1, 1))


@dataclasses.dataclass(frozen=True)
class Pair:
    """A cnnjax call and the bare lax call that computes the same thing on ``shapes``.

    ``cnnjax_fn`` takes ``impl=``: one of ``impls``, those whose forward must be lax's program.
    """

    name: str
    shapes: tuple[tuple[int, ...], ...]
    cnnjax_fn: Callable
    lax_fn: Callable
    impls: tuple[str, ...] = ("lax", "closed_form", "auto")

    def arrays(self):
        """Standard normal float32 inputs (NumPy's: nothing to compile)."""
        rng = np.random.default_rng(0)
        return [rng.standard_normal(s, dtype=np.float32) for s in self.shapes]


CONV = [
    Pair(
        "conv NHWC 3x3 SAME + bias",
        ((2, 7, 7, 3), (3, 3, 3, 4), (4,)),
        lambda x, k, b, impl: conv(x, k, b, padding="SAME", impl=impl),
        lambda x, k, b: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC) + b.reshape(1, 1, 1, -1),
    ),
    Pair(
        "conv NCHW 5x5/2 pad 2 dilation 2",
        ((2, 3, 12, 12), (4, 3, 5, 5)),
        lambda x, k, impl: conv(x, k, strides=2, padding=2, kernel_dilation=2, layout="NCHW", impl=impl),
        lambda x, k: lax.conv_general_dilated(
            x, k, (2, 2), ((2, 2), (2, 2)), rhs_dilation=(2, 2), dimension_numbers=NCHW
        ),
    ),
    Pair(
        "conv NWC k3 pad (1, 2) dilation 3 input_dilation 2",
        ((2, 9, 3), (3, 3, 5)),
        lambda x, k, impl: conv(x, k, padding=((1, 2),), kernel_dilation=3, input_dilation=2, impl=impl),
        lambda x, k: lax.conv_general_dilated(x, k, (1,), ((1, 2),), (2,), (3,), dimension_numbers=NWC),
        impls=("lax",),  # the primitives take the zeros inserted explicitly (one lax.pad first)
    ),
    Pair(
        "conv NDHWC 3x3x3 VALID strides (1, 2, 2)",
        ((1, 5, 6, 6, 2), (3, 3, 3, 2, 3)),
        lambda x, k, impl: conv(x, k, strides=(1, 2, 2), impl=impl),
        lambda x, k: lax.conv_general_dilated(x, k, (1, 2, 2), "VALID", dimension_numbers=NDHWC),
    ),
    Pair(
        "conv NCHW groups 2, pad 1",
        ((2, 4, 6, 6), (6, 2, 3, 3)),
        lambda x, k, impl: conv(x, k, padding=1, feature_group_count=2, layout="NCHW", impl=impl),
        lambda x, k: lax.conv_general_dilated(x, k, (1, 1), PAD_1, dimension_numbers=NCHW, feature_group_count=2),
        impls=("lax", "closed_form"),
    ),
    Pair(
        "depthwise conv NHWC 3x3 pad 1",
        ((2, 6, 6, 4), (3, 3, 1, 4)),
        lambda x, k, impl: conv(x, k, padding=1, feature_group_count=4, impl=impl),
        lambda x, k: lax.conv_general_dilated(x, k, (1, 1), PAD_1, dimension_numbers=NHWC, feature_group_count=4),
        impls=("lax", "closed_form"),
    ),
]

CONV_TRANSPOSE = [
    Pair(
        "conv_transpose NHWC 4x4/2 pad 1",
        ((2, 5, 5, 3), (4, 4, 6, 3)),
        lambda x, k, impl: conv_transpose(x, k, strides=2, padding=1, impl=impl),
        lambda x, k: lax.conv_transpose(x, k, (2, 2), ((2, 2), (2, 2)), dimension_numbers=NHWC, transpose_kernel=True),
        impls=("lax", "closed_form"),
    ),
    Pair(
        "conv_transpose NCHW 3x3/2 pad 1 output_padding 1",
        ((2, 3, 5, 5), (3, 4, 3, 3)),
        lambda x, k, impl: conv_transpose(x, k, strides=2, padding=1, output_padding=1, layout="NCHW", impl=impl),
        lambda x, k: lax.conv_transpose(x, k, (2, 2), ((1, 2), (1, 2)), dimension_numbers=NCHW, transpose_kernel=True),
        impls=("lax", "closed_form"),
    ),
    Pair(
        "conv_transpose NWC k2/3 VALID",
        ((2, 4, 3), (2, 5, 3)),
        lambda x, k, impl: conv_transpose(x, k, strides=3, padding="VALID", layout="NWC", impl=impl),
        lambda x, k: lax.conv_transpose(x, k, (3,), ((1, 1),), dimension_numbers=NWC, transpose_kernel=True),
        impls=("lax", "closed_form"),
    ),
]


def _max(x, window, strides, padding):
    return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding)


def _mean(x, window, strides, padding):
    return lax.reduce_window(x, 0.0, lax.add, window, strides, padding) / float(np.prod(window))


POOL = [
    Pair(
        "max_pool NHWC 2x2",
        ((2, 8, 8, 3),),
        lambda x, impl: max_pool(x, 2, impl=impl),
        lambda x: _max(x, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
        impls=("lax",),
    ),
    Pair(
        "max_pool NHWC 3x3/2 pad 1, odd size",
        ((2, 9, 9, 3),),
        lambda x, impl: max_pool(x, 3, 2, 1, impl=impl),
        lambda x: _max(x, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), *PAD_1, (0, 0))),
        impls=("lax",),
    ),
    Pair(
        "max_pool NHWC 3x3/2 pad 1, even size",
        ((2, 8, 8, 3),),
        lambda x, impl: max_pool(x, 3, 2, 1, impl=impl),
        lambda x: _max(x, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), *PAD_1, (0, 0))),
        impls=("lax",),
    ),
    Pair(
        "max_pool NCHW 3x3/1 SAME",
        ((2, 3, 7, 7),),
        lambda x, impl: max_pool(x, 3, 1, "SAME", layout="NCHW", impl=impl),
        lambda x: _max(x, (1, 1, 3, 3), (1, 1, 1, 1), "SAME"),
        impls=("lax",),
    ),
    Pair(
        "max_pool NWC 3/2",
        ((2, 9, 3),),
        lambda x, impl: max_pool(x, 3, 2, impl=impl),
        lambda x: _max(x, (1, 3, 1), (1, 2, 1), "VALID"),
        impls=("lax",),
    ),
    Pair(
        "avg_pool NHWC 2x2",
        ((2, 8, 8, 3),),
        lambda x, impl: avg_pool(x, 2, impl=impl),
        lambda x: _mean(x, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
    ),
    Pair(
        "avg_pool NCHW 3x3/1 pad 1 (count_include_pad)",
        ((2, 3, 7, 7),),
        lambda x, impl: avg_pool(x, 3, 1, 1, layout="NCHW", impl=impl),
        lambda x: _mean(x, (1, 1, 3, 3), (1, 1, 1, 1), ((0, 0), (0, 0), *PAD_1)),
    ),
    Pair(
        "avg_pool NDHWC 2x2x2",
        ((1, 4, 4, 4, 2),),
        lambda x, impl: avg_pool(x, 2, impl=impl),
        lambda x: _mean(x, (1, 2, 2, 2, 1), (1, 2, 2, 2, 1), "VALID"),
    ),
]

# Known differences, reported: the values agree, the programs do not. Once a difference is gone its
# test fails, asking for the entry's removal.
KNOWN_DIFFERENCES: dict[str, str] = {}


def _check_same_program(name: str, cnnjax_fn: Callable, lax_fn: Callable, *args) -> None:
    """Compile both on ``args``: their outputs must agree and their optimized HLO be the same
    (for a ``KNOWN_DIFFERENCES`` entry: still differ, and the test is an expected failure)."""
    lax_exe, cnnjax_exe = (jax.jit(f).lower(*args).compile() for f in (lax_fn, cnnjax_fn))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), cnnjax_exe(*args), lax_exe(*args))
    expected, actual = (normalize_hlo(exe.as_text()) for exe in (lax_exe, cnnjax_exe))
    if name in KNOWN_DIFFERENCES:
        assert actual != expected, f"{name!r} now compiles to the bare lax program: remove it from KNOWN_DIFFERENCES"
        pytest.xfail(KNOWN_DIFFERENCES[name])
    assert actual == expected, hlo_diff(expected, actual)


def _forward_cases():
    for pair in CONV + CONV_TRANSPOSE + POOL:
        for impl in pair.impls:
            yield pytest.param(pair, functools.partial(pair.cnnjax_fn, impl=impl), id=f"{pair.name}, impl={impl}")


@pytest.mark.parametrize(("pair", "cnnjax_fn"), _forward_cases())
def test_forward_compiles_to_the_bare_lax_program(pair, cnnjax_fn):
    _check_same_program(pair.name, cnnjax_fn, pair.lax_fn, *pair.arrays())


@pytest.mark.parametrize("pair", [CONV[1], CONV[5], POOL[0], POOL[6]], ids=lambda p: p.name)
def test_lax_vjp_compiles_to_lax_autodiff(pair):
    """Forward + backward (the program a training step runs) under ``impl="lax"``."""
    args = pair.arrays()
    dy = np.random.default_rng(1).standard_normal(jax.eval_shape(pair.lax_fn, *args).shape, dtype=np.float32)
    cnnjax_fn = vjp_fn(functools.partial(pair.cnnjax_fn, impl="lax"))
    _check_same_program(pair.name, cnnjax_fn, vjp_fn(pair.lax_fn), args, dy)
