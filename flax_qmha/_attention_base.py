"""The forward pass shared by the float/QAT and the int8 attention modules.

``AttentionBase.__call__`` does what does not depend on how numbers are
represented: validation, layouts, masks, ``add_bias_kv``/``add_zero_attn``,
dropout and the returned weights' shape. Subclasses supply the projections and
the attention core through five small hooks.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_qmha import _attention_core as core
from flax_qmha import _checks


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


def float_attention(q, k, v, mask, *, num_heads, dropout, dropout_rng):
  """The float attention core on projected ``[N, L|S, E]`` tensors.

  Returns ``(attn [N, L, E], weights [N, H, L, S])``; the weights are those that
  multiplied V, after dropout, as torch returns them.
  """
  q, k, v = (core.split_heads(x, num_heads) for x in (q, k, v))
  weights = core.masked_softmax(core.attention_logits(q, k), mask)
  weights = core.attention_dropout(weights, dropout, dropout_rng)
  return core.merge_heads(core.weighted_values(weights, v)), weights


class AttentionBase(nn.Module):
  """torch's constructor fields and ``forward`` flow; see ``MultiheadAttention``."""

  embed_dim: int
  num_heads: int
  dropout: float = 0.0
  bias: bool = True
  add_bias_kv: bool = False
  add_zero_attn: bool = False
  kdim: int | None = None
  vdim: int | None = None
  batch_first: bool = False

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def key_dim(self) -> int:
    return self.embed_dim if self.kdim is None else self.kdim

  @property
  def value_dim(self) -> int:
    return self.embed_dim if self.vdim is None else self.vdim

  def check_config(self) -> None:
    _checks.check_config(
        embed_dim=self.embed_dim, num_heads=self.num_heads, dropout=self.dropout,
        kdim=self.kdim, vdim=self.vdim, owner=type(self).__name__,
    )
    _checks.check_bool_fields(
        type(self).__name__, bias=self.bias, add_bias_kv=self.add_bias_kv,
        add_zero_attn=self.add_zero_attn, batch_first=self.batch_first,
    )

  # Hooks -------------------------------------------------------------------
  def project_inputs(self, query, key, value):
    """``[N, L, E], [N, S, kdim], [N, S, vdim]`` -> float ``q, k, v [N, *, E]``."""
    raise NotImplementedError

  def bias_kv(self) -> tuple[jax.Array, jax.Array]:
    """``bias_k``, ``bias_v`` ``(1, 1, E)`` as appended (``add_bias_kv`` only)."""
    raise NotImplementedError

  def attend(self, q, k, v, mask, dropout_rng):
    """``(attn [N, L, E], weights [N, H, L, S])``; see :func:`float_attention`."""
    return float_attention(q, k, v, mask, num_heads=self.num_heads, dropout=self.dropout,
                           dropout_rng=dropout_rng)

  def project_output(self, attn):
    """``[N, L, E]`` -> ``[N, L, E]``."""
    raise NotImplementedError

  def output_weights(self, weights, average: bool):
    """Per-head ``[N, H, L, S]`` -> returned weights (``[N, L, S]`` averaged)."""
    return core.average_heads(weights) if average else weights

  # Forward -----------------------------------------------------------------
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
    """Attends from ``query`` to ``key``/``value`` with torch's semantics.

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
        with ``attn_mask``, the mask is used as given (torch too, except with
        ``need_weights=False`` and no ``key_padding_mask``, where it trusts the
        hint and applies its own causal mask instead).
      deterministic: disable dropout; otherwise the ``dropout`` rng is used.

    Returns:
      ``(attn_output, attn_weights)``: output shaped like ``query`` with
      ``embed_dim`` features; weights ``(N, L, S)`` (averaged) or
      ``(N, H, L, S)``, without ``N`` for unbatched inputs, or ``None`` when
      ``need_weights`` is false. ``S`` counts the extra positions added by
      ``add_bias_kv``/``add_zero_attn``.
    """
    _checks.check_static_flags(
        need_weights=need_weights, average_attn_weights=average_attn_weights,
        is_causal=is_causal, deterministic=deterministic,
    )
    batched = _checks.check_call(
        query, key, value, key_padding_mask, attn_mask,
        embed_dim=self.embed_dim, kdim=self.key_dim, vdim=self.value_dim,
        num_heads=self.num_heads, batch_first=self.batch_first, is_causal=is_causal,
    )
    query, key, value = (
        to_batch_first(jnp.asarray(x), batched, self.batch_first) for x in (query, key, value)
    )
    attn_mask = core.additive_mask(attn_mask, "attn_mask")
    key_padding_mask = core.additive_mask(key_padding_mask, "key_padding_mask")
    if attn_mask is None and is_causal:
      attn_mask = core.causal_mask(query.shape[1], key.shape[1])
    if not batched and key_padding_mask is not None:
      key_padding_mask = key_padding_mask[None]

    q, k, v = self.project_inputs(query, key, value)
    if self.add_bias_kv:
      k, v = core.append_bias_kv(k, v, *self.bias_kv())
      attn_mask, key_padding_mask = map(core.pad_key_axis, (attn_mask, key_padding_mask))
    if self.add_zero_attn:
      k, v = core.append_zero_attn(k, v)
      attn_mask, key_padding_mask = map(core.pad_key_axis, (attn_mask, key_padding_mask))
    mask = core.merge_masks(attn_mask, key_padding_mask, num_heads=self.num_heads)

    dropout_rng = None
    if not deterministic and self.dropout > 0.0:
      dropout_rng = self.make_rng("dropout")
    attn, weights = self.attend(q, k, v, mask, dropout_rng)
    out = from_batch_first(self.project_output(attn), batched, self.batch_first)
    if not need_weights:
      # Unlike torch's quantizable module, the returned weights' observer runs only
      # when they are returned: their quantization never affects the output, and
      # observing [N, H, L, S] would cost QAT ~40% of a training step.
      return out, None
    weights = self.output_weights(weights, average_attn_weights).astype(out.dtype)
    return out, weights if batched else weights[0]
