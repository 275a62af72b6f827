"""int8 inference: convert(), QuantizedMultiheadAttention and dequantize()."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_qmha as fq
from flax_qmha._mha import BIAS_KV_SPEC
from flax_qmha._observers import calculate_stats_qparams
from flax_qmha._qconfig import QConfig, QuantSpec

torch = pytest.importorskip("torch")
from torch_quant_flow import observe_and_convert  # noqa: E402
from torch_reference import params_from_torch  # noqa: E402

E, H, L, S, N = 16, 4, 6, 5, 3


def _normal(rng, shape, scale=1.0):
  return (scale * rng.normal(size=shape)).astype(np.float32)


def _calibrate(module, variables, batches):
  for q, k, v in batches:
    _, updates = module.apply(variables, q, k, v, mutable=["quant_stats"])
    variables = {**variables, **updates}
  return variables


def _calibrated(seed=0, qconfig=None, batches=2, **kwargs):
  rng = np.random.default_rng(seed)
  kdim, vdim = kwargs.get("kdim") or E, kwargs.get("vdim") or E
  data = [(_normal(rng, (L, N, E)), _normal(rng, (S, N, kdim)), _normal(rng, (S, N, vdim)))
          for _ in range(batches)]
  module = fq.MultiheadAttention(E, H, qconfig=qconfig or fq.get_default_qconfig("x86"),
                                 **kwargs)
  variables = module.init(jax.random.key(seed), *data[0])
  return module, _calibrate(module, variables, data), data


def _snr_db(reference, x) -> float:
  reference, x = np.asarray(reference, np.float64), np.asarray(x, np.float64)
  return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - x) ** 2)))


# --- the int8 claim, proven on the jaxpr ------------------------------------------------


def _dot_generals(jaxpr):
  """Every dot_general in a jaxpr, including those of sub-jaxprs (pjit, custom_vjp...)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn)
    for param in eqn.params.values():
      subs = param if isinstance(param, (list, tuple)) else [param]
      for sub in subs:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _dot_generals(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _dot_generals(sub)
  return found


def _dtypes(eqn):
  return tuple(str(v.aval.dtype) for v in eqn.invars) + (str(eqn.outvars[0].aval.dtype),)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(numerics="torch"), dict(int8_attention=True), dict(dynamic_activations=True),
     dict(dynamic_activations=True, int8_attention=True)],
    ids=["accurate", "torch", "int8_attention", "dynamic", "dynamic+int8_attention"],
)
def test_every_projection_is_an_s8_s8_s32_dot_general(options):
  module, variables, data = _calibrated(add_bias_kv=True, add_zero_attn=True)
  qmodule, qvariables = fq.convert(module, variables, **options)
  jaxpr = jax.make_jaxpr(jax.jit(qmodule.apply))(qvariables, *data[0]).jaxpr
  dots = _dot_generals(jaxpr)
  # Projections contract features with no batch dimension; the attention products
  # are batched over (N, H).
  projections = [d for d in dots if not d.params["dimension_numbers"][1][0]]
  attention = [d for d in dots if d.params["dimension_numbers"][1][0]]
  assert len(projections) == 4, [_dtypes(d) for d in dots]
  for d in projections:
    assert _dtypes(d) == ("int8", "int8", "int32"), _dtypes(d)
  assert len(attention) == 2
  expected = ("int8", "int8", "int32") if options.get("int8_attention") else None
  for d in attention:
    if expected:
      assert _dtypes(d) == expected, _dtypes(d)
    else:
      assert _dtypes(d)[-1] == "float32"
  assert not any(str(v.aval.dtype) == "float32" and v.aval.ndim == 2
                 for d in projections for v in d.invars)


def test_qvariables_hold_no_float_kernel_and_are_small():
  module, variables, _ = _calibrated(add_bias_kv=True)
  _, qvariables = fq.convert(module, variables)
  for name in ("linear_Q", "linear_K", "linear_V", "out_proj"):
    entry = qvariables["params"][name]
    assert entry["kernel"].dtype == jnp.int8
    assert all(v.ndim <= 1 for k, v in entry.items() if k != "kernel"), name


# --- numerics="torch" against torch's own converted module ------------------------------

MINMAX = QConfig(
    activation=QuantSpec(observer="minmax", dtype="quint8", qscheme="per_tensor_affine",
                         reduce_range=True),
    weight=QuantSpec(observer="minmax", dtype="qint8", qscheme="per_channel_symmetric"),
    fake_quant=False,
)


def _torch_minmax_qconfig():
  from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver
  return torch.ao.quantization.QConfig(
      activation=MinMaxObserver.with_args(reduce_range=True),
      weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                qscheme=torch.per_channel_symmetric),
  )


TORCH_CASES = [
    dict(kvdim=kvdim, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn)
    for kvdim, bias, bias_kv, zero_attn in itertools.product([False, True], repeat=4)
]


