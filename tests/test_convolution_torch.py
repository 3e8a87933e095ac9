"""conv / conv_transpose against torch.nn.functional (NCHW), and NHWC against NCHW.

Every case draws its geometry from a seeded generator: spatial rank 1 to 3, groups, channels,
kernel size, stride, dilation, padding (ints, per-dim ints, and "same"/"valid" where torch
takes them), padding_mode, output_padding and bias. float32 throughout, rtol = atol = 1e-4.
"""

import budget
import numpy as np
import pytest

from cnnjax.convolution import conv, conv_transpose

torch = pytest.importorskip("torch", reason="torch is the reference for these tests")
F = torch.nn.functional

TOL = {"rtol": 1e-4, "atol": 1e-4}
CONV_MODULES = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}
CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _names(rank: int) -> tuple[str, str]:
    """The channels-first and channels-last layout names of ``rank`` spatial dims."""
    return ("NCW", "NCHW", "NCDHW")[rank - 1], ("NWC", "NHWC", "NDHWC")[rank - 1]


def _channels_last(x):
    """NCHW array -> NHWC."""
    return np.moveaxis(x, 1, -1)


def _hwio(w):
    """OIHW kernel -> HWIO (for conv_transpose: (C_in, C_out // G, *k) -> (*k, C_out // G, C_in))."""
    return np.transpose(w, (*range(2, w.ndim), 1, 0))


def _conv_case(seed):
    rng = np.random.default_rng(seed)
    rank = 1 + seed % 3
    groups = int(rng.choice([1, 1, 2, 3]))
    c_in, c_out = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
    kernel = tuple(int(k) for k in rng.integers(1, 4, rank))
    stride = tuple(int(s) for s in rng.integers(1, 3, rank))
    dilation = tuple(int(d) for d in rng.integers(1, 3, rank))
    padding_mode = str(rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"]))
    choice = rng.integers(0, 4)
    if choice == 0 and stride == (1,) * rank:
        padding = "same"
    elif choice == 1:
        padding = "valid"
    elif choice == 2:
        padding = int(rng.integers(0, 3))
    else:
        padding = tuple(int(p) for p in rng.integers(0, 3, rank))
    max_size = 9 if rank < 3 else 6
    spatial = tuple(int(d * (k - 1) + rng.integers(3, max_size)) for k, d in zip(kernel, dilation, strict=True))
    x = rng.standard_normal((int(rng.integers(1, 3)), c_in, *spatial)).astype(np.float32)
    w = rng.standard_normal((c_out, c_in // groups, *kernel)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32) if rng.random() < 0.5 else None
    geometry = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    return x, w, b, geometry, padding_mode


@pytest.mark.parametrize("seed", budget.seeds(60))
def test_conv_matches_torch_and_nhwc_matches_nchw(seed):
    x, w, b, geometry, padding_mode = _conv_case(seed)
    rank = x.ndim - 2
    module = CONV_MODULES[rank](
        x.shape[1],
        w.shape[0],
        w.shape[2:],
        bias=b is not None,
        padding_mode=padding_mode,
        **geometry,
    )
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(w))
        if b is not None:
            module.bias.copy_(torch.from_numpy(b))
        expected = module(torch.from_numpy(x)).numpy()
    padding = geometry["padding"]
    kwargs = {
        "strides": geometry["stride"],
        "padding": padding.upper() if isinstance(padding, str) else padding,
        "kernel_dilation": geometry["dilation"],
        "feature_group_count": geometry["groups"],
        "padding_mode": padding_mode,
    }
    y = conv(x, w, b, layout=_names(rank)[0], **kwargs)
    np.testing.assert_allclose(y, expected, **TOL)
    y_nhwc = conv(_channels_last(x), _hwio(w), b, layout=_names(rank)[1], **kwargs)
    np.testing.assert_allclose(y_nhwc, _channels_last(expected), **TOL)


def _conv_transpose_case(seed):
    rng = np.random.default_rng(1000 + seed)
    rank = 1 + seed % 3
    groups = int(rng.choice([1, 1, 2, 3]))
    c_in, c_out = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
    kernel = tuple(int(k) for k in rng.integers(1, 5, rank))
    stride = tuple(int(s) for s in rng.integers(1, 4, rank))
    dilation = tuple(int(d) for d in rng.integers(1, 3, rank))
    output_padding = tuple(int(rng.integers(0, max(s, d))) for s, d in zip(stride, dilation, strict=True))
    spatial = tuple(int(n) for n in rng.integers(1, 6 if rank < 3 else 4, rank))
    # padding up to one past d*(k-1) (a crop), kept where the output stays >= 1
    padding = tuple(
        min(int(rng.integers(0, d * (k - 1) + 2)), ((n - 1) * s + d * (k - 1) + op) // 2)
        for n, k, s, d, op in zip(spatial, kernel, stride, dilation, output_padding, strict=True)
    )
    x = rng.standard_normal((int(rng.integers(1, 3)), c_in, *spatial)).astype(np.float32)
    w = rng.standard_normal((c_in, c_out // groups, *kernel)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32) if rng.random() < 0.5 else None
    return x, w, b, stride, padding, output_padding, dilation, groups


@pytest.mark.parametrize("seed", budget.seeds(60))
def test_conv_transpose_matches_torch_and_nhwc_matches_nchw(seed):
    x, w, b, stride, padding, output_padding, dilation, groups = _conv_transpose_case(seed)
    rank = x.ndim - 2
    expected = CONV_TRANSPOSE[rank](
        torch.from_numpy(x),
        torch.from_numpy(w),
        None if b is None else torch.from_numpy(b),
        stride,
        padding,
        output_padding,
        groups,
        dilation,
    ).numpy()
    kwargs = {
        "strides": stride,
        "padding": padding,
        "output_padding": output_padding,
        "kernel_dilation": dilation,
        "feature_group_count": groups,
    }
    y = conv_transpose(x, w, b, layout=_names(rank)[0], **kwargs)
    np.testing.assert_allclose(y, expected, **TOL)
    y_nhwc = conv_transpose(_channels_last(x), _hwio(w), b, layout=_names(rank)[1], **kwargs)
    np.testing.assert_allclose(y_nhwc, _channels_last(expected), **TOL)


@pytest.mark.parametrize("kernel_size", [2, 3, 4])
def test_conv_transpose_same_matches_torch_upsampling_block(kernel_size):
    """SAME with stride 2 doubles the size; for k=4 it is torch's ConvTranspose2d(k=4, s=2, p=1)."""
    rng = np.random.default_rng(kernel_size)
    x = rng.standard_normal((1, 2, 5, 3)).astype(np.float32)
    w = rng.standard_normal((2, 3, kernel_size, kernel_size)).astype(np.float32)
    y = conv_transpose(x, w, strides=2, padding="SAME", layout="NCHW")
    assert y.shape == (1, 3, 10, 6)
    if kernel_size == 4:
        expected = F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), stride=2, padding=1).numpy()
        np.testing.assert_allclose(y, expected, **TOL)
