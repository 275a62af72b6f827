"""Property tests: float MultiheadAttention against torch.nn.MultiheadAttention.

Hypothesis draws a whole configuration (sizes, flags, layout, mask kinds, call
flags) plus a seed from which every array is generated, so a failing example is
reported as one readable ``Config(...)`` and replays exactly.

Tolerance: 1e-5 absolute and relative in float32. Inputs and weights are O(1)
(weights scaled by 1/sqrt(fan_in)) with E <= 32, kdim/vdim <= 12 and S <= 8
keys, so every output, weight and gradient is a sum of at most a few hundred
float32 products (rounding error ~1e-7 each, ~1e-6 accumulated); 1e-5 leaves
room for the different summation orders of torch's bmm/SDPA and XLA's dot while
staying far below any semantic error (a wrong mask, head order or missing bias
moves values by ~1e-1). The jit/vmap test compares JAX with JAX, where only
fusion changes rounding, at 1e-6.

Fully masked query rows: torch gives NaN weights (and NaN output rows and
gradients) where it uses softmax, and zeros where it uses SDPA's safe softmax
(``need_weights=False``); we give 0 weights by design (README). A quarter of
the examples keep one key allowed in every row, a quarter leave the random masks
as drawn and half mask one whole row on purpose (``Config.rows``); rows stay
attendable whenever ``add_bias_kv``/``add_zero_attn`` append a key. Everything
torch gets finite (outputs, weights, gradients) is compared with it. Where rows
are fully masked we also check our documented behaviour: no NaN in outputs,
weights or gradients, weights 0 on those rows, the head's attention result 0
(output checked against a float64 reference built from torch's per-head weights
with those rows zeroed), and an output row equal to ``out_proj``'s bias when
every head of it is masked.

Speed: each example has new shapes, so each compiles; ``quick_jit`` below keeps
that to ~0.1 s. The file takes ~70 s (~55 s of CPU) on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from flax_qmha import MultiheadAttention  # noqa: E402
from flax_qmha._torch_layout import state_dict_from_params  # noqa: E402
from torch_reference import params_from_torch  # noqa: E402

ATOL = RTOL = 1e-5
JAX_ATOL = JAX_RTOL = 1e-6
# Every example has new shapes, so every jit compiles. Eager dispatch is slower
# still (each jnp op compiles per shape: ~2 s for a forward and backward pass),
# and a default jit spends ~0.4 s (~1 s of CPU) in XLA's optimisation per
# example. These options cut that to ~0.1 s: the same HLO passes run, only LLVM's
# optimisation level and the fusion code emitter change (no fast-math either
# way). The default pipeline is covered by test_mha.py and test_mha_parity.py.
FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}


@functools.cache
def _quick_compile_options() -> dict:
  try:  # an XLA that no longer knows an option would fail every example
    jax.jit(lambda x: x + 1, compiler_options=FAST_COMPILE)(1.0)
  except Exception:  # noqa: BLE001
    return {}
  return FAST_COMPILE


def quick_jit(fn):
  return jax.jit(fn, compiler_options=_quick_compile_options())


ATTN_MASKS = (None, "bool2d", "float2d", "bool3d", "float3d", "causal2d")
KPMS = (None, "bool", "float")


@dataclasses.dataclass(frozen=True)
class Config:
  """One drawn case; ``seed`` generates inputs, masks, parameters and cotangents."""

  head_dim: int
  num_heads: int
  kdim: int | None  # None: embed_dim (torch's packed in_proj_weight)
  vdim: int | None
  bias: bool
  add_bias_kv: bool
  add_zero_attn: bool
  batched: bool
  batch_first: bool  # also drawn for unbatched inputs, where it must not matter
  n: int  # batch size (1 when unbatched)
  tgt_len: int  # L
  src_len: int  # S
  attn_mask: str | None  # one of ATTN_MASKS; causal2d is an explicit bool causal mask
  key_padding_mask: str | None  # one of KPMS
  is_causal: bool
  need_weights: bool
  average_attn_weights: bool
  rows: str  # ROWS: keep one allowed key per query row, leave masks random, or
  # mask one whole row (attn_mask row or key_padding_mask batch) on purpose
  mask_rate: float  # fraction of masked positions in random masks
  seed: int
  dropout: float = 0.0  # only the jit/vmap test uses dropout

  @property
  def embed_dim(self) -> int:
    return self.head_dim * self.num_heads

  @property
  def implicit_causal(self) -> bool:
    return self.is_causal and self.attn_mask is None

  @property
  def extra_keys(self) -> int:
    return int(self.add_bias_kv) + int(self.add_zero_attn)

  def module(self) -> MultiheadAttention:
    return MultiheadAttention(
        self.embed_dim, self.num_heads, dropout=self.dropout, bias=self.bias,
        add_bias_kv=self.add_bias_kv, add_zero_attn=self.add_zero_attn, kdim=self.kdim,
        vdim=self.vdim, batch_first=self.batch_first,
    )


EXTRA_KEYS = ((False, False), (True, False), (False, True), (True, True), (False, False))
ROWS = ("keep_a_key", "random", "mask_a_row", "mask_a_row")
# Sizes for the jit/vmap test, where the flags matter, not the sizes: few distinct
# shapes let eager dispatch reuse its per-shape kernels. H > 1, kdim != vdim != E
# and L != S are all present.
SMALL_SIZES = dict(
    head_dim=st.just(2), num_heads=st.just(3),
    kdim=st.sampled_from([None, 5]), vdim=st.sampled_from([None, 4]),
    n=st.just(2), tgt_len=st.just(3), src_len=st.sampled_from([3, 5]),
)
SIZES = dict(
    head_dim=st.integers(1, 8), num_heads=st.integers(1, 4),
    kdim=st.none() | st.integers(1, 12), vdim=st.none() | st.integers(1, 12),
    n=st.integers(1, 3), tgt_len=st.integers(1, 6), src_len=st.integers(1, 6),
)


@st.composite
def configs(draw, *, sizes=None, batched: bool | None = None, dropout: bool = False) -> Config:
  sizes = SIZES if sizes is None else sizes
  tgt_len = draw(sizes["tgt_len"])
  attn_mask = draw(st.sampled_from(ATTN_MASKS))
  is_causal = draw(st.booleans())
  # is_causal without attn_mask builds the mask itself and needs L == S.
  src_len = tgt_len if is_causal and attn_mask is None else draw(sizes["src_len"])
  batched = draw(st.booleans()) if batched is None else batched
  # add_bias_kv / add_zero_attn: none in 2 of 5 draws, as they make every row attendable.
  extra_keys = draw(st.sampled_from(EXTRA_KEYS))
  return Config(
      head_dim=draw(sizes["head_dim"]),
      num_heads=draw(sizes["num_heads"]),
      kdim=draw(sizes["kdim"]),
      vdim=draw(sizes["vdim"]),
      bias=draw(st.booleans()),
      add_bias_kv=extra_keys[0],
      add_zero_attn=extra_keys[1],
      batched=batched,
      batch_first=draw(st.booleans()),
      n=draw(sizes["n"]) if batched else 1,
      tgt_len=tgt_len,
      src_len=src_len,
      attn_mask=attn_mask,
      key_padding_mask=draw(st.sampled_from(KPMS)),
      is_causal=is_causal,
      need_weights=draw(st.booleans()),
      average_attn_weights=draw(st.booleans()),
      rows=draw(st.sampled_from(ROWS)),
      mask_rate=draw(st.sampled_from([0.25, 0.5])),
      seed=draw(st.integers(0, 2**32 - 1)),
      dropout=draw(st.sampled_from([0.0, 0.3])) if dropout else 0.0,
  )


# Layouts. Arrays are generated batch first ([N, T, F], N = 1 when unbatched) and
# moved to the drawn layout for both libraries.


def to_layout(x: np.ndarray, cfg: Config) -> np.ndarray:
  if not cfg.batched:
    return x[0]
  return x if cfg.batch_first else np.swapaxes(x, 0, 1)


def from_layout(x, cfg: Config) -> np.ndarray:
  x = np.asarray(x)
  if not cfg.batched:
    return x[None]
  return x if cfg.batch_first else np.swapaxes(x, 0, 1)


def weights_batch_first(w, cfg: Config) -> np.ndarray:
  """Returned weights -> ``[N, L, S']`` or ``[N, H, L, S']``."""
  w = np.asarray(w)
  return w if cfg.batched else w[None]


@dataclasses.dataclass
class Arrays:
  query: np.ndarray  # [N, L, E]
  key: np.ndarray  # [N, S, kdim]
  value: np.ndarray  # [N, S, vdim]
  attn_mask: np.ndarray | None  # as passed: [L, S] or [N * H, L, S] ([H, L, S] unbatched)
  key_padding_mask: np.ndarray | None  # as passed: [N, S] or [S]
  state_dict: dict[str, np.ndarray]  # torch layout


def _random_mask(rng, shape, kind: str, rate: float) -> np.ndarray:
  hidden = rng.random(shape) < rate
  if kind.startswith("bool"):
    return hidden
  # Float masks: O(1) biases, with -inf where hidden (torch's additive convention).
  return np.where(hidden, -np.inf, rng.normal(size=shape)).astype(np.float32)


def make_arrays(cfg: Config) -> Arrays:
  rng = np.random.default_rng(cfg.seed)
  e, h, n, tgt, src = cfg.embed_dim, cfg.num_heads, cfg.n, cfg.tgt_len, cfg.src_len
  kdim, vdim = cfg.kdim or e, cfg.vdim or e

  def normal(*shape):
    return rng.normal(size=shape).astype(np.float32)

  query, key, value = normal(n, tgt, e), normal(n, src, kdim), normal(n, src, vdim)
  # A key that no random mask hides, when the config asks for attendable rows.
  # Key 0 is allowed by every causal row, so it is the one kept under a causal mask.
  kept = 0 if cfg.is_causal or cfg.attn_mask == "causal2d" else int(rng.integers(src))

  attn_mask = None
  if cfg.attn_mask == "causal2d":
    attn_mask = np.triu(np.ones((tgt, src), bool), k=1)
  elif cfg.attn_mask is not None:
    first = (n * h,) if cfg.batched else (h,)
    shape = (tgt, src) if cfg.attn_mask.endswith("2d") else (*first, tgt, src)
    attn_mask = _random_mask(rng, shape, cfg.attn_mask, cfg.mask_rate)
  kpm = None
  if cfg.key_padding_mask is not None:
    kpm = _random_mask(rng, (n, src), cfg.key_padding_mask, cfg.mask_rate)

  masks = [kpm] if kpm is not None else []  # the random masks (not a causal one)
  if attn_mask is not None and cfg.attn_mask != "causal2d":
    masks.append(attn_mask)
  if cfg.rows == "keep_a_key":
    for m in masks:
      m[..., kept] = False if m.dtype == bool else 0.0
  elif cfg.rows == "mask_a_row" and masks:
    m = masks[int(rng.integers(len(masks)))]
    row = tuple(int(rng.integers(d)) for d in m.shape[:-1])
    m[row] = True if m.dtype == bool else -np.inf
  if kpm is not None and not cfg.batched:
    kpm = kpm[0]

  # torch's state_dict with O(1) activations: weights ~ 1/sqrt(fan_in), non-zero
  # biases so that their copy (and their gradients) are tested.
  sd = {}
  if kdim == e and vdim == e:  # torch packs Q/K/V into one in_proj_weight
    sd["in_proj_weight"] = normal(3 * e, e) / np.sqrt(e)
  else:
    sd["q_proj_weight"] = normal(e, e) / np.sqrt(e)
    sd["k_proj_weight"] = normal(e, kdim) / np.sqrt(kdim)
    sd["v_proj_weight"] = normal(e, vdim) / np.sqrt(vdim)
  if cfg.bias:
    sd["in_proj_bias"] = 0.5 * normal(3 * e)
  if cfg.add_bias_kv:
    sd["bias_k"], sd["bias_v"] = normal(1, 1, e), normal(1, 1, e)
  sd["out_proj.weight"] = normal(e, e) / np.sqrt(e)
  if cfg.bias:
    sd["out_proj.bias"] = 0.5 * normal(e)
  return Arrays(query, key, value, attn_mask, kpm, sd)


def fully_masked_rows(cfg: Config, arrays: Arrays) -> np.ndarray:
  """bool ``[N, H, L]``: query rows whose keys are all masked (after padding)."""
  n, h, tgt, src = cfg.n, cfg.num_heads, cfg.tgt_len, cfg.src_len
  total = np.zeros((n, h, tgt, src), np.float32)
  masks = [arrays.attn_mask, arrays.key_padding_mask]
  if cfg.implicit_causal:
    masks[0] = np.triu(np.ones((tgt, src), bool), k=1)
  for i, mask in enumerate(masks):
    if mask is None:
      continue
    additive = np.where(mask, -np.inf, 0.0) if mask.dtype == bool else mask
    if i == 0:
      additive = additive.reshape((n, h, tgt, src) if additive.ndim == 3 else (tgt, src))
    else:
      additive = additive.reshape(n, 1, 1, src)
    total = total + additive
  blocked = np.all(np.isneginf(total), axis=-1)
  # add_bias_kv / add_zero_attn append an allowed key to every row.
  return blocked & (cfg.extra_keys == 0)


def torch_mha(cfg: Config, state_dict) -> torch.nn.MultiheadAttention:
  tm = torch.nn.MultiheadAttention(
      cfg.embed_dim, cfg.num_heads, bias=cfg.bias, add_bias_kv=cfg.add_bias_kv,
      add_zero_attn=cfg.add_zero_attn, kdim=cfg.kdim, vdim=cfg.vdim,
      batch_first=cfg.batch_first,
  )
  tm.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
  return tm


def torch_call_masks(cfg: Config, arrays: Arrays):
  """The ``attn_mask`` and ``is_causal`` that make torch compute what we document."""
  # torch needs the causal mask spelled out, and its is_causal is only a hint that
  # attn_mask *is* causal (with need_weights=False and no key_padding_mask it drops
  # the mask), so the hint is passed only with a causal mask. With add_bias_kv or
  # add_zero_attn that path re-derives a causal mask over S + 1 keys, hiding the
  # appended key from early queries; we always pad (README), hence no hint then.
  causal = cfg.implicit_causal or cfg.attn_mask == "causal2d"
  mask = arrays.attn_mask
  if cfg.implicit_causal:
    mask = np.triu(np.ones((cfg.tgt_len, cfg.src_len), bool), k=1)
  return mask, cfg.is_causal and causal and cfg.extra_keys == 0


def _numpy_reference_output(cfg: Config, arrays: Arrays, params, weights: np.ndarray):
  """Output ``[N, L, E]`` for per-head weights ``[N, H, L, S']``: float64 value
  projection, weighted sum and ``out_proj`` (the maths after the softmax)."""
  e, h = cfg.embed_dim, cfg.num_heads
  as64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
  v = arrays.value @ as64(params["linear_V"]["kernel"])
  if cfg.bias:
    v = v + as64(params["linear_V"]["bias"])
  if cfg.add_bias_kv:
    v = np.concatenate([v, np.broadcast_to(as64(params["bias_v"]), (cfg.n, 1, e))], 1)
  if cfg.add_zero_attn:
    v = np.concatenate([v, np.zeros((cfg.n, 1, e))], 1)
  v = v.reshape(cfg.n, -1, h, e // h)  # [N, S', H, D]
  attn = np.einsum("NHLS,NSHD->NLHD", weights, v).reshape(cfg.n, cfg.tgt_len, e)
  out = attn @ as64(params["out_proj"]["kernel"])
  if cfg.bias:
    out = out + as64(params["out_proj"]["bias"])
  return out


def _close(ours, theirs, what: str, cfg: Config, atol=ATOL, rtol=RTOL):
  np.testing.assert_allclose(
      np.asarray(ours), np.asarray(theirs), atol=atol, rtol=rtol, err_msg=f"{what}\n{cfg}"
  )


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(cfg=configs())
def test_matches_torch_forward_and_gradients(cfg: Config):
  arrays = make_arrays(cfg)
  blocked = fully_masked_rows(cfg, arrays)  # [N, H, L]
  event("fully masked rows" if blocked.any() else "every row attends")
  tm = torch_mha(cfg, arrays.state_dict)
  params = params_from_torch(tm)
  q, k, v = (to_layout(x, cfg) for x in (arrays.query, arrays.key, arrays.value))
  torch_mask, torch_causal = torch_call_masks(cfg, arrays)
  rng = np.random.default_rng(cfg.seed + 1)

  tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch deprecates mixing bool and float masks
    t_out, t_w = tm(
        tq, tk, tv,
        key_padding_mask=None if arrays.key_padding_mask is None
        else torch.from_numpy(arrays.key_padding_mask),
        need_weights=cfg.need_weights,
        attn_mask=None if torch_mask is None else torch.from_numpy(torch_mask),
        average_attn_weights=cfg.average_attn_weights, is_causal=torch_causal,
    )
  g_out = rng.normal(size=t_out.shape).astype(np.float32)
  t_loss = (t_out * torch.from_numpy(g_out)).sum()
  g_w = None
  if cfg.need_weights:
    g_w = rng.normal(size=t_w.shape).astype(np.float32)
    t_loss = t_loss + (t_w * torch.from_numpy(g_w)).sum()
  t_loss.backward()

  module = cfg.module()

  def run(params, q, k, v):
    return module.apply(
        {"params": params}, q, k, v, key_padding_mask=arrays.key_padding_mask,
        need_weights=cfg.need_weights, attn_mask=arrays.attn_mask,
        average_attn_weights=cfg.average_attn_weights, is_causal=cfg.is_causal,
    )

  def loss(params, q, k, v):
    out, w = run(params, q, k, v)
    total = jnp.sum(out * g_out)
    if g_w is not None:
      total = total + jnp.sum(w * g_w)
    return total, (out, w)

  grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
  (g_params, g_q, g_k, g_v), (out, w) = quick_jit(grad)(params, q, k, v)

  # --- forward against torch, on the rows torch gets finite ---
  t_out_np, t_w_np = t_out.detach().numpy(), None if t_w is None else t_w.detach().numpy()
  assert out.shape == t_out_np.shape, f"output shape {out.shape} != {t_out_np.shape}\n{cfg}"
  finite = np.isfinite(t_out_np)
  _close(np.asarray(out)[finite], t_out_np[finite], "attn_output", cfg)
  if cfg.need_weights:
    assert w.shape == t_w_np.shape, f"weights shape {w.shape} != {t_w_np.shape}\n{cfg}"
    w_finite = np.isfinite(t_w_np)
    _close(np.asarray(w)[w_finite], t_w_np[w_finite], "attn_weights", cfg)
  else:
    assert w is None and t_w is None, cfg

  # --- no NaN anywhere, and torch is NaN only on fully masked rows ---
  g_ours = {"query": g_q, "key": g_k, "value": g_v, **state_dict_from_params(g_params)}
  for name, x in [("attn_output", out), ("attn_weights", w), *g_ours.items()]:
    assert x is None or np.isfinite(np.asarray(x)).all(), f"non-finite {name}\n{cfg}"
  out_blocked = blocked.any(axis=1)  # [N, L]: some head of the row attends nothing
  assert np.isfinite(from_layout(t_out_np, cfg)[~out_blocked]).all(), (
      f"torch NaN on a row our detector calls attendable\n{cfg}")

  # --- gradients against torch, whenever torch's are defined ---
  t_grads = {"query": tq.grad, "key": tk.grad, "value": tv.grad}
  t_grads.update((name, p.grad) for name, p in tm.named_parameters())
  t_grads = {name: g.numpy() for name, g in t_grads.items()}
  assert set(g_ours) == set(t_grads), f"parameter sets differ\n{cfg}"
  torch_grads_finite = all(np.isfinite(g).all() for g in t_grads.values())
  assert torch_grads_finite or blocked.any(), f"torch gradients NaN without masked rows\n{cfg}"
  if torch_grads_finite:
    for name, g in g_ours.items():
      _close(g, t_grads[name], f"d/d{name}", cfg)

  if not blocked.any():
    return
  # --- fully masked rows: our documented behaviour ---
  # torch's per-head weights where it is defined, 0 on fully masked rows.
  with torch.no_grad(), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _, t_heads = tm(
        tq, tk, tv,
        key_padding_mask=None if arrays.key_padding_mask is None
        else torch.from_numpy(arrays.key_padding_mask),
        need_weights=True,
        attn_mask=None if torch_mask is None else torch.from_numpy(torch_mask),
        average_attn_weights=False, is_causal=False,
    )
  heads = weights_batch_first(t_heads.numpy(), cfg).astype(np.float64)  # [N, H, L, S']
  assert np.isnan(heads[blocked]).all() or np.all(heads[blocked] == 0), cfg
  heads[blocked] = 0.0
  if cfg.need_weights:
    ours = weights_batch_first(w, cfg)
    expected = heads.mean(axis=1) if cfg.average_attn_weights else heads
    _close(ours, expected, "attn_weights with fully masked rows", cfg)
    if not cfg.average_attn_weights:
      assert np.all(ours[blocked] == 0), f"fully masked rows must have weights 0\n{cfg}"
  expected_out = _numpy_reference_output(cfg, arrays, params, heads)
  ours_out = from_layout(out, cfg)
  _close(ours_out, expected_out, "attn_output with fully masked rows", cfg)
  all_heads = blocked.all(axis=1)  # [N, L]: no head attends anything
  bias = np.asarray(params["out_proj"]["bias"]) if cfg.bias else np.zeros(cfg.embed_dim)
  _close(ours_out[all_heads], np.broadcast_to(bias, ours_out[all_heads].shape),
         "rows attending nothing must be out_proj's bias", cfg, atol=1e-6, rtol=1e-6)


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(cfg=configs(sizes=SMALL_SIZES, batched=True, dropout=True))
def test_jit_equals_eager_and_vmap_equals_batched(cfg: Config):
  arrays = make_arrays(cfg)
  module = cfg.module()
  params = params_from_torch(torch_mha(cfg, arrays.state_dict))
  deterministic = cfg.dropout == 0.0
  rngs = None if deterministic else {"dropout": jax.random.key(cfg.seed % 2**31)}

  def call(q, k, v, kpm, mask):
    return module.apply(
        {"params": params}, q, k, v, key_padding_mask=kpm, need_weights=cfg.need_weights,
        attn_mask=mask, average_attn_weights=cfg.average_attn_weights,
        is_causal=cfg.is_causal, deterministic=deterministic, rngs=rngs,
    )

  q, k, v = (to_layout(x, cfg) for x in (arrays.query, arrays.key, arrays.value))
  args = (q, k, v, arrays.key_padding_mask, arrays.attn_mask)
  eager_out, eager_w = call(*args)
  jit_out, jit_w = quick_jit(call)(*args)
  _close(jit_out, eager_out, "jit attn_output", cfg, JAX_ATOL, JAX_RTOL)
  if cfg.need_weights:
    _close(jit_w, eager_w, "jit attn_weights", cfg, JAX_ATOL, JAX_RTOL)
  else:
    assert jit_w is None and eager_w is None, cfg
  if not deterministic:
    return  # one dropout mask for the batch is not N masks for its rows

  # vmap of the unbatched call over a leading batch axis.
  mask, mask_axis = arrays.attn_mask, None
  if mask is not None and mask.ndim == 3:  # [N * H, L, S] -> [N, H, L, S]
    mask, mask_axis = mask.reshape(cfg.n, cfg.num_heads, *mask.shape[1:]), 0
  kpm = arrays.key_padding_mask
  vmapped = jax.vmap(call, in_axes=(0, 0, 0, None if kpm is None else 0, mask_axis))
  vmapped_out, vmapped_w = quick_jit(vmapped)(
      arrays.query, arrays.key, arrays.value, kpm, mask)
  _close(vmapped_out, from_layout(eager_out, cfg), "vmap attn_output", cfg,
         JAX_ATOL, JAX_RTOL)
  if cfg.need_weights:
    _close(vmapped_w, eager_w, "vmap attn_weights", cfg, JAX_ATOL, JAX_RTOL)
  else:
    assert vmapped_w is None, cfg
