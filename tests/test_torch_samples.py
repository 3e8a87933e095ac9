"""cnnjax against PyTorch's own sample inputs: the ``op_db`` and ``module_db`` of ``torch.testing._internal``.

Not hand-picked cases: the float64 samples PyTorch's OpInfo suite draws (a spread by default, all of
them on request: below) for ``conv1d/2d/3d``,
``conv_transpose1d/2d/3d``, ``max_pool1d/2d/3d`` (with ``return_indices``, and the
``max_pool2d_with_indices_backward`` samples), ``max_unpool1d/2d/3d`` (and their ``grad``
variants), ``avg_pool1d/2d/3d``, ``adaptive_avg/max_pool1d/2d/3d``, and ``module_db``'s
``nn.LPPool1d/2d/3d``, is mapped to the cnnjax call in the channels-first layout of its rank
(``"NCW"``, ``"NCHW"``, ``"NCDHW"``, named so that unbatched samples are read as PyTorch reads
them) and compared at 1e-9: values, indices, and the gradients of every float input (PyTorch's
autograd against ``jax.vjp`` at the same cotangent). PyTorch's error samples for the same ops
must raise ``ValueError`` or ``TypeError`` in cnnjax. A sample that cannot pass is skipped only
for a reason in ``DIFFERENCES``, each a deliberate difference listed in the README's Conventions.

Time budget (aim: well under a minute on 2 cores). The max-pool and max-unpool families hold
about 5,000 samples, most of them one geometry in another dtype, memory format or
``requires_grad`` setting, and every new geometry costs cnnjax a compile. So by default each op
keeps, of its samples with distinct geometry (input shape and every argument), ``PER_OP`` = 1
from the middle of the list plus its first unbatched one: about 60 calls. For the max-pool
families the geometries are spread out before any tensor is made (PyTorch's own parameter
generator, ``_TestParamsMaxPool{1,2,3}d``, which ``sample_inputs_max_pool`` turns into samples;
the unpool samples are PyTorch's, built from those), and ``max_pool2d_with_indices_backward``,
whose samples are ``max_pool2d``'s (gradients checked there), is left out. With
``CNNJAX_ALL_TORCH_SAMPLES=1`` every distinct geometry of every op runs, the backward op too (a
few minutes). Importing PyTorch's sample database takes several seconds, once per worker.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import unittest.mock

import jax
import numpy as np
import pytest
from jax import numpy as jnp

from cnnjax.convolution import conv, conv_transpose
from cnnjax.pooling import (
    adaptive_avg_pool,
    adaptive_max_pool,
    adaptive_max_pool_with_indices,
    avg_pool,
    lp_pool,
    max_pool,
    max_pool_with_indices,
    max_unpool,
)

pytestmark = pytest.mark.slow  # PyTorch's own samples, hundreds of geometries: the whole-suite run
torch = pytest.importorskip("torch", reason="PyTorch's sample inputs are the reference")

ALL = os.environ.get("CNNJAX_ALL_TORCH_SAMPLES", "") not in ("", "0")
PER_OP = 1
TOL = 1e-9
LAYOUTS = {1: "NCW", 2: "NCHW", 3: "NCDHW"}

# Why a sample may be skipped: each is a deliberate difference from PyTorch (README, Conventions).
DIFFERENCES = {
    "promotion": "cnnjax promotes an integer input against a float kernel as jnp does (PyTorch requires one dtype)",
    "bias_cast": "cnnjax casts a bias to the dtype of x and kernel within its kind (PyTorch requires one dtype)",
    "same_strided": "cnnjax takes padding='same' with strides > 1 (TensorFlow's and Flax's SAME; PyTorch refuses it)",
    "zero_channels": "cnnjax takes zero channels, giving an empty result as a batch of 0 does (PyTorch refuses "
    "an empty dim other than the batch)",
    "pool_padding": "pools take padding beyond half the window while every window holds an input element "
    "(PyTorch caps padding at half the effective window)",
}


# --- the ops, by PyTorch name: (spatial rank, PyTorch's parameter names, cnnjax call) -----------


def _stride(stride):
    """PyTorch's pool ``stride``: ``None`` or an empty list mean the window."""
    return None if stride is None or (isinstance(stride, list | tuple) and not stride) else stride


