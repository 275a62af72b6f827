"""Read ``torch.save`` checkpoints into numpy without torch and without running code from them.

Since torch 1.6, ``torch.save`` writes a zip archive whose members all sit in one root folder
(``archive/`` or the stem of the file name)::

    <root>/data.pkl        pickle (protocol 2) of the saved object
    <root>/data/<key>      raw bytes of each storage, in <root>/byteorder order (default little)
    <root>/byteorder, <root>/version, <root>/.format_version, ...

``data.pkl`` refers to storages through persistent ids ``('storage', storage_type, key, location,
numel)`` and rebuilds tensors by calling ``torch._utils._rebuild_*`` functions with REDUCE.

Safety model. ``data.pkl`` is interpreted by a restricted subclass of pickle's pure-Python
unpickler (the C one cannot restrict opcodes):

* GLOBAL and STACK_GLOBAL resolve names only through an exact allow-list; nothing is imported.
  Rebuild functions and containers become inert ``_Rebuild`` tokens that only REDUCE invokes;
  dtypes, qschemes and storage types become plain strings such as ``"torch.qint8"``.
* Only opcodes that build plain data are accepted, plus REDUCE on a token, BUILD on an
  ``OrderedDict`` (a state_dict's ``_metadata``), and APPEND/SETITEM/ADDITEMS on real lists,
  dicts and sets. INST, OBJ, NEWOBJ, EXT and out-of-band buffers are refused.
* Every declared size (storage numel, tensor size/stride/offset, zip member size) is checked
  against the bytes actually present before anything is allocated from it.

Tensors become numpy arrays that are views of their storage, as torch tensors are: tensors saved
from one storage share memory. Views whose elements overlap (saved from ``expand``) are
read-only. Quantized tensors become :class:`QuantizedTensor`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import functools
import inspect
import io
import math
import os
import pickle
import pickletools
import re
import struct
import sys
import zipfile
import zlib
from typing import Any, BinaryIO, Callable, Union

import numpy as np

from flax_qmha._errors import CheckpointError, source_label

__all__ = ["CheckpointError", "QuantizedTensor", "load_torch_file"]

PathOrFile = Union[str, "os.PathLike[str]", BinaryIO]

# ---------------------------------------------------------------------------------------------
# dtypes

# torch dtype name -> numpy dtype name (quantized dtypes map to their integer representation).
_NUMPY_DTYPE_NAMES = {
    "float64": "float64",
    "float32": "float32",
    "float16": "float16",
    "complex64": "complex64",
    "complex128": "complex128",
    "int64": "int64",
    "int32": "int32",
    "int16": "int16",
    "int8": "int8",
    "uint64": "uint64",
    "uint32": "uint32",
    "uint16": "uint16",
    "uint8": "uint8",
    "bool": "bool",
    "qint8": "int8",
    "quint8": "uint8",
    "qint32": "int32",
}
# torch dtypes numpy lacks, taken from jax.numpy (ml_dtypes) on first use.
_JAX_DTYPE_NAMES = (
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
)
# Sizes known without importing anything, so storages are checked before jax is loaded.
_ITEMSIZE = {
    **{name: np.dtype(np_name).itemsize for name, np_name in _NUMPY_DTYPE_NAMES.items()},
    "bfloat16": 2,
    **{name: 1 for name in _JAX_DTYPE_NAMES if name.startswith("float8")},
}
_QUANTIZED_DTYPES = ("qint8", "quint8", "qint32")

# Storage classes named in persistent ids: class name -> torch dtype name of one element.
_STORAGE_CLASSES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}
_UNTYPED_STORAGE = "torch.storage.UntypedStorage"
# Storage type token (as find_class returns it) -> element dtype name; untyped storages are bytes.
_STORAGE_TOKENS = {f"torch.{cls}": dtype for cls, dtype in _STORAGE_CLASSES.items()}
_STORAGE_TOKENS[_UNTYPED_STORAGE] = "uint8"

# Every torch dtype str(dtype) can produce; they load as strings like "torch.qint8".
_TORCH_DTYPE_GLOBALS = (
    *_NUMPY_DTYPE_NAMES,
    *_JAX_DTYPE_NAMES,
    "complex32",
    "quint4x2",
    "quint2x4",
    "float4_e2m1fn_x2",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "bits8",
    "bits16",
    *(f"int{b}" for b in range(1, 8)),
    *(f"uint{b}" for b in range(1, 8)),
)
_QSCHEMES = (
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
)


@functools.lru_cache(maxsize=None)
def _numpy_dtype(name: str) -> np.dtype:
  """The native-order numpy dtype holding one element of torch dtype ``name`` (no prefix)."""
  if name in _NUMPY_DTYPE_NAMES:
    return np.dtype(_NUMPY_DTYPE_NAMES[name])
  if name in _JAX_DTYPE_NAMES:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  # only for bf16/float8

    if hasattr(jnp, name):
      return np.dtype(getattr(jnp, name))
  raise CheckpointError(f"tensor dtype torch.{name} is not supported")


# ---------------------------------------------------------------------------------------------
# public result type


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
  """A quantized torch tensor read from a checkpoint: integers plus their quantization parameters.

  Attributes:
    int_repr: the stored integers (``int8`` for qint8, ``uint8`` for quint8, ``int32`` for
      qint32), shape as the torch tensor.
    scale: a Python float (per-tensor) or a 1-D array of ``int_repr.shape[axis]`` scales
      (per-channel; float64 as torch's ``q_per_channel_scales()``, float32 for
      ``per_channel_affine_float_qparams``).
    zero_point: a Python int (per-tensor) or a 1-D array (int64 per-channel; float32 for
      ``per_channel_affine_float_qparams``).
    axis: the channel axis, or ``None`` for per-tensor quantization.
    dtype: ``"qint8"``, ``"quint8"`` or ``"qint32"``.
  """

  int_repr: np.ndarray
  scale: float | np.ndarray
  zero_point: int | np.ndarray
  axis: int | None
  dtype: str

  def __post_init__(self):
    if self.dtype not in _QUANTIZED_DTYPES:
      raise ValueError(
          f"QuantizedTensor: dtype must be one of {_QUANTIZED_DTYPES}, got {self.dtype!r}"
      )
    if not isinstance(self.int_repr, np.ndarray) or self.int_repr.dtype != _numpy_dtype(self.dtype):
      raise ValueError(
          f"QuantizedTensor: int_repr must be a {_numpy_dtype(self.dtype)} array for {self.dtype}, "
          f"got {type(self.int_repr).__name__} {getattr(self.int_repr, 'dtype', '')}"
      )
    if self.axis is None:
      if np.ndim(self.scale) or np.ndim(self.zero_point):
        raise ValueError(
            "QuantizedTensor: per-tensor (axis=None) scale and zero_point must be scalars"
        )
    else:
      ndim = self.int_repr.ndim
      if not 0 <= self.axis < ndim:
        raise ValueError(f"QuantizedTensor: axis {self.axis} out of range for {ndim}-d int_repr")
      channels = self.int_repr.shape[self.axis]
      for name in ("scale", "zero_point"):
        value = getattr(self, name)
        if np.ndim(value) != 1 or len(value) != channels:
          raise ValueError(
              f"QuantizedTensor: per-channel {name} must be 1-D of length {channels} "
              f"(int_repr.shape[{self.axis}]), got shape {np.shape(value)}"
          )

  def __repr__(self) -> str:
    return (
        f"QuantizedTensor(dtype={self.dtype!r}, shape={self.shape}, qscheme={self.qscheme!r}, "
        f"axis={self.axis})"
    )

  @property
  def shape(self) -> tuple[int, ...]:
    """The tensor's shape."""
    return self.int_repr.shape

  @property
  def qscheme(self) -> str:
    """The torch qscheme, e.g. ``"torch.per_channel_affine"``."""
    if self.axis is None:
      return "torch.per_tensor_affine"
    if np.issubdtype(np.asarray(self.zero_point).dtype, np.floating):
      return "torch.per_channel_affine_float_qparams"
    return "torch.per_channel_affine"

  def dequantize(self) -> np.ndarray:
    """Returns ``(int_repr - zero_point) * scale`` as float32, rounded as torch's ``dequantize()``.

    Returns:
      A float32 array of ``self.shape``.
    """
    q = self.int_repr.astype(np.int64)
    if self.axis is None:
      # torch: float(scale) * float(q - zero_point), one float32 multiply.
      return (q - self.zero_point).astype(np.float32) * np.float32(self.scale)
    bshape = [1] * q.ndim
    bshape[self.axis] = -1
    scale = np.asarray(self.scale).reshape(bshape).astype(np.float32)
    zero_point = np.asarray(self.zero_point).reshape(bshape)
    if np.issubdtype(zero_point.dtype, np.floating):
      # per_channel_affine_float_qparams: float zero points, subtracted in float32.
      return (q.astype(np.float32) - zero_point.astype(np.float32)) * scale
    return (q - zero_point.astype(np.int64)).astype(np.float32) * scale


