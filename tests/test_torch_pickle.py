"""``load_torch_file`` against ``torch.load(weights_only=True)``, and against hostile files.

Every real checkpoint here is written by torch itself (float MHA, a 3-layer TransformerEncoder,
the observed and the converted quantizable MHA from torch's own prepare/convert flow, and a dict
of every dtype and tensor layout); hostile ones are assembled opcode by opcode.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import pickle
import shutil
import struct
import subprocess
import sys
import uuid
import warnings
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from flax_qmha._torch_pickle import CheckpointError, QuantizedTensor, load_torch_file
from io_helpers import NonSeekableStream

REPO = pathlib.Path(__file__).resolve().parents[1]

# torch's own deprecation chatter while building the reference checkpoints.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*torch.ao.quantization is deprecated"),
    pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions"),
    pytest.mark.filterwarnings("ignore:must run observer before calling calculate_qparams"),
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated"),
    pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max"),
]

TORCH_TO_NUMPY = {
    torch.float64: np.dtype(np.float64),
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(jnp.bfloat16),
    torch.complex64: np.dtype(np.complex64),
    torch.complex128: np.dtype(np.complex128),
    torch.int64: np.dtype(np.int64),
    torch.int32: np.dtype(np.int32),
    torch.int16: np.dtype(np.int16),
    torch.int8: np.dtype(np.int8),
    torch.uint64: np.dtype(np.uint64),
    torch.uint32: np.dtype(np.uint32),
    torch.uint16: np.dtype(np.uint16),
    torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_),
    torch.float8_e4m3fn: np.dtype(jnp.float8_e4m3fn),
    torch.float8_e5m2: np.dtype(jnp.float8_e5m2),
    torch.float8_e8m0fnu: np.dtype(jnp.float8_e8m0fnu),
}
QDTYPES = {torch.qint8: "qint8", torch.quint8: "quint8", torch.qint32: "qint32"}


# ---------------------------------------------------------------------------------------------
# comparison with torch.load


def _torch_bytes(t: torch.Tensor) -> bytes:
  """The element bytes of ``t`` in C order, with lazy conj/neg resolved."""
  t = t.detach().resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)
  return bytes(t.untyped_storage())


def assert_same(ours, theirs, path="<root>"):
  """Asserts that ``ours`` (load_torch_file) decodes exactly what ``theirs`` (torch.load) holds."""
  if isinstance(theirs, torch.Tensor) and theirs.is_quantized:
    assert isinstance(ours, QuantizedTensor), f"{path}: {type(ours)}"
    assert ours.dtype == QDTYPES[theirs.dtype], path
    assert ours.shape == tuple(theirs.shape), path
    np.testing.assert_array_equal(ours.int_repr, theirs.int_repr().numpy(), err_msg=path)
    assert ours.qscheme == str(theirs.qscheme()), path
    if theirs.qscheme() == torch.per_tensor_affine:
      assert ours.axis is None, path
      assert type(ours.scale) is float and ours.scale == theirs.q_scale(), path
      assert type(ours.zero_point) is int and ours.zero_point == theirs.q_zero_point(), path
    else:
      assert ours.axis == theirs.q_per_channel_axis(), path
      for mine, ref in ((ours.scale, theirs.q_per_channel_scales()),
                        (ours.zero_point, theirs.q_per_channel_zero_points())):  # fmt: skip
        assert mine.dtype == TORCH_TO_NUMPY[ref.dtype], path
        np.testing.assert_array_equal(mine, ref.numpy(), err_msg=path)
    dq = ours.dequantize()
    assert dq.dtype == np.float32, path
    np.testing.assert_array_equal(dq, theirs.dequantize().numpy(), err_msg=f"{path} dequantize")
  elif isinstance(theirs, torch.Tensor):
    assert isinstance(ours, np.ndarray), f"{path}: {type(ours)}"
    assert ours.dtype == TORCH_TO_NUMPY[theirs.dtype], f"{path}: {ours.dtype} vs {theirs.dtype}"
    assert ours.shape == tuple(theirs.shape), f"{path}: {ours.shape} vs {tuple(theirs.shape)}"
    assert np.ascontiguousarray(ours).tobytes() == _torch_bytes(theirs), f"{path}: values differ"
  elif isinstance(theirs, (torch.dtype, torch.qscheme)):
    assert ours == str(theirs), path
  elif isinstance(theirs, torch.Size):
    assert type(ours) is tuple and ours == tuple(theirs), path
  elif isinstance(theirs, torch.device):
    assert ours == str(theirs), path
  elif isinstance(theirs, dict):
    assert type(ours) is type(theirs), f"{path}: {type(ours)} vs {type(theirs)}"
    assert list(ours) == list(theirs), f"{path}: keys differ"
    for key in theirs:
      assert_same(ours[key], theirs[key], f"{path}[{key!r}]")
    if hasattr(theirs, "_metadata"):
      assert ours._metadata == theirs._metadata, f"{path}._metadata"
  elif isinstance(theirs, (tuple, list)):
    assert type(ours) is type(theirs) and len(ours) == len(theirs), path
    for i, (a, b) in enumerate(zip(ours, theirs)):
      assert_same(a, b, f"{path}[{i}]")
  else:
    assert type(ours) is type(theirs) and ours == theirs, f"{path}: {ours!r} vs {theirs!r}"


# ---------------------------------------------------------------------------------------------
# real checkpoints, written by torch


class _QuantWrapped(nn.Module):
  """A float MHA between QuantStub/DeQuantStub, as torch's eager-mode flow expects."""

  def __init__(self, embed_dim=8, num_heads=2):
    super().__init__()
    self.quant = torch.ao.quantization.QuantStub()
    self.mha = nn.MultiheadAttention(embed_dim, num_heads)
    self.dequant = torch.ao.quantization.DeQuantStub()

  def forward(self, x):
    x = self.quant(x)
    y, _ = self.mha(x, x, x)
    return self.dequant(y)


