"""PyTorch twins of the zoo's torchvision architectures, with torchvision's module (state-dict key) names.

Built from plain ``torch.nn`` (torchvision is not a test dependency), layer for layer as
torchvision's ``models/{alexnet,vgg,googlenet,resnet,densenet,mobilenetv2}.py``, and taking the
same configuration arguments as the cnnjax models, so a test can build both sides of any
configuration. Inputs are NCHW. :func:`randomize_batchnorm` gives every BatchNorm random affine
parameters and running statistics, so that eval-mode outputs depend on all four.

    >>> sorted(ResNet((1, 1, 1, 1), "basic").state_dict())[:3]
    ['bn1.bias', 'bn1.num_batches_tracked', 'bn1.running_mean']
"""

from __future__ import annotations

import collections

import torch
from torch import nn


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random ``weight``, ``bias``, ``running_mean`` and ``running_var`` (in [0.5, 1.5]) in every BatchNorm."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model


class AlexNet(nn.Module):
    """torchvision's ``AlexNet``."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class VGG(nn.Module):
    """torchvision's ``VGG`` over ``make_layers``; ``stage_features`` as ``cnnjax.models.VGG``'s."""

    def __init__(self, stage_features, batch_norm: bool = False, num_classes: int = 1000):
        super().__init__()
        layers, features = [], 3
        for stage in stage_features:
            for width in stage:
                norm = [nn.BatchNorm2d(width)] if batch_norm else []
                layers += [nn.Conv2d(features, width, 3, padding=1), *norm, nn.ReLU(inplace=True)]
                features = width
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(features * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BasicConv2d(nn.Module):
    """GoogLeNet's bias-free conv, BatchNorm (eps 0.001), ReLU."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_features, out_features, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_features, eps=0.001)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    def __init__(self, in_features, c1, c3_reduce, c3, c5_reduce, c5, pool_proj):
        super().__init__()
        self.branch1 = BasicConv2d(in_features, c1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(in_features, c3_reduce, 1), BasicConv2d(c3_reduce, c3, 3))
        self.branch3 = nn.Sequential(BasicConv2d(in_features, c5_reduce, 1), BasicConv2d(c5_reduce, c5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(in_features, pool_proj, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """An auxiliary head (training only: eval-mode outputs never use it)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.conv = BasicConv2d(in_features, 128, 1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)


class GoogLeNet(nn.Module):
    """torchvision's ``GoogLeNet`` (``aux_logits`` heads present but unused in eval mode)."""

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True, transform_input: bool = False):
        super().__init__()
        self.transform_input = transform_input
        self.conv1 = BasicConv2d(3, 64, 7, 2)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, 1)
        self.conv3 = BasicConv2d(64, 192, 3)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes)
            self.aux2 = InceptionAux(528, num_classes)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        if self.transform_input:
            mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            x = x * (std / 0.5) + (mean - 0.5) / 0.5
        for name in ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3"):
            x = getattr(self, name)(x)
        for name in ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4"):
            x = getattr(self, name)(x)
        x = self.inception5b(self.inception5a(x))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


class _Block(nn.Module):
    """torchvision's ``BasicBlock`` (``kind="basic"``) or ``Bottleneck``: convs ``conv1..``, norms
    ``bn1..``, ``downsample`` (conv 1x1, BatchNorm) where the shape changes."""

    def __init__(self, kind: str, in_features: int, planes: int, stride: int, groups: int, base_width: int):
        super().__init__()
        if kind == "basic":
            shapes, out_features = [(in_features, planes, 3, stride, 1), (planes, planes, 3, 1, 1)], planes
        else:
            width, out_features = int(planes * base_width / 64) * groups, planes * 4
            shapes = [(in_features, width, 1, 1, 1), (width, width, 3, stride, groups), (width, out_features, 1, 1, 1)]
        for k, (i, o, size, s, g) in enumerate(shapes, 1):
            setattr(self, f"conv{k}", nn.Conv2d(i, o, size, s, size // 2, groups=g, bias=False))
            setattr(self, f"bn{k}", nn.BatchNorm2d(o))
        self.depth = len(shapes)
        self.downsample = None
        if stride != 1 or in_features != out_features:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_features, out_features, 1, stride, bias=False), nn.BatchNorm2d(out_features)
            )
        self.out_features = out_features

    def forward(self, x):
        y = x
        for k in range(1, self.depth + 1):
            y = getattr(self, f"bn{k}")(getattr(self, f"conv{k}")(y))
            y = torch.relu(y) if k < self.depth else y
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ``ResNet``; ``block`` is ``"basic"`` or ``"bottleneck"``."""

    def __init__(self, stage_sizes, block: str, num_classes: int = 1000, groups: int = 1, width_per_group: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        features = 64
        for i, size in enumerate(stage_sizes):
            blocks = []
            for j in range(size):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(_Block(block, features, 64 * 2**i, stride, groups, width_per_group))
                features = blocks[-1].out_features
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class _DenseLayer(nn.Module):
    def __init__(self, in_features: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))
        return torch.cat([x, y], 1)


class DenseNet(nn.Module):
    """torchvision's ``DenseNet``: ``features`` (``conv0``, ``norm0``, ``denseblockK.denselayerJ``,
    ``transitionK``, ``norm5``) and ``classifier``."""

    def __init__(
        self, stage_sizes, growth_rate: int, num_init_features: int, bn_size: int = 4, num_classes: int = 1000
    ):
        super().__init__()
        modules = collections.OrderedDict(
            conv0=nn.Conv2d(3, num_init_features, 7, 2, 3, bias=False),
            norm0=nn.BatchNorm2d(num_init_features),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(3, 2, 1),
        )
        features = num_init_features
        for i, size in enumerate(stage_sizes, 1):
            block = nn.Sequential()
            for j in range(1, size + 1):
                block.add_module(f"denselayer{j}", _DenseLayer(features, growth_rate, bn_size))
                features += growth_rate
            modules[f"denseblock{i}"] = block
            if i < len(stage_sizes):
                modules[f"transition{i}"] = nn.Sequential(
                    collections.OrderedDict(
                        norm=nn.BatchNorm2d(features),
                        relu=nn.ReLU(inplace=True),
                        conv=nn.Conv2d(features, features // 2, 1, bias=False),
                        pool=nn.AvgPool2d(2, 2),
                    )
                )
                features //= 2
        modules["norm5"] = nn.BatchNorm2d(features)
        self.features = nn.Sequential(modules)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x):
        x = torch.relu(self.features(x))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1))


def _conv_norm_relu6(in_features: int, out_features: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
    """torchvision's ``Conv2dNormActivation`` with ReLU6: indices 0 (conv), 1 (BatchNorm), 2."""
    conv = nn.Conv2d(in_features, out_features, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_features), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, in_features: int, out_features: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = round(in_features * expand_ratio)
        self.use_res_connect = stride == 1 and in_features == out_features
        expand = [_conv_norm_relu6(in_features, hidden, 1)] if expand_ratio != 1 else []
        self.conv = nn.Sequential(
            *expand,
            _conv_norm_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_features, 1, bias=False),
            nn.BatchNorm2d(out_features),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's ``MobileNetV2`` at width 1 (``inverted_residual_setting`` rows ``(t, c, n, s)``)."""

    def __init__(self, inverted_residual_setting, num_classes: int = 1000):
        super().__init__()
        layers, features = [_conv_norm_relu6(3, 32, stride=2)], 32
        for t, c, n, s in inverted_residual_setting:
            for j in range(n):
                layers.append(InvertedResidual(features, c, s if j == 0 else 1, t))
                features = c
        layers.append(_conv_norm_relu6(features, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))
