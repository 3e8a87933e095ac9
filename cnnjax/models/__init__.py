"""The model zoo: Flax NNX classifiers for NHWC images, one architecture per module.

Every model is built as ``Model(*, num_classes=10, in_features=3, small_input=False, ...,
impl="auto", rngs)`` (``LeNet5``: ``in_features=1``, ``input_size=28``; ``impl`` reaches every
cnnjax layer through :func:`cnnjax.nn.set_impl`, see :mod:`cnnjax.backprop`) and called as ``model(x, train=None)`` on
``(N, H, W, in_features)`` images, returning ``(N, num_classes)`` logits. ``small_input=True``
adapts the stem to 28x28 / 32x32 images. BatchNorm and Dropout follow NNX's modes
(``model.train()`` / ``model.eval()``; a new model is in training mode, as in PyTorch), which
``train=True/False`` overrides for one call. Presets are ``functools.partial`` data.
"""

from cnnjax.models.alexnet import AlexNet
from cnnjax.models.densenet import DenseLayer, DenseNet, densenet121
from cnnjax.models.googlenet import GoogLeNet, Inception
from cnnjax.models.lenet import LeNet5
from cnnjax.models.mobilenet import MobileNetV1, depthwise_separable
from cnnjax.models.nin import NiN, nin_block
from cnnjax.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50
from cnnjax.models.vgg import VGG, vgg11, vgg16

__all__ = [
    "VGG",
    "AlexNet",
    "BasicBlock",
    "Bottleneck",
    "DenseLayer",
    "DenseNet",
    "GoogLeNet",
    "Inception",
    "LeNet5",
    "MobileNetV1",
    "NiN",
    "ResNet",
    "densenet121",
    "depthwise_separable",
    "nin_block",
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg11",
    "vgg16",
]
