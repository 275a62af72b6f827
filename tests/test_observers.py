"""Observer module, QuantSpec/QConfig and the default presets against torch's observers.

Every observer kind is fed the same batches as its torch counterpart; the
statistics must be identical after each batch and the qparams identical at the
end. Per-channel weights are ``[out, in]`` with ``ch_axis=0`` in torch and
``[in, out]`` with ``channel_axis=-1`` here, so our inputs are transposed.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.ao.quantization import (
    FakeQuantize,
    FakeQuantizeBase,
    FusedMovingAvgObsFakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)

from flax_qmha._observers import (
    STATS_COLLECTION,
    Observer,
    calculate_stats_qparams,
    initial_stats,
    update_stats,
)
from flax_qmha._qconfig import (
    BACKENDS,
    QConfig,
    QuantSpec,
    get_default_qat_qconfig,
    get_default_qconfig,
)

F32 = np.float32

pytestmark = pytest.mark.filterwarnings(
    "ignore:Please use quant_min and quant_max:UserWarning",
    "ignore:must run observer before calling calculate_qparams:UserWarning",
    "ignore:torch.inf detected in input tensor:UserWarning",
    "ignore:Default qconfig of oneDNN backend:UserWarning",
)

TORCH_CLASSES = {
    ("minmax", False): MinMaxObserver,
    ("minmax", True): PerChannelMinMaxObserver,
    ("moving_average_minmax", False): MovingAverageMinMaxObserver,
    ("moving_average_minmax", True): MovingAveragePerChannelMinMaxObserver,
    ("histogram", False): HistogramObserver,
}


def torch_observer(spec: QuantSpec):
  """The torch observer a QuantSpec stands for."""
  cls = TORCH_CLASSES[(spec.observer, spec.is_per_channel)]
  kwargs = dict(dtype=getattr(torch, spec.dtype), qscheme=getattr(torch, spec.qscheme),
                reduce_range=spec.reduce_range, quant_min=spec.quant_min,
                quant_max=spec.quant_max, eps=spec.eps)
  if spec.observer == "moving_average_minmax":
    kwargs["averaging_constant"] = spec.averaging_constant
  if spec.observer == "histogram":
    kwargs["bins"] = spec.bins
  if spec.is_per_channel:
    kwargs["ch_axis"] = 0
  return cls(**kwargs)


def _spec(observer, dtype, qscheme, **kw):
  return QuantSpec(observer=observer, dtype=dtype, qscheme=qscheme, **kw)


SPECS = {
    "minmax-quint8-affine": _spec("minmax", "quint8", "per_tensor_affine"),
    "minmax-quint8-affine-reduce": _spec("minmax", "quint8", "per_tensor_affine",
                                         reduce_range=True),
    "minmax-qint8-symmetric": _spec("minmax", "qint8", "per_tensor_symmetric"),
    "minmax-quint8-symmetric": _spec("minmax", "quint8", "per_tensor_symmetric"),
    "minmax-qint8-affine-reduce": _spec("minmax", "qint8", "per_tensor_affine", reduce_range=True),
    "movavg-quint8-affine-qat-x86": _spec("moving_average_minmax", "quint8", "per_tensor_affine",
                                          reduce_range=True, quant_min=0, quant_max=255),
    "movavg-qint8-symmetric-qat": _spec("moving_average_minmax", "qint8", "per_tensor_symmetric",
                                        quant_min=-128, quant_max=127),
    "movavg-quint8-affine-c0.3": _spec("moving_average_minmax", "quint8", "per_tensor_affine",
                                       averaging_constant=0.3),
    "perchannel-minmax-qint8-symmetric": _spec("minmax", "qint8", "per_channel_symmetric"),
    "perchannel-minmax-quint8-affine": _spec("minmax", "quint8", "per_channel_affine"),
    "perchannel-minmax-qint8-symmetric-reduce": _spec("minmax", "qint8", "per_channel_symmetric",
                                                      reduce_range=True),
    "perchannel-movavg-qint8-symmetric-qat": _spec(
        "moving_average_minmax", "qint8", "per_channel_symmetric", quant_min=-128, quant_max=127),
    "perchannel-movavg-quint8-affine-reduce": _spec(
        "moving_average_minmax", "quint8", "per_channel_affine", reduce_range=True),
    "histogram-quint8-affine-reduce-x86": _spec("histogram", "quint8", "per_tensor_affine",
                                                reduce_range=True),
    "histogram-qint8-symmetric": _spec("histogram", "qint8", "per_tensor_symmetric"),
    "histogram-quint8-affine-qnnpack": _spec("histogram", "quint8", "per_tensor_affine"),
}

OUT, IN = 6, 16  # per-channel weights: torch [OUT, IN], ours [IN, OUT]


def _batches(seed: int, per_channel: bool) -> list[np.ndarray]:
  """Four batches of different ranges, in torch's layout."""
  rng = np.random.default_rng(seed)
  shape = (OUT, IN) if per_channel else (8, IN)
  out = []
  for scale, shift in [(0.5, 0.0), (2.0, 0.7), (1.0, -3.0), (0.1, 0.2)]:
    x = rng.standard_normal(shape) * scale + shift
    if per_channel:
      x = x * np.linspace(0.2, 3.0, OUT)[:, None]  # channels of different ranges
    out.append(x.astype(F32))
  return out


