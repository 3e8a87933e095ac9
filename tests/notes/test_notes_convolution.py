"""The convolution worked examples of notes 000-004 (the study notes: docs/index.md#the-study-notes).

Each test names its note file; numbers are the notes' own printed outputs unless a docstring
says why not.
"""

import itertools
import runpy
from pathlib import Path

import jax
import numpy as np
import pytest
from jax import numpy as jnp

from cnnjax.convolution import conv, conv_transpose, corr2d

EDGE_DETECTION = Path(__file__).resolve().parents[2] / "experiments" / "edge_detection.py"

X_0_TO_8 = np.arange(9.0, dtype=np.float32).reshape(3, 3)
X_1_TO_9 = X_0_TO_8 + 1
K_0123 = np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32)
# notes 001/004, multi-input-channel example: X is (2, 3, 3), K is (2, 2, 2)
X_TWO_CHANNELS = np.stack([X_0_TO_8, X_1_TO_9])
K_TWO_CHANNELS = np.stack([K_0123, K_0123 + 1])


def _plane(x):
    """A 2-D array as a one-image, one-channel NCHW batch."""
    return jnp.asarray(x)[None, None]


def _out_hw(input_hw, kernel_hw, **geometry):
    """Output (H, W) of an NCHW conv, computed abstractly (no FLOPs spent)."""
    x = jax.ShapeDtypeStruct((1, 1, *input_hw), jnp.float32)
    w = jax.ShapeDtypeStruct((1, 1, *kernel_hw), jnp.float32)
    return jax.eval_shape(lambda x, w: conv(x, w, layout="NCHW", **geometry), x, w).shape[2:]


@pytest.mark.parametrize("note", ["001_9ffafabebafa9c6f", "004_9861da06b4e8ac02"])
def test_corr2d_example(note):
    """Notes 001 section 1.1 and 004 (互相关运算): 0*0 + 1*1 + 3*2 + 4*3 = 19, ..."""
    np.testing.assert_array_equal(corr2d(X_0_TO_8, K_0123), [[19.0, 25.0], [37.0, 43.0]])


def test_001_9ffafabebafa9c6f_edge_detection():
    """Note 001 section 1.3: K = [[1, -1]] marks the vertical edges of the 6x8 image."""
    edges = runpy.run_path(str(EDGE_DETECTION))
    y = corr2d(edges["edge_image"](), edges["EDGE_KERNEL"])
    expected = np.zeros((6, 7), np.float32)
    expected[:, 1], expected[:, 5] = 1.0, -1.0
    np.testing.assert_array_equal(y, expected)


def test_001_9ffafabebafa9c6f_edge_detection_on_the_transpose_is_zero():
    """Note 001 section 1.3: the [1, -1] kernel only sees vertical edges, so X.T gives zeros."""
    edges = runpy.run_path(str(EDGE_DETECTION))
    y = corr2d(edges["edge_image"]().T, edges["EDGE_KERNEL"])
    np.testing.assert_array_equal(y, np.zeros((8, 5)))


def test_001_9ffafabebafa9c6f_learning_the_edge_kernel():
    """Note 001 section 1.4: lr 3e-2, squared error, no bias; the loss falls to ~0 within tens
    of steps (the note prints 4.949 at step 2 and 0.004 at step 10) and K nears [1, -1]."""
    edges = runpy.run_path(str(EDGE_DETECTION))
    x = edges["edge_image"]()
    kernel, losses = edges["learn_kernel"](x, corr2d(x, edges["EDGE_KERNEL"]), steps=20, learning_rate=3e-2, log=None)
    assert losses[1] > 1.0
    assert losses[9] < 0.05
    assert losses[-1] < 1e-3
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    np.testing.assert_allclose(kernel, [[1.0, -1.0]], atol=0.02)


def test_001_9ffafabebafa9c6f_edge_detection_script_runs(tmp_path, capsys):
    """The experiment script end to end, with its figure."""
    edges = runpy.run_path(str(EDGE_DETECTION))
    figure = tmp_path / "edges.png"
    assert edges["main"](["--plot", str(figure)]) == 0
    out = capsys.readouterr().out
    assert "batch 20, loss 0.000" in out
    assert "learned kernel: [[ 1." in out
    assert figure.stat().st_size > 0


@pytest.mark.parametrize("note", ["001_9ffafabebafa9c6f", "004_9861da06b4e8ac02"])
def test_two_input_channels(note):
    """Notes 001 section 3.1 and 004 (多输入通道): channel results are summed -> [[56, 72], [104, 120]]."""
    y = conv(X_TWO_CHANNELS[None], K_TWO_CHANNELS[None], layout="NCHW")
    np.testing.assert_array_equal(y[0, 0], [[56.0, 72.0], [104.0, 120.0]])
    np.testing.assert_array_equal(
        y[0, 0], sum(corr2d(x, k) for x, k in zip(X_TWO_CHANNELS, K_TWO_CHANNELS, strict=True))
    )


