"""cnnjax.nn: drop-in agreement with flax.nnx.Conv, each module equal to its functional op,
parameter names and types, errors, the summary recorder hook, and training through the modules."""

import budget
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnnjax import convolution, nn, pooling

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _inputs(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _with_params(make, seed=0):
    """Build a module abstractly (no initializer runs) and give every parameter seeded NumPy values."""
    module = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)
    for _, param in nnx.iter_graph(module):
        if isinstance(param, nnx.Param):
            param.set_value(jnp.asarray(rng.normal(size=param.shape), param.dtype))
    return module


def _apply(module, x):
    """``module(x)`` as one jitted computation (a single compile instead of one per primitive)."""
    return jax.jit(lambda x: module(x))(x)


def _flax_conv_case(seed):
    """A random valid geometry, in arguments both flax.nnx.Conv and cnnjax.nn.Conv accept."""
    rng = np.random.default_rng(seed)
    rank = 1 + seed % 3
    groups = int(rng.choice([1, 1, 2]))
    kernel = tuple(int(k) for k in rng.integers(1, 4, rank))
    options = {
        "strides": int(rng.integers(1, 3)) if rng.random() < 0.5 else tuple(int(s) for s in rng.integers(1, 3, rank)),
        "kernel_dilation": tuple(int(d) for d in rng.integers(1, 3, rank)),
        "feature_group_count": groups,
        "use_bias": bool(rng.random() < 0.7),
    }
    padding = rng.integers(0, 4)
    if padding == 0:
        options["padding"] = str(rng.choice(["SAME", "VALID"]))
    elif padding == 1:
        options["padding"] = int(rng.integers(0, 3))
    else:
        options["padding"] = tuple((int(lo), int(hi)) for lo, hi in rng.integers(0, 3, (rank, 2)))
    if rank < 3 and rng.random() < 0.25:
        options["input_dilation"] = 2
        if isinstance(options["padding"], str):  # flax.nnx.Conv takes only explicit padding here
            options["padding"] = int(rng.integers(0, 2))
    spatial = tuple(int(n) for n in rng.integers(7, 10 if rank < 3 else 8, rank))
    c_in, c_out = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 4))
    return (c_in, c_out, kernel), options, (2, *spatial, c_in)


