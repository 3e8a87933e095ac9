"""The input pipeline: how examples reach the train and eval steps, as Grain datasets.

Every dataset, in memory (:class:`cnnjax.train.data.ArraySource`) or streamed from image files
(:class:`cnnjax.train.data.ImageFolder`), goes through the same Grain graph::

    MapDataset.range(global batches)       one element per global batch of the run: each epoch
                                              its training batches, then its evaluation ones
      .map(RunPlan)                        -> the batch's example indices: the epoch's order
                                              (np.random.default_rng((seed, epoch))), sliced
      .random_map(DrawAugmentation)        -> + each example's augmentation draws (training)
      [first epoch:]                       a resumed run starts here
      .map(ProcessRows)                    -> this process's rows (grain.sharding.ShardByJaxProcess)
      .map(ReadRows)                       -> source.read: decode or gather, then augment
      .to_iter_dataset(ReadOptions)        workers = 0: read when asked for, in this thread
      .mp_prefetch(MultiprocessingOptions) workers > 0: that many decoding processes, each
                                              reading READ_AHEAD batches ahead on a thread
      .map(to_float32)                     in this process: uint8 pixels / 255, a private copy

Elements are whole batches, not single examples: Grain's per-element cost (about 0.1 ms per
example through its shuffle, measured on the 2-core machine) would otherwise add about 2 s to
the 15 small epochs of ``cnnjax-train``; the order is NumPy's permutation of the epoch (the one :func:`cnnjax.train.data.batches` has always
used), the batch a slice of it. Every random draw of an augmentation comes from Grain's
per-element generator of the *global* batch (seeded by ``seed`` and the global step), and a
process only keeps its rows of it: so the examples, their order within the global batch and
their augmentations are the same whatever the number of processes, workers or devices, and a
resumed run (which starts the graph at its first epoch) draws what an uninterrupted one would.

Memory is bounded whatever the number of images: besides the file list (one name and one label
per image) and one epoch's order (8 bytes per image), the pipeline holds at most
:func:`batches_in_flight` batches of decoded pixels (Grain's read-ahead and worker queues), Grain
frees the shared memory of consumed batches on a background thread at most 50 arrays behind,
and :func:`cnnjax.train.fit` keeps at most ``DISPATCH_AHEAD`` more on the devices.
"""

from __future__ import annotations

import grain
import numpy as np

from cnnjax.train.data import epoch_order, num_batches

AUGMENTATIONS = ("none", "flip-crop", "random-resized-crop")
FLIP_CROP_PAD = 4  # flip-crop: zero-pad 4 pixels, crop back at a random offset (CIFAR, He et al. 2016)
CROP_AREA = (0.08, 1.0)  # random-resized-crop: fraction of the image's area (Szegedy et al. 2015)
CROP_RATIO = (3 / 4, 4 / 3)  # ... and aspect ratio (width / height), log-uniform
READ_AHEAD = 1  # batches a reading thread prepares ahead of the one being consumed
WORKER_BUFFER = 1  # grain's per_worker_buffer_size: batches queued per worker process


def batches_in_flight(workers: int) -> int:
    """At most how many batches the pipeline holds beyond the one being consumed.

    ``workers = 0``: none, batches are read when asked for. With ``K`` worker processes, each
    holds its read-ahead, the batch it is producing and the ``WORKER_BUFFER`` it has queued,
    and Grain's transfer of a queued batch holds ``WORKER_BUFFER + 1`` more:
    ``K * (READ_AHEAD + 2 * WORKER_BUFFER + 2)`` (measured, and checked by the tests).

    >>> batches_in_flight(0), batches_in_flight(2)
    (0, 10)
    """
    return workers * (READ_AHEAD + 2 * WORKER_BUFFER + 2)


