"""from_torch / from_torch_checkpoint: torch's float, observed and converted MHAs into flax-qmha.

Every import is checked against torch itself: float outputs to 1e-5, int8 outputs within one
output quantization step on >= 99.9% of elements (torch's own tolerance story, see
test_int8.py), statistics and int8 weights bit for bit.
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest

import flax_qmha as fq
from flax_qmha._errors import CheckpointError
from flax_qmha._export import to_torch_state_dict
from flax_qmha._from_torch import CheckpointImport, from_torch, from_torch_checkpoint

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch_quant_flow import QUANTIZED, QuantWrapped, observe_and_convert  # noqa: E402

E, H, L, S, N = 16, 4, 6, 5, 3
KV = dict(kdim=12, vdim=20)
PROJECTIONS = ("linear_Q", "linear_K", "linear_V", "out_proj")
# torch's observed sites (module paths inside the wrapped model) -> our quant_stats paths.
TORCH_SITES = {
    "quant_query": ("quant_query",),
    "quant_key": ("quant_key",),
    "quant_value": ("quant_value",),
    **{f"mha.{p}": (p, "activation_post_process") for p in PROJECTIONS},
    "mha.quant_attn_output": ("quant_attn_output",),
    "mha.quant_attn_output_weights": ("quant_attn_output_weights",),
}


def _normal(rng, shape):
  return rng.normal(size=shape).astype(np.float32)


def _torch_mha(seed=0, **kwargs) -> nn.MultiheadAttention:
  """A float MHA with trained-looking (non-zero) biases and bias_k/bias_v."""
  torch.manual_seed(seed)
  mha = nn.MultiheadAttention(E, H, **kwargs)
  with torch.no_grad():
    for p in mha.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return mha.eval()


def _inputs(seed, kdim=E, vdim=E, batch_first=False):
  rng = np.random.default_rng(seed)
  q, k, v = _normal(rng, (L, N, E)), _normal(rng, (S, N, kdim)), _normal(rng, (S, N, vdim))
  if batch_first:
    q, k, v = (np.swapaxes(x, 0, 1).copy() for x in (q, k, v))
  return q, k, v


def _calibration(seed, kdim=E, vdim=E, batches=2):
  return [tuple(map(torch.tensor, _inputs(seed + i, kdim, vdim))) for i in range(batches)]


def _torch_call(model, q, k, v, **kwargs):
  with torch.no_grad():
    out, w = model(*map(torch.tensor, (q, k, v)), **kwargs)
  if w is not None and w.is_quantized:
    w = w.dequantize()
  return out.numpy(), w.numpy()


def _assert_within_one_step(ours, theirs, step, what):
  steps = np.abs(np.asarray(ours, np.float64) - theirs) / step
  within = np.mean(steps <= 1.0 + 1e-3)
  assert within >= 0.999, f"{what}: only {within:.4%} within one step; max {steps.max():.2f}"


def _assert_trees_equal(a, b, what=""):
  flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert flat_a.keys() == flat_b.keys(), f"{what}: {set(flat_a) ^ set(flat_b)}"
  for path, x in flat_a.items():
    y = flat_b[path]
    name = f"{what}{jax.tree_util.keystr(path)}"
    assert np.asarray(x).dtype == np.asarray(y).dtype, name
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def _numpy_state_dict(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# float modules

FLOAT_CASES = {
    "packed": dict(),
    "no_bias": dict(bias=False),
    "kvdim": dict(**KV),
    "bias_kv+zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
    "kvdim+no_bias+bias_kv+batch_first": dict(**KV, bias=False, add_bias_kv=True,
                                              batch_first=True),
}


@pytest.mark.parametrize("case", FLOAT_CASES.values(), ids=FLOAT_CASES.keys())
def test_float_module_matches_torch_and_round_trips(case):
  tm = _torch_mha(**case)
  module, variables = from_torch(tm)
  assert isinstance(module, fq.MultiheadAttention) and module.qconfig is None
  assert set(variables) == {"params"}
  assert (module.num_heads, module.bias, module.add_bias_kv, module.add_zero_attn,
          module.batch_first) == (H, case.get("bias", True), case.get("add_bias_kv", False),
                                  case.get("add_zero_attn", False),
                                  case.get("batch_first", False))
  q, k, v = _inputs(1, case.get("kdim", E), case.get("vdim", E), case.get("batch_first", False))
  kpm = np.zeros((N, S), bool)
  kpm[1, -2:] = True
  out, w = jax.jit(module.apply)(variables, q, k, v, key_padding_mask=kpm)
  t_out, t_w = _torch_call(tm, q, k, v, key_padding_mask=torch.tensor(kpm))
  np.testing.assert_allclose(out, t_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(w, t_w, rtol=1e-5, atol=1e-6)
  # torch -> flax -> torch is exact, key for key.
  _assert_trees_equal(to_torch_state_dict(module, variables), _numpy_state_dict(tm))
  # Explicit arguments override the live module's values.
  overridden, _ = from_torch(tm, num_heads=2, dropout=0.25, add_zero_attn=True)
  assert (overridden.num_heads, overridden.dropout, overridden.add_zero_attn) == (2, 0.25, True)


def _save_pt(state_dict, path):
  torch.save(state_dict, path)
  return path


def _save_safetensors(state_dict, path):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
  return path


SOURCES = {
    "torch_tensors": lambda sd, tmp: sd,
    "numpy": lambda sd, tmp: {k: v.numpy() for k, v in sd.items()},
    "pt_file": lambda sd, tmp: _save_pt(sd, tmp / "mha.pt"),
    "pth_pathlike_str": lambda sd, tmp: str(_save_pt(sd, tmp / "mha.pth")),
    "safetensors_file": lambda sd, tmp: _save_safetensors(sd, tmp / "mha.safetensors"),
    "file_object": lambda sd, tmp: io.BytesIO(_save_pt(sd, tmp / "x.bin").read_bytes()),
}


@pytest.mark.parametrize("layout", ["packed", "separate"])
@pytest.mark.parametrize("source", SOURCES.values(), ids=SOURCES.keys())
def test_every_state_dict_source_gives_the_live_import(source, layout, tmp_path):
  case = dict(add_bias_kv=True) if layout == "packed" else dict(**KV, bias=False)
  tm = _torch_mha(**case)
  sd = {k: v.detach() for k, v in tm.state_dict().items()}
  assert ("in_proj_weight" in sd) == (layout == "packed")
  live_module, live_vars = from_torch(tm)
  module, variables = from_torch(source(sd, tmp_path), num_heads=H)
  assert module == live_module  # torch's defaults: batch_first, add_zero_attn, dropout 0
  _assert_trees_equal(variables, live_vars)


def test_bfloat16_and_float64_weights_are_imported_as_float32(tmp_path):
  tm = _torch_mha()
  sd = {k: v.detach().to(torch.bfloat16) for k, v in tm.state_dict().items()}
  for source in (sd, _save_safetensors(sd, tmp_path / "bf16.safetensors"),
                 {k: v.double().numpy() for k, v in sd.items()}):
    _, variables = from_torch(source, num_heads=H)
    kernel = variables["params"]["linear_Q"]["kernel"]
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, sd["in_proj_weight"][:E].float().numpy().T)


def test_unprepared_quantizable_module_imports_its_linear_layers():
  """Without observers the quantizable module is a float module whose real weights are in
  linear_Q/K/V (its inherited in_proj_weight is freshly initialised and unused)."""
  torch.manual_seed(0)
  tq = torch.ao.nn.quantizable.MultiheadAttention(E, H, **KV).eval()
  module, variables = from_torch(tq)
  assert module.qconfig is None and set(variables) == {"params"}
  np.testing.assert_array_equal(variables["params"]["linear_K"]["kernel"],
                                tq.linear_K.weight.detach().numpy().T)
  q, k, v = _inputs(2, **KV)
  out, _ = jax.jit(module.apply)(variables, q, k, v)
  t_out, _ = _torch_call(tq, q, k, v)
  np.testing.assert_allclose(out, t_out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# torch observers -> QuantSpec


def _torch_observers():
  from torch.ao.quantization import observer as tobs
  from torch.ao.quantization import fake_quantize as tfq
  return {
      "minmax": tobs.MinMaxObserver(),
      "minmax-qint8-symmetric": tobs.MinMaxObserver(dtype=torch.qint8,
                                                    qscheme=torch.per_tensor_symmetric),
      "minmax-4bit-custom-range": tobs.MinMaxObserver(quant_min=0, quant_max=15),
      "moving_average-reduce_range": tobs.MovingAverageMinMaxObserver(averaging_constant=0.1,
                                                                      reduce_range=True),
      "per_channel-symmetric": tobs.PerChannelMinMaxObserver(
          dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
      "moving_average-per_channel-affine": tobs.MovingAveragePerChannelMinMaxObserver(
          dtype=torch.qint8, qscheme=torch.per_channel_affine, averaging_constant=0.5),
      "histogram-256-bins": tobs.HistogramObserver(bins=256, reduce_range=True),
      "fake_quantize-custom-range-reduce_range": tfq.FakeQuantize(
          observer=tobs.MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
          reduce_range=True),
      "fused-qat-weight": torch.ao.quantization.get_default_qat_qconfig("x86").weight(),
  }


@pytest.mark.parametrize("name", list(_torch_observers()))
def test_torch_observer_becomes_an_equivalent_quant_spec(name):
  """The derived spec gives torch's own qparams from torch's own statistics."""
  from flax_qmha._from_torch import _spec_from_torch_observer
  from flax_qmha._observers import calculate_stats_qparams
  obj = _torch_observers()[name]
  spec, fake = _spec_from_torch_observer(obj, name)
  assert fake == hasattr(obj, "fake_quant_enabled")
  observer = obj.activation_post_process if fake else obj
  rng = np.random.default_rng(0)
  for _ in range(3):
    obj(torch.tensor(_normal(rng, (E, 8)) + 0.3))
  scale, zero_point = observer.calculate_qparams()
  stats = {n: getattr(observer, n).numpy() for n in ("min_val", "max_val", "histogram")
           if hasattr(observer, n)}
  ours_scale, ours_zero_point = calculate_stats_qparams(spec, stats)
  assert spec.quant_range == (observer.quant_min, observer.quant_max)
  np.testing.assert_array_equal(np.asarray(ours_scale).reshape(-1), scale.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(ours_zero_point).reshape(-1),
                                zero_point.numpy().reshape(-1))


def test_unsupported_torch_observers_are_named():
  from torch.ao.quantization import observer as tobs
  from flax_qmha._from_torch import _spec_from_torch_observer
  cases = [
      (tobs.PlaceholderObserver(dtype=torch.float16), "PlaceholderObserver; supported"),
      (tobs.MinMaxObserver(dtype=torch.qint32), "observes dtype torch.qint32"),
      (tobs.PerChannelMinMaxObserver(ch_axis=1, dtype=torch.qint8,
                                     qscheme=torch.per_channel_symmetric), "ch_axis=1"),
  ]
  for observer, match in cases:
    with pytest.raises(ValueError, match=f"site: .*{match}"):
      _spec_from_torch_observer(observer, "site:")


# ---------------------------------------------------------------------------------------------
# observed (calibrated) modules


def _torch_minmax_qconfig():
  from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver
  return torch.ao.quantization.QConfig(
      activation=MinMaxObserver.with_args(reduce_range=True),
      weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                qscheme=torch.per_channel_symmetric),
  )


MINMAX = fq.QConfig(
    activation=fq.QuantSpec(observer="minmax", dtype="quint8", qscheme="per_tensor_affine",
                            reduce_range=True),
    weight=fq.QuantSpec(observer="minmax", dtype="qint8", qscheme="per_channel_symmetric"),
    fake_quant=False,
)
QCONFIGS = {
    "x86": (lambda: torch.ao.quantization.get_default_qconfig("x86"),
            fq.get_default_qconfig("x86")),
    "minmax": (_torch_minmax_qconfig, MINMAX),
}
OBSERVED_CASES = {
    "x86-plain": ("x86", dict()),
    "x86-kvdim+no_bias+bias_kv+zero_attn": ("x86", dict(**KV, bias=False, add_bias_kv=True,
                                                        add_zero_attn=True)),
    "minmax-bias_kv": ("minmax", dict(add_bias_kv=True)),
}


def _torch_stats(model, site):
  """A torch site's observer buffers (the inner observer of a FakeQuantize)."""
  obs = model.get_submodule(site).activation_post_process
  obs = getattr(obs, "activation_post_process", obs)
  names = ("min_val", "max_val") + (("histogram",) if hasattr(obs, "histogram") else ())
  return {n: getattr(obs, n).detach().numpy() for n in names}