def _ours(x: np.ndarray, spec: QuantSpec) -> np.ndarray:
  return x.T.copy() if spec.is_per_channel else x


def _observe_step(observer: Observer):
  return jax.jit(lambda v, x: observer.apply(v, x, mutable=[STATS_COLLECTION]))


def _assert_stats_equal(stats, ref, where):
  for name in ("min_val", "max_val") + (("histogram",) if "histogram" in stats else ()):
    np.testing.assert_array_equal(np.asarray(stats[name]), getattr(ref, name).numpy(),
                                  err_msg=f"{where}: {name}")


@pytest.mark.parametrize("name", list(SPECS))
def test_observer_matches_torch_over_batches(name):
  spec = SPECS[name]
  ref = torch_observer(spec)
  observer = Observer(spec)
  batches = _batches(abs(hash(name)) % 2**32, spec.is_per_channel)
  variables = observer.init(jax.random.PRNGKey(0), _ours(batches[0], spec))
  step = _observe_step(observer)
  for i, x in enumerate(batches):
    ref(torch.from_numpy(x.copy()))
    y, variables = step(variables, _ours(x, spec))
    np.testing.assert_array_equal(np.asarray(y), _ours(x, spec), err_msg=f"{name}: not identity")
    _assert_stats_equal(variables[STATS_COLLECTION], ref, f"{name}, batch {i}")
  want_scale, want_zp = ref.calculate_qparams()
  got_scale, got_zp = calculate_stats_qparams(spec, variables[STATS_COLLECTION])
  np.testing.assert_array_equal(np.asarray(got_scale).reshape(-1), want_scale.numpy(),
                                err_msg=f"{name}: scale")
  np.testing.assert_array_equal(np.asarray(got_zp).reshape(-1), want_zp.numpy(),
                                err_msg=f"{name}: zero point")
  assert got_zp.dtype == jnp.int32 and got_scale.dtype == jnp.float32


EDGE_DATA = {
    "all-zero": lambda shape: np.zeros(shape, F32),
    "constant": lambda shape: np.full(shape, 2.5, F32),
    "constant-negative": lambda shape: np.full(shape, -0.75, F32),
    "tiny": lambda shape: (np.random.default_rng(0).standard_normal(shape) * 1e-30).astype(F32),
    "huge": lambda shape: (np.random.default_rng(1).standard_normal(shape) * 1e30).astype(F32),
}
EDGE_SPECS = ["minmax-quint8-affine", "minmax-qint8-symmetric", "movavg-quint8-affine-qat-x86",
              "perchannel-minmax-qint8-symmetric", "perchannel-movavg-quint8-affine-reduce",
              "histogram-quint8-affine-reduce-x86"]


