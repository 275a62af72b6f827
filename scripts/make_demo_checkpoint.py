"""Builds the demo's data files with torch's own quantization flow.

Writes, into ``flax_qmha/data/``:
  demo_int8_mha.pt      the state_dict of a model ``QuantStub x3 -> quantized MHA``
                        made by torch's eager flow (prepare -> calibrate -> convert,
                        x86 qconfig), saved with ``torch.save``;
  demo_reference.npz    the demo's inputs, torch's int8 output and weights, and the
                        float module's output, to compare against without torch.

    python scripts/make_demo_checkpoint.py
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import torch
from torch import nn

E, H, L, N = 128, 4, 32, 4
ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "flax_qmha" / "data"
sys.path.insert(0, str(ROOT / "tests"))
from torch_quant_flow import observe_and_convert  # noqa: E402  (torch's eager flow, shared)


def main() -> None:
  torch.manual_seed(0)
  torch.backends.quantized.engine = "x86"
  mha = nn.MultiheadAttention(E, H)
  with torch.no_grad():  # trained-looking biases, which torch's own dequantize() rejects
    mha.in_proj_bias.normal_(0, 0.1)
    mha.out_proj.bias.normal_(0, 0.1)
  calibration = [torch.randn(L, N, E) for _ in range(4)]
  x = torch.randn(L, N, E)
  key_padding_mask = torch.zeros(N, L, dtype=torch.bool)
  key_padding_mask[1, -5:] = True

  _, converted = observe_and_convert(
      mha, torch.ao.quantization.get_default_qconfig("x86"), [(b, b, b) for b in calibration])
  with torch.no_grad():
    int8_out, int8_w = converted(x, x, x, key_padding_mask=key_padding_mask)
    float_out, float_w = mha(x, x, x, key_padding_mask=key_padding_mask)

  DATA.mkdir(parents=True, exist_ok=True)
  torch.save(converted.state_dict(), DATA / "demo_int8_mha.pt")
  np.savez_compressed(
      DATA / "demo_reference.npz", x=x.numpy(), key_padding_mask=key_padding_mask.numpy(),
      torch_int8_output=int8_out.numpy(), torch_int8_weights=int8_w.numpy(),
      float_output=float_out.numpy(), float_weights=float_w.numpy(),
      num_heads=np.int64(H),
  )
  for path in sorted(DATA.iterdir()):
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
