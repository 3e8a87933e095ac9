"""Datasets: the embedded digits, local MNIST / Fashion-MNIST / CIFAR-10 files as NumPy arrays,
image folders read lazily, and deterministic batching.

Every array loader returns ``((x_train, y_train), (x_test, y_test))``: NHWC ``float32`` images
scaled to ``[0, 1]`` and ``int32`` labels in ``0..9``. :func:`load_imagefolder` returns two
:class:`ImageFolder` sources instead, which hold file names and labels and decode images only
when :mod:`cnnjax.train.pipeline` asks for a batch. The readers never download anything and never
skip anything: a missing file raises ``FileNotFoundError`` and a corrupt one raises
:class:`~cnnjax.train.errors.DataError` (a ``ValueError``), both naming the file and what was expected.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image

from cnnjax.shapes import check_positive
from cnnjax.train.errors import DataError

NUM_CLASSES = 10
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2

# (file stem, IDX magic number): 0x08 = unsigned bytes, then the number of dimensions.
_MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", 0x0803),
    "train_labels": ("train-labels-idx1-ubyte", 0x0801),
    "test_images": ("t10k-images-idx3-ubyte", 0x0803),
    "test_labels": ("t10k-labels-idx1-ubyte", 0x0801),
}
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_SHAPE = (3, 32, 32)
# What a CIFAR-10 batch may reference when unpickled: NumPy's array reconstructors, nothing else.
_CIFAR_PICKLE_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # matched case-insensitively; other files are ignored
IMAGEFOLDER_SPLITS = ("train", "val")
_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def load_digits(size: int = 28):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, no network), resized.

    The 0..16 pixel values are scaled to ``[0, 1]`` and resized bilinearly (half-pixel
    centres, ``jax.image.resize``) to ``size x size``; ``size=8`` keeps the originals. The
    split is fixed: a permutation from ``np.random.default_rng(0)``, the first 80% (1438
    images) for training and the last 20% (359 images) for testing.

    Returns:
        ``((x_train, y_train), (x_test, y_test))`` with ``x: (N, size, size, 1)`` float32 and
        ``y: (N,)`` int32.

    >>> (x_train, y_train), (x_test, y_test) = load_digits(size=8)
    >>> x_train.shape, x_test.shape, y_train.dtype
    ((1438, 8, 8, 1), (359, 8, 8, 1), dtype('int32'))
    """
    import jax.image
    from sklearn.datasets import load_digits as sklearn_digits

    size = check_positive(size, "size", "load_digits")
    digits = sklearn_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    if size != x.shape[1]:
        x = np.asarray(jax.image.resize(x, (len(x), size, size, 1), method="bilinear"))
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(x))
    n_test = int(len(x) * DIGITS_TEST_FRACTION)
    train, test = order[:-n_test], order[-n_test:]
    return (x[train], y[train]), (x[test], y[test])


def load_mnist(path):
    """MNIST from the four IDX files in the directory ``path`` (gzipped or not).

    The files keep their distribution names: ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
    optionally with ``.gz`` (detected from the file's content, not its name).

    Returns:
        ``((x_train, y_train), (x_test, y_test))``, ``x: (N, rows, cols, 1)`` float32 in
        ``[0, 1]`` (``pixel / 255``; 28x28 for the real data) and ``y: (N,)`` int32.

    >>> load_mnist("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: load_mnist: data directory /nonexistent does not exist
    """
    return _load_idx_dataset(path, "load_mnist")


def load_fashion_mnist(path):
    """Fashion-MNIST from the four IDX files in ``path``: the same files and format as
    :func:`load_mnist` (Zalando's files keep MNIST's names).

    Returns:
        ``((x_train, y_train), (x_test, y_test))``, ``x: (N, 28, 28, 1)`` float32, ``y`` int32.

    >>> load_fashion_mnist("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: load_fashion_mnist: data directory /nonexistent does not exist
    """
    return _load_idx_dataset(path, "load_fashion_mnist")


