"""Tests for ``cnnjax.export``: ONNX files run in ONNX Runtime, StableHLO round trips, ``cnnjax-export``.

- Every zoo preset, at a narrow width (``width_multiplier``) on small images (28x28x1 for
  LeNet-5, 32x32x3 with ``small_input=True``), is written as an ONNX file and run by ONNX Runtime
  (CPU) at batch 1 and batch 3 from the one file (a dynamic batch): its logits equal cnnjax's
  (relative 1e-5, float32). Its graph holds standard-domain operators alone, the cnnjax layers
  among them as ONNX's own (``Conv``, ``MaxPool``, ``AveragePool``, ``BatchNormalization``,
  ``Concat``, ...), and no ``Gather`` where nothing flattens a map.
- The layers the zoo does not use (transposed, grouped, dilated and depthwise convs, ceil-mode,
  dilated and min pooling, average pooling without the padding) in one module, NHWC and NCHW.
- StableHLO artifacts give the same logits after a round trip through a file, at any batch.
- The zoo's input checks run on symbolic shapes and still name the model on a bad input.
- ``cnnjax-export``: both formats, torchvision's weights, errors (exit 1, one line) and bad
  arguments (exit 2).

Cost: models are built abstract (``nnx.eval_shape``) and filled with NumPy's random weights, so
nothing compiles but each model's one jitted reference forward pass. Converting is quadratic in
the graph's length (jax2onnx's transpose folding): ResNet-152 and DenseNet-201 take 10-15 s at
any width, a full-size VGG or DenseNet 12-30 s. So the tests come in three tiers:

- the inner loop (``INNER_LOOP``, about 20 s): one preset or one shallow configuration of each
  architecture;
- ``slow`` (``pytest`` runs them): the other presets that convert in a few seconds, ResNet-50
  at full size (224x224x3, 1000 classes) and ``cnnjax-export`` on a full-size MobileNet v2;
- only with ``HYPOTHESIS_PROFILE=thorough`` (``tests/budget.py``'s larger scale; about three
  minutes): the deepest presets and those the other tiers cover block for block (``DEEP``), and a
  full-size preset of every other family.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import budget
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from abstract_models import abstract
from flax import nnx

from cnnjax import models, nn
from cnnjax.export import load_stablehlo, main, to_onnx, to_stablehlo

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def filled(model, seed: int = 0):
    """An abstract model with random weights, in place: He-normal kernels (std ``sqrt(2 / fan_in)``),
    every vector (biases, BatchNorm's scales, shifts and running statistics) uniform in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    for _, variable in nnx.iter_graph(model):
        if not isinstance(variable, nnx.Variable) or not isinstance(variable.get_value(), jax.ShapeDtypeStruct):
            continue
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            value = jax.random.key(0)
        elif not jnp.issubdtype(dtype, jnp.floating):
            value = np.zeros(shape, dtype)
        elif len(shape) >= 2:
            value = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(dtype)
        else:
            value = rng.uniform(0.5, 1.5, shape).astype(dtype)
        variable.set_value(jnp.asarray(value))
    return model


def reference(model, x):
    """cnnjax's eval-mode output, jitted."""
    return np.asarray(nnx.jit(lambda m, x: m(x, train=False))(model, x))


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def op_types(path) -> set[str]:
    graph = onnx.load(str(path)).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, "operators outside ONNX's standard domain"
    return {node.op_type for node in graph.node}


def images(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def assert_logits_equal(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# --- every preset, narrow, on small images ---------------------------------------------------------

SMALL = {"small_input": True, "width_multiplier": 1 / 16}
MLP = {**SMALL, "hidden_features": 16}
# name: (constructor, keyword arguments, one image's shape, ONNX operators its graph must hold)
PRESETS = {
    "lenet5": (models.LeNet5, {}, (28, 28, 1), {"Conv", "AveragePool", "Gemm", "Sigmoid"}),
    "alexnet": (models.AlexNet, MLP, (32, 32, 3), {"Conv", "MaxPool", "AveragePool", "Gemm"}),
    **{
        name: (getattr(models, name), MLP, (32, 32, 3), {"Conv", "MaxPool", "Gemm"})
        for name in ("vgg11", "vgg13", "vgg16", "vgg19")
    },
    **{
        f"{name}_bn": (getattr(models, f"{name}_bn"), MLP, (32, 32, 3), {"Conv", "BatchNormalization", "MaxPool"})
        for name in ("vgg11", "vgg13", "vgg16", "vgg19")
    },
    "nin": (models.NiN, SMALL, (32, 32, 3), {"Conv", "MaxPool", "ReduceMean"}),
    "googlenet": (
        models.GoogLeNet,
        {"small_input": True, "width_multiplier": 1 / 64, "transform_input": True},  # as cnnjax-export builds it
        (32, 32, 3),
        {"Conv", "BatchNormalization", "MaxPool", "Concat"},
    ),
    **{
        name: (getattr(models, name), SMALL, (32, 32, 3), {"Conv", "BatchNormalization", "Add", "ReduceMean"})
        for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
    },
    # a ResNeXt's width must leave each of its 32 groups a channel: int(width_per_group * m) >= 1
    **{
        name: (getattr(models, name), {"small_input": True, "width_multiplier": m}, (32, 32, 3), {"Conv", "Add"})
        for name, m in (("resnext50_32x4d", 1 / 4), ("resnext101_32x8d", 1 / 8))
    },
    **{
        name: (
            getattr(models, name),
            {"small_input": True, "width_multiplier": 1 / 8},
            (32, 32, 3),
            {"Conv", "BatchNormalization", "Concat", "AveragePool"},
        )
        for name in ("densenet121", "densenet161", "densenet169", "densenet201")
    },
    "mobilenet_v1": (models.MobileNetV1, SMALL, (32, 32, 3), {"Conv", "BatchNormalization", "ReduceMean"}),
    "mobilenet_v2": (
        models.mobilenet_v2,
        {"small_input": True, "width_multiplier": 1 / 8},
        (32, 32, 3),
        {"Conv", "BatchNormalization", "Add"},
    ),
    # the inner loop's DenseNet and MobileNet v2: the architectures, shallower than any preset
    "densenet_narrow": (
        models.DenseNet,
        {"stage_sizes": (2, 2, 2), "growth_rate": 4, "num_init_features": 8, "small_input": True},
        (32, 32, 3),
        {"Conv", "BatchNormalization", "Concat", "AveragePool"},
    ),
    "mobilenet_v2_narrow": (
        models.MobileNetV2,
        {"inverted_residual_setting": ((1, 8, 1, 1), (6, 8, 2, 2)), "small_input": True},
        (32, 32, 3),
        {"Conv", "BatchNormalization", "Add"},
    ),
}
INNER_LOOP = (
    "lenet5",
    "alexnet",
    "vgg11_bn",
    "nin",
    "googlenet",
    "resnet18",
    "densenet_narrow",
    "mobilenet_v1",
    "mobilenet_v2_narrow",
)


@functools.cache
def preset(name: str):
    """The model ``name`` of :data:`PRESETS` with 7 classes and random weights, built once (the
    tests only read it: an export leaves the model as it was)."""
    constructor, kwargs, shape, _ = PRESETS[name]
    return filled(abstract(constructor, num_classes=7, in_features=shape[-1], **kwargs))


# Flattening a map of a symbolic batch reads its size (Shape -> Gather): these flatten, the rest pool globally.
FLATTENS = ("lenet5", "alexnet", "vgg")


# Presets that run only at the thorough scale: the deepest (5-25 s each to convert), and those the
# other tiers cover block for block (ResNet-50 at full size, MobileNet v2 through the CLI).
DEEP = (
    *("resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext101_32x8d", "mobilenet_v2"),
    *("densenet121", "densenet161", "densenet169", "densenet201"),
)


def _tier(name: str):
    if name in INNER_LOOP:
        return name
    return pytest.param(name, marks=[pytest.mark.slow, *([budget.thorough_only] if name in DEEP else [])])


@pytest.mark.parametrize("name", [_tier(name) for name in PRESETS])
def test_every_preset_runs_in_onnx_runtime_with_cnnjaxs_logits(name, tmp_path):
    model, shape, expected_ops = preset(name), PRESETS[name][2], PRESETS[name][3]
    path = to_onnx(model, shape, tmp_path / f"{name}.onnx")
    x = images(0, (3, *shape))
    expected = reference(model, x)
    assert_logits_equal(run_onnx(path, x), expected)
    assert_logits_equal(run_onnx(path, x[:1]), expected[:1])
    ops = op_types(path)
    assert expected_ops <= ops, expected_ops - ops
    if not name.startswith(FLATTENS):
        assert "Gather" not in ops


class Layers(nnx.Module):
    """The layers the zoo does not use, each pooled output flattened into one vector."""

    def __init__(self, rngs):
        self.up = nn.ConvTranspose(3, 4, (3, 3), 2, padding=1, output_padding=1, rngs=rngs)  # crops less than it adds
        self.grouped_up = nn.ConvTranspose(4, 4, (4, 4), 2, padding=1, feature_group_count=2, rngs=rngs)
        self.dilated_up = nn.ConvTranspose(4, 4, (3, 3), padding="SAME", kernel_dilation=2, rngs=rngs)
        self.depthwise = nn.DepthwiseConv(4, (3, 3), depth_multiplier=2, rngs=rngs)
        self.conv = nn.Conv(
            8, 6, (3, 3), 2, padding=((1, 2), (0, 1)), kernel_dilation=(1, 2), feature_group_count=2, rngs=rngs
        )
        self.separable = nn.SeparableConv(6, 5, (3, 3), rngs=rngs)
        self.pools = nnx.List(
            [
                nn.MaxPool(3, 2, padding=1, ceil_mode=True),
                nn.MaxPool(2, 1, window_dilation=2),
                nn.AvgPool(3, 2, padding=1, ceil_mode=True, count_include_pad=False),
                nn.AvgPool(2),
                nn.AdaptiveAvgPool(3),
            ]
        )

    def __call__(self, x):
        y = self.conv(self.depthwise(self.dilated_up(self.grouped_up(self.up(x)))))
        pooled = [pool(y) for pool in self.pools]
        pooled += [-nn.MaxPool(2)(-y), self.separable(y)]
        return jnp.concatenate([p.reshape(p.shape[0], -1) for p in pooled], axis=1)


def test_every_layer_maps_to_onnx_operators_for_either_input_layout(tmp_path):
    model = Layers(nnx.Rngs(0))
    x = images(1, (3, 7, 9, 3))
    expected = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
    for layout, fed in [("NHWC", x), ("NCHW", x.transpose(0, 3, 1, 2))]:
        path = to_onnx(model, (7, 9, 3), tmp_path / f"layers_{layout}.onnx", layout=layout)
        assert_logits_equal(run_onnx(path, fed), expected)
        assert_logits_equal(run_onnx(path, fed[:1]), expected[:1])
        assert {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "Concat"} <= op_types(path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape == ["N", *fed.shape[1:]]


def test_a_fixed_batch_an_opset_and_the_model_left_in_training_mode(tmp_path):
    model = filled(abstract(models.resnet18, num_classes=5, **SMALL))  # a new model: training mode
    norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
    state = jax.tree.map(np.array, nnx.state(model))
    path = to_onnx(model, (32, 32, 3), tmp_path / "r.onnx", batch=2, opset=21)
    proto = onnx.load(str(path))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [2, 32, 32, 3]
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {21}
    x = images(2, (2, 32, 32, 3))
    assert_logits_equal(run_onnx(path, x), reference(model, x))  # eval mode: the running statistics
    assert not any(norm.use_running_average for norm in norms)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, state, jax.tree.map(np.array, nnx.state(model)))))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"layout": "NCDHW"}, ValueError, "to_onnx: layout must be one of ('NHWC', 'NCHW'), got 'NCDHW'"),
        ({"input_shape": (1, 28, 28, 1)}, ValueError, "to_onnx: input_shape must have rank 3"),
        ({"input_shape": (28, 0, 1)}, ValueError, "to_onnx: input_shape must hold positive ints, got (28, 0, 1)"),
        ({"input_shape": "28x28"}, TypeError, "to_onnx: input_shape must be a sequence"),
        ({"batch": 0}, ValueError, "to_onnx: batch must be 'dynamic' or a positive int, got 0"),
        ({"model": lambda x: x}, TypeError, "to_onnx: model must be an nnx.Module, got function"),
    ],
)
def test_bad_arguments_name_the_function_the_argument_and_the_value(kwargs, error, message, tmp_path):
    arguments = {"model": preset("lenet5"), "input_shape": (28, 28, 1), **kwargs}
    layout_batch = {k: arguments.pop(k) for k in ("layout", "batch") if k in arguments}
    with pytest.raises(error) as info:
        to_onnx(arguments["model"], arguments["input_shape"], tmp_path / "x.onnx", **layout_batch)
    assert message in str(info.value)