def _stats_at(variables, path):
  node = variables["quant_stats"]
  for part in path:
    node = node[part]
  return node


def _assert_stats_equal_torch(variables, model):
  for site, path in TORCH_SITES.items():
    _assert_trees_equal(_stats_at(variables, path), _torch_stats(model, site), f"{site} ")


@pytest.fixture(scope="module")
def observed_models():
  """``case -> (float torch MHA, observed, converted)``, shared by the observed tests."""
  models = {}
  for name, (qconfig_name, case) in OBSERVED_CASES.items():
    tm = _torch_mha(seed=len(name), **case)
    kdim, vdim = case.get("kdim", E), case.get("vdim", E)
    observed, converted = observe_and_convert(tm, QCONFIGS[qconfig_name][0](),
                                              _calibration(7, kdim, vdim, batches=3))
    models[name] = (tm, observed, converted)
  return models


@pytest.mark.parametrize("name", OBSERVED_CASES)
def test_observed_module_converts_to_torchs_converted_module(name, observed_models):
  qconfig_name, case = OBSERVED_CASES[name]
  tm, observed, converted = observed_models[name]
  module, variables = from_torch(observed, prefix="mha")
  assert isinstance(module, fq.MultiheadAttention)
  assert module.qconfig == QCONFIGS[qconfig_name][1]
  # The real weights are linear_Q/K/V's, not the stale inherited in_proj_*.
  _assert_trees_equal(to_torch_state_dict(module, variables), _numpy_state_dict(tm))
  _assert_stats_equal_torch(variables, observed)
  qmodule, qvariables = fq.convert(module, variables, numerics="torch")
  for proj in PROJECTIONS:
    t_weight = getattr(converted.mha, proj).weight()
    np.testing.assert_array_equal(qvariables["params"][proj]["kernel"],
                                  t_weight.int_repr().numpy().T, err_msg=proj)
  q, k, v = _inputs(3, case.get("kdim", E), case.get("vdim", E))
  out, w = jax.jit(qmodule.apply)(qvariables, q, k, v)
  t_out, t_w = _torch_call(converted, q, k, v)
  _assert_within_one_step(out, t_out, float(converted.mha.out_proj.scale), f"{name} output")
  _assert_within_one_step(w, t_w, float(converted.mha.quant_attn_output_weights.scale),
                          f"{name} weights")