def _observed_and_converted():
  torch.manual_seed(0)
  model = _QuantWrapped().eval()
  model.qconfig = torch.ao.quantization.get_default_qconfig("x86")
  observed = torch.ao.quantization.prepare(
      model,
      prepare_custom_config_dict={
          "float_to_observed_custom_module_class": {
              nn.MultiheadAttention: torch.ao.nn.quantizable.MultiheadAttention
          }
      },
  )
  with torch.no_grad():
    observed(torch.randn(5, 3, 8))  # calibrate the HistogramObservers
  observed_sd = observed.state_dict()
  converted = torch.ao.quantization.convert(  # inplace=False: ``observed`` stays as it is
      observed,
      convert_custom_config_dict={
          "observed_to_quantized_custom_module_class": {
              torch.ao.nn.quantizable.MultiheadAttention: torch.ao.nn.quantized.MultiheadAttention
          }
      },
  )
  return observed_sd, converted.state_dict()


def _assorted_tensors():
  torch.manual_seed(1)
  base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
  w = torch.randn(4, 6)
  with_attr = torch.randn(3)
  with_attr.note = "python attribute"  # saved through torch._tensor._rebuild_from_type_v2
  param_with_attr = nn.Parameter(torch.randn(2))
  param_with_attr.note = 1  # saved through _rebuild_parameter_with_state
  qt = torch.quantize_per_tensor(w, 0.05, 3, torch.qint8)
  return {
      "float32": torch.randn(3, 4),
      "float64": torch.randn(2, 2, dtype=torch.float64),
      "float16": torch.randn(5).half(),
      "bfloat16": torch.randn(2, 3).bfloat16(),
      "complex64": torch.randn(3, dtype=torch.complex64),
      "complex128": torch.randn(2, dtype=torch.complex128),
      "int8": torch.randint(-128, 128, (7,), dtype=torch.int8),
      "int16": torch.randint(-(2**15), 2**15, (3,), dtype=torch.int16),
      "int32": torch.randint(-(2**31), 2**31, (3,), dtype=torch.int32),
      "int64": torch.tensor([-(2**63), 2**63 - 1, 0]),
      "uint8": torch.randint(0, 256, (4,), dtype=torch.uint8),
      "uint16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
      "uint32": torch.tensor([0, 2**32 - 1], dtype=torch.uint32),
      "uint64": torch.tensor([0, 2**64 - 1], dtype=torch.uint64),
      "bool": torch.tensor([True, False, True]),
      "float8_e4m3fn": torch.randn(6).to(torch.float8_e4m3fn),
      "float8_e5m2": torch.randn(6).to(torch.float8_e5m2),
      "float8_e8m0fnu": torch.rand(4).to(torch.float8_e8m0fnu),
      "nan_inf": torch.tensor([float("nan"), float("inf"), -0.0]),
      "base": base,
      "transposed_shares_base": base.transpose(0, 2),
      "slice_with_offset": base[1, :, 1:3],
      "strided_step": base.view(-1)[3::5],
      "scalar_0d": torch.tensor(2.5),
      "element_0d_offset": base[1, 2, 3],
      "empty": torch.empty(0, 5),
      "empty_middle": torch.empty(3, 0, 2),
      "expanded_stride0": torch.arange(3.0).expand(4, 3),
      "conj_view": torch.randn(3, dtype=torch.complex64).conj(),
      "neg_view": torch._neg_view(torch.randn(3)),
      "parameter": nn.Parameter(torch.randn(2, 2)),
      "parameter_frozen": nn.Parameter(torch.randn(3), requires_grad=False),
      "tensor_with_attribute": with_attr,
      "parameter_with_attribute": param_with_attr,
      "q_per_tensor_qint8": qt,
      "q_per_tensor_qint8_transposed": qt.t(),
      "q_per_tensor_quint8": torch.quantize_per_tensor(w, 0.1, 120, torch.quint8),
      "q_per_tensor_qint32": torch.quantize_per_tensor(w, 1e-3, -7, torch.qint32),
      "q_per_channel_axis0_qint8": torch.quantize_per_channel(
          w, torch.rand(4) / 10 + 0.01, torch.zeros(4, dtype=torch.long), 0, torch.qint8
      ),
      "q_per_channel_axis1_quint8": torch.quantize_per_channel(
          w, torch.rand(6) / 10 + 0.01, torch.randint(0, 255, (6,)), 1, torch.quint8
      ),
      "q_per_channel_row_slice": torch.quantize_per_channel(
          w, torch.rand(6) / 10 + 0.01, torch.randint(0, 255, (6,)), 1, torch.quint8
      )[1:],
      "q_per_channel_float_qparams": torch.quantize_per_channel(
          w, torch.rand(4) / 10 + 0.01, torch.randn(4), 0, torch.quint8
      ),
  }


