"""Test helpers around torch modules."""

from __future__ import annotations

import numpy as np
import torch

from flax_qmha._torch_layout import params_from_state_dict


def params_from_torch(mha: torch.nn.MultiheadAttention) -> dict:
  """A float torch MHA's weights in our ``params`` layout."""
  return params_from_state_dict(
      {k: v.detach().cpu().numpy().astype(np.float32) for k, v in mha.state_dict().items()}
  )