@pytest.mark.parametrize("data", list(EDGE_DATA))
@pytest.mark.parametrize("name", EDGE_SPECS)
def test_edge_case_data_matches_torch(name, data):
  spec = SPECS[name]
  x = EDGE_DATA[data]((OUT, IN) if spec.is_per_channel else (8, IN))
  ref = torch_observer(spec)
  stats = initial_stats(spec, OUT if spec.is_per_channel else None)
  for _ in range(2):
    ref(torch.from_numpy(x.copy()))
    stats = update_stats(spec, stats, _ours(x, spec))
  _assert_stats_equal(stats, ref, f"{name}/{data}")
  want_scale, want_zp = ref.calculate_qparams()
  got_scale, got_zp = calculate_stats_qparams(spec, stats)
  assert np.all(np.isfinite(np.asarray(got_scale))), f"{name}/{data}: scale not finite"
  np.testing.assert_array_equal(np.asarray(got_scale).reshape(-1), want_scale.numpy(),
                                err_msg=f"{name}/{data}: scale")
  np.testing.assert_array_equal(np.asarray(got_zp).reshape(-1), want_zp.numpy(),
                                err_msg=f"{name}/{data}: zero point")


@pytest.mark.parametrize("name", EDGE_SPECS)
def test_never_observed_gives_torch_defaults(name):
  spec = SPECS[name]
  ref = torch_observer(spec)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want_scale, want_zp = ref.calculate_qparams()
  stats = initial_stats(spec, OUT if spec.is_per_channel else None)
  got_scale, got_zp = calculate_stats_qparams(spec, stats)
  # torch returns shape [1] even per channel; every channel gets its values.
  assert want_scale.item() == 1.0 and want_zp.item() == 0, name
  assert np.all(np.asarray(got_scale) == 1.0) and np.all(np.asarray(got_zp) == 0), name


@pytest.mark.parametrize("name", EDGE_SPECS)
def test_non_finite_values_are_ignored(name):
  spec = SPECS[name]
  shape = (OUT, IN) if spec.is_per_channel else (8, IN)
  rng = np.random.default_rng(5)
  clean = [(rng.standard_normal(shape) * s).astype(F32) for s in (1.0, 2.0)]
  dirty = [c.copy() for c in clean]
  dirty[0][0, :3] = [np.nan, np.inf, -np.inf]
  dirty[1][1, 2] = np.nan
  nothing = np.full(shape, np.nan, F32)  # a batch without any finite value
  stats_clean = initial_stats(spec, OUT if spec.is_per_channel else None)
  stats_dirty = dict(stats_clean)
  for c, d in zip(clean, dirty):
    stats_dirty = update_stats(spec, stats_dirty, _ours(d, spec))
    stats_dirty = update_stats(spec, stats_dirty, _ours(nothing, spec))
    # The same batch without the bad values: drop them (per tensor) or, per
    # channel, replace each by a finite value already in its channel.
    fixed = np.where(np.isfinite(d), d, np.nanmax(np.where(np.isfinite(d), d, np.nan), axis=1,
                                                 keepdims=True))
    stats_clean = update_stats(spec, stats_clean, _ours(fixed.astype(F32), spec))
  scale, zp = calculate_stats_qparams(spec, stats_dirty)
  assert np.all(np.isfinite(np.asarray(scale))), f"{name}: scale not finite"
  if spec.observer != "histogram":  # histograms also count the replacement values
    for key in ("min_val", "max_val"):
      np.testing.assert_array_equal(np.asarray(stats_dirty[key]), np.asarray(stats_clean[key]),
                                    err_msg=f"{name}: {key}")


@pytest.mark.parametrize("observer", ["minmax", "moving_average_minmax"])
def test_per_channel_activation_axis_matches_torch_ch_axis(observer):
  # A 3-D activation [N, C, L] observed per channel on axis 1, as torch's ch_axis=1.
  spec = _spec(observer, "quint8", "per_channel_affine", averaging_constant=0.25)
  ref = torch_observer(spec)
  ref.ch_axis = 1
  rng = np.random.default_rng(8)
  stats = initial_stats(spec, 5)
  for scale in (1.0, 3.0, 0.5):
    x = (rng.standard_normal((2, 5, 7)) * scale).astype(F32)
    ref(torch.from_numpy(x.copy()))
    stats = update_stats(spec, stats, x, channel_axis=1)
  _assert_stats_equal(stats, ref, f"{observer} ch_axis=1")
  want = ref.calculate_qparams()
  got = calculate_stats_qparams(spec, stats)
  np.testing.assert_array_equal(np.asarray(got[0]), want[0].numpy())
  np.testing.assert_array_equal(np.asarray(got[1]), want[1].numpy())


