"""Input validation at every public boundary, as a table: bad call -> (error type, words).

Every public name (``flax_qmha.__all__``) and both attention modules are covered. Each
message must name the argument, say what it got and what was expected. Checks read only
static shapes, dtypes and Python values, so they run once at trace time: the jitted
computation is the same with and without them (``test_validation_adds_nothing_...``).

The checkpoint readers' hostile-file tables live in test_torch_pickle.py,
test_safetensors.py and test_export.py; the few cases they lack are at the end.
"""

from __future__ import annotations

import functools
import io
import pathlib
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_qmha as fq
from flax_qmha import _checks, _int8
from flax_qmha._errors import CheckpointError
from flax_qmha._torch_pickle import load_torch_file

E, H, L, S, N = 8, 2, 4, 5, 3


def _normal(seed, shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


Q, K, V = _normal(0, (L, N, E)), _normal(1, (S, N, E)), _normal(2, (S, N, E))


def _calibrate(module, variables, *inputs, need_weights=True):
  _, updates = module.apply(variables, *inputs, need_weights=need_weights,
                            mutable=["quant_stats"])
  return {**variables, **updates}


@functools.cache
def _ctx():
  """Modules and variables shared by the tables (built once, never mutated)."""
  c = type("Ctx", (), {})()
  c.float = fq.MultiheadAttention(E, H)
  c.float_vars = c.float.init(jax.random.key(0), Q, K, V)
  c.ptq = fq.MultiheadAttention(E, H, qconfig=fq.get_default_qconfig("x86"))
  c.ptq_fresh = c.ptq.init(jax.random.key(0), Q, K, V)
  c.ptq_vars = _calibrate(c.ptq, c.ptq_fresh, Q, K, V)
  c.ptq_no_weights = _calibrate(c.ptq, c.ptq_fresh, Q, K, V, need_weights=False)
  c.qat = fq.MultiheadAttention(E, H, qconfig=fq.get_default_qat_qconfig("x86"))
  c.qat_vars = _calibrate(c.qat, c.qat.init(jax.random.key(0), Q, K, V), Q, K, V)
  c.int8, c.int8_vars = fq.convert(c.ptq, c.ptq_vars)
  return c


def _replace(tree, path, value):
  """A copy of nested dicts ``tree`` with ``path`` set to ``value`` (``DELETE`` removes it)."""
  tree = dict(tree)
  head, *rest = path
  if rest:
    tree[head] = _replace(tree[head], rest, value)
  elif value is DELETE:
    del tree[head]
  else:
    tree[head] = value
  return tree


DELETE = object()


def _assert_message(info, words, case):
  message = str(info.value)
  for word in words:
    assert word in message, f"{case}: {word!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------
# constructor fields of both modules

MHA, QMHA = fq.MultiheadAttention, fq.QuantizedMultiheadAttention

CONSTRUCTOR_CASES = {
    # id: (module class, fields, error, words)
    "embed_dim_float": (MHA, dict(embed_dim=8.0, num_heads=2), TypeError, ["embed_dim", "int", "8.0"]),
    "embed_dim_zero": (MHA, dict(embed_dim=0, num_heads=2), ValueError, ["embed_dim", "positive", "0"]),
    "num_heads_bool": (MHA, dict(embed_dim=8, num_heads=True), TypeError, ["num_heads", "int", "True"]),
    "heads_do_not_divide": (MHA, dict(embed_dim=8, num_heads=3), ValueError, ["embed_dim (8)", "num_heads (3)", "divisible"]),
    "kdim_str": (MHA, dict(embed_dim=8, num_heads=2, kdim="8"), ValueError, ["kdim", "positive int or None", "'8'"]),
    "vdim_negative": (MHA, dict(embed_dim=8, num_heads=2, vdim=-1), ValueError, ["vdim", "-1"]),
    "dropout_one": (MHA, dict(embed_dim=8, num_heads=2, dropout=1.0), ValueError, ["dropout", "[0, 1)", "1.0"]),
    "dropout_negative": (MHA, dict(embed_dim=8, num_heads=2, dropout=-0.1), ValueError, ["dropout", "-0.1"]),
    "dropout_str": (MHA, dict(embed_dim=8, num_heads=2, dropout="0.1"), ValueError, ["dropout", "'0.1'"]),
    "dropout_bool": (MHA, dict(embed_dim=8, num_heads=2, dropout=True), ValueError, ["dropout", "True"]),
    "bias_str": (MHA, dict(embed_dim=8, num_heads=2, bias="yes"), TypeError, ["bias", "bool", "str 'yes'"]),
    "add_bias_kv_none": (MHA, dict(embed_dim=8, num_heads=2, add_bias_kv=None), TypeError, ["add_bias_kv", "bool", "None"]),
    "add_zero_attn_int": (MHA, dict(embed_dim=8, num_heads=2, add_zero_attn=1), TypeError, ["add_zero_attn", "bool", "int 1"]),
    "batch_first_str": (MHA, dict(embed_dim=8, num_heads=2, batch_first="True"), TypeError, ["batch_first", "bool", "'True'"]),
    "dtype_int8": (MHA, dict(embed_dim=8, num_heads=2, dtype=jnp.int8), TypeError, ["dtype", "floating-point", "int8"]),
    "dtype_unknown": (MHA, dict(embed_dim=8, num_heads=2, dtype="foo"), TypeError, ["dtype", "floating-point", "'foo'"]),
    "param_dtype_int32": (MHA, dict(embed_dim=8, num_heads=2, param_dtype=jnp.int32), TypeError, ["param_dtype", "floating-point", "int32"]),
    "param_dtype_none": (MHA, dict(embed_dim=8, num_heads=2, param_dtype=None), TypeError, ["param_dtype", "floating-point", "None"]),
    "qconfig_str": (MHA, dict(embed_dim=8, num_heads=2, qconfig="x86"), TypeError, ["qconfig", "QConfig", "str"]),
    "q_heads_do_not_divide": (QMHA, dict(embed_dim=10, num_heads=3), ValueError, ["QuantizedMultiheadAttention", "embed_dim (10)", "num_heads (3)"]),
    "q_dropout": (QMHA, dict(embed_dim=8, num_heads=2, dropout=2.0), ValueError, ["QuantizedMultiheadAttention", "dropout", "2.0"]),
    "q_bias_str": (QMHA, dict(embed_dim=8, num_heads=2, bias="x"), TypeError, ["QuantizedMultiheadAttention", "bias", "bool", "'x'"]),
    "q_batch_first_none": (QMHA, dict(embed_dim=8, num_heads=2, batch_first=None), TypeError, ["batch_first", "bool", "None"]),
    "q_numerics": (QMHA, dict(embed_dim=8, num_heads=2, numerics="fast"), ValueError, ["numerics", "'accurate'", "'torch'", "'fast'"]),
    "q_numerics_none": (QMHA, dict(embed_dim=8, num_heads=2, numerics=None), ValueError, ["numerics", "None"]),
    "q_int8_attention_str": (QMHA, dict(embed_dim=8, num_heads=2, int8_attention="yes"), TypeError, ["int8_attention", "bool", "'yes'"]),
    "q_dynamic_int": (QMHA, dict(embed_dim=8, num_heads=2, dynamic_activations=1), TypeError, ["dynamic_activations", "bool", "int 1"]),
    "q_per_channel_none": (QMHA, dict(embed_dim=8, num_heads=2, per_channel_weights=None), TypeError, ["per_channel_weights", "bool", "None"]),
    "q_torch_int8_attention": (QMHA, dict(embed_dim=8, num_heads=2, numerics="torch", int8_attention=True), ValueError, ["numerics='torch'", "int8_attention"]),
    "q_torch_dynamic": (QMHA, dict(embed_dim=8, num_heads=2, numerics="torch", dynamic_activations=True), ValueError, ["numerics='torch'", "dynamic_activations"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CONSTRUCTOR_CASES))
def test_bad_constructor_fields(case):
  cls, fields, error, words = CONSTRUCTOR_CASES[case]
  module = cls(**fields)
  e = fields["embed_dim"] if isinstance(fields["embed_dim"], int) else 8
  x = np.ones((L, N, e), np.float32)
  with pytest.raises(error) as info:
    module.init(jax.random.key(0), x, x, x)
  _assert_message(info, words, case)


# ---------------------------------------------------------------------------------------------
# call arguments of both modules (test_mha_errors.py has the float module's basics)

q2, k2 = np.ones((L, E), np.float32), np.ones((S, E), np.float32)

CALL_CASES = {
    # id: (argument overrides, error, words); batch_first=True when the id starts with "bf_"
    "query_rank_1": (dict(query=np.ones((E,), np.float32)), ValueError, ["query", "3-D", "2-D", "(8,)"]),
    "query_rank_4": (dict(query=np.ones((1, L, N, E), np.float32)), ValueError, ["query", "(1, 4, 3, 8)"]),
    "query_none": (dict(query=None), ValueError, ["query", "got shape ()"]),
    "key_rank_unbatched": (dict(query=q2, value=k2), ValueError, ["key", "2-D like query", "(5, 3, 8)"]),
    "value_rank_unbatched": (dict(query=q2, key=k2), ValueError, ["value", "2-D like query", "(5, 3, 8)"]),
    "query_features": (dict(query=np.ones((L, N, E + 1), np.float32)), ValueError, ["query", "embed_dim=8", "(4, 3, 9)"]),
    "key_features": (dict(key=np.ones((S, N, 7), np.float32)), ValueError, ["key", "kdim=8", "(5, 3, 7)"]),
    "value_features": (dict(value=np.ones((S, N, 6), np.float32)), ValueError, ["value", "vdim=8", "(5, 3, 6)"]),
    "key_value_lengths": (dict(value=np.ones((S + 1, N, E), np.float32)), ValueError, ["key and value", "(5, 3, 8)", "(6, 3, 8)"]),
    "batch_sizes": (dict(key=np.ones((S, N + 1, E), np.float32), value=np.ones((S, N + 1, E), np.float32)), ValueError, ["batch size 4", "query batch size 3", "(L, N, E)"]),
    "bf_batch_sizes": (dict(key=np.ones((N + 1, S, E), np.float32), value=np.ones((N + 1, S, E), np.float32)), ValueError, ["batch size 4", "query batch size 3", "(N, L, E)"]),
    "bf_query_rank": (dict(query=np.ones((N, L, E, 1), np.float32)), ValueError, ["query", "(N, L, E)"]),
    "query_int": (dict(query=np.ones((L, N, E), np.int32)), TypeError, ["query", "floating-point", "int32"]),
    "key_bool": (dict(key=np.ones((S, N, E), bool)), TypeError, ["key", "floating-point", "bool"]),
    "value_complex": (dict(value=np.ones((S, N, E), np.complex64)), TypeError, ["value", "floating-point", "complex64"]),
    "kpm_shape": (dict(key_padding_mask=np.zeros((N, S + 1), bool)), ValueError, ["key_padding_mask", "(3, 5)", "(N, S)", "(3, 6)"]),
    "kpm_rank": (dict(key_padding_mask=np.zeros((N, 1, S), bool)), ValueError, ["key_padding_mask", "(3, 5)", "(3, 1, 5)"]),
    "kpm_unbatched": (dict(query=q2, key=k2, value=k2, key_padding_mask=np.zeros((1, S), bool)), ValueError, ["key_padding_mask", "(5,)", "(S,)", "(1, 5)"]),
    "attn_mask_2d": (dict(attn_mask=np.zeros((L, S + 1), bool)), ValueError, ["attn_mask", "(4, 5) (L, S)", "(6, 4, 5)", "(4, 6)"]),
    "attn_mask_3d": (dict(attn_mask=np.zeros((H, L, S), bool)), ValueError, ["attn_mask", "(N * num_heads, L, S)", "(2, 4, 5)"]),
    "attn_mask_3d_unbatched": (dict(query=q2, key=k2, value=k2, attn_mask=np.zeros((N * H, L, S), bool)), ValueError, ["attn_mask", "(num_heads, L, S)", "(6, 4, 5)"]),
    "attn_mask_1d": (dict(attn_mask=np.zeros((S,), bool)), ValueError, ["attn_mask", "(5,)"]),
    "attn_mask_4d": (dict(attn_mask=np.zeros((N, H, L, S), bool)), ValueError, ["attn_mask", "(3, 2, 4, 5)"]),
    "attn_mask_int32": (dict(attn_mask=np.zeros((L, S), np.int32)), TypeError, ["attn_mask", "bool mask", "float mask", "int32"]),
    "attn_mask_int8": (dict(attn_mask=np.zeros((L, S), np.int8)), TypeError, ["attn_mask", "int8"]),
    "attn_mask_complex": (dict(attn_mask=np.zeros((L, S), np.complex64)), TypeError, ["attn_mask", "complex64"]),
    "kpm_uint16": (dict(key_padding_mask=np.zeros((N, S), np.uint16)), TypeError, ["key_padding_mask", "uint16"]),
    "kpm_int64": (dict(key_padding_mask=np.zeros((N, S), np.int64)), TypeError, ["key_padding_mask", "int64"]),
    "causal_lengths": (dict(is_causal=True), ValueError, ["is_causal=True", "L=4", "S=5", "attn_mask"]),
    "is_causal_str": (dict(is_causal="yes"), TypeError, ["is_causal", "bool", "str 'yes'"]),
    "need_weights_none": (dict(need_weights=None), TypeError, ["need_weights", "bool", "None"]),
    "average_int": (dict(average_attn_weights=1), TypeError, ["average_attn_weights", "bool", "int 1"]),
    "deterministic_str": (dict(deterministic="no"), TypeError, ["deterministic", "bool", "'no'"]),
    "deterministic_array": (dict(deterministic=jnp.array(True)), TypeError, ["deterministic", "bool"]),
}  # fmt: skip


def _module_and_variables(kind):
  c = _ctx()
  return {"float": (c.float, c.float_vars), "qat": (c.qat, c.qat_vars),
          "int8": (c.int8, c.int8_vars)}[kind]


@pytest.mark.parametrize("kind", ["float", "qat", "int8"])
@pytest.mark.parametrize("case", list(CALL_CASES))
def test_bad_calls(case, kind):
  overrides, error, words = CALL_CASES[case]
  module, variables = _module_and_variables(kind)
  args = dict(query=Q, key=K, value=V)
  if case.startswith("bf_"):
    module = module.clone(batch_first=True)
    args = {name: np.swapaxes(x, 0, 1) for name, x in args.items()}
  with pytest.raises(error) as info:
    module.apply(variables, **(args | overrides))
  _assert_message(info, words, f"{kind}/{case}")


@pytest.mark.parametrize("kind", ["float", "qat", "int8"])
def test_mask_dtypes_that_are_accepted(kind):
  """bool and every float width are masks; uint8 is bool with a DeprecationWarning."""
  module, variables = _module_and_variables(kind)
  mask = np.zeros((L, S), bool)
  mask[:, -1] = True
  ref_out, ref_w = module.apply(variables, Q, K, V, attn_mask=mask)
  additive = np.where(mask, -np.inf, 0.0)
  for dtype in (np.float16, jnp.bfloat16, np.float32, np.float64):
    out, w = module.apply(variables, Q, K, V, attn_mask=additive.astype(dtype))
    np.testing.assert_array_equal(out, ref_out, err_msg=str(dtype))
    np.testing.assert_array_equal(w, ref_w, err_msg=str(dtype))
  with pytest.warns(DeprecationWarning, match="key_padding_mask of dtype uint8 is deprecated"):
    out, _ = module.apply(variables, Q, K, V, key_padding_mask=np.broadcast_to(mask[0], (N, S)).astype(np.uint8))
  np.testing.assert_array_equal(out, ref_out)


# ---------------------------------------------------------------------------------------------
# public functions


def _qat_partly_calibrated(c):
  # One per-channel weight statistic never updated (e.g. stats copied from another model).
  stats = c.qat_vars["quant_stats"]
  min_val = np.asarray(stats["linear_K"]["weight_fake_quant"]["min_val"]).copy()
  min_val[3] = np.inf
  return {**c.qat_vars, "quant_stats": _replace(stats, ["linear_K", "weight_fake_quant", "min_val"], min_val)}


def _module_with(activation=None, weight=None, **kwargs):
  x86 = fq.get_default_qconfig("x86")
  qconfig = fq.QConfig(activation=activation or x86.activation, weight=weight or x86.weight,
                       fake_quant=False)
  module = fq.MultiheadAttention(E, H, qconfig=qconfig, **kwargs)
  return module, _calibrate(module, module.init(jax.random.key(0), Q, K, V), Q, K, V)


PER_CHANNEL_ACT = fq.QuantSpec(observer="minmax", dtype="quint8", qscheme="per_channel_affine")
QINT8_ACT = fq.QuantSpec(observer="minmax", dtype="qint8", qscheme="per_tensor_affine")
AFFINE_WEIGHT = fq.QuantSpec(observer="minmax", dtype="qint8", qscheme="per_channel_affine")
QUINT8_WEIGHT = fq.QuantSpec(observer="minmax", dtype="quint8", qscheme="per_tensor_affine")
SPEC = dict(observer="minmax", dtype="quint8", qscheme="per_tensor_affine")

FUNCTION_CASES = {
    # id: (call(ctx, tmp_path), error, words)
    # convert
    "convert_not_a_module": (lambda c, t: fq.convert("mha", c.ptq_vars), TypeError, ["convert", "module", "MultiheadAttention", "str"]),
    "convert_int8_module": (lambda c, t: fq.convert(c.int8, c.int8_vars), TypeError, ["convert", "MultiheadAttention", "QuantizedMultiheadAttention"]),
    "convert_bad_config": (lambda c, t: fq.convert(fq.MultiheadAttention(10, 3), c.ptq_vars), ValueError, ["embed_dim (10)", "num_heads (3)"]),
    "convert_numerics": (lambda c, t: fq.convert(c.ptq, c.ptq_vars, numerics="fast"), ValueError, ["convert", "numerics", "'accurate'", "'fast'"]),
    "convert_int8_attention_str": (lambda c, t: fq.convert(c.ptq, c.ptq_vars, int8_attention="yes"), TypeError, ["convert", "int8_attention", "bool", "'yes'"]),
    "convert_dynamic_int": (lambda c, t: fq.convert(c.ptq, c.ptq_vars, dynamic_activations=1), TypeError, ["convert", "dynamic_activations", "bool", "int 1"]),
    "convert_positional_options": (lambda c, t: fq.convert(c.ptq, c.ptq_vars, "torch"), TypeError, ["positional"]),
    "convert_torch_int8_attention": (lambda c, t: fq.convert(c.ptq, c.ptq_vars, numerics="torch", int8_attention=True), ValueError, ["numerics='torch'", "int8_attention=True"]),
    "convert_torch_dynamic_no_qconfig": (lambda c, t: fq.convert(c.float, c.float_vars, numerics="torch", dynamic_activations=True), ValueError, ["numerics='torch'", "dynamic_activations=True"]),
    "convert_no_qconfig": (lambda c, t: fq.convert(c.float, c.float_vars), ValueError, ["no qconfig", "get_default_qconfig", "dynamic_activations=True"]),
    "convert_torch_qint8_activations": (lambda c, t: fq.convert(*_module_with(QINT8_ACT), numerics="torch"), ValueError, ["numerics='torch'", "quint8", "'qint8'"]),
    "convert_per_channel_activations": (lambda c, t: fq.convert(*_module_with(PER_CHANNEL_ACT)), ValueError, ["per-tensor", "qconfig.activation.qscheme", "'per_channel_affine'"]),
    "convert_affine_weights": (lambda c, t: fq.convert(*_module_with(weight=AFFINE_WEIGHT)), ValueError, ["symmetric qint8", "'per_channel_affine'"]),
    "convert_quint8_weights": (lambda c, t: fq.convert(*_module_with(weight=QUINT8_WEIGHT)), ValueError, ["symmetric qint8", "dtype='quint8'"]),
    "convert_variables_list": (lambda c, t: fq.convert(c.ptq, [c.ptq_vars]), TypeError, ["convert", "variables", "mapping", "list"]),
    "convert_no_params": (lambda c, t: fq.convert(c.ptq, {"quant_stats": c.ptq_vars["quant_stats"]}), ValueError, ["convert", "'params'", "['quant_stats']"]),
    "convert_missing_projection": (lambda c, t: fq.convert(c.ptq, _replace(c.ptq_vars, ["params", "linear_K"], DELETE)), ValueError, ["params/linear_K/kernel", "missing", "(8, 8)"]),
    "convert_kernel_shape": (lambda c, t: fq.convert(c.ptq, _replace(c.ptq_vars, ["params", "linear_V", "kernel"], np.zeros((3, E), np.float32))), ValueError, ["params/linear_V/kernel", "(3, 8)", "expected (8, 8)"]),
    "convert_missing_bias": (lambda c, t: fq.convert(c.ptq, _replace(c.ptq_vars, ["params", "out_proj", "bias"], DELETE)), ValueError, ["params/out_proj/bias", "missing", "(8,)"]),
    "convert_uncalibrated": (lambda c, t: fq.convert(c.ptq, c.ptq_fresh), ValueError, ["quant_stats/quant_query", "never updated", "no finite value", "mutable=['quant_stats']"]),
    "convert_no_stats": (lambda c, t: fq.convert(c.ptq, {"params": c.ptq_vars["params"]}), ValueError, ["quant_stats/quant_query", "missing", "mutable=['quant_stats']"]),
    "convert_one_stat_missing": (lambda c, t: fq.convert(c.ptq, _replace(c.ptq_vars, ["quant_stats", "quant_value"], DELETE)), ValueError, ["quant_stats/quant_value", "missing"]),
    "convert_partly_calibrated": (lambda c, t: fq.convert(c.ptq, _replace(c.ptq_vars, ["quant_stats", "quant_attn_output", "min_val"], np.float32(np.inf))), ValueError, ["quant_stats/quant_attn_output", "never updated"]),
    "convert_partly_calibrated_channel": (lambda c, t: fq.convert(c.qat, _qat_partly_calibrated(c)), ValueError, ["quant_stats/linear_K/weight_fake_quant", "never updated"]),
    "convert_torch_weights_never_observed": (lambda c, t: fq.convert(c.ptq, c.ptq_no_weights, numerics="torch"), ValueError, ["quant_stats/quant_attn_output_weights", "need_weights=True"]),
    # dequantize
    "dequantize_float_module": (lambda c, t: fq.dequantize(c.float, c.float_vars), TypeError, ["dequantize", "QuantizedMultiheadAttention", "got MultiheadAttention"]),
    "dequantize_bad_config": (lambda c, t: fq.dequantize(fq.QuantizedMultiheadAttention(8, 3), c.int8_vars), ValueError, ["embed_dim (8)", "num_heads (3)"]),
    "dequantize_variables_list": (lambda c, t: fq.dequantize(c.int8, [c.int8_vars]), TypeError, ["dequantize", "qvariables", "mapping", "list"]),
    "dequantize_no_params": (lambda c, t: fq.dequantize(c.int8, {}), ValueError, ["dequantize", "qvariables", "'params'"]),
    "dequantize_float_variables": (lambda c, t: fq.dequantize(c.int8, c.float_vars), ValueError, ["dequantize", "params/linear_Q/kernel", "float32", "int8"]),
    "dequantize_missing_scale": (lambda c, t: fq.dequantize(c.int8, _replace(c.int8_vars, ["params", "out_proj", "kernel_scale"], DELETE)), ValueError, ["params/out_proj/kernel_scale", "missing", "(8,)"]),
    "dequantize_per_tensor_mismatch": (lambda c, t: fq.dequantize(c.int8.clone(per_channel_weights=False), c.int8_vars), ValueError, ["params/linear_Q/kernel_scale", "(8,)", "expected ()"]),
    # fake_quantize
    "fq_int_input": (lambda c, t: fq.fake_quantize(np.ones(3, np.int32), 0.1, 0, 0, 255), TypeError, ["fake_quantize", "x", "floating-point", "int32"]),
    "fq_float_bound": (lambda c, t: fq.fake_quantize(np.ones(3), 0.1, 0, 0.0, 255), TypeError, ["quant_min", "int", "0.0"]),
    "fq_bool_bound": (lambda c, t: fq.fake_quantize(np.ones(3), 0.1, 0, 0, True), TypeError, ["quant_max", "int", "True"]),
    "fq_empty_range": (lambda c, t: fq.fake_quantize(np.ones(3), 0.1, 0, 5, 5), ValueError, ["quant_min must be < quant_max", "quant_min=5", "quant_max=5"]),
    "fq_int_scale": (lambda c, t: fq.fake_quantize(np.ones(3), 1, 0, 0, 255), TypeError, ["scale", "floating-point", "int32"]),
    "fq_vector_scale_per_tensor": (lambda c, t: fq.fake_quantize(np.ones((2, 3)), np.ones(3), 0, 0, 255), ValueError, ["scale", "scalar", "axis=None", "(3,)"]),
    "fq_vector_zero_point_per_tensor": (lambda c, t: fq.fake_quantize(np.ones((2, 3)), 0.1, np.zeros(2), 0, 255), ValueError, ["zero_point", "scalar", "(2,)"]),
    "fq_channel_count": (lambda c, t: fq.fake_quantize(np.ones((2, 3)), np.ones(2), np.zeros(2), 0, 255, axis=1), ValueError, ["scale", "(3,)", "x.shape[1]", "(2,)"]),
    "fq_zero_point_count": (lambda c, t: fq.fake_quantize(np.ones((2, 3)), np.ones(3), np.zeros(4), 0, 255, axis=-1), ValueError, ["zero_point", "(3,)", "(4,)"]),
    "fq_axis_range": (lambda c, t: fq.fake_quantize(np.ones((2, 3)), np.ones(3), np.zeros(3), 0, 255, axis=2), ValueError, ["axis 2", "out of range", "(2, 3)"]),
    "fq_axis_float": (lambda c, t: fq.fake_quantize(np.ones((2, 3)), np.ones(3), np.zeros(3), 0, 255, axis=1.0), TypeError, ["axis", "int or None", "1.0"]),
    # QuantSpec / QConfig / presets (test_observers.py has the basic QuantSpec table)
    "spec_eps_inf": (lambda c, t: fq.QuantSpec(**SPEC, eps=float("inf")), ValueError, ["eps", "positive finite", "inf"]),
    "spec_eps_str": (lambda c, t: fq.QuantSpec(**SPEC, eps="1e-5"), ValueError, ["eps", "'1e-5'"]),
    "spec_reduce_range_empties_range": (lambda c, t: fq.QuantSpec(**SPEC, quant_min=0, quant_max=1, reduce_range=True), ValueError, ["reduce_range=True", "[0, 1]", "empty range [0, 0]"]),
    "spec_quant_max_float": (lambda c, t: fq.QuantSpec(**SPEC, quant_min=0, quant_max=255.0), TypeError, ["quant_max", "int", "255.0"]),
    "spec_qint8_range_in_quint8": (lambda c, t: fq.QuantSpec(**SPEC, quant_min=-128, quant_max=127), ValueError, ["quant_min/quant_max [-128, 127]", "'quint8'"]),
    "spec_bins_bool": (lambda c, t: fq.QuantSpec(**{**SPEC, "observer": "histogram"}, bins=True), ValueError, ["bins", "int >= 2", "True"]),
    "spec_averaging_str": (lambda c, t: fq.QuantSpec(**SPEC, averaging_constant="0.1"), ValueError, ["averaging_constant", "(0, 1]", "'0.1'"]),
    "spec_positional": (lambda c, t: fq.QuantSpec("minmax", "quint8", "per_tensor_affine"), TypeError, ["positional"]),
    "qconfig_activation_none": (lambda c, t: fq.QConfig(activation=None, weight=fq.get_default_qconfig().weight, fake_quant=False), TypeError, ["QConfig", "activation", "QuantSpec", "NoneType"]),
    "qconfig_weight_qconfig": (lambda c, t: fq.QConfig(activation=fq.get_default_qconfig().activation, weight=fq.get_default_qconfig(), fake_quant=False), TypeError, ["QConfig", "weight", "QuantSpec", "QConfig"]),
    "qconfig_fake_quant_str": (lambda c, t: fq.QConfig(activation=fq.get_default_qconfig().activation, weight=fq.get_default_qconfig().weight, fake_quant="yes"), TypeError, ["fake_quant", "bool", "'yes'"]),
    "qconfig_backend": (lambda c, t: fq.get_default_qconfig("tpu"), ValueError, ["get_default_qconfig", "backend", "'x86'", "'tpu'"]),
    "qat_qconfig_backend": (lambda c, t: fq.get_default_qat_qconfig(None), ValueError, ["get_default_qat_qconfig", "backend", "None"]),
    # to_flax_attention / to_torch_state_dict
    "flax_module_none": (lambda c, t: fq.to_flax_attention(None, c.float_vars), TypeError, ["to_flax_attention", "module", "MultiheadAttention", "NoneType"]),
    "flax_variables_none": (lambda c, t: fq.to_flax_attention(c.float, None), ValueError, ["to_flax_attention", "variables", "'params'", "NoneType"]),
    "flax_bias_str": (lambda c, t: fq.to_flax_attention(fq.MultiheadAttention(E, H, bias="no"), c.float_vars), TypeError, ["to_flax_attention", "bias", "bool", "'no'"]),
    "flax_zero_attn": (lambda c, t: fq.to_flax_attention(fq.MultiheadAttention(E, H, add_zero_attn=True), c.float_vars), ValueError, ["add_zero_attn=True", "cannot express"]),
    "flax_kernel_shape": (lambda c, t: fq.to_flax_attention(c.float, _replace(c.float_vars, ["params", "linear_Q", "kernel"], np.zeros((E, 2)))), ValueError, ["params/linear_Q/kernel", "(8, 2)", "expected (8, 8)"]),
    "torch_sd_bad_heads": (lambda c, t: fq.to_torch_state_dict(fq.MultiheadAttention(E, 3), c.float_vars), ValueError, ["to_torch_state_dict", "embed_dim (8)", "num_heads (3)"]),
    "torch_sd_params_list": (lambda c, t: fq.to_torch_state_dict(c.float, {"params": [1]}), ValueError, ["to_torch_state_dict", "variables['params']", "mapping", "list"]),
    "torch_sd_int8_bad_variables": (lambda c, t: fq.to_torch_state_dict(c.int8, {"params": {}}), ValueError, ["dequantize", "params/linear_Q/kernel", "missing"]),
    "torch_sd_not_a_module": (lambda c, t: fq.to_torch_state_dict({"embed_dim": E}, c.float_vars), TypeError, ["to_torch_state_dict", "module", "dict"]),
    # save_variables / load_variables
    "save_extension": (lambda c, t: fq.save_variables(t / "v.bin", c.float_vars), ValueError, ["cannot tell the format", "v.bin", ".safetensors", ".msgpack"]),
    "save_format": (lambda c, t: fq.save_variables(t / "v.bin", c.float_vars, format="npz"), ValueError, ["format", "'msgpack'", "'npz'"]),
    "save_file_object_needs_format": (lambda c, t: fq.save_variables(io.BytesIO(), c.float_vars), ValueError, ["format must be given", "BytesIO"]),
    "save_path_int": (lambda c, t: fq.save_variables(3, c.float_vars, format="msgpack"), TypeError, ["path", "binary file object", "int"]),
    "save_variables_none": (lambda c, t: fq.save_variables(t / "v.msgpack", None), TypeError, ["variables", "mapping", "NoneType"]),
    "save_leaf_none": (lambda c, t: fq.save_variables(t / "v.msgpack", {"params": {"w": None}}), TypeError, ["variables['params/w']", "array or number", "NoneType"]),
    "save_empty_mapping": (lambda c, t: fq.save_variables(t / "v.msgpack", {"params": {}}), ValueError, ["empty mapping", "'params'"]),
    "save_metadata_format": (lambda c, t: fq.save_variables(t / "v.msgpack", c.float_vars, metadata={"format": "x"}), ValueError, ["metadata", "'format'"]),
    "save_metadata_int": (lambda c, t: fq.save_variables(t / "v.msgpack", c.float_vars, metadata={"step": 3}), TypeError, ["metadata", "str to str", "int"]),
    "load_bytes": (lambda c, t: fq.load_variables(b"\x00" * 16, format="msgpack"), TypeError, ["path", "bytes"]),
    "load_text_file": (lambda c, t: fq.load_variables(io.StringIO("x"), format="msgpack"), TypeError, ["binary mode"]),
    "load_format": (lambda c, t: fq.load_variables(t / "v.msgpack", format=1), ValueError, ["format", "'msgpack'", "got 1"]),
    "load_file_object_needs_format": (lambda c, t: fq.load_variables(io.BytesIO(b"")), ValueError, ["format must be given", "BytesIO"]),
    "load_template_list": (lambda c, t: fq.load_variables(_saved(t), template=[1]), TypeError, ["load_variables", "template", "mapping", "list"]),
    "load_template_mismatch": (lambda c, t: fq.load_variables(_saved(t), template={"params": {"w": np.zeros(2, np.float32)}}), ValueError, ["load_variables", "'params/w'", "float32[3]", "float32[2]"]),
    "load_garbage": (lambda c, t: fq.load_variables(_written(t / "g.msgpack", b"\xc1" * 8)), CheckpointError, ["g.msgpack", "not a Flax msgpack file"]),
    # from_torch / from_torch_checkpoint (test_from_torch.py has the checkpoint-content errors)
    "from_torch_source_none": (lambda c, t: fq.from_torch(None, num_heads=H), TypeError, ["from_torch", "source", "state_dict", "NoneType"]),
    "from_torch_num_heads_float": (lambda c, t: fq.from_torch(_state_dict(c), num_heads=2.0), TypeError, ["from_torch", "num_heads", "int", "2.0"]),
    "from_torch_num_heads_zero": (lambda c, t: fq.from_torch(_state_dict(c), num_heads=0), ValueError, ["num_heads", "positive", "0"]),
    "from_torch_dropout": (lambda c, t: fq.from_torch(_state_dict(c), num_heads=H, dropout=2.0), ValueError, ["from_torch", "dropout", "[0, 1)", "2.0"]),
    "from_torch_prefix_int": (lambda c, t: fq.from_torch(_state_dict(c), num_heads=H, prefix=3), TypeError, ["prefix", "str", "3"]),
    "from_torch_add_zero_attn_str": (lambda c, t: fq.from_torch(_state_dict(c), num_heads=H, add_zero_attn="no"), TypeError, ["add_zero_attn", "bool", "'no'"]),
    "from_torch_dynamic_inputs_str": (lambda c, t: fq.from_torch(_state_dict(c), num_heads=H, dynamic_inputs="no"), TypeError, ["dynamic_inputs", "bool", "'no'"]),
    "from_torch_checkpoint_batch_first": (lambda c, t: fq.from_torch_checkpoint(_state_dict(c), num_heads=H, batch_first="yes"), TypeError, ["from_torch_checkpoint", "batch_first", "bool", "'yes'"]),
    "from_torch_checkpoint_qconfig": (lambda c, t: fq.from_torch_checkpoint(_state_dict(c), num_heads=H, qconfig="x86"), TypeError, ["from_torch_checkpoint", "qconfig", "QConfig", "str"]),
    "from_torch_checkpoint_source": (lambda c, t: fq.from_torch_checkpoint(42, num_heads=H), TypeError, ["from_torch_checkpoint", "source", "int"]),
    "checkpoint_import_items": (lambda c, t: fq.CheckpointImport(5), TypeError, ["int"]),
    # save_modules / load_modules
    "save_modules_list": (lambda c, t: fq.save_modules(t / "m.msgpack", [(c.float, c.float_vars)]), TypeError, ["save_modules", "modules", "mapping", "list"]),
    "save_modules_empty": (lambda c, t: fq.save_modules(t / "m.msgpack", {}), ValueError, ["save_modules", "empty"]),
    "save_modules_not_a_pair": (lambda c, t: fq.save_modules(t / "m.msgpack", {"attn": c.float}), TypeError, ["modules['attn']", "(module, variables mapping) pair", "MultiheadAttention"]),
    "save_modules_variables_none": (lambda c, t: fq.save_modules(t / "m.msgpack", {"attn": (c.float, None)}), TypeError, ["modules['attn']", "(MultiheadAttention, NoneType)"]),
    "save_modules_not_a_module": (lambda c, t: fq.save_modules(t / "m.msgpack", {"attn": (object(), c.float_vars)}), TypeError, ["modules['attn']", "MultiheadAttention or QuantizedMultiheadAttention", "object"]),
    "save_modules_extension": (lambda c, t: fq.save_modules(t / "m.bin", {"attn": (c.float, c.float_vars)}), ValueError, ["cannot tell the format", ".safetensors"]),
    "load_modules_plain_variables": (lambda c, t: fq.load_modules(_saved(t)), CheckpointError, ["load_modules", "no module description", "load_variables"]),
    "load_modules_list_description": (lambda c, t: fq.load_modules(_with_description(t, "[1, 2]")), CheckpointError, ["load_modules", "malformed module description"]),
    "load_modules_foreign_class": (lambda c, t: fq.load_modules(_with_description(t, '{"w": {"class": "os.system", "fields": {}}}')), CheckpointError, ["malformed module description", "os.system"]),
    "load_modules_bytes": (lambda c, t: fq.load_modules(b"\x00", format="msgpack"), TypeError, ["path", "bytes"]),
}  # fmt: skip


def _state_dict(c):
  return fq.to_torch_state_dict(c.float, c.float_vars)


def _with_description(tmp_path, description: str):
  path = tmp_path / "described.msgpack"
  fq.save_variables(path, {"w": {"a": np.ones(2, np.float32)}},
                    metadata={"flax_qmha_modules": description})
  return path


def _written(path, data: bytes):
  path.write_bytes(data)
  return path


def _saved(tmp_path):
  path = tmp_path / "saved.safetensors"
  fq.save_variables(path, {"params": {"w": np.ones(3, np.float32)}})
  return path


def test_every_public_name_is_in_the_table():
  # Names a call uses directly (fq.convert -> "convert") are in its code's co_names.
  called = {name for call, _, _ in FUNCTION_CASES.values() for name in call.__code__.co_names}
  modules = {"MultiheadAttention", "QuantizedMultiheadAttention"}  # CONSTRUCTOR/CALL_CASES
  assert set(fq.__all__) - modules <= called, set(fq.__all__) - modules - called


@pytest.mark.parametrize("case", list(FUNCTION_CASES))
def test_bad_function_calls(case, tmp_path):
  call, error, words = FUNCTION_CASES[case]
  with pytest.raises(error) as info:
    call(_ctx(), tmp_path)
  _assert_message(info, words, case)


def test_convert_accepts_numpy_bools_and_dequantize_round_trips():
  """The positive side of the bool checks: numpy bools are bools."""
  c = _ctx()
  qmodule, qvariables = fq.convert(c.ptq, c.ptq_vars, int8_attention=np.bool_(True))
  assert qmodule.int8_attention
  module, variables = fq.dequantize(qmodule, qvariables)
  out, _ = module.apply(variables, Q, K, V)
  assert out.shape == Q.shape


# ---------------------------------------------------------------------------------------------
# validation is free under jit


def _without_checks(monkeypatch):
  def noop(*args, **kwargs):
    del args, kwargs
  monkeypatch.setattr(_checks, "check_call", lambda query, *a, **k: np.ndim(query) == 3)
  for name in ("check_static_flags", "check_config", "check_bool_fields"):
    monkeypatch.setattr(_checks, name, noop)
  monkeypatch.setattr(_int8, "check_contraction", noop)


def _jaxpr(module, variables, **call):
  # A fresh function object each time, so that jit's trace cache cannot answer.
  def forward(variables, q, k, v):
    return module.apply(variables, q, k, v, **call)
  return jax.make_jaxpr(jax.jit(forward))(variables, Q, K, V)


def _count_eqns(jaxpr) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    count += 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          count += _count_eqns(sub.jaxpr)
  return count


@pytest.mark.parametrize("kind", ["float", "qat", "int8"])
def test_validation_adds_nothing_to_the_jitted_computation(kind, monkeypatch):
  module, variables = _module_and_variables(kind)
  if kind == "int8":
    module, variables = fq.convert(_ctx().ptq, _ctx().ptq_vars, int8_attention=True)
  kpm = np.zeros((N, S), bool)
  kpm[0, -1] = True
  call = dict(key_padding_mask=kpm, attn_mask=np.zeros((L, S), np.float32))
  checked = _jaxpr(module, variables, **call)
  _without_checks(monkeypatch)
  unchecked = _jaxpr(module, variables, **call)
  assert _count_eqns(checked.jaxpr) == _count_eqns(unchecked.jaxpr)
  assert str(checked) == str(unchecked)


@pytest.mark.parametrize("kind", ["float", "int8"])
@pytest.mark.parametrize("case", ["key_features", "kpm_shape", "attn_mask_int32", "causal_lengths"])
def test_errors_are_raised_while_tracing_abstract_inputs(kind, case):
  """Nothing is computed: jax.eval_shape on ShapeDtypeStructs raises the same error."""
  overrides, error, words = CALL_CASES[case]
  module, variables = _module_and_variables(kind)
  args = dict(query=Q, key=K, value=V) | overrides
  abstract = {name: jax.ShapeDtypeStruct(x.shape, x.dtype)
              for name, x in args.items() if isinstance(x, np.ndarray)}
  flags = {name: x for name, x in args.items() if not isinstance(x, np.ndarray)}
  with pytest.raises(error) as info:
    jax.eval_shape(lambda v, a: module.apply(v, **a, **flags), variables, abstract)
  _assert_message(info, words, f"{kind}/{case}")


# ---------------------------------------------------------------------------------------------
# checkpoint hardening: the cases test_torch_pickle.py / test_export.py do not have


def _archive(pkl: bytes) -> io.BytesIO:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    zf.writestr("archive/data.pkl", pkl)
    zf.writestr("archive/byteorder", "little")
    zf.writestr("archive/data/0", np.arange(6, dtype="<f4").tobytes())
    zf.writestr("archive/version", "3\n")
  buf.seek(0)
  return buf


def _global(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def _unicode(text: str) -> bytes:
  data = text.encode()
  return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


PROTO2 = pickle.PROTO + b"\x02"
HOSTILE_PICKLES = {
    # id: (data.pkl bytes, words the CheckpointError must contain)
    "builtins_getattr": (PROTO2 + _global("builtins", "getattr") + pickle.STOP, ["builtins.getattr", "not allowed"]),
    "py2_import": (PROTO2 + _global("__builtin__", "__import__") + pickle.STOP, ["__builtin__.__import__", "builtins.__import__"]),
    "importlib": (PROTO2 + _global("importlib", "import_module") + pickle.STOP, ["importlib.import_module"]),
    "functools_partial": (PROTO2 + _global("functools", "partial") + pickle.STOP, ["functools.partial"]),
    "nested_pickle_loads": (PROTO2 + _global("pickle", "loads") + pickle.STOP, ["pickle.loads"]),
    "marshal_code": (PROTO2 + _global("marshal", "loads") + pickle.STOP, ["marshal.loads"]),
    "types_code": (PROTO2 + _global("types", "CodeType") + pickle.STOP, ["types.CodeType"]),
    "numpy_load": (PROTO2 + _global("numpy", "load") + pickle.STOP, ["numpy.load"]),
    # REDUCE on the result of a REDUCE: the OrderedDict built by the first call is not callable.
    "reduce_of_a_reduce": (PROTO2 + _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE
                           + pickle.REDUCE + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.STOP,
                           ["REDUCE calls a OrderedDict", "not an allowed function"]),
    "stack_global_non_str": (b"\x80\x04" + pickle.BININT1 + b"\x01" + pickle.BININT1 + b"\x02"
                             + pickle.STACK_GLOBAL + pickle.STOP, ["corrupt", "STACK_GLOBAL"]),
    "binbytes8_huge_length": (b"\x80\x04" + pickle.BINBYTES8 + struct.pack("<Q", 2**62) + b"abc",
                              ["corrupt or truncated"]),
    "huge_int_as_offset": (PROTO2 + _global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK
                           + pickle.MARK + _unicode("storage") + _global("torch", "FloatStorage")
                           + _unicode("0") + _unicode("cpu") + pickle.BININT1 + b"\x06" + pickle.TUPLE
                           + pickle.BINPERSID + pickle.LONG4 + struct.pack("<i", 5000) + b"\x01" * 5000
                           + pickle.EMPTY_TUPLE + pickle.EMPTY_TUPLE + pickle.NEWFALSE + pickle.NONE
                           + pickle.TUPLE + pickle.REDUCE + pickle.STOP,
                           ["corrupt or truncated"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE_PICKLES))
def test_hostile_pickles_beyond_test_torch_pickle(case):
  pkl, words = HOSTILE_PICKLES[case]
  with pytest.raises(CheckpointError) as info:
    load_torch_file(_archive(pkl))
  _assert_message(info, words, case)


def test_memoized_globals_and_declared_lengths_stay_inert():
  """What is not refused is plain data: an allowed callable fetched back from the memo
  still only builds its own kind of value, and a FRAME declaring 2**62 bytes reads only
  the bytes present (no allocation from the declared size)."""
  memoized_device = (PROTO2 + _global("torch", "device") + pickle.BINPUT + b"\x00" + pickle.POP
                     + pickle.BINGET + b"\x00" + pickle.MARK + _unicode("os.system") + pickle.TUPLE
                     + pickle.REDUCE + pickle.STOP)
  assert load_torch_file(_archive(memoized_device)) == "os.system"  # a device name, not a call
  huge_frame = b"\x80\x04" + pickle.FRAME + struct.pack("<Q", 2**62) + pickle.NONE + pickle.STOP
  assert load_torch_file(_archive(huge_frame)) is None


def test_msgpack_with_a_huge_declared_shape_allocates_nothing(tmp_path):
  msgpack = pytest.importorskip("msgpack")
  array = msgpack.ExtType(1, msgpack.packb(((2**40, 2**20), "float32", b"\0" * 16), use_bin_type=True))
  path = _written(tmp_path / "huge.msgpack", msgpack.packb({"params": {"w": array}}, use_bin_type=True))
  with pytest.raises(CheckpointError, match="huge.msgpack.*not a Flax msgpack file"):
    fq.load_variables(path)


def test_checkpoint_coverage_elsewhere_is_what_the_issue_asks_for():
  """test_torch_pickle.py holds the required cases; fail loudly if they are ever removed."""
  source = (pathlib.Path(__file__).parent / "test_torch_pickle.py").read_text()
  for needle in ("os.system", "builtins.exec", "subprocess.Popen", "callable_hidden_in_tuple_and_list",
                 "dotdot_member", "storage_key_traversal", "huge_declared_numel", "deflated_member_size_lie",
                 "truncated_pickle", "flipped_byte_in_storage", "random_bytes"):
    assert needle in source, needle

