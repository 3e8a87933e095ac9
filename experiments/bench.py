"""cnnjax's speed, measured side by side in one process: against bare lax, flax.nnx and PyTorch.

Run (from the repository root, on an otherwise idle machine; the same command on a GPU):

    python experiments/bench.py                                    # about 5 minutes on 2 CPU cores
    python experiments/bench.py --quick                            # about 1 minute: smaller batches, 3 rounds
    python experiments/bench.py --json bench.json --markdown bench.md
    python experiments/bench.py --sections training --threads 2

Three tables, every ratio ``cnnjax time / baseline time`` (below 1: cnnjax is faster):

1. Overhead: ``cnnjax.conv``, ``conv_transpose``, ``max_pool``, ``avg_pool`` against the bare
   ``lax.conv_general_dilated`` / ``lax.conv_transpose`` / ``lax.reduce_window`` call they wrap,
   forward and forward+backward, whether the forward compiles to the same optimized HLO
   (:func:`normalize_hlo`, also used by ``tests/test_hlo.py``), and the noise floor: the ratio
   of two compilations of the bare call, timed alike. cnnjax runs with its default
   ``impl="auto"``: its primitives, whose backward pass is the notes' closed forms, lowered on
   CPU to the schedules of ``cnnjax._cpu``. Where a schedule is also another forward algorithm
   (on CPU, today: depthwise convs as windowed sums, max pools as a fold of strided slices,
   transposed convs as the phase-decomposed conv input gradient), "same HLO" is "no" by design
   and the ratio says whether it pays. These rows get three times ``--rounds``.
2. Layers: ``cnnjax.nn`` modules against their ``flax.nnx`` equivalents and PyTorch's
   (``torch.nn``) on the layer shapes of LeNet-5, ResNet-18 (CIFAR and ImageNet), MobileNet
   (depthwise), a grouped conv and a stride-2 transposed conv; forward, and forward+backward
   (the input's and every parameter's gradient).
3. Training steps (forward, backward, SGD-momentum update; optax's on the JAX side,
   ``torch.optim.SGD`` on PyTorch's): LeNet-5 on 28x28 batches of 256, ResNet-18 (CIFAR stem) on
   32x32 batches of 128 and, on a GPU (or with ``--gpu-rows``), ResNet-50 on 224x224 batches of
   256 in bfloat16 and in float32. The JAX step is ``cnnjax.train.make_train_step``; the PyTorch
   models (``experiments/torch_models.py``) must have the same parameter counts, checked here.
   Reported: milliseconds per step, images per second and model FLOPs utilization, ``6 * MACs``
   per image (forward ``2 * MACs`` from ``cnnjax.analysis.summary``, backward twice that) times
   images per second over the device's peak: a datasheet figure on known GPUs
   (:data:`GPU_PEAK_TFLOPS`), on CPU the rate of a large float32 matmul measured in the same run.

Method: every function is jitted (PyTorch runs eagerly, as its users do), fed random normal
inputs, compiled and warmed up, then all variants of a row are timed in turn, ``--rounds``
times, and the medians reported, so a busy machine slows all of them alike. A timed sample is
as many back-to-back calls as fill ``--min-sample-ms``, each ending in ``block_until_ready`` (and
``torch.cuda.synchronize`` on a GPU), after a 30 ms pause that lets the other framework's
spinning threads go idle (:class:`Timer`).

Threads: ``--threads N`` (default: every core this process may use) pins the whole process to
N cores (``os.sched_setaffinity``) before JAX starts its CPU client, whose thread pool is sized
from that mask, and sets ``torch.set_num_threads(N)``, so both frameworks get the same cores.
JAX has no per-call thread setting: the count is fixed for the process.

GPU: PyTorch runs on CUDA with ``torch.backends.cudnn.benchmark`` and ``channels_last`` tensors
(cnnjax is NHWC throughout). float32 rows let both frameworks use TF32 tensor cores (JAX's
``jax_default_matmul_precision="tensorfloat32"``, PyTorch's ``allow_tf32`` for cuDNN and
matmuls) and are measured against the TF32 peak; bfloat16 rows compute every layer but the
classifier in bfloat16 with float32 parameters, loss and optimizer (Flax's ``dtype`` mixed
precision; ``torch.autocast`` on PyTorch's side). JAX preallocates only 45% of the GPU's memory
(``XLA_PYTHON_CLIENT_MEM_FRACTION``, unless set), leaving PyTorch the rest. ``XLA_FLAGS`` (none
are set here: XLA's defaults) and these settings are printed and saved with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from cnnjax import models, nn
from cnnjax.analysis import count_params, summary
from cnnjax.convolution import conv, conv_transpose
from cnnjax.pooling import avg_pool, max_pool
from cnnjax.train import init_train_state, make_train_step

# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's datasheets, matched against
# ``jax.devices()[0].device_kind`` in order (so "H100 PCIe" before "H100", whose SXM5 part reports
# "NVIDIA H100 80GB HBM3", and "GH200" before "H200"): bfloat16 and TF32 on tensor cores, plain
# float32 without them. The NVL figures are the datasheet's "with sparsity" ones halved.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "tf32": 378.0, "float32": 51.2}),
    ("H100 NVL", {"bfloat16": 835.5, "tf32": 417.5, "float32": 60.0}),
    ("H100", {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9}),
    ("GH200", {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9}),
    ("H200", {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9}),
    ("A100", {"bfloat16": 312.0, "tf32": 156.0, "float32": 19.5}),
)
SECTIONS = ("overhead", "layers", "training")
NHWC = ("NHWC", "HWIO", "NHWC")
NCHW = ("NCHW", "OIHW", "NCHW")
JAX_GPU_MEMORY_FRACTION = 0.45  # JAX's preallocated share of a GPU it shares with PyTorch
LEARNING_RATE = 0.01
MOMENTUM = 0.9


# --- optimized HLO, compared modulo names, metadata and schedule ------------------------------

_MODULE_NAME = re.compile(r"^HloModule [^,\s]+")
_METADATA = re.compile(r',\s*metadata=\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\}')
_SIGNATURE_PARAMETER = re.compile(r"(?<=\()[\w.\-]+: |(?<=, )[\w.\-]+: ")
_COMPUTATION = re.compile(r"^(ENTRY )?(%[\w.\-]+) (\(.*)$")
_INSTRUCTION = re.compile(r"^\s+(ROOT )?(%[\w.\-]+) = (.*)$")
_NAME = re.compile(r"%[\w.\-]+")


@dataclasses.dataclass
class _Computation:
    signature: str
    body: dict[str, str] = dataclasses.field(default_factory=dict)  # instruction -> its text
    root: str = ""


def _parse_hlo(text: str) -> tuple[str, str, dict[str, _Computation]]:
    """``(module line, entry computation, computations)`` of an HLO module's text, metadata dropped."""
    header, entry, computations, current = "", "", {}, None
    for line in (_METADATA.sub("", line) for line in text.splitlines()):
        if line.startswith("HloModule"):
            header = _MODULE_NAME.sub("HloModule", line)
        elif match := _COMPUTATION.match(line):
            is_entry, name, signature = match.groups()
            current = computations[name] = _Computation(_SIGNATURE_PARAMETER.sub("", signature))
            entry = name if is_entry else entry
        elif (match := _INSTRUCTION.match(line)) and current is not None:
            is_root, name, body = match.groups()
            current.body[name] = body
            current.root = name if is_root else current.root
    return header, entry, computations