def test_histogram_observer_drops_inf_like_torch():
  spec = SPECS["histogram-quint8-affine-reduce-x86"]
  x = np.random.default_rng(6).standard_normal((8, IN)).astype(F32)
  x[2, 3], x[4, 5] = np.inf, -np.inf
  ref = torch_observer(spec)
  ref(torch.from_numpy(x.copy()))
  stats = update_stats(spec, initial_stats(spec), x)
  _assert_stats_equal(stats, ref, "histogram with inf")


# ----------------------------------------------------------------------------
# The module: when statistics change, and fake quantization.
# ----------------------------------------------------------------------------


def test_stats_are_not_updated_during_init_or_when_immutable():
  spec = SPECS["minmax-quint8-affine"]
  x = jnp.linspace(-1.0, 3.0, 32).reshape(4, 8)
  observer = Observer(spec)
  variables = observer.init(jax.random.PRNGKey(0), x)
  stats = variables[STATS_COLLECTION]
  assert float(stats["min_val"]) == np.inf and float(stats["max_val"]) == -np.inf
  y = observer.apply(variables, x)  # quant_stats not mutable: frozen
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  _, updated = observer.apply(variables, x, mutable=[STATS_COLLECTION])
  assert float(updated[STATS_COLLECTION]["min_val"]) == -1.0
  assert float(updated[STATS_COLLECTION]["max_val"]) == 3.0


def test_histogram_and_per_channel_variables_have_torch_names_and_shapes():
  hist = Observer(SPECS["histogram-quint8-affine-reduce-x86"]).init(
      jax.random.PRNGKey(0), jnp.ones((4, 8)))[STATS_COLLECTION]
  assert set(hist) == {"min_val", "max_val", "histogram"}
  assert hist["histogram"].shape == (2048,) and hist["min_val"].shape == ()
  per_channel = Observer(SPECS["perchannel-minmax-qint8-symmetric"]).init(
      jax.random.PRNGKey(0), jnp.ones((IN, OUT)))[STATS_COLLECTION]
  assert per_channel["min_val"].shape == (OUT,) and per_channel["max_val"].shape == (OUT,)
  assert np.all(np.asarray(per_channel["min_val"]) == np.inf)


def _torch_fake_quantize(spec: QuantSpec) -> FakeQuantize:
  kwargs = dict(dtype=getattr(torch, spec.dtype), qscheme=getattr(torch, spec.qscheme),
                reduce_range=spec.reduce_range, averaging_constant=spec.averaging_constant)
  if spec.is_per_channel:
    kwargs["ch_axis"] = 0
  cls = TORCH_CLASSES[(spec.observer, spec.is_per_channel)]
  return FakeQuantize(observer=cls, quant_min=spec.quant_min, quant_max=spec.quant_max, **kwargs)


@pytest.mark.parametrize(
    "name", ["movavg-quint8-affine-qat-x86", "perchannel-movavg-qint8-symmetric-qat"])
