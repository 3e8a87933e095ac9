"""cnnjax.analysis: the count functions, count_params, and summary (rows, totals, receptive
fields through sequential, residual, inception and dense blocks, XLA's own FLOP count, and the
model zoo). The notes' worked examples are in tests/notes/test_notes_analysis.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from cnnjax import analysis, nn
from cnnjax.analysis import (
    adaptive_pool_flops,
    conv_flops,
    conv_macs,
    conv_params,
    count_params,
    dense_flops,
    dense_macs,
    dense_params,
    global_pool_flops,
    pool_flops,
    summary,
)


def _abstract(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


# --- count functions ----------------------------------------------------------------------------


def test_conv_counts_by_hand():
    # 3x3 conv, 4 -> 6 channels in 2 groups, on a 5x7 output: each output sums 2*9 products.
    assert conv_params(4, 6, (3, 3), groups=2) == 9 * 2 * 6 + 6
    assert conv_macs(4, 6, (3, 3), (5, 7), groups=2) == 18 * 35 * 6
    assert conv_flops(4, 6, (3, 3), (5, 7), bias=False, groups=2) == (2 * 18 - 1) * 35 * 6
    assert conv_flops(4, 6, (3, 3), (5, 7), groups=2) == 2 * 18 * 35 * 6
    # 1-D and 3-D: K is the product of the kernel dims, H*W the product of the output dims.
    assert conv_macs(2, 3, (5,), (10,)) == 5 * 2 * 10 * 3
    assert conv_macs(2, 3, (3, 3, 3), 4) == 27 * 2 * 64 * 3
    # Depthwise conv = groups = in_channels; the multiplier is out_channels / in_channels.
    assert conv_params(8, 16, 3, bias=False, groups=8) == 9 * 16


def test_size_arguments_broadcast_to_a_common_rank():
    assert conv_macs(1, 1, 3, 5) == conv_macs(1, 1, (3, 3), (5, 5)) == 9 * 25
    assert conv_macs(1, 1, (3,), 5) == 3 * 5
    assert pool_flops(2, (4, 4, 4), 1) == 8 * 64
    assert global_pool_flops((3, 4, 5), 2) == 120


@given(
    in_f=st.integers(1, 64),
    out_f=st.integers(1, 64),
    k=st.integers(1, 7),
    n=st.integers(1, 32),
    bias=st.booleans(),
)
def test_flops_are_twice_macs_less_one_add_per_output_without_bias(in_f, out_f, k, n, bias):
    outputs = n * n * out_f
    assert conv_flops(in_f, out_f, k, n, bias) == 2 * conv_macs(in_f, out_f, k, n) - (0 if bias else outputs)
    assert dense_flops(in_f, out_f, bias) == 2 * dense_macs(in_f, out_f) - (0 if bias else out_f)
    assert dense_params(in_f, out_f, bias) == in_f * out_f + (out_f if bias else 0)


@given(size=st.integers(1, 40), out=st.integers(1, 40), channels=st.integers(1, 8))
def test_adaptive_pool_flops_count_every_bin_tap(size, out, channels):
    starts = [math.floor(i * size / out) for i in range(out)]
    ends = [math.ceil((i + 1) * size / out) for i in range(out)]
    per_dim = sum(e - s for s, e in zip(starts, ends, strict=True))
    assert adaptive_pool_flops((size,), (out,), channels) == per_dim * channels
    assert adaptive_pool_flops(size, out, channels) == per_dim**2 * channels
    if size % out == 0:
        assert adaptive_pool_flops(size, out, channels) == pool_flops(size // out, out, channels)
    assert adaptive_pool_flops(size, 1, channels) == global_pool_flops(size, channels)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: conv_params(4, 6, 3, groups=4), ValueError, "conv_params: groups=4 must divide out_channels=6"),
        (lambda: conv_macs(3, 6, 3, 5, groups=2), ValueError, "conv_macs: groups=2 must divide in_channels=3"),
        (lambda: conv_flops(1, 1, (3, 3), (5,)), ValueError, "conv_flops: size arguments"),
        (lambda: conv_params(0, 1, 3), ValueError, "conv_params: in_channels=0 must be >= 1"),
        (lambda: pool_flops(2, 0, 1), ValueError, "pool_flops: output_size=0 must be >= 1"),
        (lambda: dense_params(2.5, 3), TypeError, "dense_params: in_features must be an int"),
        (lambda: analysis.activation_flops("gelu", 4), ValueError, "activation_flops: kind='gelu' is not one of"),
        (lambda: analysis.activation_flops("relu", 0), ValueError, "activation_flops: size=0"),
    ],
)
def test_count_errors_name_the_function_argument_and_value(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --- count_params ---------------------------------------------------------------------------------


class _ConvBNHead(nnx.Module):
    def __init__(self, rngs):
        self.conv = nn.Conv(3, 8, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.pool = nn.GlobalAvgPool()
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        return self.head(self.dropout(self.pool(jax.nn.relu(self.norm(self.conv(x))))))


def test_count_params_counts_params_not_batch_stats():
    model = _ConvBNHead(nnx.Rngs(0))
    expected = conv_params(3, 8, 3) + 2 * 8 + dense_params(8, 5)
    assert count_params(model) == expected
    assert count_params(nnx.state(model)) == expected  # running mean/var are BatchStat
    assert count_params(nnx.state(model, nnx.Param)) == expected
    assert count_params({"w": jnp.ones((3, 4)), "b": [jnp.ones(4)]}) == 16
    assert count_params(nnx.eval_shape(lambda: _ConvBNHead(nnx.Rngs(0)))) == expected


# --- summary ------------------------------------------------------------------------------------


def test_summary_rows_totals_and_table():
    model = _ConvBNHead(nnx.Rngs(0))
    s = summary(model, jnp.ones((2, 8, 8, 3)))
    assert [(r.name, r.type, r.output_shape) for r in s.rows] == [
        ("conv", "Conv", (2, 8, 8, 8)),
        ("norm", "BatchNorm", (2, 8, 8, 8)),
        ("pool", "GlobalAvgPool", (2, 8)),
        ("head", "Linear", (2, 5)),
    ]
    conv, norm, pool, head = s.rows
    assert (conv.params, conv.flops, conv.macs) == (conv_params(3, 8, 3), conv_flops(3, 8, 3, 8), conv_macs(3, 8, 3, 8))
    assert (norm.params, norm.flops, norm.macs) == (16, analysis.batch_norm_flops((8, 8, 8)), 0)
    assert (pool.params, pool.flops, pool.receptive_field, pool.jump) == (0, global_pool_flops(8, 8), (10, 10), (8, 8))
    assert (head.params, head.flops, head.macs, head.receptive_field) == (45, dense_flops(8, 5), dense_macs(8, 5), None)
    assert (conv.receptive_field, conv.jump, norm.receptive_field) == ((3, 3), (1, 1), None)
    assert s.total_params == count_params(model) == sum(r.params for r in s.rows)
    assert s.total_flops == sum(r.flops for r in s.rows) and s.total_macs == conv.macs + head.macs
    text = str(s)
    for expected in ("FLOPs per example", "MACs", "RF", "Jump", "GlobalAvgPool", "head", f"{s.total_flops:,}", "Total"):
        assert expected in text
    assert len({len(line) for line in text.splitlines()[3:-1] if set(line) == {"-"}}) == 1


def test_summary_leaves_the_model_and_flax_classes_untouched():
    model = _ConvBNHead(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    summary(model, jnp.full((4, 8, 8, 3), 5.0))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model, nnx.Param)))
    np.testing.assert_array_equal(model.norm.mean[...], np.zeros(8))  # no running-statistics update
    assert not model.norm.use_running_average and not model.dropout.deterministic  # still training
    assert nnx.Linear.__call__.__qualname__ == "Linear.__call__"
    with pytest.raises(ValueError):
        summary(model, _abstract((4, 8, 8, 5)))  # the conv rejects 5 channels
    assert nnx.BatchNorm.__call__.__qualname__ == "BatchNorm.__call__"


class _ScaledConv(nn.Conv):
    """A user's subclass whose ``__call__`` calls the base class's."""

    def __call__(self, x):
        return 2 * super().__call__(x)


class _NamedPool(nn.MaxPool):
    """A user's subclass that inherits ``__call__``."""


