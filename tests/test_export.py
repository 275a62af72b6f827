"""Export to Flax's attention module and torch's state_dict; variables checkpoint files.

Tolerance for forward passes: 1e-5 absolute and relative in float32 (as in
test_mha_parity.py). Weights are O(1/sqrt(fan_in)) and E = 16, so outputs are O(1) sums of a
few dozen float32 products; Flax scales the query by dividing and we multiply, which moves
results by ~1e-7, far below a semantic error (a wrong head split or mask moves them ~1e-1).
Checkpoint round trips and state_dict round trips are exact.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import sys
import types

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from flax import serialization

from flax_qmha import MultiheadAttention
from flax_qmha._errors import CheckpointError
from flax_qmha._export import (
    load_variables,
    save_variables,
    to_flax_attention,
    to_torch_state_dict,
    torch_masks_to_flax_mask,
)
from flax_qmha._torch_layout import params_from_state_dict

ATOL = RTOL = 1e-5
E, H, L, S, N = 16, 4, 5, 7, 3
KDIM, VDIM = 6, 10


def _random_variables(module: MultiheadAttention, seed: int) -> dict:
  """``module``'s params, every leaf random (non-zero biases too, so their mapping is tested)."""
  shapes = jax.eval_shape(
      module.init, jax.random.key(0), jnp.ones((1, 2, E)),
      jnp.ones((1, 2, module.kdim or E)), jnp.ones((1, 2, module.vdim or E)),
  ) if module.batch_first else jax.eval_shape(
      module.init, jax.random.key(0), jnp.ones((2, 1, E)),
      jnp.ones((2, 1, module.kdim or E)), jnp.ones((2, 1, module.vdim or E)),
  )
  leaves, treedef = jax.tree.flatten(shapes["params"])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  params = [
      jax.random.normal(k, x.shape, x.dtype) / np.sqrt(x.shape[0] if x.ndim == 2 else 4.0)
      for k, x in zip(keys, leaves)
  ]
  return {"params": treedef.unflatten(params)}


# ---------------------------------------------------------------------------------------------
# to_flax_attention


@dataclasses.dataclass(frozen=True)
class FlaxCase:
  layout: str  # "seq_first" | "batch_first" | "unbatched"
  attention: str  # "self" | "cross" (S != L) | "kvdim" (cross with kdim, vdim != E)
  bias: bool = True
  masks: str = "padding"  # see _torch_masks

  @property
  def id(self) -> str:
    return "-".join([self.layout, self.attention, self.masks] + ([] if self.bias else ["no_bias"]))


MASK_KINDS = (
    "none", "padding", "float_padding", "causal_flag", "causal_bool", "causal_float",
    "causal_flag+padding", "per_head+padding",
)
FLAX_CASES = [
    FlaxCase(layout, attention, bias)
    for layout, attention, bias in itertools.product(
        ("seq_first", "batch_first", "unbatched"), ("self", "cross", "kvdim"), (True, False)
    )
] + [
    FlaxCase(layout, "self", masks=masks)
    for layout, masks in itertools.product(("seq_first", "batch_first", "unbatched"), MASK_KINDS)
    if masks != "padding"
]


def _inputs(case: FlaxCase, rng: np.random.Generator):
  """Our inputs (torch layout) and Flax's (batch-leading)."""
  src_len = L if case.attention == "self" else S
  kdim, vdim = (KDIM, VDIM) if case.attention == "kvdim" else (E, E)
  batch_shapes = [(N, L, E), (N, src_len, kdim), (N, src_len, vdim)]
  flax_inputs = [rng.normal(size=s).astype(np.float32) for s in batch_shapes]
  if case.attention == "self":
    flax_inputs = [flax_inputs[0]] * 3
  if case.layout == "unbatched":
    flax_inputs = [x[0] for x in flax_inputs]
    ours = flax_inputs
  elif case.layout == "seq_first":
    ours = [np.swapaxes(x, 0, 1) for x in flax_inputs]
  else:
    ours = flax_inputs
  return ours, flax_inputs, kdim, vdim


