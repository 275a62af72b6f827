"""The linear projection used for Q, K, V and the output of the attention."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from flax_qmha._observers import Observer

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
    qconfig: ``None`` (float), or a ``QConfig``: the output is observed
      (``activation_post_process``) and, when ``qconfig.fake_quant``, the kernel
      is fake-quantized per output channel or per tensor (``weight_fake_quant``)
      and so is the output. Observe-only (post-training) configs leave the
      kernel alone: convert() chooses its qparams from the final weights, as
      torch does.
  """

  features: int
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  qconfig: Any = None

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
    quantized = self.qconfig is not None
    if quantized and self.qconfig.fake_quant:
      kernel = Observer(self.qconfig.weight, fake_quant=True, channel_axis=-1,
                        name="weight_fake_quant")(kernel)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
      y = y + bias
    if quantized:
      y = Observer(self.qconfig.activation, fake_quant=self.qconfig.fake_quant,
                   name="activation_post_process")(y)
    return y
