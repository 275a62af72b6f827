"""Fake quantization (quantize then dequantize in float) with torch's exact rounding.

``fake_quantize`` is the JAX counterpart of ``torch.fake_quantize_per_tensor_affine``
and ``torch.fake_quantize_per_channel_affine`` on CPU, bitwise in float32:

  inv_scale = float32(1 / scale)
  q         = rint(x * inv_scale) + zero_point          # zero point added AFTER rounding
  out       = (clip(q, quant_min, quant_max) - zero_point) * scale

Its gradient is torch's straight-through estimator: the incoming gradient where
``quant_min <= q <= quant_max`` and zero elsewhere; scale and zero point receive
no gradient (torch's functions are not differentiable in them either).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["fake_quantize"]


def _per_channel_shape(ndim: int, axis: int, size: int) -> list[int]:
  shape = [1] * ndim
  shape[axis] = size
  return shape


def _quantize_grid(x32: jax.Array, scale: jax.Array, zero_point: jax.Array) -> jax.Array:
  # torch: `z_point + std::nearbyint(x * inv_scale)` with inv_scale = 1.0f / scale;
  # multiplying by the float32 reciprocal (not dividing) is what makes it bitwise.
  inv_scale = jnp.float32(1.0) / scale
  return jnp.round(x32 * inv_scale) + zero_point


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quantize(x32, scale, zero_point, quant_min, quant_max):
  q = _quantize_grid(x32, scale, zero_point)
  # fmax/fmin rather than clip: torch's kernel clamps with std::fmax/std::fmin,
  # which send NaN to quant_min instead of propagating it.
  q = jnp.fmin(jnp.fmax(q, jnp.float32(quant_min)), jnp.float32(quant_max))
  # (q - zp) is a small exact integer, so this is one rounding, as torch's double
  # arithmetic followed by the cast to float.
  return (q - zero_point) * scale


def _fake_quantize_fwd(x32, scale, zero_point, quant_min, quant_max):
  out = _fake_quantize(x32, scale, zero_point, quant_min, quant_max)
  q = _quantize_grid(x32, scale, zero_point)
  # NaN and +-inf fall outside the mask, as in torch's cachemask kernels.
  mask = (q >= quant_min) & (q <= quant_max)
  return out, (mask, scale, zero_point)


def _fake_quantize_bwd(quant_min, quant_max, residuals, g):
  del quant_min, quant_max
  mask, scale, zero_point = residuals
  return (
      jnp.where(mask, g, jnp.zeros_like(g)),
      jnp.zeros_like(scale),
      jnp.zeros_like(zero_point),
  )


_fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def fake_quantize(
    x,
    scale,
    zero_point,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> jax.Array:
  """Quantizes and dequantizes ``x`` in float, with a straight-through gradient.

  Args:
    x: floating-point array of any shape and float dtype. Computed in float32
      (as torch does for float32 input) and returned in ``x.dtype``.
    scale: float scale. A scalar (or shape ``[1]``) when ``axis`` is None;
      otherwise a vector ``[x.shape[axis]]``.
    zero_point: integer (or integer-valued float) zero point, same shape as
      ``scale``.
    quant_min: lowest integer level, e.g. 0 for quint8 or -128 for qint8.
    quant_max: highest integer level, e.g. 255 or 127 (127 / 63 with reduce_range).
    axis: the axis of ``x`` that ``scale``/``zero_point`` run along
      (per-channel, ``torch.fake_quantize_per_channel_affine``), or None
      (per-tensor, ``torch.fake_quantize_per_tensor_affine``).

  Returns:
    Array of ``x``'s shape and dtype holding
    ``(clip(rint(x * (1/scale)) + zero_point, quant_min, quant_max) - zero_point) * scale``.
    NaN inputs give ``(quant_min - zero_point) * scale`` like torch; ``+-inf``
    saturate to the range ends. (torch's per-channel kernel sends ``+inf`` and
    values beyond ``2**63 * scale`` to ``quant_min`` through an int64 overflow; we
    saturate them like its per-tensor kernel does.)

  Raises:
    TypeError: non-float ``x``, non-int bounds or axis.
    ValueError: ``quant_min >= quant_max``, bad ``axis``, or ``scale``/``zero_point``
      shapes that do not match the per-tensor / per-channel mode.
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"fake_quantize: x must be a floating-point array, got dtype {x.dtype}")
  for name, value in (("quant_min", quant_min), ("quant_max", quant_max)):
    if not _is_int(value):
      raise TypeError(f"fake_quantize: {name} must be an int, got {value!r}")
  if quant_min >= quant_max:
    raise ValueError(
        f"fake_quantize: quant_min must be < quant_max, got quant_min={quant_min},"
        f" quant_max={quant_max}"
    )
  scale = jnp.asarray(scale)
  zero_point = jnp.asarray(zero_point)
  if not jnp.issubdtype(scale.dtype, jnp.floating):
    raise TypeError(f"fake_quantize: scale must be floating-point, got dtype {scale.dtype}")
  if axis is None:
    for name, v in (("scale", scale), ("zero_point", zero_point)):
      if v.size != 1 or v.ndim > 1:
        raise ValueError(
            f"fake_quantize: {name} must be a scalar (or shape [1]) for per-tensor"
            f" fake quantization (axis=None), got shape {v.shape}"
        )
    scale = scale.reshape(())
    zero_point = zero_point.reshape(())
  else:
    if not _is_int(axis):
      raise TypeError(f"fake_quantize: axis must be an int or None, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
      raise ValueError(
          f"fake_quantize: axis {axis} is out of range for x of shape {x.shape}"
      )
    axis = int(axis) % x.ndim
    channels = x.shape[axis]
    for name, v in (("scale", scale), ("zero_point", zero_point)):
      if v.shape != (channels,):
        raise ValueError(
            f"fake_quantize: {name} must have shape ({channels},) = x.shape[{axis}]"
            f" for per-channel fake quantization, got shape {v.shape}"
        )
    shape = _per_channel_shape(x.ndim, axis, channels)
    scale = scale.reshape(shape)
    zero_point = zero_point.reshape(shape)
  out = _fake_quantize(
      x.astype(jnp.float32),
      scale.astype(jnp.float32),
      zero_point.astype(jnp.float32),
      int(quant_min),
      int(quant_max),
  )
  return out.astype(x.dtype)
