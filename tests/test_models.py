"""Tests for ``cnnjax.models``.

- ImageNet configurations have torchvision's trainable-parameter counts, counted on abstract
  models (``nnx.eval_shape``: no weights are allocated), and map 224x224 images to 1000 logits.
- Every model maps 28x28x1 and 32x32x3 batches to ``(N, num_classes)`` with ``small_input=True``.
- One jitted optax step on a tiny batch lowers the loss, and a second step does not retrace.
- BatchNorm keeps running statistics as ``nnx.BatchStat``, updated in training mode only, with
  PyTorch's momentum; Dropout is active in training mode only; ``train=`` overrides the mode.

Building a model eagerly compiles one small XLA program per distinct parameter shape, so the
executed tests use narrow models (``width_multiplier``), built once and cloned, with "rbg" keys,
whose initializers compile about four times faster on CPU than the default threefry ones.
The jitted training step runs on a representative subset (``TRAINED``): LeNet-5 (sigmoid,
average pooling), AlexNet (MLP head), ResNet with bottleneck blocks, DenseNet
(concatenation) and MobileNet v2 (depthwise convs, inverted residuals), and on every other
narrow model with ``HYPOTHESIS_PROFILE=thorough``; every narrow model, VGG, NiN, GoogLeNet and
ResNet with basic blocks included, runs a jitted forward pass (``EXECUTED``).
"""

from __future__ import annotations

import functools
import math

import budget
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from abstract_models import abstract, make_rngs
from flax import nnx

from cnnjax import analysis, models
from cnnjax.models import (
    VGG,
    AlexNet,
    BasicBlock,
    Bottleneck,
    DenseNet,
    GoogLeNet,
    LeNet5,
    MobileNetV1,
    MobileNetV2,
    NiN,
    ResNet,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    mobilenet_v2,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    vgg11,
    vgg11_bn,
    vgg13,
    vgg13_bn,
    vgg16,
    vgg16_bn,
    vgg19,
    vgg19_bn,
    wide_resnet50_2,
)


def count_params(model) -> int:
    """Trainable parameters: the sizes of the ``nnx.Param`` leaves (abstract or concrete)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_logits(model, shape):
    """The shape and dtype ``model(x, train=False)`` returns for ``x`` of ``shape``, by tracing only."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return nnx.eval_shape(lambda m, x: m(x, train=False), model, x)


def images(seed: int, shape) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), shape)


# --- ImageNet configurations: torchvision's parameter counts ----------------------------------

_DOCS = "https://pytorch.org/vision/stable/models/generated/torchvision.models.{}.html"

# num_params of each model's IMAGENET1K_V1 weights on torchvision's documentation page _DOCS.
TORCHVISION_COUNTS = [
    pytest.param(AlexNet, 61_100_840, id="alexnet"),
    pytest.param(vgg11, 132_863_336, id="vgg11"),
    pytest.param(vgg11_bn, 132_868_840, id="vgg11_bn"),
    pytest.param(vgg13, 133_047_848, id="vgg13"),
    pytest.param(vgg13_bn, 133_053_736, id="vgg13_bn"),
    pytest.param(vgg16, 138_357_544, id="vgg16"),
    pytest.param(vgg16_bn, 138_365_992, id="vgg16_bn"),
    pytest.param(vgg19, 143_667_240, id="vgg19"),
    pytest.param(vgg19_bn, 143_678_248, id="vgg19_bn"),
    pytest.param(GoogLeNet, 6_624_904, id="googlenet"),
    pytest.param(resnet18, 11_689_512, id="resnet18"),
    pytest.param(resnet34, 21_797_672, id="resnet34"),
    pytest.param(resnet50, 25_557_032, id="resnet50"),
    pytest.param(resnet101, 44_549_160, id="resnet101"),
    pytest.param(resnet152, 60_192_808, id="resnet152"),
    pytest.param(resnext50_32x4d, 25_028_904, id="resnext50_32x4d"),
    pytest.param(resnext101_32x8d, 88_791_336, id="resnext101_32x8d"),
    pytest.param(wide_resnet50_2, 68_883_240, id="wide_resnet50_2"),
    pytest.param(densenet121, 7_978_856, id="densenet121"),
    pytest.param(densenet161, 28_681_000, id="densenet161"),
    pytest.param(densenet169, 14_149_480, id="densenet169"),
    pytest.param(densenet201, 20_013_928, id="densenet201"),
    pytest.param(mobilenet_v2, 3_504_872, id="mobilenet_v2"),
]


