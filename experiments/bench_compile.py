"""Compile time: the first ``jit(grad)`` call of each op, per window size and ``impl``.

For a depthwise conv, a dense conv, a max pool and an average pool with windows 3x3, 7x7, 13x13
and 31x31 (stride 1, SAME padding, float32 NHWC), times the first call of ``jax.jit(jax.grad(loss))``
(trace, lower, compile and one run: what a user waits for) under ``impl="auto"``,
``"closed_form"`` and ``"lax"``, after ``jax.clear_caches()``. The variants of a row are run in
turn, ``--rounds`` times, and the medians reported with the ratio ``auto / lax``; the bound
cnnjax keeps (issue #13) is ``auto <= max(2 * lax, 2 s)``, reported per row.

Run (from the repository root, on an otherwise idle machine):

    python experiments/bench_compile.py                 # about 15 minutes on 2 cores
    python experiments/bench_compile.py --windows 3 7 --rounds 1
    python experiments/bench_compile.py --json /tmp/compile.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import _bench
import jax
import jax.numpy as jnp

from cnnjax import avg_pool, conv, depthwise_conv, max_pool

IMPLS = ("auto", "closed_form", "lax")
BATCH, SIZE, CHANNELS = 8, 40, 16


def loss(op: str, window: int, impl: str):
    """``(x, kernel) -> scalar`` through one op with a ``window x window`` window."""
    if op == "depthwise conv":
        return lambda x, k: jnp.sum(depthwise_conv(x, k, padding="SAME", impl=impl) ** 2)
    if op == "dense conv":
        return lambda x, k: jnp.sum(conv(x, k, padding="SAME", impl=impl) ** 2)
    pool = max_pool if op == "max pool" else avg_pool
    return lambda x, k: jnp.sum(pool(x, window, 1, "SAME", impl=impl) ** 2) * k


def arguments(op: str, window: int):
    x = jax.random.normal(jax.random.key(0), (BATCH, SIZE, SIZE, CHANNELS))
    if op == "depthwise conv":
        return x, jax.random.normal(jax.random.key(1), (window, window, 1, CHANNELS))
    if op == "dense conv":
        return x, jax.random.normal(jax.random.key(1), (window, window, CHANNELS, CHANNELS))
    return x, jnp.ones(())


def first_call_s(op: str, window: int, impl: str) -> float:
    """Seconds of the first ``jit(grad)`` call, caches cleared."""
    args = arguments(op, window)
    jax.block_until_ready(args)
    jax.clear_caches()
    start = time.perf_counter()
    jax.block_until_ready(jax.jit(jax.grad(loss(op, window, impl), argnums=(0, 1)))(*args))
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[3, 7, 13, 31])
    parser.add_argument("--ops", nargs="+", default=["depthwise conv", "dense conv", "max pool", "avg pool"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    first_call_s("avg pool", 3, "lax")  # JAX's own one-time start-up, outside every row
    print(
        f"jax {jax.__version__} ({jax.default_backend()}); input {BATCH}x{SIZE}x{SIZE}x{CHANNELS}; "
        f"median of {args.rounds} round-robin rounds",
        flush=True,
    )
    rows = []
    for op in args.ops:
        for window in args.windows:
            samples = {impl: [] for impl in IMPLS}
            for _ in range(args.rounds):
                for impl in IMPLS:
                    samples[impl].append(first_call_s(op, window, impl))
            seconds = {impl: statistics.median(s) for impl, s in samples.items()}
            bound = max(2 * seconds["lax"], 2.0)
            rows.append({"op": op, "window": window, **seconds, "bound": bound, "within": seconds["auto"] <= bound})
            print(
                f"  {op:15s} {window:2d}x{window:<2d} " + " ".join(f"{k}={v:.2f}s" for k, v in seconds.items()),
                flush=True,
            )
    head = ["op", "window", "auto s", "closed_form s", "lax s", "auto / lax", "bound s", "auto within"]
    body = []
    for r in rows:
        window, auto_vs_lax = f"{r['window']}x{r['window']}", _bench.ratio(r["auto"], r["lax"])
        body.append([r["op"], window, r["auto"], r["closed_form"], r["lax"], auto_vs_lax, r["bound"], r["within"]])
    print()
    print(_bench.markdown_table(head, body))
    if args.json:
        _bench.write_json(args.json, {"jax": jax.__version__, "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
