"""Quantization parameters and real (integer) quantization, as pure functions.

Reproduces ``torch.ao.quantization``'s choices bit for bit on CPU float32:
the quantization ranges of ``calculate_qmin_qmax``, the scale / zero point of
``UniformQuantizationObserverBase._calculate_qparams``, and the rounding of
``torch.quantize_per_tensor`` / ``quantize_per_channel`` / ``dequantize``.

Everything here is jit-able ``jax.numpy``; Python-level arguments (dtype names,
ranges, qschemes) are static and validated eagerly.

The module also holds small error-free float32 transforms (``two_sum``,
``two_prod``, ``fma_f32``): torch's CPU kernels are compiled with fused
multiply-adds in places (``quantize_per_tensor``, ``linspace``), XLA has no FMA
primitive, and these let us round ``a * b + c`` once, exactly as the hardware does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FLOAT32_EPS",
    "DTYPES",
    "QSCHEMES",
    "quant_range",
    "calculate_qparams",
    "quantize",
    "dequantize",
    "true_divide",
    "unfused",
    "fma_f32",
]

FLOAT32_EPS = float(np.finfo(np.float32).eps)

# Bounds of each torch quantized dtype: (min, max) of the full integer range.
DTYPES: dict[str, tuple[int, int]] = {
    "quint8": (0, 255),
    "qint8": (-128, 127),
    "qint32": (-(2**31), 2**31 - 1),
}

QSCHEMES = (
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_dtype_name(dtype, owner: str) -> None:
  if dtype not in DTYPES:
    raise ValueError(f"{owner}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def quant_range(
    dtype: str,
    reduce_range: bool = False,
    quant_min: int | None = None,
    quant_max: int | None = None,
) -> tuple[int, int]:
  """The effective integer range torch's observers use (``calculate_qmin_qmax``).

  Without a custom range: quint8 0..255 (0..127 with ``reduce_range``), qint8
  -128..127 (-64..63), qint32 the full int32 range (``reduce_range`` ignored, as
  in torch). With a custom range (both bounds given) it must contain 0 and fit in
  the dtype; ``reduce_range`` then halves both bounds with floor division, the
  torch quirk that turns QAT's ``quant_min=0, quant_max=255, reduce_range=True``
  into 0..127.

  Args:
    dtype: ``"quint8"``, ``"qint8"`` or ``"qint32"``.
    reduce_range: drop one bit of range (x86 / fbgemm activations).
    quant_min: custom lower bound, or None.
    quant_max: custom upper bound, or None.

  Returns:
    ``(quant_min, quant_max)`` as Python ints.

  Raises:
    ValueError: unknown dtype, only one bound given, a range that does not contain
      0, is empty, or exceeds the dtype.
  """
  _check_dtype_name(dtype, "quant_range")
  if not isinstance(reduce_range, (bool, np.bool_)):
    raise TypeError(f"quant_range: reduce_range must be a bool, got {reduce_range!r}")
  if (quant_min is None) != (quant_max is None):
    raise ValueError(
        "quant_range: give both quant_min and quant_max or neither, got"
        f" quant_min={quant_min!r}, quant_max={quant_max!r}"
    )
  if quant_min is None:
    if dtype == "qint32":
      return DTYPES["qint32"]
    if dtype == "qint8":
      return (-64, 63) if reduce_range else (-128, 127)
    return (0, 127) if reduce_range else (0, 255)
  for name, value in (("quant_min", quant_min), ("quant_max", quant_max)):
    if not _is_int(value):
      raise TypeError(f"quant_range: {name} must be an int, got {value!r}")
  quant_min, quant_max = int(quant_min), int(quant_max)
  if not quant_min <= 0 <= quant_max:
    raise ValueError(
        f"quant_range: the custom range must contain 0, got quant_min={quant_min},"
        f" quant_max={quant_max}"
    )
  if quant_min >= quant_max:
    raise ValueError(
        f"quant_range: quant_min must be < quant_max, got {quant_min} >= {quant_max}"
    )
  lo, hi = DTYPES[dtype]
  if quant_min < lo or quant_max > hi:
    raise ValueError(
        f"quant_range: custom range [{quant_min}, {quant_max}] exceeds {dtype}'s"
        f" [{lo}, {hi}]"
    )
  if reduce_range:
    quant_min, quant_max = quant_min // 2, quant_max // 2
  return quant_min, quant_max


def _check_range(quant_min, quant_max, owner: str) -> tuple[int, int]:
  for name, value in (("quant_min", quant_min), ("quant_max", quant_max)):
    if not _is_int(value):
      raise TypeError(f"{owner}: {name} must be an int, got {value!r}")
  if int(quant_min) >= int(quant_max):
    raise ValueError(
        f"{owner}: quant_min must be < quant_max, got quant_min={quant_min},"
        f" quant_max={quant_max}"
    )
  return int(quant_min), int(quant_max)


def calculate_qparams(
    min_val,
    max_val,
    *,
    quant_min: int,
    quant_max: int,
    qscheme: str,
    dtype: str,
    eps: float = FLOAT32_EPS,
    has_customized_qrange: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Scale and zero point from observed min/max, as torch's observers compute them.

  Mirrors ``UniformQuantizationObserverBase._calculate_qparams`` in float32:

  * affine: ``scale = max((max(max_val, 0) - min(min_val, 0)) / (qmax - qmin), eps)``,
    ``zero_point = clip(qmin - round_half_even(min(min_val, 0) / scale), qmin, qmax)``;
  * symmetric: ``scale = max(max(-min(min_val, 0), max(max_val, 0)) / ((qmax - qmin) / 2), eps)``,
    ``zero_point = 0``, or 128 for quint8 (``(qmin + qmax) // 2`` when the range was
    customized, like torch).

  Elements that were never observed (``min_val=+inf, max_val=-inf``) get scale 1.0
  and zero point 0, as torch returns with a warning. Torch raises for any other
  ``min_val > max_val`` (and propagates NaN); that cannot be raised under ``jit``,
  so those elements, and NaN ones, get the same defaults.

  Args:
    min_val: running minimum, scalar (per-tensor) or ``[C]`` (per-channel).
    max_val: running maximum, same shape as ``min_val``.
    quant_min: lower bound of the effective range (see ``quant_range``).
    quant_max: upper bound of the effective range.
    qscheme: one of ``QSCHEMES``; only affine vs symmetric matters here.
    dtype: ``"quint8"``, ``"qint8"`` or ``"qint32"``.
    eps: lower bound of the scale (torch's ``eps`` buffer, float32 epsilon).
    has_customized_qrange: whether the observer was given an explicit
      ``quant_min``/``quant_max`` (changes the quint8 symmetric zero point).

  Returns:
    ``(scale, zero_point)``: float32 and int32 arrays with the shape of ``min_val``.
  """
  _check_dtype_name(dtype, "calculate_qparams")
  if qscheme not in QSCHEMES:
    raise ValueError(f"calculate_qparams: qscheme must be one of {QSCHEMES}, got {qscheme!r}")
  quant_min, quant_max = _check_range(quant_min, quant_max, "calculate_qparams")
  if isinstance(eps, bool) or not isinstance(eps, (float, int, np.floating)) or not eps > 0:
    raise ValueError(f"calculate_qparams: eps must be a positive float, got {eps!r}")
  min_val = jnp.asarray(min_val, jnp.float32)
  max_val = jnp.asarray(max_val, jnp.float32)
  if min_val.shape != max_val.shape:
    raise ValueError(
        "calculate_qparams: min_val and max_val must have the same shape, got"
        f" {min_val.shape} and {max_val.shape}"
    )
  # torch keeps eps as a float32 buffer, so the floor is float32(eps).
  eps32 = jnp.float32(eps)
  min_val_neg = jnp.minimum(min_val, 0.0)
  max_val_pos = jnp.maximum(max_val, 0.0)
  if qscheme.endswith("symmetric"):
    max_val_pos = jnp.maximum(-min_val_neg, max_val_pos)
    # torch divides by the Python float (qmax - qmin) / 2, cast to float32.
    scale = true_divide(max_val_pos, jnp.float32(float(quant_max - quant_min) / 2))
    scale = jnp.maximum(scale, eps32)
    if dtype == "quint8":
      zp = (quant_min + quant_max) // 2 if has_customized_qrange else 128
    else:
      zp = 0
    zero_point = jnp.full(scale.shape, zp, jnp.int32)
  else:
    scale = true_divide(max_val_pos - min_val_neg, jnp.float32(float(quant_max - quant_min)))
    scale = jnp.maximum(scale, eps32)
    zero_point = jnp.float32(quant_min) - jnp.round(true_divide(min_val_neg, scale))
    zero_point = jnp.clip(zero_point, quant_min, quant_max).astype(jnp.int32)
  # `not (min <= max)` also catches the never-observed (+inf, -inf) pair and NaN.
  invalid = ~(min_val <= max_val)
  scale = jnp.where(invalid, jnp.float32(1.0), scale)
  zero_point = jnp.where(invalid, jnp.int32(0), zero_point)
  return scale, zero_point


