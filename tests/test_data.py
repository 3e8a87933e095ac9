"""cnnjax.train.data: file readers round-trip tiny files written here, every corruption names its file,
image folders list and decode what torchvision's ImageFolder would and refuse unusable trees
before training, the embedded digits split is fixed, and batching is deterministic."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from cnnjax.train.data import (
    _MNIST_FILES,
    ArraySource,
    ImageFolder,
    batches,
    crop_box,
    epoch_order,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_imagefolder,
    load_mnist,
    num_batches,
)

IDX_LOADERS = [load_mnist, load_fashion_mnist]


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000_08_<ndim>, big-endian uint32 sizes, data."""
    magic = 0x0800 | array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_file(path, content: bytes, gz: bool = False) -> str:
    path = os.fspath(path) + (".gz" if gz else "")
    with open(path, "wb") as f:
        f.write(gzip.compress(content) if gz else content)
    return path


def make_idx_dataset(root, *, gz=False, n_train=6, n_test=4, shape=(4, 6), seed=0):
    """Write the four MNIST IDX files with random contents; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, array in arrays.items():
        write_file(root / _MNIST_FILES[key][0], idx_bytes(array), gz)
    return arrays


@pytest.mark.parametrize("loader", IDX_LOADERS)
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, loader, gz):
    arrays = make_idx_dataset(tmp_path, gz=gz, seed=int(gz))
    (x_train, y_train), (x_test, y_test) = loader(tmp_path)
    assert x_train.dtype == x_test.dtype == np.float32
    assert y_train.dtype == y_test.dtype == np.int32
    np.testing.assert_array_equal(x_train, arrays["train_images"][..., None] / np.float32(255))
    np.testing.assert_array_equal(x_test, arrays["test_images"][..., None] / np.float32(255))
    np.testing.assert_array_equal(y_train, arrays["train_labels"])
    np.testing.assert_array_equal(y_test, arrays["test_labels"])
    assert x_train.shape == (6, 4, 6, 1) and x_test.shape == (4, 4, 6, 1)


def test_idx_mixed_gzip_and_raw(tmp_path):
    arrays = make_idx_dataset(tmp_path)
    labels = tmp_path / _MNIST_FILES["test_labels"][0]
    write_file(labels, idx_bytes(arrays["test_labels"]), gz=True)
    os.remove(labels)
    (_, _), (_, y_test) = load_mnist(tmp_path)
    np.testing.assert_array_equal(y_test, arrays["test_labels"])


def corrupt_idx(root, case: str) -> tuple[str, str]:
    """Damage one file of a valid IDX dataset; return (the damaged path, expected message part)."""
    arrays = make_idx_dataset(root)
    images = os.fspath(root / _MNIST_FILES["train_images"][0])
    labels = os.fspath(root / _MNIST_FILES["train_labels"][0])
    good = idx_bytes(arrays["train_images"])
    if case == "missing file":
        os.remove(labels)
        return labels, "not found"
    if case == "truncated data":
        write_file(images, good[:-5])
        return images, "truncated"
    if case == "truncated header":
        write_file(images, good[:10])
        return images, "header"
    if case == "trailing data":
        write_file(images, good + b"\0\0")
        return images, "trailing data"
    if case == "bad magic":
        write_file(images, idx_bytes(arrays["train_images"], magic=0x0D03))
        return images, "magic number 0x00000d03, expected 0x00000803"
    if case == "wrong number of dimensions":
        write_file(images, idx_bytes(arrays["train_images"].reshape(6, 24)))
        return images, "magic number"
    if case == "header shape mismatch":
        header = (0x0803).to_bytes(4, "big") + b"".join(s.to_bytes(4, "big") for s in (6, 5, 6))
        write_file(images, header + arrays["train_images"].tobytes())
        return images, r"header says shape (6, 5, 6)"
    if case == "count mismatch":
        write_file(labels, idx_bytes(arrays["train_labels"][:5]))
        return labels, "6 images but"
    if case == "label out of range":
        write_file(labels, idx_bytes(np.full(6, 10, np.uint8)))
        return labels, "labels must be integers in 0..9"
    if case == "corrupt gzip":
        os.remove(images)
        write_file(images + ".gz", gzip.compress(good)[:-12])
        return images + ".gz", "not a valid gzip file"
    if case == "train/test shape mismatch":
        test_images = os.fspath(root / _MNIST_FILES["test_images"][0])
        write_file(test_images, idx_bytes(np.zeros((4, 5, 5), np.uint8)))
        return "(4, 6)", "test images are (5, 5)"
    raise AssertionError(case)


IDX_CORRUPTIONS = [
    "missing file",
    "truncated data",
    "truncated header",
    "trailing data",
    "bad magic",
    "wrong number of dimensions",
    "header shape mismatch",
    "count mismatch",
    "label out of range",
    "corrupt gzip",
    "train/test shape mismatch",
]


@pytest.mark.parametrize("loader", IDX_LOADERS)
@pytest.mark.parametrize("case", IDX_CORRUPTIONS)
def test_idx_corruption_names_path_and_problem(tmp_path, loader, case):
    path, problem = corrupt_idx(tmp_path, case)
    error = FileNotFoundError if case == "missing file" else ValueError
    with pytest.raises(error, match=re.escape(path)) as info:
        loader(tmp_path)
    assert problem in str(info.value)
    assert str(info.value).startswith(loader.__name__ + ": ")


@pytest.mark.parametrize("loader", [*IDX_LOADERS, load_cifar10])
def test_missing_directory(tmp_path, loader):
    missing = tmp_path / "nope"
    with pytest.raises(
        FileNotFoundError, match=f"{loader.__name__}: data directory {re.escape(str(missing))} does not exist"
    ):
        loader(missing)


def cifar_batch(n: int, seed: int, str_keys: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    return {"data": data, "labels": labels} if str_keys else {b"data": data, b"labels": labels, b"batch_label": b"x"}


def write_cifar(root, sizes=(3, 2, 4, 1, 2), n_test=5, str_keys=False, protocol=pickle.HIGHEST_PROTOCOL):
    """Write the six CIFAR-10 batches into root/cifar-10-batches-py; return them (train..., test)."""
    directory = root / "cifar-10-batches-py"
    directory.mkdir()
    written = []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, (name, n) in enumerate(zip(names, [*sizes, n_test], strict=True)):
        batch = cifar_batch(n, seed, str_keys)
        (directory / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        written.append(batch)
    return directory, written


def nhwc_reference(batch: dict) -> np.ndarray:
    """CIFAR rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32."""
    data = batch.get(b"data", batch.get("data"))
    x = np.empty((len(data), 32, 32, 3), np.float32)
    for c in range(3):
        x[..., c] = data[:, c * 1024 : (c + 1) * 1024].reshape(-1, 32, 32) / np.float32(255)
    return x


@pytest.mark.parametrize("str_keys", [False, True])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("point_at_parent", [False, True])
def test_cifar10_round_trip(tmp_path, str_keys, protocol, point_at_parent):
    directory, written = write_cifar(tmp_path, str_keys=str_keys, protocol=protocol)
    (x_train, y_train), (x_test, y_test) = load_cifar10(tmp_path if point_at_parent else directory)
    key = "labels" if str_keys else b"labels"
    assert x_train.shape == (12, 32, 32, 3) and x_test.shape == (5, 32, 32, 3)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int32
    np.testing.assert_array_equal(x_train, np.concatenate([nhwc_reference(b) for b in written[:5]]))
    np.testing.assert_array_equal(y_train, np.concatenate([b[key] for b in written[:5]]))
    np.testing.assert_array_equal(x_test, nhwc_reference(written[5]))
    np.testing.assert_array_equal(y_test, written[5][key])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def corrupt_cifar(directory, case: str) -> tuple[str, type, str]:
    path = directory / "data_batch_3"
    good = path.read_bytes()
    if case == "missing file":
        path.unlink()
        return str(path), FileNotFoundError, "not found"
    if case == "truncated":
        path.write_bytes(good[: len(good) // 2])
        return str(path), ValueError, "not a readable CIFAR-10 pickle batch"
    if case == "not a pickle":
        path.write_bytes(b"hello, world")
        return str(path), ValueError, "not a readable CIFAR-10 pickle batch"
    if case == "foreign object":
        path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
        return str(path), ValueError, "refusing to load"
    if case == "not a dict":
        path.write_bytes(pickle.dumps([1, 2, 3]))
        return str(path), ValueError, "should hold a dict"
    if case == "missing labels":
        path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
        return str(path), ValueError, "should hold 'data' and 'labels'"
    if case == "wrong row size":
        path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}))
        return str(path), ValueError, "should be uint8 of shape (N, 3072)"
    if case == "wrong dtype":
        path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}))
        return str(path), ValueError, "found float32"
    if case == "count mismatch":
        path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}))
        return str(path), ValueError, "2 images but 3 labels"
    if case == "label out of range":
        path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 11]}))
        return str(path), ValueError, "labels must be integers in 0..9"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "truncated",
        "not a pickle",
        "foreign object",
        "not a dict",
        "missing labels",
        "wrong row size",
        "wrong dtype",
        "count mismatch",
        "label out of range",
    ],
)
def test_cifar10_corruption_names_path_and_problem(tmp_path, case):
    directory, _ = write_cifar(tmp_path)
    path, error, problem = corrupt_cifar(directory, case)
    with pytest.raises(error, match=re.escape(path)) as info:
        load_cifar10(directory)
    assert problem in str(info.value)


@pytest.fixture(scope="module")
def digits28():
    return load_digits()


def test_load_digits_shapes_dtypes_range(digits28):
    (x_train, y_train), (x_test, y_test) = digits28
    assert x_train.shape == (1438, 28, 28, 1) and x_test.shape == (359, 28, 28, 1)
    assert x_train.dtype == x_test.dtype == np.float32
    assert y_train.dtype == y_test.dtype == np.int32
    for x in (x_train, x_test):
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.9
    assert set(np.unique(y_train)) == set(np.unique(y_test)) == set(range(10))


def test_load_digits_split_is_fixed_and_partitions_the_data(digits28):
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    order = np.random.default_rng(0).permutation(1797)
    (x_train, y_train), (x_test, y_test) = load_digits(size=8)
    np.testing.assert_array_equal(x_train[..., 0], digits.images[order[:1438]] / np.float32(16))
    np.testing.assert_array_equal(x_test[..., 0], digits.images[order[1438:]] / np.float32(16))
    np.testing.assert_array_equal(np.concatenate([y_train, y_test]), digits.target[order])
    again = load_digits()
    for first, second in zip(digits28, again, strict=True):
        np.testing.assert_array_equal(first[0], second[0])
        np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(digits28[0][1], y_train)


def test_load_digits_resize_is_bilinear(digits28):
    """Upsampling by 2 with half-pixel centres: output pixel 1 sits at input coordinate 0.25, so it
    is 0.75 * in[0] + 0.25 * in[1]; every input pixel's weights sum to 2 per axis, so the mean
    brightness is kept."""
    (x8, _), _ = load_digits(size=8)
    (x16, _), _ = load_digits(size=16)
    expected = 0.75 * x8[:, 0, 0, 0] + 0.25 * x8[:, 0, 1, 0]
    vertical = 0.75 * x8[:, 0, 0, 0] + 0.25 * x8[:, 1, 0, 0]
    np.testing.assert_allclose(x16[:, 0, 1, 0], expected, atol=1e-6)
    np.testing.assert_allclose(x16[:, 1, 0, 0], vertical, atol=1e-6)
    np.testing.assert_allclose(x16.mean(axis=(1, 2, 3)), x8.mean(axis=(1, 2, 3)), atol=1e-6)


@pytest.mark.parametrize("size", [0, -3])
def test_load_digits_rejects_bad_size(size):
    with pytest.raises(ValueError, match=f"load_digits: size={size} must be >= 1"):
        load_digits(size=size)


def collect(x, y, batch_size, **kwargs):
    return [(xb.copy(), yb.copy()) for xb, yb in batches(x, y, batch_size, **kwargs)]


def test_batches_in_order_with_remainder():
    x, y = np.arange(10).reshape(10, 1) * 2, np.arange(10)
    got = collect(x, y, 4)
    assert [yb.tolist() for _, yb in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [xb[:, 0].tolist() for xb, _ in got] == [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18]]
    assert [yb.tolist() for _, yb in collect(x, y, 4, drop_remainder=True)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_batches_shuffle_is_deterministic_per_seed_and_epoch():
    x, y = np.arange(50), np.arange(50)
    order = lambda **kw: np.concatenate([yb for _, yb in batches(x, y, 8, shuffle=True, **kw)])
    np.testing.assert_array_equal(order(seed=3, epoch=1), order(seed=3, epoch=1))
    np.testing.assert_array_equal(order(seed=3, epoch=1), np.random.default_rng((3, 1)).permutation(50))
    assert not np.array_equal(order(seed=3, epoch=1), order(seed=3, epoch=2))
    assert not np.array_equal(order(seed=3, epoch=1), order(seed=4, epoch=1))
    for xb, yb in batches(x, y, 8, shuffle=True, seed=5):
        np.testing.assert_array_equal(xb, yb)  # x and y stay paired


@given(
    n=st.integers(1, 40),
    batch_size=st.integers(1, 12),
    shuffle=st.booleans(),
    drop_remainder=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_batches_cover_each_example_at_most_once(n, batch_size, shuffle, drop_remainder, seed):
    x, y = np.arange(n), np.arange(n)
    got = collect(x, y, batch_size, shuffle=shuffle, seed=seed, drop_remainder=drop_remainder)
    assert len(got) == num_batches(n, batch_size, drop_remainder)
    sizes = [len(yb) for _, yb in got]
    assert all(s == batch_size for s in sizes[:-1])
    seen = np.concatenate([yb for _, yb in got]) if got else np.array([], int)
    assert len(set(seen.tolist())) == len(seen) == (n // batch_size * batch_size if drop_remainder else n)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": 0}, ValueError, "batches: batch_size=0 must be >= 1"),
        ({"batch_size": 2.5}, TypeError, "batches: batch_size must be an int"),
        ({"batch_size": 2, "seed": -1}, ValueError, "batches: seed=-1 must be >= 0"),
        ({"batch_size": 2, "y": np.arange(4)}, ValueError, "same number of examples, got 5 and 4"),
    ],
)
def test_batches_validates_when_called(kwargs, error, message):
    args = {"x": np.arange(5), "y": np.arange(5), **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        batches(args.pop("x"), args.pop("y"), args.pop("batch_size"), **args)  # raises before any next()


# --- image folders ----------------------------------------------------------------------------------


def save(path, pixels: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def pixels(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_tree(root, classes=("cat", "dog"), per_class=2, shape=(4, 4, 3), splits=("train", "val")) -> dict:
    """``root/<split>/<class>/<i>.png`` random images; returns {path: pixels}."""
    written = {}
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            for i in range(per_class):
                path = root / split / name / f"{i}.png"
                written[path] = save(path, pixels(shape, seed=100 * s + 10 * c + i))
    return written


def test_imagefolder_lists_like_torchvision_and_decodes_pngs_exactly(tmp_path):
    """Classes in sorted folder order ('B' < 'a10' < 'a2', as torchvision's sorted()), every JPEG
    or PNG below a class folder (sub-folders too, any case), other files ignored; PNGs at the
    target size come back bit-exact."""
    written = write_tree(tmp_path, classes=("a2", "B", "a10"))
    nested = save(tmp_path / "train" / "a2" / "deeper" / "X.PNG", pixels((4, 4, 3), seed=7))
    (tmp_path / "train" / "B" / "notes.txt").write_text("not an image")
    train, val = load_imagefolder(tmp_path, image_size=4)
    assert train.classes == val.classes == ("B", "a10", "a2")
    assert len(train) == 7 and len(val) == 6 and train.channels == 3 and train.mode == "RGB"
    paths = [train.path(i) for i in range(len(train))]
    assert paths[-1] == str(tmp_path / "train" / "a2" / "deeper" / "X.PNG")
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2, 2])
    x, y = train.read(np.array([6, 0, 4]))
    assert x.dtype == np.uint8 and x.shape == (3, 4, 4, 3)
    np.testing.assert_array_equal(x[0], nested)
    np.testing.assert_array_equal(x[1], written[tmp_path / "train" / "B" / "0.png"])
    np.testing.assert_array_equal(x[2], written[tmp_path / "train" / "a2" / "0.png"])
    np.testing.assert_array_equal(y, [2, 0, 2])


def test_imagefolder_centre_square_and_grayscale(tmp_path):
    """A 4x8 image loses two columns on each side (the centred 4x4 square); a grayscale first
    image makes the dataset 1-channel, and RGB images are converted to it."""
    image = np.arange(32, dtype=np.uint8).reshape(4, 8) * 7
    save(tmp_path / "train" / "k" / "wide.png", image)
    save(tmp_path / "val" / "k" / "rgb.png", np.stack([image] * 3, axis=-1))
    train, val = load_imagefolder(tmp_path, image_size=4)
    assert train.mode == val.mode == "L" and train.channels == 1
    np.testing.assert_array_equal(train.read(np.array([0]))[0][0, ..., 0], image[:, 2:6])
    np.testing.assert_array_equal(val.read(np.array([0]))[0][0, ..., 0], image[:, 2:6])  # RGB -> L of a gray image
    assert ImageFolder(tmp_path / "val", 4, mode="RGB").read(np.array([0]))[0].shape == (1, 4, 4, 3)


def test_imagefolder_jpeg_and_random_resized_crop(tmp_path):
    """JPEG decodes close to the original (lossy); a random-resized crop of the whole image is the
    image, and a quarter-area crop in a corner is that corner upscaled."""
    smooth = np.broadcast_to(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (16, 16, 3)).copy()
    save(tmp_path / "train" / "c" / "a.jpg", smooth)
    save(tmp_path / "val" / "c" / "a.jpeg", smooth)
    train, _ = load_imagefolder(tmp_path, image_size=16)
    whole, _ = train.read(np.array([0]))
    assert np.abs(whole[0].astype(int) - smooth).max() <= 3
    full, _ = train.read(np.array([0]), np.array([[1.0, 1.0, 0.3, 0.9]]))
    np.testing.assert_array_equal(full, whole)
    corner, _ = train.read(np.array([0]), np.array([[0.25, 1.0, 0.0, 0.0]]))  # left half of the columns
    assert (corner[0, :, -1, 0] < smooth[0, 9, 0]).all()  # the right edge now shows the middle of the ramp
    np.testing.assert_allclose(corner[0, 0, ::2, 0], whole[0, 0, :8, 0], atol=12)


def test_crop_box_values():
    assert crop_box(None, 6, 6) == (0.0, 0.0, 6.0, 6.0)
    assert crop_box(None, 4, 10) == (0.0, 3.0, 4.0, 7.0)
    left, top, right, bottom = crop_box((0.5, 2.0, 1.0, 0.0), 10, 10)  # w = sqrt(50 * 2) = 10, h = 5
    assert (left, top, right, bottom) == (0.0, 0.0, 10.0, 5.0)
    h = math.sqrt(100 * 3 / 4)  # w = sqrt(100 * 4 / 3) > 10: clipped to the image
    assert crop_box((1.0, 4 / 3, 0.5, 0.5), 10, 10) == pytest.approx((0.0, (10 - h) / 2, 10.0, (10 + h) / 2))


def test_array_source_random_resized_crop():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1) * np.ones(2, np.float32)  # 2 equal channels
    source = ArraySource(x, np.array([3]))
    same, y = source.read(np.array([0]), np.array([[1.0, 1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(same, x, atol=1e-5)
    assert y.tolist() == [3] and same.dtype == np.float32
    # the top-left 2x2 box upscaled: output pixel j samples input coordinate j / 2 - 1/4 (half-pixel
    # centres, clamped at 0), and the image is linear, 4 * row + column
    corner, _ = source.read(np.array([0]), np.array([[0.25, 1.0, 0.0, 0.0]]))
    r = np.maximum(np.arange(4) / 2 - 0.25, 0)
    np.testing.assert_allclose(corner[0, ..., 0], 4 * r[:, None] + r[None, :], atol=1e-6)
    np.testing.assert_array_equal(corner[0, ..., 0], corner[0, ..., 1])


def unusable_tree(root, case: str) -> tuple[type, str]:
    """Damage a valid tree; return the error and a message part."""
    write_tree(root)
    if case == "no val split":
        for path in sorted((root / "val").rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        (root / "val").rmdir()
        return FileNotFoundError, f"load_imagefolder: {root / 'val'} does not exist (expected"
    if case == "no class folder":
        for path in (root / "train").rglob("*.png"):
            path.rename(root / "train" / f"{path.parent.name}-{path.name}")
        for name in ("cat", "dog"):
            (root / "train" / name).rmdir()
        return ValueError, f"load_imagefolder: {root / 'train'} holds no class folder"
    if case == "empty class folder":
        (root / "train" / "emu").mkdir()
        (root / "val" / "emu").mkdir()
        (root / "train" / "emu" / "readme.txt").write_text("no images here")
        return (
            ValueError,
            f"ImageFolder: class folder {root / 'train' / 'emu'} holds no image (files ending in .jpg, .jpeg, .png)",
        )
    if case == "val classes differ":
        (root / "val" / "dog").rename(root / "val" / "wolf")
        return (
            ValueError,
            f"the classes of {root / 'val'} differ from those of {root / 'train'}: missing ['dog'], extra ['wolf']",
        )
    if case == "unreadable first image":
        (root / "train" / "cat" / "0.png").write_bytes(b"\x89PNG truncated")
        return ValueError, f"ImageFolder: cannot read {root / 'train' / 'cat' / '0.png'}: UnidentifiedImageError"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["no val split", "no class folder", "empty class folder", "val classes differ", "unreadable first image"]
)
def test_unusable_imagefolder_is_refused_before_training(tmp_path, case):
    error, message = unusable_tree(tmp_path, case)
    with pytest.raises(error) as info:
        load_imagefolder(tmp_path, image_size=4)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"garbage", "UnidentifiedImageError"), (None, "OSError: image file is truncated"), ("gone", "FileNotFoundError")],
)
def test_unreadable_image_names_its_path_and_reason(tmp_path, content, reason):
    write_tree(tmp_path)
    train, _ = load_imagefolder(tmp_path, image_size=4)
    path = tmp_path / "train" / "dog" / "1.png"  # damaged after listing, as while a run goes on
    if content is None:
        path.write_bytes(path.read_bytes()[:-30])
    elif content == "gone":
        path.unlink()
    else:
        path.write_bytes(content)
    assert train.read(np.array([0]))[1].tolist() == [0]  # other images still read
    with pytest.raises(ValueError, match=re.escape(f"ImageFolder: cannot read {path}: {reason}")):
        train.read(np.array([0, 3]))


def test_epoch_order_is_numpys_permutation():
    np.testing.assert_array_equal(
        epoch_order(9, shuffle=True, seed=4, epoch=2), np.random.default_rng((4, 2)).permutation(9)
    )
    np.testing.assert_array_equal(epoch_order(4, shuffle=False, seed=4, epoch=2), np.arange(4))
