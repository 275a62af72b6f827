"""``convert`` (calibrated/QAT float module -> int8 module) and ``dequantize`` (back)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flax_qmha._checks import check_bool_fields
from flax_qmha._fake_quant import fake_quantize
from flax_qmha._int8 import zero_point_correction
from flax_qmha._mha import BIAS_KV_SPEC, MultiheadAttention
from flax_qmha._observers import calculate_stats_qparams, initial_stats, update_stats
from flax_qmha._qconfig import QuantSpec
from flax_qmha._qparams import quantize
from flax_qmha._quantized_mha import NUMERICS, QuantizedMultiheadAttention

PROJECTIONS = ("linear_Q", "linear_K", "linear_V", "out_proj")
# The observer whose statistics give each projection's input qparams.
INPUT_OBSERVERS = {
    "linear_Q": "quant_query", "linear_K": "quant_key", "linear_V": "quant_value",
    "out_proj": "quant_attn_output",
}
TORCH_FIELDS = ("embed_dim", "num_heads", "dropout", "bias", "add_bias_kv", "add_zero_attn",
                "kdim", "vdim", "batch_first")
# Weights of a module converted without a qconfig (dynamic_activations only):
# torch's default per-channel symmetric qint8.
DEFAULT_WEIGHT_SPEC = QuantSpec(observer="minmax", dtype="qint8",
                                qscheme="per_channel_symmetric")


def _stats(quant_stats: Mapping, path: tuple[str, ...], hint: str = "") -> dict:
  """The statistics at ``path``, refusing missing or never-updated ones."""
  node = quant_stats
  for part in path:
    if not isinstance(node, Mapping) or part not in node:
      raise ValueError(
          f"convert: statistic quant_stats/{'/'.join(path)} is missing; apply the module"
          " with mutable=['quant_stats'] on calibration data (or train it with QAT) first"
      )
    node = node[part]
  if not np.all(np.isfinite(np.asarray(node["min_val"]))):
    raise ValueError(
        f"convert: statistic quant_stats/{'/'.join(path)} was never updated (min_val is"
        " +inf): it saw no finite value (observers ignore inf and NaN); apply the module"
        " with mutable=['quant_stats'] on finite calibration data first" + hint
    )
  return dict(node)


def _check_params(params, expected: Mapping[str, tuple], caller: str, dtype=None) -> None:
  """Each ``"a/b"`` of ``expected`` must be a leaf of ``params`` with that shape."""
  for path, shape in expected.items():
    node = params
    for part in path.split("/"):
      if not isinstance(node, Mapping) or part not in node:
        raise ValueError(f"{caller}: params/{path} is missing (expected shape {shape})")
      node = node[part]
    if tuple(np.shape(node)) != shape:
      raise ValueError(
          f"{caller}: params/{path} has shape {tuple(np.shape(node))}, expected {shape}"
      )
    got = node.dtype if hasattr(node, "dtype") else np.asarray(node).dtype
    if dtype is not None and path.endswith("kernel") and got != dtype:
      raise ValueError(
          f"{caller}: params/{path} has dtype {got}, expected {np.dtype(dtype)}"
          " (the variables of the module built by convert())"
      )


def _variables_params(variables, caller: str, name: str) -> Mapping:
  if not isinstance(variables, Mapping):
    raise TypeError(f"{caller}: {name} must be a mapping, got {type(variables).__name__}")
  if "params" not in variables:
    raise ValueError(
        f"{caller}: {name} must have a 'params' entry, got keys {sorted(variables)}"
    )
  return variables["params"]


def _qparams(spec: QuantSpec, stats: Mapping) -> tuple[np.ndarray, np.ndarray]:
  scale, zero_point = calculate_stats_qparams(spec, stats)
  return np.asarray(scale, np.float32), np.asarray(zero_point, np.int32)


def _signed_zero_point(spec: QuantSpec, zero_point: np.ndarray) -> np.ndarray:
  """Activation zero points are stored in the signed (int8) domain."""
  return zero_point - 128 if spec.dtype == "quint8" else zero_point


def _observed_qparams(spec: QuantSpec, stats: Mapping, tensor) -> tuple[np.ndarray, np.ndarray]:
  """qparams from stored statistics (QAT: what fake quantization used) or, for
  observe-only configs, from a fresh observation of ``tensor`` (torch's convert
  instantiates a new weight observer on the final weights)."""
  if stats is None:
    channels = tensor.shape[-1] if spec.is_per_channel else None
    stats = update_stats(spec, initial_stats(spec, channels), tensor, channel_axis=-1)
  return _qparams(spec, stats)


def _quantize_weight(spec: QuantSpec, kernel, stats) -> dict:
  if not spec.is_symmetric or spec.dtype != "qint8":
    raise ValueError(
        f"convert: int8 weights need a symmetric qint8 weight spec (zero point 0),"
        f" got dtype={spec.dtype!r}, qscheme={spec.qscheme!r}"
    )
  kernel = jnp.asarray(kernel, jnp.float32)
  scale, zero_point = _observed_qparams(spec, stats, kernel)
  quant_min, quant_max = spec.quant_range
  axis = -1 if spec.is_per_channel else None
  q = quantize(kernel, scale, zero_point, quant_min, quant_max, axis=axis, dtype=jnp.int8)
  return {"kernel": np.asarray(q), "kernel_scale": scale}


def _quantize_bias_kv(bias, scale, zero_point, numerics: str) -> np.ndarray:
  """uint8 ``bias_k``/``bias_v``. torch's convert rounds ``x / scale + zero_point``
  (real quantization); QAT fake-quantized ``round(x / scale) + zero_point``, which
  "accurate" keeps so that the int8 module sees exactly the trained values."""
  bias = jnp.asarray(bias, jnp.float32)
  if numerics == "torch":
    return np.asarray(quantize(bias, scale, zero_point, 0, 255, dtype=jnp.uint8))
  fake = fake_quantize(bias, scale, zero_point, 0, 255)
  return np.asarray(jnp.round(fake / scale) + zero_point).astype(np.uint8)


def convert(
    module: MultiheadAttention,
    variables: Mapping,
    *,
    numerics: str = "accurate",
    int8_attention: bool = False,
    dynamic_activations: bool = False,
) -> tuple[QuantizedMultiheadAttention, dict]:
  """Converts a calibrated or QAT-trained ``MultiheadAttention`` to int8.

  Args:
    module: a ``MultiheadAttention`` with a ``qconfig`` (any module when
      ``dynamic_activations``: its weights then use per-channel symmetric qint8).
    variables: its variables: ``params`` and, unless ``dynamic_activations``, the
      ``quant_stats`` filled by calibration (``mutable=["quant_stats"]``) or QAT.
    numerics: ``"accurate"`` (default): activations use the observed ranges over
      the whole 8-bit grid (no ``reduce_range``: the int32 accumulator cannot
      saturate) and projection outputs stay float; ``"torch"``: exactly
      ``torch.ao.nn.quantized.MultiheadAttention``'s qparams and requantization.
    int8_attention: compute QK^T and PV as int8 products too (``"accurate"`` only).
    dynamic_activations: quantize projection inputs per token at run time; only
      the weights are converted and no activation statistics are needed.

  Returns:
    ``(QuantizedMultiheadAttention, qvariables)``. ``qvariables["params"]`` holds
    int8 kernels with their scales, the float biases, every activation's scale and
    zero point, and the zero-point corrections; no float copy of any kernel.

  Raises:
    TypeError: ``module`` is not a ``MultiheadAttention``.
    ValueError: no qconfig, a missing or never-updated statistic (named), or an
      unsupported option combination.
  """
  if not isinstance(module, MultiheadAttention):
    raise TypeError(
        f"convert: module must be a flax_qmha.MultiheadAttention, got {type(module).__name__}"
    )
  module.check_config()
  if numerics not in NUMERICS:
    raise ValueError(f"convert: numerics must be one of {NUMERICS}, got {numerics!r}")
  check_bool_fields("convert", int8_attention=int8_attention,
                    dynamic_activations=dynamic_activations)
  if numerics == "torch" and (int8_attention or dynamic_activations):
    raise ValueError(
        "convert: numerics='torch' reproduces torch's module, which has neither"
        f" int8_attention nor dynamic_activations; got int8_attention={int8_attention},"
        f" dynamic_activations={dynamic_activations}"
    )
  qconfig = module.qconfig
  if qconfig is None and not dynamic_activations:
    raise ValueError(
        "convert: the module has no qconfig; build it with qconfig=get_default_qconfig()"
        " (or a QAT qconfig) and calibrate it, or pass dynamic_activations=True"
    )
  if numerics == "torch" and qconfig.activation.dtype != "quint8":
    raise ValueError(
        f"convert: numerics='torch' needs quint8 activations (fbgemm), got"
        f" {qconfig.activation.dtype!r}"
    )
  if qconfig is not None and not dynamic_activations and qconfig.activation.is_per_channel:
    raise ValueError(
        "convert: activations need a per-tensor qscheme (one scale and zero point per"
        f" tensor), got qconfig.activation.qscheme={qconfig.activation.qscheme!r}"
    )
  params = _variables_params(variables, "convert", "variables")
  e = module.embed_dim
  expected = {f"{n}/kernel": (d, e) for n, d in zip(
      PROJECTIONS, (e, module.key_dim, module.value_dim, e))}
  expected.update({f"{n}/bias": (e,) for n in PROJECTIONS if module.bias})
  expected.update({n: (1, 1, e) for n in ("bias_k", "bias_v") if module.add_bias_kv})
  _check_params(params, expected, "convert")
  quant_stats = variables.get("quant_stats", {})
  weight_spec = DEFAULT_WEIGHT_SPEC if qconfig is None else qconfig.weight
  stored_weights = qconfig is not None and qconfig.fake_quant
  act_spec = None if qconfig is None else qconfig.activation
  if act_spec is not None and numerics == "accurate":
    act_spec = dataclasses.replace(act_spec, reduce_range=False, quant_min=None, quant_max=None)

  qmodule = QuantizedMultiheadAttention(
      **{f: getattr(module, f) for f in TORCH_FIELDS}, numerics=numerics,
      int8_attention=int8_attention, dynamic_activations=dynamic_activations,
      per_channel_weights=weight_spec.is_per_channel,
  )
  qparams: dict = {}
  for name in PROJECTIONS:
    w_stats = _stats(quant_stats, (name, "weight_fake_quant")) if stored_weights else None
    entry = _quantize_weight(weight_spec, params[name]["kernel"], w_stats)
    if module.bias:
      entry["bias"] = np.asarray(params[name]["bias"], np.float32)
    if not dynamic_activations:
      scale, zero_point = _qparams(act_spec, _stats(quant_stats, (INPUT_OBSERVERS[name],)))
      zero_point = _signed_zero_point(act_spec, zero_point)
      entry["input_scale"], entry["input_zero_point"] = scale, zero_point
      entry["zero_point_correction"] = zero_point_correction(entry["kernel"], zero_point)
    if numerics == "torch":
      scale, zero_point = _qparams(act_spec, _stats(quant_stats, (name, "activation_post_process")))
      entry["output_scale"], entry["output_zero_point"] = scale, zero_point
    qparams[name] = entry

  if module.add_bias_kv:
    bias_qparams = {}
    for name in ("bias_k", "bias_v"):
      stats = _stats(quant_stats, (f"quant_{name}",)) if stored_weights else None
      bias_qparams[name] = _observed_qparams(BIAS_KV_SPEC, stats, params[name])
    if numerics == "torch":
      # torch's from_observed quantizes bias_v with bias_k's qparams (a torch bug,
      # reproduced here only because "torch" numerics must give torch's numbers).
      bias_qparams["bias_v"] = bias_qparams["bias_k"]
    for name, (scale, zero_point) in bias_qparams.items():
      qparams[name] = _quantize_bias_kv(params[name], scale, zero_point, numerics)
      qparams[f"{name}_scale"], qparams[f"{name}_zero_point"] = scale, zero_point

  if int8_attention and not dynamic_activations:
    for short, name in (("q", "linear_Q"), ("k", "linear_K"), ("v", "linear_V")):
      stats = _stats(quant_stats, (name, "activation_post_process"))
      amax = max(abs(float(stats["min_val"])), abs(float(stats["max_val"])))
      qparams[f"{short}_scale"] = np.float32(amax / 127.0 if amax > 0 else 1.0)
  if numerics == "torch":
    scale, zero_point = _qparams(act_spec, _stats(
        quant_stats, ("quant_attn_output_weights",),
        hint="; they are observed only by calls with need_weights=True"))
    qparams["attn_weights_scale"], qparams["attn_weights_zero_point"] = scale, zero_point
  return qmodule, {"params": jax.tree.map(jnp.asarray, qparams)}


def dequantize(
    qmodule: QuantizedMultiheadAttention, qvariables: Mapping
) -> tuple[MultiheadAttention, dict]:
  """The float ``MultiheadAttention`` whose weights are the dequantized int8 weights.

  Biases and ``bias_k``/``bias_v`` are restored, whatever their values (torch's
  ``dequantize()`` raises for non-zero in-projection biases and outside
  ``no_grad``).

  Args:
    qmodule: a ``QuantizedMultiheadAttention``.
    qvariables: its variables.

  Returns:
    ``(MultiheadAttention, {"params": ...})`` with ``qconfig=None``.
  """
  if not isinstance(qmodule, QuantizedMultiheadAttention):
    raise TypeError(
        "dequantize: expected a flax_qmha.QuantizedMultiheadAttention (the result of"
        f" convert() or from_torch()), got {type(qmodule).__name__}"
    )
  qmodule.check_config()
  qp = _variables_params(qvariables, "dequantize", "qvariables")
  e = qmodule.embed_dim
  expected = {f"{n}/kernel": (d, e) for n, d in zip(
      PROJECTIONS, (e, qmodule.key_dim, qmodule.value_dim, e))}
  expected.update({f"{n}/kernel_scale": (e,) if qmodule.per_channel_weights else ()
                   for n in PROJECTIONS})
  expected.update({f"{n}/bias": (e,) for n in PROJECTIONS if qmodule.bias})
  for name in ("bias_k", "bias_v") if qmodule.add_bias_kv else ():
    expected.update({name: (1, 1, e), f"{name}_scale": (), f"{name}_zero_point": ()})
  _check_params(qp, expected, "dequantize", dtype=np.int8)
  params: dict = {}
  for name in PROJECTIONS:
    entry = qp[name]
    kernel = jnp.asarray(entry["kernel"], jnp.float32) * jnp.asarray(entry["kernel_scale"])
    params[name] = {"kernel": kernel}
    if qmodule.bias:
      params[name]["bias"] = jnp.asarray(entry["bias"], jnp.float32)
  if qmodule.add_bias_kv:
    for name in ("bias_k", "bias_v"):
      q = jnp.asarray(qp[name], jnp.float32)
      params[name] = (q - qp[f"{name}_zero_point"]) * qp[f"{name}_scale"]
  module = MultiheadAttention(**{f: getattr(qmodule, f) for f in TORCH_FIELDS})
  return module, {"params": params}