@pytest.mark.parametrize("name, fmt", [("x86-kvdim+no_bias+bias_kv+zero_attn", "pt"),
                                       ("x86-plain", "safetensors"), ("minmax-bias_kv", "pt")])
def test_observed_state_dict_file_infers_the_qconfig(name, fmt, observed_models, tmp_path):
  _, observed, _ = observed_models[name]
  live_module, live_vars = from_torch(observed, prefix="mha")
  save = _save_pt if fmt == "pt" else _save_safetensors
  path = save(observed.state_dict(), tmp_path / f"observed.{fmt}")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # stubs found, qconfig inferred: nothing to warn about
    # add_zero_attn, like num_heads, is not in a state_dict.
    module, variables = from_torch(path, prefix="mha", num_heads=H,
                                   add_zero_attn=live_module.add_zero_attn)
  assert module == live_module
  _assert_trees_equal(variables, live_vars)


def test_observed_module_without_input_stubs_warns_and_leaves_inputs_uncalibrated(
    observed_models):
  _, observed, _ = observed_models["x86-plain"]
  with pytest.warns(UserWarning, match=r"no input QuantStubs \['quant_query', 'quant_key',"
                    r" 'quant_value'\].*convert\(\) will need those inputs calibrated"):
    module, variables = from_torch(observed.mha)
  for name in ("quant_query", "quant_key", "quant_value"):
    assert np.isposinf(variables["quant_stats"][name]["min_val"]), name
  _assert_trees_equal(variables["quant_stats"]["linear_Q"],
                      {"activation_post_process": _torch_stats(observed, "mha.linear_Q")})
  with pytest.raises(ValueError, match="quant_stats/quant_query was never updated"):
    fq.convert(module, variables, numerics="torch")
  # Stubs with other names are found through input_stubs (paths from the source's root).
  renamed = {k.replace("quant_query", "q_stub"): v for k, v in observed.state_dict().items()}
  _, found = from_torch(renamed, prefix="mha", num_heads=H,
                        input_stubs={"query": "q_stub", "key": "quant_key",
                                     "value": "quant_value"})
  np.testing.assert_array_equal(found["quant_stats"]["quant_query"]["histogram"],
                                _torch_stats(observed, "quant_query")["histogram"])