# One preset of each building block: the others are the same layers repeated.
SUMMARIZED = (AlexNet, vgg11, vgg11_bn, GoogLeNet, resnet18, resnet50, resnext50_32x4d, densenet121, mobilenet_v2)


@pytest.mark.parametrize(("constructor", "expected"), TORCHVISION_COUNTS)
@pytest.mark.slow
def test_imagenet_param_counts_match_torchvision(constructor, expected):
    """Counts from ``_DOCS.format(id)`` (e.g. ``...torchvision.models.resnet50.html``: 25557032);
    for one preset of each block, ``analysis.summary`` lists the model's layers and totals the same
    count."""
    model = abstract(constructor, num_classes=1000)
    assert count_params(model) == expected
    if constructor not in SUMMARIZED:
        return
    table = analysis.summary(model, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert table.total_params == expected
    assert table.rows[-1].output_shape == (1, 1000)
    assert sum(row.params for row in table.rows) == expected  # every parameter sits in a listed layer


def test_lenet5_param_count_is_the_notes_layer_sum():
    """note 000's LeNet: (25+1)*6 + (150+1)*16 + (400+1)*120 + (120+1)*84 + (84+1)*10."""
    expected = 26 * 6 + 151 * 16 + 401 * 120 + 121 * 84 + 85 * 10
    assert expected == 61_706
    assert count_params(abstract(LeNet5)) == expected


def test_mobilenet_v1_param_count_follows_the_papers_table():
    """Table 1 of arXiv:1704.04861: conv 3x3 -> 32, then per block a 3x3 depthwise (9*C_in weights)
    and a 1x1 pointwise (C_in*C_out) conv, each with BatchNorm (2 params per channel), no biases."""
    blocks = [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    total, c_in = 3 * 3 * 3 * 32 + 2 * 32, 32
    for c_out in blocks:
        total += 9 * c_in + 2 * c_in + c_in * c_out + 2 * c_out
        c_in = c_out
    total += 1024 * 1000 + 1000
    assert count_params(abstract(MobileNetV1, num_classes=1000)) == total == 4_231_976


@pytest.mark.parametrize("multiplier", [0.25, 0.5, 0.75])
def test_mobilenet_width_multiplier_scales_every_layer(multiplier):
    """With alpha, the pointwise weights scale by about alpha^2 (paper section 3.3)."""
    full = count_params(abstract(MobileNetV1, num_classes=1000))
    thin = count_params(abstract(MobileNetV1, num_classes=1000, width_multiplier=multiplier))
    classifier = lambda width: width * 1000 + 1000
    ratio = (thin - classifier(round(1024 * multiplier))) / (full - classifier(1024))
    assert multiplier**2 < ratio < multiplier**2 * 1.1


def test_imagenet_nin_and_mobilenet_map_224_images_to_logits():
    for model in (abstract(NiN, num_classes=1000), abstract(MobileNetV1, num_classes=1000)):
        assert abstract_logits(model, (2, 224, 224, 3)).shape == (2, 1000)


# --- small inputs: every model, 28x28x1 and 32x32x3 ---------------------------------------------

# Narrow configurations of every architecture (and preset) for the small-input stems.
NARROW = {
    "lenet5": (LeNet5, {}),
    "alexnet": (AlexNet, {"width_multiplier": 1 / 16, "hidden_features": 16}),
    "vgg11": (vgg11, {"width_multiplier": 1 / 16, "hidden_features": 16}),
    "vgg16": (vgg16, {"width_multiplier": 1 / 16, "hidden_features": 16}),
    "nin": (NiN, {"width_multiplier": 1 / 16}),
    "googlenet": (GoogLeNet, {"width_multiplier": 1 / 32}),
    "resnet18": (resnet18, {"width_multiplier": 1 / 16}),
    "resnet34": (resnet34, {"width_multiplier": 1 / 16}),
    "resnet50": (resnet50, {"width_multiplier": 1 / 16}),
    "densenet121": (densenet121, {"width_multiplier": 1 / 8}),
    "mobilenet_v1": (MobileNetV1, {"width_multiplier": 1 / 16}),
    "mobilenet_v2": (mobilenet_v2, {"width_multiplier": 1 / 8}),
    "vgg11_bn": (vgg11_bn, {"width_multiplier": 1 / 16, "hidden_features": 16}),
    "resnext50_32x4d": (resnext50_32x4d, {"width_multiplier": 1 / 2}),
}


def narrow_kwargs(name: str, size: int, channels: int, num_classes: int = 7) -> dict:
    constructor, kwargs = NARROW[name]
    size_kwarg = {"input_size": size} if constructor is LeNet5 else {"small_input": True}
    return {**kwargs, **size_kwarg, "in_features": channels, "num_classes": num_classes}


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (32, 3)])
@pytest.mark.parametrize("name", NARROW)
@pytest.mark.slow
def test_small_inputs_give_one_logit_per_class(name, size, channels):
    model = abstract(NARROW[name][0], **narrow_kwargs(name, size, channels))
    assert abstract_logits(model, (2, size, size, channels)).shape == (2, 7)


