"""The model zoo: Flax NNX classifiers for NHWC images, one architecture per module.

Every model is built as ``Model(*, num_classes=10, in_features=3, small_input=False, ...,
impl="auto", rngs)`` (``LeNet5``: ``in_features=1``, ``input_size=28``; ``impl`` reaches every
cnnjax layer through :func:`cnnjax.nn.set_impl`, see :mod:`cnnjax.backprop`) and called as ``model(x, train=None)`` on
``(N, H, W, in_features)`` images, returning ``(N, num_classes)`` logits. ``small_input=True``
adapts the stem to 28x28 / 32x32 images. BatchNorm and Dropout follow NNX's modes
(``model.train()`` / ``model.eval()``; a new model is in training mode, as in PyTorch), which
``train=True/False`` overrides for one call. Presets are ``functools.partial`` data.

:func:`load_torch_weights` / :func:`torch_state_dict` read and write torchvision's weights
(torchvision's key names; files read without PyTorch) for every model torchvision also has
(:mod:`cnnjax.models.torch_weights`).
"""

from cnnjax.models.alexnet import AlexNet
from cnnjax.models.densenet import DenseLayer, DenseNet, densenet121, densenet161, densenet169, densenet201
from cnnjax.models.googlenet import GoogLeNet, Inception
from cnnjax.models.lenet import LeNet5
from cnnjax.models.mobilenet import MobileNetV1, depthwise_separable
from cnnjax.models.mobilenet_v2 import InvertedResidual, MobileNetV2, mobilenet_v2
from cnnjax.models.nin import NiN, nin_block
from cnnjax.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    wide_resnet50_2,
)
from cnnjax.models.torch_weights import load_torch_weights, torch_state_dict
from cnnjax.models.vgg import VGG, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn

__all__ = [
    "VGG",
    "AlexNet",
    "BasicBlock",
    "Bottleneck",
    "DenseLayer",
    "DenseNet",
    "GoogLeNet",
    "Inception",
    "InvertedResidual",
    "LeNet5",
    "MobileNetV1",
    "MobileNetV2",
    "NiN",
    "ResNet",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "depthwise_separable",
    "load_torch_weights",
    "mobilenet_v2",
    "nin_block",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "torch_state_dict",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "wide_resnet50_2",
]
