"""The safetensors format, read and written with numpy alone.

Layout (https://github.com/huggingface/safetensors)::

    8 bytes      N, the header length, unsigned little endian
    N bytes      UTF-8 JSON object: {"__metadata__": {str: str},            (optional)
                                     name: {"dtype": "F32", "shape": [2, 3],
                                            "data_offsets": [begin, end]}, ...}
    the rest     tensor bytes, little endian, C order; offsets count from the end of the header

The reader checks what the reference implementation checks (header inside the file, tensors
tiling the data exactly, sizes matching shapes) before allocating anything from a declared size.
"""

from __future__ import annotations

import collections.abc
import functools
import io
import json
import math
import os
import struct
import sys
from typing import Any, BinaryIO, Mapping, Union

import numpy as np

from flax_qmha._errors import CheckpointError, source_label

__all__ = ["CheckpointError", "load_safetensors", "save_safetensors"]

PathOrFile = Union[str, "os.PathLike[str]", BinaryIO]

# safetensors dtype code -> numpy dtype name (or a jax.numpy name for ml_dtypes types).
_NUMPY_CODES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "C64": "complex64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_JAX_CODES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_ITEMSIZE = {
    **{code: np.dtype(name).itemsize for code, name in _NUMPY_CODES.items()},
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
# The reference implementation refuses larger headers; so do we, before reading one.
_MAX_HEADER_BYTES = 100_000_000
_METADATA_KEY = "__metadata__"
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@functools.lru_cache(maxsize=None)
def _numpy_dtype(code: str) -> np.dtype:
  """The native numpy dtype for a safetensors dtype code."""
  if code in _NUMPY_CODES:
    return np.dtype(_NUMPY_CODES[code])
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  # only for bf16/float8

  return np.dtype(getattr(jnp, _JAX_CODES[code]))


def _code_for(dtype: np.dtype) -> str | None:
  """The safetensors code for a numpy dtype, or None when the format has none."""
  if dtype.isbuiltin == 2:  # a user-defined type such as ml_dtypes' bfloat16 / float8
    return next((code for code in _JAX_CODES if dtype == _numpy_dtype(code)), None)
  if dtype.kind not in "biufc":
    return None
  native = dtype.newbyteorder("=")
  return next((code for code, name in _NUMPY_CODES.items() if native == np.dtype(name)), None)


# ---------------------------------------------------------------------------------------------
# writing


def _little_endian_bytes(array: np.ndarray) -> np.ndarray:
  """``array``'s elements as a flat uint8 array: C order, little endian."""
  array = np.ascontiguousarray(array)
  if array.dtype.isbuiltin != 2:
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
  elif sys.byteorder == "big" and array.dtype.itemsize > 1:
    array = array.byteswap()  # ml_dtypes types carry no byte order of their own
  return array.reshape(-1).view(np.uint8)


def check_metadata(metadata: Any) -> dict[str, str]:
  """safetensors metadata is str -> str only; returns it as a dict (``None``: empty)."""
  if metadata is None:
    return {}
  if not isinstance(metadata, collections.abc.Mapping):
    raise TypeError(f"metadata must be a mapping of str to str, got {type(metadata).__name__}")
  for key, value in metadata.items():
    if not isinstance(key, str) or not isinstance(value, str):
      raise TypeError(
          f"metadata must map str to str, got {type(key).__name__} {key!r} -> "
          f"{type(value).__name__}"
      )
  return dict(metadata)