@pytest.mark.parametrize("seed", budget.seeds(40))
def test_conv_matches_flax_nnx_conv(seed):
    (c_in, c_out, kernel), options, x_shape = _flax_conv_case(seed)
    ours = _with_params(lambda: nn.Conv(c_in, c_out, kernel, rngs=nnx.Rngs(0), **options), seed)
    flax_conv = _with_params(lambda: nnx.Conv(c_in, c_out, kernel, rngs=nnx.Rngs(0), **options), seed)
    assert ours.kernel.shape == flax_conv.kernel.shape == (*kernel, c_in // options["feature_group_count"], c_out)
    np.testing.assert_array_equal(ours.kernel[...], flax_conv.kernel[...])
    x = _inputs(x_shape, seed)
    np.testing.assert_allclose(_apply(ours, x), _apply(flax_conv, x), **TOL)


FLAX_PADDINGS = [
    # (padding, kernel_size, strides, kernel_dilation, x shape): odd and even kernels, strides, dilation
    ("CIRCULAR", (3, 3), 1, 1, (2, 7, 7, 3)),
    ("CIRCULAR", (4, 2), (2, 1), (1, 2), (2, 8, 7, 3)),
    ("REFLECT", (3, 3), 1, 1, (2, 7, 7, 3)),
    ("REFLECT", (4, 3), 2, (2, 1), (2, 9, 8, 3)),
    ("CAUSAL", (3,), 1, 2, (2, 9, 3)),
    ("CAUSAL", (4,), 2, 1, (2, 10, 3)),
    ("CIRCULAR", (3,), None, None, (2, 6, 3)),  # None strides and dilation, as flax.nnx.Conv takes them
]


@pytest.mark.parametrize(("padding", "kernel", "strides", "dilation", "x_shape"), FLAX_PADDINGS)
def test_flax_padding_strings_and_none_match_flax_nnx_conv(padding, kernel, strides, dilation, x_shape):
    """flax.nnx.Conv's padding strings (and ``None`` strides/dilation) with the same arguments and
    parameters: the same outputs and gradients, in Conv and in a DepthwiseConv (``feature_group_count``
    = channels in Flax)."""
    options = {"strides": strides, "padding": padding, "kernel_dilation": dilation}
    c, rngs = x_shape[-1], nnx.Rngs
    pairs = [
        (
            lambda: nn.Conv(c, 4, kernel, **options, rngs=rngs(0)),
            lambda: nnx.Conv(c, 4, kernel, **options, rngs=rngs(0)),
        ),
        (
            lambda: nn.DepthwiseConv(c, kernel, depth_multiplier=2, **options, rngs=rngs(0)),
            lambda: nnx.Conv(c, 2 * c, kernel, feature_group_count=c, **options, rngs=rngs(0)),
        ),
    ]
    x = _inputs(x_shape, 3)
    for make_ours, make_flax in pairs:
        ours, theirs = _with_params(make_ours, 1), _with_params(make_flax, 1)
        np.testing.assert_allclose(_apply(ours, x), _apply(theirs, x), **TOL)
        grads = [jax.jit(jax.grad(lambda x, m=m: jnp.sum(jnp.sin(m(x)))))(x) for m in (ours, theirs)]
        np.testing.assert_allclose(*grads, **TOL)


def test_flax_padding_strings_errors():
    with pytest.raises(ValueError, match=r"Conv: padding='CAUSAL' is for 1-D convolutions, got kernel_size=\(3, 3\)"):
        nn.Conv(1, 1, (3, 3), padding="CAUSAL", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Conv: padding='REFLECT' says how to pad; it takes padding_mode='zeros'"):
        nn.Conv(1, 1, (3, 3), padding="REFLECT", padding_mode="circular", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ConvTranspose: padding='CIRCULAR' is not one of"):
        nn.ConvTranspose(1, 1, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0))


@pytest.mark.parametrize(("kernel", "groups", "use_bias"), [((3, 3), 1, True), ((2,), 2, True), ((1, 2, 3), 1, False)])
def test_default_initialization_matches_flax_nnx_conv(kernel, groups, use_bias):
    """Same rngs, same kernel and bias: LeCun-normal kernel, zero bias, drawn in Flax's order."""
    ours = nn.Conv(4, 6, kernel, feature_group_count=groups, use_bias=use_bias, rngs=nnx.Rngs(7))
    flax_conv = nnx.Conv(4, 6, kernel, feature_group_count=groups, use_bias=use_bias, rngs=nnx.Rngs(7))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(ours, nnx.Param), nnx.state(flax_conv, nnx.Param))


def test_int_kernel_size_is_one_dimensional_as_in_flax():
    layer = nn.Conv(2, 3, 5, rngs=nnx.Rngs(0))
    assert layer.kernel.shape == nnx.Conv(2, 3, 5, rngs=nnx.Rngs(0)).kernel.shape == (5, 2, 3)
    assert layer(jnp.ones((1, 9, 2))).shape == (1, 9, 3)


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_batch_axes_as_flax_nnx_conv(batch):
    """No batch axis, one, or several (folded into one and back), as ``flax.nnx.Conv`` takes them."""
    ours = _with_params(lambda: nn.Conv(1, 2, (3, 3), padding="VALID", rngs=nnx.Rngs(0)), 1)
    flax_conv = _with_params(lambda: nnx.Conv(1, 2, (3, 3), padding="VALID", rngs=nnx.Rngs(0)), 1)
    x = _inputs((*batch, 5, 5, 1), 2)
    y = _apply(ours, x)
    assert y.shape == (*batch, 3, 3, 2)
    np.testing.assert_allclose(y, _apply(flax_conv, x), **TOL)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.ConvTranspose(1, 2, (2, 2), strides=2, rngs=nnx.Rngs(0)),
        lambda: nn.DepthwiseConv(1, (3, 3), depth_multiplier=2, rngs=nnx.Rngs(0)),
        lambda: nn.SeparableConv(1, 2, (3, 3), rngs=nnx.Rngs(0)),
        lambda: nn.MaxPool((2, 2)),
        lambda: nn.AvgPool((2, 2), padding=1),
        lambda: nn.LPPool(2, (2, 2)),
        lambda: nn.AdaptiveAvgPool((2, 3)),
        lambda: nn.AdaptiveMaxPool((2, 3)),
    ],
)
def test_layers_take_any_leading_batch_axes(make):
    """Layers whose arguments fix the spatial rank: ``(H, W, C)`` and ``(B1, B2, H, W, C)`` give
    the ``(N, H, W, C)`` result without ``N`` / with ``(B1, B2)``."""
    layer = _with_params(make)
    x = _inputs((6, 5, 5, 1), 3)
    expected = _apply(layer, x)
    np.testing.assert_allclose(_apply(layer, x[0]), expected[0], **TOL)
    np.testing.assert_allclose(
        _apply(layer, x.reshape(2, 3, 5, 5, 1)), expected.reshape(2, 3, *expected.shape[1:]), **TOL
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_dtype_promotion_matches_flax(dtype):
    x = _inputs((1, 6, 6, 2))
    ours = nn.Conv(2, 3, (3, 3), dtype=dtype, rngs=nnx.Rngs(0))
    flax_conv = nnx.Conv(2, 3, (3, 3), dtype=dtype, rngs=nnx.Rngs(0))
    assert ours(x).dtype == flax_conv(x).dtype == dtype
    np.testing.assert_allclose(ours(x).astype(jnp.float32), flax_conv(x).astype(jnp.float32), rtol=2e-2, atol=2e-2)


def test_param_dtype_and_initializers():
    ones = nnx.initializers.ones_init()
    layer = nn.Conv(2, 3, (2, 2), param_dtype=jnp.float16, kernel_init=ones, bias_init=ones, rngs=nnx.Rngs(0))
    assert layer.kernel.dtype == layer.bias.dtype == jnp.float16
    np.testing.assert_array_equal(layer.kernel[...], np.ones((2, 2, 2, 3)))
    np.testing.assert_array_equal(layer.bias[...], np.ones(3))


# --- every module equals its functional op -----------------------------------------------------


def _module_cases():
    """name -> (module factory, the functional op it must equal)."""
    return {
        "conv": (
            lambda: nn.Conv(
                4, 6, (3, 3), 2, padding=1, feature_group_count=2, padding_mode="reflect", rngs=nnx.Rngs(0)
            ),
            lambda m, x: convolution.conv(
                x, m.kernel[...], m.bias[...], strides=2, padding=1, feature_group_count=2, padding_mode="reflect"
            ),
        ),
        "conv_dilated_same": (
            lambda: nn.Conv(4, 3, (3, 2), kernel_dilation=(2, 1), use_bias=False, rngs=nnx.Rngs(0)),
            lambda m, x: convolution.conv(x, m.kernel[...], padding="SAME", kernel_dilation=(2, 1)),
        ),
        "conv_transpose": (
            lambda: nn.ConvTranspose(
                4, 6, (4, 4), 2, padding=1, output_padding=1, feature_group_count=2, rngs=nnx.Rngs(0)
            ),
            lambda m, x: convolution.conv_transpose(
                x, m.kernel[...], m.bias[...], strides=2, padding=1, output_padding=1, feature_group_count=2
            ),
        ),
        "conv_transpose_same": (
            lambda: nn.ConvTranspose(4, 2, (3, 3), 2, rngs=nnx.Rngs(0)),
            lambda m, x: convolution.conv_transpose(x, m.kernel[...], m.bias[...], strides=2, padding="SAME"),
        ),
        "depthwise": (
            lambda: nn.DepthwiseConv(4, (3, 3), 2, depth_multiplier=2, rngs=nnx.Rngs(0)),
            lambda m, x: convolution.depthwise_conv(x, m.kernel[...], m.bias[...], strides=2, padding="SAME"),
        ),
        "separable": (
            lambda: nn.SeparableConv(4, 5, (3, 3), padding="VALID", depth_multiplier=3, rngs=nnx.Rngs(0)),
            lambda m, x: convolution.separable_conv(
                x, m.depthwise_kernel[...], m.pointwise_kernel[...], m.bias[...], padding="VALID"
            ),
        ),
        "max_pool": (
            lambda: nn.MaxPool((3, 3), 2, padding=1, ceil_mode=True),
            lambda m, x: pooling.max_pool(x, (3, 3), 2, 1, ceil_mode=True),
        ),
        "max_pool_dilated": (
            lambda: nn.MaxPool(2, 1, window_dilation=2),
            lambda m, x: pooling.max_pool(x, 2, 1, window_dilation=2),
        ),
        "avg_pool": (
            lambda: nn.AvgPool((3, 3), 2, padding=1, count_include_pad=False),
            lambda m, x: pooling.avg_pool(x, (3, 3), 2, 1, count_include_pad=False),
        ),
        "avg_pool_divisor": (
            lambda: nn.AvgPool(2, divisor_override=3),
            lambda m, x: pooling.avg_pool(x, 2, divisor_override=3),
        ),
        "avg_pool_dilated": (
            lambda: nn.AvgPool(2, 1, padding=1, window_dilation=(2, 1), count_include_pad=False),
            lambda m, x: pooling.avg_pool(x, 2, 1, 1, window_dilation=(2, 1), count_include_pad=False),
        ),
        "lp_pool": (lambda: nn.LPPool(3.0, 2, 1), lambda m, x: pooling.lp_pool(x, 3.0, 2, 1)),
        "lp_pool_dilated": (
            lambda: nn.LPPool(2.0, 2, 1, window_dilation=2),
            lambda m, x: pooling.lp_pool(x, 2.0, 2, 1, window_dilation=2),
        ),
        "global_avg": (lambda: nn.GlobalAvgPool(keepdims=True), lambda m, x: pooling.global_avg_pool(x, keepdims=True)),
        "global_max": (lambda: nn.GlobalMaxPool(), lambda m, x: pooling.global_max_pool(x)),
        "adaptive_avg": (lambda: nn.AdaptiveAvgPool((3, 2)), lambda m, x: pooling.adaptive_avg_pool(x, (3, 2))),
        "adaptive_max": (lambda: nn.AdaptiveMaxPool(3), lambda m, x: pooling.adaptive_max_pool(x, 3)),
        "spp": (
            lambda: nn.SpatialPyramidPool((1, 2, 3), "avg"),
            lambda m, x: pooling.spatial_pyramid_pool(x, (1, 2, 3), "avg"),
        ),
    }


@pytest.mark.parametrize("name", list(_module_cases()))
def test_module_equals_functional_op(name):
    make, functional = _module_cases()[name]
    module = _with_params(make, seed=len(name))
    x = jnp.abs(_inputs((2, 7, 8, 4), seed=len(name)))
    np.testing.assert_allclose(_apply(module, x), jax.jit(lambda x: functional(module, x))(x), **TOL)


def test_parameters_are_named_kernel_and_bias():
    layer = nn.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0))
    params = nnx.state(layer, nnx.Param)
    assert set(params.keys()) == {"kernel", "bias"}
    assert isinstance(layer.kernel, nnx.Param) and isinstance(layer.bias, nnx.Param)
    no_bias = nn.ConvTranspose(2, 3, (3, 3), use_bias=False, rngs=nnx.Rngs(0))
    assert no_bias.bias is None and set(nnx.state(no_bias, nnx.Param).keys()) == {"kernel"}
    separable = nn.SeparableConv(2, 3, (3, 3), rngs=nnx.Rngs(0))
    assert set(nnx.state(separable, nnx.Param).keys()) == {"depthwise_kernel", "pointwise_kernel", "bias"}
    assert nnx.state(nn.MaxPool(2), nnx.Param) == nnx.State({})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: nn.Conv(4, 6, (3, 3), feature_group_count=3, rngs=nnx.Rngs(0)),
            "Conv: feature_group_count=3 must divide in_features=4",
        ),
        (lambda: nn.Conv(4, 6, (3, 3), feature_group_count=4, rngs=nnx.Rngs(0)), "must divide out_features=6"),
        (
            lambda: nn.ConvTranspose(4, 6, (3, 3), feature_group_count=4, rngs=nnx.Rngs(0)),
            "ConvTranspose: feature_group_count=4",
        ),
        (
            lambda: nn.Conv(2, 2, (1, 1, 1, 1), rngs=nnx.Rngs(0)),
            "Conv: kernel_size=(1, 1, 1, 1) must have 1 to 3 entries",
        ),
        (lambda: nn.Conv(2, 2, 0, rngs=nnx.Rngs(0)), "Conv: kernel_size=0 must be >= 1"),
        (
            lambda: nn.DepthwiseConv(2, (3, 3), depth_multiplier=0, rngs=nnx.Rngs(0)),
            "DepthwiseConv: depth_multiplier=0",
        ),
    ],
)
def test_construction_errors_name_op_argument_and_value(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_geometry_is_canonicalized_once_at_construction():
    """Tuples of ints and (lo, hi) pairs past ``__init__`` (padding strings stay: they depend on the input)."""
    layer = nn.Conv(1, 2, (3, 3), 2, padding=1, kernel_dilation=[1, 2], rngs=nnx.Rngs(0))
    assert (layer.strides, layer.padding, layer.kernel_dilation, layer.input_dilation) == (
        (2, 2),
        ((1, 1), (1, 1)),
        (1, 2),
        (1, 1),
    )
    assert nn.ConvTranspose(1, 2, (2,), 2, padding="same", output_padding=1, rngs=nnx.Rngs(0)).output_padding == (1,)
    pool = nn.MaxPool([2, 2], padding=[1, 0])
    assert (pool.window_shape, pool.strides, pool.padding, pool.window_dilation) == (
        (2, 2),
        None,
        ((1, 1), (0, 0)),
        (1, 1),
    )
    assert nn.MaxPool(2).window_shape == 2  # an int leaves the rank to the input
    with pytest.raises(ValueError, match=r"MaxPool: strides=\(1, 1, 1\) must have one entry per spatial dim \(2\)"):
        nn.MaxPool((2, 2), (1, 1, 1))
    with pytest.raises(ValueError, match=r"AvgPool: window_shape=0 must be >= 1"):
        nn.AvgPool(0)


def test_call_errors_come_from_the_functional_op():
    layer = nn.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):
        layer(jnp.ones((1, 8, 8, 5)))
    with pytest.raises(ValueError, match=r"max_pool: x must be \(N, H, W, C\) or \(H, W, C\)"):
        nn.MaxPool((2, 2))(jnp.ones((8, 2)))