def _conv(rank, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if isinstance(padding, str):
        padding = padding.upper()
    return conv(
        x,
        weight,
        bias,
        strides=stride,
        padding=padding,
        kernel_dilation=dilation,
        feature_group_count=groups,
        layout=LAYOUTS[rank],
    )


def _conv_transpose(rank, x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return conv_transpose(
        x,
        weight,
        bias,
        strides=stride,
        padding=padding,
        output_padding=output_padding,
        kernel_dilation=dilation,
        feature_group_count=groups,
        layout=LAYOUTS[rank],
    )


def _max_pool(rank, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    pool = max_pool_with_indices if return_indices else max_pool
    return pool(
        x,
        kernel_size,
        _stride(stride),
        padding,
        window_dilation=dilation,
        ceil_mode=ceil_mode,
        layout=LAYOUTS[rank],
    )


def _avg_pool(
    rank, x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    return avg_pool(
        x,
        kernel_size,
        _stride(stride),
        padding,
        ceil_mode=ceil_mode,
        count_include_pad=count_include_pad,
        divisor_override=divisor_override,
        layout=LAYOUTS[rank],
    )


def _max_unpool(rank, x, indices, kernel_size, stride=None, padding=0, output_size=None):
    if output_size is None:  # PyTorch's default: the size a max_pool of this geometry came from
        k, s, p = (
            np.broadcast_to(np.asarray(v), (rank,)) for v in (kernel_size, _stride(stride) or kernel_size, padding)
        )
        output_size = [(n - 1) * si - 2 * pi + ki for n, ki, si, pi in zip(x.shape[-rank:], k, s, p, strict=True)]
    elif len(output_size) > rank:  # PyTorch also takes the whole shape, batch and channels too
        output_size = list(output_size)[-rank:]
    return max_unpool(x, indices, tuple(int(o) for o in output_size), layout=LAYOUTS[rank])


def _adaptive_avg(rank, x, output_size):
    return adaptive_avg_pool(x, output_size, layout=LAYOUTS[rank])


def _adaptive_max(rank, x, output_size, return_indices=False):
    pool = adaptive_max_pool_with_indices if return_indices else adaptive_max_pool
    return pool(x, output_size, layout=LAYOUTS[rank])


def _lp_pool(rank, x, norm_type, kernel_size, stride=None, ceil_mode=False):
    return lp_pool(x, norm_type, kernel_size, stride, ceil_mode=ceil_mode, layout=LAYOUTS[rank])


OPS = {}
for _r in (1, 2, 3):
    OPS[f"nn.functional.conv{_r}d"] = functools.partial(_conv, _r)
    OPS[f"nn.functional.conv_transpose{_r}d"] = functools.partial(_conv_transpose, _r)
    OPS[f"nn.functional.max_pool{_r}d"] = functools.partial(_max_pool, _r)
    OPS[f"nn.functional.avg_pool{_r}d"] = functools.partial(_avg_pool, _r)
    OPS[f"nn.functional.max_unpool{_r}d"] = functools.partial(_max_unpool, _r)
    OPS[f"nn.functional.max_unpool{_r}d.grad"] = functools.partial(_max_unpool, _r)
    OPS[f"nn.functional.adaptive_avg_pool{_r}d"] = functools.partial(_adaptive_avg, _r)
    OPS[f"nn.functional.adaptive_max_pool{_r}d"] = functools.partial(_adaptive_max, _r)
    OPS[f"nn.LPPool{_r}d"] = functools.partial(_lp_pool, _r)
OPS["max_pool2d_with_indices_backward"] = OPS["nn.functional.max_pool2d"]
# Its samples are max_pool2d's (whose gradients are checked against autograd), so by default it
# is left out; CNNJAX_ALL_TORCH_SAMPLES=1 runs it too.
SAMPLE_OPS = sorted(n for n in OPS if ALL or n != "max_pool2d_with_indices_backward")


# --- PyTorch's samples as plain (input, args, kwargs) ---------------------------------------


@functools.cache
def _databases():
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import module_db

    ops = {o.name + (f".{o.variant_test_name}" if o.variant_test_name else ""): o for o in op_db}
    modules = {m.name: m for m in module_db}
    return ops, modules


def _key(value):
    """A hashable, dtype-free description of a sample argument (its geometry)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape))
    if isinstance(value, list | tuple):
        return tuple(_key(v) for v in value)
    return value


def _spread(items: list, count: int) -> list:
    """``count`` of ``items`` evenly spaced: for one, the middle one; else the first, the last and between."""
    if len(items) <= count:
        return items
    if count == 1:
        return [items[len(items) // 2]]
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, count).round().astype(int).tolist()))]


def _thin(samples: list) -> list:
    """Distinct geometries only and, unless ``ALL``, ``PER_OP`` of them evenly spaced plus the
    first unbatched one, when the op has any."""
    distinct = list({_key((s[0], s[1], sorted(s[2].items()))): s for s in samples}.values())
    if ALL:
        return distinct
    full_rank = max(s[0].ndim for s in distinct)
    kept = _spread(distinct, PER_OP)
    unbatched = [s for s in distinct if s[0].ndim < full_rank][:1]
    return kept + [s for s in unbatched if all(s is not k for k in kept)]


def _max_pool_params(name: str, for_unpool: bool) -> list:
    """The geometries of ``sample_inputs_max_pool`` (PyTorch's own parameter generator, which that
    function turns into samples one tensor each), spread out before any tensor is made: making
    all of them is most of the cost of these families. ``for_unpool``: only those that
    ``sample_inputs_max_unpool`` keeps (batched, no dilation, with indices)."""
    from torch.testing._internal import common_methods_invocations as cmi

    rank = _rank(name)
    params = list(getattr(cmi, f"_TestParamsMaxPool{rank}d")().gen_input_params())
    params = list({_key((shape, sorted(kwargs.items()))): (shape, kwargs) for (shape, _), kwargs in params}.values())
    if for_unpool:
        params = [(s, k) for s, k in params if len(s) == rank + 2 and k["dilation"] == 1 and k["return_indices"]]
    unbatched = [p for p in params if len(p[0]) == rank + 1][:1]
    return _spread(params, 12 * PER_OP if for_unpool else PER_OP) + unbatched


def _max_pool_samples(op_info, device, dtype, requires_grad, for_unpool: bool = False, **kwargs):
    """``sample_inputs_max_pool`` over the spread geometries only (:func:`_max_pool_params`)."""
    from torch.testing._internal.common_methods_invocations import SampleInput, make_tensor

    for shape, params in _max_pool_params(op_info.name, for_unpool):
        yield SampleInput(make_tensor(shape, device=device, dtype=dtype, requires_grad=requires_grad), kwargs=params)


_MAX_POOLS = {f"nn.functional.max_pool{r}d" for r in (1, 2, 3)}


@functools.cache
def _samples(name: str) -> list:
    """``name``'s float64 samples as ``(input, args, kwargs)``, thinned (:func:`_thin`)."""
    from torch.testing._internal import common_methods_invocations as cmi

    ops, modules = _databases()
    if name in modules:
        module = modules[name]
        inputs = module.module_inputs_func(module, device="cpu", dtype=torch.float64, requires_grad=True, training=True)
        samples = [
            (i.forward_input.args[0], tuple(i.constructor_input.args), dict(i.constructor_input.kwargs)) for i in inputs
        ]
    else:
        op, sampler = ops[name], ops[name].sample_inputs
        if not ALL and name in _MAX_POOLS:  # by default over spread geometries (_max_pool_params)
            sampler = functools.partial(_max_pool_samples, op)
        patch = contextlib.nullcontext()
        if not ALL and "max_unpool" in name:  # PyTorch's unpool samples come from sample_inputs_max_pool
            patch = unittest.mock.patch.object(
                cmi, "sample_inputs_max_pool", functools.partial(_max_pool_samples, for_unpool=True)
            )
        with patch:
            samples = [
                (s.input, tuple(s.args), dict(s.kwargs)) for s in sampler("cpu", torch.float64, requires_grad=True)
            ]
    return _thin(samples)


def _torch_call(name: str, x, args, kwargs):
    ops, modules = _databases()
    if name in modules:
        return modules[name].module_cls(*args, **kwargs).double()(x)
    op = ops[name]
    if name == "max_pool2d_with_indices_backward":
        # its OpInfo calls the backward directly; max_pool2d's autograd computes the same thing
        return torch.nn.functional.max_pool2d(x, *args, **kwargs)
    return op.op(x, *args, **kwargs)


def _to_jax(value):
    if isinstance(value, torch.Tensor):
        return jnp.asarray(value.detach().numpy())
    if isinstance(value, list | tuple) and not isinstance(value, torch.Size):
        return type(value)(_to_jax(v) for v in value)
    return value


def _bind(name: str, x, args, kwargs) -> dict:
    """PyTorch's positional and keyword arguments by cnnjax-call parameter name."""
    ours = OPS[name]
    params = list(inspect.signature(ours.func).parameters)[2:]  # past (rank, x)
    bound = dict(zip(params, args, strict=False))
    bound.update(kwargs)
    for k in ("kernel_size", "stride", "padding", "dilation"):
        if isinstance(bound.get(k), list | tuple) and len(bound[k]) == 1:
            bound[k] = bound[k][0]  # PyTorch's one-entry tuple is cnnjax's int: every spatial dim
    return bound


def _outputs(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def _check_sample(name: str, x, args, kwargs):
    """Values, indices and gradients of one sample, PyTorch against cnnjax, at ``TOL``: cnnjax's
    outputs and its VJP at random cotangents in one jitted program (one compile per sample)."""
    expected = _outputs(_torch_call(name, x, args, kwargs))
    bound = _bind(name, x, args, kwargs)
    # The differentiable inputs: x and every float tensor argument (weight, bias).
    tensors = {"x": x} | {k: v for k, v in bound.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    static = {k: _to_jax(v) for k, v in bound.items() if k not in tensors}
    rng = np.random.default_rng(0)
    cotangents = [rng.standard_normal(e.shape) if e.is_floating_point() else None for e in expected]

    def pairing(arrays, cts):
        outputs = _outputs(OPS[name](**arrays, **static))
        return sum(jnp.vdot(o, c) for o, c in zip(outputs, cts, strict=True) if c is not None), outputs

    arrays = {k: _to_jax(v) for k, v in tensors.items()}
    (_, actual), grads = jax.jit(jax.value_and_grad(pairing, has_aux=True))(arrays, cotangents)
    assert len(actual) == len(expected), name
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == tuple(e.shape), (name, a.shape, tuple(e.shape))
        np.testing.assert_allclose(np.asarray(a), e.detach().numpy(), rtol=TOL, atol=TOL, err_msg=f"{name} values")
    wanted = [k for k, v in tensors.items() if v.requires_grad]
    if not wanted or not expected[0].requires_grad:
        return
    torch_grads = torch.autograd.grad(
        [e for e in expected if e.is_floating_point()],
        [tensors[k] for k in wanted],
        [torch.from_numpy(c) for c in cotangents if c is not None],
        allow_unused=True,
    )
    for k, g in zip(wanted, torch_grads, strict=True):
        reference = np.zeros(tensors[k].shape) if g is None else g.numpy()
        np.testing.assert_allclose(np.asarray(grads[k]), reference, rtol=TOL, atol=TOL, err_msg=f"{name} d{k}")


@pytest.mark.parametrize("name", SAMPLE_OPS)
def test_pytorch_samples(name):
    """Every kept sample of ``name`` (module docstring) matches PyTorch at 1e-9."""
    with jax.enable_x64(True):
        for x, args, kwargs in _samples(name):
            _check_sample(name, x, args, kwargs)


# --- error samples ------------------------------------------------------------------------


def _rank(name: str) -> int:
    return int(re.search(r"(\d)d", name).group(1))


def _difference(name: str, x, bound: dict) -> str | None:
    """The ``DIFFERENCES`` key under which cnnjax deliberately accepts this error sample, if any."""
    weight, bias = bound.get("weight"), bound.get("bias")
    if isinstance(weight, torch.Tensor) and x.dtype != weight.dtype:
        return "promotion"
    if isinstance(bias, torch.Tensor) and bias.dtype != x.dtype:
        return "bias_cast"
    if bound.get("padding") == "same" and np.any(np.asarray(bound.get("stride", 1)) > 1):
        return "same_strided"
    if x.ndim == _rank(name) + 1 and x.shape[0] == 0 and x.numel() == 0:
        return "zero_channels"
    if "pool" in name and isinstance(bound.get("padding"), int | tuple):
        rank = _rank(name)
        k, d, p = (
            np.broadcast_to(bound.get(a, default), (rank,))
            for a, default in (("kernel_size", 1), ("dilation", 1), ("padding", 0))
        )
        if np.all(p >= 0) and np.any(p > ((k - 1) * d + 1) // 2):
            return "pool_padding"
    return None


@functools.cache
def _error_samples(name: str) -> list:
    ops, _ = _databases()
    op = ops.get(name)
    if op is None or op.error_inputs_func is None:
        return []
    return [
        (e.sample_input.input, tuple(e.sample_input.args), dict(e.sample_input.kwargs)) for e in op.error_inputs("cpu")
    ]


ERROR_OPS = [n for n in SAMPLE_OPS if not n.startswith("nn.LPPool") and n != "max_pool2d_with_indices_backward"]


@pytest.mark.parametrize("name", ERROR_OPS)
def test_pytorch_error_samples(name):
    """Each of PyTorch's error samples raises ``ValueError`` or ``TypeError`` in cnnjax, unless it
    falls under one of ``DIFFERENCES`` (accepted on purpose; tests elsewhere check what it gives)."""
    with jax.enable_x64(True):
        for x, args, kwargs in _error_samples(name):
            bound = _bind(name, x, args, kwargs)
            if _difference(name, x, bound) is not None:
                continue  # accepted on purpose (DIFFERENCES)
            with pytest.raises((ValueError, TypeError)):
                OPS[name](_to_jax(x), **{k: _to_jax(v) for k, v in bound.items()})
