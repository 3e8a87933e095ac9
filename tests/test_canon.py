"""cnnjax._canon: argument canonicalization and its error messages."""

import jax.numpy as jnp
import pytest

from cnnjax import _canon


@pytest.mark.parametrize(
    "layout,ndim,expected",
    [
        ("NHWC", 4, ("NHWC", "HWIO")),
        ("NHWC", 3, ("NWC", "WIO")),
        ("NHWC", 5, ("NDHWC", "DHWIO")),
        ("NCHW", 4, ("NCHW", "OIHW")),
        ("NCW", 3, ("NCW", "OIW")),
        ("ncdhw", 5, ("NCDHW", "OIDHW")),
    ],
)
def test_layout_of(layout, ndim, expected):
    lay = _canon.layout_of(jnp.zeros((1,) * ndim), layout, "op")
    assert (lay.lhs, lay.rhs) == expected
    assert lay.spatial_rank == ndim - 2


def test_layout_axes_and_shapes():
    lay = _canon.layout_of(jnp.zeros((2, 3, 5, 7)), "NCHW", "op")
    assert lay.channel_axis == 1 and lay.spatial_axes == (2, 3)
    assert lay.spatial((2, 3, 5, 7)) == (5, 7) and lay.channels((2, 3, 5, 7)) == 3
    assert lay.shape(2, (5, 7), 3) == (2, 3, 5, 7)
    assert lay.window((4, 6)) == (1, 1, 4, 6)
    nhwc = _canon.layout_of(jnp.zeros((2, 5, 7, 3)), "NHWC", "op")
    assert nhwc.window((4, 6), fill=0) == (0, 4, 6, 0)
    assert (nhwc.kernel_spatial_axes, nhwc.kernel_in_axis, nhwc.kernel_out_axis) == ((0, 1), 2, 3)


@pytest.mark.parametrize(
    "shape,layout,match",
    [
        ((2, 3), "NHWC", "rank 3 to 5"),
        ((1, 2, 3, 4, 5, 6), "NCHW", "rank 3 to 5"),
        ((1, 2, 3, 4), "NWC", "must have rank 3"),
        ((1, 2, 3, 4), "HWCN", "layout='HWCN' is not one of"),
    ],
)
def test_layout_errors(shape, layout, match):
    with pytest.raises(ValueError, match=match):
        _canon.layout_of(jnp.zeros(shape), layout, "conv")


def test_canonicalize_tuple():
    assert _canon.canonicalize_tuple(2, 3, "strides", "conv") == (2, 2, 2)
    assert _canon.canonicalize_tuple((1, 2), 2, "strides", "conv") == (1, 2)
    with pytest.raises(ValueError, match=r"conv: strides=\(1, 2\) must have one entry per spatial dim \(3\)"):
        _canon.canonicalize_tuple((1, 2), 3, "strides", "conv")
    with pytest.raises(ValueError, match="conv: strides=0 must be >= 1"):
        _canon.canonicalize_tuple(0, 2, "strides", "conv")


@pytest.mark.parametrize(
    "padding,n,expected",
    [
        ("same", 2, "SAME"),
        ("SAME_UPPER", 2, "SAME"),
        ("SAME_LOWER", 2, "SAME_LOWER"),
        ("full", 1, "FULL"),
        (1, 2, ((1, 1), (1, 1))),
        ((1, 2), 2, ((1, 1), (2, 2))),
        (((0, 1), (2, 3)), 2, ((0, 1), (2, 3))),
        (((0, 1),), 1, ((0, 1),)),
    ],
)
def test_canonicalize_padding(padding, n, expected):
    assert _canon.canonicalize_padding(padding, n, "conv") == expected


@pytest.mark.parametrize(
    "padding,n,match",
    [
        ("HALF", 2, "is not one of"),
        ((0, 1), 1, "one entry per spatial dim"),
        (((0, 1, 2), (0, 1, 2)), 2, r"\(lo, hi\) pairs"),
        (-1, 2, "padding=-1 must be >= 0"),
    ],
)
def test_canonicalize_padding_errors(padding, n, match):
    with pytest.raises(ValueError, match=match):
        _canon.canonicalize_padding(padding, n, "conv")


def test_padding_pairs_resolves_strings():
    assert _canon.padding_pairs("SAME", (8, 8), (2, 3), (1, 1), (1, 1), "conv") == ((0, 1), (1, 1))
    assert _canon.padding_pairs("SAME_LOWER", (8,), (2,), (1,), (1,), "conv") == ((1, 0),)
    assert _canon.padding_pairs(((1, 2),), (8,), (2,), (1,), (1,), "conv") == ((1, 2),)


def test_require_float():
    _canon.require_float(jnp.zeros(2, jnp.float32), "avg_pool")
    with pytest.raises(TypeError, match="avg_pool: x must be floating point, got dtype int32"):
        _canon.require_float(jnp.zeros(2, jnp.int32), "avg_pool")
