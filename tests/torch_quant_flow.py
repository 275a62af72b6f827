"""torch's own eager-mode quantization flow for an MHA, for reference numbers."""

from __future__ import annotations

import torch
from torch import nn

QUANTIZABLE = {"float_to_observed_custom_module_class": {
    nn.MultiheadAttention: torch.ao.nn.quantizable.MultiheadAttention}}
QUANTIZED = {"observed_to_quantized_custom_module_class": {
    torch.ao.nn.quantizable.MultiheadAttention: torch.ao.nn.quantized.MultiheadAttention}}


class QuantWrapped(nn.Module):
  """An MHA between QuantStubs and a DeQuantStub: torch's quantized MHA takes
  quantized query/key/value, whose qparams live in the stubs outside it."""

  def __init__(self, mha: nn.MultiheadAttention):
    super().__init__()
    self.quant_query = torch.ao.quantization.QuantStub()
    self.quant_key = torch.ao.quantization.QuantStub()
    self.quant_value = torch.ao.quantization.QuantStub()
    self.mha = mha
    self.dequant = torch.ao.quantization.DeQuantStub()

  def forward(self, q, k, v, key_padding_mask=None, attn_mask=None, need_weights=True,
              average_attn_weights=True):
    out, w = self.mha(self.quant_query(q), self.quant_key(k), self.quant_value(v),
                      key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                      need_weights=need_weights, average_attn_weights=average_attn_weights)
    if w is not None and w.is_quantized:
      w = w.dequantize()
    return self.dequant(out), w


def observe_and_convert(mha: nn.MultiheadAttention, qconfig, calibration):
  """Returns ``(observed, converted)`` wrapped models after calibrating on the
  ``(q, k, v)`` tuples of ``calibration``. ``mha`` itself is left untouched."""
  import copy

  model = QuantWrapped(copy.deepcopy(mha)).eval()
  model.qconfig = qconfig
  observed = torch.ao.quantization.prepare(model, prepare_custom_config_dict=QUANTIZABLE)
  with torch.no_grad():
    for q, k, v in calibration:
      observed(q, k, v)
  converted = torch.ao.quantization.convert(
      observed, inplace=False, convert_custom_config_dict=QUANTIZED)
  return observed, converted