def load_cifar10(path):
    """CIFAR-10 from its python pickle batches, read from the local directory ``path``.

    ``path`` is the extracted ``cifar-10-batches-py`` directory (``data_batch_1`` ..
    ``data_batch_5``, ``test_batch``) or a directory holding it. Each batch is a pickled dict
    with ``data: (N, 3072)`` uint8 (rows of 3x32x32, channels first) and ``labels`` (N ints).
    Unpickling is restricted to NumPy's array reconstructors, so a file that references any
    other Python object is rejected rather than executed.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``, ``x: (N, 32, 32, 3)`` float32 in ``[0, 1]``
        (NHWC), ``y: (N,)`` int32.

    >>> load_cifar10("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: load_cifar10: data directory /nonexistent does not exist
    """
    op = "load_cifar10"
    root = _existing_dir(path, op)
    if os.path.isdir(os.path.join(root, _CIFAR_DIR)):
        root = os.path.join(root, _CIFAR_DIR)
    train = [_read_cifar_batch(_existing_file(root, name, op), op) for name in _CIFAR_TRAIN]
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return (x_train, y_train), _read_cifar_batch(_existing_file(root, _CIFAR_TEST, op), op)


def load_imagefolder(path, image_size: int = 224):
    """An image-folder dataset (the ImageNet layout, torchvision's ``ImageFolder`` convention),
    listed but not decoded: ``path/train/<class>/**`` and ``path/val/<class>/**``.

    Class ``k`` is the ``k``-th class folder name in sorted order; every JPEG or PNG file under a
    class folder (sub-folders included, other files ignored) is one image of that class. The
    checks happen here, before any training: a missing split, a class folder without images,
    or ``val/`` classes that differ from ``train/`` ones raise an error naming the folder.

    Returns:
        ``(train, val)``, two :class:`ImageFolder` sources with the same classes, whose images
        are ``(image_size, image_size, C)``; ``C`` is 1 if the first training image is
        grayscale, else 3, and every image is converted to it.

    >>> load_imagefolder("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: load_imagefolder: data directory /nonexistent does not exist
    """
    op = "load_imagefolder"
    root = _existing_dir(path, op)
    image_size = check_positive(image_size, "image_size", op)
    folders = [os.path.join(root, split) for split in IMAGEFOLDER_SPLITS]
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{op}: {folder} does not exist (expected {os.path.join(root, 'train', '<class>')} "
                f"and {os.path.join(root, 'val', '<class>')} folders of JPEG or PNG images)"
            )
    train_classes, val_classes = (_class_folders(folder, op) for folder in folders)
    if train_classes != val_classes:
        missing, extra = sorted(set(train_classes) - set(val_classes)), sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f"{op}: the classes of {folders[1]} differ from those of {folders[0]}: missing {missing}, extra {extra}"
        )
    train = ImageFolder(folders[0], image_size)
    return train, ImageFolder(folders[1], image_size, mode=train.mode)