# --- StableHLO -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lenet5", "resnet18"])
def test_stablehlo_round_trips_with_a_symbolic_batch(name, tmp_path):
    model, shape = preset(name), PRESETS[name][2]
    forward = load_stablehlo(to_stablehlo(model, shape, tmp_path / f"{name}.jax"))
    (aval,) = forward.exported.in_avals
    assert str(aval.shape[0]) == "N" and aval.shape[1:] == shape
    x = images(3, (3, *shape))
    expected = reference(model, x)
    assert_logits_equal(np.asarray(forward(x)), expected)
    assert_logits_equal(np.asarray(jax.jit(forward)(x[:1])), expected[:1])


def test_load_stablehlo_names_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(ValueError, match=r"load_stablehlo: .*gone\.jax: no such file"):
        load_stablehlo(tmp_path / "gone.jax")
    (tmp_path / "notes.jax").write_bytes(b"not an artifact")
    with pytest.raises(ValueError, match=r"load_stablehlo: .*notes\.jax: not a serialized jax.export artifact"):
        load_stablehlo(tmp_path / "notes.jax")


# --- the zoo's input checks on symbolic shapes -------------------------------------------------------


@pytest.mark.parametrize("name", INNER_LOOP)
def test_zoo_input_checks_accept_a_symbolic_batch_and_still_reject_bad_images(name):
    model, shape = preset(name), PRESETS[name][2]
    (n,) = jax.export.symbolic_shape("N")
    logits = nnx.eval_shape(lambda m, x: m(x, train=False), model, jax.ShapeDtypeStruct((n, *shape), jnp.float32))
    assert logits.shape == (n, 7)
    bad = jax.ShapeDtypeStruct((n, *shape[:-1], shape[-1] + 1), jnp.float32)
    with pytest.raises(ValueError, match=rf"^{type(model).__name__}: x must be NHWC images .*, got shape \(N, "):
        nnx.eval_shape(lambda m, x: m(x, train=False), model, bad)