def _containers():
  return {
      "list": [1, -5, 2.5, "text", None, True, False],
      "tuple": (torch.ones(1), "x", (2, 3)),
      "nested": {"a": {"b": [torch.zeros(2), {"c": torch.tensor(7)}]}},
      "bytes": b"\x00\xffabc",
      "dtype": torch.qint8,
      "float_dtype": torch.float32,
      "qscheme": torch.per_channel_affine,
      "size": torch.Size([2, 3]),
      "device": torch.device("cpu"),
      "set": {1, 2, 3},
      "complex": 1 + 2j,
      "big_int": 2**70,
      "ordered": collections.OrderedDict([("z", 1), ("a", 2)]),
      "counter": collections.Counter({"x": 3}),
  }


def _real_objects():
  torch.manual_seed(2)
  observed, converted = _observed_and_converted()
  encoder = nn.TransformerEncoder(
      nn.TransformerEncoderLayer(16, 4, 32), num_layers=3, enable_nested_tensor=False
  )
  return {
      "float_mha": nn.MultiheadAttention(16, 4).state_dict(),
      "float_mha_kdim_vdim_bias_kv": nn.MultiheadAttention(
          16, 4, kdim=8, vdim=12, add_bias_kv=True
      ).state_dict(),
      "transformer_encoder_3_layers": encoder.state_dict(),
      "observed_quantizable_mha": observed,
      "converted_quantized_mha": converted,
      "assorted_tensors": _assorted_tensors(),
      "containers": _containers(),
  }


KINDS = (
    "float_mha",
    "float_mha_kdim_vdim_bias_kv",
    "transformer_encoder_3_layers",
    "observed_quantizable_mha",
    "converted_quantized_mha",
    "assorted_tensors",
    "containers",
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, pathlib.Path]:
  folder = tmp_path_factory.mktemp("torch_saved")
  paths = {}
  for kind, obj in _real_objects().items():
    paths[kind] = folder / f"{kind}.pt"
    torch.save(obj, paths[kind])
  return paths


@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_load(saved, kind):
  theirs = torch.load(saved[kind], weights_only=True)
  ours = load_torch_file(saved[kind])
  assert_same(ours, theirs)


def test_converted_quantized_mha_layout(saved):
  """What a converted torch.ao.nn.quantized.MultiheadAttention state_dict decodes to."""
  sd = load_torch_file(saved["converted_quantized_mha"])
  assert type(sd) is collections.OrderedDict
  for linear in ("linear_Q", "linear_K", "linear_V", "out_proj"):
    prefix = f"mha.{linear}"
    assert sd[f"{prefix}._packed_params.dtype"] == "torch.qint8"
    weight, bias = sd[f"{prefix}._packed_params._packed_params"]
    assert isinstance(weight, QuantizedTensor) and weight.dtype == "qint8"
    assert weight.qscheme == "torch.per_channel_affine" and weight.axis == 0
    assert weight.shape == (8, 8) and weight.scale.dtype == np.float64
    assert weight.zero_point.dtype == np.int64 and not weight.zero_point.any()
    assert isinstance(bias, np.ndarray) and bias.dtype == np.float32 and bias.shape == (8,)
    assert sd[f"{prefix}.scale"].dtype == np.float32 and sd[f"{prefix}.scale"].shape == ()
    assert sd[f"{prefix}.zero_point"].dtype == np.int64 and sd[f"{prefix}.zero_point"].shape == ()
  for site in ("quant_attn_output", "quant_attn_output_weights"):
    assert sd[f"mha.{site}.scale"].shape == (1,) and sd[f"mha.{site}.zero_point"].shape == (1,)
  assert sd._metadata["mha.linear_Q"] == {"version": 3}


def test_observed_mha_has_histogram_observers(saved):
  sd = load_torch_file(saved["observed_quantizable_mha"])
  for site in ("linear_Q", "linear_K", "linear_V", "out_proj", "quant_attn_output"):
    prefix = f"mha.{site}.activation_post_process"
    assert sd[f"{prefix}.histogram"].shape == (2048,)
    assert sd[f"{prefix}.eps"].shape == (1,)
    assert sd[f"{prefix}.min_val"].shape == () and sd[f"{prefix}.max_val"].shape == ()
    assert sd[f"{prefix}.min_val"] <= sd[f"{prefix}.max_val"]


