"""Forward+backward time of conv and pooling layers: JAX autodiff vs the notes' closed forms vs PyTorch.

For a table of layer shapes from LeNet-5, ResNet-18 (CIFAR and ImageNet), MobileNet (depthwise)
and the three shapes quoted in issue #3, times the jitted forward + backward (``jax.vjp`` then the cotangent: output,
input gradient and, for convs, kernel gradient) of ``cnnjax.conv`` / ``max_pool`` / ``avg_pool``
under ``impl="lax"`` (JAX's autodiff of lax), ``impl="closed_form"`` (cnnjax's primitives lowered
to the notes' formulas) and ``impl="auto"`` (the same primitives lowered to this backend's
schedules: on CPU ``cnnjax._cpu``), and PyTorch's ``forward`` + ``backward`` on the same
shapes in its default NCHW layout and in ``channels_last`` (the NHWC memory layout cnnjax uses),
with as many threads as JAX's CPU backend: one per core this process may use, or ``--threads N``
(the process pinned to N cores, ``_bench.pin_threads``). Every function is warmed up
(compiled) first; then all five are timed in one round-robin, ``--rounds`` samples each of at
least ``--min-sample-ms``, with ``_bench.Timer`` (the timer of every benchmark script: a
short pause before every sample, so that neither framework's spinning worker threads slow the
other's next call), and the medians are reported: a busy machine slows all of them alike. Ratios
are ``auto`` against ``lax`` and against PyTorch.

Run (from the repository root, on an otherwise idle machine):

    python experiments/bench_backprop.py                 # full table, about 2 minutes on 2 cores
    python experiments/bench_backprop.py --quick         # smaller batches, 3 rounds
    python experiments/bench_backprop.py --only conv --json /tmp/bench.json
    python experiments/bench_backprop.py --parts         # conv layers: forward, input and kernel gradient apart
    python experiments/bench_backprop.py --jvp --only conv   # forward mode: jax.jvp, cnnjax only

``--parts`` times, for every conv layer of the table, the three pieces of its forward+backward one at a
time, each jitted alone: cnnjax's three conv primitives (forward, input gradient, kernel gradient)
with ``impl="auto"``, the programs a training step runs, against PyTorch's forward (under ``no_grad``) and
``torch.ops.aten.convolution_backward`` asked for one gradient at a time (NCHW). It shows which piece a
gap to PyTorch is in.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import _bench
import jax
import numpy as np
from _bench import Timer, cotangent, fmt, jax_step, ratio, vjp_fn

from cnnjax import _primitives
from cnnjax._canon import Layout, conv_geometry
from cnnjax.convolution import conv
from cnnjax.pooling import avg_pool, max_pool


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer: NHWC input ``(batch, size, size, channels)`` and its op's geometry."""

    model: str
    op: str  # "conv", "max_pool" or "avg_pool"
    batch: int
    size: int
    channels: int
    window: int
    strides: int = 1
    padding: int = 0
    features: int = 0  # conv output channels
    groups: int = 1

    @property
    def label(self) -> str:
        shape = f"{self.batch}x{self.size}x{self.size}x{self.channels}"
        if self.op == "conv":
            kind = "dw " if self.groups > 1 else ""
            return f"{kind}conv {self.window}x{self.window}/{self.strides} {shape} -> {self.features}"
        return f"{self.op} {self.window}x{self.window}/{self.strides} {shape}"


CASES = (
    Case("LeNet-5", "conv", 64, 28, 1, 5, padding=2, features=6),
    Case("LeNet-5", "avg_pool", 64, 28, 6, 2, strides=2),
    Case("LeNet-5", "conv", 64, 14, 6, 5, features=16),
    Case("LeNet-5", "avg_pool", 64, 10, 16, 2, strides=2),
    Case("ResNet-18 CIFAR", "conv", 32, 32, 64, 3, padding=1, features=64),
    Case("ResNet-18 CIFAR", "conv", 32, 32, 64, 3, strides=2, padding=1, features=128),
    Case("ResNet-18 CIFAR", "conv", 32, 32, 64, 1, strides=2, features=128),
    Case("ResNet-18 CIFAR", "conv", 32, 8, 256, 3, padding=1, features=256),
    Case("ResNet-18 ImageNet", "conv", 8, 224, 3, 7, strides=2, padding=3, features=64),
    Case("ResNet-18 ImageNet", "max_pool", 8, 112, 64, 3, strides=2, padding=1),
    Case("ResNet-18 ImageNet", "conv", 32, 56, 64, 3, padding=1, features=64),
    Case("ResNet-18 ImageNet", "conv", 8, 7, 512, 3, padding=1, features=512),
    Case("issue #3", "conv", 16, 112, 32, 3, padding=1, features=32),
    Case("issue #3", "conv", 64, 28, 6, 5, features=16),
    Case("issue #3", "max_pool", 32, 56, 64, 2, strides=2),
    Case("MobileNet", "conv", 8, 112, 32, 3, padding=1, features=32, groups=32),
    Case("MobileNet", "conv", 8, 112, 32, 1, features=64),
    Case("MobileNet", "conv", 8, 56, 128, 3, strides=2, padding=1, features=128, groups=128),
    Case("MobileNet", "conv", 8, 14, 512, 3, padding=1, features=512, groups=512),
)


