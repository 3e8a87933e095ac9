"""torchvision's weights in the zoo: :func:`load_torch_weights` and its inverse :func:`torch_state_dict`.

Every zoo model torchvision also has (``AlexNet``, ``VGG``, ``GoogLeNet``, ``ResNet`` with
ResNeXt and wide ResNets, ``DenseNet``, ``MobileNetV2``, at full width with the ImageNet stem)
maps one to one onto torchvision's state dict, under torchvision's key names:

- a conv's ``weight`` ``(O, I // groups, kH, kW)`` (OIHW) is the kernel ``(kH, kW, I // groups, O)``
  (HWIO, :func:`cnnjax.init.from_torch_conv`); biases are equal;
- a Linear ``weight`` ``(O, I)`` is the transposed kernel ``(I, O)``. The first Linear after a
  flatten (AlexNet's 6x6, VGG's 7x7 maps) also reorders its inputs: PyTorch flattens
  ``(C, H, W)`` maps, cnnjax ``(H, W, C)`` ones;
- a BatchNorm's ``weight``, ``bias``, ``running_mean``, ``running_var`` are ``scale``, ``bias``,
  ``mean``, ``var``. ``num_batches_tracked`` is read and dropped (cnnjax does not count batches;
  it only matters for PyTorch's ``momentum=None``); :func:`torch_state_dict` writes it as 0;
- ``Sequential`` indices count torchvision's parameter-free layers too (``features.3`` is
  AlexNet's second conv, after a ReLU and a max-pool; VGG-BN's convs are ``features.0``,
  ``features.3``, ...).

Two kinds of keys are taken as torchvision's own loaders take them, strict or not: GoogLeNet's
auxiliary classifiers ``aux1.*`` and ``aux2.*`` (training-only heads, in torchvision's
pretrained file and in its default ``googlenet()``; cnnjax's GoogLeNet has none) are skipped,
and DenseNet's old layer names (``denselayer1.norm.1.weight`` for ``denselayer1.norm1.weight``,
as in torchvision's published DenseNet files) are renamed.

Files are read without PyTorch (:mod:`cnnjax.models._torch_file`): a ``torch.save`` zip archive
(``.pth``/``.pt``, through an allow-list unpickler that only builds arrays) or a ``.safetensors``
file (the ``safetensors`` NumPy reader). float16 and bfloat16 weights are cast to the model's
float32.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cnnjax import nn
from cnnjax.init import to_torch_conv
from cnnjax.models import densenet, resnet, vgg
from cnnjax.models._blocks import ConvBN
from cnnjax.models._torch_file import read_file
from cnnjax.models.alexnet import AlexNet
from cnnjax.models.densenet import DenseLayer, DenseNet
from cnnjax.models.googlenet import GoogLeNet
from cnnjax.models.mobilenet_v2 import MobileNetV2, mobilenet_v2
from cnnjax.models.resnet import ResNet
from cnnjax.models.vgg import VGG

__all__ = ["load_torch_weights", "read_state_dict", "torch_state_dict"]

# torchvision's architectures by torchvision's names, each built as its pretrained weights expect
# (1000 classes; GoogLeNet with transform_input=True, as googlenet(weights=...)): the --model
# choices of cnnjax-predict and cnnjax-export.
PRETRAINED = {
    "alexnet": functools.partial(AlexNet, num_classes=1000),
    "googlenet": functools.partial(GoogLeNet, num_classes=1000, transform_input=True),
    **{
        name: functools.partial(getattr(module, name), num_classes=1000)
        for module, names in (
            (vgg, [f"vgg{depth}{bn}" for depth in (11, 13, 16, 19) for bn in ("", "_bn")]),
            (resnet, ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]),
            (resnet, ["resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2"]),
            (densenet, ["densenet121", "densenet161", "densenet169", "densenet201"]),
        )
        for name in names
    },
    "mobilenet_v2": functools.partial(mobilenet_v2, num_classes=1000),
}


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One torchvision state-dict entry and the cnnjax variable it is.

    ``kind``: ``"conv"`` (OIHW <-> HWIO), ``"linear"`` (transposed; ``chw`` = the ``(C, H, W)``
    maps it reads after a flatten, or ``None``), ``"plain"`` (equal) or ``"count"`` (BatchNorm's
    ``num_batches_tracked``: no variable).
    """

    key: str
    variable: nnx.Variable | None
    kind: str = "plain"
    chw: tuple[int, int, int] | None = None

    def torch_shape(self) -> tuple[int, ...]:
        if self.kind == "count":
            return ()
        shape = tuple(self.variable.get_value().shape)
        if self.kind == "conv":
            return (shape[-1], shape[-2], *shape[:-2])
        return shape[::-1] if self.kind == "linear" else shape

    def to_torch(self) -> np.ndarray:
        if self.kind == "count":
            return np.zeros((), np.int64)
        value = np.asarray(self.variable.get_value())
        if self.kind == "conv":
            return to_torch_conv(value)
        if self.kind == "linear" and self.chw is not None:
            value = value[_hwc_rows(*self.chw)]  # rows in PyTorch's (C, H, W) order
        return np.ascontiguousarray(value.T) if self.kind == "linear" else value.copy()

    def from_torch(self, value: np.ndarray) -> jax.Array:
        value = np.asarray(value, self.variable.get_value().dtype)
        if self.kind == "conv":
            # cnnjax.init.from_torch_conv's permutation, in NumPy: its eager jnp.transpose compiles
            # once per kernel shape, seconds for a whole model.
            value = value.transpose(2, 3, 1, 0)
        elif self.kind == "linear":
            value = np.ascontiguousarray(value.T)
            if self.chw is not None:
                value = value[np.argsort(_hwc_rows(*self.chw))]  # rows from (C, H, W) to cnnjax's (H, W, C) order
        return jax.device_put(np.ascontiguousarray(value))  # jnp.asarray would compile a copy per shape


