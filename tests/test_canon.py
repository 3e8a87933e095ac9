"""cnnjax._canon: argument canonicalization and its error messages."""

import jax.numpy as jnp
import pytest

from cnnjax import _canon


@pytest.mark.parametrize(
    "layout,ndim,expected",
    [
        ("NHWC", 4, ("NHWC", "HWIO")),
        ("NWC", 3, ("NWC", "WIO")),
        ("NDHWC", 5, ("NDHWC", "DHWIO")),
        (None, 3, ("NWC", "WIO")),
        (None, 5, ("NDHWC", "DHWIO")),
        ("NCHW", 4, ("NCHW", "OIHW")),
        ("NCW", 3, ("NCW", "OIW")),
        ("ncdhw", 5, ("NCDHW", "OIDHW")),
    ],
)
def test_layout_of(layout, ndim, expected):
    lay, batched = _canon.layout_of((1,) * ndim, layout, "op")
    assert (lay.lhs, lay.rhs) == expected
    assert lay.spatial_rank == ndim - 2 and batched


def test_layout_axes_and_shapes():
    lay, _ = _canon.layout_of((2, 3, 5, 7), "NCHW", "op")
    assert lay.channel_axis == 1 and lay.spatial_axes == (2, 3)
    assert lay.spatial((2, 3, 5, 7)) == (5, 7) and lay.channels((2, 3, 5, 7)) == 3
    assert lay.shape(2, (5, 7), 3) == (2, 3, 5, 7)
    assert lay.window((4, 6)) == (1, 1, 4, 6)
    assert (lay.doc(), lay.doc(batched=False)) == ("(N, C, H, W)", "(C, H, W)")
    nhwc, _ = _canon.layout_of((2, 5, 7, 3), "NHWC", "op")
    assert nhwc.window((4, 6), fill=0) == (0, 4, 6, 0)
    assert (nhwc.kernel_spatial_axes, nhwc.kernel_in_axis, nhwc.kernel_out_axis) == ((0, 1), 2, 3)


# The rank rule: the kernel, then a window/output-size sequence, then a layout name, then the
# input's rank minus 2; spatial + 2 is batched, spatial + 1 unbatched.
@pytest.mark.parametrize(
    "shape,layout,source,expected",
    [
        ((8, 8, 3), None, {"kernel_shape": (3, 3, 3, 4)}, ("NHWC", False)),
        ((2, 8, 8, 3), None, {"kernel_shape": (3, 3, 3, 4)}, ("NHWC", True)),
        ((3, 8), "NCW", {"kernel_shape": (4, 3, 3)}, ("NCW", False)),
        ((1, 1, 4), None, {"per_dim": ("window_shape", (2, 2))}, ("NHWC", False)),
        ((1, 1, 4), None, {"per_dim": ("window_shape", 2)}, ("NWC", True)),
        ((1, 1, 4), "NCHW", {"per_dim": ("window_shape", 2)}, ("NCHW", False)),
        ((2, 3, 4, 5, 6), "NCDHW", {"per_dim": ("output_size", (2, None, 1))}, ("NCDHW", True)),
        ((3, 4, 5, 6), None, {}, ("NHWC", True)),
    ],
)
def test_layout_of_rank_rule(shape, layout, source, expected):
    lay, batched = _canon.layout_of(shape, layout, "op", **source)
    assert (lay.lhs, batched) == expected


@pytest.mark.parametrize(
    "shape,layout,source,match",
    [
        ((8,), None, {"kernel_shape": (3, 3, 1, 2)}, r"conv: x must be \(N, H, W, C\) or \(H, W, C\) for a 2-D kernel"),
        ((1, 2, 8, 8, 3), "NCHW", {}, r"x must be \(N, C, H, W\) or \(C, H, W\) for layout 'NCHW', got shape"),
        ((1, 4, 4), None, {"per_dim": ("window_shape", (2, 2, 2))}, r"for window_shape=\(2, 2, 2\)"),
        ((1, 4, 4), "NCW", {"kernel_shape": (1, 1, 2, 2)}, "layout='NCW' names 1 spatial dims, but kernel of shape"),
        ((1, 4, 4), "NHWC", {"per_dim": ("window_shape", (2,))}, "layout='NHWC' names 2 spatial dims"),
        ((1, 4, 4), None, {"kernel_shape": (2, 2)}, r"kernel must have rank 3 to 5"),
        ((1, 4, 4), None, {"per_dim": ("output_size", ())}, "must have one entry per spatial dim, 1 to 3"),
        ((2, 3), None, {}, "must be batched with 1 to 3 spatial dims"),
        ((1, 2, 3, 4, 5, 6), None, {}, "must be batched with 1 to 3 spatial dims"),
        ((1, 2, 3, 4), "HWCN", {}, "layout='HWCN' is not one of"),
    ],
)
def test_layout_of_errors(shape, layout, source, match):
    with pytest.raises(ValueError, match=match):
        _canon.layout_of(shape, layout, "conv", **source)


def test_batch_axis_round_trip():
    x = jnp.ones((3, 4))
    assert _canon.with_batch_axis(x, False).shape == (1, 3, 4) and _canon.with_batch_axis(x, True) is x
    pair = _canon.without_batch_axis((jnp.ones((1, 2)), jnp.zeros((1, 3))), False)
    assert [a.shape for a in pair] == [(2,), (3,)]


@pytest.mark.parametrize(
    "n,w,s,d,lo,out,expected",
    [
        (5, 2, 50, 1, 4, 1, 0),  # PyTorch's avg_pool1d error sample: the only window is padding
        (4, 2, 1, 1, 2, 7, 0),  # padding 2 on each side: the first and last windows are padding
        (4, 2, 2, 1, 0, 3, 2),  # (0, 2) in floor mode: the last window lies in the right padding
        (5, 3, 1, 2, 3, 3, None),  # taps -3, -1, 1: one is real (PyTorch still refuses pad 3 > 5/2)
        (1, 2, 1, 4, 2, 2, 0),  # taps -2, 2 straddle the input without touching it
        (8, 3, 2, 1, 1, 4, None),
    ],
)
def test_first_empty_window(n, w, s, d, lo, out, expected):
    assert _canon._first_empty_window(n, w, s, d, lo, out) == expected


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
