"""The notes' pooling sections (notes 000-004, docs/index.md#the-study-notes) as tests; each test names its note.

Note 002 (SPP): ``win = ceil(a/n), stride = floor(a/n)``; note 000: pooling acts on each channel
separately and has no parameters; note 001 section 4.1: the window slides left to right, top to
bottom; notes 001/004 (d2l's pooling section): 2x2 max/average pooling of ``[[0..8]]``.
"""

import math

import jax
import numpy as np
import pytest
from jax import numpy as jnp

from cnnjax.pooling import (
    adaptive_avg_pool,
    adaptive_max_pool,
    avg_pool,
    global_avg_pool,
    max_pool,
    max_pool_with_indices,
    max_unpool,
    spatial_pyramid_pool,
)
from cnnjax.shapes import pool_output_size


def _note_002_spp_window(a: int, n: int) -> tuple[int, int]:
    """Note 002's SPP rule: ``win_size = ceil(in/out)``, ``stride = floor(in/out)``."""
    return math.ceil(a / n), math.floor(a / n)


def test_002_spp_13x13_map_two_bins_window_7_stride_6():
    """note 002: a 13x13 conv5 map pooled to 2x2 uses window 7, stride 6; here the
    rule agrees with PyTorch's adaptive bins ([0, 7) and [6, 13))."""
    win, stride = _note_002_spp_window(13, 2)
    assert (win, stride) == (7, 6)
    assert pool_output_size(13, win, stride) == 2
    x = jax.random.normal(jax.random.key(2), (2, 13, 13, 4))
    np.testing.assert_array_equal(max_pool(x, win, stride), adaptive_max_pool(x, 2))
    np.testing.assert_allclose(avg_pool(x, win, stride), adaptive_avg_pool(x, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("a,n,bins_by_rule", [(5, 3, 4), (7, 4, 6), (6, 4, 5), (7, 5, 6)])
def test_002_spp_rule_gives_wrong_bin_count_where_adaptive_does_not(a, n, bins_by_rule):
    """note 002's rule fails when a/n is not an integer: a=5, n=3 gives window 2,
    stride 1, hence 4 bins, not 3 (and a=7, n=4 gives 6). Adaptive pooling picks each bin's own
    edges ``[floor(i*a/n), ceil((i+1)*a/n))``, so it always gives n bins covering the whole map."""
    win, stride = _note_002_spp_window(a, n)
    assert pool_output_size(a, win, stride) == bins_by_rule != n
    x = jnp.arange(float(a)).reshape(1, a, 1)
    assert max_pool(x, win, stride).shape == (1, bins_by_rule, 1)
    y = adaptive_max_pool(x, n)
    assert y.shape == (1, n, 1)
    assert y[0, -1, 0] == a - 1  # the last bin reaches the end of the map


def test_002_spp_1x1_2x2_4x4_levels_give_fixed_length_features():
    """note 002: 1x1, 2x2 and 4x4 pooling of a 256-channel map gives 1 + 4 + 16
    vectors of 256, whatever the map size (a 13x13 map: level 1 is window 13, stride 13)."""
    for size in (13, 10, 7):
        y = spatial_pyramid_pool(jnp.ones((1, size, size, 256)), (1, 2, 4))
        assert y.shape == (1, 256 * (1 + 4 + 16))
    x = jax.random.normal(jax.random.key(0), (1, 13, 13, 256))
    np.testing.assert_array_equal(spatial_pyramid_pool(x, (1,)), max_pool(x, 13, 13).reshape(1, 256))


def test_000_pooling_acts_per_channel_without_parameters():
    """note 000, "Pooling in Multi-Channel Convolution": each channel is pooled on
    its own and the channel count is unchanged; pooling has no parameters (note 002: its
    parameter count is 0), so the result depends on nothing but the input."""
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 5))
    for pool in (lambda a: max_pool(a, 2), lambda a: avg_pool(a, 3, 1, 1)):
        y = pool(x)
        assert y.shape[-1] == 5
        per_channel = jnp.concatenate([pool(x[..., c : c + 1]) for c in range(5)], axis=-1)
        np.testing.assert_array_equal(y, per_channel)