# ---------------------------------------------------------------------------------------------
# quantization-aware training (fake quantization)


def _torch_qat(weight_fake_quant: bool):
  """A QAT-prepared wrapped MHA after three training steps' worth of observation.

  ``weight_fake_quant=False`` is torch's documented route (``prepare`` with a QAT qconfig:
  only activations are fake-quantized, since ``prepare_qat`` raises on an MHA); ``True``
  swaps the four projections for ``nn.qat.Linear`` so the weights are fake-quantized too.
  """
  torch.manual_seed(3)
  if weight_fake_quant:
    mha = torch.ao.nn.quantizable.MultiheadAttention(E, H, **KV)
    model = QuantWrapped(mha).train()
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    torch.ao.quantization.propagate_qconfig_(model)
    for name in PROJECTIONS:
      setattr(mha, name, torch.ao.nn.qat.Linear.from_float(getattr(mha, name)))
    prepared = torch.ao.quantization.prepare(
        model, observer_non_leaf_module_list={torch.ao.nn.qat.Linear})
  else:
    model = QuantWrapped(_torch_mha(**KV, add_bias_kv=True)).train()
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("x86")
    prepared = torch.ao.quantization.prepare(model, prepare_custom_config_dict={
        "float_to_observed_custom_module_class": {
            nn.MultiheadAttention: torch.ao.nn.quantizable.MultiheadAttention}})
  for batch in _calibration(11, **KV, batches=3):
    prepared(*batch)
  prepared.eval()
  converted = torch.ao.quantization.convert(copy.deepcopy(prepared), inplace=False,
                                            convert_custom_config_dict=QUANTIZED)
  return prepared, converted


@pytest.mark.parametrize("weight_fake_quant", [False, True],
                         ids=["activations_only", "weight_fake_quant"])
def test_qat_module_imports_fake_quant_statistics(weight_fake_quant):
  prepared, converted = _torch_qat(weight_fake_quant)
  module, variables = from_torch(prepared, prefix="mha")
  expected = fq.get_default_qat_qconfig("x86")
  assert module.qconfig == expected
  assert module.add_bias_kv != weight_fake_quant
  _assert_stats_equal_torch(variables, prepared)
  for proj in PROJECTIONS:
    stats = variables["quant_stats"][proj]["weight_fake_quant"]
    if weight_fake_quant:
      inner = prepared.mha.get_submodule(proj).weight_fake_quant.activation_post_process
      want = {"min_val": inner.min_val.numpy(), "max_val": inner.max_val.numpy()}
    else:  # torch's convert observes the final weights once; so do we
      weight = prepared.mha.get_submodule(proj).weight.detach().numpy()
      want = {"min_val": weight.min(axis=1), "max_val": weight.max(axis=1)}
    _assert_trees_equal(stats, want, f"{proj}/weight_fake_quant")
  # The same model read from its state_dict: the QAT preset is inferred, and it reproduces
  # the scale / zero point every FakeQuantize stored (no warning).
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sd_module, sd_vars = from_torch(prepared.state_dict(), prefix="mha", num_heads=H)
  assert sd_module == module
  _assert_trees_equal(sd_vars, variables)

  qmodule, qvariables = fq.convert(module, variables, numerics="torch")
  q, k, v = _inputs(5, **KV)
  out, w = jax.jit(qmodule.apply)(qvariables, q, k, v)
  t_out, t_w = _torch_call(converted, q, k, v)
  _assert_within_one_step(out, t_out, float(converted.mha.out_proj.scale), "output")
  _assert_within_one_step(w, t_w, float(converted.mha.quant_attn_output_weights.scale),
                          "weights")


def test_state_dict_qconfig_guess_is_checked_against_stored_fake_quant_qparams():
  prepared, _ = _torch_qat(False)
  sd = prepared.state_dict()
  # A FakeQuantize whose stored zero point disagrees with the inferred x86 QAT preset.
  sd["mha.linear_K.activation_post_process.zero_point"] = torch.tensor([3], dtype=torch.int32)
  with pytest.warns(UserWarning, match=r"does not reproduce.*mha\.linear_K\.activation_post"):
    from_torch(sd, prefix="mha", num_heads=H)
  # An explicit qconfig is trusted as given.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    module, _ = from_torch(sd, prefix="mha", num_heads=H,
                           qconfig=fq.get_default_qat_qconfig("fbgemm"))
  assert module.qconfig == fq.get_default_qat_qconfig("fbgemm")


# ---------------------------------------------------------------------------------------------
# converted (int8) modules