def test_summary_intercepts_calls_from_outside_the_layers():
    model = nnx.Sequential(
        _ScaledConv(1, 2, (3, 3), rngs=nnx.Rngs(0)), nn.Conv(2, 2, (3, 3), rngs=nnx.Rngs(0)), _NamedPool(2)
    )
    rows = summary(model, _abstract((1, 8, 8, 1))).rows
    # the subclass is one row (not one for its call and one for nn.Conv's), named by its path
    assert [(r.name, r.type, r.output_shape, r.flops) for r in rows] == [
        ("layers.0", "_ScaledConv", (1, 8, 8, 2), conv_flops(1, 2, 3, 8)),
        ("layers.1", "Conv", (1, 8, 8, 2), conv_flops(2, 2, 3, 8)),
        ("layers.2", "_NamedPool", (1, 4, 4, 2), pool_flops(2, 4, 2)),
    ]
    assert rows[1].receptive_field == (5, 5)
    # every class is itself again: the subclass inherits nothing new, the layers carry no hook
    assert "__call__" in _ScaledConv.__dict__ and _ScaledConv.__call__.__qualname__ == "_ScaledConv.__call__"
    assert nn.Conv.__call__.__qualname__ == "Conv.__call__" and nn.MaxPool.__call__.__qualname__ == "MaxPool.__call__"
    assert "__call__" not in _NamedPool.__dict__ and not hasattr(nn.Conv.__call__, "__wrapped__")