def _hwc_rows(c: int, h: int, w: int) -> np.ndarray:
    """``rows[i]``: the cnnjax (NHWC-flattened) feature at PyTorch's (NCHW-flattened) position ``i``.

    >>> _hwc_rows(2, 1, 3)  # PyTorch: c0w0 c0w1 c0w2 c1w0 ...; cnnjax: w0c0 w0c1 w1c0 ...
    array([0, 2, 4, 1, 3, 5])
    """
    return np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).reshape(-1)


def _conv(prefix: str, conv) -> list[_Tensor]:
    """A ``cnnjax.nn.Conv`` / ``DepthwiseConv`` as torch's ``Conv2d`` named ``prefix``."""
    bias = [_Tensor(f"{prefix}.bias", conv.bias)] if conv.use_bias else []
    return [_Tensor(f"{prefix}.weight", conv.kernel, "conv"), *bias]


def _norm(prefix: str, norm: nnx.BatchNorm) -> list[_Tensor]:
    return [
        _Tensor(f"{prefix}.weight", norm.scale),
        _Tensor(f"{prefix}.bias", norm.bias),
        _Tensor(f"{prefix}.running_mean", norm.mean),
        _Tensor(f"{prefix}.running_var", norm.var),
        _Tensor(f"{prefix}.num_batches_tracked", None, "count"),
    ]


def _linear(prefix: str, linear: nnx.Linear, chw: tuple[int, int, int] | None = None) -> list[_Tensor]:
    return [_Tensor(f"{prefix}.weight", linear.kernel, "linear", chw), _Tensor(f"{prefix}.bias", linear.bias)]


def _conv_bn(conv_prefix: str, norm_prefix: str, block: ConvBN) -> list[_Tensor]:
    return _conv(conv_prefix, block.conv) + _norm(norm_prefix, block.norm)


def _sequential(prefix: str, stack) -> list[_Tensor]:
    """A ``Stack`` of convs, ConvBNs, activations and pools as a torch ``Sequential``: a ConvBN
    takes three indices (conv, BatchNorm, ReLU), anything else one."""
    tensors, index = [], 0
    for layer in stack.layers:
        if isinstance(layer, ConvBN):
            tensors += _conv_bn(f"{prefix}.{index}", f"{prefix}.{index + 1}", layer)
            index += 2 + (layer.activation is not None)
        else:
            tensors += _conv(f"{prefix}.{index}", layer) if isinstance(layer, nn.Conv) else []
            index += 1
    return tensors