def _torch_masks(case: FlaxCase, rng: np.random.Generator, src_len: int):
  """``(attn_mask, key_padding_mask, is_causal)`` in torch's convention; no fully masked row."""
  batched = case.layout != "unbatched"
  kpm_shape = (N, src_len) if batched else (src_len,)
  padding = np.zeros(kpm_shape, bool)
  padding[..., -2:] = True  # key 0 always stays visible
  if batched:
    padding[1, -2:] = [False, True]
  causal = np.triu(np.ones((L, src_len), bool), k=1)
  if case.masks == "none":
    return None, None, False
  if case.masks == "padding":
    return None, padding, False
  if case.masks == "float_padding":
    return None, np.where(padding, -np.inf, 0.0).astype(np.float32), False
  if case.masks == "causal_flag":
    return None, None, True
  if case.masks == "causal_bool":
    return causal, None, False
  if case.masks == "causal_float":
    return np.where(causal, -np.inf, 0.0).astype(np.float32), None, False
  if case.masks == "causal_flag+padding":
    return None, padding, True
  assert case.masks == "per_head+padding"
  per_head = rng.random(((N if batched else 1) * H, L, src_len)) < 0.4
  per_head[..., 0] = False
  return per_head, padding, False


def _flax_mask(case: FlaxCase, attn_mask, kpm, is_causal, src_len: int):
  """Flax's mask for the case, spelled with Flax's own helpers where it has them."""
  batched = case.layout != "unbatched"
  if case.masks in ("causal_flag", "causal_bool"):  # the causal mask expressed the Flax way
    return nn.make_causal_mask(jnp.ones((N, L) if batched else (L,)))
  return torch_masks_to_flax_mask(
      attn_mask, kpm, num_heads=H, is_causal=is_causal, batched=batched, length=src_len
  )


@pytest.mark.parametrize("case", FLAX_CASES, ids=[c.id for c in FLAX_CASES])
def test_flax_attention_matches(case: FlaxCase):
  rng = np.random.default_rng(sum(map(ord, case.id)))
  ours_in, flax_in, kdim, vdim = _inputs(case, rng)
  module = MultiheadAttention(
      E, H, bias=case.bias, kdim=kdim, vdim=vdim, batch_first=case.layout == "batch_first"
  )
  variables = _random_variables(module, seed=len(case.id))
  src_len = flax_in[1].shape[-2]
  attn_mask, kpm, is_causal = _torch_masks(case, rng, src_len)
  expected, _ = module.apply(
      variables, *ours_in, key_padding_mask=kpm, attn_mask=attn_mask, is_causal=is_causal
  )
  if case.layout == "seq_first":
    expected = np.swapaxes(expected, 0, 1)

  flax_module, flax_variables = to_flax_attention(module, variables)
  mask = _flax_mask(case, attn_mask, kpm, is_causal, src_len)
  got = jax.jit(flax_module.apply)(flax_variables, *flax_in, mask=mask)
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL, err_msg=case.id)