class ImageFolder:
    """The images of one split, ``root/<class>/**/*.{jpg,jpeg,png}``, decoded only when read.

    Holds one file name and one label per image (never pixels). :meth:`read` decodes with
    Pillow, converts to ``mode``, crops a box (:func:`crop_box`: the largest centred square,
    or a random-resized crop) and resizes it bilinearly to ``image_size x image_size``.

    Args:
        root: the split's folder; its sub-folders are the classes, in sorted order.
        image_size: the side of every image :meth:`read` returns.
        mode: ``"L"`` (grayscale, 1 channel) or ``"RGB"`` (3 channels); ``None``: ``"L"`` if
            the first image is grayscale, else ``"RGB"``.

    Attributes: ``classes`` (the folder names), ``labels: (N,)`` int32, ``channels``.

    >>> ImageFolder("/nonexistent", 32)
    Traceback (most recent call last):
    ...
    FileNotFoundError: ImageFolder: data directory /nonexistent does not exist
    """

    def __init__(self, root, image_size: int, *, mode: str | None = None):
        op = "ImageFolder"
        self.root = _existing_dir(root, op)
        self.image_size = check_positive(image_size, "image_size", op)
        if mode not in (None, "L", "RGB"):
            raise DataError(f"{op}: mode must be None, 'L' or 'RGB', got {mode!r}")
        self.classes = _class_folders(self.root, op)
        names, labels = [], []
        for label, name in enumerate(self.classes):
            files = _image_files(os.path.join(self.root, name))
            if not files:
                raise DataError(
                    f"{op}: class folder {os.path.join(self.root, name)} holds no image "
                    f"(files ending in {', '.join(IMAGE_EXTENSIONS)})"
                )
            names += files
            labels += [label] * len(files)
        # bytes, fixed width: one compact array to pickle to every worker process
        self._names = np.array([os.fsencode(name) for name in names])
        self.labels = np.array(labels, np.int32)
        self.mode = mode or self._first_image_mode()
        self.channels = 1 if self.mode == "L" else 3

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        """The file of image ``i``."""
        return os.path.join(self.root, self.classes[self.labels[i]], os.fsdecode(self._names[i]))

    def read(self, indices, crops=None) -> tuple[np.ndarray, np.ndarray]:
        """Decode images ``indices: (B,)``: ``(x, y)``, ``x: (B, image_size, image_size,
        channels)`` uint8, ``y: (B,)`` int32. ``crops: (B, 4)`` random-resized-crop draws
        (:func:`crop_box`), ``None`` for the centred square.

        An unreadable image raises ``ValueError`` naming its path and the reason: a run stops on
        it rather than skipping it, since a substitute or a smaller batch would change what the
        run sees (and break bit-for-bit resume and process-count independence).
        """
        size = self.image_size
        x = np.empty((len(indices), size, size, self.channels), np.uint8)
        for row, i in enumerate(indices):
            path = self.path(i)
            try:
                with Image.open(path) as image:
                    image = image.convert(self.mode)
                    box = crop_box(None if crops is None else crops[row], *image.size)
                    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
            except Exception as e:  # Pillow raises many types on damaged files; all mean the same here
                raise DataError(f"ImageFolder: cannot read {path}: {type(e).__name__}: {e}") from None
            x[row] = np.asarray(image).reshape(size, size, self.channels)
        return x, self.labels[indices]

    def _first_image_mode(self) -> str:
        path = self.path(0)
        try:
            with Image.open(path) as image:
                return "L" if image.mode in _GRAYSCALE_MODES else "RGB"
        except Exception as e:  # as in read
            raise DataError(f"ImageFolder: cannot read {path}: {type(e).__name__}: {e}") from None


class ArraySource:
    """In-memory images as a :mod:`cnnjax.train.pipeline` source: ``x: (N, H, W, C)``, ``y: (N,)`` int.

    >>> x, y = ArraySource(np.arange(8.0).reshape(2, 2, 2, 1), np.array([3, 5])).read(np.array([1]))
    >>> x[0, ..., 0].tolist(), y.tolist()
    ([[4.0, 5.0], [6.0, 7.0]], [5])
    """

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def read(self, indices, crops=None) -> tuple[np.ndarray, np.ndarray]:
        """``(x[indices], y[indices])``; with ``crops: (B, 4)`` (:func:`crop_box`) each image's
        random-resized crop, resized bilinearly (Pillow, per channel) back to ``H x W``."""
        x = self.x[indices]
        if crops is not None:
            x = np.stack([_resized_crop(image, crop) for image, crop in zip(x, crops, strict=True)])
        return x, self.y[indices]


def _resized_crop(image: np.ndarray, crop) -> np.ndarray:
    """One ``(H, W, C)`` image's :func:`crop_box`, resized bilinearly back to ``H x W``."""
    height, width = image.shape[:2]
    box = crop_box(crop, width, height)
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(channel, np.float32)).resize(
                (width, height), Image.Resampling.BILINEAR, box=box
            )
        )
        for channel in np.moveaxis(image, -1, 0)
    ]
    return np.stack(channels, axis=-1).astype(image.dtype)