# ----------------------------------------------------------------------------
# Exact float32 arithmetic helpers.
# ----------------------------------------------------------------------------


@jax.custom_batching.custom_vmap
def _divide_same_shape(a: jax.Array, b: jax.Array) -> jax.Array:
  # The barrier hides that `b` may be a broadcast (see true_divide).
  return a / jax.lax.optimization_barrier(b)


@_divide_same_shape.def_vmap
def _divide_same_shape_vmap(axis_size, in_batched, a, b):
  # vmap would re-introduce a broadcast of an unbatched divisor after the
  # barrier; materialise it here so that the barrier still covers it.
  a_batched, b_batched = in_batched
  if not a_batched:
    a = jnp.broadcast_to(a, (axis_size,) + a.shape)
  if not b_batched:
    b = jnp.broadcast_to(b, (axis_size,) + b.shape)
  return _divide_same_shape(a, b), True


def unfused(product: jax.Array) -> jax.Array:
  """Returns ``product`` unchanged, rounded to float32 before any later addition.

  XLA:CPU (and XLA:GPU) contract ``a * b + c`` inside a fusion into one fused
  multiply-add, while torch rounds the product first. Optimization barriers and
  no-op casts are simplified away; a select the compiler cannot prove trivial
  (NaN stays NaN, so the value is unchanged) keeps the multiply separate.
  """
  return jnp.where(product == product, product, jnp.float32(jnp.nan))


