"""Round-to-nearest (``method="rtn"``): data-free, per weight, deterministic."""

from __future__ import annotations

import torch

from .. import primitives as P
from ..config import QuantConfig
from .registry import QuantizedWeight, register_method


def rtn_weight(weight: torch.Tensor, config: QuantConfig) -> QuantizedWeight:
    """Codes, scales (and zeros) of ``weight`` [out, in] by rounding each value to the nearest level."""
    w = weight.detach().float()  # [out, in]
    if config.format == "int8":
        scales = P.choose_qparams_int8(w, config.group_size)  # [out] or [out, groups]
        return QuantizedWeight(P.quantize_int8(w, scales, config.group_size), scales)
    w = P.pad_columns(w, config.padded_in_features(w.shape[1]))  # [out, in_pad]
    g = config.group_size
    if config.format == "int4":
        choose = P.choose_qparams_int4_symmetric if config.symmetric else P.choose_qparams_int4
        scales, zeros = choose(w, g)  # [out, groups] x2
        return QuantizedWeight(P.quantize_int4(w, scales, zeros, g), scales, zeros)
    scales = P.choose_qparams_nf4(w, g)  # [out, groups]
    effective = nf4_effective_scales(scales, config)
    return QuantizedWeight(P.quantize_nf4(w, effective, g), scales)


def nf4_effective_scales(scales: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """The scales an NF4 module will actually use: round-tripped through double quantization when enabled.

    Methods choosing NF4 codes should pick them against these, so that codes are nearest for the stored scales.
    """
    if not config.double_quant:
        return scales
    return P.double_dequantize(*P.double_quantize(scales))


register_method("rtn", weight=rtn_weight, symmetric=True, int8_groups=True)
