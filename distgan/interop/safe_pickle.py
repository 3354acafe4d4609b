"""A pickle reader that executes nothing: foreign network pickles become plain records.

A pickle is a program: each global it names is imported and called while it loads, so loading an
untrusted network pickle with `pickle.load` (or NVlabs' `legacy.load_network_pkl`, which also
`exec`s the Python source the pickle embeds) runs whatever its author wrote. `load_records`
reads one with `RestrictedUnpickler`, whose `find_class` hands out stand-ins for an explicit
allow-list and refuses every other global with `UnsafePickleError`, naming it, before anything
is called:

- `torch_utils.persistence._reconstruct_persistent_obj` (every NVlabs network object: its meta
  holds the class name, the embedded module source and the object's `__dict__`) ->
  `PersistentRecord(class_name, state)`; the embedded source is never read, let alone executed;
- `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter(_with_state)` and
  `torch.storage._load_from_bytes` (how `pickle.dump` writes tensors: each storage is a nested
  legacy `torch.save` stream) -> plain CPU tensors, the nested stream read by `_read_storage`
  with its own allow-list (storage types only), never by `torch.load`;
- numpy scalars (`numpy.core.multiarray.scalar` as numpy 1 writes it, `numpy._core.multiarray
  .scalar` as numpy 2 does) and `numpy.dtype` -> Python numbers, decoded with `struct`;
- `collections.OrderedDict`, `dnnlib.util.EasyDict` (-> dict), `builtins.set`/`frozenset`;
- the network classes of brownvc/R3GAN (`R3GAN_CLASSES`), whose networks are plain `nn.Module`s
  pickled by class name (NEWOBJ + BUILD of their `__dict__`, no persistence records, no source) ->
  `ModuleRecord`, a `PersistentRecord` named `module.Class`: no class is imported or called; and
  the dtypes a module's attributes name (`torch.float32`, `torch.bfloat16`, `torch.float16`).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from distgan.errors import CheckpointError


class UnsafePickleError(CheckpointError):
    """The pickle asks for something outside the allow-list; nothing of it was run."""

    label = "import refused"


@dataclass
class PersistentRecord:
    """One NVlabs persistent object (a network or layer), as data: its class name and `__dict__`."""

    class_name: str
    state: dict[str, Any] = field(repr=False)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default)

    @property
    def modules(self) -> dict[str, Any]:
        return dict(self.state.get("_modules") or {})


class ModuleRecord(PersistentRecord):
    """A module pickled by class (R3GAN), as data: NEWOBJ makes an empty record of the class
    `find_class` named, BUILD stores its `__dict__` as `state`."""

    class_name = ""

    def __new__(cls, *args: Any) -> ModuleRecord:
        if args:
            raise _refuse(f"{cls.class_name} is built with arguments {str(args)[:80]}, a module is not")
        record = object.__new__(cls)
        record.state = {}
        return record

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise _refuse(f"the state of {self.class_name} is a {type(state).__name__}, not a module's __dict__")
        self.state = state


R3GAN_CLASSES = (
    "training.networks.Generator", "training.networks.Discriminator",
    *(f"R3GAN.Networks.{name}" for name in (
        "Generator", "Discriminator", "GeneratorStage", "DiscriminatorStage", "GenerativeBasis",
        "DiscriminativeBasis", "ResidualBlock", "UpsampleLayer", "DownsampleLayer", "Convolution")),
    "R3GAN.FusedOperators.BiasedActivationCUDA", "R3GAN.FusedOperators.BiasedActivationReference",
    *(f"R3GAN.Resamplers.Interpolative{kind}{impl}" for kind in ("Upsampler", "Downsampler")
      for impl in ("CUDA", "Reference")),
    "torch.nn.modules.container.ModuleList", "torch.nn.modules.conv.Conv2d", "torch.nn.modules.linear.Linear",
)
"""`module.Class` of every module an R3GAN snapshot pickles (brownvc/R3GAN training/networks.py,
R3GAN/Networks.py and the layers they use); each becomes a `ModuleRecord` subclass."""


def _module_record_class(qualified: str) -> type[ModuleRecord]:
    return type(qualified.rsplit(".", 1)[1], (ModuleRecord,), {"class_name": qualified})


PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of stylegan2-ada-pytorch and stylegan3

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
"""torch.<Type>Storage globals of the legacy format -> element dtype."""

NUMPY_CODES = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q", "u1": "B",
               "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}
"""numpy dtype names a scalar may have -> struct format letter."""

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def _refuse(what: str) -> UnsafePickleError:
    return UnsafePickleError(f"{what}; a network pickle only needs network records, tensors and numbers, so "
                             "this one was refused before anything in it ran (it may be malicious or not an NVlabs "
                             "network pickle).")


def _reconstruct_persistent_obj(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise _refuse("a persistent-object record without type 'class' and a class name")
    if meta.get("version") != PERSISTENCE_VERSION:
        raise UnsafePickleError(f"persistence format version {meta.get('version')!r}, this importer reads "
                                f"{PERSISTENCE_VERSION} (stylegan2-ada-pytorch / stylegan3)")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise _refuse(f"the record of {meta['class_name']} has no state dict")
    return PersistentRecord(meta["class_name"], state)  # meta["module_src"] is deliberately left unread


@dataclass
class _Storage:
    dtype: torch.dtype
    data: bytes

    def tensor(self) -> torch.Tensor:
        """The storage as a flat tensor (a copy: the pickle's bytes are not shared)."""
        if not self.data:
            return torch.empty(0, dtype=self.dtype)
        return torch.frombuffer(bytearray(self.data), dtype=self.dtype)


def _rebuild_tensor_v2(storage: Any, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise _refuse("a tensor whose storage is not plain bytes")
    flat = storage.tensor()
    try:
        return flat.as_strided(tuple(size), tuple(stride), int(offset)).clone()
    except RuntimeError as e:
        raise UnsafePickleError(f"a tensor of size {tuple(size)} does not fit its storage: {e}") from None


def _rebuild_parameter(data: Any, requires_grad: bool = False, backward_hooks: Any = None, state: Any = None):
    if not isinstance(data, torch.Tensor):
        raise _refuse("a parameter that wraps no tensor")
    return data


def _load_from_bytes(data: Any) -> _Storage:
    if not isinstance(data, (bytes, bytearray)):
        raise _refuse("a storage that is not bytes")
    return _read_storage(io.BytesIO(data))


class _DType:
    """`numpy.dtype(name, align, copy)` plus its `__setstate__`: only the name and byte order."""

    def __init__(self, name: Any, align: Any = False, copy: Any = True):
        if name not in NUMPY_CODES:
            raise _refuse(f"a numpy scalar of dtype {name!r}")
        self.name, self.order = name, "<"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = "<" if state[1] in ("|", "=") else state[1]


def _numpy_scalar(dtype: Any, data: Any = b"") -> int | float | bool:
    if not isinstance(dtype, _DType) or not isinstance(data, (bytes, bytearray)):
        raise _refuse("a numpy scalar without a plain dtype and bytes")
    (value,) = struct.unpack(dtype.order + NUMPY_CODES[dtype.name], data)
    return value


class _PlainDict(dict):
    """dnnlib.EasyDict as a plain dict (pickle fills it with SETITEMS)."""


ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,   # written by numpy 1 (the published pickles)
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # written by numpy 2
    ("numpy", "dtype"): _DType,
    ("dnnlib.util", "EasyDict"): _PlainDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "float32"): torch.float32,
    ("torch", "bfloat16"): torch.bfloat16,
    ("torch", "float16"): torch.float16,
    **{tuple(name.rsplit(".", 1)): _module_record_class(name) for name in R3GAN_CLASSES},
}
"""(module, name) -> the stand-in `find_class` returns; anything else is refused."""


