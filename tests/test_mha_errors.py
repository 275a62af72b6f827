"""Malformed constructions and calls raise ValueError/TypeError naming the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_qmha import MultiheadAttention

E, H, L, S, N = 8, 2, 4, 5, 3


def _variables(**kwargs):
  m = MultiheadAttention(E, H, **kwargs)
  kdim = kwargs.get("kdim") or E
  vdim = kwargs.get("vdim") or E
  return m, m.init(jax.random.key(0), jnp.ones((L, N, E)), jnp.ones((S, N, kdim)),
                   jnp.ones((S, N, vdim)))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(embed_dim=10, num_heads=3), ValueError, ["embed_dim (10)", "num_heads (3)"]),
        (dict(embed_dim=8, num_heads=0), ValueError, ["num_heads", "positive"]),
        (dict(embed_dim=8.0, num_heads=2), TypeError, ["embed_dim", "int"]),
        (dict(embed_dim=8, num_heads=2, dropout=1.0), ValueError, ["dropout", "[0, 1)"]),
        (dict(embed_dim=8, num_heads=2, kdim=0), ValueError, ["kdim"]),
    ],
    ids=["heads_do_not_divide", "zero_heads", "float_embed_dim", "dropout_one", "kdim_zero"],
)
def test_bad_constructor_arguments(kwargs, exc, words):
  m = MultiheadAttention(**kwargs)
  x = jnp.ones((L, N, 8))
  with pytest.raises(exc) as info:
    m.init(jax.random.key(0), x, x, x)
  for word in words:
    assert word in str(info.value), str(info.value)


q3, k3, v3 = np.ones((L, N, E), np.float32), np.ones((S, N, E), np.float32), np.ones((S, N, E), np.float32)
BAD_CALLS = {
    "query_rank_4": (dict(query=np.ones((1, L, N, E), np.float32)), ValueError,
                     ["query", "(1, 4, 3, 8)"]),
    "key_rank_mismatch": (dict(key=np.ones((S, E), np.float32)), ValueError, ["key", "3-D", "(5, 8)"]),
    "query_embed": (dict(query=np.ones((L, N, E + 1), np.float32)), ValueError,
                    ["query", "embed_dim=8", "(4, 3, 9)"]),
    "key_embed": (dict(key=np.ones((S, N, 7), np.float32)), ValueError, ["key", "kdim=8", "(5, 3, 7)"]),
    "value_embed": (dict(value=np.ones((S, N, 6), np.float32)), ValueError, ["value", "vdim=8"]),
    "key_value_lengths": (dict(value=np.ones((S + 1, N, E), np.float32)), ValueError,
                          ["key", "value", "(5, 3, 8)", "(6, 3, 8)"]),
    "batch_mismatch": (dict(key=np.ones((S, N + 1, E), np.float32),
                            value=np.ones((S, N + 1, E), np.float32)), ValueError,
                       ["batch size 4", "query batch size 3"]),
    "int_query": (dict(query=np.ones((L, N, E), np.int32)), TypeError, ["query", "int32"]),
    "kpm_shape": (dict(key_padding_mask=np.zeros((N, S + 1), bool)), ValueError,
                  ["key_padding_mask", "(3, 5)", "(3, 6)"]),
    "attn_mask_2d_shape": (dict(attn_mask=np.zeros((L, S + 1), bool)), ValueError,
                           ["attn_mask", "(4, 5)", "(4, 6)"]),
    "attn_mask_3d_shape": (dict(attn_mask=np.zeros((N, L, S), bool)), ValueError,
                           ["attn_mask", "(6, 4, 5)", "(3, 4, 5)"]),
    "attn_mask_int_dtype": (dict(attn_mask=np.zeros((L, S), np.int32)), TypeError,
                            ["attn_mask", "int32", "bool"]),
    "kpm_int_dtype": (dict(key_padding_mask=np.zeros((N, S), np.int64)), TypeError,
                      ["key_padding_mask", "int64"]),
    "causal_needs_square": (dict(is_causal=True), ValueError, ["is_causal", "L=4", "S=5"]),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_calls(name):
  overrides, exc, words = BAD_CALLS[name]
  m, variables = _variables()
  args = dict(query=q3, key=k3, value=v3) | overrides
  with pytest.raises(exc) as info:
    m.apply(variables, **args)
  for word in words:
    assert word in str(info.value), f"{name}: {word!r} not in {info.value}"


def test_unbatched_mask_shapes_are_checked():
  m, variables = _variables()
  q, k = np.ones((L, E), np.float32), np.ones((S, E), np.float32)
  with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(5,\)"):
    m.apply(variables, q, k, k, key_padding_mask=np.zeros((1, S), bool))
  with pytest.raises(ValueError, match=r"\(2, 4, 5\) \(num_heads, L, S\)"):
    m.apply(variables, q, k, k, attn_mask=np.zeros((N * H, L, S), bool))
  out, w = m.apply(variables, q, k, k, attn_mask=np.zeros((H, L, S), bool),
                   average_attn_weights=False)
  assert out.shape == (L, E) and w.shape == (H, L, S)


def test_uint8_mask_is_treated_as_bool_with_a_warning():
  m, variables = _variables()
  mask = np.zeros((L, S), np.uint8)
  mask[:, -1] = 1
  with pytest.warns(DeprecationWarning, match="attn_mask of dtype uint8"):
    out_u8, w_u8 = m.apply(variables, q3, k3, v3, attn_mask=mask)
  out_b, w_b = m.apply(variables, q3, k3, v3, attn_mask=mask.astype(bool))
  np.testing.assert_array_equal(out_u8, out_b)
  np.testing.assert_array_equal(w_u8, w_b)


def test_errors_are_raised_at_trace_time_under_jit():
  m, variables = _variables()
  with pytest.raises(ValueError, match="key_padding_mask"):
    jax.jit(lambda kpm: m.apply(variables, q3, k3, v3, key_padding_mask=kpm))(
        jnp.zeros((N, S + 2), bool))


def test_traced_flags_are_a_clear_error():
  m, variables = _variables()
  with pytest.raises(TypeError, match=r"need_weights must be a Python bool, got a traced value"):
    jax.jit(m.apply)(variables, q3, k3, v3, need_weights=False)
  out, w = jax.jit(m.apply, static_argnames=["need_weights"])(variables, q3, k3, v3,
                                                              need_weights=False)
  assert w is None and out.shape == q3.shape
  with pytest.raises(TypeError, match="is_causal must be a bool, got str"):
    m.apply(variables, q3, k3, v3, is_causal="yes")
