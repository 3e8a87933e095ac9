"""Conv kernel initializers and PyTorch weight-layout converters.

Initializers are factories, as in ``flax.nnx.initializers``: ``xavier_uniform_conv()`` returns
``init(key, shape, dtype=jnp.float32)``, ready for ``kernel_init=``. Fans are read from the
kernel shape: ``(*window, fan_in_channels, fan_out_channels)`` for channels-last layouts
(``layout=None``, the default, or ``"NWC"``/``"NHWC"``/``"NDHWC"``: HWIO, the kernels of
:class:`cnnjax.nn.Conv`) or ``(out, in, *window)`` for ``"NCW"``/``"NCHW"``/``"NCDHW"`` (OIHW), so
``fan_in = prod(window) * in`` and ``fan_out = prod(window) * out``, as Flax and PyTorch count
them (for a grouped kernel ``in`` is already ``C_in // groups``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax._canon import layout_of

__all__ = ["conv_fans", "from_torch_conv", "he_normal_conv", "to_torch_conv", "xavier_uniform_conv"]

_FAN_MODES = ("fan_in", "fan_out")


def conv_fans(shape, layout: str | None = None) -> tuple[int, int]:
    """``(fan_in, fan_out) = (prod(window) * in, prod(window) * out)`` of a conv kernel shape.

    ``shape``: ``(*window, in, out)`` (channels-last: ``None``, ``"NHWC"``, ...) or
    ``(out, in, *window)`` (``"NCHW"``, ...), with 1 to 3 window dims; a layout name must name
    the kernel's spatial rank (``"NWC"`` for a 1-D kernel), as in the conv ops.

    >>> conv_fans((3, 3, 16, 32)), conv_fans((32, 16, 3, 3), layout="NCHW")
    ((144, 288), (144, 288))
    """
    shape = tuple(shape)
    kernel_layout, _ = layout_of(shape, layout, "conv_fans", kernel_shape=shape, kernel_arg="kernel shape")
    window = math.prod(shape[a] for a in kernel_layout.kernel_spatial_axes)
    return window * shape[kernel_layout.kernel_in_axis], window * shape[kernel_layout.kernel_out_axis]


def xavier_uniform_conv(layout: str | None = None):
    """Xavier/Glorot uniform init for conv kernels, as the study notes state it (docs/layers.md).

    ``W ~ U(-b, b)`` with ``b = sqrt(6 / (k_h*k_w*(C_in + C_out)))`` (docs/layers.md:
    ``n_in = k_h*k_w*C_in``, ``n_out = k_h*k_w*C_out``,
    ``b = sqrt(6 / (n_in + n_out))``), so ``Var W = b^2/3 = 2 / (n_in + n_out)``. For 1-D and 3-D
    kernels ``k_h*k_w`` is the product of the window dims. Equal in distribution to
    ``nnx.initializers.glorot_uniform()`` and ``torch.nn.init.xavier_uniform_``.

    >>> w = xavier_uniform_conv()(jax.random.key(0), (3, 3, 16, 32))
    >>> w.shape, bool(jnp.abs(w).max() <= (6 / (3 * 3 * (16 + 32))) ** 0.5)
    ((3, 3, 16, 32), True)
    """

    def init(key, shape, dtype=jnp.float32):
        fan_in, fan_out = conv_fans(shape, layout)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def he_normal_conv(mode: str = "fan_in", layout: str | None = None):
    """He/Kaiming normal init for conv kernels followed by ReLU: ``W ~ N(0, 2 / fan)``.

    ``fan = prod(window) * C_in`` (``mode="fan_in"``, He et al. 2015, arXiv:1502.01852, eq. 10)
    or ``prod(window) * C_out`` (``mode="fan_out"``). An untruncated normal, as PyTorch's
    ``kaiming_normal_(w, nonlinearity="relu")``; Flax's ``he_normal`` truncates at two standard
    deviations and rescales instead.

    >>> w = he_normal_conv()(jax.random.key(0), (3, 3, 64, 64))
    >>> w.shape, round(float(w.std()) * (3 * 3 * 64 / 2) ** 0.5, 1)
    ((3, 3, 64, 64), 1.0)
    """
    if mode not in _FAN_MODES:
        raise ValueError(f"he_normal_conv: mode={mode!r} is not one of {_FAN_MODES}")

    def init(key, shape, dtype=jnp.float32):
        fan = conv_fans(shape, layout)[_FAN_MODES.index(mode)]
        return math.sqrt(2.0 / fan) * jax.random.normal(key, shape, dtype)

    return init


def _kernel_array(weight, op: str):
    """A NumPy/JAX array or a (CPU) torch tensor -> array of rank 3 to 5."""
    if hasattr(weight, "detach"):
        weight = weight.detach().cpu().numpy()
    ndim = np.ndim(weight)
    if not 3 <= ndim <= 5:
        raise ValueError(
            f"{op}: expected a conv weight of rank 3 to 5 (1 to 3 window dims), got shape {np.shape(weight)}"
        )
    return weight


def from_torch_conv(weight) -> jax.Array:
    """A PyTorch conv weight ``(O, I // groups, *window)`` (OIHW) -> a cnnjax kernel ``(*window, I // groups, O)`` (HWIO).

    ``weight``: a torch tensor (any ``requires_grad``, on CPU) or an array. The same
    permutation converts a ``ConvTranspose`` weight ``(C_in, C_out // groups, *window)`` to the
    kernel of :class:`cnnjax.nn.ConvTranspose`, ``(*window, C_out // groups, C_in)``: both
    libraries define the transposed conv as the adjoint of the conv with that weight, so no flip
    is needed. Biases need no conversion.

    >>> from_torch_conv(np.zeros((8, 3, 5, 4))).shape
    (5, 4, 3, 8)
    """
    weight = _kernel_array(weight, "from_torch_conv")
    rank = np.ndim(weight) - 2
    return jnp.transpose(jnp.asarray(weight), (*range(2, 2 + rank), 1, 0))


def to_torch_conv(kernel) -> np.ndarray:
    """A cnnjax kernel ``(*window, I // groups, O)`` (HWIO) -> a PyTorch weight ``(O, I // groups, *window)``.

    The inverse of :func:`from_torch_conv` (also for ``ConvTranspose``). Returns a NumPy array:
    ``torch.from_numpy(to_torch_conv(k))`` (cnnjax does not import torch).

    >>> to_torch_conv(np.zeros((5, 4, 3, 8))).shape
    (8, 3, 5, 4)
    """
    kernel = _kernel_array(kernel, "to_torch_conv")
    rank = np.ndim(kernel) - 2
    return np.ascontiguousarray(np.transpose(np.asarray(kernel), (rank + 1, rank, *range(rank))))