def _post_order(root: str, operands: Callable[[str], list[str]]) -> list[str]:
    """Every node reachable from ``root``, each after its operands (visited in operand order)."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif node not in seen:
            seen.add(node)
            stack.append((node, True))
            stack.extend((operand, False) for operand in reversed(operands(node)))
    return order


def normalize_hlo(text: str) -> str:
    """An optimized HLO module's text in a canonical form: equal texts mean the same program.

    Drops what does not change the program: the module's name, the source-location tables,
    every ``metadata={...}`` (op names, source lines) and the parameter names of signatures.
    Puts what the compiler may order arbitrarily in one order: each computation's instructions
    in post-order from its root (operands first, in operand order; the scheduler's order of
    independent instructions is not kept), every called computation before its caller. Then
    renames every ``%instruction`` and ``%computation`` to ``%0, %1, ...`` in order of appearance.

    >>> text = 'HloModule jit_f, is_scheduled=true\\n\\nENTRY %main.2 (x.1: f32[2]) -> f32[2] {\\n'
    >>> text += '  %x.1 = f32[2]{0} parameter(0), metadata={op_name="x"}\\n'
    >>> text += '  ROOT %neg.3 = f32[2]{0} negate(%x.1)\\n}'
    >>> print(normalize_hlo(text))
    HloModule, is_scheduled=true
    ENTRY %0 (f32[2]) -> f32[2] {
      %1 = f32[2]{0} parameter(0)
      ROOT %2 = f32[2]{0} negate(%1)
    }
    """
    header, entry, computations = _parse_hlo(text)
    lines, emitted = [header], set()

    def emit(name: str) -> None:
        emitted.add(name)
        computation = computations[name]
        body = computation.body
        order = _post_order(computation.root, lambda i: [r for r in _NAME.findall(body[i]) if r in body])
        order += sorted(set(body) - set(order), key=body.get)  # unused parameters
        for instruction in order:
            for called in _NAME.findall(body[instruction]):
                if called in computations and called not in emitted:
                    emit(called)
        lines.append(f"{'ENTRY ' if name == entry else ''}{name} {computation.signature}")
        lines.extend(f"  {'ROOT ' if i == computation.root else ''}{i} = {body[i]}" for i in order)
        lines.append("}")

    emit(entry)
    names: dict[str, str] = {}
    return _NAME.sub(lambda m: names.setdefault(m.group(), f"%{len(names)}"), "\n".join(lines))


def hlo_diff(expected: str, actual: str) -> str:
    """A unified diff of two normalized HLO texts, empty when they are equal."""
    lines = difflib.unified_diff(expected.splitlines(), actual.splitlines(), "expected", "actual", lineterm="")
    return "\n".join(lines)


# --- timing -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timer:
    """Times zero-argument steps in turn: ``rounds`` samples each, of at least ``min_sample_s``.

    Before every sample the process sleeps ``settle_s``, so that the threads of whichever
    framework ran last have gone idle: XLA's CPU thread pool and PyTorch's OpenMP threads spin
    for several milliseconds after each call, and on 2 cores that spinning slowed the other
    framework's next call up to 16x (a 0.2 ms PyTorch average pool took 8 ms right after a JAX
    call, 0.5 ms 20 ms later).
    """

    rounds: int
    min_sample_s: float
    settle_s: float = 0.03

    def median_ms(self, steps: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Median milliseconds per call of each step (every step must block until its work is done).

        Each step is called twice first (compilation, then a warm call that also sizes a sample:
        enough back-to-back calls to last ``min_sample_s``); then, ``rounds`` times, each step's
        sample is timed once, in turn, the order reversed every other round so that no step
        always follows the same one.
        """
        repeats = {}
        for name, step in steps.items():
            step()
            time.sleep(self.settle_s)
            start = time.perf_counter()
            step()
            repeats[name] = max(1, round(self.min_sample_s / max(time.perf_counter() - start, 1e-9)))
        samples: dict[str, list[float]] = {name: [] for name in steps}
        for i in range(self.rounds):
            for name in list(steps)[:: 1 if i % 2 == 0 else -1]:
                time.sleep(self.settle_s)
                start = time.perf_counter()
                for _ in range(repeats[name]):
                    steps[name]()
                samples[name].append((time.perf_counter() - start) / repeats[name])
        return {name: 1e3 * statistics.median(times) for name, times in samples.items()}


