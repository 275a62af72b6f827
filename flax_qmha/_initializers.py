"""torch.nn.MultiheadAttention's parameter initialisation, as Flax initializers.

Our kernels are stored ``(in_features, out_features)`` (the transpose of
torch's ``weight``), so fans are given explicitly instead of read off the shape.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def xavier_uniform(fan_in: int, fan_out: int):
  """``U(-b, b)`` with ``b = sqrt(6 / (fan_in + fan_out))`` (torch's xavier_uniform_).

  torch initialises the packed ``in_proj_weight`` of shape ``(3E, E)`` as one
  matrix, so with ``kdim == vdim == embed_dim`` each projection sees
  ``fan_out = 3E``; with separate ``q/k/v_proj_weight`` it is ``E``.
  """
  bound = math.sqrt(6.0 / (fan_in + fan_out))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_linear_kernel(fan_in: int):
  """torch ``nn.Linear`` weight init, ``kaiming_uniform_(a=sqrt(5))``, which is
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def xavier_normal_bias_kv(embed_dim: int):
  """torch's ``xavier_normal_`` on a ``(1, 1, E)`` tensor: both fans are ``E``,
  so the standard deviation is ``sqrt(2 / 2E) = 1/sqrt(E)``."""
  std = 1.0 / math.sqrt(embed_dim)

  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)

  return init
