"""Quantization ranges, qparams and real quantization against torch, bit for bit."""

from __future__ import annotations

import warnings
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver
from torch.ao.quantization.utils import calculate_qmin_qmax

from flax_qmha._qparams import (
    FLOAT32_EPS,
    calculate_qparams,
    dequantize,
    fma_f32,
    quant_range,
    quantize,
    true_divide,
    unfused,
)

F32 = np.float32
TORCH_DTYPES = {"quint8": torch.quint8, "qint8": torch.qint8, "qint32": torch.qint32}

pytestmark = pytest.mark.filterwarnings(
    "ignore:Please use quant_min and quant_max:UserWarning",
    "ignore:must run observer before calling calculate_qparams:UserWarning",
    "ignore:.*quantized tensor creation functions.*:UserWarning",
)


# ----------------------------------------------------------------------------
# quant_range
# ----------------------------------------------------------------------------

RANGE_CASES = [
    ("quint8", False, None, None),
    ("quint8", True, None, None),
    ("qint8", False, None, None),
    ("qint8", True, None, None),
    ("qint32", False, None, None),
    ("qint32", True, None, None),
    ("quint8", True, 0, 255),
    ("quint8", False, 0, 15),
    ("qint8", False, -128, 127),
    ("qint8", True, -128, 127),
    ("qint8", True, -7, 7),
    ("qint8", False, -1, 5),
]


@pytest.mark.parametrize(
    "dtype, reduce_range, quant_min, quant_max", RANGE_CASES,
    ids=[f"{d}-reduce{r}-{lo}..{hi}" for d, r, lo, hi in RANGE_CASES],
)
def test_quant_range_matches_torch(dtype, reduce_range, quant_min, quant_max):
  custom = quant_min is not None
  want = calculate_qmin_qmax(quant_min, quant_max, custom, TORCH_DTYPES[dtype], reduce_range)
  assert quant_range(dtype, reduce_range, quant_min, quant_max) == tuple(want)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (("quint4", False), ValueError, "dtype must be one of"),
        (("quint8", False, 0, None), ValueError, "both quant_min and quant_max"),
        (("quint8", False, 1, 255), ValueError, "must contain 0"),
        (("qint8", False, 0, 0), ValueError, "must contain 0|quant_min must be < quant_max"),
        (("qint8", False, -129, 127), ValueError, "exceeds qint8"),
        (("quint8", False, 0, 256), ValueError, "exceeds quint8"),
        (("quint8", 1), TypeError, "reduce_range must be a bool"),
        (("quint8", False, 0.0, 255), TypeError, "quant_min must be an int"),
    ],
    ids=["unknown-dtype", "one-bound", "no-zero", "empty", "below-qint8", "above-quint8",
         "int-reduce-range", "float-bound"],
)
def test_quant_range_rejects_bad_input(args, error, match):
  with pytest.raises(error, match=match):
    quant_range(*args)


# ----------------------------------------------------------------------------
# calculate_qparams
# ----------------------------------------------------------------------------

# (dtype, symmetric, reduce_range, custom range)
QPARAM_CONFIGS = {
    "quint8-affine": ("quint8", False, False, None),
    "quint8-affine-reduce": ("quint8", False, True, None),
    "quint8-symmetric": ("quint8", True, False, None),
    "quint8-symmetric-custom0..127": ("quint8", True, False, (0, 127)),
    "qint8-affine": ("qint8", False, False, None),
    "qint8-affine-4bit": ("qint8", False, False, (-8, 7)),
    "qint8-symmetric": ("qint8", True, False, None),
    "qint8-symmetric-reduce": ("qint8", True, True, None),
    "quint8-affine-qat0..255-reduce": ("quint8", False, True, (0, 255)),
    "qint8-symmetric-qat-128..127": ("qint8", True, False, (-128, 127)),
}