def run_batches(
    train,
    evaluation,
    batch_size: int,
    *,
    seed: int = 0,
    epochs: int = 1,
    first_epoch: int = 0,
    augment: str = "none",
    workers: int = 0,
):
    """Every batch of epochs ``first_epoch .. epochs - 1`` of a run, as one Grain ``IterDataset``.

    ``train``, ``evaluation``: sources (``len(source)`` examples, ``source.read(indices,
    crops)``, see :class:`cnnjax.train.data.ArraySource`), either may be ``None``. Each epoch is
    first the training batches: :func:`cnnjax.train.data.epoch_order` in global batches of
    ``batch_size``, the last ``n mod batch_size`` examples dropped so every step has one shape,
    with ``augment`` (``AUGMENTATIONS``); then the evaluation batches: every example in order,
    the last global batch padded. One dataset for the whole run keeps ``workers`` decoding
    processes (0: read in this process) alive from start to end.

    Yields this process's rows of every global batch, ``P = jax.process_count()``: training
    ``(x, y)``, ``x: (batch_size / P, H, W, C)`` float32 in ``[0, 1]``, ``y: (batch_size / P,)``
    int; evaluation ``(x, y, mask)``, ``mask: (batch_size / P,)`` float32, 0 for padding.

    >>> from cnnjax.train.data import ArraySource
    >>> x = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1)
    >>> [b[1].tolist() for b in run_batches(ArraySource(x, np.arange(5)), ArraySource(x[:3], np.arange(3)), 2, epochs=2)]
    [[2, 4], [3, 0], [0, 1], [2, 0], [1, 4], [3, 0], [0, 1], [2, 0]]
    """
    plan = RunPlan(train, evaluation, batch_size, seed=seed)
    dataset = grain.MapDataset.range(epochs * plan.steps).map(plan)
    if augment != "none":
        dataset = dataset.random_map(DrawAugmentation(augment), seed=seed)
    # sliced after random_map, whose draws follow the element's index: a resumed run draws what
    # an uninterrupted one does
    dataset = dataset[first_epoch * plan.steps :]
    rows = dataset.map(ProcessRows(grain.sharding.ShardByJaxProcess())).map(ReadRows(train, evaluation, augment))
    if workers == 0:
        return rows.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).map(to_float32)
    _parse_absl_flags()
    stream = rows.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=READ_AHEAD))
    options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=WORKER_BUFFER)
    return stream.mp_prefetch(options).map(to_float32)


def eval_batches(source, batch_size: int, *, workers: int = 0):
    """Every example of ``source`` once, in order: :func:`run_batches` without training, this
    process's ``(x, y, mask)`` rows of every global batch, the last one padded.

    >>> from cnnjax.train.data import ArraySource
    >>> x = np.zeros((3, 1, 1, 1), np.float32)
    >>> [(y.tolist(), mask.tolist()) for _, y, mask in eval_batches(ArraySource(x, np.arange(3)), 2)]
    [([0, 1], [1.0, 1.0]), ([2, 0], [1.0, 0.0])]
    """
    return run_batches(None, source, batch_size, workers=workers)


class RunPlan:
    """Grain ``map``: element ``k`` of a run -> the example indices of its global batch.

    Each epoch holds ``train_steps`` training batches, then ``eval_steps`` evaluation ones:
    ``{"index": (batch_size,)}`` for training (epoch ``k // steps``'s order, sliced),
    ``{"index", "mask"}`` for evaluation (in order; the last batch padded with index ``-1``,
    mask 0)."""

    def __init__(self, train, evaluation, batch_size: int, *, seed: int):
        self.n_train = 0 if train is None else len(train)
        self.n_eval = 0 if evaluation is None else len(evaluation)
        self.batch_size, self.seed = batch_size, seed
        self.train_steps = num_batches(self.n_train, batch_size, drop_remainder=True)
        self.eval_steps = num_batches(self.n_eval, batch_size, drop_remainder=False)
        self.steps = self.train_steps + self.eval_steps
        self._order = (-1, None)  # (epoch, its order): computed once per epoch and process

    def __call__(self, k) -> dict[str, np.ndarray]:
        epoch, step = divmod(int(k), self.steps)
        b = self.batch_size
        if step < self.train_steps:
            if self._order[0] != epoch:
                self._order = (epoch, epoch_order(self.n_train, shuffle=True, seed=self.seed, epoch=epoch))
            return {"index": self._order[1][step * b : (step + 1) * b]}
        step -= self.train_steps
        index = np.arange(step * b, (step + 1) * b)
        mask = (index < self.n_eval).astype(np.float32)
        return {"index": np.where(mask > 0, index, -1), "mask": mask}


