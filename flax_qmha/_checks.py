"""Argument validation for the public modules.

Every check reads only static shapes and dtypes, so it runs once at trace time
and costs nothing under ``jax.jit``. Messages name the argument, what it got and
what was expected; torch reports most of these as bare ``AssertionError``s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_config(
    *, embed_dim, num_heads, dropout, kdim, vdim, owner="MultiheadAttention"
) -> None:
  """Validates the constructor arguments shared by the float and int8 modules."""
  for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
      raise ValueError(f"{owner}: {name} must be positive, got {value}")
  if embed_dim % num_heads:
    raise ValueError(
        f"{owner}: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
    )
  for name, value in (("kdim", kdim), ("vdim", vdim)):
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{owner}: {name} must be a positive int or None, got {value!r}")
  if (isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.integer, np.floating))
      or not 0.0 <= dropout < 1.0):
    raise ValueError(f"{owner}: dropout must be a float in [0, 1), got {dropout!r}")


def check_bool_fields(owner: str, **fields) -> None:
  """Module fields that select code paths must be bools: a truthy string or None
  would silently pick a path."""
  for name, value in fields.items():
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__} {value!r}")


def check_static_flags(**flags) -> None:
  """The boolean call flags decide shapes and control flow, so they must be
  Python bools, not traced values (e.g. keyword arguments of a jitted apply)."""
  for name, value in flags.items():
    if isinstance(value, (bool, np.bool_)):
      continue
    if isinstance(value, jax.core.Tracer):
      raise TypeError(
          f"{name} must be a Python bool, got a traced value: under jax.jit pass it"
          f" statically, e.g. jax.jit(functools.partial(module.apply, {name}=...)) or"
          f" jax.jit(module.apply, static_argnames=['{name}'])"
      )
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def _check_float(name: str, x) -> None:
  dtype = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array, got dtype {dtype}")


def _check_mask_dtype(name: str, mask) -> None:
  dtype = mask.dtype if hasattr(mask, "dtype") else np.asarray(mask).dtype
  if dtype == jnp.bool_ or dtype == jnp.uint8 or jnp.issubdtype(dtype, jnp.floating):
    return
  raise TypeError(
      f"{name} must be a bool mask (True = masked) or a float mask (added to the"
      f" logits), got dtype {dtype}"
  )


def check_call(
    query, key, value, key_padding_mask, attn_mask, *,
    embed_dim: int, kdim: int, vdim: int, num_heads: int, batch_first: bool,
    is_causal: bool,
) -> bool:
  """Validates ``MultiheadAttention.__call__`` arguments (torch semantics).

  Returns:
    Whether the inputs are batched (3-D) rather than unbatched (2-D).
  """
  q_shape, k_shape, v_shape = _shape(query), _shape(key), _shape(value)
  layout = "(N, L, E)" if batch_first else "(L, N, E)"
  if len(q_shape) not in (2, 3):
    raise ValueError(
        f"query must be 3-D {layout} (batched) or 2-D (L, E) (unbatched), got shape {q_shape}"
    )
  batched = len(q_shape) == 3
  expected_rank = len(q_shape)
  for name, shape in (("key", k_shape), ("value", v_shape)):
    if len(shape) != expected_rank:
      raise ValueError(
          f"{name} must be {expected_rank}-D like query (query shape {q_shape}),"
          f" got shape {shape}"
      )
  for name, x in (("query", query), ("key", key), ("value", value)):
    _check_float(name, x)

  for name, shape, dim, dim_name in (
      ("query", q_shape, embed_dim, "embed_dim"),
      ("key", k_shape, kdim, "kdim"),
      ("value", v_shape, vdim, "vdim"),
  ):
    if shape[-1] != dim:
      raise ValueError(
          f"{name} must have last dimension {dim_name}={dim}, got shape {shape}"
      )

  if batched:
    seq_axis, batch_axis = (1, 0) if batch_first else (0, 1)
    n = q_shape[batch_axis]
    for name, shape in (("key", k_shape), ("value", v_shape)):
      if shape[batch_axis] != n:
        raise ValueError(
            f"{name} batch size {shape[batch_axis]} does not match query batch size {n}"
            f" (layout {layout}; query {q_shape}, {name} {shape})"
        )
  else:
    seq_axis, n = 0, None
  tgt_len, src_len = q_shape[seq_axis], k_shape[seq_axis]
  if v_shape[seq_axis] != src_len:
    raise ValueError(
        f"key and value must have the same sequence length, got key {k_shape} and"
        f" value {v_shape}"
    )

  if key_padding_mask is not None:
    _check_mask_dtype("key_padding_mask", key_padding_mask)
    expected = (n, src_len) if batched else (src_len,)
    if _shape(key_padding_mask) != expected:
      raise ValueError(
          f"key_padding_mask must have shape {expected} ("
          + ("(N, S)" if batched else "(S,)")
          + f"), got {_shape(key_padding_mask)}"
      )
  if attn_mask is not None:
    _check_mask_dtype("attn_mask", attn_mask)
    m_shape = _shape(attn_mask)
    first = n * num_heads if batched else num_heads
    allowed = [(tgt_len, src_len), (first, tgt_len, src_len)]
    if m_shape not in allowed:
      three_d = "(N * num_heads, L, S)" if batched else "(num_heads, L, S)"
      raise ValueError(
          f"attn_mask must have shape {allowed[0]} (L, S) or {allowed[1]} {three_d},"
          f" got {m_shape}"
      )
  elif is_causal and tgt_len != src_len:
    raise ValueError(
        f"is_causal=True without attn_mask needs equal query and key lengths, got"
        f" L={tgt_len} and S={src_len}; pass an explicit attn_mask of shape (L, S)"
    )
  return batched
