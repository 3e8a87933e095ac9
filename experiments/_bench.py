"""What the benchmark scripts of ``experiments/`` share, and the HLO comparison ``tests/test_hlo.py`` uses.

Not part of the cnnjax package. A script imports it as ``import _bench`` (Python puts the
script's own directory first on ``sys.path``, whichever directory it runs from); the tests find
it through pytest's ``pythonpath`` setting (``pyproject.toml``). It imports nothing of cnnjax,
and PyTorch only inside the functions that set it up (:func:`import_torch`, :func:`torch_runtime`):
a torch-free run, and the tests, never load it. PyTorch's set-up lives here rather than beside the
twins in ``experiments/torch_models.py`` because ``bench_layers.py`` and ``bench_backprop.py``
need it without the twins, and importing the twins loads PyTorch.

- Optimized HLO compared modulo names, metadata and schedule: :func:`normalize_hlo`, :func:`hlo_diff`.
- Timing: :class:`Timer` (round-robin samples, each after a settle pause) and the jitted steps it
  times (:func:`jax_step`, :func:`vjp_fn`, :func:`random_inputs`, :func:`cotangent`), :func:`ratio`.
- The machine: :func:`pin_threads` (JAX and PyTorch on the same cores), :func:`machine_info`.
- PyTorch beside JAX: :func:`import_torch` (seed, threads), :class:`TorchRuntime` (device, layout).
- Reports: :func:`markdown_table`, :func:`write_json`, and the run of one suite of
  ``bench_overhead.py`` / ``bench_layers.py`` / ``bench_training.py`` (:func:`suite_parser`,
  :func:`start_suite`, :meth:`Suite.finish`): the flags, the settings and the header they print,
  the JSON and Markdown files they write.
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

import jax
import jax.numpy as jnp
import numpy as np

JAX_GPU_MEMORY_FRACTION = 0.45  # JAX's preallocated share of a GPU it shares with PyTorch

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
    """``a / b``, or ``None`` when either is missing (a framework skipped)."""
    return None if a is None or b is None else a / b


# --- the machine --------------------------------------------------------------------------------


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


def machine_info(backend: str, threads: int) -> dict:
    """The machine, the library versions and the XLA settings a run's figures depend on."""
    import flax
    import optax

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


# --- PyTorch beside JAX (imported here, on first use) ---------------------------------------------