def _case_id(case):
  return "-".join(k for k, v in case.items() if v) or "plain"


@pytest.mark.parametrize("qconfig_name", ["minmax", "x86"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=[_case_id(c) for c in TORCH_CASES])
def test_torch_numerics_match_torch_quantized_mha(case, qconfig_name):
  rng = np.random.default_rng(len(_case_id(case)) + (qconfig_name == "x86"))
  kdim, vdim = (12, 20) if case["kvdim"] else (E, E)
  torch.manual_seed(0)
  tm = torch.nn.MultiheadAttention(E, H, bias=case["bias"], add_bias_kv=case["add_bias_kv"],
                                   add_zero_attn=case["add_zero_attn"], kdim=kdim, vdim=vdim)
  with torch.no_grad():
    for p in tm.parameters():
      p.add_(0.1 * torch.randn_like(p))  # trained-looking, non-zero biases
  batches = [(_normal(rng, (L, N, E)), _normal(rng, (S, N, kdim)), _normal(rng, (S, N, vdim)))
             for _ in range(3)]
  if qconfig_name == "x86":
    t_qconfig, qconfig = torch.ao.quantization.get_default_qconfig("x86"), fq.get_default_qconfig("x86")
  else:
    t_qconfig, qconfig = _torch_minmax_qconfig(), MINMAX
  _, converted = observe_and_convert(
      tm, t_qconfig, [tuple(map(torch.tensor, b)) for b in batches])

  module = fq.MultiheadAttention(E, H, bias=case["bias"], add_bias_kv=case["add_bias_kv"],
                                 add_zero_attn=case["add_zero_attn"], kdim=kdim, vdim=vdim,
                                 qconfig=qconfig)
  variables = {"params": params_from_torch(tm),
               "quant_stats": module.init(jax.random.key(0), *batches[0])["quant_stats"]}
  variables = _calibrate(module, variables, batches)
  qmodule, qvariables = fq.convert(module, variables, numerics="torch")

  q, k, v = _normal(rng, (L, N, E)), _normal(rng, (S, N, kdim)), _normal(rng, (S, N, vdim))
  kpm = np.zeros((N, S), bool)
  kpm[1, -2:] = True
  with torch.no_grad():
    t_out, t_w = converted(*map(torch.tensor, (q, k, v)), key_padding_mask=torch.tensor(kpm))
  out, w = jax.jit(qmodule.apply)(qvariables, q, k, v, key_padding_mask=kpm)

  out_step = float(converted.mha.out_proj.scale)
  np.testing.assert_allclose(qvariables["params"]["out_proj"]["output_scale"], out_step,
                             rtol=1e-6)
  steps = np.abs(np.asarray(out) - t_out.numpy()) / out_step
  within = np.mean(steps <= 1.0 + 1e-3)
  assert within >= 0.999, f"only {within:.4%} within one step; max {steps.max():.1f} steps"
  w_step = float(converted.mha.quant_attn_output_weights.scale)
  w_steps = np.abs(np.asarray(w) - t_w.numpy()) / w_step
  assert np.mean(w_steps <= 1.0 + 1e-3) >= 0.999, w_steps.max()


# --- accuracy: PyTorch's own acceptance criterion ---------------------------------------


@pytest.fixture(scope="module")
def pytorch_test_shapes():
  e, h, n, l, s = 512, 16, 4, 128, 64
  rng = np.random.default_rng(0)
  q, k, v = _normal(rng, (l, n, e)), _normal(rng, (s, n, e)), _normal(rng, (s, n, e))
  module = fq.MultiheadAttention(e, h, qconfig=fq.get_default_qconfig("x86"))
  variables = _calibrate(module, module.init(jax.random.key(0), q, k, v), [(q, k, v)])
  reference = module.apply(variables, q, k, v)
  return module, variables, (q, k, v), reference


@pytest.mark.parametrize(
    "options, min_db",
    [(dict(), 30.0), (dict(dynamic_activations=True), 30.0),
     (dict(int8_attention=True), 30.0), (dict(numerics="torch"), 25.0)],
    ids=["accurate", "dynamic", "int8_attention", "torch"],
)
def test_snr_against_float_on_pytorchs_mha_test_shapes(pytorch_test_shapes, options, min_db):
  """torch's test_custom_module_multi_head_attention shapes; torch's quantized MHA
  reaches 27-33 dB there (TORCH_NUMERICS.md), which the "torch" numerics mirror."""
  module, variables, inputs, (ref_out, ref_w) = pytorch_test_shapes
  qmodule, qvariables = fq.convert(module, variables, **options)
  out, w = jax.jit(qmodule.apply)(qvariables, *inputs)
  assert _snr_db(ref_out, out) > min_db, _snr_db(ref_out, out)
  assert _snr_db(ref_w, w) > min_db, _snr_db(ref_w, w)


# --- dequantize and round trips --------------------------------------------------------


def _qat_trained(seed=0, **kwargs):
  module, variables, data = _calibrated(seed, qconfig=fq.get_default_qat_qconfig("x86"),
                                        **kwargs)
  rng = np.random.default_rng(seed + 1)
  # Trained (non-zero) biases and bias_kv, then one more observing pass.
  params = jax.tree.map(lambda p: p + 0.05 * rng.normal(size=p.shape).astype(np.float32),
                        variables["params"])
  return module, _calibrate(module, {**variables, "params": params}, data[:1]), data


@pytest.mark.parametrize("kwargs", [dict(), dict(add_bias_kv=True, kdim=12, vdim=20),
                                    dict(bias=False)], ids=["plain", "bias_kv+kvdim", "no_bias"])
def test_dequantize_reproduces_the_fake_quantized_weights_exactly(kwargs):
  module, variables, data = _qat_trained(**kwargs)
  qmodule, qvariables = fq.convert(module, variables)
  fmodule, fvariables = fq.dequantize(qmodule, qvariables)
  assert isinstance(fmodule, fq.MultiheadAttention) and fmodule.qconfig is None
  # What the frozen QAT module computes with: its fake-quantized kernels.
  for name in ("linear_Q", "linear_K", "linear_V", "out_proj"):
    kernel = variables["params"][name]["kernel"]
    spec = module.qconfig.weight
    scale, zp = calculate_stats_qparams(spec, variables["quant_stats"][name]["weight_fake_quant"])
    expected = fq.fake_quantize(kernel, scale, zp, *spec.quant_range, axis=1)
    np.testing.assert_array_equal(fvariables["params"][name]["kernel"], expected, err_msg=name)
    if module.bias:
      np.testing.assert_array_equal(fvariables["params"][name]["bias"],
                                    variables["params"][name]["bias"])
  if module.add_bias_kv:
    for name in ("bias_k", "bias_v"):
      scale, zp = calculate_stats_qparams(BIAS_KV_SPEC, variables["quant_stats"][f"quant_{name}"])
      expected = fq.fake_quantize(variables["params"][name], scale, zp, 0, 255)
      np.testing.assert_array_equal(fvariables["params"][name], expected, err_msg=name)


def test_convert_dequantize_convert_is_stable():
  module, variables, _ = _qat_trained(add_bias_kv=True)
  qmodule, qvariables = fq.convert(module, variables)
  _, fvariables = fq.dequantize(qmodule, qvariables)
  _, again = fq.convert(module, {**variables, "params": fvariables["params"]})
  jax.tree.map(np.testing.assert_array_equal, again, qvariables)


def test_dequantized_float_module_matches_torchs_dequantize_where_torch_works():
  """torch's dequantize() works only for zero in-projection biases; ours agrees there."""
  torch.manual_seed(0)
  tm = torch.nn.MultiheadAttention(E, H)
  rng = np.random.default_rng(0)
  batches = [tuple(torch.tensor(_normal(rng, (L, N, E))) for _ in range(3))]
  _, converted = observe_and_convert(tm, torch.ao.quantization.get_default_qconfig("x86"), batches)
  with torch.no_grad():
    t_float = converted.mha.dequantize()
  module = fq.MultiheadAttention(E, H, qconfig=fq.get_default_qconfig("x86"))
  variables = {"params": params_from_torch(tm),
               "quant_stats": module.init(jax.random.key(0), *[b.numpy() for b in batches[0]])["quant_stats"]}
  variables = _calibrate(module, variables, [[b.numpy() for b in batches[0]]])
  _, fvariables = fq.dequantize(*fq.convert(module, variables, numerics="torch"))
  ours = params_from_torch(t_float)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7),
               fvariables["params"], ours)