def _classifier(model, indices: tuple[int, int, int]) -> list[_Tensor]:
    """AlexNet's / VGG's ``classifier`` Sequential: its three Linears at ``indices``; the first reads
    the flattened ``(C, *pool.output_size)`` maps."""
    head, (h, w) = model.classifier, model.pool.output_size
    first = head.hidden[0]
    chw = (first.in_features // (h * w), h, w)
    return (
        _linear(f"classifier.{indices[0]}", first, chw)
        + _linear(f"classifier.{indices[1]}", head.hidden[1])
        + _linear(f"classifier.{indices[2]}", head.out)
    )


def _alexnet(model: AlexNet) -> list[_Tensor]:
    # classifier: Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear
    return _sequential("features", model.features) + _classifier(model, (1, 4, 6))


def _vgg(model: VGG) -> list[_Tensor]:
    # classifier: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
    return _sequential("features", model.features) + _classifier(model, (0, 3, 6))


def _basic_conv(prefix: str, block: ConvBN) -> list[_Tensor]:
    """GoogLeNet's ``BasicConv2d``: ``conv`` and ``bn``."""
    return _conv_bn(f"{prefix}.conv", f"{prefix}.bn", block)


def _googlenet(model: GoogLeNet) -> list[_Tensor]:
    stem = iter(("conv1", "conv2", "conv3"))
    inceptions = iter(
        f"inception{stage}{letter}" for stage, letters in ((3, "ab"), (4, "abcde"), (5, "ab")) for letter in letters
    )
    tensors = []
    for layer in model.features.layers:
        if isinstance(layer, ConvBN):
            tensors += _basic_conv(next(stem), layer)
        elif not isinstance(layer, nn.MaxPool):
            name = next(inceptions)
            one, three, five, pool = layer.branches
            tensors += _basic_conv(f"{name}.branch1", one)
            for branch, stack in (("branch2", three), ("branch3", five)):
                tensors += _basic_conv(f"{name}.{branch}.0", stack.layers[0]) + _basic_conv(
                    f"{name}.{branch}.1", stack.layers[1]
                )
            tensors += _basic_conv(f"{name}.branch4.1", pool.layers[1])  # branch4.0 is the max-pool
    return tensors + _linear("fc", model.fc)


def _resnet(model: ResNet) -> list[_Tensor]:
    stem, _, *blocks = model.features.layers  # conv-BN-ReLU, max-pool, residual blocks
    names = [f"layer{i + 1}.{j}" for i, size in enumerate(model.stage_sizes) for j in range(size)]
    tensors = _conv_bn("conv1", "bn1", stem)
    for name, block in zip(names, blocks, strict=True):
        for k, unit in enumerate(block.residual.layers, 1):
            tensors += _conv_bn(f"{name}.conv{k}", f"{name}.bn{k}", unit)
        if block.shortcut is not None:
            tensors += _conv_bn(f"{name}.downsample.0", f"{name}.downsample.1", block.shortcut)
    return tensors + _linear("fc", model.fc)


def _densenet(model: DenseNet) -> list[_Tensor]:
    stem, _, *layers = model.features.layers  # conv-BN-ReLU, max-pool, dense layers and transitions
    tensors = _conv_bn("features.conv0", "features.norm0", stem)
    block, index = 1, 0
    for layer in layers:
        if isinstance(layer, DenseLayer):
            index += 1
            prefix = f"features.denseblock{block}.denselayer{index}"
            for k, unit in enumerate(layer.layers.layers, 1):
                tensors += _norm(f"{prefix}.norm{k}", unit.norm) + _conv(f"{prefix}.conv{k}", unit.conv)
        else:  # a transition: pre-activated 1x1 conv, then average pooling
            unit, prefix = layer.layers[0], f"features.transition{block}"
            tensors += _norm(f"{prefix}.norm", unit.norm) + _conv(f"{prefix}.conv", unit.conv)
            block, index = block + 1, 0
    return tensors + _norm("features.norm5", model.norm) + _linear("classifier", model.classifier)


def _mobilenet_v2(model: MobileNetV2) -> list[_Tensor]:
    tensors = []
    for i, layer in enumerate(model.features.layers):
        if isinstance(layer, ConvBN):  # Conv2dNormActivation: conv, BatchNorm, ReLU6
            tensors += _conv_bn(f"features.{i}.0", f"features.{i}.1", layer)
            continue
        index = 0  # an InvertedResidual's `conv` Sequential: Conv2dNormActivations, then conv and BatchNorm
        for unit in layer.layers.layers:
            if unit.activation is not None:
                tensors += _conv_bn(f"features.{i}.conv.{index}.0", f"features.{i}.conv.{index}.1", unit)
                index += 1
            else:
                tensors += _conv_bn(f"features.{i}.conv.{index}", f"features.{i}.conv.{index + 1}", unit)
    return tensors + _linear("classifier.1", model.classifier)  # classifier.0 is the dropout


_LAYOUTS = {
    AlexNet: _alexnet,
    VGG: _vgg,
    GoogLeNet: _googlenet,
    ResNet: _resnet,
    DenseNet: _densenet,
    MobileNetV2: _mobilenet_v2,
}

# Keys torchvision's own loaders skip (GoogLeNet's training-only auxiliary heads).
_SKIPPED = {GoogLeNet: ("aux1.", "aux2.")}

# DenseNet's layer names before PyTorch forbade dots in module names; torchvision renames them.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _layout(model, op: str) -> list[_Tensor]:
    """The state-dict entries of ``model``; raises unless it has a torchvision counterpart."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"{op}: model must be a cnnjax.models model (an nnx.Module), got {type(model).__name__}")
    name = type(model).__name__
    if type(model) not in _LAYOUTS:
        raise ValueError(
            f"{op}: {name} has no torchvision counterpart (of the zoo's architectures, torchvision has "
            f"{', '.join(c.__name__ for c in _LAYOUTS)})"
        )
    problems = []
    if model.small_input:
        problems.append("small_input=True (torchvision has only the ImageNet stem)")
    if model.width_multiplier != 1.0:
        problems.append(f"width_multiplier={model.width_multiplier} (torchvision's {name} has full width)")
    if isinstance(model, AlexNet | VGG) and model.hidden_features != 4096:
        problems.append(f"hidden_features={model.hidden_features} (torchvision's classifier has 4096)")
    if isinstance(model, ResNet) and len(model.stage_sizes) != 4:
        problems.append(f"{len(model.stage_sizes)} stages (torchvision's ResNet has 4)")
    if problems:
        raise ValueError(f"{op}: {name} with {' and '.join(problems)} has no torchvision counterpart")
    return _LAYOUTS[type(model)](model)


def _as_array(value, key: str) -> np.ndarray:
    """A NumPy/JAX array or a (CPU) torch tensor -> NumPy array (bfloat16 tensors via float32)."""
    if hasattr(value, "detach"):  # a torch tensor, converted without importing torch here
        value = value.detach().cpu()
        value = (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"read_state_dict: the value of {key!r} is not an array ({type(value).__name__})") from err


def read_state_dict(source) -> dict[str, np.ndarray]:
    """A state dict as NumPy arrays, from a file (``torch.save``: ``.pth``/``.pt``; ``.safetensors``)
    or a mapping of names to arrays or torch tensors. Files are read without PyTorch.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` naming the file and the
    problem for a corrupt, truncated or malicious one (a pickle naming any global but the few
    tensors need: nothing in it is run), ``TypeError`` for another kind of ``source``.

    >>> read_state_dict({"fc.bias": np.zeros(3)})["fc.bias"].shape
    (3,)
    """
    if isinstance(source, Mapping):
        if not all(isinstance(key, str) for key in source):
            raise TypeError("read_state_dict: a state dict's keys must be str")
        return {key: _as_array(value, key) for key, value in source.items()}
    if isinstance(source, str | os.PathLike):
        return read_file(source)
    raise TypeError(
        f"read_state_dict: source must be a file path or a mapping of names to arrays, got {type(source).__name__}"
    )


def _abstract(variable: nnx.Variable) -> bool:
    return isinstance(variable.get_value(), jax.ShapeDtypeStruct)


def load_torch_weights(model, source, *, strict: bool = True):
    """Load torchvision's weights into a zoo ``model``, in place; returns ``model``.

    ``source``: a ``torch.save`` file (``.pth``/``.pt``), a ``.safetensors`` file, or a mapping
    of torchvision's key names to arrays or torch tensors (a ``state_dict()``). Files are read
    without PyTorch. In eval mode the model's logits for NHWC images equal torchvision's for the
    same NCHW images (float32 tolerance); for torchvision's pretrained GoogLeNet, build
    ``GoogLeNet(transform_input=True)``, as ``googlenet(weights=...)`` does.

    ``strict=True``: a missing or unexpected key raises ``ValueError`` naming them;
    ``strict=False`` loads the keys both sides have. A shape mismatch always raises
    ``ValueError`` naming the key and both shapes (as PyTorch's ``load_state_dict``), and nothing
    is changed then. ``aux1.*``/``aux2.*`` (GoogLeNet) are skipped and ``num_batches_tracked`` is
    dropped, strict or not (see the module docstring). A model without a torchvision
    counterpart (``small_input=True``, a width multiplier, ``LeNet5``, ``NiN``, ``MobileNetV1``)
    raises ``ValueError`` saying so.

    ``model`` may be abstract (``nnx.eval_shape``): the loaded weights then become its values
    without any random initialization, the fastest way to build a pretrained model, and random
    streams (Dropout's) start from ``jax.random.key(0)``. Every parameter must be loaded then.

    >>> from cnnjax.models import DenseNet
    >>> tiny = lambda: DenseNet(stage_sizes=(1, 1), growth_rate=4, num_init_features=8, num_classes=3, rngs=nnx.Rngs(0))
    >>> weights = {k: np.full_like(v, 0.5) for k, v in torch_state_dict(tiny()).items()}  # or a .pth file
    >>> model = load_torch_weights(nnx.eval_shape(tiny), weights)  # abstract: no random init
    >>> model.classifier.kernel.shape, float(model.classifier.kernel[0, 0])
    ((10, 3), 0.5)
    """
    op = "load_torch_weights"
    tensors = {t.key: t for t in _layout(model, op)}
    name = type(model).__name__
    skipped = _SKIPPED.get(type(model), ())
    given = {}
    for key, value in read_state_dict(source).items():
        key = _OLD_DENSENET_KEY.sub(r"\1\2", key) if isinstance(model, DenseNet) else key
        if not key.startswith(skipped):
            given[key] = value
    missing = [key for key, t in tensors.items() if key not in given and t.kind != "count"]
    unexpected = [key for key in given if key not in tensors]
    if strict and (missing or unexpected):
        raise ValueError(
            f"{op}: the state dict does not match {name}: missing keys {_listing(missing)}, "
            f"unexpected keys {_listing(unexpected)}"
        )
    updates = []
    for key, value in given.items():
        tensor = tensors.get(key)
        if tensor is None or tensor.kind == "count":
            continue
        if value.shape != tensor.torch_shape():
            raise ValueError(
                f"{op}: {key} has shape {value.shape} in the state dict, {name} needs {tensor.torch_shape()}"
            )
        updates.append((tensor.variable, tensor.from_torch(value)))
    loaded = {id(variable) for variable, _ in updates}
    variables = [(path, v) for path, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)]
    unset = [path for path, v in variables if _abstract(v) and not isinstance(v, nnx.RngState) and id(v) not in loaded]
    if unset:
        names = ["/".join(map(str, path)) for path in unset]
        raise ValueError(f"{op}: {name} is abstract (nnx.eval_shape) and the state dict leaves {_listing(names)} unset")
    for variable, value in updates:
        variable.set_value(value)
    for _, variable in variables:
        if _abstract(variable):  # an abstract model's random streams
            shape, dtype = variable.get_value().shape, variable.get_value().dtype
            key_dtype = jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
            variable.set_value(jax.random.key(0) if key_dtype else jnp.zeros(shape, dtype))
    return model


def _listing(keys: list[str], limit: int = 8) -> str:
    """``[a, b, ..., ... (N in all)]``: at most ``limit`` names, then the count; ``none`` if empty."""
    if not keys:
        return "none"
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + more + "]"


def torch_state_dict(model) -> dict[str, np.ndarray]:
    """The zoo ``model``'s weights as torchvision's state dict: NumPy arrays under torchvision's keys.

    The inverse of :func:`load_torch_weights`: torchvision's model loads it with
    ``load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`` (GoogLeNet: build it
    with ``aux_logits=False``, or load with ``strict=False``), and
    ``load_torch_weights(model, torch_state_dict(model))`` changes nothing. Shapes: conv
    weights ``(O, I // groups, kH, kW)``, Linear weights ``(O, I)``, BatchNorm vectors ``(C,)``,
    ``num_batches_tracked`` a 0-d int64 (0). Raises ``ValueError`` for a model without a
    torchvision counterpart or an abstract one (``nnx.eval_shape``: no values).

    >>> from cnnjax.models import DenseNet
    >>> sd = torch_state_dict(DenseNet(stage_sizes=(1, 1), growth_rate=4, num_init_features=8, rngs=nnx.Rngs(0)))
    >>> sd["features.conv0.weight"].shape, sd["features.transition1.conv.weight"].shape, sd["classifier.weight"].shape
    ((8, 3, 7, 7), (6, 12, 1, 1), (10, 10))
    """
    tensors = _layout(model, "torch_state_dict")
    if any(t.variable is not None and _abstract(t.variable) for t in tensors):
        raise ValueError(
            f"torch_state_dict: this {type(model).__name__} is abstract (nnx.eval_shape): no values to export"
        )
    return {t.key: t.to_torch() for t in tensors}