def num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
    """How many batches :func:`batches` yields for ``n`` examples: ``floor(n / batch_size)``
    with ``drop_remainder``, else ``ceil(n / batch_size)``.

    >>> num_batches(10, 4, drop_remainder=False), num_batches(10, 4, drop_remainder=True)
    (3, 2)
    """
    return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch visits ``n`` examples: ``(n,)`` int64.

    With ``shuffle``, ``np.random.default_rng((seed, epoch)).permutation(n)``: each epoch a
    fresh order, the same one for the same ``(seed, epoch)``; else ``0, 1, ..., n - 1``.

    >>> epoch_order(5, shuffle=True, seed=0, epoch=0).tolist(), epoch_order(3, shuffle=False, seed=0, epoch=0).tolist()
    ([2, 4, 3, 0, 1], [0, 1, 2])
    """
    return np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)


def crop_box(crop, width: int, height: int) -> tuple[float, float, float, float]:
    """The ``(left, top, right, bottom)`` box in pixels of a random-resized crop.

    ``crop = (area, ratio, u, v)`` (:class:`cnnjax.train.pipeline.DrawAugmentation`): the box covers ``area`` of the
    ``width x height`` image with ``width / height = ratio``, each side clipped to the image
    (torchvision resamples up to 10 times instead), at the relative position ``(u, v)`` of the
    room left. ``crop=None``: the largest centred square (evaluation, and no augmentation).

    >>> crop_box(None, 40, 20), crop_box((0.25, 1.0, 0.0, 1.0), 20, 20)
    ((10.0, 0.0, 30.0, 20.0), (0.0, 10.0, 10.0, 20.0))
    """
    if crop is None:
        side = min(width, height)
        w = h = side
        u = v = 0.5
    else:
        area, ratio, u, v = crop
        w = min(math.sqrt(area * width * height * ratio), width)
        h = min(math.sqrt(area * width * height / ratio), height)
    left, top = u * (width - w), v * (height - h)
    return (float(left), float(top), float(left + w), float(top + h))


def batches(
    x, y, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0, drop_remainder: bool = False
):
    """Iterate over ``(x_batch, y_batch)`` pairs of NumPy arrays.

    With ``shuffle`` the order is :func:`epoch_order`, a permutation drawn from
    ``np.random.default_rng((seed, epoch))`` (the order :func:`cnnjax.train.fit` trains in): the
    same ``(seed, epoch)`` always gives the same batches, and each epoch gets a fresh order. Without ``shuffle`` the data is read in order (``seed`` and ``epoch`` unused).
    The last batch holds the remaining ``n mod batch_size`` examples, or is dropped with
    ``drop_remainder`` (PyTorch's ``drop_last``). Arguments are checked when this is called,
    not at the first ``next``.

    Args:
        x: ``(N, ...)``; y: ``(N, ...)``.

    Returns:
        An iterator of :func:`num_batches` pairs, ``x_batch: (B, ...)``, ``y_batch: (B, ...)``.

    >>> x, y = np.arange(5), np.arange(5) * 10
    >>> [yb.tolist() for _, yb in batches(x, y, 2)]
    [[0, 10], [20, 30], [40]]
    >>> [yb.tolist() for _, yb in batches(x, y, 2, shuffle=True, seed=0, drop_remainder=True)]
    [[20, 40], [30, 0]]
    """
    op = "batches"
    batch_size = check_positive(batch_size, "batch_size", op)
    seed = check_positive(seed, "seed", op, minimum=0)
    epoch = check_positive(epoch, "epoch", op, minimum=0)
    if len(x) != len(y):
        raise DataError(f"{op}: x and y must hold the same number of examples, got {len(x)} and {len(y)}")
    n = len(x)
    order = epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
    starts = range(0, num_batches(n, batch_size, drop_remainder) * batch_size, batch_size)
    return _batch_iterator(x, y, order, starts, batch_size)


def _batch_iterator(x, y, order, starts, batch_size) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in starts:
        index = order[start : start + batch_size]
        yield x[index], y[index]


def _existing_dir(path, op: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{op}: data directory {path} does not exist")
    return path


def _existing_file(root: str, name: str, op: str) -> str:
    for candidate in (os.path.join(root, name), os.path.join(root, name + ".gz")):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{op}: {os.path.join(root, name)} not found (expected {name} or {name}.gz in {root})")


def _load_idx_dataset(path, op: str):
    root = _existing_dir(path, op)
    arrays = {key: _read_idx(_existing_file(root, stem, op), magic, op) for key, (stem, magic) in _MNIST_FILES.items()}

    def split(kind: str):
        images_path, images = arrays[f"{kind}_images"]
        labels_path, labels = arrays[f"{kind}_labels"]
        if len(images) != len(labels):
            raise DataError(
                f"{op}: {images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
            )
        _check_labels(labels, labels_path, op)
        return (images[..., None] / np.float32(255)), labels.astype(np.int32)

    train, test = split("train"), split("test")
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DataError(f"{op}: train images are {train[0].shape[1:3]} but test images are {test[0].shape[1:3]}")
    return train, test


def _read_idx(path: str, magic: int, op: str) -> tuple[str, np.ndarray]:
    """One IDX file: a big-endian magic number ``0x0000TTDD`` (T = type, D = number of dims),
    D big-endian uint32 sizes, then the unsigned-byte data, exactly ``prod(sizes)`` bytes."""
    content = _read_bytes(path, op)
    ndim = magic & 0xFF
    header_size = 4 * (1 + ndim)
    if len(content) < header_size:
        raise DataError(
            f"{op}: {path} is truncated: {len(content)} bytes, shorter than its {header_size}-byte IDX header"
        )
    found = int.from_bytes(content[:4], "big")
    if found != magic:
        raise DataError(
            f"{op}: {path} has magic number {found:#010x}, expected {magic:#010x} (unsigned bytes, {ndim}-D)"
        )
    shape = tuple(int(s) for s in np.frombuffer(content, ">u4", count=ndim, offset=4))
    expected, found_size = math.prod(shape), len(content) - header_size
    if found_size != expected:
        what = "is truncated" if found_size < expected else "has trailing data"
        raise DataError(
            f"{op}: {path} {what}: its header says shape {shape} ({expected} bytes) but it holds {found_size} bytes"
        )
    return path, np.frombuffer(content, np.uint8, offset=header_size).reshape(shape)


def _read_bytes(path: str, op: str) -> bytes:
    with open(path, "rb") as f:
        content = f.read()
    if content[:2] != b"\x1f\x8b":
        return content
    try:
        return gzip.decompress(content)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{op}: {path} is not a valid gzip file ({e})") from e


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only NumPy arrays")
        return super().find_class(module, name)


def _read_cifar_batch(path: str, op: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        except Exception as e:  # pickle raises many types on corrupt input; all mean the same here
            raise DataError(f"{op}: {path} is not a readable CIFAR-10 pickle batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DataError(f"{op}: {path} should hold a dict with 'data' and 'labels', found {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{op}: {path} should hold 'data' and 'labels' entries, found keys {sorted(batch, key=str)}")
    row = math.prod(_CIFAR_SHAPE)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
        shape, dtype = getattr(data, "shape", None), getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{op}: {path}: 'data' should be uint8 of shape (N, {row}), found {dtype} of shape {shape}")
    labels = np.asarray(labels)
    if labels.shape != (len(data),):
        raise DataError(f"{op}: {path} holds {len(data)} images but {labels.size} labels")
    _check_labels(labels, path, op)
    images = data.reshape(-1, *_CIFAR_SHAPE).transpose(0, 2, 3, 1) / np.float32(255)
    return images, labels.astype(np.int32)


def _check_labels(labels: np.ndarray, path: str, op: str) -> None:
    if labels.size and not (
        np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0 and labels.max() < NUM_CLASSES
    ):
        raise DataError(
            f"{op}: {path}: labels must be integers in 0..{NUM_CLASSES - 1}, found {labels.dtype} in [{labels.min()}, {labels.max()}]"
        )


def _class_folders(root: str, op: str) -> tuple[str, ...]:
    classes = tuple(sorted(entry.name for entry in os.scandir(root) if entry.is_dir()))
    if not classes:
        raise DataError(f"{op}: {root} holds no class folder (expected {os.path.join(root, '<class>')} folders)")
    return classes


def _image_files(folder: str) -> list[str]:
    """The image files under ``folder`` (recursively, in torchvision's order), relative to it."""
    files = []
    for directory, _, names in sorted(os.walk(folder, followlinks=True)):
        for name in sorted(names):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.relpath(os.path.join(directory, name), folder))
    return files