# --- executed: narrow models on tiny batches ------------------------------------------------------

# Dropout off here so that one step's loss change is not masked by a new dropout mask.
EXECUTED = {
    "lenet5": (LeNet5, {}, (28, 1)),
    "alexnet": (
        AlexNet,
        {"small_input": True, "width_multiplier": 1 / 16, "hidden_features": 16, "dropout_rate": 0.0},
        (32, 3),
    ),
    "vgg11": (
        vgg11,
        {"small_input": True, "width_multiplier": 1 / 16, "hidden_features": 16, "dropout_rate": 0.0},
        (32, 3),
    ),
    "nin": (NiN, {"small_input": True, "width_multiplier": 1 / 16, "dropout_rate": 0.0}, (32, 3)),
    "googlenet": (GoogLeNet, {"small_input": True, "width_multiplier": 1 / 64, "dropout_rate": 0.0}, (32, 3)),
    "resnet_basic": (
        ResNet,
        {"stage_sizes": (1, 1, 1), "block": BasicBlock, "small_input": True, "width_multiplier": 1 / 8},
        (32, 3),
    ),
    "resnet_bottleneck": (
        ResNet,
        {"stage_sizes": (1, 1), "block": Bottleneck, "small_input": True, "width_multiplier": 1 / 8},
        (28, 1),
    ),
    "densenet": (
        DenseNet,
        {"stage_sizes": (2, 2, 2), "growth_rate": 4, "num_init_features": 8, "small_input": True},
        (32, 3),
    ),
    "mobilenet_v1": (MobileNetV1, {"small_input": True, "width_multiplier": 1 / 16}, (32, 3)),
    "mobilenet_v2": (
        MobileNetV2,
        {"inverted_residual_setting": ((1, 8, 1, 1), (6, 8, 2, 2)), "small_input": True, "dropout_rate": 0.0},
        (32, 3),
    ),
}


# One model of each kind of layer the step differentiates (the rest run at the thorough scale).
TRAINED = ("lenet5", "alexnet", "resnet_bottleneck", "densenet", "mobilenet_v2")


@functools.cache
def _built(name: str):
    constructor, kwargs, (_, channels) = EXECUTED[name]
    return constructor(in_features=channels, num_classes=5, rngs=make_rngs(), **kwargs)