def test_shared_storage_is_shared_memory(saved):
  ours = load_torch_file(saved["assorted_tensors"])
  assert np.shares_memory(ours["base"], ours["transposed_shares_base"])
  assert np.shares_memory(ours["base"], ours["slice_with_offset"])
  assert ours["base"].flags.writeable
  assert not ours["expanded_stride0"].flags.writeable  # overlapping elements: read-only view


@pytest.mark.parametrize("how", ["str", "pathlib", "open_file", "bytesio", "non_seekable"])
def test_sources(saved, how):
  path = saved["float_mha"]
  theirs = torch.load(path, weights_only=True)

  if how == "str":
    ours = load_torch_file(str(path))
  elif how == "pathlib":
    ours = load_torch_file(path)
  elif how == "open_file":
    with open(path, "rb") as f:
      ours = load_torch_file(f)
      assert not f.closed  # the caller's file stays the caller's
  elif how == "bytesio":
    ours = load_torch_file(io.BytesIO(path.read_bytes()))
  else:
    ours = load_torch_file(io.BufferedReader(NonSeekableStream(path.read_bytes())))
  assert_same(ours, theirs)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_protocols(tmp_path, protocol):
  """torch.save(pickle_protocol=...) beyond the default 2: frames, memoize, STACK_GLOBAL."""
  obj = {"w": torch.randn(3, 2), "q": torch.quantize_per_tensor(torch.randn(4), 0.1, 2, torch.quint8),
         "meta": {"name": "x" * 300, "big": 2**80, "blob": bytes(range(256))}}  # fmt: skip
  path = tmp_path / "p.pt"
  torch.save(obj, path, pickle_protocol=protocol)
  # weights_only=False is safe here: the file was just written by this test.
  assert_same(load_torch_file(path), torch.load(path, weights_only=False))


def test_root_folder_name_is_free(tmp_path):
  buf = io.BytesIO()
  torch.save({"w": torch.ones(2)}, buf)  # root "archive"
  (tmp_path / "my_weights.pt").write_bytes(buf.getvalue())
  torch.save({"w": torch.ones(2)}, tmp_path / "other.pt")  # root "other"
  assert zipfile.ZipFile(tmp_path / "other.pt").namelist()[0].startswith("other/")
  for name in ("my_weights.pt", "other.pt"):
    np.testing.assert_array_equal(load_torch_file(tmp_path / name)["w"], np.ones(2, np.float32))


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 2),
        torch.randn(4, dtype=torch.float64),
        torch.randint(-1000, 1000, (5,), dtype=torch.int16),
        torch.randn(3).bfloat16(),
        torch.randn(2, dtype=torch.complex64),
        torch.tensor([1, 2**40]),
    ],
    ids=["float32", "float64", "int16", "bfloat16", "complex64", "int64"],
)
def test_big_endian_archive(tmp_path, tensor):
  """A file written on a big-endian machine: same pickle, byte-swapped storages, byteorder=big."""
  little = tmp_path / "little.pt"
  torch.save({"t": tensor}, little)
  item = tensor.element_size() // (2 if tensor.is_complex() else 1)
  big = tmp_path / "big.pt"
  with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
    for info in src.infolist():
      data = src.read(info)
      if info.filename.endswith("/byteorder"):
        data = b"big"
      elif info.filename.endswith("/data/0"):
        data = np.frombuffer(data, f"<u{item}").byteswap().tobytes()
      dst.writestr(info.filename, data)
  assert_same(load_torch_file(big), {"t": tensor})


