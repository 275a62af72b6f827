"""``MultiheadAttention``: torch.nn.MultiheadAttention's semantics as a Flax module."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_qmha import _attention_core as core
from flax_qmha import _checks
from flax_qmha import _initializers as inits
from flax_qmha._projection import Projection

Dtype = Any


def to_batch_first(x: jax.Array, batched: bool, batch_first: bool) -> jax.Array:
  """``(L, N, E)``, ``(N, L, E)`` or unbatched ``(L, E)`` -> ``(N, L, E)``."""
  if not batched:
    return x[None]
  return x if batch_first else jnp.swapaxes(x, 0, 1)


def from_batch_first(x: jax.Array, batched: bool, batch_first: bool) -> jax.Array:
  """Inverse of :func:`to_batch_first`."""
  if not batched:
    return x[0]
  return x if batch_first else jnp.swapaxes(x, 0, 1)


def prepare_masks(
    attn_mask, key_padding_mask, *, batched: bool, is_causal: bool,
    tgt_len: int, src_len: int,
):
  """Validated masks -> additive float32 ``attn_mask`` (2-D or 3-D) and
  ``key_padding_mask`` ``[N, S]``, with ``is_causal`` resolved as torch does:
  an explicit ``attn_mask`` wins; without one a causal mask is built."""
  attn_mask = core.additive_mask(attn_mask, "attn_mask")
  key_padding_mask = core.additive_mask(key_padding_mask, "key_padding_mask")
  if attn_mask is None and is_causal:
    attn_mask = core.causal_mask(tgt_len, src_len)
  if not batched and key_padding_mask is not None:
    key_padding_mask = key_padding_mask[None]
  return attn_mask, key_padding_mask


class MultiheadAttention(nn.Module):
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
    qconfig: quantization configuration; ``None`` is a plain float module.

  Parameters (``params``): ``linear_Q``, ``linear_K``, ``linear_V``, ``out_proj``,
  each ``{"kernel": (in_features, embed_dim), "bias": (embed_dim,)}``, and
  ``bias_k``/``bias_v`` of shape ``(1, 1, embed_dim)`` with ``add_bias_kv``.
  """

  embed_dim: int
  num_heads: int
  dropout: float = 0.0
  bias: bool = True
  add_bias_kv: bool = False
  add_zero_attn: bool = False
  kdim: int | None = None
  vdim: int | None = None
  batch_first: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  qconfig: Any = None

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def key_dim(self) -> int:
    return self.embed_dim if self.kdim is None else self.kdim

  @property
  def value_dim(self) -> int:
    return self.embed_dim if self.vdim is None else self.vdim

  def setup(self):
    _checks.check_config(
        embed_dim=self.embed_dim, num_heads=self.num_heads, dropout=self.dropout,
        kdim=self.kdim, vdim=self.vdim,
    )
    e = self.embed_dim
    packed = self.key_dim == e and self.value_dim == e
    # torch initialises the packed (3E, E) in_proj_weight as one matrix.
    fan_out = 3 * e if packed else e

    def projection(name, fan_in, kernel_init):
      return Projection(
          e, use_bias=self.bias, dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=kernel_init, name=name,
      )

    self.linear_Q = projection("linear_Q", e, inits.xavier_uniform(e, fan_out))
    self.linear_K = projection(
        "linear_K", self.key_dim, inits.xavier_uniform(self.key_dim, fan_out)
    )
    self.linear_V = projection(
        "linear_V", self.value_dim, inits.xavier_uniform(self.value_dim, fan_out)
    )
    self.out_proj = projection("out_proj", e, inits.torch_linear_kernel(e))
    if self.add_bias_kv:
      bias_init = inits.xavier_normal_bias_kv(e)
      self.bias_k = self.param("bias_k", bias_init, (1, 1, e), self.param_dtype)
      self.bias_v = self.param("bias_v", bias_init, (1, 1, e), self.param_dtype)

  def __call__(
      self,
      query: jax.Array,
      key: jax.Array,
      value: jax.Array,
      key_padding_mask: jax.Array | None = None,
      need_weights: bool = True,
      attn_mask: jax.Array | None = None,
      average_attn_weights: bool = True,
      is_causal: bool = False,
      deterministic: bool = True,
  ) -> tuple[jax.Array, jax.Array | None]:
    """Attends from ``query`` to ``key``/``value``.

    Args:
      query: ``(L, N, E)``, ``(N, L, E)`` with ``batch_first``, or ``(L, E)``.
      key: ``(S, N, kdim)``, ``(N, S, kdim)`` or ``(S, kdim)``.
      value: ``(S, N, vdim)``, ``(N, S, vdim)`` or ``(S, vdim)``.
      key_padding_mask: ``(N, S)`` or ``(S,)``; bool (``True`` = ignore the key)
        or float (added to the logits).
      need_weights: also return the attention weights.
      attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)`` (``(num_heads, L, S)``
        unbatched); bool (``True`` = not allowed) or float (added).
      average_attn_weights: average the returned weights over heads.
      is_causal: without ``attn_mask``, apply a causal mask (needs ``L == S``);
        with ``attn_mask``, the mask is used as given (torch's behaviour).
      deterministic: disable dropout; otherwise the ``dropout`` rng is used.

    Returns:
      ``(attn_output, attn_weights)``: output shaped like ``query`` with
      ``embed_dim`` features; weights ``(N, L, S)`` (averaged) or
      ``(N, H, L, S)``, without ``N`` for unbatched inputs, or ``None`` when
      ``need_weights`` is false. ``S`` counts the extra positions added by
      ``add_bias_kv``/``add_zero_attn``.
    """
    batched = _checks.check_call(
        query, key, value, key_padding_mask, attn_mask,
        embed_dim=self.embed_dim, kdim=self.key_dim, vdim=self.value_dim,
        num_heads=self.num_heads, batch_first=self.batch_first, is_causal=is_causal,
    )
    query, key, value = (
        to_batch_first(jnp.asarray(x), batched, self.batch_first)
        for x in (query, key, value)
    )
    attn_mask, key_padding_mask = prepare_masks(
        attn_mask, key_padding_mask, batched=batched, is_causal=is_causal,
        tgt_len=query.shape[1], src_len=key.shape[1],
    )

    q = self.linear_Q(query)  # [N, L, E]
    k = self.linear_K(key)  # [N, S, E]
    v = self.linear_V(value)  # [N, S, E]
    if self.add_bias_kv:
      k, v = core.append_bias_kv(k, v, self.bias_k, self.bias_v)
      attn_mask, key_padding_mask = map(core.pad_key_axis, (attn_mask, key_padding_mask))
    if self.add_zero_attn:
      k, v = core.append_zero_attn(k, v)
      attn_mask, key_padding_mask = map(core.pad_key_axis, (attn_mask, key_padding_mask))
    mask = core.merge_masks(attn_mask, key_padding_mask, num_heads=self.num_heads)

    q, k, v = (core.split_heads(x, self.num_heads) for x in (q, k, v))
    logits = core.attention_logits(q, k)  # [N, H, L, S]
    weights = core.masked_softmax(logits, mask)
    dropout_rng = None
    if not deterministic and self.dropout > 0.0:
      dropout_rng = self.make_rng("dropout")
    weights = core.attention_dropout(weights, self.dropout, dropout_rng)
    attn = core.merge_heads(core.weighted_values(weights, v))  # [N, L, E]
    out = self.out_proj(attn)
    out = from_batch_first(out, batched, self.batch_first)

    if not need_weights:
      return out, None
    if average_attn_weights:
      weights = core.average_heads(weights)
    weights = weights.astype(out.dtype)
    if not batched:
      weights = weights[0]
    return out, weights