EDGE_MIN_MAX = {
    "mixed": (-1.3, 2.7),
    "positive": (0.5, 3.0),
    "negative": (-4.0, -0.25),
    "all-zero": (0.0, 0.0),
    "constant-positive": (5.0, 5.0),
    "constant-negative": (-3.0, -3.0),
    "tiny": (-1e-30, 1e-30),
    "tiny-positive": (1e-30, 1e-30),
    "huge": (-1e30, 1e30),
    "huge-positive": (0.0, 1e30),
    "negative-to-zero": (-2.5, 0.0),
    "negative-zero": (-0.0, 0.0),
    "half-step": (-0.5, 127.0),
}


def _torch_observer(config: str, per_channel: bool):
  dtype, symmetric, reduce_range, custom = QPARAM_CONFIGS[config]
  kind = "per_channel" if per_channel else "per_tensor"
  qscheme = getattr(torch, f"{kind}_{'symmetric' if symmetric else 'affine'}")
  cls = PerChannelMinMaxObserver if per_channel else MinMaxObserver
  quant_min, quant_max = custom if custom else (None, None)
  return cls(dtype=TORCH_DTYPES[dtype], qscheme=qscheme, reduce_range=reduce_range,
             quant_min=quant_min, quant_max=quant_max), qscheme


def _ours(config: str, min_val, max_val, per_channel: bool):
  dtype, symmetric, reduce_range, custom = QPARAM_CONFIGS[config]
  quant_min, quant_max = quant_range(dtype, reduce_range, *(custom or (None, None)))
  kind = "per_channel" if per_channel else "per_tensor"
  return calculate_qparams(
      min_val, max_val, quant_min=quant_min, quant_max=quant_max,
      qscheme=f"{kind}_{'symmetric' if symmetric else 'affine'}", dtype=dtype,
      has_customized_qrange=custom is not None)


@pytest.mark.parametrize("config", list(QPARAM_CONFIGS))
def test_per_tensor_qparams_match_torch_on_edge_cases(config):
  obs, _ = _torch_observer(config, per_channel=False)
  fn = jax.jit(lambda a, b: _ours(config, a, b, per_channel=False))
  for name, (lo, hi) in EDGE_MIN_MAX.items():
    want_s, want_z = obs._calculate_qparams(torch.tensor(lo), torch.tensor(hi))
    got_s, got_z = fn(F32(lo), F32(hi))
    assert got_s.shape == () and got_s.dtype == jnp.float32 and got_z.dtype == jnp.int32
    assert float(got_s) == want_s.item() and int(got_z) == want_z.item(), (
        f"{config}/{name}: got ({float(got_s)!r}, {int(got_z)}), torch"
        f" ({want_s.item()!r}, {want_z.item()})")


@pytest.mark.parametrize("config", list(QPARAM_CONFIGS))
def test_per_channel_qparams_match_torch_on_random_ranges(config):
  rng = np.random.default_rng(abs(hash(config)) % 2**32)
  n = 512
  lo = -np.abs(rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 3, n)).astype(F32)
  hi = np.abs(rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 3, n)).astype(F32)
  lo[:50] = 0.0  # positive-only channels
  hi[50:100] = 0.0  # negative-only channels
  lo[100:110] = hi[100:110] = 0.0  # all-zero channels
  obs, _ = _torch_observer(config, per_channel=True)
  want_s, want_z = obs._calculate_qparams(torch.from_numpy(lo), torch.from_numpy(hi))
  got_s, got_z = jax.jit(lambda a, b: _ours(config, a, b, per_channel=True))(lo, hi)
  np.testing.assert_array_equal(np.asarray(got_s), want_s.numpy(), err_msg=f"{config}: scales")
  np.testing.assert_array_equal(np.asarray(got_z), want_z.numpy(), err_msg=f"{config}: zero points")


def test_qparams_under_vmap_match_unbatched():
  rng = np.random.default_rng(7)
  lo = -np.abs(rng.standard_normal((3, 16))).astype(F32)
  hi = np.abs(rng.standard_normal((3, 16))).astype(F32)
  batched = jax.vmap(lambda a, b: _ours("quint8-affine", a, b, per_channel=True))(lo, hi)
  for i in range(3):
    single = _ours("quint8-affine", lo[i], hi[i], per_channel=True)
    for k, what in enumerate(("scale", "zero point")):
      np.testing.assert_array_equal(np.asarray(batched[k][i]), np.asarray(single[k]),
                                    err_msg=f"row {i}: {what}")


