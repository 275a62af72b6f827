"""``save_safetensors`` / ``load_safetensors`` against the reference ``safetensors`` package."""

from __future__ import annotations

import io
import json
import struct

import hypothesis
import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import strategies as st

from flax_qmha._safetensors import CheckpointError, load_safetensors, save_safetensors
from io_helpers import NonSeekableStream

NUMPY_CODES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "C64": np.complex64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
ML_CODES = {  # code -> (jax.numpy dtype, torch dtype)
    "BF16": (jnp.bfloat16, torch.bfloat16),
    "F8_E4M3": (jnp.float8_e4m3fn, torch.float8_e4m3fn),
    "F8_E5M2": (jnp.float8_e5m2, torch.float8_e5m2),
}


def _sample(dtype, shape, seed=0) -> np.ndarray:
  """Random values of ``dtype`` covering its range, always an ndarray (also for shape ())."""
  rng = np.random.default_rng(seed)
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    values = rng.random(shape) > 0.5
  elif dtype.kind in "iu":
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
  elif dtype.kind == "c":
    values = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
  else:
    values = rng.standard_normal(shape)
  return np.asarray(values, dtype=dtype)


def _bits(array: np.ndarray) -> bytes:
  return np.ascontiguousarray(array).tobytes()


def _assert_identical(ours: dict, ref: dict):
  assert sorted(ours) == sorted(ref)
  for name in ref:
    a, b = np.asarray(ours[name]), np.asarray(ref[name])
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert _bits(a) == _bits(b), name


SHAPES = {"scalar_0d": (), "vector": (5,), "matrix": (3, 4), "cube": (2, 3, 2), "empty": (0, 3)}


@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("code", list(NUMPY_CODES))
def test_roundtrip_and_reference_reads_ours(tmp_path, code, shape_id):
  tensors = {"t": _sample(NUMPY_CODES[code], SHAPES[shape_id]), "other": np.arange(3, dtype=np.int8)}
  path = tmp_path / "x.safetensors"
  save_safetensors(path, tensors, metadata={"format": "np"})
  ours, meta = load_safetensors(path)
  _assert_identical(ours, tensors)
  assert meta == {"format": "np"}
  assert all(a.flags.writeable and a.flags.c_contiguous for a in ours.values())
  _assert_identical(safetensors.numpy.load_file(path), tensors)
  header = json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
  assert header["t"]["dtype"] == code


@pytest.mark.parametrize("code", list(NUMPY_CODES))
def test_we_read_the_reference_writer(tmp_path, code):
  tensors = {"a": _sample(NUMPY_CODES[code], (4, 3), seed=1), "b": _sample(NUMPY_CODES[code], (), seed=2)}
  path = tmp_path / "ref.safetensors"
  safetensors.numpy.save_file(tensors, path, metadata={"who": "reference", "ü": "ünïcode"})
  ours, meta = load_safetensors(path)
  _assert_identical(ours, tensors)
  assert meta == {"who": "reference", "ü": "ünïcode"}


@pytest.mark.parametrize("code", list(ML_CODES))
def test_ml_dtypes_both_directions_via_torch(tmp_path, code):
  """bfloat16 / float8 have no numpy dtype: compare bit patterns with torch's tensors."""
  jdtype, tdtype = ML_CODES[code]
  t = torch.randn(3, 5).to(tdtype)
  path = tmp_path / "torch.safetensors"
  safetensors.torch.save_file({"w": t}, path, metadata={"m": "1"})
  ours, meta = load_safetensors(path)
  assert ours["w"].dtype == np.dtype(jdtype) and ours["w"].shape == (3, 5) and meta == {"m": "1"}
  assert _bits(ours["w"]) == t.view(torch.uint8 if t.element_size() == 1 else torch.int16).numpy().tobytes()

  mine = np.asarray(jnp.linspace(-3, 3, 7).astype(jdtype))
  out = tmp_path / "ours.safetensors"
  save_safetensors(out, {"v": mine, "jax_array": jnp.ones((2, 2), jdtype)})
  back = safetensors.torch.load_file(out)
  assert back["v"].dtype == tdtype and back["jax_array"].shape == (2, 2)
  view_as = torch.uint8 if back["v"].element_size() == 1 else torch.int16
  assert back["v"].view(view_as).numpy().tobytes() == _bits(mine)


