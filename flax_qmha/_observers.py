"""Observers: running statistics of a tensor and the qparams they imply.

The statistics live in the ``quant_stats`` collection under torch's buffer names
(``min_val``, ``max_val``, plus ``histogram`` for the histogram observer), so a
calibrated model maps one-to-one onto torch's ``activation_post_process``
buffers. The maths are pure functions (``initial_stats``, ``update_stats``,
``calculate_stats_qparams``), shared by the ``Observer`` module and by the
convert step; the module only creates the variables and decides when to update.

Non-finite values are deliberately ignored by every observer: torch's min/max
observers would let ``inf`` or ``NaN`` into ``min_val``/``max_val`` (and from
there into a NaN or infinite scale), and its histogram observer skips only
``inf``. Masking them keeps every scale finite; a batch with no finite value
leaves the statistics unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_qmha._fake_quant import fake_quantize
from flax_qmha._histogram import histogram_qparams, histogram_update
from flax_qmha._qconfig import QuantSpec
from flax_qmha._qparams import calculate_qparams, unfused

__all__ = [
    "STATS_COLLECTION",
    "Observer",
    "initial_stats",
    "update_stats",
    "calculate_stats_qparams",
]

STATS_COLLECTION = "quant_stats"


def _check_spec(spec, owner: str) -> None:
  if not isinstance(spec, QuantSpec):
    raise TypeError(f"{owner}: spec must be a QuantSpec, got {type(spec).__name__}")


def _channel_axis(channel_axis, ndim: int, owner: str) -> int:
  if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
    raise TypeError(f"{owner}: channel_axis must be an int, got {channel_axis!r}")
  if not -ndim <= channel_axis < ndim:
    raise ValueError(
        f"{owner}: channel_axis {channel_axis} is out of range for an input of rank {ndim}"
    )
  return int(channel_axis) % ndim


def initial_stats(spec: QuantSpec, num_channels: int | None = None) -> dict[str, jax.Array]:
  """Statistics of an observer that has seen nothing, as torch initialises them.

  Args:
    spec: the observer's spec.
    num_channels: number of channels, required for per-channel specs.

  Returns:
    ``{"min_val": +inf, "max_val": -inf}`` (scalars, or ``[num_channels]`` for
    per-channel specs), plus ``"histogram": zeros([bins])`` for histogram specs.
  """
  _check_spec(spec, "initial_stats")
  if spec.is_per_channel:
    if isinstance(num_channels, bool) or not isinstance(num_channels, (int, np.integer)) \
        or num_channels <= 0:
      raise ValueError(
          f"initial_stats: per-channel spec ({spec.qscheme}) needs num_channels > 0,"
          f" got {num_channels!r}"
      )
    shape = (int(num_channels),)
  else:
    shape = ()
  stats = {
      "min_val": jnp.full(shape, jnp.inf, jnp.float32),
      "max_val": jnp.full(shape, -jnp.inf, jnp.float32),
  }
  if spec.observer == "histogram":
    stats["histogram"] = jnp.zeros((spec.bins,), jnp.float32)
  return stats


def _check_stats(spec: QuantSpec, stats, owner: str) -> None:
  if not isinstance(stats, dict) and not hasattr(stats, "keys"):
    raise TypeError(f"{owner}: stats must be a dict, got {type(stats).__name__}")
  needed = ("min_val", "max_val") + (("histogram",) if spec.observer == "histogram" else ())
  missing = [k for k in needed if k not in stats]
  if missing:
    raise ValueError(
        f"{owner}: stats for observer {spec.observer!r} need keys {list(needed)}, missing"
        f" {missing} (got {sorted(stats)})"
    )
  min_shape, max_shape = jnp.shape(stats["min_val"]), jnp.shape(stats["max_val"])
  if min_shape != max_shape:
    raise ValueError(
        f"{owner}: min_val and max_val must have the same shape, got {min_shape} and {max_shape}"
    )
  expected_rank = 1 if spec.is_per_channel else 0
  if len(min_shape) != expected_rank:
    raise ValueError(
        f"{owner}: {spec.qscheme} stats must be "
        + ("vectors [C]" if expected_rank else "scalars")
        + f", got min_val of shape {min_shape}"
    )
  if spec.observer == "histogram" and jnp.shape(stats["histogram"]) != (spec.bins,):
    raise ValueError(
        f"{owner}: histogram must have shape ({spec.bins},) (spec.bins), got"
        f" {jnp.shape(stats['histogram'])}"
    )


def update_stats(
    spec: QuantSpec,
    stats: dict[str, jax.Array],
    x: jax.Array,
    channel_axis: int = -1,
) -> dict[str, jax.Array]:
  """Folds a batch into an observer's statistics (torch's ``observer.forward``).

  * ``minmax``: ``min_val = min(min_val, min(x))``, ``max_val`` likewise;
  * ``moving_average_minmax``: the first batch copies ``min(x)``/``max(x)``,
    later ones ``min_val + c * (min(x) - min_val)`` (torch's formula and
    rounding order, ``c`` = ``spec.averaging_constant``);
  * ``histogram``: ``histogram_update``.

  Per-channel specs reduce over every axis but ``channel_axis``. Non-finite values
  of ``x`` are ignored (see the module docstring).

  Args:
    spec: the observer's spec.
    stats: current statistics (``initial_stats`` layout).
    x: the observed batch, any float dtype (observed in float32); no gradient
      flows into the statistics.
    channel_axis: axis of ``x`` holding the channels, for per-channel specs.

  Returns:
    The updated statistics (a new dict).
  """
  _check_spec(spec, "update_stats")
  _check_stats(spec, stats, "update_stats")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"update_stats: x must be a floating-point array, got dtype {x.dtype}")
  if x.size == 0:  # torch returns early on empty input
    return dict(stats)
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  min_val = jnp.asarray(stats["min_val"], jnp.float32)
  max_val = jnp.asarray(stats["max_val"], jnp.float32)

  if spec.observer == "histogram":
    histogram, min_val, max_val = histogram_update(stats["histogram"], min_val, max_val, x)
    return {**stats, "histogram": histogram, "min_val": min_val, "max_val": max_val}

  if spec.is_per_channel:
    axis = _channel_axis(channel_axis, x.ndim, "update_stats")
    if x.shape[axis] != min_val.shape[0]:
      raise ValueError(
          f"update_stats: x has {x.shape[axis]} channels on axis {axis} (shape {x.shape})"
          f" but the stats have {min_val.shape[0]}"
      )
    reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
  else:
    reduce_axes = None
  finite = jnp.isfinite(x)
  cur_min = jnp.min(jnp.where(finite, x, jnp.inf), axis=reduce_axes)
  cur_max = jnp.max(jnp.where(finite, x, -jnp.inf), axis=reduce_axes)
  has_data = jnp.any(finite, axis=reduce_axes)

  if spec.observer == "minmax":
    # Masked-out values are +-inf, so a batch without data changes nothing.
    new_min = jnp.minimum(cur_min, min_val)
    new_max = jnp.maximum(cur_max, max_val)
  else:
    c = jnp.float32(spec.averaging_constant)
    first = (min_val == jnp.inf) & (max_val == -jnp.inf)
    # torch: min_val + averaging_constant * (min_val_cur - min_val), the product
    # rounded before the addition.
    avg_min = min_val + unfused(c * (cur_min - min_val))
    avg_max = max_val + unfused(c * (cur_max - max_val))
    new_min = jnp.where(has_data, jnp.where(first, cur_min, avg_min), min_val)
    new_max = jnp.where(has_data, jnp.where(first, cur_max, avg_max), max_val)
  return {**stats, "min_val": new_min, "max_val": new_max}


def calculate_stats_qparams(
    spec: QuantSpec, stats: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """Scale and zero point implied by an observer's statistics (``calculate_qparams``).

  Histogram specs run torch's L2 range search (``histogram_qparams``); min/max
  specs use ``calculate_qparams`` directly. Never-observed statistics give scale
  1.0 and zero point 0, as torch.

  Args:
    spec: the observer's spec.
    stats: ``{"min_val", "max_val"[, "histogram"]}`` as kept in ``quant_stats``.

  Returns:
    ``(scale, zero_point)``: float32 and int32, scalars for per-tensor specs and
    ``[C]`` for per-channel ones.
  """
  _check_spec(spec, "calculate_stats_qparams")
  _check_stats(spec, stats, "calculate_stats_qparams")
  quant_min, quant_max = spec.quant_range
  kwargs = dict(
      quant_min=quant_min,
      quant_max=quant_max,
      qscheme=spec.qscheme,
      dtype=spec.dtype,
      eps=spec.eps,
      has_customized_qrange=spec.has_customized_qrange,
  )
  min_val = jax.lax.stop_gradient(jnp.asarray(stats["min_val"], jnp.float32))
  max_val = jax.lax.stop_gradient(jnp.asarray(stats["max_val"], jnp.float32))
  if spec.observer == "histogram":
    histogram = jax.lax.stop_gradient(jnp.asarray(stats["histogram"], jnp.float32))
    return histogram_qparams(histogram, min_val, max_val, **kwargs)
  return calculate_qparams(min_val, max_val, **kwargs)


class Observer(nn.Module):
  """Observes a tensor into ``quant_stats`` and optionally fake-quantizes it.

  The counterpart of torch's observer (``fake_quant=False``) or ``FakeQuantize``
  module (``fake_quant=True``: observe, compute qparams from the updated
  statistics, fake-quantize with them). Statistics are updated only when the
  ``quant_stats`` collection is mutable and the module is not initializing, so
  an observer is frozen simply by applying the model without
  ``mutable=["quant_stats"]``.

  Attributes:
    spec: what to observe and how to choose qparams.
    fake_quant: whether to return the fake-quantized input (QAT) instead of the
      input unchanged (calibration).
    channel_axis: axis of the input holding the channels, for per-channel specs.
      Kernels are stored ``[in_features, out_features]``, so the default -1 is the
      output channel (torch's weight ``[out, in]`` with ``ch_axis=0``).
  """

  spec: QuantSpec
  fake_quant: bool = False
  channel_axis: int = -1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Observes ``x``.

    Args:
      x: float array ``[...]`` of any dtype; per-channel specs need
        ``x.shape[channel_axis]`` channels.

    Returns:
      ``x`` unchanged, or, with ``fake_quant``, ``fake_quantize(x)`` with the
      qparams of the (freshly updated) statistics, same shape and dtype.
    """
    _check_spec(self.spec, "Observer")
    if not isinstance(self.fake_quant, (bool, np.bool_)):
      raise TypeError(f"Observer: fake_quant must be a bool, got {self.fake_quant!r}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"Observer: x must be a floating-point array, got dtype {x.dtype}")
    spec = self.spec
    axis = None
    num_channels = None
    if spec.is_per_channel:
      axis = _channel_axis(self.channel_axis, x.ndim, "Observer")
      num_channels = x.shape[axis]
    init = initial_stats(spec, num_channels)
    variables = {
        name: self.variable(STATS_COLLECTION, name, lambda v=value: v)
        for name, value in init.items()
    }
    stats: dict[str, Any] = {name: var.value for name, var in variables.items()}
    if self.is_mutable_collection(STATS_COLLECTION) and not self.is_initializing():
      stats = update_stats(spec, stats, x, self.channel_axis)
      for name, var in variables.items():
        var.value = stats[name]
    if not self.fake_quant:
      return x
    scale, zero_point = calculate_stats_qparams(spec, stats)
    quant_min, quant_max = spec.quant_range
    return fake_quantize(x, scale, zero_point, quant_min, quant_max, axis=axis)