CONVERTED_CASES = {
    "x86-plain": ("x86", dict()),
    "x86-kvdim+no_bias+zero_attn": ("x86", dict(**KV, bias=False, add_zero_attn=True)),
    "x86-bias_kv": ("x86", dict(add_bias_kv=True)),
    "qnnpack-per_tensor_weights": ("qnnpack", dict(add_bias_kv=True, **KV)),
}


@pytest.fixture(scope="module")
def converted_models():
  models = {}
  for name, (backend, case) in CONVERTED_CASES.items():
    tm = _torch_mha(seed=len(name), **case)
    _, converted = observe_and_convert(
        tm, torch.ao.quantization.get_default_qconfig(backend),
        _calibration(2, case.get("kdim", E), case.get("vdim", E)))
    models[name] = converted
  return models


@pytest.mark.parametrize("name", CONVERTED_CASES)
def test_converted_module_holds_torchs_int8_weights_and_matches_its_output(
    name, converted_models):
  backend, case = CONVERTED_CASES[name]
  converted = converted_models[name]
  tq = converted.mha
  qmodule, qvariables = from_torch(converted, prefix="mha")
  assert isinstance(qmodule, fq.QuantizedMultiheadAttention)
  assert (qmodule.numerics, qmodule.per_channel_weights) == ("torch", backend == "x86")
  assert (qmodule.bias, qmodule.add_bias_kv, qmodule.add_zero_attn) == (
      case.get("bias", True), case.get("add_bias_kv", False), case.get("add_zero_attn", False))
  params = qvariables["params"]
  stubs = {"linear_Q": converted.quant_query, "linear_K": converted.quant_key,
           "linear_V": converted.quant_value, "out_proj": tq.quant_attn_output}
  for proj in PROJECTIONS:
    t_linear = getattr(tq, proj)
    t_weight, entry = t_linear.weight(), params[proj]
    np.testing.assert_array_equal(entry["kernel"], t_weight.int_repr().numpy().T, err_msg=proj)
    assert entry["kernel"].dtype == np.int8
    t_scale = (t_weight.q_per_channel_scales() if backend == "x86"
               else torch.tensor(t_weight.q_scale()))
    np.testing.assert_array_equal(entry["kernel_scale"], t_scale.numpy().astype(np.float32))
    if qmodule.bias:
      np.testing.assert_array_equal(entry["bias"], t_linear.bias().detach().numpy())
    assert (entry["output_scale"], entry["output_zero_point"]) == (
        np.float32(t_linear.scale), t_linear.zero_point)
    assert entry["input_scale"] == stubs[proj].scale.item()
    assert entry["input_zero_point"] == stubs[proj].zero_point.item() - 128
  assert (params["attn_weights_scale"], params["attn_weights_zero_point"]) == (
      tq.quant_attn_output_weights.scale.item(), tq.quant_attn_output_weights.zero_point.item())
  if qmodule.add_bias_kv:
    for bias in ("bias_k", "bias_v"):
      t_bias = getattr(tq, bias)
      np.testing.assert_array_equal(params[bias], t_bias.int_repr().numpy())
      assert (params[f"{bias}_scale"], params[f"{bias}_zero_point"]) == (
          np.float32(t_bias.q_scale()), t_bias.q_zero_point())

  q, k, v = _inputs(4, case.get("kdim", E), case.get("vdim", E))
  kpm = np.zeros((N, S), bool)
  kpm[0, -1] = True
  out, w = jax.jit(qmodule.apply)(qvariables, q, k, v, key_padding_mask=kpm)
  t_out, t_w = _torch_call(converted, q, k, v, key_padding_mask=torch.tensor(kpm))
  _assert_within_one_step(out, t_out, float(tq.out_proj.scale), f"{name} output")
  _assert_within_one_step(w, t_w, float(tq.quant_attn_output_weights.scale), f"{name} weights")

  # Back to torch: the float state_dict holds torch's dequantized weights exactly.
  exported = to_torch_state_dict(qmodule, qvariables)
  dequantized = {p: getattr(tq, p).weight().dequantize().numpy() for p in PROJECTIONS}
  np.testing.assert_array_equal(exported["out_proj.weight"], dequantized["out_proj"])
  if "in_proj_weight" in exported:
    np.testing.assert_array_equal(
        exported["in_proj_weight"],
        np.concatenate([dequantized[p] for p in PROJECTIONS[:3]]))
  else:
    for p, key in zip(PROJECTIONS[:3], ("q_proj_weight", "k_proj_weight", "v_proj_weight")):
      np.testing.assert_array_equal(exported[key], dequantized[p], err_msg=key)


def test_converted_state_dict_file_needs_bias_kv_from_the_live_module(converted_models,
                                                                      tmp_path):
  converted = converted_models["x86-bias_kv"]
  live_module, live_vars = from_torch(converted, prefix="mha")
  path = _save_pt(converted.state_dict(), tmp_path / "converted.pt")
  # torch's state_dict() drops the quantized bias_k/bias_v: asking for them is an error ...
  with pytest.raises(ValueError, match=r"add_bias_kv=True but .* no bias_k/bias_v.*bias_kv="):
    from_torch(path, prefix="mha", num_heads=H, add_bias_kv=True)
  # ... and giving them restores the live import exactly.
  module, variables = from_torch(path, prefix="mha", num_heads=H,
                                 bias_kv=(converted.mha.bias_k, converted.mha.bias_v))
  assert module == live_module
  _assert_trees_equal(variables, live_vars)
  with pytest.raises(TypeError, match="bias_k must be torch's quantized"):
    from_torch(path, prefix="mha", num_heads=H,
               bias_kv=(converted.mha.bias_k.dequantize(), converted.mha.bias_v))


