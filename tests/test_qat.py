"""MultiheadAttention with a qconfig: calibration, fake quantization, QAT training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_qmha as fq

E, H, L, S, N = 16, 4, 6, 5, 3

OBSERVED_POINTS = {
    "quant_query", "quant_key", "quant_value", "quant_attn_output",
    "quant_attn_output_weights", "linear_Q", "linear_K", "linear_V", "out_proj",
}


def _data(seed=0, n=N):
  rng = np.random.default_rng(seed)
  return tuple(rng.normal(size=s).astype(np.float32) for s in ((L, n, E), (S, n, E), (S, n, E)))


def _stats_leaves(variables):
  return jax.tree_util.tree_leaves_with_path(variables["quant_stats"])


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_post_training_qconfig_only_observes(backend):
  q, k, v = _data()
  float_module = fq.MultiheadAttention(E, H, add_bias_kv=True)
  module = fq.MultiheadAttention(E, H, add_bias_kv=True, qconfig=fq.get_default_qconfig(backend))
  variables = module.init(jax.random.key(0), q, k, v)
  (out, w), updates = module.apply(variables, q, k, v, mutable=["quant_stats"])
  ref_out, ref_w = float_module.apply({"params": variables["params"]}, q, k, v)
  np.testing.assert_array_equal(out, ref_out)
  np.testing.assert_array_equal(w, ref_w)
  stats = updates["quant_stats"]
  assert set(stats) == OBSERVED_POINTS | {"quant_bias_k", "quant_bias_v"}
  # Observe-only: no weight observers during calibration (convert observes the final weights).
  assert set(stats["linear_Q"]) == {"activation_post_process"}
  np.testing.assert_allclose(stats["quant_query"]["min_val"], q.min())
  np.testing.assert_allclose(stats["quant_query"]["max_val"], q.max())
  grad = jax.grad(lambda p: jnp.sum(module.apply({**variables, "params": p}, q, k, v)[0]))
  ref_grad = jax.grad(lambda p: jnp.sum(float_module.apply({"params": p}, q, k, v)[0]))
  jax.tree.map(np.testing.assert_array_equal, grad(variables["params"]),
               ref_grad(variables["params"]))


def test_statistics_update_only_when_mutable_and_never_during_init():
  q, k, v = _data()
  module = fq.MultiheadAttention(E, H, qconfig=fq.get_default_qat_qconfig("x86"))
  variables = module.init(jax.random.key(0), q, k, v)
  for path, leaf in _stats_leaves(variables):
    name = jax.tree_util.keystr(path)
    if name.endswith("['min_val']"):
      assert np.all(np.isposinf(leaf)), name  # torch's initial +inf
    if name.endswith("['max_val']"):
      assert np.all(np.isneginf(leaf)), name
  assert "weight_fake_quant" in variables["quant_stats"]["linear_Q"]
  assert variables["quant_stats"]["linear_Q"]["weight_fake_quant"]["min_val"].shape == (E,)
  _, updates = module.apply(variables, q, k, v, mutable=["quant_stats"])
  calibrated = {**variables, **updates}
  assert all(np.all(np.isfinite(leaf)) for _, leaf in _stats_leaves(calibrated))
  # Frozen: applying without mutable quant_stats changes nothing and still fake-quantizes.
  frozen_out, _ = module.apply(calibrated, q, k, v)
  _, again = module.apply(calibrated, *_data(1), mutable=["quant_stats"])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), again["quant_stats"],
                         calibrated["quant_stats"])
  assert any(jax.tree.leaves(changed))  # a mutable pass does move the moving averages
  float_out, _ = fq.MultiheadAttention(E, H).apply({"params": variables["params"]}, q, k, v)
  relative_rms = float(jnp.sqrt(jnp.mean((frozen_out - float_out) ** 2) / jnp.mean(float_out**2)))
  assert 0 < relative_rms < 0.1, relative_rms


def test_qat_fake_quantizes_every_point():
  """Each fake-quantized point lies on its grid: check the projection output of
  linear_Q and the returned attention weights by re-quantizing them."""
  q, k, v = _data()
  module = fq.MultiheadAttention(E, H, qconfig=fq.get_default_qat_qconfig("x86"))
  variables = module.init(jax.random.key(0), q, k, v)
  _, updates = module.apply(variables, q, k, v, mutable=["quant_stats"])
  variables = {**variables, **updates}
  (_, w), state = module.apply(variables, q, k, v, average_attn_weights=False,
                               capture_intermediates=True, mutable=["intermediates"])
  from flax_qmha._observers import calculate_stats_qparams
  spec = module.qconfig.activation
  scale, zp = calculate_stats_qparams(spec, variables["quant_stats"]["quant_attn_output_weights"])
  levels = np.asarray(w) / float(scale) + int(zp)
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
  q_out = state["intermediates"]["linear_Q"]["__call__"][0]
  scale, zp = calculate_stats_qparams(
      spec, variables["quant_stats"]["linear_Q"]["activation_post_process"])
  levels = np.asarray(q_out) / float(scale) + int(zp)
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
  assert levels.min() >= -1e-3 and levels.max() <= 127 + 1e-3  # x86: reduce_range 0..127


@pytest.mark.parametrize(
    "kwargs, call",
    [
        (dict(batch_first=True), dict(is_causal=True)),
        (dict(add_bias_kv=True, add_zero_attn=True), dict(key_padding_mask="kpm")),
        (dict(kdim=12, vdim=20, bias=False), dict(attn_mask="float3d", need_weights=False)),
        (dict(dropout=0.3), dict(deterministic=False)),
    ],
    ids=["batch_first-causal", "bias_kv-zero_attn-kpm", "kvdim-no_bias-mask3d", "dropout"],
)
def test_flags_keep_working_under_qat(kwargs, call):
  rng = np.random.default_rng(0)
  kdim, vdim = kwargs.get("kdim", E), kwargs.get("vdim", E)
  shapes = [(L, N, E), (L, N, kdim), (L, N, vdim)]
  if kwargs.get("batch_first"):
    shapes = [(N, L, s[-1]) for s in shapes]
  q, k, v = (rng.normal(size=s).astype(np.float32) for s in shapes)
  call = dict(call)
  if call.get("key_padding_mask") == "kpm":
    call["key_padding_mask"] = np.arange(L)[None].repeat(N, 0) >= L - 2
  if call.get("attn_mask") == "float3d":
    call["attn_mask"] = rng.normal(size=(N * H, L, L)).astype(np.float32)
  rngs = {"dropout": jax.random.key(1)} if not call.get("deterministic", True) else {}
  qat = fq.MultiheadAttention(E, H, qconfig=fq.get_default_qat_qconfig("fbgemm"), **kwargs)
  flt = fq.MultiheadAttention(E, H, **kwargs)
  variables = qat.init(jax.random.key(0), q, k, v)
  (out, w), _ = qat.apply(variables, q, k, v, mutable=["quant_stats"], rngs=rngs, **call)
  ref_out, ref_w = flt.apply({"params": variables["params"]}, q, k, v, rngs=rngs, **call)
  assert out.shape == ref_out.shape and np.all(np.isfinite(out))
  assert (w is None) == (ref_w is None)
  # Fake quantization is a small perturbation of the float result.
  assert float(jnp.max(jnp.abs(out - ref_out))) < 0.25 * float(jnp.max(jnp.abs(ref_out)))


def test_qat_training_loop_decreases_loss_and_converts():
  """A few optax steps on a synthetic task: learn a random teacher attention."""
  rng = np.random.default_rng(0)
  q = rng.normal(size=(8, 16, E)).astype(np.float32)
  teacher = fq.MultiheadAttention(E, H, batch_first=True)
  teacher_vars = teacher.init(jax.random.key(42), q, q, q)
  target, _ = teacher.apply(teacher_vars, q, q, q)

  module = fq.MultiheadAttention(E, H, batch_first=True, qconfig=fq.get_default_qat_qconfig())
  variables = module.init(jax.random.key(0), q, q, q)
  optimizer = optax.adam(3e-2)
  params, stats = variables["params"], variables["quant_stats"]
  opt_state = optimizer.init(params)

  def loss_fn(params, stats):
    (out, _), updates = module.apply({"params": params, "quant_stats": stats}, q, q, q,
                                     need_weights=False, mutable=["quant_stats"])
    return jnp.mean((out - target) ** 2), updates["quant_stats"]

  @jax.jit
  def step(params, stats, opt_state):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  losses = []
  for _ in range(40):
    params, stats, opt_state, loss = step(params, stats, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses
  trained = {"params": params, "quant_stats": stats}
  # Every point the training forward (need_weights=False) passes is observed, with
  # finite statistics; the returned weights' observer is not (they were not returned).
  for path, leaf in _stats_leaves(trained):
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(leaf)) != ("quant_attn_output_weights" in name), name
  # The statistics are used: the frozen QAT forward differs from the float one,
  # and the int8 module built from them reproduces the QAT loss closely.
  frozen, _ = module.apply(trained, q, q, q)
  plain, _ = fq.MultiheadAttention(E, H, batch_first=True).apply({"params": params}, q, q, q)
  assert float(jnp.max(jnp.abs(frozen - plain))) > 0
  qmodule, qvariables = fq.convert(module, trained)
  int8_out, _ = qmodule.apply(qvariables, q, q, q)
  qat_loss = float(jnp.mean((frozen - target) ** 2))
  int8_loss = float(jnp.mean((int8_out - target) ** 2))
  assert int8_loss < 1.5 * qat_loss + 1e-3, (int8_loss, qat_loss)
