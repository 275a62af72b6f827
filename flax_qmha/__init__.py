"""flax-qmha: PyTorch's quantizable multi-head attention for JAX/Flax.

Public API:
  MultiheadAttention: torch.nn.MultiheadAttention's semantics as a Flax linen module.
"""

from flax_qmha._mha import MultiheadAttention

__all__ = ["MultiheadAttention"]
__version__ = "0.1.0"
