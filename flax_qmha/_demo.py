"""The main demo: ``python -m flax_qmha demo``.

Imports an int8 MHA that torch's own quantization flow produced (shipped in
``flax_qmha/data``, made by ``scripts/make_demo_checkpoint.py``), runs it
jit-compiled without torch, and compares it with torch's stored outputs.
"""

from __future__ import annotations

import functools
import importlib.resources
import time

import jax
import numpy as np

from flax_qmha._convert import dequantize
from flax_qmha._from_torch import from_torch
from flax_qmha._torch_pickle import load_torch_file


def _median_ms(fn, *args, repeats: int = 50) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def _snr_db(reference: np.ndarray, x: np.ndarray) -> float:
  reference, x = np.asarray(reference, np.float64), np.asarray(x, np.float64)
  return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - x) ** 2)))


def _nbytes(tree) -> int:
  return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))


def run_demo() -> int:
  data = importlib.resources.files("flax_qmha") / "data"
  checkpoint = data / "demo_int8_mha.pt"
  with (data / "demo_reference.npz").open("rb") as f:
    ref = dict(np.load(f))
  with checkpoint.open("rb") as f:
    state = load_torch_file(f)
  # torch's quantized MHA takes quantized inputs; their qparams are in the QuantStubs.
  input_qparams = {
      name: (float(state[f"quant_{name}.scale"][0]), int(state[f"quant_{name}.zero_point"][0]))
      for name in ("query", "key", "value")
  }
  with checkpoint.open("rb") as f:
    qmodule, qvariables = from_torch(f, prefix="mha", num_heads=int(ref["num_heads"]),
                                     input_qparams=input_qparams)
  x, kpm = ref["x"], ref["key_padding_mask"]
  print("flax-qmha demo: an int8 MultiheadAttention made by torch's quantization flow")
  print(f"  checkpoint: {checkpoint.name} (torch.save, read without torch), backend:"
        f" {jax.default_backend()}")
  print(f"  module: {type(qmodule).__name__}(embed_dim={qmodule.embed_dim},"
        f" num_heads={qmodule.num_heads}, numerics={qmodule.numerics!r}); input {x.shape},"
        " last 5 keys of batch 1 padded")

  int8_forward = jax.jit(functools.partial(qmodule.apply, need_weights=True))
  out, weights = int8_forward(qvariables, x, x, x, key_padding_mask=kpm)
  out, weights = np.asarray(out), np.asarray(weights)
  step = float(np.asarray(qvariables["params"]["out_proj"]["output_scale"]))
  steps = np.abs(out - ref["torch_int8_output"]) / step
  print("\n  agreement with torch's int8 output (one step = one output quantization level):")
  print(f"    identical: {np.mean(steps < 1e-3):.2%}   within one step: {np.mean(steps <= 1.001):.2%}"
        f"   max: {steps.max():.2f} steps")
  print(f"    attention weights: max |ours - torch| = "
        f"{np.max(np.abs(weights - ref['torch_int8_weights'])):.2e}")

  fmodule, fvariables = dequantize(qmodule, qvariables)
  float_forward = jax.jit(functools.partial(fmodule.apply, need_weights=False))
  int8_no_weights = jax.jit(functools.partial(qmodule.apply, need_weights=False))
  print("\n  accuracy against the original float module (SQNR, higher is better):")
  print(f"    torch int8: {_snr_db(ref['float_output'], ref['torch_int8_output']):5.1f} dB"
        f"   flax-qmha int8: {_snr_db(ref['float_output'], out):5.1f} dB")

  float_ms = _median_ms(float_forward, fvariables, x, x, x)
  int8_ms = _median_ms(int8_no_weights, qvariables, x, x, x)
  float_bytes, int8_bytes = _nbytes(fvariables), _nbytes(qvariables)
  print("\n                       latency (jit, median)   variables")
  print(f"    float (dequantized)  {float_ms:8.3f} ms           {float_bytes / 1024:7.1f} KiB")
  print(f"    int8                 {int8_ms:8.3f} ms           {int8_bytes / 1024:7.1f} KiB"
        f"  ({int8_bytes / float_bytes:.2f}x)")
  return 0
