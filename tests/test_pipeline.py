"""cnnjax.train.pipeline: the Grain graph's batches are NumPy's epoch orders, process shards and resumed
runs see exactly the batches of one uninterrupted process, augmentations are what they say, and
worker processes give the same batches while holding at most batches_in_flight of them."""

from __future__ import annotations

import glob
import os
import time

import grain
import numpy as np
import pytest
from PIL import Image

from cnnjax.train.data import ArraySource, ImageFolder, batches, load_imagefolder
from cnnjax.train.pipeline import (
    FLIP_CROP_PAD,
    DrawAugmentation,
    batches_in_flight,
    eval_batches,
    flip_crop,
    run_batches,
    to_float32,
)


def arrays(n: int, size: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random ``(size, size, 2)`` float32 images whose first pixel is their index."""
    x = np.random.default_rng(seed).random((n, size, size, 2), dtype=np.float32)
    x[:, 0, 0, 0] = np.arange(n)
    return x, np.arange(n) % 10


def collect(stream) -> list[tuple[np.ndarray, ...]]:
    return [tuple(np.asarray(a) for a in batch) for batch in stream]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for first, second in zip(a, b, strict=True):
        assert len(first) == len(second)
        for x, y in zip(first, second, strict=True):
            np.testing.assert_array_equal(x, y)


def test_run_is_each_epochs_order_then_every_eval_example():
    """Training batches are cnnjax.train.data.batches' (seed, epoch) orders, the remainder dropped;
    evaluation is every example in order, the last batch padded and masked."""
    x, y = arrays(23)
    xe, ye = arrays(7, seed=1)
    run = collect(run_batches(ArraySource(x, y), ArraySource(xe, ye), 5, seed=3, epochs=2))
    assert len(run) == 2 * (4 + 2)
    for epoch in range(2):
        train, evaluation = run[6 * epoch : 6 * epoch + 4], run[6 * epoch + 4 : 6 * epoch + 6]
        expected = list(batches(x, y, 5, shuffle=True, seed=3, epoch=epoch, drop_remainder=True))
        assert_same_batches(train, expected)
        np.testing.assert_array_equal(np.concatenate([b[1] for b in evaluation]), [*ye, 0, 0, 0])
        np.testing.assert_array_equal(np.concatenate([b[2] for b in evaluation]), [1] * 7 + [0] * 3)
        np.testing.assert_array_equal(np.concatenate([b[0] for b in evaluation])[:7], xe)
    assert all(b[0].dtype == np.float32 for b in run)


@pytest.mark.parametrize("augment", ["none", "flip-crop", "random-resized-crop"])
def test_process_shards_make_up_the_one_process_batches(monkeypatch, augment):
    """Two processes' rows, stacked, are one process's global batches, augmentation included:
    every draw belongs to the global batch."""
    x, y = arrays(20)
    source, evaluation = ArraySource(x, y), ArraySource(*arrays(5, seed=2))

    def shard_run(index: int, count: int):
        monkeypatch.setattr(
            grain.sharding, "ShardByJaxProcess", lambda: grain.sharding.ShardOptions(index, count, drop_remainder=True)
        )
        return collect(run_batches(source, evaluation, 8, seed=1, epochs=2, augment=augment))

    whole, first, second = shard_run(0, 1), shard_run(0, 2), shard_run(1, 2)
    stacked = [
        tuple(np.concatenate(parts) for parts in zip(a, b, strict=True)) for a, b in zip(first, second, strict=True)
    ]
    assert_same_batches(stacked, whole)
    assert len(first[0][0]) == 4


@pytest.mark.parametrize("augment", ["none", "random-resized-crop"])
def test_a_resumed_run_reads_what_an_uninterrupted_one_does(augment):
    source, evaluation = ArraySource(*arrays(18)), ArraySource(*arrays(4, seed=5))
    whole = collect(run_batches(source, evaluation, 4, seed=2, epochs=3, augment=augment))
    resumed = collect(run_batches(source, evaluation, 4, seed=2, epochs=3, first_epoch=1, augment=augment))
    assert_same_batches(resumed, whole[len(whole) // 3 :])


def test_flip_crop_is_a_window_of_the_zero_padded_image():
    x, y = arrays(30, size=5)
    run = collect(run_batches(ArraySource(x, y), None, 10, seed=0, epochs=2, augment="flip-crop"))
    p = FLIP_CROP_PAD
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    flips = offsets = 0
    for xb, yb in run:
        for image, label in zip(xb, yb, strict=True):
            # find the window: the source image is the one with this label whose window matches
            candidates = [
                (i, dy, dx, flip)
                for i in np.flatnonzero(y == label)
                for dy in range(2 * p + 1)
                for dx in range(2 * p + 1)
                for flip in (False, True)
                if np.array_equal(
                    image, padded[i, dy : dy + 5, dx : dx + 5][:, ::-1] if flip else padded[i, dy : dy + 5, dx : dx + 5]
                )
            ]
            assert candidates, "every augmented image is a (flipped) window of a padded original"
            flips += candidates[0][3]
            offsets += (candidates[0][1], candidates[0][2]) != (p, p)
    assert 10 < flips < 50 and offsets > 30  # 60 images: about half flipped, most shifted


def test_augmentation_draws_are_per_step_and_per_seed():
    batch = {"index": np.arange(64)}
    draw = DrawAugmentation("random-resized-crop")

    def rng(seed, index):
        return np.random.Generator(np.random.Philox(key=[seed, index]))

    first = draw(batch, rng(0, 0))
    np.testing.assert_array_equal(first["crop"], draw(batch, rng(0, 0))["crop"])
    assert not np.array_equal(first["crop"], draw(batch, rng(0, 1))["crop"])
    area, ratio, u, v = first["crop"].T
    assert area.min() >= 0.08 and area.max() <= 1 and ratio.min() >= 3 / 4 and ratio.max() <= 4 / 3
    assert min(u.min(), v.min()) >= 0 and max(u.max(), v.max()) < 1
    assert draw({"index": np.arange(3), "mask": np.ones(3)}, rng(0, 0)).keys() == {"index", "mask"}


def test_flip_crop_hand_values():
    x = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3, 1)
    p = FLIP_CROP_PAD
    np.testing.assert_array_equal(flip_crop(x, np.array([False]), np.array([[p, p]])), x)
    np.testing.assert_array_equal(flip_crop(x, np.array([True]), np.array([[p, p]]))[0, :, :, 0], x[0, :, ::-1, 0])
    shifted = flip_crop(x, np.array([False]), np.array([[p + 1, p - 2]]))[0, :, :, 0]
    np.testing.assert_array_equal(shifted, [[0, 0, 4], [0, 0, 7], [0, 0, 0]])


def test_to_float32_scales_bytes_and_copies():
    x = np.array([[0, 128, 255]], np.uint8)
    y = np.array([4], np.int32)
    out_x, out_y = to_float32((x, y))
    np.testing.assert_array_equal(out_x, np.array([[0, 128, 255]], np.float32) / 255)
    assert out_y is not y and type(out_y) is np.ndarray
    floats = np.array([0.25], np.float64)
    assert to_float32((floats,))[0].tolist() == [0.25] and to_float32((floats,))[0].dtype == np.float32


def test_eval_batches_alone():
    x, y = arrays(5)
    got = collect(eval_batches(ArraySource(x, y), 4))
    assert [b[1].tolist() for b in got] == [[0, 1, 2, 3], [4, 0, 0, 0]]
    assert [b[2].tolist() for b in got] == [[1, 1, 1, 1], [1, 0, 0, 0]]


# --- worker processes and the memory bound -------------------------------------------------------


class LoggedFolder(ImageFolder):
    """An ImageFolder that appends each image index it decodes to ``log/<pid>`` (any process)."""

    def __init__(self, root, image_size, log):
        super().__init__(root, image_size)
        self.log = log

    def read(self, indices, crops=None):
        with open(os.path.join(self.log, str(os.getpid())), "a") as f:
            f.write("".join(f"{i}\n" for i in indices))
        return super().read(indices, crops)


def decoded(log) -> int:
    return sum(len(open(path).read().split()) for path in glob.glob(os.path.join(log, "*")))


def write_folder(root, n_per_class: int, size: int = 8) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            os.makedirs(root / split / name)
            for i in range(n_per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


SLOW_CONSUMER_S = 0.15  # a consumer this slow lets the workers fill every queue they have


@pytest.mark.slow
def test_workers_read_the_same_batches_within_the_memory_bound(tmp_path):
    """2 worker processes decode 80 training images in batches of 4 for a slow consumer: they
    stay at most batches_in_flight(2) = 10 batches (40 images, half the set) ahead, and the
    batches equal those read in this process."""
    write_folder(tmp_path / "data", 40)
    log = tmp_path / "log"
    log.mkdir()
    train, evaluation = load_imagefolder(tmp_path / "data", image_size=6)
    logged = LoggedFolder(tmp_path / "data" / "train", 6, str(log))
    batch, workers = 4, 2
    bound = batches_in_flight(workers)
    assert len(logged) == 80 > bound * batch == 40  # more images than the bound lets the pipeline hold
    stream = iter(
        run_batches(logged, evaluation, batch, seed=1, epochs=2, augment="random-resized-crop", workers=workers)
    )
    got, ahead = [], []
    try:
        for element in stream:
            got.append(tuple(np.asarray(a) for a in element))
            if len(got) <= 20:
                time.sleep(SLOW_CONSUMER_S)
                ahead.append(decoded(log) // batch - sum(len(b) == 2 for b in got))  # training batches
    finally:
        stream.close()
    assert bound // 2 <= max(ahead) <= bound, ahead  # bounded, and the bound is not loose
    expected = collect(run_batches(train, evaluation, batch, seed=1, epochs=2, augment="random-resized-crop"))
    assert_same_batches(got, expected)


def test_a_worker_that_cannot_read_an_image_names_it(tmp_path):
    write_folder(tmp_path, 3)
    bad = tmp_path / "train" / "b" / "1.png"
    bad.write_bytes(b"not a png")
    train, evaluation = load_imagefolder(tmp_path, image_size=4)
    with pytest.raises(ValueError, match=f"ImageFolder: cannot read {bad}: UnidentifiedImageError"):
        collect(run_batches(train, evaluation, 2, epochs=1, workers=1))
