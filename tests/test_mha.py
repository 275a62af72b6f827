"""Float MultiheadAttention: transforms, dtypes, dropout, masking edge cases, init, errors."""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_qmha import MultiheadAttention
from flax_qmha import _attention_core as core

E, H, L, S, N = 16, 4, 6, 6, 3


def _init(module, *shapes, seed=0):
  xs = [jnp.asarray(np.random.default_rng(seed + i).normal(size=s), jnp.float32)
        for i, s in enumerate(shapes)]
  variables = module.init(jax.random.key(seed), *xs)
  return variables, xs


def test_jit_matches_eager_and_grad_is_finite():
  m = MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True)
  variables, (q, k, v) = _init(m, (L, N, E), (S, N, E), (S, N, E))
  eager = m.apply(variables, q, k, v)
  jitted = jax.jit(m.apply)(variables, q, k, v)
  for a, b in zip(eager, jitted):
    np.testing.assert_allclose(a, b, atol=1e-6)
  grads = jax.grad(lambda p: jnp.sum(m.apply({"params": p}, q, k, v)[0] ** 2))(
      variables["params"])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_vmap_over_unbatched_inputs_equals_batched_call():
  m = MultiheadAttention(E, H, batch_first=True)
  variables, (q, k, v) = _init(m, (N, L, E), (N, S, E), (N, S, E))
  kpm = np.zeros((N, S), bool)
  kpm[:, -2:] = True
  batched_out, batched_w = m.apply(variables, q, k, v, key_padding_mask=kpm)
  vmapped_out, vmapped_w = jax.vmap(
      lambda q, k, v, kpm: m.apply(variables, q, k, v, key_padding_mask=kpm)
  )(q, k, v, kpm)
  np.testing.assert_allclose(vmapped_out, batched_out, atol=1e-6)
  np.testing.assert_allclose(vmapped_w, batched_w, atol=1e-6)


def test_bfloat16_compute_is_close_to_float32_and_softmax_stays_float32():
  m32 = MultiheadAttention(E, H)
  m16 = MultiheadAttention(E, H, dtype=jnp.bfloat16)
  variables, (q, k, v) = _init(m32, (L, N, E), (S, N, E), (S, N, E))
  out32, w32 = m32.apply(variables, q, k, v)
  out16, w16 = jax.jit(m16.apply)(variables, q, k, v)
  assert out16.dtype == jnp.bfloat16 and w16.dtype == jnp.bfloat16
  # bf16 has an 8-bit mantissa: relative error ~2**-8 per rounding, a few roundings deep.
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=5e-2, rtol=5e-2)
  np.testing.assert_allclose(np.asarray(w16, np.float32), w32, atol=1e-2)
  probs = core.masked_softmax(jnp.ones((1, 1, 2, 300), jnp.bfloat16), None)
  assert probs.dtype == jnp.float32
  # 300 equal bf16 logits: in float32 each probability is exactly 1/300.
  np.testing.assert_allclose(probs, 1 / 300, rtol=1e-6)


def test_param_dtype_bfloat16():
  m = MultiheadAttention(E, H, param_dtype=jnp.bfloat16, add_bias_kv=True)
  variables, (q, k, v) = _init(m, (L, N, E), (S, N, E), (S, N, E))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(variables))
  out, _ = m.apply(variables, q, k, v)
  assert bool(jnp.all(jnp.isfinite(out)))


