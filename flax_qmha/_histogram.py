"""torch 2.13's ``HistogramObserver`` maths as pure, jit-able functions.

Two parts, both with fixed shapes so that they run under ``jax.jit``:

* ``histogram_update``: the running histogram over ``[min_val, max_val]`` after
  a new batch (``HistogramObserver.forward``): the first batch is binned with
  ``torch.histc``; later batches that widen the range re-bin the old histogram
  (``_upscale_histogram``: every bin split into ``upsample_rate`` pieces whose
  mid-points are re-assigned to the new bins) with a scatter-add instead of
  data-dependent slicing.
* ``histogram_qparams``: ``_non_linear_param_search`` (a greedy search over bin
  ranges minimising an L2 quantization error, written as a ``lax.while_loop``)
  followed by the usual ``_calculate_qparams``.

Bitwise fidelity to torch on CPU, and what it needs:

* torch's kernels are compiled with fused multiply-adds: ``torch.linspace``
  computes ``start + step * i`` as one FMA, reproduced with ``fma_f32``.
* the search mixes float32 tensors and Python doubles. Doubles that only feed
  float32 tensor ops are cast to float32 by torch, so we compute those casts
  directly with error-free float32 arithmetic (double-float); ``cumsum`` is
  accumulated in double by torch and is reproduced the same way.
* ``torch.sum`` over float32 uses a fixed vectorised cascade; ``torch_sum``
  reproduces its order (8-float vectors: torch's sum kernel runs at AVX2 width
  even on AVX-512 machines, as measured with torch 2.13), so the quantization
  errors compared by the search are bitwise torch's.
* the scatter-add that re-bins the histogram accumulates in index order on CPU,
  as ``torch.bincount`` does.

Deliberate differences: non-finite inputs are ignored (torch ignores +-inf and
lets NaN poison the range), and a constant batch too large for ``min - 1`` to
differ from ``min`` in float32 is binned into the middle bin instead of reaching
undefined behaviour in ``torch.histc``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flax_qmha._qparams import (
    FLOAT32_EPS,
    calculate_qparams,
    fma_f32,
    true_divide,
    two_prod,
    two_sum,
    unfused,
)

__all__ = [
    "UPSAMPLE_RATE",
    "TORCH_SUM_LANES",
    "torch_linspace",
    "torch_sum",
    "histc",
    "histogram_update",
    "non_linear_param_search",
    "histogram_qparams",
]

UPSAMPLE_RATE = 16  # torch's HistogramObserver.upsample_rate

# _non_linear_param_search moves alpha up or beta down by 1e-5 per step and stops
# when alpha >= beta. With torch's double accumulation (alpha += 1e-5, beta -=
# 1e-5), alpha after i steps < beta after j steps exactly when i + j <= 100000
# (checked for every i in tests/test_histogram.py).
_STEPSIZE = 1e-5
_MAX_STEPS = 100_000
_STEP_HI = np.float32(_STEPSIZE)
_STEP_LO = np.float32(_STEPSIZE - float(_STEP_HI))

# Floats per vector in torch's CPU sum kernel (AVX2 width, also used on AVX-512
# machines; NEON builds use 8 as well).
TORCH_SUM_LANES = 8


# ----------------------------------------------------------------------------
# Small torch kernels, reproduced.
# ----------------------------------------------------------------------------


def torch_linspace(start: jax.Array, end: jax.Array, steps: int) -> jax.Array:
  """``torch.linspace(start, end, steps)`` in float32, bitwise on CPU.

  torch's kernel computes ``start + step * i`` for the first half and
  ``end - step * (steps - 1 - i)`` for the second, each contracted into one FMA by
  the compiler, with ``step = (end - start) / (steps - 1)`` in float32.
  """
  start = jnp.asarray(start, jnp.float32)
  end = jnp.asarray(end, jnp.float32)
  step = true_divide(end - start, jnp.float32(steps - 1))
  i = jnp.arange(steps)
  first = fma_f32(step, i.astype(jnp.float32), start)
  second = fma_f32(-step, (steps - 1 - i).astype(jnp.float32), end)
  return jnp.where(i < steps // 2, first, second)


def _row_sum(items: jax.Array) -> jax.Array:
  """ATen's ``row_sum``: cascade sum of ``items[m, ...]`` over the leading axis."""
  ilp, num_levels = 4, 4
  m = items.shape[0]
  size_ilp = m // ilp
  rows = items[: size_ilp * ilp].reshape((size_ilp, ilp) + items.shape[1:])
  # multi_row_sum: 4 accumulators summed in blocks of level_step rows, each block
  # carried into a 4-level cascade.
  level_power = max(4, _ceil_log2(size_ilp) // num_levels)
  level_step = 1 << level_power
  level_mask = level_step - 1
  zeros = jnp.zeros((ilp,) + items.shape[1:], items.dtype)
  acc = [zeros] * num_levels
  i = 0
  while i + level_step <= size_ilp:
    for _ in range(level_step):
      acc[0] = acc[0] + rows[i]
      i += 1
    for j in range(1, num_levels):
      acc[j] = acc[j] + acc[j - 1]
      acc[j - 1] = zeros
      if i & (level_mask << (j * level_power)):
        break
  while i < size_ilp:
    acc[0] = acc[0] + rows[i]
    i += 1
  for j in range(1, num_levels):
    acc[0] = acc[0] + acc[j]
  partial = acc[0]
  first = partial[0]
  for k in range(size_ilp * ilp, m):  # leftover items go into the first partial sum
    first = first + items[k]
  for k in range(1, ilp):
    first = first + partial[k]
  return first


def torch_sum(v: jax.Array, lanes: int = TORCH_SUM_LANES) -> jax.Array:
  """``torch.sum`` of a contiguous float32 vector, in torch's CPU summation order.

  ATen's ``cascade_sum``: with at least ``lanes`` elements, ``vectorized_inner_sum``
  runs ``row_sum`` over ``lanes``-wide vectors, then adds the tail elements and
  the lanes in order; shorter vectors go through the scalar ``row_sum``. The
  order is fixed by the length, so this unrolls at trace time.

  Args:
    v: float32 vector ``[n]``.
    lanes: floats per vector in torch's sum kernel (8 on x86 and ARM builds).

  Returns:
    float32 scalar.
  """
  v = jnp.asarray(v, jnp.float32)
  if v.ndim != 1:
    raise ValueError(f"torch_sum: v must be a vector, got shape {v.shape}")
  n = v.shape[0]
  if n == 0:
    return jnp.float32(0.0)
  if n < lanes:
    return _row_sum(v)
  vec_size = n // lanes
  lane_sums = _row_sum(v[: vec_size * lanes].reshape(vec_size, lanes))  # [lanes]
  total = jnp.float32(0.0)
  for k in range(vec_size * lanes, n):
    total = total + v[k]
  for k in range(lanes):
    total = total + lane_sums[k]
  return total


def _ceil_log2(x: int) -> int:
  return 0 if x <= 1 else int(x - 1).bit_length()


def _div_floor(a: jax.Array, b: jax.Array) -> jax.Array:
  """``torch.div(a, b, rounding_mode="floor")`` for floats (c10::div_floor_floating)."""
  mod = jnp.fmod(a, b)
  div = true_divide(a - mod, b)
  div = jnp.where((mod != 0) & ((b < 0) != (mod < 0)), div - 1, div)
  floordiv = jnp.floor(div)
  floordiv = jnp.where(div - floordiv > 0.5, floordiv + 1, floordiv)
  basic_div = true_divide(a, b)
  floordiv = jnp.where(div == 0, jnp.copysign(jnp.float32(0.0), basic_div), floordiv)
  return jnp.where(b == 0, basic_div, floordiv)


def _ff_round(hi: jax.Array, lo: jax.Array) -> jax.Array:
  """Nearest float32 of the double-float ``hi + lo``."""
  s, e = two_sum(hi, lo)
  return s + e


def _ff_div(hi: jax.Array, lo: jax.Array, d) -> tuple[jax.Array, jax.Array]:
  """Double-float ``(hi + lo) / d`` for a float32 ``d``."""
  q = true_divide(hi, d)
  p, pe = two_prod(q, jnp.float32(d))
  r = true_divide((hi - p) - pe + lo, d)
  return two_sum(q, r)


def _cumsum_double(v: jax.Array) -> jax.Array:
  """``torch.cumsum`` of float32 on CPU: accumulated in double, each prefix cast to float32.

  The double accumulator is emulated by a double-float (hi, lo) pair, added to
  sequentially like torch's loop.
  """

  def step(carry, x):
    hi, lo = carry
    s, e = two_sum(hi, x)
    hi, lo = two_sum(s, e + lo)
    return (hi, lo), _ff_round(hi, lo)

  zero = jnp.float32(0.0)
  _, out = jax.lax.scan(step, (zero, zero), jnp.asarray(v, jnp.float32))
  return out


def histc(x: jax.Array, bins: int, min_val: jax.Array, max_val: jax.Array,
          weights: jax.Array | None = None) -> jax.Array:
  """``torch.histc(x, bins, min=min_val, max=max_val)`` on CPU, bitwise.

  torch bins each element with ``int((x - min) * bins / (max - min))`` in float32
  (the last edge belongs to the last bin) and drops elements outside
  ``[min, max]`` and NaN. When ``min == max`` it widens the edges to
  ``min - 1, max + 1`` (our callers only pass equal bounds for constant data, so
  torch's fallback to the data's own min/max gives the same bounds).

  Args:
    x: float array, any shape (flattened).
    bins: number of bins (static).
    min_val: left edge, float32 scalar.
    max_val: right edge, float32 scalar.
    weights: optional per-element weights (``x``'s shape); 0 drops an element.

  Returns:
    float32 ``[bins]`` counts.
  """
  x = jnp.ravel(jnp.asarray(x, jnp.float32))
  lo = jnp.asarray(min_val, jnp.float32)
  hi = jnp.asarray(max_val, jnp.float32)
  same = lo == hi
  # Edges computed in double by torch then cast: float32(m -+ 1) is the same value.
  lo = jnp.where(same, lo - 1, lo)
  hi = jnp.where(same, hi + 1, hi)
  width = hi - lo
  pos = true_divide((x - lo) * jnp.float32(bins), width)
  # For |min| >= 2**25, min -+ 1 rounds back to min and torch divides by zero
  # (undefined behaviour); we use the middle bin, where the +-1 widening puts it.
  pos = jnp.where(width == 0, jnp.float32(bins // 2), pos)
  inside = (x >= lo) & (x <= hi)
  idx = jnp.clip(jnp.trunc(jnp.where(inside, pos, 0.0)), 0, bins - 1).astype(jnp.int32)
  w = inside.astype(jnp.float32)
  if weights is not None:
    w = w * jnp.ravel(jnp.asarray(weights, jnp.float32))
  return jnp.zeros((bins,), jnp.float32).at[idx].add(w)


def _upscale_histogram(histogram, orig_min, orig_max, update_min, update_max,
                       upsample_rate: int) -> jax.Array:
  """``HistogramObserver._upscale_histogram``: the old histogram in the new range."""
  bins = histogram.shape[0]
  # [bins * rate]
  fine = true_divide(jnp.repeat(histogram, upsample_rate), jnp.float32(upsample_rate))
  bin_size = true_divide(orig_max - orig_min, jnp.float32(bins * upsample_rate))
  mid_points = (torch_linspace(orig_min, orig_max, bins * upsample_rate + 1)[:-1]
                + jnp.float32(0.5) * bin_size)
  boundaries = torch_linspace(update_min, update_max, bins + 1)
  # torch.bucketize(right=True) - 1 == searchsorted(side="right") - 1.
  bucket = jnp.searchsorted(boundaries, mid_points, side="right") - 1
  bucket = jnp.clip(bucket, 0, bins - 1)
  # Sequential float32 accumulation in index order, as torch.bincount.
  return jnp.zeros((bins,), jnp.float32).at[bucket].add(fine, indices_are_sorted=True)


@functools.partial(jax.jit, static_argnames=("upsample_rate",))
def histogram_update(
    histogram: jax.Array,
    min_val: jax.Array,
    max_val: jax.Array,
    x: jax.Array,
    *,
    upsample_rate: int = UPSAMPLE_RATE,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One ``HistogramObserver.forward`` step: folds batch ``x`` into the histogram.

  * never observed (``min_val == +inf`` or ``max_val == -inf``): the histogram
    of ``x`` over ``[min(x), max(x)]``;
  * range unchanged: old histogram plus ``histc(x)`` over it;
  * old range a single point: its total count is placed into the new range
    with ``histc``, plus ``histc(x)``;
  * otherwise: the old histogram re-binned into the widened range
    (``_upscale_histogram``) plus ``histc(x)`` over the new range.

  Non-finite elements of ``x`` are ignored; a batch with none leaves the state
  unchanged (torch skips all-inf batches the same way).

  Args:
    histogram: float32 ``[bins]`` counts.
    min_val: float32 scalar, the histogram's left edge (``+inf`` before data).
    max_val: float32 scalar, right edge (``-inf`` before data).
    x: the new batch, any shape and float dtype (binned in float32).
    upsample_rate: sub-bins per old bin when re-binning (torch: 16).

  Returns:
    ``(histogram, min_val, max_val)`` updated.
  """
  histogram = jnp.asarray(histogram, jnp.float32)
  if histogram.ndim != 1:
    raise ValueError(
        f"histogram_update: histogram must be 1-D [bins], got shape {histogram.shape}"
    )
  bins = histogram.shape[0]
  min_val = jnp.asarray(min_val, jnp.float32)
  max_val = jnp.asarray(max_val, jnp.float32)
  x = jnp.ravel(jnp.asarray(x)).astype(jnp.float32)
  finite = jnp.isfinite(x)
  has_data = jnp.any(finite)
  x_min = jnp.min(jnp.where(finite, x, jnp.inf))
  x_max = jnp.max(jnp.where(finite, x, -jnp.inf))
  weights = finite.astype(jnp.float32)

  uninitialized = (min_val == jnp.inf) | (max_val == -jnp.inf)
  new_min = jnp.minimum(min_val, x_min)
  new_max = jnp.maximum(max_val, x_max)
  same_range = (new_min == min_val) & (new_max == max_val)
  point_range = min_val == max_val
  branch = jnp.where(
      uninitialized, 0, jnp.where(same_range, 1, jnp.where(point_range, 2, 3))
  )

  def reset(_):
    return histc(x, bins, x_min, x_max, weights), x_min, x_max

  def add_same(_):
    return histogram + histc(x, bins, new_min, new_max, weights), min_val, max_val

  def add_to_point(_):
    # torch.sum(orig_hist) * histc(orig_min) + update, in torch's order.
    moved = histc(min_val, bins, new_min, new_max) * torch_sum(histogram)
    return moved + histc(x, bins, new_min, new_max, weights), new_min, new_max

  def add_upscaled(_):
    update = histc(x, bins, new_min, new_max, weights)
    moved = _upscale_histogram(histogram, min_val, max_val, new_min, new_max, upsample_rate)
    return update + moved, new_min, new_max

  new = jax.lax.switch(branch, (reset, add_same, add_to_point, add_upscaled), None)
  return tuple(jnp.where(has_data, n, o) for n, o in zip(new, (histogram, min_val, max_val)))


# ----------------------------------------------------------------------------
# Parameter search.
# ----------------------------------------------------------------------------


def _get_norm(delta_begin, delta_end, density):
  # density * (end^3 - begin^3) / 3, in torch's operation order, every product
  # rounded on its own (see `unfused`).
  cubes = (unfused(delta_end * delta_end * delta_end)
           - unfused(delta_begin * delta_begin * delta_begin))
  return unfused(density * true_divide(cubes, jnp.float32(3)))


def _quantization_error(histogram, start_bin, end_bin, bin_width32, range_hi, range_lo,
                        dst_nbins: int, lanes: int):
  """``HistogramObserver._compute_quantization_error(start_bin, end_bin)``.

  ``bin_width`` and ``dst_bin_width`` are Python doubles in torch, cast to
  float32 whenever they meet a tensor; ``range_hi + range_lo`` is the exact
  ``max_val - min_val`` from which we compute those float32 casts.
  """
  bins = histogram.shape[0]
  n = (end_bin - start_bin + 1).astype(jnp.float32)
  # dst_bin_width = bin_width * n / dst_nbins, with bin_width = (max - min) / bins.
  p, pe = two_prod(range_hi, n)
  dst_hi, dst_lo = _ff_div(p, pe + range_lo * n, jnp.float32(bins * dst_nbins))
  dst = _ff_round(dst_hi, dst_lo)
  half = dst / 2  # float32(dst_bin_width / 2): halving is exact

  src_bin = (jnp.arange(bins) - start_bin).astype(jnp.float32)
  src_bin_begin = unfused(src_bin * bin_width32)
  src_bin_end = src_bin_begin + bin_width32
  dst_bin_of_begin = jnp.clip(_div_floor(src_bin_begin, dst), 0, dst_nbins - 1)
  dst_bin_of_begin_center = unfused((dst_bin_of_begin + jnp.float32(0.5)) * dst)
  dst_bin_of_end = jnp.clip(_div_floor(src_bin_end, dst), 0, dst_nbins - 1)
  density = true_divide(histogram, bin_width32)

  norm = _get_norm(src_bin_begin - dst_bin_of_begin_center, jnp.ones_like(density) * half,
                   density)
  norm = norm + unfused((dst_bin_of_end - dst_bin_of_begin - 1) * _get_norm(-half, half, density))
  dst_bin_of_end_center = unfused(dst_bin_of_end * dst) + half
  norm = norm + _get_norm(-half, src_bin_end - dst_bin_of_end_center, density)
  total = torch_sum(norm, lanes)
  # torch returns 0.0 early when dst_bin_width (a double) is 0, i.e. max == min.
  return jnp.where((range_hi == 0) & (range_lo == 0), jnp.float32(0.0), total)


def _times_f32(hi, lo, t):
  """Nearest float32 of the double-float ``(hi + lo) * t``."""
  p, pe = two_prod(hi, t)
  return _ff_round(p, pe + lo * t)


def non_linear_param_search(
    histogram: jax.Array,
    min_val: jax.Array,
    max_val: jax.Array,
    *,
    dst_nbins: int = 256,
    lanes: int = TORCH_SUM_LANES,
) -> tuple[jax.Array, jax.Array]:
  """``HistogramObserver._non_linear_param_search``: the clipped range to quantize.

  Greedy search from the full range: each step advances the lower quantile
  ``alpha`` or the upper ``beta`` by 1e-5 (whichever bound moves fewer bins
  behind it loses), re-evaluating the L2 quantization error whenever the bin
  range changes, and stops at the first increase or when ``alpha >= beta``.

  Args:
    histogram: float32 ``[bins]``.
    min_val: float32 scalar, left edge of the histogram.
    max_val: float32 scalar, right edge.
    dst_nbins: number of quantization levels, ``2 ** bits`` of the dtype (256
      for both 8-bit dtypes, regardless of ``reduce_range``, as in torch).
    lanes: SIMD width of torch's float32 sum (see ``torch_sum``).

  Returns:
    ``(new_min, new_max)`` float32 scalars.
  """
  histogram = jnp.asarray(histogram, jnp.float32)
  bins = histogram.shape[0]
  min_val = jnp.asarray(min_val, jnp.float32)
  max_val = jnp.asarray(max_val, jnp.float32)
  bin_width_t = true_divide(max_val - min_val, jnp.float32(bins))  # the float32 tensor

  range_hi, range_lo = two_sum(max_val, -min_val)  # exact max - min
  # float32(bin_width) for the double bin_width = (max - min) / bins.
  bin_width32 = _ff_round(*_ff_div(range_hi, range_lo, jnp.float32(bins)))

  total = torch_sum(histogram, lanes)  # .item() of a float32 sum
  csum = _cumsum_double(histogram)
  idx = jnp.arange(bins)
  step_hi, step_lo = jnp.float32(_STEP_HI), jnp.float32(_STEP_LO)

  def steps(k):
    # k * 1e-5 as double-float (k < 2**24 is exact in float32).
    p, pe = two_prod(k.astype(jnp.float32), step_hi)
    return p, pe + k.astype(jnp.float32) * step_lo

  def cond(state):
    i, j, _, _, _, done = state
    return (~done) & (i + j <= _MAX_STEPS)

  def body(state):
    i, j, start_bin, end_bin, norm_min, _ = state
    a_hi, a_lo = steps(i + 1)  # next_alpha
    s_hi, s_lo = steps(j + 1)
    b_hi, b_lo = two_sum(jnp.float32(1.0), -s_hi)  # next_beta = 1 - (j + 1) * 1e-5
    b_lo = b_lo - s_lo
    # torch compares float32 cSum[l] with the double threshold cast to float32.
    thr_alpha = _times_f32(a_hi, a_lo, total)
    thr_beta = _times_f32(b_hi, b_lo, total)
    # l: first bin in [start, end) with cSum >= alpha * total, else end_bin.
    l = jnp.min(jnp.where((idx >= start_bin) & (idx < end_bin) & (csum >= thr_alpha),
                          idx, end_bin))
    # r: last bin in (start, end] with cSum <= beta * total, else start_bin.
    r = jnp.max(jnp.where((idx > start_bin) & (idx <= end_bin) & (csum <= thr_beta),
                          idx, start_bin))
    move_start = (l - start_bin) > (end_bin - r)
    next_start = jnp.where(move_start, l, start_bin)
    next_end = jnp.where(move_start, end_bin, r)
    i = i + move_start.astype(i.dtype)
    j = j + (~move_start).astype(j.dtype)
    changed = (next_start != start_bin) | (next_end != end_bin)
    norm = jax.lax.cond(
        changed,
        lambda: _quantization_error(histogram, next_start, next_end, bin_width32,
                                    range_hi, range_lo, dst_nbins, lanes),
        lambda: jnp.float32(0.0),
    )
    stop = changed & (norm > norm_min)
    accept = changed & ~stop
    return (
        i,
        j,
        jnp.where(accept, next_start, start_bin),
        jnp.where(accept, next_end, end_bin),
        jnp.where(accept, norm, norm_min),
        stop,
    )

  zero = jnp.int32(0)
  init = (zero, zero, zero, jnp.int32(bins - 1), jnp.float32(jnp.inf), jnp.bool_(False))
  _, _, start_bin, end_bin, _, _ = jax.lax.while_loop(cond, body, init)
  new_min = min_val + unfused(bin_width_t * start_bin.astype(jnp.float32))
  new_max = min_val + unfused(bin_width_t * (end_bin + 1).astype(jnp.float32))
  return new_min, new_max


@functools.partial(
    jax.jit,
    static_argnames=("quant_min", "quant_max", "qscheme", "dtype", "eps",
                     "has_customized_qrange", "lanes"),
)
def histogram_qparams(
    histogram: jax.Array,
    min_val: jax.Array,
    max_val: jax.Array,
    *,
    quant_min: int,
    quant_max: int,
    qscheme: str,
    dtype: str,
    eps: float = FLOAT32_EPS,
    has_customized_qrange: bool = False,
    lanes: int = TORCH_SUM_LANES,
) -> tuple[jax.Array, jax.Array]:
  """``HistogramObserver.calculate_qparams``: search the range, then scale/zero point.

  Never observed (``min_val == +inf`` and ``max_val == -inf``): scale 1.0, zero
  point 0 (torch warns and returns the same), without running the search.

  Args:
    histogram: float32 ``[bins]``.
    min_val: float32 scalar.
    max_val: float32 scalar.
    quant_min: effective lower bound (``quant_range``).
    quant_max: effective upper bound.
    qscheme: ``"per_tensor_affine"`` or ``"per_tensor_symmetric"``.
    dtype: ``"quint8"`` or ``"qint8"``.
    eps: scale floor.
    has_customized_qrange: whether quant_min/quant_max were given explicitly.
    lanes: SIMD width of torch's float32 sum (see ``torch_sum``).

  Returns:
    ``(scale, zero_point)``: float32 and int32 scalars.
  """
  if qscheme not in ("per_tensor_affine", "per_tensor_symmetric"):
    raise ValueError(
        "histogram_qparams: qscheme must be 'per_tensor_affine' or"
        f" 'per_tensor_symmetric' (the histogram observer is per-tensor), got {qscheme!r}"
    )
  if dtype not in ("quint8", "qint8"):
    raise ValueError(f"histogram_qparams: dtype must be 'quint8' or 'qint8', got {dtype!r}")
  min_val = jnp.asarray(min_val, jnp.float32)
  max_val = jnp.asarray(max_val, jnp.float32)
  never_observed = (min_val == jnp.inf) & (max_val == -jnp.inf)

  def search():
    return non_linear_param_search(histogram, min_val, max_val, dst_nbins=256, lanes=lanes)

  new_min, new_max = jax.lax.cond(
      never_observed, lambda: (min_val, max_val), search
  )
  return calculate_qparams(
      new_min,
      new_max,
      quant_min=quant_min,
      quant_max=quant_max,
      qscheme=qscheme,
      dtype=dtype,
      eps=eps,
      has_customized_qrange=has_customized_qrange,
  )