def _layer_row(layer, shape):
    (row,) = summary(layer, _abstract(shape)).rows
    return row


@pytest.mark.parametrize(
    ("layer", "expected_flops", "expected_rf"),
    [
        (
            nn.Conv(4, 6, (3, 3), 2, feature_group_count=2, use_bias=False, rngs=nnx.Rngs(0)),
            conv_flops(4, 6, 3, 4, False, 2),
            3,
        ),
        (nn.Conv(4, 6, (3, 3), kernel_dilation=2, rngs=nnx.Rngs(0)), conv_flops(4, 6, 3, 8), 5),
        (nn.DepthwiseConv(4, (3, 3), depth_multiplier=2, rngs=nnx.Rngs(0)), conv_flops(4, 8, 3, 8, groups=4), 3),
        (
            nn.SeparableConv(4, 5, (3, 3), depth_multiplier=2, rngs=nnx.Rngs(0)),
            conv_flops(4, 8, 3, 8, False, groups=4) + conv_flops(8, 5, 1, 8),
            3,
        ),
        (nn.ConvTranspose(4, 6, (3, 3), 2, rngs=nnx.Rngs(0)), conv_flops(6, 4, 3, 8), None),
        (nn.MaxPool((3, 3), 2, padding=1), pool_flops(3, 4, 4), 3),
        (nn.MaxPool(2, 1, window_dilation=3), pool_flops(2, 5, 4), 4),
        (nn.AvgPool(2), pool_flops(2, 4, 4), 2),
        (nn.LPPool(2.0, 3, 1), pool_flops(3, 6, 4), 3),
        (nn.GlobalMaxPool(), global_pool_flops(8, 4), 8),
        (nn.AdaptiveAvgPool(2), pool_flops(4, 2, 4), 4),
        (nn.AdaptiveMaxPool(3), adaptive_pool_flops(8, 3, 4), None),
        (nn.SpatialPyramidPool((1, 2)), adaptive_pool_flops(8, 1, 4) + adaptive_pool_flops(8, 2, 4), 8),
    ],
)
def test_summary_row_uses_the_count_functions(layer, expected_flops, expected_rf):
    row = _layer_row(layer, (1, 8, 8, 4))
    assert row.flops == expected_flops
    assert row.params == count_params(layer)
    assert row.receptive_field == (None if expected_rf is None else (expected_rf, expected_rf))


def _vgg16_features(rngs, width=2):
    """VGG-16's 13 convs (3x3, pad 1) and 5 max pools at a tiny width: RF doesn't depend on width."""
    layers, c_in = [], 1
    for convs in (2, 2, 3, 3, 3):
        for _ in range(convs):
            layers += [nn.Conv(c_in, width, (3, 3), padding=1, rngs=rngs), jax.nn.relu]
            c_in = width
        layers.append(nn.MaxPool((2, 2)))
    return nnx.Sequential(*layers)


def test_summary_vgg16_receptive_fields_196_and_212():
    s = summary(_vgg16_features(nnx.Rngs(0)), _abstract((1, 32, 32, 1)))
    fields = [(r.type, r.receptive_field[0], r.jump[0]) for r in s.rows]
    assert fields[-2:] == [("Conv", 196, 16), ("MaxPool", 212, 32)]
    assert [f for t, f, _ in fields if t == "MaxPool"] == [6, 16, 44, 100, 212]


class _Residual(nnx.Module):
    """Two 3x3 convs plus a 1x1 shortcut, then a 3x3 head; ``shortcut_first`` flips the call order."""

    def __init__(self, shortcut_first, rngs):
        self.conv1, self.conv2 = nn.Conv(2, 2, (3, 3), rngs=rngs), nn.Conv(2, 2, (3, 3), rngs=rngs)
        self.shortcut, self.head = nn.Conv(2, 2, (1, 1), rngs=rngs), nn.Conv(2, 2, (3, 3), rngs=rngs)
        self.shortcut_first = shortcut_first

    def __call__(self, x):
        skip = self.shortcut(x) if self.shortcut_first else None
        main = self.conv2(jax.nn.relu(self.conv1(x)))
        skip = skip if self.shortcut_first else self.shortcut(x)
        return self.head(jax.nn.relu(main + skip))