def test_layout_is_aligned_and_header_padded(tmp_path):
  tensors = {
      "i8": np.ones(3, np.int8),
      "f64": np.ones(2),
      "f16": np.ones(5, np.float16),
      "f32": np.ones(1, np.float32),
  }
  path = tmp_path / "a.safetensors"
  save_safetensors(path, tensors)
  data = path.read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  assert n % 8 == 0
  header = json.loads(data[8 : 8 + n])
  for name, entry in header.items():
    start = 8 + n + entry["data_offsets"][0]
    assert start % np.dtype(tensors[name].dtype).itemsize == 0, name


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4).T,
        np.arange(10, dtype=np.int64)[::3],
        np.arange(6, dtype=">f4"),
        np.arange(6, dtype=">i8").reshape(2, 3),
        jnp.arange(6.0).reshape(2, 3),
    ],
    ids=["transposed", "strided", "big_endian_f32", "big_endian_i64", "jax_array"],
)
def test_writer_accepts_views_other_byte_orders_and_jax(tmp_path, array):
  path = tmp_path / "v.safetensors"
  save_safetensors(path, {"x": array})
  expected = np.asarray(array)
  expected = expected.astype(expected.dtype.newbyteorder("="))
  ours, _ = load_safetensors(path)
  np.testing.assert_array_equal(ours["x"], expected)
  assert ours["x"].dtype == expected.dtype
  np.testing.assert_array_equal(safetensors.numpy.load_file(path)["x"], expected)


def test_empty_file_of_tensors(tmp_path):
  path = tmp_path / "e.safetensors"
  save_safetensors(path, {})
  assert load_safetensors(path) == ({}, {})
  assert safetensors.numpy.load_file(path) == {}
  assert load_safetensors(io.BytesIO(safetensors.numpy.save({}))) == ({}, {})


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
        hnp.arrays(
            st.sampled_from([np.float32, np.float64, np.int8, np.int32, np.uint16, np.bool_]),
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
        ),
        max_size=4,
    ),
    st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
)
def test_matches_reference_both_ways(tensors, metadata):
  ours_bytes = io.BytesIO()
  save_safetensors(ours_bytes, tensors, metadata=metadata)
  _assert_identical(safetensors.numpy.load(ours_bytes.getvalue()), tensors)
  ref_bytes = safetensors.numpy.save(tensors, metadata=metadata or None)
  loaded, meta = load_safetensors(io.BytesIO(ref_bytes))
  _assert_identical(loaded, tensors)
  assert meta == metadata


@pytest.mark.parametrize("how", ["str", "pathlib", "open_file", "bytesio_after_prefix", "non_seekable"])
def test_sources(tmp_path, how):
  tensors = {"w": np.arange(4, dtype=np.float32)}
  path = tmp_path / "s.safetensors"
  if how == "str":
    save_safetensors(str(path), tensors)
    loaded, _ = load_safetensors(str(path))
  elif how == "pathlib":
    save_safetensors(path, tensors)
    loaded, _ = load_safetensors(path)
  elif how == "open_file":
    with open(path, "wb") as f:
      save_safetensors(f, tensors)
    with open(path, "rb") as f:
      loaded, _ = load_safetensors(f)
  elif how == "bytesio_after_prefix":
    buf = io.BytesIO()
    buf.write(b"PREFIX")
    save_safetensors(buf, tensors)
    buf.seek(6)  # a file object is read from where it stands
    loaded, _ = load_safetensors(buf)
  else:
    buf = io.BytesIO()
    save_safetensors(buf, tensors)
    loaded, _ = load_safetensors(io.BufferedReader(NonSeekableStream(buf.getvalue())))
  _assert_identical(loaded, tensors)


# ---------------------------------------------------------------------------------------------
# malformed files


def _file(header, data: bytes = b"", header_len: int | None = None) -> bytes:
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def _f32(name="a", shape=(2,), offsets=(0, 8)):
  return {name: {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}}


