"""Every preset against torchvision's own model (skipped without torchvision, which CI does not have).

For each preset: torchvision's model with random weights and random BatchNorm statistics, in eval
mode; ``load_torch_weights`` of its ``state_dict()`` into the abstract cnnjax preset; logits for
two 224x224 images equal to float32 tolerance; and ``torch_state_dict`` loaded back into a fresh
torchvision model with ``load_state_dict(strict=True)`` gives the same tensors. Run locally in a
virtual environment with torchvision, e.g. ``pip install torch==2.14.1 torchvision==0.29.1``,
then ``pytest tests/test_torchvision.py -s -o addopts=''`` (``-s`` prints each preset's error).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_twins
from abstract_models import abstract
from flax import nnx

from cnnjax import models
from cnnjax.models import load_torch_weights, torch_state_dict

torchvision = pytest.importorskip("torchvision")

PRESETS = [
    "alexnet",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "googlenet",
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
]


def cnnjax_preset(name: str, **kwargs):
    constructor = {"alexnet": models.AlexNet, "googlenet": models.GoogLeNet}.get(name) or getattr(models, name)
    return abstract(constructor, num_classes=1000, **kwargs)


@pytest.mark.parametrize("name", PRESETS)
def test_logits_equal_torchvisions_model(name):
    # torchvision's pretrained GoogLeNet runs with transform_input=True (and has aux heads)
    extra = {"transform_input": True} if name == "googlenet" else {}
    torch.manual_seed(0)
    reference = torch_twins.randomize_batchnorm(getattr(torchvision.models, name)(**extra)).eval()
    model = load_torch_weights(cnnjax_preset(name, **extra), reference.state_dict())
    x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    logits = np.asarray(nnx.jit(lambda m, x: m(x, train=False))(model, x))
    error = float(np.max(np.abs(logits - expected)) / np.max(np.abs(expected)))
    print(f"\n{name}: max |cnnjax - torchvision| / max |torchvision| = {error:.2e}")
    assert error < 1e-5

    fresh = getattr(torchvision.models, name)(**({"aux_logits": False} if name == "googlenet" else {}))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in torch_state_dict(model).items()}, strict=True)
    for key, value in fresh.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, reference.state_dict()[key], rtol=0, atol=0)