def true_divide(a, b) -> jax.Array:
  """IEEE ``a / b`` in float32, correctly rounded like torch's division.

  XLA's algebraic simplifier rewrites ``A / broadcast(B)`` into
  ``A * broadcast(1 / B)``, which differs from a true division in the last bit
  for about a third of the inputs. Dividing by a materialised, barrier-protected
  divisor keeps the division. Not differentiable (used for qparams only).
  """
  a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  return _divide_same_shape(jax.lax.stop_gradient(a), jax.lax.stop_gradient(b))


def _opaque(*values):
  # XLA's simplifier reassociates float arithmetic with constants, e.g.
  # (v + C) - C -> v, which silently zeroes the error terms below whenever an
  # operand is a compile-time constant. The barrier hides that it is one.
  return jax.lax.optimization_barrier(values)


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Knuth's TwoSum: ``s + e == a + b`` exactly, ``s = fl(a + b)``."""
  a, b = _opaque(a, b)
  s = a + b
  bb = s - a
  e = (a - (s - bb)) + (b - bb)
  return s, e


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  # Veltkamp split of a float32 into two 12-bit halves; fusing the product into
  # `c - a` would break it.
  (a,) = _opaque(a)
  c = unfused(a * jnp.float32(4097.0))
  hi = c - (c - a)
  return hi, a - hi


