"""Overhead: cnnjax's functional ops against the bare lax call they wrap, jitted, in one process.

Run (from the repository root, on an otherwise idle machine; the same command on a GPU):

    python experiments/bench_overhead.py                         # 21 rounds
    python experiments/bench_overhead.py --quick                 # a quarter of every batch, 9 rounds
    python experiments/bench_overhead.py --json overhead.json --markdown overhead.md

``cnnjax.conv``, ``conv_transpose``, ``max_pool``, ``avg_pool`` against the bare
``lax.conv_general_dilated`` / ``lax.conv_transpose`` / ``lax.reduce_window`` call they wrap,
forward and forward+backward, every ratio ``cnnjax time / lax time`` (below 1: cnnjax is
faster); whether the forward compiles to the same optimized HLO (``_bench.normalize_hlo``,
also used by ``tests/test_hlo.py``); and the noise floor: the ratio of two compilations of the
bare call, timed alike. cnnjax runs with its default ``impl="auto"``: its primitives, whose
backward pass is the notes' closed forms, lowered on CPU to the schedules of ``cnnjax._cpu``.
Where a schedule is also another forward algorithm (on CPU, today: depthwise convs as windowed
sums, max pools as a fold of strided slices, transposed convs as the phase-decomposed conv input
gradient), "same HLO" is "no" by design and the ratio says whether it pays.

Method: every function is jitted, fed random normal inputs, compiled and warmed up, then all
variants of a row are timed in turn and the medians reported, so a busy machine slows all of
them alike; the rows are cheap and get three times ``--rounds`` (21 by default), since telling a
1.02 ratio from noise needs them. A timed sample is as many back-to-back calls as fill
``--min-sample-ms``, each ending in ``block_until_ready``, after a 30 ms pause
(``_bench.Timer``). ``--threads N`` pins the process to N cores before JAX starts its CPU
client (``_bench.start_suite``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import _bench
import jax
import jax.numpy as jnp
from _bench import Timer, cotangent, hlo_diff, jax_step, normalize_hlo, random_inputs, ratio, vjp_fn
from jax import lax

from cnnjax.convolution import conv, conv_transpose
from cnnjax.pooling import avg_pool, max_pool

NHWC = ("NHWC", "HWIO", "NHWC")
NCHW = ("NCHW", "OIHW", "NCHW")


@dataclasses.dataclass(frozen=True)
class OverheadCase:
    """One functional op and the bare lax call a user would write for it, on ``shapes``."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    cnnjax_fn: Callable
    lax_fn: Callable


def overhead_cases(batch: int) -> list[OverheadCase]:
    """ResNet/MobileNet/DCGAN-like geometries; conv in both layouts; ``impl="auto"`` throughout."""
    same = ((1, 1), (1, 1))
    return [
        OverheadCase(
            f"conv 3x3, pad 1, {batch}x32x32x64 -> 64 (NHWC)",
            ((batch, 32, 32, 64), (3, 3, 64, 64)),
            lambda x, k: conv(x, k, padding=1),
            lambda x, k: lax.conv_general_dilated(x, k, (1, 1), same, dimension_numbers=NHWC),
        ),
        OverheadCase(
            f"conv 3x3/2, pad 1, {batch}x64x32x32 -> 128 (NCHW)",
            ((batch, 64, 32, 32), (128, 64, 3, 3)),
            lambda x, k: conv(x, k, strides=2, padding=1, layout="NCHW"),
            lambda x, k: lax.conv_general_dilated(x, k, (2, 2), same, dimension_numbers=NCHW),
        ),
        OverheadCase(
            f"depthwise conv 3x3, pad 1, {batch}x32x32x64",
            ((batch, 32, 32, 64), (3, 3, 1, 64)),
            lambda x, k: conv(x, k, padding=1, feature_group_count=64),
            lambda x, k: lax.conv_general_dilated(x, k, (1, 1), same, dimension_numbers=NHWC, feature_group_count=64),
        ),
        OverheadCase(
            f"conv_transpose 4x4/2, pad 1, {batch}x16x16x64 -> 32",
            ((batch, 16, 16, 64), (4, 4, 32, 64)),
            lambda x, k: conv_transpose(x, k, strides=2, padding=1),
            # PyTorch's padding p is k - 1 - p on the stride-dilated input: lax.conv_transpose's padding
            lambda x, k: lax.conv_transpose(
                x, k, (2, 2), ((2, 2), (2, 2)), dimension_numbers=NHWC, transpose_kernel=True
            ),
        ),
        OverheadCase(
            f"max_pool 3x3/2, pad 1, {batch}x32x32x64",
            ((batch, 32, 32, 64),),
            lambda x: max_pool(x, 3, 2, 1),
            lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), *same, (0, 0))),
        ),
        OverheadCase(
            f"avg_pool 2x2/2, {batch}x32x32x64",
            ((batch, 32, 32, 64),),
            lambda x: avg_pool(x, 2),
            lambda x: lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0,
        ),
    ]


