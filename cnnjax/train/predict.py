"""``cnnjax-predict``: classify images with torchvision's ImageNet weights in a cnnjax model.

    cnnjax-predict --model resnet50 --weights resnet50-0676ba61.pth cat.jpg dog.png

(also ``python -m cnnjax.train.predict``) prints, for each image, its path and the five most likely of
ImageNet's 1000 classes with their probabilities. Images are decoded with Pillow and
preprocessed as torchvision's ImageNet evaluation does (:func:`preprocess`). The weights file
(``torch.save`` ``.pth``/``.pt`` or ``.safetensors``) is read without PyTorch by
:func:`cnnjax.models.load_torch_weights`, into a model built abstractly (no random init).
``--model googlenet`` is built with ``transform_input=True``, as torchvision's pretrained
GoogLeNet. ``--explain DIR`` also writes, per image, ``DIR/<name>_saliency.png``: the image and
its top-1 class's gradient x input saliency side by side (:func:`cnnjax.train.visualize.saliency`).
A missing or unreadable image, or weights that do not fit the model (another
architecture), print one line naming the problem and exit 1; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

import numpy as np
from flax import nnx

from cnnjax import models
from cnnjax.models._blocks import IMAGENET_MEAN, IMAGENET_STD
from cnnjax.models.torch_weights import PRETRAINED

# --model names: torchvision's, each a 1000-class constructor.
MODELS = PRETRAINED

RESIZE, CROP = 256, 224


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names in torchvision's order (index = logit), shipped with cnnjax.

    >>> names = imagenet_classes()
    >>> len(names), names[0], names[207], names[999]
    (1000, 'tench', 'golden retriever', 'toilet tissue')
    """
    text = resources.files("cnnjax.train").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


def preprocess(image) -> np.ndarray:
    """A Pillow image -> ``(CROP, CROP, 3)`` float32, as torchvision's ImageNet evaluation transform.

    ``Resize(256)``: the shorter side to 256 and the longer to ``int(256 * long / short)``,
    Pillow's bilinear filter (antialiased: it widens with the scale); ``CenterCrop(224)``: the
    offsets ``round((size - 224) / 2)``; ``ToTensor``: RGB / 255; ``Normalize``: ImageNet's mean
    and std per channel. Returns NHWC-ready ``(H, W, C)``.

    >>> from PIL import Image
    >>> x = preprocess(Image.new("RGB", (640, 480), "white"))  # (1 - mean) / std
    >>> x.shape, [round(float(v), 3) for v in x[0, 0]]
    ((224, 224, 3), [2.249, 2.429, 2.64])
    """
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    short, long = sorted((width, height))
    size = (RESIZE, int(RESIZE * long / short)) if width <= height else (int(RESIZE * long / short), RESIZE)
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (round((n - CROP) / 2.0) for n in size)
    image = image.crop((left, top, left + CROP, top + CROP))
    x = np.asarray(image, np.float32) / 255.0
    return ((x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)).astype(np.float32)


def load_image(path: str) -> np.ndarray:
    """``preprocess`` of the image file at ``path``; ``ValueError`` naming it if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return preprocess(image)
    except FileNotFoundError:
        raise ValueError(f"image {path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:  # Pillow's decoding errors
        raise ValueError(f"image {path}: cannot be read as an image ({err})") from None


def top5(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities, classes)``, each ``(N, 5)``, most likely first, of ``model`` in eval mode on
    ``images`` ``(N, 224, 224, 3)``."""
    logits = nnx.jit(lambda m, x: m(x, train=False))(model, images)
    probabilities = np.asarray(nnx.softmax(logits.astype(np.float32), axis=-1))
    classes = np.argsort(-probabilities, axis=-1, kind="stable")[:, :5]
    return np.take_along_axis(probabilities, classes, axis=-1), classes


def build_parser() -> argparse.ArgumentParser:
    """``cnnjax-predict``'s arguments: ``--model``, ``--weights``, ``--explain`` and one or more images."""
    parser = argparse.ArgumentParser(
        prog="cnnjax-predict",
        description="Top-5 ImageNet classes of images, with torchvision's weights in a cnnjax model.",
    )
    parser.add_argument("--model", required=True, choices=sorted(MODELS), help="torchvision's model name")
    parser.add_argument(
        "--weights", required=True, help="torchvision weights: a .pth/.pt (torch.save) or .safetensors file"
    )
    parser.add_argument(
        "--explain",
        metavar="DIR",
        help="also write DIR/<image name>_saliency.png: each image beside its top-1 gradient x input saliency",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files Pillow can read (JPEG, PNG, ...)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``cnnjax-predict``: print each image's path and its top-5 classes; exit status 0, or 1 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        images = np.stack([load_image(path) for path in args.images])
        constructor = MODELS[args.model]
        model = models.load_torch_weights(nnx.eval_shape(lambda: constructor(rngs=nnx.Rngs(0))), args.weights)
    except (ValueError, OSError) as err:
        print(f"cnnjax-predict: {err}", file=sys.stderr)
        return 1
    names = imagenet_classes()
    probabilities, classes = top5(model, images)
    for path, p_row, c_row in zip(args.images, probabilities, classes, strict=True):
        print(path)
        for p, c in zip(p_row, c_row, strict=True):
            print(f"  {100 * p:6.2f}%  {names[c]}")
    if args.explain is not None:
        explain(model, images, args.images, [names[c] for c in classes[:, 0]], classes[:, 0], Path(args.explain))
    return 0


def explain(model, images: np.ndarray, paths, labels, classes, directory: Path) -> list[Path]:
    """Write ``directory/<stem>_saliency.png`` per image (``<stem>_<i>`` where two images share a
    stem): the image beside the gradient x input saliency of its class in ``classes``, titled with
    ``labels``; returns the paths written.

    >>> import tempfile
    >>> model, images = models.LeNet5(rngs=nnx.Rngs(0)), np.ones((2, 28, 28, 1), np.float32)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     [p.name for p in explain(model, images, ["a/x.png", "b/x.png"], ["one", "two"], [1, 2], Path(tmp))]
    ['x_0_saliency.png', 'x_1_saliency.png']
    """
    from cnnjax.train import visualize

    directory.mkdir(parents=True, exist_ok=True)
    result = visualize.saliency(model, images, classes)
    stems = [Path(path).stem for path in paths]
    written = []
    for i, (stem, label) in enumerate(zip(stems, labels, strict=True)):
        name = stem if stems.count(stem) == 1 else f"{stem}_{i}"
        written.append(result.save(directory / f"{name}_saliency.png", example=i, title=f"top-1: {label}"))
    return written


if __name__ == "__main__":
    sys.exit(main())
