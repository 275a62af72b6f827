"""``QuantizedMultiheadAttention``: int8 inference with float inputs and outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from flax_qmha import _attention_core as core
from flax_qmha import _checks
from flax_qmha import _int8
from flax_qmha._attention_base import AttentionBase, float_attention
from flax_qmha._qparams import dequantize, quantize
from flax_qmha._quantized_projection import QuantizedProjection

NUMERICS = ("accurate", "torch")


def int8_attention(q, k, v, mask, *, num_heads, scales, dropout, dropout_rng):
  """QK^T and PV as s8 x s8 -> s32 ``dot_general``s on ``[N, L|S, E]`` inputs.

  Q, K and V are quantized symmetrically: with static per-tensor ``scales``
  ``(q, k, v)``, or (``scales=None``) dynamically, Q and K per token and V per
  feature (the scale must not vary along PV's contraction over keys). The softmax
  runs in float32; its probabilities are quantized to an unsigned grid
  ``p_u8 * row_max / 255`` (all 256 levels, not a signed int8's 128, one scale
  per query row) and enter the matmul as ``p_u8 - 128``, with ``128 * sum_s v``
  added back to the int32 result.

  Returns ``(attn [N, L, E], weights [N, H, L, S])`` like ``float_attention``.
  """
  n, l, e = q.shape
  d = e // num_heads
  q_scale, k_scale, v_scale = (None, None, None) if scales is None else scales
  q_q, q_scale = _int8.quantize_symmetric(q, q_scale, axis=-1)  # scale [N, L, 1] or ()
  k_q, k_scale = _int8.quantize_symmetric(k, k_scale, axis=-1)  # scale [N, S, 1] or ()
  v_q, v_scale = _int8.quantize_symmetric(v, v_scale, axis=1)  # scale [N, 1, E] or ()
  _int8.check_contraction(d, "int8 attention (QK^T)")
  # PV's result is sum_s p_u8 * v with p_u8 up to 255 (see below).
  _int8.check_contraction(k.shape[1], "int8 attention (PV)", 255 * 127)
  q_h, k_h, v_h = (core.split_heads(x, num_heads) for x in (q_q, k_q, v_q))
  # [N, L, H, D] x [N, S, H, D] -> [N, H, L, S] (batch dims N, H).
  acc = jax.lax.dot_general(q_h, k_h, (((3,), (3,)), ((0, 2), (0, 2))),
                            preferred_element_type=jnp.int32)
  q_s = jnp.swapaxes(q_scale, 1, 2)[:, :, :, None] if q_scale.ndim else q_scale  # [N,1,L,1]
  k_s = jnp.swapaxes(k_scale, 1, 2)[:, :, None, :] if k_scale.ndim else k_scale  # [N,1,1,S]
  logits = acc.astype(jnp.float32) * (q_s * k_s * jnp.float32(float(d) ** -0.5))
  weights = core.attention_dropout(core.masked_softmax(logits, mask), dropout, dropout_rng)
  # One scale per query row, from the row's largest probability: near-uniform
  # rows (max ~1/S) would keep only a few levels on a fixed 1/255 grid.
  row_max = jnp.max(weights, axis=-1, keepdims=True, initial=0.0)  # [N, H, L, 1]
  p_scale = jnp.where(row_max > 0, row_max / 255.0, 1.0)
  p_s8 = (jnp.clip(jnp.round(weights / p_scale), 0, 255) - 128).astype(jnp.int8)
  # [N, H, L, S] x [N, S, H, D] -> [N, H, L, D] (batch dims N, H).
  pv = jax.lax.dot_general(p_s8, v_h, (((3,), (1,)), ((0, 1), (0, 2))),
                           preferred_element_type=jnp.int32)
  pv = pv + 128 * jnp.sum(v_h.astype(jnp.int32), axis=1)[:, :, None, :]
  attn = pv.astype(jnp.float32) * p_scale  # [N, H, L, D]
  attn = jnp.transpose(attn, (0, 2, 1, 3)).reshape(n, l, e)
  return attn * v_scale, weights


class QuantizedMultiheadAttention(AttentionBase):
  """int8 multi-head attention with ``MultiheadAttention``'s call signature.

  Built by :func:`flax_qmha.convert` (from a calibrated or QAT-trained module) or
  :func:`flax_qmha.from_torch` (from torch's converted module). Inputs and outputs
  are float; every projection is an ``int8 x int8 -> int32`` ``dot_general``.

  Attributes:
    embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
      batch_first: as for ``MultiheadAttention``.
    numerics: ``"accurate"``: int32 accumulators are rescaled once to float and
      stay float until the next quantization point (the attention result entering
      ``out_proj``); ``"torch"``: every projection output is requantized to 8 bits
      and the returned weights are quantized, exactly as
      ``torch.ao.nn.quantized.MultiheadAttention`` computes.
    int8_attention: also compute QK^T and PV as int8 ``dot_general``s.
    dynamic_activations: quantize projection inputs per token at run time
      (symmetric int8), so no activation calibration is needed.
    per_channel_weights: one weight scale per output channel (else per tensor).

  Variables (``params``): ``linear_Q``, ``linear_K``, ``linear_V``, ``out_proj``
  (see :class:`QuantizedProjection`); ``bias_k``/``bias_v`` as uint8 ``(1, 1, E)``
  with ``bias_k_scale``, ``bias_k_zero_point`` (and ``_v``); ``q_scale``,
  ``k_scale``, ``v_scale`` for static int8 attention; ``attn_weights_scale``,
  ``attn_weights_zero_point`` with ``numerics="torch"``.
  """

  numerics: str = "accurate"
  int8_attention: bool = False
  dynamic_activations: bool = False
  per_channel_weights: bool = True

  def setup(self):
    self.check_config()
    _checks.check_bool_fields(
        "QuantizedMultiheadAttention", int8_attention=self.int8_attention,
        dynamic_activations=self.dynamic_activations,
        per_channel_weights=self.per_channel_weights,
    )
    if self.numerics not in NUMERICS:
      raise ValueError(
          f"QuantizedMultiheadAttention: numerics must be one of {NUMERICS},"
          f" got {self.numerics!r}"
      )
    if self.numerics == "torch" and (self.int8_attention or self.dynamic_activations):
      raise ValueError(
          "QuantizedMultiheadAttention: numerics='torch' reproduces torch's module,"
          " which has neither int8_attention nor dynamic_activations"
      )

    def projection(name):
      return QuantizedProjection(
          self.embed_dim, use_bias=self.bias, per_channel=self.per_channel_weights,
          numerics=self.numerics, dynamic=self.dynamic_activations, name=name,
      )

    self.linear_Q = projection("linear_Q")
    self.linear_K = projection("linear_K")
    self.linear_V = projection("linear_V")
    self.out_proj = projection("out_proj")
    e, zeros, ones = self.embed_dim, nn.initializers.zeros, nn.initializers.ones
    if self.add_bias_kv:
      for name in ("bias_k", "bias_v"):
        setattr(self, name, self.param(name, zeros, (1, 1, e), jnp.uint8))
        setattr(self, f"{name}_scale", self.param(f"{name}_scale", ones, (), jnp.float32))
        setattr(self, f"{name}_zero_point",
                self.param(f"{name}_zero_point", zeros, (), jnp.int32))
    if self.int8_attention and not self.dynamic_activations:
      self.q_scale = self.param("q_scale", ones, (), jnp.float32)
      self.k_scale = self.param("k_scale", ones, (), jnp.float32)
      self.v_scale = self.param("v_scale", ones, (), jnp.float32)
    if self.numerics == "torch":
      self.attn_weights_scale = self.param("attn_weights_scale", ones, (), jnp.float32)
      self.attn_weights_zero_point = self.param("attn_weights_zero_point", zeros, (),
                                                jnp.int32)

  def project_inputs(self, query, key, value):
    # torch's q_scaling_product scales Q's quantization scale, not its integers;
    # the float core's q * D**-0.5 on the dequantized Q is the same up to one
    # float32 rounding.
    return self.linear_Q(query), self.linear_K(key), self.linear_V(value)

  def bias_kv(self):
    bias = [dequantize(getattr(self, n).astype(jnp.int32), getattr(self, f"{n}_scale"),
                       getattr(self, f"{n}_zero_point")) for n in ("bias_k", "bias_v")]
    if self.numerics == "torch":
      # torch.cat of quantized tensors requantizes into the first input's qparams.
      for i, proj in enumerate((self.linear_K, self.linear_V)):
        scale = proj.get_variable("params", "output_scale")
        zp = proj.get_variable("params", "output_zero_point")
        bias[i] = dequantize(quantize(bias[i], scale, zp, 0, 255, dtype=jnp.int32), scale, zp)
    return tuple(bias)

  def attend(self, q, k, v, mask, dropout_rng):
    if not self.int8_attention:
      return float_attention(q, k, v, mask, num_heads=self.num_heads, dropout=self.dropout,
                             dropout_rng=dropout_rng)
    scales = None if self.dynamic_activations else (self.q_scale, self.k_scale, self.v_scale)
    return int8_attention(q, k, v, mask, num_heads=self.num_heads, scales=scales,
                          dropout=self.dropout, dropout_rng=dropout_rng)

  def project_output(self, attn):
    return self.out_proj(attn)

  def output_weights(self, weights, average):
    if self.numerics != "torch":
      return core.average_heads(weights) if average else weights
    scale, zp = self.attn_weights_scale, self.attn_weights_zero_point
    weights = dequantize(quantize(weights, scale, zp, 0, 255, dtype=jnp.int32), scale, zp)
    if not average:
      return weights
    # torch averages the quantized per-head weights; a sequential sum over heads,
    # divided by H and requantized, reproduces it (jnp.mean's pairwise sum can
    # round ties differently).
    total = weights[:, 0]
    for h in range(1, weights.shape[1]):
      total = total + weights[:, h]
    mean = total / jnp.float32(weights.shape[1])
    return dequantize(quantize(mean, scale, zp, 0, 255, dtype=jnp.int32), scale, zp)