# --- transforms and training ----------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["lax", "closed_form"])
def test_training_step_through_modules(impl):
    model = nnx.Sequential(
        nn.Conv(1, 4, (3, 3), impl=impl, rngs=nnx.Rngs(0)),
        nn.MaxPool(2, impl=impl),
        nn.AvgPool(2, impl=impl),
        nn.GlobalAvgPool(),
    )
    x, target = _inputs((2, 8, 8, 1)), jnp.ones((2, 4))

    @nnx.jit
    def loss_and_grads(model):
        return nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)

    loss, grads = loss_and_grads(model)
    assert np.isfinite(loss) and grads["layers"][0]["kernel"][...].shape == (3, 3, 1, 4)
    reference = nnx.Sequential(
        nn.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0)), nn.MaxPool(2), nn.AvgPool(2), nn.GlobalAvgPool()
    )
    _, expected = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(reference)
    np.testing.assert_allclose(
        grads["layers"][0]["kernel"][...], expected["layers"][0]["kernel"][...], rtol=1e-4, atol=1e-6
    )


LAYERS_WITH_INPUTS = [
    (lambda impl: nn.Conv(2, 3, (3, 3), impl=impl, rngs=nnx.Rngs(0)), (1, 6, 6, 2)),
    (lambda impl: nn.ConvTranspose(2, 3, (3, 3), 2, impl=impl, rngs=nnx.Rngs(0)), (1, 4, 4, 2)),
    (lambda impl: nn.DepthwiseConv(2, (3, 3), impl=impl, rngs=nnx.Rngs(0)), (1, 6, 6, 2)),
    (lambda impl: nn.SeparableConv(2, 3, (3, 3), impl=impl, rngs=nnx.Rngs(0)), (1, 6, 6, 2)),
    (lambda impl: nn.MaxPool(2, impl=impl), (1, 6, 6, 2)),
    (lambda impl: nn.AvgPool(2, impl=impl), (1, 6, 6, 2)),
    (lambda impl: nn.LPPool(2, 2, impl=impl), (1, 6, 6, 2)),
    (lambda impl: nn.GlobalMaxPool(impl=impl), (1, 6, 6, 2)),
    (lambda impl: nn.AdaptiveAvgPool(3, impl=impl), (1, 6, 6, 2)),
    (lambda impl: nn.AdaptiveMaxPool(3, impl=impl), (1, 6, 6, 2)),
    (lambda impl: nn.SpatialPyramidPool((1, 2), impl=impl), (1, 6, 6, 2)),
]


