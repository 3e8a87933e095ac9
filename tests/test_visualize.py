"""Tests for ``cnnjax.train.visualize``: the numbers behind each picture, and that the PNGs are written.

An ERF of a single conv is exactly its kernel's support (and its values the kernel's magnitudes);
a VGG block's theoretical box equals ``analysis.summary``'s receptive field; feature maps and
filters equal the layer's own output and kernel; saliency equals gradient x input by hand.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnnjax import analysis, models, nn
from cnnjax.train.visualize import effective_receptive_field, feature_maps, filters, saliency


def _png_written(path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_erf_of_one_3x3_conv_is_its_kernels_support(padding, tmp_path):
    model = nn.Conv(1, 1, (3, 3), padding=padding, use_bias=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 1))
    result = effective_receptive_field(model, x, "Conv")
    centre = 4  # SAME: unit (4, 4) of a 9x9 output; VALID: unit (3, 3) of 7x7, over input pixel 3 + 1
    expected = np.zeros((9, 9))
    expected[centre - 1 : centre + 2, centre - 1 : centre + 2] = 2 * np.abs(np.asarray(model.kernel[..., 0, 0]))
    np.testing.assert_allclose(result.erf, expected, rtol=1e-6)
    assert result.box == ((centre - 1, centre + 1), (centre - 1, centre + 1)) and result.size == (3, 3)
    _png_written(result.save(tmp_path / "erf.png"))


def test_vgg_blocks_theoretical_box_is_analysis_receptive_field():
    block = nnx.Sequential(
        nn.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)),
        jax.nn.relu,
        nn.Conv(4, 4, (3, 3), rngs=nnx.Rngs(1)),
        jax.nn.relu,
        nn.MaxPool((2, 2)),
    )
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    rows = {r.name: r for r in analysis.summary(block, x).rows}
    for layer, size in (("layers.0", 3), ("layers.2", 5), ("layers.4", 6)):
        result = effective_receptive_field(block, x, layer)
        assert result.size == rows[layer].receptive_field == (size, size)
        assert result.jump == rows[layer].jump
        for (lo, hi), n in zip(result.box, result.size, strict=True):
            assert hi - lo + 1 == n
        inside = np.zeros_like(result.erf, bool)
        (top, bottom), (left, right) = result.box
        inside[max(int(top), 0) : int(bottom) + 1, max(int(left), 0) : int(right) + 1] = True
        assert result.erf[~inside].max(initial=0) == 0 and result.erf[inside].max() > 0  # the ERF lies in the box


@pytest.fixture(scope="module")
def lenet_on_digits():
    from cnnjax.train.data import load_digits

    (x, _), _ = load_digits()
    return models.LeNet5(rngs=nnx.Rngs(0)), jnp.asarray(x[:3])


def test_feature_maps_are_the_layers_output(lenet_on_digits, tmp_path):
    model, x = lenet_on_digits
    result = feature_maps(model, x, "conv2")
    conv1 = model.conv1(x)
    expected = model.conv2(model.pool(jax.nn.sigmoid(conv1)))
    np.testing.assert_allclose(result.maps, np.asarray(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feature_maps(model, x[0], "conv1").maps, np.asarray(conv1[:1]), rtol=1e-5, atol=1e-6)
    _png_written(result.save(tmp_path / "maps.png", max_maps=8, cols=4))


def test_filters_are_the_kernels(lenet_on_digits, tmp_path):
    model, _ = lenet_on_digits
    result = filters(model, "conv1")
    np.testing.assert_array_equal(result.kernels, np.transpose(np.asarray(model.conv1.kernel[...]), (3, 0, 1, 2)))
    _png_written(result.save(tmp_path / "filters.png"))
    rgb = nnx.Sequential(nn.Conv(3, 5, (3, 3), rngs=nnx.Rngs(0)))
    assert filters(rgb, "layers.0").kernels.shape == (5, 3, 3, 3)
    _png_written(filters(rgb, "layers.0").save(tmp_path / "rgb.png"))


def test_saliency_is_gradient_times_input(lenet_on_digits, tmp_path):
    model, x = lenet_on_digits
    result = saliency(model, x)
    logits = model(x)
    np.testing.assert_array_equal(result.classes, np.argmax(np.asarray(logits), -1))
    for n in range(len(x)):
        g = jax.grad(lambda image, n=n: model(image[None])[0, result.classes[n]])(x[n])
        np.testing.assert_allclose(result.maps[n], np.abs(np.asarray((g * x[n]).sum(-1))), rtol=1e-4, atol=1e-7)
    _png_written(result.save(tmp_path / "saliency.png", example=1, title="a digit"))


def test_a_resnet_18s_layers_by_summarys_names(tmp_path):
    model = models.resnet18(num_classes=10, small_input=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    layer = "features.layers.4.residual.layers.1.conv"  # the second stage's last conv
    maps = feature_maps(model, x, layer)
    assert maps.maps.shape[1:3] == (16, 16)
    result = effective_receptive_field(model, x, layer)
    row = next(r for r in analysis.summary(model, x).rows if r.name == layer)
    assert result.size == row.receptive_field == (25, 25) and result.jump == (2, 2) and result.erf.shape == (32, 32)
    _png_written(result.save(tmp_path / "erf.png"))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: feature_maps(m, jnp.ones((28, 28, 1)), "conv9"), ValueError, r"feature_maps: layer='conv9' is not"),
        (lambda m: feature_maps(m, jnp.ones((28, 28, 1)), 0), TypeError, r"feature_maps: layer must be a name"),
        (lambda m: feature_maps(m, jnp.ones((28, 28)), "conv1"), ValueError, r"x must be \(N, H, W, C\)"),
        (lambda m: filters(m, "fc1"), ValueError, r"filters: layer 'fc1' \(Linear\) has no 2-D conv kernel"),
        (
            lambda m: effective_receptive_field(m, jnp.ones((1, 28, 28, 1)), "fc1"),
            ValueError,
            r"effective_receptive_field: layer 'fc1' output has shape \(1, 120\)",
        ),
        (lambda m: saliency(m, jnp.ones((2, 28, 28, 1)), [1]), ValueError, r"saliency: classes must be \(2,\) ints"),
    ],
)
def test_bad_arguments(call, error, match, lenet_on_digits):
    with pytest.raises(error, match=match):
        call(lenet_on_digits[0])


def test_the_library_does_not_import_matplotlib():
    code = "import sys, cnnjax, cnnjax.nn, cnnjax.models, cnnjax.analysis, cnnjax.testing; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip() == "False"
