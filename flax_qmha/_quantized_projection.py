"""The int8 projection: float in, int8 x int8 -> int32 matmul, float out."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_qmha import _int8
from flax_qmha._qparams import quantize


def quantize_activation(
    x: jax.Array, scale: jax.Array, zero_point: jax.Array, torch_rounding: bool
) -> jax.Array:
  """float -> int8 with a per-tensor signed-domain zero point, clamped to the whole
  8-bit range (as fbgemm does even when the scale was calibrated for reduce_range's
  0..127).

  ``torch_rounding``: round exactly as ``torch.quantize_per_tensor(x, scale,
  zero_point + 128, torch.quint8)``, one fused multiply-add, which XLA has no
  primitive for and which costs ~1.6 ms per projection to emulate on CPU.
  Otherwise ``round(x / scale) + zero_point``, fake quantization's rounding: what
  QAT trained with, one rounding, and the same accuracy.
  """
  if torch_rounding:
    return _int8.to_signed(quantize(x, scale, zero_point + 128, 0, 255, dtype=jnp.uint8))
  q = jnp.round(x.astype(jnp.float32) * (jnp.float32(1.0) / scale)) + zero_point
  return jnp.clip(q, -128, 127).astype(jnp.int8)


class QuantizedProjection(nn.Module):
  """``y = x @ kernel + bias`` with an int8 kernel and int8 activations.

  Variables (``params``), filled by :func:`flax_qmha.convert`:
    kernel: int8 ``(in_features, features)``.
    kernel_scale: float32 ``(features,)`` per channel or ``()`` per tensor.
    bias: float32 ``(features,)`` (with ``use_bias``).
    input_scale, input_zero_point: the input's qparams (signed domain), static mode.
    zero_point_correction: int32 ``input_zero_point * sum_k kernel[k]``, static mode.
    output_scale, output_zero_point: quint8 qparams the int32 result is
      requantized to (``numerics="torch"`` only).

  Attributes:
    features: output features.
    use_bias: whether there is a bias.
    per_channel: one weight scale per output channel (else one per tensor).
    numerics: ``"accurate"`` (one rescale to float) or ``"torch"`` (requantize to
      8 bits like torch's quantized Linear, then dequantize).
    dynamic: quantize inputs per token at run time instead of with static qparams.
  """

  features: int
  use_bias: bool = True
  per_channel: bool = True
  numerics: str = "accurate"
  dynamic: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[..., in_features]`` float -> ``[..., features]`` float32."""
    zeros = nn.initializers.zeros
    scale_shape = (self.features,) if self.per_channel else ()
    # With a static zero point the sum that must fit is that of (x - z) * w, |x - z| <= 255.
    _int8.check_contraction(x.shape[-1], f"QuantizedProjection {self.name!r}",
                            128 * 128 if self.dynamic else 255 * 128)
    kernel = self.param("kernel", zeros, (x.shape[-1], self.features), jnp.int8)
    kernel_scale = self.param("kernel_scale", nn.initializers.ones, scale_shape, jnp.float32)
    bias = self.param("bias", zeros, (self.features,), jnp.float32) if self.use_bias else None
    if self.dynamic:
      x_q, input_scale = _int8.quantize_symmetric(x)  # per token
      acc = _int8.int8_dot(x_q, kernel)
    else:
      input_scale = self.param("input_scale", nn.initializers.ones, (), jnp.float32)
      input_zero_point = self.param("input_zero_point", zeros, (), jnp.int32)
      correction = self.param("zero_point_correction", zeros, (self.features,), jnp.int32)
      x_q = quantize_activation(x, input_scale, input_zero_point,
                                torch_rounding=self.numerics == "torch")
      acc = _int8.int8_dot(x_q, kernel)
      acc = acc - correction
    if self.numerics == "accurate":
      return _int8.rescale(acc, input_scale, kernel_scale, bias)
    output_scale = self.param("output_scale", nn.initializers.ones, (), jnp.float32)
    output_zero_point = self.param("output_zero_point", zeros, (), jnp.int32)
    y_q = _int8.requantize(acc, input_scale, kernel_scale, bias, output_scale,
                           output_zero_point)
    return (y_q - output_zero_point).astype(jnp.float32) * output_scale