# --- the int8 module under transforms, layouts and masks --------------------------------


def test_jit_vmap_layouts_and_masks():
  module, variables, data = _calibrated(add_zero_attn=True)
  qmodule, qvariables = fq.convert(module, variables)
  q, k, v = data[0]
  kpm = np.zeros((N, S), bool)
  kpm[0, -1] = True
  attn_mask = np.zeros((L, S), np.float32)
  attn_mask[:, 0] = -1.0
  ref_out, ref_w = qmodule.apply(qvariables, q, k, v, key_padding_mask=kpm, attn_mask=attn_mask)
  out, w = jax.jit(qmodule.apply)(qvariables, q, k, v, key_padding_mask=kpm, attn_mask=attn_mask)
  np.testing.assert_allclose(out, ref_out, atol=1e-6)
  # batch_first gives the same numbers (torch's quantized module does not: pytorch#67651).
  bf = qmodule.clone(batch_first=True)
  bf_out, bf_w = bf.apply(qvariables, *(np.swapaxes(x, 0, 1) for x in (q, k, v)),
                          key_padding_mask=kpm, attn_mask=attn_mask)
  np.testing.assert_allclose(np.swapaxes(bf_out, 0, 1), ref_out, atol=1e-6)
  np.testing.assert_allclose(bf_w, ref_w, atol=1e-6)
  # Unbatched inputs, and vmap over them, equal the batched call.
  vm_out, vm_w = jax.vmap(
      lambda q, k, v, m: qmodule.apply(qvariables, q, k, v, key_padding_mask=m,
                                       attn_mask=attn_mask),
      in_axes=(1, 1, 1, 0), out_axes=(1, 0))(q, k, v, kpm)
  np.testing.assert_allclose(vm_out, ref_out, atol=1e-5)
  np.testing.assert_allclose(vm_w, ref_w, atol=1e-6)
  one_out, one_w = qmodule.apply(qvariables, q[:, 0], k[:, 0], v[:, 0], key_padding_mask=kpm[0],
                                 attn_mask=attn_mask, average_attn_weights=False)
  assert one_out.shape == (L, E) and one_w.shape == (H, L, S + 1)
  # is_causal works on the int8 module too.
  causal, _ = qmodule.apply(qvariables, q, q, q, is_causal=True)
  explicit, _ = qmodule.apply(qvariables, q, q, q, attn_mask=np.triu(np.ones((L, L), bool), 1))
  np.testing.assert_array_equal(causal, explicit)