def save_safetensors(
    path_or_file: PathOrFile,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes ``tensors`` (and optional string ``metadata``) as a safetensors file.

  Tensors are laid out largest dtype first, then by name, like the reference writer, so every
  tensor starts at a multiple of its item size; the header is padded with spaces to 8 bytes.

  Args:
    path_or_file: a path (str or os.PathLike) to create or overwrite, or a binary file object
      opened for writing.
    tensors: maps names to arrays (numpy, jax, or anything ``np.asarray`` accepts) of dtype
      float64/32/16, bfloat16, float8_e4m3fn/e5m2, complex64, int64/32/16/8, uint64/32/16/8
      or bool. Names must be str and not ``"__metadata__"``.
    metadata: optional str -> str pairs stored under ``"__metadata__"``.

  Returns:
    None.

  Raises:
    TypeError: a name, value or metadata entry has the wrong type, or a dtype has no
      safetensors code.
    ValueError: a tensor is named ``"__metadata__"``.
  """
  if not isinstance(tensors, collections.abc.Mapping):
    raise TypeError(f"tensors must be a mapping of names to arrays, got {type(tensors).__name__}")
  if metadata is not None:
    check_metadata(metadata)
  arrays: dict[str, np.ndarray] = {}
  codes: dict[str, str] = {}
  for name, value in tensors.items():
    if not isinstance(name, str):
      raise TypeError(f"tensor names must be str, got {type(name).__name__} {name!r}")
    if name == _METADATA_KEY:
      raise ValueError(f"a tensor may not be named {_METADATA_KEY!r}: the header uses that key")
    array = np.asarray(value)
    code = _code_for(array.dtype)
    if code is None:
      raise TypeError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store")
    arrays[name], codes[name] = array, code

  order = sorted(arrays, key=lambda name: (-_ITEMSIZE[codes[name]], name))
  header: dict[str, Any] = {}
  if metadata:
    header[_METADATA_KEY] = dict(metadata)
  offset = 0
  for name in order:
    nbytes = arrays[name].size * _ITEMSIZE[codes[name]]
    header[name] = {
        "dtype": codes[name],
        "shape": [int(d) for d in arrays[name].shape],
        "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
  header_bytes += b" " * (-len(header_bytes) % 8)

  def write(f: BinaryIO) -> None:
    f.write(struct.pack("<Q", len(header_bytes)))
    f.write(header_bytes)
    for name in order:
      f.write(_little_endian_bytes(arrays[name]).data)

  if isinstance(path_or_file, (str, os.PathLike)):
    with open(path_or_file, "wb") as f:
      write(f)
  elif hasattr(path_or_file, "write"):
    write(path_or_file)
  else:
    raise TypeError(
        f"path_or_file must be a path or a binary file object, got {type(path_or_file).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# reading


def _short(obj: Any) -> str:
  """``repr(obj)``, cut short: messages quote untrusted values."""
  text = repr(obj)
  return text if len(text) <= 80 else text[:77] + "..."


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  seen: dict[str, Any] = {}
  for key, value in pairs:
    if key in seen:
      raise CheckpointError(f"the header names {_short(key)} twice")
    seen[key] = value
  return seen


def _parse_entry(name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
  """Validates one tensor's header entry; returns (code, shape, begin, end)."""
  if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
    raise CheckpointError(
        f"tensor {_short(name)}: header entry must be an object with exactly "
        f"{sorted(_ENTRY_KEYS)}, got {_short(entry)}"
    )
  code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
  if code not in _ITEMSIZE:
    raise CheckpointError(
        f"tensor {_short(name)} has dtype {_short(code)}, which is not supported (expected one "
        f"of {sorted(_ITEMSIZE)})"
    )
  if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
    raise CheckpointError(
        f"tensor {_short(name)} has shape {_short(shape)}, not a list of non-negative ints"
    )
  if (
      not isinstance(offsets, list)
      or len(offsets) != 2
      or not all(type(o) is int for o in offsets)
      or not 0 <= offsets[0] <= offsets[1]
  ):
    raise CheckpointError(
        f"tensor {_short(name)} has data_offsets {_short(offsets)}, not [begin, end] with "
        "0 <= begin <= end"
    )
  begin, end = offsets
  nbytes = math.prod(shape) * _ITEMSIZE[code]
  if end - begin != nbytes:
    raise CheckpointError(
        f"tensor {_short(name)}: shape {shape} of {code} needs {nbytes} bytes but data_offsets "
        f"[{begin}, {end}] span {end - begin}"
    )
  return code, tuple(shape), begin, end


def _read_exactly(f: BinaryIO, view: memoryview, what: str) -> None:
  pos = 0
  while pos < len(view):
    n = f.readinto(view[pos:])
    if not n:
      raise CheckpointError(f"{what}: the file ends after {pos} of {len(view)} bytes (truncated?)")
    pos += n


def _load(f: BinaryIO, base: int, file_size: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads the safetensors data that starts ``base`` bytes into ``f`` and is ``file_size`` long."""
  if file_size < 8:
    raise CheckpointError(f"the file is {file_size} bytes, too short for the 8-byte header length")
  (header_len,) = struct.unpack("<Q", f.read(8))
  if header_len > _MAX_HEADER_BYTES:
    raise CheckpointError(f"header length {header_len} exceeds the {_MAX_HEADER_BYTES}-byte limit")
  if 8 + header_len > file_size:
    raise CheckpointError(
        f"header length {header_len} runs past the end of the {file_size}-byte file (truncated?)"
    )
  raw_header = bytearray(header_len)
  _read_exactly(f, memoryview(raw_header), "header")
  try:
    header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
  except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
    raise CheckpointError(f"the header is not UTF-8 JSON ({type(e).__name__}: {e})") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"the header must be a JSON object, got {type(header).__name__}")

  metadata = header.pop(_METADATA_KEY, None)
  if metadata is None:
    metadata = {}
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise CheckpointError(f"{_METADATA_KEY} must map str to str, got {_short(metadata)}")

  entries = {name: _parse_entry(name, entry) for name, entry in header.items()}
  data_size = file_size - 8 - header_len
  expected = 0
  # The tensors must tile the data: sorted by offset, each starts where the previous ended.
  for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
    if begin != expected:
      problem = "overlaps" if begin < expected else "leaves a gap after"
      raise CheckpointError(
          f"tensor {_short(name)} starts at byte {begin} and {problem} the previous tensor "
          f"(which ends at {expected})"
      )
    expected = end
  if expected != data_size:
    raise CheckpointError(
        f"the tensors cover {expected} bytes but the file holds {data_size} bytes after the header"
        + (" (truncated?)" if expected > data_size else "")
    )

  # Every size below has now been checked against the real file size.
  tensors: dict[str, np.ndarray] = {}
  for name, (code, shape, begin, end) in entries.items():
    array = np.empty(shape, _numpy_dtype(code))
    f.seek(base + 8 + header_len + begin)
    _read_exactly(f, memoryview(array.reshape(-1).view(np.uint8)), f"tensor {_short(name)}")
    if sys.byteorder == "big" and array.dtype.itemsize > 1:
      array.byteswap(inplace=True)
    if code == "BOOL" and array.view(np.uint8).max(initial=0) > 1:
      raise CheckpointError(f"tensor {_short(name)} is BOOL but holds bytes other than 0 and 1")
    tensors[name] = array
  return tensors, metadata


def load_safetensors(path_or_file: PathOrFile) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads a safetensors file into numpy arrays.

  Args:
    path_or_file: a path (str or os.PathLike), or a binary file object, read from its current
      position.

  Returns:
    ``(tensors, metadata)``: tensors maps names to fresh, writable, native-order arrays in
    header order (bfloat16 and float8 as the ml_dtypes types of ``jax.numpy``); metadata is the
    ``__metadata__`` dict, ``{}`` if absent.

  Raises:
    CheckpointError: the header length points outside the file, the header is not a JSON
      object of valid entries, a dtype is unknown, a shape does not match its byte range, or
      the byte ranges overlap, leave gaps or do not end with the file. The message names the
      file.
    TypeError: ``path_or_file`` is neither a path nor a binary file object.
  """
  label = source_label(path_or_file)
  if isinstance(path_or_file, (str, os.PathLike)):
    f, owned = open(path_or_file, "rb"), True  # pylint: disable=consider-using-with
  elif hasattr(path_or_file, "read"):
    f, owned = path_or_file, False
    if not (getattr(f, "seekable", None) and f.seekable()):
      data = f.read()
      if not isinstance(data, bytes):
        raise TypeError("path_or_file must be opened in binary mode")
      f, owned = io.BytesIO(data), True
  else:
    raise TypeError(
        f"path_or_file must be a path or a binary file object, got {type(path_or_file).__name__}"
    )
  try:
    if not isinstance(f.read(0), bytes):
      raise TypeError("path_or_file must be opened in binary mode")
    start = f.tell()  # a file object is read from its current position
    file_size = f.seek(0, io.SEEK_END) - start
    f.seek(start)
    return _load(f, start, file_size)
  except CheckpointError as e:
    raise CheckpointError(f"{label}: {e}") from e.__cause__
  finally:
    if owned:
      f.close()