# ---------------------------------------------------------------------------------------------
# the zip archive


_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
# Deflate cannot expand data by more than ~1032:1; a larger declared size is a lie (zip bomb).
_MAX_DEFLATE_RATIO = 1032
# torch's legacy (pre-1.6, or _use_new_zipfile_serialization=False) files start with a protocol-2
# pickle of this magic number, written as a LONG1 opcode.
_LEGACY_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


@dataclasses.dataclass(frozen=True, eq=False)
class _Storage:
  """The bytes of one ``<root>/data/<key>`` member and their numpy views (cached per dtype)."""

  key: str
  dtype: str  # torch dtype name of one element; "uint8" for UntypedStorage
  numel: int
  raw: bytearray
  views: dict = dataclasses.field(default_factory=dict)


def _check_member_name(name: str) -> None:
  if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
    raise CheckpointError(f"zip member {name!r} has an absolute path")
  if "\\" in name:
    raise CheckpointError(f"zip member {name!r} contains a backslash")
  parts = name.split("/")
  if name.endswith("/"):
    parts = parts[:-1]  # a directory entry
  if any(part in ("", ".", "..") for part in parts):
    raise CheckpointError(f"zip member {name!r} has an empty, '.' or '..' path component")


class _Archive:
  """A validated ``torch.save`` zip archive: one root folder, sane member names and sizes."""

  def __init__(self, zf: zipfile.ZipFile, archive_size: int):
    self._zf = zf
    self._members: dict[str, zipfile.ZipInfo] = {}
    infos = zf.infolist()
    if not infos:
      raise CheckpointError("the zip archive is empty")
    for info in infos:
      name = info.filename
      _check_member_name(name)
      if name in self._members:
        raise CheckpointError(f"zip member {name!r} appears twice")
      if info.flag_bits & 0x1:
        raise CheckpointError(f"zip member {name!r} is encrypted")
      if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointError(
            f"zip member {name!r} uses compression method {info.compress_type}; "
            "only stored (torch's choice) and deflated members are supported"
        )
      if info.header_offset < 0:
        raise CheckpointError(
            f"zip member {name!r} starts at offset {info.header_offset}, outside the file: the "
            "zip directory does not match the data (truncated, spliced or corrupt file)"
        )
      if info.header_offset + info.compress_size > archive_size:
        raise CheckpointError(
            f"zip member {name!r} claims {info.compress_size} bytes at offset "
            f"{info.header_offset}, past the end of the {archive_size}-byte file (truncated?)"
        )
      if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise CheckpointError(
            f"stored zip member {name!r} declares {info.file_size} bytes but holds "
            f"{info.compress_size}"
        )
      if (
          info.compress_type == zipfile.ZIP_DEFLATED
          and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 64
      ):
        raise CheckpointError(
            f"deflated zip member {name!r} declares {info.file_size} bytes from only "
            f"{info.compress_size} compressed bytes"
        )
      self._members[name] = info
    unrooted = [name for name in self._members if "/" not in name]
    if unrooted:
      raise CheckpointError(
          f"zip member {unrooted[0]!r} is not inside a root folder; torch.save puts every "
          "member in one folder such as 'archive/'"
      )
    roots = sorted({name.split("/", 1)[0] for name in self._members})
    if len(roots) != 1:
      raise CheckpointError(f"zip members sit in several root folders {roots}; torch.save uses one")
    self.root = roots[0]
    self._storages: dict[str, _Storage] = {}
    self.byteorder = "little"
    if self.has("byteorder"):
      mark = bytes(self.read("byteorder", max_size=16))
      if mark not in (b"little", b"big"):
        raise CheckpointError(
            f"'{self.root}/byteorder' holds {_short(mark)}, expected b'little' or b'big'"
        )
      self.byteorder = mark.decode()

  def has(self, relname: str) -> bool:
    return f"{self.root}/{relname}" in self._members

  def read(self, relname: str, *, max_size: int | None = None) -> bytearray:
    """Returns the bytes of ``<root>/<relname>``, CRC-checked."""
    name = f"{self.root}/{relname}"
    info = self._members.get(name)
    if info is None:
      raise CheckpointError(f"the archive has no member {name!r}")
    if max_size is not None and info.file_size > max_size:
      raise CheckpointError(
          f"zip member {name!r} is {info.file_size} bytes, expected at most {max_size}"
      )
    # The size was checked against the real stored bytes in __init__, so this allocation is bounded.
    buf = bytearray(info.file_size)
    view = memoryview(buf)
    pos = 0
    try:
      with self._zf.open(info) as member:
        while pos < len(buf):
          chunk = member.read(min(len(buf) - pos, 1 << 24))
          if not chunk:
            raise CheckpointError(
                f"zip member {name!r} is truncated after {pos} of {len(buf)} bytes"
            )
          view[pos : pos + len(chunk)] = chunk
          pos += len(chunk)
        member.read(1)  # reaches the end of the member, where zipfile checks the CRC
    except CheckpointError:
      raise
    except (
        zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError
    ) as e:
      raise CheckpointError(f"cannot read zip member {name!r}: {type(e).__name__}: {e}") from e
    return buf

  def storage(self, key: str, dtype: str, numel: int) -> _Storage:
    """The storage ``key`` holding ``numel`` elements of ``dtype``, read once and cached."""
    cached = self._storages.get(key)
    if cached is not None:
      if (cached.dtype, cached.numel) != (dtype, numel):
        raise CheckpointError(
            f"storage {key!r} is referenced both as {cached.numel} x {cached.dtype} and as "
            f"{numel} x {dtype}"
        )
      return cached
    if dtype not in _ITEMSIZE:
      raise CheckpointError(
          f"storage {key!r} has element type torch.{dtype}, which is not supported"
      )
    member = f"data/{key}"
    if not self.has(member):
      raise CheckpointError(
          f"storage {key!r} is missing: the archive has no member '{self.root}/{member}'"
      )
    nbytes = numel * _ITEMSIZE[dtype]
    held = self._members[f"{self.root}/{member}"].file_size
    if nbytes != held:
      raise CheckpointError(
          f"storage {key!r} declares {numel} elements of torch.{dtype} ({nbytes} bytes) but "
          f"'{self.root}/{member}' holds {held} bytes"
      )
    storage = _Storage(key=key, dtype=dtype, numel=numel, raw=self.read(member))
    self._storages[key] = storage
    return storage

  def storage_array(self, storage: _Storage, dtype: str) -> np.ndarray:
    """``storage``'s bytes as a writable 1-D native-order array of torch dtype ``dtype``."""
    array = storage.views.get(dtype)
    if array is None:
      np_dtype = _numpy_dtype(dtype)
      if len(storage.raw) % np_dtype.itemsize:
        raise CheckpointError(
            f"storage {storage.key!r} holds {len(storage.raw)} bytes, not a whole number of "
            f"torch.{dtype} elements"
        )
      array = np.frombuffer(storage.raw, dtype=np_dtype)
      if self.byteorder != sys.byteorder:
        array = array.byteswap()
      storage.views[dtype] = array
    return array