def test_flax_params_have_flax_layout():
  module = MultiheadAttention(E, H, kdim=KDIM, vdim=VDIM)
  flax_module, flax_variables = to_flax_attention(module, _random_variables(module, 0))
  q, k, v = jnp.ones((2, L, E)), jnp.ones((2, S, KDIM)), jnp.ones((2, S, VDIM))
  own = jax.eval_shape(flax_module.init, jax.random.key(0), q, k, v)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
  assert shapes(flax_variables) == shapes(own)
  assert flax_variables["params"]["key"]["kernel"].shape == (KDIM, H, E // H)
  assert flax_variables["params"]["out"]["kernel"].shape == (H, E // H, E)


def test_flax_attention_with_dropout_needs_deterministic_and_matches_without_it():
  module = MultiheadAttention(E, H, dropout=0.25, batch_first=True)
  variables = _random_variables(module, 1)
  x = np.random.default_rng(0).normal(size=(N, L, E)).astype(np.float32)
  flax_module, flax_variables = to_flax_attention(module, variables)
  assert flax_module.dropout_rate == 0.25 and not flax_module.broadcast_dropout
  with pytest.raises(ValueError, match="deterministic"):
    flax_module.apply(flax_variables, x)
  expected, _ = module.apply(variables, x, x, x)
  got = flax_module.apply(flax_variables, x, deterministic=True)
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
  dropped = flax_module.apply(flax_variables, x, deterministic=False,
                              rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(dropped, expected)


def test_flax_attention_ignores_qconfig_collections():
  from flax_qmha._qconfig import get_default_qat_qconfig  # pylint: disable=g-import-not-at-top

  module = MultiheadAttention(E, H, batch_first=True, qconfig=get_default_qat_qconfig())
  float_module = MultiheadAttention(E, H, batch_first=True)
  variables = _random_variables(float_module, 3)
  x = np.random.default_rng(1).normal(size=(N, L, E)).astype(np.float32)
  flax_module, flax_variables = to_flax_attention(
      module, {**variables, "quant_stats": {"anything": np.zeros(())}}
  )
  np.testing.assert_allclose(
      flax_module.apply(flax_variables, x), float_module.apply(variables, x, x, x)[0],
      atol=ATOL, rtol=RTOL,
  )


def test_fully_masked_row_differs_as_documented():
  """Where every key is masked, Flax attends uniformly; we output ``out_proj``'s bias."""
  module = MultiheadAttention(E, H, batch_first=True)
  variables = _random_variables(module, 4)
  p = jax.tree.map(np.asarray, variables["params"])
  x = np.random.default_rng(2).normal(size=(1, L, E)).astype(np.float32)
  kpm = np.ones((1, L), bool)
  ours, _ = module.apply(variables, x, x, x, key_padding_mask=kpm)
  np.testing.assert_allclose(ours[0], np.broadcast_to(p["out_proj"]["bias"], (L, E)), atol=1e-6)
  flax_module, flax_variables = to_flax_attention(module, variables)
  theirs = flax_module.apply(
      flax_variables, x, mask=torch_masks_to_flax_mask(None, kpm, num_heads=H)
  )
  mean_value = (x[0] @ p["linear_V"]["kernel"] + p["linear_V"]["bias"]).mean(0)  # [E]
  uniform = mean_value @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]
  np.testing.assert_allclose(theirs[0], np.broadcast_to(uniform, (L, E)), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("flag", ["add_bias_kv", "add_zero_attn"])
def test_flax_attention_refuses_extra_key_positions(flag):
  module = MultiheadAttention(E, H, **{flag: True})
  with pytest.raises(ValueError, match=f"{flag}=True.*cannot express"):
    to_flax_attention(module, _random_variables(module, 0))


def test_flax_attention_refuses_bad_inputs():
  module = MultiheadAttention(E, H)
  variables = _random_variables(module, 0)
  with pytest.raises(TypeError, match="module must be a flax_qmha.MultiheadAttention.*dict"):
    to_flax_attention({"embed_dim": E}, variables)
  with pytest.raises(ValueError, match="'params' entry"):
    to_flax_attention(module, variables["params"])
  params = dict(variables["params"])
  params["linear_K"] = {"kernel": np.zeros((KDIM, E), np.float32), "bias": np.zeros(E)}
  with pytest.raises(ValueError, match=r"params/linear_K/kernel has shape \(6, 16\), expected"):
    to_flax_attention(module, {"params": params})
  del params["out_proj"]
  with pytest.raises(ValueError, match="params/out_proj/bias, params/out_proj/kernel missing"):
    to_flax_attention(module, {"params": params})
  no_bias = MultiheadAttention(E, H, bias=False)
  with pytest.raises(ValueError, match="params/linear_K/bias, .* unexpected"):
    to_flax_attention(no_bias, variables)


def test_torch_masks_to_flax_mask_shapes_and_meaning():
  kpm = np.array([[False, False, True], [False, True, True]])
  mask = torch_masks_to_flax_mask(None, kpm, num_heads=H)
  assert mask.shape == (2, 1, 1, 3) and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(mask[:, 0, 0], ~kpm)
  attn = np.zeros((2 * H, 4, 3), bool)
  attn[H + 1, 2, 0] = True  # batch 1, head 1, query 2, key 0
  mask = torch_masks_to_flax_mask(attn, kpm, num_heads=H)
  assert mask.shape == (2, H, 4, 3)
  assert not mask[1, 1, 2, 0] and mask[1, 0, 2, 0] and mask[0, 1, 2, 0]
  assert torch_masks_to_flax_mask(num_heads=H) is None
  causal = torch_masks_to_flax_mask(is_causal=True, length=3, num_heads=H, batched=False)
  np.testing.assert_array_equal(causal, np.tril(np.ones((1, 3, 3), bool)))
  # With attn_mask, is_causal is ignored, as MultiheadAttention does.
  given = np.zeros((3, 3), bool)
  assert torch_masks_to_flax_mask(given, is_causal=True, num_heads=H).all()


def test_torch_masks_to_flax_mask_under_jit():
  kpm = np.array([[False, True]])
  got = jax.jit(lambda m: torch_masks_to_flax_mask(None, m, num_heads=H))(kpm)
  np.testing.assert_array_equal(got[:, 0, 0], ~kpm)
  with pytest.raises(TypeError, match="must be a bool mask when traced"):
    jax.jit(lambda m: torch_masks_to_flax_mask(None, m, num_heads=H))(kpm.astype(np.float32))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(attn_mask=np.full((2, 2), -1.0, np.float32)), ValueError, "additive value -1.0"),
        (dict(attn_mask=np.zeros((2, 2), np.int32)), TypeError, "got dtype int32"),
        (dict(attn_mask=np.zeros((H + 1, 2, 2), bool)), ValueError, r"\(N \* num_heads, L, S\)"),
        (dict(attn_mask=np.zeros((2,), bool)), ValueError, "2-D or 3-D"),
        (dict(key_padding_mask=np.zeros((2,), bool)), ValueError, r"must be \(N, S\)"),
        (dict(attn_mask=np.zeros((2, 3), bool), key_padding_mask=np.zeros((1, 4), bool)),
         ValueError, "covers 3 keys"),
        (dict(is_causal=True), ValueError, "needs the sequence length"),
        (dict(attn_mask=np.zeros((2, 2), bool), num_heads=0), ValueError, "num_heads"),
        (dict(attn_mask=np.zeros((H + 1, 2, 2), bool), batched=False), ValueError,
         r"\(num_heads, L, S\)"),
    ],
    ids=["float_value", "int_dtype", "heads", "rank", "kpm_rank", "key_count", "causal_len",
         "num_heads", "unbatched_heads"],
)
def test_torch_masks_to_flax_mask_errors(kwargs, error, match):
  kwargs = {"num_heads": H, **kwargs}
  with pytest.raises(error, match=match):
    torch_masks_to_flax_mask(**kwargs)