def test_001_9ffafabebafa9c6f_three_output_channels():
    """Note 001 section 3.2: K, K+1, K+2 stacked is a (3, 2, 2, 2) kernel and gives a (3, 2, 2) output.

    Output i adds i times the 2x2 window sums over both channels ([[20, 28], [44, 52]]).
    """
    kernel = np.stack([K_TWO_CHANNELS, K_TWO_CHANNELS + 1, K_TWO_CHANNELS + 2])
    assert kernel.shape == (3, 2, 2, 2)
    y = conv(X_TWO_CHANNELS[None], kernel, layout="NCHW")[0]
    assert y.shape == (3, 2, 2)
    np.testing.assert_array_equal(
        y,
        [[[56.0, 72.0], [104.0, 120.0]], [[76.0, 100.0], [148.0, 172.0]], [[96.0, 128.0], [192.0, 224.0]]],
    )


def test_001_9ffafabebafa9c6f_1x1_conv_is_a_matrix_product_over_channels():
    """Note 001 section 3.3: a 1x1 conv with a (2, 3, 1, 1) kernel equals K (2x3) @ X (3 x HW)."""
    key_x, key_k = jax.random.split(jax.random.key(0))
    x = jax.random.uniform(key_x, (3, 3, 3))
    k = jax.random.uniform(key_k, (2, 3, 1, 1))
    y = conv(x[None], k, layout="NCHW")[0]
    as_matmul = (k.reshape(2, 3) @ x.reshape(3, 9)).reshape(2, 3, 3)
    assert float(jnp.linalg.norm(y - as_matmul)) < 1e-6


@pytest.mark.parametrize(
    ("kernel", "geometry", "expected"),
    [
        ((3, 3), {"padding": 1}, (8, 8)),
        ((5, 3), {"padding": (2, 1)}, (8, 8)),
        ((3, 3), {"padding": 1, "strides": 2}, (4, 4)),
        ((3, 5), {"padding": (0, 1), "strides": (3, 4)}, (2, 2)),
    ],
)
def test_001_9ffafabebafa9c6f_output_shapes_on_8x8(kernel, geometry, expected):
    """Note 001 section 2 (填充和步幅): the four comp_conv2d shape examples on an 8x8 input."""
    assert _out_hw((8, 8), kernel, **geometry) == expected


@pytest.mark.parametrize("note", ["001_9ffafabebafa9c6f", "004_9861da06b4e8ac02"])
def test_stride_3_2_on_the_padded_3x3_example(note):
    """Notes 001 section 2.2 and 004 (步幅): stride (3, 2), padding 1 -> [[0, 8], [6, 8]]."""
    y = conv(_plane(X_0_TO_8), _plane(K_0123), strides=(3, 2), padding=1, layout="NCHW")
    np.testing.assert_array_equal(y[0, 0], [[0.0, 8.0], [6.0, 8.0]])


def test_000_5cec9f0093f625fe_padded_example():
    """Note 000 (Padding): [[1..9]] padded by 1, correlated with [[1, 2], [3, 4]]."""
    y = conv(_plane(X_1_TO_9), _plane(K_0123 + 1), padding=1, layout="NCHW")
    np.testing.assert_array_equal(
        y[0, 0], [[4.0, 11.0, 18.0, 9.0], [18.0, 37.0, 47.0, 21.0], [36.0, 67.0, 77.0, 33.0], [14.0, 23.0, 26.0, 9.0]]
    )


def test_000_5cec9f0093f625fe_unpadded_example_true_values():
    """Note 000 (Receptive Field): [[1..9]] correlated with [[1, 2], [3, 4]], no padding.

    The note prints [[19, 22], [43, 46]], a slip: its own text says the first output is the
    field [[1, 2], [4, 5]] weighted by [[1, 2], [3, 4]], which is 1 + 4 + 12 + 20 = 37, not 19;
    and the same four windows appear, unpadded, at the centre of the note's padded example
    ([[37, 47], [67, 77]]). We test the true values.
    """
    y = corr2d(X_1_TO_9, K_0123 + 1)
    np.testing.assert_array_equal(y, [[37.0, 47.0], [67.0, 77.0]])
    padded = conv(_plane(X_1_TO_9), _plane(K_0123 + 1), padding=1, layout="NCHW")[0, 0]
    np.testing.assert_array_equal(y, padded[1:3, 1:3])


def test_000_5cec9f0093f625fe_ten_5x5_convs_shrink_240_to_200():
    """Note 000 (Padding): 240 - (5 - 1) * 10 = 200."""
    hw = (240, 240)
    for _ in range(10):
        hw = _out_hw(hw, (5, 5))
    assert hw == (200, 200)