@pytest.mark.parametrize("options", [dict(), dict(numerics="torch"), dict(int8_attention=True),
                                     dict(dynamic_activations=True, int8_attention=True)],
                         ids=["accurate", "torch", "int8_attention", "dynamic+int8_attention"])
def test_fully_masked_rows_are_zero_not_nan(options):
  module, variables, data = _calibrated()
  qmodule, qvariables = fq.convert(module, variables, **options)
  q, k, v = data[0]
  kpm = np.zeros((N, S), bool)
  kpm[2] = True
  out, w = qmodule.apply(qvariables, q, k, v, key_padding_mask=kpm)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(w))
  np.testing.assert_array_equal(w[2], 0.0)


def test_dynamic_activations_need_no_calibration():
  module = fq.MultiheadAttention(E, H)  # a plain float module
  rng = np.random.default_rng(0)
  q = _normal(rng, (L, N, E))
  variables = module.init(jax.random.key(0), q, q, q)
  qmodule, qvariables = fq.convert(module, variables, dynamic_activations=True)
  out, _ = qmodule.apply(qvariables, q, q, q)
  ref, _ = module.apply(variables, q, q, q)
  assert _snr_db(ref, out) > 30


# --- errors ---------------------------------------------------------------------------


def test_convert_errors_name_the_problem():
  module, variables, _ = _calibrated()
  with pytest.raises(TypeError, match="MultiheadAttention"):
    fq.convert(object(), variables)
  with pytest.raises(ValueError, match="numerics must be one of"):
    fq.convert(module, variables, numerics="fast")
  float_module = fq.MultiheadAttention(E, H)
  with pytest.raises(ValueError, match="no qconfig"):
    fq.convert(float_module, {"params": variables["params"]})
  fresh = module.init(jax.random.key(0), *[np.ones(s, np.float32) for s in ((L, N, E), (S, N, E), (S, N, E))])
  with pytest.raises(ValueError, match="quant_stats/quant_query was never updated"):
    fq.convert(module, fresh)
  partial = jax.tree.map(lambda x: x, variables)
  partial["quant_stats"]["quant_attn_output"]["min_val"] = jnp.inf
  with pytest.raises(ValueError, match="quant_attn_output"):
    fq.convert(module, partial)
  missing = {**variables, "quant_stats": {k: v for k, v in variables["quant_stats"].items()
                                          if k != "quant_key"}}
  with pytest.raises(ValueError, match="quant_stats/quant_key is missing"):
    fq.convert(module, missing)
  with pytest.raises(TypeError, match="QuantizedMultiheadAttention"):
    fq.dequantize(module, variables)
  with pytest.raises(ValueError, match="numerics='torch'"):
    fq.QuantizedMultiheadAttention(E, H, numerics="torch", int8_attention=True).init(
        jax.random.key(0), *[np.ones(s, np.float32) for s in ((L, N, E), (S, N, E), (S, N, E))])


def test_int32_overflow_bound_is_enforced():
  from flax_qmha import _int8
  assert _int8.MAX_CONTRACTION == 131071
  # The bound is tight: 131071 products of -128 * -128 fit in int32, one more does not.
  assert 131071 * 128 * 128 <= 2**31 - 1 < 131072 * 128 * 128
  with pytest.raises(ValueError, match="131072 elements can overflow int32"):
    _int8.check_contraction(131072, "int8_dot")
