"""Worked examples of note 002 (docs/index.md#the-study-notes), "FLOPS 和参数量的计算", "卷积公式和参数量",
"全连接层" and "感受野", reproduced with cnnjax.analysis."""

import jax
import jax.numpy as jnp
from flax import nnx

from cnnjax import nn
from cnnjax.analysis import (
    activation_flops,
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
from cnnjax.shapes import conv_output_size, receptive_field


def _summary(model, shape):
    return summary(model, jax.ShapeDtypeStruct(shape, jnp.float32))


def test_note_002_conv_flops_5x5_input_3x3_kernel_is_153():
    """9 multiplies + 8 adds = 17 per output, times the 3x3 output = 153 (one channel, no bias)."""
    assert conv_output_size(5, 3) == 3
    assert conv_flops(1, 1, (3, 3), (3, 3), bias=False) == 153 == 17 * 9
    assert conv_flops(1, 1, 3, 3, bias=True) == 18 * 9  # "考虑 bias 的时候是没有 -1"
    layer = nn.Conv(1, 1, (3, 3), padding="VALID", use_bias=False, rngs=nnx.Rngs(0))
    assert _summary(layer, (1, 5, 5, 1)).total_flops == 153


def test_note_002_conv_64x3x3x3_on_3x300x300_has_1792_params():
    assert conv_output_size(300, 3, stride=1, padding=1) == 300
    assert conv_params(3, 64, (3, 3)) == (9 * 3 + 1) * 64 == 1792
    assert conv_params(3, 64, (3, 3), bias=False) == 9 * 3 * 64
    (row,) = _summary(nn.Conv(3, 64, (3, 3), padding=1, rngs=nnx.Rngs(0)), (1, 300, 300, 3)).rows
    assert (row.output_shape, row.params) == ((1, 300, 300, 64), 1792)
    assert row.flops == conv_flops(3, 64, 3, 300) == 2 * 27 * 300 * 300 * 64


def test_note_002_flops_calculation_code_example():
    """The note's flops_calculation.py: n = 27 products, n + (n - 1) FLOPs per output, + 1 per ReLU output."""
    n = 3 * 3 * 3
    total = (n + (n - 1)) * 300 * 300 * 64 + 64 * 300 * 300
    assert conv_flops(3, 64, 3, 300, bias=False) + activation_flops("relu", (300, 300, 64)) == total == 311_040_000


def test_note_002_conv_macs_and_cpr_equal_output_size():
    """Calculations(MAC) = I*J*M*N*K*L, Params = I*J*K*L, so CPR = M*N (and B times that for a batch)."""
    i, j, m, n, k, l_out = 3, 5, 12, 10, 4, 6
    assert conv_macs(k, l_out, (i, j), (m, n)) == i * j * m * n * k * l_out
    assert conv_macs(k, l_out, (i, j), (m, n)) / conv_params(k, l_out, (i, j), bias=False) == m * n


def test_note_002_dense_params_slip_and_flops():
    """The note writes I*O + 1 for a biased FC layer; there is one bias per output: I*O + O."""
    assert dense_params(400, 120) == 400 * 120 + 120 == count_params(nnx.Linear(400, 120, rngs=nnx.Rngs(0)))
    assert dense_params(400, 120) != 400 * 120 + 1
    assert dense_params(400, 1) == 400 * 1 + 1  # the two agree only for a single output
    assert dense_flops(400, 120, bias=False) == (2 * 400 - 1) * 120
    assert dense_flops(400, 120) == 2 * 400 * 120
    assert dense_macs(400, 120) / dense_params(400, 120, bias=False) == 1  # the FC layer's CPR


def test_note_002_depthwise_separable_params_and_flops():
    """Params (no bias): k^2*C_in + C_in*C_out; FLOPs (with bias): 2*k^2*H*W*C_in + 2*C_in*H*W*C_out."""
    k, h, w, c_in, c_out = 3, 14, 14, 32, 64
    depthwise = conv_params(c_in, c_in, k, bias=False, groups=c_in)
    pointwise = conv_params(c_in, c_out, 1, bias=False)
    assert depthwise + pointwise == k * k * c_in + c_in * c_out
    flops = conv_flops(c_in, c_in, k, (h, w), groups=c_in) + conv_flops(c_in, c_out, 1, (h, w))
    assert flops == 2 * k * k * h * w * c_in + 2 * c_in * h * w * c_out
    layer = nn.SeparableConv(c_in, c_out, (k, k), use_bias=False, rngs=nnx.Rngs(0))
    assert count_params(layer) == k * k * c_in + c_in * c_out
    assert count_params(layer) < conv_params(c_in, c_out, k, bias=False)  # "参数量和计算量大大减少"


def test_note_002_pooling_flops_and_zero_params():
    """General pooling: k^2*H_out*W_out*C; global pooling: H_in*W_in*C; no parameters."""
    assert pool_flops(2, 14, 6) == 4 * 14 * 14 * 6
    assert global_pool_flops((7, 7), 512) == 7 * 7 * 512
    rows = _summary(nnx.Sequential(nn.MaxPool((2, 2)), nn.GlobalAvgPool()), (1, 28, 28, 6)).rows
    assert [(r.params, r.flops) for r in rows] == [(0, pool_flops(2, 14, 6)), (0, global_pool_flops(14, 6))]


def test_note_002_activation_flops_relu_1_sigmoid_4():
    assert activation_flops("relu", (8, 8, 16)) == 8 * 8 * 16
    assert activation_flops("sigmoid", (8, 8, 16)) == 4 * 8 * 8 * 16


def test_note_002_receptive_field_two_3x3_convs_is_5():
    """Top-down RF_prev = (RF - 1)*stride + kernel: two 3x3 stride-1 convs see 5x5."""
    assert receptive_field([(3, 1), (3, 1)]).size == 5
    model = nnx.Sequential(*(nn.Conv(1, 1, (3, 3), rngs=nnx.Rngs(0)) for _ in range(2)))
    assert [r.receptive_field for r in _summary(model, (1, 8, 8, 1)).rows] == [(3, 3), (5, 5)]


def test_note_002_dilated_convs_grow_the_field_exponentially():
    """Stacked 3x3 convs grow linearly, (k - 1)*layers + 1; dilations 1, 2, 4 grow it exponentially."""
    plain = nnx.Sequential(*(nn.Conv(1, 1, (3, 3), rngs=nnx.Rngs(0)) for _ in range(3)))
    dilated = nnx.Sequential(*(nn.Conv(1, 1, (3, 3), kernel_dilation=d, rngs=nnx.Rngs(0)) for d in (1, 2, 4)))
    assert _summary(plain, (1, 16, 16, 1)).rows[-1].receptive_field == ((3 - 1) * 3 + 1,) * 2
    assert [r.receptive_field[0] for r in _summary(dilated, (1, 16, 16, 1)).rows] == [3, 7, 15]


def test_note_002_vgg16_receptive_field_conv5_3_196_pool5_212():
    layers, c_in = [], 1
    for convs in (2, 2, 3, 3, 3):
        for _ in range(convs):
            layers += [nn.Conv(c_in, 2, (3, 3), padding=1, rngs=nnx.Rngs(0)), jax.nn.relu]
            c_in = 2
        layers.append(nn.MaxPool((2, 2)))
    rows = _summary(nnx.Sequential(*layers), (1, 32, 32, 1)).rows
    assert (rows[-2].type, rows[-2].receptive_field, rows[-1].receptive_field) == ("Conv", (196, 196), (212, 212))
