"""Read weight files as NumPy arrays without PyTorch: ``torch.save`` zip archives and ``.safetensors``.

A ``torch.save`` file (PyTorch >= 1.6, the format torchvision publishes) is a zip archive holding
``<name>/data.pkl``, a pickle of the state dict whose tensors point at raw storages
``<name>/data/<key>``, plus ``<name>/byteorder`` (absent: little-endian). A pickle can run any
callable it names, so :class:`_Unpickler` resolves only an allow-list of the globals PyTorch's
format uses, each mapped to a builder of ours: ``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2`` (a strided view of a storage: offset, shape and strides are
checked against the storage's length, then copied), ``torch._utils._rebuild_parameter`` and the
typed storages ``torch.FloatStorage``, ``HalfStorage``, ``BFloat16Storage``, ... Any other
global (``os.system``, ``builtins.eval``, ...) stops the read before it is called. Older
(pre-1.6) non-zip ``torch.save`` files are not read.
"""

from __future__ import annotations

import collections
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping

import ml_dtypes  # registers bfloat16 with NumPy, for torch's and safetensors' bfloat16 tensors
import numpy as np
import safetensors.numpy

# The element type of each storage class PyTorch's pickles name (torch.<Name>Storage).
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

# First bytes of a legacy (pre-1.6) torch.save file: pickle protocol 2, then its magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


class _StorageType:
    """What ``torch.<Name>Storage`` resolves to: only its element type."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


class _Storage:
    """A storage's elements, a read-only 1-D array."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    """``torch._utils._rebuild_tensor_v2``: the ``size`` view of ``storage`` at ``storage_offset`` with
    ``stride`` (in elements), copied; ``requires_grad``, hooks and metadata are ignored."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor's storage is {type(storage).__name__}, not a storage record")
    if not (
        _is_int(storage_offset)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(_is_int(n) and n >= 0 for n in (storage_offset, *size, *stride))
    ):
        raise pickle.UnpicklingError(
            f"bad tensor geometry: offset {storage_offset!r}, size {size!r}, stride {stride!r}"
        )
    array = storage.array
    if 0 in size:
        return np.zeros(size, array.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= array.size:
        raise pickle.UnpicklingError(
            f"a tensor of size {size}, stride {stride} at offset {storage_offset} overruns its storage "
            f"of {array.size} elements"
        )
    strides = tuple(s * array.itemsize for s in stride)
    view = np.lib.stride_tricks.as_strided(array[storage_offset:], size, strides, writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad, backward_hooks, *_):
    """``torch._utils._rebuild_parameter``: a ``Parameter`` is its tensor here."""
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of ``archive``, building tensors as NumPy arrays and nothing else."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder = archive, prefix, byteorder
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _GLOBALS:
            return _GLOBALS[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(
            f"refused to load the global {module}.{name}: a state dict of tensors needs only "
            f"{sorted('.'.join(g) for g in _GLOBALS)} and torch's storage types"
        )

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and _is_int(pid[4])
            and pid[4] >= 0
        ):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        _, storage_type, key, _, numel = pid
        if key not in self.storages:
            name = f"{self.prefix}data/{key}"
            try:
                data = self.archive.read(name)
            except KeyError:
                raise pickle.UnpicklingError(f"storage {name} is missing from the archive") from None
            dtype = storage_type.dtype
            if len(data) < numel * dtype.itemsize:
                raise pickle.UnpicklingError(
                    f"storage {name} has {len(data)} bytes, {numel} {dtype.name} elements need {numel * dtype.itemsize}"
                )
            array = np.frombuffer(data, dtype, count=numel)
            if self.byteorder != sys.byteorder:  # swap through unsigned ints: bfloat16 has no byte order of its own
                array = array.view(f"u{dtype.itemsize}").byteswap().view(dtype)
            self.storages[key] = _Storage(array)
        storage = self.storages[key]
        if storage.array.dtype != storage_type.dtype:
            raise pickle.UnpicklingError(f"storage {key} is read as two element types")
        return storage


def _read_torch_zip(path: str) -> object:
    """The object ``torch.save`` wrote to ``path``, with tensors as NumPy arrays."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as file:
            head = file.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            raise ValueError(
                "a torch.save file in PyTorch's legacy (pre-1.6) format, which is not read: "
                "save it again with a current PyTorch (torch.save(torch.load(f), f))"
            )
        raise ValueError("not a torch.save zip archive (nor a .safetensors file, which needs that extension)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(pickles) != 1:
            raise ValueError(f"a torch.save archive holds one <name>/data.pkl, this one has {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        names = set(archive.namelist())
        byteorder = archive.read(f"{prefix}byteorder").decode() if f"{prefix}byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise ValueError(f"unknown byteorder record {byteorder!r:.40}")
        with archive.open(pickles[0]) as file:
            return _Unpickler(file, archive, prefix, byteorder).load()


def _is_weight(value) -> bool:
    """A numeric NumPy array (the only arrays the readers build; never an object array)."""
    return isinstance(value, np.ndarray) and (value.dtype.kind in "biuf" or value.dtype == ml_dtypes.bfloat16)


def read_file(path) -> dict[str, np.ndarray]:
    """The named arrays of a ``torch.save`` file or (by its extension) a ``.safetensors`` file.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and the
    problem for anything else: a corrupt or truncated file, a pickle that names a global outside
    the allow-list (nothing it names is ever called), or contents that are not a flat mapping
    of names to tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} not found")
    try:
        if path.endswith(".safetensors"):
            contents = safetensors.numpy.load_file(path)
        else:
            contents = _read_torch_zip(path)
    except Exception as err:  # every way a corrupt file fails: zip, pickle, struct, safetensors errors
        raise ValueError(f"weights file {path}: cannot be read: {err}") from None
    if not isinstance(contents, Mapping):
        raise ValueError(f"weights file {path}: holds a {type(contents).__name__}, not a state dict (names to tensors)")
    bad = [key for key, value in contents.items() if not (isinstance(key, str) and _is_weight(value))]
    if bad:
        raise ValueError(
            f"weights file {path}: not a flat state dict of tensors: entries {bad[:5]!r} are not named tensors "
            "(a training checkpoint? pass its state dict)"
        )
    return dict(contents)