IMPLS = ("lax", "closed_form", "auto")


def jax_forward(case: Case, impl: str):
    """The cnnjax op of ``case`` under ``impl``, as a function of its array inputs."""
    if case.op == "conv":
        return lambda x, kernel: conv(
            x, kernel, strides=case.strides, padding=case.padding, feature_group_count=case.groups, impl=impl
        )
    pool = max_pool if case.op == "max_pool" else avg_pool
    return lambda x: pool(x, case.window, case.strides, case.padding, impl=impl)


def forward_backward_step(case: Case, impl: str, inputs):
    """A zero-argument jitted forward+backward (output and every input's gradient), blocked on."""
    forward = jax_forward(case, impl)
    return jax_step(jax.jit(vjp_fn(forward)), inputs, cotangent(forward, *inputs, seed=2))


def forward_mode_step(case: Case, impl: str, inputs):
    """A zero-argument jitted ``jax.jvp`` (output and its tangent along every input), blocked on."""
    forward = jax_forward(case, impl)
    tangents = tuple(_bench.random_inputs([a.shape for a in inputs], seed=3))
    return jax_step(jax.jit(lambda p, t: jax.jvp(forward, p, t)), inputs, tangents)


def jax_inputs(case: Case):
    x = jax.random.normal(jax.random.key(0), (case.batch, case.size, case.size, case.channels))
    if case.op != "conv":
        return (x,)
    kernel = jax.random.normal(
        jax.random.key(1), (case.window, case.window, case.channels // case.groups, case.features)
    )
    return (x, kernel / case.window)


def torch_step(case: Case, channels_last: bool):
    """A zero-argument PyTorch forward+backward on the same shapes (NCHW tensors)."""
    import torch

    functional = torch.nn.functional
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(case.batch, case.channels, case.size, case.size).to(memory_format=memory_format)
    x.requires_grad_(True)
    if case.op == "conv":
        weight = torch.randn(case.features, case.channels // case.groups, case.window, case.window, requires_grad=True)

        def forward():
            return functional.conv2d(x, weight, stride=case.strides, padding=case.padding, groups=case.groups)

        params = (x, weight)
    else:
        pool = functional.max_pool2d if case.op == "max_pool" else functional.avg_pool2d

        def forward():
            return pool(x, case.window, case.strides, case.padding)

        params = (x,)
    with torch.no_grad():
        dy = torch.randn_like(forward())

    def step():
        torch.autograd.grad(forward(), params, dy)

    return step


# PyTorch's first calls on a new shape are slow (its CPU kernels pick an algorithm: ~90 ms for
# LeNet's second conv, then 1 ms), so every method is warmed up for a few calls and some time
# before the Timer (which itself calls each step only twice first) takes over.
_WARMUP_CALLS, _WARMUP_S = 5, 0.3


def warm_up(steps: dict) -> None:
    for step in steps.values():
        start, calls = time.perf_counter(), 0
        while calls < _WARMUP_CALLS or time.perf_counter() - start < _WARMUP_S:
            step()
            calls += 1


def bench_case(case: Case, timer: Timer, with_torch: bool, jvp: bool = False) -> dict:
    """Milliseconds per method for one case. All methods are timed in one round-robin
    (``Timer``: a pause before every sample, so that neither framework's spinning worker
    threads slow the other's next call). ``jvp``: forward mode instead, cnnjax only."""
    inputs = jax_inputs(case)
    step = forward_mode_step if jvp else forward_backward_step
    steps = {impl: step(case, impl, inputs) for impl in IMPLS}
    if with_torch and not jvp:
        steps |= {"torch": torch_step(case, channels_last=False), "torch_cl": torch_step(case, channels_last=True)}
    warm_up(steps)
    return {"model": case.model, "layer": case.label, **timer.median_ms(steps)}


PARTS = ("forward", "input_grad", "kernel_grad")


def jax_parts(case: Case, inputs) -> dict:
    """Zero-argument jitted steps, blocked on, for each conv primitive of a conv case (``impl="auto"``)."""
    x, kernel = inputs
    g = conv_geometry("bench", x.shape, kernel.shape, Layout(True, 2), case.strides, case.padding, 1, case.groups)
    forward = jax.jit(lambda x, kernel: _primitives.conv(x, kernel, g, None, "auto"))
    dy = jax.random.normal(jax.random.key(2), jax.eval_shape(forward, x, kernel).shape)
    input_grad = jax.jit(lambda dy, kernel: _primitives.conv_input_grad(dy, kernel, g, None, "auto"))
    kernel_grad = jax.jit(lambda x, dy: _primitives.conv_kernel_grad(x, dy, g, None, "auto"))
    return {
        "forward": jax_step(forward, x, kernel),
        "input_grad": jax_step(input_grad, dy, kernel),
        "kernel_grad": jax_step(kernel_grad, x, dy),
    }


def torch_parts(case: Case) -> dict:
    """PyTorch's forward (no autograd graph) and ``aten.convolution_backward`` for one gradient at a time."""
    import torch

    x = torch.randn(case.batch, case.channels, case.size, case.size)
    weight = torch.randn(case.features, case.channels // case.groups, case.window, case.window)
    geometry = {"stride": case.strides, "padding": case.padding, "groups": case.groups}
    with torch.no_grad():
        dy = torch.randn_like(torch.nn.functional.conv2d(x, weight, **geometry))

    def forward():
        with torch.no_grad():
            torch.nn.functional.conv2d(x, weight, **geometry)

    def backward(mask):
        strides, padding = [case.strides] * 2, [case.padding] * 2
        args = (dy, x, weight, None, strides, padding, [1, 1], False, [0, 0], case.groups, mask)
        return lambda: torch.ops.aten.convolution_backward(*args)

    return {
        "forward": forward,
        "input_grad": backward([True, False, False]),
        "kernel_grad": backward([False, True, False]),
    }


def bench_parts(case: Case, timer: Timer, with_torch: bool) -> dict:
    """Milliseconds of each piece of a conv case, cnnjax and PyTorch timed in one round-robin."""
    steps = {f"cnnjax {part}": step for part, step in jax_parts(case, jax_inputs(case)).items()}
    if with_torch:
        steps |= {f"torch {part}": step for part, step in torch_parts(case).items()}
    warm_up(steps)
    return {"model": case.model, "layer": case.label, **timer.median_ms(steps)}


def smaller(case: Case) -> Case:
    """The ``--quick`` variant: a quarter of the batch (at least 1)."""
    return dataclasses.replace(case, batch=max(1, case.batch // 4))


def markdown(rows: list[dict], with_torch: bool) -> str:
    """Milliseconds per method (``torch_cl``: channels_last), and ``auto`` against lax and PyTorch."""
    methods = [*IMPLS, "torch", "torch_cl"] if with_torch else list(IMPLS)
    baselines = [m for m in methods if m not in ("closed_form", "auto")]
    label = {m: "torch CL" if m == "torch_cl" else m for m in methods}
    head = ["model", "layer (NHWC)", *(f"{label[m]} ms" for m in methods), *(f"auto / {label[b]}" for b in baselines)]
    body = [
        [r["model"], r["layer"], *(fmt(r[m], 1) for m in methods), *(ratio(r["auto"], r[b]) for b in baselines)]
        for r in rows
    ]
    return _bench.markdown_table(head, body)


def parts_markdown(rows: list[dict], with_torch: bool) -> str:
    head = ["model", "layer (NHWC)"]
    for part in PARTS:
        head += [f"{part} ms"] + ([f"torch {part} ms", "ratio"] if with_torch else [])
    body = []
    for r in rows:
        cells = [r["model"], r["layer"]]
        for part in PARTS:
            cells.append(r[f"cnnjax {part}"])
            if with_torch:
                cells += [r[f"torch {part}"], ratio(r[f"cnnjax {part}"], r[f"torch {part}"])]
        body.append(cells)
    return _bench.markdown_table(head, body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the batch and 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per method (default 7, quick 3)")
    parser.add_argument("--min-sample-ms", type=float, default=20.0, help="shortest timed sample (back-to-back calls)")
    parser.add_argument("--only", default="", help="run only layers whose op or model contains this text")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
    parser.add_argument("--parts", action="store_true", help="conv layers only: time forward and each gradient apart")
    parser.add_argument("--jvp", action="store_true", help="forward mode (jax.jvp) instead, no PyTorch columns")
    parser.add_argument("--threads", type=int, help="cores for JAX and PyTorch (default: all this process may use)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    with_torch = not (args.no_torch or args.jvp)
    threads = _bench.pin_threads(args.threads)  # before JAX's first backend call
    if with_torch:
        torch = _bench.import_torch(threads)
    cases = [c for c in CASES if args.only in f"{c.model} {c.op}" and (c.op == "conv" or not args.parts)]
    if args.quick:
        cases = [smaller(c) for c in cases]
    versions = f"jax {jax.__version__} ({jax.default_backend()}), numpy {np.__version__}"
    if with_torch:
        versions += f", torch {torch.__version__}"
    print(f"{versions}; {threads} threads; float32; median of {rounds} round-robin rounds", flush=True)
    measure, table = (bench_parts, parts_markdown) if args.parts else (bench_case, markdown)
    if args.jvp:
        measure = functools.partial(bench_case, jvp=True)
    rows = []
    for case in cases:
        rows.append(measure(case, Timer(rounds, args.min_sample_ms / 1e3), with_torch))
        times = {k: v for k, v in rows[-1].items() if isinstance(v, float)}
        print(f"  {case.model:20s} {case.label:45s} " + " ".join(f"{k}={v:.2f}" for k, v in times.items()), flush=True)
    print()
    print(table(rows, with_torch))
    if args.json:
        _bench.write_json(args.json, {"versions": versions, "threads": threads, "rounds": rounds, "rows": rows})


if __name__ == "__main__":
    main()
