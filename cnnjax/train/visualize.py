"""Pictures of what a 2-D CNN computes: feature maps, first-layer filters, effective receptive fields, saliency.

Each function returns a small frozen result holding NumPy arrays (the numbers behind the
picture) with two methods, as a matplotlib user expects of a plotting helper:

- ``result.plot(...)`` draws it and returns a ``matplotlib.figure.Figure`` (on the non-interactive
  Agg canvas: nothing opens a window, nothing touches ``pyplot``'s global state; a notebook shows
  the figure when it is the cell's value);
- ``result.save(path, ...)`` writes that figure as a PNG (or any format matplotlib knows by the
  suffix) and returns the path.

Layers are named as :func:`cnnjax.analysis.summary` prints them (attribute paths such as
``"features.0"`` or ``"conv1"``), and their outputs are intercepted from outside the layers, as
``summary`` does (the layers hold no hook). Models run on a copy in evaluation mode
(``.eval()``: BatchNorm on running statistics, no dropout); ``model`` itself is not modified.
Inputs are channels-last ``(N, H, W, C)`` images, or one unbatched ``(H, W, C)`` image.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cnnjax import analysis

__all__ = [
    "EffectiveReceptiveField",
    "FeatureMaps",
    "Filters",
    "Saliency",
    "effective_receptive_field",
    "feature_maps",
    "filters",
    "saliency",
]


def _figure(rows: int, cols: int, cell: float = 1.4) -> tuple[Figure, np.ndarray]:
    """A figure on the Agg canvas with a ``rows x cols`` grid of axes, ticks off."""
    figure = Figure(figsize=(cols * cell, rows * cell), layout="constrained")
    FigureCanvasAgg(figure)
    axes = np.asarray(figure.subplots(rows, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    return figure, axes


class _Picture:
    """``save`` for results whose ``plot`` returns a figure."""

    def save(self, path, *, dpi: int = 100, **plot_kwargs) -> Path:
        """Write ``self.plot(**plot_kwargs)`` to ``path`` (format by its suffix, PNG for ``.png``); returns the path."""
        path = Path(path)
        self.plot(**plot_kwargs).savefig(path, dpi=dpi)
        return path


def _images(op: str, x) -> jax.Array:
    """``x`` as a float batch ``(N, H, W, C)``: an unbatched ``(H, W, C)`` image gets ``N = 1``."""
    x = jnp.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"{op}: x must be (N, H, W, C) or (H, W, C) images, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{op}: x must be a float array, got dtype {x.dtype}")
    return x


def _named_layer(op: str, model, layer: str):
    """The layer of ``model`` that ``summary`` names ``layer``; ``ValueError`` listing the names otherwise."""
    if not isinstance(layer, str):
        raise TypeError(f"{op}: layer must be a name as analysis.summary prints it (a str), got {layer!r}")
    layers = analysis._counted_layers(model)
    if layer not in layers:
        raise ValueError(f"{op}: layer={layer!r} is not a layer of the model; analysis.summary names {list(layers)}")
    return layers[layer]


def _layer_output(model, layer: str, op: str):
    """``(forward, state)``: ``forward(state, x)`` runs an eval-mode copy of ``model`` on ``x`` and returns
    the output of its layer named ``layer`` at that layer's first call (intercepted as ``summary``
    does). The weights are an argument, so that a jitted ``forward`` does not fold them in as constants."""
    graphdef, state = nnx.split(model)

    def forward(state, x):
        module = nnx.merge(graphdef, state)
        module.eval()
        target = _named_layer(op, module, layer)
        outputs = []
        with analysis._recording_calls([target], lambda _, __, y: outputs.append(y)):
            module(x)
        if not outputs:
            raise ValueError(f"{op}: layer {layer!r} is not called when the model runs")
        return outputs[0]

    return forward, state


@dataclasses.dataclass(frozen=True)
class FeatureMaps(_Picture):
    """The output of one layer: ``maps`` ``(N, H, W, C)`` (as the layer returns it), named ``layer``."""

    layer: str
    maps: np.ndarray

    def plot(self, *, example: int = 0, max_maps: int = 64, cols: int = 8, cmap: str = "viridis") -> Figure:
        """A grid of the first ``max_maps`` channels of example ``example``, one panel per channel,
        each on its own colour scale (``imshow``'s default)."""
        if self.maps.ndim != 4:
            raise ValueError(f"FeatureMaps.plot: maps must be (N, H, W, C) to draw, got shape {self.maps.shape}")
        count = min(max_maps, self.maps.shape[-1])
        cols = min(cols, count)
        figure, axes = _figure(math.ceil(count / cols), cols)
        for c, ax in zip(range(count), axes.flat, strict=False):
            ax.imshow(self.maps[example, ..., c], cmap=cmap)
            ax.set_title(str(c), fontsize=7)
        figure.suptitle(f"{self.layer}: {count} of {self.maps.shape[-1]} channels, example {example}", fontsize=9)
        return figure


def feature_maps(model, x, layer: str) -> FeatureMaps:
    """The feature maps of ``layer`` when ``model`` (an eval-mode copy) runs on ``x``; ``.plot()`` draws them as a grid.

    ``x``: ``(N, H, W, C_in)`` or ``(H, W, C_in)``. Returns :class:`FeatureMaps` with ``maps`` the
    layer's output, ``(N, H', W', C)`` for a conv or pool layer. ``layer`` is a name
    :func:`cnnjax.analysis.summary` prints; a layer called more than once gives its first call's
    output.

    >>> from cnnjax import models
    >>> model = models.LeNet5(rngs=nnx.Rngs(0))
    >>> fm = feature_maps(model, jnp.ones((28, 28, 1)), "conv1")
    >>> fm.maps.shape, type(fm.plot()).__name__
    ((1, 28, 28, 6), 'Figure')
    """
    op = "feature_maps"
    x = _images(op, x)
    forward, state = _layer_output(model, layer, op)
    return FeatureMaps(layer, np.asarray(jax.jit(forward)(state, x)))


@dataclasses.dataclass(frozen=True)
class Filters(_Picture):
    """A conv layer's kernels, ``kernels`` ``(C_out, kh, kw, C_in)`` (one filter per output channel)."""

    layer: str
    kernels: np.ndarray

    def plot(self, *, max_filters: int = 64, cols: int = 8) -> Figure:
        """One panel per filter, each scaled to its own ``[min, max]``: in colour when ``C_in == 3``
        (RGB, the usual first layer), else the mean over input channels in grey."""
        count = min(max_filters, len(self.kernels))
        cols = min(cols, count)
        figure, axes = _figure(math.ceil(count / cols), cols, cell=0.9)
        for kernel, ax in zip(self.kernels[:count], axes.flat, strict=False):
            low, high = kernel.min(), kernel.max()
            scaled = (kernel - low) / (high - low) if high > low else np.zeros_like(kernel)
            if kernel.shape[-1] == 3:
                ax.imshow(scaled, interpolation="nearest")
            else:
                ax.imshow(scaled.mean(-1), cmap="gray", interpolation="nearest")
        figure.suptitle(f"{self.layer}: {count} of {len(self.kernels)} filters", fontsize=9)
        return figure


def filters(model, layer: str) -> Filters:
    """The kernels of a 2-D conv layer (usually the first, whose filters look at pixels); ``.plot()`` draws them.

    ``layer``: a name :func:`cnnjax.analysis.summary` prints, of a layer with an HWIO ``kernel``
    ``(kh, kw, C_in, C_out)`` (:class:`cnnjax.nn.Conv`, ``DepthwiseConv``, ...). Returns
    :class:`Filters` with ``kernels`` ``(C_out, kh, kw, C_in)``, PyTorch's filter order with the
    channels last, as ``imshow`` takes an RGB image. No input is needed: nothing runs.

    >>> from cnnjax import models
    >>> filters(models.LeNet5(rngs=nnx.Rngs(0)), "conv1").kernels.shape
    (6, 5, 5, 1)
    """
    op = "filters"
    module = _named_layer(op, model, layer)
    kernel = getattr(module, "kernel", None)
    if kernel is None or np.ndim(kernel) != 4:
        shape = None if kernel is None else np.shape(kernel)
        raise ValueError(
            f"filters: layer {layer!r} ({type(module).__name__}) has no 2-D conv kernel (kernel shape {shape})"
        )
    return Filters(layer, np.transpose(np.asarray(kernel[...]), (3, 0, 1, 2)))


@dataclasses.dataclass(frozen=True)
class EffectiveReceptiveField(_Picture):
    """The gradient picture of one central output unit, and its theoretical receptive field.

    ``erf`` ``(H, W)``: ``sum over examples and input channels of |d y[unit] / d x|``; ``unit``:
    the output position ``(i, j)``; ``box``: the theoretical field ``((top, bottom), (left, right))``
    in input pixels, inclusive (it may reach past the image where padding is); ``size`` and
    ``jump``: ``analysis.summary``'s receptive field and jump at ``layer``.
    """

    layer: str
    erf: np.ndarray
    unit: tuple[int, int]
    box: tuple[tuple[float, float], tuple[float, float]]
    size: tuple[int, int]
    jump: tuple[int, int]

    def plot(self, *, cmap: str = "magma") -> Figure:
        """The ERF as an image (normalized to its maximum) with the theoretical field as a box over it."""
        figure, axes = _figure(1, 1, cell=4.0)
        ax = axes[0, 0]
        peak = self.erf.max()
        ax.imshow(self.erf / peak if peak > 0 else self.erf, cmap=cmap)
        (top, bottom), (left, right) = self.box
        ax.add_patch(
            Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1, fill=False, color="cyan", lw=1.5)
        )
        ax.set_xlim(-0.5, self.erf.shape[1] - 0.5)
        ax.set_ylim(self.erf.shape[0] - 0.5, -0.5)
        size = "x".join(map(str, self.size))
        ax.set_title(f"ERF of {self.layer}, unit {self.unit}\ntheoretical receptive field {size} (box)", fontsize=9)
        return figure


