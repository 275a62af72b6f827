"""The attention maths shared by the float, QAT and int8 modules, as pure functions.

Layout convention inside the library: batch first. Projected tensors are
``[N, L, E]`` (queries) and ``[N, S, E]`` (keys/values); per-head tensors are
``[N, L, H, D]``; attention weights and additive masks are ``[N, H, L, S]``
(masks may broadcast over ``N`` and ``H`` with size-1 axes).

Masks follow ``torch.nn.MultiheadAttention``: boolean ``True`` means *not
allowed*, floating masks are added to the logits. Every mask is turned into a
float32 additive mask before use, so bool and float masks mix freely.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np


def additive_mask(mask: jax.Array | None, name: str) -> jax.Array | None:
  """Returns ``mask`` as a float32 additive mask (``-inf`` where not allowed).

  Args:
    mask: ``None``, a boolean mask (``True`` = masked), a floating mask (added to
      the logits), or a ``uint8`` mask, which torch used to accept and which is
      treated as boolean with a warning.
    name: the argument's name, for messages.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype == jnp.uint8:
    warnings.warn(
        f"{name} of dtype uint8 is deprecated (as in torch); it is treated as a"
        " boolean mask where non-zero means masked. Pass a bool mask instead.",
        DeprecationWarning,
        stacklevel=3,
    )
    mask = mask != 0
  if mask.dtype == jnp.bool_:
    return jnp.where(mask, -jnp.inf, 0.0).astype(jnp.float32)
  return mask.astype(jnp.float32)


def causal_mask(tgt_len: int, src_len: int) -> jax.Array:
  """Additive ``[L, S]`` mask hiding keys after each query position."""
  upper = np.triu(np.ones((tgt_len, src_len), dtype=bool), k=1)
  return jnp.where(upper, -jnp.inf, 0.0).astype(jnp.float32)


def merge_masks(
    attn_mask: jax.Array | None,
    key_padding_mask: jax.Array | None,
    *,
    num_heads: int,
) -> jax.Array | None:
  """Combines torch's two masks into one additive ``[N|1, H|1, L, S]`` mask.

  Args:
    attn_mask: additive ``[L, S]`` (shared by all batches and heads) or
      ``[N * num_heads, L, S]`` (torch's batch-major, head-minor order).
    key_padding_mask: additive ``[N, S]``.
    num_heads: number of heads, to unflatten a 3-D ``attn_mask``.

  Returns:
    The sum of both masks, broadcastable to ``[N, H, L, S]``, or ``None``.
  """
  merged = None
  if attn_mask is not None:
    if attn_mask.ndim == 2:
      merged = attn_mask[None, None]  # [1, 1, L, S]
    else:
      n_h, tgt_len, src_len = attn_mask.shape
      merged = attn_mask.reshape(n_h // num_heads, num_heads, tgt_len, src_len)
  if key_padding_mask is not None:
    padding = key_padding_mask[:, None, None, :]  # [N, 1, 1, S]
    merged = padding if merged is None else merged + padding
  return merged


def pad_key_axis(mask: jax.Array | None) -> jax.Array | None:
  """Appends one allowed (zero) key position to an additive mask, as torch's
  ``F.pad(mask, (0, 1))`` does for ``add_bias_kv`` and ``add_zero_attn``."""
  if mask is None:
    return None
  pad = [(0, 0)] * (mask.ndim - 1) + [(0, 1)]
  return jnp.pad(mask, pad)


def append_bias_kv(
    k: jax.Array, v: jax.Array, bias_k: jax.Array, bias_v: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Appends the learned ``bias_k``/``bias_v`` (shape ``[1, 1, E]``) as one more
  key/value position: ``[N, S, E] -> [N, S + 1, E]``."""
  n = k.shape[0]
  bias_k = jnp.broadcast_to(bias_k.astype(k.dtype), (n, 1, k.shape[-1]))
  bias_v = jnp.broadcast_to(bias_v.astype(v.dtype), (n, 1, v.shape[-1]))
  return jnp.concatenate([k, bias_k], axis=1), jnp.concatenate([v, bias_v], axis=1)


def append_zero_attn(
    k: jax.Array, v: jax.Array, k_zero: jax.Array | float = 0.0,
    v_zero: jax.Array | float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """Appends one all-zero key/value position: ``[N, S, E] -> [N, S + 1, E]``.

  ``k_zero``/``v_zero`` let the int8 path fill with the zero point instead of 0,
  which is what "zero" means in the quantized domain (torch does the same).
  """
  n, _, e_k = k.shape
  e_v = v.shape[-1]
  zk = jnp.full((n, 1, e_k), k_zero, dtype=k.dtype)
  zv = jnp.full((n, 1, e_v), v_zero, dtype=v.dtype)
  return jnp.concatenate([k, zk], axis=1), jnp.concatenate([v, zv], axis=1)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """``[N, T, E] -> [N, T, H, D]``."""
  n, t, e = x.shape
  return x.reshape(n, t, num_heads, e // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
  """``[N, T, H, D] -> [N, T, H * D]``."""
  n, t, h, d = x.shape
  return x.reshape(n, t, h * d)


def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """Scaled dot products ``q k^T / sqrt(D)``: ``[N, L, H, D], [N, S, H, D] ->
  [N, H, L, S]``.

  The query is scaled before the product, as torch does (``q * D**-0.5``), so
  rounding matches torch's float module.
  """
  head_dim = q.shape[-1]
  q = q * jnp.asarray(float(head_dim) ** -0.5, q.dtype)
  return jnp.einsum("NLHD,NSHD->NHLS", q, k)


def masked_softmax(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Softmax over keys in float32, with rows whose keys are all masked set to 0.

  torch returns NaN for such rows; a zero row is the only value that keeps the
  output finite and the gradients defined.

  Args:
    logits: ``[N, H, L, S]`` in any float dtype.
    mask: additive mask broadcastable to ``logits`` or ``None``.

  Returns:
    float32 ``[N, H, L, S]`` probabilities.
  """
  logits = logits.astype(jnp.float32)
  if mask is not None:
    logits = logits + mask
  # initial: S = 0 keys (torch allows it) is a row with no keys, not an error.
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True, initial=-jnp.inf))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  unnormalized = jnp.exp(logits - row_max)
  total = jnp.sum(unnormalized, axis=-1, keepdims=True)
  has_keys = total > 0
  return jnp.where(has_keys, unnormalized / jnp.where(has_keys, total, 1.0), 0.0)


def attention_dropout(
    weights: jax.Array, rate: float, rng: jax.Array | None
) -> jax.Array:
  """Inverted dropout on the attention weights (torch's ``F.dropout``)."""
  if rng is None or rate == 0.0:
    return weights
  keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
  return jnp.where(keep, weights / jnp.asarray(1.0 - rate, weights.dtype), 0.0)


def weighted_values(weights: jax.Array, v: jax.Array) -> jax.Array:
  """``[N, H, L, S], [N, S, H, D] -> [N, L, H, D]``."""
  return jnp.einsum("NHLS,NSHD->NLHD", weights.astype(v.dtype), v)


def average_heads(weights: jax.Array) -> jax.Array:
  """``[N, H, L, S] -> [N, L, S]``, torch's ``average_attn_weights=True``."""
  return jnp.mean(weights, axis=1)