@pytest.mark.parametrize("shortcut_first", [False, True])
def test_summary_residual_block_takes_the_main_path(shortcut_first):
    s = summary(_Residual(shortcut_first, nnx.Rngs(0)), _abstract((1, 9, 9, 2)))
    fields = {r.name: r.receptive_field[0] for r in s.rows}
    assert fields == {"conv1": 3, "conv2": 5, "shortcut": 1, "head": 7}


class _Inception(nnx.Module):
    """GoogLeNet-style branches (1x1; 1x1-3x3; 1x1-5x5; 3x3 pool-1x1), concatenated, then a 3x3 conv."""

    def __init__(self, rngs):
        self.b1 = nn.Conv(4, 2, (1, 1), rngs=rngs)
        self.b2 = nnx.Sequential(nn.Conv(4, 2, (1, 1), rngs=rngs), nn.Conv(2, 3, (3, 3), rngs=rngs))
        self.b3 = nnx.Sequential(nn.Conv(4, 2, (1, 1), rngs=rngs), nn.Conv(2, 3, (5, 5), rngs=rngs))
        self.b4 = nnx.Sequential(nn.MaxPool(3, 1, padding=1), nn.Conv(4, 2, (1, 1), rngs=rngs))
        self.after = nn.Conv(10, 4, (3, 3), rngs=rngs)

    def __call__(self, x):
        branches = [self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
        return self.after(jax.nn.relu(jnp.concatenate(branches, axis=-1)))


def test_summary_inception_block_takes_the_widest_branch():
    model = nnx.Sequential(_Inception(nnx.Rngs(0)), _Inception(nnx.Rngs(1)))
    s = summary(model, _abstract((1, 12, 12, 4)))
    fields = [r.receptive_field[0] for r in s.rows]
    first = [1, 1, 3, 1, 5, 3, 3, 7]  # b1, b2 (1x1, 3x3), b3 (1x1, 5x5), b4 (pool, 1x1), after
    assert fields == first + [f + 6 for f in first]


class _DenseBlock(nnx.Module):
    """DenseNet: each layer is BN-ReLU-3x3 conv on the concatenation of all earlier features."""

    def __init__(self, rngs, layers=3, growth=2):
        self.norms = nnx.List([nnx.BatchNorm(2 + i * growth, rngs=rngs) for i in range(layers)])
        self.convs = nnx.List([nn.Conv(2 + i * growth, growth, (3, 3), rngs=rngs) for i in range(layers)])
        self.transition = nnx.Sequential(nn.Conv(2 + layers * growth, 2, (1, 1), rngs=rngs), nn.AvgPool(2))

    def __call__(self, x):
        features = [x]
        for norm, conv in zip(self.norms, self.convs, strict=True):
            features.append(conv(jax.nn.relu(norm(jnp.concatenate(features, axis=-1)))))
        return self.transition(jnp.concatenate(features, axis=-1))


def test_summary_dense_block_grows_with_each_layer():
    s = summary(_DenseBlock(nnx.Rngs(0)), _abstract((1, 8, 8, 2)))
    fields = [(r.type, r.receptive_field and r.receptive_field[0]) for r in s.rows]
    assert fields == [
        ("BatchNorm", None),
        ("Conv", 3),
        ("BatchNorm", None),
        ("Conv", 5),
        ("BatchNorm", None),
        ("Conv", 7),
        ("Conv", 7),
        ("AvgPool", 8),
    ]


# --- against XLA's cost model ---------------------------------------------------------------------


def _xla_flops(model, shape):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    cost = forward.lower(state, _abstract(shape)).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize(
    ("padding", "bias", "groups", "stride"),
    [("VALID", False, 1, 1), ("VALID", True, 1, 2), ("SAME", False, 2, 1), ("SAME", True, 2, 2), (1, False, 1, 2)],
)
def test_conv_flops_against_xla_cost_analysis(padding, bias, groups, stride):
    """XLA counts 2 FLOPs per multiply-add it performs plus 1 per bias add, and skips the taps that
    fall on zero padding; the notes count every tap and one add fewer per output without bias.
    So XLA = 2 * (MACs on real pixels) + bias adds: equal to 2 * MACs exactly for VALID padding.
    ``impl="lax"``: the forward is XLA's convolution (on CPU the closed-form path runs grouped convs
    as per-tap products, which XLA's cost model counts as elementwise work)."""
    shape = (1, 9, 9, 4)
    options = {"padding": padding, "feature_group_count": groups, "impl": "lax", "rngs": nnx.Rngs(0)}
    model = nn.Conv(4, 6, (3, 3), stride, use_bias=bias, **options)
    s = summary(model, _abstract(shape))
    outputs = math.prod(s.rows[0].output_shape[1:])
    taps = nn.Conv(4, 6, (3, 3), stride, use_bias=False, kernel_init=nnx.initializers.ones_init(), **options)
    real_macs = int(taps(jnp.ones(shape)).sum())  # a ones kernel on a ones image counts the real taps
    assert _xla_flops(model, shape) == 2 * real_macs + (outputs if bias else 0)
    assert s.total_flops == 2 * s.total_macs - (0 if bias else outputs)
    assert (real_macs == s.total_macs) == (padding == "VALID")


def test_model_flops_against_xla_cost_analysis():
    """A VALID, bias-free conv stack: XLA's total is exactly 2 * summary's MACs (XLA's convolutions:
    ``impl="lax"``, as above)."""
    options = {"padding": "VALID", "use_bias": False, "impl": "lax", "rngs": nnx.Rngs(0)}
    model = nnx.Sequential(
        nn.Conv(3, 8, (3, 3), **options),
        nn.Conv(8, 8, (3, 3), 2, feature_group_count=4, **options),
        nn.Conv(8, 4, (1, 1), **options),
    )
    s = summary(model, _abstract((1, 16, 16, 3)))
    assert _xla_flops(model, (1, 16, 16, 3)) == 2 * s.total_macs
    assert s.total_flops == 2 * s.total_macs - sum(math.prod(r.output_shape[1:]) for r in s.rows)


# --- the model zoo ------------------------------------------------------------------------------

models = pytest.importorskip("cnnjax.models", reason="cnnjax.models is not there yet")


def _abstract_model(factory, **kwargs):
    return nnx.eval_shape(lambda: factory(rngs=nnx.Rngs(0), **kwargs))


def test_summary_real_vgg16_receptive_fields():
    s = summary(_abstract_model(models.vgg16, num_classes=1000), _abstract((1, 224, 224, 3)))
    spatial = [r for r in s.rows if r.type in ("Conv", "MaxPool")]
    assert [(r.type, r.receptive_field, r.jump) for r in spatial[-2:]] == [
        ("Conv", (196, 196), (16, 16)),
        ("MaxPool", (212, 212), (32, 32)),
    ]
    assert s.total_params == 138_357_544  # torchvision's vgg16


def test_summary_real_resnet50_is_4_1_gmacs():
    """ResNet-50 at 224x224 is quoted at 4.1 GFLOPs, counting multiply-adds (conv + fc)."""
    s = summary(_abstract_model(models.resnet50, num_classes=1000), _abstract((1, 224, 224, 3)))
    conv_and_dense = sum(r.macs for r in s.rows if r.type in ("Conv", "Linear"))
    assert s.total_macs == conv_and_dense
    assert 4.05e9 < s.total_macs < 4.15e9
    assert 8.1e9 < s.total_flops < 8.3e9  # notes' FLOPs: 2 per MAC, plus pools and batch norms
    assert s.total_params == 25_557_032  # torchvision's resnet50


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("LeNet5", {}, (1, 28, 28, 1)),
        ("AlexNet", {"num_classes": 1000}, (1, 224, 224, 3)),
        ("vgg11", {"small_input": True}, (1, 32, 32, 3)),
        ("NiN", {"small_input": True}, (1, 32, 32, 3)),
        ("GoogLeNet", {"num_classes": 1000}, (1, 224, 224, 3)),
        ("resnet18", {"small_input": True}, (1, 32, 32, 3)),
        ("densenet121", {"num_classes": 1000}, (1, 224, 224, 3)),
        ("MobileNetV1", {"num_classes": 1000}, (1, 224, 224, 3)),
    ],
)
def test_summary_covers_every_model(name, kwargs, shape):
    model = _abstract_model(getattr(models, name), **kwargs)
    s = summary(model, _abstract(shape))
    assert s.total_params == count_params(model) == sum(r.params for r in s.rows)
    assert s.total_flops > 2 * s.total_macs > 0
    spatial = [r for r in s.rows if r.type not in ("Linear", "BatchNorm")]
    assert spatial and all(r.receptive_field is not None for r in spatial)
    fields = [r.receptive_field[0] for r in spatial]
    assert fields[0] > 1 and max(fields) == fields[-1]  # the field only grows towards the head