def test_fake_quant_observer_matches_torch_fake_quantize(name):
  """Observe, then fake-quantize with the fresh qparams; gradients by the STE mask."""
  spec = SPECS[name]
  ref = _torch_fake_quantize(spec)
  observer = Observer(spec, fake_quant=True)
  batches = _batches(11, spec.is_per_channel)
  variables = observer.init(jax.random.PRNGKey(0), _ours(batches[0], spec))
  stats_only = {k: v for k, v in variables.items() if k == STATS_COLLECTION}

  @jax.jit
  def step(stats, x, g):
    # apply returns (y, updated stats): the stats ride along as vjp's aux output.
    y, vjp, new_stats = jax.vjp(
        lambda v: observer.apply(stats, v, mutable=[STATS_COLLECTION]), x, has_aux=True)
    return y, new_stats, vjp(g)[0]

  rng = np.random.default_rng(12)
  for i, x in enumerate(batches):
    x = x * 3  # wide enough that the previous qparams clip some values
    g = rng.standard_normal(x.shape).astype(F32)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = ref(xt)
    yt.backward(torch.from_numpy(g))
    y, stats_only, gx = step(stats_only, _ours(x, spec), _ours(g, spec))
    where = f"{name}, batch {i}"
    np.testing.assert_array_equal(np.asarray(y), _ours(yt.detach().numpy(), spec), err_msg=where)
    np.testing.assert_array_equal(np.asarray(gx), _ours(xt.grad.numpy(), spec),
                                  err_msg=f"{where}: gradient")
  # Frozen: the observer is disabled in torch; our stats are simply not mutable.
  ref.disable_observer()
  x = batches[0] * 5
  want = ref(torch.from_numpy(x.copy())).detach().numpy()
  got = jax.jit(observer.apply)(stats_only, _ours(x, spec))
  np.testing.assert_array_equal(np.asarray(got), _ours(want, spec), err_msg=f"{name}: frozen")


def test_qat_default_matches_torch_fused_module_to_one_ulp():
  # torch's QAT default uses the fused op, which picks qparams in double precision;
  # we follow the float32 observers, so scales may differ by one float32 ulp.
  qconfig = get_default_qat_qconfig("x86")
  ref = torch.ao.quantization.get_default_qat_qconfig("x86").activation()
  assert isinstance(ref, FusedMovingAvgObsFakeQuantize)
  observer = Observer(qconfig.activation, fake_quant=True)
  x0 = _batches(13, False)[0]
  variables = observer.init(jax.random.PRNGKey(0), x0)
  step = _observe_step(observer)
  for i, x in enumerate(_batches(13, False)):
    ref(torch.from_numpy(x.copy()))
    _, variables = step(variables, x)
    got, _ = calculate_stats_qparams(qconfig.activation, variables[STATS_COLLECTION])
    want = ref.scale.item()
    assert abs(float(got) - want) <= np.spacing(F32(want)), f"batch {i}: {float(got)} vs {want}"


# ----------------------------------------------------------------------------
# QuantSpec / QConfig / presets.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_presets_match_torch_qconfigs(backend, qat):
  ours = get_default_qat_qconfig(backend) if qat else get_default_qconfig(backend)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs = (torch.ao.quantization.get_default_qat_qconfig(backend) if qat
              else torch.ao.quantization.get_default_qconfig(backend))
    modules = {"activation": theirs.activation(), "weight": theirs.weight()}
  assert ours.fake_quant == qat
  for field, module in modules.items():
    spec = getattr(ours, field)
    where = f"{backend}/{'qat' if qat else 'ptq'}/{field}"
    assert isinstance(module, FakeQuantizeBase) == ours.fake_quant, where
    obs = getattr(module, "activation_post_process", module)
    assert type(obs) is TORCH_CLASSES[(spec.observer, spec.is_per_channel)], where
    assert obs.dtype == getattr(torch, spec.dtype), where
    assert obs.qscheme == getattr(torch, spec.qscheme), where
    assert (obs.quant_min, obs.quant_max) == spec.quant_range, where
    assert obs.reduce_range == spec.reduce_range, where
    assert obs.has_customized_qrange == spec.has_customized_qrange, where
    assert obs.eps.item() == float(F32(spec.eps)), where
    if spec.observer == "moving_average_minmax":
      assert obs.averaging_constant == spec.averaging_constant, where
    if spec.observer == "histogram":
      assert obs.bins == spec.bins, where
    if spec.is_per_channel:
      assert obs.ch_axis == 0, where  # torch's [out, in]; ours is channel_axis=-1 of [in, out]