def built(name: str):
    """A fresh copy of the narrow model ``name`` (built once per session)."""
    return nnx.clone(_built(name))


def batch(name: str, n: int = 6, seed: int = 0):
    size, channels = EXECUTED[name][2]
    return images(seed, (n, size, size, channels)), jnp.arange(n, dtype=jnp.int32) % 5


def cross_entropy(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x, train=True), y).mean()


@pytest.mark.parametrize(
    "name", [name if name in TRAINED else pytest.param(name, marks=budget.thorough_only) for name in EXECUTED]
)
@pytest.mark.slow
def test_jitted_train_step_lowers_the_loss_and_compiles_once(name):
    model, (x, y) = built(name), batch(name)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    chex.clear_trace_counter()  # chex counts per function code, shared by the parametrized cases

    @nnx.jit
    @chex.assert_max_traces(n=1)
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(cross_entropy)(model, x, y)
        optimizer.update(model, grads)
        return loss

    first = train_step(model, optimizer, x, y)
    second = train_step(model, optimizer, x, y)  # a retrace would raise chex's AssertionError
    assert np.isfinite(first)
    assert second < first
    assert int(optimizer.step[...]) == 2


@pytest.mark.parametrize("name", EXECUTED)
def test_eval_mode_treats_each_image_alone(name):
    """In eval mode an image's logits do not depend on the rest of the batch."""
    model = built(name)
    model.eval()
    forward = nnx.jit(lambda model, x: model(x))
    x, _ = batch(name)
    logits = forward(model, x)
    changed = forward(model, x.at[1:].set(images(1, x[1:].shape)))
    assert logits.shape == (6, 5)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(changed[0], logits[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(changed[1:], logits[1:], rtol=1e-3, atol=0)


@pytest.mark.slow
def test_full_width_resnet18_and_lenet5_on_small_images():
    resnet = resnet18(small_input=True, rngs=make_rngs())
    logits = nnx.jit(lambda m, x: m(x, train=False))(resnet, images(0, (2, 32, 32, 3)))
    assert logits.shape == (2, 10)
    assert np.isfinite(logits).all() and not np.allclose(logits[0], logits[1])
    lenet = LeNet5(in_features=3, input_size=32, rngs=make_rngs())
    assert lenet(images(0, (2, 32, 32, 3))).shape == (2, 10)


# --- BatchNorm and Dropout modes --------------------------------------------------------------------


def _stats(model):
    return jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))


def _changed(before, after) -> bool:
    return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))


def test_batchnorm_running_stats_are_batchstats_updated_in_train_mode_only():
    model = built("resnet_basic")
    x, _ = batch("resnet_basic")
    stem = model.features.layers[0]
    assert isinstance(stem.norm.mean, nnx.BatchStat) and isinstance(stem.norm.var, nnx.BatchStat)
    assert isinstance(stem.norm.scale, nnx.Param) and isinstance(stem.norm.bias, nnx.Param)
    assert stem.norm.momentum == 0.9 and stem.norm.epsilon == 1e-5

    initial = _stats(model)
    y_train = model(x)  # a new model is in training mode, as in PyTorch
    after_train = _stats(model)
    assert _changed(initial, after_train)
    # PyTorch's momentum 0.1: running_mean = 0.9 * 0 + 0.1 * (batch mean of the stem conv's output)
    conv_mean = np.asarray(stem.conv(x)).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(stem.norm.mean[...], 0.1 * conv_mean, rtol=1e-5, atol=1e-7)

    model.eval()
    y_eval = model(x)
    assert not _changed(after_train, _stats(model))
    assert not np.allclose(y_eval, y_train, atol=1e-3)

    y_override = model(x, train=True)  # one training-mode call, the module stays in eval mode
    assert _changed(after_train, _stats(model))
    assert stem.norm.use_running_average is True
    np.testing.assert_allclose(model(x), model(x, train=False))

    model.train()
    before = _stats(model)
    model(x, train=False)
    assert not _changed(before, _stats(model))
    np.testing.assert_allclose(model(x, train=True), y_override, rtol=1e-5, atol=1e-5)