# ---------------------------------------------------------------------------------------------
# to_torch_state_dict


TORCH_CASES = list(itertools.product(("packed", "separate"), (True, False), (False, True)))


def _torch_case_id(case) -> str:
  layout, bias, add_bias_kv = case
  return "-".join([layout] + ([] if bias else ["no_bias"]) + (["bias_kv"] if add_bias_kv else []))


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=[_torch_case_id(c) for c in TORCH_CASES])
def test_torch_state_dict_loads_strictly_and_matches(case, batch_first):
  torch = pytest.importorskip("torch")
  layout, bias, add_bias_kv = case
  kdim, vdim = (E, E) if layout == "packed" else (KDIM, VDIM)
  module = MultiheadAttention(E, H, bias=bias, add_bias_kv=add_bias_kv, kdim=kdim, vdim=vdim,
                              add_zero_attn=add_bias_kv, batch_first=batch_first)
  variables = _random_variables(module, 5)
  state_dict = to_torch_state_dict(module, variables)
  for name, value in state_dict.items():
    assert isinstance(value, np.ndarray) and value.dtype == np.float32, name
    assert value.flags.c_contiguous and value.flags.writeable, name
  assert ("in_proj_weight" in state_dict) == (layout == "packed")

  torch_mha = torch.nn.MultiheadAttention(
      E, H, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_bias_kv, kdim=kdim,
      vdim=vdim, batch_first=batch_first,
  ).eval()
  torch_mha.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)

  rng = np.random.default_rng(7)
  shapes = [(L, N, E), (S, N, kdim), (S, N, vdim)]
  if batch_first:
    shapes = [(N, t, f) for t, _, f in shapes]
  q, k, v = (rng.normal(size=s).astype(np.float32) for s in shapes)
  kpm = np.zeros((N, S), bool)
  kpm[0, -3:] = True
  with torch.no_grad():
    t_out, t_w = torch_mha(*(torch.from_numpy(x) for x in (q, k, v)),
                           key_padding_mask=torch.from_numpy(kpm))
  out, w = module.apply(variables, q, k, v, key_padding_mask=kpm)
  case_id = _torch_case_id(case)
  np.testing.assert_allclose(out, t_out.numpy(), atol=ATOL, rtol=RTOL, err_msg=case_id)
  np.testing.assert_allclose(w, t_w.numpy(), atol=ATOL, rtol=RTOL, err_msg=case_id)

  back = params_from_state_dict(state_dict)
  assert jax.tree.structure(back) == jax.tree.structure(variables["params"]), case_id
  for path, ours in jax.tree_util.tree_leaves_with_path(variables["params"]):
    theirs = back
    for entry in path:
      theirs = theirs[entry.key]
    np.testing.assert_array_equal(theirs, np.asarray(ours), err_msg=f"{case_id} {path}")