def test_reading_works_with_torch_blocked(saved):
  """The reader must not need torch: block its import and read a quantized checkpoint."""
  path = saved["assorted_tensors"]
  script = f"""
import json, sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
sys.path.insert(0, {str(REPO)!r})
from flax_qmha._torch_pickle import QuantizedTensor, load_torch_file
sd = load_torch_file({str(path)!r})
assert sys.modules["torch"] is None
out = {{}}
for key, value in sd.items():
  if isinstance(value, QuantizedTensor):
    out[key] = [value.dtype, list(value.shape), value.int_repr.astype("int64").ravel().tolist()]
  else:
    out[key] = [str(value.dtype), list(value.shape), value.astype("float64").ravel().tolist()
                if value.dtype.kind in "fiub" else None]
print(json.dumps(out))
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  expected = load_torch_file(path)
  assert set(got) == set(expected)
  for key, (dtype, shape, values) in got.items():
    value = expected[key]
    assert list(value.shape) == shape, key
    if isinstance(value, QuantizedTensor):
      assert dtype == value.dtype and values == value.int_repr.astype("int64").ravel().tolist(), key
    else:
      assert dtype == str(value.dtype), key
      if values is not None:
        np.testing.assert_array_equal(np.asarray(values).reshape(shape), value.astype("float64"), err_msg=key)


# ---------------------------------------------------------------------------------------------
# QuantizedTensor itself


def test_quantized_tensor_rejects_inconsistent_fields():
  q = np.zeros((2, 3), np.int8)
  with pytest.raises(ValueError, match="dtype must be one of"):
    QuantizedTensor(q, 0.1, 0, None, "int8")
  with pytest.raises(ValueError, match="int_repr must be a uint8 array"):
    QuantizedTensor(q, 0.1, 0, None, "quint8")
  with pytest.raises(ValueError, match="axis 2 out of range"):
    QuantizedTensor(q, np.ones(3), np.zeros(3, np.int64), 2, "qint8")
  with pytest.raises(ValueError, match="per-channel scale must be 1-D of length 2"):
    QuantizedTensor(q, np.ones(3), np.zeros(2, np.int64), 0, "qint8")
  with pytest.raises(ValueError, match="must be scalars"):
    QuantizedTensor(q, np.ones(2), 0, None, "qint8")
  assert "per_tensor_affine" in repr(QuantizedTensor(q, 0.5, 1, None, "qint8"))


# ---------------------------------------------------------------------------------------------
# hostile and broken files


class G:
  """A global reference in a hand-assembled pickle."""

  def __init__(self, module, name):
    self.module, self.name = module, name


class Call:
  """``func(*args)`` via REDUCE."""

  def __init__(self, func, *args):
    self.func, self.args = func, args


class Pid:
  """A persistent id (BINPERSID)."""

  def __init__(self, *parts):
    self.parts = parts


class Build:
  """``obj`` then ``state`` then BUILD."""

  def __init__(self, obj, state):
    self.obj, self.state = obj, state


class Raw:
  """Opcodes inserted verbatim."""

  def __init__(self, data: bytes):
    self.data = data


def _emit(obj) -> bytes:
  if isinstance(obj, Raw):
    return obj.data
  if isinstance(obj, G):
    return b"c" + f"{obj.module}\n{obj.name}\n".encode()
  if isinstance(obj, Call):
    return _emit(obj.func) + _emit(tuple(obj.args)) + pickle.REDUCE
  if isinstance(obj, Pid):
    return _emit(tuple(obj.parts)) + pickle.BINPERSID
  if isinstance(obj, Build):
    return _emit(obj.obj) + _emit(obj.state) + pickle.BUILD
  if obj is None:
    return pickle.NONE
  if obj is True or obj is False:
    return pickle.NEWTRUE if obj else pickle.NEWFALSE
  if isinstance(obj, int):
    if 0 <= obj < 256:
      return pickle.BININT1 + bytes([obj])
    body = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(body)]) + body
  if isinstance(obj, float):
    return pickle.BINFLOAT + struct.pack(">d", obj)
  if isinstance(obj, str):
    data = obj.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data
  if isinstance(obj, tuple):
    return pickle.MARK + b"".join(map(_emit, obj)) + pickle.TUPLE
  if isinstance(obj, list):
    return pickle.EMPTY_LIST + pickle.MARK + b"".join(map(_emit, obj)) + pickle.APPENDS
  if isinstance(obj, dict):
    body = b"".join(_emit(k) + _emit(v) for k, v in obj.items())
    return pickle.EMPTY_DICT + pickle.MARK + body + pickle.SETITEMS
  raise TypeError(obj)


def assemble(obj) -> bytes:
  return pickle.PROTO + b"\x02" + _emit(obj) + pickle.STOP


ODICT = Call(G("collections", "OrderedDict"))
FLOAT_STORAGE = G("torch", "FloatStorage")


def v2(storage_pid, offset, size, stride):
  return Call(G("torch._utils", "_rebuild_tensor_v2"), storage_pid, offset, size, stride, False, ODICT)


def _pid(storage_type=FLOAT_STORAGE, key="0", numel=6):
  return Pid("storage", storage_type, key, "cpu", numel)


def _qtensor(storage_pid, quantizer_params):
  return Call(G("torch._utils", "_rebuild_qtensor"), storage_pid, 0, (6,), (1,), quantizer_params, False, ODICT)


def write_archive(path, pkl: bytes, storages=None, root="archive", extra=()):
  """A zip laid out like torch.save's: <root>/data.pkl, byteorder, data/<key>, version."""
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(f"{root}/data.pkl", pkl)
    zf.writestr(f"{root}/byteorder", "little")
    for key, data in (storages or {}).items():
      zf.writestr(f"{root}/data/{key}", data)
    zf.writestr(f"{root}/version", "3\n")
    for name, data in extra:
      zf.writestr(name, data)
  return path


SIX_FLOATS = np.arange(6, dtype="<f4").tobytes()


