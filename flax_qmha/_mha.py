"""``MultiheadAttention``: torch.nn.MultiheadAttention's semantics as a Flax module,
with optional observers and fake quantization (QAT) at torch's quantization points."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from flax_qmha import _attention_core as core
from flax_qmha import _initializers as inits
from flax_qmha._attention_base import AttentionBase
from flax_qmha._observers import Observer
from flax_qmha._projection import Projection
from flax_qmha._qconfig import QConfig, QuantSpec

Dtype = Any

# torch quantizes bias_k/bias_v at convert time with _choose_qparams_per_tensor:
# quint8, per-tensor affine over their min/max, no reduce_range.
BIAS_KV_SPEC = QuantSpec(observer="minmax", dtype="quint8", qscheme="per_tensor_affine")


class MultiheadAttention(AttentionBase):
  """Multi-head attention with ``torch.nn.MultiheadAttention``'s signature and maths.

  Attributes:
    embed_dim: total dimension ``E`` of the model (query features and output).
    num_heads: number of heads ``H``; must divide ``embed_dim``.
    dropout: dropout probability on the attention weights.
    bias: whether the four projections have biases.
    add_bias_kv: append learned ``bias_k``/``bias_v`` as an extra key/value position.
    add_zero_attn: append an all-zero key/value position.
    kdim: key features (default ``embed_dim``).
    vdim: value features (default ``embed_dim``).
    batch_first: inputs and outputs are ``(N, L, E)`` instead of ``(L, N, E)``.
    dtype: computation dtype (``None``: inferred). Softmax always runs in float32.
    param_dtype: parameter dtype.
    qconfig: a :class:`QConfig`; ``None`` is a plain float module. With one, the
      module observes (and with ``qconfig.fake_quant`` fake-quantizes) the inputs,
      every projection's weight and output, the attention result entering
      ``out_proj``, the attention weights and ``bias_k``/``bias_v``. Statistics
      live in the ``quant_stats`` collection and are updated only when it is
      mutable.

  Parameters (``params``): ``linear_Q``, ``linear_K``, ``linear_V``, ``out_proj``,
  each ``{"kernel": (in_features, embed_dim), "bias": (embed_dim,)}``, and
  ``bias_k``/``bias_v`` of shape ``(1, 1, embed_dim)`` with ``add_bias_kv``.
  """

  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  qconfig: QConfig | None = None

  def setup(self):
    self.check_config()
    if self.qconfig is not None and not isinstance(self.qconfig, QConfig):
      raise TypeError(
          f"MultiheadAttention: qconfig must be a flax_qmha.QConfig or None, got"
          f" {type(self.qconfig).__name__}"
      )
    for name, dtype in (("dtype", self.dtype), ("param_dtype", self.param_dtype)):
      try:
        floating = (dtype is None and name == "dtype") or (
            dtype is not None and jnp.issubdtype(dtype, jnp.floating))
      except TypeError:
        floating = False
      if not floating:
        raise TypeError(
            f"MultiheadAttention: {name} must be a floating-point dtype"
            + (" or None" if name == "dtype" else "") + f", got {dtype!r}"
        )
    e = self.embed_dim
    packed = self.key_dim == e and self.value_dim == e
    # torch initialises the packed (3E, E) in_proj_weight as one matrix.
    fan_out = 3 * e if packed else e

    def projection(name, kernel_init):
      return Projection(
          e, use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=kernel_init, qconfig=self.qconfig, name=name,
      )

    self.linear_Q = projection("linear_Q", inits.xavier_uniform(e, fan_out))
    self.linear_K = projection("linear_K", inits.xavier_uniform(self.key_dim, fan_out))
    self.linear_V = projection("linear_V", inits.xavier_uniform(self.value_dim, fan_out))
    self.out_proj = projection("out_proj", inits.torch_linear_kernel(e))
    if self.add_bias_kv:
      bias_init = inits.xavier_normal_bias_kv(e)
      self.bias_k = self.param("bias_k", bias_init, (1, 1, e), self.param_dtype)
      self.bias_v = self.param("bias_v", bias_init, (1, 1, e), self.param_dtype)

    if self.qconfig is not None:
      act, fq = self.qconfig.activation, self.qconfig.fake_quant
      self.quant_query = Observer(act, fake_quant=fq)
      self.quant_key = Observer(act, fake_quant=fq)
      self.quant_value = Observer(act, fake_quant=fq)
      self.quant_attn_output = Observer(act, fake_quant=fq)
      self.quant_attn_output_weights = Observer(act, fake_quant=fq)
      if self.add_bias_kv:
        self.quant_bias_k = Observer(BIAS_KV_SPEC, fake_quant=fq)
        self.quant_bias_v = Observer(BIAS_KV_SPEC, fake_quant=fq)

  def project_inputs(self, query, key, value):
    if self.qconfig is not None:
      query, key, value = self.quant_query(query), self.quant_key(key), self.quant_value(value)
    return self.linear_Q(query), self.linear_K(key), self.linear_V(value)

  def bias_kv(self):
    if self.qconfig is None:
      return self.bias_k, self.bias_v
    return self.quant_bias_k(self.bias_k), self.quant_bias_v(self.bias_v)

  def project_output(self, attn):
    if self.qconfig is not None:
      attn = self.quant_attn_output(attn)
    return self.out_proj(attn)

  def output_weights(self, weights, average):
    if self.qconfig is not None:
      # torch quantizes the returned weights only; V was multiplied by the float ones.
      weights = self.quant_attn_output_weights(weights)
    return core.average_heads(weights) if average else weights
