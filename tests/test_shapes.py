"""cnnjax.shapes: integer geometry against brute force and PyTorch's rules."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cnnjax import shapes


def brute_conv_size(n, k, s, lo, hi, d):
    """Count window starts whose dilated taps all land in the padded input."""
    span = d * (k - 1) + 1
    return len(range(0, n + lo + hi - span + 1, s))


@given(
    n=st.integers(1, 40),
    k=st.integers(1, 7),
    s=st.integers(1, 5),
    lo=st.integers(0, 4),
    hi=st.integers(0, 4),
    d=st.integers(1, 3),
)
def test_conv_output_size_matches_brute_force(n, k, s, lo, hi, d):
    if n + lo + hi < d * (k - 1) + 1:
        with pytest.raises(ValueError, match="larger than the padded input"):
            shapes.conv_output_size(n, k, s, (lo, hi), d)
    else:
        assert shapes.conv_output_size(n, k, s, (lo, hi), d) == brute_conv_size(n, k, s, lo, hi, d)


@pytest.mark.parametrize("n,k,s,d", itertools.product([1, 5, 8, 13], [1, 2, 3, 4], [1, 2, 3], [1, 2]))
@pytest.mark.parametrize("mode", ["SAME", "SAME_LOWER"])
def test_same_padding_gives_ceil_n_over_s(n, k, s, d, mode):
    lo, hi = shapes.resolve_padding(mode, n, k, s, d)
    assert shapes.conv_output_size(n, k, s, (lo, hi), d) == -(-n // s)
    assert abs(lo - hi) <= 1
    assert (hi >= lo) if mode == "SAME" else (lo >= hi)


def test_same_padding_extra_pixel_side():
    """Even kernel: SAME puts the extra pixel at the end (XLA), SAME_LOWER at the start (notes 000/001)."""
    assert shapes.same_padding(8, 2) == (0, 1)
    assert shapes.same_padding(8, 2, lower=True) == (1, 0)
    assert shapes.resolve_padding("SAME_UPPER", 8, 4) == (1, 2)


def test_full_padding():
    assert shapes.resolve_padding("FULL", 5, 3, dilation=2) == (4, 4)
    assert shapes.conv_output_size(5, 3, padding="FULL") == 7


def torch_pool_size(n, k, s, p, d, ceil_mode):
    """PyTorch's pooling_output_shape (aten/src/ATen/native/Pool.h), transcribed."""
    num = n + 2 * p - d * (k - 1) - 1 + ((s - 1) if ceil_mode else 0)
    out = num // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


@given(
    n=st.integers(1, 30),
    k=st.integers(1, 6),
    s=st.integers(1, 5),
    p=st.integers(0, 3),
    d=st.integers(1, 2),
    ceil_mode=st.booleans(),
)
def test_pool_output_size_is_pytorch_rule(n, k, s, p, d, ceil_mode):
    if n + 2 * p < d * (k - 1) + 1:
        return
    assert shapes.pool_output_size(n, k, s, p, d, ceil_mode) == torch_pool_size(n, k, s, p, d, ceil_mode)


def test_pool_stride_defaults_to_window():
    assert shapes.pool_output_size(6, 2) == 3
    assert shapes.pool_output_size(5, 2, ceil_mode=True) == 3


@pytest.mark.parametrize("n,k,s,p,op,expected", [(4, 4, 2, 1, 0, 8), (3, 3, 2, 0, 1, 8), (5, 3, 1, 1, 0, 5)])
def test_conv_transpose_output_size(n, k, s, p, op, expected):
    assert shapes.conv_transpose_output_size(n, k, s, p, op) == expected


@pytest.mark.parametrize("n,k,s,d", itertools.product([1, 3, 6], [1, 2, 3, 5], [1, 2, 3], [1, 2]))
def test_conv_transpose_same_and_valid(n, k, s, d):
    assert shapes.conv_transpose_output_size(n, k, s, "SAME", dilation=d) == n * s
    assert shapes.conv_transpose_output_size(n, k, s, "VALID", dilation=d) == (n - 1) * s + d * (k - 1) + 1


def test_conv_transpose_inverts_conv_size():
    for n, k, s, p in itertools.product(range(1, 12), range(1, 5), range(1, 4), range(0, 3)):
        if n + 2 * p < k:
            continue
        m = shapes.conv_output_size(n, k, s, p)
        extra = (n + 2 * p - k) % s
        assert shapes.conv_transpose_output_size(m, k, s, p, output_padding=extra) == n


def test_receptive_field_notes_002():
    """Notes 002 (002_f507a061fff3ec1f): two 3x3 convs see 5 pixels; VGG16 conv5_3 196, pool5 212."""
    assert shapes.receptive_field([(3, 1), (3, 1)]).size == 5
    block = lambda convs: [(3, 1, 1)] * convs + [(2, 2)]
    vgg16 = block(2) + block(2) + block(3) + block(3) + block(3)
    conv5_3 = shapes.receptive_field(vgg16[:-1])
    pool5 = shapes.receptive_field(vgg16)
    assert (conv5_3.size, conv5_3.jump) == (196, 16)
    assert (pool5.size, pool5.jump) == (212, 32)


def test_receptive_field_dilation_and_start():
    rf = shapes.receptive_field([{"kernel": 3, "dilation": 2}])
    assert rf.size == 5
    assert rf.start == 2.0
    rf = shapes.receptive_field([(3, 2, 1), (3, 2, 1)])
    assert (rf.size, rf.jump, rf.start) == (7, 4, 0.0)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: shapes.conv_output_size(5, 3, stride=0), "stride=0 must be >= 1"),
        (lambda: shapes.conv_output_size(5, 0), "kernel_size=0 must be >= 1"),
        (lambda: shapes.conv_output_size(5, 3, dilation=0), "dilation=0 must be >= 1"),
        (lambda: shapes.conv_output_size(2, 5), "larger than the padded input"),
        (lambda: shapes.conv_output_size(5, 3, padding=-1), "padding=-1 must be >= 0"),
        (lambda: shapes.conv_output_size(5, 3, padding="HALF"), "padding='HALF' is not one of"),
        (lambda: shapes.pool_output_size(1, 3), "larger than the padded input"),
        (lambda: shapes.conv_transpose_output_size(3, 3, 2, output_padding=2), "output_padding=2 must be smaller"),
        (lambda: shapes.conv_transpose_output_size(1, 1, 1, padding=1), "output of size -1 < 1"),
        (lambda: shapes.same_padding(0, 3), "n=0 must be >= 1"),
        (lambda: shapes.receptive_field([(3, 0)]), "stride=0 must be >= 1"),
    ],
)
def test_invalid_geometry_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: shapes.conv_output_size(5.0, 3),
        lambda: shapes.conv_output_size(5, True),
        lambda: shapes.receptive_field([{"kernal": 3}]),
        lambda: shapes.receptive_field(["3x3"]),
        lambda: shapes.receptive_field([(3, 1, "SAME")]),
    ],
)
def test_wrong_types_raise_type_error(call):
    with pytest.raises(TypeError):
        call()
