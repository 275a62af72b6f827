"""Float MultiheadAttention against torch.nn.MultiheadAttention: forward and gradients.

Tolerance: 1e-5 absolute and relative in float32. Inputs and weights are O(1)
with E <= 24, so each output is a sum of a few dozen float32 products whose
rounding error is ~1e-7; 1e-5 leaves two orders of magnitude for the different
summation orders of torch's bmm/SDPA and XLA's dot, and is still far below any
semantic error (a wrong mask or head order moves values by ~1e-1).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_qmha import MultiheadAttention  # noqa: E402
from flax_qmha._torch_layout import state_dict_from_params  # noqa: E402
from torch_reference import params_from_torch  # noqa: E402

ATOL = RTOL = 1e-5
E, H, L, S, N = 16, 4, 5, 7, 3


@dataclasses.dataclass(frozen=True)
class Case:
  layout: str  # "seq_first" | "batch_first" | "unbatched"
  masks: str  # see MASKS
  kvdim: bool = False
  bias: bool = True
  add_bias_kv: bool = False
  add_zero_attn: bool = False
  need_weights: bool = True
  average: bool = True

  @property
  def id(self) -> str:
    flags = [self.layout, self.masks]
    flags += [name for name in ("kvdim", "add_bias_kv", "add_zero_attn") if getattr(self, name)]
    flags += [] if self.bias else ["no_bias"]
    flags += ["no_weights"] if not self.need_weights else ([] if self.average else ["per_head"])
    return "-".join(flags)


# attn_mask kind, key_padding_mask kind, is_causal
MASKS = {
    "none": (None, None, False),
    "bool2d": ("bool2d", None, False),
    "float2d": ("float2d", None, False),
    "bool3d": ("bool3d", None, False),
    "float3d+floatkpm": ("float3d", "float", False),
    "boolkpm": (None, "bool", False),
    "bool2d+boolkpm": ("bool2d", "bool", False),
    "causal": (None, None, True),
    "causal+boolkpm": (None, "bool", True),
    "causal+explicit": ("causal2d", None, True),
}


def _cases() -> list[Case]:
  cases = []
  extras = [(False, False), (True, False), (False, True), (True, True)]
  weight_modes = [(True, True), (True, False), (False, True)]
  for i, (variant, layout, masks) in enumerate(
      itertools.product(range(2), ("seq_first", "batch_first", "unbatched"), MASKS)
  ):
    add_bias_kv, add_zero_attn = extras[(i + variant) % 4]
    need_weights, average = weight_modes[(i + variant) % 3]
    cases.append(Case(
        layout, masks, kvdim=bool(i % 2), bias=(i % 5 != 4), add_bias_kv=add_bias_kv,
        add_zero_attn=add_zero_attn, need_weights=need_weights, average=average,
    ))
  return cases


CASES = _cases()


def _make_masks(case: Case, rng: np.random.Generator, src_len: int):
  attn_kind, kpm_kind, is_causal = MASKS[case.masks]
  n_heads_batch = H if case.layout == "unbatched" else N * H
  attn_mask = kpm = None
  if attn_kind is not None:
    shape = (L, src_len) if attn_kind.endswith("2d") else (n_heads_batch, L, src_len)
    if attn_kind == "causal2d":
      attn_mask = np.triu(np.ones((L, src_len), bool), k=1)
    elif attn_kind.startswith("bool"):
      attn_mask = rng.random(shape) < 0.3
      attn_mask[..., 0] = False  # keep every row attendable: torch gives NaN otherwise
    else:
      attn_mask = rng.normal(size=shape).astype(np.float32)
  if kpm_kind is not None:
    shape = (src_len,) if case.layout == "unbatched" else (N, src_len)
    if kpm_kind == "bool":
      kpm = rng.random(shape) < 0.3
      kpm[..., 0] = False
    else:
      kpm = rng.normal(size=shape).astype(np.float32)
  return attn_mask, kpm, is_causal


def _src_len(case: Case) -> int:
  attn_kind, _, is_causal = MASKS[case.masks]
  return L if is_causal and attn_kind is None else S  # implicit causal needs L == S


def _inputs(case: Case, rng: np.random.Generator):
  kdim, vdim = (12, 20) if case.kvdim else (E, E)
  S = _src_len(case)
  if case.layout == "unbatched":
    shapes = [(L, E), (S, kdim), (S, vdim)]
  elif case.layout == "batch_first":
    shapes = [(N, L, E), (N, S, kdim), (N, S, vdim)]
  else:
    shapes = [(L, N, E), (S, N, kdim), (S, N, vdim)]
  return [rng.normal(size=s).astype(np.float32) for s in shapes], kdim, vdim


def _torch_module(case: Case, kdim: int, vdim: int):
  torch.manual_seed(0)
  tm = torch.nn.MultiheadAttention(
      E, H, bias=case.bias, add_bias_kv=case.add_bias_kv, add_zero_attn=case.add_zero_attn,
      kdim=kdim, vdim=vdim, batch_first=case.layout == "batch_first",
  )
  with torch.no_grad():  # non-zero biases so that their copy is tested
    for p in tm.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return tm


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parity_forward_and_gradients(case: Case):
  rng = np.random.default_rng(abs(hash(case.id)) % 2**32)
  (q, k, v), kdim, vdim = _inputs(case, rng)
  tm = _torch_module(case, kdim, vdim)
  src_len = _src_len(case)
  attn_mask, kpm, is_causal = _make_masks(case, rng, src_len)
  torch_mask, torch_causal = attn_mask, is_causal
  if is_causal and attn_mask is None:  # torch needs the mask spelled out
    torch_mask = np.triu(np.ones((L, src_len), bool), k=1)
  if is_causal and (case.add_bias_kv or case.add_zero_attn):
    # torch's need_weights=False path drops the mask and re-derives a causal one
    # over S + 1 keys, hiding the appended position from early queries; with
    # need_weights=True it pads the mask instead. We always pad (README).
    torch_causal = False

  tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
  t_out, t_w = tm(
      tq, tk, tv, key_padding_mask=None if kpm is None else torch.tensor(kpm),
      need_weights=case.need_weights,
      attn_mask=None if torch_mask is None else torch.tensor(torch_mask),
      average_attn_weights=case.average, is_causal=torch_causal,
  )
  g_out = rng.normal(size=t_out.shape).astype(np.float32)
  t_loss = (t_out * torch.tensor(g_out)).sum()
  if case.need_weights:
    g_w = rng.normal(size=t_w.shape).astype(np.float32)
    t_loss = t_loss + (t_w * torch.tensor(g_w)).sum()
  t_loss.backward()

  module = MultiheadAttention(
      E, H, bias=case.bias, add_bias_kv=case.add_bias_kv, add_zero_attn=case.add_zero_attn,
      kdim=kdim, vdim=vdim, batch_first=case.layout == "batch_first",
  )
  params = params_from_torch(tm)

  def run(params, q, k, v):
    return module.apply(
        {"params": params}, q, k, v, key_padding_mask=kpm, need_weights=case.need_weights,
        attn_mask=attn_mask, average_attn_weights=case.average, is_causal=is_causal,
    )

  out, w = jax.jit(run)(params, q, k, v)
  np.testing.assert_allclose(out, t_out.detach().numpy(), atol=ATOL, rtol=RTOL,
                             err_msg=f"{case.id}: attn_output")
  if case.need_weights:
    np.testing.assert_allclose(w, t_w.detach().numpy(), atol=ATOL, rtol=RTOL,
                               err_msg=f"{case.id}: attn_weights")
  else:
    assert w is None and t_w is None

  def loss(params, q, k, v):
    out, w = run(params, q, k, v)
    total = jnp.sum(out * g_out)
    if case.need_weights:
      total = total + jnp.sum(w * g_w)
    return total

  g_params, g_q, g_k, g_v = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(params, q, k, v)
  for name, ours, theirs in (("query", g_q, tq), ("key", g_k, tk), ("value", g_v, tv)):
    np.testing.assert_allclose(ours, theirs.grad.numpy(), atol=ATOL, rtol=RTOL,
                               err_msg=f"{case.id}: d/d{name}")
  t_grads = {n: p.grad.numpy() for n, p in tm.named_parameters()}
  ours = state_dict_from_params(g_params)
  assert set(ours) == set(t_grads), f"{case.id}: parameter sets differ"
  for name, g in ours.items():
    np.testing.assert_allclose(g, t_grads[name], atol=ATOL, rtol=RTOL,
                               err_msg=f"{case.id}: d/d{name}")


def test_grid_is_large_enough():
  assert len(CASES) >= 40
  assert {c.layout for c in CASES} == {"seq_first", "batch_first", "unbatched"}
  for flag in ("kvdim", "add_bias_kv", "add_zero_attn"):
    assert {getattr(c, flag) for c in CASES} == {False, True}