@pytest.mark.parametrize("build, shape", LAYERS_WITH_INPUTS)
def test_every_layer_takes_impl(build, shape):
    """``impl="lax"`` leaves no cnnjax primitive in the gradient's jaxpr; the default binds them."""
    x = _inputs(shape)
    for impl, primitives in (("auto", True), ("closed_form", True), ("lax", False)):
        layer = build(impl)
        jaxpr = str(jax.make_jaxpr(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))(layer, x))
        assert ("cnnjax_" in jaxpr) == primitives, impl
    np.testing.assert_allclose(build("auto")(x), build("lax")(x), rtol=1e-5, atol=1e-5)


def test_set_impl_switches_every_layer():
    model = nnx.Sequential(nn.Conv(1, 2, (3, 3), rngs=nnx.Rngs(0)), nnx.Sequential(nn.MaxPool(2), nn.AvgPool(1)))
    nn.set_impl(model, "lax")
    assert "cnnjax_" not in str(jax.make_jaxpr(lambda x: model(x))(jnp.ones((1, 6, 6, 1))))
    with pytest.raises(ValueError, match=r"set_impl: impl='xla' is not one of \('auto', 'closed_form', 'lax'\)"):
        nn.set_impl(model, "xla")
    with pytest.raises(ValueError, match=r"Conv: impl='xla' is not one of"):  # at construction
        nn.Conv(1, 2, (3, 3), impl="xla", rngs=nnx.Rngs(0))
