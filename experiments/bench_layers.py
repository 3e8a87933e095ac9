"""Layers: ``cnnjax.nn`` modules against ``flax.nnx`` and PyTorch's ``torch.nn``, side by side in one process.

Run (from the repository root, on an otherwise idle machine; the same command on a GPU):

    python experiments/bench_layers.py                          # 7 rounds
    python experiments/bench_layers.py --quick                  # a quarter of every batch, 3 rounds
    python experiments/bench_layers.py --json layers.json --markdown layers.md
    python experiments/bench_layers.py --layer-dtype bfloat16 --no-torch --threads 2

The layer shapes of LeNet-5, ResNet-18 (CIFAR and ImageNet), MobileNet (depthwise), a grouped
conv and a stride-2 transposed conv; forward, and forward+backward (the input's and every
parameter's gradient); every ratio ``cnnjax time / baseline time`` (below 1: cnnjax is faster).

Method: the JAX functions are jitted (PyTorch runs eagerly, as its users do), fed random normal
inputs, compiled and warmed up, then all variants of a row are timed in turn, ``--rounds``
times, and the medians reported, so a busy machine slows all of them alike. A timed sample is
as many back-to-back calls as fill ``--min-sample-ms``, each ending in ``block_until_ready`` (and
``torch.cuda.synchronize`` on a GPU), after a 30 ms pause that lets the other framework's
spinning threads go idle (``_bench.Timer``).

Threads, GPU (``_bench.start_suite``): ``--threads N`` (default: every core this process
may use) pins the whole process to N cores before JAX starts its CPU client and gives PyTorch N
threads. On a GPU, PyTorch runs on CUDA with ``cudnn.benchmark`` and ``channels_last`` tensors
(cnnjax is NHWC throughout), both frameworks use TF32 for float32, and JAX preallocates only 45%
of the GPU's memory, leaving PyTorch the rest; the settings are printed and saved with the figures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import _bench
import jax
import jax.numpy as jnp
from _bench import Timer, TorchRuntime, cotangent, jax_step, random_inputs, ratio, vjp_fn
from flax import nnx

from cnnjax import nn


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


def layer_table(rows: list[dict]) -> str:
    head = ["model", "layer (NHWC)"]
    keys = ["model", "layer"]
    for mode, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
        head += [f"cnnjax {label} ms", f"flax {label} ms", f"torch {label} ms", f"vs flax {label}", f"vs torch {label}"]
        keys += [f"cnnjax_{mode}_ms", f"flax_{mode}_ms", f"torch_{mode}_ms", f"vs_flax_{mode}", f"vs_torch_{mode}"]
    return _bench.markdown_table(head, [[r.get(k) for k in keys] for r in rows])


def main(argv: Sequence[str] | None = None) -> None:
    parser = _bench.suite_parser(__doc__)
    parser.add_argument(
        "--layer-dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of the layer rows"
    )
    suite = _bench.start_suite("experiments/bench_layers.py", parser, argv)
    rows = []
    for case in LAYER_CASES:
        batch = suite.scaled(case.batch[1] if suite.gpu else case.batch[0])
        row = bench_layer(case, batch, suite.args.layer_dtype, suite.runtime, suite.timer)
        rows.append(_bench.progress(row, f"{case.model} {row['layer']}"))
    title = f"Layers ({suite.args.layer_dtype}): cnnjax.nn against flax.nnx and PyTorch"
    suite.finish("layers", title, rows, layer_table(rows))


if __name__ == "__main__":
    main()