def test_001_004_max_and_average_pooling_of_0_to_8():
    """note 001 section 4 and note 004 ("汇聚层"): a 2x2 window
    over ``[[0, 1, 2], [3, 4, 5], [6, 7, 8]]`` with stride 1."""
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    np.testing.assert_array_equal(max_pool(x, 2, 1)[0, ..., 0], [[4, 5], [7, 8]])
    np.testing.assert_array_equal(avg_pool(x, 2, 1)[0, ..., 0], [[2, 3], [5, 6]])


def test_001_pooling_padding_stride_and_channels():
    """note 001 sections 4.2 (padding and stride) and 4.3 (multiple channels), as
    in d2l: a 4x4 ``arange`` with a 3x3 window (stride defaults to the window), then padding 1
    and stride 2, then a (2, 3) window; two channels X and X + 1 pool separately."""
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(max_pool(x, 3)[0, ..., 0], [[10]])
    np.testing.assert_array_equal(max_pool(x, 3, 2, 1)[0, ..., 0], [[5, 7], [13, 15]])
    np.testing.assert_array_equal(max_pool(x, (2, 3), (2, 3), (0, 1))[0, ..., 0], [[5, 7], [13, 15]])
    two = jnp.concatenate([x, x + 1], axis=-1)
    np.testing.assert_array_equal(
        jnp.moveaxis(max_pool(two, 3, 2, 1)[0], -1, 0), [[[5, 7], [13, 15]], [[6, 8], [14, 16]]]
    )


def test_001_window_slides_left_to_right_top_to_bottom():
    """note 001 section 4.1: the window slides left to right, then top to bottom;
    on ties the maximum recorded is the first met in that order (h*W + w is smallest)."""
    x = jnp.array([[7.0, 1.0, 7.0], [7.0, 2.0, 3.0]]).reshape(1, 2, 3, 1)
    values, indices = max_pool_with_indices(x, (2, 2), 1)
    np.testing.assert_array_equal(values[0, ..., 0], [[7, 7]])
    np.testing.assert_array_equal(indices[0, ..., 0], [[0, 2]])


def test_002_pooling_backprop_mean_splits_max_routes_to_max_id():
    """note 002, "Pooling池化操作的反向梯度传播": mean pooling splits each gradient
    evenly over its n inputs (the total is conserved); max pooling sends it to the recorded max id
    alone, i.e. the gradient is the upstream gradient unpooled to the max positions."""
    x = jax.random.normal(jax.random.key(3), (1, 4, 4, 2))
    dy = jax.random.normal(jax.random.key(4), (1, 2, 2, 2))
    _, pull_avg = jax.vjp(lambda a: avg_pool(a, 2), x)
    dx_avg = pull_avg(dy)[0]
    np.testing.assert_allclose(dx_avg, jnp.repeat(jnp.repeat(dy, 2, axis=1), 2, axis=2) / 4, rtol=1e-6)
    np.testing.assert_allclose(dx_avg.sum(), dy.sum(), rtol=1e-5)
    _, pull_max = jax.vjp(lambda a: max_pool(a, 2), x)
    _, max_id = max_pool_with_indices(x, 2)
    np.testing.assert_array_equal(pull_max(dy)[0], max_unpool(dy, max_id, (4, 4)))


def test_002_pool_2x2_stride_2_halves_height_and_width():
    """note 002: the usual f=2, s=2 (and p=0) halves height and width; an
    overlapping 3x3, stride-2 pool (window > stride) maps AlexNet's 55 -> 27 -> 13 -> 6."""
    assert max_pool(jnp.ones((1, 224, 224, 3)), 2, 2).shape == (1, 112, 112, 3)
    sizes = [55]
    for _ in range(3):
        sizes.append(max_pool(jnp.ones((1, sizes[-1], sizes[-1], 1)), 3, 2).shape[1])
    assert sizes == [55, 27, 13, 6]


def test_002_global_average_pooling_7x7x1000():
    """note 002: average over the whole 7x7x1000 representation gives 1x1x1000."""
    x = jax.random.normal(jax.random.key(5), (1, 7, 7, 1000))
    y = global_avg_pool(x, keepdims=True)
    assert y.shape == (1, 1, 1, 1000)
    np.testing.assert_allclose(y[0, 0, 0], x[0].mean(axis=(0, 1)), rtol=1e-5, atol=1e-6)
