"""int8 matmul numerics: the s8 x s8 -> s32 projection with its zero-point correction.

Activations are stored signed. torch's quint8 activation ``q_u8`` with zero point
``z_u8`` is the same real number as ``q_s8 = q_u8 - 128`` with ``z_s8 = z_u8 - 128``,
so every matmul is s8 x s8 (what TPUs, GPUs and VNNI CPUs run natively) and no
precision is lost. With a symmetric weight (zero point 0)::

    sum_k (x_k - z) * w_km = sum_k x_k * w_km - z * sum_k w_km

The second term only depends on the weight, so it is precomputed at convert
time (``zero_point_correction``) and subtracted from the int32 accumulator: one
matmul, then one rescale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# |x * w| <= 128 * 128 = 2**14 for s8 operands, so an int32 accumulator holds at
# least 2**31 / 2**14 products before it can overflow.
MAX_CONTRACTION = (2**31 - 1) // (128 * 128)


def check_contraction(size: int, name: str, max_abs_product: int = 128 * 128) -> None:
  """Refuses contractions long enough to overflow the int32 accumulator.

  ``max_abs_product`` bounds one term: 128 * 128 for s8 x s8, more when the sum
  that must fit is a zero-point-corrected one (``(x - z) * w``: 255 * 128).
  """
  bound = (2**31 - 1) // max_abs_product
  if size > bound:
    raise ValueError(
        f"{name}: an int8 contraction over {size} elements can overflow int32"
        f" (at most {bound} are safe with 8-bit operands"
        + ("" if bound == MAX_CONTRACTION else f" whose products reach {max_abs_product}")
        + ")"
    )


def int8_dot(x: jax.Array, w: jax.Array) -> jax.Array:
  """``[..., K] s8 x [K, M] s8 -> [..., M] s32`` with an int32 accumulator."""
  check_contraction(w.shape[0], "int8_dot")
  return jax.lax.dot_general(
      x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32
  )


def zero_point_correction(w_q: np.ndarray, input_zero_point: int) -> np.ndarray:
  """``z * sum_k w[k, m]`` as int32 ``[M]``, for a per-tensor input zero point ``z``
  (in the signed domain) and an int8 kernel ``[K, M]`` whose zero point is 0."""
  w = np.asarray(w_q, np.int64)
  return (int(input_zero_point) * w.sum(axis=0)).astype(np.int32)


def to_signed(q_u8: jax.Array) -> jax.Array:
  """quint8 values 0..255 -> the same offsets as int8 -128..127."""
  return (q_u8.astype(jnp.int16) - 128).astype(jnp.int8)


def quantize_symmetric(x: jax.Array, scale: jax.Array | None = None, axis: int = -1):
  """Symmetric int8 (zero point 0, levels -127..127).

  With a static per-tensor ``scale``, or with ``scale=None`` one scale per slice
  along ``axis`` computed here as ``amax / 127`` (dynamic quantization; an
  all-zero slice gets scale 1 so nothing divides by zero).

  Returns:
    ``(x_int8, scale)`` with ``scale`` broadcastable to ``x``.
  """
  x = x.astype(jnp.float32)
  if scale is None:
    amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True, initial=0.0)  # 0 if empty
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def rescale(
    acc: jax.Array, input_scale: jax.Array, weight_scale: jax.Array,
    bias: jax.Array | None,
) -> jax.Array:
  """int32 accumulator -> float32 ``acc * input_scale * weight_scale + bias``."""
  y = acc.astype(jnp.float32) * (input_scale * weight_scale).astype(jnp.float32)
  return y if bias is None else y + bias


def requantize(
    acc: jax.Array, input_scale: jax.Array, weight_scale: jax.Array,
    bias: jax.Array | None, output_scale: jax.Array, output_zero_point: jax.Array,
    quant_min: int = 0, quant_max: int = 255,
) -> jax.Array:
  """fbgemm's requantization of a quantized Linear's int32 accumulator.

  ``yq = clip(rint((acc + bias / ats) * (ats / output_scale)) + zp, qmin, qmax)``
  with ``ats = float32(input_scale * weight_scale)``; the result is in the
  unsigned (quint8) domain, clamped to 0..255 even for reduce_range scales, as
  fbgemm does. Returns int32.
  """
  ats = (input_scale * weight_scale).astype(jnp.float32)
  acc = acc.astype(jnp.float32)
  if bias is not None:
    acc = acc + bias / ats
  q = jnp.round(acc * (ats / output_scale)) + output_zero_point.astype(jnp.float32)
  return jnp.clip(q, quant_min, quant_max).astype(jnp.int32)