def test_000_5cec9f0093f625fe_3x1024x1024_with_a_5x3x2x2_kernel():
    """Note 000 (Multi-Channel Convolution): a 3x1024x1024 image and a 5x3x2x2 kernel give 5x1023x1023."""
    x = jax.ShapeDtypeStruct((1, 3, 1024, 1024), jnp.float32)
    w = jax.ShapeDtypeStruct((5, 3, 2, 2), jnp.float32)
    assert jax.eval_shape(lambda x, w: conv(x, w, layout="NCHW"), x, w).shape == (1, 5, 1023, 1023)


def test_003_1424dad34322211b_example_and_bias():
    """Note 003 (nn.Conv2d demo): [[1..9]] with [[0, 1], [2, 3]] -> [[25, 31], [43, 49]]; bias 1 adds 1."""
    y = conv(_plane(X_1_TO_9), _plane(K_0123), layout="NCHW")
    np.testing.assert_array_equal(y[0, 0], [[25.0, 31.0], [43.0, 49.0]])
    y_bias = conv(_plane(X_1_TO_9), _plane(K_0123), jnp.array([1.0]), layout="NCHW")
    np.testing.assert_array_equal(y_bias[0, 0], [[26.0, 32.0], [44.0, 50.0]])


NOTE_003_MATRIX = np.array(
    [[0, 2, 4, 1, 0], [3, 1, 1, 0, 1], [2, 4, 1, 0, 1], [2, 0, 5, 2, 2], [0, 1, 3, 2, 1]], dtype=np.float32
)
NOTE_003_KERNEL = np.array([[1, 0, -1]] * 3, dtype=np.float32)


@pytest.mark.parametrize(
    ("padding", "expected"),
    [
        (0, [[-1, 6, 4], [0, 3, 3], [-5, 1, 5]]),
        (
            1,
            [[-3, -2, 2, 4, 1], [-7, -1, 6, 4, 1], [-5, 0, 3, 3, 2], [-5, -5, 1, 5, 4], [-1, -6, -3, 5, 4]],
        ),
    ],
)
def test_003_1424dad34322211b_5x5_padding_example(padding, expected):
    """Note 003 section 2.5 example 2: the 5x5 matrix with the [1, 0, -1] x3 kernel, padding 0 and 1.

    (The note rounds outputs that include nn.Conv2d's small random bias; without it they are exact.)
    """
    y = conv(_plane(NOTE_003_MATRIX), _plane(NOTE_003_KERNEL), padding=padding, layout="NCHW")
    np.testing.assert_array_equal(y[0, 0], np.array(expected, dtype=np.float32))


@pytest.mark.parametrize(("stride", "expected"), [(1, (3, 3)), (2, (2, 2))])
def test_003_1424dad34322211b_5x5_input_3x3_kernel_shapes(stride, expected):
    """Note 003 sections 2.4-2.5: (W - F + 2P) / S + 1 for a 5x5 input and a 3x3 kernel."""
    assert _out_hw((5, 5), (3, 3), strides=stride) == expected


def _note_002_zero_insertion(x, stride):
    """Note 002 (转置卷积): s - 1 zeros between neighbours and around the edge: s*n + s - 1 wide."""
    n_h, n_w = x.shape
    out = np.zeros((stride * n_h + stride - 1, stride * n_w + stride - 1), x.dtype)
    out[stride - 1 :: stride, stride - 1 :: stride] = x
    return out


@pytest.mark.parametrize(("kernel_size", "stride"), [(3, 2), (2, 2), (4, 2), (3, 3), (3, 1), (4, 3)])
def test_002_f507a061fff3ec1f_transposed_conv_as_zero_insertion(kernel_size, stride):
    """Note 002 (转置卷积): zero insertion then a stride-1 conv gives s*n + (s - k) pixels, and
    equals conv_transpose with stride s and padding k - s (the note's figure: k=3, s=2, p=1).

    The "transposed" kernel of the sliding-window form is the forward kernel rotated 180
    degrees (note 002's backprop: delta (*) rot180(W)).
    """
    rng = np.random.default_rng(kernel_size * 10 + stride)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    w = rng.standard_normal((kernel_size, kernel_size)).astype(np.float32)
    by_zero_insertion = corr2d(_note_002_zero_insertion(x, stride), w[::-1, ::-1])
    assert by_zero_insertion.shape == (stride * 3 + stride - kernel_size, stride * 4 + stride - kernel_size)
    by_conv_transpose = conv_transpose(
        _plane(x), _plane(w), strides=stride, padding=kernel_size - stride, layout="NCHW"
    )[0, 0]
    np.testing.assert_allclose(by_conv_transpose, by_zero_insertion, rtol=1e-5, atol=1e-5)