def test_torch_state_dict_keeps_param_dtype():
  module = MultiheadAttention(E, H)
  variables = jax.tree.map(lambda x: np.asarray(x, np.float64), _random_variables(module, 0))
  state_dict = to_torch_state_dict(module, variables)
  assert {v.dtype for v in state_dict.values()} == {np.dtype(np.float64)}


def test_torch_state_dict_dequantizes_other_modules_when_possible(monkeypatch):
  float_module = MultiheadAttention(E, H)
  float_variables = _random_variables(float_module, 6)
  qmodule, qvariables = nn.Dense(3), {"params": {"stand-in": np.zeros(())}}
  calls = []

  def dequantize(module, variables):
    calls.append((module, variables))
    return float_module, float_variables

  fake = types.ModuleType("flax_qmha._convert")
  fake.dequantize = dequantize
  monkeypatch.setitem(sys.modules, "flax_qmha._convert", fake)
  got = to_torch_state_dict(qmodule, qvariables)
  assert calls == [(qmodule, qvariables)]
  expected = to_torch_state_dict(float_module, float_variables)
  assert got.keys() == expected.keys()
  for name in got:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)

  fake.dequantize = lambda module, variables: "not a pair"
  with pytest.raises(TypeError, match=r"must return \(MultiheadAttention, variables\)"):
    to_torch_state_dict(qmodule, qvariables)
  # Not a flax module at all: refused before dequantize is tried.
  with pytest.raises(TypeError, match="got builtins.dict"):
    to_torch_state_dict({}, qvariables)


def test_torch_state_dict_refuses_other_modules_without_dequantize(monkeypatch):
  monkeypatch.setitem(sys.modules, "flax_qmha._convert", None)  # import fails
  with pytest.raises(TypeError, match="flax.linen.linear.Dense"):
    to_torch_state_dict(nn.Dense(3), {"params": {}})


def test_torch_state_dict_refuses_wrong_params():
  module = MultiheadAttention(E, H, add_bias_kv=True)
  variables = _random_variables(MultiheadAttention(E, H), 0)
  with pytest.raises(ValueError, match="params/bias_k, params/bias_v missing"):
    to_torch_state_dict(module, variables)


# ---------------------------------------------------------------------------------------------
# save_variables / load_variables