def test_never_observed_gives_torch_defaults():
  obs, _ = _torch_observer("quint8-affine", per_channel=False)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want_s, want_z = obs.calculate_qparams()  # min_val=+inf, max_val=-inf
  got_s, got_z = _ours("quint8-affine", np.inf, -np.inf, per_channel=False)
  assert (float(got_s), int(got_z)) == (want_s.item(), want_z.item()) == (1.0, 0)
  # Per channel, each unobserved channel gets the defaults.
  got_s, got_z = _ours("qint8-symmetric", [np.inf, -1.0], [-np.inf, 2.0], per_channel=True)
  assert float(got_s[0]) == 1.0 and int(got_z[0]) == 0
  assert float(got_s[1]) == float(F32(2.0) / F32(127.5))


def test_min_above_max_gives_defaults_where_torch_raises():
  obs, _ = _torch_observer("quint8-affine", per_channel=False)
  with pytest.raises(AssertionError):
    obs._calculate_qparams(torch.tensor(2.0), torch.tensor(1.0))
  got_s, got_z = _ours("quint8-affine", [2.0, np.nan], [1.0, 1.0], per_channel=True)
  np.testing.assert_array_equal(np.asarray(got_s), [1.0, 1.0])
  np.testing.assert_array_equal(np.asarray(got_z), [0, 0])


def test_eps_floor_is_float32_eps():
  s, z = calculate_qparams(0.0, 0.0, quant_min=0, quant_max=255, qscheme="per_tensor_affine",
                           dtype="quint8")
  assert float(s) == FLOAT32_EPS and int(z) == 0
  s, _ = calculate_qparams(0.0, 0.0, quant_min=0, quant_max=255, qscheme="per_tensor_affine",
                           dtype="quint8", eps=1e-3)
  assert float(s) == float(F32(1e-3))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(qscheme="per_tensor"), ValueError, "qscheme must be one of"),
        (dict(dtype="int8"), ValueError, "dtype must be one of"),
        (dict(quant_min=10, quant_max=10), ValueError, "quant_min must be < quant_max"),
        (dict(eps=0.0), ValueError, "eps must be a positive float"),
        (dict(max_val=np.ones(3, F32)), ValueError, "same shape"),
    ],
    ids=["qscheme", "dtype", "range", "eps", "shapes"],
)
def test_calculate_qparams_rejects_bad_input(kwargs, error, match):
  args = dict(min_val=np.zeros(2, F32), max_val=np.ones(2, F32), quant_min=0, quant_max=255,
              qscheme="per_channel_affine", dtype="quint8")
  args.update(kwargs)
  with pytest.raises(error, match=match):
    calculate_qparams(**args)


# ----------------------------------------------------------------------------
# quantize / dequantize
# ----------------------------------------------------------------------------


def _tie_inputs(scale: float, zero_point: int, quant_min: int, quant_max: int, n: int, seed: int):
  rng = np.random.default_rng(seed)
  s = np.float64(F32(scale))
  k = rng.integers(quant_min - zero_point - 10, quant_max - zero_point + 10, n)
  ties = ((k + 0.5) * s).astype(F32)
  x = np.concatenate([ties, np.nextafter(ties, F32(np.inf)), np.nextafter(ties, F32(-np.inf)),
                      (rng.standard_normal(n) * (quant_max - quant_min) * s / 4).astype(F32)])
  return rng.permutation(x)


QUANTIZE_CASES = {
    "quint8-s0.0123-zp7": ("quint8", 0.0123, 7),
    "quint8-s0.1-zp128": ("quint8", 0.1, 128),
    "quint8-s1/3-zp255": ("quint8", 1 / 3, 255),
    "qint8-s0.02-zp-3": ("qint8", 0.02, -3),
    "qint8-s0.037-zp0": ("qint8", 0.037, 0),
    "qint32-s0.02-zp3": ("qint32", 0.02, 3),
}
STORAGE = {"quint8": jnp.uint8, "qint8": jnp.int8, "qint32": jnp.int32}