def bench_overhead(case: OverheadCase, timer: Timer) -> dict:
    """Forward and forward+backward milliseconds of both functions, and their forward HLO.

    The bare forward is also compiled and timed a second time (``lax_again``): the ratio of the
    two copies of one program is the noise floor the cnnjax ratio is read against.
    """
    args = random_inputs(case.shapes)
    dy = cotangent(case.lax_fn, *args)
    steps, hlo = {}, {}
    for who, fn in (("lax", case.lax_fn), ("cnnjax", case.cnnjax_fn)):
        forward = jax.jit(fn).lower(*args).compile()
        hlo[who] = normalize_hlo(forward.as_text())
        steps[f"{who}_fwd"] = jax_step(forward, *args)
        steps[f"{who}_fwd_bwd"] = jax_step(jax.jit(vjp_fn(fn)), args, dy)
    steps["lax_again_fwd"] = jax_step(jax.jit(case.lax_fn).lower(*args).compile(), *args)
    ms = timer.median_ms(steps)
    diff = hlo_diff(hlo["lax"], hlo["cnnjax"])
    return {
        "op": case.name,
        **{f"{k}_ms": v for k, v in ms.items()},
        "fwd_noise": ratio(ms["lax_again_fwd"], ms["lax_fwd"]),
        "fwd_ratio": ratio(ms["cnnjax_fwd"], ms["lax_fwd"]),
        "fwd_bwd_ratio": ratio(ms["cnnjax_fwd_bwd"], ms["lax_fwd_bwd"]),
        "same_hlo": not diff,
        "hlo_diff": diff,
    }


def overhead_table(rows: list[dict]) -> str:
    head = ["op", "lax fwd ms", "cnnjax fwd ms", "fwd ratio", "noise (lax/lax)", "same HLO", "lax fwd+bwd ms"]
    head += ["cnnjax fwd+bwd ms (impl=auto)", "fwd+bwd ratio"]
    keys = ["op", "lax_fwd_ms", "cnnjax_fwd_ms", "fwd_ratio", "fwd_noise", "same_hlo", "lax_fwd_bwd_ms"]
    keys += ["cnnjax_fwd_bwd_ms", "fwd_bwd_ratio"]
    return _bench.markdown_table(head, [[r[k] for k in keys] for r in rows])


def main(argv: Sequence[str] | None = None) -> None:
    parser = _bench.suite_parser(__doc__, torch=False)
    suite = _bench.start_suite("experiments/bench_overhead.py", parser, argv, rounds_factor=3)
    cases = overhead_cases(suite.scaled(128 if suite.gpu else 16))
    rows = [_bench.progress(bench_overhead(case, suite.timer), case.name) for case in cases]
    title = "Overhead: cnnjax against the bare lax call it wraps (jitted)"
    suite.finish("overhead", title, rows, overhead_table(rows))


if __name__ == "__main__":
    main()