FORMATS = ("safetensors", "msgpack")


def _checkpoint_variables() -> dict:
  """Every dtype a quantized model's variables use, 0-d leaves and several nesting levels."""
  rng = np.random.default_rng(0)
  return {
      "params": {
          "linear_Q": {
              "kernel": rng.normal(size=(4, 8)).astype(np.float32),
              "bias": jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16),
              "qweight": rng.integers(-128, 128, size=(8, 4), dtype=np.int8),
              "zero_point": np.asarray(3, np.int32),
              "scale": np.asarray(0.125, np.float32),
          },
          "bias_k": rng.integers(0, 256, size=(1, 1, 8), dtype=np.uint8),
          "acc": rng.integers(-2**31, 2**31, size=(5,), dtype=np.int32),
          "half": rng.normal(size=(2, 0, 3)).astype(np.float16),
      },
      "quant_stats": {"obs": {"min_val": np.asarray(-np.inf, np.float32),
                              "max_val": jnp.asarray(np.nan, jnp.float32),
                              "initialized": np.asarray(True)}},
  }


def _assert_trees_identical(got, expected, where: str):
  assert jax.tree.structure(got) == jax.tree.structure(jax.tree.map(np.asarray, expected)), where
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
    b = np.asarray(b)
    assert isinstance(a, np.ndarray), f"{where} {path}: {type(a)}"
    assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where} {path}"
    assert a.tobytes() == b.tobytes(), f"{where} {path}: values differ"  # NaN-exact


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_exact(tmp_path, fmt):
  variables = _checkpoint_variables()
  path = tmp_path / f"vars.{fmt}"
  save_variables(path, variables, metadata={"step": "12", "note": "é"})
  got, metadata = load_variables(path, return_metadata=True)
  _assert_trees_identical(got, variables, fmt)
  assert metadata == {"step": "12", "note": "é"}
  assert load_variables(str(path), template=variables).keys() == variables.keys()
  assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind
  for leaf in jax.tree.leaves(got):
    assert leaf.flags.writeable


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_of_a_module_and_frozen_dict(tmp_path, fmt):
  module = MultiheadAttention(E, H, add_bias_kv=True, kdim=KDIM)
  variables = flax.core.freeze(_random_variables(module, 0))
  path = tmp_path / f"mha.{fmt}"
  save_variables(path, variables)
  template = jax.eval_shape(lambda: _random_variables(module, 0))
  got = load_variables(path, template=template)
  _assert_trees_identical(got, flax.core.unfreeze(variables), fmt)
  q, k, v = np.ones((L, 1, E), np.float32), np.ones((S, 1, KDIM), np.float32), np.ones((S, 1, E))
  np.testing.assert_array_equal(module.apply(got, q, k, v)[0], module.apply(variables, q, k, v)[0])


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_objects_need_format(fmt):
  variables = _checkpoint_variables()
  buffer = io.BytesIO()
  save_variables(buffer, variables, format=fmt)
  buffer.seek(0)
  _assert_trees_identical(load_variables(buffer, format=fmt), variables, fmt)
  with pytest.raises(ValueError, match="format must be given"):
    save_variables(io.BytesIO(), variables)
  with pytest.raises(ValueError, match="format must be given"):
    load_variables(io.BytesIO(buffer.getvalue()))