def import_torch(threads: int):
    """PyTorch, seeded with 0 and running on ``threads`` threads (as many as JAX's cores)."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    return torch


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
    torch = import_torch(threads)
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


# --- reports ------------------------------------------------------------------------------------


def fmt(value, digits: int = 2) -> str:
    """A table cell: ``-`` for a missing value, yes/**no** for a bool, floats with ``digits`` decimals."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(head: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; every cell goes through :func:`fmt` (strings pass unchanged)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def suite_parser(doc: str, *, torch: bool = True) -> argparse.ArgumentParser:
    """The flags every suite shares; ``torch``: the suite also times PyTorch (``--no-torch``, its layout).

    A script adds its own flags, then hands the parser to :func:`start_suite`.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of every batch and 3 rounds")
    parser.add_argument("--rounds", type=int, help="timed rounds per row (default 7, --quick 3)")
    parser.add_argument("--min-sample-ms", type=float, default=20.0, help="shortest timed sample (back-to-back calls)")
    parser.add_argument("--batch-scale", type=float, help="multiply every batch size (default 1, --quick 0.25)")
    parser.add_argument("--threads", type=int, help="cores for JAX and PyTorch (default: all this process may use)")
    if torch:
        parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
        parser.add_argument(
            "--torch-channels-last",
            action=argparse.BooleanOptionalAction,
            help="PyTorch's memory format (default: channels_last on CUDA, NCHW on CPU)",
        )
    parser.add_argument("--json", help="write every figure and setting to this JSON file")
    parser.add_argument("--markdown", help="write the table to this markdown file")
    return parser


@dataclasses.dataclass(frozen=True)
class Suite:
    """One run of a benchmark suite: its flags, backend, PyTorch (``None``: skipped), timer and report.

    ``report`` holds ``machine``, ``settings`` and ``command``; :meth:`finish` adds the rows.
    """

    args: argparse.Namespace
    gpu: bool
    runtime: TorchRuntime | None
    timer: Timer
    report: dict
    header: str

    def scaled(self, batch: int) -> int:
        """``batch`` times ``--batch-scale``, at least 1."""
        return max(1, round(batch * self.args.batch_scale))

    def finish(self, name: str, title: str, rows: list[dict], table: str) -> None:
        """Print the table; write the report (``report[name] = rows``) to ``--json`` and ``--markdown``."""
        self.report[name] = rows
        print(f"\n### {title}\n{table}", flush=True)
        if self.args.json:
            write_json(self.args.json, self.report)
        if self.args.markdown:
            date = self.report["machine"]["date"]
            with open(self.args.markdown, "w") as f:
                f.write("\n\n".join([f"## cnnjax benchmark, {date}", self.header, f"### {title}", table]) + "\n")


def start_suite(
    script: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None, rounds_factor: int = 1
) -> Suite:
    """Parse the flags, pin the threads, set up JAX (and PyTorch beside it), print the run's header.

    ``--threads N`` pins the process to N cores before JAX's first backend call (its CPU client
    sizes its thread pool from that mask) and gives PyTorch as many threads. With PyTorch, JAX
    preallocates only :data:`JAX_GPU_MEMORY_FRACTION` of a GPU (unless
    ``XLA_PYTHON_CLIENT_MEM_FRACTION`` is set); on a GPU, float32 matmuls and convs use TF32. The
    timer takes ``rounds_factor`` times ``--rounds`` (default 7, ``--quick`` 3).
    """
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.batch_scale = args.batch_scale or (0.25 if args.quick else 1.0)
    command = " ".join(["python", script, *(sys.argv[1:] if argv is None else argv)])
    threads = pin_threads(args.threads)
    with_torch = not getattr(args, "no_torch", True)
    if with_torch:  # JAX would preallocate 75% of a GPU's memory, starving PyTorch
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(JAX_GPU_MEMORY_FRACTION))
    backend = jax.default_backend()
    if backend == "gpu":
        jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    runtime, settings = torch_runtime(backend, threads, args.torch_channels_last) if with_torch else (None, {})
    settings |= {"rounds": args.rounds, "min_sample_ms": args.min_sample_ms, "batch_scale": args.batch_scale}
    info = machine_info(backend, threads)
    timer = Timer(rounds_factor * args.rounds, args.min_sample_ms / 1e3)
    report = {"machine": info, "settings": settings, "command": command}
    header = _header(info, settings, command, timer.rounds)
    print(header, flush=True)
    return Suite(args, backend == "gpu", runtime, timer, report, header)


def _header(info: dict, settings: dict, command: str, rounds: int) -> str:
    torch = f", torch {settings['torch']}" if "torch" in settings else ""
    layout = f"; PyTorch layout: {settings['torch_memory_format']}" if "torch_memory_format" in settings else ""
    skipped = f" PyTorch skipped: {settings['torch_skipped']}." if "torch_skipped" in settings else ""
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} threads used), JAX backend "
        f"{info['backend']} ({info['device_kind']}); jax {info['jax']}, flax {info['flax']}, optax {info['optax']}"
        f"{torch}. XLA_FLAGS={info['xla_flags']!r}, jax_default_matmul_precision="
        f"{info['jax_default_matmul_precision']}{layout}."
        f"{skipped} Median of {rounds} round-robin rounds; ratios are cnnjax time / baseline time."
        f"\n\nCommand: `{command}`"
    )


def progress(row: dict, label: str) -> dict:
    """Print a finished row's timings (the table comes at the end); return it."""
    timings = " ".join(f"{k[:-3]}={v:.2f}" for k, v in row.items() if k.endswith("_ms") and v is not None)
    print(f"  {label}: {timings}", flush=True)
    return row
