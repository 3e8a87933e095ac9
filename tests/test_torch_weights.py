"""Tests for ``cnnjax.models.load_torch_weights`` / ``torch_state_dict`` and the torch-free file readers.

- Twins: for one configuration per family (AlexNet; VGG with BatchNorm; GoogLeNet
  with ``transform_input`` and aux heads; ResNet with basic and grouped bottleneck blocks;
  DenseNet; MobileNet v2), a PyTorch twin (``tests/torch_twins.py``, torchvision's key names) with
  random weights and BatchNorm statistics gives, in eval mode, the logits of the cnnjax model
  loaded from its ``state_dict()``; ``torch_state_dict`` gives the twin's state dict back.
- Round trips: for every preset (VGG: two of the eight, below),
  ``load_torch_weights(torch_state_dict(m))`` is the identity.
- Files: ``torch.save`` files (float32, float16, bfloat16, strided views of shared storages) and
  ``.safetensors`` files are read in a subprocess where torch is never imported; malicious
  pickles are refused without running, corrupt and truncated files raise ``ValueError`` naming
  the file.

Cost (2 cores): the twins run full-width models (a torchvision counterpart has full width) at
small inputs (56 to 224 pixels, each chosen so a flatten sees more than one position), and the
cnnjax side is built abstract (``nnx.eval_shape``) and filled by the loader, which skips random
initialization. The round trips build each preset once, abstract, and fill it with views of one
shared random vector, so only the conversions allocate; the few kernels over 4M entries
(AlexNet's and VGG's Linear layers, 102M for VGG's first) get one number each instead: which
variable each key names is what differs between presets, while the arithmetic of each
conversion, those Linear layers' included, is checked on random weights by the twins (AlexNet's
full classifier among them). A VGG round trip still costs about 5 s of CPU (its 400 MB classifier
is converted both ways, mostly 2-D transposes), so only ``vgg11`` and ``vgg19_bn`` run: the other
six differ from them only in how many convs a stage has (their parameter counts are tested in
``test_models.py``), and ``tests/test_torchvision.py`` checks every preset, all eight VGGs
included, against torchvision's own model where torchvision is installed.
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import budget
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch_twins
from abstract_models import abstract
from flax import nnx

from cnnjax import models, nn
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
    load_torch_weights,
    mobilenet_v2,
    torch_state_dict,
)
from cnnjax.models.torch_weights import read_state_dict


def numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# --- twins: cnnjax and PyTorch logits with the same weights ---------------------------------------

_MOBILENET_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2))

# name: (cnnjax constructor and kwargs, twin factory, input size)
TWINS = {
    "alexnet": (AlexNet, {}, torch_twins.AlexNet, 224),
    "vgg_bn": (
        VGG,
        {"stage_features": ((8,), (16, 16), (16,)), "batch_norm": True},
        lambda: torch_twins.VGG(((8,), (16, 16), (16,)), batch_norm=True),
        56,
    ),
    "googlenet": (
        GoogLeNet,
        {"transform_input": True},
        lambda: torch_twins.GoogLeNet(transform_input=True),
        64,
    ),
    "resnet_basic": (
        ResNet,
        {"stage_sizes": (1, 2, 1, 1), "block": BasicBlock},
        lambda: torch_twins.ResNet((1, 2, 1, 1), "basic"),
        64,
    ),
    "resnext_bottleneck": (
        ResNet,
        {"stage_sizes": (1, 1, 1, 1), "block": Bottleneck, "groups": 4, "width_per_group": 8},
        lambda: torch_twins.ResNet((1, 1, 1, 1), "bottleneck", groups=4, width_per_group=8),
        64,
    ),
    "densenet": (
        DenseNet,
        {"stage_sizes": (2, 3), "growth_rate": 8, "num_init_features": 16},
        lambda: torch_twins.DenseNet((2, 3), 8, 16),
        64,
    ),
    "mobilenet_v2": (
        MobileNetV2,
        {"inverted_residual_setting": _MOBILENET_STAGES},
        lambda: torch_twins.MobileNetV2(_MOBILENET_STAGES),
        64,
    ),
}


def make_twin(name: str):
    """The cnnjax constructor and kwargs of ``name``, and its twin (1000 classes) in eval mode."""
    constructor, kwargs, twin, _ = TWINS[name]
    torch.manual_seed(0)
    return constructor, kwargs, torch_twins.randomize_batchnorm(twin()).eval()


def twin_images(name: str, n: int = 2) -> np.ndarray:
    size = TWINS[name][3]
    return np.random.default_rng(0).normal(size=(n, size, size, 3)).astype(np.float32)


def relative_error(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))


@functools.cache
def forward():
    """The jitted eval-mode call. Twins run ``impl="lax"``: which conv implementation runs is not
    what they check, and XLA compiles that one fastest (a grouped conv: 1.4 s against 9 s)."""
    return nnx.jit(lambda model, x: nn.set_impl(model, "lax")(x, train=False))


@pytest.mark.parametrize("name", TWINS)
@pytest.mark.slow
def test_logits_equal_the_pytorch_twin_with_the_same_weights(name):
    constructor, kwargs, twin = make_twin(name)
    model = load_torch_weights(abstract(constructor, num_classes=1000, **kwargs), twin.state_dict())
    x = twin_images(name)
    with torch.no_grad():
        expected = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    logits = forward()(model, jnp.asarray(x))
    assert logits.shape == expected.shape
    assert relative_error(logits, expected) < 1e-5
    exported = torch_state_dict(model)  # the inverse: the twin's state dict (aux heads aside)
    state = {k: v for k, v in numpy_state(twin).items() if not k.startswith(("aux1.", "aux2."))}
    assert exported.keys() == state.keys()
    for key, value in state.items():
        expected_value = np.zeros((), np.int64) if key.endswith("num_batches_tracked") else value
        np.testing.assert_array_equal(exported[key], expected_value, err_msg=key)


def test_googlenet_transform_input_needs_rgb():
    """Its arithmetic is checked against the twin above (``transform_input=True`` there)."""
    with pytest.raises(ValueError, match=r"GoogLeNet: transform_input=True needs in_features=3 \(RGB\), got 1"):
        abstract(GoogLeNet, in_features=1, transform_input=True)


def test_densenet_old_layer_names_are_renamed_as_torchvision_does():
    """torchvision's published DenseNet files name ``denselayer1.norm.1.weight`` what its model calls
    ``denselayer1.norm1.weight``."""
    constructor, kwargs, twin = make_twin("densenet")
    state = numpy_state(twin)
    old = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state.items()}
    assert any(".norm.1." in k for k in old) and any(".conv.2." in k for k in old)
    model = load_torch_weights(abstract(constructor, num_classes=1000, **kwargs), old)
    exported = torch_state_dict(model)
    for key in ("features.denseblock2.denselayer3.norm1.running_var", "features.denseblock1.denselayer1.conv2.weight"):
        np.testing.assert_array_equal(exported[key], state[key])


# --- round trips: every preset ---------------------------------------------------------------------

PRESETS = {  # every preset but six of the VGGs
    "alexnet": AlexNet,
    "googlenet": GoogLeNet,
    **{
        name: getattr(models, name)
        for name in (
            "vgg11",  # VGG: the shallowest plain and the deepest BN preset (see the module docstring)
            "vgg19_bn",
            "resnet18",
            "resnet34",
            "resnet50",
            "resnet101",
            "resnet152",
            "resnext50_32x4d",
            "resnext101_32x8d",
            "wide_resnet50_2",
            "densenet121",
            "densenet161",
            "densenet169",
            "densenet201",
            "mobilenet_v2",
        )
    },
}

_VALUES = np.random.default_rng(0).standard_normal(2**23, dtype=np.float32)  # 32 MiB, sliced per variable


# the deepest of each family run at the thorough scale: the same blocks, more of them
DEEPEST = ("resnet101", "resnet152", "resnext101_32x8d", "densenet161", "densenet169", "densenet201")


@pytest.mark.parametrize("name", [pytest.param(n, marks=budget.thorough_only) if n in DEEPEST else n for n in PRESETS])
@pytest.mark.slow
def test_round_trip_is_the_identity_for_every_preset(name):
    """One abstract preset, its Params and BatchStats views of ``_VALUES`` (each starting elsewhere;
    kernels over 4M entries, AlexNet's and VGG's Linear layers, one number each); exported, reset to
    zeros, loaded back: every variable has its value again."""
    model = abstract(PRESETS[name], num_classes=1000)
    variables = [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param | nnx.BatchStat)]
    originals = []
    for i, variable in enumerate(variables):
        shape, size = variable.get_value().shape, variable.get_value().size
        start = 7919 * i % (_VALUES.size - size) if size <= _VALUES.size // 2 else None
        value = np.broadcast_to(np.float32(i), shape) if start is None else _VALUES[start : start + size].reshape(shape)
        variable.set_value(value)
        originals.append(value)
    state = torch_state_dict(model)
    batch_norms = sum(isinstance(node, nnx.BatchNorm) for _, node in nnx.iter_graph(model))
    assert len(state) == len(variables) + batch_norms  # and one num_batches_tracked per BatchNorm
    for variable in variables:
        variable.set_value(np.broadcast_to(np.float32(-1), variable.get_value().shape))
    load_torch_weights(model, state)
    for variable, original in zip(variables, originals, strict=True):
        assert np.array_equal(np.asarray(variable.get_value()), original)


# --- files, read without torch ---------------------------------------------------------------------

TINY = {"stage_sizes": (1, 1), "growth_rate": 4, "num_init_features": 8, "num_classes": 3}


@pytest.fixture(scope="module")
def tiny_twin():
    torch.manual_seed(0)
    return torch_twins.randomize_batchnorm(torch_twins.DenseNet(**TINY)).eval()


def test_files_are_read_with_torch_absent(tmp_path, tiny_twin):
    """A subprocess loads a float32, a float16 and a bfloat16 ``torch.save`` file and a
    ``.safetensors`` file into tiny DenseNets, asserts that torch was never imported, and exports
    what it loaded."""
    state = tiny_twin.state_dict()
    torch.save(state, tmp_path / "f32.pth")
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "f16.pt")
    torch.save({k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "bf16.pth")
    safetensors.numpy.save_file(numpy_state(tiny_twin), str(tmp_path / "w.safetensors"))
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from flax import nnx
        from cnnjax.models import DenseNet, load_torch_weights, torch_state_dict
        for name in ("f32.pth", "f16.pt", "bf16.pth", "w.safetensors"):
            model = nnx.eval_shape(lambda: DenseNet(**{TINY!r}, rngs=nnx.Rngs(0)))
            load_torch_weights(model, {str(tmp_path)!r} + "/" + name)
            np.savez({str(tmp_path)!r} + "/" + name + ".npz", **torch_state_dict(model))
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
    for name, dtype, tolerance in [
        ("f32.pth", torch.float32, 0),
        ("w.safetensors", torch.float32, 0),
        ("f16.pt", torch.float16, 1e-3),
        ("bf16.pth", torch.bfloat16, 1e-2),
    ]:
        loaded = np.load(tmp_path / f"{name}.npz")
        for key, value in state.items():
            if key.endswith("num_batches_tracked"):
                continue
            expected = value.to(dtype).float().numpy()  # the file's values, exactly representable in float32
            np.testing.assert_array_equal(loaded[key], expected, err_msg=f"{name}: {key}")
            np.testing.assert_allclose(loaded[key], value.numpy(), rtol=tolerance, atol=tolerance)


def test_torch_save_views_of_shared_storages_keep_offset_and_strides(tmp_path):
    """Tensors that share one storage (offsets, transposes, steps) come back as torch sees them."""
    base = torch.arange(60, dtype=torch.float32).reshape(5, 12)
    tensors = {
        "full": base,
        "offset": base[2:, 3:7],
        "transposed": base.t(),
        "stepped": base[::2, ::3],
        "empty": base[:0],
        "int": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False]),
        "half": base[1].half(),
    }
    torch.save(tensors, tmp_path / "views.pth")
    state = read_state_dict(tmp_path / "views.pth")
    assert state.keys() == tensors.keys()
    for key, tensor in tensors.items():
        np.testing.assert_array_equal(state[key], tensor.numpy(), err_msg=key)
        assert state[key].dtype == tensor.numpy().dtype
    bf16 = torch.tensor([1.5, -2.25, 3e38]).bfloat16()
    torch.save({"w": bf16}, tmp_path / "bf16.pth")
    value = read_state_dict(tmp_path / "bf16.pth")["w"]
    assert value.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(value.astype(np.float32), bf16.float().numpy())


class _Payload:
    """Pickles as ``os.system(command)``: what a malicious weights file does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _EvalPayload:
    def __reduce__(self):
        return eval, ("__import__('os').system('exit 3')",)