def test_safetensors_file_is_standard(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  safetensors = pytest.importorskip("safetensors")
  variables = _checkpoint_variables()
  path = tmp_path / "vars.safetensors"
  save_variables(path, variables, metadata={"step": "12"})
  tensors = safetensors_numpy.load_file(str(path))
  flat = {
      "/".join(entry.key for entry in path_): np.asarray(leaf)
      for path_, leaf in jax.tree_util.tree_leaves_with_path(variables)
  }
  assert "params/linear_Q/kernel" in tensors and tensors.keys() == flat.keys()
  for name, value in flat.items():
    assert tensors[name].dtype == value.dtype and tensors[name].tobytes() == value.tobytes(), name
  with safetensors.safe_open(str(path), "np") as f:
    assert f.metadata() == {"format": "flax-qmha", "step": "12"}


def test_msgpack_file_is_flax_msgpack(tmp_path):
  variables = _checkpoint_variables()
  path = tmp_path / "vars.msgpack"
  save_variables(path, variables, metadata={"step": "12"})
  restored = serialization.msgpack_restore(path.read_bytes())
  assert restored["format"] == "flax-qmha" and restored["metadata"] == {"step": "12"}
  _assert_trees_identical(jax.tree.map(np.array, restored["variables"]), variables, "msgpack")
  # A plain Flax msgpack file (no wrapper) loads too.
  plain = tmp_path / "plain.msgpack"
  plain.write_bytes(serialization.msgpack_serialize(jax.tree.map(np.asarray, variables)))
  got, metadata = load_variables(plain, return_metadata=True)
  _assert_trees_identical(got, variables, "plain msgpack")
  assert metadata == {}


def test_format_from_extension(tmp_path):
  variables = {"params": {"w": np.ones(2, np.float32)}}
  upper = tmp_path / "VARS.SAFETENSORS"
  save_variables(upper, variables)
  assert upper.read_bytes()[8:9] == b"{"  # safetensors: header length, then JSON
  for name in ("vars.pt", "vars", "vars.safetensors.bak"):
    with pytest.raises(ValueError, match=r"extension.*\.safetensors or \.msgpack"):
      save_variables(tmp_path / name, variables)
    with pytest.raises(ValueError, match=r"extension"):
      load_variables(tmp_path / name)
  with pytest.raises(ValueError, match=r"format must be one of \['msgpack', 'safetensors'\]"):
    save_variables(tmp_path / "vars.msgpack", variables, format="pickle")
  # An explicit format wins over the extension.
  save_variables(tmp_path / "vars.bin", variables, format="msgpack")
  _assert_trees_identical(load_variables(tmp_path / "vars.bin", format="msgpack"), variables, "bin")


@pytest.mark.parametrize("fmt", FORMATS)
def test_template_mismatch_names_the_key(tmp_path, fmt):
  variables = _checkpoint_variables()
  path = tmp_path / f"vars.{fmt}"
  save_variables(path, variables)
  template = jax.tree.map(np.asarray, variables)
  cases = {
      "lacks 'params/extra'": {**template, "params": {**template["params"], "extra": np.zeros(1)}},
      "has 'params/acc', which template lacks": {
          **template, "params": {k: v for k, v in template["params"].items() if k != "acc"}},
      r"'params/bias_k' .* is uint8\[1, 1, 8\], but template expects uint8\[1, 8\]": {
          **template, "params": {**template["params"], "bias_k": np.zeros((1, 8), np.uint8)}},
      r"'params/acc' .* is int32\[5\], but template expects int64\[5\]": {
          **template, "params": {**template["params"], "acc": np.zeros(5, np.int64)}},
  }
  for match, bad in cases.items():
    with pytest.raises(ValueError, match=match) as info:
      load_variables(path, template=bad)
    assert not isinstance(info.value, CheckpointError), match
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), variables)
  _assert_trees_identical(load_variables(path, template=shapes), variables, fmt)


@pytest.mark.parametrize(
    "variables, error, match",
    [
        ({"params": {}}, ValueError, "empty mapping at 'params'"),
        ({}, ValueError, "empty mapping at the top level"),
        ({"params": {"a/b": np.zeros(1)}}, ValueError, "key 'a/b'"),
        ({"params": {1: np.zeros(1)}}, ValueError, "key 1"),
        ({"params": {"w": np.zeros(1, np.complex128)}}, TypeError, "dtype complex128"),
        ({"params": {"w": np.array([object()])}}, TypeError, "dtype object"),
        ({"params": {"w": "text"}}, TypeError, "got str"),
        ([np.zeros(1)], TypeError, "must be a mapping"),
    ],
    ids=["empty", "top_empty", "slash", "int_key", "complex128", "object", "str", "list"],
)
def test_save_refuses_unstorable_trees(tmp_path, variables, error, match):
  for fmt in FORMATS:
    with pytest.raises(error, match=match):
      save_variables(tmp_path / f"v.{fmt}", variables)
  assert not os.listdir(tmp_path)