def jax_step(compiled: Callable, *args) -> Callable[[], object]:
    """``compiled(*args)``, blocked on, as a zero-argument step."""
    return lambda: jax.block_until_ready(compiled(*args))


def random_inputs(shapes: Sequence[tuple[int, ...]], dtype=jnp.float32, seed: int = 0) -> list:
    """One standard normal array per shape."""
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes, strict=True)]


def vjp_fn(fn: Callable) -> Callable:
    """``(args, dy) -> (fn(*args), the gradient of every argument)``: forward + backward."""

    def forward_backward(args, dy):
        y, pullback = jax.vjp(fn, *args)
        return y, pullback(dy)

    return forward_backward


def cotangent(fn: Callable, *args, seed: int = 1):
    """A random normal cotangent shaped like ``fn(*args)``."""
    out = jax.eval_shape(fn, *args)
    return jax.random.normal(jax.random.key(seed), out.shape, out.dtype)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


# --- 1. overhead: cnnjax against the lax call it wraps -----------------------------------------


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


# --- 2. layers: cnnjax.nn against flax.nnx and torch.nn ----------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """One layer on ``(batch, size, size, in_features)`` images; ``batch`` is (CPU, GPU)."""

    model: str
    kind: str  # "conv", "conv_transpose", "max_pool" or "avg_pool"
    batch: tuple[int, int]
    size: int
    in_features: int
    window: int
    strides: int = 1
    padding: int = 0  # PyTorch's: per side; the forward conv's for conv_transpose
    out_features: int = 0
    groups: int = 1

    def label(self, batch: int) -> str:
        shape = f"{batch}x{self.size}x{self.size}x{self.in_features}"
        geometry = f"{self.window}x{self.window}/{self.strides}" + (f" pad {self.padding}" if self.padding else "")
        if self.kind in ("max_pool", "avg_pool"):
            return f"{self.kind} {geometry}, {shape}"
        if self.groups == 1:
            kind = self.kind
        elif self.groups == self.in_features:
            kind = f"depthwise {self.kind}"
        else:
            kind = f"{self.kind} g={self.groups}"
        return f"{kind} {geometry}, {shape} -> {self.out_features}"


