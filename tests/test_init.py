"""cnnjax.init: the notes' Xavier bound and He's variance, checked statistically; the PyTorch
layout converters; torch Conv/ConvTranspose weights loaded into cnnjax.nn reproduce torch."""

import math

import budget
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from cnnjax import init, nn

SHAPES = [
    ((5, 5, 64, 128), "NHWC"),
    ((128, 64, 5, 5), "NCHW"),
    ((9, 96, 160), "NWC"),
    ((3, 3, 3, 24, 40), None),
    ((40, 24, 3, 3, 3), "NCDHW"),
]


def _window_and_channels(shape, layout):
    if layout is None or layout.endswith("C"):
        return math.prod(shape[:-2]), shape[-2], shape[-1]
    return math.prod(shape[2:]), shape[1], shape[0]


@pytest.mark.parametrize(("shape", "layout"), SHAPES)
def test_conv_fans(shape, layout):
    window, c_in, c_out = _window_and_channels(shape, layout)
    assert init.conv_fans(shape, layout) == (window * c_in, window * c_out)


@pytest.mark.parametrize(("shape", "layout"), SHAPES)
def test_xavier_uniform_conv_note_000_bound_and_variance(shape, layout):
    """notes 000: W ~ U(+-sqrt(6 / (k_h*k_w*(C_in + C_out)))), so Var W = bound^2 / 3."""
    window, c_in, c_out = _window_and_channels(shape, layout)
    bound = math.sqrt(6 / (window * (c_in + c_out)))
    w = np.asarray(init.xavier_uniform_conv(layout)(jax.random.key(0), shape), np.float64)
    assert w.shape == shape
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.999 * bound  # the bound is reached, not merely respected
    n = w.size  # >= 64_800: the variance estimate's relative standard error is sqrt(0.8 / n) < 0.4%
    assert abs(w.mean()) < 4 * bound / math.sqrt(3 * n)
    np.testing.assert_allclose(w.var(), bound**2 / 3, rtol=0.02)
    assert stats.kstest(w.ravel(), stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3


def test_xavier_uniform_conv_matches_glorot_and_torch_scale(torch):
    shape = (3, 3, 16, 32)
    ours = np.asarray(init.xavier_uniform_conv()(jax.random.key(1), shape))
    glorot = np.asarray(nnx.initializers.glorot_uniform()(jax.random.key(1), shape))
    torch_w = torch.empty(32, 16, 3, 3)
    torch.nn.init.xavier_uniform_(torch_w, generator=torch.Generator().manual_seed(0))
    bound = math.sqrt(6 / (9 * (16 + 32)))
    for sample in (glorot, torch_w.numpy()):
        assert np.abs(sample).max() <= bound * (1 + 1e-6)
        assert stats.ks_2samp(ours.ravel(), sample.ravel()).pvalue > 1e-3


@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize(("shape", "layout"), SHAPES[:3])
def test_he_normal_conv_variance(shape, layout, mode):
    window, c_in, c_out = _window_and_channels(shape, layout)
    fan = window * (c_in if mode == "fan_in" else c_out)
    w = np.asarray(init.he_normal_conv(mode, layout)(jax.random.key(2), shape), np.float64)
    np.testing.assert_allclose(w.var(), 2 / fan, rtol=0.03)
    assert stats.kstest(w.ravel() / math.sqrt(2 / fan), "norm").pvalue > 1e-3


def test_initializers_plug_into_modules_and_take_dtype():
    layer = nn.Conv(8, 16, (3, 3), kernel_init=init.he_normal_conv(), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert layer.kernel.dtype == jnp.bfloat16 and layer.kernel.shape == (3, 3, 8, 16)
    w = init.xavier_uniform_conv()(jax.random.key(0), (3, 3, 2, 2), jnp.float16)
    assert w.dtype == jnp.float16


def test_init_errors():
    with pytest.raises(ValueError, match="he_normal_conv: mode='fan_avg'"):
        init.he_normal_conv("fan_avg")
    with pytest.raises(ValueError, match="conv_fans: layout='HWIO'"):
        init.conv_fans((3, 3, 2, 2), "HWIO")
    with pytest.raises(ValueError, match="conv_fans: layout='NHWC' names 2 spatial dims, but kernel shape"):
        init.conv_fans((3, 2, 2), "NHWC")
    with pytest.raises(ValueError, match="from_torch_conv: expected a conv weight of rank 3 to 5"):
        init.from_torch_conv(np.zeros((3, 3)))


# --- PyTorch converters -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3, 5), (8, 3, 5, 4), (6, 2, 3, 4, 5)])
def test_converters_round_trip_and_permute(shape):
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    kernel = init.from_torch_conv(w)
    assert kernel.shape == (*shape[2:], shape[1], shape[0])
    o, i, *window = (n // 2 for n in shape)
    assert kernel[(*window, i, o)] == w[(o, i, *window)]
    back = init.to_torch_conv(kernel)
    assert isinstance(back, np.ndarray) and back.flags.c_contiguous
    np.testing.assert_array_equal(back, w)
    np.testing.assert_array_equal(init.from_torch_conv(init.to_torch_conv(kernel)), kernel)


TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="torch is the reference for the PyTorch-layout tests")


def _nhwc(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


def _load_torch(make, reference):
    """Build a cnnjax layer abstractly and load a torch layer's weight and bias into it."""
    layer = nnx.eval_shape(make)
    layer.kernel.set_value(init.from_torch_conv(reference.weight))
    if reference.bias is not None:
        layer.bias.set_value(jnp.asarray(reference.bias.detach().numpy()))
    return layer


def _apply(layer, x):
    """``layer`` on a torch NCHW input, as one jitted computation, back in NCHW for comparison."""
    return np.moveaxis(np.asarray(jax.jit(lambda x: layer(x))(jnp.asarray(_nhwc(x)))), -1, 1)


def _geometry(rng, rank):
    groups = int(rng.choice([1, 1, 2, 3]))
    c_in, c_out = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
    kernel = tuple(int(k) for k in rng.integers(1, 4, rank))
    stride = tuple(int(s) for s in rng.integers(1, 3, rank))
    dilation = tuple(int(d) for d in rng.integers(1, 3, rank))
    padding = tuple(int(p) for p in rng.integers(0, 3, rank))
    return groups, c_in, c_out, kernel, stride, dilation, padding


@pytest.mark.parametrize("seed", budget.seeds(40))
def test_torch_conv_weights_into_cnnjax_conv(torch, seed):
    rng = np.random.default_rng(seed)
    rank = (2, 2, 1, 3)[seed % 4]
    groups, c_in, c_out, kernel, stride, dilation, padding = _geometry(rng, rank)
    bias = bool(rng.random() < 0.7)
    torch.manual_seed(seed)
    reference = getattr(torch.nn, f"Conv{rank}d")(c_in, c_out, kernel, stride, padding, dilation, groups, bias)
    spatial = [int(d * (k - 1) + 1 + rng.integers(0, 5)) for k, d in zip(kernel, dilation, strict=True)]
    x = torch.randn(2, c_in, *spatial)
    layer = _load_torch(
        lambda: nn.Conv(
            c_in, c_out, kernel, stride, padding=padding, kernel_dilation=dilation, feature_group_count=groups,
            use_bias=bias, rngs=nnx.Rngs(0),
        ),
        reference,
    )  # fmt: skip
    np.testing.assert_allclose(_apply(layer, x), reference(x).detach().numpy(), **TOL)
    np.testing.assert_array_equal(init.to_torch_conv(layer.kernel[...]), reference.weight.detach().numpy())


@pytest.mark.parametrize("seed", budget.seeds(40))
def test_torch_conv_transpose_weights_into_cnnjax_conv_transpose(torch, seed):
    rng = np.random.default_rng(1000 + seed)
    rank = (2, 2, 1, 3)[seed % 4]
    groups, c_in, c_out, kernel, stride, dilation, padding = _geometry(rng, rank)
    output_padding = tuple(int(rng.integers(0, max(s, d))) for s, d in zip(stride, dilation, strict=True))
    spatial = [int(n) for n in rng.integers(1, 5, rank)]
    # torch needs an output of size >= 1: (n-1)*s - 2p + d*(k-1) + 1 + output_padding
    padding = tuple(
        min(p, ((n - 1) * s + d * (k - 1) + op) // 2)
        for p, n, s, d, k, op in zip(padding, spatial, stride, dilation, kernel, output_padding, strict=True)
    )
    bias = bool(rng.random() < 0.7)
    torch.manual_seed(seed)
    reference = getattr(torch.nn, f"ConvTranspose{rank}d")(
        c_in, c_out, kernel, stride, padding, output_padding, groups, bias, dilation
    )
    x = torch.randn(2, c_in, *spatial)
    layer = _load_torch(
        lambda: nn.ConvTranspose(
            c_in, c_out, kernel, stride, padding=padding, output_padding=output_padding, kernel_dilation=dilation,
            feature_group_count=groups, use_bias=bias, rngs=nnx.Rngs(0),
        ),
        reference,
    )  # fmt: skip
    assert layer.kernel.shape == (*kernel, c_out // groups, c_in)
    np.testing.assert_allclose(_apply(layer, x), reference(x).detach().numpy(), **TOL)


def test_from_torch_conv_accepts_tensors_that_require_grad(torch):
    weight = torch.nn.Conv2d(3, 4, (2, 5)).weight
    assert weight.requires_grad
    np.testing.assert_array_equal(init.from_torch_conv(weight), np.transpose(weight.detach().numpy(), (2, 3, 1, 0)))
