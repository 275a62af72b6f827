"""Float parameters between torch.nn.MultiheadAttention's state_dict layout and ours.

Pure numpy, no torch: torch stores ``weight`` as ``(out, in)`` and packs Q/K/V
into one ``in_proj_weight`` ``(3E, E)`` when kdim == vdim == embed_dim (else
``q_proj_weight``/``k_proj_weight``/``v_proj_weight``), with one
``in_proj_bias`` ``(3E,)``; our kernels are ``(in, out)`` per projection.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

IN_PROJECTIONS = ("linear_Q", "linear_K", "linear_V")


def params_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """torch.nn.MultiheadAttention state_dict (numpy values) -> our ``params``."""
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  if "in_proj_weight" in sd:
    weights = np.split(sd["in_proj_weight"], 3)
  else:
    weights = [sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]]
  biases = np.split(sd["in_proj_bias"], 3) if sd.get("in_proj_bias") is not None else [None] * 3
  params = {}
  for name, w, b in zip(IN_PROJECTIONS, weights, biases):
    params[name] = {"kernel": np.ascontiguousarray(w.T)}
    if b is not None:
      params[name]["bias"] = b
  params["out_proj"] = {"kernel": np.ascontiguousarray(sd["out_proj.weight"].T)}
  if sd.get("out_proj.bias") is not None:
    params["out_proj"]["bias"] = sd["out_proj.bias"]
  if sd.get("bias_k") is not None:
    params["bias_k"], params["bias_v"] = sd["bias_k"], sd["bias_v"]
  return params


def state_dict_from_params(params: Mapping) -> dict[str, np.ndarray]:
  """Our float ``params`` -> a torch.nn.MultiheadAttention state_dict (numpy).

  Also maps parameter gradients, which share the parameters' structure.
  """
  kernels = [np.asarray(params[n]["kernel"]) for n in IN_PROJECTIONS]
  sd = {}
  if len({k.shape for k in kernels}) == 1 and kernels[0].shape[0] == kernels[0].shape[1]:
    sd["in_proj_weight"] = np.concatenate([k.T for k in kernels])
  else:
    sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"] = (k.T for k in kernels)
  if "bias" in params["linear_Q"]:
    sd["in_proj_bias"] = np.concatenate([np.asarray(params[n]["bias"]) for n in IN_PROJECTIONS])
  if "bias_k" in params:
    sd["bias_k"], sd["bias_v"] = np.asarray(params["bias_k"]), np.asarray(params["bias_v"])
  sd["out_proj.weight"] = np.asarray(params["out_proj"]["kernel"]).T
  if "bias" in params["out_proj"]:
    sd["out_proj.bias"] = np.asarray(params["out_proj"]["bias"])
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}