# --- cnnjax-export -----------------------------------------------------------------------------------


def test_cli_writes_both_formats(tmp_path, capsys):
    onnx_path, hlo_path = tmp_path / "out" / "lenet5.onnx", tmp_path / "lenet5.jax"
    assert main(["--model", "lenet5", "--format", "onnx", "--output", str(onnx_path), "--layout", "NCHW"]) == 0
    assert main(["--model", "lenet5", "--format", "stablehlo", "--output", str(hlo_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(onnx_path), str(hlo_path)]
    x = images(4, (3, 28, 28, 1))
    logits = np.asarray(load_stablehlo(hlo_path)(x))
    assert logits.shape == (3, 10)
    assert_logits_equal(run_onnx(onnx_path, x.transpose(0, 3, 1, 2)), logits)


def test_cli_errors_print_one_line_and_exit_1(tmp_path, capsys):
    weights = tmp_path / "mobilenet_v2_head.safetensors"  # another architecture's keys
    safetensors.numpy.save_file({"classifier.1.weight": np.zeros((1000, 1280), np.float32)}, str(weights))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 not a zip")
    output = str(tmp_path / "x.onnx")
    cases = [
        (["--model", "resnet18", "--weights", str(weights)], "the state dict does not match ResNet: missing keys"),
        (["--model", "resnet18", "--weights", str(tmp_path / "none.pth")], "none.pth not found"),
        (["--model", "resnet18", "--weights", str(corrupt)], "corrupt.pth"),
        (["--model", "lenet5", "--weights", str(weights)], "LeNet5"),
    ]
    for argv, message in cases:
        assert main([*argv, "--format", "onnx", "--output", output]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert len(captured.err.splitlines()) == 1 and message in captured.err, captured.err
        assert captured.err.startswith("cnnjax-export: ")
    assert not (tmp_path / "x.onnx").exists()


def test_cli_bad_arguments_exit_2(capsys):
    for argv, message in [
        (["--model", "resnet9", "--format", "onnx", "--output", "x.onnx"], "invalid choice: 'resnet9'"),
        (["--model", "lenet5", "--output", "x.onnx"], "the following arguments are required: --format"),
        (["--model", "lenet5", "--format", "tflite", "--output", "x"], "invalid choice: 'tflite'"),
        (["--model", "lenet5", "--format", "stablehlo", "--output", "x", "--layout", "NCHW"], "--layout applies to"),
        ([], "the following arguments are required"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.slow
def test_cli_exports_a_full_size_preset_with_torchvision_weights_for_nchw_input(tmp_path):
    model = filled(abstract(models.mobilenet_v2, num_classes=1000), seed=5)
    weights = tmp_path / "mobilenet_v2.safetensors"  # under torchvision's names
    safetensors.numpy.save_file(models.torch_state_dict(model), str(weights))
    path = tmp_path / "mobilenet_v2.onnx"
    argv = ["--model", "mobilenet_v2", "--weights", str(weights), "--format", "onnx", "--output", str(path)]
    assert main([*argv, "--layout", "NCHW"]) == 0
    x = images(6, (3, 224, 224, 3))
    assert_logits_equal(run_onnx(path, x.transpose(0, 3, 1, 2)), reference(model, x))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "resnet50",
        *(
            pytest.param(name, marks=budget.thorough_only)
            for name in ("alexnet", "vgg11_bn", "googlenet", "densenet121")
        ),
    ],
)
def test_full_size_imagenet_presets(name, tmp_path):
    """One preset of each other family at full width, 224x224x3 and 1000 classes (mobilenet_v2: above)."""
    constructor = PRESETS[name][0]
    model = filled(abstract(constructor, num_classes=1000), seed=7)
    path = to_onnx(model, (224, 224, 3), tmp_path / f"{name}.onnx")
    x = images(7, (3, 224, 224, 3))
    expected = reference(model, x)
    assert_logits_equal(run_onnx(path, x), expected)
    assert_logits_equal(run_onnx(path, x[:1]), expected[:1])


@pytest.mark.slow
def test_runs_as_a_module(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cnnjax.export", "--model", "lenet5", "--format", "stablehlo", "--output", "x.jax"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "x.jax" and (tmp_path / "x.jax").exists()