def test_converted_module_input_qparams(converted_models):
  converted = converted_models["x86-plain"]
  _, reference = from_torch(converted, prefix="mha")
  # The bare MHA has no QuantStubs next to it: its inputs' qparams are unknown.
  with pytest.raises(ValueError, match=r"input qparams .* unknown.*input_qparams=.*"
                     r"dynamic_inputs=True"):
    from_torch(converted.mha)
  given = {role: (getattr(converted, f"quant_{role}").scale,
                  getattr(converted, f"quant_{role}").zero_point.item())
           for role in ("query", "key", "value")}
  _, variables = from_torch(converted.mha, input_qparams=given)
  _assert_trees_equal(variables, reference)
  with pytest.raises(ValueError, match=r"input_qparams\['key'\]: zero_point must be a quint8"):
    from_torch(converted.mha, input_qparams={**given, "key": (0.1, 300)})
  with pytest.raises(ValueError, match="input_qparams must be a dict with keys"):
    from_torch(converted.mha, input_qparams={"query": (0.1, 3)})
  # Run-time quantized inputs: torch's int8 weights in the "accurate" numerics.
  qmodule, qvariables = from_torch(converted.mha, dynamic_inputs=True)
  assert (qmodule.numerics, qmodule.dynamic_activations) == ("accurate", True)
  for proj in PROJECTIONS:
    _assert_trees_equal({k: qvariables["params"][proj][k] for k in ("kernel", "kernel_scale")},
                        {k: reference["params"][proj][k] for k in ("kernel", "kernel_scale")})
  q, k, v = _inputs(4)
  out, _ = jax.jit(qmodule.apply)(qvariables, q, k, v)
  t_out, _ = _torch_call(converted, q, k, v)
  snr = 10 * np.log10(np.sum(t_out**2) / np.sum((np.asarray(out) - t_out) ** 2))
  assert snr > 20, snr


# ---------------------------------------------------------------------------------------------
# models containing attentions, checkpoints, transformers-style layers