def effective_receptive_field(model, x, layer: str) -> EffectiveReceptiveField:
    """The effective receptive field of a central unit of ``layer`` (Luo et al. 2016, arXiv:1701.04128).

    The gradient of the output at the central position ``(H'//2, W'//2)`` of ``layer`` (summed over
    its channels) with respect to the input ``x`` ``(N, H, W, C)`` (or ``(H, W, C)``), its absolute
    value summed over examples and input channels: ``erf`` ``(H, W)``. Luo et al. average it over
    many random inputs; pass a batch of them (or real images) as ``x``. The theoretical field is
    :func:`cnnjax.analysis.summary`'s at ``layer``: ``size`` and ``jump``, and the ``box`` centred
    at ``start + unit * jump`` (``ValueError`` where ``summary`` defines no field, e.g. after a
    dense layer). ``.plot()`` draws the ERF with the box over it.

    >>> from cnnjax import nn
    >>> model = nn.Conv(1, 1, (3, 3), rngs=nnx.Rngs(0))
    >>> r = effective_receptive_field(model, jnp.ones((9, 9, 1)), "Conv")
    >>> r.unit, r.box, r.size, np.argwhere(r.erf > 0).min(0).tolist(), np.argwhere(r.erf > 0).max(0).tolist()
    ((4, 4), ((3.0, 5.0), (3.0, 5.0)), (3, 3), [3, 3], [5, 5])
    """
    op = "effective_receptive_field"
    x = _images(op, x)
    forward, state = _layer_output(model, layer, op)
    out = jax.eval_shape(forward, state, x)
    if len(out.shape) != 4:
        raise ValueError(f"{op}: layer {layer!r} output has shape {out.shape}, not (N, H, W, C): no spatial unit")
    unit = (out.shape[1] // 2, out.shape[2] // 2)
    gradient = jax.jit(jax.grad(lambda x, state: forward(state, x)[:, unit[0], unit[1], :].sum()))(x, state)
    erf = np.asarray(jnp.abs(gradient).sum(axis=(0, 3)))
    row = next(r for r in analysis.summary(model, jax.ShapeDtypeStruct(x.shape, x.dtype)).rows if r.name == layer)
    if row.receptive_field is None:
        raise ValueError(f"{op}: analysis.summary defines no receptive field at layer {layer!r} ({row.type})")
    centres = [start + u * jump for start, u, jump in zip(row.start, unit, row.jump, strict=True)]
    box = tuple((c - (size - 1) / 2, c + (size - 1) / 2) for c, size in zip(centres, row.receptive_field, strict=True))
    return EffectiveReceptiveField(layer, erf, unit, box, row.receptive_field, row.jump)


@dataclasses.dataclass(frozen=True)
class Saliency(_Picture):
    """Gradient x input saliency: ``maps`` ``(N, H, W)`` of ``|sum over channels of x * d logit / d x|``
    for the logit ``classes[n]`` of each example, beside ``images`` ``(N, H, W, C)`` to draw."""

    images: np.ndarray
    maps: np.ndarray
    classes: np.ndarray

    def plot(self, *, example: int = 0, title: str | None = None, cmap: str = "inferno") -> Figure:
        """Example ``example``'s image (scaled to ``[0, 1]``) and its saliency map side by side."""
        figure, axes = _figure(1, 2, cell=3.0)
        image = self.images[example]
        low, high = image.min(), image.max()
        image = (image - low) / (high - low) if high > low else np.zeros_like(image)
        axes[0, 0].imshow(
            image if image.shape[-1] == 3 else image[..., 0], cmap=None if image.shape[-1] == 3 else "gray"
        )
        axes[0, 1].imshow(self.maps[example], cmap=cmap)
        axes[0, 1].set_title(f"gradient x input, class {int(self.classes[example])}", fontsize=9)
        if title is not None:
            axes[0, 0].set_title(title, fontsize=9)
        return figure


def saliency(model, x, classes=None) -> Saliency:
    """Gradient x input saliency (Shrikumar et al. 2016, arXiv:1605.01713) of ``model``'s logits on ``x``.

    ``x``: ``(N, H, W, C)`` or ``(H, W, C)``; ``classes``: one class per example (``(N,)`` ints),
    or ``None`` for each example's top-1 class. The model (an eval-mode copy) must return logits
    ``(N, num_classes)``. Returns :class:`Saliency`, ``maps`` ``(N, H, W)``.

    >>> from cnnjax import models
    >>> s = saliency(models.LeNet5(rngs=nnx.Rngs(0)), jnp.ones((2, 28, 28, 1)))
    >>> s.maps.shape, s.classes.shape
    ((2, 28, 28), (2,))
    """
    op = "saliency"
    x = _images(op, x)
    graphdef, state = nnx.split(model)

    def logits(state, x):
        module = nnx.merge(graphdef, state)
        module.eval()
        return module(x)

    out = jax.eval_shape(logits, state, x)
    if len(out.shape) != 2:
        raise ValueError(f"{op}: the model must return logits (N, num_classes), got shape {out.shape}")
    if classes is None:
        classes = jnp.argmax(jax.jit(logits)(state, x), axis=-1)
    classes = jnp.asarray(classes)
    if classes.shape != (x.shape[0],) or not jnp.issubdtype(classes.dtype, jnp.integer):
        raise ValueError(f"{op}: classes must be ({x.shape[0]},) ints, one per example, got {classes!r}")
    chosen = lambda x, state: jnp.take_along_axis(logits(state, x), classes[:, None], axis=-1).sum()
    gradient = jax.jit(jax.grad(chosen))(x, state)
    maps = np.asarray(jnp.abs((gradient * x).sum(axis=-1)))
    return Saliency(np.asarray(x), maps, np.asarray(classes))
