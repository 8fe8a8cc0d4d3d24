"""Quantization-aware training: fine-tune through fake-quantized weights, then pack them.

::

    llmspeed.qat.prepare(model, "int4", group_size=64, init="rtn")    # or init="gptq", or "int8"
    llmspeed.finetune(model, texts, steps=100, lr=2e-5, precision="bf16")
    llmspeed.qat.convert(model)                                       # -> Int4Linear / Int8Linear

:mod:`.fake_quant` holds the straight-through fake quantizer (bit-identical to
``dequantize(quantize(w))``) and :class:`FakeQuantLinear`; :mod:`.api` the two verbs.
"""

from .api import FORMATS, INITS, convert, convert_layer, fake_quant_layers, is_prepared, prepare
from .fake_quant import FakeQuantLinear, fake_quantize, init_qparams

__all__ = [
    "FORMATS",
    "INITS",
    "FakeQuantLinear",
    "convert",
    "convert_layer",
    "fake_quant_layers",
    "fake_quantize",
    "init_qparams",
    "is_prepared",
    "prepare",
]