class DrawAugmentation:
    """Grain ``random_map``: draw the random parameters of every example of a global training batch.

    ``flip-crop``: ``flip: (B,)`` bool (probability 1/2) and ``shift: (B, 2)`` the crop's
    ``(row, column)`` offset in the padded image, uniform in ``0 .. 2 * FLIP_CROP_PAD``.
    ``random-resized-crop``: ``flip`` and ``crop: (B, 4)``, each row the area fraction (uniform
    in ``CROP_AREA``), aspect ratio (log-uniform in ``CROP_RATIO``) and the box's relative
    position (two uniforms in ``[0, 1)``), turned into a box by :func:`cnnjax.train.data.crop_box`."""

    def __init__(self, augment: str):
        self.augment = augment

    def __call__(self, batch: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if "mask" in batch:  # evaluation: no augmentation
            return batch
        n = len(batch["index"])
        batch = {**batch, "flip": rng.random(n) < 0.5}
        if self.augment == "flip-crop":
            batch["shift"] = rng.integers(0, 2 * FLIP_CROP_PAD + 1, (n, 2))
        else:
            area = rng.uniform(*CROP_AREA, n)
            ratio = np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1]), n))
            batch["crop"] = np.stack([area, ratio, *rng.random((2, n))], axis=1)
        return batch


def flip_crop(x: np.ndarray, flip: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Pad ``x: (B, H, W, C)`` with ``FLIP_CROP_PAD`` zeros on each side, crop each image back to
    ``H x W`` at its ``shift: (B, 2)`` offset, and mirror it left-right where ``flip: (B,)``.

    >>> x = np.arange(6.0).reshape(1, 1, 6, 1)
    >>> flip_crop(x, np.array([True]), np.array([[4, 5]]))[0, 0, :, 0].tolist()
    [0.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    """
    b, h, w = x.shape[:3]
    p = FLIP_CROP_PAD
    padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    rows = shift[:, :1] + np.arange(h)
    cols = shift[:, 1:] + np.arange(w)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


class ProcessRows:
    """Keep this process's contiguous ``1 / shard_count`` of every array of a global batch: the
    rows ``jax.make_array_from_process_local_data`` places on this process's devices."""

    def __init__(self, shard: grain.sharding.ShardOptions):
        self.index, self.count = shard.shard_index, shard.shard_count

    def __call__(self, batch: dict) -> dict[str, np.ndarray]:
        rows = len(batch["index"]) // self.count
        return {key: value[self.index * rows : (self.index + 1) * rows] for key, value in batch.items()}


class ReadRows:
    """Grain ``map``: read a batch's examples and apply their augmentation: ``(x, y)`` from the
    training source, or ``(x, y, mask)`` from the evaluation one (padding reads example 0)."""

    def __init__(self, train, evaluation, augment: str):
        self.train, self.evaluation, self.augment = train, evaluation, augment

    def __call__(self, batch: dict) -> tuple[np.ndarray, ...]:
        if "mask" in batch:
            x, y = self.evaluation.read(np.maximum(batch["index"], 0))
            return x, y, batch["mask"]
        x, y = self.train.read(batch["index"], batch.get("crop"))
        if self.augment == "flip-crop":
            x = flip_crop(x, batch["flip"], batch["shift"])
        elif self.augment == "random-resized-crop":
            x = np.where(batch["flip"][:, None, None, None], x[:, :, ::-1], x)
        return x, y


def to_float32(batch: tuple) -> tuple:
    """``uint8`` pixels to float32 in ``[0, 1]`` (``/ 255``), float images as float32, every
    array a plain NumPy copy: no batch keeps a worker's shared memory alive.

    >>> x, y = to_float32((np.array([[0, 51, 255]], np.uint8), np.array([7])))
    >>> x.tolist(), y.tolist()
    ([[0.0, 0.20000000298023224, 1.0]], [7])
    """
    x, *rest = batch
    pixels = np.array(x, np.float32)
    if x.dtype == np.uint8:
        pixels /= np.float32(255)
    return (pixels, *(np.array(a) for a in rest))


def _parse_absl_flags() -> None:
    """Grain's worker processes read an absl flag, which raises unless flags were parsed
    (google/grain#1355, fixed after grain 0.2.18): mark them parsed, keeping every default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
