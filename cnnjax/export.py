"""Deployment: a model as an ONNX file or as serialized StableHLO, each with a dynamic batch.

- :func:`to_onnx` writes an ONNX model through ``jax2onnx``, in ONNX's standard operators alone: the
  cnnjax primitives of convolution and pooling become ``Conv``, ``ConvTranspose``, ``MaxPool`` and
  ``AveragePool`` through the lowerings this module registers with jax2onnx's plugin mechanism
  (an NHWC layer becomes its NCHW ONNX operator between two ``Transpose`` nodes), and jax2onnx
  maps the rest (``BatchNormalization``, ``Gemm``, ``Concat``, ...). ONNX Runtime, TensorRT,
  OpenVINO and the browser's onnxruntime-web run it.
- :func:`to_stablehlo` writes a serialized ``jax.export`` artifact (StableHLO), for JAX itself
  (:func:`load_stablehlo`, in another process, without the model's code) and XLA-based runtimes.
- ``cnnjax-export`` (:func:`main`) writes either for a zoo model, with torchvision's weights or
  random ones::

    cnnjax-export --model resnet50 --weights resnet50-0676ba61.pth --format onnx --output resnet50.onnx
    cnnjax-export --model resnet50 --format onnx --output resnet50_nchw.onnx --layout NCHW
    cnnjax-export --model lenet5 --format stablehlo --output lenet5.jax

  (also ``python -m cnnjax.export``).

Both formats hold the model in eval mode (BatchNorm's running statistics, no Dropout), its
weights as constants, and a float32 input ``(N, H, W, C)`` (``layout="NCHW"``: ``(N, C, H, W)``)
whose batch ``N`` is symbolic: one file serves every batch size. The ONNX export needs the
``[export]`` extra (jax2onnx, onnx, onnxruntime), imported only when :func:`to_onnx` runs.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cnnjax import _primitives, models, nn
from cnnjax.models.torch_weights import PRETRAINED

__all__ = ["load_stablehlo", "main", "to_onnx", "to_stablehlo"]

LAYOUTS = ("NHWC", "NCHW")

# An ONNX model of at most 2 GiB is one protobuf; a larger one keeps its weights in PATH.data.
_PROTOBUF_LIMIT = 2**31 - 1


def _check_input_shape(op: str, input_shape) -> tuple[int, int, int]:
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise TypeError(f"{op}: input_shape must be a sequence (H, W, C) of ints, got {input_shape!r}")
    if len(input_shape) != 3:
        raise ValueError(
            f"{op}: input_shape must have rank 3, one image's (H, W, C) without the batch, got {tuple(input_shape)}"
        )
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in input_shape):
        raise ValueError(f"{op}: input_shape must hold positive ints, got {tuple(input_shape)}")
    return tuple(int(n) for n in input_shape)


def _check_model(op: str, model) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(f"{op}: model must be an nnx.Module, got {type(model).__name__}")


def _inference_copy(model: nnx.Module) -> nnx.Module:
    """``model`` in eval mode, its cnnjax layers on their primitives (``impl="auto"``: what the ONNX
    lowerings read), sharing the weights; ``model`` itself is left as it is."""
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    return nn.set_impl(copy, "auto")


def _batch_dim(op: str, batch):
    """The batch axis: ``"dynamic"`` (symbolic ``N``) or a positive int."""
    if batch == "dynamic":
        return "N"
    if isinstance(batch, (int, np.integer)) and not isinstance(batch, bool) and batch > 0:
        return int(batch)
    raise ValueError(f"{op}: batch must be 'dynamic' or a positive int, got {batch!r}")


# ---------------------------------------------------------------------------------------------
# ONNX: cnnjax's primitives as ONNX's own operators, registered with jax2onnx's plugin mechanism.


def _channels_first(rank: int) -> tuple[int, ...]:
    return (0, rank - 1, *range(1, rank - 1))


def _channels_last(rank: int) -> tuple[int, ...]:
    return (0, *range(2, rank), 1)


def _permuted(shape, perm) -> tuple:
    return tuple(shape[i] for i in perm)


def _node(ctx, op: str, inputs, shape, **attributes):
    """One ONNX node ``op`` of ``inputs``, its output typed as the first input and shaped ``shape``."""
    import onnx_ir as ir
    from jax2onnx.plugins._ir_shapes import _ensure_value_metadata, _stamp_type_and_shape

    value = getattr(ctx.builder, op)(*inputs, _outputs=[ctx.fresh_name(op)], **attributes)
    value.type = ir.TensorType(inputs[0].dtype)
    _stamp_type_and_shape(value, shape)
    _ensure_value_metadata(ctx, value)
    return value


def _transposed(ctx, value, perm, shape):
    """``value`` transposed by ``perm``: a constant (a layer's weights) as a transposed initializer,
    anything else through a ``Transpose`` node."""
    if value.const_value is not None:
        array = np.transpose(value.const_value.numpy(), perm)
        return ctx.builder.add_initializer_from_array(ctx.fresh_name("kernel"), array)
    return _node(ctx, "Transpose", [value], _permuted(shape, perm), perm=perm)


def _pads(pairs) -> list[int]:
    """``(lo, hi)`` per spatial dim -> ONNX's ``pads``: every begin, then every end."""
    return [lo for lo, _ in pairs] + [hi for _, hi in pairs]


def _lower_channels_first(ctx, eqn, op: str, *, negate: bool = False, scale: float | None = None, **attributes):
    """``eqn`` (a cnnjax primitive of ``x`` and maybe a kernel) as ONNX's channels-first ``op``.

    A channels-last ``x`` is transposed to ``(N, C, *spatial)`` and the result back; an HWIO kernel
    to OIHW (also ONNX's ``ConvTranspose`` weight layout: a transposed conv's weight is its
    forward conv's). ``negate``: ``-op(-x)`` (min pooling); ``scale``: ``op(x) * scale``."""
    layout = eqn.params["geometry"].layout
    x_var, *kernel_var = eqn.invars
    (y_var,) = eqn.outvars
    rank = len(x_var.aval.shape)
    to_first = _channels_first(rank) if layout.channels_last else tuple(range(rank))
    x_first, y_first = _permuted(x_var.aval.shape, to_first), _permuted(y_var.aval.shape, to_first)
    x = ctx.get_value_for_var(x_var, name_hint=ctx.fresh_name("x"))
    if layout.channels_last:
        x = _node(ctx, "Transpose", [x], x_first, perm=to_first)
    if negate:
        x = _node(ctx, "Neg", [x], x_first)
    inputs = [x]
    for k_var in kernel_var:
        kernel = ctx.get_value_for_var(k_var, name_hint=ctx.fresh_name("kernel"))
        if layout.channels_last:
            kernel = _transposed(ctx, kernel, (rank - 1, rank - 2, *range(rank - 2)), k_var.aval.shape)
        inputs.append(kernel)
    y = _node(ctx, op, inputs, y_first, **attributes)
    if scale is not None:
        factor = ctx.builder.add_initializer_from_scalar(ctx.fresh_name("scale"), np.asarray(scale, x_var.aval.dtype))
        y = _node(ctx, "Mul", [y, factor], y_first)
    if negate:
        y = _node(ctx, "Neg", [y], y_first)
    if layout.channels_last:
        y = _node(ctx, "Transpose", [y], y_var.aval.shape, perm=_channels_last(rank))
    ctx.bind_value_for_var(y_var, y)


def _lower_conv(ctx, eqn):
    g = eqn.params["geometry"]
    if any(lo < 0 or hi < 0 for lo, hi in g.padding):
        raise NotImplementedError(f"to_onnx: a conv with negative padding {g.padding} has no ONNX Conv")
    _lower_channels_first(
        ctx,
        eqn,
        "Conv",
        kernel_shape=g.window,
        strides=g.strides,
        pads=_pads(g.padding),
        dilations=g.dilation,
        group=g.groups,
    )


def _lower_conv_transpose(ctx, eqn):
    """The conv input gradient (a transposed conv) as ``ConvTranspose``, which is the adjoint of
    ``Conv`` with the same weight: output ``(o-1)*s + d*(k-1) + 1 - lo - hi + output_padding``
    long. A negative forward ``hi`` (which crops there) becomes zeros appended through
    ``output_padding``, which no window of the forward conv reads."""
    g = eqn.params["geometry"]
    pairs = tuple((lo, max(hi, 0)) for lo, hi in g.padding)
    output_padding = tuple(
        n - ((o - 1) * s + d * (k - 1) + 1 - lo - hi)
        for n, o, k, s, d, (lo, hi) in zip(
            g.input_spatial, g.output_spatial, g.window, g.strides, g.dilation, pairs, strict=True
        )
    )
    _lower_channels_first(
        ctx,
        eqn,
        "ConvTranspose",
        kernel_shape=g.window,
        strides=g.strides,
        pads=_pads(pairs),
        dilations=g.dilation,
        group=g.groups,
        output_padding=output_padding,
    )


def _pool_attributes(g) -> dict:
    """``kernel_shape``, ``strides``, ``pads`` (``reduce_padding``: exactly ``g.out`` windows, so
    no ``ceil_mode``) and, where not all 1, ``dilations``."""
    attributes = {"kernel_shape": g.window, "strides": g.strides, "pads": _pads(g.reduce_padding)}
    if any(d != 1 for d in g.dilation):
        attributes["dilations"] = g.dilation
    return attributes


def _lower_window_max(ctx, eqn):
    """``MaxPool``, whose padding never wins, as cnnjax's (docs/pooling.md); min pooling as ``-MaxPool(-x)``."""
    g = eqn.params["geometry"]
    _lower_channels_first(ctx, eqn, "MaxPool", negate=eqn.params["select"] == "min", **_pool_attributes(g))


def _lower_window_sum(ctx, eqn):
    """Window sums over zero padding: ``AveragePool`` counting the padding, times the window size."""
    g = eqn.params["geometry"]
    _lower_channels_first(
        ctx, eqn, "AveragePool", scale=math.prod(g.window), count_include_pad=1, **_pool_attributes(g)
    )


# Each forward primitive a model's inference binds, and its ONNX lowering.
_ONNX_LOWERINGS: dict = {
    _primitives.conv_p: (_lower_conv, "Conv"),
    _primitives.conv_input_grad_p: (_lower_conv_transpose, "ConvTranspose"),
    _primitives.window_max_p: (_lower_window_max, "MaxPool"),
    _primitives.window_sum_p: (_lower_window_sum, "AveragePool"),
}


@functools.cache
def _register_onnx_lowerings() -> None:
    """Register :data:`_ONNX_LOWERINGS` as jax2onnx primitive plugins (once)."""
    from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive

    for primitive, (lower, onnx_op) in _ONNX_LOWERINGS.items():
        plugin = type(
            f"{primitive.name}_plugin", (PrimitiveLeafPlugin,), {"lower": lambda self, ctx, eqn, f=lower: f(ctx, eqn)}
        )
        register_primitive(
            jaxpr_primitive=primitive.name,
            onnx=[{"component": onnx_op, "doc": f"https://onnx.ai/onnx/operators/onnx__{onnx_op}.html"}],
            context="primitives.cnnjax",
            component=primitive.name,
        )(plugin)


def to_onnx(
    model: nnx.Module,
    input_shape: Sequence[int],
    path,
    *,
    layout: str = "NHWC",
    batch="dynamic",
    opset: int | None = None,
) -> Path:
    """Write ``model`` in eval mode as an ONNX file at ``path``; returns the path.

    The graph takes one float32 input ``x`` and returns the model's output (logits), with its
    weights as initializers, in ONNX's standard operators alone (the cnnjax layers as ``Conv``,
    ``ConvTranspose``, ``MaxPool``, ``AveragePool``; BatchNorm as ``BatchNormalization`` with the
    running statistics; Dropout as nothing). ``model`` is any ``nnx.Module`` called as
    ``model(x)`` on NHWC images (every zoo model); it is exported as ``model.eval()`` would run it,
    whatever its mode, and is not changed. A file up to 2 GiB is self-contained; a larger model's
    weights go to ``path`` + ``".data"`` beside it (ONNX's external data).

    Args:
      model: the module, called as ``model(x)``.
      input_shape: one image's shape as the model takes it, ``(H, W, C)`` (also with
        ``layout="NCHW"``), without the batch.
      path: the ``.onnx`` file to write (its folder is created).
      layout: ``"NHWC"`` (the model's own) or ``"NCHW"``, PyTorch's: the graph's input is then
        ``(N, C, H, W)``, transposed to NHWC inside the graph.
      batch: ``"dynamic"`` (a symbolic batch ``N``, any size at run time) or a fixed int.
      opset: the ONNX opset; ``None``: jax2onnx's default.

    Returns:
      ``path`` as a ``Path``. The graph maps ``(N, H, W, C)`` (or ``(N, C, H, W)``) to the
      model's ``(N, num_classes)``.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module``, or ``input_shape`` is not a sequence.
      ValueError: a bad ``input_shape``, ``layout`` or ``batch``.
      NotImplementedError: the model uses an op with no ONNX lowering (jax2onnx's message).
    """
    op = "to_onnx"
    _check_model(op, model)
    height, width, channels = _check_input_shape(op, input_shape)
    if layout not in LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {LAYOUTS}, got {layout!r}")
    n = _batch_dim(op, batch)
    if opset is not None and not (isinstance(opset, int) and not isinstance(opset, bool) and opset > 0):
        raise ValueError(f"{op}: opset must be None or a positive int, got {opset!r}")
    import jax2onnx
    import onnx

    _register_onnx_lowerings()
    inference = _inference_copy(model)
    proto = jax2onnx.to_onnx(
        lambda x: inference(x),
        [(n, height, width, channels)],
        model_name=type(model).__name__,
        inputs_as_nchw=[0] if layout == "NCHW" else None,
        input_names=["x"],
        output_names=["logits"],
        **({} if opset is None else {"opset": opset}),
    )
    # jax2onnx's transpose folding can leave an intermediate value's NHWC shape annotation on
    # what became NCHW data, which ONNX Runtime's shape inference rejects: runtimes infer them.
    del proto.graph.value_info[:]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = proto.ByteSize() > _PROTOBUF_LIMIT
    onnx.save_model(proto, path, save_as_external_data=external, location=f"{path.name}.data")
    return path


# ---------------------------------------------------------------------------------------------
# StableHLO: a serialized jax.export artifact.


def to_stablehlo(
    model: nnx.Module, input_shape: Sequence[int], path, *, platforms: Sequence[str] | None = None
) -> Path:
    """Write ``model`` in eval mode as a serialized ``jax.export`` artifact at ``path``; returns the path.

    The artifact is the StableHLO of ``model(x)`` for a float32 ``x: (N, H, W, C)`` with a
    symbolic batch ``N`` (``jax.export.symbolic_shape``) and the weights as constants, each cnnjax
    primitive lowered as on that platform (on CPU: cnnjax's CPU schedules; elsewhere: lax's
    program). :func:`load_stablehlo` reads it back as a function, in any process, without
    ``model``'s code. ``model`` is exported as ``model.eval()`` runs it, and is not changed.

    Args:
      model: the module, called as ``model(x)`` on NHWC images.
      input_shape: one image's shape, ``(H, W, C)``, without the batch.
      path: the file to write (its folder is created).
      platforms: the platforms the artifact runs on (``jax.export``'s: ``("cpu", "cuda", "tpu")``,
        ...); ``None``: the one JAX runs on now.

    Returns:
      ``path`` as a ``Path``.

    >>> import tempfile, jax.numpy as jnp
    >>> from cnnjax.models import LeNet5
    >>> model = LeNet5(rngs=nnx.Rngs(0))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     logits = load_stablehlo(to_stablehlo(model, (28, 28, 1), f"{tmp}/lenet.jax"))(jnp.ones((3, 28, 28, 1)))
    >>> logits.shape, bool(jnp.allclose(logits, model(jnp.ones((3, 28, 28, 1)), train=False), atol=1e-6))
    ((3, 10), True)
    """
    op = "to_stablehlo"
    _check_model(op, model)
    input_shape = _check_input_shape(op, input_shape)
    inference = _inference_copy(model)
    graphdef, state = nnx.split(inference)

    @jax.jit
    def forward(x):
        return nnx.merge(graphdef, state)(x)

    (n,) = jax.export.symbolic_shape("N")
    exported = jax.export.export(forward, platforms=platforms)(jax.ShapeDtypeStruct((n, *input_shape), jnp.float32))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(exported.serialize())
    return path


def load_stablehlo(path) -> Callable:
    """The function a :func:`to_stablehlo` artifact holds: ``x: (N, H, W, C)`` -> the model's output.

    Calls the deserialized ``jax.export.Exported`` (``.call``), so the result composes with
    ``jax.jit`` and ``vmap``; its ``.exported`` attribute is the artifact itself (shapes,
    platforms). Raises ``ValueError`` naming the file if it is missing or not such an artifact.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"load_stablehlo: {path}: no such file") from None
    except OSError as err:
        raise ValueError(f"load_stablehlo: {path}: cannot be read ({err})") from None
    try:
        exported = jax.export.deserialize(bytearray(data))
    except Exception as err:  # flatbuffers' and jax's errors for a corrupt artifact vary
        raise ValueError(f"load_stablehlo: {path}: not a serialized jax.export artifact ({err})") from None

    @functools.wraps(exported.call)
    def call(x):
        return exported.call(x)

    call.exported = exported
    return call


# ---------------------------------------------------------------------------------------------
# cnnjax-export: a zoo model, with torchvision's weights or random ones, in either format.

# --model names: the zoo's presets, torchvision's names where it has the model (1000 classes, 224x224 RGB), each a
# (constructor, input_shape); torchvision's as cnnjax-predict builds them (torch_weights.PRETRAINED).
MODELS: dict[str, tuple[Callable[..., nnx.Module], tuple[int, int, int]]] = {
    "lenet5": (functools.partial(models.LeNet5, num_classes=10), (28, 28, 1)),
    "nin": (functools.partial(models.NiN, num_classes=1000), (224, 224, 3)),
    "mobilenet_v1": (functools.partial(models.MobileNetV1, num_classes=1000), (224, 224, 3)),
    **{name: (constructor, (224, 224, 3)) for name, constructor in PRETRAINED.items()},
}


class _Parser(argparse.ArgumentParser):
    """``argparse`` with one-line errors: ``prog: error: message (see --help)``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """``cnnjax-export``'s arguments: ``--model``, ``--weights``, ``--format``, ``--output``, ``--layout``."""
    parser = _Parser(prog="cnnjax-export", description="Write a zoo model as an ONNX file or serialized StableHLO.")
    parser.add_argument("--model", required=True, choices=sorted(MODELS), help="the zoo model (torchvision's names)")
    parser.add_argument(
        "--weights", help="torchvision weights: a .pth/.pt (torch.save) or .safetensors file (default: random, seed 0)"
    )
    parser.add_argument("--format", required=True, choices=("onnx", "stablehlo"), help="what to write")
    parser.add_argument("--output", required=True, metavar="PATH", help="the file to write")
    parser.add_argument(
        "--layout", choices=LAYOUTS, default="NHWC", help="the ONNX graph's input layout (default: %(default)s)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``cnnjax-export``: write the model; exit status 0, 1 on bad input (weights), 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format == "stablehlo" and args.layout != "NHWC":
        parser.error("--layout applies to --format onnx only (StableHLO takes the model's NHWC input)")
    constructor, input_shape = MODELS[args.model]
    try:
        if args.weights is None:
            model = constructor(rngs=nnx.Rngs(0))
        else:
            model = models.load_torch_weights(nnx.eval_shape(lambda: constructor(rngs=nnx.Rngs(0))), args.weights)
        if args.format == "onnx":
            path = to_onnx(model, input_shape, args.output, layout=args.layout)
        else:
            path = to_stablehlo(model, input_shape, args.output)
    except (ValueError, OSError) as err:
        print(f"cnnjax-export: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
