"""Test helpers: build torch references and copy their weights into our layout."""

from __future__ import annotations

import numpy as np
import torch


def params_from_torch(mha: torch.nn.MultiheadAttention) -> dict:
  """The one place tests copy a float torch MHA's weights into our ``params``.

  torch stores ``weight`` as ``(out, in)`` and packs Q/K/V into
  ``in_proj_weight`` when kdim == vdim == embed_dim; our kernels are
  ``(in, out)`` per projection.
  """
  sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in mha.state_dict().items()}
  e = mha.embed_dim
  if "in_proj_weight" in sd:
    wq, wk, wv = np.split(sd["in_proj_weight"], 3)
  else:
    wq, wk, wv = sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]
  biases = np.split(sd["in_proj_bias"], 3) if "in_proj_bias" in sd else (None,) * 3
  params = {}
  for name, w, b in zip(("linear_Q", "linear_K", "linear_V"), (wq, wk, wv), biases):
    params[name] = {"kernel": w.T.copy()}
    if b is not None:
      params[name]["bias"] = b
  params["out_proj"] = {"kernel": sd["out_proj.weight"].T.copy()}
  if "out_proj.bias" in sd:
    params["out_proj"]["bias"] = sd["out_proj.bias"]
  if "bias_k" in sd:
    params["bias_k"], params["bias_v"] = sd["bias_k"], sd["bias_v"]
  assert params["linear_Q"]["kernel"].shape == (e, e)
  return params


def grads_to_torch_layout(grads: dict, packed: bool) -> dict:
  """Our parameter gradients rearranged into torch's state_dict names/layout."""
  out = {}
  kernels = [np.asarray(grads[n]["kernel"]).T for n in ("linear_Q", "linear_K", "linear_V")]
  if packed:
    out["in_proj_weight"] = np.concatenate(kernels)
  else:
    out["q_proj_weight"], out["k_proj_weight"], out["v_proj_weight"] = kernels
  if "bias" in grads["linear_Q"]:
    out["in_proj_bias"] = np.concatenate(
        [np.asarray(grads[n]["bias"]) for n in ("linear_Q", "linear_K", "linear_V")]
    )
  out["out_proj.weight"] = np.asarray(grads["out_proj"]["kernel"]).T
  if "bias" in grads["out_proj"]:
    out["out_proj.bias"] = np.asarray(grads["out_proj"]["bias"])
  if "bias_k" in grads:
    out["bias_k"], out["bias_v"] = np.asarray(grads["bias_k"]), np.asarray(grads["bias_v"])
  return out