# ---------------------------------------------------------------------------------------------
# argument checks for the rebuild functions


def _short(obj: Any) -> str:
  """``repr(obj)``, cut short: messages quote untrusted values."""
  text = repr(obj)
  return text if len(text) <= 80 else text[:77] + "..."


def _describe(obj: Any) -> str:
  if isinstance(obj, _Rebuild):
    return f"global {obj.name}"
  if isinstance(obj, str):
    return f"str {_short(obj)}"
  return f"a {type(obj).__name__}"


def _index(value: Any, what: str) -> int:
  if type(value) is not int or value < 0:
    shown = _short(value) if type(value) in (int, float, bool) else _describe(value)
    raise CheckpointError(f"{what} must be a non-negative int, got {shown}")
  return value


def _shape(value: Any, what: str) -> tuple[int, ...]:
  if type(value) not in (tuple, list):
    raise CheckpointError(f"{what} must be a tuple of ints, got {_describe(value)}")
  return tuple(_index(v, f"{what}[{i}]") for i, v in enumerate(value))


def _flag(value: Any, what: str) -> bool:
  if type(value) is not bool:
    raise CheckpointError(f"{what} must be a bool, got {_describe(value)}")
  return value


def _hooks(value: Any, what: str) -> None:
  # torch never serializes hooks (the saved dict is always empty); contents are data only.
  if value is not None and type(value) not in (dict, collections.OrderedDict):
    raise CheckpointError(f"{what} must be an OrderedDict, got {_describe(value)}")


