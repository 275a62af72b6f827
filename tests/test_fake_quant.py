"""fake_quantize against torch.fake_quantize_per_{tensor,channel}_affine, bit for bit.

Inputs are built to hit the hard cases: values that land exactly on k + 0.5 after
scaling (round half to even), their float32 neighbours, values at and beyond the
clip edges, and ordinary random values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_qmha._fake_quant import fake_quantize

F32 = np.float32

# (scale, zero_point, quant_min, quant_max): quint8, quint8 with reduce_range,
# qint8, qint8 with reduce_range, and a custom 4-bit range.
CASES = {
    "quint8-s0.0123-zp7": (0.0123, 7, 0, 255),
    "quint8-s0.1-zp128": (0.1, 128, 0, 255),
    "quint8_reduced-s0.37-zp60": (0.37, 60, 0, 127),
    "qint8-s0.037-zp0": (0.037, 0, -128, 127),
    "qint8-s1/3-zp-3": (1 / 3, -3, -128, 127),
    "qint8_reduced-s0.0021-zp5": (0.0021, 5, -64, 63),
    "custom4bit-s0.5-zp2": (0.5, 2, 0, 15),
    "quint8-s1e-06-zp0": (1e-6, 0, 0, 255),
}


def _inputs(scale: float, zero_point: int, quant_min: int, quant_max: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  s = np.float64(F32(scale))
  k = rng.integers(quant_min - zero_point - 20, quant_max - zero_point + 20, 600)
  ties = ((k + 0.5) * s).astype(F32)  # x * (1/scale) lands on (or next to) .5
  edges = (np.array([quant_min - zero_point, quant_max - zero_point], np.float64) * s).astype(F32)
  beyond = np.array([quant_min - zero_point - 3, quant_max - zero_point + 3, -1e4, 1e4]) * s
  beyond = beyond.astype(F32)
  randn = (rng.standard_normal(400) * (quant_max - quant_min) * s / 3).astype(F32)
  x = np.concatenate([
      ties, np.nextafter(ties, F32(np.inf)), np.nextafter(ties, F32(-np.inf)),
      edges, np.nextafter(edges, F32(np.inf)), np.nextafter(edges, F32(-np.inf)),
      beyond, randn, np.zeros(1, F32), -np.zeros(1, F32),
  ])
  return rng.permutation(x).astype(F32)


def _torch_per_tensor(x, g, scale, zero_point, quant_min, quant_max):
  xt = torch.from_numpy(x.copy()).requires_grad_(True)
  yt = torch.fake_quantize_per_tensor_affine(
      xt, float(F32(scale)), zero_point, quant_min, quant_max)
  yt.backward(torch.from_numpy(g))
  return yt.detach().numpy(), xt.grad.numpy()


def _jax_value_and_grad(fn, x, g):
  y, vjp = jax.vjp(fn, jnp.asarray(x))
  (gx,) = vjp(jnp.asarray(g))
  return np.asarray(y), np.asarray(gx)


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_per_tensor_matches_torch(case, use_jit):
  scale, zero_point, quant_min, quant_max = CASES[case]
  x = _inputs(scale, zero_point, quant_min, quant_max, seed=1)
  # NaN and +-inf: torch's per-tensor kernel clamps them like we do.
  x = np.concatenate([x, np.array([np.nan, np.inf, -np.inf], F32)])
  g = np.random.default_rng(2).standard_normal(x.shape).astype(F32)
  want_y, want_g = _torch_per_tensor(x, g, scale, zero_point, quant_min, quant_max)

  def fn(v):
    return fake_quantize(v, F32(scale), zero_point, quant_min, quant_max)

  got_y, got_g = _jax_value_and_grad(jax.jit(fn) if use_jit else fn, x, g)
  np.testing.assert_array_equal(got_y, want_y, err_msg=f"{case}: forward differs from torch")
  np.testing.assert_array_equal(got_g, want_g, err_msg=f"{case}: gradient differs from torch")
  # The inputs do contain exact ties and values clipped at both ends.
  scaled = x[np.isfinite(x)] * (F32(1) / F32(scale))
  assert np.sum(scaled - np.floor(scaled) == 0.5) > 50, f"{case}: too few exact .5 ties"
  assert (want_g == 0).sum() > 5 and (want_g != 0).sum() > 100, case


@pytest.mark.parametrize("layout", ["axis0", "axis-1"])
@pytest.mark.parametrize("case", list(CASES)[:6], ids=list(CASES)[:6])
def test_per_channel_matches_torch(case, layout):
  scale, zero_point, quant_min, quant_max = CASES[case]
  channels = 4
  x = np.stack([_inputs(scale * (1 + c), zero_point, quant_min, quant_max, seed=10 + c)
                for c in range(channels)])  # [C, N], torch's ch_axis=0 layout
  scales = np.array([scale * (1 + c) for c in range(channels)], F32)
  zero_points = np.clip(np.array([zero_point + c for c in range(channels)]), quant_min, quant_max)
  g = np.random.default_rng(3).standard_normal(x.shape).astype(F32)

  xt = torch.from_numpy(x.copy()).requires_grad_(True)
  yt = torch.fake_quantize_per_channel_affine(
      xt, torch.from_numpy(scales), torch.from_numpy(zero_points.astype(np.int32)), 0,
      quant_min, quant_max)
  yt.backward(torch.from_numpy(g))
  want_y, want_g = yt.detach().numpy(), xt.grad.numpy()

  if layout == "axis0":
    fn = jax.jit(lambda v: fake_quantize(v, scales, zero_points, quant_min, quant_max, axis=0))
    got_y, got_g = _jax_value_and_grad(fn, x, g)
  else:  # our kernels are [in, out] with the channel last
    fn = jax.jit(lambda v: fake_quantize(v, scales, zero_points, quant_min, quant_max, axis=-1))
    got_y, got_g = _jax_value_and_grad(fn, x.T, g.T)
    got_y, got_g = got_y.T, got_g.T
  np.testing.assert_array_equal(got_y, want_y, err_msg=f"{case}/{layout}: forward differs")
  np.testing.assert_array_equal(got_g, want_g, err_msg=f"{case}/{layout}: gradient differs")


def test_per_tensor_accepts_shape_1_qparams_like_torch_observers():
  x = _inputs(0.05, 3, 0, 255, seed=4)
  a = fake_quantize(x, np.array([0.05], F32), np.array([3], np.int32), 0, 255)
  b = fake_quantize(x, F32(0.05), 3, 0, 255)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs_match_torch(dtype):
  scale, zp = F32(0.0123), 7
  x32 = _inputs(0.0123, zp, 0, 255, seed=5)
  torch_dtype = getattr(torch, dtype)
  xt = torch.from_numpy(x32).to(torch_dtype)
  want = torch.fake_quantize_per_tensor_affine(xt, float(scale), zp, 0, 255).float().numpy()
  xj = jnp.asarray(xt.float().numpy()).astype(getattr(jnp, dtype))
  got = fake_quantize(xj, scale, zp, 0, 255)
  assert got.dtype == xj.dtype, "fake_quantize must return x.dtype"
  np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want,
                                err_msg=f"{dtype}: forward differs from torch")


def test_no_gradient_to_scale_or_zero_point():
  x = jnp.asarray(_inputs(0.1, 5, 0, 255, seed=6))

  def loss(scale, zp):
    return jnp.sum(fake_quantize(x, scale, zp, 0, 255) ** 2)

  g_scale, g_zp = jax.grad(loss, argnums=(0, 1))(jnp.float32(0.1), jnp.float32(5.0))
  assert float(g_scale) == 0.0 and float(g_zp) == 0.0


def test_straight_through_mask_under_jit_and_grad():
  scale, zp = F32(0.5), 10
  # q = rint(x / 0.5) + 10: inside [0, 20] for x in [-5, 5].
  x = jnp.array([-7.0, -5.0, -5.25, -4.9, 0.0, 3.3, 5.0, 5.25, 9.0, np.nan], jnp.float32)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(fake_quantize(v, scale, zp, 0, 20))))(x)
  np.testing.assert_array_equal(
      np.asarray(grad), np.array([0, 1, 1, 1, 1, 1, 1, 1, 0, 0], F32),
      err_msg="gradient must pass exactly where quant_min <= q <= quant_max")


def test_vmap_matches_loop():
  xs = np.stack([_inputs(0.02, 4, 0, 255, seed=s)[:500] for s in range(3)])
  scales = np.array([0.02, 0.03, 0.05], F32)
  zps = np.array([4, 0, 9], np.int32)
  batched = jax.vmap(lambda v, s, z: fake_quantize(v, s, z, 0, 255))(xs, scales, zps)
  for i in range(3):
    np.testing.assert_array_equal(
        np.asarray(batched[i]), np.asarray(fake_quantize(xs[i], scales[i], zps[i], 0, 255)),
        err_msg=f"vmap row {i}")


def test_nan_and_inf_per_channel_saturate_instead_of_torch_overflow():
  # torch's per-channel kernel sends +inf to quant_min (int64 overflow); we
  # saturate like its per-tensor kernel. NaN goes to quant_min in both.
  x = jnp.array([[np.inf, -np.inf, np.nan, 1.0]], jnp.float32)
  y = fake_quantize(x, jnp.array([0.5], jnp.float32), jnp.array([3]), 0, 255, axis=0)
  np.testing.assert_array_equal(np.asarray(y), np.array([[126.0, -1.5, -1.5, 1.0]], F32))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=np.arange(3), scale=0.1, zero_point=0), TypeError, "x must be a floating"),
        (dict(x=np.ones(3, F32), scale=0.1, zero_point=0, quant_min=5, quant_max=5),
         ValueError, "quant_min must be < quant_max"),
        (dict(x=np.ones(3, F32), scale=0.1, zero_point=0, quant_min=0.0), TypeError,
         "quant_min must be an int"),
        (dict(x=np.ones(3, F32), scale=np.ones(2, F32), zero_point=0), ValueError,
         "scale must be a scalar"),
        (dict(x=np.ones((2, 3), F32), scale=np.ones(2, F32), zero_point=np.zeros(2), axis=1),
         ValueError, r"shape \(3,\)"),
        (dict(x=np.ones((2, 3), F32), scale=np.ones(2, F32), zero_point=np.zeros(2), axis=2),
         ValueError, "axis 2 is out of range"),
        (dict(x=np.ones(3, F32), scale=1, zero_point=0), TypeError, "scale must be floating"),
    ],
    ids=["int-x", "empty-range", "float-bound", "vector-scale-per-tensor",
         "wrong-channel-count", "bad-axis", "int-scale"],
)
def test_bad_arguments_raise(kwargs, error, match):
  kwargs = {"quant_min": 0, "quant_max": 255, **kwargs}
  with pytest.raises(error, match=match):
    fake_quantize(**kwargs)