def test_dropout_acts_on_weights_and_output_uses_dropped_weights():
  p = 0.5
  m = MultiheadAttention(E, H, dropout=p, batch_first=True)
  variables, (q, k, v) = _init(m, (N, L, E), (N, S, E), (N, S, E))
  run = jax.jit(lambda rng: m.apply(
      variables, q, k, v, average_attn_weights=False, deterministic=False,
      rngs={"dropout": rng}))
  out, w = run(jax.random.key(1))
  out_again, w_again = run(jax.random.key(1))
  np.testing.assert_array_equal(out, out_again)  # same rng, same mask
  out_other, _ = run(jax.random.key(2))
  assert not np.allclose(out, out_other)
  zero_fraction = float(jnp.mean(w == 0))
  assert abs(zero_fraction - p) < 0.1, zero_fraction
  _, w_det = m.apply(variables, q, k, v, average_attn_weights=False)
  kept = np.asarray(w) != 0
  np.testing.assert_allclose(np.asarray(w)[kept], np.asarray(w_det)[kept] / (1 - p), rtol=1e-6)
  # The output is the out_proj of the dropped (returned, per-head) weights times V.
  prm = variables["params"]
  vh = (v @ prm["linear_V"]["kernel"] + prm["linear_V"]["bias"]).reshape(N, S, H, E // H)
  attn = jnp.einsum("NHLS,NSHD->NLHD", w, vh).reshape(N, L, E)
  expected = attn @ prm["out_proj"]["kernel"] + prm["out_proj"]["bias"]
  np.testing.assert_allclose(out, expected, atol=1e-5)
  det_out, _ = m.apply(variables, q, k, v)
  det_out2, _ = m.apply(variables, q, k, v, deterministic=True, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(det_out, det_out2)


def test_dropout_without_rng_is_a_clear_error():
  m = MultiheadAttention(E, H, dropout=0.1)
  variables, (q, k, v) = _init(m, (L, N, E), (S, N, E), (S, N, E))
  with pytest.raises(Exception, match="dropout"):
    m.apply(variables, q, k, v, deterministic=False)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("how", ["bool_attn_mask", "float_attn_mask", "key_padding_mask"])
def test_fully_masked_rows_give_zero_weights_and_no_nan(how, bias):
  m = MultiheadAttention(E, H, bias=bias)
  variables, (q, k, v) = _init(m, (L, N, E), (S, N, E), (S, N, E))
  attn_mask = kpm = None
  if how == "bool_attn_mask":
    attn_mask = np.zeros((L, S), bool)
    attn_mask[2] = True  # query 2 may attend nothing
  elif how == "float_attn_mask":
    attn_mask = np.zeros((L, S), np.float32)
    attn_mask[2] = -np.inf
  else:
    kpm = np.zeros((N, S), bool)
    kpm[1] = True  # batch 1 has no key at all

  def loss(params):
    out, w = m.apply({"params": params}, q, k, v, attn_mask=attn_mask, key_padding_mask=kpm)
    return jnp.sum(out) + jnp.sum(w), (out, w)

  grads, (out, w) = jax.grad(loss, has_aux=True)(variables["params"])
  assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(jnp.isfinite(w)))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  rows = (slice(None), 2) if kpm is None else (1, slice(None))  # weights are [N, L, S]
  out_rows = (2, slice(None)) if kpm is None else (slice(None), 1)  # output is [L, N, E]
  np.testing.assert_array_equal(w[rows], 0.0)
  # No attention: the row is out_proj applied to zeros, i.e. its bias.
  expected = variables["params"]["out_proj"]["bias"] if bias else 0.0
  np.testing.assert_allclose(out[out_rows], np.broadcast_to(expected, out[out_rows].shape))


def test_initialisation_follows_torch():
  e = 64
  packed = MultiheadAttention(e, 4, add_bias_kv=True).init(
      jax.random.key(0), jnp.ones((3, 2, e)), jnp.ones((3, 2, e)), jnp.ones((3, 2, e)))["params"]
  bound_packed = math.sqrt(6 / (e + 3 * e))  # xavier over torch's (3E, E) in_proj_weight
  for name in ("linear_Q", "linear_K", "linear_V"):
    kernel = np.asarray(packed[name]["kernel"])
    assert np.abs(kernel).max() <= bound_packed
    assert np.abs(kernel).max() > 0.95 * bound_packed
    np.testing.assert_array_equal(packed[name]["bias"], 0.0)
  out_kernel = np.asarray(packed["out_proj"]["kernel"])
  assert np.abs(out_kernel).max() <= 1 / math.sqrt(e) < 1.05 * np.abs(out_kernel).max()
  np.testing.assert_array_equal(packed["out_proj"]["bias"], 0.0)
  both = np.concatenate([np.ravel(packed["bias_k"]), np.ravel(packed["bias_v"])])
  assert packed["bias_k"].shape == (1, 1, e)
  assert 0.7 / math.sqrt(e) < both.std() < 1.3 / math.sqrt(e)  # xavier_normal: 1/sqrt(E)

  separate = MultiheadAttention(e, 4, kdim=32, vdim=16, bias=False).init(
      jax.random.key(0), jnp.ones((3, 2, e)), jnp.ones((5, 2, 32)), jnp.ones((5, 2, 16)))["params"]
  assert separate["linear_K"]["kernel"].shape == (32, e)
  assert separate["linear_V"]["kernel"].shape == (16, e)
  assert "bias" not in separate["linear_Q"] and "bias" not in separate["out_proj"]
  assert np.abs(separate["linear_V"]["kernel"]).max() <= math.sqrt(6 / (16 + e))
  assert np.abs(separate["linear_V"]["kernel"]).max() > 0.95 * math.sqrt(6 / (16 + e))


def test_import_without_torch():
  code = (
      "import sys; sys.modules['torch'] = None\n"
      "import jax, jax.numpy as jnp, flax_qmha\n"
      "m = flax_qmha.MultiheadAttention(8, 2)\n"
      "x = jnp.ones((3, 2, 8))\n"
      "out, w = m.apply(m.init(jax.random.key(0), x, x, x), x, x, x)\n"
      "assert out.shape == (3, 2, 8) and w.shape == (2, 3, 3)\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
