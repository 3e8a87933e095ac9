"""Training steps: cnnjax's jitted train step against PyTorch's eager one, side by side in one process.

Run (from the repository root, on an otherwise idle machine; the same command on a GPU adds ResNet-50):

    python experiments/bench_training.py                        # 7 rounds
    python experiments/bench_training.py --quick                # a quarter of every batch, 3 rounds, a smaller matmul
    python experiments/bench_training.py --json training.json --markdown training.md
    python experiments/bench_training.py --threads 1 --no-torch

Forward, backward and SGD-momentum update (optax's on the JAX side, ``torch.optim.SGD`` on
PyTorch's): LeNet-5 on 28x28 batches of 256, ResNet-18 (CIFAR stem) on 32x32 batches of 128 and,
on a GPU (or with ``--gpu-rows``), ResNet-50 on 224x224 batches of 256 in bfloat16 and in float32.
The JAX step is ``cnnjax.train.make_train_step``; the PyTorch models (``experiments/torch_models.py``)
must have the same parameter counts, checked here. Reported: milliseconds per step, images per
second and model FLOPs utilization, ``6 * MACs`` per image (forward ``2 * MACs`` from
``cnnjax.analysis.summary``, backward twice that) times images per second over the device's
peak: a datasheet figure on known GPUs (:data:`GPU_PEAK_TFLOPS`), on CPU the rate of a large
float32 matmul measured in the same run (``--quick``: 1024x1024 instead of 2048x2048). The ratio
is ``cnnjax time / PyTorch time`` (below 1: cnnjax is faster).

Method: every step is warmed up, then the two are timed in turn, ``--rounds`` times, and the
medians reported, so a busy machine slows both alike. A timed sample is as many back-to-back
steps as fill ``--min-sample-ms``, each ending in ``block_until_ready`` (and
``torch.cuda.synchronize`` on a GPU), after a 30 ms pause that lets the other framework's
spinning threads go idle (``_bench.Timer``).

Threads (``_bench.start_suite``): ``--threads N`` (default: every core this process may
use) pins the whole process to N cores before JAX starts its CPU client, whose thread pool is
sized from that mask, and sets ``torch.set_num_threads(N)``, so both frameworks get the same
cores. JAX has no per-call thread setting: the count is fixed for the process.

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

import dataclasses
from collections.abc import Callable, Sequence

import _bench
import jax
import jax.numpy as jnp
import optax
from _bench import Timer, TorchRuntime, jax_step, random_inputs, ratio
from flax import nnx

from cnnjax import models
from cnnjax.analysis import count_params, summary
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
LEARNING_RATE = 0.01
MOMENTUM = 0.9


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
    return _bench.markdown_table(head, body)


def main(argv: Sequence[str] | None = None) -> None:
    parser = _bench.suite_parser(__doc__)
    parser.add_argument("--gpu-rows", action="store_true", help="also run the GPU-only training rows (ResNet-50)")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: datasheet or measured)")
    suite = _bench.start_suite("experiments/bench_training.py", parser, argv)
    peaks = peak_flops(jax.devices()[0], suite.args, suite.timer)
    suite.report["settings"]["peak"] = {dtype: name for dtype, (name, _) in peaks.items()}
    rows = []
    for case in TRAIN_CASES:
        if not case.gpu_only or suite.gpu or suite.args.gpu_rows:
            row = bench_training(case, suite.scaled(case.batch), suite.runtime, peaks, suite.timer)
            rows.append(_bench.progress(row, f"{case.name} {case.dtype}"))
    suite.finish("training", "Training steps (forward, backward, SGD-momentum update)", rows, training_table(rows))


if __name__ == "__main__":
    main()
