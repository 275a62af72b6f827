"""The histogram observer's maths against torch's HistogramObserver, bit for bit.

Each scenario feeds the same batches to torch's observer and to
``histogram_update``; histograms, ranges and (for several dtype/qscheme
configurations) the searched qparams must be identical.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.ao.quantization import HistogramObserver

from flax_qmha import _histogram as H
from flax_qmha._qparams import calculate_qparams, quant_range

F32 = np.float32

pytestmark = pytest.mark.filterwarnings(
    "ignore:Please use quant_min and quant_max:UserWarning",
    "ignore:torch.inf detected in input tensor:UserWarning",
    "ignore:must run observer before calling calculate_qparams:UserWarning",
)

_update = jax.jit(H.histogram_update)
_search = jax.jit(H.non_linear_param_search)
# The x86 default activation config, end to end.
_x86_qparams = jax.jit(lambda h, lo, hi: H.histogram_qparams(
    h, lo, hi, quant_min=0, quant_max=127, qscheme="per_tensor_affine", dtype="quint8"))


# ----------------------------------------------------------------------------
# The small torch kernels.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "start, end, steps",
    [(-1.2345, 3.7654, 2049), (0.1, 0.7, 32769), (-5.0, -1e-3, 101), (1e-30, 2e-30, 2049),
     (-3e20, 7e21, 1001), (2.0, 2.0, 17)],
    ids=["mixed", "upsampled", "negative", "tiny", "huge", "empty-range"],
)
def test_linspace_matches_torch(start, end, steps):
  start, end = F32(start), F32(end)
  want = torch.linspace(torch.tensor(start), torch.tensor(end), steps).numpy()
  got = np.asarray(jax.jit(H.torch_linspace, static_argnums=2)(start, end, steps))
  np.testing.assert_array_equal(got, want, err_msg=f"linspace({start}, {end}, {steps})")


@pytest.mark.parametrize("n", [1, 7, 8, 37, 100, 2048, 5000])
def test_torch_sum_reproduces_torch_summation_order(n):
  rng = np.random.default_rng(n)
  for trial in range(5):
    v = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(F32)
    want = torch.from_numpy(v).sum().item()
    got = float(jax.jit(H.torch_sum)(v))
    assert got == want, f"n={n} trial {trial}: {got!r} != torch {want!r}"


def test_cumsum_is_accumulated_in_double_like_torch():
  rng = np.random.default_rng(0)
  v = (rng.integers(0, 300, 2048) / 16.0 ** rng.integers(0, 4, 2048) * 1.1).astype(F32)
  want = torch.cumsum(torch.from_numpy(v), 0).numpy()
  np.testing.assert_array_equal(np.asarray(jax.jit(H._cumsum_double)(v)), want)


@pytest.mark.parametrize(
    "case", ["data-range", "wider-range", "narrower-range", "constant", "ties-on-edges"])
def test_histc_matches_torch(case):
  rng = np.random.default_rng(1)
  x = rng.standard_normal(5000).astype(F32)
  lo, hi = x.min(), x.max()
  if case == "wider-range":
    lo, hi = F32(lo - 1.3), F32(hi + 0.7)
  elif case == "narrower-range":  # values outside [lo, hi] are dropped
    lo, hi = F32(-0.5), F32(1.25)
  elif case == "constant":
    x = np.full(100, 0.7, F32)
    lo = hi = F32(0.7)
  elif case == "ties-on-edges":  # values exactly on bin edges
    x = (np.arange(-1024, 1025) / 512).astype(F32)
    lo, hi = F32(-2.0), F32(2.0)
  want = torch.histc(torch.from_numpy(x), 2048, min=float(lo), max=float(hi)).numpy()
  got = np.asarray(jax.jit(H.histc, static_argnums=1)(x, 2048, lo, hi))
  np.testing.assert_array_equal(got, want, err_msg=case)


def test_search_step_count_rule_holds_for_torch_doubles():
  # _MAX_STEPS encodes: alpha after i steps < beta after j steps <=> i + j <= 100000.
  n = H._MAX_STEPS + 2
  alpha = np.add.accumulate(np.concatenate([[0.0], np.full(n, H._STEPSIZE)]))
  beta = np.subtract.accumulate(np.concatenate([[1.0], np.full(n, H._STEPSIZE)]))
  i = np.arange(H._MAX_STEPS + 1)
  assert np.all(alpha[i] < beta[H._MAX_STEPS - i]), "i + j == MAX must still loop"
  assert np.all(alpha[i] >= beta[H._MAX_STEPS - i + 1]), "i + j == MAX + 1 must stop"


# ----------------------------------------------------------------------------
# Whole observer: several batches, then qparams.
# ----------------------------------------------------------------------------

SHAPE = (32, 24)


def _scenario(name: str) -> list[np.ndarray]:
  rng = np.random.default_rng(abs(hash(name)) % 2**32)

  def normal(scale=1.0, loc=0.0):
    return (rng.standard_normal(SHAPE) * scale + loc).astype(F32)

  if name == "widening":
    return [normal(0.5), normal(1.0, 0.3), normal(2.0, -0.5), normal(4.0)]
  if name == "shifting":
    return [normal(1.0, 0.0), normal(1.0, 3.0), normal(1.0, -4.0), normal(0.2, 1.0)]
  if name == "same-range":
    first = normal(3.0)
    return [first, np.clip(normal(0.5), first.min(), first.max()), np.zeros(SHAPE, F32)]
  if name == "constant-then-spread":
    return [np.full(SHAPE, 0.25, F32), np.full(SHAPE, 0.25, F32), normal(1.0), normal(2.0)]
  if name == "relu-outliers":
    xs = [np.maximum(normal(1.0), 0) for _ in range(3)]
    xs[1][0, 0] = 40.0
    return xs
  if name == "heavy-tailed":
    return [(rng.standard_t(2, SHAPE) * 0.3).astype(F32) for _ in range(3)]
  if name == "all-zero":
    return [np.zeros(SHAPE, F32)] * 2
  if name == "constant":
    return [np.full(SHAPE, -1.75, F32)] * 2
  if name == "tiny":
    return [normal(1e-30), normal(3e-30, 1e-30)]
  if name == "large":
    return [normal(1e12), normal(3e12, 1e12)]
  if name == "with-inf":
    x = normal(1.0)
    x[0, :3] = [np.inf, -np.inf, np.inf]
    return [normal(0.5), x, normal(2.0)]
  raise KeyError(name)


SCENARIOS = ["widening", "shifting", "same-range", "constant-then-spread", "relu-outliers",
             "heavy-tailed", "all-zero", "constant", "tiny", "large", "with-inf"]

# dtype, qscheme, reduce_range
CONFIGS = {
    "x86-quint8-affine-reduced": ("quint8", "per_tensor_affine", True),
    "quint8-affine": ("quint8", "per_tensor_affine", False),
    "quint8-symmetric": ("quint8", "per_tensor_symmetric", False),
    "qint8-symmetric": ("qint8", "per_tensor_symmetric", False),
    "qint8-affine-reduced": ("qint8", "per_tensor_affine", True),
}


@pytest.fixture(scope="module")
def qparams_fns():
  # histogram_qparams = non_linear_param_search + calculate_qparams; the search
  # does not depend on the config, so compile it once and vary the second step.
  fns = {}
  for name, (dtype, qscheme, reduce_range) in CONFIGS.items():
    quant_min, quant_max = quant_range(dtype, reduce_range)
    fns[name] = jax.jit(lambda lo, hi, _d=dtype, _q=qscheme, _a=quant_min, _b=quant_max:
                        calculate_qparams(lo, hi, quant_min=_a, quant_max=_b, qscheme=_q,
                                          dtype=_d))
  return fns


def _torch_observer(config: str, bins: int = 2048) -> HistogramObserver:
  dtype, qscheme, reduce_range = CONFIGS[config]
  return HistogramObserver(bins=bins, dtype=getattr(torch, dtype),
                           qscheme=getattr(torch, qscheme), reduce_range=reduce_range)


def _observe_both(batches, bins=2048):
  obs = _torch_observer("quint8-affine", bins)
  hist = jnp.zeros(bins, jnp.float32)
  lo, hi = jnp.float32(np.inf), jnp.float32(-np.inf)
  for step, x in enumerate(batches):
    obs(torch.from_numpy(x.copy()))
    hist, lo, hi = _update(hist, lo, hi, x)
    yield step, obs, hist, lo, hi


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_histogram_and_qparams_match_torch(scenario, qparams_fns):
  final = None
  for step, obs, hist, lo, hi in _observe_both(_scenario(scenario)):
    where = f"{scenario}, after batch {step}"
    np.testing.assert_array_equal(np.asarray(hist), obs.histogram.numpy(), err_msg=where)
    assert float(lo) == obs.min_val.item() and float(hi) == obs.max_val.item(), (
        f"{where}: range ({float(lo)}, {float(hi)}) vs torch"
        f" ({obs.min_val.item()}, {obs.max_val.item()})")
    final = obs, hist, lo, hi
  obs, hist, lo, hi = final
  want_range = obs._non_linear_param_search()
  got_range = _search(hist, lo, hi)
  got_pair = (float(got_range[0]), float(got_range[1]))
  assert got_pair == (want_range[0].item(), want_range[1].item()), (
      f"{scenario}: searched range {[float(v) for v in got_range]} vs torch"
      f" {[v.item() for v in want_range]}")
  for config, fn in qparams_fns.items():
    ref = _torch_observer(config)
    ref.load_state_dict(obs.state_dict())
    got_scale, got_zp = fn(*got_range)
    if config == "x86-quint8-affine-reduced":  # end to end, on both sides
      want_scale, want_zp = ref.calculate_qparams()
      assert (float(got_scale), int(got_zp)) == tuple(float(v) for v in _x86_qparams(hist, lo, hi))
    else:  # the search is config-independent: run torch's once
      want_scale, want_zp = ref._calculate_qparams(*want_range)
    assert np.isfinite(float(got_scale)), f"{scenario}/{config}: scale is not finite"
    assert (float(got_scale), int(got_zp)) == (want_scale.item(), want_zp.item()), (
        f"{scenario}/{config}: got ({float(got_scale)!r}, {int(got_zp)}), torch"
        f" ({want_scale.item()!r}, {want_zp.item()})")


@pytest.mark.parametrize("bins", [300, 1000])
def test_other_bin_counts_match_torch(bins):
  batches = _scenario("shifting")
  for step, obs, hist, lo, hi in _observe_both(batches, bins):
    np.testing.assert_array_equal(np.asarray(hist), obs.histogram.numpy(),
                                  err_msg=f"bins={bins}, batch {step}")
  want = obs.calculate_qparams()
  got = H.histogram_qparams(hist, lo, hi, quant_min=0, quant_max=255,
                            qscheme="per_tensor_affine", dtype="quint8")
  assert (float(got[0]), int(got[1])) == (want[0].item(), want[1].item()), f"bins={bins}"


def test_nan_is_ignored_where_torch_would_poison_the_range():
  x = np.random.default_rng(3).standard_normal(SHAPE).astype(F32)
  with_nan = x.copy()
  with_nan[1, 1] = np.nan
  hist, lo, hi = _update(jnp.zeros(2048), jnp.float32(np.inf), jnp.float32(-np.inf), with_nan)
  obs = _torch_observer("quint8-affine")
  obs(torch.from_numpy(np.delete(x.ravel(), 1 * SHAPE[1] + 1)))
  np.testing.assert_array_equal(np.asarray(hist), obs.histogram.numpy())
  assert float(lo) == obs.min_val.item() and float(hi) == obs.max_val.item()


def test_batch_without_finite_values_changes_nothing():
  hist0, lo0, hi0 = _update(jnp.zeros(2048), jnp.float32(np.inf), jnp.float32(-np.inf),
                            np.ones(SHAPE, F32))
  hist, lo, hi = _update(hist0, lo0, hi0, np.full(SHAPE, np.nan, F32))
  np.testing.assert_array_equal(np.asarray(hist), np.asarray(hist0))
  assert (float(lo), float(hi)) == (float(lo0), float(hi0))


def test_never_observed_gives_default_qparams():
  obs = _torch_observer("x86-quint8-affine-reduced")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    want = obs.calculate_qparams()
  got = _x86_qparams(jnp.zeros(2048), jnp.float32(np.inf), jnp.float32(-np.inf))
  assert (float(got[0]), int(got[1])) == (want[0].item(), want[1].item()) == (1.0, 0)


def test_vmap_over_observers_matches_one_by_one():
  batches = [_scenario("widening"), _scenario("shifting")]
  hist = jnp.zeros((2, 2048))
  lo = jnp.full((2,), np.inf, jnp.float32)
  hi = jnp.full((2,), -np.inf, jnp.float32)
  step = jax.jit(jax.vmap(H.histogram_update))
  for k in range(3):
    hist, lo, hi = step(hist, lo, hi, np.stack([batches[0][k], batches[1][k]]))
  scales, zps = jax.jit(jax.vmap(_x86_qparams))(hist, lo, hi)
  for i in range(2):
    h1, l1, u1 = jnp.zeros(2048), jnp.float32(np.inf), jnp.float32(-np.inf)
    for k in range(3):
      h1, l1, u1 = _update(h1, l1, u1, batches[i][k])
    np.testing.assert_array_equal(np.asarray(hist[i]), np.asarray(h1), err_msg=f"observer {i}")
    s1, z1 = _x86_qparams(h1, l1, u1)
    assert (float(scales[i]), int(zps[i])) == (float(s1), int(z1)), f"observer {i}"


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(qscheme="per_channel_affine"), "per_tensor"), (dict(dtype="qint32"), "dtype must be")],
    ids=["per-channel", "qint32"],
)
def test_histogram_qparams_rejects_bad_config(kwargs, match):
  args = dict(quant_min=0, quant_max=255, qscheme="per_tensor_affine", dtype="quint8")
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    H.histogram_qparams(jnp.zeros(8), 0.0, 1.0, **args)