def test_dropout_is_random_in_train_mode_and_off_in_eval_mode():
    model = AlexNet(small_input=True, width_multiplier=1 / 16, hidden_features=32, rngs=make_rngs())
    x = images(0, (2, 32, 32, 3))
    assert not np.allclose(model(x), model(x))
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))
    np.testing.assert_array_equal(model(x), model(x, train=False))
    assert not np.allclose(model(x, train=True), model(x))


def test_googlenet_batchnorm_uses_torchvisions_epsilon():
    norms = [m for _, m in nnx.iter_graph(abstract(GoogLeNet)) if isinstance(m, nnx.BatchNorm)]
    assert len(norms) == 3 + 9 * 6  # stem convs and six convs per Inception module
    assert {(m.epsilon, m.momentum) for m in norms} == {(1e-3, 0.9)}


# --- errors at the boundary --------------------------------------------------------------------------


def test_wrong_input_shape_names_the_model_and_the_expected_layout():
    model = LeNet5(rngs=make_rngs())
    with pytest.raises(ValueError, match=r"LeNet5: x must be NHWC images \(N, H, W, 1\), got shape \(2, 1, 28, 28\)"):
        model(jnp.zeros((2, 1, 28, 28)))
    with pytest.raises(ValueError, match="ResNet: x must be NHWC"):
        abstract_logits(abstract(resnet18), (2, 32, 32))


@pytest.mark.parametrize(
    ("constructor", "kwargs", "message"),
    [
        (AlexNet, {"width_multiplier": 0.0}, r"AlexNet: width_multiplier=0.0 must be > 0"),
        (VGG, {"stage_features": ()}, r"VGG: stage_features=\(\) must list"),
        (NiN, {"dropout_rate": 1.0}, r"NiN: dropout_rate=1.0 must be in \[0, 1\)"),
        (GoogLeNet, {"num_classes": 0}, r"GoogLeNet: num_classes=0 must be >= 1"),
        (ResNet, {"stage_sizes": (), "block": BasicBlock}, r"ResNet: stage_sizes=\(\) must list"),
        (ResNet, {"stage_sizes": (2, 0), "block": BasicBlock}, r"ResNet: stage_sizes=0 must be >= 1"),
        (DenseNet, {"growth_rate": 0}, r"DenseNet: growth_rate=0 must be >= 1"),
        (MobileNetV1, {"in_features": 0}, r"MobileNetV1: in_features=0 must be >= 1"),
        (LeNet5, {"input_size": 8}, r"LeNet5: input_size=8 is too small"),
        (
            ResNet,
            {"stage_sizes": (1,), "block": BasicBlock, "groups": 2},
            r"BasicBlock: groups=2 and base_width=64 must be 1 and 64",
        ),
        (resnet50, {"groups": 0}, r"Bottleneck: groups=0 must be >= 1"),
        (
            MobileNetV2,
            {"inverted_residual_setting": ((1, 16, 1),)},
            r"MobileNetV2: inverted_residual_setting=.* must list",
        ),
    ],
)
def test_invalid_arguments_raise_at_construction(constructor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        abstract(constructor, **kwargs)


def test_presets_are_partials_of_the_architectures():
    assert vgg16.func is VGG and resnet50.func is ResNet and densenet121.func is DenseNet
    assert resnet50.keywords == {"stage_sizes": (3, 4, 6, 3), "block": Bottleneck}
    assert resnext50_32x4d.keywords == {**resnet50.keywords, "groups": 32, "width_per_group": 4}
    assert vgg19_bn.keywords == {**vgg19.keywords, "batch_norm": True}
    assert mobilenet_v2.func is MobileNetV2
    assert set(models.__all__) >= {"LeNet5", "AlexNet", "VGG", "NiN", "GoogLeNet", "ResNet", "DenseNet", "MobileNetV1"}