def test_assembler_builds_loadable_tensors(tmp_path):
  """The hand assembler writes what torch writes: both readers agree on it."""
  pkl = assemble({
      "t": v2(_pid(), 1, (2, 2), (1, 2)),
      "v1": Call(G("torch._utils", "_rebuild_tensor"), _pid(), 0, (3,), (2,)),
  })  # fmt: skip
  path = write_archive(tmp_path / "ok.pt", pkl, {"0": SIX_FLOATS})
  ours = load_torch_file(path)
  assert_same(ours, torch.load(path, weights_only=True))
  np.testing.assert_array_equal(ours["t"], [[1, 3], [2, 4]])


class _Reduce:
  """An object whose unpickling calls ``func(*args)``: the classic pickle exploit."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _malicious_cases(marker: str):
  touch = f"touch {marker}"
  cases = {
      # id: (pickle bytes, text the error must contain)
      "reduce_os_system": (pickle.dumps({"w": _Reduce(os.system, touch)}, protocol=2), "posix.system"),
      "global_os_system": (assemble(Call(G("os", "system"), touch)), "os.system"),
      "global_posix_system": (assemble(Call(G("posix", "system"), touch)), "posix.system"),
      "reduce_builtins_eval": (
          pickle.dumps(_Reduce(eval, f"__import__('os').system({touch!r})"), protocol=2),
          "__builtin__.eval (= builtins.eval)",
      ),
      "builtins_exec_protocol4": (
          pickle.dumps(_Reduce(exec, f"import os; os.system({touch!r})"), protocol=4),
          "builtins.exec",
      ),
      "subprocess_popen": (
          pickle.dumps(_Reduce(subprocess.Popen, ["touch", marker]), protocol=2),
          "(= subprocess.Popen)",
      ),
      "callable_hidden_in_tuple_and_list": (
          pickle.dumps({"w": (1, [_Reduce(os.system, touch)])}, protocol=2),
          "posix.system",
      ),
      "callable_hidden_in_build_state": (
          assemble(Build(ODICT, {"_metadata": Call(G("builtins", "eval"), f"__import__('os').system({touch!r})")})),
          "builtins.eval",
      ),
      "popen_inside_rebuild_tensor_v1": (
          assemble(Call(G("torch._utils", "_rebuild_tensor"), _pid(), 0,
                        (1,), (Call(G("subprocess", "Popen"), ["touch", marker]),))),
          "subprocess.Popen",
      ),
      "eval_inside_rebuild_tensor": (
          assemble(v2(Call(G("builtins", "eval"), f"__import__('os').system({touch!r})"), 0, (1,), (1,))),
          "builtins.eval",
      ),
      "getattr_chain_protocol4": (
          pickle.PROTO + b"\x04" + _emit("torch._utils") + _emit("_rebuild_tensor_v2.__globals__")
          + pickle.STACK_GLOBAL + pickle.STOP,
          "torch._utils._rebuild_tensor_v2.__globals__",
      ),
      "copyreg_reconstructor": (assemble(Call(G("copy_reg", "_reconstructor"), 1)), "copy_reg._reconstructor"),
      "numpy_reconstruct": (pickle.dumps(np.zeros(2), protocol=2), "numpy"),
      "torch_load_itself": (assemble(Call(G("torch", "load"), marker)), "torch.load"),
      "sys_modules": (assemble(G("sys", "modules")), "sys.modules"),
      "inst_opcode": (b"(S'" + touch.encode() + b"'\nios\nsystem\n.", "INST"),
      "obj_opcode": (assemble(Raw(pickle.MARK + _emit(G("collections", "OrderedDict")) + pickle.OBJ)), "OBJ"),
      "newobj_opcode": (assemble(Raw(_emit(G("collections", "OrderedDict")) + _emit(()) + pickle.NEWOBJ)), "NEWOBJ"),
      "ext_opcode": (assemble(Raw(pickle.EXT1 + b"\x01")), "EXT1"),
      "reduce_on_a_dtype_string": (assemble(Call(G("torch", "float32"), 1)), "REDUCE calls str 'torch.float32'"),
      "build_on_allowed_function": (
          assemble(Build(G("torch._utils", "_rebuild_tensor_v2"), {"__defaults__": (1,)})),
          "BUILD on global torch._utils._rebuild_tensor_v2",
      ),
      "build_shadows_ordered_dict_method": (assemble(Build(ODICT, {"keys": 1})), "may not set attribute 'keys'"),
      "setitems_on_a_tensor": (
          assemble(Raw(_emit(v2(_pid(), 0, (6,), (1,)))
                       + pickle.MARK + _emit(0) + _emit(9.0) + pickle.SETITEMS)),
          "SETITEMS on a ndarray",
      ),
      "rebuild_from_type_with_foreign_type": (
          assemble(Call(G("torch._tensor", "_rebuild_from_type_v2"), G("torch._utils", "_rebuild_tensor_v2"),
                        G("torch", "float32"), (), {})),
          "unsupported tensor type",
      ),
      "persistent_id_not_storage": (assemble(Pid("module", "os", "0", "cpu", 1)), "only 'storage'"),
  }  # fmt: skip
  return cases


MALICIOUS_IDS = list(_malicious_cases("x"))


@pytest.mark.parametrize("case", MALICIOUS_IDS)
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, case):
  marker = tmp_path / f"pwned_{uuid.uuid4().hex}"
  pkl, expected = _malicious_cases(str(marker))[case]
  path = write_archive(tmp_path / "evil.pt", pkl, {"0": SIX_FLOATS})
  with pytest.raises(CheckpointError) as info:
    load_torch_file(path)
  message = str(info.value)
  assert expected in message, message
  assert str(path) in message, message
  assert not marker.exists(), "the payload ran"


def test_malicious_payload_is_live(tmp_path):
  """Control: the same bytes really do run a command under plain pickle.loads."""
  marker = tmp_path / f"pwned_{uuid.uuid4().hex}"
  pkl, _ = _malicious_cases(str(marker))["reduce_os_system"]
  pickle.loads(pkl)
  assert marker.exists()


def _torch_file_bytes(obj) -> bytes:
  buf = io.BytesIO()
  torch.save(obj, buf)
  return buf.getvalue()


def _rewrite(data: bytes, drop=(), replace=None, add=()) -> bytes:
  """Copies a zip, dropping/replacing members by name suffix and adding (name, bytes) pairs."""
  out = io.BytesIO()
  with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
    for info in src.infolist():
      if any(info.filename.endswith(s) for s in drop):
        continue
      body = src.read(info)
      for suffix, new in (replace or {}).items():
        if info.filename.endswith(suffix):
          body = new
      dst.writestr(info.filename, body)
    for name, body in add:
      dst.writestr(name, body)
  return out.getvalue()


def _flip_byte_in_member(data: bytes, suffix: str) -> bytes:
  with zipfile.ZipFile(io.BytesIO(data)) as zf:
    info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
  name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
  pos = info.header_offset + 30 + name_len + extra_len  # first byte of the member's data
  return data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :]


def _patch_declared_size(data: bytes, suffix: str, size: int) -> bytes:
  """Makes the zip's central directory lie about the uncompressed size of one member."""
  data = bytearray(data)
  with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
    pos = zf.start_dir
    for _ in zf.infolist():
      name_len, extra_len, comment_len = struct.unpack("<HHH", data[pos + 28 : pos + 34])
      name = data[pos + 46 : pos + 46 + name_len].decode()
      if name.endswith(suffix):
        data[pos + 24 : pos + 28] = struct.pack("<I", size)
      pos += 46 + name_len + extra_len + comment_len
  return bytes(data)


