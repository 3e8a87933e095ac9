"""The functional core in one namespace: every conv and pooling op, and :func:`as_lax` (also ``cnnjax.*``)."""

from cnnjax._primitives import as_lax
from cnnjax.convolution import (
    conv,
    conv_transpose,
    convolve2d,
    corr2d,
    depthwise_conv,
    rank1_factors,
    separable_conv,
    spatially_separable_conv,
)
from cnnjax.pooling import (
    adaptive_avg_pool,
    adaptive_max_pool,
    adaptive_max_pool_with_indices,
    avg_pool,
    global_avg_pool,
    global_max_pool,
    lp_pool,
    max_pool,
    max_pool_with_indices,
    max_unpool,
    min_pool,
    spatial_pyramid_pool,
    sum_pool,
)

__all__ = [
    "adaptive_avg_pool",
    "adaptive_max_pool",
    "adaptive_max_pool_with_indices",
    "as_lax",
    "avg_pool",
    "conv",
    "conv_transpose",
    "convolve2d",
    "corr2d",
    "depthwise_conv",
    "global_avg_pool",
    "global_max_pool",
    "lp_pool",
    "max_pool",
    "max_pool_with_indices",
    "max_unpool",
    "min_pool",
    "rank1_factors",
    "separable_conv",
    "spatial_pyramid_pool",
    "spatially_separable_conv",
    "sum_pool",
]