@pytest.mark.parametrize("length", [4096, 7], ids=["vector-body", "scalar-tail"])
@pytest.mark.parametrize("case", list(QUANTIZE_CASES))
def test_quantize_per_tensor_matches_torch(case, length):
  dtype, scale, zp = QUANTIZE_CASES[case]
  quant_min, quant_max = quant_range(dtype)
  x = _tie_inputs(scale, zp, max(quant_min, -300), min(quant_max, 300), 1024, seed=11)[:length]
  x = np.concatenate([x, np.array([np.inf, -np.inf, 1e30, -1e30], F32)])
  qt = torch.quantize_per_tensor(torch.from_numpy(x), float(F32(scale)), zp, TORCH_DTYPES[dtype])
  fn = jax.jit(lambda v: quantize(v, F32(scale), zp, quant_min, quant_max, dtype=STORAGE[dtype]))
  got = fn(x)
  assert got.dtype == STORAGE[dtype]
  np.testing.assert_array_equal(np.asarray(got), qt.int_repr().numpy(),
                                err_msg=f"{case}/{length}: quantized values differ")
  # torch computes qint32's q - zero_point in int32, wrapping around at the
  # saturated ends (-2**31 - 3 > 0); we do not copy that, so compare without them.
  keep = slice(None) if dtype != "qint32" else slice(0, -4)
  np.testing.assert_array_equal(np.asarray(dequantize(got, F32(scale), zp))[keep],
                                qt.dequantize().numpy()[keep],
                                err_msg=f"{case}: dequantize differs")


@pytest.mark.parametrize("dtype", ["quint8", "qint8", "qint32"])
def test_quantize_nan_goes_where_torch_sends_it(dtype):
  x = np.array([np.nan] * 19 + [0.25], F32)
  quant_min, quant_max = quant_range(dtype)
  want = torch.quantize_per_tensor(torch.from_numpy(x), 0.1, 3, TORCH_DTYPES[dtype]).int_repr()
  got = quantize(x, F32(0.1), 3, quant_min, quant_max, dtype=STORAGE[dtype])
  np.testing.assert_array_equal(np.asarray(got), want.numpy())
  want_c = torch.quantize_per_channel(torch.from_numpy(x)[None], torch.tensor([0.1]),
                                      torch.tensor([3]), 0, TORCH_DTYPES[dtype]).int_repr()
  got_c = quantize(x[None], np.array([0.1], F32), np.array([3]), quant_min, quant_max, axis=0,
                   dtype=STORAGE[dtype])
  np.testing.assert_array_equal(np.asarray(got_c), want_c.numpy())


def test_eight_bit_values_stored_in_int32_round_like_quint8():
  x = _tie_inputs(0.0123, 7, 0, 255, 2048, seed=12)
  want = torch.quantize_per_tensor(torch.from_numpy(x), float(F32(0.0123)), 7, torch.quint8)
  got = quantize(x, F32(0.0123), 7, 0, 255, dtype=jnp.int32)
  np.testing.assert_array_equal(np.asarray(got), want.int_repr().numpy().astype(np.int32))