def _deflated_zeros_archive() -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("archive/data.pkl", assemble({}))
    zf.writestr("archive/data/0", bytes(4000))
  return buf.getvalue()


def _legacy_bytes() -> bytes:
  buf = io.BytesIO()
  torch.save({"w": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
  return buf.getvalue()


def _zip_with_names(names) -> bytes:
  out = io.BytesIO()
  with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as zf:
    warnings.simplefilter("ignore")  # zipfile warns about duplicate names
    for name in names:
      zf.writestr(zipfile.ZipInfo(name), b"x")
  return out.getvalue()


def _broken_cases():
  good = _torch_file_bytes({"w": torch.arange(6.0)})
  qint8_24 = _pid(G("torch", "QInt8Storage"), numel=24)
  per_channel = G("torch", "per_channel_affine")

  def with_pickle(obj, storages=None):
    buf = io.BytesIO()
    write_archive(buf, assemble(obj), {"0": SIX_FLOATS} if storages is None else storages)
    return buf.getvalue()

  def archive_names(*names):
    return _zip_with_names(["archive/data.pkl", *names])

  return {
      # id: (file bytes, text the error must contain)
      "dotdot_member": (archive_names("archive/../../etc/passwd"), "'..'"),
      "absolute_member": (archive_names("/etc/passwd"), "absolute path"),
      "windows_absolute_member": (archive_names("C:/x"), "absolute path"),
      "backslash_member": (archive_names("archive\\..\\x"), "backslash"),
      "duplicate_member": (archive_names("archive/data.pkl"), "appears twice"),
      "member_outside_root": (archive_names("data.pkl"), "not inside a root folder"),
      "two_roots": (_zip_with_names(["a/data.pkl", "b/data.pkl"]), "several root folders"),
      "empty_zip": (_zip_with_names([]), "empty"),
      "huge_declared_numel": (with_pickle({"w": v2(_pid(numel=2**60), 0, (6,), (1,))}),
                              "declares 1152921504606846976 elements"),
      "size_beyond_storage": (with_pickle({"w": v2(_pid(), 0, (100,), (1,))}), "reaches element 99"),
      "huge_size_beyond_storage": (with_pickle({"w": v2(_pid(), 0, (2**40, 2**40), (1, 1))}), "reaches element"),
      "offset_beyond_storage": (with_pickle({"w": v2(_pid(), 6, (1,), (1,))}), "reaches element 6"),
      "negative_offset": (with_pickle({"w": v2(_pid(), Raw(pickle.BININT + struct.pack("<i", -1)), (1,), (1,))}),
                          "must be a non-negative int, got -1"),
      "stride_length_mismatch": (with_pickle({"w": v2(_pid(), 0, (2, 3), (1,))}), "of another length"),
      "storage_key_traversal": (with_pickle({"w": v2(_pid(key="../0"), 0, (6,), (1,))}), "not a plain name"),
      "missing_storage_key": (with_pickle({"w": v2(_pid(), 0, (6,), (1,))}, storages={}), "storage '0' is missing"),
      "storage_type_conflict": (with_pickle({"a": v2(_pid(), 0, (6,), (1,)),
                                             "b": v2(_pid(G("torch", "IntStorage")), 0, (6,), (1,))}),
                                "referenced both as"),
      "unknown_storage_type": (with_pickle({"w": v2(_pid(G("torch", "float32")), 0, (6,), (1,))}),
                               "not a torch storage type"),
      "qtensor_on_float_storage": (with_pickle({"w": _qtensor(_pid(), (G("torch", "per_tensor_affine"), 0.1, 0))}),
                                   "needs a QInt8/QUInt8/QInt32 storage"),
      "qtensor_axis_out_of_range": (with_pickle({"w": _qtensor(qint8_24, (per_channel, [0.1], [0], 3))}),
                                    "axis 3 out of range"),
      "qtensor_scales_length": (with_pickle({"w": _qtensor(qint8_24, (per_channel, [0.1, 0.2], [0, 0], 0))}),
                                "has 2 entries, expected size[axis] = 6"),
      "rebuild_wrong_arity": (with_pickle({"w": Call(G("torch._utils", "_rebuild_tensor_v2"), _pid())}),
                              "cannot take 1 argument(s)"),
      "bad_byteorder": (_rewrite(good, replace={"/byteorder": b"middle"}), "byteorder"),
      "missing_data_pkl": (_rewrite(good, drop=["/data.pkl"]), "no member 'archive/data.pkl'"),
      "missing_storage_member": (_rewrite(good, drop=["/data/0"]), "storage '0' is missing"),
      "truncated_pickle": (_rewrite(good, replace={"/data.pkl": assemble({"w": 1})[:-4]}),
                           "data.pkl' is corrupt or truncated (EOFError: the pickle ends early)"),
      "flipped_byte_in_storage": (_flip_byte_in_member(good, "/data/0"), "Bad CRC-32"),
      "flipped_byte_in_data_pkl": (_flip_byte_in_member(good, "/data.pkl"), "Bad CRC-32"),
      "stored_member_size_lie": (_patch_declared_size(good, "/data/0", 2**31),
                                 "declares 2147483648 bytes but holds 24"),
      "deflated_member_size_lie": (_patch_declared_size(_deflated_zeros_archive(), "/data/0", 2**32 - 1),
                                   "declares 4294967295 bytes from only"),
      "bytes_cut_from_middle": (good[:200] + good[400:], "outside the file"),
      "truncated_file": (good[: len(good) // 2], "not a zip archive"),
      "truncated_last_bytes": (good[:-10], "not a zip archive"),
      "legacy_torch_format": (_legacy_bytes(), "legacy"),
      "bare_pickle": (pickle.dumps({"w": 1}, protocol=2), "bare pickle"),
      "random_bytes": (bytes(range(256)) * 4, "not a zip archive"),
      "empty_file": (b"", "not a zip archive"),
  }  # fmt: skip


BROKEN_IDS = list(_broken_cases())


@pytest.fixture(scope="module")
def broken_cases():
  return _broken_cases()


@pytest.mark.parametrize("case", BROKEN_IDS)
def test_broken_file_raises_clear_error(tmp_path, broken_cases, case):
  data, expected = broken_cases[case]
  path = tmp_path / f"{case}.pt"
  path.write_bytes(data)
  with pytest.raises(CheckpointError) as info:
    load_torch_file(path)
  message = str(info.value)
  assert expected in message, message
  assert str(path) in message, message


def test_error_names_file_object(broken_cases):
  data, _ = broken_cases["truncated_file"]
  with pytest.raises(CheckpointError, match="BytesIO"):
    load_torch_file(io.BytesIO(data))


@pytest.mark.parametrize("source", [b"PK\x03\x04", 42, None], ids=["raw_bytes", "int", "none"])
def test_bad_source_type(source):
  with pytest.raises(TypeError, match="path or a binary file object"):
    load_torch_file(source)


def test_text_mode_file_is_refused(saved):
  with open(saved["float_mha"], encoding="latin1") as f:
    with pytest.raises(TypeError, match="binary mode"):
      load_torch_file(f)


def test_missing_path_raises_os_error(tmp_path):
  with pytest.raises(FileNotFoundError):
    load_torch_file(tmp_path / "nope.pt")


def test_checkpoint_error_is_value_error():
  assert issubclass(CheckpointError, ValueError)
  assert shutil.which("touch"), "the malicious-payload tests need a `touch` command"