LAYER_CASES = (
    LayerCase("LeNet-5", "conv", (256, 256), 28, 1, 5, padding=2, out_features=6),
    LayerCase("LeNet-5", "avg_pool", (256, 256), 28, 6, 2, strides=2),
    LayerCase("LeNet-5", "conv", (256, 256), 14, 6, 5, out_features=16),
    LayerCase("ResNet-18 CIFAR", "conv", (32, 128), 32, 64, 3, padding=1, out_features=64),
    LayerCase("ResNet-18 CIFAR", "conv", (32, 128), 32, 64, 3, strides=2, padding=1, out_features=128),
    LayerCase("ResNet-18 CIFAR", "conv", (32, 128), 4, 512, 3, padding=1, out_features=512),
    LayerCase("ResNet-18 ImageNet", "conv", (8, 256), 224, 3, 7, strides=2, padding=3, out_features=64),
    LayerCase("ResNet-18 ImageNet", "max_pool", (8, 256), 112, 64, 3, strides=2, padding=1),
    LayerCase("ResNet-18 ImageNet", "conv", (8, 256), 56, 64, 3, padding=1, out_features=64),
    LayerCase("ResNet-18 ImageNet", "conv", (8, 256), 7, 512, 3, padding=1, out_features=512),
    LayerCase("MobileNet", "conv", (8, 128), 112, 32, 3, padding=1, out_features=32, groups=32),
    LayerCase("MobileNet", "conv", (8, 128), 56, 128, 3, strides=2, padding=1, out_features=128, groups=128),
    LayerCase("ResNeXt", "conv", (8, 128), 28, 128, 3, padding=1, out_features=128, groups=32),
    LayerCase("DCGAN", "conv_transpose", (16, 128), 16, 64, 4, strides=2, padding=1, out_features=32),
)


def cnnjax_layer(case: LayerCase, dtype, rngs: nnx.Rngs):
    """The ``cnnjax.nn`` module of ``case`` (PyTorch-style int padding)."""
    window, p = (case.window, case.window), case.padding
    if case.kind == "conv":
        return nn.Conv(
            case.in_features,
            case.out_features,
            window,
            case.strides,
            padding=p,
            feature_group_count=case.groups,
            param_dtype=dtype,
            rngs=rngs,
        )
    if case.kind == "conv_transpose":
        return nn.ConvTranspose(
            case.in_features, case.out_features, window, case.strides, padding=p, param_dtype=dtype, rngs=rngs
        )
    pool = nn.MaxPool if case.kind == "max_pool" else nn.AvgPool
    return pool(window, case.strides, p)


def flax_layer(case: LayerCase, dtype, rngs: nnx.Rngs):
    """The ``flax.nnx`` equivalent: ``nnx.Conv``/``nnx.ConvTranspose`` or ``nnx.max_pool``/``avg_pool``."""
    window, strides = (case.window, case.window), (case.strides, case.strides)
    pads = ((case.padding, case.padding),) * 2
    if case.kind == "conv":
        return nnx.Conv(
            case.in_features,
            case.out_features,
            window,
            strides,
            padding=pads,
            feature_group_count=case.groups,
            param_dtype=dtype,
            rngs=rngs,
        )
    if case.kind == "conv_transpose":
        # lax.conv_transpose pads the stride-dilated input: PyTorch's padding p is k - 1 - p there
        lax_pad = ((case.window - 1 - case.padding,) * 2,) * 2
        return nnx.ConvTranspose(
            case.in_features,
            case.out_features,
            window,
            strides,
            padding=lax_pad,
            transpose_kernel=True,
            param_dtype=dtype,
            rngs=rngs,
        )
    pool = nnx.max_pool if case.kind == "max_pool" else nnx.avg_pool
    return lambda x: pool(x, window, strides, pads)


def torch_layer(case: LayerCase):
    """The ``torch.nn`` equivalent (NCHW inputs; ``torch_layer_steps`` moves and casts it)."""
    from torch import nn as torch_nn

    geometry = (case.window, case.strides, case.padding)
    if case.kind == "conv":
        return torch_nn.Conv2d(case.in_features, case.out_features, *geometry, groups=case.groups)
    if case.kind == "conv_transpose":
        return torch_nn.ConvTranspose2d(case.in_features, case.out_features, *geometry)
    pool = torch_nn.MaxPool2d if case.kind == "max_pool" else torch_nn.AvgPool2d
    return pool(*geometry)


def jax_layer_steps(layer, x) -> tuple[dict[str, Callable[[], object]], tuple[int, ...]]:
    """Forward and forward+backward steps of an NNX module (or a pure function) on ``x``."""
    if isinstance(layer, nnx.Module):
        graphdef, variables = nnx.split(layer)

        def apply(variables, x):
            return nnx.merge(graphdef, variables)(x)
    else:
        variables = {}

        def apply(variables, x):
            return layer(x)

    dy = cotangent(apply, variables, x)
    forward, forward_backward = jax.jit(apply), jax.jit(vjp_fn(apply))
    steps = {"fwd": jax_step(forward, variables, x), "fwd_bwd": jax_step(forward_backward, (variables, x), dy)}
    return steps, dy.shape