def test_save_refuses_bad_metadata(tmp_path):
  variables = {"params": {"w": np.zeros(1)}}
  with pytest.raises(ValueError, match="may not use the key 'format'"):
    save_variables(tmp_path / "v.msgpack", variables, metadata={"format": "x"})
  with pytest.raises(TypeError, match="metadata must map str to str"):
    save_variables(tmp_path / "v.safetensors", variables, metadata={"step": 3})


def _msgpack_array(shape, dtype_name: str, data: bytes) -> msgpack.ExtType:
  return msgpack.ExtType(1, msgpack.packb((shape, dtype_name, data), use_bin_type=True))


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_and_garbage_files_raise_checkpoint_error(tmp_path, fmt):
  path = tmp_path / f"vars.{fmt}"
  save_variables(path, _checkpoint_variables())
  data = path.read_bytes()
  for cut in (0, 5, len(data) // 2, len(data) - 1):
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="vars"):
      load_variables(path)
  path.write_bytes(b"\xc1" * 64)  # 0xc1 is never valid msgpack; a huge safetensors header
  with pytest.raises(CheckpointError):
    load_variables(path)


@pytest.mark.parametrize(
    "tree, match",
    [
        ({"format": "other", "variables": {}}, "format is 'other'"),
        ({"format": "flax-qmha", "variables": {"w": 1}}, "expected the keys"),
        ({"format": "flax-qmha", "metadata": {"a": 1}, "variables": {"w": 1.0}}, "metadata"),
        ({"params": {"w": "text"}}, "holds a str"),
        ({"params": {"w": [1, 2]}}, "holds a list"),
        ({"params": {}}, "empty mapping"),
        ([1, 2], "msgpack map"),
        ({"params": {"w": _msgpack_array((2,), "O", b"\0" * 16)}}, "not a Flax msgpack"),
        ({"params": {"w": _msgpack_array((3,), "float32", b"\0" * 4)}}, "not a Flax msgpack"),
        ({"params": {"w": _msgpack_array((1,), "complex128", b"\0" * 16)}}, "unsupported dtype"),
    ],
    ids=["other_format", "wrapper_keys", "metadata_type", "str_leaf", "list_leaf", "empty",
         "list_top", "object_dtype", "short_buffer", "complex128"],
)
def test_malformed_msgpack_contents_raise_checkpoint_error(tmp_path, tree, match):
  path = tmp_path / "bad.msgpack"
  path.write_bytes(msgpack.packb(tree, use_bin_type=True))
  with pytest.raises(CheckpointError, match=match):
    load_variables(path)


def test_foreign_or_malformed_safetensors_raise_checkpoint_error(tmp_path):
  from flax_qmha._safetensors import save_safetensors  # pylint: disable=g-import-not-at-top

  path = tmp_path / "bad.safetensors"
  save_safetensors(path, {"in_proj_weight": np.zeros((3, 3))}, {"format": "pt"})
  with pytest.raises(CheckpointError, match="format is 'pt'"):
    load_variables(path)
  save_safetensors(path, {"a": np.zeros(1), "a/b": np.zeros(1)})
  with pytest.raises(CheckpointError, match="'a' is both an array and a subtree"):
    load_variables(path)
  save_safetensors(path, {"a//b": np.zeros(1)})
  with pytest.raises(CheckpointError, match="empty path component"):
    load_variables(path)
  save_safetensors(path, {}, {"format": "flax-qmha"})
  with pytest.raises(CheckpointError, match="holds no tensors"):
    load_variables(path)
  # Without a format marker, "/"-named tensors are read as a tree.
  save_safetensors(path, {"params/w": np.ones(2, np.float32)})
  _assert_trees_identical(load_variables(path), {"params": {"w": np.ones(2, np.float32)}}, "plain")
