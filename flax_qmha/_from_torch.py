"""Importing torch's multi-head attention: live modules, state_dicts and checkpoint files.

Three torch modules map onto ours:

* ``torch.nn.MultiheadAttention`` (float) -> :class:`MultiheadAttention` and
  ``{"params": ...}``;
* ``torch.ao.nn.quantizable.MultiheadAttention`` after ``prepare`` (observed: calibrated,
  or trained with fake quantization) -> :class:`MultiheadAttention` with a ``QConfig``
  matching torch's observers and ``{"params", "quant_stats"}`` copied from torch's buffers,
  ready for :func:`flax_qmha.convert`;
* ``torch.ao.nn.quantized.MultiheadAttention`` (converted) ->
  :class:`QuantizedMultiheadAttention` with ``numerics="torch"``, holding torch's int8
  weights, scales and zero points exactly as stored.

:func:`from_torch` imports one attention; :func:`from_torch_checkpoint` finds every one in a
state_dict (also transformers-style attentions made of four ``Linear`` layers).

Torch is imported only on the code path that handles live torch objects (which means it is
already loaded); files are read with ``load_torch_file`` / ``load_safetensors``, which never
execute code from the file.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_qmha import _checks
from flax_qmha._errors import CheckpointError, source_label
from flax_qmha._int8 import zero_point_correction
from flax_qmha._mha import BIAS_KV_SPEC, MultiheadAttention
from flax_qmha._observers import calculate_stats_qparams, initial_stats, update_stats
from flax_qmha._qconfig import QConfig, QuantSpec, get_default_qat_qconfig, get_default_qconfig
from flax_qmha._quantized_mha import QuantizedMultiheadAttention
from flax_qmha._safetensors import load_safetensors
from flax_qmha._torch_pickle import QuantizedTensor, load_torch_file

__all__ = ["CheckpointImport", "from_torch", "from_torch_checkpoint"]

PROJECTIONS = ("linear_Q", "linear_K", "linear_V", "out_proj")
INPUTS = ("query", "key", "value")
# Where a containing model's QuantStubs are looked for: siblings of the attention module
# with these names (torch's MHA takes already-quantized inputs, so their qparams live there).
DEFAULT_INPUT_STUBS = {"query": "quant_query", "key": "quant_key", "value": "quant_value"}
# Observed activation sites inside torch's quantizable MHA -> our quant_stats path.
ACTIVATION_SITES = {
    "linear_Q.activation_post_process": ("linear_Q", "activation_post_process"),
    "linear_K.activation_post_process": ("linear_K", "activation_post_process"),
    "linear_V.activation_post_process": ("linear_V", "activation_post_process"),
    "out_proj.activation_post_process": ("out_proj", "activation_post_process"),
    "quant_attn_output.activation_post_process": ("quant_attn_output",),
    "quant_attn_output_weights.activation_post_process": ("quant_attn_output_weights",),
}
# A key ending in one of these marks an attention module at the key's prefix, and says which
# kind; the first match wins when several are present (the observed and converted modules
# still carry torch's stale, freshly initialised in_proj_* / q_proj_weight parameters).
_MARKERS = (
    ("linear_Q._packed_params._packed_params", "converted"),
    ("linear_Q.weight", "quantizable"),
    ("in_proj_weight", "float"),
    ("q_proj_weight", "float"),
)
_MARKER_RANK = {kind: i for i, (_, kind) in enumerate(_MARKERS)}
_KEY_MAP_ROLES = ("q", "k", "v", "out")
_TORCH_OBSERVERS = {
    "MinMaxObserver": "minmax",
    "PerChannelMinMaxObserver": "minmax",
    "MovingAverageMinMaxObserver": "moving_average_minmax",
    "MovingAveragePerChannelMinMaxObserver": "moving_average_minmax",
    "HistogramObserver": "histogram",
}
_HISTOGRAM_UPSAMPLE_RATE = 16  # the only rate flax_qmha's histogram observer implements


# ---------------------------------------------------------------------------------------------
# sources: live torch modules, state_dicts and files -> a flat numpy state_dict


def _is_torch(obj: Any) -> bool:
  """Whether ``obj`` is a torch object (or of a user subclass of a torch class, such as a
  model), decided without importing torch."""
  return any(str(getattr(cls, "__module__", "")).split(".")[0] == "torch"
             for cls in type(obj).__mro__)


def _is_torch_module(obj: Any) -> bool:
  return _is_torch(obj) and hasattr(obj, "named_modules") and hasattr(obj, "state_dict")


def _quantized_from_torch(t) -> QuantizedTensor:
  import torch  # pylint: disable=g-import-not-at-top  # a torch tensor was passed

  dtype = str(t.dtype).removeprefix("torch.")
  int_repr = t.int_repr().cpu().numpy()
  if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
    return QuantizedTensor(int_repr, float(t.q_scale()), int(t.q_zero_point()), None, dtype)
  return QuantizedTensor(int_repr, t.q_per_channel_scales().cpu().numpy(),
                         t.q_per_channel_zero_points().cpu().numpy(),
                         int(t.q_per_channel_axis()), dtype)


def _to_numpy(value: Any) -> Any:
  """torch tensors (plain or quantized), dtypes and tuples of them -> numpy / QuantizedTensor."""
  if value is None or isinstance(value, (np.ndarray, QuantizedTensor, str)):
    return value
  if isinstance(value, tuple):
    return tuple(_to_numpy(v) for v in value)
  if _is_torch(value):
    import torch  # pylint: disable=g-import-not-at-top  # a torch object was passed

    if isinstance(value, torch.dtype):
      return str(value)  # as load_torch_file decodes dtypes: "torch.qint8"
    if isinstance(value, torch.Tensor):
      t = value.detach().cpu()
      if t.is_quantized:
        return _quantized_from_torch(t)
      if t.dtype.is_floating_point:
        t = t.to(torch.float32)  # numpy has no bfloat16; every float is imported as float32
      return t.numpy()
    return value
  if hasattr(value, "__array__") and not isinstance(value, (bool, int, float)):
    return np.asarray(value)  # jax arrays and other array-likes
  return value


@dataclasses.dataclass
class _Source:
  """A flat state_dict of numpy values, how errors name it, and the live model if any."""

  entries: dict
  label: str
  model: Any = None


def _load_source(source: Any, caller: str) -> _Source:
  if _is_torch_module(source):
    entries = {k: _to_numpy(v) for k, v in source.state_dict().items()}
    return _Source(entries, f"the torch {type(source).__name__}", source)
  if isinstance(source, (str, os.PathLike)) or hasattr(source, "read"):
    label = source_label(source)
    if isinstance(source, (str, os.PathLike)):
      safetensors = str(os.fspath(source)).lower().endswith(".safetensors")
    else:  # a binary file object: torch.save writes zip archives, which start with "PK"
      start = source.tell()
      head = source.read(2)
      source.seek(start)
      safetensors = head != b"PK"
    if safetensors:
      loaded, _ = load_safetensors(source)
    else:  # .pt / .pth / .bin: torch.save's zip format
      loaded = load_torch_file(source)
    if not isinstance(loaded, Mapping):
      raise CheckpointError(
          f"{caller}: {label} holds a {type(loaded).__name__}, expected a state_dict (a mapping"
          " of parameter names to tensors); if it is a training checkpoint, load it with"
          " flax_qmha._torch_pickle.load_torch_file and pass the state_dict entry"
      )
    entries = dict(loaded)
  elif isinstance(source, Mapping):
    label = "the state_dict"
    entries = {k: _to_numpy(v) for k, v in source.items()}
  else:
    raise TypeError(
        f"{caller}: source must be a torch module, a state_dict (mapping of names to tensors"
        " or numpy arrays), or a path to (or binary file object of) a .pt/.pth/.bin or"
        " .safetensors file, got"
        f" {type(source).__module__}.{type(source).__qualname__}"
    )
  bad = [k for k in entries if not isinstance(k, str)]
  if bad:
    raise CheckpointError(
        f"{caller}: {label} must map str names to tensors, got the key {bad[0]!r}"
        f" ({type(bad[0]).__name__})"
    )
  return _Source(entries, label)


def _public(prefix: str) -> str:
  """Internal prefixes end with '.' (or are ''); public ones do not."""
  return prefix[:-1] if prefix.endswith(".") else prefix


def _internal(prefix: str) -> str:
  prefix = prefix.strip(".")
  return prefix + "." if prefix else ""


def _find_attentions(entries: Mapping) -> dict[str, str]:
  """Every attention module in a state_dict: internal prefix -> kind, in key order."""
  found: dict[str, str] = {}
  for key in entries:
    for suffix, kind in _MARKERS:
      if key == suffix or key.endswith("." + suffix):
        prefix = key[: len(key) - len(suffix)]
        if prefix not in found or _MARKER_RANK[kind] < _MARKER_RANK[found[prefix]]:
          found[prefix] = kind
  return found


def _refine_kind(entries: Mapping, prefix: str, kind: str) -> str:
  """A quantizable module with observers is 'observed'; without any, plain float."""
  if kind != "quantizable":
    return kind
  sites = [prefix + site for site in ACTIVATION_SITES]
  if any(key.startswith(site + ".") for key in entries for site in sites):
    return "observed"
  return "float_linears"


# ---------------------------------------------------------------------------------------------
# reading and checking entries


def _is_float_dtype(dtype: np.dtype) -> bool:
  # bfloat16 / float8 (ml_dtypes, from files) are not numpy floating subtypes.
  return np.issubdtype(dtype, np.floating) or dtype.name in (
      "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def _entry(src: _Source, key: str, what: str = "tensor") -> Any:
  if key not in src.entries:
    raise CheckpointError(f"{src.label}: the key {key!r} ({what}) is missing")
  return src.entries[key]


def _float_array(src: _Source, key: str, shape: tuple[int, ...] | None = None,
                 what: str = "tensor") -> np.ndarray:
  value = _entry(src, key, what)
  if not isinstance(value, np.ndarray):
    raise CheckpointError(
        f"{src.label}: {key!r} must be a float tensor ({what}), got {_short(value)}"
    )
  if not _is_float_dtype(value.dtype):
    raise CheckpointError(
        f"{src.label}: {key!r} must be a float tensor ({what}), got dtype {value.dtype}"
    )
  if shape is not None and value.shape != tuple(shape):
    raise CheckpointError(
        f"{src.label}: {key!r} has shape {value.shape}, expected {tuple(shape)} ({what})"
    )
  return np.array(value, np.float32)  # a fresh, writable float32 copy


def _optional_float(src: _Source, key: str, shape, what: str) -> np.ndarray | None:
  if src.entries.get(key) is None:
    return None
  return _float_array(src, key, shape, what)


def _embed_dim(src: _Source, key: str) -> int:
  """E from a square ``(E, E)`` weight (out_proj, linear_Q)."""
  value = _entry(src, key, "the (embed_dim, embed_dim) weight")
  shape = value.shape if isinstance(value, (np.ndarray, QuantizedTensor)) else None
  if shape is None or len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
    raise CheckpointError(
        f"{src.label}: {key!r} must be a square (embed_dim, embed_dim) weight, got"
        f" {'shape ' + str(shape) if shape is not None else type(value).__name__}"
    )
  return int(shape[0])


def _in_features(src: _Source, key: str, embed_dim: int, what: str) -> int:
  value = _entry(src, key, what)
  shape = value.shape if isinstance(value, (np.ndarray, QuantizedTensor)) else None
  if shape is None or len(shape) != 2 or shape[0] != embed_dim or shape[1] == 0:
    raise CheckpointError(
        f"{src.label}: {key!r} must have shape ({embed_dim}, in_features) ({what}), got"
        f" {'shape ' + str(shape) if shape is not None else type(value).__name__}"
    )
  return int(shape[1])


# ---------------------------------------------------------------------------------------------
# hyperparameters


@dataclasses.dataclass(frozen=True)
class _Hyper:
  num_heads: int
  batch_first: bool
  add_zero_attn: bool
  dropout: float


def _check_bool(value, name: str, caller: str) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{caller}: {name} must be a bool, got {value!r}")


def _hyper(live, *, num_heads, batch_first, add_zero_attn, dropout, where: str,
           caller: str) -> _Hyper:
  """Explicit arguments, else the live module's values, else torch's defaults (num_heads:
  required, a state_dict does not store it)."""
  if num_heads is None:
    if live is None:
      raise ValueError(
          f"{caller}: num_heads is required for {where}: torch does not store it in a"
          " state_dict; pass num_heads=<int>"
      )
    num_heads = int(live.num_heads)
  values = {
      "batch_first": (batch_first, False),
      "add_zero_attn": (add_zero_attn, False),
  }
  resolved = {}
  for name, (given, default) in values.items():
    if given is None:
      given = bool(getattr(live, name)) if live is not None else default
    _check_bool(given, name, caller)
    resolved[name] = bool(given)
  if dropout is None:
    dropout = float(live.dropout) if live is not None else 0.0
  return _Hyper(num_heads, resolved["batch_first"], resolved["add_zero_attn"], dropout)


def _module_fields(hyper: _Hyper, dims: Mapping, caller: str) -> dict:
  e = dims["embed_dim"]
  kdim = None if dims["kdim"] == e else dims["kdim"]
  vdim = None if dims["vdim"] == e else dims["vdim"]
  _checks.check_config(embed_dim=e, num_heads=hyper.num_heads, dropout=hyper.dropout,
                       kdim=kdim, vdim=vdim, owner=caller)
  return dict(embed_dim=e, num_heads=hyper.num_heads, dropout=hyper.dropout,
              bias=dims["bias"], add_bias_kv=dims["add_bias_kv"],
              add_zero_attn=hyper.add_zero_attn, kdim=kdim, vdim=vdim,
              batch_first=hyper.batch_first)


def _resolve_bias_kv(found: bool, add_bias_kv, src: _Source, prefix: str, caller: str) -> bool:
  if add_bias_kv is None:
    return found
  _check_bool(add_bias_kv, "add_bias_kv", caller)
  if add_bias_kv and not found:
    raise CheckpointError(
        f"{caller}: add_bias_kv=True but {src.label} has no {prefix + 'bias_k'!r} /"
        f" {prefix + 'bias_v'!r}"
    )
  if found and not add_bias_kv:
    raise ValueError(
        f"{caller}: add_bias_kv=False but {src.label} holds {prefix + 'bias_k'!r} and"
        f" {prefix + 'bias_v'!r}; leave add_bias_kv=None to use them"
    )
  return bool(add_bias_kv)


# ---------------------------------------------------------------------------------------------
# float parameters


def _projection_params(weights: dict, biases: dict) -> tuple[dict, bool]:
  """torch ``(out, in)`` weights and biases -> our per-projection ``{kernel (in, out), bias}``.

  Returns ``(params, bias)``. Zeros stand in for missing biases when others exist (the same
  maths: our modules have one ``bias`` flag for all four projections).
  """
  bias = any(b is not None for b in biases.values())
  params = {}
  for name in PROJECTIONS:
    params[name] = {"kernel": np.ascontiguousarray(weights[name].T)}
    if bias:
      b = biases[name]
      params[name]["bias"] = b if b is not None else np.zeros(weights[name].shape[0], np.float32)
  return params, bias


def _float_params(src: _Source, p: str, layout: str, add_bias_kv, caller: str):
  """``(params, dims)`` of a float attention stored in torch's layout.

  ``layout``: ``"native"`` (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``,
  ``out_proj.*``) or ``"linears"`` (the quantizable module's ``linear_Q/K/V`` layers, whose
  weights are the real ones; its inherited ``in_proj_*`` are stale and ignored).
  """
  e = _embed_dim(src, p + "out_proj.weight")
  weights: dict[str, np.ndarray] = {}
  biases: dict[str, np.ndarray | None] = {}
  if layout == "linears":
    for name, role in zip(PROJECTIONS[:3], INPUTS):
      key = f"{p}{name}.weight"
      in_dim = e if name == "linear_Q" else _in_features(src, key, e, f"{role} weight")
      weights[name] = _float_array(src, key, (e, in_dim), f"{name} weight")
      biases[name] = _optional_float(src, f"{p}{name}.bias", (e,), f"{name} bias")
  elif p + "in_proj_weight" in src.entries and src.entries[p + "in_proj_weight"] is not None:
    packed = _float_array(src, p + "in_proj_weight", (3 * e, e), "packed Q/K/V weight")
    for name, w in zip(PROJECTIONS[:3], np.split(packed, 3)):
      weights[name] = np.ascontiguousarray(w)
  else:
    for name, short in zip(PROJECTIONS[:3], "qkv"):
      key = f"{p}{short}_proj_weight"
      in_dim = e if short == "q" else _in_features(src, key, e, f"{short} projection weight")
      weights[name] = _float_array(src, key, (e, in_dim), f"{short} projection weight")
  if layout == "native":
    in_bias = _optional_float(src, p + "in_proj_bias", (3 * e,), "packed Q/K/V bias")
    for name, b in zip(PROJECTIONS[:3], (None,) * 3 if in_bias is None else np.split(in_bias, 3)):
      biases[name] = b
  weights["out_proj"] = _float_array(src, p + "out_proj.weight", (e, e), "out_proj weight")
  biases["out_proj"] = _optional_float(src, p + "out_proj.bias", (e,), "out_proj bias")
  if layout == "native" and (biases["out_proj"] is None) != (biases["linear_Q"] is None):
    present, missing = (("in_proj_bias", "out_proj.bias") if biases["out_proj"] is None
                        else ("out_proj.bias", "in_proj_bias"))
    raise CheckpointError(
        f"{src.label}: {p + present!r} is present but {p + missing!r} is missing;"
        " torch.nn.MultiheadAttention has both or neither"
    )
  params, bias = _projection_params(weights, biases)
  has_k, has_v = (src.entries.get(p + n) is not None for n in ("bias_k", "bias_v"))
  if has_k != has_v:
    missing = "bias_v" if has_k else "bias_k"
    raise CheckpointError(f"{src.label}: the key {p + missing!r} is missing (add_bias_kv)")
  use_bias_kv = _resolve_bias_kv(has_k, add_bias_kv, src, p, caller)
  if use_bias_kv:
    for name in ("bias_k", "bias_v"):
      params[name] = _float_array(src, p + name, (1, 1, e), name)
  dims = dict(embed_dim=e, kdim=weights["linear_K"].shape[1], vdim=weights["linear_V"].shape[1],
              bias=bias, add_bias_kv=use_bias_kv)
  return params, dims


# ---------------------------------------------------------------------------------------------
# observers: QuantSpecs and statistics


def _spec_from_torch_observer(obj: Any, where: str) -> tuple[QuantSpec, bool]:
  """``(QuantSpec, fake_quant)`` equivalent to a live torch observer or FakeQuantize."""
  inner = getattr(obj, "activation_post_process", None)
  fake = inner is not None and hasattr(obj, "fake_quant_enabled")
  observer = inner if fake else obj
  cls = type(observer).__name__
  name = _TORCH_OBSERVERS.get(cls)
  if name is None or not type(observer).__module__.startswith("torch.ao.quantization"):
    raise ValueError(
        f"from_torch: {where} is a {type(observer).__module__}.{cls}; supported observers:"
        f" {sorted(_TORCH_OBSERVERS)} (alone or inside FakeQuantize /"
        " FusedMovingAvgObsFakeQuantize); pass qconfig= to import its statistics anyway"
    )
  dtype = str(observer.dtype).removeprefix("torch.")
  qscheme = str(observer.qscheme).removeprefix("torch.")
  if dtype not in ("quint8", "qint8"):
    raise ValueError(f"from_torch: {where} observes dtype {observer.dtype}; only quint8 and"
                     " qint8 are supported")
  if qscheme.startswith("per_channel") and int(observer.ch_axis) != 0:
    raise ValueError(f"from_torch: {where} is per-channel on ch_axis={observer.ch_axis};"
                     " only torch's weight layout (ch_axis=0) is supported")
  if name == "histogram" and int(observer.upsample_rate) != _HISTOGRAM_UPSAMPLE_RATE:
    raise ValueError(f"from_torch: {where} has upsample_rate={observer.upsample_rate};"
                     f" only torch's default {_HISTOGRAM_UPSAMPLE_RATE} is supported")
  effective = (int(observer.quant_min), int(observer.quant_max))
  reduce_range = bool(observer.reduce_range)
  kwargs = dict(observer=name, dtype=dtype, qscheme=qscheme,
                eps=float(observer.eps.reshape(-1)[0]))
  if name == "moving_average_minmax":
    kwargs["averaging_constant"] = float(observer.averaging_constant)
  if name == "histogram":
    kwargs["bins"] = int(observer.bins)
  # torch keeps only the effective range; a custom range with reduce_range was halved, so
  # (2 * qmin, 2 * qmax + 1) halves back to it.
  candidates = []
  if bool(observer.has_customized_qrange):
    if reduce_range:
      candidates.append(dict(reduce_range=True, quant_min=2 * effective[0],
                             quant_max=2 * effective[1] + 1))
    candidates.append(dict(reduce_range=False, quant_min=effective[0], quant_max=effective[1]))
  else:
    candidates.append(dict(reduce_range=reduce_range))
  for extra in candidates:
    try:
      spec = QuantSpec(**kwargs, **extra)
    except ValueError:
      continue
    if spec.quant_range == effective:
      return spec, fake
  raise ValueError(
      f"from_torch: {where} ({cls}, {dtype}, {qscheme}, range {effective},"
      f" reduce_range={reduce_range}) has no flax_qmha QuantSpec equivalent"
  )


def _stats_at(src: _Source, key_prefix: str, spec: QuantSpec, shape: tuple[int, ...],
              where: str) -> dict:
  """An observer's ``{min_val, max_val[, histogram]}`` under ``key_prefix`` (an observer, or
  a FakeQuantize whose observer is its ``activation_post_process``)."""
  base = key_prefix
  if (key_prefix + ".min_val") not in src.entries \
      and (key_prefix + ".activation_post_process.min_val") in src.entries:
    base = key_prefix + ".activation_post_process"
  stats = {}
  for name in ("min_val", "max_val"):
    value = _float_array(src, f"{base}.{name}", None, f"{where} statistic")
    if value.shape != shape and not (shape == () and value.size == 1):
      raise CheckpointError(
          f"{src.label}: {f'{base}.{name}'!r} has shape {value.shape}, expected {shape}"
          f" ({where} statistic)"
      )
    stats[name] = value.reshape(shape)
  if spec.observer == "histogram":
    key = base + ".histogram"
    if key not in src.entries:
      raise CheckpointError(
          f"{src.label}: the key {key!r} is missing: the qconfig's activation observer is"
          f" 'histogram' but {where} has no histogram; pass a min/max qconfig="
      )
    stats["histogram"] = _float_array(src, key, (spec.bins,), f"{where} histogram")
  return stats


def _observe_once(spec: QuantSpec, tensor: np.ndarray) -> dict:
  """Statistics after observing ``tensor`` once (what torch's convert does with a fresh
  weight observer, and how it chooses bias_k/bias_v's qparams)."""
  channels = tensor.shape[-1] if spec.is_per_channel else None
  stats = update_stats(spec, initial_stats(spec, channels), tensor, channel_axis=-1)
  return {k: np.asarray(v) for k, v in stats.items()}


def _infer_qconfig(src: _Source, p: str) -> QConfig:
  """The QConfig a state_dict's buffers suggest (torch's x86 presets; see ``from_torch``)."""
  site = p + "linear_Q.activation_post_process"
  fake = (site + ".activation_post_process.min_val") in src.entries
  inner = site + ".activation_post_process" if fake else site
  base = get_default_qat_qconfig("x86") if fake else get_default_qconfig("x86")
  activation = base.activation
  histogram = src.entries.get(inner + ".histogram")
  if not fake and histogram is None:
    activation = QuantSpec(observer="minmax", dtype="quint8", qscheme="per_tensor_affine",
                           reduce_range=True)
  if histogram is not None:
    activation = dataclasses.replace(activation, observer="histogram", quant_min=None,
                                     quant_max=None, bins=int(np.size(histogram)))
  eps = src.entries.get(inner + ".eps")
  if isinstance(eps, np.ndarray) and eps.size == 1:
    activation = dataclasses.replace(activation, eps=float(eps.reshape(-1)[0]))
  weight = base.weight
  w_site = p + "linear_Q.weight_fake_quant"
  w_inner = w_site + ".activation_post_process"
  if (w_inner + ".min_val") in src.entries or (w_site + ".min_val") in src.entries:
    w_min = src.entries.get(w_inner + ".min_val", src.entries.get(w_site + ".min_val"))
    qscheme = "per_channel_symmetric" if np.ndim(w_min) == 1 else "per_tensor_symmetric"
    weight = QuantSpec(observer="moving_average_minmax", dtype="qint8", qscheme=qscheme,
                       quant_min=-128, quant_max=127)
    fake = True
  return QConfig(activation=activation, weight=weight, fake_quant=fake)


def _check_stored_fake_quant_qparams(src: _Source, spec: QuantSpec, sites: dict,
                                     stats: dict) -> None:
  """Warns when an inferred qconfig does not reproduce a FakeQuantize's stored qparams."""
  wrong = []
  for key_prefix, path in sites.items():
    scale, zp = src.entries.get(key_prefix + ".scale"), src.entries.get(key_prefix + ".zero_point")
    node = stats
    for part in path:
      node = node.get(part, {}) if isinstance(node, Mapping) else {}
    if not isinstance(scale, np.ndarray) or not isinstance(zp, np.ndarray) or not node \
        or not np.all(np.isfinite(node.get("min_val", np.inf))) or scale.size != 1:
      continue
    ours_scale, ours_zp = calculate_stats_qparams(spec, node)
    if int(np.asarray(ours_zp).reshape(-1)[0]) != int(zp.reshape(-1)[0]) or not np.isclose(
        float(np.asarray(ours_scale).reshape(-1)[0]), float(scale.reshape(-1)[0]), rtol=1e-5):
      wrong.append(key_prefix)
  if wrong:
    warnings.warn(
        f"from_torch: the qconfig inferred from {src.label} ({spec}) does not reproduce the"
        f" scale/zero_point torch stored at {wrong}; pass the qconfig torch used as qconfig=",
        UserWarning, stacklevel=5,
    )


def _live_qconfig(model: Any, p: str, stub_modules: dict, where: str) -> QConfig:
  """The QConfig of a live observed module, from its observer objects."""
  modules = dict(model.named_modules())
  specs: dict[str, QuantSpec] = {}
  fakes = set()
  sites = {p + site: modules.get(p + site) for site in ACTIVATION_SITES}
  sites.update({f"{path}.activation_post_process": getattr(m, "activation_post_process", None)
                for path, m in stub_modules.items()})
  for site, obj in sites.items():
    if obj is None:
      continue
    spec, fake = _spec_from_torch_observer(obj, f"{where}: {site}")
    specs[site] = spec
    fakes.add(fake)
  if not specs:
    raise ValueError(f"from_torch: {where} has no observers; prepare it first")
  first_site, activation = next(iter(specs.items()))
  different = [s for s, spec in specs.items() if spec != activation]
  if different or len(fakes) > 1:
    raise ValueError(
        f"from_torch: {where}: torch's observers differ between {first_site} and {different}"
        " (or mix fake quantization with observation); flax_qmha uses one activation spec,"
        " pass qconfig= to choose it"
    )
  fake = fakes.pop()
  weight = None
  linear = modules.get(p + "linear_Q")
  mha = modules.get(_public(p))
  if linear is not None and hasattr(linear, "weight_fake_quant"):
    weight, _ = _spec_from_torch_observer(linear.weight_fake_quant,
                                          f"{where}: {p}linear_Q.weight_fake_quant")
  else:
    torch_qconfig = getattr(linear, "qconfig", None) or getattr(mha, "qconfig", None)
    if torch_qconfig is not None and getattr(torch_qconfig, "weight", None) is not None:
      weight, _ = _spec_from_torch_observer(torch_qconfig.weight(),
                                            f"{where}: qconfig.weight")
  if weight is None:
    weight = (get_default_qat_qconfig if fake else get_default_qconfig)("x86").weight
    warnings.warn(
        f"from_torch: {where} carries no weight observer or qconfig; using the x86 default"
        f" weight spec {weight}", UserWarning, stacklevel=5)
  return QConfig(activation=activation, weight=weight, fake_quant=fake)


# ---------------------------------------------------------------------------------------------
# input QuantStubs of a containing model


def _stub_prefixes(p: str, input_stubs: Mapping | None, caller: str) -> dict[str, str]:
  """Role -> internal key prefix of the QuantStub quantizing that input."""
  if input_stubs is None:
    parent = _internal(_public(p).rpartition(".")[0])
    return {role: parent + name + "." for role, name in DEFAULT_INPUT_STUBS.items()}
  if not isinstance(input_stubs, Mapping) or set(input_stubs) - set(INPUTS) \
      or not all(isinstance(v, str) and v for v in input_stubs.values()):
    raise ValueError(
        f"{caller}: input_stubs must map some of {list(INPUTS)} to module paths such as"
        f" 'quant_query', got {input_stubs!r}"
    )
  return {role: _internal(path) for role, path in input_stubs.items()}


def _scalar(value: Any, what: str, kind: type) -> float | int:
  """A one-element number (Python, numpy or torch) as ``kind``; zero points must be ints."""
  arr = np.asarray(_to_numpy(value))
  ok = arr.size == 1 and arr.dtype != np.bool_ and (
      np.issubdtype(arr.dtype, np.integer)
      or (kind is float and np.issubdtype(arr.dtype, np.floating)))
  if not ok:
    raise ValueError(f"{what} must be a single {kind.__name__}, got {_short(value)}")
  return kind(arr.reshape(-1)[0])


def _check_qparams(scale: float, zero_point: int, what: str) -> tuple[np.float32, np.int32]:
  if not (np.isfinite(scale) and scale > 0):
    raise ValueError(f"{what}: scale must be a positive finite float, got {scale!r}")
  if not 0 <= zero_point <= 255:
    raise ValueError(f"{what}: zero_point must be a quint8 zero point in 0..255, got"
                     f" {zero_point!r}")
  return np.float32(scale), np.int32(zero_point)


def _input_qparams_arg(input_qparams: Any, caller: str) -> dict[str, tuple]:
  if not isinstance(input_qparams, Mapping) or set(input_qparams) != set(INPUTS):
    raise ValueError(
        f"{caller}: input_qparams must be a dict with keys {list(INPUTS)} mapping to (scale,"
        f" zero_point) in torch's quint8 domain, got {_short(input_qparams)}"
    )
  result = {}
  for role in INPUTS:
    value = input_qparams[role]
    what = f"{caller}: input_qparams[{role!r}]"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
      raise ValueError(f"{what} must be a (scale, zero_point) pair, got {_short(value)}")
    result[role] = _check_qparams(_scalar(value[0], f"{what} scale", float),
                                  _scalar(value[1], f"{what} zero_point", int), what)
  return result


def _stored_qparams(src: _Source, site: str, what: str) -> tuple[np.float32, np.int32]:
  """A converted site's stored ``scale``/``zero_point`` (quint8 domain)."""
  label = f"{src.label}: {site!r}"
  scale = _scalar(_entry(src, site + ".scale", f"{what} scale"), f"{label} scale", float)
  zero_point = _scalar(_entry(src, site + ".zero_point", f"{what} zero point"),
                       f"{label} zero_point", int)
  return _check_qparams(scale, zero_point, label)


def _stub_qparams(src: _Source, stubs: dict[str, str]) -> dict[str, tuple]:
  """(scale, zero_point) of converted QuantStubs (torch's ``Quantize`` modules) found."""
  found = {}
  for role, stub in stubs.items():
    scale, zp = src.entries.get(stub + "scale"), src.entries.get(stub + "zero_point")
    if isinstance(scale, np.ndarray) and isinstance(zp, np.ndarray):
      where = f"{src.label}: {stub + 'scale'!r}/{stub + 'zero_point'!r}"
      found[role] = _check_qparams(_scalar(scale, where, float), _scalar(zp, where, int), where)
  return found


# ---------------------------------------------------------------------------------------------
# the three kinds


def _import_float(src, p, layout, hyper, add_bias_kv, caller):
  params, dims = _float_params(src, p, layout, add_bias_kv, caller)
  module = MultiheadAttention(**_module_fields(hyper, dims, caller))
  return module, {"params": params}


def _import_observed(src, p, hyper, *, qconfig, input_stubs, add_bias_kv, caller):
  params, dims = _float_params(src, p, "linears", add_bias_kv, caller)
  where = f"{src.label} at {_public(p)!r}"
  stubs = _stub_prefixes(p, input_stubs, caller)
  present = {role: stub for role, stub in stubs.items()
             if any(k.startswith(stub + "activation_post_process.") for k in src.entries)}
  inferred = qconfig is None and src.model is None
  if qconfig is None:
    if src.model is not None:
      modules = dict(src.model.named_modules())
      qconfig = _live_qconfig(src.model, p, {_public(s): modules[_public(s)]
                                             for s in present.values()}, where)
    else:
      qconfig = _infer_qconfig(src, p)
  elif not isinstance(qconfig, QConfig):
    raise TypeError(f"{caller}: qconfig must be a flax_qmha.QConfig or None, got"
                    f" {type(qconfig).__name__}")
  e = dims["embed_dim"]
  act = qconfig.activation
  stats: dict = {name: {} for name in PROJECTIONS}
  sites = {}
  for site, path in ACTIVATION_SITES.items():
    key_prefix = p + site
    sites[key_prefix] = path
    value = _stats_at(src, key_prefix, act, (), f"{where} {site}")
    if len(path) == 2:
      stats[path[0]][path[1]] = value
    else:
      stats[path[0]] = value
  for role, stub in stubs.items():
    name = DEFAULT_INPUT_STUBS[role]
    if role in present:
      key_prefix = stub + "activation_post_process"
      sites[key_prefix] = (name,)
      stats[name] = _stats_at(src, key_prefix, act, (), f"{src.label} QuantStub {key_prefix}")
    else:
      stats[name] = {k: np.asarray(v) for k, v in initial_stats(act).items()}
  missing = [_public(stubs[r]) for r in INPUTS if r not in present]
  if missing:
    warnings.warn(
        f"{caller}: no input QuantStubs {missing} next to the attention ({where}), so"
        f" quant_stats/{'/'.join(DEFAULT_INPUT_STUBS[r] for r in INPUTS if r not in present)}"
        " are left un-updated and convert() will need those inputs calibrated first (apply"
        " the module with mutable=['quant_stats'] on representative inputs, or fill them);"
        " pass input_stubs= to name the stubs", UserWarning, stacklevel=4)
  if qconfig.fake_quant:
    w_spec = qconfig.weight
    shape = (e,) if w_spec.is_per_channel else ()
    for name in PROJECTIONS:
      key_prefix = f"{p}{name}.weight_fake_quant"
      if any(k.startswith(key_prefix + ".") for k in src.entries):
        stats[name]["weight_fake_quant"] = _stats_at(src, key_prefix, w_spec, shape,
                                                     f"{where} {name}.weight_fake_quant")
      else:  # torch fake-quantized only activations: observe the final weights, as its convert
        stats[name]["weight_fake_quant"] = _observe_once(w_spec, params[name]["kernel"])
  if dims["add_bias_kv"]:
    # torch observes no bias_k/bias_v; its convert picks their qparams from their min/max.
    for name in ("bias_k", "bias_v"):
      stats[f"quant_{name}"] = _observe_once(BIAS_KV_SPEC, params[name])
  if inferred and qconfig.fake_quant:
    _check_stored_fake_quant_qparams(src, act, sites, stats)
  module = MultiheadAttention(**_module_fields(hyper, dims, caller), qconfig=qconfig)
  return module, {"params": params, "quant_stats": stats}


def _packed_weight(src: _Source, key: str) -> tuple[QuantizedTensor, Any]:
  packed = _entry(src, key, "a quantized Linear's packed (weight, bias)")
  if not (isinstance(packed, tuple) and len(packed) == 2
          and isinstance(packed[0], QuantizedTensor)):
    raise CheckpointError(f"{src.label}: {key!r} must be a (quantized weight, bias or None)"
                          f" pair, got {_short(packed)}")
  weight, bias = packed
  if weight.dtype != "qint8" or weight.int_repr.ndim != 2:
    raise CheckpointError(f"{src.label}: {key!r} holds {weight!r}; expected a 2-D qint8"
                          " weight")
  return weight, bias


def _int8_projection(src: _Source, key: str, weight: QuantizedTensor, bias: Any,
                     shape: tuple[int | None, int | None]) -> tuple[dict, Any, bool]:
  """torch's quantized Linear weight -> ``({kernel, kernel_scale}, float bias or None,
  per_channel)``, as stored: the kernel is ``int_repr`` transposed to ``(in, out)``."""
  if any(want is not None and got != want for got, want in zip(weight.shape, shape)):
    expected = ", ".join("in_features" if d is None else str(d) for d in shape)
    raise CheckpointError(f"{src.label}: {key!r} holds a weight of shape {weight.shape},"
                          f" expected ({expected})")
  if weight.axis is None:
    scale, zero_points = np.float32(weight.scale), np.asarray([weight.zero_point])
  elif weight.axis == 0 and weight.qscheme == "torch.per_channel_affine":
    scale, zero_points = np.asarray(weight.scale, np.float32), np.asarray(weight.zero_point)
  else:
    raise CheckpointError(f"{src.label}: {key!r} is quantized with {weight.qscheme} on axis"
                          f" {weight.axis}; expected per-tensor or per-channel on axis 0")
  if np.any(zero_points != 0):
    raise CheckpointError(f"{src.label}: {key!r} has non-zero weight zero points"
                          f" {np.unique(zero_points)[:4]}; int8 kernels must be symmetric")
  if bias is not None:
    if not isinstance(bias, np.ndarray) or bias.shape != (weight.shape[0],) \
        or not _is_float_dtype(bias.dtype):
      raise CheckpointError(f"{src.label}: the bias in {key!r} must be a float"
                            f" ({weight.shape[0]},) array, got {_short(bias)}")
    bias = np.array(bias, np.float32)
  entry = {"kernel": np.ascontiguousarray(weight.int_repr.T), "kernel_scale": scale}
  return entry, bias, weight.axis is not None


def _quantized_bias_kv(value: Any, name: str, e: int, caller: str) -> dict:
  value = _to_numpy(value)
  if not isinstance(value, QuantizedTensor) or value.dtype != "quint8" or value.axis is not None:
    raise TypeError(
        f"{caller}: {name} must be torch's quantized (quint8, per-tensor) {name} of the"
        f" converted module, e.g. converted_mha.{name}, got {_short(value)}"
    )
  if value.shape != (1, 1, e):
    raise ValueError(f"{caller}: {name} has shape {value.shape}, expected (1, 1, {e})")
  return {name: np.array(value.int_repr, np.uint8),
          f"{name}_scale": np.float32(value.scale),
          f"{name}_zero_point": np.int32(value.zero_point)}


def _converted_bias_kv(src: _Source, p: str, e: int, add_bias_kv, bias_kv, where: str,
                       caller: str) -> dict:
  """The uint8 ``bias_k``/``bias_v`` with their qparams, or ``{}``. They are quantized
  attributes of the live module, never in its state_dict: ``bias_kv`` supplies them."""
  stored = [src.entries.get(p + n) for n in ("bias_k", "bias_v")]
  if bias_kv is not None:
    if not isinstance(bias_kv, (tuple, list)) or len(bias_kv) != 2:
      raise ValueError(f"{caller}: bias_kv must be a (bias_k, bias_v) pair of torch's quantized"
                       f" tensors, got {_short(bias_kv)}")
    stored = list(bias_kv)
  found = all(s is not None for s in stored)
  if add_bias_kv is not None:
    _check_bool(add_bias_kv, "add_bias_kv", caller)
    if add_bias_kv and not found:
      raise ValueError(
          f"{caller}: add_bias_kv=True but {where} has no bias_k/bias_v: torch's converted"
          " MultiheadAttention keeps them out of state_dict(); pass"
          " bias_kv=(converted_mha.bias_k, converted_mha.bias_v) from the live module"
      )
    if found and not add_bias_kv:
      raise ValueError(f"{caller}: add_bias_kv=False but {where} has bias_k/bias_v")
  if not found:
    return {}
  result = {}
  for name, value in zip(("bias_k", "bias_v"), stored):
    result.update(_quantized_bias_kv(value, name, e, caller))
  return result


def _converted_inputs(src: _Source, p: str, input_qparams, input_stubs, where: str,
                      caller: str) -> dict[str, tuple]:
  if input_qparams is not None:
    return _input_qparams_arg(input_qparams, caller)
  stubs = _stub_prefixes(p, input_stubs, caller)
  inputs = _stub_qparams(src, stubs)
  missing = [_public(stubs[r]) for r in INPUTS if r not in inputs]
  if missing:
    raise ValueError(
        f"{caller}: the input qparams of {where} are unknown: torch's quantized MHA takes"
        f" inputs quantized outside it, and no converted QuantStubs {missing} (with"
        " scale/zero_point) sit next to it. Pass input_qparams={'query': (scale,"
        " zero_point), 'key': ..., 'value': ...} (quint8, as torch's QuantStubs), name the"
        " stubs with input_stubs=, or pass dynamic_inputs=True to quantize the inputs at"
        " run time (numerics='accurate': not torch's numbers)"
    )
  return inputs


def _import_converted(src, p, hyper, *, input_qparams, input_stubs, add_bias_kv, bias_kv,
                      dynamic_inputs, caller):
  where = f"{src.label} at {_public(p)!r}"
  if dynamic_inputs and input_qparams is not None:
    raise ValueError(f"{caller}: pass input_qparams or dynamic_inputs=True, not both")
  packed = {name: _packed_weight(src, f"{p}{name}._packed_params._packed_params")
            for name in PROJECTIONS}
  e = packed["out_proj"][0].shape[0]
  shapes = {"linear_Q": (e, e), "linear_K": (e, None), "linear_V": (e, None),
            "out_proj": (e, e)}
  qparams: dict = {}
  biases, per_channel = {}, set()
  for name in PROJECTIONS:
    entry, biases[name], channelwise = _int8_projection(
        src, f"{p}{name}._packed_params._packed_params", *packed[name], shapes[name])
    qparams[name] = entry
    per_channel.add(channelwise)
  if len(per_channel) > 1:
    raise CheckpointError(f"{where}: the projections mix per-tensor and per-channel weights")
  has_bias = any(b is not None for b in biases.values())
  if has_bias:
    for name in PROJECTIONS:
      qparams[name]["bias"] = biases[name] if biases[name] is not None else np.zeros(
          e, np.float32)
  bias_kv_params = _converted_bias_kv(src, p, e, add_bias_kv, bias_kv, where, caller)
  qparams.update(bias_kv_params)
  dims = dict(embed_dim=e, kdim=packed["linear_K"][0].shape[1],
              vdim=packed["linear_V"][0].shape[1], bias=has_bias,
              add_bias_kv=bool(bias_kv_params))
  fields = dict(**_module_fields(hyper, dims, caller), per_channel_weights=per_channel.pop())
  if dynamic_inputs:
    module = QuantizedMultiheadAttention(**fields, numerics="accurate",
                                         dynamic_activations=True)
    return module, {"params": qparams}

  inputs = _converted_inputs(src, p, input_qparams, input_stubs, where, caller)
  input_of = {"linear_Q": inputs["query"], "linear_K": inputs["key"],
              "linear_V": inputs["value"],
              # torch quantizes the attention result (out_proj's input) at quant_attn_output.
              "out_proj": _stored_qparams(src, p + "quant_attn_output", "attention result")}
  for name in PROJECTIONS:
    scale, zero_point = input_of[name]
    entry = qparams[name]
    entry["input_scale"] = np.float32(scale)
    entry["input_zero_point"] = np.int32(int(zero_point) - 128)  # the signed (int8) domain
    entry["zero_point_correction"] = zero_point_correction(entry["kernel"],
                                                           entry["input_zero_point"])
    entry["output_scale"], entry["output_zero_point"] = _stored_qparams(
        src, p + name, f"{name} output")
  qparams["attn_weights_scale"], qparams["attn_weights_zero_point"] = _stored_qparams(
      src, p + "quant_attn_output_weights", "attention weights")
  module = QuantizedMultiheadAttention(**fields, numerics="torch")
  return module, {"params": qparams}


# ---------------------------------------------------------------------------------------------
# choosing the attention, and the public functions


def _live_attentions(model: Any) -> dict[str, Any]:
  """Internal prefix -> torch attention module, for every MHA inside a live model."""
  import torch  # pylint: disable=g-import-not-at-top  # a live torch module was passed

  return {_internal(name): m for name, m in model.named_modules()
          if isinstance(m, torch.nn.MultiheadAttention)}


def _live_kind(module: Any) -> str:
  import torch  # pylint: disable=g-import-not-at-top  # a live torch module was passed

  if isinstance(module, torch.ao.nn.quantized.MultiheadAttention):
    return "converted"
  if isinstance(module, torch.ao.nn.quantizable.MultiheadAttention):
    return "quantizable"
  return "float"


def _pick(found: Mapping[str, Any], prefix: Any, src: _Source, caller: str) -> str:
  if not isinstance(prefix, str):
    raise TypeError(f"{caller}: prefix must be a str such as 'layers.0.self_attn', got"
                    f" {_short(prefix)}")
  names = [_public(p) for p in found]
  if prefix.strip("."):
    p = _internal(prefix)
    if p not in found:
      raise ValueError(f"{caller}: {src.label} has no MultiheadAttention at prefix"
                       f" {_public(p)!r}; found {names}")
    return p
  if len(found) == 1:
    return next(iter(found))
  if not found:
    raise ValueError(
        f"{caller}: found no MultiheadAttention in {src.label} (looked for keys ending in"
        f" {[m for m, _ in _MARKERS]}); for transformers-style attentions use"
        " from_torch_checkpoint(..., key_map=...)"
    )
  raise ValueError(f"{caller}: {src.label} holds {len(found)} MultiheadAttention modules"
                   f" {names}; pass prefix= to choose one")


def _import(src: _Source, p: str, kind: str, hyper: _Hyper, options: dict, caller: str):
  module, variables = _import_kind(src, p, kind, hyper, options, caller)
  return module, jax.tree.map(jnp.asarray, variables)  # immutable, as convert() returns


def _import_kind(src: _Source, p: str, kind: str, hyper: _Hyper, options: dict, caller: str):
  kind = _refine_kind(src.entries, p, kind)
  if kind == "converted":
    if options["qconfig"] is not None:
      raise ValueError(f"{caller}: qconfig= applies to observed modules, but"
                       f" {_public(p)!r} is already converted")
    return _import_converted(
        src, p, hyper, input_qparams=options["input_qparams"],
        input_stubs=options["input_stubs"], add_bias_kv=options["add_bias_kv"],
        bias_kv=options["bias_kv"], dynamic_inputs=options["dynamic_inputs"], caller=caller)
  if options["bias_kv"] is not None:
    raise ValueError(f"{caller}: bias_kv= is for converted modules (whose bias_k/bias_v are"
                     f" not in state_dict()); {_public(p)!r} stores its own")
  if kind == "observed":
    return _import_observed(src, p, hyper, qconfig=options["qconfig"],
                            input_stubs=options["input_stubs"],
                            add_bias_kv=options["add_bias_kv"], caller=caller)
  if options["qconfig"] is not None:
    raise ValueError(f"{caller}: qconfig= applies to observed modules, but {_public(p)!r}"
                     " has no observers")
  layout = "linears" if kind == "float_linears" else "native"
  return _import_float(src, p, layout, hyper, options["add_bias_kv"], caller)


def from_torch(
    source: Any,
    *,
    prefix: str = "",
    num_heads: int | None = None,
    batch_first: bool | None = None,
    add_zero_attn: bool | None = None,
    dropout: float | None = None,
    input_qparams: Mapping | None = None,
    input_stubs: Mapping[str, str] | None = None,
    qconfig: QConfig | None = None,
    add_bias_kv: bool | None = None,
    bias_kv: tuple[Any, Any] | None = None,
    dynamic_inputs: bool = False,
):
  """Imports one torch multi-head attention as a flax-qmha module and its variables.

  What comes out depends on what torch module the weights belong to:

  * ``torch.nn.MultiheadAttention`` (packed ``in_proj_weight`` or separate
    ``q/k/v_proj_weight``), or an unprepared ``torch.ao.nn.quantizable.MultiheadAttention``:
    a float :class:`MultiheadAttention` and ``{"params": ...}``.
  * A prepared (observed) quantizable MHA, calibrated or trained with fake quantization:
    a :class:`MultiheadAttention` with a ``QConfig`` and ``{"params", "quant_stats"}``.
    The weights come from ``linear_Q/K/V`` and ``out_proj`` (torch's inherited ``in_proj_*``
    are stale and ignored); every statistic is copied from torch's buffers
    (``min_val``, ``max_val``, ``histogram``; a FakeQuantize's observer). Live modules give
    the exact ``QConfig`` (observer class, dtype, qscheme, range, averaging constant, eps,
    bins, and the weight observer of ``qconfig.weight`` or ``weight_fake_quant``). A
    state_dict cannot say which observers made it, so ``qconfig`` is inferred from torch's
    x86 presets: a ``histogram`` buffer means ``get_default_qconfig("x86")``, nested
    FakeQuantize buffers ``get_default_qat_qconfig("x86")``, plain ``min_val``/``max_val``
    a quint8 ``"minmax"`` observer with ``reduce_range``; ``eps`` and ``bins`` are read from
    the buffers, and a warning is raised if an inferred QAT config does not reproduce the
    scale/zero point a FakeQuantize stored. Pass ``qconfig=`` for anything else.
    Statistics torch does not keep are made as its convert makes them: ``weight_fake_quant``
    (QAT, when torch fake-quantized only activations) and ``quant_bias_k``/``quant_bias_v``
    from one observation of the weights. The inputs' statistics come from QuantStubs next to
    the attention (``quant_query``/``quant_key``/``quant_value``, or ``input_stubs``); when
    they are absent they stay un-updated and a warning says convert() needs them calibrated.
  * A converted ``torch.ao.nn.quantized.MultiheadAttention``: a
    ``QuantizedMultiheadAttention(numerics="torch")`` holding torch's int8 weights (kernels
    are ``int_repr`` transposed), weight scales, biases, output qparams (each linear's
    ``scale``/``zero_point``), the attention result's qparams (``quant_attn_output``, the
    input of ``out_proj``) and the attention weights' qparams, all as stored, never
    recomputed. Its inputs' qparams come from ``input_qparams``, else from converted
    QuantStubs next to it; without either a ``ValueError`` says so, unless
    ``dynamic_inputs=True``, which builds ``numerics="accurate", dynamic_activations=True``
    from the same int8 weights (inputs quantized per token at run time; torch's output
    requantization is then not reproduced). ``bias_k``/``bias_v`` are taken from a live
    module; a state_dict lacks them, so pass ``bias_kv=``.

  The module computes torch's maths with flax-qmha's fixes (``batch_first=True`` is right
  for the quantized module too; fully masked rows give 0, not NaN). Floating-point tensors
  are imported as float32. A projection without a bias next to projections with one gets a
  zero bias (the same maths; our modules have one ``bias`` flag), except that a lone
  ``in_proj_bias`` or ``out_proj.bias`` in ``torch.nn.MultiheadAttention``'s layout, which
  torch never writes, is an error.

  Args:
    source: a live torch module (an MHA, or any model containing one), a state_dict (torch
      tensors, numpy arrays or :class:`QuantizedTensor`), or a path (str or PathLike) to a
      ``torch.save`` file (``.pt``/``.pth``/``.bin``; read without torch and without running
      code) or a ``.safetensors`` file (by its suffix), or a seekable binary file object of
      either (told apart by the zip signature).
    prefix: the attention's module path, e.g. ``"layers.0.self_attn"``; ``""`` finds the
      only one (an error lists them when there are several).
    num_heads: number of heads; required for state_dicts and files (torch does not store
      it), read from live modules. Explicit values override the module's.
    batch_first: inputs are ``(N, L, E)``; default the live module's, else ``False``.
    add_zero_attn: default the live module's, else ``False`` (a state_dict cannot tell).
    dropout: attention-weight dropout; default the live module's, else ``0.0``.
    input_qparams: converted modules only: ``{"query": (scale, zero_point), "key": ...,
      "value": ...}`` as torch's QuantStubs quantize the inputs (quint8 zero points);
      overrides stubs found next to the attention.
    input_stubs: where the inputs' QuantStubs are, as module paths from the source's root,
      e.g. ``{"query": "quant_q", ...}``; default: the attention's siblings
      ``quant_query``, ``quant_key``, ``quant_value``.
    qconfig: observed modules only: the ``QConfig`` to use instead of the derived one.
    add_bias_kv: ``None`` infers it; ``True``/``False`` assert it (an error names the
      missing or unexpected tensors).
    bias_kv: converted modules only: ``(bias_k, bias_v)``, the converted module's quantized
      (quint8) tensors, for state_dicts that lack them.
    dynamic_inputs: converted modules only: quantize inputs at run time (see above).

  Returns:
    ``(module, variables)``: a :class:`MultiheadAttention` with ``{"params"}`` (float) or
    ``{"params", "quant_stats"}`` (observed), or a :class:`QuantizedMultiheadAttention` with
    ``{"params"}`` (converted); the variables are jax arrays, laid out as ``module.init``
    and :func:`flax_qmha.convert` lay them out.

  Raises:
    TypeError: ``source`` or an argument has the wrong type.
    ValueError: no attention at ``prefix`` (or several and no ``prefix``), ``num_heads``
      missing for a state_dict, inconsistent hyperparameters, unknown input qparams of a
      converted module, unsupported observers.
    CheckpointError: a tensor is missing or has the wrong shape or dtype (the message
      names its key), or the file is unreadable.
  """
  src = _load_source(source, "from_torch")
  _check_bool(dynamic_inputs, "dynamic_inputs", "from_torch")
  if src.model is not None:
    live = _live_attentions(src.model)
    p = _pick(live, prefix, src, "from_torch")
    module = live[p]
    kind = _live_kind(module)
    if kind == "converted" and bias_kv is None and getattr(module, "bias_k", None) is not None:
      # Quantized attributes, outside state_dict(): add them under their would-be keys.
      src.entries[p + "bias_k"] = _to_numpy(module.bias_k)
      src.entries[p + "bias_v"] = _to_numpy(module.bias_v)
  else:
    found = _find_attentions(src.entries)
    p = _pick(found, prefix, src, "from_torch")
    module, kind = None, found[p]
  hyper = _hyper(module, num_heads=num_heads, batch_first=batch_first,
                 add_zero_attn=add_zero_attn, dropout=dropout,
                 where=f"{src.label} at {_public(p)!r}", caller="from_torch")
  options = dict(qconfig=qconfig, input_qparams=input_qparams, input_stubs=input_stubs,
                 add_bias_kv=add_bias_kv, bias_kv=bias_kv, dynamic_inputs=dynamic_inputs)
  return _import(src, p, kind, hyper, options, "from_torch")


class CheckpointImport(dict):
  """What :func:`from_torch_checkpoint` found: ``{prefix: (module, variables)}``.

  A ``dict`` in the checkpoint's key order, plus what was not imported.

  Attributes:
    skipped: ``[(prefix, reason), ...]`` for attentions that were found but not imported
      (missing or mis-shaped tensors, no ``num_heads`` for the prefix, a converted module
      whose input qparams are unknown, ...).
  """

  def __init__(self, items=(), skipped=()):
    super().__init__(items)
    self.skipped: list[tuple[str, str]] = list(skipped)


def _check_key_map(key_map: Any) -> dict[str, str]:
  if not isinstance(key_map, Mapping) or set(key_map) != set(_KEY_MAP_ROLES) or not all(
      isinstance(v, str) and v.strip(".") for v in key_map.values()):
    raise ValueError(
        "from_torch_checkpoint: key_map must map exactly 'q', 'k', 'v' and 'out' to Linear"
        " module names relative to the attention, e.g. {'q': 'q_proj', 'k': 'k_proj', 'v':"
        f" 'v_proj', 'out': 'out_proj'}}, got {_short(key_map)}"
    )
  return {role: key_map[role].strip(".") for role in _KEY_MAP_ROLES}


def _marker_keys(entries: Mapping, p: str, key_map: dict[str, str] | None) -> list[str]:
  keys = [p + marker for marker, _ in _MARKERS if p + marker in entries]
  if key_map is not None and p + key_map["q"] + ".weight" in entries:
    keys.append(p + key_map["q"] + ".weight")
  return keys


def _find_mapped(entries: Mapping, key_map: dict[str, str]) -> list[str]:
  """Internal prefixes P with a ``P<q>.weight`` key, in key order."""
  suffix = key_map["q"] + ".weight"
  found = []
  for key in entries:
    if key == suffix or key.endswith("." + suffix):
      found.append(key[: len(key) - len(suffix)])
  return found


def _import_mapped(src: _Source, p: str, key_map: dict[str, str], hyper: _Hyper,
                   caller: str):
  """A float attention made of four ``Linear`` layers (transformers style)."""
  weights, biases = {}, {}
  e = _embed_dim(src, f"{p}{key_map['q']}.weight")
  for name, role in zip(PROJECTIONS, _KEY_MAP_ROLES):
    key = f"{p}{key_map[role]}.weight"
    in_dim = e if role in ("q", "out") else _in_features(
        src, key, e, f"{role} projection weight (grouped-query attention is not supported)")
    weights[name] = _float_array(src, key, (e, in_dim), f"{role} projection weight")
    biases[name] = _optional_float(src, f"{p}{key_map[role]}.bias", (e,),
                                   f"{role} projection bias")
  params, bias = _projection_params(weights, biases)
  dims = dict(embed_dim=e, kdim=weights["linear_K"].shape[1],
              vdim=weights["linear_V"].shape[1], bias=bias, add_bias_kv=False)
  module = MultiheadAttention(**_module_fields(hyper, dims, caller))
  return module, {"params": params}


def from_torch_checkpoint(
    source: Any,
    *,
    num_heads: int | Mapping[str, int],
    key_map: Mapping[str, str] | None = None,
    batch_first: bool = False,
    add_zero_attn: bool = False,
    dropout: float = 0.0,
    qconfig: QConfig | None = None,
    dynamic_inputs: bool = False,
) -> CheckpointImport:
  """Imports every multi-head attention found in a state_dict or checkpoint file.

  torch attentions are found by their keys: ``<prefix>in_proj_weight`` or
  ``<prefix>q_proj_weight`` (float), ``<prefix>linear_Q.weight`` (quantizable/observed),
  ``<prefix>linear_Q._packed_params._packed_params`` (converted), e.g. the
  ``layers.<i>.self_attn`` of an ``nn.TransformerEncoder``. Each is imported as
  :func:`from_torch` would (converted ones with the inputs' qparams of QuantStubs next to
  them). With ``key_map``, transformers-style attentions made of four ``Linear`` layers are
  found too: ``{"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}`` or
  BERT's ``{"q": "self.query", "k": "self.key", "v": "self.value", "out": "output.dense"}``
  name the layers (their ``.weight``, optional ``.bias``) relative to the attention's
  prefix; they become float :class:`MultiheadAttention` modules computing
  ``torch.nn.MultiheadAttention``'s maths with those weights (model-specific extras such as
  rotary embeddings are not part of it; grouped-query attentions are skipped).

  Attentions that are found but cannot be imported are reported, not raised: they are
  listed in the result's ``skipped`` attribute and in one ``UserWarning``. Observed
  attentions without input QuantStubs are imported, with :func:`from_torch`'s warning.

  Args:
    source: a state_dict (torch tensors, numpy arrays, :class:`QuantizedTensor`), a path to
      (or binary file object of) a ``.pt``/``.pth``/``.bin``/``.safetensors`` file, or a
      live torch module (read through its ``state_dict()``, so hyperparameters still come
      from these arguments and converted modules' ``bias_k``/``bias_v`` are not seen).
    num_heads: heads of every attention, or ``{prefix: num_heads}``; prefixes found but not
      in the dict are skipped.
    key_map: roles ``"q"``, ``"k"``, ``"v"``, ``"out"`` -> Linear names, for
      transformers-style attentions.
    batch_first: inputs of every imported module are ``(N, L, E)``.
    add_zero_attn: torch's ``add_zero_attn`` (not stored in state_dicts).
    dropout: attention-weight dropout.
    qconfig: for observed attentions, instead of the inferred one (see :func:`from_torch`).
    dynamic_inputs: for converted attentions, as in :func:`from_torch`.

  Returns:
    A :class:`CheckpointImport`: ``{prefix: (module, variables)}`` with prefixes such as
    ``"layers.0.self_attn"``, and ``skipped``, a list of ``(prefix, reason)``.

  Raises:
    TypeError, ValueError: bad arguments (``num_heads`` missing or not an int or dict,
      a malformed ``key_map``, a ``num_heads`` prefix that does not exist).
    ValueError: no attention at all was found.
    CheckpointError: the file is unreadable.
  """
  caller = "from_torch_checkpoint"
  src = _load_source(source, caller)
  src.model = None  # hyperparameters come from the arguments, as for any state_dict
  for name, value in (("batch_first", batch_first), ("add_zero_attn", add_zero_attn),
                      ("dynamic_inputs", dynamic_inputs)):
    _check_bool(value, name, caller)
  if qconfig is not None and not isinstance(qconfig, QConfig):
    raise TypeError(f"{caller}: qconfig must be a flax_qmha.QConfig or None, got"
                    f" {type(qconfig).__name__}")
  # Arguments shared by every attention are checked once, up front: a bad one is the
  # caller's mistake, not a reason to skip each attention in turn.
  heads = num_heads.values() if isinstance(num_heads, Mapping) else [num_heads]
  for value in heads:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
      raise TypeError(f"{caller}: num_heads must be a positive int or a dict prefix ->"
                      f" positive int, got {_short(num_heads)}")
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.floating)) \
      or not 0.0 <= dropout < 1.0:
    raise ValueError(f"{caller}: dropout must be a float in [0, 1), got {dropout!r}")
  native = _find_attentions(src.entries)
  mapped = []
  if key_map is not None:
    key_map = _check_key_map(key_map)
    mapped = [p for p in _find_mapped(src.entries, key_map) if p not in native]
  position = {key: i for i, key in enumerate(src.entries)}
  first_key = {p: min(position[k] for k in _marker_keys(src.entries, p, key_map)) for p in
               list(native) + mapped}
  prefixes = sorted(first_key, key=first_key.get)
  if not prefixes:
    looked = [m for m, _ in _MARKERS] + ([key_map["q"] + ".weight"] if key_map else [])
    raise ValueError(f"{caller}: found no multi-head attention in {src.label} (looked for keys"
                     f" ending in {looked}); pass key_map= for transformers-style attentions")
  public = [_public(p) for p in prefixes]
  if isinstance(num_heads, Mapping):
    unknown = sorted(set(num_heads) - set(public))
    if unknown:
      raise ValueError(f"{caller}: num_heads names prefixes {unknown} that hold no attention;"
                       f" found {public}")
    heads_of = dict(num_heads)
  elif isinstance(num_heads, (int, np.integer)) and not isinstance(num_heads, bool):
    heads_of = {name: int(num_heads) for name in public}
  else:
    raise TypeError(f"{caller}: num_heads must be an int or a dict prefix -> int, got"
                    f" {_short(num_heads)}")
  result = CheckpointImport()
  options = dict(qconfig=qconfig, input_qparams=None, input_stubs=None, add_bias_kv=None,
                 bias_kv=None, dynamic_inputs=dynamic_inputs)
  for p, name in zip(prefixes, public):
    if name not in heads_of:
      result.skipped.append((name, "num_heads has no entry for this prefix"))
      continue
    try:
      hyper = _hyper(None, num_heads=heads_of[name], batch_first=batch_first,
                     add_zero_attn=add_zero_attn, dropout=dropout,
                     where=f"{src.label} at {name!r}", caller=caller)
      if p in native:
        options["qconfig"] = qconfig if _refine_kind(src.entries, p, native[p]) == "observed" \
            else None
        result[name] = _import(src, p, native[p], hyper, options, caller)
      else:
        module, variables = _import_mapped(src, p, key_map, hyper, caller)
        result[name] = (module, jax.tree.map(jnp.asarray, variables))
    except (ValueError, TypeError) as e:  # CheckpointError is a ValueError
      result.skipped.append((name, str(e).removeprefix(f"{caller}: ")))
  if result.skipped:
    listed = "; ".join(f"{name!r}: {reason}" for name, reason in result.skipped)
    warnings.warn(f"{caller}: skipped {len(result.skipped)} attention(s) in {src.label}:"
                  f" {listed}", UserWarning, stacklevel=2)
  return result