class RestrictedUnpickler(pickle.Unpickler):
    """`find_class` from `ALLOWED` only; persistent ids refused."""

    def find_class(self, module: str, name: str) -> Any:
        stand_in = ALLOWED.get((module, name))
        if stand_in is None:
            raise _refuse(f"it asks for the global {module}.{name}, which is not on the allow-list")
        return stand_in

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse("it holds a persistent id (a torch.save stream, not a network pickle)")


class _LegacyStorageUnpickler(pickle.Unpickler):
    """The nested legacy `torch.save` stream of one storage: storage types and its id only."""

    def __init__(self, file: BinaryIO):
        super().__init__(file)
        self.refs: list[tuple[str, torch.dtype, int]] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise _refuse(f"a tensor storage asks for the global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise _refuse(f"a tensor storage with the persistent id {str(pid)[:80]!r}")
        _, dtype, key, _location, numel, view = pid
        if view is not None:
            raise UnsafePickleError("a storage view (legacy format) is not supported")
        self.refs.append((str(key), dtype, int(numel)))
        return len(self.refs) - 1


def _read_storage(f: BinaryIO) -> _Storage:
    """One storage from the legacy torch.save layout: magic, protocol, sys info, the pickled
    storage reference, the sorted storage keys, then per key an int64 element count and the raw
    little-endian bytes."""
    header = [RestrictedUnpickler(f).load() for _ in range(3)]
    if header[0] != LEGACY_MAGIC or header[1] != LEGACY_PROTOCOL or not isinstance(header[2], dict):
        raise _refuse("a tensor storage that is not in torch's legacy serialization format")
    if not header[2].get("little_endian", False):
        raise UnsafePickleError("a big-endian tensor storage is not supported")
    reader = _LegacyStorageUnpickler(f)
    index = reader.load()
    keys = RestrictedUnpickler(f).load()
    if not isinstance(index, int) or not isinstance(keys, list) or len(reader.refs) != 1 or len(keys) != 1:
        raise _refuse("a tensor storage stream with other than one storage")
    _, dtype, numel = reader.refs[0]
    (count,) = struct.unpack("<q", f.read(8))
    size = torch.empty((), dtype=dtype).element_size()
    data = f.read(count * size)
    if count != numel or len(data) != count * size:
        raise UnsafePickleError(f"a tensor storage is truncated ({len(data)} of {numel * size} bytes)")
    return _Storage(dtype, data)


def load_records(file: BinaryIO) -> Any:
    """The pickle's top-level object with every network as a `PersistentRecord` (see module doc)."""
    try:
        return RestrictedUnpickler(file).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error, IndexError, KeyError,
            AttributeError) as e:
        raise UnsafePickleError(f"not a readable network pickle ({type(e).__name__}: {e})") from None


__all__ = ["UnsafePickleError", "PersistentRecord", "ModuleRecord", "R3GAN_CLASSES", "RestrictedUnpickler",
           "load_records", "ALLOWED"]