MALFORMED = {
    # id: (file bytes, text the error must contain)
    "shorter_than_length_field": (b"\x01\x02", "too short for the 8-byte header length"),
    "header_length_past_end": (_file(b"{}", header_len=1000), "runs past the end"),
    "header_length_huge": (_file(b"{}", header_len=2**63), "exceeds the 100000000-byte limit"),
    "header_not_json": (_file(b"not json"), "not UTF-8 JSON"),
    "header_not_utf8": (_file(b'{"\xff": 1}'), "not UTF-8 JSON"),
    "header_is_a_list": (_file(b"[]"), "must be a JSON object"),
    "header_int_too_long": (_file(b'{"a":{"dtype":"U8","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,1]}}'),
                            "not UTF-8 JSON"),
    "duplicate_tensor_name": (_file(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                                    b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"xy"), "names 'a' twice"),
    "unknown_dtype": (_file({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
                      "dtype 'F128', which is not supported"),
    "shape_does_not_match_bytes": (_file(_f32(shape=(3,)), bytes(8)), "needs 12 bytes but data_offsets [0, 8] span 8"),
    "huge_shape_small_range": (_file(_f32(shape=(2**40, 2**40)), bytes(8)), "span 8"),
    "negative_dimension": (_file(_f32(shape=(-2,)), bytes(8)), "not a list of non-negative ints"),
    "float_dimension": (_file(_f32(shape=(2.0,)), bytes(8)), "not a list of non-negative ints"),
    "offsets_reversed": (_file(_f32(offsets=(8, 0)), bytes(8)), "0 <= begin <= end"),
    "offsets_not_pair": (_file(_f32(offsets=(0,)), bytes(8)), "not [begin, end]"),
    "offsets_past_end": (_file(_f32(offsets=(8, 16)), bytes(8)), "leaves a gap"),
    "data_truncated": (_file(_f32(), bytes(5)), "cover 8 bytes but the file holds 5 bytes after the header (truncated?)"),
    "trailing_bytes": (_file(_f32(), bytes(12)), "cover 8 bytes but the file holds 12"),
    "overlapping_tensors": (_file({**_f32("a", (2,), (0, 8)), **_f32("b", (2,), (4, 12))}, bytes(12)),
                            "overlaps the previous tensor"),
    "gap_between_tensors": (_file({**_f32("a", (1,), (0, 4)), **_f32("b", (1,), (8, 12))}, bytes(12)),
                            "leaves a gap"),
    "entry_missing_key": (_file({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "exactly ['data_offsets', 'dtype', 'shape']"),
    "entry_extra_key": (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, bytes(8)),
                        "exactly ['data_offsets', 'dtype', 'shape']"),
    "entry_not_object": (_file({"a": [1, 2]}), "header entry must be an object"),
    "metadata_value_not_str": (_file({"__metadata__": {"k": 1}}), "__metadata__ must map str to str"),
    "metadata_not_object": (_file({"__metadata__": ["k"]}), "__metadata__ must map str to str"),
    "bool_byte_not_0_or_1": (_file({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x07"),
                             "holds bytes other than 0 and 1"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_raises_clear_error(tmp_path, case):
  data, expected = MALFORMED[case]
  path = tmp_path / f"{case}.safetensors"
  path.write_bytes(data)
  with pytest.raises(CheckpointError) as info:
    load_safetensors(path)
  message = str(info.value)
  assert expected in message, message
  assert str(path) in message, message


def test_checkpoint_error_is_shared_with_the_torch_reader():
  from flax_qmha import _torch_pickle  # pylint: disable=g-import-not-at-top

  assert CheckpointError is _torch_pickle.CheckpointError
  assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize(
    "tensors, metadata, error, text",
    [
        ([("a", np.ones(1))], None, TypeError, "must be a mapping"),
        ({1: np.ones(1)}, None, TypeError, "names must be str"),
        ({"__metadata__": np.ones(1)}, None, ValueError, "may not be named '__metadata__'"),
        ({"a": np.array(["text"])}, None, TypeError, "safetensors cannot store"),
        ({"a": np.array([object()])}, None, TypeError, "safetensors cannot store"),
        ({"a": np.ones(2, np.complex128)}, None, TypeError, "complex128"),
        ({"a": np.ones(1)}, {"k": 1}, TypeError, "metadata must map str to str"),
        ({"a": np.ones(1)}, ["k"], TypeError, "metadata must be a mapping"),
    ],
    ids=["not_a_mapping", "non_str_name", "reserved_name", "unicode_array", "object_array",
         "complex128", "metadata_value_not_str", "metadata_not_a_mapping"],
)  # fmt: skip
def test_writer_rejects_bad_arguments(tmp_path, tensors, metadata, error, text):
  with pytest.raises(error, match=text):
    save_safetensors(tmp_path / "bad.safetensors", tensors, metadata)
  assert not (tmp_path / "bad.safetensors").exists()


def test_bad_sources(tmp_path):
  with pytest.raises(TypeError, match="path or a binary file object"):
    load_safetensors(42)
  with pytest.raises(TypeError, match="path or a binary file object"):
    save_safetensors(42, {})
  path = tmp_path / "t.safetensors"
  save_safetensors(path, {"a": np.ones(1)})
  with open(path, encoding="latin1") as f, pytest.raises(TypeError, match="binary mode"):
    load_safetensors(f)


def test_error_names_file_object():
  with pytest.raises(CheckpointError, match="BytesIO object"):
    load_safetensors(io.BytesIO(b"\x00"))
