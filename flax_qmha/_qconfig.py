"""Quantization configuration: what to observe and how to choose qparams.

``QuantSpec`` describes one torch observer (class, dtype, qscheme, range, moving
average constant, histogram bins); ``QConfig`` pairs the activation and weight
specs and says whether the model fake-quantizes (QAT) or only observes (PTQ
calibration). ``get_default_qconfig`` / ``get_default_qat_qconfig`` reproduce
torch 2.13's presets of the same names.

Observer names map to torch classes as follows (per-tensor / per-channel qscheme):

* ``"minmax"``: ``MinMaxObserver`` / ``PerChannelMinMaxObserver``;
* ``"moving_average_minmax"``: ``MovingAverageMinMaxObserver`` /
  ``MovingAveragePerChannelMinMaxObserver``;
* ``"histogram"``: ``HistogramObserver`` (per-tensor only, as in torch).

torch's per-channel weight observers use ``ch_axis=0`` on ``[out, in]`` weights;
our kernels are ``[in, out]``, so the matching channel axis is -1 (see ``Observer``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flax_qmha._qparams import FLOAT32_EPS, QSCHEMES, quant_range

__all__ = [
    "OBSERVERS",
    "BACKENDS",
    "QuantSpec",
    "QConfig",
    "get_default_qconfig",
    "get_default_qat_qconfig",
]

OBSERVERS = ("minmax", "moving_average_minmax", "histogram")
SPEC_DTYPES = ("quint8", "qint8")
BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """How one tensor is observed and quantized (one torch observer).

  Attributes:
    observer: ``"minmax"`` (running min/max), ``"moving_average_minmax"``
      (exponential moving average of min/max; the first batch is copied) or
      ``"histogram"`` (torch's HistogramObserver, per-tensor only).
    dtype: ``"quint8"`` or ``"qint8"``.
    qscheme: ``"per_tensor_affine"``, ``"per_tensor_symmetric"``,
      ``"per_channel_affine"`` or ``"per_channel_symmetric"``.
    reduce_range: drop one bit of range (quint8 0..127, qint8 -64..63), as the
      x86/fbgemm backends need for activations.
    quant_min: custom lower bound, or None for the dtype's; give both or neither.
    quant_max: custom upper bound, or None.
    averaging_constant: moving-average weight of the new batch (torch's default
      0.01); used by ``"moving_average_minmax"`` only.
    eps: lower bound of the scale (float32 epsilon, as torch).
    bins: number of histogram bins (``"histogram"`` only).
  """

  observer: str
  dtype: str
  qscheme: str
  reduce_range: bool = False
  quant_min: int | None = None
  quant_max: int | None = None
  averaging_constant: float = 0.01
  eps: float = FLOAT32_EPS
  bins: int = 2048

  def __post_init__(self):
    if self.observer not in OBSERVERS:
      raise ValueError(f"QuantSpec: observer must be one of {OBSERVERS}, got {self.observer!r}")
    if self.dtype not in SPEC_DTYPES:
      raise ValueError(f"QuantSpec: dtype must be one of {SPEC_DTYPES}, got {self.dtype!r}")
    if self.qscheme not in QSCHEMES:
      raise ValueError(f"QuantSpec: qscheme must be one of {QSCHEMES}, got {self.qscheme!r}")
    if not isinstance(self.reduce_range, (bool, np.bool_)):
      raise TypeError(f"QuantSpec: reduce_range must be a bool, got {self.reduce_range!r}")
    if self.observer == "histogram" and self.is_per_channel:
      raise ValueError(
          f"QuantSpec: qscheme {self.qscheme!r} is per-channel but observer 'histogram' is"
          " per-tensor only (torch's HistogramObserver); use 'minmax' or"
          " 'moving_average_minmax' for per-channel"
      )
    for name in ("quant_min", "quant_max"):
      value = getattr(self, name)
      if value is not None and not _is_int(value):
        raise TypeError(f"QuantSpec: {name} must be an int or None, got {value!r}")
    if (self.quant_min is None) != (self.quant_max is None):
      raise ValueError(
          "QuantSpec: give both quant_min and quant_max or neither, got"
          f" quant_min={self.quant_min!r}, quant_max={self.quant_max!r}"
      )
    if self.quant_min is not None:
      if self.quant_min >= self.quant_max:
        raise ValueError(
            f"QuantSpec: quant_min must be < quant_max, got quant_min={self.quant_min},"
            f" quant_max={self.quant_max}"
        )
      if not self.quant_min <= 0 <= self.quant_max:
        raise ValueError(
            f"QuantSpec: the range [quant_min, quant_max] must contain 0, got"
            f" [{self.quant_min}, {self.quant_max}]"
        )
      try:
        lo, hi = quant_range(self.dtype, self.reduce_range, self.quant_min, self.quant_max)
      except ValueError as e:
        raise ValueError(
            f"QuantSpec: quant_min/quant_max [{self.quant_min}, {self.quant_max}] must lie"
            f" within dtype {self.dtype!r}: {e}"
        ) from None
      if lo >= hi:  # reduce_range halves a custom range, e.g. [0, 1] -> [0, 0]
        raise ValueError(
            f"QuantSpec: reduce_range=True turns [quant_min, quant_max] ="
            f" [{self.quant_min}, {self.quant_max}] into the empty range [{lo}, {hi}]"
        )
    if (self.observer != "histogram" and self.is_symmetric and self.reduce_range
        and self.dtype == "quint8"):
      # torch's MinMax observers raise NotImplementedError for this combination.
      raise ValueError(
          "QuantSpec: reduce_range=True is not supported with a symmetric qscheme and"
          f" dtype 'quint8' for observer {self.observer!r} (torch raises for it)"
      )
    c = self.averaging_constant
    if isinstance(c, bool) or not isinstance(c, (int, float, np.floating)) or not 0 < c <= 1:
      raise ValueError(f"QuantSpec: averaging_constant must be in (0, 1], got {c!r}")
    if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float, np.floating)) \
        or not 0 < self.eps < np.inf:
      raise ValueError(f"QuantSpec: eps must be a positive finite float, got {self.eps!r}")
    if not _is_int(self.bins) or self.bins < 2:
      raise ValueError(f"QuantSpec: bins must be an int >= 2, got {self.bins!r}")

  @property
  def is_per_channel(self) -> bool:
    """Whether the qscheme has one scale/zero point per output channel."""
    return self.qscheme.startswith("per_channel")

  @property
  def is_symmetric(self) -> bool:
    """Whether the qscheme is symmetric (zero point fixed at 0, or 128 for quint8)."""
    return self.qscheme.endswith("symmetric")

  @property
  def has_customized_qrange(self) -> bool:
    """Whether quant_min/quant_max were given (torch's ``has_customized_qrange``)."""
    return self.quant_min is not None

  @property
  def quant_range(self) -> tuple[int, int]:
    """The effective ``(quant_min, quant_max)`` after ``reduce_range``, as torch's observer."""
    return quant_range(self.dtype, self.reduce_range, self.quant_min, self.quant_max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QConfig:
  """Activation and weight quantization of a model.

  Attributes:
    activation: spec of every observed activation (layer outputs, attention
      output and weights).
    weight: spec of the linear layers' kernels.
    fake_quant: True for quantization-aware training (observe, then fake-quantize
      with the fresh qparams, like torch's FakeQuantize); False for post-training
      calibration (observe only; outputs unchanged).
  """

  activation: QuantSpec
  weight: QuantSpec
  fake_quant: bool

  def __post_init__(self):
    for name in ("activation", "weight"):
      value = getattr(self, name)
      if not isinstance(value, QuantSpec):
        raise TypeError(f"QConfig: {name} must be a QuantSpec, got {type(value).__name__}")
    if not isinstance(self.fake_quant, (bool, np.bool_)):
      raise TypeError(f"QConfig: fake_quant must be a bool, got {self.fake_quant!r}")


def _check_backend(backend, owner: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"{owner}: backend must be one of {list(BACKENDS)}, got {backend!r}")


def get_default_qconfig(backend: str = "x86") -> QConfig:
  """torch 2.13's ``get_default_qconfig(backend)`` (post-training, version 0).

  Activations: ``HistogramObserver``, quint8 per-tensor affine, with
  ``reduce_range`` on x86/fbgemm (range 0..127) and off on qnnpack/onednn.
  Weights: qint8 symmetric, per channel (``PerChannelMinMaxObserver``) except on
  qnnpack, which uses a per-tensor ``MinMaxObserver``.

  Args:
    backend: ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` or ``"onednn"``.

  Returns:
    A ``QConfig`` with ``fake_quant=False``.
  """
  _check_backend(backend, "get_default_qconfig")
  activation = QuantSpec(
      observer="histogram",
      dtype="quint8",
      qscheme="per_tensor_affine",
      reduce_range=backend in ("x86", "fbgemm"),
  )
  weight = QuantSpec(
      observer="minmax",
      dtype="qint8",
      qscheme="per_tensor_symmetric" if backend == "qnnpack" else "per_channel_symmetric",
  )
  return QConfig(activation=activation, weight=weight, fake_quant=False)


def get_default_qat_qconfig(backend: str = "x86") -> QConfig:
  """torch 2.13's ``get_default_qat_qconfig(backend)`` (version 1, fused observers).

  Activations: moving-average min/max (constant 0.01), quint8 per-tensor affine
  with the explicit range 0..255 and ``reduce_range`` on x86/fbgemm, which torch
  turns into 0..127. Weights: moving-average min/max, qint8 symmetric with the
  explicit range -128..127, per channel except on qnnpack. The weights' averaging
  constant is 0.01 as well: torch's docstrings call the weight observer
  memoryless (constant 1), but the preset does not pass one.

  Args:
    backend: ``"x86"``, ``"fbgemm"``, ``"qnnpack"`` or ``"onednn"``.

  Returns:
    A ``QConfig`` with ``fake_quant=True``.
  """
  _check_backend(backend, "get_default_qat_qconfig")
  activation = QuantSpec(
      observer="moving_average_minmax",
      dtype="quint8",
      qscheme="per_tensor_affine",
      reduce_range=backend in ("x86", "fbgemm"),
      quant_min=0,
      quant_max=255,
  )
  weight = QuantSpec(
      observer="moving_average_minmax",
      dtype="qint8",
      qscheme="per_tensor_symmetric" if backend == "qnnpack" else "per_channel_symmetric",
      quant_min=-128,
      quant_max=127,
  )
  return QConfig(activation=activation, weight=weight, fake_quant=True)