def _encoder(layers=3):
  torch.manual_seed(0)
  layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
  model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def test_live_model_attention_is_picked_by_prefix():
  model = _encoder()
  with pytest.raises(ValueError, match=r"holds 3 MultiheadAttention modules \['layers.0.self_"
                     r"attn', 'layers.1.self_attn', 'layers.2.self_attn'\]; pass prefix="):
    from_torch(model)
  with pytest.raises(ValueError, match=r"no MultiheadAttention at prefix 'layers.1'; found"):
    from_torch(model, prefix="layers.1")
  module, variables = from_torch(model, prefix="layers.1.self_attn")
  assert module.batch_first  # read from the module
  x = _normal(np.random.default_rng(0), (N, L, E))
  out, w = jax.jit(module.apply)(variables, x, x, x)
  t_out, t_w = _torch_call(model.layers[1].self_attn, x, x, x)
  np.testing.assert_allclose(out, t_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(w, t_w, rtol=1e-5, atol=1e-6)


def test_checkpoint_of_a_transformer_encoder_finds_every_attention(tmp_path):
  model = _encoder()
  path = _save_pt(model.state_dict(), tmp_path / "encoder.pt")
  found = from_torch_checkpoint(path, num_heads=H, batch_first=True)
  assert isinstance(found, CheckpointImport) and found.skipped == []
  assert list(found) == ["layers.0.self_attn", "layers.1.self_attn", "layers.2.self_attn"]
  x = _normal(np.random.default_rng(1), (N, L, E))
  module = found["layers.0.self_attn"][0]
  apply = jax.jit(module.apply)
  for i, (prefix, (m, variables)) in enumerate(found.items()):
    assert m == module
    out, _ = apply(variables, x, x, x)
    t_out, _ = _torch_call(model.layers[i].self_attn, x, x, x)
    np.testing.assert_allclose(out, t_out, rtol=1e-5, atol=1e-5, err_msg=prefix)
  # Per-prefix heads: prefixes left out are reported, not raised.
  with pytest.warns(UserWarning, match=r"skipped 1 attention.*'layers.2.self_attn': num_heads"
                    " has no entry"):
    partial = from_torch_checkpoint(path, num_heads={"layers.0.self_attn": H,
                                                     "layers.1.self_attn": 2})
  assert list(partial) == ["layers.0.self_attn", "layers.1.self_attn"]
  assert partial["layers.1.self_attn"][0].num_heads == 2
  assert partial.skipped == [("layers.2.self_attn", "num_heads has no entry for this prefix")]
  with pytest.raises(ValueError, match=r"num_heads names prefixes \['layers.9.self_attn'\]"):
    from_torch_checkpoint(path, num_heads={"layers.9.self_attn": H})


class _HFAttention(nn.Module):
  """A transformers-style attention: four Linear layers (k_proj without a bias, as Whisper)."""

  def __init__(self, kv_features=E):
    super().__init__()
    self.q_proj = nn.Linear(E, E)
    self.k_proj = nn.Linear(E, kv_features, bias=False)
    self.v_proj = nn.Linear(E, kv_features)
    self.out_proj = nn.Linear(E, E)


class _BertAttention(nn.Module):
  def __init__(self):
    super().__init__()
    self.self = nn.Module()
    self.self.query, self.self.key, self.self.value = (nn.Linear(E, E) for _ in range(3))
    self.output = nn.Module()
    self.output.dense = nn.Linear(E, E)


def _reference_mha(q, k, v, out, bias=True):
  """torch.nn.MultiheadAttention holding four Linear layers' weights."""
  mha = nn.MultiheadAttention(E, H, bias=bias).eval()
  with torch.no_grad():
    mha.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
    mha.out_proj.weight.copy_(out.weight)
    if bias:
      zeros = torch.zeros(E)
      mha.in_proj_bias.copy_(torch.cat([x.bias if x.bias is not None else zeros
                                        for x in (q, k, v)]))
      mha.out_proj.bias.copy_(out.bias)
  return mha


@pytest.mark.parametrize("style", ["hf", "bert"])
def test_checkpoint_with_key_map_imports_transformers_style_attentions(style):
  torch.manual_seed(0)
  if style == "hf":
    model = nn.ModuleDict({"layers": nn.ModuleList([_HFAttention(), _HFAttention(E // 2)])})
    key_map = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}
    prefix = "layers.0"
    attn = model["layers"][0]
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj)
  else:
    model = nn.ModuleDict({"attention": _BertAttention()})
    key_map = {"q": "self.query", "k": "self.key", "v": "self.value", "out": "output.dense"}
    prefix = "attention"
    attn = model["attention"]
    linears = (attn.self.query, attn.self.key, attn.self.value, attn.output.dense)
  sd = model.state_dict()
  if style == "hf":
    # The second layer is grouped-query (K/V project to E/2): found, reported, not imported.
    with pytest.warns(UserWarning, match=r"skipped 1 attention.*'layers.1'"):
      found = from_torch_checkpoint(sd, num_heads=H, key_map=key_map)
    assert [name for name, _ in found.skipped] == ["layers.1"]
    assert "layers.1.k_proj.weight" in found.skipped[0][1]
  else:
    found = from_torch_checkpoint(sd, num_heads=H, key_map=key_map)
  assert list(found) == [prefix]
  module, variables = found[prefix]
  np.testing.assert_array_equal(variables["params"]["linear_K"]["bias"],
                                np.zeros(E) if style == "hf" else attn.self.key.bias.detach())
  q, k, v = _inputs(6)
  out, w = jax.jit(module.apply)(variables, q, k, v)
  t_out, t_w = _torch_call(_reference_mha(*linears), q, k, v)
  np.testing.assert_allclose(out, t_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(w, t_w, rtol=1e-5, atol=1e-6)


def test_checkpoint_mixes_kinds_and_reports_unimportable_converted_modules(converted_models):
  converted = converted_models["x86-plain"]
  sd = {f"float.{k}": v for k, v in _torch_mha().state_dict().items()}
  sd.update({f"q.{k}": v for k, v in converted.state_dict().items()})
  sd.update({f"bare.{k}": v for k, v in converted.mha.state_dict().items()})
  with pytest.warns(UserWarning, match=r"skipped 1 attention.*'bare.*input qparams"):
    found = from_torch_checkpoint(sd, num_heads=H)
  assert list(found) == ["float", "q.mha"]
  assert isinstance(found["float"][0], fq.MultiheadAttention)
  assert isinstance(found["q.mha"][0], fq.QuantizedMultiheadAttention)
  _, reference = from_torch(converted, prefix="mha")
  _assert_trees_equal(found["q.mha"][1], reference)
  dynamic = from_torch_checkpoint(sd, num_heads=H, dynamic_inputs=True)
  assert list(dynamic) == ["float", "q.mha", "bare"] and dynamic.skipped == []


# ---------------------------------------------------------------------------------------------
# without torch


def test_converted_checkpoint_loads_and_runs_with_torch_blocked(converted_models, tmp_path):
  converted = converted_models["x86-kvdim+no_bias+zero_attn"]
  path = _save_pt(converted.state_dict(), tmp_path / "int8.pt")
  q, k, v = _inputs(8, **KV)
  np.savez(tmp_path / "inputs.npz", q=q, k=k, v=v)
  script = textwrap.dedent(f"""
      import sys
      sys.modules["torch"] = None  # any import of torch now raises ImportError
      import jax
      import numpy as np
      from flax_qmha._from_torch import from_torch
      module, variables = from_torch({str(path)!r}, prefix="mha", num_heads={H},
                                     add_zero_attn=True)
      x = np.load({str(tmp_path / "inputs.npz")!r})
      out, _ = jax.jit(module.apply)(variables, x["q"], x["k"], x["v"])
      np.save({str(tmp_path / "out.npy")!r}, np.asarray(out))
      print(type(module).__name__, module.numerics)
  """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(fq.__file__)),
                                        os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["QuantizedMultiheadAttention", "torch"]
  t_out, _ = _torch_call(converted, q, k, v)
  _assert_within_one_step(np.load(tmp_path / "out.npy"), t_out,
                          float(converted.mha.out_proj.scale), "torch-free output")


# ---------------------------------------------------------------------------------------------
# errors name the key or argument


def _float_sd(**kwargs):
  return {k: v.detach().numpy() for k, v in _torch_mha(**kwargs).state_dict().items()}


def _without(sd, key):
  return {k: v for k, v in sd.items() if k != key}


ERRORS = {
    "missing out_proj.weight": (
        lambda: from_torch(_without(_float_sd(), "out_proj.weight"), num_heads=H),
        CheckpointError, r"the key 'out_proj.weight' \(the \(embed_dim, embed_dim\) weight\)"
                         " is missing"),
    "missing out_proj.bias": (
        lambda: from_torch(_without(_float_sd(), "out_proj.bias"), num_heads=H),
        CheckpointError, r"'in_proj_bias' is present but 'out_proj.bias' is missing"),
    "missing bias_v": (
        lambda: from_torch(_without(_float_sd(add_bias_kv=True), "bias_v"), num_heads=H),
        CheckpointError, r"the key 'bias_v' is missing"),
    "missing k_proj_weight": (
        lambda: from_torch(_without(_float_sd(**KV), "k_proj_weight"), num_heads=H),
        CheckpointError, r"the key 'k_proj_weight' \(k projection weight\) is missing"),
    "wrong in_proj_bias shape": (
        lambda: from_torch({**_float_sd(), "in_proj_bias": np.zeros(47, np.float32)},
                           num_heads=H),
        CheckpointError, r"'in_proj_bias' has shape \(47,\), expected \(48,\)"),
    "wrong in_proj_weight shape": (
        lambda: from_torch({**_float_sd(), "in_proj_weight": np.zeros((48, 15), np.float32)},
                           num_heads=H),
        CheckpointError, r"'in_proj_weight' has shape \(48, 15\), expected \(48, 16\)"),
    "integer weight": (
        lambda: from_torch({**_float_sd(), "out_proj.bias": np.zeros(E, np.int64)},
                           num_heads=H),
        CheckpointError, r"'out_proj.bias' must be a float tensor .* got dtype int64"),
    "missing num_heads": (
        lambda: from_torch(_float_sd()), ValueError,
        r"num_heads is required for the state_dict at ''.*pass num_heads="),
    "num_heads not dividing": (
        lambda: from_torch(_float_sd(), num_heads=3), ValueError,
        r"embed_dim \(16\) must be divisible by num_heads \(3\)"),
    "bad batch_first": (
        lambda: from_torch(_float_sd(), num_heads=H, batch_first="yes"), TypeError,
        "batch_first must be a bool"),
    "add_bias_kv conflicts": (
        lambda: from_torch(_float_sd(add_bias_kv=True), num_heads=H, add_bias_kv=False),
        ValueError, "add_bias_kv=False but the state_dict holds 'bias_k'"),
    "add_bias_kv absent": (
        lambda: from_torch(_float_sd(), num_heads=H, add_bias_kv=True),
        CheckpointError, "add_bias_kv=True but the state_dict has no 'bias_k'"),
    "qconfig on a float module": (
        lambda: from_torch(_float_sd(), num_heads=H, qconfig=fq.get_default_qconfig()),
        ValueError, "qconfig= applies to observed modules"),
    "no attention": (
        lambda: from_torch({"linear.weight": np.zeros((2, 2), np.float32)}, num_heads=H),
        ValueError, r"found no MultiheadAttention in the state_dict"),
    "prefix not found": (
        lambda: from_torch({f"a.{k}": v for k, v in _float_sd().items()}, prefix="b",
                           num_heads=H),
        ValueError, r"no MultiheadAttention at prefix 'b'; found \['a'\]"),
    "bad source": (lambda: from_torch(42), TypeError, "source must be a torch module"),
    "checkpoint without attention": (
        lambda: from_torch_checkpoint({"w": np.zeros(2, np.float32)}, num_heads=H),
        ValueError, "found no multi-head attention"),
    "checkpoint num_heads type": (
        lambda: from_torch_checkpoint(_float_sd(), num_heads="4"), TypeError,
        "num_heads must be a positive int or a dict"),
    "bad key_map": (
        lambda: from_torch_checkpoint(_float_sd(), num_heads=H, key_map={"q": "q_proj"}),
        ValueError, "key_map must map exactly 'q', 'k', 'v' and 'out'"),
}


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
  with pytest.raises(CheckpointError, match=r"list.pt' holds a list, expected a state_dict"):
    from_torch(_save_pt([1, 2], tmp_path / "list.pt"), num_heads=H)


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
def test_errors_name_the_key_or_argument(case):
  call, error, match = case
  with pytest.raises(error, match=match):
    call()


def test_converted_state_dict_errors_name_the_key(converted_models):
  sd = {k: v for k, v in converted_models["x86-plain"].state_dict().items()}
  with pytest.raises(CheckpointError, match=r"the key 'mha.linear_V.scale' \(linear_V output"
                     r" scale\) is missing"):
    from_torch(_without(sd, "mha.linear_V.scale"), prefix="mha", num_heads=H)
  weight, bias = sd["mha.linear_Q._packed_params._packed_params"]
  bad = {**sd, "mha.linear_Q._packed_params._packed_params": (weight[:, :8], bias)}
  with pytest.raises(CheckpointError, match=r"'mha.linear_Q._packed_params._packed_params'"
                     r" holds a weight of shape \(16, 8\), expected \(16, 16\)"):
    from_torch(bad, prefix="mha", num_heads=H)
  with pytest.raises(ValueError, match="qconfig= applies to observed modules, but 'mha' is"
                     " already converted"):
    from_torch(sd, prefix="mha", num_heads=H, qconfig=fq.get_default_qconfig())


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [(dict(num_heads=0), TypeError, ["num_heads", "positive"]),
     (dict(num_heads={"": "2"}), TypeError, ["num_heads"]),
     (dict(num_heads=2, dropout=2.0), ValueError, ["dropout", "[0, 1)", "2.0"])],
    ids=["zero_heads", "str_heads", "dropout"],
)
def test_checkpoint_arguments_are_checked_up_front(kwargs, exc, words):
  sd = {k: v.numpy() for k, v in torch.nn.MultiheadAttention(8, 2).state_dict().items()}
  with pytest.raises(exc) as info:
    fq.from_torch_checkpoint(sd, **kwargs)
  for word in words:
    assert word in str(info.value), str(info.value)