@pytest.mark.parametrize("layout", ["axis0", "axis-1"])
@pytest.mark.parametrize("dtype", ["quint8", "qint8", "qint32"])
def test_quantize_per_channel_matches_torch(dtype, layout):
  quant_min, quant_max = quant_range(dtype)
  scales = np.array([0.0123, 0.1, 1 / 3, 0.02], F32)
  zps = np.array([7, 128, 3, 0]) if dtype == "quint8" else np.array([-3, 0, 5, 1])
  x = np.stack([_tie_inputs(s, z, max(quant_min, -300), min(quant_max, 300), 512, seed=20 + i)
                for i, (s, z) in enumerate(zip(scales, zps))])  # [C, N]
  qt = torch.quantize_per_channel(torch.from_numpy(x), torch.from_numpy(scales.astype(np.float64)),
                                  torch.from_numpy(zps), 0, TORCH_DTYPES[dtype])
  if layout == "axis0":
    got = quantize(x, scales, zps, quant_min, quant_max, axis=0, dtype=STORAGE[dtype])
    deq = dequantize(got, scales, zps, axis=0)
  else:
    got = quantize(x.T, scales, zps, quant_min, quant_max, axis=-1, dtype=STORAGE[dtype]).T
    deq = dequantize(got.T, scales, zps, axis=1).T
  np.testing.assert_array_equal(np.asarray(got), qt.int_repr().numpy(), err_msg=f"{dtype}/{layout}")
  np.testing.assert_array_equal(np.asarray(deq), qt.dequantize().numpy(),
                                err_msg=f"{dtype}/{layout}: dequantize")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dtype=jnp.int16), TypeError, "dtype must be int8, uint8 or int32"),
        (dict(quant_min=-128, quant_max=127, dtype=jnp.uint8), ValueError, "does not fit"),
        (dict(x=np.arange(3)), TypeError, "x must be a floating"),
        (dict(scale=np.ones(3, F32)), ValueError, "scale must be a scalar"),
        (dict(axis=1), ValueError, "axis 1 is out of range"),
    ],
    ids=["storage", "range-vs-storage", "int-x", "vector-scale", "axis"],
)
def test_quantize_rejects_bad_input(kwargs, error, match):
  args = dict(x=np.ones(3, F32), scale=F32(0.1), zero_point=0, quant_min=0, quant_max=255,
              dtype=jnp.uint8)
  args.update(kwargs)
  with pytest.raises(error, match=match):
    quantize(**args)


def test_dequantize_rejects_float_input():
  with pytest.raises(TypeError, match="q must be an integer array"):
    dequantize(np.ones(3, F32), 0.1, 0)


# ----------------------------------------------------------------------------
# Exact-arithmetic helpers: XLA's rewrites must not leak into the numerics.
# ----------------------------------------------------------------------------


def _nearest_f32(value: Fraction) -> np.float32:
  x = F32(float(value))
  cands = [np.nextafter(x, F32(-np.inf)), x, np.nextafter(x, F32(np.inf))]
  return min(cands, key=lambda c: (abs(Fraction(float(c)) - value),
                                   int(np.frombuffer(c.tobytes(), np.uint32)[0]) & 1))


def test_fma_f32_rounds_once():
  rng = np.random.default_rng(0)
  n = 3000
  a = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 6, n)).astype(F32)
  b = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 6, n)).astype(F32)
  c = (-(a.astype(np.float64) * b) * (1 + rng.standard_normal(n) * 1e-6)).astype(F32)
  c[::3] = rng.standard_normal(len(c[::3])).astype(F32)  # and without cancellation
  got = np.asarray(jax.jit(fma_f32)(a, b, c))
  want = np.array([_nearest_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                   for x, y, z in zip(a, b, c)], F32)
  np.testing.assert_array_equal(got, want)


def test_true_divide_is_ieee_under_jit_and_vmap():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((64, 64)).astype(F32)
  s = F32(0.0123457)
  want = a / s  # numpy: correctly rounded float32 division
  np.testing.assert_array_equal(np.asarray(jax.jit(true_divide)(a, s)), want)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(jax.vmap(true_divide, in_axes=(0, None)))(a, s)), want)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda x: true_divide(x, jnp.float32(3)))(a)), a / F32(3))


def test_unfused_keeps_products_rounded():
  rng = np.random.default_rng(2)
  a, b, c = (rng.standard_normal(4096).astype(F32) for _ in range(3))
  want = a * b + c  # numpy rounds the product first, as torch does
  got = np.asarray(jax.jit(lambda x, y, z: unfused(x * y) + z)(a, b, c))
  np.testing.assert_array_equal(got, want)
  nan = np.asarray(unfused(jnp.array([np.nan, np.inf, -0.0], jnp.float32)))
  assert np.isnan(nan[0]) and nan[1] == np.inf and np.signbit(nan[2])