def _with_data_pkl(source, target, data: bytes):
    """A copy of the torch.save archive ``source`` with ``data.pkl`` replaced by ``data``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            new.writestr(item, data if item.filename.endswith("data.pkl") else old.read(item))


@pytest.mark.parametrize("wrapping", ["torch_save", "data_pkl", "plain_pickle"])
def test_malicious_pickles_are_refused_and_never_run(tmp_path, tiny_twin, wrapping):
    marker = tmp_path / "pwned"
    payload = {"features.conv0.weight": _Payload(f"touch {marker}"), "x": _EvalPayload()}
    path = tmp_path / "evil.pth"
    if wrapping == "torch_save":  # torch.save pickles any object: a file made the usual way
        torch.save(payload, path)
    elif wrapping == "data_pkl":  # a genuine archive whose pickle was swapped
        torch.save(tiny_twin.state_dict(), tmp_path / "good.pth")
        _with_data_pkl(tmp_path / "good.pth", path, pickle.dumps(payload, protocol=2))
    else:
        path.write_bytes(pickle.dumps(payload))
    model = abstract(DenseNet, **TINY)
    expected = "refused to load the global (posix|os|nt).system" if wrapping != "plain_pickle" else "not a torch.save"
    with pytest.raises(ValueError, match=rf"weights file {path}: cannot be read: .*{expected}"):
        load_torch_weights(model, path)
    assert not marker.exists()


def test_a_pickle_may_not_smuggle_other_globals(tmp_path):
    """The allow-list is exact: ``builtins.eval`` through STACK_GLOBAL (protocol 4) and a torch
    name that is not a storage type are refused as well."""
    base = tmp_path / "base.pth"
    torch.save({"w": torch.ones(2)}, base)
    for i, data in enumerate(
        [
            pickle.dumps(_EvalPayload(), protocol=4),
            b"\x80\x02ctorch\nload\nq\x00.",  # GLOBAL torch.load
        ]
    ):
        path = tmp_path / f"evil{i}.pth"
        _with_data_pkl(base, path, data)
        with pytest.raises(ValueError, match=r"refused to load the global (builtins.eval|torch.load)"):
            read_state_dict(path)


def _rewrite(source, target, entry: str, transform):
    """A copy of the zip ``source`` with ``entry`` changed by ``transform`` (``None``: left out)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if not item.filename.endswith(entry):
                new.writestr(item, data)
            elif transform is not None:
                new.writestr(item, transform(data))