def _overlaps(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
  """True when two indices may share an element (sufficient test: each stride clears the others)."""
  reach = 0
  for st, n in sorted((st, n) for n, st in zip(size, stride) if n > 1):
    if st <= reach:
      return True
    reach += (n - 1) * st
  return False


# ---------------------------------------------------------------------------------------------
# the restricted unpickler


class _Rebuild:
  """An allow-listed callable global. Only REDUCE can invoke it; it is inert anywhere else."""

  __slots__ = ("name", "_fn", "_signature")

  def __init__(self, name: str, fn: Callable[..., Any]):
    self.name = name
    self._fn = fn
    self._signature = inspect.signature(fn)

  def invoke(self, unpickler: "_RestrictedUnpickler", args: tuple) -> Any:
    try:
      self._signature.bind(unpickler, *args)
    except TypeError:
      raise CheckpointError(f"{self.name} cannot take {len(args)} argument(s)") from None
    return self._fn(unpickler, *args)

  def __repr__(self) -> str:
    return f"<torch checkpoint global {self.name}>"


def _tensor(up, storage, offset, size, stride, dtype, what, metadata=None) -> np.ndarray:
  """A numpy view of ``storage`` with torch's (offset, size, stride), in elements of ``dtype``."""
  offset = _index(offset, f"{what} storage offset")
  size = _shape(size, f"{what} size")
  stride = _shape(stride, f"{what} stride")
  if len(size) != len(stride):
    raise CheckpointError(f"{what} has size {size} but stride {stride} of another length")
  flat = up.archive.storage_array(storage, dtype)
  numel = math.prod(size)
  if numel == 0:
    if offset > flat.size:
      raise CheckpointError(
          f"{what} starts at offset {offset} past the end of storage {storage.key!r}"
      )
    try:
      return np.zeros(size, flat.dtype)
    except ValueError as e:
      raise CheckpointError(f"{what} has an impossible size {size}: {e}") from None
  last = offset + sum((n - 1) * st for n, st in zip(size, stride))
  if last >= flat.size:
    raise CheckpointError(
        f"{what} of size {size}, stride {stride}, offset {offset} reaches element {last}, but "
        f"storage {storage.key!r} holds {flat.size} elements of torch.{dtype}"
    )
  # Strides of length-1 axes are arbitrary in torch and never used: drop them.
  stride = tuple(st if n > 1 else 0 for n, st in zip(size, stride))
  # as_strided goes through __array_interface__, which cannot name ml_dtypes types (float8):
  # stride raw bytes, then reinterpret.
  view = np.lib.stride_tricks.as_strided(
      flat[offset:].view(f"V{flat.itemsize}"),
      shape=size,
      strides=tuple(st * flat.itemsize for st in stride),
      writeable=not _overlaps(size, stride),
  ).view(flat.dtype)
  if metadata:
    if type(metadata) is not dict or not set(metadata) <= {"conj", "neg"}:
      raise CheckpointError(f"{what} has unsupported tensor metadata {_short(metadata)}")
    # torch's lazy conjugate / negative views: resolve them, as reading them through torch would.
    if _flag(metadata.get("conj", False), f"{what} metadata['conj']"):
      view = np.conj(view)
    if _flag(metadata.get("neg", False), f"{what} metadata['neg']"):
      view = np.negative(view)
  return view


def _plain_storage(storage: Any, what: str) -> _Storage:
  if type(storage) is not _Storage:
    raise CheckpointError(f"{what} needs a storage (a persistent id), got {_describe(storage)}")
  return storage


def _rebuild_tensor(up, storage, offset, size, stride):
  return _rebuild_tensor_v2(up, storage, offset, size, stride, False, None)


def _rebuild_tensor_v2(
    up, storage, offset, size, stride, requires_grad, backward_hooks, metadata=None
):
  what = "_rebuild_tensor_v2"
  storage = _plain_storage(storage, what)
  if storage.dtype in _QUANTIZED_DTYPES:
    raise CheckpointError(f"{what} on quantized storage {storage.key!r} (torch.{storage.dtype})")
  _flag(requires_grad, f"{what} requires_grad")
  _hooks(backward_hooks, f"{what} backward_hooks")
  return _tensor(up, storage, offset, size, stride, storage.dtype, what, metadata)


def _rebuild_tensor_v3(
    up, storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
  what = "_rebuild_tensor_v3"
  storage = _plain_storage(storage, what)
  if not isinstance(dtype, str) or not dtype.startswith("torch."):
    raise CheckpointError(f"{what} dtype must be a torch dtype global, got {_describe(dtype)}")
  name = dtype[len("torch.") :]
  if name in _QUANTIZED_DTYPES or storage.dtype in _QUANTIZED_DTYPES:
    raise CheckpointError(f"{what} cannot build quantized tensors ({dtype})")
  _flag(requires_grad, f"{what} requires_grad")
  _hooks(backward_hooks, f"{what} backward_hooks")
  return _tensor(up, storage, offset, size, stride, name, what, metadata)


def _rebuild_parameter(up, data, requires_grad, backward_hooks):
  # A Parameter is its tensor; requires_grad has no numpy counterpart.
  if not isinstance(data, (np.ndarray, QuantizedTensor)):
    raise CheckpointError(f"_rebuild_parameter needs a tensor, got {_describe(data)}")
  _flag(requires_grad, "_rebuild_parameter requires_grad")
  _hooks(backward_hooks, "_rebuild_parameter backward_hooks")
  return data


def _rebuild_parameter_with_state(up, data, requires_grad, backward_hooks, state):
  # ``state`` holds Python attributes set on the Parameter; arrays cannot carry them.
  del state
  return _rebuild_parameter(up, data, requires_grad, backward_hooks)


_TENSOR_REBUILDS = (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_qtensor",
)


def _rebuild_from_type_v2(up, func, new_type, args, state):
  # torch uses this for Tensor subclasses and tensors carrying Python attributes. Only plain
  # Tensor/Parameter are accepted; the attributes in ``state`` are dropped.
  del state
  if type(func) is not _Rebuild or func.name.rsplit(".", 1)[-1] not in _TENSOR_REBUILDS:
    raise CheckpointError(
        f"_rebuild_from_type_v2 may only call a tensor rebuild function, got {_describe(func)}"
    )
  if new_type not in ("torch.Tensor", "torch.nn.parameter.Parameter"):
    raise CheckpointError(
        f"_rebuild_from_type_v2 builds unsupported tensor type {_describe(new_type)}"
    )
  if type(args) is not tuple:
    raise CheckpointError(f"_rebuild_from_type_v2 args must be a tuple, got {_describe(args)}")
  return func.invoke(up, args)


def _channel_params(values: Any, dtype: str, length: int, what: str) -> np.ndarray:
  if isinstance(values, list):
    if not all(type(v) in (int, float) for v in values):
      raise CheckpointError(f"{what} must hold numbers")
    values = np.asarray(values, dtype=dtype)
  if not isinstance(values, np.ndarray) or values.ndim != 1 or values.dtype.kind not in "iuf":
    raise CheckpointError(f"{what} must be a 1-D numeric tensor, got {_describe(values)}")
  if values.shape[0] != length:
    raise CheckpointError(f"{what} has {values.shape[0]} entries, expected size[axis] = {length}")
  return values


def _rebuild_qtensor(
    up, storage, offset, size, stride, quantizer_params, requires_grad, backward_hooks
):
  what = "_rebuild_qtensor"
  storage = _plain_storage(storage, what)
  if storage.dtype not in _QUANTIZED_DTYPES:
    raise CheckpointError(
        f"{what} needs a QInt8/QUInt8/QInt32 storage, got storage {storage.key!r} of "
        f"torch.{storage.dtype}"
    )
  _flag(requires_grad, f"{what} requires_grad")
  _hooks(backward_hooks, f"{what} backward_hooks")
  int_repr = _tensor(up, storage, offset, size, stride, storage.dtype, what)
  if type(quantizer_params) not in (tuple, list) or not quantizer_params:
    raise CheckpointError(
        f"{what} quantizer_params must be a tuple, got {_describe(quantizer_params)}"
    )
  qscheme = quantizer_params[0]
  if qscheme == "torch.per_tensor_affine":
    if len(quantizer_params) != 3:
      raise CheckpointError(f"{what}: per_tensor_affine needs (qscheme, scale, zero_point)")
    _, scale, zero_point = quantizer_params
    if type(scale) not in (int, float):
      raise CheckpointError(f"{what} scale must be a number, got {_describe(scale)}")
    if type(zero_point) is not int:
      raise CheckpointError(f"{what} zero_point must be an int, got {_describe(zero_point)}")
    return QuantizedTensor(int_repr, float(scale), zero_point, None, storage.dtype)
  if qscheme in ("torch.per_channel_affine", "torch.per_channel_affine_float_qparams"):
    if len(quantizer_params) != 4:
      raise CheckpointError(f"{what}: {qscheme} needs (qscheme, scales, zero_points, axis)")
    _, scales, zero_points, axis = quantizer_params
    if type(axis) is not int or not 0 <= axis < int_repr.ndim:
      raise CheckpointError(
          f"{what}: per-channel axis {_short(axis)} out of range for size {int_repr.shape}"
      )
    length = int_repr.shape[axis]
    float_qparams = qscheme.endswith("float_qparams")
    scales = _channel_params(
        scales, "float32" if float_qparams else "float64", length, f"{what} scales"
    )
    zero_points = _channel_params(
        zero_points, "float32" if float_qparams else "int64", length, f"{what} zero_points"
    )
    return QuantizedTensor(int_repr, scales, zero_points, axis, storage.dtype)
  raise CheckpointError(f"{what}: quantization scheme {_describe(qscheme)} is not supported")


def _ordered_dict(up, items=()):
  if type(items) not in (tuple, list, dict, collections.OrderedDict):
    raise CheckpointError(f"OrderedDict built from {_describe(items)}")
  return collections.OrderedDict(items)


def _counter(up, items=()):
  if type(items) not in (tuple, list, dict, collections.OrderedDict):
    raise CheckpointError(f"Counter built from {_describe(items)}")
  return collections.Counter(dict(items))


def _torch_size(up, dims=()):
  # torch.Size is a tuple of ints; a plain tuple carries the same information.
  return _shape(dims, "torch.Size")


def _torch_device(up, kind, index=None):
  if type(kind) is not str or (index is not None and type(index) is not int):
    raise CheckpointError(f"torch.device({_short(kind)}, {_short(index)}) is not a device")
  return kind if index is None else f"{kind}:{index}"


_LATIN1 = ("latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1")


def _codecs_encode(up, text, encoding="utf-8"):
  # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); nothing else is needed.
  if type(text) is not str or type(encoding) is not str or encoding.lower() not in _LATIN1:
    raise CheckpointError(
        f"_codecs.encode is only allowed as encode(str, 'latin1'), got encoding {_short(encoding)}"
    )
  return text.encode("latin1")


def _bytes(up):
  return b""


def _bytearray(up, data=b"", encoding=None):
  if type(data) is str and type(encoding) is str and encoding.lower() in _LATIN1:
    return bytearray(data.encode("latin1"))
  if type(data) is bytes and encoding is None:
    return bytearray(data)
  raise CheckpointError("bytearray is only allowed from bytes or from (str, 'latin-1')")


def _set(up, items=()):
  if type(items) not in (tuple, list, set, frozenset):
    raise CheckpointError(f"set built from {_describe(items)}")
  return set(items)


def _frozenset(up, items=()):
  return frozenset(_set(up, items))


def _complex(up, real=0.0, imag=0.0):
  if type(real) not in (int, float) or type(imag) not in (int, float):
    raise CheckpointError("complex needs two real numbers")
  return complex(real, imag)


# (module, name) -> callable; the exact allow-list of what data.pkl may call.
_CALLABLE_GLOBALS: dict[tuple[str, str], _Rebuild] = {
    key: _Rebuild(".".join(key), fn)
    for key, fn in {
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch._utils", "_rebuild_qtensor"): _rebuild_qtensor,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("collections", "OrderedDict"): _ordered_dict,
        ("collections", "Counter"): _counter,
        ("torch", "Size"): _torch_size,
        ("torch", "device"): _torch_device,
        ("_codecs", "encode"): _codecs_encode,
        ("builtins", "bytes"): _bytes,
        ("builtins", "bytearray"): _bytearray,
        ("builtins", "set"): _set,
        ("builtins", "frozenset"): _frozenset,
        ("builtins", "complex"): _complex,
    }.items()
}
# (module, name) -> the string it loads as: dtypes, qschemes, storage and tensor types.
_NAMED_GLOBALS: dict[tuple[str, str], str] = {
    **{("torch", name): f"torch.{name}" for name in _TORCH_DTYPE_GLOBALS},
    **{("torch", name): f"torch.{name}" for name in _QSCHEMES},
    **{("torch", cls): f"torch.{cls}" for cls in _STORAGE_CLASSES},
    ("torch.storage", "UntypedStorage"): _UNTYPED_STORAGE,
    ("torch", "Tensor"): "torch.Tensor",
    ("torch._tensor", "Tensor"): "torch.Tensor",
    ("torch.nn.parameter", "Parameter"): "torch.nn.parameter.Parameter",
}

_OPCODE_NAMES = {op.code.encode("latin1")[0]: op.name for op in pickletools.opcodes}
_DATA_OPCODES = (
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "FLOAT", "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
    "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "LIST", "EMPTY_DICT",
    "DICT", "EMPTY_SET", "FROZENSET", "GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT",
    "LONG_BINPUT", "MEMOIZE",
    # These resolve through find_class / persistent_load, overridden below.
    "GLOBAL", "STACK_GLOBAL", "PERSID", "BINPERSID",
)  # fmt: skip


class _Dispatch(dict):
  """Opcode table: anything not explicitly allowed is refused by name."""

  def __missing__(self, code: int):
    name = _OPCODE_NAMES.get(code, f"unknown opcode 0x{code:02x}")
    raise CheckpointError(
        f"data.pkl uses pickle opcode {name}, which a weights file never needs; refused"
    )


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Pickle's pure-Python unpickler with an allow-listed opcode table and globals."""

  dispatch = _Dispatch({
      getattr(pickle, op)[0]: pickle._Unpickler.dispatch[getattr(pickle, op)[0]]
      for op in _DATA_OPCODES
  })

  def __init__(self, data: bytes | bytearray, archive: _Archive):
    super().__init__(io.BytesIO(data), encoding="utf-8")
    self.archive = archive

  def find_class(self, module: str, name: str) -> Any:
    # Protocol 2 writes Python 2 names (__builtin__.set, commands.Popen for subprocess.Popen):
    # translate them as pickle does, but never import anything.
    key = (module, name)
    if key in _compat_pickle.NAME_MAPPING:
      key = _compat_pickle.NAME_MAPPING[key]
    elif module in _compat_pickle.IMPORT_MAPPING:
      key = (_compat_pickle.IMPORT_MAPPING[module], name)
    if key in _CALLABLE_GLOBALS:
      return _CALLABLE_GLOBALS[key]
    if key in _NAMED_GLOBALS:
      return _NAMED_GLOBALS[key]
    shown = f"{module}.{name}"
    if key != (module, name):
      shown += f" (= {key[0]}.{key[1]})"
    raise CheckpointError(
        f"data.pkl refers to global {shown!r}, which is not allowed: a weights checkpoint may "
        "only name tensor rebuild functions, torch dtypes/qschemes/storage types and plain "
        "containers; nothing from the file is executed"
    )

  def persistent_load(self, pid: Any) -> _Storage:
    if type(pid) is not tuple or len(pid) != 5:
      raise CheckpointError(
          "persistent id must be ('storage', storage_type, key, location, numel), got "
          f"{_describe(pid)}"
      )
    typename, storage_type, key, location, numel = (
        v.decode("ascii") if type(v) is bytes else v for v in pid
    )
    if typename != "storage":
      raise CheckpointError(
          f"persistent id of kind {_describe(typename)}; only 'storage' is supported"
      )
    if storage_type not in _STORAGE_TOKENS:
      raise CheckpointError(
          f"persistent id names {_describe(storage_type)}, not a torch storage type"
      )
    if type(key) is not str or not _KEY_RE.match(key):
      raise CheckpointError(f"storage key {_short(key)} is not a plain name")
    if type(location) is not str:
      raise CheckpointError(f"storage {key!r} location must be a str, got {_describe(location)}")
    numel = _index(numel, f"storage {key!r} numel")
    return self.archive.storage(key, _STORAGE_TOKENS[storage_type], numel)

  def load_reduce(self):
    args = self.stack.pop()
    func = self.stack[-1]
    if type(func) is not _Rebuild:
      raise CheckpointError(f"REDUCE calls {_describe(func)}, which is not an allowed function")
    if type(args) is not tuple:
      raise CheckpointError(
          f"REDUCE arguments for {func.name} must be a tuple, got {_describe(args)}"
      )
    self.stack[-1] = func.invoke(self, args)

  def load_build(self):
    state = self.stack.pop()
    inst = self.stack[-1]
    if type(inst) is not collections.OrderedDict:
      raise CheckpointError(
          f"BUILD on {_describe(inst)}: only an OrderedDict's attributes (a state_dict's "
          "_metadata) may be set"
      )
    if state is None:
      return
    if type(state) is not dict:
      raise CheckpointError(
          f"BUILD state for an OrderedDict must be a dict, got {_describe(state)}"
      )
    for name, value in state.items():
      if (
          type(name) is not str
          or not name.isidentifier()
          or name.startswith("__")
          or hasattr(collections.OrderedDict, name)
      ):
        raise CheckpointError(f"BUILD may not set attribute {_short(name)} on an OrderedDict")
      inst.__dict__[name] = value

  def _target(self, types: tuple[type, ...], opcode: str) -> Any:
    target = self.stack[-1]
    if type(target) not in types:
      raise CheckpointError(f"{opcode} on {_describe(target)}")
    return target

  def load_append(self):
    value = self.stack.pop()
    self._target((list,), "APPEND").append(value)

  def load_appends(self):
    items = self.pop_mark()
    self._target((list,), "APPENDS").extend(items)

  def load_setitem(self):
    value = self.stack.pop()
    key = self.stack.pop()
    self._target((dict, collections.OrderedDict, collections.Counter), "SETITEM")[key] = value

  def load_setitems(self):
    items = self.pop_mark()
    if len(items) % 2:
      raise CheckpointError("SETITEMS with an odd number of items")
    target = self._target((dict, collections.OrderedDict, collections.Counter), "SETITEMS")
    for i in range(0, len(items), 2):
      target[items[i]] = items[i + 1]

  def load_additems(self):
    items = self.pop_mark()
    self._target((set,), "ADDITEMS").update(items)


for _name, _method in (
    ("REDUCE", _RestrictedUnpickler.load_reduce),
    ("BUILD", _RestrictedUnpickler.load_build),
    ("APPEND", _RestrictedUnpickler.load_append),
    ("APPENDS", _RestrictedUnpickler.load_appends),
    ("SETITEM", _RestrictedUnpickler.load_setitem),
    ("SETITEMS", _RestrictedUnpickler.load_setitems),
    ("ADDITEMS", _RestrictedUnpickler.load_additems),
):
  _RestrictedUnpickler.dispatch[getattr(pickle, _name)[0]] = _method
del _name, _method


# ---------------------------------------------------------------------------------------------
# entry point


def _open_binary(source: Any) -> tuple[BinaryIO, bool]:
  """Returns a seekable binary file for ``source`` and whether the caller must close it."""
  if isinstance(source, (bytes, bytearray, memoryview)):
    raise TypeError("source must be a path or a binary file object; wrap raw bytes in io.BytesIO")
  if isinstance(source, (str, os.PathLike)):
    return open(source, "rb"), True  # pylint: disable=consider-using-with
  if not hasattr(source, "read"):
    raise TypeError(f"source must be a path or a binary file object, got {type(source).__name__}")
  seekable = getattr(source, "seekable", None)
  if seekable is not None and seekable():
    return source, False
  data = source.read()
  if not isinstance(data, bytes):
    raise TypeError("source file object must be opened in binary mode")
  return io.BytesIO(data), True


def _not_a_zip(head: bytes) -> str:
  if head[:1] == b"\x80" and head[2:14] == _LEGACY_MAGIC:
    return (
        "this is torch's legacy (pre-1.6, _use_new_zipfile_serialization=False) format, which "
        "is not supported; re-save it with a current torch.save"
    )
  if head[:1] == b"\x80":
    return "this is a bare pickle, not a torch.save zip archive"
  return "not a zip archive (torch.save writes zip archives since torch 1.6); truncated or corrupt?"


def load_torch_file(source: PathOrFile) -> Any:
  """Reads a ``torch.save`` (zip format) file into numpy objects, without torch or code execution.

  Decoded objects:

  * tensors and Parameters -> ``np.ndarray`` views of their storage (bfloat16 and float8 as the
    ml_dtypes types of ``jax.numpy``); lazy conj/neg views are resolved.
  * quantized tensors -> :class:`QuantizedTensor`.
  * ``OrderedDict``/``Counter``/dict/list/tuple/set/str/bytes/int/float/complex/bool/None as
    themselves; a state_dict's ``_metadata`` attribute is kept.
  * torch dtypes, qschemes and storage types -> strings such as ``"torch.qint8"``;
    ``torch.Size`` -> tuple of ints; ``torch.device`` -> a string such as ``"cuda:0"``.

  Args:
    source: a path, or a binary file object (read from its current position if not seekable).

  Returns:
    The saved object, typically an ``OrderedDict`` mapping state_dict keys to arrays.

  Raises:
    CheckpointError: the file is not a torch zip archive (e.g. the legacy format), is
      truncated or corrupt, names a global outside the allow-list, uses an opcode that builds
      anything but data, or declares sizes its bytes do not back. The message names the file.
    TypeError: ``source`` is neither a path nor a binary file object.
  """
  label = source_label(source)
  fileobj, owned = _open_binary(source)
  try:
    start = fileobj.tell()
    head = fileobj.read(16)
    if not isinstance(head, bytes):
      raise TypeError("source file object must be opened in binary mode")
    archive_size = fileobj.seek(0, io.SEEK_END)  # zip offsets are absolute in the file
    fileobj.seek(start)
    try:
      zf = zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
      raise CheckpointError(f"{_not_a_zip(head)} ({type(e).__name__}: {e})") from e
    with zf:
      archive = _Archive(zf, archive_size)
      pickled = archive.read("data.pkl")
      try:
        return _RestrictedUnpickler(pickled, archive).load()
      except CheckpointError:
        raise
      except (pickle.UnpicklingError, EOFError, IndexError, KeyError, TypeError, ValueError,
              AttributeError, struct.error, UnicodeDecodeError, OverflowError) as e:  # fmt: skip
        detail = str(e) or "the pickle ends early"
        raise CheckpointError(
            f"'{archive.root}/data.pkl' is corrupt or truncated ({type(e).__name__}: {detail})"
        ) from e
  except CheckpointError as e:
    raise CheckpointError(f"{label}: {e}") from e.__cause__
  finally:
    if owned:
      fileobj.close()