def torch_layer_steps(layer, x_shape, dtype: str, runtime: TorchRuntime) -> tuple[dict, tuple[int, ...]]:
    """Forward (under ``no_grad``) and forward+backward steps of a ``torch.nn`` layer on NCHW ``x``."""
    torch = runtime.torch
    torch_dtype = getattr(torch, dtype)
    layer = layer.to(runtime.device, torch_dtype, memory_format=runtime.memory_format)
    x = runtime.tensor(torch.randn(x_shape, dtype=torch_dtype)).requires_grad_(True)
    wrt = [x, *layer.parameters()]
    with torch.no_grad():
        dy = torch.randn_like(layer(x))

    def forward():
        with torch.no_grad():
            layer(x)
        runtime.synchronize()

    def forward_backward():
        torch.autograd.grad(layer(x), wrt, dy)
        runtime.synchronize()

    return {"fwd": forward, "fwd_bwd": forward_backward}, tuple(dy.shape)


def bench_layer(case: LayerCase, batch: int, dtype: str, runtime: TorchRuntime | None, timer: Timer) -> dict:
    """Milliseconds of the three implementations of one layer, forward and forward+backward."""
    jdtype = jnp.dtype(dtype)
    (x,) = random_inputs([(batch, case.size, case.size, case.in_features)], jdtype)
    steps, shapes = {}, {}
    for who, build in (("cnnjax", cnnjax_layer), ("flax", flax_layer)):
        layer_steps, shapes[who] = jax_layer_steps(build(case, jdtype, nnx.Rngs(0)), x)
        steps |= {f"{who}_{k}": step for k, step in layer_steps.items()}
    if runtime is not None:
        nchw = (batch, case.in_features, case.size, case.size)
        layer_steps, (n, c, h, w) = torch_layer_steps(torch_layer(case), nchw, dtype, runtime)
        shapes["torch"] = (n, h, w, c)
        steps |= {f"torch_{k}": step for k, step in layer_steps.items()}
    if len(set(shapes.values())) != 1:
        raise RuntimeError(f"bench: {case.label(batch)}: the implementations disagree on the output shape: {shapes}")
    ms = timer.median_ms(steps)
    row = {"model": case.model, "layer": case.label(batch), **{f"{k}_ms": v for k, v in ms.items()}}
    for mode in ("fwd", "fwd_bwd"):
        row[f"vs_flax_{mode}"] = ratio(ms[f"cnnjax_{mode}"], ms[f"flax_{mode}"])
        row[f"vs_torch_{mode}"] = ratio(ms[f"cnnjax_{mode}"], ms.get(f"torch_{mode}"))
    return row


# --- 3. training steps ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainCase:
    """A model trained on random ``(batch, size, size, in_features)`` images and 0..classes-1 labels."""

    name: str
    model: str  # "lenet5", "resnet18" (CIFAR stem) or "resnet50"
    size: int
    in_features: int
    num_classes: int
    batch: int
    dtype: str = "float32"
    gpu_only: bool = False


TRAIN_CASES = (
    TrainCase("LeNet-5", "lenet5", 28, 1, 10, 256),
    TrainCase("ResNet-18 (CIFAR stem)", "resnet18", 32, 3, 10, 128),
    TrainCase("ResNet-50", "resnet50", 224, 3, 1000, 256, "bfloat16", gpu_only=True),
    TrainCase("ResNet-50", "resnet50", 224, 3, 1000, 256, "float32", gpu_only=True),
)


def jax_model(case: TrainCase) -> nnx.Module:
    rngs = nnx.Rngs(0)
    if case.model == "lenet5":
        return models.LeNet5(
            num_classes=case.num_classes, in_features=case.in_features, input_size=case.size, rngs=rngs
        )
    small = case.model == "resnet18"
    build = models.resnet18 if small else models.resnet50
    return build(num_classes=case.num_classes, in_features=case.in_features, small_input=small, rngs=rngs)


def torch_model(case: TrainCase):
    import torch_models

    if case.model == "lenet5":
        return torch_models.LeNet5(case.num_classes, case.in_features)
    small = case.model == "resnet18"
    build = torch_models.resnet18 if small else torch_models.resnet50
    return build(num_classes=case.num_classes, in_features=case.in_features, small_input=small)


def compute_in(model: nnx.Module, dtype, keep: nnx.Module) -> None:
    """Mixed precision, Flax's way: every submodule with a ``dtype`` (convs, BatchNorm, Linear)
    but ``keep`` computes in ``dtype``; parameters stay in their ``param_dtype`` (float32).
    ``keep`` (the classifier) stays in float32 so the loss sees float32 logits."""
    for _, module in nnx.iter_modules(model):
        if module is not keep and hasattr(module, "dtype"):
            module.dtype = dtype


