"""The main demo: ``python -m flax_qmha demo``."""

from __future__ import annotations

import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax_qmha._mha import MultiheadAttention
from flax_qmha._torch_layout import state_dict_from_params


def _median_ms(fn, *args, repeats: int = 20) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def _torch_agreement(params, module, q, k, v, kpm, out, weights) -> str:
  """Loads our weights into torch.nn.MultiheadAttention and compares outputs."""
  import torch  # optional extra, imported only when present

  tm = torch.nn.MultiheadAttention(module.embed_dim, module.num_heads, batch_first=True)
  tm.load_state_dict({k: torch.tensor(v) for k, v in state_dict_from_params(params).items()},
                     strict=True)
  with torch.no_grad():
    t_out, t_w = tm(*(torch.tensor(np.asarray(x)) for x in (q, k, v)),
                    key_padding_mask=torch.tensor(kpm))
  d_out = float(np.max(np.abs(np.asarray(out) - t_out.numpy())))
  d_w = float(np.max(np.abs(np.asarray(weights) - t_w.numpy())))
  return f"max |ours - torch|: output {d_out:.2e}, weights {d_w:.2e}"


def run_demo(seed: int = 0) -> int:
  e, h, n, l, s = 256, 8, 4, 64, 64
  module = MultiheadAttention(e, h, batch_first=True)
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(n, t, e)).astype(np.float32) for t in (l, s, s))
  kpm = np.zeros((n, s), bool)
  kpm[:, s - 8:] = True  # the last 8 keys are padding
  variables = module.init(jax.random.key(seed), q, k, v)
  forward = jax.jit(lambda variables, q, k, v, kpm: module.apply(
      variables, q, k, v, key_padding_mask=kpm))
  out, weights = forward(variables, q, k, v, kpm)
  print(f"flax-qmha demo: MultiheadAttention(embed_dim={e}, num_heads={h}, batch_first=True)")
  print(f"  backend: {jax.default_backend()}; query {q.shape}, key/value {k.shape},"
        f" last 8 keys padded")
  print(f"  float forward (jit): output {out.shape}, weights {weights.shape},"
        f" median {_median_ms(forward, variables, q, k, v, kpm):.2f} ms")
  if importlib.util.find_spec("torch") is None:
    print("  torch is not installed: skipping the comparison with torch.nn.MultiheadAttention")
  else:
    print("  " + _torch_agreement(variables["params"], module, q, k, v, kpm, out, weights))
  return 0
