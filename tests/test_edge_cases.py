"""Numerical edge cases at module level: degenerate calibration data, fully masked rows and
queries without keys in every path, the int32 accumulator bound, softmax precision in bf16.

(The observers' own edge cases are in test_observers.py; here they are seen through
``MultiheadAttention`` -> ``convert`` -> ``QuantizedMultiheadAttention``.)

Non-finite calibration values: every observer ignores ``inf`` and ``NaN`` (README,
"Deliberate differences"). It does so silently because it runs under ``jit``, where no
warning can be raised; ``convert`` then refuses, naming the statistic, any point that saw no
finite value at all (e.g. every point after the first in post-training calibration, where
the float forward turns an ``inf`` input into ``NaN``), and never produces a NaN scale.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_qmha as fq
from flax_qmha import _int8
from flax_qmha._observers import calculate_stats_qparams
from flax_qmha._quantized_mha import int8_attention
from flax_qmha._quantized_projection import QuantizedProjection

E, H, L, S, N = 8, 2, 4, 5, 3


def _normal(seed, shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


NORMAL = (_normal(0, (L, N, E)), _normal(1, (S, N, E)), _normal(2, (S, N, E)))


def _calibrated(qconfig, data=NORMAL, **kwargs):
  module = fq.MultiheadAttention(E, H, qconfig=qconfig, **kwargs)
  variables = module.init(jax.random.key(0), *NORMAL)
  params = jax.tree.map(lambda p: p + 0.1 * _normal(3, p.shape), variables["params"])
  variables = {**variables, "params": params}  # non-zero biases: "output == bias" means something
  _, updates = module.apply(variables, *data, mutable=["quant_stats"])
  return module, {**variables, **updates}


QCONFIGS = {"x86": fq.get_default_qconfig("x86"), "qat": fq.get_default_qat_qconfig("x86")}
OPTIONS = {
    "accurate": {}, "torch": {"numerics": "torch"}, "int8_attention": {"int8_attention": True},
    "dynamic": {"dynamic_activations": True},
    "dynamic+int8_attention": {"dynamic_activations": True, "int8_attention": True},
}


# ---------------------------------------------------------------------------------------------
# degenerate calibration data


def _degenerate(kind):
  def make(x):
    if kind == "zeros":
      return np.zeros_like(x)
    if kind == "constant":
      return np.full_like(x, 3.0)
    if kind == "tiny":
      return (x * 1e-30).astype(np.float32)
    if kind == "huge":
      return (x * 1e30).astype(np.float32)
    if kind == "some_inf":
      return np.where(np.arange(x.shape[-1]) == 0, np.float32(np.inf), x)
    if kind == "some_nan":
      return np.where(np.arange(x.shape[-1]) == 1, np.float32(np.nan), x)
    assert kind == "all_nan"
    return np.full_like(x, np.nan)
  return tuple(make(x) for x in NORMAL)


# (qconfig, data) -> whether convert must succeed for every option ("ok"), must refuse every
# option ("refused"), or may do either per statistic ("either"). Post-training calibration
# runs the float model: inf turns into NaN after the first projection, so the later points
# see nothing finite; 1e30 inputs overflow the logits the same way (only the points that
# "torch" numerics needs are then missing). QAT clamps the inputs first, so it never does.
EXPECTED = {
    ("x86", "zeros"): "ok", ("x86", "constant"): "ok", ("x86", "tiny"): "ok",
    ("x86", "huge"): "either", ("x86", "some_inf"): "refused", ("x86", "some_nan"): "refused",
    ("x86", "all_nan"): "refused",
    ("qat", "zeros"): "ok", ("qat", "constant"): "ok", ("qat", "tiny"): "ok",
    ("qat", "huge"): "ok", ("qat", "some_inf"): "ok", ("qat", "some_nan"): "ok",
    ("qat", "all_nan"): "refused",
}  # fmt: skip


@pytest.mark.parametrize("qconfig, data", list(EXPECTED), ids=["-".join(k) for k in EXPECTED])
def test_calibration_on_degenerate_data_converts_or_refuses_clearly(qconfig, data):
  module, variables = _calibrated(QCONFIGS[qconfig], _degenerate(data))
  expected = EXPECTED[qconfig, data]
  outcomes = {}
  for name, options in OPTIONS.items():
    if options.get("dynamic_activations"):
      continue  # no activation statistics: covered by every other case
    try:
      qmodule, qvariables = fq.convert(module, variables, **options)
    except ValueError as e:
      assert "quant_stats/" in str(e) and "no finite value" in str(e), (name, str(e))
      outcomes[name] = "refused"
      continue
    outcomes[name] = "ok"
    for path, leaf in jax.tree_util.tree_leaves_with_path(qvariables):
      key = jax.tree_util.keystr(path)
      assert np.all(np.isfinite(leaf)), (name, key)  # never a NaN or infinite qparam
      if key.endswith("scale']"):
        assert np.all(np.asarray(leaf) > 0), (name, key)
    for inputs in (NORMAL, _degenerate("zeros")):
      out, weights = qmodule.apply(qvariables, *inputs)
      assert np.all(np.isfinite(out)) and np.all(np.isfinite(weights)), name
  if expected != "either":
    assert set(outcomes.values()) == {expected}, outcomes


def test_observers_ignore_non_finite_values_silently_and_under_jit():
  """What is documented: inf/NaN are skipped by the statistics (no warning: under jit none
  can be raised), so the ranges are those of the finite values."""
  module = fq.MultiheadAttention(E, H, qconfig=fq.get_default_qat_qconfig("x86"))
  variables = module.init(jax.random.key(0), *NORMAL)
  q = NORMAL[0].copy()
  q[0, 0, :3] = [np.inf, -np.inf, np.nan]
  calibrate = jax.jit(functools.partial(module.apply, mutable=["quant_stats"]))
  (out, _), updates = calibrate(variables, q, *NORMAL[1:])
  stats = updates["quant_stats"]["quant_query"]
  finite = q[np.isfinite(q)]
  assert float(stats["min_val"]) == finite.min() and float(stats["max_val"]) == finite.max()
  assert np.all(np.isfinite(out))  # QAT clamps the inf/NaN inputs into the range


# ---------------------------------------------------------------------------------------------
# fully masked rows and queries without keys, in every path

INT8_PATHS = {"int8_accurate": "accurate", "int8_torch": "torch", "int8_attention": "int8_attention",
              "int8_dynamic": "dynamic", "int8_dynamic+int8_attention": "dynamic+int8_attention"}
PATHS = ["float", "ptq_observing", "qat", *INT8_PATHS]
MASKS = ["kpm_whole_batch_entry", "bool_attn_mask_row", "float_attn_mask_row", "no_keys"]


@functools.cache
def _path(path):
  """(apply(variables, q, k, v, **call) -> (out, weights), variables, out_proj bias,
  tolerance on the output of a row that attends nothing)."""
  if path == "float":
    module, variables = _calibrated(None)
  elif path == "qat":
    module, variables = _calibrated(QCONFIGS["qat"])
  else:
    module, variables = _calibrated(QCONFIGS["x86"])
  bias = np.asarray(variables["params"]["out_proj"]["bias"])
  if path == "ptq_observing":  # the calibration forward itself
    def apply(variables, *args, **call):
      return module.apply(variables, *args, **call, mutable=["quant_stats"])[0]
    return apply, variables, bias, 0.0
  if path in ("float", "qat"):
    tolerance = 0.0
    if path == "qat":  # the output is fake-quantized: bias is within half a step of it
      stats = variables["quant_stats"]["out_proj"]["activation_post_process"]
      tolerance = float(calculate_stats_qparams(module.qconfig.activation, stats)[0]) * 0.501
    return module.apply, variables, bias, tolerance
  qmodule, qvariables = fq.convert(module, variables, **OPTIONS[INT8_PATHS[path]])
  tolerance = 0.0
  if path == "int8_torch":  # out_proj's output is requantized
    tolerance = float(qvariables["params"]["out_proj"]["output_scale"]) * 0.501
  return qmodule.apply, qvariables, bias, tolerance


def _masked_call(mask):
  """(q, k, v, call, which output rows [L, N] attend nothing, weights rows [N, L])."""
  q, k, v = NORMAL
  rows = np.zeros((L, N), bool)
  call = {}
  if mask == "kpm_whole_batch_entry":
    kpm = np.zeros((N, S), bool)
    kpm[1] = True
    kpm[0, -2:] = True
    call["key_padding_mask"], rows[:, 1] = kpm, True
  elif mask == "bool_attn_mask_row":
    attn = np.zeros((L, S), bool)
    attn[2] = True
    attn[0, 0] = True
    call["attn_mask"], rows[2] = attn, True
  elif mask == "float_attn_mask_row":
    attn = np.zeros((N * H, L, S), np.float32)
    attn[:, 3] = -np.inf  # query 3, every batch entry and head
    attn[1, 0, 1] = -5.0
    call["attn_mask"], rows[3] = attn, True
  else:  # S = 0: torch allows it and returns out_proj's bias with (N, L, 0) weights
    k, v = k[:0], v[:0]
    call["key_padding_mask"], rows[:] = np.zeros((N, 0), bool), True
  return q, k, v, call, rows


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("path", PATHS)
def test_rows_that_attend_nothing_give_zero_weights_and_the_bias(path, mask):
  apply, variables, bias, tolerance = _path(path)
  q, k, v, call, rows = _masked_call(mask)
  out, weights = apply(variables, q, k, v, **call, average_attn_weights=False)
  out, weights = np.asarray(out), np.asarray(weights)
  assert out.shape == (L, N, E) and weights.shape == (N, H, L, k.shape[0]), (out.shape, weights.shape)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(weights))
  np.testing.assert_array_equal(weights.transpose(2, 0, 1, 3)[rows], 0.0)
  np.testing.assert_allclose(out[rows], np.broadcast_to(bias, out[rows].shape), rtol=0,
                             atol=tolerance, err_msg=f"{path}/{mask}")
  if rows.all() or path in ("qat", "int8_torch"):
    return  # (these return weights quantized over their calibrated range, clipped)
  sums = weights.transpose(2, 0, 1, 3)[~rows].sum(-1)
  np.testing.assert_allclose(sums, 1.0, atol=1e-5)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("path", ["float", "qat"])
def test_gradients_stay_finite_when_rows_attend_nothing(path, mask):
  apply, variables, _, _ = _path(path)
  q, k, v, call, _ = _masked_call(mask)

  def loss(params, q, k, v):
    out, weights = apply({**variables, "params": params}, q, k, v, **call)
    return jnp.sum(out**2) + jnp.sum(weights)

  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(variables["params"], q, k, v)
  for path_, leaf in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path_)


# ---------------------------------------------------------------------------------------------
# int32 accumulator bound, refused at trace time on abstract inputs (nothing allocated)

STATIC_BOUND = (2**31 - 1) // (255 * 128)  # (x - z) * w: |x - z| <= 255, |w| <= 128
DYNAMIC_BOUND = _int8.MAX_CONTRACTION  # x * w: |x| <= 127, |w| <= 128, s8 bound 128 * 128
PV_BOUND = (2**31 - 1) // (255 * 127)  # p_u8 * v: p <= 255, |v| <= 127


def _abstract_init(qmodule, kdim=E, src_len=S):
  shapes = ((L, 1, E), (src_len, 1, kdim), (src_len, 1, E))
  args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
  return jax.eval_shape(qmodule.init, jax.random.key(0), *args)


@pytest.mark.parametrize(
    "fields, kdim, src_len, words",
    [
        (dict(), STATIC_BOUND + 1, S, ["QuantizedProjection 'linear_K'", "65794 elements", "at most 65793"]),
        (dict(dynamic_activations=True), DYNAMIC_BOUND + 1, S, ["'linear_K'", "131072 elements", "at most 131071"]),
        (dict(int8_attention=True), E, PV_BOUND + 1, ["int8 attention (PV)", "66312 elements", "at most 66311"]),
        (dict(int8_attention=True, dynamic_activations=True), E, PV_BOUND + 1, ["int8 attention (PV)", "66312"]),
        (dict(numerics="torch"), STATIC_BOUND + 1, S, ["'linear_K'", "can overflow int32"]),
    ],
    ids=["static_kdim", "dynamic_kdim", "int8_attention_keys", "dynamic_int8_attention_keys", "torch_kdim"],
)  # fmt: skip
def test_contractions_too_long_for_int32_are_refused_at_trace_time(fields, kdim, src_len, words):
  qmodule = fq.QuantizedMultiheadAttention(E, H, kdim=kdim, **fields)
  with pytest.raises(ValueError) as info:
    _abstract_init(qmodule, kdim, src_len)
  for word in words:
    assert word in str(info.value), str(info.value)
  # One less is accepted.
  _abstract_init(fq.QuantizedMultiheadAttention(E, H, kdim=kdim - (kdim > E), **fields),
                 kdim - (kdim > E), src_len - (src_len > S))


def test_projection_bound_is_tight_and_exact_at_the_limit():
  """The worst case at the bound: x - z = -255 and w = -128 in every term sums to
  255 * 128 * 65793 = 2**31 - 127: exact, where 131071 terms (the s8 x s8 bound) wrap."""
  k = STATIC_BOUND
  x = np.full((1, k), -255.0, np.float32)  # the bottom of a range [-255, 0]: x_u8 = 0, z_u8 = 255
  params = {"kernel": np.full((k, 1), -128, np.int8), "kernel_scale": np.ones(1, np.float32),
            "input_scale": np.float32(1.0), "input_zero_point": np.int32(127),
            "zero_point_correction": _int8.zero_point_correction(np.full((k, 1), -128, np.int8), 127)}
  y = QuantizedProjection(1, use_bias=False).apply({"params": params}, x)
  np.testing.assert_allclose(np.asarray(y, np.float64), 255.0 * 128 * k, rtol=1e-7)


def test_int8_attention_bound_is_exact_at_the_limit():
  """Uniform weights (p_u8 = 255 everywhere) over 66311 keys whose values all quantize to
  127: the PV sum 255 * 127 * 66311 < 2**31 stays exact (one key more could wrap)."""
  s = PV_BOUND
  q, k, v = jnp.ones((1, 1, 2)), jnp.ones((1, s, 2)), jnp.ones((1, s, 2))
  attn, weights = int8_attention(q, k, v, None, num_heads=1, scales=None, dropout=0.0,
                                 dropout_rng=None)
  np.testing.assert_allclose(attn, 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(weights), 1.0, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# bf16 compute keeps the softmax in float32


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _eqns(sub)


@pytest.mark.parametrize("qconfig", [None, "qat"])
def test_bf16_module_runs_the_softmax_in_float32(qconfig):
  module = fq.MultiheadAttention(E, H, dtype=jnp.bfloat16, qconfig=QCONFIGS.get(qconfig))
  q = jnp.asarray(NORMAL[0], jnp.bfloat16)
  k, v = (jnp.asarray(x, jnp.bfloat16) for x in NORMAL[1:])
  variables = module.init(jax.random.key(0), q, k, v)
  kpm = np.zeros((N, S), bool)
  kpm[0, -1] = True
  jaxpr = jax.make_jaxpr(jax.jit(lambda *a: module.apply(*a, key_padding_mask=kpm)))(
      variables, q, k, v).jaxpr
  eqns = list(_eqns(jaxpr))
  logits = [e for e in eqns if e.primitive.name == "dot_general" and e.outvars[0].aval.ndim == 4]
  assert logits and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in logits)  # bf16 compute
  exps = [e for e in eqns if e.primitive.name == "exp"]
  assert exps, "no exp in the jaxpr"
  assert all(e.invars[0].aval.dtype == jnp.float32 for e in exps), [e.invars[0].aval for e in exps]
  # The softmax's reductions over keys: [N, H, L, S] -> [N, H, L(, 1)].
  reductions = [e for e in eqns if e.primitive.name in ("reduce_max", "reduce_sum")
                and e.invars[0].aval.shape == (N, H, L, S)]
  assert {e.primitive.name for e in reductions} == {"reduce_max", "reduce_sum"}
  assert all(e.invars[0].aval.dtype == jnp.float32 for e in reductions)
  out, weights = jax.jit(lambda *a: module.apply(*a, key_padding_mask=kpm))(variables, q, k, v)
  assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
  if qconfig is None:  # (QAT's returned weights are fake-quantized; here uncalibrated)
    np.testing.assert_allclose(np.asarray(weights, np.float32).sum(-1), 1.0, atol=2e-2)