def two_prod(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Dekker's TwoProduct: ``p + e == a * b`` exactly (barring over/underflow)."""
  a, b = _opaque(a, b)
  p = unfused(a * b)
  ah, al = _split(a)
  bh, bl = _split(b)
  e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
  return p, e


def _exponent(x: jax.Array) -> jax.Array:
  # Unbiased binary exponent of a normal float32 (0 for zeros and subnormals).
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  biased = (bits >> 23) & 0xFF
  return jnp.where(biased == 0, 0, biased - 127)


def _pow2(k: jax.Array) -> jax.Array:
  # 2**k as a float32 for integer k in [-126, 127], built from its bits.
  return jax.lax.bitcast_convert_type(((k + 127) << 23).astype(jnp.int32), jnp.float32)


def _scale_pow2(x: jax.Array, k: jax.Array) -> jax.Array:
  # x * 2**k for |k| <= 252, in two exact steps.
  k1 = k // 2
  return unfused(x * _pow2(k1)) * _pow2(k - k1)


def _fma_core(a, b, c):
  ph, pl = two_prod(a, b)
  sh, sl = two_sum(c, ph)
  v, ve = two_sum(sl, pl)
  # Round v to odd: if v is inexact and its last bit is even, step towards the
  # exact value. Then one rounding of sh + v is the correctly rounded sum.
  even = (jax.lax.bitcast_convert_type(v, jnp.uint32) & 1) == 0
  towards = jnp.where(ve > 0, jnp.float32(jnp.inf), jnp.float32(-jnp.inf))
  v = jnp.where((ve != 0) & even, jnp.nextafter(v, towards), v)
  return sh + v


def fma_f32(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
  """``a * b + c`` rounded once to float32, like a hardware fused multiply-add.

  Exact product by TwoProduct, exact sum with ``c`` by TwoSum, the low parts
  added with round-to-odd, then one final rounding (Boldo & Melquiond's
  emulated FMA). The operands are first scaled by powers of two so that the
  larger of ``a * b`` and ``c`` is near 1, which keeps the error terms out of
  the subnormal range for tiny or huge inputs. Non-finite inputs fall back to
  ``a * b + c``; a subnormal result may be off by one rounding.
  """
  a, b, c = (jnp.asarray(v, jnp.float32) for v in (a, b, c))
  a, b, c = jnp.broadcast_arrays(a, b, c)
  ea, eb, ec = _exponent(a), _exponent(b), _exponent(c)
  k = -jnp.maximum(ea + eb, ec)
  ka = jnp.clip(-ea, -120, 120)
  kb = jnp.clip(k - ka, -120, 120)
  scaled = _fma_core(_scale_pow2(a, ka), _scale_pow2(b, kb), _scale_pow2(c, ka + kb))
  exact = _scale_pow2(scaled, -(ka + kb))
  plain = a * b + c
  ok = jnp.isfinite(exact) & jnp.isfinite(a) & jnp.isfinite(b) & jnp.isfinite(c)
  return jnp.where(ok, exact, plain)


# ----------------------------------------------------------------------------
# Real quantization.
# ----------------------------------------------------------------------------

_STORAGE = {
    np.dtype(np.int8): (-128, 127),
    np.dtype(np.uint8): (0, 255),
    np.dtype(np.int32): (-(2**31), 2**31 - 1),
}


def _per_axis(v: jax.Array, ndim: int, axis: int | None, name: str) -> jax.Array:
  """Reshapes a per-channel vector so that it broadcasts along ``axis``."""
  if axis is None:
    if v.ndim != 0:
      raise ValueError(f"{name} must be a scalar when axis is None, got shape {v.shape}")
    return v
  if v.ndim != 1:
    raise ValueError(f"{name} must be a vector [C] when axis is given, got shape {v.shape}")
  shape = [1] * ndim
  shape[axis] = v.shape[0]
  return v.reshape(shape)


def _normalize_axis(axis, ndim: int, owner: str) -> int | None:
  if axis is None:
    return None
  if not _is_int(axis):
    raise TypeError(f"{owner}: axis must be an int or None, got {axis!r}")
  if not -ndim <= axis < ndim:
    raise ValueError(f"{owner}: axis {axis} is out of range for an array of rank {ndim}")
  return int(axis) % ndim


def quantize(
    x,
    scale,
    zero_point,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
    dtype=jnp.int8,
) -> jax.Array:
  """Real affine quantization, rounding exactly like torch's CPU kernels.

  ``q = clip(rint(x * (1 / scale) + zero_point), quant_min, quant_max)``: the zero
  point is added *before* rounding (unlike fake quantization). How that sum is
  rounded follows torch: per-tensor quantization to an 8-bit range (fbgemm's
  quint8/qint8 kernel) uses one fused multiply-add; per-channel, and ranges wider
  than 8 bits (qint32), round ``x * inv_scale`` to float32 first and then add.
  The choice follows the range, not the storage ``dtype``, so 8-bit values kept
  in int32 round like torch's quint8.
  ``+-inf`` saturate. NaN maps where torch's CPU kernels send it (measured):
  ``quant_max`` on the 8-bit per-tensor path (fbgemm clamps with
  ``_mm256_min_ps(x, int32_max)``, which returns the bound for NaN), 0 on the
  8-bit per-channel path, ``quant_min`` for wider ranges (integer conversion).

  Args:
    x: float array, any shape.
    scale: float scale, scalar (``axis=None``) or ``[x.shape[axis]]``.
    zero_point: integer zero point, same shape as ``scale``.
    quant_min: lower clip bound.
    quant_max: upper clip bound.
    axis: channel axis of ``x`` for per-channel quantization, or None.
    dtype: storage dtype of the result, ``jnp.int8``, ``jnp.uint8`` or ``jnp.int32``.

  Returns:
    Integer array of ``x``'s shape and ``dtype``.
  """
  try:
    storage = np.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"quantize: dtype must be int8, uint8 or int32, got {dtype!r}") from e
  if storage not in _STORAGE:
    raise TypeError(f"quantize: dtype must be int8, uint8 or int32, got {storage}")
  quant_min, quant_max = _check_range(quant_min, quant_max, "quantize")
  lo, hi = _STORAGE[storage]
  if quant_min < lo or quant_max > hi:
    raise ValueError(
        f"quantize: range [{quant_min}, {quant_max}] does not fit dtype {storage}"
        f" [{lo}, {hi}]"
    )
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize: x must be a floating-point array, got dtype {x.dtype}")
  axis = _normalize_axis(axis, x.ndim, "quantize")
  x = x.astype(jnp.float32)
  scale = _per_axis(jnp.asarray(scale, jnp.float32), x.ndim, axis, "scale")
  zero_point = _per_axis(jnp.asarray(zero_point), x.ndim, axis, "zero_point")
  inv_scale = jnp.float32(1.0) / scale
  zp = zero_point.astype(jnp.float32)
  eight_bit = quant_min >= -128 and quant_max <= 255
  if axis is None and eight_bit:
    # fbgemm's AVX kernel: _mm256_fmadd_ps(x, inv_scale, zero_point).
    transformed = fma_f32(x, inv_scale, zp)
    nan_to = quant_max
  else:
    # ATen's quantize_val: zero_point + x * inv_scale, two roundings.
    transformed = unfused(x * inv_scale) + zp
    nan_to = min(max(0, quant_min), quant_max) if eight_bit else quant_min
  q = jnp.clip(jnp.round(transformed), quant_min, quant_max)
  q = jnp.where(jnp.isnan(transformed), jnp.float32(nan_to), q)
  return q.astype(storage)


def dequantize(q, scale, zero_point, axis: int | None = None) -> jax.Array:
  """``(q - zero_point) * scale`` in float32, as ``torch.Tensor.dequantize``.

  Args:
    q: integer array, any shape.
    scale: float scale, scalar (``axis=None``) or ``[q.shape[axis]]``.
    zero_point: integer zero point, same shape as ``scale``.
    axis: channel axis of ``q`` for per-channel parameters, or None.

  Returns:
    float32 array of ``q``'s shape.
  """
  q = jnp.asarray(q)
  if not jnp.issubdtype(q.dtype, jnp.integer):
    raise TypeError(f"dequantize: q must be an integer array, got dtype {q.dtype}")
  axis = _normalize_axis(axis, q.ndim, "dequantize")
  scale = _per_axis(jnp.asarray(scale, jnp.float32), q.ndim, axis, "scale")
  zero_point = _per_axis(jnp.asarray(zero_point), q.ndim, axis, "zero_point")
  # (q - zp) is an exact small integer in float32, so one rounding, as in torch.
  return (q.astype(jnp.float32) - zero_point.astype(jnp.float32)) * scale
