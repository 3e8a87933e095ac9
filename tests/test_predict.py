"""Tests for ``cnnjax-predict`` (``cnnjax.train.predict``): preprocessing, top-5 output, errors and exit codes.

The end-to-end run uses MobileNet v2 (the smallest preset) with a PyTorch twin's random weights
in a ``.safetensors`` file, and checks the printed classes and probabilities against the twin's
own softmax on the same preprocessed images. torchvision's transforms are the reference for
:func:`preprocess` where torchvision is installed (not in CI: that test is skipped).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch
import torch_twins
from PIL import Image

from cnnjax.models._blocks import IMAGENET_MEAN, IMAGENET_STD
from cnnjax.models.mobilenet_v2 import INVERTED_RESIDUALS
from cnnjax.train.predict import imagenet_classes, main, preprocess


def random_image(seed: int, width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_preprocess_crops_the_center_and_normalizes():
    """A 256x300 image needs no resize (shorter side 256), so the output is the center crop
    (rows ``round(76 / 2) = 38`` on, columns 16 on), scaled to [0, 1] and normalized."""
    image = random_image(0, 256, 300)
    pixels = np.asarray(image, np.float32)[38 : 38 + 224, 16 : 16 + 224] / 255
    expected = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(preprocess(image), expected, rtol=1e-6, atol=1e-6)
    gray = preprocess(Image.new("L", (500, 400), 255))  # grayscale -> RGB, any size -> 224x224
    np.testing.assert_allclose(
        gray, np.broadcast_to((1 - np.array(IMAGENET_MEAN)) / IMAGENET_STD, (224, 224, 3)), rtol=1e-6
    )


def test_preprocess_matches_torchvisions_transforms():
    transforms = pytest.importorskip("torchvision.transforms")
    reference = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    for seed, (width, height) in enumerate([(640, 480), (333, 517), (224, 224), (1000, 260)]):
        image = random_image(seed, width, height)
        np.testing.assert_allclose(preprocess(image), reference(image).numpy().transpose(1, 2, 0), rtol=0, atol=1e-6)


def test_imagenet_classes_ship_with_the_package():
    names = imagenet_classes()
    assert len(names) == len(set(names)) == 1000
    assert names[:3] == ["tench", "goldfish", "great white shark"] and names[-1] == "toilet tissue"


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory):
    """A random MobileNet v2 twin (eval mode) and its weights as a ``.safetensors`` file."""
    torch.manual_seed(0)
    twin = torch_twins.randomize_batchnorm(torch_twins.MobileNetV2(INVERTED_RESIDUALS)).eval()
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.safetensors"
    safetensors.numpy.save_file({k: v.numpy() for k, v in twin.state_dict().items()}, str(path))
    return twin, path


def test_prints_the_top5_classes_of_each_image(tmp_path, capsys, mobilenet_weights):
    twin, weights = mobilenet_weights
    paths = [tmp_path / "a.jpg", tmp_path / "b.png"]
    random_image(1, 320, 240).save(paths[0])
    random_image(2, 200, 410).save(paths[1])
    assert main(["--model", "mobilenet_v2", "--weights", str(weights), *map(str, paths)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 6
    x = np.stack([preprocess(Image.open(p)) for p in paths]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        probabilities = torch.softmax(twin(torch.from_numpy(x)), -1).numpy()
    names = imagenet_classes()
    for i, path in enumerate(paths):
        block = lines[6 * i : 6 * i + 6]
        assert block[0] == str(path)
        printed = [line.split("%  ") for line in block[1:]]
        expected = np.argsort(-probabilities[i])[:5]
        assert [name for _, name in printed] == [names[c] for c in expected]
        np.testing.assert_allclose([float(p) for p, _ in printed], 100 * probabilities[i][expected], atol=0.006)


def test_errors_print_one_line_and_exit_1(tmp_path, capsys, mobilenet_weights):
    _, weights = mobilenet_weights
    good, unreadable = tmp_path / "good.jpg", tmp_path / "notes.jpg"
    random_image(0, 64, 64).save(good)
    unreadable.write_text("not an image")
    cases = [
        (
            ["--model", "mobilenet_v2", "--weights", str(weights), str(good), str(tmp_path / "gone.jpg")],
            "gone.jpg: no such file",
        ),
        (
            ["--model", "mobilenet_v2", "--weights", str(weights), str(unreadable)],
            "notes.jpg: cannot be read as an image",
        ),
        (
            ["--model", "resnet18", "--weights", str(weights), str(good)],
            "the state dict does not match ResNet: missing keys",
        ),
        (["--model", "resnet18", "--weights", str(tmp_path / "none.pth"), str(good)], "none.pth not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert len(captured.err.splitlines()) == 1 and message in captured.err, captured.err


def test_bad_arguments_exit_2(capsys):
    for argv in (["--model", "lenet5", "--weights", "w.pth", "x.jpg"], ["--model", "resnet18", "x.jpg"], []):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "invalid choice: 'lenet5'" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_as_a_module(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cnnjax.train.predict",
            "--model",
            "resnet18",
            "--weights",
            "w.pth",
            str(tmp_path / "x.jpg"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"cnnjax-predict: image {tmp_path / 'x.jpg'}: no such file"


@pytest.mark.slow
def test_explain_writes_each_images_saliency_beside_it(tmp_path, capsys, mobilenet_weights):
    _, weights = mobilenet_weights
    paths = [tmp_path / "a" / "cat.jpg", tmp_path / "b" / "cat.png", tmp_path / "dog.png"]
    for seed, path in enumerate(paths):
        path.parent.mkdir(exist_ok=True)
        random_image(seed, 240, 240).save(path)
    out = tmp_path / "explained"
    assert main(["--model", "mobilenet_v2", "--weights", str(weights), "--explain", str(out), *map(str, paths)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3 * 6  # the top-5 lists are printed as without --explain
    written = sorted(p.name for p in out.iterdir())
    assert written == ["cat_0_saliency.png", "cat_1_saliency.png", "dog_saliency.png"]
    for name in written:
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and (out / name).stat().st_size > 1000