def test_corrupt_truncated_and_foreign_files_raise_value_errors_naming_them(tmp_path, tiny_twin):
    good = tmp_path / "good.pth"
    torch.save(tiny_twin.state_dict(), good)
    data = good.read_bytes()
    cases = {
        "truncated.pth": (lambda p: p.write_bytes(data[: len(data) // 2]), "not a torch.save zip archive"),
        "garbage.pt": (lambda p: p.write_bytes(b"\x00\x01 not a pickle" * 10), "not a torch.save zip archive"),
        "short_storage.pth": (
            lambda p: _rewrite(good, p, "data/0", lambda b: b[: len(b) // 2]),
            r"storage .*data/0 has \d+ bytes",
        ),
        "no_storage.pth": (lambda p: _rewrite(good, p, "data/0", None), r"storage .*data/0 is missing"),
        "cut_pickle.pth": (lambda p: _rewrite(good, p, "data.pkl", lambda b: b[: len(b) // 2]), r"cannot be read"),
        "garbage.safetensors": (lambda p: p.write_bytes(b"\xff" * 64), r"cannot be read"),
        "checkpoint.pth": (
            lambda p: torch.save({"epoch": 3, "state_dict": tiny_twin.state_dict()}, p),
            r"not a flat state dict of tensors: entries \['epoch', 'state_dict'\]",
        ),
        "legacy.pth": (
            lambda p: torch.save(tiny_twin.state_dict(), p, _use_new_zipfile_serialization=False),
            r"legacy \(pre-1.6\) format",
        ),
    }
    for name, (write, message) in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(ValueError, match=rf"weights file {path}: .*{message}"):
            read_state_dict(path)
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match=rf"weights file {missing} not found"):
        load_torch_weights(abstract(DenseNet, **TINY), missing)
    tensor = torch.arange(12.0)
    torch.save({"w": tensor[2:]}, tmp_path / "view.pth")  # an overrun: the view claims more than the storage has
    _rewrite(tmp_path / "view.pth", tmp_path / "overrun.pth", "data.pkl", lambda b: b.replace(b"K\x02", b"K\x09"))
    with pytest.raises(
        ValueError, match=r"overrun.pth: cannot be read: a tensor of size \(10,\).* overruns its storage"
    ):
        read_state_dict(tmp_path / "overrun.pth")


# --- what is checked ---------------------------------------------------------------------------------


def test_strict_loading_names_missing_unexpected_and_mismatched_keys(tiny_twin):
    state = numpy_state(tiny_twin)
    model = abstract(DenseNet, **TINY)
    partial = {k: v for k, v in state.items() if k != "classifier.bias"} | {"head.weight": np.zeros(3)}
    with pytest.raises(ValueError, match=r"missing keys \[classifier.bias\], unexpected keys \[head.weight\]"):
        load_torch_weights(model, partial)
    wrong = state | {"features.conv0.weight": np.zeros((8, 3, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"features.conv0.weight has shape \(8, 3, 3, 3\) .* needs \(8, 3, 7, 7\)"):
        load_torch_weights(model, wrong)
    with pytest.raises(ValueError, match=r"needs \(8, 3, 7, 7\)"):  # a shape mismatch is an error even when not strict
        load_torch_weights(model, wrong, strict=False)
    without_counts = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    load_torch_weights(model, without_counts)  # num_batches_tracked is optional


def test_non_strict_loading_keeps_what_the_state_dict_lacks(tiny_twin):
    model = load_torch_weights(abstract(DenseNet, **TINY), tiny_twin.state_dict())
    before = torch_state_dict(model)
    update = {"classifier.bias": np.full(3, 7.0, np.float32), "head.weight": np.zeros(1)}
    load_torch_weights(model, update, strict=False)
    after = torch_state_dict(model)
    np.testing.assert_array_equal(after["classifier.bias"], [7.0, 7.0, 7.0])
    for key in before.keys() - {"classifier.bias"}:
        np.testing.assert_array_equal(after[key], before[key])
    with pytest.raises(
        ValueError, match=r"DenseNet is abstract \(nnx.eval_shape\) and the state dict leaves \[.*\] unset"
    ):
        load_torch_weights(abstract(DenseNet, **TINY), update, strict=False)
    with pytest.raises(ValueError, match=r"torch_state_dict: this DenseNet is abstract"):
        torch_state_dict(abstract(DenseNet, **TINY))


@pytest.mark.parametrize(
    ("constructor", "kwargs", "message"),
    [
        (LeNet5, {}, r"LeNet5 has no torchvision counterpart"),
        (NiN, {}, r"NiN has no torchvision counterpart"),
        (MobileNetV1, {}, r"MobileNetV1 has no torchvision counterpart"),
        (AlexNet, {"small_input": True}, r"AlexNet with small_input=True .* has no torchvision counterpart"),
        (
            models.resnet18,
            {"width_multiplier": 0.5},
            r"ResNet with width_multiplier=0.5 \(torchvision's ResNet has full width\) has no",
        ),
        (models.vgg11, {"hidden_features": 512}, r"VGG with hidden_features=512"),
        (ResNet, {"stage_sizes": (1, 1), "block": BasicBlock}, r"ResNet with 2 stages"),
        (
            mobilenet_v2,
            {"small_input": True, "width_multiplier": 0.5},
            r"MobileNetV2 with small_input=True .* and width",
        ),
    ],
)
def test_models_without_a_torchvision_counterpart_are_refused(constructor, kwargs, message):
    model = abstract(constructor, **kwargs)
    with pytest.raises(ValueError, match=rf"load_torch_weights: {message}"):
        load_torch_weights(model, {})
    with pytest.raises(ValueError, match=rf"torch_state_dict: {message}"):
        torch_state_dict(model)


def test_wrong_kinds_of_arguments_are_type_errors():
    with pytest.raises(TypeError, match=r"load_torch_weights: model must be a cnnjax.models model"):
        load_torch_weights({"a": 1}, {})
    with pytest.raises(TypeError, match=r"read_state_dict: source must be a file path or a mapping"):
        load_torch_weights(abstract(DenseNet, **TINY), 42)
    with pytest.raises(TypeError, match=r"keys must be str"):
        read_state_dict({1: np.zeros(1)})


def test_mapping_sources_take_torch_tensors_of_any_float_dtype(tiny_twin):
    state = tiny_twin.state_dict()
    halves = {k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()}
    model = load_torch_weights(abstract(DenseNet, **TINY), halves)
    exported = torch_state_dict(model)
    np.testing.assert_array_equal(exported["classifier.weight"], state["classifier.weight"].bfloat16().float().numpy())
    assert exported["classifier.weight"].dtype == np.float32