@pytest.mark.parametrize("fn", [get_default_qconfig, get_default_qat_qconfig])
def test_unknown_backend_lists_valid_ones(fn):
  with pytest.raises(ValueError, match=r"backend must be one of \['x86', 'fbgemm', 'qnnpack'"):
    fn("tpu")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(observer="ema"), ValueError, "observer must be one of"),
        (dict(dtype="int8"), ValueError, "dtype must be one of"),
        (dict(qscheme="per_tensor"), ValueError, "qscheme must be one of"),
        (dict(observer="histogram", qscheme="per_channel_affine"), ValueError,
         "per-channel but observer 'histogram'"),
        (dict(quant_min=0), ValueError, "both quant_min and quant_max"),
        (dict(quant_min=10, quant_max=5), ValueError, "quant_min must be < quant_max"),
        (dict(quant_min=1, quant_max=5), ValueError, "must contain 0"),
        (dict(quant_min=0, quant_max=300), ValueError, "within dtype 'quint8'"),
        (dict(dtype="qint8", quant_min=-200, quant_max=100), ValueError, "within dtype 'qint8'"),
        (dict(quant_min=0.0, quant_max=255), TypeError, "quant_min must be an int"),
        (dict(reduce_range=1), TypeError, "reduce_range must be a bool"),
        (dict(qscheme="per_tensor_symmetric", reduce_range=True), ValueError,
         "symmetric qscheme and dtype 'quint8'"),
        (dict(averaging_constant=0.0), ValueError, "averaging_constant must be in"),
        (dict(averaging_constant=1.5), ValueError, "averaging_constant must be in"),
        (dict(eps=0.0), ValueError, "eps must be a positive"),
        (dict(bins=1), ValueError, "bins must be an int >= 2"),
    ],
    ids=["observer", "dtype", "qscheme", "histogram-per-channel", "one-bound", "empty-range",
         "no-zero", "range-outside-quint8", "range-outside-qint8", "float-bound",
         "int-reduce-range", "symmetric-quint8-reduce", "zero-averaging", "big-averaging",
         "eps", "bins"],
)
def test_quant_spec_validation(kwargs, error, match):
  args = dict(observer="minmax", dtype="quint8", qscheme="per_tensor_affine")
  args.update(kwargs)
  with pytest.raises(error, match=match):
    QuantSpec(**args)


def test_quant_spec_is_frozen_and_keyword_only():
  spec = SPECS["minmax-quint8-affine"]
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.dtype = "qint8"
  with pytest.raises(TypeError):
    QuantSpec("minmax", "quint8", "per_tensor_affine")  # positional: refused
  assert spec.quant_range == (0, 255) and not spec.has_customized_qrange
  qat = get_default_qat_qconfig("x86")
  assert qat.activation.quant_range == (0, 127) and qat.activation.has_customized_qrange


def test_qconfig_validation():
  spec = SPECS["minmax-quint8-affine"]
  with pytest.raises(TypeError, match="activation must be a QuantSpec"):
    QConfig(activation="histogram", weight=spec, fake_quant=False)
  with pytest.raises(TypeError, match="fake_quant must be a bool"):
    QConfig(activation=spec, weight=spec, fake_quant=1)
  with pytest.raises(TypeError):
    QConfig(spec, spec, False)  # keyword-only: refused


def test_observer_and_stats_errors_name_the_problem():
  spec = SPECS["perchannel-minmax-qint8-symmetric"]
  with pytest.raises(ValueError, match="channel_axis 2 is out of range"):
    Observer(spec, channel_axis=2).init(jax.random.PRNGKey(0), jnp.ones((3, 4)))
  with pytest.raises(TypeError, match="spec must be a QuantSpec"):
    Observer("minmax").init(jax.random.PRNGKey(0), jnp.ones((3, 4)))
  with pytest.raises(TypeError, match="x must be a floating"):
    Observer(SPECS["minmax-quint8-affine"]).init(jax.random.PRNGKey(0), jnp.ones(3, jnp.int32))
  stats = initial_stats(spec, 4)
  with pytest.raises(ValueError, match="x has 5 channels on axis 1"):
    update_stats(spec, stats, jnp.ones((3, 5)))
  with pytest.raises(ValueError, match=r"missing \['max_val'\]"):
    calculate_stats_qparams(spec, {"min_val": stats["min_val"]})
  with pytest.raises(ValueError, match="must be vectors"):
    calculate_stats_qparams(spec, {"min_val": 0.0, "max_val": 1.0})
  with pytest.raises(ValueError, match="needs num_channels"):
    initial_stats(spec)
