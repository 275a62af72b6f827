"""flax-qmha: PyTorch's quantizable multi-head attention for JAX/Flax.

Public API:
  MultiheadAttention: torch.nn.MultiheadAttention's semantics as a Flax linen
    module, with optional observers and fake quantization (``qconfig``).
  QuantizedMultiheadAttention: the int8 inference module.
  convert / dequantize: float (calibrated or QAT) <-> int8.
  QConfig, QuantSpec, get_default_qconfig, get_default_qat_qconfig: configuration.
  fake_quantize: torch's fake quantization with a straight-through gradient.
  to_torch_state_dict, to_flax_attention: export float parameters.
  save_variables, load_variables: variables as safetensors or Flax msgpack files.
  from_torch, from_torch_checkpoint: import torch MHAs, state_dicts and checkpoint files.
  save_modules, load_modules: whole modules (fields + variables) in one file.
"""

from flax_qmha._convert import convert, dequantize
from flax_qmha._export import load_variables, save_variables, to_flax_attention, to_torch_state_dict
from flax_qmha._fake_quant import fake_quantize
from flax_qmha._from_torch import CheckpointImport, from_torch, from_torch_checkpoint
from flax_qmha._mha import MultiheadAttention
from flax_qmha._modules_file import load_modules, save_modules
from flax_qmha._qconfig import QConfig, QuantSpec, get_default_qat_qconfig, get_default_qconfig
from flax_qmha._quantized_mha import QuantizedMultiheadAttention

__all__ = [
    "MultiheadAttention",
    "QuantizedMultiheadAttention",
    "convert",
    "dequantize",
    "QConfig",
    "QuantSpec",
    "get_default_qconfig",
    "get_default_qat_qconfig",
    "fake_quantize",
    "to_torch_state_dict",
    "to_flax_attention",
    "save_variables",
    "load_variables",
    "from_torch",
    "from_torch_checkpoint",
    "CheckpointImport",
    "save_modules",
    "load_modules",
]
__version__ = "0.1.0"
