"""The linear projection used for Q, K, V and the output of the attention."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

Dtype = Any
Initializer = Any


class Projection(nn.Module):
  """``y = x @ kernel + bias``, torch's ``nn.Linear`` with a Flax-layout kernel.

  Attributes:
    features: number of output features.
    use_bias: whether to add a bias (torch's ``bias``).
    dtype: computation dtype (``None``: inferred from inputs and params).
    param_dtype: dtype of the parameters.
    kernel_init: initializer of the ``(in_features, features)`` kernel.
    bias_init: initializer of the ``(features,)`` bias.
  """

  features: int
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[..., in_features] -> [..., features]``."""
    kernel = self.param(
        "kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype
    )
    bias = (
        self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        if self.use_bias
        else None
    )
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
      y = y + bias
    return y