def model_flops_per_image(model: nnx.Module, case: TrainCase) -> int:
    """Training FLOPs of one image: ``6 * MACs`` (forward ``2 * MACs``, backward twice that)."""
    image = jax.ShapeDtypeStruct((1, case.size, case.size, case.in_features), jnp.float32)
    return 6 * summary(model, image).total_macs


def jax_train_step(case: TrainCase, batch: int) -> tuple[Callable[[], object], nnx.Module]:
    """One ``cnnjax.train`` step (jitted, state donated) as a zero-argument step, and the model."""
    model = jax_model(case)
    if case.dtype != "float32":
        compute_in(model, jnp.dtype(case.dtype), keep=getattr(model, "fc", None))
    optimizer = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
    graphdef, state = init_train_state(model, optimizer)
    train_step = make_train_step(graphdef, optimizer)
    x = jax.random.normal(jax.random.key(0), (batch, case.size, case.size, case.in_features))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, case.num_classes)

    def step():
        nonlocal state
        state, metrics = train_step(state, x, y)
        return jax.block_until_ready((state, metrics))

    return step, model


def torch_train_step(case: TrainCase, batch: int, runtime: TorchRuntime):
    """The same step in PyTorch (eager, ``torch.autocast`` for bfloat16), and the model."""
    torch = runtime.torch
    model = torch_model(case).to(runtime.device, memory_format=runtime.memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    x = runtime.tensor(torch.randn(batch, case.in_features, case.size, case.size))
    y = torch.randint(0, case.num_classes, (batch,), device=runtime.device)
    dtype = getattr(torch, case.dtype)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(runtime.device.type, dtype=dtype, enabled=case.dtype != "float32"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        runtime.synchronize()

    return step, model


def bench_training(case: TrainCase, batch: int, runtime: TorchRuntime | None, peaks: dict, timer: Timer) -> dict:
    """Milliseconds per step, images per second and MFU of the JAX and PyTorch steps."""
    steps = {}
    steps["cnnjax"], model = jax_train_step(case, batch)
    params = count_params(model)
    if runtime is not None:
        steps["torch"], torch_net = torch_train_step(case, batch, runtime)
        torch_params = sum(p.numel() for p in torch_net.parameters() if p.requires_grad)
        if torch_params != params:
            raise RuntimeError(
                f"bench: {case.name}: PyTorch's model has {torch_params:,} parameters, cnnjax's {params:,}"
            )
    flops = model_flops_per_image(model, case)
    peak_name, peak = peaks[case.dtype]
    ms = timer.median_ms(steps)
    row = {"model": case.name, "batch": batch, "dtype": case.dtype, "params": params, "flops_per_image": flops}
    row |= {"peak": peak_name, "peak_tflops": peak / 1e12}
    for who, t in ms.items():
        images = batch / (t / 1e3)
        row |= {f"{who}_ms": t, f"{who}_images_per_s": images, f"{who}_mfu": images * flops / peak}
    row["vs_torch"] = ratio(ms["cnnjax"], ms.get("torch"))
    return row


def matmul_flops_per_s(n: int, timer: Timer) -> float:
    """FLOP/s of a jitted ``n x n`` float32 matmul: the CPU's practical peak, measured here."""
    a, b = random_inputs([(n, n), (n, n)])
    ms = timer.median_ms({"matmul": jax_step(jax.jit(jnp.matmul), a, b)})["matmul"]
    return 2 * n**3 / (ms / 1e3)


def peak_flops(device, args, timer: Timer) -> dict[str, tuple[str, float]]:
    """``dtype -> (description, FLOP/s)`` of the peak each training row's MFU is measured against."""
    if args.peak_tflops:
        peak = (f"--peak-tflops {args.peak_tflops}", args.peak_tflops * 1e12)
        return {"float32": peak, "bfloat16": peak}
    if device.platform == "gpu":
        for kind, tflops in GPU_PEAK_TFLOPS:
            if kind in device.device_kind:
                tf32 = f"{kind} TF32 dense {tflops['tf32']} (plain FP32: {tflops['float32']})"
                return {
                    "float32": (tf32, tflops["tf32"] * 1e12),
                    "bfloat16": (f"{kind} bf16 dense {tflops['bfloat16']}", tflops["bfloat16"] * 1e12),
                }
    n = 1024 if args.quick else 2048
    measured = matmul_flops_per_s(n, timer)
    peak = (f"measured {n}x{n} f32 matmul {measured / 1e12:.3f}", measured)
    return {"float32": peak, "bfloat16": peak}


# --- PyTorch's side, the machine, the tables -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TorchRuntime:
    """Where PyTorch runs: CUDA with channels_last next to a JAX GPU, else the CPU, NCHW-contiguous
    (PyTorch's default layout; ``--torch-channels-last`` switches it)."""

    torch: object
    device: object
    memory_format: object

    def tensor(self, t):
        return t.to(self.device, memory_format=self.memory_format)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def torch_runtime(backend: str, threads: int, channels_last: bool | None) -> tuple[TorchRuntime | None, dict]:
    """PyTorch set up beside JAX on ``backend``, and its settings; ``None`` if it cannot match it."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    settings = {"torch": torch.__version__, "torch_threads": threads}
    if backend == "gpu":
        if not torch.cuda.is_available():
            return None, settings | {"torch_skipped": "JAX runs on a GPU but this PyTorch has no CUDA"}
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
        device = torch.device("cuda")
        settings |= {"cudnn_benchmark": True, "allow_tf32": True, "torch_device": torch.cuda.get_device_name()}
    elif backend == "cpu":
        device = torch.device("cpu")
    else:
        return None, settings | {"torch_skipped": f"no PyTorch device matches JAX's {backend}"}
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    settings["torch_memory_format"] = "channels_last" if channels_last else "contiguous (NCHW)"
    return TorchRuntime(torch, device, memory_format), settings


def pin_threads(threads: int | None) -> int:
    """Restrict the process to ``threads`` of its cores (all of them by default); return the count.

    Must run before JAX creates its CPU client, which sizes its thread pool from this mask.
    """
    if not hasattr(os, "sched_setaffinity"):
        return threads or os.cpu_count() or 1
    cores = sorted(os.sched_getaffinity(0))
    if threads is None:
        return len(cores)
    if not 1 <= threads <= len(cores):
        raise SystemExit(
            f"bench: --threads={threads} must be between 1 and the {len(cores)} cores this process may use"
        )
    os.sched_setaffinity(0, cores[:threads])
    return threads


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(head: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def overhead_table(rows: list[dict]) -> str:
    head = ["op", "lax fwd ms", "cnnjax fwd ms", "fwd ratio", "noise (lax/lax)", "same HLO", "lax fwd+bwd ms"]
    head += ["cnnjax fwd+bwd ms (impl=auto)", "fwd+bwd ratio"]
    keys = ["op", "lax_fwd_ms", "cnnjax_fwd_ms", "fwd_ratio", "fwd_noise", "same_hlo", "lax_fwd_bwd_ms"]
    keys += ["cnnjax_fwd_bwd_ms", "fwd_bwd_ratio"]
    return markdown_table(head, [[r[k] for k in keys] for r in rows])


def layer_table(rows: list[dict]) -> str:
    head = ["model", "layer (NHWC)"]
    keys = ["model", "layer"]
    for mode, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
        head += [f"cnnjax {label} ms", f"flax {label} ms", f"torch {label} ms", f"vs flax {label}", f"vs torch {label}"]
        keys += [f"cnnjax_{mode}_ms", f"flax_{mode}_ms", f"torch_{mode}_ms", f"vs_flax_{mode}", f"vs_torch_{mode}"]
    return markdown_table(head, [[r.get(k) for k in keys] for r in rows])


def training_table(rows: list[dict]) -> str:
    head = ["model", "batch", "dtype"]
    for who in ("cnnjax", "torch"):
        head += [f"{who} ms/step", f"{who} img/s", f"{who} MFU"]
    head += ["vs torch", "GFLOP/img", "peak TFLOP/s"]
    body = []
    for r in rows:
        row = [r["model"], r["batch"], r["dtype"]]
        for who in ("cnnjax", "torch"):
            images, mfu = r.get(f"{who}_images_per_s"), r.get(f"{who}_mfu")
            row += [r.get(f"{who}_ms"), None if images is None else f"{images:,.0f}"]
            row += [None if mfu is None else f"{mfu:.1%}"]
        row += [r["vs_torch"], f"{r['flops_per_image'] / 1e9:.3g}", r["peak"]]
        body.append(row)
    return markdown_table(head, body)


def machine_info(backend: str, threads: int) -> dict:
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "backend": backend,
        "device_kind": device.device_kind,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""),
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
    }


def header(info: dict, settings: dict, command: str) -> str:
    torch = f", torch {settings['torch']}" if "torch" in settings else ""
    skipped = f" PyTorch skipped: {settings['torch_skipped']}." if "torch_skipped" in settings else ""
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} threads used), JAX backend "
        f"{info['backend']} ({info['device_kind']}); jax {info['jax']}, flax {info['flax']}, optax {info['optax']}"
        f"{torch}. XLA_FLAGS={info['xla_flags']!r}, jax_default_matmul_precision="
        f"{info['jax_default_matmul_precision']}; PyTorch layout: {settings.get('torch_memory_format', '-')}."
        f"{skipped} Median of {settings['rounds']} round-robin rounds ({3 * settings['rounds']} for overhead rows); "
        "ratios are cnnjax time / baseline time."
        f"\n\nCommand: `{command}`"
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of every batch, 3 rounds, a smaller matmul")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--rounds", type=int, help="timed rounds per row (default 7, --quick 3)")
    parser.add_argument("--min-sample-ms", type=float, default=20.0, help="shortest timed sample (back-to-back calls)")
    parser.add_argument("--batch-scale", type=float, help="multiply every batch size (default 1, --quick 0.25)")
    parser.add_argument("--threads", type=int, help="cores for JAX and PyTorch (default: all this process may use)")
    parser.add_argument(
        "--layer-dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the layer rows"
    )
    parser.add_argument("--gpu-rows", action="store_true", help="also run the GPU-only training rows (ResNet-50)")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: datasheet or measured)")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument(
        "--torch-channels-last",
        action=argparse.BooleanOptionalAction,
        help="PyTorch's memory format (default: channels_last on CUDA, NCHW on CPU)",
    )
    parser.add_argument("--json", help="write every figure and setting to this JSON file")
    parser.add_argument("--markdown", help="write the tables to this markdown file")
    args = parser.parse_args(argv)
    sections = tuple(s for s in args.sections.split(",") if s)
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}")
    args.sections = sections
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.batch_scale = args.batch_scale or (0.25 if args.quick else 1.0)
    return args


def overhead_rows(args, gpu: bool, timer: Timer) -> list[dict]:
    """Timed with three times the rounds: the rows are cheap, and telling a 1.02 ratio from noise
    (two runs of one program differ by a few percent on a shared 2-core machine) needs them."""
    cases = overhead_cases(scaled(128 if gpu else 16, args))
    timer = dataclasses.replace(timer, rounds=3 * timer.rounds)
    return [progress(bench_overhead(case, timer), case.name) for case in cases]


def layer_rows(args, gpu: bool, runtime: TorchRuntime | None, timer: Timer) -> list[dict]:
    rows = []
    for case in LAYER_CASES:
        batch = scaled(case.batch[1] if gpu else case.batch[0], args)
        row = bench_layer(case, batch, args.layer_dtype, runtime, timer)
        rows.append(progress(row, f"{case.model} {row['layer']}"))
    return rows


def training_rows(args, gpu: bool, runtime: TorchRuntime | None, timer: Timer, settings: dict) -> list[dict]:
    peaks = peak_flops(jax.devices()[0], args, timer)
    settings["peak"] = {dtype: name for dtype, (name, _) in peaks.items()}
    rows = []
    for case in TRAIN_CASES:
        if not case.gpu_only or gpu or args.gpu_rows:
            row = bench_training(case, scaled(case.batch, args), runtime, peaks, timer)
            rows.append(progress(row, f"{case.name} {case.dtype}"))
    return rows


def scaled(batch: int, args) -> int:
    return max(1, round(batch * args.batch_scale))


def progress(row: dict, label: str) -> dict:
    """Print a finished row's timings (the tables come at the end of each section); return it."""
    timings = " ".join(f"{k[:-3]}={v:.2f}" for k, v in row.items() if k.endswith("_ms") and v is not None)
    print(f"  {label}: {timings}", flush=True)
    return row


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    command = " ".join(["python", "experiments/bench.py", *(sys.argv[1:] if argv is None else argv)])
    threads = pin_threads(args.threads)  # both before JAX's first backend call
    if not args.no_torch:  # JAX would preallocate 75% of a GPU's memory, starving PyTorch
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(JAX_GPU_MEMORY_FRACTION))
    backend = jax.default_backend()
    gpu = backend == "gpu"
    if gpu:
        jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    runtime, settings = (None, {}) if args.no_torch else torch_runtime(backend, threads, args.torch_channels_last)
    settings |= {"rounds": args.rounds, "min_sample_ms": args.min_sample_ms, "batch_scale": args.batch_scale}
    info = machine_info(backend, threads)
    timer = Timer(args.rounds, args.min_sample_ms / 1e3)
    report = {"machine": info, "settings": settings, "command": command}
    tables = [f"## cnnjax benchmark, {info['date']}", header(info, settings, command)]
    print(tables[1], flush=True)
    sections = {
        "overhead": (
            "Overhead: cnnjax against the bare lax call it wraps (jitted)",
            lambda: overhead_rows(args, gpu, timer),
            overhead_table,
        ),
        "layers": (
            f"Layers ({args.layer_dtype}): cnnjax.nn against flax.nnx and PyTorch",
            lambda: layer_rows(args, gpu, runtime, timer),
            layer_table,
        ),
        "training": (
            "Training steps (forward, backward, SGD-momentum update)",
            lambda: training_rows(args, gpu, runtime, timer, settings),
            training_table,
        ),
    }
    for name in args.sections:
        title, rows, table = sections[name]
        report[name] = rows()
        tables += [f"### {title}", table(report[name])]
        print(f"\n### {title}\n{tables[-1]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n\n".join(tables) + "\n")


if __name__ == "__main__":
    main()
